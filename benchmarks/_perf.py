"""Shared by the speed benchmarks: fresh-process runs, memory sampling, FLOP and matmul rates.

Not a benchmark itself. ``bench_inference.py`` and ``bench_finetune.py`` import it (they are
run as scripts from any directory; their own folder is on ``sys.path``, and spawned worker
processes inherit it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import threading
import time
from collections.abc import Callable

MATMUL_N = {"cpu": 2048, "cuda": 4096}
"""Side of the square matrices of the matmul rate: 2048 on the CPU (17 GFLOP a product);
4096 on CUDA, where a 2048 product is too short to keep a large GPU busy."""


def spawn(target: Callable, *args: object) -> object:
    """Run ``target(*args, queue)`` (a module-level function) in a fresh spawned process and
    return what it put on ``queue``. An exception in it is raised here with its traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(target, *args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: still running, or dead without a word
            if not proc.is_alive():
                name = getattr(target, "__name__", target)
                raise RuntimeError(f"{name} died (exit code {proc.exitcode})") from None
    proc.join()
    if isinstance(result, dict) and set(result) == {"worker_error"}:
        raise RuntimeError(
            f"{getattr(target, '__name__', target)} failed:\n" + result["worker_error"]
        )
    return result


def _call(target: Callable, *args: object) -> None:
    queue = args[-1]
    try:
        target(*args)
    except BaseException:
        import traceback

        queue.put({"worker_error": traceback.format_exc()[-4000:]})


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Samples resident memory every 2 ms in a thread; ``peak`` is the maximum seen."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's bfloat16 / AMX / AVX-512 flags (what oneDNN's speed depends on)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def set_threads() -> int:
    """Every usable core for torch's intra-op pool (as the package does), unless
    ``OMP_NUM_THREADS`` is set; the same for every tool measured."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, n or 1))
    return torch.get_num_threads()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    """Where the figures were measured."""
    import torch

    out = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        out["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return out


def _matmul_worker(device: str, n: int, repeats: int, queue: mp.Queue) -> None:
    """GFLOP/s of an ``n x n`` by ``n x n`` product (2 n^3 FLOPs), best of ``repeats``,
    per precision: fp32 and bf16 on the CPU (bf16 only where it runs natively); fp32 (torch's
    default, no TF32), tf32, fp16 and bf16 on CUDA."""
    import torch

    threads = set_threads()
    dev = torch.device(device)
    precisions = ["fp32"]
    if device == "cuda":
        precisions += ["tf32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    elif torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        precisions.append("bf16")
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
              "bf16": torch.bfloat16}  # fmt: skip
    flops = 2.0 * n**3
    # one timed sample is several products where one is very short (a GPU)
    per_sample = 20 if device == "cuda" else 1
    out: dict = {"n": n, "threads": threads, "gflops": {}, "all_gflops": {}}
    for p in precisions:
        tf32 = device == "cuda" and torch.backends.cuda.matmul.allow_tf32
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = p == "tf32"
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dev, dtypes[p])
        b = torch.randn(n, n, generator=gen).to(dev, dtypes[p])
        c = torch.empty(n, n, device=dev, dtype=dtypes[p])
        for _ in range(2):  # warm-up: thread pool, kernels, clocks
            torch.mm(a, b, out=c)
        sync(device)
        rates = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_sample):
                torch.mm(a, b, out=c)
            sync(device)
            rates.append(flops * per_sample / (time.perf_counter() - t0) / 1e9)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        out["gflops"][p] = max(rates)
        out["all_gflops"][p] = [round(r, 1) for r in rates]
    queue.put(out)


def matmul_rates(device: str, *, n: int | None = None, repeats: int = 8) -> dict:
    """The machine's matmul GFLOP/s per precision, measured in a fresh process."""
    return spawn(_matmul_worker, device, n or MATMUL_N[device], repeats)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter`` counts them (a multiply-add is 2;
    convolutions, transposed convolutions and matrix products, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_precision(precision: str, device: str) -> str:
    """The matmul rate a network run in ``precision`` is compared with: on CUDA a float32
    network's convolutions use TF32 when cuDNN allows it (torch's default), so it is compared
    with the TF32 rate there."""
    if precision == "fp32" and device == "cuda":
        import torch

        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return precision
