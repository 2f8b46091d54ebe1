"""RetrievalSeg backing library: retrieval-augmented few-shot segmentation with DINOv2 + SAM 2.

Pure Python; importable without 3D Slicer. Heavy dependencies (torch, sam2, transformers, faiss)
are imported by the modules that need them, so `import RetrievalSegLib` stays cheap.
"""
__version__ = "0.1.0"

# RSEG_OFFLINE / RSEG_WEIGHTS_MIRROR -> HF_HUB_OFFLINE / HF_ENDPOINT, before anything imports
# huggingface_hub (it reads them once, at import).
from .models.registry import apply_hub_environment as _apply_hub_environment

_apply_hub_environment()
