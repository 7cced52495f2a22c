"""Finding and reading weight files: local paths, http(s) URLs or files shipped with the package,
with errors that name the file."""
import gzip
import io
import os
import pickle
import zipfile
from typing import Any, Dict, Union

import torch
from iopath.common.file_io import PathManager as _PathManagerCls
from iopath.common.file_io import HTTPURLHandler

# Our own PathManager: an http(s) URL is downloaded once into iopath's cache
# ($FVCORE_CACHE or ~/.torch/iopath_cache) and reused afterwards.
_path_manager = _PathManagerCls()
_path_manager.register_handler(HTTPURLHandler())


# "regionspot://pretrained/x.pth.gz" names a file shipped inside the installed package (the
# quickstart's tiny encoders), so configs find it from any working directory.
PACKAGE_PREFIX = "regionspot://"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def is_url(path: str) -> bool:
    return path.startswith("http://") or path.startswith("https://")


def resolve_weights(path: str, what: str) -> str:
    """Return a local file for `path` (a file path or an http(s) URL, fetched once and cached).

    Args:
        path: local path or URL.
        what: what the file is for (e.g. "SAM checkpoint"), used in error messages.
    """
    if path.startswith(PACKAGE_PREFIX):
        path = os.path.join(PACKAGE_DIR, *path[len(PACKAGE_PREFIX):].split("/"))
    path = os.path.expanduser(path)
    if is_url(path):
        try:
            return _path_manager.get_local_path(path)
        except Exception as e:  # network errors come in many types; say which URL failed
            raise RuntimeError(f"Could not download the {what} from {path}: {e}") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {what} file does not exist: {path}")
    return path


def open_weights(local: str) -> Union[str, io.BytesIO]:
    """What torch.load / torch.jit.load should read for a local file: the file itself, or, for a
    gzip-compressed one (recognised by its magic bytes), its decompressed bytes in memory."""
    with open(local, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return local
    try:
        with gzip.open(local, "rb") as f:
            return io.BytesIO(f.read())
    except (OSError, EOFError) as e:
        raise RuntimeError(f"The gzip-compressed weights file {local} is corrupt or truncated ({e}).") from e


def load_weights_file(path: str, what: str) -> Dict[str, Any]:
    """torch.load a weights file, turning truncation and corruption into an error that names it."""
    local = resolve_weights(path, what)
    try:
        obj = torch.load(open_weights(local), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise RuntimeError(
            f"The {what} file {local} is corrupt or truncated and cannot be read ({e}). "
            "Delete it and download it again."
        ) from e
    if not isinstance(obj, dict):
        raise RuntimeError(f"The {what} file {local} holds a {type(obj).__name__}, not a state dict.")
    return obj
