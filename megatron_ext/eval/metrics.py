"""Pure metric functions: answer-contained match and choice letters (WER lives in megatron_ext.audio.wer,
shared with the synth intelligibility check).

Every function here is deterministic and side-effect free so it can be checked on hand-picked tricky inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from megatron_ext.audio.wer import normalize_english

LETTERS = "ABCDEFGHIJ"


def answer_contained(prediction: str, answers: Sequence[str]) -> bool:
    """True when any acceptable answer occurs in the prediction as a whole-word phrase, after normalising both.

    This is the usual LLaMA Questions / spoken-QA "match" score: the model may answer in a sentence.
    """
    padded = f" {normalize_english(prediction)} "
    return any(norm and f" {norm} " in padded for norm in (normalize_english(a) for a in answers))


_LETTER_PATTERNS = (
    r"(?i:answer|choice|option)\s*(?i:is|:)?\s*\(?([{L}])\)?(?![A-Za-z])",  # "The answer is (B)", "Answer: B"
    r"^\s*\(?([{L}])(?:[.):,]|\s*$)",  # "B", "B.", "(B) text", "B) text" on a line of its own or leading
    r"(?<![A-Za-z])\(([{L}])\)",  # "(B)" anywhere
)


def extract_choice(text: str, n_choices: int = 4) -> str | None:
    """The capital choice letter a model answered (A.. up to n_choices), or None when it names none.

    Letters are matched case-sensitively so the article "a" in "a dog ..." is never read as choice A.
    """
    letters = LETTERS[:n_choices]
    for pattern in _LETTER_PATTERNS:
        match = re.search(pattern.replace("{L}", letters), text, flags=re.MULTILINE)
        if match:
            return match.group(1)
    return None


def mean(flags: Sequence[bool | float]) -> float:
    """Arithmetic mean of per-sample scores (accuracy for booleans); ValueError on an empty list."""
    if not flags:
        raise ValueError("no samples to score")
    return sum(float(f) for f in flags) / len(flags)
