"""What every generation backend offers the runner, in a module of its own so that backends import it and never
each other: the sampling parameters, the `Backend` protocol and the option-letter token lookup both share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SamplingParams:
        return cls(**{k: spec[k] for k in ("n", "temperature", "top_p", "max_new_tokens", "seed")})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Backend(Protocol):
    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[str]]:
        """`params.n` completions per prompt, in prompt order."""
        ...

    def choice_logprobs(self, prompts: Sequence[str], letters: Sequence[str]) -> list[dict[str, float]]:
        """Next-token log-probability of each option letter after each prompt."""
        ...


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> dict[str, int]:
    """The single token that spells each letter after "Answer:" (" A" where one token, else "A")."""
    ids = {}
    for letter in letters:
        for text in (" " + letter, letter):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids[letter] = encoded[0]
                break
        else:
            raise ValueError(f"option letter {letter!r} is not a single token for this tokenizer")
    return ids
