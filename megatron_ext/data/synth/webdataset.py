"""WebDataset tar shards for Megatron-Energon, built from a finished samples JSONL file.

Per sample (key `r{row:09d}`, the 1-based input line): `KEY.json` is the conversation as in the JSONL but
each `input_audio.data` is replaced by the name of a member, `"audio_K.wav"`, and `KEY.audio_K.wav` holds
that 16 kHz mono WAV (K counts the sample's audio turns from 0). Invalid rows are not packed. Tar members
carry fixed metadata (mtime 0, uid 0) so equal samples give byte-identical tars.
"""

import base64
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from megatron_ext.checkpoint.atomic import write_atomic
from megatron_ext.data.synth.errors import SynthError
from megatron_ext.data.synth.files import dumps_line, read_jsonl


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def sample_members(sample: dict) -> dict[str, bytes]:
    """Member name suffix -> bytes for one valid sample (`json` plus `audio_K.wav` per audio turn)."""
    sample = json.loads(json.dumps(sample))
    members: dict[str, bytes] = {}
    for message in sample["messages"]:
        for part in message.get("content") if isinstance(message.get("content"), list) else []:
            audio = part.get("input_audio") if isinstance(part, dict) else None
            if isinstance(audio, dict) and isinstance(audio.get("data"), str):
                name = f"audio_{len(members)}.wav"
                members[name] = base64.b64decode(audio["data"])
                audio["data"] = name
    return {"json": dumps_line(sample).encode(), **members}


def write_tar(samples_jsonl: Path, tar_path: Path) -> int:
    """Pack the valid samples of `samples_jsonl` into `tar_path` atomically; return how many were packed."""
    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in read_jsonl(samples_jsonl):
            if "messages" not in sample:
                continue
            key = f"r{sample['synth']['row']:09d}"
            for suffix, data in sample_members(sample).items():
                _member(tar, f"{key}.{suffix}", data)
            count += 1
    if count:
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(tar_path, buf.getvalue())
    return count


def energon_prepare(wds_dir: Path) -> None:
    """Run `energon prepare` non-interactively (all data in the train split, CrudeWebdataset samples)."""
    exe = shutil.which("energon") or str(Path(sys.executable).with_name("energon"))
    cmd = [
        exe,
        "prepare",
        str(wds_dir),
        "--non-interactive",
        "--split-ratio",
        "1,0,0",
        "--force-overwrite",
        "--sample-type",
        "CrudeWebdataset",
        "--no-progress",
        "--num-workers",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SynthError(f"energon prepare {wds_dir} failed: {tail[0]}")
