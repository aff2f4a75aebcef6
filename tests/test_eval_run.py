"""Benchmarks end to end on the tiny merged model (CPU): voicing, prompts, batched greedy generation,
scoring, records, resume; SWE-Bench ingest; the LLM judge over real HTTP; CLI errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megatron_ext.audio.tts import EspeakTTS
from megatron_ext.audio.wer import corpus_wer
from megatron_ext.eval import metrics
from megatron_ext.eval.benchmarks import BENCHMARKS, BenchmarkFormatError, get_benchmark, load_samples
from megatron_ext.eval.generation import HFGenerator, load_generator
from megatron_ext.eval.identity import checkpoint_fingerprint, served_name
from megatron_ext.eval.judge import AnswerJudge
from megatron_ext.eval.prompts import build_prompt, load_tokenizer
from megatron_ext.eval.runner import evaluate
from megatron_ext.eval.store import load_results
from megatron_ext.eval.swebench import ingest_swebench
from megatron_ext.eval.toolcall import score_tool_call
from megatron_ext.eval.voice import voice_benchmark

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "eval"
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
needs_librivox = pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="Debian pocketsphinx-testdata not installed")


@pytest.fixture(scope="module")
def merged(tiny_dir, tmp_path_factory) -> Path:
    """The tiny linear alpha=0.1 merge, made by the project's merge tool."""
    out = tmp_path_factory.mktemp("merge") / "linear-0.1"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/merge.py"),
            "--devstral",
            str(tiny_dir / "devstral-hf"),
            "--voxtral",
            str(tiny_dir / "voxtral-hf"),
            "--output",
            str(out),
            "--method",
            "linear",
            "--alpha",
            "0.1",
            "--rope-from",
            "devstral",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def generator(merged) -> HFGenerator:
    return load_generator(merged)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Every benchmark's example file; the spoken ones voiced with espeak-ng through the data pipeline's TTS."""
    out = tmp_path_factory.mktemp("data")
    tts = EspeakTTS()
    files = {
        "librispeech": EXAMPLES / "librispeech.jsonl",
        "mmlu_text": EXAMPLES / "mmlu_text.jsonl",
        "toolcall_typed": EXAMPLES / "toolcall_text.jsonl",
    }
    for bench, source in (
        ("fleurs", "fleurs_text"),
        ("llama_questions", "llama_questions_text"),
        ("mmlu_audio", "mmlu_text"),
        ("toolcall_spoken", "toolcall_text"),
    ):
        files[bench] = out / f"{bench}.jsonl"
        assert voice_benchmark(bench, EXAMPLES / f"{source}.jsonl", files[bench], tts) > 0
    return files


@needs_librivox
def test_every_benchmark_end_to_end(merged, generator, data, tmp_path):
    results = tmp_path / "results.jsonl"
    for bench in BENCHMARKS:
        record = evaluate(bench, merged, data[bench], results, generator=generator, batch_size=8, max_new_tokens=8)
        assert record.n == len(load_samples(BENCHMARKS[bench], data[bench]))
        rows = [json.loads(line) for line in Path(record.source["predictions"]).read_text().splitlines()]
        samples = {s.id: s for s in load_samples(BENCHMARKS[bench], data[bench])}
        assert sorted(r["id"] for r in rows) == sorted(samples)
        # the headline number equals the metric recomputed from the saved predictions
        if bench in ("fleurs", "librispeech"):
            expected = corpus_wer([samples[r["id"]].fields["text"] for r in rows], [r["prediction"] for r in rows]).wer
        elif bench.startswith("toolcall"):
            expected = metrics.mean(
                [score_tool_call(r["prediction"], samples[r["id"]].fields["answer"])["correct"] for r in rows]
            )
        elif bench == "llama_questions":
            expected = metrics.mean(
                [metrics.answer_contained(r["prediction"], samples[r["id"]].fields["answers"]) for r in rows]
            )
        else:
            expected = metrics.mean(
                [
                    metrics.extract_choice(r["prediction"], len(samples[r["id"]].fields["choices"]))
                    == samples[r["id"]].fields["answer"]
                    for r in rows
                ]
            )
        assert record.value == pytest.approx(expected, abs=1e-12), bench
    report = tmp_path / f"{served_name(merged)}.verified-run.json"  # the harness names it MODEL.RUN_ID.json
    report.write_text(json.dumps({"total_instances": 500, "resolved_ids": ["a__a-1", "b__b-2", "c__c-3"]}))
    ingest_swebench(report, merged, results)
    stored = {r.benchmark: r for r in load_results(results)}
    assert set(stored) == set(BENCHMARKS) | {"swebench"}
    assert stored["swebench"].value == 3 / 500 and stored["swebench"].n == 500
    for record in stored.values():  # provenance: the merge recipe, and labels derived from it
        assert record.checkpoint == "linear-0.1"
        assert record.labels == {"role": "merge", "method": "linear", "alpha": 0.1}
        assert record.provenance["metadata"]["merge.json"]["params"] == {"alpha": 0.1, "method": "linear"}


def test_audio_prompt_layout(merged, data):
    tokenizer = load_tokenizer(merged)
    sample = load_samples(get_benchmark("mmlu_audio"), data["mmlu_audio"])[0]
    prompt = build_prompt(tokenizer, get_benchmark("mmlu_audio"), sample)
    audio_id = 24
    assert len(prompt.audio) == 1 and prompt.audio[0].shape == (480_000,)  # padded to 30 s
    assert prompt.tokens.count(audio_id) == 375  # 12.5 Hz x 30 s per chunk
    assert "What is the value" not in tokenizer.decode(prompt.tokens)  # the question is spoken, not written
    asr = build_prompt(tokenizer, get_benchmark("fleurs"), load_samples(get_benchmark("fleurs"), data["fleurs"])[0])
    assert asr.tokens[-1] == 34  # [TRANSCRIBE]


def test_resume_generates_only_missing_samples(merged, generator, data, tmp_path):
    results, counting = tmp_path / "r.jsonl", Counting(generator)
    first = evaluate("mmlu_text", merged, data["mmlu_text"], results, generator=counting, max_new_tokens=6)
    predictions = Path(first.source["predictions"])
    lines = predictions.read_text().splitlines()
    predictions.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # crash mid-line after two samples
    counting.prompts = 0
    second = evaluate("mmlu_text", merged, data["mmlu_text"], results, generator=counting, max_new_tokens=6)
    assert counting.prompts == len(lines) - 2
    assert second.value == first.value
    rows = sorted((json.loads(x) for x in predictions.read_text().splitlines()), key=lambda r: r["id"])
    assert rows == sorted((json.loads(x) for x in lines), key=lambda r: r["id"])
    evaluate("mmlu_text", merged, data["mmlu_text"], results, generator=counting, max_new_tokens=6, restart=True)
    assert counting.prompts == 2 * len(lines) - 2


def _mixed_prompts(checkpoint: Path, data: dict[str, Path], benches: tuple[str, ...], per_bench: int = 2) -> list:
    tokenizer = load_tokenizer(checkpoint)
    return [
        build_prompt(tokenizer, get_benchmark(b), s)
        for b in benches
        for s in load_samples(get_benchmark(b), data[b])[:per_bench]
    ]


def test_megatron_greedy_equals_hf_on_the_merged_model(merged, generator, data):
    """Our AudioLanguageModel on Megatron-Core's KV cache gives the transformers reference's greedy tokens,
    batched with left padding, with and without audio; the no-cache path agrees too."""
    reference = load_generator(merged, "hf")
    prompts = _mixed_prompts(merged, data, ("mmlu_audio", "mmlu_text", "llama_questions"), per_bench=1)
    prompts += _mixed_prompts(merged, data, ("mmlu_text",), per_bench=3)[1:]
    expected = reference.generate(prompts, 12)
    assert generator.name.startswith("megatron:") and generator.use_cache
    assert generator.generate(prompts, 12) == expected
    assert len({len(p.tokens) for p in prompts}) > 1  # the batch really is left-padded
    assert [generator.generate([p], 12)[0] for p in prompts[::2]] == expected[::2]  # batched = one at a time
    generator.use_cache = False
    try:
        assert generator.generate(prompts, 12) == expected
    finally:
        generator.use_cache = True


@pytest.mark.parametrize("parent", ["devstral-hf", "devstral2-hf"])
def test_megatron_greedy_equals_hf_on_text_parents(tiny_dir, data, parent):
    """Devstral (plain rope) and Devstral-2 (YaRN + llama-4 query scaling, FP8 weights) both decode on the
    KV cache, the llama-4 scale following every row's true positions."""
    megatron, reference = load_generator(tiny_dir / parent), load_generator(tiny_dir / parent, "hf")
    assert megatron.use_cache
    prompts = _mixed_prompts(tiny_dir / parent, data, ("mmlu_text",))
    assert megatron.generate(prompts, 40) == reference.generate(prompts, 40)  # past YaRN's original context of 32


def test_torch_dist_checkpoint_generates_like_its_hf_source(tiny_dir, tmp_path, data):
    """A torch_dist checkpoint (conversion tool) on both backends gives the HF source's tokens."""
    from megatron_ext.checkpoint.convert import convert

    convert(tiny_dir / "voxtral-hf", tmp_path / "mg", "megatron", progress=False)
    expected = load_generator(tiny_dir / "voxtral-hf", "hf").generate(
        _mixed_prompts(tiny_dir / "voxtral-hf", data, ("fleurs",)), 10
    )
    prompts = _mixed_prompts(tmp_path / "mg", data, ("fleurs",))
    exported = load_generator(tmp_path / "mg", "hf")
    assert exported.name.startswith("hf-export:")
    assert exported.generate(prompts, 10) == expected
    assert load_generator(tmp_path / "mg").generate(prompts, 10) == expected


class Counting:
    """Wraps a generator and counts the prompts it is asked to generate for."""

    def __init__(self, inner):
        self.inner, self.name, self.has_audio, self.prompts = inner, inner.name, inner.has_audio, 0

    def generate(self, prompts, max_new_tokens):
        self.prompts += len(prompts)
        return self.inner.generate(prompts, max_new_tokens)


class _JudgeHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.fail_next:
            self.server.fail_next -= 1
            self.send_response(503)
            self.end_headers()
            return
        task = json.loads(body["messages"][-1]["content"])
        # a lenient grader (substring, any case): differs from the whole-word answer match on purpose
        correct = any(a.lower() in task["model_answer"].lower() for a in task["acceptable_answers"])
        reply = {"choices": [{"message": {"content": json.dumps({"correct": correct})}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    server.requests, server.fail_next = [], 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_llm_judge_over_http(judge_server, monkeypatch):
    from megatron_ext.http_client import RetryPolicy

    monkeypatch.setenv("JUDGE_API_KEY", "sk-test-secret")
    judge = AnswerJudge(f"http://127.0.0.1:{judge_server.server_address[1]}/v1", "grader", RetryPolicy(2.0, 2, 0.01))
    judge_server.fail_next = 1  # one 503, retried
    assert judge.correct("Capital of France?", ["Paris"], "Parisian food") is True  # lenient judge
    assert metrics.answer_contained("Parisian food", ["Paris"]) is False  # the default match is strict
    assert judge.correct("Capital of France?", ["Paris"], "London") is False
    request = judge_server.requests[-1]
    assert request["response_format"]["type"] == "json_schema" and request["temperature"] == 0.0


def test_judge_replaces_the_match_in_records(merged, generator, data, tmp_path, judge_server):
    from megatron_ext.http_client import RetryPolicy

    judge = AnswerJudge(f"http://127.0.0.1:{judge_server.server_address[1]}/v1", "grader", RetryPolicy(2.0, 0, 0.01))
    record = evaluate(
        "llama_questions",
        merged,
        data["llama_questions"],
        tmp_path / "r.jsonl",
        generator=generator,
        max_new_tokens=6,
        judge=judge,
    )
    rows = [json.loads(line) for line in Path(record.source["predictions"]).read_text().splitlines()]
    assert all("contained" in r for r in rows) and record.source["judge"] == "grader"
    assert len(judge_server.requests) == len(rows)


def test_swebench_ingest_is_tied_to_the_served_model(tmp_path, merged, tiny_dir, capsys):
    """The report names the checkpoint's served model NAME@FINGERPRINT12 (field, with or without a provider
    prefix, or harness file name), or it is refused: another name, another checkpoint under the same name."""
    from megatron_ext.cli.evaluate import main

    model = served_name(merged)
    fingerprint = checkpoint_fingerprint(merged)
    merge_json = json.loads((merged / "merge.json").read_text())
    assert model == f"linear-0.1@{fingerprint[:12]}"  # from the sha256 digests merge.json records
    assert fingerprint == checkpoint_fingerprint(merged.parent / merged.name)  # a path spelling changes nothing
    assert set(merge_json["sha256"]) == {p.name for p in merged.iterdir()} - {"merge.json", "config.json"} - {
        p.name for p in merged.glob("*.index.json")
    }
    named = tmp_path / "report.json"
    named.write_text(json.dumps({"model_name_or_path": model, "resolved_ids": ["a__a-1", "b__b-2"]}))
    record = ingest_swebench(named, merged, tmp_path / "r.jsonl")
    assert record.value == 2 / 500 and record.source["model"] == model
    assert record.source["checkpoint_sha256"] == fingerprint
    named.write_text(json.dumps({"model_name_or_path": f"openai/{model}", "resolved_ids": ["a__a-1"]}))
    assert ingest_swebench(named, merged, tmp_path / "r.jsonl").value == 1 / 500  # litellm's provider prefix
    by_file = tmp_path / f"proxy@{fingerprint[:12]}.run1.json"
    by_file.write_text(json.dumps({"resolved_ids": ["a__a-1"], "total_instances": 50}))
    assert ingest_swebench(by_file, merged, tmp_path / "r.jsonl", name="proxy").value == 1 / 50
    assert {r.checkpoint for r in load_results(tmp_path / "r.jsonl")} == {"linear-0.1", "proxy"}
    by_file = tmp_path / f"hosted_vllm__{model}.run2.json"  # harness file of a prefixed model name
    by_file.write_text(json.dumps({"resolved_ids": ["a__a-1", "b__b-2"], "total_instances": 500}))
    assert ingest_swebench(by_file, merged, tmp_path / "r.jsonl").value == 2 / 500
    parent = served_name(tiny_dir / "voxtral-hf", "linear-0.1")  # the same name on another checkpoint
    assert parent != model and parent.startswith("linear-0.1@")
    for body, message in [
        ({"model_name_or_path": "devstral", "resolved_ids": []}, "report for model 'devstral'"),
        ({"model_name_or_path": "linear-0.1", "resolved_ids": []}, "report for model 'linear-0.1'"),
        ({"model_name_or_path": parent, "resolved_ids": []}, "another checkpoint named 'linear-0.1'"),
        ({"resolved_ids": ["a"]}, "the report names no model"),
        (["a__a-1"], "expected a harness report object"),
        ({"model_name_or_path": model, "resolved_ids": ["a", "a"]}, "duplicate instance ids"),
        ({"model_name_or_path": model, "resolved_ids": ["a", "b", "c"], "total_instances": 2}, "count 2"),
    ]:
        named.write_text(json.dumps(body))
        out = tmp_path / "refused" / "r.jsonl"
        assert main(["swebench", "--checkpoint", str(merged), "--data", str(named), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
        assert not out.exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": 1, "question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
        ('{"id": 1, "question": "q", "choices": ["a", "b"], "answer": "C"}', "field 'answer' must be one of"),
        ('{"id": 1, "question": "q", "choices": "ab", "answer": "A"}', "field 'choices' must be a list"),
        (
            '{"id": 1, "question": "q", "choices": ["a", "b"], "answer": "A"}\n'
            '{"id": 1, "question": "q", "choices": ["a", "b"], "answer": 1}',
            ":2: duplicate id '1'",
        ),
        ("not json", ":1: not JSON"),
    ],
)
def test_bad_benchmark_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "b.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(BenchmarkFormatError, match=message) as info:
        load_samples(get_benchmark("mmlu_text"), path)
    assert str(path) in str(info.value)


def test_audio_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "x", "text": "hello"}\n')
    with pytest.raises(BenchmarkFormatError, match="needs field 'audio'"):
        load_samples(get_benchmark("fleurs"), path)
    path.write_text('{"id": "x", "text": "hello", "audio": "missing.wav"}\n')
    with pytest.raises(BenchmarkFormatError, match="no such file"):
        load_samples(get_benchmark("fleurs"), path)
    path.write_text('{"id": "x", "text": "hello", "audio_b64": "bm90IGF1ZGlv"}\n')
    with pytest.raises(BenchmarkFormatError, match="cannot read audio"):
        load_samples(get_benchmark("fleurs"), path)[0].audio()


@needs_librivox
def test_inline_audio_equals_file_audio(tmp_path):
    shutil.copy(LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0880.wav", tmp_path / "clip.wav")
    import base64

    b64 = base64.b64encode((tmp_path / "clip.wav").read_bytes()).decode()
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"id": "f", "audio": "clip.wav", "text": "t"})
        + "\n"
        + json.dumps({"id": "i", "audio_b64": b64, "text": "t"})
        + "\n"
    )
    by_file, inline = load_samples(get_benchmark("librispeech"), tmp_path / "a.jsonl")
    assert by_file.audio().shape == (47840,)  # 16 kHz file: no resampling
    assert (by_file.audio() == inline.audio()).all()


def test_cli_wer_and_errors(tmp_path, capsys):
    import tools.evaluate as cli

    refs, hyps = tmp_path / "refs.jsonl", tmp_path / "hyps.jsonl"
    refs.write_text('{"id": "a", "text": "He paid twenty-one dollars."}\n{"id": "b", "text": "the quick brown fox"}\n')
    hyps.write_text('{"id": "b", "text": "the quick brown box"}\n{"id": "a", "text": "he paid $21"}\n')
    assert cli.main(["wer", "--references", str(refs), "--hypotheses", str(hyps)]) == 0
    assert capsys.readouterr().out.strip() == f"wer={1 / 7:.6f}"
    hyps.write_text('{"id": "b", "text": "x"}\n')
    assert cli.main(["wer", "--references", str(refs), "--hypotheses", str(hyps)]) == 2
    assert "no hypothesis for 1 reference id(s), e.g. 'a'" in capsys.readouterr().err
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"id": 1}\n')
    code = cli.main(
        ["mmlu_text", "--checkpoint", str(tmp_path), "--data", str(bad), "--output", str(tmp_path / "r.jsonl")]
    )
    assert code == 2 and f"{bad}:1: missing field 'question'" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_wer_files_refuse_duplicate_and_unmatched_ids(tmp_path):
    """A repeated id (reference or hypothesis) or a hypothesis without a reference is an error, not a WER."""
    from megatron_ext.eval.runner import wer_of_files

    refs, hyps = tmp_path / "refs.jsonl", tmp_path / "hyps.jsonl"
    refs.write_text('{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n')
    hyps.write_text('{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n')
    assert wer_of_files(refs, hyps).wer == 0.0
    refs.write_text('{"id": "a", "text": "one two"}\n{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n')
    with pytest.raises(ValueError, match=r"refs.jsonl:2: duplicate id 'a'"):
        wer_of_files(refs, hyps)
    refs.write_text('{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n')
    hyps.write_text('{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n{"id": "c", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"hyps.jsonl: 1 id\(s\) not in .*refs.jsonl, e.g. 'c'"):
        wer_of_files(refs, hyps)


def test_labels_follow_conversion_and_sft_metadata(merged, tmp_path, monkeypatch):
    """A torch_dist copy of the merge keeps its recipe labels (via checkpoint_meta sources); an SFT step
    checkpoint gets role, run, mixture, audio epochs and base from the saved SFT config."""
    from megatron_ext.checkpoint.convert import convert
    from megatron_ext.checkpoint.metadata import CheckpointMeta, read_meta, write_meta
    from megatron_ext.eval.provenance import checkpoint_provenance, labels_from_provenance
    from megatron_ext.eval.store import checkpoint_identity
    from megatron_ext.training.config import load_config, to_yaml

    convert(merged, tmp_path / "merged-torch_dist", "megatron", progress=False)
    assert labels_from_provenance(checkpoint_provenance(tmp_path / "merged-torch_dist")) == {
        "role": "merge",
        "method": "linear",
        "alpha": 0.1,
    }
    cfg = load_config(
        ROOT / "examples/configs/tiny_cpu.yaml",
        [f"model.checkpoint={tmp_path / 'merged-torch_dist'}", f"checkpoint.save_dir={tmp_path / 'run-80-20'}"],
    )
    step = tmp_path / "run-80-20" / "iter_0000025"
    step.mkdir(parents=True)
    model = read_meta(tmp_path / "merged-torch_dist").model
    write_meta(
        step,
        CheckpointMeta(
            model=model,
            tool="sft",
            sources=[{"path": str(tmp_path / "merged-torch_dist")}],
            extra={"sft_config": to_yaml(cfg)},
        ),
    )
    labels = labels_from_provenance(checkpoint_provenance(step))
    assert labels == {
        "role": "sft",
        "method": "linear",
        "alpha": 0.1,
        "config": "run-80-20",
        "base": "merged-torch_dist",
        "mixture": "80:20",
        "audio_epochs": 1.0,
    }
    assert checkpoint_identity(step) == ("run-80-20@25", {"step": 25})


def test_predictions_of_other_settings_are_not_resumed(merged, generator, data, tmp_path):
    results = tmp_path / "r.jsonl"
    first = evaluate("mmlu_text", merged, data["mmlu_text"], results, generator=generator, max_new_tokens=4)
    path = Path(first.source["predictions"])
    first_keys = {json.loads(line)["run"] for line in path.read_text().splitlines()}
    counting = Counting(generator)
    evaluate("mmlu_text", merged, data["mmlu_text"], results, generator=counting, max_new_tokens=5)
    second_keys = {json.loads(line)["run"] for line in path.read_text().splitlines()}
    assert counting.prompts == first.n  # nothing reused: the generation limit changed
    assert len(first_keys) == len(second_keys) == 1 and first_keys != second_keys
