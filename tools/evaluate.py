#!/usr/bin/env python
"""Console script megatron-ext-evaluate run from a checkout (code: megatron_ext/cli/evaluate.py)."""

from megatron_ext.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
