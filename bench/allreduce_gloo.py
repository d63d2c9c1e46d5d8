"""All-reduce bandwidth of torch.distributed's gloo backend on loopback.

The peer of bench/src/bin/allreduce.rs: same sizes, same timing rule
(2 warm-up calls, then `iters` timed calls each after a barrier, median
time), same CSV output `engine,bytes,iters,median_s,algbw_gbps,busbw_gbps`.
gloo has no AVG reduction, so it runs SUM (twinhead's engine computes the
mean; the division is fused into its last reduction pass).

    python bench/allreduce_gloo.py [--world 2] [--sizes-mb 1,4,16,64,256]
"""

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def iterations(nbytes: int) -> int:
    return max(5, min(50, 2_000_000_000 // max(nbytes, 1)))


def worker(rank: int, world: int, port: int, sizes_mb: list[int]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    for mb in sizes_mb:
        nbytes = mb * 1024 * 1024
        buf = (torch.arange(nbytes // 4, dtype=torch.float32) % 1000).contiguous()
        for _ in range(2):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        iters = iterations(nbytes)
        times = []
        for _ in range(iters):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            times.append(time.perf_counter() - t)
        times.sort()
        median = times[len(times) // 2]
        algbw = nbytes / median / 1e9
        busbw = algbw * 2 * (world - 1) / world
        if rank == 0:
            print(
                f"gloo(torch {torch.__version__}),{nbytes},{iters},{median:.6f},{algbw:.3f},{busbw:.3f}",
                flush=True,
            )
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes-mb", default="1,4,16,64,256")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes_mb.split(",")]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(a.world, free_port(), sizes), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
