"""The project's base error, at the bottom of the import graph so every package can raise it."""


class ProjectError(Exception):
    """Bad input or settings the user can fix; the CLIs print it as one `error:` line (exit 2), no traceback."""
