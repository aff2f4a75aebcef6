"""The one word error rate: jiwer's word alignment after Whisper's English text normaliser, shared by the
ASR benchmarks (eval) and the synth intelligibility check (data)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

# Words are split on any whitespace (tabs and newlines too), as str.split() does; jiwer's default splits on " ".
_WORDS = jiwer.Compose(
    [jiwer.RemoveWhiteSpace(replace_by_space=True), jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
    + [jiwer.ReduceToListOfListOfWords()]
)


@lru_cache(maxsize=1)
def _english_normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    """Whisper's English text normaliser (numbers, spelling, contractions, punctuation, case)."""
    return _english_normalizer()(text)


@dataclass(frozen=True)
class WerResult:
    """Word edits (substitutions + deletions + insertions) against a number of reference words."""

    errors: int
    reference_words: int

    @property
    def wer(self) -> float:
        return self.errors / self.reference_words


def word_errors(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> WerResult:
    """Total word edits and reference words over aligned pairs (Whisper-normalised unless `normalize=False`);
    an empty reference counts its hypothesis words as insertions. ValueError when the lists differ in length."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return WerResult(0, 0)
    prepare = normalize_english if normalize else str
    out = jiwer.process_words(
        [prepare(r) for r in references],
        [prepare(h) for h in hypotheses],
        reference_transform=_WORDS,
        hypothesis_transform=_WORDS,
    )
    return WerResult(out.substitutions + out.deletions + out.insertions, sum(len(r) for r in out.references))


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> WerResult:
    """Word error rate of a whole test set (total edits / total reference words, jiwer's corpus definition).

    Raises ValueError when the lists differ in length or every normalised reference is empty.
    """
    result = word_errors(references, hypotheses, normalize)
    if result.reference_words == 0:
        raise ValueError("all references are empty after normalisation: WER is undefined")
    return result
