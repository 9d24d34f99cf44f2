"""GPU readiness of the Triton attention kernel without a GPU: every config the heuristic can pick
(`wan_kernels.triton.attention.CONFIGS`: arch class x head_dim 64/128 x kind self/cross/i2v) compiles ahead
of time (tools/aot.py) for its arch, with

* the arch's tensor-core instructions in the PTX: mma.sync (sm_80), wgmma (sm_90), tcgen05 (sm_100);
* zero spills (cuobjdump STACK/LOCAL 0 and no STL/LDL in the SASS);
* shared memory within the arch's per-block limit (sm_80's table also within the 99 KB of sm_86/89/120).

Each (config, arch, dtype) is its own test; kinds that share a config on an arch share the compile. fp16 and
bf16 are compiled without the LSE output, bf16 also with it (the LSE variant keeps the same tiles).
Registers and shared memory per config are printed at the end of the module (pytest -s).
Cost: ~4-7 s per compile on these 2 cores.
"""

import pytest
import torch

from tools import aot
from wan_kernels.triton import attention as ta

pytestmark = pytest.mark.aot

MMA = {80: "mma.sync", 90: "wgmma", 100: "tcgen05"}
# Largest dynamic shared memory per block (bytes, opt-in): A100 163 KB (sm_86/89/120: 99 KB), H100/B200 227 KB.
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
RESULTS: list[tuple[str, str, aot.AotResult]] = []


def _cases():
    kinds: dict[tuple, list[str]] = {}
    for (arch, d, kind), cfg in ta.CONFIGS.items():
        kinds.setdefault((arch, d, cfg, kind == "i2v"), []).append(kind)
    cases = []
    for (arch, d, cfg, img), names in sorted(kinds.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        for dtype, lse in ((torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)):
            label = f"sm{arch}-hd{d}-{'+'.join(names)}-{cfg}-{str(dtype)[6:]}{'-lse' if lse else ''}"
            cases.append(pytest.param(arch, d, cfg, img, dtype, lse, "+".join(names), id=label))
    return cases


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    print("\n\nAOT table: config | arch | kinds | REG | spill bytes (STACK+LOCAL) | STL/LDL | shared bytes | MMA")
    for kind, what, r in RESULTS:
        mma = ",".join(sorted(r.mma_families))
        print(f"{what:30s} sm_{r.arch:<3d} {kind:11s} REG {r.registers:3d}  spill {r.stack_bytes + r.local_bytes:4d}  "
              f"STL/LDL {r.spill_stores}/{r.spill_loads}  shared {r.shared_bytes:6d}  {mma}")


def test_every_arch_class_and_head_dim_has_a_config():
    assert {(a, d) for a, d, _ in ta.CONFIGS} == {(a, d) for a in ta.ARCH_CLASSES for d in (64, 128)}
    assert len(_cases()) >= 3 * len(ta.ARCH_CLASSES) * 2  # at least one config per (arch, head_dim), 3 variants


@pytest.mark.parametrize("arch,head_dim,config,has_img,dtype,write_lse,kinds", _cases())
def test_config_compiles_without_spills(arch, head_dim, config, has_img, dtype, write_lse, kinds, tmp_path):
    r = aot.compile_aot(ta.attention_kernel, ta.aot_signature(dtype),
                        ta.aot_constexprs(head_dim, config, has_img, write_lse, dtype), arch=arch,
                        num_warps=config.num_warps, num_stages=config.num_stages, aligned=ta.AOT_ALIGNED,
                        workdir=tmp_path)
    RESULTS.append((kinds, f"{config} hd{head_dim} {str(dtype)[6:]}{' lse' if write_lse else ''}", r))
    assert MMA[arch] in r.mma_families, r.summary()
    assert not r.spills, r.summary()
    assert r.shared_bytes <= SHARED_LIMIT[arch], r.summary()
    assert r.registers <= 255, r.summary()
