#!/usr/bin/env python
"""Console script megatron-ext-convert run from a checkout (code: megatron_ext/cli/convert.py)."""

from megatron_ext.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
