#!/usr/bin/env python
"""Console script megatron-ext-convert-benchmark run from a checkout (code: megatron_ext/cli/convert_benchmark.py)."""

from megatron_ext.cli.convert_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
