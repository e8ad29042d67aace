"""Evaluation stage: one model on one benchmark -> samples.jsonl + metrics.json.

Generations are appended to a work file as each batch finishes, so a restarted job skips the
(problem, sample) pairs already done; the declared outputs appear only when everything is graded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from asft.data import TEXT_TEMPLATES, render_prompt
from asft.evaluation.backend_interface import CHOICE_TOP_K, UPSTREAM_STOP
from asft.evaluation.backends import Backend, SamplingParams, make_backend
from asft.evaluation.benchmarks import BenchmarkFormatError, Example, load_normalized
from asft.evaluation.code_grading import CODE_STOP, CodeTests, code_instruction, grade_code
from asft.evaluation.grading import MathGrader, grade_choice, pick_choice
from asft.evaluation.judge import JudgeEndpoint, JudgeError, Verdict, judge_pairs, win_rate
from asft.evaluation.metrics import summarize
from asft.evaluation.sandbox import SandboxLimits
from asft.layout import METRICS, SAMPLES
from asft.run_io import atomic_file, write_text_atomic
from asft.stack_versions import stack_versions

log = logging.getLogger(__name__)

PARTIAL = "samples.partial.jsonl"
PARTIAL_KEY = "samples.partial.key.json"  # what the work files were generated with
ANSWERS = "answers.partial.jsonl"  # a judged benchmark's answers, kept before they are judged
# transformers' `model_max_length` when a tokenizer does not know its model's (int(1e30)): no limit at all.
_UNKNOWN_LENGTH = 10**12


class PromptTooLongError(BenchmarkFormatError):
    """A problem whose prompt, with the tokens to generate, does not fit the model's context."""


def choice_prompt(example: Example) -> str:
    """Upstream's multiple-choice text (eval/medeval/vllm_medical_test.py, format_question_*), verbatim:
    "Question: <q>\\n\\nOptions:\\nA. <a>\\n…D. <d>\\n\\nAnswer:"."""
    options = "".join(f"{string.ascii_uppercase[i]}. {c}\n" for i, c in enumerate(example.choices or ()))
    return f"Question: {example.question}\n\nOptions:\n{options}\nAnswer:"


def build_prompt(example: Example, template: str, tokenizer: Any) -> str:
    if example.kind == "code":
        # "plain": the bare prompt for a base model to continue (HumanEval-style); otherwise evalplus's instruction.
        if template == "plain":
            return example.question
        return render_prompt(code_instruction(example.question), template, tokenizer)
    text = choice_prompt(example) if example.kind == "choice" else example.question
    return render_prompt(text, template, tokenizer)


def stop_words(template: str, kind: str = "math") -> tuple[str, ...]:
    """Upstream's stop words, plus "\\n\\nQuestion:" for the Question/Answer prompt (its "cot" prompt_type), where
    a base model would otherwise go on to write the next question; code stops where a script's test code starts."""
    words = UPSTREAM_STOP + ("\n\nQuestion:",) if template == "question_answer" else UPSTREAM_STOP
    return words + CODE_STOP if kind == "code" else words


def adds_special_tokens(template: str) -> bool:
    """Text prompts are tokenised with the tokenizer's own special tokens (a BOS where it adds one), as upstream
    hands its text prompts to vLLM and as training tokenises them; a chat-template rendering holds its own."""
    return template in TEXT_TEMPLATES


def context_length(backend: Backend) -> int | None:
    """The most tokens (prompt plus generation) the model takes: the smallest limit the backend exposes, from
    vLLM's `max_model_len`, the model config's `max_position_embeddings` or the tokenizer's `model_max_length`."""
    model = getattr(backend, "model", None)
    engine = getattr(getattr(backend, "llm", None), "llm_engine", None)
    found = [
        getattr(backend, "max_context", None),
        getattr(getattr(engine, "model_config", None), "max_model_len", None),
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
        getattr(backend.tokenizer, "model_max_length", None),
    ]
    limits = [n for n in found if isinstance(n, int) and not isinstance(n, bool) and 0 < n < _UNKNOWN_LENGTH]
    return min(limits) if limits else None


def check_context(
    examples: Sequence[Example],
    prompts: Sequence[str],
    backend: Backend,
    new_tokens: int,
    benchmark: Path,
    add_special_tokens: bool = False,
) -> None:
    """Every prompt plus `new_tokens` must fit the model's context. All prompts are checked before anything is
    generated, so an oversized problem fails at once, by name, rather than as an outsized tensor (or a cut-off
    answer) part-way through a run."""
    limit = context_length(backend)
    if limit is None:
        return
    # Tokenised as the backends do it.
    encoded = backend.tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    too_long = [(ex, n) for ex, n in zip(examples, lengths, strict=True) if n + new_tokens > limit]
    if too_long:
        example, n = too_long[0]
        more = f" (and {len(too_long) - 1} more problems)" if len(too_long) > 1 else ""
        raise PromptTooLongError(
            f"{benchmark}: problem {example.id!r}: its prompt is {n} tokens, plus max_new_tokens {new_tokens} is "
            f"{n + new_tokens}, over the model's context of {limit} tokens{more}"
        )


def read_done(path: Path) -> list[dict]:
    """Completed sample records; a line cut short by a killed job is dropped (and redone)."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    # Rewrite without the torn tail so later appends stay line-aligned.
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return records


def _append(path: Path, records: Sequence[dict]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        handle.flush()
        os.fsync(handle.fileno())


def _run_math(
    examples: Sequence[Example],
    prompts: Sequence[str],
    backend: Backend,
    spec: dict,
    partial: Path,
    done: set,
) -> None:
    params = SamplingParams.from_spec(spec["sampling"], stop_words(spec["template"]))
    special = adds_special_tokens(spec["template"])
    todo = [i for i, ex in enumerate(examples) if any((ex.id, s) not in done for s in range(params.n))]
    batch_size = spec["batch_size"]
    with MathGrader(spec["grading_workers"], spec["grading_timeout_s"]) as grader:
        batches = range(0, len(todo), batch_size)
        for start in tqdm(batches, desc=f"generate {spec['benchmark']}", unit="batch", disable=not todo):
            indices = todo[start : start + batch_size]
            _generate_and_grade(examples, prompts, backend, params, grader, indices, partial, done, special)
            log.info("generated %d/%d problems", min(start + batch_size, len(todo)), len(todo))


def _generate_and_grade(
    examples: Sequence[Example],
    prompts: Sequence[str],
    backend: Backend,
    params: SamplingParams,
    grader: MathGrader,
    indices: list[int],
    partial: Path,
    done: set,
    add_special_tokens: bool = False,
) -> None:
    """One batch: generate, grade, and append the graded samples to the work file."""
    completions = backend.generate([prompts[i] for i in indices], params, add_special_tokens=add_special_tokens)
    pairs, meta = [], []
    for i, samples in zip(indices, completions, strict=True):
        for sample_index, completion in enumerate(samples):
            if (examples[i].id, sample_index) in done:
                continue
            pairs.append((completion, examples[i].gold))
            meta.append((examples[i], sample_index, completion))
    grades = grader.grade(pairs)
    _append(
        partial,
        [
            {
                "id": ex.id,
                "sample": sample_index,
                "completion": completion,
                "extracted": grade.extracted,
                "gold": ex.gold,
                "correct": bool(grade.correct),
                "status": grade.status,
                "truncated": grade.truncated,  # graded on its last MAX_COMPLETION_CHARS characters only
            }
            for (ex, sample_index, completion), grade in zip(meta, grades, strict=True)
        ],
    )


def _run_choice(
    examples: Sequence[Example],
    prompts: Sequence[str],
    backend: Backend,
    partial: Path,
    done: set,
    add_special_tokens: bool = False,
) -> None:
    """Upstream's scoring: the top-10 next tokens after each prompt, read by `pick_choice`; each sample records
    the tokens, the letter and how it was found (`method`)."""
    todo = [i for i, ex in enumerate(examples) if (ex.id, 0) not in done]
    if not todo:
        return
    nexts = backend.next_token([prompts[i] for i in todo], CHOICE_TOP_K, add_special_tokens=add_special_tokens)
    records = []
    for i, following in zip(todo, nexts, strict=True):
        letters = list(string.ascii_uppercase[: len(examples[i].choices or ())])
        pick = pick_choice(following.top, following.text, letters)
        records.append(
            {
                "id": examples[i].id,
                "sample": 0,
                "completion": following.text,
                "extracted": pick.letter,
                "gold": examples[i].gold,
                "correct": grade_choice(pick.letter, examples[i].gold),
                "status": "ok",
                "method": pick.method,
                "logprobs": pick.scores,
                "top_tokens": [[token, logprob] for token, logprob in following.top],
            }
        )
    _append(partial, records)


def sandbox_limits(spec: dict) -> SandboxLimits:
    """Per-program limits for code grading; evalplus-sized defaults where the spec names none."""
    return SandboxLimits(
        timeout_s=float(spec.get("sandbox_timeout_s", 20.0)),
        memory_bytes=int(spec.get("sandbox_memory_mb", 4096)) << 20,
    )


def _run_code(
    examples: Sequence[Example],
    prompts: Sequence[str],
    backend: Backend,
    spec: dict,
    partial: Path,
    done: set,
) -> None:
    """Generate (greedy for the paper's pass@1), then run each completion against its tests in the sandbox."""
    params = SamplingParams.from_spec(spec["sampling"], stop_words(spec["template"], "code"))
    special = adds_special_tokens(spec["template"])
    limits = sandbox_limits(spec)
    todo = [i for i, ex in enumerate(examples) if any((ex.id, s) not in done for s in range(params.n))]
    batch_size = spec["batch_size"]
    for start in tqdm(range(0, len(todo), batch_size), desc=f"generate {spec['benchmark']}", disable=not todo):
        indices = todo[start : start + batch_size]
        completions = backend.generate([prompts[i] for i in indices], params, add_special_tokens=special)
        items, meta = [], []
        for i, samples in zip(indices, completions, strict=True):
            example = examples[i]
            tests = CodeTests.from_json(example.tests or "")
            for sample_index, completion in enumerate(samples):
                if (example.id, sample_index) not in done:
                    items.append((completion, example.question, tests, example.gold))
                    meta.append((example, sample_index, completion))
        grades = grade_code(items, limits, spec["grading_workers"])
        _append(
            partial,
            [
                {
                    "id": ex.id,
                    "sample": sample_index,
                    "completion": completion,
                    "extracted": grade.code,
                    "gold": ex.gold,
                    "correct": grade.correct,
                    # "ok" when the program ran to a verdict; a sandbox timeout or failure to start is counted apart
                    "status": grade.result.status if grade.result.status in ("timeout", "error") else "ok",
                    "outcome": grade.result.status,
                    "detail": grade.result.detail,
                    "sandbox_layers": list(grade.result.layers),
                }
                for (ex, sample_index, completion), grade in zip(meta, grades, strict=True)
            ],
        )
        log.info("generated %d/%d problems", min(start + batch_size, len(todo)), len(todo))


def _run_judged(
    examples: Sequence[Example],
    prompts: Sequence[str],
    backend: Backend,
    spec: dict,
    partial: Path,
    _done: set,  # unused: the verdict records themselves are needed, so they are read here; kept for a uniform call
) -> None:
    """Answer every instruction, then have the judge compare each answer with the benchmark's reference answer.

    Each batch's answers are appended to their own work file (ANSWERS) before anything is judged, and each verdict,
    with the answer it judged, to the samples work file. A resumed job (the key check in `evaluate` has made sure
    both files belong to this spec and model) generates only the answers found in neither and asks the judge only
    for the missing verdicts; positions are assigned over the whole list, so it is judged whole.
    """
    params = SamplingParams.from_spec(spec["sampling"], stop_words(spec["template"]))
    answers_path = partial.with_name(ANSWERS)
    earlier = {r["id"]: r for r in read_done(partial)}
    answers = {r["id"]: r["completion"] for r in read_done(answers_path)}
    answers |= {item_id: r["completion"] for item_id, r in earlier.items()}  # the answer each verdict judged
    todo = [i for i, ex in enumerate(examples) if ex.id not in answers]
    if len(todo) < len(examples):
        log.info("resuming: %d of %d answers already generated", len(examples) - len(todo), len(examples))
    batch_size = spec["batch_size"]
    special = adds_special_tokens(spec["template"])
    for start in tqdm(range(0, len(todo), batch_size), desc=f"answer {spec['benchmark']}", disable=not todo):
        indices = todo[start : start + batch_size]
        completions = backend.generate([prompts[i] for i in indices], params, add_special_tokens=special)
        fresh = [{"id": examples[i].id, "sample": 0, "completion": samples[0]}
                 for i, samples in zip(indices, completions, strict=True)]  # fmt: skip
        _append(answers_path, fresh)
        answers.update((r["id"], r["completion"]) for r in fresh)
    by_id = {ex.id: ex for ex in examples}

    def record(verdict: Verdict) -> None:
        ex = by_id[verdict.id]
        line = {**verdict.to_record(), "sample": 0, "completion": answers[ex.id], "gold": ex.gold}
        # a tie scores one half; an unparsed verdict scores nothing and is counted apart (win_rate)
        _append(
            partial, [{**line, "correct": verdict.score, "status": "ok" if verdict.score is not None else "unparsed"}]
        )

    judge_pairs(
        JudgeEndpoint.from_config(spec["judge"]),
        [ex.question for ex in examples],
        [answers[ex.id] for ex in examples],
        [ex.gold for ex in examples],
        seed=spec["sampling"]["seed"],
        ids=[ex.id for ex in examples],
        done={i: Verdict.from_record(r) for i, r in earlier.items()},
        on_verdict=record,
    )


def _judged_metrics(records: Sequence[dict], spec: dict) -> dict:
    """The win rate as the headline score (avg_at_n, avg_ci: what tables read), with the judge's counts.

    With no verdict parsed there is no win rate: it, its CI and `first_preferred_share` are written as null, since
    json.dumps would write a bare NaN, which is not JSON (a strict reader refuses the whole file)."""

    def no_nan(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        return [no_nan(v) for v in value] if isinstance(value, list) else value

    verdicts = [Verdict.from_record(r) for r in records]
    rates = win_rate(verdicts, n_boot=spec["bootstrap_samples"], seed=spec["sampling"]["seed"])
    rates = {key: no_nan(value) for key, value in rates.items()}
    return {
        **rates,
        "n": 1,
        "n_samples": len(records),
        "avg_at_n": rates["win_rate"],
        "avg_ci": rates["win_rate_ci"],
        "pass_at_k": {},
        "sample0_accuracy": rates["win_rate"],
        "judge": JudgeEndpoint.from_config(spec["judge"]).describe(),  # the key's variable name, never its value
    }


def _count_methods(records: Sequence[dict]) -> dict[str, int]:
    """How many letters came from the top tokens, the fallback text, or the default (a sign of a bad prompt)."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.get("method", "unknown")] = counts.get(record.get("method", "unknown"), 0) + 1
    return counts


def _discard_if_stale(partial: Path, key: dict, *others: Path) -> None:
    """Resume only generations made with the same spec and model; an edited config starts afresh. `others` are
    further work files written under the same key (a judged benchmark's answers), discarded with `partial`."""
    key_path = partial.with_name(PARTIAL_KEY)
    wanted = json.dumps(key, sort_keys=True)
    if not key_path.exists() or key_path.read_text() != wanted:
        for path in (partial, *others):
            if path.exists():
                log.info("discarding %s: generated with other settings", path)
                path.unlink()
    key_path.write_text(wanted)


def _preflight_judge(spec: dict) -> None:
    """Before the model loads: a judge that cannot be used would otherwise fail the job only after every answer has
    been generated. An endpoint off this machine needs its key; then one cheap request must reach it and be let in.
    Names the key's variable, never its value."""
    if not spec.get("judge"):
        raise JudgeError(f"benchmark {spec['benchmark']!r} is judged: evaluation.judge must name the judge endpoint")
    judge = JudgeEndpoint.from_config(spec["judge"])
    if not judge.has_key() and not judge.is_local():
        raise JudgeError(
            f"the judge at {judge.base_url} is not on this machine, but ${judge.api_key_env} (named by "
            f"evaluation.judge.api_key_env) is unset or empty: export the endpoint's key in it (any value for a "
            "server that needs none), or name the variable that holds it in evaluation.judge.api_key_env"
        )
    judge.probe()


def evaluate(
    model_dir: Path,
    benchmark_path: Path,
    spec: dict,
    out_dir: Path,
    run_info: dict | None = None,
    adapter_dir: Path | None = None,
) -> dict:
    """Evaluate one model (or a base model with a LoRA adapter applied) on one normalised benchmark file.

    Returns the metrics dict.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = load_normalized(benchmark_path)  # a malformed benchmark fails before the model loads
    if spec.get("max_problems"):
        examples = examples[: spec["max_problems"]]
    kind = examples[0].kind  # load_normalized refuses a file without problems
    if kind == "judge":
        _preflight_judge(spec)  # before the model loads: an unusable judge fails the job at once
    started = time.perf_counter()
    options = {
        "dtype": spec["dtype"],
        "trust_remote_code": spec["trust_remote_code"],
        "batch_size": spec["batch_size"],
        "adapter_dir": adapter_dir,
    }
    backend = make_backend(spec["backend"], model_dir, **options)
    prompts = [build_prompt(ex, spec["template"], backend.tokenizer) for ex in examples]
    # A multiple-choice problem is scored from the next token's log-probabilities: one position past the prompt.
    new_tokens = SamplingParams.from_spec(spec["sampling"]).max_new_tokens if kind != "choice" else 1
    special = adds_special_tokens(spec["template"])
    check_context(examples, prompts, backend, new_tokens, benchmark_path, special)

    partial = out_dir / PARTIAL
    adapter = None if adapter_dir is None else str(adapter_dir)
    key = {"spec": spec, "model": str(model_dir), "adapter": adapter, "benchmark": str(benchmark_path)}
    _discard_if_stale(partial, key, out_dir / ANSWERS)
    done = {(r["id"], r["sample"]) for r in read_done(partial)}
    if done:
        log.info("resuming: %d samples already generated", len(done))
    if kind == "choice":
        _run_choice(examples, prompts, backend, partial, done, special)
    elif kind == "code":
        _run_code(examples, prompts, backend, spec, partial, done)
    elif kind == "judge":
        _run_judged(examples, prompts, backend, spec, partial, done)
    else:
        _run_math(examples, prompts, backend, spec, partial, done)

    wanted = {ex.id for ex in examples}
    records = sorted((r for r in read_done(partial) if r["id"] in wanted), key=lambda r: (r["id"], r["sample"]))
    by_problem: dict[str, list[bool]] = {}
    for record in records:
        by_problem.setdefault(record["id"], []).append(bool(record["correct"]))
    if kind == "judge":
        metrics = _judged_metrics(records, spec)
    else:
        metrics = summarize(by_problem, n_boot=spec["bootstrap_samples"])
    metrics.update(
        {
            "benchmark": spec["benchmark"],
            "format": spec["format"],
            "kind": kind,
            "timeouts": sum(r["status"] == "timeout" for r in records),
            "grading_errors": sum(r["status"] == "error" for r in records),
            "grading_truncated": sum(bool(r.get("truncated")) for r in records),
            "template": spec["template"],
            "sampling": spec["sampling"] if kind != "choice" else {"n": 1, "method": f"top{CHOICE_TOP_K}-letter"},
            "stop": list(stop_words(spec["template"], kind)) if kind != "choice" else [],
            "choice_methods": _count_methods(records) if kind == "choice" else {},
            # the isolation each code sample actually ran under (sandbox.py), e.g. ["netns", "rlimits", "seccomp"]
            "sandbox_layers": sorted({layer for r in records for layer in r.get("sandbox_layers", [])}),
            "backend": backend.name,
            "model_path": str(model_dir),
            "adapter_path": adapter,
            "run": run_info or {},
            "seconds": time.perf_counter() - started,
            "stack": stack_versions(),  # the torch/transformers/vLLM this evaluation ran with
        }
    )
    with atomic_file(out_dir / SAMPLES) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(out_dir / METRICS, json.dumps(metrics, indent=2, sort_keys=True))
    partial.unlink()
    (out_dir / ANSWERS).unlink(missing_ok=True)
    partial.with_name(PARTIAL_KEY).unlink(missing_ok=True)
    return metrics
