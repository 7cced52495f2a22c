# RegionSpot-BL: SAM ViT-B + CLIP ViT-L/14 at 224 (= configs/RegionSpot-BL.yaml; training as
# configs/train/RegionSpot-BL_stage1_o365.yaml).
from .common import dataloader, lr_multiplier, model, optimizer, train

model.clip.name = "ViT-L/14"
model.clip.input_size = 224
train.output_dir = "output/RegionSpot-BL"
