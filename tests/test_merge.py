"""LoRA merge: the merged checkpoint reproduces the adapter model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asft.merge import merge_lora
from tests.conftest import make_random_adapter


def test_merged_model_matches_adapter_logits(small_demo: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = small_demo / "model"
    adapter_dir = make_random_adapter(base_dir, tmp_path / "adapter", rank=4, std=0.05)

    merged_dir = merge_lora(base_dir, adapter_dir, tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    inputs = tokenizer(["Tom has 12 apples and buys 7 more."], return_tensors="pt")
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        expected = adapter_model(**inputs).logits
        actual = merged(**inputs).logits
        untouched = base(**inputs).logits
    assert not (merged_dir / "adapter_config.json").exists()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert (expected - untouched).abs().max() > 1e-2  # the test would catch a merge that dropped the adapter
    assert not merged_dir.with_name("merged.tmp").exists()


def test_merge_refuses_a_full_model(small_demo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no adapter_config.json"):
        merge_lora(small_demo / "model", small_demo / "model", tmp_path / "out")


def test_merge_command_takes_the_dtype_and_remote_code_flags(small_demo: Path, tmp_path: Path) -> None:
    """`asft merge` as the merge rule calls it: the merged weights are saved in the requested dtype."""
    from transformers import AutoModelForCausalLM

    from asft.cli import main

    base_dir = small_demo / "model"
    adapter_dir = make_random_adapter(base_dir, tmp_path / "adapter", rank=4, std=0.05)
    assert AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto").dtype == torch.float32
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    assert main([*argv, "--dtype", "bfloat16", "--trust-remote-code"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
