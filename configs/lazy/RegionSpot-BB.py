# RegionSpot-BB: SAM ViT-B + CLIP ViT-B/16 at 224 (= configs/RegionSpot-BB.yaml; training as
# configs/train/RegionSpot-BB_stage1_o365.yaml).
from .common import dataloader, lr_multiplier, model, optimizer, train

train.output_dir = "output/RegionSpot-BB"
