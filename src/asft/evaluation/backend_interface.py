"""What every generation backend offers the runner, in a module of its own so that backends import it and never
each other: the sampling parameters, the `Backend` protocol and the stop-sequence helpers both share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Upstream's stop words (zhuchichi56/ASFT eval/math_evaluation/math_eval.py, from Qwen2.5-Math's evaluation):
# generation ends at the first of these, which is not part of the completion.
UPSTREAM_STOP: tuple[str, ...] = (
    "</s>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
)
CHOICE_TOP_K = 10  # next-token log-probs read per multiple-choice prompt (vLLM `logprobs=10` upstream)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0
    stop: tuple[str, ...] = UPSTREAM_STOP

    @classmethod
    def from_spec(cls, spec: dict[str, Any], stop: Sequence[str] = UPSTREAM_STOP) -> SamplingParams:
        return cls(**{k: spec[k] for k in ("n", "temperature", "top_p", "max_new_tokens", "seed")}, stop=tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class NextToken:
    """The next token after a prompt, as upstream's letter scoring reads it.

    `top`: the `CHOICE_TOP_K` likeliest tokens, likeliest first, each as `tokenizer.decode([id])` (special tokens
    spelt out) with its log-probability. `text`: the greedy token as generated text (special tokens skipped),
    which upstream's fallback searches for a letter.
    """

    top: tuple[tuple[str, float], ...]
    text: str


class Backend(Protocol):
    name: str
    tokenizer: Any

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, add_special_tokens: bool = False
    ) -> list[list[str]]:
        """`params.n` completions per prompt, in prompt order, each cut before the first of `params.stop`.

        `add_special_tokens`: whether the tokenizer adds its own (BOS) tokens to the prompt text, as upstream's
        plain-text prompts get; a chat-template rendering already holds them.
        """
        ...

    def next_token(
        self, prompts: Sequence[str], k: int = CHOICE_TOP_K, add_special_tokens: bool = False
    ) -> list[NextToken]:
        """The `k` likeliest next tokens after each prompt, and the greedy one as text."""
        ...


def stop_token_ids(tokenizer: Any, stop: Sequence[str]) -> list[int]:
    """The ids of the stop words that are one special token of this tokenizer ("<|im_end|>" -> 151645 for Qwen2).

    Generated text skips special tokens, so a stop word that is one would never be seen in the text: generation
    must stop on its id. Upstream lists these ids by hand for Qwen2 ([151645, 151643]); this finds them for any
    tokenizer.
    """
    special = set(getattr(tokenizer, "all_special_tokens", ())) | set(
        getattr(tokenizer, "added_tokens_encoder", {}) or {}
    )
    ids = []
    for word in stop:
        if word not in special:
            continue
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` cut before its first stop word, trailing whitespace removed (upstream's `output.rstrip()`)."""
    cut = min((i for i in (text.find(word) for word in stop if word) if i >= 0), default=len(text))
    return text[:cut].rstrip()
