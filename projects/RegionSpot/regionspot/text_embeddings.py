"""Class-name embeddings from CLIP's text encoder: templates, vocabularies and an on-disk cache.

Text embeddings depend only on (CLIP weights, names, templates), so each set is encoded once and
stored under a key made of those three. The same file format serves `tools/dump_text_embeddings.py`.
"""
import hashlib
import json
import logging
import os
import tempfile
from typing import Callable, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from tqdm import tqdm

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
# Built-in vocabularies: the detectron2 datasets whose metadata holds their class names.
BUILTIN_VOCABULARIES = {"lvis": "lvis_v1_val", "coco": "coco_2017_val"}
_NAME_SUFFIXES = ("-other", "-merged", "-stuff")
FILE_FORMAT = "regionspot-text-embeddings-v1"


def get_templates(name: str) -> Sequence[str]:
    if name not in TEMPLATE_SETS:
        raise ValueError(f"Unknown template set {name!r} (MODEL.REGIONSPOT.TEXT.TEMPLATES); "
                         f"choose one of {sorted(TEMPLATE_SETS)}.")
    return TEMPLATE_SETS[name]


def clean_class_name(name: str) -> str:
    """Strip the panoptic suffixes (-other, -merged, -stuff); the rest stays as the dataset spells it."""
    for suffix in _NAME_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def check_vocabulary(names: Sequence[str], source: str) -> List[str]:
    """Refuse empty vocabularies, empty names and duplicates, naming the source."""
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"The vocabulary from {source} is empty: give at least one class name.")
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise ValueError(f"The vocabulary from {source} has empty class names at positions {blank}.")
    seen, dups = set(), []
    for n in names:
        if n in seen:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ValueError(f"The vocabulary from {source} names these classes more than once: {sorted(set(dups))}.")
    return names


def vocabulary_names(spec: str, custom: Sequence[str] = ()) -> List[str]:
    """Class names for a vocabulary spec: "lvis", "coco", "custom" or a registered dataset's name."""
    if spec == "custom":
        return check_vocabulary(custom, "MODEL.REGIONSPOT.CUSTOM_VOCABULARY")
    dataset = BUILTIN_VOCABULARIES.get(spec, spec)
    if dataset not in DatasetCatalog.list() and not MetadataCatalog.get(dataset).get("thing_classes"):
        raise KeyError(
            f"Unknown vocabulary {spec!r}: use 'lvis', 'coco', 'custom', an embedding file, or one of "
            f"the registered datasets (e.g. {sorted(DatasetCatalog.list())[:5]} ...)."
        )
    meta = MetadataCatalog.get(dataset)
    if not meta.get("thing_classes"):
        DatasetCatalog.get(dataset)  # some loaders fill thing_classes in while loading
    return check_vocabulary(MetadataCatalog.get(dataset).get("thing_classes", []), f"dataset {dataset!r}")


def clip_fingerprint(clip_model: torch.nn.Module) -> str:
    """A short digest of the text tower's weights: tells CLIP models apart without hashing them all."""
    h = hashlib.sha256()
    for t in (clip_model.text_projection, clip_model.ln_final.weight, clip_model.positional_embedding,
              clip_model.token_embedding.weight[:64]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(fingerprint: str, names: Sequence[str], templates: Sequence[str]) -> str:
    blob = json.dumps([fingerprint, list(names), list(templates)], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("REGIONSPOT_CACHE", os.path.expanduser("~/.cache/regionspot"))


def save_embedding_file(path: str, names: Sequence[str], embeddings: torch.Tensor,
                        fingerprint: str, templates: Sequence[str]) -> None:
    """Write an embedding file atomically: readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {"format": FILE_FORMAT, "clip": fingerprint, "names": list(names),
               "templates": list(templates), "embeddings": embeddings.detach().float().cpu()}
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_embedding_file(path: str, fingerprint: Optional[str] = None) -> dict:
    """Read an embedding file, checking its format, shape and (if given) the CLIP it was made with."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Text-embedding file not found: {path}") from None
    except Exception as e:
        raise RuntimeError(f"Text-embedding file {path} is corrupt or truncated ({e}).") from e
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise RuntimeError(f"{path} is not a RegionSpot text-embedding file.")
    emb, names = payload["embeddings"], payload["names"]
    if emb.ndim != 2 or emb.shape[0] != len(names):
        raise RuntimeError(f"Text-embedding file {path} is inconsistent: {emb.shape[0]} rows for {len(names)} names.")
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
    """Mean of the L2-normalised prompt embeddings over the templates, L2-normalised: (C, D).

    Prompts are encoded `chunk_size` at a time, so memory does not grow with the vocabulary.
    """
    prompts = [t.format(clean_class_name(n)) for n in names for t in templates]
    chunks = [prompts[i:i + chunk_size] for i in range(0, len(prompts), chunk_size)]
    out = []
    for chunk in tqdm(chunks, desc="encoding class names", unit="chunk", disable=len(chunks) < 4):
        out.append(encode_text(chunk).float().cpu())
    emb = torch.cat(out).view(len(names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def cached_class_embeddings(
    encode_text: Callable[[List[str]], torch.Tensor],
    fingerprint: str,
    names: Sequence[str],
    templates: Sequence[str],
    cache_dir: str = "",
    chunk_size: int = 256,
) -> torch.Tensor:
    """`encode_class_names`, read from / written to the on-disk cache. A bad cache file is redone."""
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(fingerprint, names, templates)
    path = os.path.join(cache_dir, "text", f"{key}.pth")
    if os.path.exists(path):
        try:
            payload = load_embedding_file(path, fingerprint)
            if list(payload["names"]) == list(names) and list(payload["templates"]) == list(templates):
                return payload["embeddings"]
            logger.warning(f"Text-embedding cache {path} holds other names; encoding again.")
        except (RuntimeError, ValueError) as e:
            logger.warning(f"Ignoring unreadable text-embedding cache file ({e}); encoding again.")
    logger.info(f"Encoding {len(names)} class names x {len(templates)} templates (cache: {path}).")
    emb = encode_class_names(encode_text, names, templates, chunk_size)
    try:
        save_embedding_file(path, names, emb, fingerprint, templates)
    except OSError as e:
        logger.warning(f"Could not write the text-embedding cache {path}: {e}")
    return emb
