"""tools/dump_text_embeddings.py: embedding files, their use by name and path, CLIP mismatch,
chunked encoding of large vocabularies, and synonyms."""
import hashlib
import importlib.util
import os
import re
import warnings

import clip
import pytest
import torch

from regionspot.modeling.encoders.clip_encoder import ClipImageTextEncoder, build_clip
from regionspot.predictor import RegionSpotPredictor
from regionspot.modeling.text_embeddings import load_embedding_file
from conftest import ROOT, TINY_CONFIG, tiny_cfg


def _load_tool(name: str):
    # By path: a "tools" package installed in site-packages would shadow the repository's folder.
    spec = importlib.util.spec_from_file_location(f"regionspot_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dump = _load_tool("dump_text_embeddings")


def _traced_clip(path: str, seed: int) -> str:
    """A tiny CLIP saved as a JIT archive, the format of OpenAI's files, so `clip.load` reads it."""
    model = build_clip("tiny", "random", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
        torch.jit.save(traced, path)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    files = _traced_clip(str(folder / "a.pt"), 1), _traced_clip(str(folder / "b.pt"), 2)
    # TorchScript archives hold code: only files with a released checksum load, so list these as released.
    with pytest.MonkeyPatch.context() as mp:
        for i, f in enumerate(files):
            with open(f, "rb") as fh:
                sha = hashlib.sha256(fh.read()).hexdigest()
            mp.setitem(clip.clip._MODELS, f"test-{i}", f"https://example.invalid/{sha}/test-{i}.pt")
        yield files


def _dump(clip_file: str, *args: str) -> int:
    return dump.main(["--config-file", TINY_CONFIG, *args,
                      "--opts", "MODEL.DEVICE", "cpu", "MODEL.REGIONSPOT.CLIP.CHECKPOINT", clip_file])


def _predictor(clip_file: str) -> RegionSpotPredictor:
    return RegionSpotPredictor(tiny_cfg("MODEL.REGIONSPOT.CLIP.CHECKPOINT", clip_file))


def _count_text(predictor) -> list:
    calls, original = [], predictor.model.clip_encoder.encode_text
    predictor.model.clip_encoder.encode_text = lambda prompts: calls.append(len(prompts)) or original(prompts)
    return calls


def test_custom_file_round_trip_by_path(clips, tmp_path):
    out = str(tmp_path / "mine.pth")
    assert _dump(clips[0], "--vocabulary", "custom", "--custom-vocabulary", "cat, dog,red circle",
                 "--output", out) == 0
    payload = load_embedding_file(out)
    assert payload["names"] == ["cat", "dog", "red circle"] and payload["embeddings"].shape == (3, 32)
    predictor = _predictor(clips[0])
    calls = _count_text(predictor)
    names, from_file = predictor.vocabulary_embeddings(out)
    assert names == ["cat", "dog", "red circle"] and calls == []  # read, not encoded
    _, encoded = predictor.vocabulary_embeddings(["cat", "dog", "red circle"])
    assert torch.allclose(from_file, encoded, atol=1e-6)
    predictor.set_image(torch.zeros(3, 48, 64))
    assert predictor.predict(boxes=[[0, 0, 30, 30]], vocabulary=out).vocabulary == names


def test_a_file_from_another_clip_is_refused(clips, tmp_path):
    out = str(tmp_path / "other.pth")
    assert _dump(clips[1], "--vocabulary", "custom", "--custom-vocabulary", "cat,dog", "--output", out) == 0
    predictor = _predictor(clips[0])
    with pytest.raises(ValueError, match="made with another CLIP model.*dump_text_embeddings"):
        predictor.vocabulary_embeddings(out)


def test_dataset_dump_fills_the_cache_so_the_name_is_instant(clips, tmp_path):
    assert _dump(clips[0], "--vocabulary", "synthetic_shapes_val", "--output", str(tmp_path / "s.pth")) == 0
    predictor = _predictor(clips[0])
    calls = _count_text(predictor)
    names, emb = predictor.vocabulary_embeddings("synthetic_shapes_val")
    assert len(names) == 6 and emb.shape == (6, 32) and calls == []


def test_lvis_with_synonyms_is_encoded_in_bounded_chunks(clips, tmp_path, monkeypatch):
    sizes, original = [], ClipImageTextEncoder.encode_text

    def counting(self, prompts):
        sizes.append(len(prompts))
        return original(self, prompts)

    monkeypatch.setattr(ClipImageTextEncoder, "encode_text", counting)
    out = str(tmp_path / "lvis.pth")
    assert _dump(clips[0], "--vocabulary", "lvis", "--synonyms", "--chunk-size", "150", "--output", out) == 0
    payload = load_embedding_file(out)
    assert len(payload["names"]) == 1203 and payload["names"][0] == "aerosol_can"
    assert payload["synonyms"][0] == ["aerosol_can", "spray_can"]
    n_synonyms = sum(len(g) for g in payload["synonyms"])
    assert max(sizes) <= 150 and sum(sizes) == n_synonyms > 1203  # one "single" template each
    assert torch.allclose(payload["embeddings"].norm(dim=1), torch.ones(1203), atol=1e-5)


def test_synonyms_in_a_custom_file_are_averaged(clips, tmp_path):
    vocab = tmp_path / "v.txt"
    vocab.write_text("# shapes\nred_circle | red circle\n\nsky\n")
    out = str(tmp_path / "v.pth")
    assert _dump(clips[0], "--vocabulary", "custom", "--custom-vocabulary", str(vocab), "--synonyms",
                 "--output", out) == 0
    payload = load_embedding_file(out)
    assert payload["names"] == ["red_circle", "sky"] and payload["synonyms"] == [["red_circle", "red circle"], ["sky"]]
    predictor = _predictor(clips[0])
    _, parts = predictor.vocabulary_embeddings(["red_circle", "red circle", "sky"])
    expected = torch.nn.functional.normalize(parts[0] + parts[1], dim=0)
    assert torch.allclose(payload["embeddings"][0], expected, atol=1e-6)
    assert torch.allclose(payload["embeddings"][1], parts[2], atol=1e-6)
    # Without --synonyms the file's names alone are encoded.
    assert _dump(clips[0], "--vocabulary", "custom", "--custom-vocabulary", str(vocab), "--output", out) == 0
    assert torch.allclose(load_embedding_file(out)["embeddings"][0], parts[0], atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--vocabulary", "custom", "--custom-vocabulary", " , "], "is empty"),
    (["--vocabulary", "custom", "--custom-vocabulary", "cat,dog,cat"], "more than once: \\['cat'\\]"),
    (["--vocabulary", "coco", "--synonyms"], "'coco' has no synonyms"),
    (["--vocabulary", "no_such_set"], "Unknown vocabulary 'no_such_set'"),
    (["--vocabulary", "lvis", "--custom-vocabulary", "a,b"], "needs --vocabulary custom"),
])
def test_bad_vocabularies_exit_2_with_a_message(clips, tmp_path, capsys, args, message):
    assert _dump(clips[0], *args, "--output", str(tmp_path / "x.pth")) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.pth").exists()
