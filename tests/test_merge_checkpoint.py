"""Merged checkpoints on the tiny parents: audio stack verbatim, tokenizer-aware rows, rope and provenance
metadata, HF loadability, DELLA with a base, the grid, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint.direct_io import ALIGN
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.methods.linear import linear
from megatron_ext.merge.run import MergeError, MergeJob, run_merge
from megatron_ext.tokenizer.align import TokenizerAlignment

ROOT = Path(__file__).resolve().parents[1]
EMB, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


def _merge(tiny: Path, out: Path, **kw) -> Path:
    params = MergeParams(**{"method": "linear", "alpha": 0.1, **kw.pop("params", {})})
    run_merge(
        MergeJob(
            tiny / "devstral-hf", tiny / "voxtral-hf", out, params, **{"rope_from": "devstral", **kw}, progress=False
        )
    )
    return out


@pytest.fixture(scope="module")
def linear_out(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _merge(tiny_dir, tmp_path_factory.mktemp("lin") / "out")


def test_audio_stack_copied_bit_for_bit(tiny_dir: Path, linear_out: Path) -> None:
    vox = load_file(tiny_dir / "voxtral-hf/model.safetensors")
    out = load_file(linear_out / "model.safetensors")
    audio = [n for n in vox if n.startswith(("audio_tower.", "multi_modal_projector."))]
    assert len(audio) == 39 and set(out) == set(vox)
    for n in audio:
        assert out[n].dtype == vox[n].dtype and out[n].view(torch.uint8).equal(vox[n].view(torch.uint8)), n


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_embedding_and_head_rows_follow_tokenizer_rules(tiny_dir: Path, tmp_path: Path, method: str) -> None:
    out = load_file(_merge(tiny_dir, tmp_path / "o", params={"method": method, "alpha": 0.3}) / "model.safetensors")
    dev = load_file(tiny_dir / "devstral-hf/model.safetensors")
    vox = load_file(tiny_dir / "voxtral-hf/model.safetensors")
    alignment = TokenizerAlignment.load(tmp_path / "o/tokenizer_map.json")
    for name, dname in ((EMB, "model.embed_tokens.weight"), (HEAD, "lm_head.weight")):
        m, d, v = out[name], dev[dname], vox[name]
        for rank in (24, 25, 34):  # Voxtral-only: copied from Voxtral's old rank (same rank under our rule)
            assert torch.equal(m[alignment.voxtral_to_merged[rank]], v[rank])
        for rank in (32, 33, 100):  # Devstral-only and a placeholder: Devstral's row
            assert torch.equal(m[rank], d[rank])
        for rank in (1, 3, 9):  # common, both rows non-trivial: Voxtral-weight-alpha average
            assert torch.equal(m[rank], linear([d[rank], v[rank]], [0.7, 0.3]))
        if method == "linear":
            assert torch.equal(m[1000:], linear([d[1000:], v[1000:]], [0.7, 0.3]))
    assert json.loads((tmp_path / "o/config.json").read_text())["audio_token_id"] == 24


def test_row_blocks_give_the_whole_matrix_result(
    tiny_dir: Path, linear_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every merged tensor streamed in many uneven row blocks: same bytes and same input digests."""
    from megatron_ext.merge import row_stream

    monkeypatch.setattr(row_stream, "BLOCK_BYTES", 7 * 96 * 4)  # 7 fp32 rows of hidden 96 per block
    out = _merge(tiny_dir, tmp_path / "o")
    a, b = load_file(out / "model.safetensors"), load_file(linear_out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    prov = [json.loads((d / "merge.json").read_text()) for d in (out, linear_out)]
    # content hashes are built from per-tensor XXH3-128 digests: block-wise digests equal whole-tensor ones
    assert prov[0]["parents"] == prov[1]["parents"] and prov[0]["special_rows"] == prov[1]["special_rows"]


def test_shards_are_laid_out_for_direct_writes(linear_out: Path) -> None:
    """Tensor data starts on an ALIGN boundary (padded header) and so does every tensor of whole ALIGN runs
    (written before the others), so the direct writer sends them to the device without a staging copy."""
    for shard in linear_out.glob("*.safetensors"):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % ALIGN == 0
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__")
        spans = [v["data_offsets"] for v in header.values()]
        aligned = [start for start, end in spans if (end - start) % ALIGN == 0]
        assert aligned and all((8 + n + start) % ALIGN == 0 for start in aligned)


def test_streamed_slerp_equals_the_whole_tensor_merge(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLERP streamed in 7-row blocks (coefficients from the whole tensors) gives the bits of `slerp()` on
    whole tensors and of the whole-matrix vocabulary rules."""
    from megatron_ext.merge import row_stream
    from megatron_ext.merge.embeddings import merge_vocab_rows
    from megatron_ext.merge.methods import METHODS, TensorContext
    from megatron_ext.merge.methods.slerp import slerp

    monkeypatch.setattr(row_stream, "BLOCK_BYTES", 7 * 96 * 4)
    params = MergeParams(method="slerp", alpha=0.3)
    out = load_file(_merge(tiny_dir, tmp_path / "o", params={"method": "slerp", "alpha": 0.3}) / "model.safetensors")
    dev, vox = (load_file(tiny_dir / f"{m}-hf/model.safetensors") for m in ("devstral", "voxtral"))
    alignment = TokenizerAlignment.load(tmp_path / "o" / "tokenizer_map.json")
    for name in (EMB, HEAD):
        dname = "lm_head.weight" if name == HEAD else "model.embed_tokens.weight"
        ref, _ = merge_vocab_rows(
            dev[dname], vox[name], None, alignment, METHODS["slerp"], params, TensorContext(name), 1e-6
        )
        assert torch.equal(out[name], ref), name
    for name in ("language_model.model.layers.1.mlp.down_proj.weight", "language_model.model.norm.weight"):
        assert torch.equal(out[name], slerp(0.3, dev[name.removeprefix("language_model.")], vox[name])), name


def test_output_loads_in_transformers_with_rope_and_tokenizer(tiny_dir: Path, linear_out: Path) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import VoxtralForConditionalGeneration

    model, info = VoxtralForConditionalGeneration.from_pretrained(linear_out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = load_file(linear_out / "model.safetensors")
    assert torch.equal(model.get_input_embeddings().weight, ref[EMB])
    cfg = json.loads((linear_out / "config.json").read_text())
    assert cfg["text_config"]["rope_parameters"] == {"rope_theta": 1e8, "rope_type": "default"}
    assert cfg["merge"]["method"] == "linear" and cfg["merge"]["rope_from"] == "devstral"
    tok = MistralTokenizer.from_file(str(linear_out / "tekken.json")).instruct_tokenizer.tokenizer
    assert tok.get_special_token("[AUDIO]") == 24 and tok.get_special_token("[ARGS]") == 32


def test_provenance(tiny_dir: Path, linear_out: Path) -> None:
    prov = json.loads((linear_out / "merge.json").read_text())
    assert prov["method"] == "linear" and prov["params"] == {"method": "linear", "alpha": 0.1}
    assert set(prov["parents"]) == {"devstral", "voxtral"}
    assert all(len(p["content_sha256"]) == 64 for p in prov["parents"].values())
    alignment = TokenizerAlignment.load(linear_out / "tokenizer_map.json")
    assert prov["tokenizer_map_sha256"] == alignment.sha256()
    assert prov["rope"]["theta"] == 1e8 and "seed" in prov


def test_explicit_yarn_rope_is_stored(tiny_dir: Path, tmp_path: Path) -> None:
    from megatron_ext.config import ModelConfig, RopeConfig

    rope = RopeConfig(
        theta=1e8,
        type="yarn",
        factor=48.0,
        original_max_position_embeddings=8192,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    out = _merge(tiny_dir, tmp_path / "o", rope=rope, rope_from=None)
    cfg = ModelConfig.from_hf(json.loads((out / "config.json").read_text()))
    assert cfg.decoder.rope == rope


def test_della_with_common_base_and_schedule(tiny_dir: Path, tmp_path: Path) -> None:
    params = {
        "method": "della",
        "alpha": 0.5,
        "density": 0.4,
        "epsilon": 0.1,
        "lam": 1.0,
        "rescale": "per_weight",
        "mlp_density_boost": 0.3,
        "early_layers": 1,
        "early_lambda_scale": 0.0,
    }
    out = load_file(_merge(tiny_dir, tmp_path / "o", base=tiny_dir / "base-hf", params=params) / "model.safetensors")
    base = load_file(tiny_dir / "base-hf/model.safetensors")
    # early_lambda_scale 0: layer 0 is exactly the base; layer 1 moved away from it
    for n in ("self_attn.q_proj.weight", "mlp.up_proj.weight"):
        assert torch.equal(out[f"language_model.model.layers.0.{n}"], base[f"model.layers.0.{n}"])
        assert not torch.equal(out[f"language_model.model.layers.1.{n}"], base[f"model.layers.1.{n}"])


def _cli(tiny: Path, out: Path, *args: object) -> list:
    """tools/merge.py command line on the tiny parents."""
    tool = ROOT / "tools/merge.py"
    return [
        sys.executable,
        tool,
        "--devstral",
        tiny / "devstral-hf",
        "--voxtral",
        tiny / "voxtral-hf",
        "--output",
        out,
        *args,
    ]


def test_grid_runs_every_configuration_and_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "defaults: {seed: 0}\nruns:\n  - {name: lin, method: linear, alpha: 0.1}\n"
        "  - {name: sl, method: slerp, alpha: 0.5}\n"
        "  - {name: della, method: della, density: 0.35, epsilon: 0.12, lambda: 1.05}\n"
    )
    cmd = _cli(tiny_dir, tmp_path / "grid", "--rope-from", "devstral", "--grid", grid, "--no-progress")
    subprocess.run(cmd, check=True, capture_output=True)
    manifest = json.loads((tmp_path / "grid/manifest.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == ["lin", "sl", "della"]
    assert manifest["runs"][2]["params"]["lam"] == 1.05
    mtime = (tmp_path / "grid/lin/model.safetensors").stat().st_mtime_ns
    subprocess.run(cmd, check=True, capture_output=True)  # re-run: finished configurations are kept as they are
    assert (tmp_path / "grid/lin/model.safetensors").stat().st_mtime_ns == mtime


def test_shape_mismatch_is_logged_and_skipped(tiny_dir: Path, tmp_path: Path, caplog) -> None:
    vox = tmp_path / "vox"
    shutil.copytree(tiny_dir / "voxtral-hf", vox)
    sd = load_file(vox / "model.safetensors")
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    sd[name] = torch.randn(96, 96)
    save_file(sd, str(vox / "model.safetensors"))
    summary = run_merge(
        MergeJob(
            tiny_dir / "devstral-hf",
            vox,
            tmp_path / "o",
            MergeParams(method="linear"),
            rope_from="voxtral",
            progress=False,
        )
    )
    assert summary.skipped_shape_mismatch == [name]
    assert torch.equal(load_file(tmp_path / "o/model.safetensors")[name], sd[name])
    assert name in caplog.text


# ---- bad input: one-line errors, non-zero exit, no output --------------------------------------------
def _variant(tiny: Path, tmp: Path, which: str, edit) -> Path:
    d = tmp / f"{which}-bad"
    shutil.copytree(tiny / f"{which}-hf", d)
    sd = load_file(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    edit(sd, cfg, d)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(("method", "row"), [("linear", 32), ("slerp", 32), ("slerp", 1500)])
def test_nan_in_an_input_row_the_merge_does_not_use_is_still_an_error(
    tiny_dir: Path, tmp_path: Path, method: str, row: int
) -> None:
    """Voxtral's embedding row 32 is a placeholder there (the merged rank 32 is Devstral's [ARGS]); a NaN
    in a regular row (1500) spoils SLERP's coefficients, so every block is non-finite."""
    emb = "language_model.model.embed_tokens.weight"

    def nan_row(sd, cfg, d):
        sd[emb][row, 7] = float("nan")

    vox = _variant(tiny_dir, tmp_path, "voxtral", nan_row)
    job = MergeJob(
        tiny_dir / "devstral-hf",
        vox,
        tmp_path / "o",
        MergeParams(method=method, alpha=0.3),
        rope_from="devstral",
        progress=False,
    )
    with pytest.raises(MergeError, match=f"voxtral-bad: tensor {emb} contains NaN"):
        run_merge(job)
    assert not (tmp_path / "o").exists()


def _drop_layer(sd, cfg, d):
    for n in [n for n in sd if ".layers.1." in n]:
        del sd[n]
    cfg["num_hidden_layers"] = 1


def _drop_tensor(sd, cfg, d):
    del sd["model.layers.0.mlp.down_proj.weight"]


def _nan(sd, cfg, d):
    sd["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")


def _other_vocab(sd, cfg, d):
    from megatron_ext.tokenizer.tekken_builder import build_tekken, devstral_spec, write_tekken

    write_tekken(build_tekken(devstral_spec(2304)), d / "tekken.json")


BAD = {
    "layers": (_drop_layer, [], "decoder.num_layers"),
    "missing": (_drop_tensor, [], "missing tensors"),
    "nan": (_nan, [], "model.layers.1.self_attn.k_proj.weight contains NaN"),
    "vocab": (_other_vocab, [], "num_vocab_tokens differs"),
    "alpha": (None, ["--alpha", "1.5"], "alpha=1.5"),
    "window": (None, ["--method", "della", "--density", "0.5", "--epsilon", "0.6"], "must lie in (0, 1]"),
    "rope": (None, [], "rope settings must be chosen"),
}


def _run_tool(argv: list) -> str:
    """Run tools/merge.py's main() in this process; returns its stderr (it must exit with status 2)."""
    import contextlib
    import io

    from tools.merge import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([str(a) for a in argv]) == 2
    return err.getvalue().strip()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error(tiny_dir: Path, tmp_path: Path, case: str) -> None:
    edit, extra, message = BAD[case]
    dev = _variant(tiny_dir, tmp_path, "devstral", edit) if edit else tiny_dir / "devstral-hf"
    args = ["--method", "linear", "--rope-from", "devstral"] + extra
    if case == "rope":
        args = ["--method", "linear"]
    msg = _run_tool(
        ["--devstral", dev, "--voxtral", tiny_dir / "voxtral-hf", "--output", tmp_path / "out", "--no-progress", *args]
    )
    assert msg.startswith("error: ") and "\n" not in msg and message in msg, msg
    assert not (tmp_path / "out").exists()


def test_cli_exit_status_and_stderr(tiny_dir: Path, tmp_path: Path) -> None:
    cmd = _cli(tiny_dir, tmp_path / "out", "--method", "slerp", "--alpha", "-0.1", "--rope-from", "voxtral")
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == "error: alpha=-0.1: must lie in [0, 1]"


def test_abandoned_writes_never_reach_a_closed_file() -> None:
    """After `abandon` (a merge failing mid-shard), queued writes are dropped and the one in progress has
    finished, so the shard's file can be closed without a late write landing on a reused descriptor."""
    from megatron_ext.merge.run import _WriteBehind

    class SlowFile:
        calls, late, closed = 0, 0, False

        def write(self, data: memoryview) -> int:
            time.sleep(0.05)
            self.calls += 1
            self.late += self.closed
            return len(data)

    f = SlowFile()
    with _WriteBehind(1 << 30) as writer:
        for _ in range(10):
            writer.submit(f, torch.zeros(4), lambda _: None)
        writer.abandon()
        f.closed = True
    assert f.late == 0 and 0 < f.calls < 10
