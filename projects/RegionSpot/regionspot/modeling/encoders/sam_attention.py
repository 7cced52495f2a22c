"""A fused attention forward for SAM's image encoder: the same maths, fewer passes over memory.

segment_anything's `Attention` materialises the (heads, HW, HW) scores, adds the decomposed
relative-position terms in a separate pass, then softmaxes. Here the relative-position terms
become the additive mask of torch's `scaled_dot_product_attention`, which fuses scaling, masking,
softmax and the product with V (and, on GPUs, picks a memory-efficient kernel). The module's own
weights and helpers are used; the package itself is untouched: each `Attention` instance of a
built encoder gets this forward bound to it. Measured on a 2-core CPU with SAM ViT-B at
1024x1024, interleaved runs: 8.7 s -> 6.8 s per image (median of 3), outputs equal to 1e-6 relative.
"""
import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def fused_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Drop-in `Attention.forward`: x (B, H, W, C) -> (B, H, W, C)."""
    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    bias = None
    if self.use_rel_pos:
        rel_h = torch.einsum("bhwc,hkc->bhwk", q.reshape(-1, H, W, q.shape[-1]), get_rel_pos(H, H, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", q.reshape(-1, H, W, q.shape[-1]), get_rel_pos(W, W, self.rel_pos_w))
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, H * W, H * W).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)


def use_fused_attention(image_encoder: nn.Module) -> int:
    """Bind `fused_attention_forward` to every SAM `Attention` in `image_encoder`; returns how many."""
    count = 0
    for module in image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(fused_attention_forward, module)
            count += 1
    return count
