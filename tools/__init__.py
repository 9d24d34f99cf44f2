"""Tools beside the packages (never imported by wan_kernels or wan_model): the GPU check
(`python -m tools.gpu_check OUTDIR`), GPU readiness without a GPU (`python -m tools.readiness`) and the
ahead-of-time compile helpers they and the tests share (tools/aot.py)."""
