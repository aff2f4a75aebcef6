"""HF <-> Megatron-Core state-dict names: declarative tables, `{i}` layer wildcards, named transforms.

Megatron names are the full (unsharded, TP-agnostic) keys of `AudioLanguageModel` in Transformer-Engine
naming (the local spec maps its norm keys onto them in `sharded_state_dict`). HF names follow
`cfg.hf_architecture` (voxtral: `language_model.model.*`, `audio_tower.*`, `multi_modal_projector.*`;
mistral/ministral3: `model.*`, `lm_head.weight`).

Transforms that are not a plain rename have names: `fuse_qkv` (GQA order: per group g,
[q heads g*r..g*r+r-1, k_g, v_g]; Whisper's MHA is the case groups == heads), `fuse_qkv_bias_zero_k`
(Whisper's k_proj has no bias: zero rows in the fused bias; dropping them on the way back is exact
because a per-key constant cancels in softmax), `concat_gate_up` ([gate; up] of SwiGLU fc1).

Both directions stream: `get(name)` is called for the source tensors of one rule at a time.
FP8 dequantisation is not done here (the reader does it). HF Voxtral's `audio_tower.embed_positions.weight`
is recomputed from `sinusoids()` on the way to HF and ignored on the way in (never stored by Megatron).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megatron_ext.audio.positions import sinusoids
from megatron_ext.checkpoint.mistral_native import hf_decoder_prefix
from megatron_ext.config import ModelConfig
from megatron_ext.errors import ProjectError

Getter = Callable[[str], torch.Tensor]
HF_POSITIONS = "audio_tower.embed_positions.weight"


class MappingError(ProjectError, ValueError):
    """A tensor does not have the shape its mapping rule expects."""


@dataclass(frozen=True)
class Transform:
    """A named many-HF-tensors <-> one-Megatron-tensor function pair."""

    name: str
    to_megatron: Callable[[list[torch.Tensor], int, int, int], torch.Tensor]
    to_hf: Callable[[torch.Tensor, int, int, int], list[torch.Tensor]]


def _qkv_rows(heads: int, groups: int, head_dim: int) -> tuple[int, int]:
    return heads // groups * head_dim, head_dim  # rows of q per group, rows of k (= v) per group


def _fuse_qkv(parts: list[torch.Tensor], heads: int, groups: int, head_dim: int) -> torch.Tensor:
    q, k, v = parts
    qr, kr = _qkv_rows(heads, groups, head_dim)
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, qr, *rest), k.reshape(groups, kr, *rest), v.reshape(groups, kr, *rest)], 1)
    return fused.reshape(groups * (qr + 2 * kr), *rest)


def _split_qkv(fused: torch.Tensor, heads: int, groups: int, head_dim: int) -> list[torch.Tensor]:
    qr, kr = _qkv_rows(heads, groups, head_dim)
    rest = fused.shape[1:]
    q, k, v = fused.reshape(groups, qr + 2 * kr, *rest).split([qr, kr, kr], dim=1)
    return [q.reshape(groups * qr, *rest), k.reshape(groups * kr, *rest), v.reshape(groups * kr, *rest)]


def _fuse_qkv_bias_zero_k(parts: list[torch.Tensor], heads: int, groups: int, head_dim: int) -> torch.Tensor:
    q, v = parts
    return _fuse_qkv([q, torch.zeros_like(v), v], heads, groups, head_dim)


def _split_qkv_bias_drop_k(fused: torch.Tensor, heads: int, groups: int, head_dim: int) -> list[torch.Tensor]:
    q, _, v = _split_qkv(fused, heads, groups, head_dim)
    return [q, v]


IDENTITY = Transform("identity", lambda p, *_: p[0], lambda t, *_: [t])
FUSE_QKV = Transform("fuse_qkv", _fuse_qkv, _split_qkv)
FUSE_QKV_BIAS_ZERO_K = Transform("fuse_qkv_bias_zero_k", _fuse_qkv_bias_zero_k, _split_qkv_bias_drop_k)
CONCAT_GATE_UP = Transform("concat_gate_up", lambda p, *_: torch.cat(p, 0), lambda t, *_: list(t.chunk(2, 0)))


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor <- one or more HF tensors; templates may hold `{i}` (layer index)."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform = IDENTITY
    tower: str = "decoder"  # which attention geometry the transform uses: decoder | encoder

    def expand(self, i: int | None) -> Rule:
        if i is None:
            return self
        return Rule(self.megatron.format(i=i), tuple(h.format(i=i) for h in self.hf), self.transform, self.tower)


def _decoder_rules(cfg: ModelConfig) -> list[Rule]:
    pre, head = hf_decoder_prefix(cfg.hf_architecture)
    m, h = "language_model.decoder.layers.{i}.", pre + "layers.{i}."
    return [
        Rule("language_model.embedding.word_embeddings.weight", (pre + "embed_tokens.weight",)),
        Rule(m + "self_attention.linear_qkv.layer_norm_weight", (h + "input_layernorm.weight",)),
        Rule(
            m + "self_attention.linear_qkv.weight",
            tuple(h + f"self_attn.{x}_proj.weight" for x in "qkv"),
            FUSE_QKV,
        ),
        Rule(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",)),
        Rule(m + "mlp.linear_fc1.layer_norm_weight", (h + "post_attention_layernorm.weight",)),
        Rule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), CONCAT_GATE_UP),
        Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        Rule("language_model.decoder.final_layernorm.weight", (pre + "norm.weight",)),
        Rule("language_model.output_layer.weight", (head,)),
    ]


def _encoder_rules() -> list[Rule]:
    m, h = "audio_encoder.decoder.layers.{i}.", "audio_tower.layers.{i}."
    qkv = m + "self_attention.linear_qkv."
    rules = [
        Rule(f"audio_encoder.conv{c}.{p}", (f"audio_tower.conv{c}.{p}",)) for c in (1, 2) for p in ("weight", "bias")
    ]
    for p in ("weight", "bias"):
        rules += [
            Rule(qkv + f"layer_norm_{p}", (h + f"self_attn_layer_norm.{p}",)),
            Rule(m + f"self_attention.linear_proj.{p}", (h + f"self_attn.out_proj.{p}",)),
            Rule(m + f"mlp.linear_fc1.layer_norm_{p}", (h + f"final_layer_norm.{p}",)),
            Rule(m + f"mlp.linear_fc1.{p}", (h + f"fc1.{p}",)),
            Rule(m + f"mlp.linear_fc2.{p}", (h + f"fc2.{p}",)),
            Rule(f"audio_encoder.decoder.final_layernorm.{p}", (f"audio_tower.layer_norm.{p}",)),
        ]
    rules += [
        Rule(qkv + "weight", tuple(h + f"self_attn.{x}_proj.weight" for x in "qkv"), FUSE_QKV, "encoder"),
        Rule(qkv + "bias", (h + "self_attn.q_proj.bias", h + "self_attn.v_proj.bias"), FUSE_QKV_BIAS_ZERO_K, "encoder"),
        Rule("audio_projector.encoder.linear_fc1.weight", ("multi_modal_projector.linear_1.weight",)),
        Rule("audio_projector.encoder.linear_fc2.weight", ("multi_modal_projector.linear_2.weight",)),
    ]
    return rules


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every mapping rule of `cfg`, layer wildcards expanded, in a stable order (audio stack first)."""
    out: list[Rule] = []
    groups = [(_decoder_rules(cfg), cfg.decoder.num_layers)]
    if cfg.encoder is not None:
        groups.insert(0, (_encoder_rules(), cfg.encoder.num_layers))
    for table, n_layers in groups:
        for rule in table:
            layers = range(n_layers) if "{i}" in rule.megatron else [None]
            out += [rule.expand(i) for i in layers]
    return out


def _geometry(cfg: ModelConfig, tower: str) -> tuple[int, int, int]:
    """(heads, kv groups, head_dim) of the tower a qkv rule belongs to."""
    if tower == "encoder":
        e = cfg.encoder
        assert e is not None
        return e.num_attention_heads, e.num_attention_heads, e.hidden_size // e.num_attention_heads
    d = cfg.decoder
    return d.num_attention_heads, d.num_query_groups, d.kv_channels


def _apply(rule: Rule, fn: Callable, arg, cfg: ModelConfig):
    try:
        return fn(arg, *_geometry(cfg, rule.tower))
    except RuntimeError as exc:  # reshape/cat on an unexpected shape
        raise MappingError(f"{rule.megatron}: {rule.transform.name} failed on {list(rule.hf)}: {exc}") from None


def _to_megatron(rule: Rule, cfg: ModelConfig, get: Getter) -> torch.Tensor:
    return _apply(rule, rule.transform.to_megatron, [get(name) for name in rule.hf], cfg)


def hf_to_megatron(cfg: ModelConfig, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Megatron name, tensor) for every Megatron tensor, reading HF tensors lazily with `get`."""
    for rule in rules(cfg):
        yield rule.megatron, _to_megatron(rule, cfg, get)


def megatron_getter(cfg: ModelConfig, get: Getter) -> Getter:
    """Random access by Megatron name over an HF source: reads only that tensor's HF parts (KeyError if unknown)."""
    table = {rule.megatron: rule for rule in rules(cfg)}
    return lambda name: _to_megatron(table[name], cfg, get)


def megatron_to_hf(cfg: ModelConfig, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every HF tensor, reading Megatron tensors lazily with `get`."""
    for rule in rules(cfg):
        src = get(rule.megatron)
        parts = _apply(rule, rule.transform.to_hf, src, cfg)
        if len(parts) != len(rule.hf):
            raise MappingError(f"{rule.megatron}: {rule.transform.name} gave {len(parts)} tensors, not {len(rule.hf)}")
        for name, t in zip(rule.hf, parts, strict=True):
            yield name, t.contiguous()
    if cfg.encoder is not None and cfg.hf_architecture == "voxtral":
        e = cfg.encoder
        dtype = get("audio_encoder.conv1.weight").dtype
        yield HF_POSITIONS, sinusoids(e.max_source_positions, e.hidden_size).to(dtype)


def megatron_names(cfg: ModelConfig) -> list[str]:
    """All full Megatron tensor names of the model described by `cfg`."""
    return [r.megatron for r in rules(cfg)]


def hf_names(cfg: ModelConfig) -> list[str]:
    """All HF tensor names of `cfg.hf_architecture`'s layout (Voxtral's stored positions included)."""
    names = [h for r in rules(cfg) for h in r.hf]
    if cfg.encoder is not None and cfg.hf_architecture == "voxtral":
        names.append(HF_POSITIONS)
    return names
