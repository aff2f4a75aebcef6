"""`report.json`: judge decisions, TTS failures, skipped turns and invalid rows (with row numbers), audio
hours and per-shard progress, recomputed from the samples files on disk."""

from collections import Counter
from pathlib import Path

from megatron_ext.data.synth.files import read_jsonl
from megatron_ext.data.synth.judge import DECISIONS
from megatron_ext.data.synth.shards import ShardPaths, shard_size

MAX_LISTED = 100


def build_report(root: Path, num_shards: int, total_rows: int, identity: dict) -> dict:
    """Summarise every shard's samples file as it is on disk now."""
    decisions: Counter = Counter()
    counts: Counter = Counter()
    skipped: dict[str, list[int]] = {}
    invalid, shards = [], []
    audio_s = 0.0
    for index in range(num_shards):
        paths = ShardPaths(root, index, num_shards)
        done = 0
        for sample in read_jsonl(paths.samples):
            done += 1
            meta = sample["synth"]
            if "error" in meta:
                invalid.append({"row": meta["row"], "error": meta["error"]})
                continue
            for turn in meta["turns"]:
                counts["user_turns"] += 1
                if "skipped" in turn:
                    skipped.setdefault(turn["skipped"], []).append(meta["row"])
                    continue
                decisions[turn["decision"]] += 1
                counts["judge_errors"] += "judge_error" in turn
                counts["fidelity_rejected"] += "fidelity_lost" in turn
                counts["tts_failures"] += "tts_error" in turn
                counts["voiced"] += "duration_s" in turn
                audio_s += turn.get("duration_s", 0.0)
        rows = shard_size(total_rows, index, num_shards)
        shards.append({"shard": paths.tag, "rows": rows, "done": done, "complete": paths.done.exists()})
    judged = sum(decisions.values())
    return {
        "settings": identity,
        "rows": total_rows,
        "rows_done": sum(s["done"] for s in shards),
        "complete": all(s["complete"] for s in shards),
        "judged_turns": judged,
        "decisions": {d: decisions[d] for d in DECISIONS},
        "fractions": {d: round(decisions[d] / judged, 4) if judged else 0.0 for d in DECISIONS},
        **{k: counts[k] for k in ("user_turns", "voiced", "tts_failures", "fidelity_rejected", "judge_errors")},
        "skipped_turns": {
            reason: {"count": len(rows), "rows": sorted(rows)[:MAX_LISTED]} for reason, rows in sorted(skipped.items())
        },
        "invalid_rows": sorted(invalid, key=lambda r: r["row"]),
        "audio_hours": round(audio_s / 3600, 6),
        "shards": shards,
    }
