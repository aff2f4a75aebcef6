"""Turn coding trajectories (OpenAI chat JSONL) into spoken-instruction samples: judge -> TTS -> shards.

With no --judge-url / --tts-url the offline rule judge and offline TTS engine are used. Re-running the
same command resumes. Outputs: DIR/samples-*.jsonl, DIR/judgments-*.jsonl, DIR/wds/*.tar (+ .nv-meta),
DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_ext.audio.tts import OFFLINE_ENGINES
from megatron_ext.audio.voices import DEFAULT_VOICES
from megatron_ext.cli._errors import error_policy
from megatron_ext.data.synth.config import BAD_ROW_POLICIES, SynthConfig
from megatron_ext.data.synth.pipeline import run
from megatron_ext.http_client import RetryPolicy


def parse_args(argv: list[str] | None = None) -> SynthConfig:
    """The pipeline's settings from the command line (endpoints, TTS engine, sharding, retries)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="JSONL trajectories in OpenAI chat format")
    p.add_argument("--output", type=Path, required=True, help="output directory (resumed if it exists)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--num-shards", type=int, help="row-wise shards in total (default: --workers)")
    p.add_argument("--shard", type=int, help="process only this shard (SLURM array task / torchrun rank)")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1 (default: rules)")
    p.add_argument("--judge-model", help="judge model name (required with --judge-url)")
    p.add_argument("--tts-url", help="base URL serving POST /audio/speech with voice cloning")
    p.add_argument("--tts-model", help="TTS model name for --tts-url")
    p.add_argument("--tts-engine", choices=OFFLINE_ENGINES, default="piper", help="offline TTS engine")
    p.add_argument("--voices", type=Path, default=DEFAULT_VOICES, help="reference clips (*.wav + transcripts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-turn reference-voice choice")
    p.add_argument("--concurrency", type=int, default=4, help="rows in flight per worker (network calls)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=3, help="retries per HTTP request (exponential backoff)")
    p.add_argument("--max-chars", type=int, default=4000, help="longer user messages stay text")
    p.add_argument(
        "--on-bad-row",
        choices=BAD_ROW_POLICIES,
        default="keep",
        help="keep: invalid rows are logged and kept raw; fail: stop at the first one",
    )
    p.add_argument(
        "--skip-energon-prepare",
        action="store_true",
        help="do not run `energon prepare` on DIR/wds when all shards are done",
    )
    a = p.parse_args(argv)
    return SynthConfig(
        input=a.input,
        output=a.output,
        workers=a.workers,
        num_shards=a.num_shards or a.workers,
        shard=a.shard,
        judge_url=a.judge_url,
        judge_model=a.judge_model,
        tts_url=a.tts_url,
        tts_model=a.tts_model,
        tts_engine=a.tts_engine,
        voices=a.voices,
        seed=a.seed,
        concurrency=a.concurrency,
        max_chars=a.max_chars,
        on_bad_row=a.on_bad_row,
        energon_prepare=not a.skip_energon_prepare,
        retry=RetryPolicy(timeout_s=a.timeout, retries=a.retries),
    )


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-synth-audio: run (or resume) the pipeline; exit 1 while rows remain to be done."""
    cfg = parse_args(argv)
    report = run(cfg)
    summary = {k: report[k] for k in ("rows", "rows_done", "complete", "decisions", "voiced", "tts_failures")}
    print(json.dumps(summary))
    print(f"report: {cfg.output / 'report.json'}")
    return 0 if report["complete"] else 1
