"""A thin Wan2.1/2.2 DiT on the `wan` ops: config + presets, model, RoPE tables, checkpoint formats,
sampler and CLI (`python -m wan_model demo|run|convert`)."""

from wan_model.checkpoint import CheckpointError, WanExperts, load_model, save_model
from wan_model.config import PRESETS, WanConfig
from wan_model.model import WanContext, WanModel
from wan_model.rope import rope_tables

__all__ = ["PRESETS", "CheckpointError", "WanConfig", "WanContext", "WanExperts", "WanModel", "load_model",
           "rope_tables", "save_model"]
