"""Writing files so that a crash or a full disk never leaves a torn one behind (and with the
user's umask), checking output paths before a long job starts so its work is not lost at the end,
and checksums that tell when a file's content changed after it was written (torch.load checks
none)."""
import errno
import hashlib
import json
import os
import tempfile
from typing import IO, Any, Callable, Optional

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


class OutputPathError(ValueError):
    """An output path that cannot be written: a bad option, reported before any work starts."""


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`, if any: torch.save reports a failed write as a RuntimeError of its
    C++ stream, with the Python file's OSError (ENOSPC, EFBIG, ...) only as its context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file in `path`'s folder, then rename it over `path` (atomic on
    POSIX). On any failure the temporary file is removed and an existing `path` is left as it was;
    a failed write (disk full, file-size limit, ...) raises an OSError naming `path` and the cause.

    The file gets the permissions a plain ``open(path, "w")`` would give (0o666 minus the umask):
    `tempfile.mkstemp` creates it 0o600, which would hide checkpoints from the user's group.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())
            write(f)
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        err = _os_error_in(e)
        if err is None:
            raise
        reason = err.strerror or os.strerror(err.errno)
        if err.errno == errno.EFBIG:
            reason += " (the file-size limit, ulimit -f, was reached)"
        raise OSError(err.errno, f"Could not write {path}: {reason}. Any previous {os.path.basename(path)} "
                                 "is unchanged.") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path` (see `atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_creatable_under(folder: str, option: str, path: str) -> None:
    """`folder` (absent or a folder) can be created and written in: its nearest existing ancestor
    is a writable folder. Probed by creating and removing a temporary file, which also catches
    read-only file systems, where permission bits do not tell. Errors name `option` and `path`."""
    base = _nearest_existing(folder)
    if not os.path.isdir(base):
        raise OutputPathError(f"{option} {path}: {base} is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".regionspot-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputPathError(f"{option} {path}: cannot write in {base} ({e.strerror}).") from e


def check_output_file(path: str, option: str) -> str:
    """Check before any work that the file `path` can be written (its folder may not exist yet).

    Args:
        path: the output file.
        option: how the user gave it (e.g. "--json-output"), for the error message.
    Returns the path with `~` expanded. Raises OutputPathError naming `option` and the path.
    """
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise OutputPathError(f"{option} {path} is a folder; give a file name.")
    if path.endswith(os.sep) or not os.path.basename(path):
        raise OutputPathError(f"{option} {path} names a folder; give a file name.")
    _check_creatable_under(os.path.dirname(os.path.abspath(path)), option, path)
    return path


def check_output_dir(path: str, option: str) -> str:
    """Check before any work that `path` is, or can be created as, a writable folder.

    Args:
        path: the output folder.
        option: how the user gave it (e.g. "--output"), for the error message.
    Returns the path with `~` expanded. Raises OutputPathError naming `option` and the path.
    """
    path = os.path.expanduser(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{option} {path} is a file; give a folder.")
    _check_creatable_under(os.path.abspath(path), option, path)
    return path


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
