#!/usr/bin/env python
"""Console script megatron-ext-voice-benchmark run from a checkout (code: megatron_ext/cli/voice_benchmark.py)."""

from megatron_ext.cli.voice_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
