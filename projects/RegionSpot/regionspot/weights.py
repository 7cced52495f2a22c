"""Finding and reading weight files: local paths or http(s) URLs, with errors that name the file."""
import os
from typing import Any, Dict

import torch
from iopath.common.file_io import PathManager as _PathManagerCls
from iopath.common.file_io import HTTPURLHandler

# Our own PathManager: an http(s) URL is downloaded once into iopath's cache
# ($FVCORE_CACHE or ~/.torch/iopath_cache) and reused afterwards.
_path_manager = _PathManagerCls()
_path_manager.register_handler(HTTPURLHandler())


def is_url(path: str) -> bool:
    return path.startswith("http://") or path.startswith("https://")


def resolve_weights(path: str, what: str) -> str:
    """Return a local file for `path` (a file path or an http(s) URL, fetched once and cached).

    Args:
        path: local path or URL.
        what: what the file is for (e.g. "SAM checkpoint"), used in error messages.
    """
    path = os.path.expanduser(path)
    if is_url(path):
        try:
            return _path_manager.get_local_path(path)
        except Exception as e:  # network errors come in many types; say which URL failed
            raise RuntimeError(f"Could not download the {what} from {path}: {e}") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {what} file does not exist: {path}")
    return path


def load_weights_file(path: str, what: str) -> Dict[str, Any]:
    """torch.load a weights file, turning truncation and corruption into an error that names it.

    A corrupt file (random bytes, truncated, empty, another pickle) can raise almost any
    exception from the unpickler, so every one is caught and re-raised with the file's name
    (the original chained as the cause).
    """
    local = resolve_weights(path, what)
    try:
        obj = torch.load(local, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(
            f"The {what} file {local} is corrupt, truncated or not a PyTorch file and cannot be read "
            f"({type(e).__name__}: {e}). Delete it and download it again."
        ) from e
    if not isinstance(obj, dict):
        raise RuntimeError(f"The {what} file {local} holds a {type(obj).__name__}, not a state dict.")
    return obj
