#!/usr/bin/env python
"""Console script megatron-ext-make-tiny-chats run from a checkout (code: megatron_ext/cli/make_tiny_chats.py)."""

from megatron_ext.cli.make_tiny_chats import main

if __name__ == "__main__":
    raise SystemExit(main())
