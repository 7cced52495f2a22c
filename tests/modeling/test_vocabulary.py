"""The model's `Vocabulary`: run-time registration and swapping (as Detic's reset_cls_test),
embedding files, lists with synonyms, the in-memory LRU, and one resolution for every caller."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.predictor import RegionSpotPredictor
from regionspot.modeling.vocabulary import vocabulary_from_options

from conftest import tiny_cfg


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_cfg()).eval()


def test_register_names_then_swap_at_run_time(model, synthetic_val):
    voc = model.vocabulary
    voc.register("pets", ["cat", "dog"])
    names, emb = voc.embeddings("pets")
    assert names == ["cat", "dog"] and emb.shape[0] == 2
    torch.testing.assert_close(emb, voc.embeddings(["cat", "dog"])[1])  # the same as naming them

    # The model uses it for an input naming it; swapping it changes the next forward's classes.
    cfg = tiny_cfg()
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(DatasetCatalog.get(synthetic_val)[0])
    x["vocabulary"] = "pets"
    assert int(model([x])[0]["instances"].pred_classes.max()) <= 1
    voc.register("pets", ["cat", "dog", "fish", "hamster"])
    assert voc.embeddings("pets")[0] == ["cat", "dog", "fish", "hamster"]
    out = model([x])[0]["instances"]
    assert set(out.pred_classes.tolist()) == {0, 1, 2, 3}  # every class of the new list is scored
    voc.unregister("pets")
    with pytest.raises(KeyError, match="pets"):
        voc.embeddings("pets")


def test_register_given_embeddings_and_refuse_bad_shapes(model):
    voc = model.vocabulary
    d = model.clip_encoder.text_dim
    emb = F.normalize(torch.randn(3, d), dim=-1)
    voc.register("fixed", ["a", "b", "c"], embeddings=emb)
    names, got = voc.embeddings("fixed")
    torch.testing.assert_close(got, emb)
    with pytest.raises(ValueError, match="shape"):
        voc.register("broken", ["a", "b"], embeddings=emb)
    with pytest.raises(ValueError, match="more than once"):
        voc.register("dups", ["a", "a"])


def test_predictor_resolves_through_the_models_vocabulary(model):
    predictor = RegionSpotPredictor(model=model)
    model.vocabulary.register("shapes", ["red circle", "blue square"])
    assert predictor.vocabulary_embeddings("shapes")[0] == ["red circle", "blue square"]
    a = predictor.vocabulary_embeddings(["x", ["y", "y synonym"]])[1]
    b = model.vocabulary.embeddings(["x", ["y", "y synonym"]])[1]
    assert a is b  # one cache, not a copy in the predictor


def test_lru_keeps_at_most_max_cached(model, monkeypatch):
    voc = model.vocabulary
    calls = []
    encode = voc.encode
    monkeypatch.setattr(voc, "encode", lambda names, synonyms=None: calls.append(list(names)) or encode(names, synonyms))
    monkeypatch.setattr(voc, "max_cached", 2)
    for i in range(4):
        voc.embeddings([f"thing{i}"])
    voc.embeddings(["thing3"])  # still in memory
    assert len(calls) == 4
    voc.embeddings(["thing0"])  # evicted: resolved again (from the disk cache)
    assert calls[-1] == ["thing0"] and len(calls) == 5


def test_tool_options_resolve_once():
    assert vocabulary_from_options("lvis") == ("lvis", "lvis")
    assert vocabulary_from_options("custom", "cat, dog") == (["cat", "dog"], None)
    # A list's entries name synonyms as a file's lines do: used with --synonyms, else just the names.
    assert vocabulary_from_options("custom", "cat | kitty, dog", synonyms=True) == ([["cat", "kitty"], ["dog"]], None)
    assert vocabulary_from_options("custom", "cat | kitty, dog") == (["cat", "dog"], None)
    with pytest.raises(ValueError, match="--custom-vocabulary needs --vocabulary custom"):
        vocabulary_from_options("lvis", "cat")
    with pytest.raises(ValueError, match="--vocabulary custom needs"):
        vocabulary_from_options("custom")
