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
        layer = nn.TransformerDecoderLayer(
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
        x = self.to_clip(region_tokens.float())
        x = self.decoder(x, clip_tokens.float(), tgt_key_padding_mask=padding_mask)
        return F.normalize(self.projector(x), dim=-1)
