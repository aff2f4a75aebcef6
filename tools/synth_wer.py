#!/usr/bin/env python
"""Console script megatron-ext-synth-wer run from a checkout (code: megatron_ext/cli/synth_wer.py)."""

from megatron_ext.cli.synth_wer import main

if __name__ == "__main__":
    raise SystemExit(main())
