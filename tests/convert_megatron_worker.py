"""Load a converted text-only torch_dist checkpoint into Megatron-Core GPTModel and compare logits with HF.

Used in-process at TP=1 by tests/test_convert_megatron.py and under `torchrun --nproc_per_node 2` for
TP=2 (run as a script: prints `MAXDIFF <value>` on rank 0; an optional 4th argument re-saves the loaded
model there with Megatron's own torch_dist writer). The GPTModel is built with the local spec
and loaded through `model.sharded_state_dict(prefix="language_model.")` + `dist_checkpointing.load`,
exactly as an `AudioLanguageModel` without audio stores its language model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ext.checkpoint.metadata import load_model_config  # noqa: E402
from megatron_ext.config import ModelConfig  # noqa: E402


def build_gpt(cfg: ModelConfig):
    """GPTModel (local spec) with the tiny Mistral decoder of `cfg` (plain rope only)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    d = cfg.decoder
    assert d.rope.type == "rope", "this helper builds plain-rope decoders only"
    tc = TransformerConfig(
        num_layers=d.num_layers, hidden_size=d.hidden_size, ffn_hidden_size=d.ffn_hidden_size,
        num_attention_heads=d.num_attention_heads, num_query_groups=d.num_query_groups, kv_channels=d.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=d.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
    )
    return GPTModel(
        tc, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=d.vocab_size,
        max_sequence_length=d.max_position_embeddings, position_embedding_type="rope", rotary_base=int(d.rope.theta),
        share_embeddings_and_output_weights=False,
    )


def load_into_gpt(ckpt: Path, strict: bool = True):
    """Build the GPTModel for `ckpt`'s config and load the checkpoint into it (current TP/PP)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model = build_gpt(load_model_config(ckpt))
    sd = model.sharded_state_dict(prefix="language_model.")
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.ASSUME_OK_UNEXPECTED
    loaded = dist_checkpointing.load(sd, str(ckpt), strict=handling)
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in loaded.items()})
    return model.eval()


def tokens(vocab: int, n: int = 24) -> torch.Tensor:
    return torch.randint(1000, vocab, (1, n), generator=torch.Generator().manual_seed(3))


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        out = model(ids, pos, None)  # [b, s, V/tp]
    return gather_from_tensor_model_parallel_region(out)


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def max_logit_diff(ckpt: Path, hf_dir: Path, resave: Path | None = None) -> float:
    """Max |logits| difference Megatron (loaded from `ckpt`) vs HF; optionally re-save with Megatron."""
    model = load_into_gpt(ckpt)
    ids = tokens(load_model_config(ckpt).decoder.vocab_size)
    diff = float((megatron_logits(model, ids) - hf_logits(hf_dir, ids)).abs().max())
    if resave is not None:  # Megatron's own writer, one chunk per TP rank: the layout our reader must handle
        from megatron.core import dist_checkpointing

        resave.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(prefix="language_model."), str(resave))
    return diff


def main() -> None:
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed

    ckpt, hf_dir, tp = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resave = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    init_distributed(tp=tp, pp=1)
    diff = max_logit_diff(ckpt, hf_dir, resave)
    if torch.distributed.get_rank() == 0:
        print(f"MAXDIFF {diff:.3e}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
