"""Benchmark converters on small files written locally in the published layouts (LibriSpeech split directory
with real LibriVox audio as FLAC, MMLU CSVs), read back by the benchmark loader; wrong layouts are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import soundfile as sf

from megatron_ext.cli.convert_benchmark import main
from megatron_ext.eval.benchmarks import get_benchmark, load_samples

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


@pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="Debian pocketsphinx-testdata not installed")
def test_librispeech_split_directory(tmp_path, capsys):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    clips = sorted(LIBRIVOX.glob("*.wav"))[:2]
    lines = []
    for i, clip in enumerate(clips):
        audio, rate = sf.read(clip)
        sf.write(chapter / f"1089-134686-{i:04d}.flac", audio, rate)
        lines.append(f"1089-134686-{i:04d} HE HOPED THERE WOULD BE STEW {i}")
    (chapter / "1089-134686.trans.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "data" / "librispeech.jsonl"
    assert main(["librispeech", "--source", str(tmp_path / "LibriSpeech" / "test-clean"), "--output", str(out)]) == 0
    assert "2 samples" in capsys.readouterr().out
    samples = load_samples(get_benchmark("librispeech"), out)
    assert [s.id for s in samples] == ["1089-134686-0000", "1089-134686-0001"]
    assert samples[1].fields["text"] == "he hoped there would be stew 1"
    assert json.loads(out.read_text().splitlines()[0])["audio"].startswith("../LibriSpeech/")  # relative
    assert samples[0].audio().shape[0] == pytest.approx(
        sf.info(clips[0]).frames * 16000 / sf.info(clips[0]).samplerate, abs=2
    )
    (chapter / "1089-134686-0001.flac").unlink()
    bad = tmp_path / "bad" / "l.jsonl"
    assert main(["librispeech", "--source", str(tmp_path / "LibriSpeech"), "--output", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1089-134686.trans.txt:2" in err[0] and not bad.exists()


def test_mmlu_csv_directory(tmp_path, capsys):
    test_dir = tmp_path / "data" / "test"
    test_dir.mkdir(parents=True)
    with open(test_dir / "astronomy_test.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["What is the Sun?", "A star", "A planet", "A moon", "A comet", "A"],
                ['Say "hi", twice', "hi", "hi hi", "no", "yes", "B"],
            ]
        )
    with open(test_dir / "virology_test.csv", "w", newline="") as f:
        csv.writer(f).writerow(["Which is a virus?", "E. coli", "Influenza", "Yeast", "Mold", "B"])
    out = tmp_path / "mmlu_text.jsonl"
    assert main(["mmlu_text", "--source", str(test_dir), "--output", str(out)]) == 0
    samples = load_samples(get_benchmark("mmlu_text"), out)
    assert [s.id for s in samples] == ["astronomy/1", "astronomy/2", "virology/1"]
    assert samples[1].fields["question"] == 'Say "hi", twice' and samples[1].fields["answer"] == "B"
    assert samples[2].fields["choices"] == ["E. coli", "Influenza", "Yeast", "Mold"]
    (tmp_path / "wrong.csv").write_text("question,A,B,C,D\n")  # a header-only file of another layout
    capsys.readouterr()
    assert main(["mmlu_text", "--source", str(tmp_path / "wrong.csv"), "--output", str(tmp_path / "w.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.csv:1: expected question,A,B,C,D,answer" in err[0]
    assert not (tmp_path / "w.jsonl").exists()
