"""Writing files so that a crash never leaves a torn one behind, and checksums that tell when
a file's content changed after it was written (torch.load checks none)."""
import contextlib
import hashlib
import json
import os
import tempfile
from typing import IO, Any, Iterator

import torch


def _umask() -> int:
    """The process's umask. Linux shows it in /proc without changing it; elsewhere it is read by
    setting and restoring it (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path` (atomic on
    POSIX), on error it is removed and `path` is left as it was.

    The file gets the permissions a plain ``open(path, "w")`` would give (0o666 minus the umask):
    `tempfile.mkstemp` creates it 0o600, which would hide checkpoints from the user's group.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing only ('w' or 'wb'), not {mode!r}.")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, 0o666 & ~_umask())
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def content_checksum(*parts: Any) -> str:
    """sha256 over `parts` in order: tensors by dtype, shape and raw bytes; anything else as JSON.

    Stored in a cache file when it is written and compared when it is read, so flipped or zeroed
    bytes inside tensor data (bit rot, a bad disk or copy) are detected instead of used.
    """
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode("utf-8") + b"|")
    return h.hexdigest()
def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through `atomic_write`: readers never see a half-written file."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
