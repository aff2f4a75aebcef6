#!/usr/bin/env python
"""Console script megatron-ext-logits run from a checkout (code: megatron_ext/cli/logits.py)."""

from megatron_ext.cli.logits import main

if __name__ == "__main__":
    raise SystemExit(main())
