"""Writing files so that a crash never leaves a torn one behind, and checksums that tell when
a file's content changed after it was written (torch.load checks none)."""
import hashlib
import json
import os
import tempfile
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path` (atomic on POSIX)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
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
