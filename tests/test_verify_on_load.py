"""Content digests: recorded by the writers, checked on load (cached per file), skipped by --no-verify; done
markers of convert and merge trust an output only while its files verify."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from megatron_ext.checkpoint.atomic import CheckpointError
from megatron_ext.checkpoint.convert import convert
from megatron_ext.checkpoint.megatron_lm import resolve
from megatron_ext.checkpoint.metadata import read_meta, verification
from megatron_ext.checkpoint.source import open_checkpoint
from megatron_ext.cli import convert as convert_cli
from megatron_ext.cli import merge as merge_cli


@pytest.fixture(scope="module")
def td(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "td"
    convert(tiny_dir / "voxtral-hf", out, "megatron", progress=False)
    return resolve(out)  # the iteration directory (release/) of the Megatron-LM layout: a complete checkpoint


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))


def test_metadata_records_every_file_with_its_sha256(td: Path) -> None:
    meta = json.loads((td / "checkpoint_meta.json").read_text())
    assert set(meta["sha256"]) == set(meta["files"]) and "__0_0.distcp" in meta["files"]
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((td / name).read_bytes()).hexdigest() == digest, name


def test_same_size_bit_rot_is_refused_unless_no_verify(td: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "td"
    shutil.copytree(td, bad)
    _flip(bad / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: sha256 differs"):
        open_checkpoint(bad)
    with verification(False):
        open_checkpoint(bad).close()  # sizes and headers still agree: it opens
        assert read_meta(bad).files == read_meta(td, check_files=False).files
    with pytest.raises(CheckpointError):
        read_meta(bad)  # the setting was restored
    argv = ["--input", str(bad), "--output", str(tmp_path / "hf"), "--to", "hf", "--no-progress"]
    assert convert_cli.main(argv) == 2 and "sha256 differs" in capsys.readouterr().err
    assert convert_cli.main([*argv, "--no-verify"]) == 0 and (tmp_path / "hf" / "model.safetensors").is_file()


def test_convert_rerun_on_its_verified_output_is_nothing_to_do(
    tiny_dir: Path, td: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "td"
    argv = ["--input", str(tiny_dir / "voxtral-hf"), "--output", str(out), "--to", "megatron", "--no-progress"]
    assert convert_cli.main(argv) == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in resolve(out).iterdir()}
    capsys.readouterr()
    assert convert_cli.main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in resolve(out).iterdir()} == stamp
    assert convert_cli.main([*argv, "--tp", "2"]) == 2  # another conversion: the output is not replaced
    assert "already exists" in capsys.readouterr().err
    _flip(resolve(out) / "__0_0.distcp")
    assert convert_cli.main(argv) == 2 and "__0_0.distcp: sha256 differs" in capsys.readouterr().err


def test_merge_rerun_is_nothing_to_do_only_while_its_files_verify(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    argv = ["--devstral", str(tiny_dir / "devstral-hf"), "--voxtral", str(tiny_dir / "voxtral-hf")]
    argv += ["--method", "linear", "--alpha", "0.2", "--rope-from", "devstral", "--output", str(out), "--no-progress"]
    assert merge_cli.main(argv) == 0
    record = json.loads((out / "merge.json").read_text())
    # config.json and the index make the directory loadable: written last, checked on load, not recorded
    loadable = {"merge.json", "config.json", "model.safetensors.index.json"}
    assert set(record["sha256"]) == {p.name for p in out.iterdir()} - loadable
    capsys.readouterr()
    assert merge_cli.main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    (out / "tekken.json").write_bytes((out / "tekken.json").read_bytes().replace(b'"', b"'", 1))
    assert merge_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "tekken.json: sha256 differs" in err and "nothing to do" not in err
