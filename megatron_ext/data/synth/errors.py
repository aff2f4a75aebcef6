"""Errors the synth pipeline reports to its user as one line (the CLI turns them into exit code 2).
A judge or TTS endpoint that keeps failing raises `megatron_ext.http_client.EndpointError`."""

from megatron_ext.errors import ProjectError


class SynthError(ProjectError):
    """A problem with the input, the settings or the output directory; the message is one line."""


class InputError(SynthError):
    """An input row violates the documented format; the message names file, row and field."""

    def __init__(self, path: str, row: int, field: str, message: str):
        self.path, self.row, self.field, self.reason = path, row, field, message
        super().__init__(f"{path}:{row}: {field}: {message}")
