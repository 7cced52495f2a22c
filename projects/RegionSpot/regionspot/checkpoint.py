"""Checkpoints: RegionSpot's own (head only by default) and those of the original release."""
import os
import pickle
import zipfile
from typing import Any, Dict, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .file_io import atomic_torch_save, atomic_write_bytes
from .weights import download, is_url

# Key prefixes of the original RegionSpot code -> ours. Its meta-architecture kept everything
# under one `model` submodule; we keep the frozen encoders and the head apart.
ORIGINAL_KEY_PREFIXES: List[Tuple[str, str]] = [
    ("model.sam.", "sam_encoder.sam."),
    ("model.clip_model.", "clip_encoder.clip_model."),
    ("model.to_clip.", "head.to_clip."),
    ("model.decoder.", "head.decoder."),
    ("model.projector.", "head.projector."),
]
FROZEN_PREFIXES = ("sam_encoder.", "clip_encoder.")
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


class RegionSpotCheckpointer(DetectionCheckpointer):
    """A `DetectionCheckpointer` that

    - reads checkpoints of the original RegionSpot code (with or without frozen weights inside);
    - does not report frozen SAM/CLIP weights as missing when a file holds only the head: they
      come from MODEL.REGIONSPOT.SAM/CLIP.CHECKPOINT;
    - saves the head only unless `save_frozen=True`, atomically (a crash never leaves a torn file);
    - names the file when it is missing or unreadable.
    """

    def __init__(self, model, save_dir: str = "", *, save_frozen: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.save_frozen = save_frozen

    def load(self, path: str, *args, **kwargs):
        if path and is_url(path):  # downloaded once, with a timeout and an error naming the fix
            path = download(path, "MODEL.WEIGHTS", "RegionSpot checkpoint")
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found (MODEL.WEIGHTS): {path}")
        return super().load(path, *args, **kwargs)

    def _torch_load(self, f: str):
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
            raise RuntimeError(f"Checkpoint file {f} is corrupt or truncated and cannot be read ({e}).") from e

    def _load_model(self, checkpoint: Dict[str, Any]):
        state = convert_original_keys(
            {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint["model"].items()}
        )
        checkpoint["model"] = state
        present = {p: any(k.startswith(p) for k in state) for p in FROZEN_PREFIXES}
        incompatible = super()._load_model(checkpoint)
        # Frozen parts absent from the file keep the weights loaded from their own paths.
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys
            if not any(k.startswith(p) and not present[p] for p in FROZEN_PREFIXES)
        ]
        for p in FROZEN_PREFIXES:
            if not present[p]:
                self.logger.info(f"The checkpoint has no '{p}*' weights: keeping the configured frozen ones.")
        head_missing = [k for k in incompatible.missing_keys if k.startswith("head.")]
        if head_missing:
            self.logger.warning(
                f"The checkpoint lacks {len(head_missing)} weights of the trainable head, which keep "
                f"their random initialisation: {head_missing}"
            )
        return incompatible

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        state = self.model.state_dict()
        if not self.save_frozen:
            state = {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}
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
