"""The supported version ranges of the packages wan-kernels runs on, checked at import.

Below a range's minimum is an ImportError naming the package, the version found and the range (an older
diffusers fails deep inside its Wan model otherwise, e.g. diffusers 0.33's `not enough values to unpack`);
above the newest version tested (the pins of requirements.txt) is a one-time warning. pyproject.toml's
dependencies carry only the minimums, so `pip install wan-kernels` keeps a user's supported torch.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import warnings

# package: (minimum, newest tested); the minimums are the GPU machines' torch 2.11 / triton 3.6 and the first
# diffusers with WanAttention + processors (0.35); the newest are requirements.txt's pins.
SUPPORTED = {"torch": ("2.11", "2.14.1"), "triton": ("3.6", "3.8.0"), "diffusers": ("0.35", "0.42.1")}
_warned: set[str] = set()


def parse(version: str) -> tuple[int, ...]:
    """'2.14.1+cu130' -> (2, 14, 1); '0.36.0.dev0' -> (0, 36, 0): the leading release numbers."""
    m = re.match(r"\d+(\.\d+)*", version)
    if m is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple(int(p) for p in m.group(0).split("."))


def check(package: str, version: str) -> None:
    """ImportError if `version` of `package` is older than SUPPORTED's minimum; a warning (once per package)
    if it is newer than the newest tested."""
    lo, hi = SUPPORTED[package]
    v = parse(version)
    if v < parse(lo):
        raise ImportError(f"wan-kernels needs {package} >= {lo} (tested up to {hi}); found {package} {version}. "
                          f"Upgrade it: pip install '{package}>={lo}'")
    if v[:len(parse(hi))] > parse(hi) and package not in _warned:
        _warned.add(package)
        warnings.warn(f"wan-kernels is tested with {package} {lo} to {hi}; found {version} (newer, untested)",
                      stacklevel=3)


def check_installed(*packages: str) -> None:
    """`check` each of `packages` that is installed: an imported one by its `__version__` (the module actually
    loaded), else by its distribution's metadata (without importing it); a package not installed is skipped."""
    for name in packages:
        module = sys.modules.get(name)
        if module is not None:
            version = getattr(module, "__version__", "0")
        else:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        check(name, version)
