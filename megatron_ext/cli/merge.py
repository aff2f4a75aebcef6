"""Merge the decoders of Devstral and Voxtral (linear | slerp | della); Voxtral's audio stack is copied as is.

Tokenizer-aware embeddings/LM head, explicit rope settings, provenance in merge.json. With --grid, runs
every configuration of a grid YAML into OUTPUT/<name> and writes OUTPUT/manifest.json.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from pathlib import Path

# Transparent huge pages for torch's large CPU buffers: ~40x fewer page faults on multi-GB tensors.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from megatron_ext.checkpoint.metadata import verification  # noqa: E402
from megatron_ext.cli._errors import error_policy
from megatron_ext.cli._shards import shard_bytes  # noqa: E402
from megatron_ext.cli._verify import add_no_verify  # noqa: E402
from megatron_ext.config import RopeConfig  # noqa: E402
from megatron_ext.merge import accel  # noqa: E402
from megatron_ext.merge.grid import run_grid  # noqa: E402
from megatron_ext.merge.methods import METHODS, MergeParams  # noqa: E402
from megatron_ext.merge.run import MergeError, MergeJob, run_merge  # noqa: E402

ROPE_FLAGS = {
    "rope_type": "type",
    "rope_factor": "factor",
    "rope_original_max_position": "original_max_position_embeddings",
    "rope_beta_fast": "beta_fast",
    "rope_beta_slow": "beta_slow",
    "rope_mscale": "mscale",
    "rope_mscale_all_dim": "mscale_all_dim",
    "rope_llama4_beta": "llama4_scaling_beta",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The merge's flags: parents, method and its parameters, rope settings, output format, grid."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--devstral",
        type=Path,
        required=True,
        help="Devstral checkpoint: HF safetensors dir or Megatron torch_dist dir",
    )
    p.add_argument(
        "--voxtral", type=Path, required=True, help="Voxtral checkpoint: HF safetensors dir or Megatron torch_dist dir"
    )
    p.add_argument("--output", type=Path, required=True, help="output directory (with --grid: root of one dir per run)")
    p.add_argument("--method", choices=sorted(METHODS), help="merge method (required without --grid)")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Voxtral's weight in [0, 1] (linear, slerp, common special rows; della with --base)",
    )
    p.add_argument("--density", type=float, default=0.5, help="della: mean keep probability")
    p.add_argument(
        "--epsilon", type=float, default=0.1, help="della: keep probabilities span [density-eps, density+eps]"
    )
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="della: scale of the fused delta")
    p.add_argument(
        "--rescale-norm",
        choices=["l1", "l2", "linf", "per_weight"],
        default="l1",
        help="della: rescale survivors to the delta's norm (l1/l2/linf, per tensor) or by 1/p each",
    )
    p.add_argument("--seed", type=int, default=0, help="della: random seed (draws are seeded per tensor name)")
    p.add_argument("--mlp-density-boost", type=float, default=0.0, help="della schedule: extra density for MLP tensors")
    p.add_argument("--early-layers", type=int, default=0, help="della schedule: number of early decoder blocks")
    p.add_argument(
        "--early-lambda-scale", type=float, default=1.0, help="della schedule: lambda factor in early blocks"
    )
    p.add_argument("--base", type=Path, help="della: common base checkpoint (deltas against it instead of Devstral)")
    p.add_argument(
        "--tokenizer-map", type=Path, help="tokenizer_map.json from tools/align_tokenizer.py (default: computed)"
    )
    p.add_argument(
        "--format",
        dest="out_format",
        choices=["hf", "megatron", "mistral"],
        default="hf",
        help="hf: Voxtral HF layout (config.json with rope_parameters, generation and processor configs); "
        "megatron: torch_dist + checkpoint_meta.json in Megatron-LM's layout (OUT/release/ + "
        "OUT/latest_checkpointed_iteration.txt); mistral: consolidated.safetensors + params.json + "
        "tekken.json for vLLM (the only layout for Devstral 2's llama-4 query scaling)",
    )
    p.add_argument("--rope-from", choices=["devstral", "voxtral"], help="take rope/YaRN settings from this parent")
    p.add_argument("--rope-theta", type=float, help="explicit rope theta (instead of --rope-from)")
    p.add_argument("--rope-type", choices=["rope", "yarn"], default="rope", help="with --rope-theta: rope or yarn")
    for flag in list(ROPE_FLAGS)[1:]:
        p.add_argument("--" + flag.replace("_", "-"), type=float, help="with --rope-type yarn: YaRN setting")
    p.add_argument(
        "--min-row-norm", type=float, default=1e-6, help="embedding rows with a smaller norm count as absent"
    )
    p.add_argument(
        "--shard-size-gb",
        type=float,
        default=None,
        help="maximum output shard size in GiB (default: 5 for hf; one consolidated.safetensors for mistral)",
    )
    p.add_argument("--grid", type=Path, help="grid YAML (defaults + runs); method flags are then taken from it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-accel",
        action="store_true",
        help=f"plain merge methods only: no fused kernels, kernel pool or row streaming (same output; {accel.ENV}=0)",
    )
    add_no_verify(p)
    return p.parse_args(argv)


def explicit_rope(args: argparse.Namespace) -> RopeConfig | None:
    """The rope settings given by --rope-theta and the YaRN flags, or None when --rope-theta is absent."""
    if args.rope_theta is None:
        return None
    values = {field: getattr(args, flag) for flag, field in ROPE_FLAGS.items() if getattr(args, flag) is not None}
    if "original_max_position_embeddings" in values:
        values["original_max_position_embeddings"] = int(values["original_max_position_embeddings"])
    return RopeConfig(theta=args.rope_theta, **values)


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-merge: run one merge (or a grid of them), print what was written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.no_accel:
        os.environ[accel.ENV] = "0"  # the switch every accel.enabled() of this process reads
    with verification(not args.no_verify):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The merge (or grid) the parsed flags ask for."""
    params = MergeParams(
        method=args.method or "linear",
        alpha=args.alpha,
        density=args.density,
        epsilon=args.epsilon,
        lam=args.lam,
        rescale=args.rescale_norm,
        seed=args.seed,
        mlp_density_boost=args.mlp_density_boost,
        early_layers=args.early_layers,
        early_lambda_scale=args.early_lambda_scale,
    )
    job = MergeJob(
        devstral=args.devstral,
        voxtral=args.voxtral,
        output=args.output,
        params=params,
        base=args.base,
        tokenizer_map=args.tokenizer_map,
        rope_from=args.rope_from,
        rope=explicit_rope(args),
        out_format=args.out_format,
        min_row_norm=args.min_row_norm,
        shard_bytes=shard_bytes(args.shard_size_gb),
        progress=not args.no_progress,
    )
    if args.grid is not None:
        print(f"manifest: {run_grid(args.grid, job)}")
        return 0
    if args.method is None:
        raise MergeError("--method is required (or --grid)")
    summary = run_merge(job)
    if summary.already_complete:
        print(f"{summary.output} already holds this merge (same parents and parameters): nothing to do")
        return 0
    rows = Counter()
    for key, n in summary.special_rows.items():
        rows[key.rsplit(":", 1)[1]] += n
    print(f"wrote {summary.output}: tensors {dict(summary.tensors)}; special rows of embeddings + LM head {dict(rows)}")
    if summary.skipped_shape_mismatch:
        print(f"shape mismatches (kept Voxtral's tensor): {', '.join(summary.skipped_shape_mismatch)}")
    if summary.resumed_shards:
        print(f"resumed: {summary.resumed_shards} shard(s) were already complete")
    return 0
