"""Metric functions: the one WER (megatron_ext.audio.wer) against jiwer's own `wer` with Whisper's normaliser,
answer match, choice letters."""

from __future__ import annotations

import jiwer
import pytest

from megatron_ext.audio import wer
from megatron_ext.eval import metrics

# Pairs that exercise the normaliser: numbers, currency, punctuation, case, contractions, spelling,
# hyphens, titles, filler words, plus plain substitutions, deletions and insertions.
TRICKY = [
    ("He paid twenty-one dollars.", "he paid $21"),
    ("I won't go; it's 3 o'clock!", "I will not go it is three o'clock"),
    ("Mr. Smith's colour TV", "mister smiths color t v"),
    ("THE QUICK BROWN FOX", "the quick brown box"),
    ("Hmm, um, we've got 1,000 reasons.", "we have got one thousand reasons"),
    ("The meeting is on the 2nd of May at 10:30.", "the meeting is on may second at ten thirty"),
    ("They're not here yet", "they are here"),
    ("ok", "okay okay then"),
    ("A cold-hearted man", ""),
    ("Dr. Who arrived at 5 p.m.", "doctor who arrived at five pm"),
]


def _jiwer_wer(refs, hyps):
    norm = wer.normalize_english
    return jiwer.wer([norm(r) for r in refs], [norm(h) for h in hyps])


@pytest.mark.parametrize("pair", TRICKY, ids=[p[0][:20] for p in TRICKY])
def test_wer_matches_jiwer_per_pair(pair):
    ref, hyp = pair
    assert wer.corpus_wer([ref], [hyp]).wer == pytest.approx(_jiwer_wer([ref], [hyp]), abs=1e-12)


def test_corpus_wer_matches_jiwer_over_the_set():
    refs, hyps = zip(*TRICKY, strict=True)
    ours = wer.corpus_wer(refs, hyps)
    assert ours.wer == pytest.approx(_jiwer_wer(refs, hyps), abs=1e-12)
    # corpus WER weights pairs by length: it is not the mean of per-pair WERs
    mean_of_pairs = sum(_jiwer_wer([r], [h]) for r, h in TRICKY) / len(TRICKY)
    assert ours.wer != pytest.approx(mean_of_pairs)


def test_normaliser_makes_formatting_free():
    assert wer.corpus_wer(["It's 21 dollars, Mr. Smith!"], ["it is twenty one dollars mister smith"]).wer == 0.0
    assert wer.corpus_wer(["It's 21"], ["it is 21"], normalize=False).wer > 0


def test_wer_errors():
    with pytest.raises(ValueError, match="2 references but 1"):
        wer.corpus_wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty after normalisation"):
        wer.corpus_wer(["uh, um!"], ["hello"])


def test_edit_distance_counts_each_kind():
    def errors(ref: str, hyp: str) -> int:
        return wer.word_errors([ref], [hyp], normalize=False).errors

    assert errors("a b c", "a x c") == 1
    assert errors("a b c", "a c") == 1
    assert errors("a b", "a b c d") == 2
    assert errors("", "a b") == 2
    # words split on any whitespace, as str.split() does (jiwer's default splits on " " only)
    assert wer.word_errors(["a\tb\nc"], ["a b  c"], normalize=False) == wer.WerResult(0, 3)


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("I believe it is the Eiffel Tower.", ["Eiffel Tower"], True),
        ("A spider has eight legs.", ["8"], True),  # number normalisation both ways
        ("It has 8 legs", ["eight"], True),
        ("Parisian food is great", ["Paris"], False),  # whole words only
        ("I don't know", ["Paris"], False),
        ("the pacific ocean", ["Atlantic", "Pacific"], True),
        ("anything", [""], False),  # an empty acceptable answer never matches
    ],
)
def test_answer_contained(prediction, answers, expected):
    assert metrics.answer_contained(prediction, answers) is expected


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("B", 4, "B"),
        ("B.", 4, "B"),
        ("(C) Paris", 4, "C"),
        ("  D) queue", 4, "D"),
        ("The answer is D", 4, "D"),
        ("Answer: (A) def", 4, "A"),
        ("I think (B) is right", 4, "B"),
        ("A dog barks", 4, None),  # the article is not a choice
        ("answer: b", 4, None),  # lower-case letters are never choices
        ("E", 4, None),
        ("E", 5, "E"),
        ("no idea", 4, None),
        ("", 4, None),
    ],
)
def test_extract_choice(text, n, expected):
    assert metrics.extract_choice(text, n) == expected


def test_mean():
    assert metrics.mean([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        metrics.mean([])
