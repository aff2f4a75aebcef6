#!/usr/bin/env python
"""Console script megatron-ext-miniature-recipe run from a checkout (code: megatron_ext/cli/miniature_recipe.py)."""

from megatron_ext.cli.miniature_recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
