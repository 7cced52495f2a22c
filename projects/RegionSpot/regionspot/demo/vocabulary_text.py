"""The web demo's vocabulary box: one text that names a vocabulary, read with the same readers as
the command-line tools' --vocabulary / --custom-vocabulary options."""
import os
from typing import Callable, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog

from ..modeling.vocabulary import (BUILTIN_VOCABULARIES, VocabularyLike, parse_vocabulary, read_custom_vocabulary,
                                   split_synonyms, vocabulary_from_options)
from .errors import DemoError

EMBEDDING_SUFFIXES = (".pth", ".pt")


def vocabulary_from_text(text: str, synonyms: bool = False, config_custom: Sequence[str] = (),
                         may_open: Optional[Callable[[str], bool]] = None) -> Tuple[VocabularyLike, Optional[str]]:
    """What the vocabulary box names, through the same readers as tools/demo.py's options.

    A single word that is a vocabulary spec ('lvis', 'coco', 'custom', a registered dataset) or a
    text-embedding file is that vocabulary (`synonyms`: average a dataset's synonyms); anything
    else is a comma-separated list of names, each optionally 'name | synonym | ...', or a file of
    names. Returns (vocabulary, the dataset spec its category ids come from, or None).

    `may_open(text)` says whether the text may be read as a server file (a file of names or an
    embedding file; the web demo: only under --allow-paths). When it says no, the text is class
    names, whatever files exist, so a typed `/etc/passwd` is the class "/etc/passwd".
    """
    text = (text or "").strip()
    if not text:
        raise DemoError("The vocabulary is empty: type class names separated by commas (synonyms as "
                        "'name | synonym'), or lvis, coco, a registered dataset or a text-embedding file.")
    opens = may_open is None or may_open(text)
    try:
        if "," not in text and "|" not in text:
            if text.endswith(EMBEDDING_SUFFIXES) and opens:
                return vocabulary_from_options(text)
            if text == "custom" and not config_custom:
                raise DemoError("'custom' names MODEL.REGIONSPOT.CUSTOM_VOCABULARY, which this model's config "
                                "leaves empty: type the class names instead.")
            is_spec = text in BUILTIN_VOCABULARIES or text == "custom" or text in DatasetCatalog.list()
            if is_spec and not (opens and os.path.isfile(text)):
                return vocabulary_from_options(text, "", synonyms, config_custom)
        if opens:
            names, groups = read_custom_vocabulary(text, source="the vocabulary box")
        else:  # a server path the visitor may not open: its text is the class names
            names, groups = parse_vocabulary([e for e in (split_synonyms(s) for s in text.split(",")) if e],
                                             "the vocabulary box")
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise DemoError(f"Vocabulary: {str(e).strip(chr(34))}") from e
    return (groups if groups else names), None
