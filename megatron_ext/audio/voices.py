"""Pool of reference recordings for voice cloning (synth data and spoken benchmarks): WAV clips plus the
text spoken in each.

Transcripts come from a sidecar `NAME.txt`, or from a Sphinx-style `transcription` file in the same
folder (`<s> text </s> (NAME)` per line), the layout of Debian's pocketsphinx-testdata LibriVox clips.
"""

import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.audio.waveform import decode_audio, encode_wav, to_16k_mono
from megatron_ext.errors import ProjectError

DEFAULT_VOICES = Path("/usr/share/pocketsphinx/test/data/librivox")
_SPHINX_LINE = re.compile(r"^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*$")


class VoicesError(ProjectError, ValueError):
    """The reference-voice folder cannot be used (the message names it)."""


@dataclass(frozen=True)
class RefVoice:
    """One reference clip, already converted to 16 kHz mono WAV bytes."""

    name: str
    wav: bytes
    text: str


def _sphinx_transcripts(folder: Path) -> dict[str, str]:
    path = folder / "transcription"
    if not path.is_file():
        return {}
    matches = (_SPHINX_LINE.match(line) for line in path.read_text(errors="replace").splitlines())
    return {m.group(2): m.group(1) for m in matches if m}


def load_voices(folder: Path) -> tuple[list[RefVoice], list[str]]:
    """Readable clips with transcripts, sorted by name, and one problem line per clip that was skipped."""
    if not folder.is_dir():
        raise VoicesError(f"--voices {folder}: not a directory")
    transcripts = _sphinx_transcripts(folder)
    voices, problems = [], []
    for clip in sorted(folder.glob("*.wav")):
        sidecar = clip.with_suffix(".txt")
        text = sidecar.read_text().strip() if sidecar.is_file() else transcripts.get(clip.stem, "")
        try:
            samples, rate = decode_audio(clip.read_bytes(), clip.name)
        except (OSError, ValueError) as e:
            problems.append(f"{clip}: unreadable reference clip ({e}); skipped")
            continue
        if not text:
            problems.append(f"{clip}: no transcript ({sidecar.name} or transcription); skipped")
            continue
        voices.append(RefVoice(clip.stem, encode_wav(to_16k_mono(samples, rate)), text))
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    if not voices:
        raise VoicesError(f"--voices {folder}: no usable reference clip (need *.wav with transcripts)")
    return voices, problems


def pick_voice(voices: list[RefVoice], seed: int, row: int, message: int) -> RefVoice:
    """Seeded choice per (row, message): the same on every rerun, worker count and shard layout."""
    return random.Random(f"{seed}:{row}:{message}").choice(voices)
