"""Layer specs of the three towers (decoder, Whisper encoder, projector), local and Transformer-Engine variants.

The backend is chosen in exactly one place, `resolve_backend`: "te" when CUDA and Transformer Engine are
present, else "local" (Megatron-Core modules; what runs on CPU). Transformer Engine is imported only
inside the TE branches, so CPU installs never touch it. Both variants produce the same checkpoint keys:
the local spec maps its norm names onto TE's fused `layer_norm_*` names in `sharded_state_dict`.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.config import ConfigError
from megatron_ext.models.decoder import QueryScaledSelfAttention

Backend = Literal["local", "te"]
# The local spec stores norms separately; checkpoints use TE's fused names (see module docstring).
LOCAL_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def te_available() -> bool:
    """CUDA and an installed Transformer Engine (checked without importing it)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(requested: Literal["auto", "local", "te"] = "auto") -> Backend:
    """'auto' -> 'te' when CUDA and Transformer Engine are present, else 'local'."""
    if requested == "auto":
        return "te" if te_available() else "local"
    if requested == "te" and not te_available():
        raise ConfigError("backend='te' needs CUDA and Transformer Engine (pip install -r requirements-gpu.txt)")
    if requested not in ("local", "te"):
        raise ConfigError(f"backend={requested!r}: expected auto, local or te")
    return requested


def decoder_layer_spec(backend: Backend) -> ModuleSpec:
    """Mistral decoder layer (RMSNorm, GQA, SwiGLU, causal) with llama-4 query-scaling-capable attention."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.module = QueryScaledSelfAttention
    return spec


def encoder_layer_spec(backend: Backend) -> ModuleSpec:
    """Whisper encoder layer: pre-LN LayerNorm (with bias), bidirectional MHA, GELU MLP, all with biases."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return _encoder_layer(
            IdentityOp, TELayerNormColumnParallelLinear, TEDotProductAttention, TERowParallelLinear, keys_map={}
        )
    return _encoder_layer(
        WrappedTorchNorm, ColumnParallelLinear, DotProductAttention, RowParallelLinear, keys_map=LOCAL_NORM_KEYS
    )


def _encoder_layer(norm, column, attention, row, keys_map: dict[str, str]) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=attention, linear_proj=row),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def projector_submodules(backend: Backend) -> MLPSubmodules:
    """Projector linear -> GELU -> linear (no biases; the activation comes from the projector config)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
