"""Finding and reading weight files: local paths, http(s) URLs or files shipped with the package
(regionspot://...), with errors that name the file.

Downloads go into iopath's cache ($FVCORE_CACHE or ~/.torch/iopath_cache, the layout detectron2's
PathManager uses, so files it fetched before are reused) and are fetched once. Every download has a
timeout: REGIONSPOT_DOWNLOAD_TIMEOUT seconds (default 60) without an answer or any data.
"""
import gzip
import hashlib
import http.client
import io
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Union
from urllib.parse import urlparse

from iopath.common.file_io import file_lock, get_cache_dir
from tqdm import tqdm

from .file_io import atomic_write
from .safe_load import UnsafeFileError, torch_load

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_ENV = "REGIONSPOT_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 60.0


class DownloadError(RuntimeError):
    """A download that failed: the message names the config key, the URL and the fix."""


class _NetworkError(Exception):
    """A failure while reading from the server, kept apart from failures writing the cache file
    (raised `from None`, so the atomic writer does not take it for a write error): args[0] is it."""


# "regionspot://pretrained/x.pth.gz" names a file shipped inside the installed package (the
# quickstart's tiny encoders), so configs find it from any working directory.
PACKAGE_PREFIX = "regionspot://"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # regionspot/


def is_url(path: str) -> bool:
    return path.startswith("http://") or path.startswith("https://")


def download_timeout() -> float:
    """Seconds a download may wait for an answer or for more data ($REGIONSPOT_DOWNLOAD_TIMEOUT)."""
    value = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_DOWNLOAD_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"{DOWNLOAD_TIMEOUT_ENV}={value!r} must be a positive number of seconds.")
    return timeout


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_download_path(url: str) -> str:
    """Where iopath's HTTPURLHandler caches `url`: <cache>/<the URL's folders>/<its file name>."""
    folder = os.path.dirname(urlparse(url).path.lstrip("/"))
    return os.path.join(get_cache_dir(), folder, url.split("/")[-1])


def download(url: str, key: str, what: str, target: Optional[str] = None, sha256: Optional[str] = None,
             hint: str = "") -> str:
    """Download `url` once to `target` (default: iopath's cache) and return the local file.

    The file is written atomically (no torn file after a failure) under a file lock (parallel
    processes download it once). A cached file is reused; with `sha256`, only if it matches.

    Args:
        url: http(s) URL.
        key: the config key the URL came from, named in errors with the fix.
        what: what the file is (e.g. "SAM vit_b checkpoint"), for messages.
        target: local file to download to.
        sha256: expected hex digest of the file, checked after the download.
        hint: extra advice appended to error messages.
    """
    target = target or default_download_path(url)
    fix = f"Download the file yourself and set {key} to its local path{hint}."

    def cached() -> bool:
        if not os.path.isfile(target):
            return False
        if sha256 is None or _sha256(target) == sha256:
            return True
        logger.warning(f"{target} does not have the expected SHA256 checksum: downloading it again.")
        return False

    if cached():
        return target
    timeout = download_timeout()
    with file_lock(target):
        if cached():
            return target
        logger.info(f"Downloading the {what} from {url} to {target} ...")
        try:
            atomic_write(target, lambda f: _fetch(url, f, timeout, os.path.basename(target)))
        except _NetworkError as e:
            cause = e.args[0]
            if isinstance(cause, urllib.error.HTTPError):
                reason = f"HTTP error {cause.code} ({cause.reason})"
            elif isinstance(cause, TimeoutError) or isinstance(getattr(cause, "reason", None), TimeoutError):
                reason = (f"no answer within {timeout:g} s (the limit is ${DOWNLOAD_TIMEOUT_ENV} seconds, "
                          f"default {DEFAULT_DOWNLOAD_TIMEOUT:g})")
            elif isinstance(cause, urllib.error.URLError):
                reason = str(cause.reason)
            else:
                reason = f"{type(cause).__name__}: {cause}"
            raise DownloadError(f"Could not download the {what} ({key}) from {url}: {reason}. {fix}") from cause
    if sha256 is not None and _sha256(target) != sha256:
        os.remove(target)
        raise DownloadError(f"The {what} downloaded from {url} ({key}) does not have the SHA256 checksum "
                            f"{sha256}: it is damaged or not that file. {fix}")
    return target


def _fetch(url: str, f, timeout: float, name: str) -> None:
    """Stream `url` into the open file `f`, with a progress bar; network failures -> _NetworkError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as source:
            length = source.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                      disable=None) as bar:
                while True:
                    block = source.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, ValueError) as e:
        raise _NetworkError(e) from None
    if total is not None and received != total:
        raise _NetworkError(ConnectionError(f"the server sent {received} of {total} bytes"))
    if received == 0:
        raise _NetworkError(ConnectionError("the server sent an empty file"))


def resolve_weights(path: str, what: str, key: str = "") -> str:
    """Return a local file for `path` (a file path or an http(s) URL, fetched once and cached).

    Args:
        path: local path or URL.
        what: what the file is for (e.g. "SAM checkpoint"), used in error messages.
        key: the config key that gave `path`, named in download errors.
    """
    if path.startswith(PACKAGE_PREFIX):
        path = os.path.join(PACKAGE_DIR, *path[len(PACKAGE_PREFIX):].split("/"))
    path = os.path.expanduser(path)
    if is_url(path):
        return download(path, key or "the file's config key", what)
    if not os.path.isfile(path):
        where = f" ({key})" if key else ""
        raise FileNotFoundError(f"The {what} file{where} does not exist: {path}")
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


def load_weights_file(path: str, what: str, key: str = "") -> Dict[str, Any]:
    """torch.load a weights file (gzip-compressed or not) with weights_only (see `safe_load`),
    turning truncation and corruption into an error that names it (and its config `key`).

    A corrupt file (random bytes, truncated, empty, another pickle) can raise almost any
    exception from the unpickler, so every one is caught and re-raised with the file's name
    (the original chained as the cause).
    """
    local = resolve_weights(path, what, key)
    try:
        obj = torch_load(open_weights(local), local, key)  # tensors and plain data only: no code runs
    except UnsafeFileError:
        raise
    except Exception as e:
        raise RuntimeError(
            f"The {what} file {local}{f' ({key})' if key else ''} is corrupt, truncated or not a PyTorch file "
            f"and cannot be read "
            f"({type(e).__name__}: {e}). Delete it and download it again."
        ) from e
    if not isinstance(obj, dict):
        raise RuntimeError(f"The {what} file {local}{f' ({key})' if key else ''} holds a {type(obj).__name__}, "
                           "not a state dict.")
    return obj
