"""Published benchmark layouts -> the project's JSONL (`eval/benchmarks.py`), validated by its loader.

- librispeech: an OpenSLR LibriSpeech split directory (`test-clean/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`,
  lines `UTTERANCE-ID TRANSCRIPT`, audio `UTTERANCE-ID.flac` beside it); references lower-cased.
- mmlu_text: the original MMLU CSVs (`data/test/SUBJECT_test.csv`, rows `question,A,B,C,D,answer`, no
  header); ids `SUBJECT/ROW`, a directory of CSVs or one file.
Audio paths are written relative to the output file, so the JSONL travels with its data directory.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.eval.benchmarks import BenchmarkFormatError, get_benchmark, load_samples


def librispeech_rows(split_dir: Path, output_dir: Path) -> list[dict]:
    """One ASR row per utterance of every `*.trans.txt` under `split_dir`, in sorted order."""
    rows = []
    for trans in sorted(split_dir.rglob("*.trans.txt")):
        for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{utterance}.flac"
            if not text or not audio.is_file():
                raise BenchmarkFormatError(f"{trans}:{number}: expected 'UTTERANCE-ID TRANSCRIPT' with {audio.name}")
            rows.append({"id": utterance, "audio": os.path.relpath(audio, output_dir), "text": text.lower()})
    if not rows:
        raise BenchmarkFormatError(f"{split_dir}: no *.trans.txt (expected a LibriSpeech split directory)")
    return rows


def mmlu_rows(source: Path) -> list[dict]:
    """One MCQ row per line of the MMLU CSV(s) `source` (a `SUBJECT_test.csv` file or a directory of them)."""
    files = sorted(source.glob("*.csv")) if source.is_dir() else [source]
    rows = []
    for path in files:
        subject = path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
        with open(path, newline="", encoding="utf-8") as f:
            for number, fields in enumerate(csv.reader(f), start=1):
                if len(fields) != 6 or fields[5].strip() not in ("A", "B", "C", "D"):
                    raise BenchmarkFormatError(f"{path}:{number}: expected question,A,B,C,D,answer (answer A-D)")
                question, *choices, answer = fields
                rows.append({"id": f"{subject}/{number}", "question": question, "choices": choices, "answer": answer})
    if not rows:
        raise BenchmarkFormatError(f"{source}: no MMLU CSV rows")
    return rows


CONVERTERS = {"librispeech": "LibriSpeech split directory", "mmlu_text": "MMLU CSV file or directory"}


def convert_benchmark(benchmark: str, source: Path, output: Path) -> int:
    """Write `benchmark`'s JSONL from its published layout at `source`; returns the sample count."""
    if benchmark not in CONVERTERS:
        raise ValueError(f"no converter for {benchmark!r}; available: {', '.join(CONVERTERS)}")
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    output = output.resolve()
    rows = librispeech_rows(source, output.parent) if benchmark == "librispeech" else mmlu_rows(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return len(load_samples(get_benchmark(benchmark), output))
