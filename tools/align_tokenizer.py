#!/usr/bin/env python
"""Console script megatron-ext-align-tokenizer run from a checkout (code: megatron_ext/cli/align_tokenizer.py)."""

from megatron_ext.cli.align_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())
