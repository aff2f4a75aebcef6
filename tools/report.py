#!/usr/bin/env python
"""Console script megatron-ext-report run from a checkout (code: megatron_ext/cli/report.py)."""

from megatron_ext.cli.report import main

if __name__ == "__main__":
    raise SystemExit(main())
