"""What a web page's visitor may make the server open: typed vocabulary files, and, when the
operator allows model changes, configs, checkpoints and config overrides (see docs/SECURITY.md).

The rule is the same for every visitor address: only files under the operator's --allow-paths
folders (links resolved), plus the shipped model-zoo configs and the model the server started
with. The check runs in the server for every request, so a process that posts to the page's
queue directly is held to it as the page is.
"""
import os
from typing import Any, Optional, Sequence

from ..utils.allowed_paths import AllowedPaths, PathNotAllowed, check_config_file
from ..utils.config_files import config_root, get_config_file
from .errors import DemoError

MODEL_CHANGE_OFF = ("This server does not let the page load other models: start it with --allow-model-change (and "
                    "--allow-paths FOLDER for the configs and checkpoints it may load).")


class PageAccess:
    """The server files a page's visitors may name.

    Args:
        allow_paths: the operator's --allow-paths folders.
        allow_model_change: whether the Model panel may load another model (--allow-model-change).
        start_config: the config file the server started with (a visitor may reload it).
        start_weights: the checkpoint the server started with (likewise).
    """

    def __init__(self, allow_paths: Sequence[str] = (), allow_model_change: bool = False,
                 start_config: str = "", start_weights: str = ""):
        self.allow_model_change = allow_model_change
        self.files = AllowedPaths(allow_paths, also=[start_weights] if start_weights else [])
        self.configs = AllowedPaths([*allow_paths, config_root()],
                                    also=[start_config] if start_config and os.path.isfile(start_config) else [])

    def may_open(self, path: str) -> bool:
        """Whether a typed text may be read as a server file (e.g. the vocabulary box's)."""
        return self.files.allows(path)

    def check_model_request(self, config_file: str, weights: str, opts: Sequence[str],
                            request: Optional[Any] = None) -> str:
        """The config file a Model-panel request may load (a shipped config by name, or a config
        under --allow-paths), after checking that model changes are allowed, that the checkpoint
        and the overrides name no other server file, and that the config is a config; raises
        DemoError naming what is refused (and the visitor's address)."""
        if not self.allow_model_change:
            raise DemoError(MODEL_CHANGE_OFF)
        try:
            if self.configs.allows(config_file):
                path = config_file
            else:
                try:
                    path = get_config_file(config_file)  # a shipped config by name
                except FileNotFoundError:
                    path = config_file
                self.configs.check(path, "Config file", request)
            if weights:
                self.files.check(weights, "Checkpoint", request)
            self.files.check_overrides(list(opts), request)
            check_config_file(path)
        except (PathNotAllowed, ValueError) as e:
            raise DemoError(str(e)) from e
        return path
