"""Run vLLM's own readers on a Mistral-native export (in .venv-vllm, see requirements-vllm.txt; no megatron_ext).

usage: vllm_worker.py EXPORT_DIR OUT.safetensors  -> prints the adapted config as JSON; writes every tensor
under the name vLLM's Voxtral loader gives it, after vLLM's own q/k rope permutation. Names no vLLM rule
maps are reported under "unread". The prefix routing of VoxtralForConditionalGeneration.load_weights (a local
list there) is restated below; the mapping tables and the permutation are vLLM's.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open
from safetensors.torch import save_file
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.voxtral import VoxtralEncoderModel
from vllm.transformers_utils.configs.mistral import adapt_config_dict

PREFIX = "mm_whisper_embeddings."
ADAPTER = {"audio_language_projection.0.weight": "w_in.weight", "audio_language_projection.2.weight": "w_out.weight"}


def vllm_name(name: str, text_cfg: SimpleNamespace, tensor):
    """(vLLM parameter name or None, tensor as vLLM loads it) for one stored tensor."""
    is_encoder = name.startswith(PREFIX) and not name.startswith((PREFIX + "tok_embeddings", PREFIX + "audio_lang"))
    name = name.removeprefix(PREFIX)
    if is_encoder:
        for pattern, repl in VoxtralEncoderModel.mistral_remapping:
            if re.fullmatch(pattern, name):
                return re.sub(pattern, repl, name), tensor
        return None, tensor
    if name in ADAPTER:
        return "audio_language_adapter." + ADAPTER[name], tensor
    fake = SimpleNamespace(config=text_cfg, mistral_mapping=LlamaForCausalLM.mistral_mapping)
    mapped, tensor = LlamaForCausalLM.maybe_remap_mistral(fake, name, tensor)
    return (mapped if mapped.startswith(("model.", "lm_head.")) else None), tensor


def main(export: Path, out: Path) -> None:
    params = json.loads((export / "params.json").read_text())
    cfg = adapt_config_dict(params, defaults={})
    text, audio = cfg.text_config, cfg.audio_config
    mapped, unread = {}, []
    for f in sorted(export.glob("consolidated*.safetensors")):
        with safe_open(f, "pt") as sf:
            for n in sf.keys():
                name, t = vllm_name(n, text, sf.get_tensor(n))
                if name is None:
                    unread.append(n)
                else:
                    mapped[name] = t.contiguous()
    save_file(mapped, str(out))
    keys = ("window_size", "hop_length", "sampling_rate", "num_mel_bins", "downsample_factor", "d_model")
    keys += ("encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "max_source_positions", "vocab_size")
    summary = {
        "model_type": cfg.model_type,
        "architectures": cfg.architectures,
        "audio": {k: getattr(audio, k) for k in keys},
        "text": {
            k: getattr(text, k, None)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
            + (
                "intermediate_size",
                "vocab_size",
                "rope_theta",
                "rope_scaling",
                "llama_4_scaling",
                "max_position_embeddings",
            )
        },
        "unread": unread,
    }
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
