"""RL rewards: ground truth from the training responses, math graded by the worker pool, choice letters."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from asft.data import DataFormatError
from asft.evaluation import grading
from asft.evaluation.grading import MathGrader
from asft.rewards import (
    GOLD_COLUMN,
    REWARD_NAME,
    ChoiceReward,
    MathReward,
    accuracy_reward,
    choice_letter,
    gold_answer,
    gold_answers,
    picked_letter,
)
from asft.rl import rl_dataset


def test_gold_answers_come_from_the_response() -> None:
    assert gold_answer("We compute 3 + 4 = 7. The answer is \\boxed{7}.", "math") == "7"
    assert gold_answer("First \\boxed{1}, then \\boxed{\\frac{1}{2}}", "math") == "\\frac{1}{2}"  # the last one
    assert gold_answer("no box here: 7", "math") is None
    assert gold_answer("\\boxed{}", "math") is None
    medical = "Explanation of the options.\nSo the answer to this question is C"
    assert gold_answer(medical, "choice") == "C"
    assert gold_answer("The answer is (B).", "choice") == "B"
    assert gold_answer("the answer is A, not ... so the answer is D", "choice") == "D"  # the final one
    assert gold_answer("The answer is Ankle swelling", "choice") is None  # a word, not a letter
    with pytest.raises(ValueError, match="unknown reward"):
        gold_answer("x", "code")  # type: ignore[arg-type]


def test_a_record_without_ground_truth_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    rows = [
        {"instruction": "1+1?", "response": "\\boxed{2}"},
        {"instruction": "2+2?", "response": "It is four."},
    ]
    # A blank line first: the error must name the file's line, not the record's index.
    data.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    settings = {"max_samples": None, "template": "alpaca", "rl": {"reward": "math"}}
    with pytest.raises(DataFormatError, match=rf"{data}:3: .*\\boxed"):
        rl_dataset(data, settings)
    # Only the records the run uses are checked.
    dataset = rl_dataset(data, {**settings, "max_samples": 1})
    assert dataset[0][GOLD_COLUMN] == "2" and dataset[0]["prompt"].endswith("### Response:")
    with pytest.raises(DataFormatError, match=rf"{data}:2: .*answer is <letter>"):
        gold_answers(["\\boxed{2}"], [2], data, "choice")


def test_math_reward_grades_in_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Correct, wrong, unparsable and a hung item (a timeout: 0.0, counted) through one grader pool."""
    (tmp_path / "reward_test_hooks.py").write_text(
        textwrap.dedent(
            """
            import time

            def hook(completion, gold):
                if completion == "<sleep>":
                    time.sleep(60)
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv(grading.TEST_HOOK_ENV, "reward_test_hooks:hook")
    completions = ["so \\boxed{\\frac{1}{2}}", "so \\boxed{3}", "no answer at all", "<sleep>"]
    metrics: dict[str, float] = {}
    with MathGrader(workers=1, timeout_s=1.0) as grader:
        reward = accuracy_reward("math", grader)
        assert isinstance(reward, MathReward) and reward.__name__ == REWARD_NAME
        scores = reward(["p"] * 4, completions, gold=["0.5", "4", "1", "1"], log_metric=metrics.__setitem__)
        # Conversational completions (lists of messages) are graded on their text.
        assert reward(["p"], [[{"role": "assistant", "content": "\\boxed{2}"}]], gold=["2"]) == [1.0]
    assert scores == [1.0, 0.0, 0.0, 0.0]
    assert (reward.graded, reward.timeouts) == (5, 1)
    assert metrics == {"reward_timeouts": 1.0}


def test_choice_reward_reads_the_answer_letter() -> None:
    reward = accuracy_reward("choice")
    assert isinstance(reward, ChoiceReward) and reward.__name__ == REWARD_NAME
    completions = [
        "Because of X.\nSo the answer to this question is B",
        "So the answer to this question is A",
        " b",  # a lone letter: the evaluation's rule (stripped, upper-cased)
        "Anything at all about Apples and Cells",  # no answer: never upstream's default "A"
        "The answer is Ankle",
    ]
    assert reward(["q"] * 5, completions, gold=["B", "B", "B", "A", "A"]) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert reward.graded == 5 and reward.timeouts == 0
    assert picked_letter("answer is: (d)") is None  # lower case after "answer is" is no letter
    assert choice_letter("So the answer to this question is D") == "D"
    with pytest.raises(ValueError, match="MathGrader"):
        accuracy_reward("math")
