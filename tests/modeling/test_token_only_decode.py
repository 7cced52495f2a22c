"""Decoding without masks stops at the region token: the same tokens, bit for bit, no logits."""
import pytest
import torch

from regionspot.modeling.encoders.sam2_encoder import Sam2RegionEncoder, build_sam2_model
from regionspot.modeling.encoders.sam_encoder import SamRegionEncoder, build_tiny_sam


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {"tiny": SamRegionEncoder(build_tiny_sam(), decode_chunk=3).eval(),
            "sam2_tiny": Sam2RegionEncoder(build_sam2_model("sam2_tiny"), decode_chunk=3).eval()}


def _embedding(enc, size):
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        pre, _ = enc.preprocess(image)
        return enc.encode_images(pre[None])[0]


@pytest.mark.parametrize("family", ["tiny", "sam2_tiny"])
@pytest.mark.parametrize("prompt", ["boxes", "points", "both", "one box"])
def test_tokens_without_masks_are_the_same_tokens(encoders, family, prompt):
    enc, size = encoders[family], (150, 210)
    emb = _embedding(enc, size)
    g = torch.Generator().manual_seed(2)
    n = 1 if prompt == "one box" else 7  # 7 prompts: chunks of 3, 3 and 1 (a batch of one repeats no image)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([150.0, 100.0])
    kwargs = {}
    if prompt in ("boxes", "both", "one box"):
        kwargs["boxes"] = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 40], dim=1)
    if prompt in ("points", "both"):
        kwargs["points"] = torch.rand(n, 2, 2, generator=g) * torch.tensor([210.0, 150.0])
        kwargs["point_labels"] = torch.tensor([[1, 0]]).repeat(n, 1)
    with torch.no_grad():
        tokens, low_res = enc.decode_prompts(emb, size, **kwargs)
        only, none = enc.decode_prompts(emb, size, masks=False, **kwargs)
    assert none is None and low_res.shape[0] == n
    assert tokens.shape == only.shape == (n, enc.token_dim)
    assert torch.equal(tokens, only)


@pytest.mark.parametrize("family", ["tiny", "sam2_tiny"])
def test_no_prompts_without_masks(encoders, family):
    enc = encoders[family]
    tokens, low_res = enc.decode_boxes(_embedding(enc, (64, 64)), torch.zeros(0, 4), (64, 64), masks=False)
    assert tokens.shape == (0, enc.token_dim) and low_res is None
