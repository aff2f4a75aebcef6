#!/usr/bin/env python
"""Console script megatron-ext-eval-grid run from a checkout (code: megatron_ext/cli/eval_grid.py)."""

from megatron_ext.cli.eval_grid import main

if __name__ == "__main__":
    raise SystemExit(main())
