"""Benchmark loaders: each published format -> `Example`s, and one normalised JSONL the evaluation reads.

Formats (one JSON object per line; docs/ARCHITECTURE.md): math500, minerva_math, olympiadbench, aime24, amc23,
gsm8k (math, graded with math-verify) and medqa, medmcqa, mmlu_medical (multiple choice, graded by letter).
medqa and mmlu_medical also accept the Open Medical-LLM Leaderboard's nested layout (openlifescienceai/* on the
hub); mmlu_medical reads cais/mmlu rows ({"subject", "question", "choices", "answer": 0-3}), the layout of
upstream's own test file. humaneval, humaneval_plus, mbpp and mbpp_plus (code, run in a sandbox) read evalplus's
HumanEvalPlus.jsonl / MbppPlus.jsonl (gzipped too): the plain names grade on `base_input`, the "_plus" names on
`base_input + plus_input`, as evalplus's base and plus scores. alpaca_eval (judged by an LLM against the file's
reference answers, asft.evaluation.judge) reads AlpacaEval's records. Any file may be gzipped (a ".gz" name).
"""

from __future__ import annotations

import gzip
import json
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from asft.data import iter_json_objects, write_jsonl
from asft.evaluation.code_grading import CodeTests

MATH_FORMATS = ("math500", "minerva_math", "olympiadbench", "aime24", "amc23", "gsm8k")
CHOICE_FORMATS = ("medqa", "medmcqa", "mmlu_medical")
CODE_FORMATS = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")
JUDGED_FORMATS = ("alpaca_eval",)  # graded by an LLM judge against the file's reference answer (judge.py)
BENCHMARK_FORMATS = MATH_FORMATS + CHOICE_FORMATS + CODE_FORMATS + JUDGED_FORMATS
KINDS = ("math", "choice", "code", "judge")
Kind = Literal["math", "choice", "code", "judge"]

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")

# The longest problem text (question plus options) a benchmark may hold. Published problems run to a few thousand
# characters; a far longer one is a broken file, and would only fail later, at generation, as an outsized tensor.
MAX_QUESTION_CHARS = 100_000


# Upstream ASFT's MMLU-medical: these 12 cais/mmlu subjects' test splits, 2,739 questions, in this order (its
# eval/medeval/test_data/mmlu_medical_test.jsonl, commit fca898af3b2a57557a4c80ce3eaa426652c8e83b, counted).
MMLU_MEDICAL_SUBJECTS: dict[str, int] = {
    "anatomy": 135,
    "clinical_knowledge": 265,
    "college_biology": 144,
    "college_chemistry": 100,
    "college_medicine": 173,
    "high_school_biology": 310,
    "high_school_psychology": 545,
    "human_aging": 223,
    "medical_genetics": 100,
    "nutrition": 306,
    "professional_medicine": 272,
    "virology": 166,
}


class BenchmarkFormatError(ValueError):
    """A malformed benchmark line, reported with file, 1-based line and field."""


@dataclass(frozen=True)
class Example:
    """One problem: the text shown to the model, the gold answer (a letter for multiple choice; the canonical
    solution for code, whose `tests` hold a `code_grading.CodeTests` as JSON)."""

    id: str
    question: str
    gold: str
    choices: tuple[str, ...] | None = None
    kind: Kind = "math"
    tests: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The normalised line; `tests` only where there are any, so other kinds keep their five fields."""
        record = asdict(self)
        if record["tests"] is None:
            del record["tests"]
        return record


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} or \fbox{...} (braces matched, so nested braces survive), or of a
    brace-less `\boxed 5`; None if there is none or the last one is never closed (a cut-off generation)."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    rest = text[starts[-1].end() :]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if rest == stripped:  # "\boxed5" or "\boxed$": not the brace-less form
            return None
        token = re.match(r"[^\s$]+", stripped)
        return (token.group(0).rstrip(".,;:") or None) if token else None
    depth, position = 0, 0
    while position < len(stripped):
        char = stripped[position]
        if char == "\\":  # an escaped character (\{, \}, \\) never opens or closes the box
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return stripped[1:position]
        position += 1
    return None


class _Line:
    """Field access for one record that raises errors naming the file, line and field."""

    def __init__(self, record: dict[str, Any], path: Path, line_no: int, prefix: str = "") -> None:
        self.record, self.path, self.line_no, self.prefix = record, path, line_no, prefix

    def fail(self, message: str) -> BenchmarkFormatError:
        return BenchmarkFormatError(f"{self.path}:{self.line_no}: {message}")

    def get(self, field: str, kind: type | tuple[type, ...]) -> Any:
        if field not in self.record:
            raise self.fail(f"missing field {self.prefix + field!r}")
        value = self.record[field]
        if not isinstance(value, kind) or isinstance(value, bool):  # bool is an int subclass; never valid here
            raise self.fail(f"field {self.prefix + field!r} has type {type(value).__name__}")
        return value

    def text(self, field: str) -> str:
        """A required, non-empty string field."""
        value = self.get(field, str)
        if not value.strip():
            raise self.fail(f"field {self.prefix + field!r} is empty")
        return value

    def answer(self, field: str) -> str:
        """A gold answer: a non-empty string, or a number as some copies store it (AIME "answer": 204)."""
        value = str(self.get(field, (str, int, float))).strip()
        if not value:
            raise self.fail(f"field {field!r} is empty")
        return value

    def id(self, field: str) -> str:
        """The file's own id when it has one, else the 0-based line index."""
        value = self.record.get(field)
        return str(value) if value is not None else str(self.line_no - 1)


def _math500(line: _Line) -> Example:
    return Example(line.id("unique_id"), line.text("problem"), line.answer("answer"))


def _minerva(line: _Line) -> Example:
    gold = last_boxed(line.get("solution", str))
    if gold is None or not gold.strip():
        raise line.fail("field 'solution' has no \\boxed{} answer")
    return Example(line.id("idx"), line.text("problem"), gold.strip())


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _olympiad(line: _Line) -> Example:
    answers = line.get("final_answer", list)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise line.fail("field 'final_answer' must be a non-empty list of strings")
    # "$\frac{1}{2}$" -> "\frac{1}{2}"; "\$" (a currency sign) stays. Several answers -> "a, b" (a set to grade).
    cleaned = [_UNESCAPED_DOLLAR.sub("", a).strip() for a in answers]
    if not all(cleaned):
        raise line.fail("field 'final_answer' has an empty answer")
    question = line.text("question")
    context = line.record.get("context")
    if isinstance(context, str) and context.strip():
        question = context.strip() + "\n\n" + question
    return Example(line.id("id"), question, ", ".join(cleaned))


def _aime(line: _Line) -> Example:
    return Example(line.id("id"), line.text("problem"), line.answer("answer"))


def _gsm8k(line: _Line) -> Example:
    answer = line.get("answer", str)
    if "####" not in answer:
        raise line.fail("field 'answer' has no '#### <number>' line")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise line.fail("field 'answer' has nothing after '####'")
    return Example(line.id("id"), line.text("question"), gold)


def _choice(line: _Line, question: str, choices: list[str], gold_index: int, field: str) -> Example:
    if len(choices) < 2:
        raise line.fail(f"need at least two choices, got {len(choices)}")
    if not 0 <= gold_index < len(choices):
        raise line.fail(f"field {field!r}: answer index {gold_index} out of range for {len(choices)} options")
    return Example(line.id("id"), question, string.ascii_uppercase[gold_index], tuple(choices), "choice")


def _lettered(line: _Line, question: str, options: dict, letter: str, field: str, options_field: str) -> Example:
    """Options keyed by letter ({"A": ..., "B": ...}) and the gold letter."""
    letters = sorted(options)
    letter = letter.strip()
    if letter not in options:
        raise line.fail(f"field {field!r} {letter!r} is not one of the options {letters}")
    if letters != list(string.ascii_uppercase[: len(letters)]):
        raise line.fail(f"field {options_field!r} keys must be A, B, C, ... (got {letters})")
    return _choice(line, question, [str(options[k]) for k in letters], letters.index(letter), field)


def _open_medical(line: _Line) -> Example:
    """The Open Medical-LLM Leaderboard layout (openlifescienceai/medqa, openlifescienceai/mmlu_*):
    {"id", "data": {"Question", "Options": {"A": ...}, "Correct Option": "A", ...}, "subject_name"}."""
    nested = _Line(line.get("data", dict), line.path, line.line_no, prefix="data.")
    return _lettered(
        line,
        nested.text("Question"),
        nested.get("Options", dict),
        nested.get("Correct Option", str),
        "data.Correct Option",
        "data.Options",
    )


def _medqa(line: _Line) -> Example:
    if "data" in line.record:
        return _open_medical(line)
    return _lettered(
        line, line.text("question"), line.get("options", dict), line.get("answer_idx", str), "answer_idx", "options"
    )


def _medmcqa(line: _Line) -> Example:
    choices = [str(line.get(key, (str, int, float))) for key in ("opa", "opb", "opc", "opd")]
    return _choice(line, line.text("question"), choices, line.get("cop", int), "cop")


def _mmlu(line: _Line) -> Example:
    if "data" in line.record:
        return _open_medical(line)
    choices = line.get("choices", list)
    if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
        raise line.fail("field 'choices' must be a list of strings")
    return _choice(line, line.text("question"), [str(c) for c in choices], line.get("answer", int), "answer")


def _code(line: _Line, *, plus: bool, dataset: Literal["humaneval", "mbpp"]) -> Example:
    """An evalplus record -> a code Example. HumanEval's canonical solution is the body after its prompt; MBPP+'s
    is a whole program. The inputs stay as the file's JSON; the task id goes with them, by which the grading harness
    turns MBPP+'s stored lists back into the tuples, sets and complex numbers evalplus calls with."""
    prompt, entry = line.text("prompt"), line.text("entry_point")
    task_id = line.text("task_id") if dataset == "mbpp" else line.id("task_id")  # MBPP's picks the conversions
    solution = line.text("canonical_solution")
    reference = prompt + solution if dataset == "humaneval" else solution
    atol = line.record.get("atol", 0.0)
    if atol is None:
        atol = 0.0
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or atol < 0:
        raise line.fail("field 'atol' must be a non-negative number")
    if "base_input" in line.record:
        inputs = list(_argument_lists(line, "base_input"))
        if plus:
            inputs += _argument_lists(line, "plus_input")
        tests = CodeTests(entry, inputs, float(atol), dataset=dataset, task_id=task_id)
    elif plus:
        raise line.fail("missing field 'base_input' (a '+' benchmark needs evalplus's inputs)")
    else:  # OpenAI's HumanEval.jsonl: its own check(candidate)
        tests = CodeTests(entry, check=line.text("test"), dataset=dataset, task_id=task_id)
    return Example(task_id, prompt, reference, None, "code", tests.to_json())


def _argument_lists(line: _Line, field: str) -> list[list[Any]]:
    value = line.get(field, list)
    if not all(isinstance(args, list) for args in value):
        raise line.fail(f"field {field!r} must be a list of argument lists")
    return value


def _alpaca_eval(line: _Line) -> Example:
    """An AlpacaEval record ({"instruction", "output": the reference model's answer, "generator", "dataset"}):
    the instruction to answer, and the reference answer the judge compares ours with."""
    return Example(line.id("id"), line.text("instruction"), line.text("output"), None, "judge")


LOADERS: dict[str, Callable[[_Line], Example]] = {
    "math500": _math500,
    "minerva_math": _minerva,
    "olympiadbench": _olympiad,
    "aime24": _aime,
    "amc23": _aime,
    "gsm8k": _gsm8k,
    "medqa": _medqa,
    "medmcqa": _medmcqa,
    "mmlu_medical": _mmlu,
    "humaneval": lambda line: _code(line, plus=False, dataset="humaneval"),
    "humaneval_plus": lambda line: _code(line, plus=True, dataset="humaneval"),
    "mbpp": lambda line: _code(line, plus=False, dataset="mbpp"),
    "mbpp_plus": lambda line: _code(line, plus=True, dataset="mbpp"),
    "alpaca_eval": _alpaca_eval,
}


def _records(path: Path) -> Iterator[_Line]:
    if path.name.endswith(".gz"):
        objects = _gzip_objects(path)
    elif path.suffix == ".json":
        objects = _list_objects(path)
    else:
        objects = iter_json_objects(path, BenchmarkFormatError)
    for line_no, record in objects:
        yield _Line(record, path, line_no)


def _list_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """A file holding one JSON list of records (AlpacaEval publishes its set so); errors name the 1-based item."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkFormatError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(items, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
    for number, record in enumerate(items, start=1):
        if not isinstance(record, dict):
            raise BenchmarkFormatError(f"{path}:{number}: expected a JSON object (item {number} of the list)")
        yield number, record


def _gzip_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """`iter_json_objects` for a gzipped file (evalplus publishes its benchmarks as .jsonl.gz)."""
    try:
        with gzip.open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise BenchmarkFormatError(f"{path}:{line_no}: not UTF-8 (byte {raw[err.start]:#04x})") from err
                except json.JSONDecodeError as err:
                    raise BenchmarkFormatError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise BenchmarkFormatError(f"{path}:{line_no}: expected a JSON object")
                yield line_no, record
    except (gzip.BadGzipFile, EOFError) as err:
        raise BenchmarkFormatError(f"{path}: not a readable gzip file ({err})") from err


def load_benchmark(name: str, path: str | Path) -> list[Example]:
    """Parse a benchmark file in its published format `name`."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark format {name!r}; expected one of {BENCHMARK_FORMATS}")
    path = Path(path)
    loader = LOADERS[name]
    return _check_ids(path, [(line.line_no, _bounded(line, loader(line))) for line in _records(path)])


def _bounded(line: _Line, example: Example) -> Example:
    """Refuse a problem whose text is beyond any real benchmark's (see MAX_QUESTION_CHARS)."""
    size = len(example.question) + sum(len(choice) for choice in example.choices or ())
    if size > MAX_QUESTION_CHARS:
        raise line.fail(f"problem {example.id!r} is {size} characters long; the limit is {MAX_QUESTION_CHARS}")
    return example


def _check_ids(path: Path, numbered: list[tuple[int, Example]]) -> list[Example]:
    """Results are keyed by problem id, so an empty file or a repeated id would silently corrupt the scores."""
    if not numbered:
        raise BenchmarkFormatError(f"{path}: no problems")
    first_line: dict[str, int] = {}
    for line_no, example in numbered:
        if example.id in first_line:
            raise BenchmarkFormatError(
                f"{path}:{line_no}: duplicate problem id {example.id!r} (first on line {first_line[example.id]})"
            )
        first_line[example.id] = line_no
    return [example for _, example in numbered]


def normalize_benchmark(name: str, src_path: str | Path, dst_path: str | Path) -> int:
    """Write the normalised JSONL (id, question, gold, choices, kind; tests for code), atomically; returns the
    problem count.

    Evaluation reads only this form, so every published format is validated once, here, with its own line numbers.
    """
    examples = load_benchmark(name, src_path)
    return write_jsonl(dst_path, (example.to_record() for example in examples))


def load_normalized(path: str | Path) -> list[Example]:
    """Read a normalised benchmark file back, checking it as strictly as the published formats."""
    path = Path(path)
    examples: list[tuple[int, Example]] = []
    for line in _records(path):
        kind = line.get("kind", str)
        if kind not in KINDS:
            raise line.fail(f"field 'kind' must be one of {KINDS}, got {kind!r}")
        choices = line.record.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise line.fail("field 'choices' must be a list of strings or null")
        gold = line.get("gold", str)
        if kind == "choice":
            if not choices or len(choices) < 2:
                raise line.fail("a 'choice' problem needs at least two choices")
            if gold not in tuple(string.ascii_uppercase[: len(choices)]):
                raise line.fail(f"field 'gold' {gold!r} is not a letter of the {len(choices)} choices")
        tests = line.record.get("tests")
        if kind == "code":
            tests = _code_tests(line)
        elif tests is not None:
            raise line.fail(f"field 'tests' is only for code problems, not {kind!r}")
        example = Example(
            id=line.get("id", str),
            question=line.get("question", str),
            gold=gold,
            choices=tuple(choices) if choices is not None else None,
            kind=kind,
            tests=tests,
        )
        examples.append((line.line_no, _bounded(line, example)))
    return _check_ids(path, examples)


def _code_tests(line: _Line) -> str:
    text = line.get("tests", str)
    try:
        CodeTests.from_json(text)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise line.fail(f"field 'tests': {err}") from err
    return text
