"""Tokenizer-aware merge of the token embedding and LM head (same rules for both, row for row).

Rows 0..S-1 are special tokens, laid out as in the merged tokenizer (Devstral's ranks plus Voxtral-only
specials in their assigned slots, see `tokenizer/align.py`):
- Voxtral-only specials: Voxtral's row, copied from its old rank;
- common specials: Voxtral-weight-alpha average when both rows are non-trivial (row norm above a
  threshold), else the non-trivial one; the method's `VERBATIM_ROWS` (SLERP's transcription control
  rows) are Voxtral's row as is;
- Devstral-only specials and placeholders: Devstral's row.
Rows S.. (the shared regular vocabulary, plus any padding) are merged by the method as one tensor.
"""

from __future__ import annotations

from collections import Counter

import torch

from megatron_ext.merge.methods import MergeParams, Method, RowMerge, TensorContext
from megatron_ext.merge.methods.linear import linear
from megatron_ext.tokenizer.align import TokenizerAlignment

# Common specials taken from Voxtral as they are, per method: SLERP keeps the transcription control rows.
VERBATIM_ROWS = {"slerp": frozenset({"[TRANSCRIBE]", "[AUDIO]", "[BEGIN_AUDIO]"})}


def merge_vocab_rows(
    dev: torch.Tensor,
    vox: torch.Tensor,
    base: torch.Tensor | None,
    alignment: TokenizerAlignment,
    method: Method,
    params: MergeParams,
    ctx: TensorContext,
    min_row_norm: float,
    regular: RowMerge | None = None,
) -> tuple[torch.Tensor, Counter]:
    """The merged [vocab, hidden] matrix and a count of how each special row was produced. `regular`
    merges the rows after the specials instead of `method.merge` (rows of a larger matrix, streamed)."""
    s = alignment.num_special_tokens
    verbatim_voxtral = VERBATIM_ROWS.get(method.name, frozenset())
    out = torch.empty_like(dev)
    if regular is None:
        method.merge(dev[s:], vox[s:], None if base is None else base[s:], params, ctx, out=out[s:])
    else:
        regular(dev[s:], vox[s:], out[s:])
    out[:s] = dev[:s]
    old_rank = {new: old for old, new in alignment.voxtral_to_merged.items()}
    voxtral_only, common = set(alignment.voxtral_only), set(alignment.common)
    stats: Counter = Counter()
    for rank, token in alignment.merged_specials.items():
        if token in voxtral_only or (token in common and token in verbatim_voxtral):
            out[rank] = vox[old_rank[rank]]
            stats["copied_from_voxtral"] += 1
        elif token in common:
            d, v = dev[rank], vox[old_rank[rank]]
            d_ok = float(d.float().norm()) > min_row_norm
            v_ok = float(v.float().norm()) > min_row_norm
            if d_ok and v_ok:
                out[rank] = linear([d, v], [1.0 - params.alpha, params.alpha])
                stats["averaged"] += 1
            elif v_ok:
                out[rank] = v
                stats["copied_from_voxtral"] += 1
            else:
                stats["kept_devstral"] += 1
        else:
            stats["kept_devstral"] += 1
    return out, stats
