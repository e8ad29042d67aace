"""The embedded demo build: deterministic, loadable, and disjoint train/test data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from asft.demo import build_demo
from tests.conftest import SMALL_DEMO


def test_build_is_deterministic(small_demo: Path, tmp_path: Path) -> None:
    build_demo(tmp_path, **SMALL_DEMO)
    for name in ("data/train.jsonl", "benchmarks/arith.jsonl", "model/model.safetensors", "model/tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (small_demo / name).read_bytes(), name


def test_model_and_tokenizer_load_and_round_trip(small_demo: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_demo / "model")
    text = "Tom has 12 apples.\n\nWe compute 12 + 7 = 19. The answer is \\boxed{19}.  "
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.pad_token != tokenizer.eos_token
    assert "<|im_start|>user\nhi<|im_end|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    config = AutoConfig.from_pretrained(small_demo / "model")
    assert config.model_type == "qwen2" and config.head_dim >= 32
    model = AutoModelForCausalLM.from_pretrained(small_demo / "model")
    out = model.generate(**tokenizer(["What is 3 plus 4?"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 0


def test_data_files(small_demo: Path) -> None:
    train = [json.loads(line) for line in (small_demo / "data/train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (small_demo / "benchmarks/arith.jsonl").read_text().splitlines()]
    assert len(train) == SMALL_DEMO["n_train"] and len(test) == SMALL_DEMO["n_test"]
    assert not {r["instruction"] for r in train} & {r["problem"] for r in test}
    for record in test:
        assert {"problem", "solution", "answer", "subject", "level", "unique_id"} <= set(record)
        assert record["solution"].endswith(f"\\boxed{{{record['answer']}}}.")
    for record in train:
        equation = record["response"].split("We compute ")[1].split(".")[0]
        left, answer = equation.split(" = ")
        a, op, b = left.split(" ")
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_build_does_not_depend_on_thread_count(small_demo: Path, tmp_path: Path) -> None:
    """One thread gives the fixture's (two threads') weights bit for bit, as the README says.

    So a machine's core count does not change the demo; its vector kernels (AVX2 or not) do, which is what the
    README's cross-machine spread is about.
    """
    script = (
        "import json, sys, torch; from asft.demo import build_demo; torch.set_num_threads(1); "
        "build_demo(sys.argv[1], **json.loads(sys.argv[2]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(SMALL_DEMO)], env=env, check=True)
    name = "model/model.safetensors"
    assert (tmp_path / name).read_bytes() == (small_demo / name).read_bytes()
