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
from asft.evaluation.backend_interface import (
    CHOICE_TOP_K,
    Backend,
    NextToken,
    SamplingParams,
    stop_token_ids,
    truncate_at_stop,
)

__all__ = ["Backend", "NextToken", "SamplingParams", "TransformersBackend", "make_backend"]


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

    def _encode(self, prompts: Sequence[str], add_special_tokens: bool = False) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def _decode(self, ids: torch.Tensor, end_ids: set[int], stop: Sequence[str]) -> str:
        """One completion's text: up to its first end token (EOS or a special-token stop word, as vLLM stops on
        them), special tokens skipped, then cut before the first stop word."""
        tokens = ids.tolist()
        end = next((i for i, token in enumerate(tokens) if token in end_ids), len(tokens))
        return truncate_at_stop(self.tokenizer.decode(tokens[:end], skip_special_tokens=True), stop)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], params: SamplingParams, add_special_tokens: bool = False
    ) -> list[list[str]]:
        end_ids = list(dict.fromkeys(self.eos_token_ids + stop_token_ids(self.tokenizer, params.stop)))
        # Text stop words end a sequence early (saving its tokens); the decoded text is cut at them regardless.
        text_stops = [w for w in params.stop if w and not stop_token_ids(self.tokenizer, [w])]
        stopping = {"stop_strings": text_stops, "tokenizer": self.tokenizer} if text_stops else {}
        completions: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            batch = self._encode(chunk, add_special_tokens)
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
                eos_token_id=end_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                **stopping,
            )
            generated = output[:, batch["input_ids"].shape[1] :]
            texts = [self._decode(row, set(end_ids), params.stop) for row in generated]
            completions.extend(texts[i * params.n : (i + 1) * params.n] for i in range(len(chunk)))
        return completions

    @torch.no_grad()
    def next_token(
        self, prompts: Sequence[str], k: int = CHOICE_TOP_K, add_special_tokens: bool = False
    ) -> list[NextToken]:
        results = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size], add_special_tokens)
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
            values, indices = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            for row_values, row_ids in zip(values.tolist(), indices.tolist(), strict=True):
                top = tuple((self.tokenizer.decode([t]), v) for t, v in zip(row_ids, row_values, strict=True))
                results.append(NextToken(top, self.tokenizer.decode([row_ids[0]], skip_special_tokens=True)))
        return results


def make_backend(name: str, model_dir: str | Path, **options: Any) -> Backend:
    """The backend named in the config; vLLM is imported only when asked for (it is a GPU/extra install)."""
    if name == "transformers":
        return TransformersBackend(model_dir, **options)
    if name == "vllm":
        from asft.evaluation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, **options)
    raise ValueError(f"unknown evaluation backend {name!r}; expected 'transformers' or 'vllm'")
