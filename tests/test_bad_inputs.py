"""The acceptance corpus of bad inputs (issue 23): one case per kind, across every tool, called in-process.

Each case copies a tiny model (or writes a small file), damages it, and runs `megatron_ext.cli.<tool>.main`.
Every case must end in exactly one `error:` line naming the culprit, exit code 2, no traceback, no new file
outside the tool's output, nothing there a loader accepts, and no crafted pickle executed (marker absent).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.checkpoint.source import open_checkpoint
from megatron_ext.cli import align_tokenizer, evaluate, logits, merge, report, synth_audio, train
from megatron_ext.cli import convert as convert_cli
from megatron_ext.testing.tiny_chats import write_tiny_chats

ROOT = Path(__file__).resolve().parents[1]
MARKER = "pwned"
PROGRESS = re.compile(r"\d+%\||\?(it|row|sample|tensor)/s|it/s]|/s]")


class _Payload:
    """Unpickling this would create the marker file (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@dataclass
class Kit:
    tiny: Path
    td: Path  # voxtral-hf converted to torch_dist
    chats: dict[str, Path]


@pytest.fixture(scope="module")
def kit(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    root = tmp_path_factory.mktemp("bad-kit")
    convert(tiny_dir / "voxtral-hf", root / "td", "megatron", progress=False)
    # the iteration directory (release/) of the Megatron-LM layout: a complete checkpoint, damaged in copies
    return Kit(tiny_dir, resolve(root / "td"), write_tiny_chats(root / "chats", n_text=6, n_audio=2))


# ---- damage helpers ------------------------------------------------------------------------------------


def _copy(src: Path, tmp: Path, name: str = "in") -> Path:
    shutil.copytree(src, tmp / name)
    return tmp / name


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    out = edit(data)
    path.write_text(json.dumps(data if out is None else out))


def _set_hf(key: str, value: object) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        (cfg.get("text_config") or cfg)[key] = value

    return edit


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, header: object, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_header(path: Path, edit: Callable[[dict], object]) -> None:
    header, data = _header(path)
    out = edit(header)
    _write_header(path, header if out is None else out, data)


def _first_tensor(header: dict) -> str:
    return next(k for k in sorted(header) if k != "__metadata__")


def _plant(td: Path, name: str, data: bytes) -> None:
    """Replace a torch_dist file and record its size and sha256 in checkpoint_meta.json, as an attacker would."""
    (td / name).write_bytes(data)
    meta = json.loads((td / "checkpoint_meta.json").read_text())
    meta["files"][name], meta["sha256"][name] = len(data), hashlib.sha256(data).hexdigest()
    (td / "checkpoint_meta.json").write_text(json.dumps(meta))


def _flip(path: Path, at: int = -64) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))


def _nan_model(kit: Kit, tmp: Path, model: str = "devstral-hf", value: float = float("nan")) -> Path:
    d = _copy(kit.tiny / model, tmp)
    tensors = load_file(d / "model.safetensors")
    name = "model.norm.weight" if "model.norm.weight" in tensors else sorted(tensors)[-1]
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _merge_args(dev: Path, vox: Path, out: Path, *extra: str) -> list[str]:
    return ["--devstral", str(dev), "--voxtral", str(vox), "--output", str(out), "--no-progress", *extra]


def _linear(*extra: str) -> tuple[str, ...]:
    return ("--method", "linear", "--alpha", "0.1", "--rope-from", "devstral", *extra)


def _train_args(kit: Kit, tmp: Path, *extra: str, config: Path | None = None) -> list[str]:
    base = {
        "model.checkpoint": kit.td,
        "parallel.tensor_model_parallel_size": 1,
        "data.sources.0.path": kit.chats["text"],
        "data.sources.1.path": kit.chats["audio"],
        "data.validation.0.path": kit.chats["text"],
        "training.seq_length": 512,
        "checkpoint.save_dir": tmp / "out",
        "logging.tensorboard_dir": tmp / "out" / "tb",
    }
    config = config or ROOT / "examples/configs/tiny_cpu.yaml"
    return ["--config", str(config), "--dry-run", *[f"{k}={v}" for k, v in base.items()], *extra]


# ---- the cases: name -> build(kit, tmp) -> (tool main, argv, culprit, output) -------------------------

Case = Callable[[Kit, Path], tuple[Callable, list[str], str, Path]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(build: Case) -> Case:
        CASES[name] = build
        return build

    return register


def _convert(inp: Path, tmp: Path, *extra: str, to: str = "megatron") -> tuple[Callable, list[str], Path]:
    return convert_cli.main, ["--input", str(inp), "--output", str(tmp / "out"), "--to", to, "--no-progress", *extra]


def _convert_case(name: str, damage: Callable[[Kit, Path], Path], culprit: str, *extra: str, to: str = "megatron"):
    @case(f"convert-{name}")
    def build(kit: Kit, tmp: Path):
        tool, argv = _convert(damage(kit, tmp), tmp, *extra, to=to)[:2]
        return tool, argv, culprit, tmp / "out"


def _vox(kit: Kit, tmp: Path) -> Path:
    return _copy(kit.tiny / "voxtral-hf", tmp)


def _vox_edit(edit: Callable[[Path], None]) -> Callable[[Kit, Path], Path]:
    def damage(kit: Kit, tmp: Path) -> Path:
        d = _vox(kit, tmp)
        edit(d)
        return d

    return damage


def _td_edit(edit: Callable[[Path], None]) -> Callable[[Kit, Path], Path]:
    def damage(kit: Kit, tmp: Path) -> Path:
        d = _copy(kit.td, tmp)
        edit(d)
        return d

    return damage


def _native_edit(edit: Callable[[Path], None]) -> Callable[[Kit, Path], Path]:
    def damage(kit: Kit, tmp: Path) -> Path:
        d = _copy(kit.tiny / "voxtral-native", tmp)
        edit(d)
        return d

    return damage


ST = "model.safetensors"
_convert_case("input-absent", lambda kit, tmp: tmp / "absent", "absent")
_convert_case("config-is-a-list", _vox_edit(lambda d: (d / "config.json").write_text("[1, 2]")), "config.json")
_convert_case("config-not-json", _vox_edit(lambda d: (d / "config.json").write_text("{")), "config.json")
_convert_case(
    "heads-a-string",
    _vox_edit(lambda d: _edit_json(d / "config.json", _set_hf("num_attention_heads", "8"))),
    "num_attention_heads",
)
_convert_case(
    "kv-heads-zero",
    _vox_edit(lambda d: _edit_json(d / "config.json", _set_hf("num_key_value_heads", 0))),
    "num_query_groups",  # named as in ModelConfig
)
_convert_case(
    "layers-negative",
    _vox_edit(lambda d: _edit_json(d / "config.json", _set_hf("num_hidden_layers", -2))),
    "num_layers",  # named as in ModelConfig
)
_convert_case(
    "rope-theta-nan",
    _vox_edit(
        lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"rope_theta": ', '"rope_theta": NaN, "x": ')
        )
    ),
    "rope.theta",
)
_convert_case(
    "params-binary", _native_edit(lambda d: (d / "params.json").write_bytes(b"\x00\xff\xfe binary")), "params.json"
)
_convert_case("params-is-a-list", _native_edit(lambda d: (d / "params.json").write_text("[]")), "params.json")
_convert_case("header-is-a-list", _vox_edit(lambda d: _edit_header(d / ST, lambda h: [1, 2, 3])), ST)
_convert_case("header-not-json", _vox_edit(lambda d: _write_header(d / ST, "x", b"")), ST)
_convert_case(
    "header-negative-offset",
    _vox_edit(lambda d: _edit_header(d / ST, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [-8, 0]))),
    ST,
)
_convert_case(
    "header-offsets-past-end",
    _vox_edit(lambda d: _edit_header(d / ST, lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [0, 1 << 40]))),
    ST,
)
_convert_case(
    "header-dtype-unknown",
    _vox_edit(lambda d: _edit_header(d / ST, lambda h: h[_first_tensor(h)].__setitem__("dtype", "Q7"))),
    ST,
)
_convert_case(
    "header-shape-a-string",
    _vox_edit(lambda d: _edit_header(d / ST, lambda h: h[_first_tensor(h)].__setitem__("shape", "8"))),
    ST,
)
_convert_case("weights-truncated", _vox_edit(lambda d: (d / ST).write_bytes((d / ST).read_bytes()[:-100])), ST)
_convert_case(
    "index-escapes-directory",
    _vox_edit(
        lambda d: (
            (d / f"{ST}.index.json").write_text(
                json.dumps({"weight_map": dict.fromkeys(_header(d / ST)[0], "../x/" + ST)})
            ),
            (d / ST).unlink(),
        )
    ),
    "../x",
)
_convert_case("nan-weights", lambda kit, tmp: _nan_model(kit, tmp), "final_layernorm.weight")
_convert_case("inf-weights", lambda kit, tmp: _nan_model(kit, tmp, value=float("inf")), "final_layernorm.weight")
_convert_case("tp-zero", _vox, "--tp", "--tp", "0")
_convert_case("tp-negative", _vox, "--tp", "--tp", "-1")
_convert_case("pp-zero", _vox, "--pp", "--pp", "0")
_convert_case("tp-not-dividing-heads", _vox, "--tp", "--tp", "3")
_convert_case(
    "rope-from-binary",
    _td_edit(lambda d: _edit_json(d / "checkpoint_meta.json", lambda m: m["model"]["decoder"].pop("rope"))),
    "rope.bin",
    "--rope-from",
    "RFROM",
)
_convert_case(
    "td-metadata-pickle",
    _td_edit(lambda d: _plant(d, ".metadata", pickle.dumps(_Payload(d.parent / MARKER)))),
    ".metadata",
)
_convert_case(
    "td-common-pt-pickle-unrecorded",
    _td_edit(lambda d: (d / "common.pt").write_bytes(pickle.dumps(_Payload(d.parent / MARKER)))),
    "common.pt",
)
_convert_case("td-bit-rot", _td_edit(lambda d: _flip(d / "__0_0.distcp")), "__0_0.distcp")
_convert_case("td-weights-deleted", _td_edit(lambda d: (d / "__0_0.distcp").unlink()), "__0_0.distcp")
_convert_case("td-tokenizer-altered", _td_edit(lambda d: _flip(d / "tekken.json", 40)), "tekken.json", to="hf")
_convert_case(
    "td-meta-is-a-list", _td_edit(lambda d: (d / "checkpoint_meta.json").write_text("[]")), "checkpoint_meta.json"
)
_convert_case(
    "td-meta-not-json", _td_edit(lambda d: (d / "checkpoint_meta.json").write_text("{")), "checkpoint_meta.json"
)
_convert_case(
    "td-meta-file-escapes",
    _td_edit(lambda d: _edit_json(d / "checkpoint_meta.json", lambda m: m["files"].__setitem__("../x", 1))),
    "../x",
)
_convert_case(
    "td-meta-heads-a-string",
    _td_edit(
        lambda d: _edit_json(
            d / "checkpoint_meta.json", lambda m: m["model"]["decoder"].__setitem__("num_attention_heads", "8")
        )
    ),
    "num_attention_heads",
)


@case("convert-bin-only-never-unpickled")
def _bin_only(kit: Kit, tmp: Path):
    d = _vox(kit, tmp)
    (d / ST).unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp / MARKER)))
    return (*_convert(d, tmp)[:2], "in", tmp / "out")


@case("convert-output-under-a-file")
def _output_under_file(kit: Kit, tmp: Path):
    (tmp / "afile").write_text("x")
    argv = ["--input", str(kit.tiny / "voxtral-hf"), "--output", str(tmp / "afile" / "out"), "--to", "megatron"]
    return convert_cli.main, [*argv, "--no-progress"], "afile", tmp / "afile"


# -- merge
def _merge_case(name: str, culprit: str, *extra: str, dev: Callable | None = None, vox: Callable | None = None):
    @case(f"merge-{name}")
    def build(kit: Kit, tmp: Path):
        d = dev(kit, tmp) if dev else kit.tiny / "devstral-hf"
        v = vox(kit, tmp) if vox else kit.tiny / "voxtral-hf"
        return merge.main, _merge_args(d, v, tmp / "out", *extra), culprit, tmp / "out"


_merge_case("devstral-absent", "absent", *_linear(), dev=lambda kit, tmp: tmp / "absent")
_merge_case("rope-theta-nan", "rope", "--method", "linear", "--alpha", "0.1", "--rope-theta", "nan")
_merge_case("rope-theta-inf", "rope", "--method", "linear", "--alpha", "0.1", "--rope-theta", "inf")
_merge_case("rope-theta-negative", "rope", "--method", "linear", "--alpha", "0.1", "--rope-theta", "-5")
_merge_case("alpha-nan", "alpha", "--method", "linear", "--alpha", "nan", "--rope-from", "devstral")
_merge_case("alpha-above-one", "alpha", "--method", "linear", "--alpha", "1.5", "--rope-from", "devstral")
_merge_case("density-zero", "density", "--method", "della", "--density", "0", "--rope-from", "devstral")
_merge_case("lambda-nan", "lambda", "--method", "della", "--lambda", "nan", "--rope-from", "devstral")
_merge_case("shard-size-zero", "shard", *_linear("--shard-size-gb", "0"))
_merge_case(
    "devstral-config-list",
    "config.json",
    *_linear(),
    dev=lambda kit, tmp: _copy_edit(kit, tmp, "devstral-hf", lambda d: (d / "config.json").write_text("[]")),
)
_merge_case(
    "voxtral-header-list",
    ST,
    *_linear(),
    vox=lambda kit, tmp: _copy_edit(kit, tmp, "voxtral-hf", lambda d: _edit_header(d / ST, lambda h: [])),
)
_merge_case("devstral-nan-weights", "model.norm.weight", *_linear(), dev=lambda kit, tmp: _nan_model(kit, tmp))
_merge_case(
    "parents-swapped",
    "Voxtral",
    *_linear(),
    dev=lambda kit, tmp: kit.tiny / "voxtral-hf",
    vox=lambda kit, tmp: kit.tiny / "devstral-hf",
)
_merge_case(
    "td-parent-pickle", ".metadata", "--format", "megatron", *_linear(), vox=lambda kit, tmp: _copy_edit_td(kit, tmp)
)


def _copy_edit(kit: Kit, tmp: Path, model: str, edit: Callable[[Path], None]) -> Path:
    d = _copy(kit.tiny / model, tmp, model)
    edit(d)
    return d


def _copy_edit_td(kit: Kit, tmp: Path) -> Path:
    d = _copy(kit.td, tmp, "vox-td")
    _plant(d, ".metadata", pickle.dumps(_Payload(tmp / MARKER)))
    return d


def _done_merge(tmp: Path, kit: Kit, damage: Callable[[Path], None], fmt: str) -> tuple[Callable, list[str], str, Path]:
    args = _merge_args(kit.tiny / "devstral-hf", kit.tiny / "voxtral-hf", tmp / "out", *_linear("--format", fmt))
    assert merge.main(args) == 0
    weights = "model.safetensors" if fmt == "hf" else "__0_0.distcp"
    damage(resolve(tmp / "out") / weights)
    return merge.main, args, weights, tmp / "out"


@case("merge-done-weights-altered")
def _done_altered(kit: Kit, tmp: Path):
    return _done_merge(tmp, kit, _flip, "hf")


@case("merge-done-weights-deleted")
def _done_deleted(kit: Kit, tmp: Path):
    return _done_merge(tmp, kit, Path.unlink, "hf")


@case("merge-done-td-weights-altered")
def _done_td_altered(kit: Kit, tmp: Path):
    return _done_merge(tmp, kit, _flip, "megatron")


# -- merge-grid
def _grid_case(name: str, text: str, culprit: str) -> None:
    @case(f"merge-grid-{name}")
    def build(kit: Kit, tmp: Path):
        (tmp / "grid.yaml").write_text(text.replace("TMP", str(tmp)))
        argv = _merge_args(kit.tiny / "devstral-hf", kit.tiny / "voxtral-hf", tmp / "out", "--rope-from", "devstral")
        return merge.main, [*argv, "--grid", str(tmp / "grid.yaml")], culprit, tmp / "out"


_grid_case("is-a-list", "- 1\n- 2\n", "grid.yaml")
_grid_case("does-not-parse", "runs: [\n", "grid.yaml")
_grid_case("runs-a-number", "runs: 5\n", "runs")
_grid_case("alpha-a-word", "runs:\n  - {name: a, method: linear, alpha: abc}\n", "alpha")
_grid_case("unknown-key", "runs:\n  - {name: a, method: linear, alfa: 0.1}\n", "alfa")
_grid_case("unknown-method", "runs:\n  - {name: a, method: mean}\n", "mean")
_grid_case("run-name-escapes", "runs:\n  - {name: ../escaped, method: linear, alpha: 0.1}\n", "../escaped")
_grid_case("absolute-run-name", "runs:\n  - {name: TMP/escaped, method: linear, alpha: 0.1}\n", "escaped")


# -- align
def _tok(kit: Kit, model: str) -> Path:
    return kit.tiny / model / "tekken.json"


def _align_case(name: str, dev: Callable, vox: Callable, culprit: str) -> None:
    @case(f"align-{name}")
    def build(kit: Kit, tmp: Path):
        argv = ["--devstral", str(dev(kit, tmp)), "--voxtral", str(vox(kit, tmp)), "--output", str(tmp / "out")]
        return align_tokenizer.main, argv, culprit, tmp / "out"


def _write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


_align_case(
    "devstral-cut", lambda k, t: _write(t, "cut.json", b'{"vocab": ['), lambda k, t: _tok(k, "voxtral-hf"), "cut.json"
)
_align_case(
    "voxtral-binary", lambda k, t: _tok(k, "devstral-hf"), lambda k, t: _write(t, "bin.json", b"\x00\xff"), "bin.json"
)
_align_case("voxtral-is-a-list", lambda k, t: _tok(k, "devstral-hf"), lambda k, t: _write(t, "l.json", b"[]"), "l.json")
_align_case("swapped", lambda k, t: _tok(k, "voxtral-hf"), lambda k, t: _tok(k, "devstral-hf"), "voxtral")
_align_case("absent", lambda k, t: t / "absent.json", lambda k, t: _tok(k, "voxtral-hf"), "absent.json")


# -- logits
def _logits_case(name: str, ckpt: Callable, culprit: str, tokens: str = "1,5,9") -> None:
    @case(f"logits-{name}")
    def build(kit: Kit, tmp: Path):
        argv = ["--checkpoint", str(ckpt(kit, tmp)), "--tokens", tokens, "--output", str(tmp / "out" / "l.safetensors")]
        return logits.main, argv, culprit, tmp / "out"


_logits_case("nan-model", lambda k, t: _nan_model(k, t), "position")
_logits_case("inf-model", lambda k, t: _nan_model(k, t, value=float("inf")), "position")
_logits_case("absent", lambda k, t: t / "absent", "absent")
_logits_case("token-outside-vocab", lambda k, t: k.tiny / "devstral-hf", "--tokens", tokens="1,99999999")
_logits_case("td-bit-rot", _td_edit(lambda d: _flip(d / "__0_0.distcp")), "__0_0.distcp")
_logits_case(
    "td-pickle", _td_edit(lambda d: _plant(d, ".metadata", pickle.dumps(_Payload(d.parent / MARKER)))), ".metadata"
)


@case("logits-audio-not-audio")
def _logits_bad_audio(kit: Kit, tmp: Path):
    clip = _write(tmp, "clip.wav", b"RIFF not really a wave file")
    argv = ["--checkpoint", str(kit.td), "--tokens", "1,24,2", "--audio", str(clip), "--output", str(tmp / "out" / "l")]
    return logits.main, argv, "clip.wav", tmp / "out"


# -- train dry run
def _train_case(name: str, culprit: str, *extra: str, config: Callable | None = None) -> None:
    @case(f"train-{name}")
    def build(kit: Kit, tmp: Path):
        return train.main, _train_args(kit, tmp, *extra, config=config(tmp) if config else None), culprit, tmp / "out"


_train_case("lr-negative", "optimizer.lr", "optimizer.lr=-1")
_train_case("lr-nan", "optimizer.lr", "optimizer.lr=nan")
_train_case("world-size-zero", "world", "--world-size", "0")
_train_case("world-size-negative", "world", "--world-size", "-2")
_train_case("tp-zero", "tensor_model_parallel_size", "parallel.tensor_model_parallel_size=0")
_train_case("seq-length-a-word", "seq_length", "training.seq_length=abc")
_train_case("unknown-key", "trainig", "trainig.seq_length=5")
_train_case("config-is-a-list", "cfg.yaml", config=lambda t: _write(t, "cfg.yaml", b"- 1\n- 2\n"))
_train_case("config-does-not-parse", "cfg.yaml", config=lambda t: _write(t, "cfg.yaml", b"model: [\n"))
_train_case("checkpoint-absent", "absent", "model.checkpoint=/nonexistent/absent")


@case("train-data-row-bad")
def _train_bad_row(kit: Kit, tmp: Path):
    rows = kit.chats["text"].read_text().splitlines()
    bad = _write(tmp, "bad.jsonl", ("\n".join([rows[0], '{"messages": 5}', *rows[1:]]) + "\n").encode())
    return train.main, _train_args(kit, tmp, f"data.sources.0.path={bad}"), "bad.jsonl", tmp / "out"


@case("train-checkpoint-bit-rot")
def _train_rot(kit: Kit, tmp: Path):
    d = _copy(kit.td, tmp)
    _flip(d / "__0_0.distcp")
    return train.main, _train_args(kit, tmp, f"model.checkpoint={d}"), "__0_0.distcp", tmp / "out"


# -- synth
def _synth_case(name: str, text: bytes | None, culprit: str, *extra: str) -> None:
    @case(f"synth-{name}")
    def build(kit: Kit, tmp: Path):
        inp = _write(tmp, "in.jsonl", text) if text is not None else tmp / "absent.jsonl"
        argv = ["--input", str(inp), "--output", str(tmp / "out"), "--tts-engine", "espeak", "--skip-energon-prepare"]
        return synth_audio.main, [*argv, *extra], culprit, tmp / "out"


_synth_case("input-absent", None, "absent.jsonl")
_synth_case("input-empty", b"", "in.jsonl")
_synth_case("input-not-json", b"{not json\n", "in.jsonl", "--on-bad-row", "fail")
_synth_case("input-row-a-list", b"[1, 2]\n", "in.jsonl", "--on-bad-row", "fail")
_synth_case(
    "workers-zero", (ROOT / "examples/data/coding_trajectories.jsonl").read_bytes(), "--workers", "--workers", "0"
)


# -- evaluate
def _eval_case(name: str, ckpt: Callable, data: Callable, culprit: str, bench: str = "mmlu_text") -> None:
    @case(f"evaluate-{name}")
    def build(kit: Kit, tmp: Path):
        argv = [bench, "--checkpoint", str(ckpt(kit, tmp)), "--data", str(data(kit, tmp))]
        return (
            evaluate.main,
            [*argv, "--output", str(tmp / "out" / "r.jsonl"), "--max-new-tokens", "2"],
            culprit,
            tmp / "out",
        )


MMLU = ROOT / "examples/eval/mmlu_text.jsonl"
_eval_case("nan-model", lambda k, t: _nan_model(k, t), lambda k, t: MMLU, "NaN or Inf logits")
_eval_case("absent", lambda k, t: t / "absent", lambda k, t: MMLU, "absent")
_eval_case(
    "data-bad-line", lambda k, t: k.tiny / "devstral-hf", lambda k, t: _write(t, "d.jsonl", b'{"id": 1}\n'), "d.jsonl"
)
_eval_case("td-bit-rot", _td_edit(lambda d: _flip(d / "__0_0.distcp")), lambda k, t: MMLU, "__0_0.distcp")


def _wer_case(name: str, refs: bytes, hyps: bytes, culprit: str) -> None:
    @case(f"evaluate-wer-{name}")
    def build(kit: Kit, tmp: Path):
        r, h = _write(tmp, "refs.jsonl", refs), _write(tmp, "hyps.jsonl", hyps)
        return evaluate.main, ["wer", "--references", str(r), "--hypotheses", str(h)], culprit, tmp / "out"


_wer_case(
    "duplicate-ref-id", b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', b'{"id": "a", "text": "x"}\n', "a"
)
_wer_case("extra-hyp-id", b'{"id": "a", "text": "x"}\n', b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n', "b")
_wer_case("not-json", b"{\n", b'{"id": "a", "text": "x"}\n', "refs.jsonl")


# -- report
def _report_case(name: str, records: bytes | None, culprit: str) -> None:
    @case(f"report-{name}")
    def build(kit: Kit, tmp: Path):
        (tmp / "results").mkdir()
        if records is not None:
            _write(tmp / "results", "r.jsonl", records)
        return report.main, ["--results", str(tmp / "results"), "--output", str(tmp / "out")], culprit, tmp / "out"


_report_case("record-missing-fields", json.dumps({"checkpoint": "x"}).encode() + b"\n", "r.jsonl")
_report_case("record-not-json", b"{\n", "r.jsonl")
_report_case("record-a-list", b"[1]\n", "r.jsonl")
_report_case("no-records", None, "results")


# ---- the checks ----------------------------------------------------------------------------------------


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _accepted(out: Path) -> bool:
    """True when something at `out` is a checkpoint a loader opens."""
    if not out.is_dir():
        return False
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        try:
            open_checkpoint(d).close()
            return True
        except (CheckpointError, OSError, ValueError):
            continue
    return False


@pytest.mark.parametrize(
    "name",
    list(CASES),
)
def test_bad_input(name: str, kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tool, argv, culprit, out = CASES[name](kit, tmp_path)
    argv = [a.replace("RFROM", str(_write(tmp_path, "rope.bin", b"\x00\x01\xff"))) for a in argv]
    capsys.readouterr()
    before, existed = _tree(tmp_path), out.exists()
    code = tool(argv)
    captured = capsys.readouterr()
    # progress bars (tqdm, carriage returns) may share stderr: every other line is checked
    lines = [line for line in re.split(r"[\r\n]", captured.err) if line.strip() and not PROGRESS.search(line)]
    assert code == 2, (code, captured.err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert culprit in lines[0], lines[0]
    partial = f".{out.name}.partial-"  # loaders refuse these names; a resumable merge keeps its own
    outside = [
        p
        for p in _tree(tmp_path) - before
        if out not in p.parents and p != out and not any(q.name.startswith(partial) for q in (p, *p.parents))
    ]
    assert not outside, outside
    assert existed or not _accepted(out)  # a done-marker case damages an output that was there before
    assert not list(tmp_path.rglob(MARKER))


def test_corpus_size() -> None:
    tools = {n.split("-")[0] for n in CASES}
    assert len(CASES) >= 60 and tools == {"convert", "merge", "align", "logits", "train", "synth", "evaluate", "report"}
