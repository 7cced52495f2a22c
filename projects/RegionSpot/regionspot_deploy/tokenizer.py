"""CLIP's byte-pair-encoding tokenizer without torch: the token ids `clip.tokenize(texts,
truncate=True)` gives, read from the BPE vocabulary file the export copies into the folder.

Text is cleaned as CLIP cleans it (ftfy's `fix_text`, HTML unescaping, whitespace collapsed, lower
case) and split with CLIP's word pattern (the `regex` package: Unicode letter / number classes);
each word's UTF-8 bytes are mapped to printable characters and merged pair by pair, lowest merge
rank first, until no known pair is left.
"""
import gzip
import html
import re
from typing import Dict, List, Sequence

import numpy as np

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's vocabulary: 256 byte symbols, the same with the end-of-word mark, 48894 merges, 2 specials.
NUM_MERGES = 49152 - 256 - 2
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


PRINTABLE = (*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1))


def byte_symbols() -> Dict[int, str]:
    """Each byte value -> one printable character, in CLIP's vocabulary order: the printable
    Latin-1 bytes stand for themselves, the others take the code points from 256 on."""
    others = [b for b in range(256) if b not in PRINTABLE]
    return {**{b: chr(b) for b in PRINTABLE}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class ClipTokenizer:
    """`tokenize(texts)` -> (N, context_length) int64 ids, as `clip.tokenize(texts, truncate=True)`."""

    def __init__(self, bpe_path: str, context_length: int = 77):
        try:
            import ftfy
            import regex
        except ImportError as e:
            raise ImportError(f"Embedding class names needs the packages ftfy and regex ({e}): "
                              "pip install ftfy regex, or serve a vocabulary exported as embeddings.") from e
        self._fix_text = ftfy.fix_text
        self._words = regex.compile(WORD_PATTERN, regex.IGNORECASE)
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.bytes = byte_symbols()
        # Vocabulary order: the byte symbols, the same with the end-of-word mark, each merge, the specials.
        symbols = list(self.bytes.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context_length = int(context_length)
        self._cache: Dict[str, List[str]] = {SOT: [SOT], EOT: [EOT]}  # special words stay whole

    def _bpe(self, word: str) -> List[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def clean(self, text: str) -> str:
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> List[int]:
        out = []
        for word in self._words.findall(self.clean(text)):
            mapped = "".join(self.bytes[b] for b in word.encode("utf-8"))
            out.extend(self.ids[p] for p in self._bpe(mapped))
        return out

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        sot, eot = self.ids[SOT], self.ids[EOT]
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [sot] + self.encode(text) + [eot]
            if len(ids) > self.context_length:  # truncate=True: cut, and end with the end token
                ids = ids[:self.context_length]
                ids[-1] = eot
            result[i, :len(ids)] = ids
        return result

