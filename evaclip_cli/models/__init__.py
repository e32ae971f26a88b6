"""EVA-CLIP model family: specs (plain data), timm towers, open_clip assembly, checkpoint key maps."""
