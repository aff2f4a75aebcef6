"""Build Tekken tokenizer files (`tekken.json`) from a slice of the real vocabulary shipped in mistral-common.

The tiny parent models need real tokenizers with the parents' special-token layouts (Voxtral's audio
tokens, Devstral's tool-call tokens) but a small vocabulary; the first N BPE ranks of a byte-level BPE
vocabulary form a valid smaller BPE, so a slice keeps encoding real (just with shorter tokens).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mistral_common
import orjson

from megatron_ext.checkpoint.atomic import write_atomic

BUNDLED_VOCAB = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
NUM_SPECIAL_TOKENS = 1000
PLACEHOLDER = "<SPECIAL_{rank}>"

# Specials every Mistral tokenizer of this generation shares (rank -> token).
COMMON_SPECIALS: dict[int, str] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
}
VOXTRAL_SPECIALS: dict[int, str] = {24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 34: "[TRANSCRIBE]"}
DEVSTRAL_SPECIALS: dict[int, str] = {32: "[ARGS]", 33: "[CALL_ID]"}

# Whisper log-mel front-end as Voxtral's tokenizer declares it: 16 kHz, 12.5 audio tokens/s, 30 s chunks.
VOXTRAL_AUDIO: dict[str, Any] = {
    "sampling_rate": 16000,
    "frame_rate": 12.5,
    "chunk_length_s": 30.0,
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
}


@dataclass(frozen=True)
class TekkenSpec:
    """What goes into one tokenizer file: vocab size, named specials by rank, optional audio section."""

    vocab_size: int
    specials: dict[int, str]
    version: str = "v11"
    audio: dict[str, Any] | None = None


def voxtral_spec(vocab_size: int) -> TekkenSpec:
    return TekkenSpec(vocab_size, {**COMMON_SPECIALS, **VOXTRAL_SPECIALS}, version="v7", audio=VOXTRAL_AUDIO)


def devstral_spec(vocab_size: int) -> TekkenSpec:
    return TekkenSpec(vocab_size, {**COMMON_SPECIALS, **DEVSTRAL_SPECIALS}, version="v11")


def special_token_list(specials: dict[int, str]) -> list[dict[str, Any]]:
    """All 1000 special ranks in order, unnamed ranks filled with mistral-common's placeholder names."""
    bad = [r for r in specials if not 0 <= r < NUM_SPECIAL_TOKENS]
    if bad:
        raise ValueError(f"special token ranks out of range [0, {NUM_SPECIAL_TOKENS}): {bad}")
    return [
        {"rank": r, "token_str": specials.get(r, PLACEHOLDER.format(rank=r)), "is_control": True}
        for r in range(NUM_SPECIAL_TOKENS)
    ]


def build_tekken(spec: TekkenSpec, regular: list[bytes] | None = None) -> dict[str, Any]:
    """The `tekken.json` content for `spec`. Regular vocabulary: `regular` (token bytes in rank order, the 256
    single bytes first, then BPE merges, e.g. trained on a corpus), else the first ranks of the bundled real one."""
    n_regular = spec.vocab_size - NUM_SPECIAL_TOKENS
    if n_regular < 256:
        need = NUM_SPECIAL_TOKENS + 256
        raise ValueError(f"vocab_size={spec.vocab_size}: need >= {need} (1000 specials + 256 byte tokens)")
    real = json.loads(BUNDLED_VOCAB.read_text(encoding="utf-8"))
    if regular is not None:
        if len(regular) != n_regular or regular[:256] != [bytes([b]) for b in range(256)]:
            raise ValueError(f"regular vocabulary: expected {n_regular} tokens starting with the 256 single bytes")
        real["vocab"] = [_vocab_entry(rank, token) for rank, token in enumerate(regular)]
    data: dict[str, Any] = {
        "config": {
            "pattern": real["config"]["pattern"],
            "num_vocab_tokens": n_regular,
            "default_vocab_size": spec.vocab_size,
            "default_num_special_tokens": NUM_SPECIAL_TOKENS,
            "version": spec.version,
        },
        "vocab": real["vocab"][:n_regular],
        "special_tokens": special_token_list(spec.specials),
    }
    if spec.audio is not None:
        data["audio"] = spec.audio
    return data


def _vocab_entry(rank: int, token: bytes) -> dict[str, Any]:
    """One `vocab` row as tekken files hold it (`token_str` is None where the bytes are not UTF-8)."""
    try:
        text: str | None = token.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"rank": rank, "token_bytes": base64.b64encode(token).decode("ascii"), "token_str": text}


def write_tekken(data: dict[str, Any], path: Path) -> None:
    """Write deterministically (sorted keys are not used: mistral-common keeps file order) as compact UTF-8
    JSON: `json.dumps(ensure_ascii=False, separators=(",", ":"))`'s bytes, 10x faster (0.02 s for 8 MB)."""
    write_atomic(path, orjson.dumps(data))
