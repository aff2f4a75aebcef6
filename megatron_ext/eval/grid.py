"""Evaluate a merge grid (`make eval-grid`): every checkpoint of a merge-grid manifest plus its two parents
on every benchmark, then the report.

The manifest is the one `tools/merge.py --grid` writes (`runs[].output`, `voxtral`, `devstral`). Merged
checkpoints get `role=merge` (method and parameters come from their merge.json), the parents `role=parent`
under the names `voxtral` and `devstral`; Devstral has no audio encoder, so it gets the text benchmarks
only. Each checkpoint's model is loaded at most once for all its benchmarks, and not at all when every
prediction of every benchmark is already in the store (the resume key is known before loading), so a
rerun of a finished grid loads nothing and rewrites no record.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import ProjectError
from megatron_ext.eval.benchmarks import BENCHMARKS
from megatron_ext.eval.generation import Generator, load_generator
from megatron_ext.eval.runner import evaluate


class GridManifestError(ProjectError, ValueError):
    """A merge-grid manifest that does not name the grid's checkpoints and parents."""


@dataclass(frozen=True)
class GridEntry:
    """One checkpoint of the grid and what it is scored on."""

    checkpoint: Path
    name: str | None  # record name (None: the checkpoint's own, its directory name)
    labels: dict
    benchmarks: tuple[str, ...]


@dataclass
class GridSettings:
    """How every checkpoint is evaluated (the `evaluate` options that apply to a whole grid)."""

    backend: str = "megatron"
    dtype: str = "fp32"
    tp: int = 1
    batch_size: int = 8
    max_new_tokens: int | None = None


def grid_entries(manifest: Path, benchmarks: tuple[str, ...] = tuple(BENCHMARKS)) -> list[GridEntry]:
    """The merged checkpoints of `manifest`, then Voxtral (all `benchmarks`), then Devstral (the text ones)."""
    try:
        data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except OSError as e:
        raise GridManifestError(f"{manifest}: cannot read ({e.strerror}; `make merge-grid` writes it)") from None
    try:
        runs = [Path(run["output"]) for run in data["runs"]]
        voxtral, devstral = Path(data["voxtral"]), Path(data["devstral"])
    except (KeyError, TypeError) as e:
        raise GridManifestError(
            f"{manifest}: not a merge-grid manifest (expected runs[].output, voxtral, devstral; {e!r} missing)"
        ) from None
    text_only = tuple(b for b in benchmarks if not BENCHMARKS[b].needs_audio)
    entries = [GridEntry(run, None, {"role": "merge"}, benchmarks) for run in runs]
    entries.append(GridEntry(voxtral, "voxtral", {"role": "parent"}, benchmarks))
    if text_only:
        entries.append(GridEntry(devstral, "devstral", {"role": "parent"}, text_only))
    for entry in entries:
        if not entry.checkpoint.is_dir():
            raise GridManifestError(f"{manifest}: checkpoint {entry.checkpoint} is not a directory")
    return entries


def evaluate_grid(
    manifest: Path,
    data_dir: Path,
    output: Path,
    settings: GridSettings,
    benchmarks: tuple[str, ...] = tuple(BENCHMARKS),
) -> Iterator[tuple[GridEntry, bool]]:
    """Evaluate every grid entry on `data_dir/BENCH.jsonl`, upserting records into `output`; yields each
    entry once done with whether its model had to be loaded (False: every prediction was resumed)."""
    entries = grid_entries(manifest, benchmarks)
    missing = [b for b in benchmarks if not (data_dir / f"{b}.jsonl").is_file()]
    if missing:
        raise GridManifestError(f"{data_dir}: no {missing[0]}.jsonl (one benchmark file per benchmark)")
    for entry in entries:
        loader = _LoadOnce(entry.checkpoint, settings)
        for bench in entry.benchmarks:
            evaluate(
                bench,
                entry.checkpoint,
                data_dir / f"{bench}.jsonl",
                output,
                name=entry.name,
                labels=entry.labels,
                batch_size=settings.batch_size,
                max_new_tokens=settings.max_new_tokens,
                loader=loader,
                backend=settings.backend,
                dtype=settings.dtype,
                tp=settings.tp,
            )
        loaded = loader.generator is not None
        del loader
        gc.collect()  # the next checkpoint's model is not built next to this one
        yield entry, loaded


class _LoadOnce:
    """A checkpoint's generator, loaded on the first call and reused for the checkpoint's other benchmarks."""

    def __init__(self, checkpoint: Path, settings: GridSettings):
        self.checkpoint, self.settings = checkpoint, settings
        self.generator: Generator | None = None

    def __call__(self) -> Generator:
        if self.generator is None:
            s = self.settings
            self.generator = load_generator(self.checkpoint, s.backend, s.dtype, s.tp)
        return self.generator
