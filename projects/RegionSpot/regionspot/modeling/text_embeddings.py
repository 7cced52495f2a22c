"""Text encoding: class names -> embeddings from a CLIP text tower (prompt templates, name cleaning,
synonym averaging), the embedding file format and the on-disk cache.

Text embeddings depend only on (CLIP weights, names, templates), so each set is encoded once and
stored under a key made of those three. The same file format serves `tools/dump_text_embeddings.py`.
This module knows names, not vocabularies: what a vocabulary spec names (datasets, files,
synonyms) is `regionspot.modeling.vocabulary`'s, which calls this one.
"""
import hashlib
import json
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..utils.file_io import atomic_torch_save, content_checksum
from ..utils.safe_load import UnsafeFileError, torch_load

logger = logging.getLogger(__name__)

# The 80 prompt templates OpenAI used for ImageNet zero-shot classification.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.",
    "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)
TEMPLATE_SETS = {
    "ensemble": IMAGENET_TEMPLATES + ("{}.",),
    "single": ("a photo of a {}.",),
}
NAME_SUFFIXES = ("-other", "-merged", "-stuff")
# v2 files carry a content checksum ("sha256"); v1 files (no checksum) are still read, see
# `load_embedding_file`.
FILE_FORMAT = "regionspot-text-embeddings-v2"
_OLD_FILE_FORMATS = ("regionspot-text-embeddings-v1",)
# Part of every cache key: bumped whenever the way embeddings are computed changes.
_EMBEDDING_VERSION = "mean-then-normalise"


def get_templates(name: str) -> Sequence[str]:
    if name not in TEMPLATE_SETS:
        raise ValueError(f"Unknown template set {name!r} (MODEL.REGIONSPOT.TEXT.TEMPLATES); "
                         f"choose one of {sorted(TEMPLATE_SETS)}.")
    return TEMPLATE_SETS[name]


def clean_class_name(name: str) -> str:
    """Strip the panoptic suffixes (-other, -merged, -stuff); the rest stays as the dataset spells it."""
    stripped = True
    while stripped:  # "wall-other-merged" -> "wall"
        stripped = False
        for suffix in NAME_SUFFIXES:
            if name.endswith(suffix):
                name, stripped = name[: -len(suffix)], True
    return name


def clip_fingerprint(clip_model: torch.nn.Module) -> str:
    """A short digest of the text tower's weights: tells CLIP models apart without hashing them all."""
    h = hashlib.sha256()
    for t in (clip_model.text_projection, clip_model.ln_final.weight, clip_model.positional_embedding,
              clip_model.token_embedding.weight[:64]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(fingerprint: str, names: Sequence[str], templates: Sequence[str],
              synonyms: Optional[Sequence[Sequence[str]]] = None) -> str:
    parts = [_EMBEDDING_VERSION, fingerprint, list(names), list(templates)]
    if synonyms is not None:  # only then: keys of plain vocabularies stay as they were
        parts.append([list(g) for g in synonyms])
    blob = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("REGIONSPOT_CACHE", os.path.expanduser("~/.cache/regionspot"))


def _payload_checksum(payload: dict) -> str:
    return content_checksum(payload["clip"], list(payload["names"]), list(payload["templates"]),
                            payload.get("synonyms"), payload["embeddings"])


def check_finite_embeddings(emb: torch.Tensor, names: Sequence[str], where: str) -> None:
    """Raise RuntimeError naming the rows (and their classes) of `emb` that hold NaN or inf."""
    bad = (~torch.isfinite(emb)).any(dim=-1).nonzero().flatten().tolist()
    if bad:
        shown = [f"{i} ({names[i]!r})" if i < len(names) else str(i) for i in bad[:10]]
        raise RuntimeError(f"{where} has NaN or infinite embeddings in {len(bad)} rows: "
                           f"{', '.join(shown)}{' ...' if len(bad) > 10 else ''}.")


def save_embedding_file(path: str, names: Sequence[str], embeddings: torch.Tensor,
                        fingerprint: str, templates: Sequence[str],
                        synonyms: Optional[Sequence[Sequence[str]]] = None) -> None:
    """Write an embedding file atomically: readers never see a half-written file.

    `synonyms`, when the embeddings average each class's synonyms, is recorded with them. A
    checksum of the content is stored too; `load_embedding_file` verifies it.
    """
    embeddings = embeddings.detach().float().cpu().contiguous()
    check_finite_embeddings(embeddings, names, f"The embeddings to write to {path}")
    payload = {"format": FILE_FORMAT, "clip": fingerprint, "names": list(names),
               "templates": list(templates), "embeddings": embeddings}
    if synonyms is not None:
        payload["synonyms"] = [list(g) for g in synonyms]
    payload["sha256"] = _payload_checksum(payload)
    atomic_torch_save(payload, path)


def load_embedding_file(path: str, fingerprint: Optional[str] = None, require_checksum: bool = False) -> dict:
    """Read an embedding file, checking its format, shape, content checksum, that every row is
    finite and (if given) the CLIP it was made with. Each failure raises naming the file.

    A file of the older format without a checksum cannot be verified: with `require_checksum`
    (the cache, which can recompute) it is refused; otherwise it is read with a warning.
    """
    try:
        payload = torch_load(path, path)  # tensors and plain data only: no code runs
    except UnsafeFileError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"Text-embedding file not found: {path}") from None
    except Exception as e:
        raise RuntimeError(f"Text-embedding file {path} is corrupt or truncated ({e}).") from e
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (FILE_FORMAT, *_OLD_FILE_FORMATS):
        raise RuntimeError(f"{path} is not a RegionSpot text-embedding file.")
    emb, names = payload.get("embeddings"), payload.get("names")
    if not isinstance(emb, torch.Tensor) or not isinstance(names, list) or emb.ndim != 2 \
            or emb.shape[0] != len(names):
        rows = emb.shape[0] if isinstance(emb, torch.Tensor) and emb.ndim else "no"
        raise RuntimeError(f"Text-embedding file {path} is inconsistent: {rows} rows for "
                           f"{len(names) if isinstance(names, list) else 'no'} names.")
    if fmt in _OLD_FILE_FORMATS:
        if require_checksum:
            raise RuntimeError(f"Text-embedding file {path} has the older format without a checksum, "
                               "so its content cannot be verified.")
        logger.warning(f"Text-embedding file {path} has the older format without a checksum: its content "
                       "cannot be verified. Re-create it with tools/dump_text_embeddings.py.")
    elif payload.get("sha256") != _payload_checksum(payload):
        raise RuntimeError(
            f"Text-embedding file {path} is corrupt: its content no longer matches the checksum stored "
            "when it was written. Re-create it with tools/dump_text_embeddings.py."
        )
    check_finite_embeddings(emb, names, f"Text-embedding file {path}")
    if fingerprint is not None and payload["clip"] != fingerprint:
        raise ValueError(
            f"Text-embedding file {path} was made with another CLIP model (fingerprint "
            f"{payload['clip']}), not the one loaded now ({fingerprint}). Re-create it with "
            "tools/dump_text_embeddings.py for this model."
        )
    return payload


@torch.no_grad()
def encode_class_names(
    encode_text: Callable[[List[str]], torch.Tensor],
    names: Sequence[str],
    templates: Sequence[str],
    chunk_size: int = 256,
) -> torch.Tensor:
    """Mean of the encoded prompts over the templates, then L2-normalised: (C, D). (As in the
    reference setup the released heads were trained with: prompts are not normalised before
    averaging.)

    Prompts are encoded `chunk_size` at a time, so memory does not grow with the vocabulary.
    Raises RuntimeError naming the classes whose embeddings came out NaN or infinite.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"The text chunk size (MODEL.REGIONSPOT.TEXT.CHUNK_SIZE) must be a positive integer, "
                         f"got {chunk_size!r}.")
    prompts = [t.format(clean_class_name(n)) for n in names for t in templates]
    chunks = [prompts[i:i + chunk_size] for i in range(0, len(prompts), chunk_size)]
    out = []
    for chunk in tqdm(chunks, desc="encoding class names", unit="chunk", disable=len(chunks) < 4):
        out.append(encode_text(chunk).float().cpu())
    emb = torch.cat(out).view(len(names), len(templates), -1).mean(dim=1)
    # Checked before normalising, which would hide an infinite value as NaN or a finite one.
    check_finite_embeddings(emb, names, "CLIP's text encoder (check the CLIP weights; with "
                            "MODEL.REGIONSPOT.AUTOCAST fp16 it may overflow: try bf16 or '')")
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def encode_synonym_groups(
    encode_text: Callable[[List[str]], torch.Tensor],
    groups: Sequence[Sequence[str]],
    templates: Sequence[str],
    chunk_size: int = 256,
) -> torch.Tensor:
    """One embedding per class: the mean of its synonyms' class embeddings, L2-normalised: (C, D).

    Each synonym is embedded as `encode_class_names` embeds a name (template ensemble), so a
    class with a single synonym gets exactly its name's embedding. Chunked like it, too.
    """
    flat = [s for g in groups for s in g]
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g], dtype=torch.long)
    per_synonym = encode_class_names(encode_text, flat, templates, chunk_size)
    summed = per_synonym.new_zeros((len(groups), per_synonym.shape[1])).index_add_(0, owner, per_synonym)
    return torch.nn.functional.normalize(summed, dim=-1)


def cached_class_embeddings(
    encode_text: Callable[[List[str]], torch.Tensor],
    fingerprint: str,
    names: Sequence[str],
    templates: Sequence[str],
    cache_dir: str = "",
    chunk_size: int = 256,
    synonyms: Optional[Sequence[Sequence[str]]] = None,
) -> torch.Tensor:
    """`encode_class_names`, read from / written to the on-disk cache. A bad cache file is redone.

    With `synonyms` (one group per name, see `synonym_groups`) the classes are embedded by
    `encode_synonym_groups` instead, and cached under their own key.
    """
    cache_dir = cache_dir or default_cache_dir()
    if synonyms is not None:
        synonyms = [list(g) for g in synonyms]
        if len(synonyms) != len(names) or any(not g for g in synonyms):
            raise ValueError(f"Need one non-empty synonym group per class name: {len(synonyms)} "
                             f"groups for {len(names)} names.")
    key = cache_key(fingerprint, names, templates, synonyms)
    path = os.path.join(cache_dir, "text", f"{key}.pth")
    if os.path.exists(path):
        try:
            payload = load_embedding_file(path, fingerprint, require_checksum=True)
            if (list(payload["names"]) == list(names) and list(payload["templates"]) == list(templates)
                    and payload.get("synonyms") == synonyms):
                return payload["embeddings"]
            logger.warning(f"Text-embedding cache {path} holds other names; encoding again.")
        except (RuntimeError, ValueError) as e:
            logger.warning(f"Ignoring the text-embedding cache file {path}: {e} Encoding again.")
    what = f"{len(names)} class names" if synonyms is None else \
        f"{len(names)} classes ({sum(len(g) for g in synonyms)} synonyms)"
    logger.info(f"Encoding {what} x {len(templates)} templates (cache: {path}).")
    if synonyms is None:
        emb = encode_class_names(encode_text, names, templates, chunk_size)
    else:
        emb = encode_synonym_groups(encode_text, synonyms, templates, chunk_size)
    try:
        save_embedding_file(path, names, emb, fingerprint, templates, synonyms)
    except OSError as e:
        logger.warning(f"Could not write the text-embedding cache {path}: {e}")
    return emb
