"""Stage 1: rule judge on the bundled sample, rewrite rules, fidelity check, HTTP judge with faults."""

import json
from pathlib import Path

from synth_http_server import FakeEndpoints

from megatron_ext.data.synth import rules
from megatron_ext.data.synth.fidelity import lost_tokens
from megatron_ext.data.synth.judge import HttpJudge, RuleJudge
from megatron_ext.http_client import RetryPolicy

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "coding_trajectories.jsonl"
FAST = RetryPolicy(timeout_s=0.5, retries=2, backoff_s=0.01)


def user_texts() -> list[str]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]


def test_bundled_sample_covers_every_outcome_and_every_unspeakable_kind():
    texts = user_texts()
    decisions = {rules.classify(t)[0] for t in texts}
    reasons = {rules.unspeakable_reason(t) for t in texts} - {None}
    assert decisions == {"DIRECT", "REWRITE", "NO"}
    assert {"code block", "diff", "stack trace", "non-English", "markup"} <= reasons


def test_rewrite_drops_formatting_keeps_tokens_and_turns_lists_into_prose():
    text = "## Bug 🐛\nPlease fix `load_cfg()` in src/app/config.py:\n1. read **port** 8080\n2. keep 'db_url'"
    decision, spoken = rules.classify(text)
    assert decision == "REWRITE"
    assert spoken == ("Bug. Please fix load_cfg() in src/app/config.py: First, read port 8080. Finally, keep 'db_url'.")
    assert lost_tokens(text, spoken) == []


def test_direct_and_no_decisions():
    assert RuleJudge().judge("Please run the tests again.").decision == "DIRECT"
    assert RuleJudge().judge('Traceback (most recent call last):\n  File "a.py", line 1').decision == "NO"
    assert rules.classify("🙏 🎉")[0] == "NO"  # nothing left to say once the emoji are gone


def test_fidelity_check_flags_lost_path_number_and_code_token():
    original = "Set `max_retries` to 5 in src/net/client.py, it raises KeyError: 'host'."
    lost = lost_tokens(original, "Set max retries to five in the client file, it raises a key error.")
    assert {"max_retries", "5", "src/net/client.py", "KeyError", "host"} <= set(lost)
    assert lost_tokens(original, "Set max_retries to 5 in src/net/client.py, it raises KeyError: 'host'.") == []


def test_http_judge_uses_json_schema_and_retries_server_errors():
    with FakeEndpoints() as server:
        judge = HttpJudge(server.base_url, "judge-test", FAST)
        server.faults["/v1/chat/completions"].extend(["500", "500"])
        verdict = judge.judge("Please add a **cache** to `get_user()`")
        path, headers, body = server.requests[-1]
    assert len(server.requests) == 3 and path == "/v1/chat/completions"
    assert body["response_format"]["type"] == "json_schema" and body["model"] == "judge-test"
    expected = ("REWRITE", "Please add a cache to get_user().", None)
    assert (verdict.decision, verdict.spoken_text, verdict.error) == expected


def test_http_judge_timeouts_become_a_logged_error_not_a_crash(monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "sk-test-secret")
    with FakeEndpoints(timeout_delay_s=1.0) as server:
        server.faults["/v1/chat/completions"].extend(["timeout"] * 3)
        verdict = HttpJudge(server.base_url, "judge-test", FAST).judge("Please run the tests.")
        auth = server.requests[0][1]["Authorization"]
    assert verdict.decision == "NO" and "timeout" in verdict.error and "after 3 attempt" in verdict.error
    assert auth == "Bearer sk-test-secret" and "sk-test" not in verdict.error


def test_http_judge_rejects_answers_outside_the_schema():
    with FakeEndpoints() as server:
        server.faults["/v1/chat/completions"].append("bad-schema")
        verdict = HttpJudge(server.base_url, "judge-test", FAST).judge("hello there")
    assert verdict.decision == "NO" and "schema" in verdict.error
