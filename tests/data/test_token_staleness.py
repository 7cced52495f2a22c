"""Cached SAM tokens are tied to the SAM weights that made them."""
import pytest
from detectron2.data import DatasetCatalog

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.modeling.encoders import build_sam_encoder
from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis
from regionspot.data.token_cache import CorruptTokenFile
from regionspot.data.token_extraction import extract_tokens

from conftest import tiny_cfg


def test_tokens_of_other_sam_weights_are_redone_and_refused(tmp_path):
    name = "test_staleness_sam"
    json_path = make_synthetic_lvis(str(tmp_path / "data"), "train", num_images=3, seed=5)
    register_synthetic_lvis(name, json_path, str(tmp_path / "data"))
    try:
        root = str(tmp_path / "tokens")
        seed0 = tiny_cfg("MODEL.REGIONSPOT.TOKEN_MODE", "cached", "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", root,
                         "INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "256")
        seed1 = seed0.clone()
        seed1.MODEL.REGIONSPOT.RANDOM_INIT_SEED = 1
        first = extract_tokens(build_sam_encoder(seed0), seed0, name, root)
        assert (first.images, first.skipped) == (3, 0)
        d = DatasetCatalog.get(name)[0]
        RegionSpotDatasetMapper(seed0, is_train=True, dataset_name=name)(d)  # matching SAM: accepted
        with pytest.raises(CorruptTokenFile, match="other SAM weights"):
            RegionSpotDatasetMapper(seed1, is_train=True, dataset_name=name)(d)
        # Another SAM redoes every file; the same SAM again skips them all.
        again = extract_tokens(build_sam_encoder(seed1), seed1, name, root)
        assert (again.images, again.skipped) == (3, 0)
        same = extract_tokens(build_sam_encoder(seed1), seed1, name, root)
        assert (same.images, same.skipped) == (0, 3)
        RegionSpotDatasetMapper(seed1, is_train=True, dataset_name=name)(d)
    finally:
        DatasetCatalog.remove(name)
