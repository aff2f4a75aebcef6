"""mergekit (the public reference, a test/benchmark-only dependency) run in-process on HF Mistral dirs.

Our parameters map to mergekit's: linear weights (1-alpha, alpha); SLERP t = alpha with Devstral as
base_model; DELLA = Devstral base + Voxtral with weight 1, density, epsilon, lambda, l1 rescale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ext.merge.methods import MergeParams


def mergekit_config(params: MergeParams, devstral: Path, voxtral_mistral: Path, dtype: str) -> dict[str, Any]:
    """The mergekit YAML (as a dict) equivalent to `params` on two MistralForCausalLM directories."""
    dev, vox = str(devstral), str(voxtral_mistral)
    if params.method == "linear":
        return {
            "merge_method": "linear",
            "dtype": dtype,
            "models": [
                {"model": dev, "parameters": {"weight": 1.0 - params.alpha}},
                {"model": vox, "parameters": {"weight": params.alpha}},
            ],
        }
    if params.method == "slerp":
        return {
            "merge_method": "slerp",
            "dtype": dtype,
            "base_model": dev,
            "parameters": {"t": params.alpha},
            "models": [{"model": dev}, {"model": vox}],
        }
    if params.method == "della":
        if params.rescale != "l1":
            raise ValueError("mergekit's DELLA only rescales with the l1 norm")
        return {
            "merge_method": "della",
            "dtype": dtype,
            "base_model": dev,
            "parameters": {"lambda": params.lam},
            "models": [
                {"model": vox, "parameters": {"weight": 1.0, "density": params.density, "epsilon": params.epsilon}}
            ],
        }
    raise ValueError(params.method)


def run_mergekit(config: dict[str, Any], out: Path, seed: int | None = None, threads: int | None = None) -> None:
    """Run mergekit's `run_merge` on `config`, writing a safetensors checkpoint into `out`."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(
        copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed, num_threads=threads
    )
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
