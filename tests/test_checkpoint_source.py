"""The shared checkpoint reader (`checkpoint/source.py`): every format through `open_checkpoint`, merges of
Mistral-native and FP8 parents, crafted pickles that must never run, and one test per header defect."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint import mapping
from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.checkpoint.mistral_native import interleaved_to_half, rope_heads
from megatron_ext.checkpoint.safetensors_io import read_header
from megatron_ext.checkpoint.source import open_checkpoint, tensor_digest
from megatron_ext.checkpoint.torch_dist_io import DCP_METADATA, check_torch_dist, read_dcp_metadata
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.parents import HFParent, open_parent
from megatron_ext.merge.run import MergeJob, run_merge
from megatron_ext.testing.tiny_models import DEVSTRAL2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("source")


@pytest.fixture(scope="module")
def voxtral_td(tiny_dir: Path, work: Path) -> Path:
    out = work / "voxtral-td"
    convert(tiny_dir / "voxtral-hf", out, "megatron", progress=False)
    return out / "release"  # the iteration directory: a checkpoint by itself (tests/test_megatron_lm_layout.py)


def _plant(directory: Path, name: str, data: bytes) -> None:
    """Replace a torch_dist file and record its new size and sha256 in checkpoint_meta.json, as an attacker would."""
    (directory / name).write_bytes(data)
    meta = json.loads((directory / "checkpoint_meta.json").read_text())
    meta["files"][name] = len(data)
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (directory / "checkpoint_meta.json").write_text(json.dumps(meta))


def _one_line(exc: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


# ---- every format through open_checkpoint --------------------------------------------------------------


@pytest.mark.parametrize("model", ["voxtral", "devstral"])
def test_hf_source_equals_the_file(model: str, tiny_dir: Path) -> None:
    d = tiny_dir / f"{model}-hf"
    want = load_file(d / "model.safetensors")
    with open_checkpoint(d) as src:
        assert src.kind == "hf" and src.naming == "hf" and src.tokenizer == d / "tekken.json"
        assert src.names == list(want)  # stored order: the merge writes in it
        for name, t in want.items():
            assert src.shape(name) == tuple(t.shape) and src.dtype(name) == t.dtype
            assert torch.equal(src.get(name), t), name
            assert src.reads_rows(name)
        emb = mapping.hf_names(src.cfg)[0]
        assert torch.equal(src.read_rows(emb, (3, 7)), want[emb][3:7])


@pytest.mark.parametrize("layout", ["hf", "native"])
def test_fp8_source_dequantises_on_read(layout: str, tiny_dir: Path) -> None:
    """Published Devstral 2 (Mistral3 HF or split native): text tensors under CausalLM names, FP8 weights as
    fp8.float() * scale in float32 exactly, scales and the vision parts gone, activation scales kept."""
    d = tiny_dir / f"devstral2-{layout}"
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        raw |= load_file(f)
    weight_scale, act_scale = (
        ("weight_scale_inv", "activation_scale") if layout == "hf" else ("qscale_weight", "qscale_act")
    )
    with open_checkpoint(d) as src:
        assert src.cfg == DEVSTRAL2 and set(src.names) == set(mapping.hf_names(DEVSTRAL2))
        assert len(src.dropped) in (2, 4) and len(src.activation_scales) == 14
        fp8 = [n for n in src.names if src.src.dtype(src._stored[n]) == torch.float8_e4m3fn]
        assert len(fp8) == 14 and "FP8 dequantised" in src.description
        for name in fp8:
            stored = src._stored[name]
            scale = raw[stored.removesuffix("weight") + weight_scale]
            assert src.activation_scales[name] == raw[stored.removesuffix("weight") + act_scale].item()
            want = (raw[stored].float() * scale.float()).to(torch.float32)
            if layout == "native" and (heads := rope_heads(name, DEVSTRAL2)):
                want = interleaved_to_half(want, heads)
            assert src.dtype(name) == torch.float32 and torch.equal(src.get(name), want), name
        with pytest.raises(CheckpointError, match="cannot be read by rows"):
            src.read_rows(fp8[0], (0, 1))


@pytest.mark.parametrize("model", ["voxtral", "devstral"])
def test_native_source_equals_hf(model: str, tiny_dir: Path) -> None:
    """Mistral-native files under HF names, rope rows permuted, positions recomputed: equal to the HF dir."""
    hf = load_file(tiny_dir / f"{model}-hf" / "model.safetensors")
    with open_checkpoint(tiny_dir / f"{model}-native") as src:
        assert src.kind == "native" and sorted(src.names) == sorted(hf)
        for name, t in hf.items():
            assert src.shape(name) == tuple(t.shape) and src.dtype(name) == t.dtype
            assert torch.equal(src.get(name), t), name
        assert not src.reads_rows(mapping.hf_names(src.cfg)[0])


def test_torch_dist_source_and_megatron_view_agree(tiny_dir: Path, voxtral_td: Path) -> None:
    with open_checkpoint(voxtral_td) as td, open_checkpoint(tiny_dir / "voxtral-hf") as hf:
        view = hf.megatron()
        assert td.naming == view.naming == "megatron" and td.megatron() is td
        assert sorted(td.names) == sorted(view.names) == sorted(mapping.megatron_names(td.cfg))
        assert td.meta is not None and td.cfg == hf.cfg
        for name in td.names:
            assert td.shape(name) == view.shape(name) and td.dtype(name) == view.dtype(name)
            assert torch.equal(td.get(name), view.get(name)), name


def test_content_digest_follows_the_tensors(tiny_dir: Path) -> None:
    with open_checkpoint(tiny_dir / "devstral-hf") as src:
        digests = {n: tensor_digest(src.get(n)) for n in src.names}
        first = src.content_digest(digests)
        assert first == src.content_digest(dict(digests)) and len(first) == 64
        name = src.names[0]
        assert src.content_digest({**digests, name: "0" * 32}) != first


# ---- the merge reads Mistral-native and FP8 parents -----------------------------------------------------


def _merge(dev: Path, vox: Path, out: Path, method: str = "linear", **kw) -> dict[str, torch.Tensor]:
    params = MergeParams(method=method, alpha=0.3, **kw)
    run_merge(MergeJob(dev, vox, out, params, rope_from="voxtral", progress=False))
    return load_file(out / "model.safetensors")


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_merge_of_native_parents_equals_merge_of_hf_parents(method: str, tiny_dir: Path, tmp_path: Path) -> None:
    """Bit-exact: the native reader yields the HF tensors exactly (row streaming is off for native parents)."""
    assert not isinstance(open_parent(tiny_dir / "voxtral-native"), HFParent)
    want = _merge(tiny_dir / "devstral-hf", tiny_dir / "voxtral-hf", tmp_path / "hf", method)
    got = _merge(tiny_dir / "devstral-native", tiny_dir / "voxtral-native", tmp_path / "native", method)
    _assert_equal(got, want)
    prov = json.loads((tmp_path / "native" / "merge.json").read_text())
    assert {p["format"] for p in prov["parents"].values()} == {"native"}


def test_megatron_output_from_native_parents_equals_hf_parents(tiny_dir: Path, tmp_path: Path) -> None:
    """torch_dist output: native parents under Megatron names (fused on read) give the HF parents' tensors."""
    outs = {}
    for kind in ("hf", "native"):
        job = MergeJob(
            tiny_dir / f"devstral-{kind}",
            tiny_dir / f"voxtral-{kind}",
            tmp_path / kind,
            MergeParams("slerp", 0.3),
            rope_from="voxtral",
            out_format="megatron",
            progress=False,
        )
        run_merge(job)
        with open_checkpoint(tmp_path / kind) as src:
            outs[kind] = {n: src.get(n).clone() for n in src.names}
    _assert_equal(outs["native"], outs["hf"])


def test_merge_of_fp8_parent_equals_merge_of_its_dequantised_copy(tiny_dir: Path, tmp_path: Path) -> None:
    """Tolerance 0 (bit-exact): the FP8 parent is dequantised on read exactly as the converter writes it, so
    merging it equals merging its dequantised HF export; DELLA too (its draws are seeded per tensor)."""
    dequantised = tmp_path / "devstral2-dequantised"
    convert(tiny_dir / "devstral2-hf", dequantised, "hf", progress=False)
    assert all(t.dtype == torch.float32 for t in load_file(dequantised / "model.safetensors").values())
    for method, kw in (("linear", {}), ("della", {"density": 0.5, "seed": 3})):
        want = _merge(dequantised, tiny_dir / "voxtral-hf", tmp_path / f"deq-{method}", method, **kw)
        got = _merge(tiny_dir / "devstral2-hf", tiny_dir / "voxtral-hf", tmp_path / f"fp8-{method}", method, **kw)
        _assert_equal(got, want)


def test_repo_with_both_layouts_reads_hf_checked_against_params(tiny_dir: Path, tmp_path: Path) -> None:
    """Devstral Small 2's hub repo ships HF shards and split consolidated files side by side."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_dir / "devstral2-hf", repo)
    for f in (tiny_dir / "devstral2-native").iterdir():
        shutil.copy(f, repo / f.name)
    with open_checkpoint(repo) as src:
        assert src.kind == "hf" and src.cfg == DEVSTRAL2
        assert all(p.name.startswith(("model-", "config")) for p in src.files)
    params = json.loads((repo / "params.json").read_text())
    params["yarn"]["factor"] = 32
    (repo / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="config.json and params.json disagree on decoder.rope"):
        open_checkpoint(repo)


@pytest.fixture(scope="module")
def published_td(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Devstral 2 (published FP8 Mistral3) and Voxtral converted to torch_dist."""
    out = tmp_path_factory.mktemp("published-td")
    convert(tiny_dir / "devstral2-hf", out / "devstral2", "megatron", progress=False)
    convert(tiny_dir / "voxtral-hf", out / "voxtral", "megatron", progress=False)
    return out / "devstral2", out / "voxtral"


@pytest.mark.parametrize(
    ("dev", "vox"), [("devstral2-hf", "voxtral-hf-sharded"), ("devstral2-native", "voxtral-native")]
)
def test_merge_of_published_parents_equals_merge_of_their_torch_dist(
    dev: str, vox: str, tiny_dir: Path, tmp_path: Path, published_td: tuple[Path, Path]
) -> None:
    """Byte-identical outputs: the published layouts (FP8 Mistral3 with its vision tower, split native with
    qscale names, sharded Voxtral) read as exactly the tensors their torch_dist conversions hold."""
    for method in ("linear", "della"):  # torch_dist parents merge to torch_dist
        outputs = []
        for name, parents in (("published", (tiny_dir / dev, tiny_dir / vox)), ("td", published_td)):
            params = MergeParams(method=method, alpha=0.3, density=0.5, seed=3)
            out = tmp_path / f"{name}-{method}"
            run_merge(MergeJob(*parents, out, params, rope_from="devstral", out_format="megatron", progress=False))
            outputs.append(resolve(out))
        for f in ("__0_0.distcp", ".metadata"):
            assert (outputs[0] / f).read_bytes() == (outputs[1] / f).read_bytes(), (method, f)
    merged_from = json.loads((outputs[0] / "merge.json").read_text())["parents"]
    assert (
        len(merged_from["devstral"]["parts_dropped"]) in (2, 4)
        and len(merged_from["devstral"]["fp8"]["activation_scales"]) == 14
    )
    assert "parts_dropped" not in merged_from["voxtral"]
    rope = json.loads((outputs[0] / "checkpoint_meta.json").read_text())["model"]["decoder"]["rope"]
    assert (rope["type"], rope["llama4_scaling_beta"]) == ("yarn", 0.1)  # Devstral 2's rope carried


# ---- crafted pickles never run -------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls `os.system('touch MARKER')`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_dcp_metadata_never_runs(voxtral_td: Path, tmp_path: Path) -> None:
    bad = tmp_path / "td"
    shutil.copytree(voxtral_td, bad)
    marker = tmp_path / "pwned"
    _plant(bad, DCP_METADATA, pickle.dumps(_Payload(marker)))
    from megatron_ext.training.checkpointing import Checkpointer

    attempts = (
        lambda: open_checkpoint(bad),
        lambda: open_parent(bad, "megatron"),
        lambda: Checkpointer.load(bad, None, None, None),  # validated before Megatron-Core sees the directory
    )
    for attempt in attempts:
        with pytest.raises(ValueError) as exc:
            attempt()
        _one_line(exc, str(bad / DCP_METADATA), "posix.system is not allowed")
    cli = subprocess.run(
        [sys.executable, ROOT / "tools/convert.py", "--input", bad, "--output", tmp_path / "o", "--to", "hf"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode != 0 and cli.stderr.strip().count("\n") == 0 and "not allowed" in cli.stderr, cli.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_crafted_common_pt_never_runs(voxtral_td: Path, tmp_path: Path) -> None:
    bad = tmp_path / "td"
    shutil.copytree(voxtral_td, bad)
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buf)
    _plant(bad, "common.pt", buf.getvalue())
    with pytest.raises(CheckpointError) as exc:
        check_torch_dist(bad)
    _one_line(exc, str(bad / "common.pt"), "weights_only")
    assert not marker.exists()


def test_crafted_pytorch_model_bin_never_runs(tiny_dir: Path, tmp_path: Path) -> None:
    """An HF directory holding only a pickled `pytorch_model.bin`: evaluation refuses it without reading it."""
    from megatron_ext.eval.generation import load_generator

    bad = tmp_path / "hf"
    bad.mkdir()
    shutil.copy(tiny_dir / "devstral-hf" / "config.json", bad)
    shutil.copy(tiny_dir / "devstral-hf" / "tekken.json", bad)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, bad / "pytorch_model.bin")
    for backend in ("hf", "megatron"):
        with pytest.raises(CheckpointError) as exc:
            load_generator(bad, backend)
        _one_line(exc, str(bad), "no model.safetensors")
    assert not marker.exists()


# ---- header defects ------------------------------------------------------------------------------------


def _write_raw(path: Path, header: object, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _f32(shape: list[int], start: int) -> dict:
    n = 4 * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + n]}


HEADER_DEFECTS = {
    "negative start": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "need 0 <= start <= end"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, "needs 16"),
    "overlap": ({"a": _f32([4], 0), "b": _f32([4], 8)}, "'b' at byte 8 overlaps"),
    "past end": ({"a": _f32([4], 0), "b": _f32([16], 16)}, "truncated safetensors file"),
    "header is a list": ([{"dtype": "F32"}], "header is a JSON list"),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, "unsupported dtype 'F128'"),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, "not a list of non-negative"),
    "short offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "are not two integers"),
    "metadata not str": ({"__metadata__": {"k": 1}, "a": _f32([1], 0)}, "__metadata__ is not an object of strings"),
}


@pytest.mark.parametrize("case", list(HEADER_DEFECTS))
def test_header_defect_is_one_error_naming_file(case: str, tmp_path: Path) -> None:
    header, message = HEADER_DEFECTS[case]
    path = tmp_path / "model.safetensors"
    _write_raw(path, header, bytes(64))
    with pytest.raises(CheckpointError) as exc:
        read_header(path)
    _one_line(exc, str(path), message)


def test_header_defect_reaches_convert_and_merge_as_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    """A size mismatch in a real checkpoint: refused by every tool instead of copying header bytes as a tensor."""
    bad = tmp_path / "devstral-bad"
    shutil.copytree(tiny_dir / "devstral-hf", bad)
    raw = (bad / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] - 1, *header[name]["shape"][1:]]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (bad / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(CheckpointError) as exc:
        convert(bad, tmp_path / "o", "megatron", progress=False)
    _one_line(exc, str(bad / "model.safetensors"), name)
    with pytest.raises(ValueError) as exc:
        run_merge(
            MergeJob(bad, tiny_dir / "voxtral-hf", tmp_path / "m", MergeParams("linear", 0.3), rope_from="voxtral")
        )
    _one_line(exc, name)


def _sharded(tiny_dir: Path, tmp_path: Path, shard_name: str) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny_dir / "devstral-hf" / "config.json", d)
    tensors = load_file(tiny_dir / "devstral-hf" / "model.safetensors")
    save_file(tensors, str(tmp_path / "x.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, shard_name)}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


@pytest.mark.parametrize("shard", ["../x.safetensors", "ABSOLUTE", "sub/x.safetensors", ".."])
def test_index_paths_are_confined(shard: str, tiny_dir: Path, tmp_path: Path) -> None:
    shard = str(tmp_path / "x.safetensors") if shard == "ABSOLUTE" else shard
    d = _sharded(tiny_dir, tmp_path, shard)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    _one_line(exc, str(d / "model.safetensors.index.json"), "not a plain file name")


def test_index_symlink_escaping_is_refused_hub_cache_links_are_not(tiny_dir: Path, tmp_path: Path) -> None:
    d = _sharded(tiny_dir, tmp_path, "model-00001-of-00001.safetensors")
    (d / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    _one_line(exc, "links outside")
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in (tiny_dir / "devstral-hf").iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    with open_checkpoint(snap) as src:
        assert src.names == list(load_file(tiny_dir / "devstral-hf" / "model.safetensors"))


def test_torch_dist_relative_path_escape_is_refused(voxtral_td: Path, tmp_path: Path) -> None:
    bad = tmp_path / "td"
    shutil.copytree(voxtral_td, bad)
    shutil.copy(bad / "__0_0.distcp", tmp_path / "outside.distcp")
    md = read_dcp_metadata(bad / DCP_METADATA)
    for info in md.storage_data.values():
        info.relative_path = "../outside.distcp"
    _plant(bad, DCP_METADATA, pickle.dumps(md))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(bad)
    _one_line(exc, str(bad / DCP_METADATA), "not a plain file name")


def test_torch_dist_chunk_outside_its_tensor_is_refused(voxtral_td: Path, tmp_path: Path) -> None:
    """Allowed classes with inconsistent values (a chunk reaching past its tensor): one line, not a traceback."""
    bad = tmp_path / "td"
    shutil.copytree(voxtral_td, bad)
    md = read_dcp_metadata(bad / DCP_METADATA)
    key, sm = next((k, v) for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks"))
    sm.chunks[0].sizes = torch.Size([s + 1 for s in sm.chunks[0].sizes])
    _plant(bad, DCP_METADATA, pickle.dumps(md))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(bad)
    _one_line(exc, str(bad / DCP_METADATA), key, "inconsistent size")


def test_megatron_saved_metadata_passes_the_allow_list(tmp_path: Path) -> None:
    """A real Megatron-Core `dist_checkpointing.save` (tensor + object, with its planner data) is accepted."""
    script = """
import sys, torch
from megatron_ext.compat.cpu import init_distributed
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
if __name__ == "__main__":
    init_distributed(tp=1, pp=1)
    sd = {"a": ShardedTensor.from_rank_offsets("a", torch.randn(4, 3).bfloat16()),
          "o": ShardedObject("obj", {"step": 3}, (1,), (0,))}
    dist_checkpointing.save(sd, sys.argv[1])
"""
    out = tmp_path / "mc"
    out.mkdir()
    (tmp_path / "save.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, tmp_path / "save.py", out], check=True, capture_output=True, timeout=300, env=env)
    md = read_dcp_metadata(out / DCP_METADATA)
    assert md.state_dict_metadata["a"].size == torch.Size([4, 3])
    check_torch_dist(out)


def test_fuzzed_headers_and_truncations_error_or_read_the_original(tiny_dir: Path, tmp_path: Path) -> None:
    """200 seeded variants (a random header byte changed, or the file cut short): each is one CheckpointError
    or, where the change left the header equivalent (padding, metadata value), reads the original tensors."""
    import random

    src_dir = tiny_dir / "devstral-hf"
    raw = (src_dir / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    original = load_file(src_dir / "model.safetensors")
    d = tmp_path / "fuzz"
    shutil.copytree(src_dir, d)
    rng = random.Random(0)
    outcomes = {"error": 0, "same": 0}
    for _ in range(200):
        if rng.random() < 0.75:
            pos = rng.randrange(header_end)
            variant = raw[:pos] + bytes([rng.randrange(256)]) + raw[pos + 1 :]
        else:
            variant = raw[: rng.randrange(len(raw))]
        (d / "model.safetensors").write_bytes(variant)
        try:
            with open_checkpoint(d) as src:
                got = {n: src.get(n) for n in src.names}
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(d) in str(exc), str(exc)
            outcomes["error"] += 1
            continue
        _assert_equal(got, original)
        outcomes["same"] += 1
    assert outcomes["error"] > 100, outcomes
