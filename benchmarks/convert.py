"""Conversion benchmark: a synthetic HF checkpoint with Mistral Small 3 tensor shapes (fewer layers).

Reports wall time, GB/s, the converter's peak RSS (`peak_rss_gb`, the child process alone) and the ratio
to a disk floor measured in the same run right before each conversion (after `sync`): reading that
conversion's input files once and writing the same number of bytes (fsync'd), the least any converter
must do. The converter's time includes its start-up (imports, ~3 s) and, for torch_dist outputs, the
sha256 of the sources recorded in the metadata (computed in a background thread). That hash is the one
CPU-bound step (one core per file), so it is reported alone too. HF -> torch_dist runs twice: from a
Hugging Face hub cache snapshot (the files as a download leaves them; sha256 from the blob names), and
from a plain directory with the sha256 unknown (a private hash cache, empty), which is bound by that
hash. Each line shows the process's wall time and the conversion's own time (imports excluded, as in
`bench-merge`).
A last run converts Devstral Small 2's published layout (Mistral3, per-tensor FP8 text linears, written after
the bf16 runs' outputs are deleted) to torch_dist, dequantising to bf16.
Goals (issues 4, 17): peak RSS <= 2 GB + 3 x the largest (dequantised) tensor; wall time <= 2 x the floor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint.metadata import sha256_file
from megatron_ext.checkpoint.safetensors_writer import SafetensorsWriter
from megatron_ext.checkpoint.shapes import decoder_shapes
from megatron_ext.config import ModelConfig, mistral_small_decoder
from megatron_ext.testing.published_layouts import mistral3_config, vision_shapes
from megatron_ext.testing.tiny_models import DEVSTRAL2
from megatron_ext.user_cache import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
SHA256_ALONE = "sha256 of the sources alone (one core)"
# Runs a script (argv[1:]) in this interpreter and reports the process's own peak RSS on exit.
_RUN_REPORTING_RSS = (
    "import atexit, runpy, sys; from benchmarks.convert import peak_rss_gb; "
    "atexit.register(lambda: print(f'PEAK_RSS_GB {peak_rss_gb()}', file=sys.stderr)); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def peak_rss_gb() -> float:
    """This process's own peak RSS (VmHWM). Not `ru_maxrss`: that one survives fork and exec, so a child
    would report its parent's peak when the parent was the larger."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / 1e9


def mistral_small_config(num_layers: int) -> ModelConfig:
    """Mistral Small 3 (24B) decoder shapes with `num_layers` layers (HF MistralForCausalLM layout)."""
    return ModelConfig(mistral_small_decoder(num_layers), hf_architecture="mistral")


def write_synthetic_hf(
    out: Path, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0, max_shard_bytes: int = 5 << 30
) -> int:
    """Write an HF checkpoint of `cfg` (decoder only) filled with random bits, streaming; returns bytes."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = decoder_shapes(cfg.decoder)
    gen = torch.Generator().manual_seed(seed)
    # Finite random values without paying randn per element: tile one random block.
    block = torch.randn(1 << 22, generator=gen).to(dtype)
    writer = SafetensorsWriter(out, shapes, max_shard_bytes=max_shard_bytes)
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype)
        _fill(t, block)
        writer.write(name, t)
        del t
    writer.finish()
    (out / "config.json").write_text(json.dumps({**cfg.to_hf(), "dtype": str(dtype).removeprefix("torch.")}))
    return writer.bytes_written


def _fill(t: torch.Tensor, block: torch.Tensor) -> None:
    flat = t.view(-1)
    for start in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - start)
        flat[start : start + n] = block[:n]


def write_synthetic_mistral3_fp8(out: Path, num_layers: int, seed: int = 0) -> tuple[int, float]:
    """Devstral Small 2's published layout (Mistral3, per-tensor FP8 text linears with 0-dim scales, a tiny
    vision tower) with Mistral Small 3 decoder shapes; returns (bytes, largest dequantised tensor in GB)."""
    cfg = ModelConfig(mistral_small_decoder(num_layers, DEVSTRAL2.decoder.rope), hf_architecture="ministral3")
    shapes = {"language_model." + n: s for n, s in decoder_shapes(cfg.decoder).items()}
    shapes |= vision_shapes(cfg.decoder.hidden_size)
    linears = [n for n in shapes if ".layers." in n and n.startswith("language_model.") and n.endswith("proj.weight")]
    names = list(shapes) + [
        n.removesuffix("weight") + k for n in linears for k in ("weight_scale_inv", "activation_scale")
    ]
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(1 << 22, generator=gen)
    blocks = {torch.bfloat16: block.to(torch.bfloat16), torch.float8_e4m3fn: (block * 64).to(torch.float8_e4m3fn)}
    out.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(out, names, max_shard_bytes=5 << 30)
    for name, shape in shapes.items():
        dtype = torch.float8_e4m3fn if name in linears else torch.bfloat16
        t = torch.empty(shape, dtype=dtype)
        _fill(t, blocks[dtype])
        writer.write(name, t)
        if name in linears:
            writer.write(name.removesuffix("weight") + "weight_scale_inv", torch.tensor(1 / 64, dtype=torch.float32))
            writer.write(name.removesuffix("weight") + "activation_scale", torch.tensor(0.02, dtype=torch.float32))
        del t
    writer.finish()
    config = mistral3_config(cfg) | {"dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config))
    largest = max(torch.Size(shapes[n]).numel() for n in linears) * 2 / 1e9
    return writer.bytes_written, largest


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
    wall_s: float  # the converter process, interpreter start and imports included
    convert_s: float  # the conversion itself, as the tool reports it (imports excluded, as in bench-merge)
    gb_per_s: float
    peak_rss_gb: float
    rss_goal_gb: float
    floor_s: float
    ratio_to_floor: float  # wall_s / floor_s
    convert_ratio_to_floor: float  # convert_s / floor_s


def _run_convert(src: Path, dst: Path, args: list[str], cache: Path) -> tuple[float, float, float]:
    """Run tools/convert.py as a child; (wall seconds, the tool's own conversion seconds, peak RSS in GB)."""
    cmd = [
        sys.executable,
        "-c",
        _RUN_REPORTING_RSS,
        str(ROOT / "tools" / "convert.py"),
        "--input",
        str(src),
        "--output",
        str(dst),
        *args,
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), CACHE_ENV: str(cache)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"convert failed: {proc.stderr[-2000:]}")
    rss = next(float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_GB"))
    own = float(re.search(r" in ([0-9.]+) s\)", proc.stdout).group(1))  # type: ignore[union-attr]
    return wall, own, rss


def as_hub_snapshot(plain: Path, hub: Path) -> tuple[Path, float]:
    """Lay `plain`'s files out as a Hugging Face hub cache (blobs named by sha256, snapshot symlinks), as a
    download leaves them; returns the snapshot directory and the seconds the sha256 took (one core)."""
    blobs, snap = hub / "blobs", hub / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    hash_s = 0.0
    for f in sorted(plain.iterdir()):
        start = time.perf_counter()
        digest = sha256_file(f)
        hash_s += time.perf_counter() - start if f.suffix == ".safetensors" else 0.0
        blob = blobs / digest
        os.link(f, blob)  # the same inode: no copy
        (snap / f.name).symlink_to(Path("../..") / "blobs" / digest)
    return snap, hash_s


def _measure(
    direction: str, src: Path, dst: Path, args: list[str], workdir: Path, layers: int, nbytes: int, largest: float
) -> BenchResult:
    """One conversion against the disk floor measured right before it (both after `sync`)."""
    os.sync()  # no write-back of earlier steps may land in any measurement
    floor_s, _ = disk_floor(sorted(p for p in src.iterdir() if p.is_file()), workdir / "floor.bin")
    os.sync()
    wall, own, rss = _run_convert(src, dst, args, workdir / "hash-cache")
    gb = nbytes / 1e9
    return BenchResult(
        layers,
        gb,
        largest,
        direction,
        wall,
        own,
        gb / wall,
        rss,
        2 + 3 * largest,
        floor_s,
        wall / floor_s,
        own / floor_s,
    )


def run_bench(workdir: Path, num_layers: int = 2, keep: bool = False) -> list[BenchResult]:
    """Generate the synthetic checkpoint, measure the floor and each conversion; clean up."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    cfg = mistral_small_config(num_layers)
    try:
        plain = workdir / "hf"
        nbytes = write_synthetic_hf(plain, cfg)
        snapshot, hash_s = as_hub_snapshot(plain, workdir / "hub" / "models--bench--mistral-small")
        shapes = decoder_shapes(cfg.decoder)
        largest = max(torch.Size(s).numel() for s in shapes.values()) * 2 / 1e9
        results = []
        runs = [
            ("hub snapshot -> torch_dist (sha256 from the blob names)", snapshot, workdir / "td", ["--to", "megatron"]),
            ("torch_dist -> hf", workdir / "td", workdir / "hf-out", ["--to", "hf"]),
            (
                "plain dir -> torch_dist --tp 2 (sha256 computed)",
                plain,
                workdir / "td2",
                ["--to", "megatron", "--tp", "2"],
            ),
        ]
        for direction, src, dst, args in runs:
            results.append(_measure(direction, src, dst, args, workdir, num_layers, nbytes, largest))
        for _, _, dst, _ in runs:  # disk room for the FP8 case
            shutil.rmtree(dst, ignore_errors=True)
        fp8 = workdir / "mistral3-fp8"
        fp8_bytes, fp8_largest = write_synthetic_mistral3_fp8(fp8, num_layers)
        direction = "FP8 Mistral3 (Devstral 2 layout) -> torch_dist, dequantised to bf16"
        fp8_run = _measure(
            direction, fp8, workdir / "td-fp8", ["--to", "megatron"], workdir, num_layers, fp8_bytes, fp8_largest
        )
        floor_s = results[-1].floor_s
        results.append(
            BenchResult(
                num_layers,
                nbytes / 1e9,
                largest,
                SHA256_ALONE,
                hash_s,
                hash_s,
                nbytes / 1e9 / hash_s,
                0.0,
                2 + 3 * largest,
                floor_s,
                hash_s / floor_s,
                hash_s / floor_s,
            )
        )
        return results + [fp8_run]
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def format_results(results: list[BenchResult]) -> str:
    lines = []
    for r in results:
        if r.direction == SHA256_ALONE:
            lines.append(
                f"{r.direction}: {r.wall_s:.1f} s = {r.gb_per_s:.2f} GB/s = {r.ratio_to_floor:.2f}x the "
                "last floor (the bound of a conversion that must hash its sources)"
            )
            continue
        lines.append(
            f"{r.direction}: {r.input_gb:.2f} GB ({r.layers} Mistral-Small layers, largest tensor "
            f"{r.largest_tensor_gb:.2f} GB) in {r.wall_s:.1f} s wall = {r.gb_per_s:.2f} GB/s, of which the "
            f"conversion {r.convert_s:.1f} s; peak RSS {r.peak_rss_gb:.2f} GB (goal <= {r.rss_goal_gb:.2f}); disk "
            f"floor {r.floor_s:.1f} s -> wall {r.ratio_to_floor:.2f}x, conversion {r.convert_ratio_to_floor:.2f}x "
            "the floor (goal <= 2x)"
        )
    return "\n".join(lines) + "\n" + json.dumps([asdict(r) for r in results])
