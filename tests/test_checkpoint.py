"""Checkpoints: the original release's layout, reports of what is missing, errors, saving, and
the SAM / CLIP weight files (local paths and http URLs)."""
import logging
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.modeling.encoders.clip_encoder import build_clip
from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.modeling.encoders.sam_encoder import build_sam

from conftest import tiny_cfg

# Our module names -> the original release's (DESIGN.md, "Compatibility"), written out here on
# purpose rather than taken from regionspot.checkpoint.
OURS_TO_ORIGINAL = (
    ("sam_encoder.sam.", "model.sam."),
    ("clip_encoder.clip_model.", "model.clip_model."),
    ("head.", "model."),
)
FROZEN = ("sam_encoder.", "clip_encoder.")


def original_head_keys(num_layers=3):
    """The head keys of an original checkpoint, exactly as DESIGN.md lists them."""
    keys = {f"model.{m}.{p}" for m in ("to_clip", "projector", "decoder.norm") for p in ("weight", "bias")}
    for i in range(num_layers):
        pre = f"model.decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            keys |= {f"{pre}{attn}.{p}" for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
        for m in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            keys |= {f"{pre}{m}.weight", f"{pre}{m}.bias"}
    return keys


def to_original(state, with_frozen):
    out = {}
    for k, v in state.items():
        if not with_frozen and k.startswith(FROZEN):
            continue
        for ours, theirs in OURS_TO_ORIGINAL:
            if k.startswith(ours):
                out[theirs + k[len(ours):]] = v.clone()
                break
        else:
            raise AssertionError(f"unmapped key {k}")
    return out


def build(seed, *opts):
    """A tiny model whose head and random encoders all come from `seed`."""
    torch.manual_seed(seed)
    return build_model(tiny_cfg("MODEL.REGIONSPOT.RANDOM_INIT_SEED", seed, *opts)).eval()


@pytest.fixture(scope="module")
def inputs(synthetic_val):
    mapper = RegionSpotDatasetMapper(tiny_cfg(), is_train=False, dataset_name=synthetic_val)
    return [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:3]]


def run(model, inputs):
    return [model([x])[0]["instances"] for x in inputs]


def assert_same_outputs(a, b):
    for ia, ib in zip(a, b):
        assert len(ia) == len(ib) > 0
        assert torch.equal(ia.pred_boxes.tensor, ib.pred_boxes.tensor)
        assert torch.equal(ia.pred_classes, ib.pred_classes)
        assert torch.equal(ia.scores, ib.scores)
        assert torch.equal(ia.pred_masks.tensor, ib.pred_masks.tensor)


def assert_state_equal(model, reference, prefixes):
    ref = reference.state_dict()
    keys = [k for k in model.state_dict() if k.startswith(prefixes)]
    assert keys
    for k in keys:
        assert torch.equal(model.state_dict()[k], ref[k]), k


def differs(a, b, prefix):
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


# ---------------------------------------------------------------------------------- layout
def test_head_key_names_match_the_original_layout():
    model = build(0)
    head = {k for k in to_original(model.state_dict(), with_frozen=False)}
    assert head == original_head_keys(model.head.decoder.num_layers)


def test_original_checkpoint_with_frozen_weights_loads_everything(tmp_path, inputs):
    src, dst = build(1), build(2)
    assert differs(src, dst, "head.") and differs(src, dst, "sam_encoder.") and differs(src, dst, "clip_encoder.")
    state = to_original(src.state_dict(), with_frozen=True)
    assert any(k.startswith("model.sam.") for k in state) and any(k.startswith("model.clip_model.") for k in state)
    # OpenAI's JIT-derived CLIP state dicts also carry these integers.
    for meta in ("input_resolution", "context_length", "vocab_size"):
        state[f"model.clip_model.{meta}"] = torch.tensor(7)
    path = tmp_path / "regionspot_original.pth"
    torch.save({"model": state, "iteration": 123}, path)

    checkpointer = RegionSpotCheckpointer(dst)
    incompatible = checkpointer._load_model({"model": dict(state)})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes

    dst = build(3)
    RegionSpotCheckpointer(dst).load(str(path))
    assert_state_equal(dst, src, ("head.", "sam_encoder.", "clip_encoder."))
    assert_same_outputs(run(src, inputs), run(dst, inputs))


def test_original_head_only_checkpoint_keeps_configured_frozen_weights(tmp_path, inputs):
    src = build(1)
    sam_file = tmp_path / "sam_tiny.pth"
    torch.save(src.sam_encoder.sam.state_dict(), sam_file)
    opts = ("MODEL.REGIONSPOT.SAM.CHECKPOINT", str(sam_file))

    def fresh(seed):
        # SAM from its configured file; CLIP given the same weights directly (CLIP files are
        # covered by test_clip_weights_from_path_and_url).
        model = build(seed, *opts)
        model.clip_encoder.load_state_dict(src.clip_encoder.state_dict())
        return model

    dst = fresh(2)
    assert differs(src, dst, "head.")
    assert_state_equal(dst, src, FROZEN)

    state = to_original(src.state_dict(), with_frozen=False)
    assert not any(k.startswith(("model.sam.", "model.clip_model.")) for k in state)
    incompatible = RegionSpotCheckpointer(fresh(4))._load_model({"model": dict(state)})
    # Frozen weights are not "missing" from a head-only file.
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    path = tmp_path / "head_only.pth"
    torch.save({"model": state}, path)
    RegionSpotCheckpointer(dst).load(str(path))
    assert_state_equal(dst, src, ("head.", "sam_encoder.", "clip_encoder."))
    assert_same_outputs(run(src, inputs), run(dst, inputs))


def test_loading_weights_into_a_model_that_already_ran(tmp_path, inputs):
    # A model that has run (and so has encoded its vocabulary with its CLIP) then loads a file
    # with other CLIP weights: its outputs must be those of the file's model, not use stale text.
    src, dst = build(1), build(2)
    run(dst, inputs[:1])
    path = tmp_path / "with_frozen.pth"
    torch.save({"model": to_original(src.state_dict(), with_frozen=True)}, path)
    RegionSpotCheckpointer(dst).load(str(path))
    names_src, text_src = src.text_embeddings(inputs[0]["vocabulary"])
    names_dst, text_dst = dst.text_embeddings(inputs[0]["vocabulary"])
    assert names_src == names_dst
    assert torch.equal(text_src, text_dst)
    assert_same_outputs(run(src, inputs), run(dst, inputs))


# ---------------------------------------------------------------------------------- reports
def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog):
    # A head weight missing from the file is an error (tested in test_bad_input.py) unless a
    # random head is allowed; then it is reported, as are unexpected keys.
    src, dst = build(1), build(2)
    state = to_original(src.state_dict(), with_frozen=False)
    del state["model.to_clip.bias"]
    state["model.extra_branch.weight"] = torch.zeros(3)
    incompatible = RegionSpotCheckpointer(dst, allow_random_head=True)._load_model({"model": dict(state)})
    assert incompatible.missing_keys == ["head.to_clip.bias"]
    assert "model.extra_branch.weight" in incompatible.unexpected_keys

    # The same through load(), as train_net uses it: the log names the missing head weight.
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    dst = build(3)
    checkpointer = RegionSpotCheckpointer(dst, allow_random_head=True)
    checkpointer.logger.addHandler(caplog.handler)  # detectron2's setup_logger may stop propagation
    try:
        with caplog.at_level(logging.INFO):
            checkpointer.load(str(path))
    finally:
        checkpointer.logger.removeHandler(caplog.handler)
    log = caplog.text
    assert "head.to_clip.bias" in log
    assert "extra_branch" in log
    # Everything else was loaded.
    assert torch.equal(dst.head.to_clip.weight, src.head.to_clip.weight)
    assert not torch.equal(dst.head.to_clip.bias, src.head.to_clip.bias)


def test_missing_frozen_key_is_reported_when_the_file_has_frozen_weights():
    src, dst = build(1), build(2)
    state = to_original(src.state_dict(), with_frozen=True)
    sam_key = next(k for k in state if k.startswith("model.sam.mask_decoder."))
    del state[sam_key]
    incompatible = RegionSpotCheckpointer(dst)._load_model({"model": state})
    assert incompatible.missing_keys == ["sam_encoder.sam." + sam_key[len("model.sam."):]]


# ---------------------------------------------------------------------------------- errors
def test_missing_checkpoint_file_is_named(tmp_path):
    path = str(tmp_path / "nowhere" / "model_final.pth")
    with pytest.raises(FileNotFoundError, match="model_final.pth") as e:
        RegionSpotCheckpointer(build(0)).resume_or_load(path, resume=False)
    assert path in str(e.value)


def test_truncated_checkpoint_is_named(tmp_path):
    model = build(0)
    path = tmp_path / "truncated.pth"
    torch.save({"model": to_original(model.state_dict(), with_frozen=True)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((RuntimeError, OSError, ValueError)) as e:
        RegionSpotCheckpointer(model).load(str(path))
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------- saving
def test_save_writes_the_head_only_and_reloads(tmp_path):
    src = build(1)
    RegionSpotCheckpointer(src, save_dir=str(tmp_path)).save("model_test")
    path = tmp_path / "model_test.pth"
    saved = torch.load(path, map_location="cpu", weights_only=False)["model"]
    assert not [k for k in saved if k.startswith(FROZEN)]
    assert set(saved) == {k for k in src.state_dict() if k.startswith("head.")}
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_test.pth"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    dst = build(2)
    assert differs(src, dst, "head.")
    frozen_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith(FROZEN)}
    RegionSpotCheckpointer(dst, save_dir=str(tmp_path)).resume_or_load("", resume=True)  # last_checkpoint
    assert_state_equal(dst, src, ("head.",))
    for k, v in frozen_before.items():
        assert torch.equal(dst.state_dict()[k], v), k

    RegionSpotCheckpointer(src, save_dir=str(tmp_path), save_frozen=True).save("model_full")
    full = torch.load(tmp_path / "model_full.pth", map_location="cpu", weights_only=False)["model"]
    assert any(k.startswith("sam_encoder.") for k in full) and any(k.startswith("clip_encoder.") for k in full)


# ---------------------------------------------------------------------------------- SAM / CLIP files
def test_sam_weights_from_path_and_url(tmp_path, http_root):
    folder, base, stop = http_root
    reference = build_sam("tiny", "random", seed=11).state_dict()
    torch.save(reference, folder / "sam_tiny.pth")
    assert any(not torch.equal(v, reference[k]) for k, v in build_sam("tiny", "random", seed=12).state_dict().items())

    def check(sam):
        state = sam.state_dict()
        assert set(state) == set(reference)
        for k in reference:
            assert torch.equal(state[k], reference[k]), k

    check(build_sam("tiny", str(folder / "sam_tiny.pth")))
    url = f"{base}/sam_tiny.pth"
    check(build_sam("tiny", url))
    cached = list((tmp_path / "iopath_cache").rglob("sam_tiny.pth"))
    assert len(cached) == 1

    stop()
    check(build_sam("tiny", url))  # from the disk cache: the server is gone
    with pytest.raises(RuntimeError, match="never_served.pth"):
        build_sam("tiny", f"{base}/never_served.pth")


def test_clip_weights_from_path_and_url(tmp_path, http_root):
    folder, base, stop = http_root
    reference = build_clip("tiny", "random", seed=21).state_dict()
    # OpenAI's CLIP files hold fp16 weights, and the clip package loads them through fp16.
    torch.save({k: v.half() for k, v in reference.items()}, folder / "clip_tiny.pt")
    reference = {k: v.half().float() for k, v in reference.items()}

    def check(model):
        state = model.state_dict()
        assert set(state) == set(reference)
        for k in reference:
            assert state[k].dtype == torch.float32, k
            assert torch.equal(state[k], reference[k]), k

    check(build_clip("tiny", str(folder / "clip_tiny.pt")))
    url = f"{base}/clip_tiny.pt"
    check(build_clip("tiny", url))
    assert len(list((tmp_path / "iopath_cache").rglob("clip_tiny.pt"))) == 1
    stop()
    check(build_clip("tiny", url))  # from the disk cache: the server is gone


def test_unknown_sam_type_and_clip_name_are_named():
    with pytest.raises(ValueError, match="vit_q"):
        build_sam("vit_q", "random")
    with pytest.raises(ValueError, match="ViT-Q/99"):
        build_clip("ViT-Q/99", "random")
    with pytest.raises(ValueError, match="vit_q"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.SAM.TYPE", "vit_q"))


def test_corrupt_or_missing_encoder_files_are_named(tmp_path):
    garbage = tmp_path / "sam_garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(RuntimeError, match="sam_garbage.pth"):
        build_sam("tiny", str(garbage))

    torch.manual_seed(0)
    truncated = tmp_path / "sam_truncated.pth"
    torch.save(build_sam("tiny", "random").state_dict(), truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="sam_truncated.pth"):
        build_sam("tiny", str(truncated))

    # A readable file of another model is refused too, not half-loaded.
    other = tmp_path / "not_sam.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(RuntimeError, match="not_sam.pth"):
        build_sam("tiny", str(other))

    with pytest.raises(FileNotFoundError, match="no_such_sam.pth"):
        build_sam("tiny", str(tmp_path / "no_such_sam.pth"))

    bad_clip = tmp_path / "clip_garbage.pt"
    bad_clip.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(RuntimeError, match="clip_garbage.pt"):
        build_clip("tiny", str(bad_clip))
