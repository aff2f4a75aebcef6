"""Published benchmark layouts -> the project's JSONL (`eval/benchmarks.py`), validated by its loader.

- librispeech: an OpenSLR LibriSpeech split directory (`test-clean/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`,
  lines `UTTERANCE-ID TRANSCRIPT`, audio `UTTERANCE-ID.flac` beside it); references lower-cased.
- fleurs: one language directory of FLEURS as google/fleurs publishes it on the Hugging Face hub
  (`data/en_us/`: `SPLIT.tsv`, tab-separated without header: id, file_name, raw transcription, transcription,
  characters, num_samples, gender; audio in `audio/SPLIT.tar.gz`). `--source` is the directory (split test)
  or one `SPLIT.tsv`. A sentence id is read by several speakers, so a sample's id is its file name's stem
  (the sentence id is kept as `sentence_id`); the reference is the raw transcription (the WER normaliser
  lower-cases it and drops punctuation). The WAVs are extracted, by base name only, into `OUTPUT.audio/`.
- llama_questions: LLaMA Questions (300 spoken questions, released with the Spectron paper, Nachmani et al.
  2023, at github.com/google-research-datasets/LLAMA1-Test-Set). Its layout is not documented in a format
  spec; what we know comes from code that reads the release: `llama_questions_300.tsv` (tab-separated, a
  header row with the columns `Questions`, `Answer` and `Wav Filename`, the WAV path relative to the TSV)
  beside the WAV files. Because that knowledge is second-hand, a JSON list or JSONL of objects with
  `question`, `answer` (or `answers`) and `audio` is read as well. One answer per question.
- mmlu_text: the original MMLU CSVs (`data/test/SUBJECT_test.csv`, rows `question,A,B,C,D,answer`, no
  header); ids `SUBJECT/ROW`, a directory of CSVs or one file.
Audio paths are written relative to the output file, so the JSONL travels with its data directory; no audio
path may point outside the published directory.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from megatron_ext.checkpoint.atomic import atomic_dir, write_atomic
from megatron_ext.eval.benchmarks import BenchmarkFormatError, get_benchmark, load_samples

FLEURS_FIELDS = ("id", "file_name", "raw transcription", "transcription", "characters", "num_samples", "gender")
LLAMA_QUESTIONS_TABLE = "llama_questions_300.tsv"
# Column names of LLaMA Questions' TSV release, then those of the JSON variant.
LLAMA_QUESTIONS_KEYS = {
    "question": ("Questions", "question"),
    "answers": ("Answer", "answer", "answers"),
    "audio": ("Wav Filename", "audio"),
}


def librispeech_rows(split_dir: Path, output: Path) -> list[dict]:
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
            rows.append({"id": utterance, "audio": os.path.relpath(audio, output.parent), "text": text.lower()})
    if not rows:
        raise BenchmarkFormatError(f"{split_dir}: no *.trans.txt (expected a LibriSpeech split directory)")
    return rows


def fleurs_rows(source: Path, output: Path) -> list[dict]:
    """One ASR row per recording of a FLEURS `SPLIT.tsv`, its WAVs extracted from `audio/SPLIT.tar.gz`."""
    tsv = source / "test.tsv" if source.is_dir() else source
    if not tsv.is_file():
        raise BenchmarkFormatError(f"{tsv}: no such file (expected a FLEURS language directory with SPLIT.tsv)")
    rows = []
    for number, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        name = fields[1] if len(fields) == len(FLEURS_FIELDS) else ""
        if PurePosixPath(name).name != name or not name.endswith(".wav") or not fields[2].strip():
            raise BenchmarkFormatError(
                f"{tsv}:{number}: expected {len(FLEURS_FIELDS)} tab-separated fields ({', '.join(FLEURS_FIELDS)}) "
                "with a .wav file name and a transcription"
            )
        rows.append({"id": name.removesuffix(".wav"), "sentence_id": fields[0], "audio": name, "text": fields[2]})
    if not rows:
        raise BenchmarkFormatError(f"{tsv}: no FLEURS rows")
    audio_dir = output.parent / f"{output.name}.audio"
    _extract_by_name(tsv.parent / "audio" / f"{tsv.stem}.tar.gz", [r["audio"] for r in rows], audio_dir)
    return [r | {"audio": os.path.relpath(audio_dir / r["audio"], output.parent)} for r in rows]


def _extract_by_name(archive: Path, names: list[str], target: Path) -> None:
    """Write the archive's regular files whose base name is in `names` flat into `target` (atomically: all
    of them or no directory); member paths are never used as output paths."""
    if not archive.is_file():
        raise BenchmarkFormatError(
            f"{archive}: no such audio archive (FLEURS keeps audio/SPLIT.tar.gz beside SPLIT.tsv)"
        )
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise BenchmarkFormatError(f"{archive.parent.parent}: file_name {duplicate} is listed twice")
    wanted = set(names)
    with atomic_dir(target, overwrite=True) as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    name = PurePosixPath(member.name).name
                    if member.isfile() and name in wanted:
                        (tmp / name).write_bytes(tar.extractfile(member).read())
                        wanted.discard(name)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise BenchmarkFormatError(f"{archive}: cannot read the tar.gz archive ({e})") from None
        if wanted:
            raise BenchmarkFormatError(f"{archive}: no {sorted(wanted)[0]} ({len(wanted)} listed file(s) missing)")


def llama_questions_rows(source: Path, output: Path) -> list[dict]:
    """One spoken-QA row per question of LLaMA Questions (the release's TSV, or JSON/JSONL of the same)."""
    table = source / LLAMA_QUESTIONS_TABLE if source.is_dir() else source
    if not table.is_file():
        raise BenchmarkFormatError(f"{table}: no such file (expected the LLaMA Questions release directory)")
    root = table.parent.resolve()
    rows = []
    for where, entry in _table_entries(table):
        question, answers, audio = (_field(entry, key, where) for key in LLAMA_QUESTIONS_KEYS)
        answers = [answers] if isinstance(answers, str) else answers
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
            raise BenchmarkFormatError(f"{where}: the answer must be a non-empty string (or list of strings)")
        path = (root / str(audio).strip()).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise BenchmarkFormatError(f"{where}: audio {audio!r} is not a file inside {root}")
        rows.append(
            {"id": path.stem, "audio": os.path.relpath(path, output.parent), "answers": answers, "question": question}
        )
    if not rows:
        raise BenchmarkFormatError(f"{table}: no questions")
    return rows


def _table_entries(table: Path) -> Iterable[tuple[str, dict]]:
    """("file:line", row object) of a TSV with a header row, a JSONL file or a JSON list."""
    text = table.read_text(encoding="utf-8")
    if table.suffix == ".tsv":
        for number, entry in enumerate(
            csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE), start=2
        ):
            yield f"{table}:{number}", entry
        return
    try:
        if table.suffix == ".jsonl":
            entries = [
                (f"{table}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()
            ]
        else:
            entries = [(f"{table}[{n}]", e) for n, e in enumerate(json.loads(text))]
    except (json.JSONDecodeError, TypeError) as e:
        raise BenchmarkFormatError(f"{table}: expected a TSV, JSONL or JSON list of questions ({e})") from None
    yield from entries


def _field(entry: object, key: str, where: str) -> object:
    names = LLAMA_QUESTIONS_KEYS[key]
    value = next((entry[n] for n in names if isinstance(entry, dict) and entry.get(n) is not None), None)
    if value is None or value == "":
        raise BenchmarkFormatError(f"{where}: missing {' / '.join(repr(n) for n in names)}")
    return value


def mmlu_rows(source: Path, output: Path) -> list[dict]:
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


@dataclass(frozen=True)
class Converter:
    """What `--source` names, and the function reading it into JSONL rows (given the output path)."""

    source: str
    rows: Callable[[Path, Path], list[dict]]


CONVERTERS = {
    "fleurs": Converter("FLEURS language directory (test.tsv + audio/test.tar.gz) or SPLIT.tsv", fleurs_rows),
    "librispeech": Converter("LibriSpeech split directory", librispeech_rows),
    "llama_questions": Converter(f"LLaMA Questions directory ({LLAMA_QUESTIONS_TABLE} + WAVs)", llama_questions_rows),
    "mmlu_text": Converter("MMLU CSV file or directory", mmlu_rows),
}


def convert_benchmark(benchmark: str, source: Path, output: Path) -> int:
    """Write `benchmark`'s JSONL from its published layout at `source`; returns the sample count."""
    if benchmark not in CONVERTERS:
        raise ValueError(f"no converter for {benchmark!r}; available: {', '.join(CONVERTERS)}")
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    output = output.resolve()
    rows = CONVERTERS[benchmark].rows(source, output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return len(load_samples(get_benchmark(benchmark), output))
