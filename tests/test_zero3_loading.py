"""Under DeepSpeed ZeRO-3 the policy and the full fine-tune's frozen reference are loaded partitioned.

`asft train` creates the training arguments (and with them transformers' HfDeepSpeedConfig) before calling
`from_pretrained`, so transformers builds each model inside `deepspeed.zero.Init`: every rank allocates only its
1/world partition, rank 0 alone reads the checkpoint's values, and each layer is gathered, filled on rank 0 and
re-partitioned in turn. Loaded the other way round, every rank builds two whole models (and on a GPU moves each
whole to its device before DeepSpeed partitions it); with the checkpoint's dtype converted, as here, they are
private host copies on every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_training import KL_FLOAT32_NOISE, _log, _spec, _summary_of_ranks

# Big enough that the weights dominate the ranks' other memory (~0.5 GB of imports and data before loading, and
# the allocator's slack): 130M parameters, 0.52 GB in float32.
LAYERS = 8
MODEL = dict(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=LAYERS,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def _model(tokenizer_dir: Path, out: Path) -> int:
    """A random Qwen2 model saved in bfloat16, as released checkpoints are; its parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(**MODEL, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_zero3_loads_the_policy_and_the_reference_partitioned(
    small_demo: Path, tmp_path: Path, config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full fine-tune with a KL anchor on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo): each rank's host
    memory grows by its partitions of the two models at load (plus, on rank 0, the checkpoint it reads), not by
    two whole models; and the partitioned reference holds the policy's weights (KL 0 at the first step)."""
    parameters = _model(small_demo / "model", tmp_path / "model")
    # glibc's adaptive mmap threshold keeps freed full-size tensors (zero.Init builds each parameter whole before
    # partitioning it) in the heap, adding run-to-run noise of up to the model's own size to the RSS; a fixed
    # threshold returns them, so what is measured is what the ranks hold.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    spec = _spec(
        config,
        "asft",  # DFT weighting with a KL anchor: needs the frozen reference
        num_processes=2,
        deepspeed=str(REPO / "config" / "deepspeed" / "zero3.json"),
        finetune="full",
        dtype="float32",
        per_device_train_batch_size=1,
        max_steps=1,
        save_steps=100,  # no checkpoint: only the final model is written
        optim="sgd",
    )
    assert spec["loss"]["kl_weight"] > 0
    summary = _summary_of_ranks(
        tmp_path / "model", small_demo / "data/train.jsonl", spec, tmp_path / "out", tmp_path / "c"
    )
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2
    world = summary["world_size"]

    # The arithmetic, in GB (1e9 bytes, as the summary). Training in float32, each model is `model_gb`.
    model_gb = parameters * 4 / 1e9  # 0.52
    two_copies = 2 * model_gb  # the policy and the reference, whole: what each rank held loading them unpartitioned
    partitions = 2 * model_gb / world  # its 1/world of the policy and of the reference
    checkpoint_gb = parameters * 2 / 1e9  # bfloat16 on disk; rank 0 reads all of it, the other ranks none
    # Transient: zero.Init builds a parameter whole before partitioning it, and loading gathers one layer at a time.
    layer_gb = 4 * (parameters - 2 * MODEL["vocab_size"] * MODEL["hidden_size"]) / LAYERS / 1e9  # 0.061
    slack = 2 * layer_gb
    for rank, (before, after) in enumerate(
        zip(summary["host_rss_before_load_gb"], summary["host_rss_after_load_gb"], strict=True)
    ):
        loaded = after - before
        expected = partitions + (checkpoint_gb if rank == 0 else 0.0)
        # At least its partitions: they are really in host memory (DS_ACCELERATOR=cpu), so the field sees loading.
        assert loaded > 0.9 * partitions, (rank, loaded, partitions)
        # rank 0: 0.52 + 0.26 + 0.12 = 0.90 GB at most; rank 1: 0.64 GB; two whole models: 1.04 GB. Measured: 0.82
        # and 0.57 GB; loading before the arguments (unpartitioned), each rank grew by 1.31 GB.
        assert loaded < expected + slack < two_copies, (rank, loaded, expected, slack, two_copies)
    # The partitioned reference was loaded with the checkpoint's weights, the same as the policy's.
    assert _log(tmp_path / "out")[0]["kl"] == pytest.approx(0.0, abs=KL_FLOAT32_NOISE)
