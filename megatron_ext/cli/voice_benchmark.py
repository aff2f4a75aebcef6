"""Voice a text benchmark through the data pipeline's TTS, writing its spoken version (e.g. MMLU Audio).

  voice_benchmark.py mmlu_audio --data mmlu_text.jsonl --output build/eval/mmlu_audio.jsonl --engine espeak

BENCH is the spoken benchmark to produce (fleurs, librispeech, llama_questions, mmlu_audio); --data holds
its fields without audio. WAVs go to OUTPUT_STEM_audio/ beside the output (reused on rerun).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.audio.tts import OFFLINE_ENGINES, make_tts
from megatron_ext.audio.voices import load_voices
from megatron_ext.cli._errors import error_policy
from megatron_ext.eval.benchmarks import BENCHMARKS
from megatron_ext.eval.voice import voice_benchmark
from megatron_ext.http_client import RetryPolicy


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-voice-benchmark: voice every sample of a text benchmark, write the spoken JSONL."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "bench",
        choices=[n for n, b in BENCHMARKS.items() if b.needs_audio],
        metavar="BENCH",
        help="spoken benchmark to produce: %(choices)s",
    )
    p.add_argument("--data", type=Path, required=True, help="text benchmark JSONL (the same fields, no audio)")
    p.add_argument("--output", type=Path, required=True, help="spoken benchmark JSONL to write")
    p.add_argument("--engine", choices=OFFLINE_ENGINES, default="espeak", help="offline TTS engine")
    p.add_argument("--tts-url", help="base URL serving POST /audio/speech (voice cloning) instead of --engine")
    p.add_argument("--tts-model", help="TTS model name for --tts-url")
    p.add_argument("--voices", type=Path, help="reference clips for cloning with --tts-url (*.wav + transcripts)")
    p.add_argument("--inline", action="store_true", help="embed audio as audio_b64 instead of WAV paths")
    args = p.parse_args(argv)
    tts = make_tts(args.engine, args.tts_url, args.tts_model, RetryPolicy())
    voices = load_voices(args.voices)[0] if args.voices else None
    count = voice_benchmark(args.bench, args.data, args.output, tts, voices=voices, inline=args.inline)
    print(f"{args.output}: {count} spoken {args.bench} samples ({tts.name})")
    return 0
