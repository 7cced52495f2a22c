from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper

from conftest import tiny_cfg


def test_inference_outputs_have_fields_at_original_size(synthetic_val):
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    inputs = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:2]]
    outputs = model(inputs)
    for inp, out in zip(inputs, outputs):
        inst = out["instances"]
        assert inst.image_size == (inp["height"], inp["width"])
        n_boxes = len(inp["instances"])
        assert len(inst) == min(300, n_boxes * 6)
        assert inst.pred_masks.shape == (len(inst), inp["height"], inp["width"])
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
