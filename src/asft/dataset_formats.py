"""Source rows turned into instruction/response pairs, one converter per dataset `format`.

`instruction_response` rows already are pairs (mapped through `fields` later). `medmcqa` builds the pairs the
paper's medical training set holds from MedMCQA's own rows: the paper publishes only a 10k file, so our 30k/100k
sets are built here from the train split in the same layout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

FORMATS = ("instruction_response", "medmcqa")

MEDMCQA_LETTERS = ("A", "B", "C", "D")
MEDMCQA_OPTION_KEYS = ("opa", "opb", "opc", "opd")
# The closing sentence of every response in the paper's appendix example (Figure 6), on its own line, no period.
MEDMCQA_ANSWER_LINE = "So the answer to this question is {letter}"

# Reasons a MedMCQA row yields no pair; the counts are logged and written to the dataset's sidecar.
SKIP_NO_EXPLANATION = "no_explanation"
SKIP_NO_ANSWER = "no_answer"
SKIP_MISSING_TEXT = "missing_question_or_option"


def _medmcqa_answer(cop: Any) -> int | None:
    """`cop` as an option index 0-3, or None: the test split's -1, a null, or anything else not 0-3."""
    if isinstance(cop, bool) or not isinstance(cop, int) or not 0 <= cop < len(MEDMCQA_LETTERS):
        return None
    return cop


def medmcqa_pair(row: dict[str, Any]) -> dict[str, str] | str:
    """One MedMCQA row as the paper's training pair, or the reason it has none.

    Layout (the appendix's Figure 6): instruction = the question, then "A. <opa>" ... "D. <opd>", one per line;
    response = the explanation `exp` verbatim, a newline, then "So the answer to this question is <letter>".
    A pair needs an explanation to teach, so rows without one are skipped rather than given a bare letter.
    """
    texts = [row.get("question"), *(row.get(key) for key in MEDMCQA_OPTION_KEYS)]
    if not all(isinstance(text, str) for text in texts):
        return SKIP_MISSING_TEXT
    answer = _medmcqa_answer(row.get("cop"))
    if answer is None:
        return SKIP_NO_ANSWER
    explanation = row.get("exp")
    if not isinstance(explanation, str) or not explanation.strip():
        return SKIP_NO_EXPLANATION
    question, *options = texts
    lines = [question, *(f"{letter}. {option}" for letter, option in zip(MEDMCQA_LETTERS, options, strict=True))]
    response = explanation + "\n" + MEDMCQA_ANSWER_LINE.format(letter=MEDMCQA_LETTERS[answer])
    return {"instruction": "\n".join(lines), "response": response}


def convert_rows(fmt: str, rows: Iterable[dict[str, Any]], skipped: Counter[str]) -> Iterator[dict[str, Any]]:
    """`rows` in `fmt` as instruction/response rows; each row left out is counted in `skipped` by reason."""
    if fmt == "instruction_response":
        yield from rows
        return
    if fmt != "medmcqa":
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    for row in rows:
        pair = medmcqa_pair(row)
        if isinstance(pair, str):
            skipped[pair] += 1
        else:
            yield pair
