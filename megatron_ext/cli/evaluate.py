"""Evaluate a checkpoint on a local benchmark file, ingest SWE-Bench harness results, or score WER.

  evaluate.py BENCH --checkpoint DIR --data PATH --output results.jsonl   (BENCH: fleurs, librispeech,
        llama_questions, mmlu_audio, mmlu_text; or swebench with --data = the harness results JSON)
  evaluate.py wer --references refs.jsonl --hypotheses hyps.jsonl        (lines {"id": ..., "text": ...})

Each run upserts one record per (checkpoint, benchmark) into the results JSONL; per-sample predictions
go to DIR-of-output/predictions/NAME.BENCH.jsonl, and a rerun with the same checkpoint files, data and
settings resumes them (no model is loaded when all are there; an unchanged record is not rewritten).
Generation is greedy and batched: on our Megatron model (default; --dtype bf16, --tp N under
`torchrun --nproc-per-node N`, rank 0 writes), on transformers (--backend hf), or on a served model
(--backend openai --endpoint URL --model NAME: OpenAI chat completions with input_audio parts).
A SWE-Bench report must name the checkpoint's served model NAME@FINGERPRINT12 (tools/serve.py --print-name).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.checkpoint.metadata import verification
from megatron_ext.cli._errors import error_policy
from megatron_ext.cli._verify import add_no_verify
from megatron_ext.eval.benchmarks import BENCHMARKS
from megatron_ext.eval.generation import BACKENDS, DTYPES
from megatron_ext.eval.judge import make_answer_judge
from megatron_ext.eval.runner import evaluate, wer_of_files
from megatron_ext.eval.store import parse_labels
from megatron_ext.eval.swebench import VERIFIED_SIZE, ingest_swebench


def _record_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (weights + tekken.json)")
    p.add_argument("--output", type=Path, required=True, help="results JSONL (record upserted by checkpoint+benchmark)")
    p.add_argument("--name", help="checkpoint name in the results (default: directory name, run@step for iter_N)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="report label, repeatable: role=parent|merge|sft|final, method, alpha, config, mixture, step...",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """One sub-command per benchmark, plus `swebench` (ingest harness results) and `wer` (score two files)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, bench in BENCHMARKS.items():
        p = sub.add_parser(name, help=f"{bench.kind} benchmark, metric {bench.metric}")
        _record_args(p)
        p.add_argument(
            "--data", type=Path, required=True, help="benchmark JSONL (format: megatron_ext/eval/benchmarks.py)"
        )
        p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
        p.add_argument("--max-new-tokens", type=int, help="generation limit (default: 128 ASR, 64 QA, 16 MCQ)")
        p.add_argument("--predictions", type=Path, help="per-sample predictions JSONL (resumed if present)")
        p.add_argument("--restart", action="store_true", help="discard earlier predictions instead of resuming")
        p.add_argument(
            "--backend",
            choices=BACKENDS,
            default="megatron",
            help="megatron: our AudioLanguageModel with a KV cache (default); hf: transformers reference; "
            "openai: a served model (--endpoint, --model)",
        )
        add_no_verify(p)
        p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and activations (megatron, hf)")
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (megatron; run under torchrun)")
        p.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (openai)")
        p.add_argument("--model", help="served model name (openai)")
        p.add_argument("--concurrency", type=int, default=4, help="requests in flight (openai)")
        if bench.kind == "spoken_qa":
            p.add_argument("--judge-url", help="OpenAI-compatible base URL of an LLM judge (default: answer match)")
            p.add_argument("--judge-model", help="judge model name (required with --judge-url)")
    p = sub.add_parser("swebench", help="ingest SWE-Bench harness results (resolved instance ids)")
    _record_args(p)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="harness report JSON naming the served model (model_name_or_path, or file MODEL.RUN_ID.json)",
    )
    p.add_argument("--total", type=int, help=f"instances in the set (default: from the report, else {VERIFIED_SIZE})")
    p = sub.add_parser("wer", help="corpus WER (Whisper English normaliser) of two JSONL files")
    p.add_argument("--references", type=Path, required=True, help='JSONL lines {"id": ..., "text": ...}')
    p.add_argument("--hypotheses", type=Path, required=True, help='JSONL lines {"id": ..., "text": ...}')
    args = parser.parse_args(argv)
    if getattr(args, "judge_url", None) and not args.judge_model:
        parser.error("--judge-url needs --judge-model")
    if getattr(args, "backend", None) == "openai" and not (args.endpoint and args.model):
        parser.error("--backend openai needs --endpoint and --model")
    if getattr(args, "tp", 1) < 1 or getattr(args, "concurrency", 1) < 1:
        parser.error("--tp and --concurrency must be >= 1")
    return args


@error_policy
def main(argv: list[str] | None = None) -> int:
    """megatron-ext-evaluate: score a checkpoint (or ingest SWE-Bench results, or score WER); upsert the record."""
    args = parse_args(argv)
    if args.bench == "wer":
        print(f"wer={wer_of_files(args.references, args.hypotheses).wer:.6f}")
        return 0
    labels = parse_labels(args.label)
    if args.bench == "swebench":
        record = ingest_swebench(
            args.data, args.checkpoint, args.output, name=args.name, labels=labels, total=args.total
        )
    else:
        judge = make_answer_judge(getattr(args, "judge_url", None), getattr(args, "judge_model", None))
        with verification(not args.no_verify):
            record = evaluate(
                args.bench,
                args.checkpoint,
                args.data,
                args.output,
                name=args.name,
                labels=labels,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                predictions=args.predictions,
                judge=judge,
                backend=args.backend,
                dtype=args.dtype,
                tp=args.tp,
                endpoint=args.endpoint,
                model=args.model,
                concurrency=args.concurrency,
                restart=args.restart,
            )
    print(f"{record.checkpoint} {record.benchmark}: {record.metric}={record.value:.6f} (n={record.n}) -> {args.output}")
    return 0
