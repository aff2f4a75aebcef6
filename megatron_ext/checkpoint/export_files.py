"""The files an export carries beside its weights, so that its consumer loads it as published models load.

HF: `generation_config.json` (as transformers' Voxtral/Mistral converters write it) and, for Voxtral,
`preprocessor_config.json` (WhisperFeatureExtractor + `processor_class` VoxtralProcessor; the tokenizer is
`tekken.json`, read by mistral-common). Mistral-native: the audio front-end settings for `params.json`, taken
from the `audio` section of the checkpoint's `tekken.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.mistral_native import audio_encoding_args
from megatron_ext.config import ConfigError, ModelConfig

# Token ids of every Tekken tokenizer of the family (bos, eos, pad), as the published generation configs hold.
BOS_ID, EOS_ID, PAD_ID = 1, 2, 11


def tekken_audio(tokenizer: Path | None) -> dict[str, Any] | None:
    """The `audio` section of a tekken.json (None when there is no file or no section)."""
    if tokenizer is None:
        return None
    try:
        return json.loads(tokenizer.read_bytes()).get("audio")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{tokenizer}: not a tekken.json object ({exc})") from None


def require_audio(cfg: ModelConfig, tokenizer: Path | None, directory: Path) -> dict[str, Any] | None:
    """The audio section an audio model's export needs, or one line saying how to supply it."""
    if cfg.encoder is None:
        return None
    audio = tekken_audio(tokenizer)
    try:
        audio_encoding_args(audio)
    except ConfigError as exc:
        raise CheckpointError(
            f"{directory}: {exc}; the audio front-end settings (sampling_rate, audio_encoding_config"
            "{num_mel_bins, hop_length, window_size}) come from Voxtral's tekken.json: copy it (or the merge's "
            "aligned tekken.json, which keeps Voxtral's audio section) into the checkpoint directory"
        ) from None
    return audio


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """`generation_config.json`: special ids and the longest sequence the decoder was configured for."""
    return {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "max_length": cfg.decoder.max_position_embeddings,
        "pad_token_id": PAD_ID,
    }


def preprocessor_config(audio: dict[str, Any]) -> dict[str, Any]:
    """Voxtral's `preprocessor_config.json`: the Whisper log-mel front-end of the tokenizer's audio section."""
    enc = audio["audio_encoding_config"]
    rate, hop = audio["sampling_rate"], enc["hop_length"]
    chunk = int(audio["chunk_length_s"])
    return {
        "chunk_length": chunk,
        "dither": 0.0,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": enc["num_mel_bins"],
        "hop_length": hop,
        "n_fft": enc["window_size"],
        "n_samples": chunk * rate,
        "nb_max_frames": chunk * rate // hop,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "VoxtralProcessor",
        "return_attention_mask": False,
        "sampling_rate": rate,
    }


def write_hf_files(directory: Path, cfg: ModelConfig, audio: dict[str, Any] | None) -> None:
    """generation_config.json, and for Voxtral preprocessor_config.json, into an HF export."""
    _write_json(directory / "generation_config.json", generation_config(cfg))
    if cfg.hf_architecture == "voxtral" and audio is not None:
        _write_json(directory / "preprocessor_config.json", preprocessor_config(audio))


def hf_config_or_refusal(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg.to_hf()`, or one line naming the Mistral-native export for models the HF layout cannot hold."""
    try:
        return cfg.to_hf()
    except ConfigError as exc:
        raise CheckpointError(
            f"cannot express this model as HF {cfg.hf_architecture}: {exc}; export it Mistral-native instead "
            "(convert --to mistral, merge --format mistral), which vLLM serves"
        ) from None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
