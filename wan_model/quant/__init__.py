"""Quantization methods, one module each behind one interface (wan_model.quant.method): `nvfp4`, `fp8`.

`get(name)`, `method_of(config)`, `method_of_module(module)`, `detect(state_dict)` are how the rest of the package
reaches a method; `register(method)` adds one (README, "Adding a quantization method").
"""

from wan_model.quant.method import (DEFAULT_KEEP, METHODS, Method, QuantConfig, detect, get, method_of,
                                    method_of_module, register, stored_in)
from wan_model.quant.nvfp4 import NVFP4Config, NVFP4StackedKV
from wan_model.quant.fp8 import FP8Config, FP8StackedKV

__all__ = ["DEFAULT_KEEP", "METHODS", "Method", "QuantConfig", "detect", "get", "method_of", "method_of_module",
           "register", "stored_in", "NVFP4Config", "NVFP4StackedKV", "FP8Config", "FP8StackedKV"]
