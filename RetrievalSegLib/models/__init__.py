"""The model catalogue (SAM 2 backbones, DINOv2), loading local weights strictly and pickle-free, downloading them through huggingface_hub."""
