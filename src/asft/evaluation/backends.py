"""Generation backends behind one interface: prompts + sampling params -> completions; prompts -> letter log-probs.

The runner only talks to `Backend` (backend_interface.py), so vLLM (GPU clusters) and transformers (any machine,
tests) are interchangeable and share prompts, sampling parameters and parsing. This module holds the transformers
backend and the factory; the interface names are re-exported so callers need one import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asft.dtypes import loading_dtype
from asft.evaluation.backend_interface import Backend, SamplingParams, letter_token_ids

__all__ = ["Backend", "SamplingParams", "TransformersBackend", "letter_token_ids", "make_backend"]


class TransformersBackend:
    """Batched `generate` with left padding; runs anywhere, and is the reference the vLLM backend must match."""

    name = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        batch_size: int = 16,
        adapter_dir: str | Path | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # A run's tokenizer is saved with its adapter; the base model's is used only for the base model itself.
        tokenizer_dir = adapter_dir or model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=loading_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(device)
        if adapter_dir is not None:  # the adapter applied at inference, not merged (evaluation.lora_direct)
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir))
        self.model.eval()
        self.batch_size = batch_size
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[str]]:
        completions: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            batch = self._encode(chunk)
            torch.manual_seed(params.seed + start)
            sampling = (
                {"do_sample": False}
                if params.greedy
                else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
            )
            output = self.model.generate(
                **batch,
                **sampling,
                max_new_tokens=params.max_new_tokens,
                num_return_sequences=params.n,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            texts = self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            completions.extend(texts[i * params.n : (i + 1) * params.n] for i in range(len(chunk)))
        return completions

    @torch.no_grad()
    def choice_logprobs(self, prompts: Sequence[str], letters: Sequence[str]) -> list[dict[str, float]]:
        ids = letter_token_ids(self.tokenizer, letters)
        results = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size])
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            results.extend({letter: float(row[token]) for letter, token in ids.items()} for row in logprobs)
        return results


def make_backend(name: str, model_dir: str | Path, **options: Any) -> Backend:
    """The backend named in the config; vLLM is imported only when asked for (it is a GPU/extra install)."""
    if name == "transformers":
        return TransformersBackend(model_dir, **options)
    if name == "vllm":
        from asft.evaluation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, **options)
    raise ValueError(f"unknown evaluation backend {name!r}; expected 'transformers' or 'vllm'")
