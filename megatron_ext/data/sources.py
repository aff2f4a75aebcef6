"""Random-access document sources: plain JSONL files and Megatron-Energon WebDataset shards.

Both return a sample as the chat dict (`messages`, optional `tools`) with every `input_audio.data` as
base64 WAV, so one encoder serves both. Random access (`source[i]`) lets the mixture keep its position
as plain indices, which makes the data-loader state small and resumable.
"""

from __future__ import annotations

import atexit
import base64
import json
from pathlib import Path
from typing import Any, Protocol

from megatron_ext.errors import ProjectError


class DataSourceError(ProjectError, ValueError):
    """A data file is missing or holds a malformed sample (the message names file and sample)."""


class Source(Protocol):
    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def where(self, index: int) -> str: ...


class JsonlSource:
    """One JSON chat sample per line; line offsets are indexed once at open."""

    def __init__(self, path: str | Path, name: str = "") -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        if not self.path.is_file():
            raise DataSourceError(f"{self.path}: JSONL file not found")
        self._offsets: list[int] = []
        with self.path.open("rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)
        if not self._offsets:
            raise DataSourceError(f"{self.path}: no samples")

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, index: int) -> str:
        return f"{self.path}: sample {index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        with self.path.open("rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{self.where(index)}: malformed JSON ({exc.msg})") from None
        return _check_sample(sample, self.where(index))


class EnergonSource:
    """WebDataset shards prepared with `energon prepare` (CrudeWebdataset: `KEY.json` + `KEY.audio_K.wav`).

    The JSON is the chat with each `input_audio.data` naming its WAV member; samples are read by index
    through Energon's tar-offset index (`.tar.idx`), the same index its own loaders use.
    """

    def __init__(self, path: str | Path, name: str = "", split: str = "train") -> None:
        from megatron.energon.epathlib import EPath
        from megatron.energon.flavors.webdataset.itar_reader import ShardInfosITarReader
        from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

        self.path = Path(path)
        self.name = name or self.path.name
        if not (self.path / ".nv-meta").is_dir():
            raise DataSourceError(f"{self.path}: not an Energon dataset (no .nv-meta; run `energon prepare`)")
        try:
            meta = WebdatasetMeta.from_config(EPath(str(self.path)), split_part=split)
        except Exception as exc:  # energon raises assertion/empty-dataset errors with their own text
            raise DataSourceError(f"{self.path}: cannot read Energon metadata ({exc})") from None
        self._reader = ShardInfosITarReader(EPath(str(self.path)), meta.shards)
        atexit.register(self._reader.close)  # closed before interpreter teardown (quiet storage client)
        if len(self._reader) == 0:
            raise DataSourceError(f"{self.path}: split {split!r} has no samples")

    def __len__(self) -> int:
        return len(self._reader)

    def where(self, index: int) -> str:
        return f"{self.path}: sample {index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        parts = self._reader[index]
        if parts is None or "json" not in parts:
            raise DataSourceError(f"{self.where(index)}: no .json member")
        sample = _check_sample(json.loads(parts["json"]), self.where(index))
        for message in sample["messages"]:
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                audio = part.get("input_audio") if isinstance(part, dict) else None
                if isinstance(audio, dict) and isinstance(audio.get("data"), str) and audio["data"] in parts:
                    audio["data"] = base64.b64encode(parts[audio["data"]]).decode("ascii")
        return sample


def _check_sample(sample: Any, where: str) -> dict[str, Any]:
    """A chat (non-empty `messages`), or one of chat.py's training-from-scratch kinds (`text`, `transcription`)."""
    if isinstance(sample, dict) and (
        "messages" not in sample
        and (isinstance(sample.get("text"), str) or isinstance(sample.get("transcription"), dict))
    ):
        return sample
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list) or not sample["messages"]:
        raise DataSourceError(f"{where}: expected an object with a non-empty 'messages' list")
    return sample


def open_source(path: str | Path, fmt: str, name: str = "") -> Source:
    """Open `path` as `fmt` ('jsonl' or 'energon')."""
    if fmt == "jsonl":
        return JsonlSource(path, name)
    if fmt == "energon":
        return EnergonSource(path, name)
    raise DataSourceError(f"{path}: unknown data format {fmt!r} (jsonl, energon)")
