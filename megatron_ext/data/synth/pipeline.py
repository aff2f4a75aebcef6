"""Run the whole pipeline: validate, shard over worker processes, then pack, prepare and report."""

import ctypes
import json
import multiprocessing
import signal
import sys
from pathlib import Path

from megatron_ext.audio.tts import make_tts
from megatron_ext.audio.voices import VoicesError, load_voices
from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.data.synth.config import SynthConfig, claim_output
from megatron_ext.data.synth.conversation import parse_row
from megatron_ext.data.synth.convert import RowConverter
from megatron_ext.data.synth.errors import InputError, SynthError
from megatron_ext.data.synth.files import reserved
from megatron_ext.data.synth.judge import HttpJudge, RuleJudge
from megatron_ext.data.synth.report import build_report
from megatron_ext.data.synth.shards import ShardPaths, process_shard, read_rows
from megatron_ext.data.synth.webdataset import energon_prepare


def check_rows(path: Path) -> int:
    """Count rows; with the `fail` policy the first invalid row stops the run before any work."""
    count = 0
    for row, line in read_rows(path):
        parse_row(line, str(path), row)
        count = row
    return count


def count_rows(path: Path) -> int:
    """Number of input rows (lines)."""
    return sum(1 for _ in read_rows(path))


def shard_costs(path: Path, num_shards: int) -> list[int]:
    """Estimated TTS work per shard: the characters of its rows' user messages (an unparsable row
    counts its line length; the row itself is reported when its shard runs)."""
    costs = [0] * num_shards
    for row, line in read_rows(path):
        try:
            texts = [m.get("content") for m in parse_row(line, str(path), row)["messages"] if m["role"] == "user"]
            cost = sum(len(t) for t in texts if isinstance(t, str))
        except InputError:
            cost = len(line)
        costs[(row - 1) % num_shards] += cost
    return costs


def _work(cfg: SynthConfig, shards: list[int], total_rows: int, position: int) -> None:
    """Build this process's engines once, then finish each of its shards."""
    judge = HttpJudge(cfg.judge_endpoint, cfg.judge_model, cfg.retry) if cfg.judge_endpoint else RuleJudge()
    tts = make_tts(cfg.tts_engine, cfg.tts_endpoint, cfg.tts_model, cfg.retry)
    try:
        voices = load_voices(cfg.voices)[0] if tts.clones_voice else []
    except VoicesError as e:
        raise SynthError(str(e)) from None

    def make_converter(cache: dict) -> RowConverter:
        return RowConverter(str(cfg.input), judge, tts, voices, cfg.seed, cfg.max_chars, cache)

    for index in shards:
        paths = ShardPaths(cfg.output, index, cfg.num_shards)
        finished = process_shard(paths, cfg.input, total_rows, make_converter, cfg.concurrency, position)
        if not finished and cfg.shard is not None:  # within one run a sibling worker holding it is expected
            print(f"warning: shard {paths.tag} is reserved by another process; skipped", file=sys.stderr)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, so no orphan keeps a shard reserved."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(cfg: SynthConfig, shards: list[int], total_rows: int, position: int) -> None:
    _die_with_parent()
    try:
        _work(cfg, shards, total_rows, position)
    except SynthError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _run_workers(cfg: SynthConfig, shards: list[int], total_rows: int) -> None:
    """Run `shards` on `cfg.workers` forked processes; raise if any of them did not finish.

    Work stealing at shard granularity, largest first: every worker walks all shards in descending
    order of estimated TTS work (`shard_costs`) and takes whichever is neither reserved by a sibling nor
    done, so nobody idles while another still has a backlog, and the last shards taken are the shortest
    (rows differ a lot in TTS cost)."""
    if cfg.workers == 1 or len(shards) == 1:
        _work(cfg, shards, total_rows, 0)
        return
    ctx = multiprocessing.get_context("fork")  # the parent holds no threads or engines; children start warm
    costs = shard_costs(cfg.input, cfg.num_shards)
    order = sorted(shards, key=lambda s: -costs[s])
    procs = [
        ctx.Process(target=_worker_main, args=(cfg, order, total_rows, w)) for w in range(min(cfg.workers, len(shards)))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [f"worker {w} exit code {p.exitcode}" for w, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise SynthError(f"{'; '.join(failed)}; rerun the same command to resume")


def finalize(cfg: SynthConfig, total_rows: int) -> dict:
    """Write report.json; once every shard is complete, prepare the tar shards for Megatron-Energon."""
    with reserved(cfg.output / ".locks" / "finalize") as mine:
        report = build_report(cfg.output, cfg.num_shards, total_rows, cfg.identity())
        wds = cfg.output / "wds"
        report["energon_prepared"] = (wds / ".nv-meta" / "split.yaml").exists()
        ready = report["complete"] and any(wds.glob("*.tar")) and not report["energon_prepared"]
        if mine and ready and cfg.energon_prepare:
            energon_prepare(wds)
            report["energon_prepared"] = True
        if mine:
            write_atomic(cfg.output / "report.json", json.dumps(report, indent=1).encode())
    return report


def run(cfg: SynthConfig) -> dict:
    """Process (or resume) the configured shards and return the report; raises SynthError on bad input."""
    cfg.validate()
    try:
        total_rows = check_rows(cfg.input) if cfg.on_bad_row == "fail" else count_rows(cfg.input)
    except InputError as e:
        raise SynthError(f"{e} (--on-bad-row fail)") from None
    if total_rows == 0:
        raise SynthError(f"{cfg.input}: the input has no rows")
    claim_output(cfg)
    shards = [cfg.shard] if cfg.shard is not None else list(range(cfg.num_shards))
    _run_workers(cfg, shards, total_rows)
    return finalize(cfg, total_rows)
