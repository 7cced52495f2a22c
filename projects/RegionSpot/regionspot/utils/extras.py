"""Optional backbones (and the web demo) live in optional packages (setup.py's extras): import them
on demand, and tell the user which extra to install when one is missing."""
import importlib
from types import ModuleType

# extra name -> the pip requirement it stands for (kept in step with setup.py's extras_require).
EXTRAS = {
    "sam2": "sam2==1.1.0 (with SAM2_BUILD_CUDA=0) and hydra-core>=1.3.2",
    "open_clip": "open-clip-torch==3.3.0",
    "web": "gradio==6.31.0",
}


class MissingExtraError(ImportError):
    """A config asks for a backbone whose optional package is not installed."""


def require_extra(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError naming `what` needs it and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs the optional package {module!r}, which is not installed ({e}). Install it with "
            f"`pip install 'regionspot[{extra}]'` ({EXTRAS[extra]}), or run tools/setup_env.sh, which "
            "installs every extra."
        ) from e
