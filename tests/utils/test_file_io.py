"""Atomic writes under a full disk or a file-size limit: the error names the file and the cause, no
torn or temporary file is left and the previous file is intact. Output-path checks."""
import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from regionspot.utils import file_io
from regionspot.utils.file_io import (
    OutputPathError,
    atomic_torch_save,
    check_output_dir,
    check_output_file,
)

from conftest import HANG_TIMEOUT_S, ROOT


def test_checkpoint_save_over_the_file_size_limit_names_file_and_cause(tmp_path):
    """A real limit (RLIMIT_FSIZE) in a subprocess: the trainer's checkpointer saving the tiny model."""
    script = textwrap.dedent(f"""
        import os, resource, sys, torch
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from conftest import tiny_cfg
        from detectron2.modeling import build_model
        from regionspot.checkpoint import RegionSpotCheckpointer
        model = build_model(tiny_cfg())
        ck = RegionSpotCheckpointer(model, {str(tmp_path)!r})
        ck.save("model_final")
        path = os.path.join({str(tmp_path)!r}, "model_final.pth")
        before = open(path, "rb").read()
        with torch.no_grad():
            for p in model.head.parameters():
                p.add_(1.0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, resource.RLIM_INFINITY))
        try:
            ck.save("model_final")
        except OSError as e:
            print("ERROR:", e)
        assert open(path, "rb").read() == before
        print("FILES:", sorted(os.listdir({str(tmp_path)!r})))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = proc.stdout.split("ERROR:", 1)[1].splitlines()[0]
    assert str(tmp_path / "model_final.pth") in error and "File too large" in error and "ulimit" in error
    assert "FILES: ['last_checkpoint', 'model_final.pth']" in proc.stdout  # no temporary file left
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]  # still readable


def test_disk_full_names_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "emb.pth")
    atomic_torch_save({"x": torch.arange(10)}, path)
    before = open(path, "rb").read()
    real_fdopen = os.fdopen

    class FullDisk:
        """A file that takes 100 bytes, then fails as a full disk does."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(file_io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_torch_save({"x": torch.randn(1000)}, path)
    assert info.value.errno == errno.ENOSPC and path in str(info.value)
    assert os.listdir(tmp_path) == ["emb.pth"] and open(path, "rb").read() == before


def test_other_errors_pass_through_and_leave_nothing(tmp_path):
    with pytest.raises(AttributeError):  # not a write failure: torch's own error, unchanged
        atomic_torch_save({"f": lambda: 0}, str(tmp_path / "x.pth"))
    assert os.listdir(tmp_path) == []


def test_output_path_checks(tmp_path):
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    assert check_output_file(str(tmp_path / "new" / "deeper" / "r.json"), "--json-output")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_output_dir(str(tmp_path / "vis"), "--output")
    with pytest.raises(OutputPathError, match=rf"--json-output {a_file}/r.json: {a_file} is a file"):
        check_output_file(str(a_file / "r.json"), "--json-output")
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_file(str(tmp_path), "--json-output")
    with pytest.raises(OutputPathError, match=rf"--output {a_file} is a file; give a folder"):
        check_output_dir(str(a_file), "--output")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_dir(str(a_file / "vis"), "--output")
    if os.path.isdir("/proc/self"):  # not writable even by root
        with pytest.raises(OutputPathError, match="cannot write in /proc/self"):
            check_output_file("/proc/self/x.json", "--json-output")
