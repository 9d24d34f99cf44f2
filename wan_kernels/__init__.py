"""wan-kernels: fused kernels for the Wan2.1/2.2 video DiT, as `torch.ops.wan.*` and typed wrappers.

Importing this package registers the `wan` op namespace from the op specs (wan_kernels/ops/, one module per
op; the compiled extension `_C` adds its C++/CUDA kernels when it is built, else the pure-torch references
serve as CPU kernels). Every op wrapper of wan_kernels/ops/ is exported here (`wan_kernels.<op>`).
`python -m wan_kernels` prints what was built, the routing table and a self-check.
"""

from wan_kernels._versions import check_installed

check_installed("torch", "triton")  # first: an unsupported torch / triton is one clear ImportError

from wan_kernels import _library, ops, ref  # noqa: E402
from wan_kernels._extension import EXTENSION  # noqa: E402
from wan_kernels.ops import *  # noqa: E402,F401,F403  (the op wrappers, ops.__all__)
from wan_kernels.routing import BACKENDS, IMPLS, BackendUnavailableError, resolve, route_table  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BACKENDS", "EXTENSION", "IMPLS", "BackendUnavailableError", "resolve", "route_table", *ops.__all__]
del _library
