#!/usr/bin/env python
"""Console script megatron-ext-serve run from a checkout (code: megatron_ext/cli/serve.py)."""

from megatron_ext.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
