"""The pure layer: the Wan transformer on the `wan` ops. Imports torch, wan_kernels and itself only.

  config     WanConfig + the variant presets, diffusers' config.json fields
  rope       3D RoPE tables
  model      WanTransformer (blocks, forward, prepare_context), WanExperts (Wan2.2's two experts)
  parallel   sequence parallelism (Ulysses, ring) on torch.distributed, from plain degrees
  sampling   flow-matching Euler sampling with batched CFG
"""
