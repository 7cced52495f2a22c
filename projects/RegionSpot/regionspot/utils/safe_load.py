"""Reading files a user was handed without running code from them.

Checkpoints, proposal files and model-zoo weights are pickles, and a pickle can name any Python
callable to run while it is read. Every loader in RegionSpot goes through here:

- PyTorch files (`.pth`, `.pt`, ...) load with `torch.load(weights_only=True)`, which rebuilds only
  tensors, plain containers and scalars; we add numpy arrays, scalars and dtypes (found in
  checkpoints converted from detectron2's model zoo) for the duration of the call only.
- Plain pickles (`.pkl`: detectron2 model-zoo weights, detectron2 proposal files) go through
  `RestrictedUnpickler`, which admits numpy arrays, their dtypes and plain containers and scalars.

A file that asks for anything else is refused with `UnsafeFileError`, naming the file, where in it
the object sits (when it can be told) and the class it wanted. Nothing of that class is run: the
refusal is worked out with inert placeholders. `REGIONSPOT_TRUST_PICKLES=1` loads such files with
full pickle, the way PyTorch and detectron2 used to, with a warning: only for files whose source
you trust, since a hostile file then runs any code it holds.
"""
import hashlib
import logging
import os
import pickle
import re
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Set, Tuple, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

TRUST_ENV = "REGIONSPOT_TRUST_PICKLES"

Source = Union[str, BinaryIO]

# numpy's array, scalar and dtype reconstructors: numpy 1.x writes `numpy.core.multiarray`,
# numpy 2 writes `numpy._core.multiarray`; both must load under either numpy.
_NUMPY_GLOBALS: Dict[Tuple[str, str], Callable] = {}
_multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 / numpy 1.x
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY_GLOBALS[(_module, "_reconstruct")] = _multiarray._reconstruct
    _NUMPY_GLOBALS[(_module, "scalar")] = _multiarray.scalar
_NUMPY_GLOBALS[("numpy", "ndarray")] = np.ndarray
_NUMPY_GLOBALS[("numpy", "dtype")] = np.dtype

# Plain containers and scalars that pickle spells as globals (`__builtin__` is Python 2's name;
# `_codecs.encode` is how Python 3 writes bytes at protocol 2, e.g. inside numpy arrays).
_PLAIN_GLOBALS: Dict[Tuple[str, str], Callable] = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice, ("builtins", "range"): range,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("_codecs", "encode"): __import__("codecs").encode,
}
_PLAIN_GLOBALS.update({("__builtin__", name): f for (m, name), f in list(_PLAIN_GLOBALS.items()) if m == "builtins"})

# What `torch.load(weights_only=True)` admits on top of its own list, for this load only.
# (The weights-only unpickler also checks the class of each object it restores state into: a
# numpy dtype is an instance of e.g. numpy.dtypes.Float32DType.)
TORCH_EXTRA_GLOBALS: List[Any] = [(f, f"{m}.{n}") for (m, n), f in _NUMPY_GLOBALS.items()]
TORCH_EXTRA_GLOBALS += sorted({type(np.dtype(t)) for t in np.sctypeDict.values() if t is not np.void} |
                              {type(np.dtype("V8"))}, key=lambda c: c.__name__)

PICKLE_GLOBALS: Dict[Tuple[str, str], Callable] = {**_NUMPY_GLOBALS, **_PLAIN_GLOBALS}


class UnsafeFileError(RuntimeError):
    """A file that would need a class outside the allow-list, i.e. code to run, to be read."""


def trust_pickles() -> bool:
    """Whether the user opted in to full pickle loading ($REGIONSPOT_TRUST_PICKLES=1)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _warn_trusted(name: str) -> None:
    logger.warning(f"{TRUST_ENV}=1: loading {name} with full pickle. A hostile file can run any code this way; "
                   "use it only for files whose source you trust.")


# ----------------------------------------------------------------------------- inert placeholders
class _Wanted:
    """What a refused global turns into while a file is inspected: it records its arguments and
    state and does nothing else, so the file's structure can be walked to say where it sits."""

    wanted = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _placeholder(module: str, name: str) -> type:
    return type("Refused", (_Wanted,), {"wanted": f"{module}.{name}", "__slots__": ()})


def _find_wanted(obj: Any, path: str = "", seen: Optional[set] = None) -> Optional[Tuple[str, str]]:
    """(key path, class) of the first placeholder in `obj` (a placeholder class or instance)."""
    if isinstance(obj, type) and issubclass(obj, _Wanted):
        return path, obj.wanted
    if isinstance(obj, _Wanted):
        return path, type(obj).wanted
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    elif isinstance(obj, (set, frozenset)):
        items = [(None, v) for v in obj]
    else:
        return None
    seen = set() if seen is None else seen
    if id(obj) in seen:  # a container that holds itself
        return None
    seen.add(id(obj))
    for k, v in items:
        found = None
        if isinstance(obj, dict):
            found = _find_wanted(k, path, seen)  # a placeholder used as a key
        found = found or _find_wanted(v, path if k is None else f"{path}[{k!r}]", seen)
        if found is not None:
            return found
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only numpy arrays, their dtypes and plain containers and scalars.

    Any other global becomes an inert placeholder (recorded in `refused`), so that after loading
    the caller can say where in the file it sits; nothing outside the allow-list is ever called.
    """

    allowed: Dict[Tuple[str, str], Callable] = PICKLE_GLOBALS

    def __init__(self, *args, extra: Optional[Dict[Tuple[str, str], Callable]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused: List[str] = []
        self.extra = extra or {}

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name)) or self.extra.get((module, name))
        if found is not None:
            return found
        self.refused.append(f"{module}.{name}")
        return _placeholder(module, name)


def _refusal(name: str, key: str, wanted: str, where: str) -> UnsafeFileError:
    at = f" at {where}" if where else ""
    of = f" ({key})" if key else ""
    return UnsafeFileError(
        f"Refused to load {name}{of}: it asks for the Python class or function {wanted}{at}, and reading it would "
        f"run that code. Files are loaded with tensors, numpy arrays and plain containers only. If you trust "
        f"where this file came from, set {TRUST_ENV}=1 to load it with full pickle (a hostile file can then run "
        f"any code), or convert it on a trusted machine to a plain state dict."
    )


def _torchscript_refusal(name: str, key: str, which: str = "") -> UnsafeFileError:
    of = f" ({key})" if key else ""
    return UnsafeFileError(
        f"Refused to load {name}{of}: it is a TorchScript archive (code as well as weights){' ' + which if which else ''}, "
        f"and loading it would run its code. Save its state dict on a trusted machine "
        f"(torch.save(torch.jit.load(f).state_dict(), 'weights.pth')) and use that file, or set {TRUST_ENV}=1 if you "
        f"trust where it came from (a hostile file can then run any code)."
    )


def pickle_load(source: Source, name: str = "", key: str = "", encoding: str = "latin1",
                extra: Optional[Dict[Tuple[str, str], Callable]] = None) -> Any:
    """Read a plain pickle (`.pkl`) admitting only numpy arrays and plain containers/scalars.

    Args:
        source: a path or an open binary file.
        name: the file, for messages (default: `source` if it is a path).
        key: the config key (or option) that named the file, for messages.
        encoding: how Python 2 strings are decoded (detectron2 reads its model zoo as latin1).
        extra: more (module, name) -> callable this kind of file may use, each one that only
            builds a value (e.g. detectron2's BoxMode enum in proposal files).
    """
    name = name or (source if isinstance(source, str) else getattr(source, "name", "the file"))
    if isinstance(source, str):
        with open(source, "rb") as f:
            return pickle_load(f, name, key, encoding, extra)
    if trust_pickles():
        _warn_trusted(name)
        return pickle.load(source, encoding=encoding)
    unpickler = RestrictedUnpickler(source, encoding=encoding, extra=extra)
    try:
        obj = unpickler.load()
    except Exception:
        if unpickler.refused:  # a refused class broke the load: say which, the key path is unknown
            raise _refusal(name, key, unpickler.refused[0], "") from None
        raise
    if unpickler.refused:
        where, wanted = _find_wanted(obj) or ("", unpickler.refused[0])
        raise _refusal(name, key, wanted, where)
    return obj


# ----------------------------------------------------------------------------- PyTorch files
class _InspectingPickleModule:
    """A `pickle_module` for torch.load that admits what weights_only admits (and our numpy list)
    and turns everything else into placeholders: used only to say where a refused class sits."""

    class Unpickler(RestrictedUnpickler):
        allowed: Dict[Tuple[str, str], Callable] = {}

    @staticmethod
    def load(f, **kwargs):  # torch reads the legacy format's header with this
        return _InspectingPickleModule.Unpickler(f, **kwargs).load()


def _torch_allowed() -> Dict[Tuple[str, str], Callable]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        base = _get_allowed_globals()
    except (ImportError, AttributeError):  # a torch without it: the key path is then not reported
        return {}
    out = {tuple(k.rsplit(".", 1)): v for k, v in base.items() if "." in k}
    out.update(_NUMPY_GLOBALS)
    return out


def _locate_in_torch_file(source: Source) -> Optional[Tuple[str, str]]:
    """(key path, class) of the first refused global in a PyTorch file, read with placeholders."""
    allowed = _torch_allowed()
    if not allowed:
        return None
    _InspectingPickleModule.Unpickler.allowed = allowed
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        obj = torch.load(source, map_location="cpu", weights_only=False, pickle_module=_InspectingPickleModule)
    except Exception:
        return None
    return _find_wanted(obj)


def torch_load(source: Source, name: str = "", key: str = "") -> Any:
    """`torch.load(weights_only=True)` of a path or a binary buffer, admitting numpy arrays too.

    A file that needs any other class raises `UnsafeFileError` naming the file, the key path in it
    and the class; other failures (truncated, not a PyTorch file) propagate for the caller to
    name. With $REGIONSPOT_TRUST_PICKLES=1 the file is read with full pickle instead.
    """
    name = name or (source if isinstance(source, str) else getattr(source, "name", "the file"))
    if trust_pickles():
        _warn_trusted(name)
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(TORCH_EXTRA_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "TorchScript" in message:
            raise _torchscript_refusal(name, key) from e
        match = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported class ([\w.]+)", message)
        located = _locate_in_torch_file(source)
        if located is None and match is None:
            raise
        where, wanted = located if located else ("", match.group(1))
        raise _refusal(name, key, wanted, where) from e
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise _torchscript_refusal(name, key) from e
        raise


def check_torchscript(source: Source, name: str, key: str, official_sha256: Set[str]) -> None:
    """Allow `torch.jit.load` of a TorchScript archive only when it is a known official release.

    A TorchScript archive holds code as well as weights, by design, and loading it runs that code
    (e.g. its classes' `__setstate__`). OpenAI's CLIP releases are such archives; their SHA256
    checksums are published (they are part of the download URLs), so a file that matches one of
    `official_sha256` is loaded. Anything else is refused unless $REGIONSPOT_TRUST_PICKLES=1.
    """
    if trust_pickles():
        _warn_trusted(name)
        return
    digest = hashlib.sha256()
    if isinstance(source, str):
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        position = source.tell()
        digest.update(source.read())
        source.seek(position)
    if digest.hexdigest() in official_sha256:
        return
    raise _torchscript_refusal(name, key, "that is not one of the released files whose SHA256 checksums are known")
