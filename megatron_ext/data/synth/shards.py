"""Stage 3: row-wise sharding and the resumable, exactly-once writer of one shard.

Row r (1-based input line) belongs to shard (r - 1) % num_shards. A shard is reserved with a kernel
lock (two processes never write the same files), resumes after its last complete JSONL line (a torn
line is cut), reuses logged judgments, and ends by fsyncing its logs, packing its tar and writing
`completions/SHARD` (both with `checkpoint.atomic.write_atomic`: fsynced, renamed, directory fsynced).
"""

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from megatron_ext.checkpoint.atomic import fsync_dir, write_atomic
from megatron_ext.data.synth.convert import Converted, RowConverter
from megatron_ext.data.synth.files import dumps_line, read_jsonl, repair_jsonl, reserved
from megatron_ext.data.synth.webdataset import write_tar


@dataclass(frozen=True)
class ShardPaths:
    """Where shard `index` of `count` writes (names documented in the package docstring)."""

    root: Path
    index: int
    count: int

    @property
    def tag(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    @property
    def samples(self) -> Path:
        return self.root / f"samples-{self.tag}.jsonl"

    @property
    def judgments(self) -> Path:
        return self.root / f"judgments-{self.tag}.jsonl"

    @property
    def tar(self) -> Path:
        return self.root / "wds" / f"shard-{self.tag}.tar"

    @property
    def done(self) -> Path:
        return self.root / "completions" / self.tag

    @property
    def lock(self) -> Path:
        return self.root / ".locks" / self.tag


def read_rows(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based row, line without its newline) for every line of the input, blank ones included."""
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for row, line in enumerate(f, start=1):
            yield row, line.rstrip("\n")


def shard_rows(path: Path, index: int, count: int) -> Iterator[tuple[int, str]]:
    """The rows of shard `index` of `count`, in input order."""
    return ((row, line) for row, line in read_rows(path) if (row - 1) % count == index)


def shard_size(total_rows: int, index: int, count: int) -> int:
    """How many of `total_rows` rows fall into shard `index` of `count`."""
    return len(range(index, total_rows, count))


def ordered_map(fn: Callable[..., Converted], items: Iterable[tuple], concurrency: int) -> Iterator[Converted]:
    """`fn(*item)` for each item, run on `concurrency` threads, yielded in input order."""
    if concurrency == 1:
        yield from (fn(*item) for item in items)
        return
    with ThreadPoolExecutor(concurrency) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= 2 * concurrency:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def process_shard(
    paths: ShardPaths,
    input_path: Path,
    total_rows: int,
    make_converter: Callable[[dict], RowConverter],
    concurrency: int,
    position: int = 0,
) -> bool:
    """Finish one shard (resuming if needed); False if another process holds it."""
    with reserved(paths.lock) as mine:
        if not mine:
            return False
        if paths.done.exists():
            return True
        done = repair_jsonl(paths.samples)
        repair_jsonl(paths.judgments)
        cache = {(j["row"], j["message"]): j for j in read_jsonl(paths.judgments)}
        converter = make_converter(cache)
        todo = islice(shard_rows(input_path, paths.index, paths.count), done, None)
        size = shard_size(total_rows, paths.index, paths.count)
        with (
            open(paths.samples, "a", encoding="utf-8") as samples,
            open(paths.judgments, "a", encoding="utf-8") as judgments,
            tqdm(
                total=size,
                initial=done,
                desc=f"shard {paths.tag}",
                unit="row",
                position=position,
                leave=False,
                file=sys.stderr,
            ) as bar,
        ):
            for result in ordered_map(converter.convert, todo, concurrency):
                if result.warning:
                    bar.write(f"warning: {result.warning} (row kept as raw text, not packed)", file=sys.stderr)
                judgments.writelines(dumps_line(j) for j in result.judgments)
                judgments.flush()
                samples.write(dumps_line(result.sample))
                samples.flush()
                bar.update()
            for f in (judgments, samples):  # durable before the tar and the done marker vouch for them
                os.fsync(f.fileno())
        fsync_dir(paths.root)
        write_tar(paths.samples, paths.tar)
        paths.done.parent.mkdir(exist_ok=True)
        write_atomic(paths.done, b"")
        return True
