"""Class-name embeddings from CLIP's text encoder: templates, vocabularies and an on-disk cache.

Text embeddings depend only on (CLIP weights, names, templates), so each set is encoded once and
stored under a key made of those three. The same file format serves `tools/dump_text_embeddings.py`.
"""
import hashlib
import json
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
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
# Built-in vocabularies: the detectron2 datasets whose metadata holds their class names.
BUILTIN_VOCABULARIES = {"lvis": "lvis_v1_val", "coco": "coco_2017_val"}
_NAME_SUFFIXES = ("-other", "-merged", "-stuff")
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
        for suffix in _NAME_SUFFIXES:
            if name.endswith(suffix):
                name, stripped = name[: -len(suffix)], True
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


def synonym_groups(names: Sequence[str], synonyms: Sequence[Sequence[str]]) -> List[List[str]]:
    """Per class: its name, then its other synonyms (each once, in order)."""
    groups = []
    for name, syns in zip(names, synonyms):
        group = [name]
        for s in syns:
            if s not in group:
                group.append(s)
        groups.append(group)
    return groups


def vocabulary_synonyms(spec: str) -> List[List[str]]:
    """Synonym groups (see `synonym_groups`) of a dataset vocabulary, in its class order.

    LVIS v1 ("lvis" or a dataset with its classes) takes them from detectron2's copy of the
    LVIS categories; other datasets from the "synonyms" of the categories in their json file.
    """
    names = vocabulary_names(spec)
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    lvis = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    if names == [c["synonyms"][0] for c in lvis]:
        return synonym_groups(names, [c["synonyms"] for c in lvis])
    dataset = BUILTIN_VOCABULARIES.get(spec, spec)
    json_file = MetadataCatalog.get(dataset).get("json_file", None)
    if json_file and not os.path.exists(json_file) and dataset in DatasetCatalog.list():
        try:  # some datasets (e.g. the synthetic ones) write their json on first load
            DatasetCatalog.get(dataset)
        except OSError:
            pass  # its files are not there: reported below
    if not json_file or not os.path.exists(json_file):
        raise ValueError(f"Vocabulary {spec!r} has no synonyms: its dataset has no json file with categories.")
    with open(json_file) as f:
        categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
    by_name = {c.get("name"): c.get("synonyms") or [] for c in categories}
    if not any(by_name.values()) or any(n not in by_name for n in names):
        raise ValueError(f"Vocabulary {spec!r} has no synonyms for its classes in {json_file}.")
    return synonym_groups(names, [by_name[n] for n in names])


def parse_vocabulary(items: Sequence, source: str) -> Tuple[List[str], Optional[List[List[str]]]]:
    """Names and synonym groups (None if no item has synonyms) from a list of class entries.

    An entry is a name, or a list whose first element is the name and the others its synonyms.
    """
    names, groups = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            group = [item]
        elif isinstance(item, (list, tuple)) and item and all(isinstance(s, str) for s in item):
            group = list(item)
        else:
            raise ValueError(f"Class {i} of the vocabulary from {source} must be a name or a non-empty "
                             f"list of names (name first, then synonyms), not {item!r}.")
        names.append(group[0])
        groups.append(synonym_groups([group[0]], [group[1:]])[0])
    names = check_vocabulary(names, source)
    return names, (groups if any(len(g) > 1 for g in groups) else None)


def read_vocabulary_file(path: str) -> Tuple[List[str], Optional[List[List[str]]]]:
    """Class names and synonym groups (or None) from a vocabulary file.

    Text: one class per line, ``name | synonym | ...``; blank lines and ``#`` comments are skipped.
    JSON: a list of names or of [name, synonym, ...] lists; a {name: [synonyms]} dict; or a
    COCO/LVIS-style dict with "categories" (ordered by id; their "synonyms" are used).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"Vocabulary file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot read the vocabulary file {path}: {e}") from e
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Vocabulary file {path} is not valid JSON: {e}") from e
        if isinstance(data, dict) and "categories" in data:
            cats = sorted(data["categories"], key=lambda c: c["id"])
            data = [[c["name"], *(c.get("synonyms") or [])] for c in cats]
        elif isinstance(data, dict):
            data = [[k, *(v if isinstance(v, list) else [v])] for k, v in data.items()]
        if not isinstance(data, list):
            raise ValueError(f"Vocabulary file {path} must hold a list, a dict of synonyms or categories.")
        return parse_vocabulary(data, f"file {path}")
    items = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            items.append(split_synonyms(line))
    return parse_vocabulary(items, f"file {path}")


def split_synonyms(entry: str) -> List[str]:
    """A class entry of a text vocabulary, ``name | synonym | ...``: the name, then its synonyms."""
    return [s.strip() for s in entry.split("|") if s.strip()]


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


def read_custom_vocabulary(value: str, config_names: Sequence[str] = (), source: str = "--custom-vocabulary"):
    """What a `--custom-vocabulary` option (or another `source` of text) names: "" = the config's
    CUSTOM_VOCABULARY, a file of names (see `read_vocabulary_file`), or "a,b,c" (each entry may list
    synonyms as in a file, "a | a2, b"). Returns (names, synonym groups or None)."""
    if not value:
        return parse_vocabulary(list(config_names), "MODEL.REGIONSPOT.CUSTOM_VOCABULARY")
    if os.path.isfile(value):
        return read_vocabulary_file(value)
    entries = [split_synonyms(s) for s in value.split(",")]
    return parse_vocabulary([e for e in entries if e], source)
