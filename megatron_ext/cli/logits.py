"""Write a checkpoint's logits for given tokens (and audio) on CPU in fp32; optionally compare with HF transformers.

--checkpoint: a Megatron torch_dist directory (with checkpoint_meta.json), an HF directory (Voxtral, Mistral or
Ministral3 safetensors; FP8 weights are dequantised) or a Mistral-native directory; HF and native inputs are
converted on the fly. --tokens: comma-separated ids. With --audio, each clip becomes 30 s log-mel chunks
(padded); the tokens hold either one [AUDIO] id per clip (expanded to 375 per chunk) or the full expansion.
--output: safetensors with key `logits`, shape [seq, vocab] (float32); the used token ids are in its metadata.
--compare-hf also runs HF transformers on the same input and prints max_abs_diff=<value>.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", module=r"megatron\.")  # import-time notices (no Apex/TE on CPU)

from megatron_ext.checkpoint.metadata import verification  # noqa: E402
from megatron_ext.cli._errors import error_policy  # noqa: E402
from megatron_ext.cli._verify import add_no_verify  # noqa: E402
from megatron_ext.models.logits import checkpoint_logits, write_logits  # noqa: E402


def _tokens(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--tokens is empty")
    return ids


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-logits: compute (and optionally compare) the logits, write them as safetensors."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="torch_dist, HF or Mistral-native directory")
    parser.add_argument("--tokens", type=_tokens, required=True, help="token ids, e.g. 1,3,24,4")
    parser.add_argument("--audio", type=Path, nargs="*", default=[], help="audio clips (WAV/FLAC/OGG), in order")
    parser.add_argument("--output", type=Path, required=True, help="output .safetensors (key `logits`)")
    parser.add_argument("--compare-hf", action="store_true", help="also run HF transformers; print max_abs_diff")
    add_no_verify(parser)
    args = parser.parse_args(argv)
    with verification(not args.no_verify):
        result = checkpoint_logits(args.checkpoint, args.tokens, args.audio, compare_hf=args.compare_hf)
    write_logits(result, args.output)
    print(f"wrote {args.output}: logits [{result.logits.shape[0]}, {result.logits.shape[1]}]")
    if result.max_abs_diff is not None:
        print(f"max_abs_diff={result.max_abs_diff:.3e}")
    return 0
