"""Conversion benchmark: a synthetic HF checkpoint with Mistral Small 3 tensor shapes (fewer layers).

Reports wall time, GB/s, the converter's peak RSS (from `wait4`, the child process alone) and the ratio
to a disk floor measured in the same run right before each conversion (after `sync`): reading that
conversion's input files once and writing the same number of bytes (fsync'd), the least any converter
must do. The converter's time includes its start-up (imports, ~5 s) and, for torch_dist outputs, the
sha256 of the sources recorded in the metadata (computed in a background thread).
Goals (issue 4): peak RSS <= 2 GB + 3 x the largest tensor; wall time <= 2 x the floor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint.safetensors_io import SafetensorsWriter
from megatron_ext.config import ModelConfig, mistral_small_decoder
from megatron_ext.tiny import decoder_shapes

ROOT = Path(__file__).resolve().parents[2]


def mistral_small_config(num_layers: int) -> ModelConfig:
    """Mistral Small 3 (24B) decoder shapes with `num_layers` layers (HF MistralForCausalLM layout)."""
    return ModelConfig(mistral_small_decoder(num_layers), hf_architecture="mistral")


def write_synthetic_hf(out: Path, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       max_shard_bytes: int = 5 << 30) -> int:
    """Write an HF checkpoint of `cfg` (decoder only) filled with random bits, streaming; returns bytes."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = decoder_shapes(cfg.decoder)
    gen = torch.Generator().manual_seed(seed)
    # Finite random values without paying randn per element: tile one random block.
    block = torch.randn(1 << 22, generator=gen).to(dtype)
    writer = SafetensorsWriter(out, shapes, max_shard_bytes=max_shard_bytes)
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype)
        flat = t.view(-1)
        for start in range(0, flat.numel(), block.numel()):
            n = min(block.numel(), flat.numel() - start)
            flat[start:start + n] = block[:n]
        writer.write(name, t)
        del t, flat
    writer.finish()
    (out / "config.json").write_text(json.dumps({**cfg.to_hf(), "dtype": str(dtype).removeprefix("torch.")}))
    return writer.bytes_written


def disk_floor(inputs: list[Path], scratch: Path, buf_bytes: int = 64 << 20) -> tuple[float, int]:
    """Seconds to read `inputs` sequentially and write as many bytes to `scratch` (fsync'd)."""
    buf = bytearray(buf_bytes)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with open(scratch, "wb") as out:
        for path in inputs:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    out.write(view[:n])
                    total += n
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    scratch.unlink()
    return seconds, total


@dataclass
class BenchResult:
    layers: int
    input_gb: float
    largest_tensor_gb: float
    direction: str
    wall_s: float
    gb_per_s: float
    peak_rss_gb: float
    rss_goal_gb: float
    floor_s: float
    ratio_to_floor: float


def _run_convert(src: Path, dst: Path, to: str) -> tuple[float, float]:
    """Run tools/convert.py as a child; (wall seconds, peak RSS in GB of that child)."""
    cmd = [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(src), "--output", str(dst),
           "--to", to, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"convert failed: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    return wall, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def run_bench(workdir: Path, num_layers: int = 2, keep: bool = False) -> list[BenchResult]:
    """Generate the synthetic checkpoint, measure the floor, convert HF -> torch_dist -> HF; clean up."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cfg = mistral_small_config(num_layers)
    try:
        hf = workdir / "hf"
        nbytes = write_synthetic_hf(hf, cfg)
        shapes = decoder_shapes(cfg.decoder)
        largest = max(torch.Size(s).numel() for s in shapes.values()) * 2 / 1e9
        results = []
        for direction, src, dst, to in (("hf->torch_dist", hf, workdir / "td", "megatron"),
                                        ("torch_dist->hf", workdir / "td", workdir / "hf-out", "hf")):
            os.sync()  # no write-back of earlier steps may land in either measurement
            floor_s, _ = disk_floor(sorted(p for p in src.iterdir() if p.is_file()), workdir / "floor.bin")
            os.sync()
            wall, rss = _run_convert(src, dst, to)
            results.append(BenchResult(num_layers, nbytes / 1e9, largest, direction, wall, nbytes / 1e9 / wall,
                                       rss, 2 + 3 * largest, floor_s, wall / floor_s))
        return results
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def format_results(results: list[BenchResult]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"{r.direction}: {r.input_gb:.2f} GB ({r.layers} Mistral-Small layers, largest tensor "
            f"{r.largest_tensor_gb:.2f} GB) in {r.wall_s:.1f} s = {r.gb_per_s:.2f} GB/s; peak RSS "
            f"{r.peak_rss_gb:.2f} GB (goal <= {r.rss_goal_gb:.2f}); disk floor {r.floor_s:.1f} s -> "
            f"{r.ratio_to_floor:.2f}x floor (goal <= 2x)"
        )
    return "\n".join(lines) + "\n" + json.dumps([asdict(r) for r in results])
