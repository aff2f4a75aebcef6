"""Benchmark converters on small files written locally in the published layouts (LibriSpeech split directory
with real LibriVox audio as FLAC, MMLU CSVs, a FLEURS language directory with its tar.gz of WAVs, the LLaMA
Questions release TSV with WAVs), read back by the benchmark loader; wrong layouts are one line."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
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


def _wav_clips(tmp_path: Path, n: int) -> list[Path]:
    """`n` real WAV files: LibriVox clips when installed, else generated sines (different pitches)."""
    clips = sorted(LIBRIVOX.glob("*.wav"))[:n] if LIBRIVOX.is_dir() else []
    for i in range(len(clips), n):
        clip = tmp_path / f"sine{i}.wav"
        sf.write(clip, 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * np.arange(8000) / 16000), 16000)
        clips.append(clip)
    return clips


def _fleurs_language_dir(tmp_path: Path, rows: list[str], clips: list[Path]) -> Path:
    """`en_us/test.tsv` with `rows`, and `audio/test.tar.gz` holding `test/NAME` for each (NAME, clip)."""
    lang = tmp_path / "fleurs" / "data" / "en_us"
    (lang / "audio").mkdir(parents=True)
    (lang / "test.tsv").write_text("".join(row + "\n" for row in rows))
    with tarfile.open(lang / "audio" / "test.tar.gz", "w:gz") as tar:
        for row, clip in zip(rows, clips, strict=False):
            tar.add(clip, arcname=f"test/{row.split(chr(9))[1]}")
    return lang


def test_fleurs_language_directory(tmp_path, capsys):
    clips = _wav_clips(tmp_path, 3)
    rows = [  # id, file_name, raw transcription, transcription, characters, num_samples, gender
        "1673\t10004088536354799741.wav\tIt was a Tuesday, Mr. Smith said.\tit was a tuesday mr smith\ti|t|\t1\tMALE",
        "1673\t1289338023474404522.wav\tIt was a Tuesday, Mr. Smith said.\tit was a tuesday mr smith\ti|t|\t1\tFEMALE",
        "1822\t7043302519364599.wav\tThe cat sat.\tthe cat sat\tt|h|e|\t1\tFEMALE",
    ]
    lang = _fleurs_language_dir(tmp_path, rows, clips)
    out = tmp_path / "data" / "fleurs.jsonl"
    assert main(["fleurs", "--source", str(lang), "--output", str(out)]) == 0
    assert "3 samples" in capsys.readouterr().out
    samples = load_samples(get_benchmark("fleurs"), out)
    assert [s.id for s in samples] == ["10004088536354799741", "1289338023474404522", "7043302519364599"]
    assert [s.fields["sentence_id"] for s in samples] == ["1673", "1673", "1822"]  # two speakers, one sentence
    assert samples[0].fields["text"] == "It was a Tuesday, Mr. Smith said."
    assert json.loads(out.read_text().splitlines()[2])["audio"] == "fleurs.jsonl.audio/7043302519364599.wav"
    for sample, clip in zip(samples, clips, strict=True):  # the very samples of each clip (16 kHz sources)
        np.testing.assert_allclose(sample.audio(), sf.read(clip, dtype="float32")[0], atol=0)

    cases = [  # (a TSV line, or a missing recording) -> the one error line
        (rows[:1] + ["1822\t7043302519364599.wav\tThe cat sat."], clips, "test.tsv:2: expected 7 tab-separated"),
        (rows[:1] + ["1822\t../../evil.wav\tx\tx\tx\t1\tMALE"], clips, "test.tsv:2: expected 7 tab-separated"),
        (rows, clips[:2], "test.tar.gz: no 7043302519364599.wav"),
    ]
    for n, (bad_rows, bad_clips, message) in enumerate(cases):
        bad_lang = _fleurs_language_dir(tmp_path / f"bad{n}", bad_rows, bad_clips)
        bad_out = tmp_path / f"bad{n}" / "out" / "fleurs.jsonl"
        assert main(["fleurs", "--source", str(bad_lang), "--output", str(bad_out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert not bad_out.parent.exists() or not any(bad_out.parent.iterdir())  # no JSONL, no audio directory


def test_llama_questions_release_directory(tmp_path, capsys):
    release = tmp_path / "LLAMA1-Test-Set"
    (release / "wavs").mkdir(parents=True)
    clips = _wav_clips(tmp_path, 2)
    for i, clip in enumerate(clips):
        (release / "wavs" / f"q{i}.wav").write_bytes(clip.read_bytes())
    header = "Questions\tAnswer\tWav Filename\n"
    table = release / "llama_questions_300.tsv"
    table.write_text(header + 'Who wrote "Hamlet"?\tShakespeare\twavs/q0.wav\nWhat is 2+2?\tfour\twavs/q1.wav\n')
    out = tmp_path / "data" / "llama_questions.jsonl"
    assert main(["llama_questions", "--source", str(release), "--output", str(out)]) == 0
    samples = load_samples(get_benchmark("llama_questions"), out)
    assert [(s.id, s.fields["question"], s.fields["answers"]) for s in samples] == [
        ("q0", 'Who wrote "Hamlet"?', ["Shakespeare"]),
        ("q1", "What is 2+2?", ["four"]),
    ]
    np.testing.assert_allclose(samples[1].audio(), sf.read(clips[1], dtype="float32")[0], atol=0)
    # the same questions as JSONL (the second-hand layout's variant) give the same rows
    jsonl = release / "questions.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps(
                {"question": s.fields["question"], "answer": s.fields["answers"][0], "audio": f"wavs/{s.id}.wav"}
            )
            + "\n"
            for s in samples
        )
    )
    again = tmp_path / "data" / "again.jsonl"
    assert main(["llama_questions", "--source", str(jsonl), "--output", str(again)]) == 0
    assert [json.loads(x) for x in again.read_text().splitlines()] == [
        json.loads(x) for x in out.read_text().splitlines()
    ]
    capsys.readouterr()
    for n, (text, message) in enumerate(
        [
            (header + "Who?\t\twavs/q0.wav\n", "llama_questions_300.tsv:2: missing 'Answer'"),
            (header + "Who?\tme\t../../etc/passwd\n", "is not a file inside"),
            ("Question\tAnswer\nWho?\tme\n", "missing 'Questions'"),
        ]
    ):
        table.write_text(text)
        bad = tmp_path / f"bad{n}" / "q.jsonl"
        assert main(["llama_questions", "--source", str(release), "--output", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert not bad.exists()
