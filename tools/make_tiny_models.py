#!/usr/bin/env python
"""Console script megatron-ext-make-tiny-models run from a checkout (code: megatron_ext/cli/make_tiny_models.py)."""

from megatron_ext.cli.make_tiny_models import main

if __name__ == "__main__":
    raise SystemExit(main())
