"""GPU generation check: greedy decoding on a full-width slice (a few Mistral-Small layers + the real 131k
vocabulary) in bf16 on the Transformer Engine spec, through `MegatronGenerator` and its KV cache.

Prints prefill + decode tokens/s for each batch size and the peak GPU memory. Random weights: the numbers
measure the decoding path, not the answers. Needs CUDA and Transformer Engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks.gpu_check import require_gpu
from megatron_ext.config import ModelConfig, mistral_small_decoder

VOCAB = mistral_small_decoder().vocab_size  # Tekken's vocabulary (Mistral Small 3 / Devstral / Voxtral)


@dataclass
class GenResult:
    batch: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    peak_memory_gib: float


def slice_config(layers: int) -> ModelConfig:
    """Mistral Small 3's decoder geometry with `layers` layers and the full vocabulary, text only."""
    return ModelConfig(mistral_small_decoder(layers), hf_architecture="mistral")


def run_generation(layers: int, batches: tuple[int, ...], prompt_len: int, new_tokens: int) -> list[GenResult]:
    """Time greedy generation of `new_tokens` tokens after `prompt_len`-token prompts for each batch size."""
    import torch

    from megatron_ext.eval.generation import MegatronGenerator, build_generation_model
    from megatron_ext.eval.prompts import Prompt

    require_gpu()
    cfg = slice_config(layers)
    model = build_generation_model(cfg, "bf16", tp=1, backend="te", init_weights=True)
    generator = MegatronGenerator(model, cfg, f"slice-{layers}L")
    gen = torch.Generator().manual_seed(0)
    results = []
    for batch in batches:
        prompts = [Prompt(torch.randint(1000, VOCAB, (prompt_len,), generator=gen).tolist(), []) for _ in range(batch)]
        generator.generate(prompts[:1], 4)  # warm-up (TE kernels, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = generator.generate(prompts, new_tokens)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        generated = sum(len(tokens) for tokens in out)
        peak = torch.cuda.max_memory_allocated() / 2**30
        results.append(GenResult(batch, generated, seconds, generated / seconds, peak))
    return results
