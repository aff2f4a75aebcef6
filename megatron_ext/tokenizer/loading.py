"""Open a `tekken.json` with mistral-common: the one place a tokenizer file is read for encoding, so a missing
or corrupt file is always reported with its path."""

from __future__ import annotations

from pathlib import Path

from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.errors import ProjectError


class TokenizerFileError(ProjectError, ValueError):
    """A tokenizer file is missing or cannot be parsed (the message names it)."""


def load_tekken(path: str | Path, mode: ValidationMode = ValidationMode.test) -> MistralTokenizer:
    """The MistralTokenizer of `path` (a tekken.json, or a checkpoint directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = resolve(path) / "tekken.json"
    if not path.is_file():
        raise TokenizerFileError(f"{path}: tokenizer file not found")
    try:
        return MistralTokenizer.from_file(str(path), mode=mode)
    except Exception as exc:  # mistral-common raises JSON, pydantic, key and value errors for bad files
        raise TokenizerFileError(
            f"{path}: cannot read tokenizer ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from None
