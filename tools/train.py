#!/usr/bin/env python
"""Console script megatron-ext-train run from a checkout (code: megatron_ext/cli/train.py)."""

from megatron_ext.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
