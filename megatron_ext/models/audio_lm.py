"""AudioLanguageModel: Whisper encoder + projector + Megatron-Core GPTModel decoder, spliced at [AUDIO] tokens.

Why compose GPTModel directly rather than use MIMO or LLaVA (Megatron-Core 0.16.1): `MimoModel` (with its
`AudioModalitySubmodules`) is marked experimental and warns on construction, and its forward calls the
language model with `position_ids=None` and no `packed_seq_params`, so packed samples cannot get their
true positions, and it has no sequence-parallel handling (nothing scatters the merged embeddings).
`LLaVAModel` is built around an
image encoder (its if/elif chain over encoder types, image-tag padding, its own CP/SP special cases).
Here the whole fusion is one visible function (`splice_audio`) and the decoder is a plain GPTModel
subclass (`rope.DecoderModel`). Its checkpoint keys are GPTModel's under `language_model.`, so
torch_dist checkpoints and the HF mapping (`checkpoint/mapping.py`) line up with it.

Layouts: token ids [b, s] (HF order); Megatron tensors are sequence-first [s, b, h]. Audio arrives as all
30 s log-mel chunks of the batch, [chunks, mels, 3000], in the order of their [AUDIO] tokens in
row-major [b, s] order (sample 0's clips first, each clip's chunks in time order). A clip longer than
30 s is several chunks, each contributing 1500/stack embeddings (375 for Voxtral).

Context parallelism (`cp_index`, see `cp_audio.py`): the model gets the whole flat THD stream [1, S] and the
positions this CP rank holds; it embeds those, encodes only the chunks they need, and the decoder runs on the
rank's share.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.errors import ProjectError
from megatron_ext.models.cp_audio import local_audio
from megatron_ext.models.decoder import DecoderModel
from megatron_ext.models.projector import AudioProjector
from megatron_ext.models.whisper_encoder import WhisperEncoder


class AudioTokenMismatch(ProjectError, ValueError):
    """The number of [AUDIO] tokens differs from the number of audio embeddings."""


def check_audio_count(found: int, embeddings: int, audio_token_id: int, chunks: int) -> None:
    """Refuse a batch whose [AUDIO] token count differs from its audio embeddings (chunks x per chunk)."""
    if found != embeddings:
        per_chunk = embeddings // chunks if chunks else 0
        raise AudioTokenMismatch(
            f"{found} [AUDIO] tokens (id {audio_token_id}) in the batch but {embeddings} audio embeddings "
            f"({chunks} chunks x {per_chunk}): each 30 s chunk needs exactly {per_chunk or 'its'} [AUDIO] tokens"
        )


def splice_audio(
    embeddings: torch.Tensor, input_ids: torch.Tensor, audio: torch.Tensor, audio_token_id: int, chunks: int
) -> torch.Tensor:
    """Replace embeddings [s, b, h] at [AUDIO] positions (row-major over [b, s]) by `audio` [n, h], in order."""
    mask = input_ids == audio_token_id  # [b, s]
    found = int(mask.sum())
    check_audio_count(found, audio.shape[0], audio_token_id, chunks)
    if not found:
        return embeddings
    # masked_scatter fills in row-major order of its mask, so scatter in [b, s] order and transpose back.
    by_batch = embeddings.transpose(0, 1).masked_scatter(mask[..., None], audio.to(embeddings.dtype))
    return by_batch.transpose(0, 1).contiguous()


class AudioLanguageModel(MegatronModule):
    """Decoder (`language_model`), optional `audio_encoder` + `audio_projector` (first pipeline stage only)."""

    def __init__(
        self,
        config: TransformerConfig,
        language_model: DecoderModel,
        audio_encoder: WhisperEncoder | None = None,
        audio_projector: AudioProjector | None = None,
        audio_token_id: int | None = None,
        freeze_encoder: bool = True,
        freeze_projector: bool = False,
    ) -> None:
        super().__init__(config=config)
        if (audio_encoder is None) != (audio_projector is None):
            raise ValueError("audio_encoder and audio_projector come together (or neither)")
        if audio_encoder is not None and audio_token_id is None:
            raise ValueError("an audio model needs audio_token_id (take it from the tokenizer's [AUDIO])")
        self.language_model = language_model
        self.audio_encoder = audio_encoder
        self.audio_projector = audio_projector
        self.audio_token_id = audio_token_id
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.model_type = language_model.model_type
        # read by finalize_model_grads on the first/last pipeline stages (untied: no embedding all-reduce)
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.freeze_encoder, self.freeze_projector = freeze_encoder, freeze_projector
        for module, frozen in ((audio_encoder, freeze_encoder), (audio_projector, freeze_projector)):
            if module is not None and frozen:
                module.requires_grad_(False)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline parallelism: activations from the previous stage go to the decoder."""
        self.language_model.set_input_tensor(input_tensor)

    def encode_audio(self, features: torch.Tensor) -> torch.Tensor:
        """log-mel chunks [chunks, mels, 3000] -> audio embeddings [chunks * 1500/stack, decoder hidden]."""
        assert self.audio_encoder is not None and self.audio_projector is not None
        with torch.no_grad() if self.freeze_encoder else nullcontext():
            encoded = self.audio_encoder(features)
        with torch.no_grad() if self.freeze_encoder and self.freeze_projector else nullcontext():
            return self.audio_projector(encoded)

    def audio_tokens_per_chunk(self) -> int:
        """[AUDIO] embeddings per 30 s chunk: encoder frames / projector stack (375 for Voxtral)."""
        assert self.audio_encoder is not None and self.audio_projector is not None
        return self.audio_encoder.positions.shape[0] // self.audio_projector.stack

    def embed(
        self, input_ids: torch.Tensor, audio_features: torch.Tensor | None = None, cp_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings [s, b, h] with audio spliced in; scattered over TP ranks under sequence parallel.

        With `cp_index` (context parallelism), `input_ids` is the whole flat stream [1, S] and only its
        `cp_index` positions are embedded, encoding only the chunks they need."""
        local_ids = input_ids if cp_index is None else input_ids[:, cp_index]
        embeddings = self.language_model.embedding(input_ids=local_ids, position_ids=None)
        if self.audio_encoder is not None:
            chunks = 0 if audio_features is None else audio_features.shape[0]
            if audio_features is None:
                audio = embeddings.new_zeros(0, embeddings.shape[-1])
            elif cp_index is None:
                audio = self.encode_audio(audio_features)
            else:
                per_chunk = self.audio_tokens_per_chunk()
                found = int((input_ids == self.audio_token_id).sum())  # the whole stream, as at CP=1
                check_audio_count(found, chunks * per_chunk, self.audio_token_id, chunks)
                mine = local_audio(input_ids, cp_index, self.audio_token_id, per_chunk)
                audio = (
                    self.encode_audio(audio_features[mine.chunks])[mine.rows]
                    if len(mine.chunks)
                    else embeddings.new_zeros(0, embeddings.shape[-1])
                )
            embeddings = splice_audio(embeddings, local_ids, audio, self.audio_token_id, chunks)
        elif audio_features is not None:
            raise ValueError("audio_features given but this model has no audio encoder")
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            if self.config.clone_scatter_output_in_embedding:
                embeddings = embeddings.clone()
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        packed_seq_params=None,
        runtime_gather_output: bool | None = None,
        cp_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [b, s, vocab(/TP)] or, with `labels`, per-token loss [b, s] (last pipeline stage).

        With `cp_index`, `input_ids` is the whole flat stream [1, S] and every other input is this CP rank's
        share (see `embed`)."""
        decoder_input = self.embed(input_ids, audio_features, cp_index) if self.pre_process else None
        return self.language_model(
            input_ids if cp_index is None else input_ids[:, cp_index],
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            loss_mask=loss_mask,
            runtime_gather_output=runtime_gather_output,
        )
