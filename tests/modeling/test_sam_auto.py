"""SAM's automatic mask generator reuses RegionSpot's image embedding instead of encoding again."""
import numpy as np
import torch
from detectron2.modeling import build_model
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from regionspot.modeling.encoders.sam_encoder import SamRegionEncoder, build_tiny_sam

from conftest import tiny_cfg

PARAMS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _image(seed=0):
    g = np.random.RandomState(seed)
    img = (g.rand(96, 128, 3) * 60 + 90).astype(np.uint8)
    img[20:60, 30:80] = (220, 30, 30)
    return img


def test_auto_boxes_from_sams_own_embedding_equal_the_plain_generator():
    torch.manual_seed(0)
    enc = SamRegionEncoder(build_tiny_sam()).eval()
    rgb = _image()
    plain = SamAutomaticMaskGenerator(enc.sam, **PARAMS).generate(rgb)
    want = torch.tensor([r["bbox"] for r in plain], dtype=torch.float32).view(-1, 4)
    want[:, 2:] += want[:, :2]
    assert len(want) > 0
    predictor = SamPredictor(enc.sam)
    predictor.set_image(rgb)  # SAM's own preprocessing and embedding
    got = enc.auto_boxes(torch.from_numpy(rgb).permute(2, 0, 1), predictor.features[0],
                         predictor.input_size, PARAMS)
    torch.testing.assert_close(got, want)


def test_sam_auto_inference_encodes_each_image_once():
    cfg = tiny_cfg("MODEL.REGIONSPOT.PROMPT", "sam_auto", "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", 4,
                   "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", 0.0,
                   "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", 0.0,
                   "MODEL.REGIONSPOT.VOCABULARY", "custom", "MODEL.REGIONSPOT.CUSTOM_VOCABULARY", "['a', 'b']")
    model = build_model(cfg).eval()
    calls = []
    encoder = model.sam_encoder.sam.image_encoder
    encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    inputs = [{"image": torch.from_numpy(_image(s)).permute(2, 0, 1), "image_id": s} for s in range(2)]
    out = model(inputs)
    assert sum(calls) == 2  # one encoder pass per image, shared by the generator and the prompts
    assert all(len(o["instances"]) > 0 for o in out)
