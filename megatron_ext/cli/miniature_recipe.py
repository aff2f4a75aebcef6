"""Run the Devstral Audio recipe on the miniature parents: benchmark files, tokenizer alignment, merge grid,
spoken training instructions, SFT per text:audio mixture, evaluation of every checkpoint, the report.

  miniature_recipe.py [--recipe examples/miniature/recipe.yaml] [--devstral DIR] [--voxtral DIR] [--output DIR]
                      [--lora-mixture TEXT:AUDIO ...]

Every stage is cached under the output directory by its settings and inputs: a rerun reuses what is done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.cli._errors import error_policy
from megatron_ext.miniature.pipeline import load_recipe, run_recipe


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-miniature-recipe: load the recipe, run every stage, print where the report went."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=Path("examples/miniature/recipe.yaml"), help="recipe YAML")
    p.add_argument("--devstral", type=Path, help="Devstral-mini parent (HF layout); default: the recipe's")
    p.add_argument("--voxtral", type=Path, help="Voxtral-mini parent (HF layout); default: the recipe's")
    p.add_argument("--output", type=Path, help="output directory; default: the recipe's")
    p.add_argument(
        "--lora-mixture",
        action="append",
        help="also fine-tune with LoRA adapters on this text:audio mixture (repeatable); default: the recipe's",
    )
    args = p.parse_args(argv)
    lora = tuple(args.lora_mixture) if args.lora_mixture else None
    recipe = load_recipe(
        args.recipe, devstral=args.devstral, voxtral=args.voxtral, output=args.output, lora_mixtures=lora
    )
    print(f"report: {run_recipe(recipe)}")
    return 0
