"""The serialization layer: files on disk. Imports the compat and core layers.

  _atomic     the one atomic, non-destructive writer
  formats     safetensors reading, format detection, the per-format writers
  gguf        GGUF reading (own header parser, validated) and encoding
  checkpoint  load (any format, `cls` to build) and save of models
  convert     conversions between formats (dense, NVFP4/FP8, GGUF), streamed
"""
