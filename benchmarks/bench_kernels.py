"""Microbenchmark of the native gram and combine ops against the memory floor and the usual
pure-PyTorch way (torch.cat, then matmul), all measured in one run.

    python benchmarks/bench_kernels.py                 # T=8, P=10M fp32 over 100 tensors, CPU
    python benchmarks/bench_kernels.py --quick         # smaller problem, a few seconds
    python benchmarks/bench_kernels.py --device cuda --tasks 8 32 --params 100_000_000 \
        --dtype float32 bfloat16

Every figure is the median of several timed repetitions after warm-up; inputs are rotated over
enough copies that the caches do not hold the previous repetition's data. Ratios are computed
from figures of this run only.
"""

from __future__ import annotations

import argparse

import torch
from harness import Timer, split_sizes

import mtlgrad
from mtlgrad import ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(
    tasks: int,
    params: int,
    tensors: int,
    dtype: torch.dtype,
    device: torch.device,
    timer: Timer,
    with_cat: bool,
) -> list[tuple[str, float, str]]:
    gen = torch.Generator().manual_seed(0)
    sizes = split_sizes(params, tensors, gen)
    elem = torch.finfo(dtype).bits // 8
    data_bytes = tasks * params * elem
    # Enough copies that the previous repetition's data is out of the caches (>= 256 MiB on CPU).
    copies = 1 if device.type == "cuda" else max(1, min(4, -(-(256 << 20) // data_bytes)))

    flats = [torch.randn(tasks, params, dtype=dtype, device=device) for _ in range(copies)]
    # The per-task gradient lists are views into one buffer per copy: the ops see 100s of
    # separate tensors, while the floor and the matmul baselines can use the contiguous J.
    lists = []
    for flat in flats:
        grads = []
        for t in range(tasks):
            grads.extend(torch.split(flat[t], sizes))
        lists.append(grads)
    out = [torch.empty(s, dtype=dtype, device=device) for s in sizes]
    out_flat = torch.empty(params, dtype=dtype, device=device)
    weights = torch.rand(tasks, dtype=torch.float64, device=device)
    w_dtype = weights.to(dtype).view(1, -1)

    def pick(i: int) -> int:
        return i % copies

    rows: list[tuple[str, float, str]] = []
    if device.type == "cuda":
        scratch = torch.empty_like(flats[0])
        copy_time = timer(lambda i: scratch.copy_(flats[pick(i)]))
        bandwidth = 2 * data_bytes / copy_time  # a copy reads and writes every byte
        read_floor = data_bytes / bandwidth
        write_floor = params * elem / bandwidth
        floor_note = f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s"
    else:
        # The fastest of two ways to read every byte once: torch's sum over the contiguous J, and
        # a one-task Gram (one multiply-add per element) over it. Both vary between processes on
        # shared machines; the minimum is the better estimate of what the memory can deliver.
        t_sum = timer(lambda i: flats[pick(i)].sum())
        t_self = timer(lambda i: ops.gram([flats[pick(i)].view(-1)], 1))
        read_floor = min(t_sum, t_self)
        write_floor = timer(lambda i: out_flat.fill_(1.0))
        floor_note = (
            f"read once: {data_bytes / read_floor / 1e9:.1f} GB/s "
            f"(sum {t_sum * 1e3:.2f} ms, 1-task gram {t_self * 1e3:.2f} ms)"
        )
    combine_floor = read_floor + write_floor

    t_gram = timer(lambda i: ops.gram(lists[pick(i)], tasks))
    t_mm = timer(lambda i: flats[pick(i)] @ flats[pick(i)].T)
    rows.append(("gram floor (read T*P once)", read_floor, floor_note))
    rows.append(("mtlgrad.ops.gram", t_gram, f"{t_gram / read_floor:.2f}x floor"))
    rows.append(("J @ J.T (contiguous J)", t_mm, f"mtlgrad {t_mm / t_gram:.1f}x faster"))
    if with_cat:

        def cat_matmul(i: int) -> torch.Tensor:
            grads = lists[pick(i)]
            per_task = len(grads) // tasks
            J = torch.stack(
                [
                    torch.cat([g.reshape(-1) for g in grads[t * per_task : (t + 1) * per_task]])
                    for t in range(tasks)
                ]
            )
            return J @ J.T

        t_cat = timer(cat_matmul)
        rows.append(("torch.cat + J @ J.T", t_cat, f"mtlgrad {t_cat / t_gram:.1f}x faster"))

    t_combine = timer(lambda i: ops.combine(lists[pick(i)], tasks, weights, out))
    t_wj = timer(lambda i: torch.matmul(w_dtype, flats[pick(i)], out=out_flat.view(1, -1)))
    rows.append(("combine floor (read T*P, write P)", combine_floor, ""))
    rows.append(("mtlgrad.ops.combine", t_combine, f"{t_combine / combine_floor:.2f}x floor"))
    rows.append(("w @ J (contiguous J)", t_wj, f"mtlgrad {t_wj / t_combine:.1f}x faster"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, nargs="+", default=[8])
    parser.add_argument("--params", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument(
        "--no-cat", action="store_true", help="skip the torch.cat + matmul baseline"
    )
    parser.add_argument("--quick", action="store_true", help="P=2M, fewer repetitions")
    args = parser.parse_args()
    if args.quick:
        args.params = [2_000_000]
        args.repeat = 5

    device = torch.device(args.device)
    timer = Timer(device, warmup=2, repeat=args.repeat)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads, {ops.cpu_kernels()} kernels"
    )
    print(f"mtlgrad {mtlgrad.__version__}, torch {torch.__version__}, {where}")
    for dtype_name in args.dtype:
        for tasks in args.tasks:
            for params in args.params:
                print(f"\nT={tasks}, P={params:,} {dtype_name} over {args.tensors} tensors")
                rows = run(
                    tasks,
                    params,
                    args.tensors,
                    DTYPES[dtype_name],
                    device,
                    timer,
                    with_cat=not args.no_cat,
                )
                width = max(len(r[0]) for r in rows)
                for name, seconds, note in rows:
                    print(f"  {name:<{width}}  {seconds * 1e3:9.2f} ms  {note}")


if __name__ == "__main__":
    main()
