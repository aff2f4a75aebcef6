"""Run one benchmark on one checkpoint: prompts -> batched greedy generation -> scores -> a result record.

Predictions are appended per batch to a JSONL file, so an interrupted run resumes where it stopped; when
every prediction is already there the model is not loaded at all (the resume key is known beforehand).
Under torchrun (tensor parallel) every rank generates and rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from tqdm import tqdm

from megatron_ext.eval.benchmarks import Benchmark, Sample, get_benchmark, load_samples
from megatron_ext.eval.generation import Generator, generator_name, load_generator
from megatron_ext.eval.openai_backend import OpenAIBackend
from megatron_ext.eval.prompts import build_prompt, chat_request, load_tokenizer
from megatron_ext.eval.provenance import checkpoint_provenance, labels_from_provenance
from megatron_ext.eval.store import Record, checkpoint_identity, upsert, write_jsonl

MAX_NEW_TOKENS = {"asr": 128, "spoken_qa": 64, "mcq": 16, "toolcall": 48}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate(
    benchmark: str,
    checkpoint: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    name: str | None = None,
    labels: dict | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    predictions: str | Path | None = None,
    judge=None,
    generator: Generator | OpenAIBackend | None = None,
    loader: Callable[[], Generator] | None = None,
    backend: str = "megatron",
    dtype: str = "fp32",
    tp: int = 1,
    endpoint: str | None = None,
    model: str | None = None,
    concurrency: int = 4,
    restart: bool = False,
) -> Record:
    """Score `checkpoint` on a local benchmark file and upsert the record into the `output` JSONL store.

    `judge` (optional, spoken QA only) is an `AnswerJudge`; its verdict replaces the answer-contained match.
    `backend` picks the generator (megatron: our model with a KV cache, in `dtype` over `tp` ranks; hf: the
    transformers reference; openai: `model` served at `endpoint`, `concurrency` requests at a time) unless a
    ready `generator` is passed, or a `loader` that returns the one `backend`/`dtype` names (called only if
    something is left to generate). Predictions already in the predictions file are reused by sample id
    unless `restart` is set; when none is missing, nothing is loaded and an unchanged record is not rewritten.
    """
    bench = get_benchmark(benchmark)
    samples = load_samples(bench, data)
    default_name, default_labels = checkpoint_identity(checkpoint)
    name = name or default_name
    output = Path(output)
    predictions = (
        Path(predictions) if predictions else output.parent / "predictions" / f"{_slug(name)}.{bench.name}.jsonl"
    )
    if generator is None and loader is None and backend == "openai":
        if not endpoint or not model:
            raise ValueError("backend openai needs an endpoint and a model name")
        loader = lambda: OpenAIBackend(endpoint, model, concurrency)  # noqa: E731
    loader = loader or (lambda: load_generator(checkpoint, backend, dtype, tp))
    writer = not dist.is_initialized() or dist.get_rank() == 0
    limit = max_new_tokens or MAX_NEW_TOKENS[bench.kind]
    data_sha256 = file_sha256(data)
    generator_id = generator.name if generator is not None else generator_name(checkpoint, backend, dtype, model)
    run = _run_key(checkpoint, data_sha256, generator_id, limit)
    done = {} if restart else _resume(predictions, {s.id for s in samples}, run)
    todo = [s for s in samples if s.id not in done]
    if todo:
        generator = generator or loader()
        if generator.name != generator_id:
            raise ValueError(f"generator {generator.name!r} is not the {generator_id!r} its predictions are keyed by")
        _generate(
            generator, checkpoint, bench, todo, predictions if writer else None, done, run, batch_size, limit, judge
        )
    scores = [done[s.id] for s in samples]
    provenance = checkpoint_provenance(checkpoint)
    record = Record(
        checkpoint=name,
        benchmark=bench.name,
        metric=bench.metric,
        value=bench.aggregate(scores),
        higher_is_better=bench.higher_is_better,
        n=len(samples),
        labels={**default_labels, **labels_from_provenance(provenance), **(labels or {})},
        provenance=provenance,
        source={
            "data": str(Path(data).resolve()),
            "data_sha256": data_sha256,
            "predictions": str(predictions.resolve()),
            "generator": generator_id,
            "max_new_tokens": limit,
            "judge": getattr(judge, "model", None),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    if writer:
        upsert(output, record)
    return record


def _generate(
    generator,
    checkpoint,
    bench: Benchmark,
    todo: list[Sample],
    predictions: Path | None,
    done: dict,
    run: str,
    batch_size: int,
    limit: int,
    judge,
) -> None:
    """Predict and score `todo` in batches into `done`, appending each batch's rows to `predictions` (rank 0;
    None on the other ranks) after rewriting it with only the rows kept (stale ones and a torn line dropped)."""
    if bench.needs_audio and not generator.has_audio:
        raise ValueError(f"{checkpoint}: no audio encoder, but benchmark {bench.name} needs audio")
    tokenizer = None if isinstance(generator, OpenAIBackend) else load_tokenizer(checkpoint)
    if predictions is not None:
        write_jsonl(predictions, list(done.values()))
    with (
        open(predictions or os.devnull, "a", encoding="utf-8") as sink,
        tqdm(total=len(todo) + len(done), initial=len(done), desc=bench.name, disable=predictions is None) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for sample, text in zip(batch, _predict(generator, tokenizer, bench, batch, limit), strict=True):
                row = {"run": run, **_scored(bench, sample, text, judge)}
                done[sample.id] = row
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            bar.update(len(batch))


def _predict(generator, tokenizer, bench: Benchmark, batch: list[Sample], limit: int) -> list[str]:
    """Answer texts of a batch: chat requests to a served model, or token prompts to an in-process one."""
    if isinstance(generator, OpenAIBackend):
        return generator.complete([chat_request(bench, s) for s in batch], limit)
    outputs = generator.generate([build_prompt(tokenizer, bench, s) for s in batch], limit)
    policy = SpecialTokenPolicy.KEEP if bench.keeps_special_tokens else SpecialTokenPolicy.IGNORE
    return [tokenizer.decode(tokens, special_token_policy=policy) for tokens in outputs]


def _scored(bench: Benchmark, sample: Sample, prediction: str, judge) -> dict:
    row = {"id": sample.id, "prediction": prediction, **bench.score(sample, prediction)}
    if judge is not None and bench.kind == "spoken_qa":
        row["contained"] = row["correct"]
        row["correct"] = judge.correct(sample.fields.get("question", ""), sample.fields["answers"], prediction)
    return row


def _run_key(checkpoint: str | Path, data_sha256: str, generator: str, max_new_tokens: int) -> str:
    """What a prediction depends on: the checkpoint's files (names, sizes, mtimes), data, generator, limit.

    Rows of another key (a re-trained checkpoint at the same path, other settings) are never resumed.
    """
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(checkpoint).iterdir() if p.is_file())
    key = json.dumps([files, data_sha256, generator, max_new_tokens])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _resume(predictions: Path, ids: set[str], run: str) -> dict[str, dict]:
    """Rows already predicted in this run for this benchmark's ids (a torn last line from a crash is ignored)."""
    if not predictions.exists():
        return {}
    done = {}
    for line in predictions.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("id") in ids and row.get("run") == run:
            done[row["id"]] = row
    return done


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def wer_of_files(references: str | Path, hypotheses: str | Path):
    """Corpus WER of two `{"id", "text"}` JSONL files matched by id (every reference needs a hypothesis)."""
    from megatron_ext.audio.wer import corpus_wer

    refs, hyps = _texts_by_id(references), _texts_by_id(hypotheses)
    missing, extra = sorted(set(refs) - set(hyps)), sorted(set(hyps) - set(refs))
    if missing:
        raise ValueError(f"{hypotheses}: no hypothesis for {len(missing)} reference id(s), e.g. {missing[0]!r}")
    if extra:
        raise ValueError(f"{hypotheses}: {len(extra)} id(s) not in {references}, e.g. {extra[0]!r}")
    ids = sorted(refs)
    return corpus_wer([refs[i] for i in ids], [hyps[i] for i in ids])


def _texts_by_id(path: str | Path) -> dict[str, str]:
    texts = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, text = str(row["id"]), str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{path}:{number}: expected {{"id": ..., "text": ...}} ({type(e).__name__})') from e
        if key in texts:
            raise ValueError(f"{path}:{number}: duplicate id {key!r}")
        texts[key] = text
    return texts
