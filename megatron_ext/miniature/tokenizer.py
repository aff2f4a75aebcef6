"""The miniature's tokenizers: a byte-level BPE trained on the miniature's own texts, written as tekken files.

The regular vocabulary (256 bytes, then merges in the order they were learnt, split by Tekken's own
pre-tokenisation pattern) is shared; the special tokens differ as in the real parents (tekken_builder:
Voxtral v7 with [AUDIO]/[BEGIN_AUDIO]/[TRANSCRIBE], Devstral v11 with [ARGS]/[CALL_ID]), so tokenizer
alignment has rows to move. Voxtral-mini's audio section declares the miniature encoder's short chunk.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import regex

from megatron_ext.miniature.tasks import TOOLS, base_corpus, spoken_qa_tasks, tool_call_tasks, transcription_tasks
from megatron_ext.tokenizer.tekken_builder import (
    NUM_SPECIAL_TOKENS,
    VOXTRAL_AUDIO,
    build_tekken,
    devstral_spec,
    voxtral_spec,
)

TEKKEN_PATTERN = json.loads(
    r'"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|[^\\r\\n\\p{L}\\p{N}]?'
    r"[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|"
    r'\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"'
)


def train_bpe(texts: Iterable[str], n_merges: int, pattern: str = TEKKEN_PATTERN) -> list[bytes]:
    """Byte-level BPE: the 256 single bytes, then `n_merges` merged tokens, each the most frequent adjacent pair
    (ties broken by the smaller pair, so the result is deterministic); raises ValueError when the texts run out of
    pairs first."""
    words = Counter(piece.encode() for text in texts for piece in regex.findall(pattern, text))
    split = {word: [bytes([b]) for b in word] for word in words}
    vocab = [bytes([b]) for b in range(256)]
    for _ in range(n_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, parts in split.items():
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] += words[word]
        if not pairs:
            raise ValueError(f"the texts allow only {len(vocab) - 256} merges, {n_merges} asked for")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        vocab.append(merged)
        for word, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[word] = out
    return vocab


def tokenizer_texts(seed: int) -> list[str]:
    """What the BPE learns from: the base corpus and the train splits of the tasks (never held-out text)."""
    tools = tool_call_tasks(seed).train
    texts = base_corpus(seed) + [r["instruction"] for r in tools]
    texts += [json.dumps(r["answer"]["arguments"]) + " " + r["answer"]["name"] for r in tools]
    texts += [json.dumps(TOOLS)] * 20
    texts += [r["text"] for r in transcription_tasks(seed).train]
    texts += [f"{r['question']} {r['answer']}" for r in spoken_qa_tasks(seed).train]
    return texts


def miniature_tekkens(seed: int, vocab_size: int, chunk_length_s: float) -> dict[str, dict[str, Any]]:
    """{"voxtral": ..., "devstral": ...} tekken.json contents sharing one corpus-trained regular vocabulary."""
    regular = train_bpe(tokenizer_texts(seed), vocab_size - NUM_SPECIAL_TOKENS - 256)
    audio = {**VOXTRAL_AUDIO, "chunk_length_s": chunk_length_s}
    vox = voxtral_spec(vocab_size)
    return {
        "voxtral": build_tekken(type(vox)(vox.vocab_size, vox.specials, vox.version, audio), regular),
        "devstral": build_tekken(devstral_spec(vocab_size), regular),
    }
