"""The models: OpenAI's ViT and causal text towers, the BERT text towers, and the CLIP that joins them."""
from .clip import CLIP, build_model
from .configs import MODEL_CONFIGS, CLIPConfig, TextConfig, VisionConfig, get_config, phi_of
from .shape_config import infer_config

__all__ = ["CLIP", "build_model", "MODEL_CONFIGS", "CLIPConfig", "TextConfig", "VisionConfig", "get_config",
           "infer_config", "phi_of"]
