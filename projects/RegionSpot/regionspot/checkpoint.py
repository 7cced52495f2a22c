"""Checkpoints: RegionSpot's own (head only by default) and those of the original release."""
import os
from typing import Any, Dict, List, Tuple
from urllib.parse import urlparse

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import Detectron2Handler

from .utils.file_io import atomic_torch_save, atomic_write_bytes
from .utils.safe_load import UnsafeFileError, pickle_load, torch_load
from .utils.weights import download, is_url

# Key prefixes of the original RegionSpot code -> ours. Its meta-architecture kept everything
# under one `model` submodule; we keep the frozen encoders and the head apart.
ORIGINAL_KEY_PREFIXES: List[Tuple[str, str]] = [
    ("model.sam.", "sam_encoder.sam."),
    ("model.clip_model.", "clip_encoder.clip_model."),
    ("model.to_clip.", "head.to_clip."),
    ("model.decoder.", "head.decoder."),
    ("model.projector.", "head.projector."),
]
# Frozen parts, loaded from their own files: not saved with the head, not missed when absent.
FROZEN_PREFIXES = ("sam_encoder.", "clip_encoder.", "prompt_source.")


def is_frozen_key(key: str) -> bool:
    """Whether a state-dict key is a frozen part's, at the top (RegionSpot) or nested (e.g.
    `roi_heads.regionspot.sam_encoder.*` in a GeneralizedRCNN)."""
    return any(key.startswith(p) or f".{p}" in key for p in FROZEN_PREFIXES)


# Non-tensor entries that OpenAI's JIT CLIP files carry in their state dict.
_CLIP_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def convert_original_keys(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Rename the original release's keys to ours; keys already in our layout pass through."""
    out = {}
    for k, v in state_dict.items():
        for old, new in ORIGINAL_KEY_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        if k.startswith("clip_encoder.clip_model.") and k.split(".")[-1] in _CLIP_META_KEYS:
            continue
        out[k] = v
    return out


class HeadMismatchError(RuntimeError):
    """A checkpoint that would leave (some of) the trainable head at its random initialisation."""


def local_checkpoint(path: str, key: str, what: str = "checkpoint") -> str:
    """A local file for a checkpoint path, http(s) URL or detectron2:// model-zoo name: URLs are
    downloaded once with our timeout ($REGIONSPOT_DOWNLOAD_TIMEOUT) and an error naming `key`. A
    URL's query (detectron2's `?matching_heuristics=True`) is kept on the local path."""
    if path.startswith(Detectron2Handler.PREFIX):
        path = Detectron2Handler.S3_DETECTRON2_PREFIX + path[len(Detectron2Handler.PREFIX):]
    if not is_url(path):
        return path
    url = urlparse(path)
    local = download(url._replace(query="", fragment="").geturl(), key, what)
    return local + (f"?{url.query}" if url.query else "")


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """A `DetectionCheckpointer` whose files never run code and whose downloads time out.

    detectron2 reads `.pkl` files with plain pickle and others with `torch.load`, either of which
    runs whatever code a hostile file holds; here `.pkl` goes through our restricted unpickler and
    everything else through `torch.load(weights_only=True)` (see `regionspot.utils.safe_load`).
    URLs and detectron2:// names are fetched by `regionspot.utils.weights.download`.

    Args:
        key: the config key that named the file, used in every error (e.g. MODEL.WEIGHTS,
            MODEL.REGIONSPOT.HEAD_WEIGHTS, train.init_checkpoint).
        what: what the file is, for download messages.
    """

    def __init__(self, model, save_dir: str = "", *, key: str = "MODEL.WEIGHTS", what: str = "checkpoint",
                 **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.key, self.what = key, what

    def load(self, path: str, *args, **kwargs):
        return super().load(local_checkpoint(path, self.key, self.what) if path else path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = self._read(filename, pickle_load)
            if not isinstance(data, dict):
                raise RuntimeError(f"Checkpoint file {filename} ({self.key}) holds a {type(data).__name__}, "
                                   "not a dict of weights.")
            # The same shapes detectron2 accepts: its model zoo, or Caffe2 / Detectron1 blobs.
            if "model" in data and "__author__" in data:
                return data
            data = data.get("blobs", data)
            return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")},
                    "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls, as detectron2 reads it
            data = self._read(filename, torch_load)
            if not isinstance(data, dict) or "model_state" not in data:
                raise RuntimeError(f"Cannot load .pyth file {filename} ({self.key}): pycls checkpoints must "
                                   "contain 'model_state'.")
            return {"model": {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")},
                    "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # calls self._torch_load

    def _torch_load(self, f: str):
        return self._read(f, torch_load)

    def _read(self, f: str, loader) -> Any:
        # A corrupt file can raise almost anything from the unpickler (IndexError, KeyError,
        # UnicodeDecodeError, MemoryError, ...): name the file and the key.
        try:
            return loader(f, f, self.key)
        except UnsafeFileError:
            raise
        except Exception as e:
            raise RuntimeError(f"Checkpoint file {f} ({self.key}) is corrupt, truncated or not a PyTorch or "
                               f"detectron2 checkpoint and cannot be read ({type(e).__name__}: {e}).") from e


class RegionSpotCheckpointer(SafeDetectionCheckpointer):
    """A `DetectionCheckpointer` that

    - reads checkpoints of the original RegionSpot code (with or without frozen weights inside);
    - does not report frozen SAM/CLIP weights as missing when a file holds only the head: they
      come from MODEL.REGIONSPOT.SAM/CLIP.CHECKPOINT;
    - refuses (`HeadMismatchError`, before changing the model) a file that would leave any head
      tensor random, missing or of another shape, naming the file and the tensors, unless
      `allow_random_head` (MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD); an empty path still means "no
      checkpoint", i.e. a random head, as in detectron2;
    - saves the head only unless `save_frozen=True`, atomically (a crash never leaves a torn file);
    - names the file and the config key that gave it (`key`) when it is missing, unreadable, not a
      checkpoint, or would run code (see `SafeDetectionCheckpointer`).
    """

    def __init__(self, model, save_dir: str = "", *, save_frozen: bool = False,
                 allow_random_head: bool = False, key: str = "MODEL.WEIGHTS", **checkpointables):
        super().__init__(model, save_dir, key=key, **checkpointables)
        self.save_frozen = save_frozen
        self.allow_random_head = allow_random_head
        self._loading = ""

    def load(self, path: str, *args, **kwargs):
        if path:  # URLs downloaded once, with a timeout and an error naming the fix
            path = local_checkpoint(path, self.key, "RegionSpot checkpoint")
        if path and "://" not in path and not os.path.isfile(urlparse(path).path if "?" in path else path):
            raise FileNotFoundError(f"Checkpoint file not found ({self.key}): {path}")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():  # errors then name what --resume read, not the key
            key, self.key = self.key, f"--resume: last checkpoint of {self.save_dir}"
            try:
                return super().resume_or_load(path, resume=resume)
            finally:
                self.key = key
        return super().resume_or_load(path, resume=resume)

    def _torch_load(self, f: str):
        obj = super()._torch_load(f)
        if not isinstance(obj, dict) or not isinstance(obj.get("model", obj), dict):
            raise RuntimeError(f"Checkpoint file {f} ({self.key}) holds a {type(obj).__name__}, not a state "
                               "dict or a dict with a 'model' state dict.")
        return obj

    def _check_head(self, state: Dict[str, Any]) -> None:
        """Raise HeadMismatchError unless every head tensor of the model has a same-shaped tensor
        in `state` (or the user allowed a random head)."""
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items() if k.startswith("head.")}
        missing = [k for k in expected if k not in state]
        wrong = [(k, tuple(getattr(state[k], "shape", ())), expected[k]) for k in expected
                 if k in state and tuple(getattr(state[k], "shape", ())) != expected[k]]
        if not missing and not wrong:
            return
        where = f"Checkpoint {self._loading} ({self.key})" if self._loading else "The checkpoint"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if wrong:
            shown = "; ".join(f"{k}: {s} in the file, {m} in the model" for k, s, m in wrong[:4])
            parts.append(f"{len(wrong)} of another shape (e.g. {shown})")
        loaded = len(expected) - len(missing) - len(wrong)
        message = (
            f"{where} fits {loaded} of the {len(expected)} tensors of RegionSpot's trainable head: "
            f"{', '.join(parts)}. Expected keys 'head.to_clip.*', 'head.decoder.*', 'head.projector.*' (or the "
            f"original release's 'model.to_clip.*', ...) with head.to_clip.weight {expected.get('head.to_clip.weight')} "
            f"and head.projector.weight {expected.get('head.projector.weight')}."
        )
        if self.allow_random_head:
            self.logger.warning(message + " They keep their random initialisation (MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD).")
            return
        raise HeadMismatchError(
            message + " Is it a RegionSpot checkpoint made for these MODEL.REGIONSPOT.SAM/CLIP/HEAD settings? "
            "To start from it with those tensors random on purpose, set MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD True."
        )

    def _load_model(self, checkpoint: Dict[str, Any]):
        model_state = checkpoint["model"]
        if not isinstance(model_state, dict) or not all(isinstance(k, str) for k in model_state):
            raise RuntimeError(f"{self._loading or 'The checkpoint'}: 'model' is not a state dict of named tensors.")
        state = convert_original_keys(
            {k[len("module."):] if k.startswith("module.") else k: v for k, v in model_state.items()}
        )
        checkpoint["model"] = state
        self._check_head(state)  # before anything is loaded: a refused file leaves the model as it was
        present = {p: any(k.startswith(p) for k in state) for p in FROZEN_PREFIXES}
        try:
            incompatible = super()._load_model(checkpoint)
        except Exception as e:  # e.g. fvcore's "Unsupported type found in checkpoint!"
            raise RuntimeError(f"{self._loading or 'The checkpoint'} cannot be loaded into RegionSpot "
                               f"({type(e).__name__}: {e}).") from e
        # Frozen parts absent from the file keep the weights loaded from their own paths.
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys
            if not any(k.startswith(p) and not present[p] for p in FROZEN_PREFIXES)
        ]
        for p in FROZEN_PREFIXES:
            if not present[p]:
                self.logger.info(f"The checkpoint has no '{p}*' weights: keeping the configured frozen ones.")
        return incompatible

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        state = self.model.state_dict()
        if not self.save_frozen:
            state = {k: v for k, v in state.items() if not is_frozen_key(k)}
        data = {"model": state}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)  # a failed write names the file and the cause
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        # Atomic too: a full disk must not leave an empty `last_checkpoint`, which resume reads.
        atomic_write_bytes(last_filename_basename.encode(), os.path.join(self.save_dir, "last_checkpoint"))
