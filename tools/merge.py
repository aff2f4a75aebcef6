#!/usr/bin/env python
"""Console script megatron-ext-merge run from a checkout (code: megatron_ext/cli/merge.py)."""

from megatron_ext.cli.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
