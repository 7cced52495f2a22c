"""The fusion head: the stock nn.TransformerDecoder's weights and outputs, attention memory linear in
the regions (its self-attention through scaled_dot_product_attention, no mask when nothing is padded)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regionspot.head import RegionSpotHead

W, HEADS, TOKEN, TEXT = 64, 8, 32, 48


def _heads(dropout=0.1):
    """Our head and one whose decoder is the stock nn.TransformerDecoder, with the same weights."""
    torch.manual_seed(0)
    ours = RegionSpotHead(token_dim=TOKEN, clip_width=W, text_dim=TEXT, num_layers=3, num_heads=HEADS,
                          dim_feedforward=96, dropout=dropout)
    stock = copy.deepcopy(ours)
    layer = nn.TransformerDecoderLayer(W, HEADS, 96, dropout, activation="relu", batch_first=True)
    stock.decoder = nn.TransformerDecoder(layer, num_layers=3, norm=nn.LayerNorm(W))
    stock.load_state_dict(ours.state_dict())  # strict: the same keys and shapes
    return ours, stock


def test_state_dict_keys_are_the_released_ones():
    ours, stock = _heads()
    assert list(ours.state_dict()) == list(stock.state_dict())
    for i in range(3):
        for name in ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                     "self_attn.out_proj.bias", "multihead_attn.in_proj_weight", "linear1.weight",
                     "linear2.bias", "norm1.weight", "norm2.bias", "norm3.weight"):
            assert f"decoder.layers.{i}.{name}" in ours.state_dict()
    assert "decoder.norm.weight" in ours.state_dict()


@pytest.mark.parametrize("padded", [False, True])
def test_outputs_equal_the_stock_decoder_in_eval_mode(padded):
    ours, stock = _heads()
    ours.eval(), stock.eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 7, TOKEN, generator=g)
    clip_tokens = torch.randn(3, 5, W, generator=g)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    if padded:
        mask[1, 4:] = True
        mask[2, 1:] = True
        tokens[mask] = 1e3  # padding content must not leak into real regions
    with torch.no_grad():
        a, b = ours(tokens, clip_tokens, mask), stock(tokens, clip_tokens, mask)
    keep = ~mask
    assert torch.allclose(a[keep], b[keep], atol=1e-5), (a[keep] - b[keep]).abs().max()
    if padded:  # real regions do not see the padding: the same image alone gives the same embeddings
        with torch.no_grad():
            alone = ours(tokens[1:2, :4], clip_tokens[1:2])
        assert torch.allclose(a[1, :4], alone[0], atol=1e-5)


def test_no_mask_reaches_attention_when_nothing_is_padded(monkeypatch):
    ours, _ = _heads()
    ours.eval()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, *args, **kwargs):
        if k.shape[-2] == q.shape[-2] == 6:  # the regions' self-attention (cross-attention has 5 keys)
            seen.append(kwargs.get("attn_mask"))
        return sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    tokens, clip_tokens = torch.randn(2, 6, TOKEN), torch.randn(2, 5, W)
    with torch.no_grad():
        ours(tokens, clip_tokens, torch.zeros(2, 6, dtype=torch.bool))
        assert seen == [None] * 3  # one self-attention per layer, none masked
        mask = torch.zeros(2, 6, dtype=torch.bool)
        mask[0, 5] = True
        ours(tokens, clip_tokens, mask)
    assert all(m is not None and m.shape == (2, 1, 1, 6) for m in seen[3:]) and len(seen) == 6


def test_training_mode_applies_dropout_and_gradients_flow():
    ours, stock = _heads(dropout=0.5)
    ours.train()
    tokens, clip_tokens = torch.randn(2, 6, TOKEN), torch.randn(2, 5, W)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    a, b = ours(tokens, clip_tokens, mask), ours(tokens, clip_tokens, mask)
    assert not torch.allclose(a, b)  # dropout is on
    a[~mask].sum().backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Self-attention dropout alone (the other dropouts off) still changes the output.
    for m in ours.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x, y = ours(tokens, clip_tokens, mask), ours(tokens, clip_tokens, mask)
    assert not torch.allclose(x, y)
    # With every dropout off, training mode computes what the stock layer computes.
    ours_no, stock_no = _heads(dropout=0.0)
    ours_no.train(), stock_no.train()
    assert torch.allclose(ours_no(tokens, clip_tokens, mask)[~mask], stock_no(tokens, clip_tokens, mask)[~mask],
                          atol=1e-5)
    g1 = torch.autograd.grad(ours_no(tokens, clip_tokens, mask)[~mask].sum(),
                             ours_no.decoder.layers[0].self_attn.in_proj_weight)[0]
    g2 = torch.autograd.grad(stock_no(tokens, clip_tokens, mask)[~mask].sum(),
                             stock_no.decoder.layers[0].self_attn.in_proj_weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)
