"""Merge stage: fold a LoRA adapter into its base model so evaluation loads one ordinary checkpoint."""

from __future__ import annotations

from pathlib import Path

from asft.dtypes import loading_dtype
from asft.run_io import atomic_dir


def is_lora_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def merge_lora(
    base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "auto", trust_remote_code: bool = False
) -> Path:
    """PEFT `merge_and_unload`, saved with the tokenizer the run trained with.

    Written to a temp dir and renamed, so a failed merge leaves no complete-looking output.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_lora_dir(adapter_dir):
        raise ValueError(f"{adapter_dir}: no adapter_config.json; full fine-tunes are evaluated directly, not merged")
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=loading_dtype(dtype), trust_remote_code=trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp_dir:
        merged.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
    return out_dir
