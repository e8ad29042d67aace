"""Finding the answer a completion states, on text alone: no sympy, no eval, linear time on any input.

Safe in any process, but the grading pool still calls it only inside its workers (under each item's timer), so the
parent process never spends unbounded time on model text. `extract_answer` is what the samples file shows when
math-verify fails; the candidate builders decide what math-verify is handed, and in which order.
"""

from __future__ import annotations

import bisect
import re

from asft.evaluation.benchmarks import last_boxed

# These run in linear time: no lazy group followed by a quantifier over the same characters, and no lazy group
# that scans to the end of the text from each of many start positions (math spans are found by last_math_span).
_GSM8K_ANSWER = re.compile(r"^[ \t]*####([^\n]*)", re.MULTILINE)  # the answer is trimmed in Python
_ANSWER_IS = re.compile(r"answer(?:\s+is|\s*:)\s*([^\n]+)", re.I)
_MATH_OPENER = re.compile(r"\$|\\[\[(]")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def normalize_text(text: str) -> str:
    """Spellings math-verify's LaTeX parser does not read: the Unicode degree sign."""
    return text.replace("°", "^\\circ")


def gsm8k_answer(text: str) -> str | None:
    """The GSM8K convention: a last line "#### 42" states the answer."""
    for line in reversed(_GSM8K_ANSWER.findall(text)):
        answer = line.strip(" \t")
        if answer and not answer[0].isspace():
            return answer.replace(",", "").strip()
    return None


def _occurrences(text: str, needle: str) -> list[int]:
    """The start of every occurrence of `needle`, overlapping ones included ("$$$" holds "$$" at 0 and at 1)."""
    return [m.start() for m in re.finditer(f"(?={re.escape(needle)})", text)]


def last_math_span(text: str) -> str | None:
    r"""The content of the last $$…$$, $…$, \[…\] or \(…\) span, as `findall` of the lazy regex
    `\$\$(.+?)\$\$|\$([^$]+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)` (re.S) finds them: leftmost first, none overlapping.

    That regex rescans to the end of the text from every unclosed opener ("\[" * n costs n² steps); here each
    opener looks its closer up in a sorted list of positions instead.
    """
    closers = {needle: _occurrences(text, needle) for needle in ("$$", "$", "\\]", "\\)")}

    def first(needle: str, at_least: int) -> int | None:
        positions = closers[needle]
        index = bisect.bisect_left(positions, at_least)
        return positions[index] if index < len(positions) else None

    last, position = None, 0
    while (opener := _MATH_OPENER.search(text, position)) is not None:
        start = opener.start()
        position = start + 1  # nothing opens here: the next try starts one character on
        if text.startswith("$$", start):
            end = first("$$", start + 3)  # .+? takes at least one character
            begin = start + 2
        elif text[start] == "$":
            end = first("$", start + 1)  # [^$]+? runs to the next "$" (not the very next character: that is $$)
            begin = start + 1
        else:
            end = first("\\]" if text[start + 1] == "[" else "\\)", start + 3)
            begin = start + 2
        if end is not None:
            last = text[begin:end]
            position = end + (begin - start)  # closers are as long as their openers
    return last


def extract_answer(completion: str) -> str | None:
    r"""The answer a completion states, for logs and quick looks: text only (no sympy), in linear time.

    Prefers the last \boxed{} (or \fbox{}), then a GSM8K "#### N" line, then, like math-verify's fallbacks,
    "answer is X" / "answer: X", the last LaTeX math span, and the last number. Grading uses math-verify on the
    same priorities inside the workers, and `GradeResult.extracted` is what it actually matched (or, when grading
    fails, what this found, computed in the worker under the item's timer).
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    gsm8k = gsm8k_answer(completion)
    if gsm8k is not None:
        return gsm8k
    stated = _ANSWER_IS.findall(completion)
    if stated:
        answer = stated[-1].strip().rstrip(".").strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : -len(right)].strip()
        if answer:
            return answer
    span = last_math_span(completion)
    if span is not None:
        return span.strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def gold_candidates(gold: str) -> list[str]:
    """Gold answers are plain strings ("27.0", "\\frac{1}{2}", "(1,2)", "3, 5"); give math-verify a wrapper."""
    gold = normalize_text(gold.strip())
    if not gold:
        return []
    if "\\boxed" in gold or gold.startswith("$"):
        return [gold]
    return [f"${gold}$", f"\\boxed{{{gold}}}"]


def completion_candidates(completion: str) -> list[str]:
    r"""What to hand math-verify, in order: the last \boxed{} alone first (math-verify would merge every boxed
    value into a set, so a boxed intermediate result would spoil a right final answer), then the whole text
    (math-verify's own priorities: boxed, "final answer is", the last LaTeX span, the last number)."""
    completion = normalize_text(completion)
    boxed = last_boxed(completion)
    stated = gsm8k_answer(completion) if boxed is None else boxed
    if stated is None:
        return [completion]
    return [f"\\boxed{{{stated}}}", completion]
