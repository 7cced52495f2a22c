"""MODEL.REGIONSPOT.COMPILE: torch.compile'd frozen networks give the eager model's detections."""
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper

from conftest import tiny_cfg


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="MODEL.REGIONSPOT.COMPILE"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.COMPILE", "fastest"))


@pytest.mark.parametrize("autocast", ["", "bf16"])
def test_compiled_model_gives_the_eager_detections(synthetic_val, autocast):
    cfg = tiny_cfg("MODEL.REGIONSPOT.AUTOCAST", autocast)
    eager = build_model(cfg).eval()
    compiled = build_model(tiny_cfg("MODEL.REGIONSPOT.AUTOCAST", autocast, "MODEL.REGIONSPOT.COMPILE", "default")).eval()
    # Compiling keeps parameter names: checkpoints (here the eager model's head) load unchanged.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    decoder = compiled.sam_encoder.sam.mask_decoder
    # Under autocast the decoder is compiled in parts (see compile_frozen), else whole.
    decoder_parts = [decoder.transformer, decoder.output_upscaling] if autocast else [decoder]
    for module in [compiled.sam_encoder.sam.image_encoder, *decoder_parts,
                   compiled.clip_encoder.clip_model.visual.transformer]:
        assert module._compiled_call_impl is not None
    assert (decoder._compiled_call_impl is None) == bool(autocast)

    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    inputs = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:3]]
    # One batch of two, then one of one: a new batch size must not break the compiled graphs.
    for batch in (inputs[:2], inputs[2:]):
        want = [r["instances"] for r in eager(batch)]
        got = [r["instances"] for r in compiled(batch)]
        for a, b in zip(want, got):
            assert len(a) == len(b) > 0
            pa, pb = _pairs(a), _pairs(b)  # by (box, class): near-ties may swap places in the ranking
            assert set(pa) == set(pb)
            assert max(abs(pa[k][0] - pb[k][0]) for k in pa) < (1e-5 if not autocast else 2e-2)
            assert torch.isfinite(b.scores).all()
            ma = {k: a.pred_masks.tensor[i] for k, (_, i) in pa.items()}
            mb = {k: b.pred_masks.tensor[i] for k, (_, i) in pb.items()}
            # bf16 rounds differently in fused kernels: pixels near the threshold may flip.
            assert max((ma[k] != mb[k]).float().mean().item() for k in pa) < (1e-3 if not autocast else 1e-2)


def _pairs(instances):
    """{(rounded box, class): (score, row)} of one image's detections."""
    return {
        (tuple(round(v, 2) for v in box), int(c)): (float(s), i)
        for i, (box, c, s) in enumerate(zip(instances.pred_boxes.tensor.tolist(),
                                            instances.pred_classes.tolist(), instances.scores.tolist()))
    }
