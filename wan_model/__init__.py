"""A thin Wan2.1/2.2 DiT on the `wan` ops: config + presets, model, RoPE tables, checkpoint formats,
sampler and CLI (`python -m wan_model demo|run|convert|cost`).

The names below are imported on first use (PEP 562), so `import wan_model.core.model` loads the model alone,
without the checkpoint readers and writers."""

import importlib

_EXPORTS = {
    "CheckpointError": "wan_model.compat.layouts", "WanExperts": "wan_model.core.model",
    "load_model": "wan_model.model", "save_model": "wan_model.io.checkpoint",
    "PRESETS": "wan_model.core.config", "WanConfig": "wan_model.core.config",
    "WanContext": "wan_model.core.model", "WanModel": "wan_model.model",
    "rope_tables": "wan_model.core.rope",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wan_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
