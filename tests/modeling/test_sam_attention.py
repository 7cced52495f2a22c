"""The fused attention forward gives SAM's own outputs (rel-pos, windowed and global blocks)."""
import copy
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from regionspot.modeling.encoders.sam_attention import use_fused_attention


def _encoder(use_rel_pos: bool) -> ImageEncoderViT:
    torch.manual_seed(0)
    enc = ImageEncoderViT(
        img_size=128, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0, out_chans=32,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=use_rel_pos,
        window_size=3, global_attn_indexes=(1,),  # windowed (padded 8 -> 9), global, windowed
    ).eval()
    if use_rel_pos:  # zero-initialised in SAM; make them matter
        for m in enc.modules():
            if hasattr(m, "rel_pos_h"):
                nn.init.normal_(m.rel_pos_h, std=0.5)
                nn.init.normal_(m.rel_pos_w, std=0.5)
    return enc


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_fused_attention_matches_sam(use_rel_pos):
    plain = _encoder(use_rel_pos)
    fused = copy.deepcopy(plain)
    assert use_fused_attention(fused) == 3
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a, b = plain(x), fused(x)
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    if use_rel_pos:  # the relative positions really change the result, so the check covers them
        without = copy.deepcopy(plain)
        for m in without.modules():
            if hasattr(m, "rel_pos_h"):
                m.rel_pos_h.data.zero_()
                m.rel_pos_w.data.zero_()
        with torch.no_grad():
            assert not torch.allclose(without(x), a, atol=1e-3)


def test_fused_attention_under_bf16_autocast_stays_close():
    plain = _encoder(True)
    fused = copy.deepcopy(plain)
    use_fused_attention(fused)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(x).float(), fused(x).float()
    # bf16 keeps ~3 significant digits; both paths round differently, so compare by cosine.
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cos > 0.99
