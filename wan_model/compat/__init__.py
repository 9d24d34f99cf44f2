"""The compatibility layer: what other tools name and expect, mapped onto the core model. Imports the core layer.

  common     CheckpointError, ComfyUI's per-layer marker, float8-safe row concatenation (below layouts and the
             quantization methods, which both use them)
  layouts    checkpoint key maps (diffusers / original Wan / ComfyUI names, the fused QKV and stacked K/V; a
             quantized layer's scales through its method's hooks)
  spellings  diffusers' API spellings (fp32 modules, WanOutput, torch_dtype, attention_kwargs)
  quantize   NVFP4 / FP8 weight quantization of a model and its layer groups
  lora       LoRA namings (diffusers/PEFT, original/ComfyUI, kohya/musubi) fused into the weights
  diffusers  the drop-in: our kernels inside diffusers' WanTransformer3DModel (needs diffusers)
"""
