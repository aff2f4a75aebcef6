"""Settings of one synth run, and the subset that must not change when a run is resumed."""

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.audio.tts import OFFLINE_ENGINES
from megatron_ext.audio.voices import DEFAULT_VOICES
from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.data.synth.errors import SynthError
from megatron_ext.http_client import RetryPolicy, endpoint_url

BAD_ROW_POLICIES = ("keep", "fail")
RUN_FILE = "run.json"


@dataclass(frozen=True)
class SynthConfig:
    """Everything the pipeline needs; `shard=None` means every shard of `num_shards`."""

    input: Path
    output: Path
    workers: int = 1
    num_shards: int = 1
    shard: int | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    tts_url: str | None = None
    tts_model: str | None = None
    tts_engine: str = "piper"
    voices: Path = DEFAULT_VOICES
    seed: int = 0
    concurrency: int = 4
    max_chars: int = 4000
    on_bad_row: str = "keep"
    energon_prepare: bool = True
    retry: RetryPolicy = RetryPolicy()

    @property
    def judge_endpoint(self) -> str | None:
        """The judge's base URL: --judge-url, else $OPENAI_BASE_URL when --judge-model is given; None: rules."""
        return endpoint_url(self.judge_url, self.judge_model)

    @property
    def tts_endpoint(self) -> str | None:
        """The TTS base URL: --tts-url, else $OPENAI_BASE_URL when --tts-model is given; None: offline engine."""
        return endpoint_url(self.tts_url, self.tts_model)

    def validate(self) -> None:
        """Raise SynthError (one line) for settings that cannot work."""
        if not self.input.is_file():
            raise SynthError(f"--input {self.input}: no such file")
        if self.workers < 1 or self.num_shards < 1 or self.concurrency < 1 or self.max_chars < 1:
            raise SynthError("--workers, --num-shards, --concurrency and --max-chars must be >= 1")
        if self.shard is not None and not 0 <= self.shard < self.num_shards:
            raise SynthError(f"--shard {self.shard}: must be in [0, {self.num_shards})")
        if self.judge_url and not self.judge_model:
            raise SynthError("--judge-url needs --judge-model")
        if self.tts_engine not in OFFLINE_ENGINES:
            raise SynthError(f"--tts-engine {self.tts_engine}: choose one of {', '.join(OFFLINE_ENGINES)}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise SynthError(f"--on-bad-row {self.on_bad_row}: choose one of {', '.join(BAD_ROW_POLICIES)}")

    def identity(self) -> dict:
        """Settings that decide the output bytes; a resumed run must use the same ones."""
        return {
            "input": str(self.input.resolve()),
            "num_shards": self.num_shards,
            "seed": self.seed,
            "judge": self.judge_model if self.judge_endpoint else "rules-v1",
            "tts": f"http:{self.tts_model or 'tts'}" if self.tts_endpoint else self.tts_engine,
            "voices": str(self.voices) if self.tts_endpoint else None,
            "max_chars": self.max_chars,
        }


def claim_output(cfg: SynthConfig) -> None:
    """Create the output directory and record the run identity, or refuse to mix in different settings."""
    cfg.output.mkdir(parents=True, exist_ok=True)
    path = cfg.output / RUN_FILE
    identity = cfg.identity()
    if not path.exists():
        write_atomic(path, json.dumps(identity, indent=1).encode())
        return
    recorded = json.loads(path.read_text())
    changed = [k for k in identity if recorded.get(k) != identity[k]]
    if changed:
        diffs = ", ".join(f"{k} was {recorded.get(k)!r} now {identity[k]!r}" for k in changed)
        raise SynthError(f"{cfg.output} holds a run with other settings ({diffs}); use a new --output")
