"""`files.atomic_write`, which every file ugatit writes goes through: a failed write leaves the old file as it was
and nothing beside it, and says which file it was for, on a real full disk too."""

import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from ugatit.checkpoint import save_model
from ugatit.cli import main
from ugatit.config import ModelConfig
from ugatit.files import atomic_write


def _write_text(text):
    return lambda tmp: tmp.write_text(text)


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = atomic_write(tmp_path / "log.json", _write_text("old"))

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise ValueError("the writer's own error")

    with pytest.raises(ValueError, match="the writer's own error"):  # not a file-system error: raised as it is
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["log.json"]


def test_an_os_error_names_the_file_it_was_for(tmp_path):
    path = atomic_write(tmp_path / "model.bin", _write_text("old"))

    def disk_error(tmp):
        tmp.write_text("half")
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # as a write on an open file reports it: no path

    with pytest.raises(OSError) as info:
        atomic_write(path, disk_error)
    assert info.value.errno == errno.EIO and info.value.filename == str(path)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_a_folder_names_itself_for_a_file_in_it_that_failed(tmp_path):
    folder = tmp_path / "step_0000010"

    def missing_subfolder(tmp):
        tmp.mkdir()
        (tmp / "sub" / "state.pt").write_text("new")  # the OS names this file, inside the temporary folder

    with pytest.raises(OSError) as info:
        atomic_write(folder, missing_subfolder)
    assert info.value.errno == errno.ENOENT and info.value.filename == str(folder)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_take_the_old_ones_place_gives_it_back(tmp_path, monkeypatch):
    folder = tmp_path / "step_0000010"
    atomic_write(folder, lambda tmp: (tmp.mkdir(), (tmp / "state.pt").write_text("old")))
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.fspath(dst) == os.fspath(folder):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), os.fspath(src), os.fspath(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match=str(folder)):
        atomic_write(folder, lambda tmp: (tmp.mkdir(), (tmp / "state.pt").write_text("new")))
    assert (folder / "state.pt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


# ---------------------------------------------------------------- a real full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system (tmpfs) to fill: where root may mount one on Linux, else the tests skip."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a full disk is made by mounting a small tmpfs, which needs root on Linux")
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: gone once no file in it is open


def test_full_disk_is_said_for_torch_and_safetensors_files(small_disk):
    big = {"w": torch.zeros(2**17)}  # 512 KiB
    kept = atomic_write(small_disk / "state.pt", lambda tmp: torch.save({"w": torch.zeros(4)}, tmp))
    with pytest.raises(OSError) as info:  # torch.save itself raises RuntimeError("... unexpected pos ...")
        atomic_write(kept, lambda tmp: torch.save(big, tmp))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(kept)
    assert torch.load(kept)["w"].shape == (4,)
    with pytest.raises(OSError) as info:  # safetensors raises its own SafetensorError
        save_model(small_disk / "model.safetensors", {"genA2B": big}, ModelConfig())
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(small_disk / "model.safetensors")
    assert sorted(p.name for p in small_disk.iterdir()) == ["state.pt"]


def test_cli_on_a_full_disk_is_one_line_naming_the_file(small_disk, generators_64, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.effect_noise((1200, 900), 64).convert("RGB").save(photo)  # its heatmap overlay overfills the disk
    out = small_disk / "out"
    assert main(["translate", str(generators_64), str(photo), "--out", str(out), "--original-size", "--heatmap",
                 "--no-progress"]) == 2  # fmt: skip
    error = capsys.readouterr().err
    failed = next(name for name in ("photo.png", "photo_heatmap.png") if f"{out / name}:" in error)
    assert error == f"ugatit: error: {out / failed}: {os.strerror(errno.ENOSPC)}\n"
    assert failed not in [p.name for p in out.iterdir()] and not any(p.name.startswith(".") for p in out.iterdir())
