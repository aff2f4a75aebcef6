"""Special token ids the model needs, read from the checkpoint's tokenizer (never hard-coded)."""

from __future__ import annotations

from pathlib import Path

from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.tokenizer.loading import load_tekken


def audio_token_id(tekken_path: str | Path) -> int:
    """Id of `[AUDIO]` in a tekken.json (mistral-common); ConfigError if the tokenizer has none."""
    tokenizer = load_tekken(tekken_path).instruct_tokenizer.tokenizer
    try:
        return int(tokenizer.get_special_token("[AUDIO]"))
    except ValueError:
        raise ConfigError(f"{tekken_path}: tokenizer has no [AUDIO] special token") from None


def check_audio_token(cfg: ModelConfig, tekken_path: str | Path) -> ModelConfig:
    """The config with its audio_token_id confirmed by the tokenizer (error naming both on a mismatch)."""
    if cfg.encoder is None:
        return cfg
    token = audio_token_id(tekken_path)
    if cfg.audio_token_id != token:
        raise ConfigError(f"audio_token_id={cfg.audio_token_id} in the config but [AUDIO] is {token} in {tekken_path}")
    return cfg
