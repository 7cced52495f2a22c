"""The fusion head: the only trainable part of RegionSpot.

Region tokens from SAM are mapped to CLIP's width, attend to each other and to CLIP's image token
map through a small transformer decoder, and are projected into CLIP's text space. Submodule names
(`to_clip`, `decoder`, `projector`) match the released checkpoints.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn


class RegionDecoderLayer(nn.TransformerDecoderLayer):
    """`nn.TransformerDecoderLayer` (post-norm) whose self-attention among regions runs through
    `F.scaled_dot_product_attention`, so its memory is linear in the regions of an image: the
    stock layer materialises an N x N matrix per head (800 MB per layer at 5000 regions, twice that
    with a padding mask). Same parameters, same state-dict keys (`self_attn.in_proj_weight`, ...)
    and the same outputs; cross-attention to CLIP's tokens (N x L) and the feed-forward block are
    the stock ones.
    """

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None, tgt_key_padding_mask: Optional[torch.Tensor] = None,
        memory_key_padding_mask: Optional[torch.Tensor] = None, tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """(B, N, W) region tokens, (B, L, W) memory, (B, N) True where a region is padding."""
        if tgt_mask is not None or memory_mask is not None or memory_key_padding_mask is not None \
                or tgt_is_causal or memory_is_causal or self.norm_first or not self.self_attn.batch_first:
            raise NotImplementedError("RegionDecoderLayer supports batch-first post-norm layers with a "
                                      "region padding mask only.")
        x = self.norm1(tgt + self.dropout1(self._self_attention(tgt, tgt_key_padding_mask)))
        cross = self.multihead_attn(x, memory, memory, need_weights=False)[0]
        x = self.norm2(x + self.dropout2(cross))
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm3(x + self.dropout3(ff))

    def _self_attention(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        attn = self.self_attn
        b, n, w = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, w/heads)
        # Keys only are masked (as nn.MultiheadAttention's key_padding_mask): True = may attend.
        mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, w))


class RegionSpotHead(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        token_dim: int,
        clip_width: int,
        text_dim: int,
        num_layers: int = 3,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ):
        """
        Args:
            token_dim: width of SAM's region tokens (256 for the released SAMs).
            clip_width: width of CLIP's vision tokens (768 for ViT-B/16, 1024 for ViT-L/14).
            text_dim: width of CLIP's text embeddings (512 for B/16, 768 for L/14).
            num_layers, num_heads, dim_feedforward, dropout: the transformer decoder's shape.
        """
        super().__init__()
        if clip_width % num_heads:
            raise ValueError(f"MODEL.REGIONSPOT.HEAD.NUM_HEADS ({num_heads}) must divide CLIP's width "
                             f"({clip_width}), the head's model width.")
        self.to_clip = nn.Linear(token_dim, clip_width)
        # Post-norm ReLU layers without positional embeddings; each layer is self-attention among
        # one image's regions, cross-attention to CLIP's tokens, then the feed-forward block.
        layer = RegionDecoderLayer(
            d_model=clip_width, nhead=num_heads, dim_feedforward=dim_feedforward,
            dropout=dropout, activation="relu", batch_first=True, norm_first=False,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=num_layers, norm=nn.LayerNorm(clip_width))
        self.projector = nn.Linear(clip_width, text_dim)

    @classmethod
    def from_config(cls, cfg, token_dim: int, clip_width: int, text_dim: int):
        h = cfg.MODEL.REGIONSPOT.HEAD
        return {
            "token_dim": token_dim, "clip_width": clip_width, "text_dim": text_dim,
            "num_layers": h.NUM_LAYERS, "num_heads": h.NUM_HEADS,
            "dim_feedforward": h.DIM_FEEDFORWARD, "dropout": h.DROPOUT,
        }

    def forward(
        self, region_tokens: torch.Tensor, clip_tokens: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            region_tokens: (B, N, token_dim) SAM tokens, padded to the image with most regions.
            clip_tokens: (B, L, clip_width) CLIP token maps.
            padding_mask: (B, N) True where a region is padding.
        Returns:
            (B, N, text_dim) L2-normalised region embeddings.
        """
        if padding_mask is not None and not bool(padding_mask.any()):
            padding_mask = None  # nothing padded: no mask, so attention can take its fused kernels
        x = self.to_clip(region_tokens.float())
        x = self.decoder(x, clip_tokens.float(), tgt_key_padding_mask=padding_mask)
        return F.normalize(self.projector(x), dim=-1)
