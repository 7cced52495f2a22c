"""Which server files a web page's visitor may make the server open.

A page that takes text from any visitor must not turn that text into a server path on its own: a
typed `/etc/passwd` would be read back as class names, a typed checkpoint would be loaded. The
operator names the folders visitors may use (`--allow-paths DIR`, repeatable); a path counts as
inside one only after symbolic links and `..` are resolved, so a link in an allowed folder that
points elsewhere is not a way out. Files a visitor brings are uploads, never paths.
"""
import ipaddress
import logging
import os
from typing import Any, Iterable, List, Sequence

import yaml

from .weights import is_url

logger = logging.getLogger(__name__)


class PathNotAllowed(PermissionError):
    """A visitor named a server path outside the folders the operator allowed."""


def client_host(request: Any) -> str:
    """The address of the visitor behind a Gradio/Starlette request ("" if unknown)."""
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "")


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine (127.0.0.0/8, ::1 or "localhost")."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def looks_like_path(value: str) -> bool:
    """Whether a typed value names (or would name) a file: a URL, a path with a folder part, a
    home-relative path, or an existing file or folder."""
    value = value.strip()
    return bool(value) and (is_url(value) or "://" in value or "/" in value or os.sep in value
                            or value.startswith("~") or os.path.exists(value))


class AllowedPaths:
    """The server folders visitors may name, each resolved once at start.

    Args:
        folders: the operator's --allow-paths folders (none: no typed path is ever opened).
        also: exact files the server itself was started with (e.g. its --config-file and
            --weights), which a visitor may name again to reload them.
    """

    def __init__(self, folders: Iterable[str] = (), also: Iterable[str] = ()):
        self.folders: List[str] = []
        for folder in folders:
            real = os.path.realpath(os.path.expanduser(folder))
            if not os.path.isdir(real):
                raise NotADirectoryError(f"--allow-paths {folder}: not a folder.")
            self.folders.append(real)
        self.also = {os.path.realpath(os.path.expanduser(f)) for f in also if f and not is_url(f)}

    def allows(self, path: str) -> bool:
        """Whether `path`, with links resolved, is inside an allowed folder (or one of `also`)."""
        if not path or is_url(path) or "://" in path:
            return False
        real = os.path.realpath(os.path.expanduser(path))
        if real in self.also:
            return True
        return any(os.path.commonpath([real, folder]) == folder for folder in self.folders)

    def check(self, path: str, what: str, request: Any = None) -> str:
        """`path` if visitors may name it, else PathNotAllowed naming it, `what` it was for and
        the visitor's address."""
        if self.allows(path):
            return path
        who = client_host(request)
        # The visitor is not told which folders are allowed (the server's layout is none of its
        # business); the operator's log says.
        logger.warning(f"Refused {what} {path!r} asked by {who or 'a visitor'}: allowed folders "
                       f"{self.folders or 'none (no --allow-paths)'}.")
        where = "outside the folders the operator allowed" if self.folders else \
            "at all: the server was started without --allow-paths"
        raise PathNotAllowed(
            f"{what} {path!r}{f' (asked by {who})' if who else ''}: this server opens no server file that a visitor "
            f"names {where}. Upload files through the page instead, or ask the operator to start it with "
            "--allow-paths FOLDER.")

    def check_overrides(self, opts: Sequence[str], request: Any = None) -> None:
        """Every override value that names a file or URL must be allowed (a config key such as
        MODEL.REGIONSPOT.SAM.CHECKPOINT or REGISTER_DATASETS would make the server open it)."""
        for i in range(1, len(opts), 2):
            value = str(opts[i])
            if looks_like_path(value):
                self.check(value, f"Config override {opts[i - 1]}", request)


def check_config_file(path: str, what: str = "Config file") -> None:
    """Raise ValueError naming `path` unless it is a YAML mapping of config keys (a detectron2 /
    RegionSpot yacs config), e.g. for a text file given where a config was expected."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{what} {path} is not a readable YAML config ({type(e).__name__}: {e}); expected a "
                         "RegionSpot/detectron2 config file (.yaml) such as configs/RegionSpot-BL.yaml.") from e
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ValueError(f"{what} {path} is not a config: expected a YAML mapping of config keys (MODEL: ..., "
                         f"INPUT: ...) such as configs/RegionSpot-BL.yaml, found {found}.")

