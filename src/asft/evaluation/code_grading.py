"""Code benchmarks (HumanEval(+), MBPP(+)): the model's code out of a completion, and a test program run in the
sandbox.

Grading follows evalplus 0.3.1 (evalplus/eval/__init__.py): the candidate and the canonical solution are called on
the same inputs (deep-copied) and their outputs compared, `==` or, failing that, within `atol` (1e-6 for float
outputs when the task gives 0) plus a relative 1e-7, as numpy's `allclose`. evalplus's special oracles are kept:
HumanEval's `find_zero` is checked by the root it returns, and eight MBPP+ tasks compare as sets, three by
"not None", four by an alternative reading of their task (their `_special_oracle.py`). The base score uses the
task's `base_input`, the "+" score `base_input + plus_input`. A record without inputs (OpenAI's original
HumanEval.jsonl) runs its own `check(candidate)` instead. The reference outputs are computed in the same sandbox,
before the candidate's code is loaded, so nothing the candidate does at import can change them.

MBPP+ stores some tasks' tuples, sets and complex numbers as JSON lists and strings; as evalplus does when it loads
the file, the harness converts them back by task id before the reference or the candidate sees them (the tests JSON
keeps them as JSON). The candidate's output is swallowed, as evalplus's `swallow_io`, and any exit it attempts
(SystemExit, KeyboardInterrupt, GeneratorExit, os._exit) fails it: a program passes only when the harness prints a
random per-run token after its last check, which `grade_code` looks for.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from asft.evaluation.sandbox import SandboxLimits, SandboxResult, run_programs

# Where a base model, continuing a function, goes on to write a test script or the next problem's setup.
CODE_STOP: tuple[str, ...] = ("\nif __name__", "\nprint(", "\nassert ")
INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class CodeTests:
    """What a code problem is graded against (stored as JSON in `Example.tests`)."""

    entry_point: str
    inputs: list[Any] | None = None  # argument lists; None: run `check` instead
    atol: float = 0.0
    check: str | None = None  # test code defining check(candidate) (original HumanEval)
    dataset: str = ""  # "humaneval" or "mbpp": whose special oracles apply
    task_id: str = ""  # evalplus's id ("Mbpp/2"): which MBPP+ inputs the harness converts back to tuples, sets...

    def to_json(self) -> str:
        fields = ("entry_point", "inputs", "atol", "check", "dataset", "task_id")
        return json.dumps({name: getattr(self, name) for name in fields})

    @classmethod
    def from_json(cls, text: str) -> CodeTests:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("entry_point"), str) or not data["entry_point"]:
            raise ValueError("code tests need a non-empty 'entry_point'")
        inputs, check = data.get("inputs"), data.get("check")
        if inputs is not None and not (isinstance(inputs, list) and all(isinstance(a, list) for a in inputs)):
            raise ValueError("'inputs' must be a list of argument lists")
        if (inputs is None) == (check is None):
            raise ValueError("code tests need either 'inputs' or 'check'")
        if check is not None and not isinstance(check, str):
            raise ValueError("'check' must be a string")
        atol = data.get("atol", 0.0)
        if not isinstance(atol, (int, float)) or isinstance(atol, bool) or atol < 0:
            raise ValueError("'atol' must be a non-negative number")
        dataset = data.get("dataset", "")
        if dataset not in ("", "humaneval", "mbpp"):
            raise ValueError(f"'dataset' must be 'humaneval' or 'mbpp', got {dataset!r}")
        task_id = data.get("task_id", "")
        if not isinstance(task_id, str):
            raise ValueError("'task_id' must be a string")
        if dataset == "mbpp" and inputs is not None and not task_id:
            # without it the MBPP+ inputs stored as lists would silently reach the programs as lists
            raise ValueError("MBPP tests need the evalplus 'task_id' (normalise the benchmark again)")
        return cls(data["entry_point"], inputs, float(atol), check, dataset, task_id)


@dataclass(frozen=True)
class CodeGrade:
    correct: bool
    code: str  # the program the candidate's code became (what was run)
    result: SandboxResult


def code_instruction(prompt: str) -> str:
    """evalplus's instruction for chat/instruct prompting, around the problem's own prompt."""
    return f"{INSTRUCTION}\n```\n{prompt.strip()}\n```"


def extract_code(completion: str, prompt: str, entry_point: str) -> str:
    """The candidate's code: the fenced block that defines `entry_point` (else the longest block), or, without
    fences, the prompt followed by the completion (a HumanEval-style continuation). Code that does not define
    `entry_point` itself is read as the continuation of the prompt."""
    blocks = [body for language, body in _FENCE.findall(completion) if language.lower() in ("", "python", "py")]
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    if blocks:
        code = next((b for b in blocks if defines.search(b)), max(blocks, key=len))
    else:
        code = completion
    if defines.search(code):
        # A restated function keeps the prompt's imports (HumanEval prompts import from typing).
        imports = [line for line in prompt.splitlines() if re.match(r"(?:from\s+\S+\s+)?import\s", line)]
        return "\n".join(imports + [code]) if imports else code
    return prompt + code


_HARNESS = """
import copy as _copy
import math as _math
import os as _os
import sys as _sys

_deepcopy = _copy.deepcopy
_write = _os.write
_STOPPED = []  # what tried to end the program early: no token is printed then, even if a check caught it


class _Sink:  # the candidate's and the reference's output, swallowed (evalplus's swallow_io)
    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _guarded(who, when, function, *args, **kwargs):
    \"\"\"function(*args, **kwargs) with its output swallowed; an attempt to end the program is a failure.\"\"\"
    saved = _sys.stdout, _sys.stderr
    _sys.stdout = _sys.stderr = _Sink()
    try:
        return function(*args, **kwargs)
    except Exception:
        raise
    except BaseException as stop:  # SystemExit (exit(), quit(), sys.exit()), KeyboardInterrupt, GeneratorExit
        _STOPPED.append(who)
        if isinstance(stop, SystemExit):
            raise AssertionError(f"{who} called exit({stop.code!r}){when}") from None
        raise AssertionError(f"{who} raised {type(stop).__name__}{when}") from None
    finally:
        _sys.stdout, _sys.stderr = saved


def _load(source, label, entry):
    namespace = {"__name__": label}
    _guarded(label, " while loading", exec, compile(source, label, "exec"), namespace)
    if not callable(namespace.get(entry)):
        raise AssertionError(f"{label} does not define {entry}()")
    return namespace[entry]


# MBPP+ (MbppPlus.jsonl v0.2.0) stores some tasks' tuples, sets and complex numbers as JSON lists and strings;
# evalplus 0.3.1 converts them back when it loads the file (`mbpp_deserialize_inputs`, evalplus/data/mbpp.py at
# tag v0.3.1, commit e5d0ed0b) and computes the expected outputs on the converted inputs. The same conversions, by
# task number; a value that is not a list where a tuple is due is left as it is (MBPP+ always has a list there).
_MBPP_EACH_ARG = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630}
_MBPP_EACH_ARG |= {726, 740, 744, 809}  # every argument -> a tuple
_MBPP_EACH_ARG_ITEMS = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}  # -> lists of tuples
_MBPP_FIRST_ARG_ITEMS = {75, 413, 444, 753}  # the first argument -> a list of tuples
_MBPP_FIRST_ARG = {250, 307, 405, 446, 617, 720, 763, 808}  # the first argument -> a tuple
_MBPP_SECOND_ARG = {106, 750}  # the second argument -> a tuple
_MBPP_EACH_ARG_NESTED = {259, 401, 445}  # every argument -> a tuple of tuples
_MBPP_DEEP = {580, 615, 791}  # every list, at any depth -> a tuple


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _tuples(value):
    return [_tuple(item) for item in value] if isinstance(value, list) else value


def _deep_tuple(value):
    return tuple(_deep_tuple(item) for item in value) if isinstance(value, list) else value


def _mbpp_args(number, args):
    if not args:
        return args
    first, rest = args[0], list(args[1:])
    if number in _MBPP_EACH_ARG:
        return [_tuple(arg) for arg in args]
    if number in _MBPP_EACH_ARG_ITEMS:
        return [_tuples(arg) for arg in args]
    if number in _MBPP_FIRST_ARG_ITEMS:
        return [_tuples(first), *rest]
    if number in _MBPP_FIRST_ARG:
        return [_tuple(first), *rest]
    if number in _MBPP_SECOND_ARG and rest:
        return [first, _tuple(rest[0]), *rest[1:]]
    if number in _MBPP_EACH_ARG_NESTED:
        return [_tuple(_tuples(arg)) for arg in args]
    if number in _MBPP_DEEP:
        return [_deep_tuple(arg) for arg in args]
    if number == 278:  # one argument, its lists -> tuples, itself -> a tuple
        return [_tuple(_tuples(first)), *rest]
    if number == 115 and isinstance(first, list):  # sets; an empty one becomes {} (a dict), as evalplus
        return [[set(item) if isinstance(item, list) and item else {} for item in first], *rest]
    if number == 124:  # stored as str(float), str(complex)
        return [float(first), complex(rest[0]), *rest[1:]]
    if number == 252:
        return [complex(first), *rest]
    if number == 722 and isinstance(first, dict):  # a dict of lists -> of tuples
        return [{key: _tuple(value) for key, value in first.items()}, *rest]
    return args


def _mbpp_inputs(task_id, inputs):
    number = task_id.rsplit("/", 1)[-1]
    if not number.isdigit():
        return inputs
    return [_mbpp_args(int(number), args) for args in inputs]


def _is_floats(value):
    if isinstance(value, float):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, float) for v in value)


def _allclose(out, expected, atol):
    try:
        if isinstance(expected, (list, tuple)):
            pairs = zip(out, expected)
            return len(out) == len(expected) and all(_allclose(a, b, atol) for a, b in pairs)
        return abs(out - expected) <= atol + 1e-7 * abs(expected)
    except TypeError:
        return False


def _poly(coefficients, x):
    return sum(c * _math.pow(x, i) for i, c in enumerate(coefficients))


def _surface_area(base_edge, height):  # Mbpp/581 read with the pyramid's height, not the faces'
    slant = _math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 2 * base_edge * slant)


def _digit_distance(first, second):  # Mbpp/558 with the shorter number padded by zeros
    a, b = str(first), str(second)
    width = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(width), b.zfill(width)))


_SET_EQUAL = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum"}
_SET_EQUAL |= {"intersection_array", "find_dissimilar", "Diff"}
_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}  # outputs (match objects) not comparable


def _equal(out, expected):
    try:
        return bool(out == expected)
    except Exception:
        return False


def _same(out, expected, args, atol, entry, dataset):
    if dataset == "humaneval" and entry == "find_zero":
        return isinstance(out, (int, float)) and abs(_poly(args[0], out)) <= (atol or 1e-6)
    exact = _equal(out, expected)
    if dataset == "mbpp":
        if entry == "are_equivalent":
            return True
        if entry == "sum_div":
            exact = exact or _equal(out, 0)
        elif entry == "surface_Area":
            exact = exact or _allclose(out, _surface_area(*args), atol)
        elif entry == "digit_distance_nums":
            exact = exact or _equal(out, _digit_distance(*args))
        elif entry in _SET_EQUAL:
            try:
                exact = set(out) == set(expected)
            except TypeError:
                exact = False
        elif entry in _NOT_NONE:
            exact = _equal(out, expected) if isinstance(out, bool) else expected == (out is not None)
    if exact:
        return True
    if atol == 0 and _is_floats(expected):
        atol = 1e-6
    if atol == 0 or type(out) is not type(expected):
        return False
    return _allclose(out, expected, atol)


def _run_inputs(candidate_source, reference_source, entry, inputs, atol, dataset, task_id):
    if dataset == "mbpp":
        inputs = _mbpp_inputs(task_id, inputs)
    reference = _load(reference_source, "<reference>", entry)
    expected = [_guarded("<reference>", "", reference, *_deepcopy(args)) for args in inputs]
    candidate = _load(candidate_source, "<candidate>", entry)
    for index, (args, want) in enumerate(zip(inputs, expected)):
        got = _guarded(f"input {index}: {entry}()", "", candidate, *_deepcopy(args))
        if not _same(got, want, args, atol, entry, dataset):
            shown = f"{entry}(*{args!r:.200}) returned {got!r:.200}, expected {want!r:.200}"
            raise AssertionError(f"input {index}: {shown}")


def _run_check(candidate_source, check_source, entry):
    candidate = _load(candidate_source, "<candidate>", entry)

    def guarded(*args, **kwargs):
        return _guarded(f"{entry}()", "", candidate, *args, **kwargs)

    namespace = {"__name__": "<tests>"}
    exec(compile(check_source, "<tests>", "exec"), namespace)
    namespace["check"](guarded)


def _main(token, run, *args):
    try:  # the token is in this file's text (it stays in memory: a guard against accidents, not introspection)
        _os.remove(__file__)
    except (NameError, OSError):
        pass
    run(*args)
    if not _STOPPED:
        _write(1, ("\\n" + token + "\\n").encode())
"""


def build_program(code: str, tests: CodeTests, reference: str, token: str) -> str:
    """The program the sandbox runs: the harness, the data as literals, and one call. It prints `token` on a line
    of its own only after every check has passed (`finished` looks for it); it exits 0 iff all pass."""
    parts = [_HARNESS]
    if tests.check is not None:
        parts.append(f"_main({token!r}, _run_check, {code!r}, {tests.check!r}, {tests.entry_point!r})\n")
    else:
        inputs = json.dumps(tests.inputs)
        parts.append("import json as _json\n")
        parts.append(
            f"_main({token!r}, _run_inputs, {code!r}, {reference!r}, {tests.entry_point!r}, _json.loads({inputs!r}), "
            f"{tests.atol!r}, {tests.dataset!r}, {tests.task_id!r})\n"
        )
    return "\n".join(parts)


def new_token() -> str:
    """A per-run token no candidate can guess."""
    return secrets.token_hex(16)


def finished(result: SandboxResult, token: str) -> SandboxResult:
    """The sandbox's verdict, with "passed" kept only when the harness printed `token` after its last check (a
    program ended early, by exit(0) or os._exit(0), never prints it)."""
    if result.status == "passed" and token not in result.stdout.splitlines():
        return replace(result, status="failed", detail="the program ended before its checks did")
    return result


def grade_code(
    items: Sequence[tuple[str, str, CodeTests, str]],
    limits: SandboxLimits | None = None,
    workers: int = 2,
) -> list[CodeGrade]:
    """Grade (completion, prompt, tests, reference solution) items, `workers` sandboxes at a time."""
    codes = [extract_code(completion, prompt, tests.entry_point) for completion, prompt, tests, _ in items]
    tokens = [new_token() for _ in items]
    programs = [build_program(code, i[2], i[3], t) for code, i, t in zip(codes, items, tokens, strict=True)]
    results = [finished(r, t) for r, t in zip(run_programs(programs, limits, workers), tokens, strict=True)]
    return [CodeGrade(result.status == "passed", code, result) for code, result in zip(codes, results, strict=True)]
