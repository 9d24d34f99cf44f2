"""Sequence-parallel benchmark on CPU processes (gloo on 127.0.0.1): time per forward and the share spent in
collectives, per (ulysses, ring) layout, against the single-process forward of the same model.

Model: dim 512 (4 heads of 128), 4 layers, fp32, random weights; latents 5 x 32 x 32 -> 1280 tokens, batch 2
(a CFG step), 512 text tokens. Each layout runs in fresh processes (torch.multiprocessing spawn); every rank
checks its full output against the single-process one (max abs error printed) before timing. Collective time =
wall time inside all_to_all_single / all_gather / the waits of the ring's batch_isend_irecv (gloo is blocking
on CPU, so Ulysses and the gather are never overlapped; the ring's transfers overlap with the block in hand).
Threads per rank: the cores divided by the ranks (at least 1). On a machine with fewer cores than ranks the
times measure oversubscription, not scaling.

    python bench/bench_parallel.py [--layouts 2x1 1x2 2x2] [--repeats 5] [--tokens-grid 5 32 32]
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
from wan_model.cli import random_model  # noqa: E402
from wan_model.config import WanConfig  # noqa: E402

CONFIG = dict(num_attention_heads=4, ffn_dim=1536, num_layers=4, text_dim=64, freq_dim=64)


def _inputs(cfg, grid):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, cfg.in_channels, *grid, generator=g), torch.tensor([700.0, 350.0]),
            torch.randn(2, 512, cfg.text_dim, generator=g))


def _rank(rank, world, port, u, r, grid, repeats, threads, queue):
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
    queue.put((rank, err, statistics.median(times), statistics.median(comm)))
    dist.destroy_process_group()


def _single(grid, repeats, threads):
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
    return statistics.median(times)


def main() -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="*", default=["2x1", "1x2", "2x2"], help="ULYSSESxRING")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens-grid", type=int, nargs=3, default=[5, 32, 32], metavar=("F", "H", "W"),
                   help="latent grid (patched 1 x 2 x 2)")
    a = p.parse_args()
    grid = tuple(a.tokens_grid)
    cores = os.cpu_count() or 1
    print(env_header())
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    print(f"# dim 512, 4 heads, 4 layers, fp32, {tokens} tokens x batch 2, {cores} cores, gloo on 127.0.0.1")
    t1 = _single(grid, a.repeats, cores)
    print(f"{'layout':8s} {'ranks':>5s} {'ms/forward':>11s} {'speedup':>8s} {'comm %':>7s} {'max err':>9s}")
    print(f"{'single':8s} {1:5d} {t1 * 1e3:11.1f} {1.0:8.2f} {0.0:7.1f} {0.0:9.1e}")
    ctx = mp.get_context("spawn")
    for layout in a.layouts:
        u, r = (int(x) for x in layout.split("x"))
        world = u * r
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(i, world, port, u, r, grid, a.repeats, max(1, cores // world),
                                                 queue)) for i in range(world)]
        for pr in procs:
            pr.start()
        rows = [queue.get(timeout=600) for _ in procs]
        for pr in procs:
            pr.join(timeout=60)
        err = max(x[1] for x in rows)
        tp = max(x[2] for x in rows)
        share = max(x[3] / x[2] for x in rows)
        print(f"{layout:8s} {world:5d} {tp * 1e3:11.1f} {t1 / tp:8.2f} {100 * share:7.1f} {err:9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
