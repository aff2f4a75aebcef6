"""Training FLOPs (causal convention) and the metric sinks (rank 0 only): TensorBoard (scalars and text) and,
optionally, W&B (the same scalars, the resolved config as the run's config).

FLOPs of one training step, counted as fwd + bwd = 3 x forward (frozen parts: forward only):
- decoder matmuls: 6 x N_matmul per token (N_matmul = qkv, out-proj, SwiGLU fc1/fc2 of every layer);
- causal attention: per document of n tokens and per layer, 6 x n^2 x (heads x head_dim) (QK^T and AV,
  half the square under the causal mask), i.e. 6 x L x s x q_dim per token for one full-length document;
- LM head: 6 x hidden x vocab per supervised token (the loss computes logits only there);
- audio: Whisper encoder forward per 30 s chunk (x3 if trained), projector per audio token.
At s = 131072 the decoder part is ~266 GFLOP/token (48% attention) for Mistral Small 3 (FACTS.md 7).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_ext.config import ModelConfig
from megatron_ext.training.config import TrainConfig, to_yaml, wandb_dir


def decoder_matmul_params(cfg: ModelConfig) -> int:
    d = cfg.decoder
    q, kv = d.num_attention_heads * d.kv_channels, d.num_query_groups * d.kv_channels
    per_layer = d.hidden_size * (q + 2 * kv) + q * d.hidden_size + 3 * d.hidden_size * d.ffn_hidden_size
    return d.num_layers * per_layer


def step_flops(
    cfg: ModelConfig,
    doc_lens: list[int],
    supervised: int,
    audio_chunks: int,
    encoder_trained: bool = False,
    projector_trained: bool = True,
) -> float:
    """Model FLOPs of one fwd+bwd over documents of `doc_lens` tokens (padding excluded)."""
    d = cfg.decoder
    tokens = sum(doc_lens)
    q_dim = d.num_attention_heads * d.kv_channels
    flops = 6.0 * decoder_matmul_params(cfg) * tokens
    flops += 6.0 * d.num_layers * q_dim * sum(n * n for n in doc_lens)
    flops += 6.0 * d.hidden_size * d.vocab_size * supervised
    if cfg.encoder is not None and audio_chunks:
        e = cfg.encoder
        frames = e.max_source_positions
        enc_params = e.num_layers * (4 * e.hidden_size**2 + 2 * e.hidden_size * e.ffn_hidden_size)
        conv = 3 * (e.num_mel_bins * e.hidden_size + e.hidden_size**2) * frames  # two k=3 convs (stride 2 on 2nd)
        enc = 2.0 * (enc_params * frames + conv) + 4.0 * e.num_layers * frames * frames * e.hidden_size
        proj_tokens = frames // cfg.projector_stack
        proj = 2.0 * (cfg.projector_input_size * d.hidden_size + d.hidden_size**2) * proj_tokens
        flops += audio_chunks * (enc * (3 if encoder_trained else 1) + proj * (3 if projector_trained else 1))
    return flops


class TensorBoard:
    """Scalar logger; a no-op on ranks other than 0 or when no directory is configured."""

    def __init__(self, directory: str | None, rank: int) -> None:
        self.writer = None
        if directory and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            Path(directory).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(directory)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str) -> None:
        """A text entry (markdown; `text` is shown verbatim as a code block), e.g. the resolved config."""
        if self.writer is not None:
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class WandB:
    """W&B run beside TensorBoard (rank 0; a no-op elsewhere or without logging.wandb_project), under
    `wandb_dir(cfg)/wandb/`; W&B's environment applies (WANDB_MODE=offline: written there, no network)."""

    def __init__(self, cfg: TrainConfig, rank: int) -> None:
        self.run = None
        if cfg.logging.wandb_project and rank == 0:
            import wandb  # optional package, checked on every rank at startup (checks.check_wandb_installed)

            directory = Path(wandb_dir(cfg))
            directory.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.logging.wandb_run_name,
                dir=directory,
                config=yaml.safe_load(to_yaml(cfg)),  # the resolved config, as TensorBoard's text shows it
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Sinks:
    """Every scalar to each sink (TensorBoard, W&B)."""

    def __init__(self, *sinks: TensorBoard | WandB) -> None:
        self.sinks = sinks

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.scalars(step, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
