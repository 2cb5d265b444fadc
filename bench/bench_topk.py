"""Top-k: sparse_retrieval.topk against torch.topk and numpy.argpartition (+ sort), same inputs, one process.

CPU: the issue's shapes at 1 thread and at all threads (numpy is single-threaded in both). GPU (when present):
the issue's GPU shapes, and two of them with k just above the cut between the small-k block selection and
the radix select, with achieved GB/s (input bytes / time) against the device's measured copy bandwidth.
Data: standard normal float32 (--dtype to change). Every method's values are checked against torch.topk's.

    python bench/bench_topk.py            # all shapes (under a minute on 2 cores)
    python bench/bench_topk.py --quick    # smaller repeat counts
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparse_retrieval as sr  # noqa: E402

CPU_SHAPES = [(1, 10**6, 10), (1, 10**6, 100), (1, 10**6, 1000), (64, 10**5, 10), (64, 10**5, 100),
              (1024, 30522, 64), (256, 262144, 256)]
# Not in the list: small inputs, where the fixed cost of a call (a custom op through the dispatcher)
# shows.
SMALL_SHAPES = [(1, 1000, 10), (32, 1000, 10), (8, 30522, 64)]
GPU_SHAPES = [(256, 262144, 256), (2048, 131072, 1024), (1, 10**7, 100), (8192, 30522, 64)]
# The CUDA kernels take k <= GPU_SMALL_K to the one-pass block selection and larger k to the radix select: the
# same shapes just past the cut compare the two paths.
GPU_SMALL_K = 256
GPU_CUT_SHAPES = [(256, 262144, GPU_SMALL_K + 1), (8192, 30522, GPU_SMALL_K + 1)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def numpy_topk(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The usual numpy idiom: argpartition for the k largest, then sort those k by value."""
    n = a.shape[1]
    part = np.argpartition(a, n - k, axis=1)[:, n - k:]
    vals = np.take_along_axis(a, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1)


def run_cpu(dtype: torch.dtype, repeats: int, thread_counts: list[int]) -> list[dict]:
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for rows, n, k in CPU_SHAPES + SMALL_SHAPES:
        x = torch.randn(rows, n, generator=gen).to(dtype)
        a = x.float().numpy() if dtype != torch.float32 else x.numpy()
        expected = torch.topk(x, k)[0]
        assert torch.equal(sr.topk(x, k)[0], expected), "sparse_retrieval.topk disagrees with torch.topk"
        assert np.array_equal(numpy_topk(a, k)[0], expected.float().numpy()), "numpy disagrees with torch.topk"
        reps = repeats if rows * n <= 10**7 else max(3, repeats // 2)
        for threads in thread_counts:
            methods = {"sparse_retrieval": lambda: sr.topk(x, k), "torch.topk": lambda: torch.topk(x, k),
                       "numpy": lambda: numpy_topk(a, k)}
            with common.threads(threads):
                for name, fn in methods.items():
                    m = common.measure(fn, warmup=3, repeats=reps, min_time=0.05)
                    rows_out.append({"device": "cpu", "threads": threads, "rows": rows, "n": n, "k": k,
                                     "method": name, "median_s": m["median"], "min_s": m["min"],
                                     "GB/s": x.numel() * x.element_size() / m["median"] / 1e9})
    return rows_out


def run_sparsify(repeats: int, threads: int) -> list[dict]:
    """The sparse-autoencoder activation: (1024, 16384) float32, k = 32, forward and forward + backward, against
    torch.topk + scatter."""
    x = torch.randn(1024, 16384, generator=torch.Generator().manual_seed(1)).requires_grad_()

    def torch_sparsify(t, k):
        values, indices = torch.topk(t, k)
        return torch.zeros_like(t).scatter_(-1, indices, values)

    out = []
    with common.threads(threads):
        for name, fn in {"sparse_retrieval": sr.topk_sparsify, "torch.topk": torch_sparsify}.items():
            for mode, call in {"forward": lambda: fn(x, 32),
                               "forward+backward": lambda: fn(x, 32).sum().backward()}.items():
                m = common.measure(call, warmup=1, repeats=repeats)
                out.append({"threads": threads, "pass": mode, "method": name, "median_s": m["median"],
                            "min_s": m["min"]})
    return out


def pivot(results: list[dict]) -> list[dict]:
    """One row per (shape, threads): the three methods' median times and our speedups over the others."""
    by_case: dict[tuple, dict] = {}
    for r in results:
        case = by_case.setdefault((r["rows"], r["n"], r["k"], r["threads"]), {})
        case[r["method"]] = r
    rows = []
    for (n_rows, n, k, threads), m in by_case.items():
        ours = m["sparse_retrieval"]["median_s"]
        rows.append({"rows": n_rows, "n": n, "k": k, "threads": threads, "ours_ms": ours * 1e3,
                     "torch_ms": m["torch.topk"]["median_s"] * 1e3, "numpy_ms": m["numpy"]["median_s"] * 1e3,
                     "ours_GB/s": m["sparse_retrieval"]["GB/s"],
                     "vs_torch": m["torch.topk"]["median_s"] / ours, "vs_numpy": m["numpy"]["median_s"] / ours})
    return rows


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    m = common.measure(lambda: dst.copy_(src), warmup=2, repeats=10, cuda=True)
    return 2 * src.numel() * 4 / m["median"] / 1e9


def run_gpu(dtype: torch.dtype, repeats: int) -> tuple[list[dict], float]:
    rows_out = []
    peak = copy_bandwidth_gbs()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, n, k in GPU_SHAPES + GPU_CUT_SHAPES:
        x = torch.randn(rows, n, generator=gen, device="cuda").to(dtype)
        expected = torch.topk(x, k)[0]
        # The one-read radix select is opt-in until it has passed on a GPU (SPARSE_RETRIEVAL_TOPK_RESIDENT=1).
        one_read = common.with_env(lambda: sr.topk(x, k), "SPARSE_RETRIEVAL_TOPK_RESIDENT", "1")
        assert torch.equal(sr.topk(x, k)[0], expected), "sparse_retrieval.topk disagrees with torch.topk"
        assert torch.equal(one_read()[0], expected), "the one-read top-k disagrees with torch.topk"
        methods = {"sparse_retrieval": lambda: sr.topk(x, k), "sparse_retrieval one-read": one_read,
                   "torch.topk": lambda: torch.topk(x, k)}
        for name, fn in methods.items():
            m = common.measure(fn, warmup=3, repeats=repeats, cuda=True)
            gbs = x.numel() * x.element_size() / m["median"] / 1e9
            path = {"sparse_retrieval": "block select" if k <= GPU_SMALL_K else "radix",
                    "sparse_retrieval one-read": "one-read radix where it fits"}.get(name, "-")
            rows_out.append({"device": "cuda", "threads": "-", "rows": rows, "n": n, "k": k, "method": name,
                             "path": path, "median_s": m["median"], "min_s": m["min"], "GB/s": gbs,
                             "of_copy_bw": gbs / peak})
        del x
    return rows_out, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU shapes even when CUDA is available")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    repeats = 3 if args.quick else 11
    all_threads = torch.get_num_threads()
    thread_counts = sorted({1, all_threads})

    m = common.machine()
    print(f"machine: {m['processor']}, {m['cores']} cores, torch {m['torch']}, SIMD {sr.get_simd_level()}, "
          f"threads {thread_counts}\n")
    results = run_cpu(dtype, repeats, thread_counts)
    print(common.table(pivot(results), ["rows", "n", "k", "threads", "ours_ms", "torch_ms", "numpy_ms", "ours_GB/s",
                                        "vs_torch", "vs_numpy"],
                       title=f"CPU top-k, {args.dtype}, randn (medians; vs_x = x's time / ours)"))
    sparsify = [r for t in thread_counts for r in run_sparsify(repeats, t)]
    common.add_ratios(sparsify, lambda r: (r["threads"], r["pass"]), baseline="torch.topk", out_col="vs_torch")
    print()
    print(common.table(sparsify, ["threads", "pass", "method", "median_s", "min_s", "vs_torch"],
                       title="topk_sparsify (1024, 16384) float32, k=32, vs torch.topk + scatter"))
    payload = {"dtype": args.dtype, "cpu": results, "sparsify": sparsify}

    if torch.cuda.is_available() and not args.no_gpu:
        gpu, peak = run_gpu(dtype, repeats)
        common.add_ratios(gpu, lambda r: (r["rows"], r["n"], r["k"]), baseline="torch.topk", out_col="vs_torch")
        print()
        print(common.table(gpu, ["rows", "n", "k", "method", "path", "median_s", "GB/s", "of_copy_bw",
                                 "vs_torch"],
                           title=f"GPU top-k on {torch.cuda.get_device_name()}, {args.dtype}; copy bandwidth "
                                 f"{peak:.0f} GB/s"))
        payload.update(gpu=gpu, copy_bandwidth_gbs=peak)
    print("\nwrote", common.write_results("topk", payload))


if __name__ == "__main__":
    main()
