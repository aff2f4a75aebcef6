"""Megatron torch_dist parents and output (through the conversion module's reader, writer and metadata)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.metadata import read_meta
from megatron_ext.checkpoint.torch_dist_io import TorchDistReader
from megatron_ext.merge.methods import MergeParams
from megatron_ext.merge.run import MergeError, MergeJob, run_merge


@pytest.fixture(scope="module")
def td(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("td")
    out = {}
    for name in ("voxtral", "devstral"):
        out[name] = root / name
        convert(tiny_dir / f"{name}-hf", out[name], "megatron", progress=False)
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    r = TorchDistReader(d)
    try:
        return {n: r.get(n) for n in r.names()}
    finally:
        r.close()


def _merge(dev: Path, vox: Path, out: Path, params: MergeParams, rope_from: str, out_format: str) -> None:
    run_merge(MergeJob(dev, vox, out, params, rope_from=rope_from, out_format=out_format, progress=False))


def test_torch_dist_parents_to_torch_dist(td: dict[str, Path], tiny_dir: Path, tmp_path: Path) -> None:
    params = MergeParams(method="slerp", alpha=0.3)
    _merge(td["devstral"], td["voxtral"], tmp_path / "m", params, "voxtral", "megatron")
    meta = read_meta(tmp_path / "m")
    assert meta.tool == "merge" and meta.model.decoder.rope.theta == 1e8 and meta.model.audio_token_id == 24
    assert meta.extra["merge"]["params"] == {"method": "slerp", "alpha": 0.3}
    assert {s["role"] for s in meta.sources} == {"devstral", "voxtral"}
    merged, vox = _tensors(tmp_path / "m"), _tensors(td["voxtral"])
    assert set(merged) == set(vox)
    for n in vox:  # the audio stack is Voxtral's, byte for byte
        if n.startswith(("audio_encoder.", "audio_projector.")):
            assert merged[n].view(torch.uint8).equal(vox[n].view(torch.uint8)), n
    # HF parents viewed under Megatron names (fused on read) give the same checkpoint
    _merge(tiny_dir / "devstral-hf", tiny_dir / "voxtral-hf", tmp_path / "m2", params, "voxtral", "megatron")
    again = _tensors(tmp_path / "m2")
    assert all(torch.equal(merged[n], again[n]) for n in merged)


def test_linear_torch_dist_equals_hf_merge(td: dict[str, Path], tiny_dir: Path, tmp_path: Path) -> None:
    """Linear is elementwise, so merging fused Megatron tensors and converting to HF equals the HF merge."""
    params = MergeParams(method="linear", alpha=0.1)
    _merge(td["devstral"], td["voxtral"], tmp_path / "m", params, "devstral", "megatron")
    convert(tmp_path / "m", tmp_path / "m-hf", "hf", progress=False)
    _merge(tiny_dir / "devstral-hf", tiny_dir / "voxtral-hf", tmp_path / "hf", params, "devstral", "hf")
    a, b = load_file(tmp_path / "m-hf/model.safetensors"), load_file(tmp_path / "hf/model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_torch_dist_parents_refuse_hf_output_and_partials_are_refused(td: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="--format megatron"):
        run_merge(
            MergeJob(
                td["devstral"],
                td["voxtral"],
                tmp_path / "x",
                MergeParams(method="linear"),
                rope_from="devstral",
                progress=False,
            )
        )
    partial = tmp_path / ".m.partial-merge"
    partial.mkdir()
    with pytest.raises(CheckpointError, match="partial"):
        read_meta(partial)
