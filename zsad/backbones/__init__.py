"""Frozen encoders: CLIP (open_clip) and DINOv3 (timm), with weight resolution and tiny presets."""
