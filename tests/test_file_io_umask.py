"""Atomic writes (umask part): files get the user's umask (not mkstemp's 0600), and a failed write
leaves nothing."""
import json
import os
import stat

import pytest
import torch

from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.file_io import atomic_torch_save, atomic_write, atomic_write_bytes
from regionspot.text_embeddings import save_embedding_file


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_files_follow_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what an ordinary open() gives under this umask
    expected = 0o666 & ~mask
    assert _mode(plain) == expected

    atomic_torch_save({"a": torch.ones(2)}, str(tmp_path / "t.pth"))
    atomic_write_bytes(json.dumps([1]).encode(), str(tmp_path / "r.json"))
    save_embedding_file(str(tmp_path / "vocab" / "v.pth"), ["a"], torch.ones(1, 4), "fp", ["{}."])
    model = torch.nn.Linear(2, 2)
    RegionSpotCheckpointer(model, save_dir=str(tmp_path / "ckpt")).save("model_final")
    for p in ("t.pth", "r.json", "vocab/v.pth", "ckpt/model_final.pth"):
        assert _mode(tmp_path / p) == expected, p
    assert torch.load(tmp_path / "t.pth")["a"].sum() == 2
    assert json.loads((tmp_path / "r.json").read_text()) == [1]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["last_checkpoint", "model_final.pth"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    def write(f):
        f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(str(path), write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.json"]
