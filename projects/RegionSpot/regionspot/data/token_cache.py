"""On-disk cache of SAM region tokens, one file per image.

SAM is frozen, so the position-aware token of every ground-truth box can be computed once and
training can skip SAM entirely. A file holds the tokens (fp16) together with the boxes and classes
they belong to, so tokens can never be paired with the wrong box. Files are written atomically and
validated on read (format, shapes, a sha256 checksum of the content stored at write time, finite
tokens): a truncated, corrupt or bit-rotten file is detected, never silently used.
"""
import hashlib
import json
import os
import re
from typing import Dict, Optional

import torch

from ..modeling.encoders.build import sam_type_random_by_default
from ..modeling.text_embeddings import default_cache_dir
from ..utils.file_io import atomic_torch_save, content_checksum
from ..utils.safe_load import UnsafeFileError, torch_load

# v2 adds the content checksum ("sha256"). v1 files (no checksum) cannot be verified, so they are
# treated as stale: extraction redoes them, cached training refuses them by name.
FORMAT = "regionspot-sam-tokens-v2"
_OLD_FORMATS = ("regionspot-sam-tokens-v1",)
_CHECKED_FIELDS = ("image_id", "file_name", "source", "image_size", "sam_type", "tokens", "boxes", "classes")


class CorruptTokenFile(RuntimeError):
    """A cache file that exists but cannot be trusted."""


def token_cache_folder(root: str, dataset_name: str, sam_type: str) -> str:
    """`root/<dataset>/<sam type>`; root "" = $REGIONSPOT_CACHE/sam_tokens."""
    root = root or os.path.join(default_cache_dir(), "sam_tokens")
    return os.path.join(root, dataset_name, sam_type)


def token_file(folder: str, image_id) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(image_id))
    return os.path.join(folder, f"{safe}.pth")


def sam_weights_key(sam_type: str, checkpoint: str = "", seed: int = 0) -> str:
    """Which SAM weights these are: type, checkpoint, and the seed of a random init."""
    random_init = checkpoint == "random" or (checkpoint == "" and sam_type_random_by_default(sam_type))
    return f"{sam_type}|{checkpoint or 'official'}" + (f"|seed={seed}" if random_init else "")


def sam_weights_id(cfg) -> str:
    """`sam_weights_key` of the SAM a yacs config means."""
    c = cfg.MODEL.REGIONSPOT
    return sam_weights_key(c.SAM.TYPE, c.SAM.CHECKPOINT, c.RANDOM_INIT_SEED)


def source_key(dataset_dict: Dict, sam_weights: str = "") -> str:
    """A digest of an image's file name and annotations, and of the SAM weights (`sam_weights_id`):
    a cache file made from other boxes, or by another SAM, is stale."""
    anns = [(a.get("bbox"), a.get("bbox_mode").value if hasattr(a.get("bbox_mode"), "value") else a.get("bbox_mode"),
             a.get("category_id")) for a in dataset_dict.get("annotations", [])]
    blob = json.dumps([os.path.basename(dataset_dict.get("file_name", "")), anns, sam_weights], default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def save_tokens(path: str, *, image_id, file_name: str, image_size, tokens: torch.Tensor,
                boxes: torch.Tensor, classes: torch.Tensor, sam_type: str, source: str = "") -> None:
    """Write one image's tokens atomically (temp file + rename)."""
    if not (tokens.shape[0] == boxes.shape[0] == classes.shape[0]):
        raise ValueError(f"{path}: {tokens.shape[0]} tokens for {boxes.shape[0]} boxes and {classes.shape[0]} classes.")
    payload = {
        "format": FORMAT, "image_id": image_id, "file_name": file_name, "source": source,
        "image_size": tuple(int(s) for s in image_size), "sam_type": sam_type,
        "tokens": tokens.detach().to("cpu", torch.float16).contiguous(),
        "boxes": boxes.detach().to("cpu", torch.float32).contiguous(),
        "classes": classes.detach().to("cpu", torch.int64).contiguous(),
    }
    payload["sha256"] = _checksum(payload)
    atomic_torch_save(payload, path)


def _checksum(payload: Dict) -> str:
    return content_checksum(*(payload.get(k) for k in _CHECKED_FIELDS))


def load_tokens(path: str, image_id=None) -> Dict:
    """Read and validate a token file. Raises FileNotFoundError or CorruptTokenFile."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM token cache file not found: {path} (run tools/extract_sam_tokens.py)")
    try:
        payload = torch_load(path, path)  # tensors and plain data only: no code runs
    except UnsafeFileError:
        raise
    except Exception as e:
        raise CorruptTokenFile(f"SAM token cache file {path} is truncated or corrupt ({type(e).__name__}: {e}).") from e
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt in _OLD_FORMATS:
        raise CorruptTokenFile(
            f"SAM token cache file {path} has the older format without a checksum, so its content cannot "
            "be verified: rerun tools/extract_sam_tokens.py (it redoes such files)."
        )
    if fmt != FORMAT:
        raise CorruptTokenFile(f"{path} is not a RegionSpot SAM token file.")
    t, b, c = payload.get("tokens"), payload.get("boxes"), payload.get("classes")
    if not all(isinstance(x, torch.Tensor) for x in (t, b, c)) or t.ndim != 2 or b.shape != (t.shape[0], 4) \
            or c.shape != (t.shape[0],):
        raise CorruptTokenFile(f"SAM token cache file {path} has inconsistent shapes.")
    if payload.get("sha256") != _checksum(payload):
        raise CorruptTokenFile(
            f"SAM token cache file {path} is corrupt: its content no longer matches the checksum stored when "
            "it was written. Rerun tools/extract_sam_tokens.py (it redoes corrupt files)."
        )
    if not torch.isfinite(t.float()).all():
        raise CorruptTokenFile(f"SAM token cache file {path} holds non-finite tokens.")
    if image_id is not None and str(payload["image_id"]) != str(image_id):
        raise CorruptTokenFile(f"SAM token cache file {path} belongs to image {payload['image_id']}, not {image_id}.")
    return payload


def is_valid(path: str, image_id=None, source: Optional[str] = None) -> bool:
    """Whether `path` is a sound token file of this image (and, if given, of these annotations)."""
    try:
        payload = load_tokens(path, image_id)
    except (FileNotFoundError, CorruptTokenFile):
        return False
    return source is None or payload.get("source") == source
