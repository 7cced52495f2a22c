"""The text side of RegionSpot as one object the model owns: which vocabulary a spec names, its
class embeddings (CLIP text tower, templates, on-disk cache, embedding files, synonyms), and
vocabularies registered or swapped at run time (as Detic's zero-shot classifier's
``reset_cls_test`` does)."""
import contextlib
import logging
import os
from collections import OrderedDict
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .text_embeddings import (
    cached_class_embeddings,
    check_vocabulary,
    load_embedding_file,
    parse_vocabulary,
    read_custom_vocabulary,
    vocabulary_names,
    vocabulary_synonyms,
)

logger = logging.getLogger(__name__)

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
