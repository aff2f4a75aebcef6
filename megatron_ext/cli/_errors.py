"""The CLI error policy, implemented once: the user's mistakes are one `error:` line, the program's keep a traceback.

ProjectError (bad input or settings), OSError (missing, unreadable or unwritable paths), ValueError
(json.JSONDecodeError and pydantic's ValidationError included) and a YAML file that does not parse print one
line to stderr and exit 2. Anything else, e.g. a RuntimeError from a CUDA OOM or an NCCL timeout at step 10k,
propagates with its full traceback (exit 1).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import yaml

from megatron_ext.errors import ProjectError

USER_ERRORS = (ProjectError, OSError, ValueError, yaml.YAMLError)
USER_ERROR_EXIT = 2


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a multi-line message is joined), or its type when it has none."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def error_policy(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a tool's `main(argv)`: returns its exit code, or 2 after printing `error: ...` for a user error."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except USER_ERRORS as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return USER_ERROR_EXIT

    return wrapped
