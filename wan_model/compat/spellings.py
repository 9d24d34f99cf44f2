"""diffusers' API spellings that our public `wan_model.WanModel` keeps, so that diffusers users meet the names they
know: the modules `from_pretrained(torch_dtype=...)` keeps in fp32, `forward(..., return_dict)`'s output object,
`attention_kwargs`, `torch_dtype` / `subfolder`. The pure model (wan_model.core.model) knows none of them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

# Parameter-name components diffusers keeps in fp32 under from_pretrained(torch_dtype=bf16)
# (WanTransformer3DModel._keep_in_fp32_modules; matched against the dot-separated name parts).
FP32_MODULES = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def keeps_fp32(name: str) -> bool:
    """True when diffusers keeps parameter `name` in fp32 whatever the load dtype."""
    return any(part in FP32_MODULES for part in name.split("."))


@dataclasses.dataclass
class WanOutput:
    """`forward(..., return_dict=True)`: the fields of diffusers' `Transformer2DModelOutput` (`.sample`, or `[0]`).

    sample: [B, C_out, F, H, W].
    """

    sample: torch.Tensor

    def __getitem__(self, i):
        return getattr(self, i) if isinstance(i, str) else (self.sample,)[i]


def check_attention_kwargs(attention_kwargs: dict | None) -> None:
    """diffusers' LoRA {"scale": s} is accepted (a WanModel holds no PEFT adapters: as in diffusers without
    adapters it changes nothing); any other key is an error."""
    if attention_kwargs and set(attention_kwargs) - {"scale"}:
        raise ValueError(f"WanModel.forward: attention_kwargs {sorted(set(attention_kwargs) - {'scale'})} "
                         "are not supported (only diffusers' LoRA 'scale', which has nothing to scale here)")


def pack_output(out: torch.Tensor, return_dict: bool | None):
    """`out` as diffusers returns it: the tensor (return_dict None, our default), `(out,)` or a `WanOutput`."""
    if return_dict is None:
        return out
    return WanOutput(out) if return_dict else (out,)


def pretrained_args(path, dtype: torch.dtype | None, torch_dtype: torch.dtype | None,
                    subfolder: str | None) -> tuple:
    """(path, dtype) of `from_pretrained(path, dtype, torch_dtype=, subfolder=)`: `torch_dtype` is `dtype`
    (default bfloat16), `subfolder` is joined to `path` (e.g. "transformer" of a pipeline dir)."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"from_pretrained: dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one")
    if isinstance(path, Mapping):  # a state dict in any naming (wan_model.io.source.open_source)
        if subfolder:
            raise ValueError(f"from_pretrained: subfolder={subfolder!r} needs a path, got a state dict")
        return path, dtype or torch_dtype or torch.bfloat16
    path = os.fspath(path)
    if subfolder:
        path = os.path.join(path, subfolder)
    return path, dtype or torch_dtype or torch.bfloat16
