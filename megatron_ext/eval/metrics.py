"""Pure metric functions: WER with Whisper's English normaliser, answer-contained match, choice letters.

Every function here is deterministic and side-effect free so it can be checked against reference
implementations (jiwer for WER) on hand-picked tricky inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from whisper_normalizer.english import EnglishTextNormalizer

LETTERS = "ABCDEFGHIJ"


@lru_cache(maxsize=1)
def _english_normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    """Whisper's English text normaliser (numbers, spelling, contractions, punctuation, case)."""
    return _english_normalizer()(text)


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions), one row at a time."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class WerResult:
    """Corpus WER = total word edits / total reference words, over normalised texts."""

    errors: int
    reference_words: int

    @property
    def wer(self) -> float:
        return self.errors / self.reference_words


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> WerResult:
    """Word error rate of a whole test set (jiwer's corpus definition), after Whisper's English normaliser.

    Raises ValueError when the lists differ in length or every normalised reference is empty.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_words = (normalize_english(ref) if normalize else ref).split()
        hyp_words = (normalize_english(hyp) if normalize else hyp).split()
        errors += word_edit_distance(ref_words, hyp_words)
        words += len(ref_words)
    if words == 0:
        raise ValueError("all references are empty after normalisation: WER is undefined")
    return WerResult(errors, words)


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
