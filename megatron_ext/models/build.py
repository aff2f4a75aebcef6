"""Build `AudioLanguageModel` from a `ModelConfig` plus run-time settings (`BuildConfig`).

`build_model` refuses layouts the model cannot run with `parallel_layout.validate_parallelism`, which tools
also call before torch.distributed starts (it only needs the sizes).

Megatron-Core 0.16's local parallel layers (`ColumnParallelLinear`, `RowParallelLinear`,
`VocabParallelEmbedding`) tag their weight `tensor_model_parallel` only inside the random init, so with
`init_weights=False` (weights loaded right after) the tag is missing. The optimizer's grad norm then takes
those weights for TP replicas and counts only TP rank 0's shard: a TP>1 norm too small, and clipping at the
wrong threshold. `_tag_tensor_parallel_weights` sets the tags the init would have set.

`BuildConfig.encoder_parallel="replicate"` builds the whole Whisper encoder on every TP rank (its layers get a
tensor-parallel group of this rank alone), so TP may exceed the encoder's head count (20 for Whisper-large:
TP=8 for the decoder's 8 KV groups). It reads the same full tensors from the checkpoint; being frozen, it has
no gradients and no optimizer state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.models.audio_lm import AudioLanguageModel
from megatron_ext.models.decoder import DecoderModel, rope_config_attributes
from megatron_ext.models.projector import AudioProjector
from megatron_ext.models.specs import (
    decoder_layer_spec,
    encoder_layer_spec,
    projector_submodules,
    resolve_backend,
)
from megatron_ext.models.whisper_encoder import WhisperEncoder
from megatron_ext.parallel_layout import validate_parallelism

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FP8Config:
    """Transformer Engine FP8 for the decoder's linears (encoder/projector stay BF16). 'tensorwise' is
    Megatron's name for current scaling."""

    format: Literal["hybrid", "e4m3"] = "hybrid"
    recipe: Literal["delayed", "tensorwise"] = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("hybrid", "e4m3"):
            raise ConfigError(f"fp8.format={self.format!r}: allowed hybrid, e4m3")
        if self.recipe not in ("delayed", "tensorwise"):
            raise ConfigError(f"fp8.recipe={self.recipe!r}: allowed delayed, tensorwise (current scaling)")
        if self.amax_history_len < 1 or self.margin < 0:
            raise ConfigError("fp8.amax_history_len must be >= 1 and fp8.margin >= 0")


@dataclass(frozen=True)
class BuildConfig:
    """How to instantiate the model: backend, precision, parallel features, freezing, recompute."""

    backend: Literal["auto", "local", "te"] = "auto"
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    sequence_parallel: bool = False
    with_audio: bool = True  # False builds a Voxtral checkpoint's decoder alone (text-only)
    freeze_encoder: bool = True
    freeze_projector: bool = False
    fp8: FP8Config | None = None
    init_weights: bool = True  # False skips random init (weights are loaded right after)
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_num_layers: int = 1
    gradient_accumulation_fusion: bool = False
    parallel_output: bool = True  # logits stay vocab-sharded over TP (training); tools gather at run time
    encoder_parallel: Literal["split", "replicate"] = "split"  # encoder heads over TP ranks | whole on each
    extra: dict = field(default_factory=dict)  # further TransformerConfig fields for the decoder


def _common(build: BuildConfig, tp: int, pp: int, cp: int) -> dict:
    dtype = DTYPES[build.params_dtype]
    return dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=build.init_weights,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=build.gradient_accumulation_fusion,
    )


def decoder_transformer_config(
    cfg: ModelConfig, build: BuildConfig, tp: int, pp: int, cp: int, backend: str
) -> TransformerConfig:
    """Mistral decoder: RMSNorm, GQA, SwiGLU, no biases; YaRN attributes and FP8 settings attached."""
    d = cfg.decoder
    fp8 = build.fp8
    if fp8 is not None and backend != "te":
        log.warning("FP8 is off: the local (CPU) spec ignores FP8 settings; it needs the Transformer Engine spec")
        fp8 = None
    fp8_fields = (
        {}
        if fp8 is None
        else dict(
            fp8=fp8.format,
            fp8_recipe=fp8.recipe,
            fp8_amax_history_len=fp8.amax_history_len,
            fp8_amax_compute_algo=fp8.amax_compute_algo,
            fp8_margin=fp8.margin,
        )
    )
    recompute = (
        {}
        if build.recompute_granularity is None
        else dict(
            recompute_granularity=build.recompute_granularity,
            **(
                {"recompute_method": "uniform", "recompute_num_layers": build.recompute_num_layers}
                if build.recompute_granularity == "full"
                else {}
            ),
        )
    )
    tc = TransformerConfig(
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        ffn_hidden_size=d.ffn_hidden_size,
        num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups,
        kv_channels=d.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=d.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_interleaved=False,
        sequence_parallel=build.sequence_parallel and tp > 1,
        **_common(build, tp, pp, cp),
        **fp8_fields,
        **recompute,
        **build.extra,
    )
    for key, value in rope_config_attributes(d.rope).items():
        setattr(tc, key, value)  # read by GPTModel and the attention, not declared by TransformerConfig 0.16
    return tc


def encoder_transformer_config(cfg: ModelConfig, build: BuildConfig, tp: int) -> TransformerConfig:
    """Whisper encoder: LayerNorm with bias, MHA with biases, exact GELU; not pipelined, no SP/CP, no FP8."""
    e = cfg.encoder
    assert e is not None
    return TransformerConfig(
        num_layers=e.num_layers,
        hidden_size=e.hidden_size,
        ffn_hidden_size=e.ffn_hidden_size,
        num_attention_heads=e.num_attention_heads,
        num_query_groups=e.num_attention_heads,
        kv_channels=e.hidden_size // e.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=e.norm_eps,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        sequence_parallel=False,
        **_common(build, tp, 1, 1),
    )


def projector_transformer_config(cfg: ModelConfig, build: BuildConfig, tp: int) -> TransformerConfig:
    """Projector MLP: decoder-width linear -> GELU -> linear, no biases (num_layers/heads are unused)."""
    h = cfg.decoder.hidden_size
    return TransformerConfig(
        num_layers=1,
        hidden_size=h,
        ffn_hidden_size=h,
        num_attention_heads=cfg.decoder.num_attention_heads,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=False,
        sequence_parallel=False,
        **_common(build, tp, 1, 1),
    )


_PARTITION_DIM = ((ColumnParallelLinear, 0), (VocabParallelEmbedding, 0), (RowParallelLinear, 1))


def _tag_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Mark the local parallel layers' weights as TP-sharded along their split dimension, with the stride Megatron's
    init would record (2 for a gated MLP's fc1: [gate, up] per rank), so grad norm and clipping see every shard."""
    gated_fc1 = {id(m.linear_fc1) for m in model.modules() if isinstance(m, MLP) and m.config.gated_linear_unit}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        for layer, dim in _PARTITION_DIM:
            if isinstance(module, layer) and weight is not None and not hasattr(weight, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(weight, True, dim, 2 if id(module) in gated_fc1 else 1)


def replicated_encoder_groups() -> ProcessGroupCollection:
    """Megatron's process groups with a tensor-parallel group of this rank alone, for a replicated encoder.

    Collective: every rank of the world calls it (each builds all the one-rank groups), whatever its stage."""
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.tp, _ = dist.new_subgroups(group_size=1)
    return groups


def build_model(
    cfg: ModelConfig,
    build: BuildConfig | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> AudioLanguageModel:
    """The model for this rank (parallel_state must be initialised; see compat.cpu.init_distributed)."""
    build = build or BuildConfig()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    backend = resolve_backend(build.backend)
    validate_parallelism(cfg, tp, cp, pp, build.with_audio, backend, build.encoder_parallel)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)

    dec_tc = decoder_transformer_config(cfg, build, tp, pp, cp, backend)
    rope = cfg.decoder.rope
    language_model = DecoderModel(
        dec_tc,
        decoder_layer_spec(backend),
        vocab_size=cfg.decoder.vocab_size,
        max_sequence_length=cfg.decoder.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=build.parallel_output,
        share_embeddings_and_output_weights=False,
        position_embedding_type="yarn" if rope.type == "yarn" else "rope",
        rotary_base=rope.theta,
        scatter_embedding_sequence_parallel=False,
        vp_stage=vp_stage,
    )
    encoder = projector = None
    with_encoder = cfg.encoder is not None and build.with_audio
    replicate = with_encoder and build.encoder_parallel == "replicate" and tp > 1
    if replicate and not build.freeze_encoder:
        raise ConfigError(
            "encoder_parallel=replicate needs freeze_encoder: a trainable copy per TP rank would need its "
            "gradients reduced over TP"
        )
    encoder_groups = replicated_encoder_groups() if replicate else None  # collective: before the stage test
    if with_encoder and pre_process:
        encoder = WhisperEncoder(
            encoder_transformer_config(cfg, build, 1 if replicate else tp),
            encoder_layer_spec(backend),
            cfg.encoder,
            encoder_groups,
        )
        projector = AudioProjector(
            projector_transformer_config(cfg, build, tp),
            projector_submodules(backend),
            cfg.encoder.hidden_size,
            cfg.projector_stack,
        )
    model = AudioLanguageModel(
        dec_tc,
        language_model,
        encoder,
        projector,
        cfg.audio_token_id if build.with_audio else None,
        freeze_encoder=build.freeze_encoder,
        freeze_projector=build.freeze_projector,
    )
    model.backend = backend
    if not build.init_weights:
        _tag_tensor_parallel_weights(model)
    return model
