"""The evaluation stage with the transformers backend on the tiny demo model."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest

from asft.evaluation import runner
from asft.evaluation.backend_interface import UPSTREAM_STOP, stop_token_ids, truncate_at_stop
from asft.evaluation.backends import SamplingParams, TransformersBackend
from asft.evaluation.benchmarks import Example
from asft.evaluation.grading import pick_choice
from asft.fetch import fetch_benchmark
from asft.stack_versions import stack_versions
from tests.conftest import SHARED_BENCHMARKS


def _spec(**overrides: object) -> dict:
    spec = {
        "benchmark": "arith",
        "format": "math500",
        "backend": "transformers",
        "template": "alpaca",
        "sampling": {
            "n": 1,
            "temperature": 0.0,
            "top_p": 1.0,
            "max_new_tokens": 24,
            "seed": 0,
            "preset": "greedy",
        },
        "batch_size": 4,
        "max_problems": None,
        "grading_workers": 1,
        "grading_timeout_s": 5.0,
        "bootstrap_samples": 100,
        "dtype": "auto",
        "trust_remote_code": False,
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def arith(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "arith.jsonl"
    fetch_benchmark({"format": "math500", "source": {"demo": "benchmarks/arith.jsonl"}}, out, demo_dir=small_demo)
    return out


def test_outputs_and_metrics(small_demo: Path, arith: Path, tmp_path: Path) -> None:
    metrics = runner.evaluate(small_demo / "model", arith, _spec(), tmp_path, run_info={"mode_label": "base"})
    samples = [json.loads(line) for line in (tmp_path / runner.SAMPLES).read_text().splitlines()]
    assert len(samples) == metrics["n_problems"] == 8
    assert {"id", "sample", "completion", "extracted", "correct"} <= set(samples[0])
    stored = json.loads((tmp_path / runner.METRICS).read_text())
    assert stored["avg_at_n"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
    assert stored["template"] == "alpaca" and stored["backend"] == "transformers"
    assert stored["stack"] == stack_versions() and stored["stack"]["transformers"] == metadata.version("transformers")
    assert stored["grading_truncated"] == 0 and samples[0]["truncated"] is False
    assert stored["sampling"]["max_new_tokens"] == 24 and stored["run"] == {"mode_label": "base"}
    low, high = stored["avg_ci"]
    assert low <= stored["avg_at_n"] <= high
    assert not (tmp_path / runner.PARTIAL).exists()


def test_restart_skips_finished_problems(
    small_demo: Path, arith: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_generate = TransformersBackend.generate

    def dying_generate(self, prompts, params, **options):  # the job is killed after its first batch
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(self, prompts, params, **options)

    monkeypatch.setattr(TransformersBackend, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(small_demo / "model", arith, _spec(), tmp_path)
    assert not (tmp_path / runner.METRICS).exists()  # nothing that looks complete
    assert len((tmp_path / runner.PARTIAL).read_text().splitlines()) == 4
    with (tmp_path / runner.PARTIAL).open("a") as handle:
        handle.write('{"id": "torn')  # a line cut short by the kill
    calls.clear()
    monkeypatch.setattr(
        TransformersBackend, "generate", lambda self, p, s, **o: calls.append(len(p)) or real_generate(self, p, s, **o)
    )
    metrics = runner.evaluate(small_demo / "model", arith, _spec(), tmp_path)
    assert calls == [4]  # only the 4 problems not yet done
    assert metrics["n_problems"] == 8


def test_sampling_n_gives_avg_and_pass_at_k(small_demo: Path, arith: Path, tmp_path: Path) -> None:
    sampling = {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 3, "preset": "paper"}
    metrics = runner.evaluate(small_demo / "model", arith, _spec(sampling=sampling, max_problems=3), tmp_path)
    assert metrics["n_problems"] == 3 and metrics["n_samples"] == 12
    assert set(map(str, metrics["pass_at_k"])) >= {"1", "4"}


def test_greedy_generation_is_deterministic_and_batch_independent(small_demo: Path) -> None:
    backend = TransformersBackend(small_demo / "model", batch_size=3)
    prompts = [runner.render_prompt(f"What is {i} plus {i + 2}?", "alpaca") for i in range(5)]
    params = SamplingParams(max_new_tokens=12)
    batched = backend.generate(prompts, params)
    single = [backend.generate([p], params)[0] for p in prompts]
    assert batched == single  # left padding does not change greedy output


@pytest.mark.skipif(not (SHARED_BENCHMARKS / "medqa").exists(), reason="shared benchmark files not present")
def test_multiple_choice_by_letter_logprob(small_demo: Path, tmp_path: Path) -> None:
    # The four shortest questions: most MedQA prompts are longer than the demo model's 512-token context.
    lines = (SHARED_BENCHMARKS / "medqa/test.jsonl").read_text(encoding="utf-8").splitlines()
    short = tmp_path / "short.jsonl"
    short.write_text("".join(line + "\n" for line in sorted(lines, key=len)[:4]), encoding="utf-8")
    bench = tmp_path / "medqa.jsonl"
    fetch_benchmark({"format": "medqa", "source": {"path": str(short)}}, bench)
    spec = _spec(benchmark="medqa", format="medqa", max_problems=4)
    metrics = runner.evaluate(small_demo / "model", bench, spec, tmp_path / "out")
    samples = [json.loads(line) for line in (tmp_path / "out" / runner.SAMPLES).read_text().splitlines()]
    assert metrics["kind"] == "choice" and len(samples) == 4
    for sample in samples:
        top = [(token, logprob) for token, logprob in sample["top_tokens"]]
        assert len(top) == 10 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        pick = pick_choice(top, sample["completion"], ["A", "B", "C", "D"])
        assert (sample["extracted"], sample["method"], sample["logprobs"]) == (pick.letter, pick.method, pick.scores)
        assert sample["correct"] == (sample["extracted"] == sample["gold"])
    assert sum(metrics["choice_methods"].values()) == 4


def test_a_killed_job_resumes_where_it_stopped(small_demo: Path, arith: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run: no metrics appear, and the restarted job only generates what was missing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = _spec(batch_size=1, sampling={**_spec()["sampling"], "max_new_tokens": 48})
    command = [sys.executable, "-m", "asft.cli", "evaluate", "--model", str(small_demo / "model")]
    command += ["--benchmark", str(arith), "--spec", json.dumps(spec), "--out-dir", str(tmp_path)]
    partial = tmp_path / runner.PARTIAL
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not partial.exists() or len(partial.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = 0  # complete lines only: the kill may have torn the last one, which the restart redoes
    for line in partial.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        done_before += 1
    assert 2 <= done_before < 8, "the job should have been killed midway"
    assert not (tmp_path / runner.METRICS).exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {done_before} samples already generated" in result.stderr
    samples = (tmp_path / runner.SAMPLES).read_text().splitlines()
    assert len(samples) == 8 and len({json.loads(s)["id"] for s in samples}) == 8


def test_work_file_from_other_settings_is_not_resumed(small_demo: Path, arith: Path, tmp_path: Path) -> None:
    partial = tmp_path / runner.PARTIAL
    partial.write_text(json.dumps({"id": "arith/0", "sample": 0, "completion": "x", "correct": True}) + "\n")
    (tmp_path / runner.PARTIAL_KEY).write_text('{"spec": "an older config"}')
    runner.evaluate(small_demo / "model", arith, _spec(max_problems=2), tmp_path)
    samples = [json.loads(line) for line in (tmp_path / runner.SAMPLES).read_text().splitlines()]
    assert len(samples) == 2 and all(s["completion"] != "x" for s in samples)
    assert not partial.exists() and not (tmp_path / runner.PARTIAL_KEY).exists()


def test_a_prompt_longer_than_the_context_fails_before_generation(
    small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All prompts are measured first: the error names the file, the problem and the token counts, and nothing
    is generated (the demo model's context is 512 tokens)."""
    bench = tmp_path / "bench.jsonl"
    problems = [("short", "What is 2 plus 3?"), ("long", "one two three " * 300), ("fine", "What is 4 plus 4?")]
    bench.write_text(
        "".join(
            json.dumps({"id": i, "question": q, "gold": "5", "choices": None, "kind": "math"}) + "\n"
            for i, q in problems
        )
    )

    def no_generation(self, prompts, params):
        raise AssertionError("generation started")

    monkeypatch.setattr(TransformersBackend, "generate", no_generation)
    with pytest.raises(runner.PromptTooLongError) as caught:
        runner.evaluate(small_demo / "model", bench, _spec(), tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{bench}: problem 'long': its prompt is ")
    assert "plus max_new_tokens 24" in message and "over the model's context of 512 tokens" in message
    assert not (tmp_path / "out" / runner.PARTIAL).exists()


def test_choice_prompt_is_upstreams_medical_prompt() -> None:
    """eval/medeval/vllm_medical_test.py format_question_mmlu, and with `plain` nothing is wrapped around it."""
    example = Example("0", "Which?", "B", ("one", "two", "three", "four"), "choice")
    expected = "Question: Which?\n\nOptions:\nA. one\nB. two\nC. three\nD. four\n\nAnswer:"
    assert runner.choice_prompt(example) == expected
    assert runner.build_prompt(example, "plain", None) == expected


def test_stop_words_are_upstreams() -> None:
    assert {"<|im_end|>", "<|endoftext|>", "</s>"} <= set(runner.stop_words("alpaca"))
    assert runner.stop_words("question_answer")[-1] == "\n\nQuestion:"
    assert truncate_at_stop("x = 1 \n\nQuestion: next", runner.stop_words("question_answer")) == "x = 1"
    assert truncate_at_stop("a</s>b<|im_end|>", UPSTREAM_STOP) == "a"
    assert runner.adds_special_tokens("alpaca") and not runner.adds_special_tokens("chat")


def test_transformers_generation_stops_at_stop_words(small_demo: Path) -> None:
    """A text stop word cuts the completion before it; the special-token stop words stop generation by id."""
    backend = TransformersBackend(small_demo / "model")
    assert stop_token_ids(backend.tokenizer, UPSTREAM_STOP) == [
        backend.tokenizer.convert_tokens_to_ids(t) for t in UPSTREAM_STOP if t in backend.tokenizer.get_vocab()
    ]
    prompt = [runner.render_prompt("What is 2 plus 3?", "alpaca")]
    free = backend.generate(prompt, SamplingParams(max_new_tokens=24, stop=()))[0][0]
    word = free.strip()[len(free.strip()) // 2 :][:3]
    assert word.strip(), free
    stopped = backend.generate(prompt, SamplingParams(max_new_tokens=24, stop=(word,)))[0][0]
    assert stopped == free[: free.find(word)].rstrip()
    assert word not in stopped


def test_next_token_is_the_top_ten_likeliest_first(small_demo: Path) -> None:
    backend = TransformersBackend(small_demo / "model")
    prompt = "Question: Which?\n\nOptions:\nA. one\nB. two\n\nAnswer:"
    (following,) = backend.next_token([prompt])
    logprobs = [lp for _, lp in following.top]
    assert len(following.top) == 10 and logprobs == sorted(logprobs, reverse=True)
    greedy = backend.generate([prompt], SamplingParams(max_new_tokens=1, stop=()))[0][0]
    assert following.text.rstrip() == greedy
