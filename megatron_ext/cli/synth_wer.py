"""Score the intelligibility of a synth output: faster-whisper tiny.en WER of the voiced user turns."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.data.synth.intelligibility import score_wer


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-synth-wer: print the WER summary of a synth output's samples as JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("output", type=Path, help="a synth output directory (holds samples-*.jsonl)")
    files = sorted(p.parse_args(argv).output.glob("samples-*.jsonl"))
    if not files:
        p.error("no samples-*.jsonl in that directory")
    print(json.dumps(score_wer(files), indent=1))
    return 0
