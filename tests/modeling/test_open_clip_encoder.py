"""MODEL.REGIONSPOT.CLIP.BACKEND open_clip: the token map is the last block's output (the model's
own remaining steps turn it into `encode_image`), text as open_clip encodes it, the model's own
normalisation after RegionSpot's squash, weights from files and URLs, and the whole RegionSpot
model on it (tiny random open_clip models on the CPU)."""
import gzip
import os
import sys

import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.modeling.encoders import build_clip_encoder
from regionspot.modeling.encoders.clip_encoder import ClipImageTextEncoder
from regionspot.modeling.encoders.open_clip_encoder import (
    OpenClipImageTextEncoder,
    build_open_clip,
    open_clip_architecture,
    pretrained_preprocess_cfg,
)
from regionspot.modeling.text_embeddings import load_embedding_file
from regionspot.utils.extras import MissingExtraError

from conftest import tiny_cfg

KEY = "MODEL.REGIONSPOT.CLIP.CHECKPOINT"
TINY = ("tiny", "tiny-timm")  # open_clip's VisionTransformer; a timm trunk (MAP pooling, as SigLIP)


def _encoder(name, size=64, **kwargs):
    return OpenClipImageTextEncoder(build_open_clip(name, input_size=size, **kwargs), name, size).eval()


def _remaining_steps(model, tokens):
    """What the model itself does after the last block: final norm, pooling, projection."""
    visual = model.visual
    if isinstance(visual, open_clip.timm_model.TimmModel):
        return visual.head(visual.trunk.forward_head(visual.trunk.norm(tokens)))
    pooled, _ = visual._pool(tokens)  # ln_post and _global_pool (the class token)
    return pooled @ visual.proj


def _blocks(model):
    visual = model.visual
    return list(visual.trunk.blocks if hasattr(visual, "trunk") else visual.transformer.resblocks)


def _last_block(model):
    return _blocks(model)[-1]


# ------------------------------------------------------------------------------------ tokens
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [64, 96])  # tiny: native, resampled; tiny-timm (160): both resampled
@torch.no_grad()
def test_tokens_are_the_last_block_output_that_encode_image_pools(name, size):
    enc = _encoder(name, size)
    x = torch.randn(2, 3, size, size)
    tokens = enc.encode_image_tokens(x)
    prefix = 1  # tiny: the class token; tiny-timm: timm's register token
    assert tokens.shape == (2, prefix + (size // 16) ** 2, enc.width)
    # The model's own steps after the last block give its image embedding ...
    torch.testing.assert_close(_remaining_steps(enc.clip_model, tokens), enc.clip_model.encode_image(x),
                               rtol=0, atol=0)
    # ... and the tokens are what the last block returns inside encode_image.
    seen = []
    handle = _last_block(enc.clip_model).register_forward_hook(lambda m, i, o: seen.append(o))
    enc.clip_model.encode_image(x)
    handle.remove()
    torch.testing.assert_close(tokens, seen[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_compile_targets_are_the_blocks_the_token_map_calls(name):
    """Compiling a module only changes its __call__: every target must be called as a module."""
    enc = _encoder(name)
    targets = enc.compile_targets()
    assert list(targets) == _blocks(enc.clip_model)
    called = set()
    handles = [t.register_forward_hook(lambda m, i, o: called.add(id(m))) for t in targets]
    enc.encode_image_tokens(torch.randn(1, 3, 64, 64))
    for h in handles:
        h.remove()
    assert called == {id(t) for t in targets}


def test_input_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="MODEL.REGIONSPOT.CLIP.INPUT_SIZE"):
        _encoder("tiny", 72)
    # An encoder refuses a model built for another size than the one it is told.
    with pytest.raises(ValueError, match="MODEL.REGIONSPOT.CLIP.INPUT_SIZE"):
        OpenClipImageTextEncoder(build_open_clip("tiny", input_size=64), "tiny", 96)


def test_a_model_s_own_size_need_not_be_a_multiple_of_the_patch(monkeypatch):
    # As SigLIP SO400M/14 at 384 px: the patch embedding drops the remainder, as released.
    from regionspot.modeling.encoders import open_clip_encoder as oce

    monkeypatch.setattr(oce, "native_image_size", lambda name: (72, 72))
    enc = OpenClipImageTextEncoder(build_open_clip("tiny", input_size=72), "tiny", 72)
    tokens = enc.encode_image_tokens(enc.preprocess(torch.randint(0, 256, (3, 50, 90)).float())[None])
    assert tokens.shape[1] == 1 + (72 // 16) ** 2


def test_a_tower_without_token_map_is_refused():
    model = build_open_clip("tiny", input_size=64)
    model.visual = open_clip.modified_resnet.ModifiedResNet((1, 1, 1, 1), 48, heads=2, image_size=64, width=64)
    with pytest.raises(ValueError, match="MODEL.REGIONSPOT.CLIP.NAME.*ModifiedResNet"):
        OpenClipImageTextEncoder(model, "tiny", 64)


# ------------------------------------------------------------------------------------ text
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_text_is_encoded_as_open_clip_encodes_it(name):
    enc = _encoder(name)
    prompts = ["a photo of a cat.", "a dog", "a very long prompt " * 30]  # the last one is truncated
    tokenizer = open_clip.get_tokenizer(open_clip_architecture(name))
    want = enc.clip_model.encode_text(tokenizer(prompts))
    got = enc.encode_text(prompts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == (3, enc.text_dim)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(3))  # not normalised, as the clip backend
    assert enc.logit_scale.item() == pytest.approx(enc.clip_model.logit_scale.exp().item())
    assert enc.tokenizer.context_length == enc.clip_model.context_length


def test_a_tokenizer_that_cannot_be_loaded_names_the_model(monkeypatch):
    enc = _encoder("tiny")

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip, "get_tokenizer", unreachable)
    with pytest.raises(RuntimeError, match="tokenizer of open_clip 'tiny' .MODEL.REGIONSPOT.CLIP.NAME.*connect"):
        enc.encode_text(["a cat"])


def test_fingerprints_tell_models_apart():
    a, b = _encoder("tiny"), _encoder("tiny", seed=1)
    assert a.text_fingerprint() == _encoder("tiny").text_fingerprint()  # seeded: the same random model
    assert len({a.text_fingerprint(), b.text_fingerprint(), _encoder("tiny-timm").text_fingerprint()}) == 3
    clip_tiny = build_model(tiny_cfg()).clip_encoder
    assert isinstance(clip_tiny, ClipImageTextEncoder)
    assert clip_tiny.text_fingerprint() != a.text_fingerprint()
    # The same weights under another name (so another tokenizer, or e.g. QuickGELU instead of
    # GELU) give other embeddings: another fingerprint.
    assert OpenClipImageTextEncoder(a.clip_model, "tiny-timm", 64).text_fingerprint() != a.text_fingerprint()


# ------------------------------------------------------------------------------------ preprocess
@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 480, 640), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("mode,antialias", [("bilinear", False), ("bilinear", True), ("bicubic", True)])
@pytest.mark.parametrize("stats", ["model", "siglip"])
def test_preprocess_squashes_and_uses_the_models_mean_and_std(image, mode, antialias, stats):
    model = build_open_clip("tiny", input_size=128)
    if stats == "siglip":  # what open_clip sets for SigLIP's webli weights
        cfg = open_clip.get_model_preprocess_cfg(model)
        siglip = pretrained_preprocess_cfg("ViT-SO400M-14-SigLIP-384", "webli")
        open_clip.set_model_preprocess_cfg(model, dict(cfg, **siglip))
    mean, std = (torch.tensor(open_clip.get_model_preprocess_cfg(model)[k]).view(3, 1, 1) for k in ("mean", "std"))
    assert torch.allclose(mean, torch.tensor(0.5)) == (stats == "siglip")
    enc = OpenClipImageTextEncoder(model, "tiny", 128, resize_mode=mode, antialias=antialias)
    interp = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}[mode]
    want = (TF.resize(image.float() / 255, [128, 128], interpolation=interp, antialias=antialias) - mean) / std
    torch.testing.assert_close(enc.preprocess(image), want, rtol=1e-5, atol=1e-5)


def test_the_pretrained_tags_give_the_normalisation_of_weight_files():
    siglip = pretrained_preprocess_cfg("ViT-SO400M-14-SigLIP-384")  # no tag: the one its tags share
    assert siglip == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    dfn = pretrained_preprocess_cfg("ViT-L-14-quickgelu", "dfn2b")
    assert dfn == {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    assert pretrained_preprocess_cfg("regionspot-tiny") == {}  # no tags: open_clip's default


# ------------------------------------------------------------------------------------ building
def test_unknown_names_and_tags_are_refused_with_valid_ones():
    with pytest.raises(ValueError, match=r"MODEL.REGIONSPOT.CLIP.NAME.*did you mean.*ViT-L-14-quickgelu"):
        build_open_clip("ViT-L-14-quickgel")
    with pytest.raises(ValueError, match=r"MODEL.REGIONSPOT.CLIP.PRETRAINED.*dfn2b"):
        build_open_clip("ViT-L-14-quickgelu", pretrained="webli")
    with pytest.raises(ValueError, match="MODEL.REGIONSPOT.CLIP.RESIZE_MODE"):
        build_clip_encoder(tiny_cfg("MODEL.REGIONSPOT.CLIP.BACKEND", "open_clip",
                                    "MODEL.REGIONSPOT.CLIP.RESIZE_MODE", "nearest"))


def test_a_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now fails
    with pytest.raises(MissingExtraError, match=r"CLIP.BACKEND open_clip.*regionspot\[open_clip\]"):
        build_clip_encoder(tiny_cfg("MODEL.REGIONSPOT.CLIP.BACKEND", "open_clip"))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


NATIVE = {"tiny": 64, "tiny-timm": 160}  # their configs' image sizes


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("compressed", [False, True])
def test_checkpoint_file_loads_the_same_weights(name, compressed, tmp_path):
    saved = build_open_clip(name, seed=5)  # as released: at the native size
    path = tmp_path / "weights.pth"
    torch.save(saved.state_dict(), path)
    if compressed:
        path = tmp_path / "weights.pth.gz"
        path.write_bytes(gzip.compress((tmp_path / "weights.pth").read_bytes()))
    cfg = tiny_cfg("MODEL.REGIONSPOT.CLIP.BACKEND", "open_clip", "MODEL.REGIONSPOT.CLIP.NAME", name,
                   "MODEL.REGIONSPOT.CLIP.INPUT_SIZE", str(NATIVE[name]), KEY, str(path))
    enc = build_clip_encoder(cfg)
    assert isinstance(enc, OpenClipImageTextEncoder)
    assert _same_weights(enc.clip_model, saved)
    assert not _same_weights(build_open_clip(name), saved)  # seed 0 differs: a real check


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_at_another_input_size_is_resampled(name, tmp_path):
    saved = build_open_clip(name, seed=5)
    torch.save(saved.state_dict(), tmp_path / "w.pth")
    model = build_open_clip(name, checkpoint=str(tmp_path / "w.pth"), input_size=96)
    a, b = model.state_dict(), saved.state_dict()
    pos = "visual.positional_embedding" if name == "tiny" else "visual.trunk.pos_embed"
    assert a[pos].shape[-2:] == (1 + 6 * 6, 96) != b[pos].shape[-2:]  # 6 x 6 patches and the prefix token
    assert all(torch.equal(a[k], b[k]) for k in a if k != pos)  # everything else as in the file
    tokens = OpenClipImageTextEncoder(model, name, 96).encode_image_tokens(torch.randn(1, 3, 96, 96))
    assert tokens.shape == (1, 1 + 6 * 6, 96)


def test_bad_checkpoints_name_the_key_and_the_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(1000))
    other = tmp_path / "other.pth"  # weights of another model
    torch.save(build_open_clip("tiny-timm").state_dict(), other)
    for path in (junk, other):
        with pytest.raises(RuntimeError, match=f"{path} .{KEY}.*'tiny' .MODEL.REGIONSPOT.CLIP.NAME"):
            build_open_clip("tiny", checkpoint=str(path), input_size=64)
    with pytest.raises(FileNotFoundError, match=KEY):
        build_open_clip("tiny", checkpoint=str(tmp_path / "missing.pth"), input_size=64)


def test_checkpoint_url_is_downloaded_and_cached(tmp_path, http_root):
    served, base, stop = http_root
    saved = build_open_clip("tiny", input_size=64, seed=7)
    torch.save(saved.state_dict(), served / "tiny_open_clip.pth")
    url = f"{base}/weights/tiny_open_clip.pth"
    with pytest.raises(RuntimeError, match=f"{KEY}.*{url}.*404"):
        build_open_clip("tiny", checkpoint=url, input_size=64)
    os.makedirs(served / "weights")
    os.replace(served / "tiny_open_clip.pth", served / "weights" / "tiny_open_clip.pth")
    assert _same_weights(build_open_clip("tiny", checkpoint=url, input_size=64), saved)
    stop()
    # Cached: a second build needs no server.
    assert _same_weights(build_open_clip("tiny", checkpoint=url, input_size=64), saved)
    assert os.path.isfile(tmp_path / "iopath_cache" / "weights" / "tiny_open_clip.pth")


# ------------------------------------------------------------------------------------ RegionSpot
def _open_clip_cfg(*opts):
    return tiny_cfg("MODEL.REGIONSPOT.CLIP.BACKEND", "open_clip", *opts)


def test_regionspot_on_open_clip_infers_and_trains(synthetic_val):
    cfg = _open_clip_cfg("MODEL.REGIONSPOT.TOKEN_MODE", "online")
    model = build_model(cfg)
    enc = model.clip_encoder
    assert isinstance(enc, OpenClipImageTextEncoder)
    # The head's widths come from the encoder (96 and 48: not the clip tiny's 64 and 32).
    assert (enc.width, enc.text_dim) == (96, 48)
    assert (model.head.to_clip.out_features, model.head.projector.out_features) == (enc.width, enc.text_dim)

    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    inputs = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:2]]
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    for out in outputs:
        inst = out["instances"].to("cpu")
        assert len(inst) > 0 and torch.isfinite(inst.scores).all()
        assert inst.has("pred_masks") and inst.has("pred_classes")

    model.train()
    train_inputs = [RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=synthetic_val)(d)
                    for d in DatasetCatalog.get(synthetic_val)[:2]]
    with EventStorage():
        loss = model(train_inputs)["loss_focal"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


def test_vocabulary_cache_keeps_clip_and_open_clip_apart(tmp_path):
    names = ["red circle", "blue square"]
    models = {"clip": build_model(tiny_cfg()), "open_clip": build_model(_open_clip_cfg())}
    emb = {k: m.vocabulary.embeddings(names)[1] for k, m in models.items()}
    assert emb["clip"].shape == (2, 32) and emb["open_clip"].shape == (2, 48)
    files = sorted((tmp_path / "cache" / "text").glob("*.pth"))  # REGIONSPOT_CACHE (conftest)
    assert len(files) == 2
    fingerprints = {load_embedding_file(str(f))["clip"] for f in files}
    assert fingerprints == {m.clip_encoder.text_fingerprint() for m in models.values()}
    # A fresh open_clip model reads its own entry back, not the clip one.
    again = build_model(_open_clip_cfg()).vocabulary.embeddings(names)[1]
    torch.testing.assert_close(again, emb["open_clip"])
    assert len(list((tmp_path / "cache" / "text").glob("*.pth"))) == 2


def _fake_tag(monkeypatch, **cfg):
    """Register a pretrained tag "fake" for the tiny model (the real tags belong to real models)."""
    import open_clip.pretrained as ocp

    tag = {"url": "", "hf_hub": "", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "quick_gelu": False, **cfg}
    monkeypatch.setitem(ocp._PRETRAINED, "regionspot-tiny", {"fake": tag})


def test_a_checkpoint_file_is_normalised_with_its_tags_mean_and_std(monkeypatch, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(build_open_clip("tiny", checkpoint="random").state_dict(), path)
    plain = OpenClipImageTextEncoder(build_open_clip("tiny", checkpoint=str(path)), "tiny", 64)
    _fake_tag(monkeypatch)
    tagged = OpenClipImageTextEncoder(build_open_clip("tiny", pretrained="fake", checkpoint=str(path)), "tiny", 64)
    torch.testing.assert_close(tagged.pixel_mean.flatten(), torch.full((3,), 0.5 * 255))
    torch.testing.assert_close(tagged.pixel_std.flatten(), torch.full((3,), 0.5 * 255))
    assert not torch.allclose(plain.pixel_mean, tagged.pixel_mean)  # the tag, not a default, decided


def test_a_quickgelu_tag_under_a_plain_gelu_name_is_refused(monkeypatch, tmp_path):
    _fake_tag(monkeypatch, **{"quick_gelu": True})
    with pytest.raises(ValueError, match=r"CLIP.PRETRAINED.*QuickGELU.*regionspot-tiny-quickgelu"):
        build_open_clip("tiny", pretrained="fake", checkpoint="random")


def test_a_real_model_without_weights_is_refused_not_randomly_initialised():
    with pytest.raises(ValueError, match=r"CLIP.PRETRAINED.*dfn2b.*CLIP.CHECKPOINT"):
        build_open_clip("ViT-L-14-quickgelu")


def test_a_pretrained_tag_needs_the_open_clip_backend():
    from regionspot.config import check_regionspot_config

    with pytest.raises(ValueError, match=r"CLIP.PRETRAINED.*CLIP.BACKEND"):
        check_regionspot_config(tiny_cfg("MODEL.REGIONSPOT.CLIP.PRETRAINED", "dfn2b"))
