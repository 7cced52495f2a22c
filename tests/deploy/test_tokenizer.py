"""regionspot_deploy's CLIP tokenizer gives clip.tokenize's ids, without clip or torch."""
import os

import clip
import clip.simple_tokenizer as simple_tokenizer
import numpy as np
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

from regionspot.modeling.text_embeddings import IMAGENET_TEMPLATES
from regionspot_deploy.tokenizer import ClipTokenizer

BPE = os.path.join(os.path.dirname(simple_tokenizer.__file__), "bpe_simple_vocab_16e6.txt.gz")


def test_tokenizer_equals_clip_tokenize():
    names = [c["name"] for c in LVIS_CATEGORIES]
    texts = (names + [t.format(n.replace("_", " ")) for n, t in zip(names, IMAGENET_TEMPLATES * 16)] + [
        "Crème brûlée’s “café” — naïve 東京 ١٢٣ 😀 &amp;amp; &lt;b&gt;", "don't WE'LL they're I'M",
        "x" * 300, " ".join(["word"] * 100), "", "  spaces\tand\nnewlines ", "ﬁ ligature ＦＵＬＬ width",
        "<|startoftext|>inner<|endoftext|>", "wall-other-merged", "tv 2000s 3.5mm", "Ελληνικά Русский",
    ])
    ours = ClipTokenizer(BPE).tokenize(texts)
    theirs = clip.tokenize(texts, truncate=True).numpy()
    assert ours.dtype == np.int64 and ours.shape == theirs.shape == (len(texts), 77)
    mismatched = [texts[i] for i in np.nonzero((ours != theirs).any(axis=1))[0]]
    assert not mismatched
    assert (ours[texts.index("x" * 300)] != 0).all()  # long texts are truncated, ending with the end token
