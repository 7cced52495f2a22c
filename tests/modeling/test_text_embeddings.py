"""Class-name embeddings: templates, name cleaning, the on-disk cache, vocabularies, embedding files."""
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from regionspot.modeling.encoders.clip_encoder import ClipImageTextEncoder
from regionspot.modeling.text_embeddings import (
    IMAGENET_TEMPLATES,
    TEMPLATE_SETS,
    clean_class_name,
    encode_class_names,
    get_templates,
    load_embedding_file,
    save_embedding_file,
)
from regionspot.modeling.vocabulary import check_vocabulary, vocabulary_names

from conftest import tiny_cfg

NAMES = ["red_circle", "wall-other", "green square", "traffic light"]


@pytest.fixture
def text_calls(monkeypatch):
    """Counts the prompts that go through CLIP's text encoder (any ClipImageTextEncoder)."""
    calls = []
    original = ClipImageTextEncoder.encode_text

    def counting(self, prompts):
        prompts = list(prompts)
        calls.append(len(prompts))
        return original(self, prompts)

    monkeypatch.setattr(ClipImageTextEncoder, "encode_text", counting)
    return calls


def _model(*opts, seed=0, state=None):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg("MODEL.REGIONSPOT.RANDOM_INIT_SEED", seed, *opts)).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _custom(names, *opts, **kw):
    return _model("MODEL.REGIONSPOT.CUSTOM_VOCABULARY", str(list(names)), *opts, **kw)


def _cache_files(root):
    folder = os.path.join(root, "text")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)) if os.path.isdir(folder) else []


# ---------------------------------------------------------------------------------- templates
def test_template_ensemble_is_the_80_imagenet_templates_plus_bare_name():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    ensemble = get_templates("ensemble")
    assert len(ensemble) == 81 and len(set(ensemble)) == 81
    assert tuple(ensemble) == tuple(IMAGENET_TEMPLATES) + ("{}.",)
    for t in ensemble:
        assert t.count("{}") == 1, t
        assert t.format("cat") != t
    assert "a photo of a {}." in IMAGENET_TEMPLATES
    assert tuple(get_templates("single")) == ("a photo of a {}.",)
    assert set(TEMPLATE_SETS) >= {"ensemble", "single"}
    with pytest.raises(ValueError, match="no_such_templates"):
        get_templates("no_such_templates")


@pytest.mark.parametrize("raw, clean", [
    ("wall-other", "wall"),
    ("table-merged", "table"),
    ("grass-stuff", "grass"),
    # COCO panoptic spells several classes with two suffixes; the reference strips both.
    ("wall-other-merged", "wall"),
    ("sky-other-merged", "sky"),
    ("aerosol_can", "aerosol_can"),
    ("t-shirt", "t-shirt"),
    ("other", "other"),
])
def test_clean_class_name(raw, clean):
    assert clean_class_name(raw) == clean


def test_embedding_is_normalised_mean_over_templates_of_cleaned_names():
    model = _model()
    templates = ("a photo of a {}.", "art of the {}.", "{}.")
    emb = encode_class_names(model.clip_encoder.encode_text, NAMES, templates, chunk_size=5)
    assert emb.shape == (len(NAMES), model.clip_encoder.text_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(NAMES)))
    for i, name in enumerate(NAMES):
        prompts = [t.format(clean_class_name(name)) for t in templates]
        want = F.normalize(model.clip_encoder.encode_text(prompts).mean(0), dim=0)
        torch.testing.assert_close(emb[i], want, atol=1e-5, rtol=1e-5)
    # "wall-other" is encoded as "wall".
    wall = encode_class_names(model.clip_encoder.encode_text, ["wall"], templates)
    torch.testing.assert_close(emb[1], wall[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- cache
def test_cache_hit_miss_and_repair(text_calls, tmp_path):
    cache = os.environ["REGIONSPOT_CACHE"]
    first = _custom(NAMES)
    names, emb = first.text_embeddings("custom")
    assert names == NAMES and emb.shape[0] == len(NAMES)
    encoded = sum(text_calls)
    assert encoded == len(NAMES) * len(first.vocabulary.templates)
    files = _cache_files(cache)
    assert len(files) == 1

    # A fresh model with the same CLIP weights: nothing is encoded, the result is identical.
    second = _custom(NAMES, seed=1, state=first.state_dict())
    _, emb2 = second.text_embeddings("custom")
    assert sum(text_calls) == encoded
    assert torch.equal(emb, emb2)

    # Other templates miss.
    ensemble = _custom(NAMES, "MODEL.REGIONSPOT.TEXT.TEMPLATES", "ensemble", state=first.state_dict())
    ensemble.text_embeddings("custom")
    assert sum(text_calls) == encoded + len(NAMES) * 81
    encoded = sum(text_calls)
    # Other names miss.
    fewer = _custom(NAMES[:2], state=first.state_dict())
    fewer.text_embeddings("custom")
    assert sum(text_calls) == encoded + 2
    encoded = sum(text_calls)
    # Another CLIP misses, and its embeddings differ.
    other_clip = _custom(NAMES, seed=5)
    assert other_clip.vocabulary.fingerprint != first.vocabulary.fingerprint
    _, emb_other = other_clip.text_embeddings("custom")
    assert sum(text_calls) == encoded + len(NAMES)
    assert not torch.allclose(emb_other, emb)
    encoded = sum(text_calls)
    assert len(_cache_files(cache)) == 4

    # A truncated cache file is detected, encoded again and rewritten.
    path = files[0]
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    repaired = _custom(NAMES, state=first.state_dict())
    _, emb3 = repaired.text_embeddings("custom")
    assert sum(text_calls) == encoded + len(NAMES)
    torch.testing.assert_close(emb3, emb)
    payload = load_embedding_file(path, first.vocabulary.fingerprint)
    assert payload["names"] == NAMES
    torch.testing.assert_close(payload["embeddings"], emb)
    # ... and the repaired file serves the next model.
    encoded = sum(text_calls)
    _custom(NAMES, state=first.state_dict()).text_embeddings("custom")
    assert sum(text_calls) == encoded


def test_dataset_vocabulary_uses_its_classes(synthetic_val, text_calls):
    from detectron2.data import MetadataCatalog

    model = _model()
    names, emb = model.text_embeddings(synthetic_val)
    assert names == list(MetadataCatalog.get(synthetic_val).thing_classes)
    assert emb.shape == (len(names), model.clip_encoder.text_dim)
    # Kept in memory: the second call encodes nothing.
    n = sum(text_calls)
    names2, emb2 = model.text_embeddings(synthetic_val)
    assert sum(text_calls) == n and names2 == names and torch.equal(emb, emb2)


# ---------------------------------------------------------------------------------- vocabularies
def test_empty_vocabulary_is_refused():
    model = _model("MODEL.REGIONSPOT.VOCABULARY", "custom")
    assert list(model.vocabulary.custom) == []
    with pytest.raises(ValueError, match="empty"):
        model.text_embeddings()
    with pytest.raises(ValueError, match="empty"):
        vocabulary_names("custom", [])
    with pytest.raises(ValueError):
        check_vocabulary(["cat", "  "], "a test")


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="cat"):
        vocabulary_names("custom", ["cat", "dog", "cat"])
    model = _model()
    with pytest.raises(ValueError, match="dog"):
        model.vocabulary.set_custom(["dog", "cat", "dog"])
    with pytest.raises(ValueError):
        _custom(["a", "b", "a"]).text_embeddings("custom")


def test_set_custom_vocabulary_replaces_the_previous_one():
    model = _custom(["cat", "dog"])
    names, emb = model.text_embeddings("custom")
    model.vocabulary.set_custom(["dog", "fish", "cat"])
    names2, emb2 = model.text_embeddings("custom")
    assert names == ["cat", "dog"] and names2 == ["dog", "fish", "cat"]
    torch.testing.assert_close(emb2[0], emb[1])
    torch.testing.assert_close(emb2[2], emb[0])


def test_unknown_vocabulary_is_named():
    model = _model()
    with pytest.raises(KeyError, match="no_such_vocabulary_xyz"):
        model.text_embeddings("no_such_vocabulary_xyz")


# ---------------------------------------------------------------------------------- embedding files
def test_embedding_file_of_another_clip_is_refused(tmp_path):
    a, b = _custom(NAMES, seed=1), _model(seed=2)
    assert a.vocabulary.fingerprint != b.vocabulary.fingerprint
    names, emb = a.text_embeddings("custom")
    path = str(tmp_path / "vocab.pth")
    save_embedding_file(path, names, emb, a.vocabulary.fingerprint, a.vocabulary.templates)

    payload = load_embedding_file(path, a.vocabulary.fingerprint)
    assert payload["names"] == NAMES and torch.equal(payload["embeddings"], emb)
    with pytest.raises(ValueError, match=b.vocabulary.fingerprint):
        load_embedding_file(path, b.vocabulary.fingerprint)
    # Through the model: the file serves the CLIP it was made with, and no other.
    names_a, emb_a = _model(state=a.state_dict()).text_embeddings(path)
    assert names_a == NAMES and torch.equal(emb_a, emb)
    with pytest.raises(ValueError, match="another CLIP"):
        b.text_embeddings(path)


def test_broken_embedding_files_are_named(tmp_path):
    missing = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_embedding_file(missing)
    other = str(tmp_path / "other.pth")
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(RuntimeError, match="other.pth"):
        load_embedding_file(other)
    bad_rows = str(tmp_path / "rows.pth")
    save_embedding_file(bad_rows, ["a", "b", "c"], torch.zeros(2, 4), "f", ("{}.",))
    with pytest.raises(RuntimeError, match="rows.pth"):
        load_embedding_file(bad_rows)
