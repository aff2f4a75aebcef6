"""Stage 3 end to end: CLI, structure preservation, WebDataset + energon, faults, bad input, resume."""

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from synth_http_server import FakeEndpoints

from megatron_ext.data.synth.config import SynthConfig
from megatron_ext.data.synth.errors import SynthError
from megatron_ext.data.synth.files import reserved
from megatron_ext.data.synth.pipeline import run, shard_costs
from megatron_ext.data.synth.shards import ShardPaths, process_shard
from megatron_ext.http_client import RetryPolicy
from tools.synth_audio import main

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "coding_trajectories.jsonl"


def offline(tmp_path: Path, **kw) -> SynthConfig:
    return SynthConfig(input=SAMPLE, output=tmp_path / "out", tts_engine="espeak", energon_prepare=False, **kw)


def samples(out: Path) -> list[dict]:
    rows = [json.loads(line) for p in sorted(out.glob("samples-*.jsonl")) for line in p.read_text().splitlines()]
    return sorted(rows, key=lambda s: s["synth"]["row"])


def test_cli_offline_run_keeps_structure_and_prepares_energon_shards(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--input", str(SAMPLE), "--output", str(out), "--num-shards", "2", "--tts-engine", "espeak"])
    assert rc == 0
    inputs = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    got = samples(out)
    assert [s["synth"]["row"] for s in got] == list(range(1, len(inputs) + 1))
    for src, dst in zip(inputs, got, strict=True):
        assert dst["tools"] == src["tools"] and dst["id"] == src["id"]
        assert [m["role"] for m in dst["messages"]] == [m["role"] for m in src["messages"]]
        for a, b in zip(src["messages"], dst["messages"], strict=True):
            if a["role"] != "user":
                assert a == b  # system prompt, tool calls and tool results untouched
        for turn in dst["synth"]["turns"]:
            message = dst["messages"][turn["message"]]
            if "duration_s" in turn:
                part = message["content"][0]
                assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
                assert message["transcription"].strip()
            else:
                assert message == src["messages"][turn["message"]]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["energon_prepared"] and report["rows_done"] == 16
    assert report["decisions"] == {"DIRECT": 6, "REWRITE": 4, "NO": 8} and report["voiced"] == 10
    assert report["tts_failures"] == 0 and report["audio_hours"] > 0
    # WebDataset members and the Energon metadata
    meta = out / "wds" / ".nv-meta"
    assert yaml.safe_load((meta / "dataset.yaml").read_text())["__class__"] == "CrudeWebdataset"
    assert sum(json.loads((meta / ".info.json").read_text())["shard_counts"].values()) == 16
    with tarfile.open(out / "wds" / "shard-00000-of-00002.tar") as tar:
        names = tar.getnames()
        first = json.loads(tar.extractfile("r000000001.json").read())
        wav = tar.extractfile("r000000001.audio_0.wav").read()
    assert names[:3] == ["r000000001.json", "r000000001.audio_0.wav", "r000000001.audio_1.wav"]
    assert first["messages"][1]["content"][0]["input_audio"]["data"] == "audio_0.wav"
    assert sf.info(io.BytesIO(wav)).samplerate == 16000
    assert '"complete": true' in capsys.readouterr().out


def test_http_endpoints_with_faults_keep_every_sample(tmp_path):
    with FakeEndpoints() as server:
        server.faults["/v1/chat/completions"].append("500")
        server.faults["/v1/audio/speech"].extend(["500", "500"])
        cfg = offline(
            tmp_path,
            judge_url=server.base_url,
            judge_model="judge",
            tts_url=server.base_url,
            tts_model="clone",
            concurrency=4,
            retry=RetryPolicy(timeout_s=5, retries=0),
        )
        report = run(cfg)
    assert report["rows_done"] == 16 and report["judge_errors"] == 1 and report["tts_failures"] == 2
    assert report["voiced"] in (7, 8)  # 10 speakable turns, 2 TTS failures, the judge error may hit one of them
    got = samples(cfg.output)
    failed = [(s, t) for s in got for t in s["synth"]["turns"] if "tts_error" in t]
    assert len(failed) == 2 and all(isinstance(s["messages"][t["message"]]["content"], str) for s, t in failed)
    voices = {t["voice"] for s in got for t in s["synth"]["turns"] if "voice" in t}
    assert voices and all(v.startswith("sense_and_sensibility") for v in voices)


BAD_ROWS = [
    '{"messages": [{"role": "user", "content": "Please run the tests."}]}',
    '{"messages": [{"role": "user", "content": "unterminated',
    '{"messages": [{"content": "who am I?"}]}',
    '{"messages": []}',
    '{"messages": [{"role": "user", "content": 42}]}',
    json.dumps({"messages": [{"role": "user", "content": "Please read this. " * 40}]}),
    '{"messages": [{"role": "user", "content": "   "}]}',
    "",
    '{"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]}',
]


def test_bad_rows_are_reported_with_row_numbers_and_kept(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(BAD_ROWS) + "\n")
    cfg = dataclasses.replace(offline(tmp_path), input=bad, max_chars=500)
    report = run(cfg)
    assert report["rows_done"] == len(BAD_ROWS) and report["voiced"] == 1
    assert [(r["row"], r["error"].split(": ")[1]) for r in report["invalid_rows"]] == [
        (2, "json"),
        (3, "messages[0].role"),
        (4, "messages"),
        (5, "messages[0].content"),
        (8, "line"),
    ]
    assert report["skipped_turns"] == {
        "empty content": {"count": 1, "rows": [7]},
        "non-string content": {"count": 1, "rows": [9]},
        "too long": {"count": 1, "rows": [6]},
    }
    got = samples(cfg.output)
    assert [s["raw"] for s in got if "raw" in s] == [BAD_ROWS[i] for i in (1, 2, 3, 4, 7)]
    assert json.loads(BAD_ROWS[5])["messages"] == got[5]["messages"]  # huge message kept as text
    assert f"{bad}:2: json: malformed JSON" in capsys.readouterr().err


def test_fail_policy_stops_before_any_work_with_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(BAD_ROWS[:3]) + "\n")
    rc = main(["--input", str(bad), "--output", str(tmp_path / "out"), "--on-bad-row", "fail"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith(f"error: {bad}:2: json: malformed JSON")
    assert not (tmp_path / "out").exists()


def test_empty_input_is_an_error_not_a_complete_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = main(["--input", str(empty), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {empty}: the input has no rows"
    assert not (tmp_path / "out").exists()


def test_resume_repairs_a_torn_line_and_reproduces_the_same_bytes(tmp_path):
    cfg = offline(tmp_path)
    run(cfg)
    paths = ShardPaths(cfg.output, 0, 1)
    reference = paths.samples.read_bytes()
    tar = paths.tar.read_bytes()
    lines = reference.split(b"\n")
    torn = b"\n".join(lines[:5]) + b"\n" + lines[5][: len(lines[5]) // 2]
    paths.samples.write_bytes(torn)
    paths.done.unlink()
    paths.tar.unlink()
    report = run(cfg)
    assert paths.samples.read_bytes() == reference and paths.tar.read_bytes() == tar
    keys = [(j["row"], j["message"]) for j in map(json.loads, paths.judgments.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == report["judged_turns"]


def test_reserved_shard_is_never_written_by_a_second_process(tmp_path):
    cfg = offline(tmp_path)
    paths = ShardPaths(cfg.output, 0, 1)
    with reserved(paths.lock) as mine:
        assert mine
        assert process_shard(paths, SAMPLE, 16, lambda cache: None, 1) is False
    assert not paths.samples.exists()


def test_resuming_with_different_settings_is_refused(tmp_path):
    run(offline(tmp_path))
    with pytest.raises(SynthError, match="seed was 0 now 1"):
        run(offline(tmp_path, seed=1))


def test_workers_share_more_shards_than_workers_and_match_a_single_worker(tmp_path):
    one = run(offline(tmp_path / "one", num_shards=5))
    two = run(offline(tmp_path / "two", num_shards=5, workers=2))
    assert one["complete"] and two["complete"] and two["rows_done"] == one["rows_done"] == 16
    for k in range(5):
        name = f"samples-{k:05d}-of-00005.jsonl"
        assert (tmp_path / "two/out" / name).read_bytes() == (tmp_path / "one/out" / name).read_bytes()


def test_shard_costs_count_user_text_per_round_robin_shard(tmp_path):
    """Workers take shards largest first by this estimate: user-message characters of the shard's rows."""
    rows = [
        {"messages": [{"role": "system", "content": "x" * 500}, {"role": "user", "content": "abc"}]},
        {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "y" * 90}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    # rows 1..4 -> shards 0, 1, 0, 1; the malformed row 4 counts its line length
    assert shard_costs(path, 2) == [3 + 0, 11 + len("not json")]
