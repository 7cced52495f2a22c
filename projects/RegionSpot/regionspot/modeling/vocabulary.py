"""What a vocabulary is, in one place: specs ("lvis", "coco", "custom", a registered dataset, an
embedding file), name lists and their checks, synonyms, vocabulary files, the options of the tools,
and the text side of RegionSpot as one object the model owns (`Vocabulary`: class embeddings
through the text-embedding cache, vocabularies registered or swapped at run time, as Detic's
zero-shot classifier's ``reset_cls_test`` does).

Text encoding itself (templates, the text tower call, the embedding file format, the disk cache)
is `regionspot.modeling.text_embeddings`, which knows nothing of specs: the dependency runs from
here to there only.
"""
import contextlib
import json
import logging
import os
from collections import OrderedDict
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from .text_embeddings import cached_class_embeddings, get_templates, load_embedding_file, save_embedding_file

logger = logging.getLogger(__name__)

# Built-in vocabularies: the detectron2 datasets whose metadata holds their class names.
BUILTIN_VOCABULARIES = {"lvis": "lvis_v1_val", "coco": "coco_2017_val"}


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


# A vocabulary: a spec ("lvis", "coco", "custom", a registered dataset or vocabulary name, an
# embedding file), or a list of class names, each optionally [name, synonym, ...] (averaged).
VocabularyLike = Union[str, Sequence[Union[str, Sequence[str]]]]


class Vocabulary:
    """Class embeddings of any vocabulary, against one frozen CLIP text tower.

    Embeddings come back L2-normalised on the encoder's device. Each resolved vocabulary is kept
    in memory (the least recently used beyond `max_cached` is dropped; the on-disk cache keeps
    them all), and everything is forgotten when new CLIP weights are loaded.
    """

    def __init__(
        self,
        clip_encoder,
        *,
        default: str = "",
        custom: Sequence[str] = (),
        templates: Sequence[str] = ("a photo of a {}.",),
        cache_dir: str = "",
        chunk_size: int = 256,
        precision: Optional[Callable[[], ContextManager]] = None,
        max_cached: int = 16,
    ):
        """
        Args:
            clip_encoder: the `ClipImageTextEncoder` whose text tower embeds the names.
            default: the spec used when none is given ("" = none: an error says how to set one).
            custom: class names of the spec "custom" (MODEL.REGIONSPOT.CUSTOM_VOCABULARY).
            templates: prompt templates averaged into each class embedding.
            cache_dir: folder of the on-disk cache ("" = $REGIONSPOT_CACHE or ~/.cache/regionspot).
            chunk_size: prompts per text-encoder call.
            precision: a context manager factory for the text tower's precision (the model's
                frozen-encoder autocast), or None for fp32.
            max_cached: vocabularies kept in memory.
        """
        if int(chunk_size) < 1:
            raise ValueError(f"MODEL.REGIONSPOT.TEXT.CHUNK_SIZE must be at least 1, got {chunk_size}.")
        self.clip_encoder = clip_encoder
        self.default = default
        self.custom = list(custom)
        self.templates = tuple(templates)
        self.cache_dir = cache_dir
        self.chunk_size = int(chunk_size)
        self.precision = precision or contextlib.nullcontext
        self.max_cached = max(1, int(max_cached))
        self._registered: Dict[str, Tuple[List[str], Optional[List[List[str]]], Optional[torch.Tensor]]] = {}
        self._memory: "OrderedDict[tuple, Tuple[List[str], torch.Tensor]]" = OrderedDict()
        self._fingerprint: Optional[str] = None
        # New CLIP weights (e.g. from a checkpoint) invalidate the embeddings made so far.
        clip_encoder.register_load_state_dict_post_hook(lambda *_: self.forget())

    @classmethod
    def from_config(cls, cfg, clip_encoder, **overrides) -> "Vocabulary":
        """The vocabulary side cfg.MODEL.REGIONSPOT describes (VOCABULARY, CUSTOM_VOCABULARY, TEXT.*) on
        `clip_encoder`'s text tower; `overrides` replace any of the constructor's arguments."""
        c = cfg.MODEL.REGIONSPOT
        kwargs = dict(default=c.VOCABULARY, custom=c.CUSTOM_VOCABULARY, templates=get_templates(c.TEXT.TEMPLATES),
                      cache_dir=c.TEXT.CACHE_DIR, chunk_size=c.TEXT.CHUNK_SIZE)
        kwargs.update(overrides)
        return cls(clip_encoder, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.clip_encoder.device

    @property
    def fingerprint(self) -> str:
        """A digest of the CLIP text tower: embeddings of another CLIP are never reused."""
        if self._fingerprint is None:
            self._fingerprint = self.clip_encoder.text_fingerprint()
        return self._fingerprint

    def forget(self) -> None:
        self._memory.clear()
        self._fingerprint = None

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> torch.Tensor:
        """(N, D) raw CLIP text embeddings of prompts, in the model's frozen-encoder precision."""
        with self.precision():
            return self.clip_encoder.encode_text(prompts)

    def encode(self, names: Sequence[str], synonyms: Optional[Sequence[Sequence[str]]] = None) -> torch.Tensor:
        """(C, D) class embeddings of names (or synonym groups), through the on-disk cache (CPU)."""
        return cached_class_embeddings(self.encode_prompts, self.fingerprint, names, self.templates,
                                       self.cache_dir, self.chunk_size, synonyms=synonyms)

    def write_file(self, path: str, vocabulary: VocabularyLike,
                   synonyms: Optional[Sequence[Sequence[str]]] = None) -> List[str]:
        """Write the embeddings of `vocabulary` to an embedding file at `path` (atomically), which
        any spec may then name; `synonyms`: the synonym groups they average, recorded with them.
        Returns the class names."""
        names, emb = self.embeddings(vocabulary)
        save_embedding_file(path, names, emb, self.fingerprint, self.templates, synonyms)
        return names

    # ------------------------------------------------------------------ run-time vocabularies
    def register(self, name: str, classes: Sequence[Union[str, Sequence[str]]],
                 embeddings: Optional[torch.Tensor] = None) -> None:
        """Make `name` a vocabulary spec: class names (entries may be [name, synonym, ...]), and
        optionally their (C, D) embeddings (else they are encoded on first use). A registered
        name takes precedence over datasets of the same name."""
        names, groups = parse_vocabulary(list(classes), f"vocabulary {name!r}")
        if embeddings is not None:
            embeddings = self._checked(torch.as_tensor(embeddings).float(), len(names), f"vocabulary {name!r}")
        self._registered[name] = (names, groups, embeddings)
        self._drop(("spec", name))

    def unregister(self, name: str) -> None:
        self._registered.pop(name, None)
        self._drop(("spec", name))

    def set_custom(self, names: Sequence[str]) -> None:
        """Replace the "custom" vocabulary (its embeddings are computed on next use)."""
        self.custom = check_vocabulary(names, "the custom vocabulary")
        self._drop(("spec", "custom"))

    # ------------------------------------------------------------------ resolution
    def embeddings(self, vocabulary: Optional[VocabularyLike] = None) -> Tuple[List[str], torch.Tensor]:
        """(class names, (C, D) embeddings on the device) of a vocabulary (None = the default)."""
        if isinstance(vocabulary, str) and not vocabulary.strip():
            raise ValueError("The vocabulary is an empty string: give a spec, a file or a list of names.")
        if vocabulary is None:
            vocabulary = self.default
        if isinstance(vocabulary, str):
            if not vocabulary.strip():
                raise ValueError(
                    "No vocabulary: set MODEL.REGIONSPOT.VOCABULARY, give inputs a 'vocabulary' (the test and "
                    "train mappers set it to their dataset's name), or pass one (a spec or a list of names).")
            key = ("spec", vocabulary)
        elif isinstance(vocabulary, (list, tuple)):
            names, groups = parse_vocabulary(vocabulary, "the vocabulary list")
            key = ("names", tuple(names), None if groups is None else tuple(map(tuple, groups)))
        else:
            raise TypeError(f"A vocabulary is a spec string or a list of class names, not {type(vocabulary).__name__}.")
        if key in self._memory:
            self._memory.move_to_end(key)
        else:
            names, emb = self._resolve(vocabulary) if key[0] == "spec" else (names, self.encode(names, groups))
            self._memory[key] = (names, emb)
            while len(self._memory) > self.max_cached:
                self._memory.popitem(last=False)
        names, emb = self._memory[key]
        if emb.device != self.device:  # first use, or the model moved since
            emb = emb.to(self.device)
            self._memory[key] = (names, emb)
        return names, emb

    def _resolve(self, spec: str) -> Tuple[List[str], torch.Tensor]:
        if spec in self._registered:
            names, groups, emb = self._registered[spec]
            return names, (emb if emb is not None else self.encode(names, groups))
        if spec.endswith((".pth", ".pt")) or os.path.isfile(spec):
            payload = load_embedding_file(spec, self.fingerprint)
            names = check_vocabulary(payload["names"], spec)
            return names, self._checked(payload["embeddings"], len(names), spec)
        names = vocabulary_names(spec, self.custom)
        return names, self.encode(names)

    @staticmethod
    def _checked(emb: torch.Tensor, num: int, source: str) -> torch.Tensor:
        if emb.ndim != 2 or emb.shape[0] != num:
            raise ValueError(f"The embeddings of {source} have shape {tuple(emb.shape)}, not ({num}, D).")
        return emb

    def _drop(self, key: tuple) -> None:
        self._memory.pop(key, None)


def vocabulary_from_options(vocabulary: str, custom: str = "", synonyms: bool = False,
                            config_custom: Sequence[str] = ()) -> Tuple[VocabularyLike, Optional[str]]:
    """What a tool's `--vocabulary`, `--custom-vocabulary` and `--synonyms` options ask for.

    Returns (a vocabulary for `Vocabulary.embeddings`, the dataset spec its category ids come
    from, or None). "custom" takes its names from `custom` ("a,b,c", a file of names, or an
    embedding file) or else from the config's CUSTOM_VOCABULARY. Raises ValueError naming the
    option at fault.
    """
    if vocabulary != "custom":
        if custom:
            raise ValueError("--custom-vocabulary needs --vocabulary custom.")
        if os.path.isfile(vocabulary) or vocabulary.endswith((".pth", ".pt")):
            if synonyms:
                raise ValueError("--synonyms cannot change a text-embedding file: make it with "
                                 "tools/dump_text_embeddings.py --synonyms.")
            return vocabulary, None
        if synonyms:
            try:
                return vocabulary_synonyms(vocabulary), vocabulary
            except KeyError as e:
                raise ValueError(str(e).strip('"')) from e
        return vocabulary, vocabulary
    if custom.endswith((".pth", ".pt")):
        return custom, None
    if not custom and not config_custom:
        raise ValueError("--vocabulary custom needs --custom-vocabulary 'a,b,c' or a file of names.")
    names, groups = read_custom_vocabulary(custom, config_custom)
    if groups and not synonyms:
        logger.info("The custom vocabulary lists synonyms; pass --synonyms to average them.")
    if synonyms and groups is None:
        raise ValueError("--synonyms: the custom vocabulary lists no synonyms ('name | synonym' lines).")
    return (groups if synonyms else names), None
