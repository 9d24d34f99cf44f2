"""Sequence-parallel benchmark on CPU processes (gloo on 127.0.0.1): time per forward, and per training step
(forward + backward of a mean-square loss, all parameters trainable), and the share spent in collectives, per
(ulysses, ring) layout, against the single-process forward / step of the same model.

Model: dim 512 (4 heads of 128), 4 layers, fp32, random weights; latents 5 x 32 x 32 -> 1280 tokens, batch 2
(a CFG step), 512 text tokens. Each layout runs in fresh processes (torch.multiprocessing spawn); every rank
checks its full output against the single-process one (max abs error printed) and, with --backward, its
gradients (max over parameters of max |error| / max |gradient|) before timing. Collective time = wall time inside
all_to_all_single / all_gather / all_reduce (the backward's gradient sums) / the waits of the ring's
batch_isend_irecv (gloo is blocking on CPU, so Ulysses, the gather and the sums are never overlapped; the
ring's forward transfers overlap with the block in hand, its backward hops do not).
Threads per rank: the cores divided by the ranks (at least 1). On a machine with fewer cores than ranks the
times measure oversubscription, not scaling.

    python bench/bench_parallel.py [--layouts 2x1 1x2 2x2] [--repeats 5] [--tokens-grid 5 32 32] [--backward]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import env_header  # noqa: E402
from wan_model.testing import random_model  # noqa: E402
from wan_model.core.config import WanConfig  # noqa: E402

CONFIG = dict(num_attention_heads=4, ffn_dim=1536, num_layers=4, text_dim=64, freq_dim=64)


def _inputs(cfg, grid):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, cfg.in_channels, *grid, generator=g), torch.tensor([700.0, 350.0]),
            torch.randn(2, 512, cfg.text_dim, generator=g))


def _step(model, args):
    """One training step's forward + backward (mean-square loss); the parameters' gradients, then cleared."""
    (model(*args) ** 2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _time_steps(model, args, repeats, spent, barrier=None):
    """Median seconds of a training step and of its collectives."""
    times, comm = [], []
    for _ in range(repeats):
        if barrier:
            barrier()
        spent[0] = 0.0
        t0 = time.perf_counter()
        _step(model, args)
        times.append(time.perf_counter() - t0)
        comm.append(spent[0])
    return statistics.median(times), statistics.median(comm)


def _rank(rank, world, port, u, r, grid, repeats, threads, backward, queue):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = random_model(WanConfig(**CONFIG), seed=0).set_impl("auto").eval()
    args = _inputs(model.config, grid)
    spent = [0.0]

    def timed(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            spent[0] += time.perf_counter() - t0
            return out
        return run

    dist.all_to_all_single, dist.all_gather = timed(dist.all_to_all_single), timed(dist.all_gather)
    dist.all_reduce = timed(dist.all_reduce)
    work_wait = torch.distributed.distributed_c10d.Work.wait
    with torch.no_grad():
        want = model(*args)
        model.enable_parallelism(ulysses_degree=u, ring_degree=r)
        err = (model(*args) - want).abs().max().item()
        times, comm = [], []
        torch.distributed.distributed_c10d.Work.wait = timed(work_wait)
        for _ in range(repeats):
            dist.barrier()
            spent[0] = 0.0
            t0 = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - t0)
            comm.append(spent[0])
        torch.distributed.distributed_c10d.Work.wait = work_wait
    row = [rank, err, statistics.median(times), statistics.median(comm)]
    if backward:
        model.disable_parallelism()
        want = _step(model, args)
        model.enable_parallelism(ulysses_degree=u, ring_degree=r)
        got = _step(model, args)
        row.append(max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)))
        torch.distributed.distributed_c10d.Work.wait = timed(work_wait)
        row += _time_steps(model, args, repeats, spent, dist.barrier)
        torch.distributed.distributed_c10d.Work.wait = work_wait
    queue.put(tuple(row))
    dist.destroy_process_group()


def _single(grid, repeats, threads, backward):
    """Median seconds of a forward and (backward) of a training step, single process."""
    torch.set_num_threads(threads)
    model = random_model(WanConfig(**CONFIG), seed=0).set_impl("auto").eval()
    args = _inputs(model.config, grid)
    times = []
    with torch.no_grad():
        model(*args)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - t0)
    if not backward:
        return statistics.median(times), None
    _step(model, args)
    return statistics.median(times), _time_steps(model, args, repeats, [0.0])[0]


def main() -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="*", default=["2x1", "1x2", "2x2"], help="ULYSSESxRING")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens-grid", type=int, nargs=3, default=[5, 32, 32], metavar=("F", "H", "W"),
                   help="latent grid (patched 1 x 2 x 2)")
    p.add_argument("--backward", action="store_true", help="also time training steps (forward + backward)")
    a = p.parse_args()
    grid = tuple(a.tokens_grid)
    cores = os.cpu_count() or 1
    print(env_header())
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    print(f"# dim 512, 4 heads, 4 layers, fp32, {tokens} tokens x batch 2, {cores} cores, gloo on 127.0.0.1")
    t1, s1 = _single(grid, a.repeats, cores, a.backward)
    head = f"{'layout':8s} {'ranks':>5s} {'ms/forward':>11s} {'speedup':>8s} {'comm %':>7s} {'max err':>9s}"
    print(head + (f" | {'ms/step':>9s} {'speedup':>8s} {'comm %':>7s} {'grad err':>9s}" if a.backward else ""))
    print(f"{'single':8s} {1:5d} {t1 * 1e3:11.1f} {1.0:8.2f} {0.0:7.1f} {0.0:9.1e}"
          + (f" | {s1 * 1e3:9.1f} {1.0:8.2f} {0.0:7.1f} {0.0:9.1e}" if a.backward else ""))
    ctx = mp.get_context("spawn")
    for layout in a.layouts:
        u, r = (int(x) for x in layout.split("x"))
        world = u * r
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(i, world, port, u, r, grid, a.repeats, max(1, cores // world),
                                                 a.backward, queue)) for i in range(world)]
        for pr in procs:
            pr.start()
        rows = [queue.get(timeout=600) for _ in procs]
        for pr in procs:
            pr.join(timeout=60)
        err = max(x[1] for x in rows)
        tp = max(x[2] for x in rows)
        share = max(x[3] / x[2] for x in rows)
        line = f"{layout:8s} {world:5d} {tp * 1e3:11.1f} {t1 / tp:8.2f} {100 * share:7.1f} {err:9.1e}"
        if a.backward:
            sp = max(x[5] for x in rows)
            line += (f" | {sp * 1e3:9.1f} {s1 / sp:8.2f} {100 * max(x[6] / x[5] for x in rows):7.1f} "
                     f"{max(x[4] for x in rows):9.1e}")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
