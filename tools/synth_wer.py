#!/usr/bin/env python
"""Score the intelligibility of a synth output: faster-whisper tiny.en WER of the voiced user turns."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.data.synth.intelligibility import score_wer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("output", type=Path, help="a synth output directory (holds samples-*.jsonl)")
    files = sorted(p.parse_args().output.glob("samples-*.jsonl"))
    if not files:
        p.error("no samples-*.jsonl in that directory")
    print(json.dumps(score_wer(files), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
