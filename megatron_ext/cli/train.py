"""Supervised fine-tuning on Megatron-Core from a YAML config plus dotted overrides (key=value).

Single process: `python tools/train.py --config examples/configs/tiny_cpu.yaml parallel.tensor_model_parallel_size=1`.
Several ranks: `torchrun --nproc-per-node N tools/train.py --config ...` (see launch_scripts/).
`--dry-run` validates config, checkpoint metadata, tokenizer, layout and data without starting training.
SIGUSR1 or SIGTERM: every rank saves a checkpoint at the next step boundary, then exits with 75 (requeue).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from megatron_ext.checkpoint.metadata import verification
from megatron_ext.cli._errors import error_policy
from megatron_ext.training.config import TrainConfigError, load_config


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-train: load the config, then validate it (--dry-run) or train; each rank runs this."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="YAML run config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.train_iters=10")
    parser.add_argument("--dry-run", action="store_true", help="validate everything, start nothing")
    parser.add_argument(
        "--world-size", type=int, default=None, help="ranks the dry run validates for (default: $WORLD_SIZE or 1)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    from megatron_ext.training.sft import dry_run, train  # imports Megatron-Core (slow): after config checks
    from megatron_ext.training.signals import EXIT_SAVED_ON_SIGNAL

    with verification(cfg.model.verify):
        if args.dry_run:
            world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
            for line in dry_run(cfg, world):
                print(line)
            print("dry run OK")
            return 0
        result = train(cfg)
    if result.losses and int(os.environ.get("RANK", "0")) == 0:
        first, last = min(result.losses), max(result.losses)
        print(f"trained steps {first}..{last}: loss {result.losses[first]:.4f} -> {result.losses[last]:.4f}")
    if result.stopped_by:
        if not cfg.checkpoint.save_dir:
            raise TrainConfigError(f"stopped by {result.stopped_by} with nothing saved: checkpoint.save_dir is not set")
        return EXIT_SAVED_ON_SIGNAL  # saved at the step boundary: launch_scripts/train_slurm.sbatch requeues
    return 0
