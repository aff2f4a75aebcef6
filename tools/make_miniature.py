#!/usr/bin/env python
"""Console script megatron-ext-make-miniature run from a checkout (code: megatron_ext/cli/make_miniature.py)."""

from megatron_ext.cli.make_miniature import main

if __name__ == "__main__":
    raise SystemExit(main())
