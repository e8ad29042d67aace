"""Verifiable rewards for RL training (GRPO/DAPO, `asft.rl`): ground truth from the training data, 0/1 scores.

The ground truth is taken from each record's reference response: math = its last \\boxed{} (the evaluation's
`last_boxed`), choice (the medical sets) = the letter of its closing "So the answer to this question is X". A
record without one is a DataFormatError naming file and line, raised before any model loads.

Rewards use TRL's reward-function signature (`prompts`, `completions`, dataset columns such as `gold` as keyword
lists) and return one float per completion. Math answers are judged by the evaluation's `MathGrader` (math-verify
in time-limited worker processes, never in this process on model text); a grading timeout scores 0.0 and is
counted. Choice completions are read with the same "answer is X" rule as the gold, else the evaluation's letter
rule (`pick_choice`: a completion that is just a letter), and compared with `grade_choice`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from asft.data import DataFormatError
from asft.evaluation.benchmarks import last_boxed
from asft.evaluation.grading import MathGrader, grade_choice, pick_choice

RewardKind = Literal["math", "choice"]
REWARD_KINDS = ("math", "choice")
GOLD_COLUMN = "gold"  # the dataset column TRL passes to the reward function as `gold=[...]`
# TRL names a reward function's metrics after it ("rewards/<name>/mean"): one name for both kinds keeps the log's
# key stable for the training-curve plot.
REWARD_NAME = "accuracy"
LETTERS = tuple(string.ascii_uppercase)
# "So the answer to this question is X" (the medical responses' closing line) or a plain "the answer is X": the
# letter must stand alone ("answer is Ankle" has none).
_ANSWER_LETTER = re.compile(r"(?i:answer(?:\s+to\s+this\s+question)?\s+is)\s*:?\s*\(?([A-Z])(?![A-Za-z])")


def choice_letter(text: str) -> str | None:
    """The letter of the last "answer (to this question) is X" in `text`, or None."""
    matches = _ANSWER_LETTER.findall(text)
    return matches[-1] if matches else None


def gold_answer(response: str, kind: RewardKind) -> str | None:
    """The ground truth a reference response states, or None if it states none."""
    if kind == "math":
        answer = last_boxed(response)
        return answer if answer and answer.strip() else None
    if kind == "choice":
        return choice_letter(response)
    raise ValueError(f"unknown reward {kind!r}; expected one of {REWARD_KINDS}")


def gold_answers(
    responses: Sequence[str], line_numbers: Sequence[int], path: str | Path, kind: RewardKind
) -> list[str]:
    """Every response's ground truth; the first without one is a DataFormatError naming its file and line."""
    what = "a \\boxed{} answer" if kind == "math" else "a final 'answer is <letter>'"
    golds = []
    for response, line_no in zip(responses, line_numbers, strict=True):
        gold = gold_answer(response, kind)
        if gold is None:
            raise DataFormatError(f"{path}:{line_no}: response has no {what} to reward against (reward: {kind})")
        golds.append(gold)
    return golds


def completion_text(completion: Any) -> str:
    """A completion's text: TRL passes plain strings for text prompts, a list of messages for conversational ones."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def picked_letter(text: str) -> str | None:
    """The letter a completion answers: its last "answer is X", else the evaluation's rule for a lone letter."""
    letter = choice_letter(text)
    if letter is not None:
        return letter
    pick = pick_choice([(text, 0.0)], "", LETTERS)
    return pick.letter if pick.method == "top10" else None  # "default" is upstream's guess, not an answer


class MathReward:
    """1.0 when the MathGrader judges the completion's answer equal to the gold, else 0.0 (timeouts counted).

    The grader (its worker pool) belongs to the caller, created once per run and closed at its end.
    """

    __name__ = REWARD_NAME

    def __init__(self, grader: MathGrader) -> None:
        self.grader = grader
        self.graded = 0
        self.timeouts = 0
        self.errors = 0

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        gold: Sequence[str],
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        results = self.grader.grade([(completion_text(c), g) for c, g in zip(completions, gold, strict=True)])
        timeouts = sum(r.status == "timeout" for r in results)
        self.graded += len(results)
        self.timeouts += timeouts
        self.errors += sum(r.status == "error" for r in results)
        if log_metric is not None:
            log_metric("reward_timeouts", float(timeouts))
        return [1.0 if r.correct else 0.0 for r in results]


class ChoiceReward:
    """1.0 when the completion's answer letter is the gold letter, else 0.0 (no letter is wrong)."""

    __name__ = REWARD_NAME

    def __init__(self) -> None:
        self.graded = 0
        self.timeouts = 0  # nothing is parsed, nothing times out; kept so both rewards report alike
        self.errors = 0

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], gold: Sequence[str], **kwargs: Any
    ) -> list[float]:
        self.graded += len(completions)
        return [
            1.0 if grade_choice(picked_letter(completion_text(c)), g) else 0.0
            for c, g in zip(completions, gold, strict=True)
        ]


def accuracy_reward(kind: RewardKind, grader: MathGrader | None = None) -> MathReward | ChoiceReward:
    """The run's accuracy reward; math needs the run's grader."""
    if kind == "math":
        if grader is None:
            raise ValueError("the math reward needs a MathGrader")
        return MathReward(grader)
    if kind == "choice":
        return ChoiceReward()
    raise ValueError(f"unknown reward {kind!r}; expected one of {REWARD_KINDS}")
