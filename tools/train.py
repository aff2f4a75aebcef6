#!/usr/bin/env python
"""Supervised fine-tuning on Megatron-Core from a YAML config plus dotted overrides (key=value).

Single process: `python tools/train.py --config examples/configs/tiny_cpu.yaml parallel.tensor_model_parallel_size=1`.
Several ranks: `torchrun --nproc-per-node N tools/train.py --config ...` (see launch_scripts/).
`--dry-run` validates config, checkpoint metadata, tokenizer, layout and data without starting training.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.training.config import TrainConfigError, load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="YAML run config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.train_iters=10")
    parser.add_argument("--dry-run", action="store_true", help="validate everything, start nothing")
    parser.add_argument(
        "--world-size", type=int, default=None, help="ranks the dry run validates for (default: $WORLD_SIZE or 1)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_ext.training.sft import dry_run, train  # imports Megatron-Core (slow): after config checks

        if args.dry_run:
            world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
            for line in dry_run(cfg, world):
                print(line)
            print("dry run OK")
            return 0
        result = train(cfg)
    except (TrainConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.losses and int(os.environ.get("RANK", "0")) == 0:
        first, last = min(result.losses), max(result.losses)
        print(f"trained steps {first}..{last}: loss {result.losses[first]:.4f} -> {result.losses[last]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
