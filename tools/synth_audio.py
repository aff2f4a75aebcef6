#!/usr/bin/env python
"""Console script megatron-ext-synth-audio run from a checkout (code: megatron_ext/cli/synth_audio.py)."""

from megatron_ext.cli.synth_audio import main

if __name__ == "__main__":
    raise SystemExit(main())
