"""Which tensors are decoder, token embedding, LM head or audio stack, in HF and Megatron naming.

A merge pairs Devstral's and Voxtral's tensors by a layout-free key (the name minus the decoder prefix),
so `model.layers.0...` (MistralForCausalLM) meets `language_model.model.layers.0...` (Voxtral).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Role = Literal["embedding", "lm_head", "decoder", "audio", "other"]

# (prefix, embedding, lm head) per naming scheme; the longest matching prefix wins.
_DECODER_LAYOUTS = (
    ("language_model.model.", "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"),
    ("language_model.", "language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"),
    ("model.", "model.embed_tokens.weight", "lm_head.weight"),
)
AUDIO_PREFIXES = ("audio_tower.", "multi_modal_projector.", "audio_encoder.", "audio_projector.")
EMBEDDING_KEY, LM_HEAD_KEY = "<embedding>", "<lm_head>"
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    role: Role
    key: str  # layout-free pairing key
    layer: int | None = None
    is_mlp: bool = False


def classify(name: str) -> TensorInfo:
    """Role and pairing key of one tensor name (HF Voxtral/Mistral or Megatron `AudioLanguageModel`)."""
    if name.startswith(AUDIO_PREFIXES):
        return TensorInfo("audio", name)
    for prefix, embedding, head in _DECODER_LAYOUTS:
        if name == embedding:
            return TensorInfo("embedding", EMBEDDING_KEY)
        if name == head:
            return TensorInfo("lm_head", LM_HEAD_KEY)
        if name.startswith(prefix):
            key = name.removeprefix(prefix)
            m = _LAYER.search(key)
            return TensorInfo("decoder", key, int(m.group(1)) if m else None, ".mlp." in f".{key}")
    return TensorInfo("other", name)


def num_layers(names: list[str]) -> int:
    """Decoder layer count seen in a tensor list (max index + 1)."""
    layers = [classify(n).layer for n in names]
    return max((i for i in layers if i is not None), default=-1) + 1
