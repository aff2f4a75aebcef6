"""torch_dist records are mapped from the data file, not read: same tensors as `torch.load` for any layout."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from megatron_ext.checkpoint.torch_dist_io import _FileView, _mapped_record


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "contiguous bf16": base.to(torch.bfloat16),
        "transposed (full storage, permuted strides)": base.t(),
        "view with a storage offset": base[2:5, 1:7],  # torch.save keeps the whole storage
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


@pytest.mark.parametrize("crc32", [True, False])
def test_mapped_records_equal_torch_load(tmp_path: Path, crc32: bool) -> None:
    path = tmp_path / "__0_0.distcp"
    spans = {}
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc32)  # DCP writes CRC32s; our writer does not
    try:
        with open(path, "wb") as f:
            f.write(b"x" * 13)  # records start at arbitrary offsets
            for name, t in _cases().items():
                start = f.tell()
                torch.save(t, f)
                spans[name] = _StorageInfo(path.name, start, f.tell() - start)
    finally:
        torch.serialization.set_crc32_options(previous)
    with open(path, "rb") as f:
        for name, info in spans.items():
            ref = torch.load(_FileView(f, info.offset, info.length), weights_only=True)
            got = _mapped_record(path, f, info)
            assert got is not None, name
            assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride(), name
            assert torch.equal(got, ref), name
            assert torch.equal(got, _cases()[name]), name


def test_non_tensor_record_falls_back(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save([None], buf)
    path = tmp_path / "rec"
    path.write_bytes(buf.getvalue())
    with open(path, "rb") as f:
        assert _mapped_record(path, f, _StorageInfo(path.name, 0, len(buf.getvalue()))) is None
