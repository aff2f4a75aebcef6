"""Load a converted text-only torch_dist checkpoint into Megatron-Core GPTModel and compare logits with HF.

Used in-process at TP=1 by tests/test_convert_megatron.py and under `torchrun --nproc_per_node 2` for
TP=2 (run as a script: `gpt CKPT HF_DIR TP [RESAVE_DIR]` or `audio_lm CKPT TP [RESAVE_DIR]`; prints `MAXDIFF <value>`
on rank 0; RESAVE_DIR re-saves the loaded model with Megatron's own torch_dist writer) and PP=2
(`pp CKPT`: each stage loads its own layers; every rank prints `STAGE <rank> <first|-> <last|-> <layers>`
after checking each loaded tensor against the checkpoint).
`audio_lm_logit_diff` does the same with the project's AudioLanguageModel (Voxtral with audio, YaRN).
The GPTModel is built with the local spec
and loaded through `model.sharded_state_dict(prefix="language_model.")` + `dist_checkpointing.load`,
exactly as an `AudioLanguageModel` without audio stores its language model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ext.checkpoint.megatron_lm import resolve, safe_globals  # noqa: E402
from megatron_ext.checkpoint.metadata import load_model_config  # noqa: E402
from megatron_ext.config import ModelConfig  # noqa: E402


def build_gpt(cfg: ModelConfig, pre_process: bool = True, post_process: bool = True):
    """GPTModel (local spec) with the tiny Mistral decoder of `cfg` (plain rope only); the pipeline stage of
    this rank when PP > 1 (`pre_process`: it holds the embedding, `post_process`: the output layer)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    d = cfg.decoder
    assert d.rope.type == "rope", "this helper builds plain-rope decoders only"
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
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        tc,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=d.vocab_size,
        max_sequence_length=d.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(d.rope.theta),
        share_embeddings_and_output_weights=False,
        pre_process=pre_process,
        post_process=post_process,
    )


def load_into_gpt(ckpt: Path, strict: bool = True):
    """Build the GPTModel for `ckpt`'s config and load the checkpoint into it (current TP/PP)."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model = build_gpt(load_model_config(ckpt))
    sd = model.sharded_state_dict(prefix="language_model.")
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.ASSUME_OK_UNEXPECTED
    loaded = _mcore_load(sd, ckpt, handling)
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in loaded.items()})
    return model.eval()


def _mcore_load(sd: dict, ckpt: Path, strict) -> dict:
    """Megatron-Core's `dist_checkpointing.load` of our checkpoint (the iteration its tracker names) as Megatron-LM
    calls it: the model's tensors under "model", the args namespace of the common state allowed."""
    from megatron.core import dist_checkpointing

    with torch.serialization.safe_globals(safe_globals()):
        return dist_checkpointing.load({"model": sd}, str(resolve(ckpt)), strict=strict)["model"]


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


def audio_lm_logit_diff(ckpt: Path, resave: Path | None = None, published: tuple[str, Path] | None = None) -> float:
    """Max |logits| difference: AudioLanguageModel (local spec, loaded strictly from `ckpt`) vs the HF class of
    the checkpoint's layout holding the same weights (exported by `megatron_to_hf`), or, with `published`
    (class name, directory), transformers' own `from_pretrained` of a published-layout parent; Voxtral gets
    one 30 s chunk of random log-mel features spliced at its [AUDIO] tokens."""
    import transformers
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_ext.checkpoint import mapping
    from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
    from megatron_ext.models.build import BuildConfig, build_model
    from megatron_ext.models.logits import hf_reference_model

    cfg = load_model_config(ckpt)
    model = build_model(cfg, BuildConfig(backend="local", init_weights=False)).eval()
    loaded = _mcore_load(model.sharded_state_dict(), ckpt, StrictHandling.RAISE_ALL)
    model.load_state_dict(loaded)
    ids = tokens(cfg.decoder.vocab_size, 40)
    features, kwargs = None, {}
    if cfg.encoder is not None:
        e = cfg.encoder
        per_chunk = e.max_source_positions // cfg.projector_stack
        ids = torch.cat([ids[:, :3], torch.full((1, per_chunk), cfg.audio_token_id), ids[:, 3:]], 1)
        features = torch.randn(1, e.num_mel_bins, e.mel_frames, generator=torch.Generator().manual_seed(5))
        kwargs = {"input_features": features}
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None], audio_features=features, runtime_gather_output=True)[0]
        if published is not None:
            hf = getattr(transformers, published[0]).from_pretrained(published[1], dtype=torch.float32).eval()
        else:
            hf = hf_reference_model(cfg, dict(mapping.megatron_to_hf(cfg, TorchDistReader(ckpt).get)))
        ref = hf(input_ids=ids, **kwargs)
    if resave is not None:  # Megatron's own writer (one chunk per TP rank): the layout our reader must handle
        resave.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(resave))
    return float((ours.float() - ref.logits[0].float()).abs().max())


def check_pipeline_stage(ckpt: Path) -> str:
    """Load this pipeline stage's part of `ckpt` strictly; every loaded tensor must equal the checkpoint's
    tensor at its global layer. Returns `STAGE rank first|- last|- global-layer-indices`."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_ext.checkpoint.torch_dist_io import TorchDistReader

    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = build_gpt(load_model_config(ckpt), pre_process=first, post_process=last)
    sd = model.sharded_state_dict(prefix="language_model.")
    loaded = _mcore_load(sd, ckpt, StrictHandling.RAISE_ALL)
    model.load_state_dict({k.removeprefix("language_model."): v for k, v in loaded.items()})
    reader, layers = TorchDistReader(ckpt), set()
    for key, sh in sd.items():
        if not isinstance(sh, ShardedTensor):
            continue
        name = sh.key
        if sh.prepend_axis_num:  # stacked layer key: the global layer is the first offset
            layer = sh.global_offset[0]
            layers.add(layer)
            name = name.replace(".layers.", f".layers.{layer}.", 1)
        assert torch.equal(loaded[key], reader.get(name)), name
    return (
        f"STAGE {parallel_state.get_pipeline_model_parallel_rank()} {'first' if first else '-'} "
        f"{'last' if last else '-'} {','.join(map(str, sorted(layers)))}"
    )


def main() -> None:
    from megatron_ext.compat.cpu import destroy_distributed, init_distributed

    if sys.argv[1] == "pp":  # pp CKPT: PP = world size
        init_distributed(tp=1, pp=int(os.environ["WORLD_SIZE"]))
        print(check_pipeline_stage(Path(sys.argv[2])), flush=True)
        destroy_distributed()
        return
    if sys.argv[1] == "audio_lm":  # audio_lm CKPT TP [RESAVE_DIR]
        init_distributed(tp=int(sys.argv[3]), pp=1)
        diff = audio_lm_logit_diff(Path(sys.argv[2]), Path(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:  # gpt CKPT HF_DIR TP [RESAVE_DIR]
        ckpt, hf_dir, tp = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
        resave = Path(sys.argv[5]) if len(sys.argv) > 5 else None
        init_distributed(tp=tp, pp=1)
        diff = max_logit_diff(ckpt, hf_dir, resave)
    if torch.distributed.get_rank() == 0:
        print(f"MAXDIFF {diff:.3e}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
