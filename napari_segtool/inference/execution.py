"""How the network runs: memory layout, precision, compilation and threads.

Every figure a user feels is the network's forward (and, training, backward) time. This
module decides per job how to run it at the machine's speed; inference and training both use
it, so the two never differ in how a network is executed.

- **Layout.** Channels-last (``torch.channels_last`` in 2D, ``torch.channels_last_3d`` in
  3D) by default on the CPU and CUDA: oneDNN and cuDNN convolutions are faster on it. The
  network's weights and the tensors fed to it are in the same layout, so no convolution
  converts its input. ``"contiguous"`` keeps PyTorch's default layout.
- **Batch norm folded for inference.** :func:`inference_network` works on a copy of the
  network in eval mode and folds each batch norm into the convolution before it (the same
  function to float tolerance, one pass over memory less per layer). The model's own network
  is never changed.
- **Precision.** ``"fp32"``; ``"bf16"`` autocast (CPUs with native bfloat16, e.g. AVX-512
  BF16 or AMX, and CUDA GPUs that support it); ``"fp16"`` autocast (CUDA). ``"auto"`` times
  one batch in float32 and in the device's reduced precision and takes the reduced one only
  when it is at least :data:`REDUCED_PRECISION_GAIN` times faster; the timings are kept in
  the speed cache (:class:`SpeedCache`), so the probe runs once per machine, network and tile.
- **Compilation.** ``torch.compile`` when the job is long enough for its warm-up to pay
  back (:func:`decide_compile`); a failed compilation falls back to eager with one warning.
- **Threads.** :func:`use_all_cores` lets torch use every core the process may run on
  (``os.sched_getaffinity``) unless ``OMP_NUM_THREADS`` says otherwise.
- **Allocator.** :func:`tune_allocator` keeps glibc's malloc from handing every tensor of
  more than 128 KiB back to the kernel when it is freed (each inference layer's output then
  costs fresh page faults; a dask worker's ``MALLOC_TRIM_THRESHOLD_=65536`` makes it worse).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from napari_segtool.errors import InputError
from napari_segtool.inference.tiling import is_out_of_memory
from napari_segtool.io.atomic import atomic_write

logger = logging.getLogger(__name__)

REDUCED_PRECISION_GAIN = 1.15
"""``auto`` takes a reduced precision only when it runs a batch at least this much faster."""

MIN_COMPILE_CALLS = 32
"""``auto`` never compiles a job of fewer network calls than this (a single small image)."""

DEFAULT_COMPILE_WARMUP_S = {"cpu": 25.0, "cuda": 40.0}
"""Compile warm-up assumed before one was measured on this machine (seconds). Measured on the
2-core development CPU: 20 s for the bundled 2D model (batch 8 x 256 x 256, float32)."""

DEFAULT_COMPILE_SPEEDUP = {"cpu": 1.0, "cuda": 1.3}
"""Speed-up of a compiled over an eager call assumed before one was measured on this machine.
On the 2-core development CPU the compiled network was slower in whole jobs than eager
channels-last with batch norms folded (``benchmarks/bench_inference.py``: 2.81 s against
2.32 s, 6.42 s against 5.26 s), so on a CPU ``auto`` compiles only after a ``compile: on``
run has measured a real speed-up there. The CUDA figure is an assumption (no GPU measured)."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- threads


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - macOS, Windows


MMAP_THRESHOLD = 32 << 20
"""Allocations at least this large are mapped by the kernel; smaller ones reuse the heap
(glibc's largest dynamic threshold on 64-bit systems)."""

TRIM_THRESHOLD = 64 << 20
"""Free memory kept at the top of the heap before it is returned to the kernel."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters in glibc's malloc.h


@functools.cache
def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`)
    once per process; returns whether they are set.

    With glibc's defaults, the buffers of an inference pass (tens of MiB per layer, freed
    after the next one) are mapped and unmapped again on every call, so the network pays page
    faults for memory it has just released. Measured on the 2-core development machine,
    ``segment`` on a 32 x 1024 x 1024 OME-Zarr volume took 11.6 and 10.6 s with the defaults
    and 8.4 and 7.9 s with these thresholds, at the same peak memory (412-418 MiB against
    437-453 MiB); a training step is barely changed. Does nothing where the C library is not
    glibc, or when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment (the user tuned it) or
    ``NAPARI_SEGTOOL_MALLOC=default``.
    """
    if (
        platform.system() != "Linux"
        or "MALLOC_MMAP_THRESHOLD_" in os.environ
        or os.environ.get("NAPARI_SEGTOOL_MALLOC") == "default"
        or platform.libc_ver()[0] != "glibc"
    ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # pragma: no cover - no loadable glibc
        return False
    return ok


def use_all_cores() -> int:
    """Let torch's intra-op pool use every usable core; returns the thread count in use.

    Usable cores are the process's CPU affinity (a container or ``taskset`` limit counts), as
    logical CPUs. ``OMP_NUM_THREADS`` in the environment wins: a user or a cluster job that
    limits threads keeps its limit.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = usable_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- layout


def torch_memory_format(spatial_dims: int, memory_format: str) -> torch.memory_format:
    """``channels_last`` (2D) / ``channels_last_3d`` (3D) or ``contiguous_format``."""
    if memory_format == "contiguous":
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def effective_memory_format(memory_format: str, device: torch.device) -> str:
    """Channels-last on the CPU and CUDA; other backends (MPS) keep the default layout."""
    return memory_format if device.type in ("cpu", "cuda") else "contiguous"


def to_memory_format(network: nn.Module, spatial_dims: int, memory_format: str) -> nn.Module:
    """Put the network's 4D (2D) or 5D (3D) weights in the layout, in place; returns it."""
    return network.to(memory_format=torch_memory_format(spatial_dims, memory_format))


def fold_batch_norms(network: nn.Module) -> int:
    """Fold each eval-mode batch norm into the convolution before it, in place.

    Only a convolution directly followed by a batch norm inside an :class:`~torch.nn.Sequential`
    is folded (the pair is then one convolution with a bias, and the norm an identity);
    returns how many were folded. Call it on an eval-mode copy: the folded network computes
    the same function only with the norms' running statistics frozen.
    """
    folded = 0
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for seq in network.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = seq._modules[first], seq._modules[second]
            if isinstance(conv, convs) and isinstance(norm, norms) and norm.track_running_stats:
                seq._modules[first] = fuse_conv_bn_eval(conv, norm)
                seq._modules[second] = nn.Identity()
                folded += 1
    return folded


def inference_network(
    network: nn.Module, spatial_dims: int, *, device: torch.device, memory_format: str
) -> nn.Module:
    """An eval-mode copy of ``network`` on ``device``, batch norms folded, in the layout."""
    net = copy.deepcopy(network).eval()
    with torch.no_grad():
        fold_batch_norms(net)
    net = net.to(device)
    return to_memory_format(net, spatial_dims, effective_memory_format(memory_format, device))


# ----------------------------------------------------------------------------- precision


def supports(precision: str, device: torch.device) -> bool:
    """Whether ``device`` runs ``precision`` natively (fp32 always)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type == "cpu" and precision == "bf16":
        return bool(torch.backends.mkldnn.is_available() and _cpu_has_bf16())
    return False


def _cpu_has_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def reduced_candidate(device: torch.device) -> str | None:
    """The reduced precision ``auto`` considers on ``device``: fp16 on CUDA, bf16 on a CPU
    with native bfloat16, none elsewhere."""
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and supports("bf16", device):
        return "bf16"
    return None


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, saying what it can."""
    if precision in ("auto", "fp32") or supports(precision, device):
        return
    can = [p for p in ("bf16", "fp16") if supports(p, device)]
    alt = " or ".join([*can, "fp32"])
    why = {
        ("fp16", "cpu"): "float16 autocast runs on CUDA GPUs only",
        ("bf16", "cpu"): "this CPU has no native bfloat16 (AVX-512 BF16 or AMX)",
    }.get((precision, device.type), f"{device.type} does not run {precision}")
    raise InputError(f"precision {precision!r} is not available: {why}; use {alt} or auto")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return _DTYPES.get(precision)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; nothing for float32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def time_forward(
    network: nn.Module, example: torch.Tensor, precision: str, *, repeats: int = 2
) -> float:
    """Seconds of one forward of ``example`` (best of ``repeats`` after one warm-up)."""
    dtype = autocast_dtype(precision)
    dev = example.device
    best = math.inf
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(dev)
            t0 = time.perf_counter()
            with autocast(dev, dtype):
                network(example)
            _sync(dev)
            if i:
                best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and why it was chosen."""

    precision: str
    reason: str
    seconds: dict[str, float]  # measured seconds per batch, by precision (may be empty)


def resolve_precision(
    precision: str,
    device: torch.device,
    *,
    measure: Callable[[str], float],
    cache: SpeedCache | None = None,
    key: str = "",
) -> PrecisionChoice:
    """Turn ``"auto"`` into a precision by measuring; check an explicit one.

    ``measure(p)`` returns the seconds of one batch in precision ``p``; with ``auto`` it is
    called for fp32 and the device's reduced candidate unless the cache already holds both.
    """
    check_precision(precision, device)
    if precision != "auto":
        return PrecisionChoice(precision, f"{precision} as asked", {})
    candidate = reduced_candidate(device)
    if candidate is None:
        return PrecisionChoice("fp32", f"fp32: {device.type} has no faster precision", {})
    entry = cache.get(key) if cache is not None else {}
    seconds = {}
    for p in ("fp32", candidate):
        value = entry.get(f"forward_{p}")
        seconds[p] = value if value is not None else measure(p)
    if cache is not None:
        cache.update(key, {f"forward_{p}": s for p, s in seconds.items()})
    gain = seconds["fp32"] / seconds[candidate]
    if gain >= REDUCED_PRECISION_GAIN:
        return PrecisionChoice(
            candidate, f"{candidate}: {gain:.2f}x faster than fp32 on this device", seconds
        )
    return PrecisionChoice("fp32", f"fp32: {candidate} only {gain:.2f}x as fast here", seconds)


# ----------------------------------------------------------------------------- compile


@dataclass(frozen=True)
class CompileDecision:
    """Whether a job compiles its network, and the one-line reason logged."""

    compile: bool
    reason: str


def decide_compile(
    mode: str,
    *,
    calls: int,
    seconds_per_call: float,
    warmup_seconds: float,
    speedup: float,
) -> CompileDecision:
    """Compile when ``on``; with ``auto`` only when the saving beats the warm-up.

    The eager job would take ``calls * seconds_per_call``; compiled it saves the share
    ``1 - 1 / speedup`` of that after a warm-up of ``warmup_seconds``. ``auto`` compiles when
    the saving exceeds the warm-up and the job has at least :data:`MIN_COMPILE_CALLS` calls.

    >>> decide_compile("auto", calls=8, seconds_per_call=0.3, warmup_seconds=20,
    ...                speedup=1.1).compile
    False
    >>> decide_compile("auto", calls=4000, seconds_per_call=0.3, warmup_seconds=20,
    ...                speedup=1.1).compile
    True
    """
    if mode == "off":
        return CompileDecision(False, "compile off: eager")
    if mode == "on":
        return CompileDecision(True, "compile on: compiling")
    if calls < MIN_COMPILE_CALLS:
        return CompileDecision(
            False,
            f"compile auto: eager, too short a job ({calls} network calls; auto compiles from "
            f"{MIN_COMPILE_CALLS})",
        )
    eager = calls * seconds_per_call
    saving = eager * (1.0 - 1.0 / speedup) if speedup > 0 else -math.inf
    detail = (
        f"{calls} network calls x {seconds_per_call:.3g} s = {eager:.0f} s eager; compiled "
        f"{speedup:.2f}x after a {warmup_seconds:.0f} s warm-up"
    )
    if saving > warmup_seconds:
        return CompileDecision(True, f"compile auto: compiling, saves {saving:.0f} s ({detail})")
    return CompileDecision(False, f"compile auto: eager, would not pay back ({detail})")


class NetworkRunner:
    """Calls the network in its layout and precision, compiled when asked.

    A compiled network runs every call with the first call's batch size (shorter batches are
    padded and cropped back) so it compiles once. When compiling or a compiled call fails, the
    runner logs one warning and stays eager from then on: the failed batch is recomputed
    eagerly, except after running out of memory, which is raised so the caller can retry
    with a smaller batch.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        spatial_dims: int,
        device: torch.device,
        precision: str,
        memory_format: str,
        compile: bool = False,
    ) -> None:
        self.network = network
        self.device = device
        self.precision = precision
        self.memory_format = torch_memory_format(
            spatial_dims, effective_memory_format(memory_format, device)
        )
        self.dtype = autocast_dtype(precision)
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.compile_failed: str | None = None
        if compile:
            try:  # torch.compile itself may fail, e.g. importing its backend
                self.compiled = torch.compile(network, dynamic=False)
            except Exception as exc:
                self._fall_back(exc)
        self.batch: int | None = None
        self.warmup_seconds: float | None = None
        self.compiled_seconds: list[float] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        if self.compiled is not None:
            try:
                return self._compiled_call(x)
            except Exception as exc:
                if is_out_of_memory(exc):
                    # the caller retries with a smaller batch; a compiled network padded to
                    # the first batch size would run out again, so run eagerly from now on
                    self.compiled = None
                    self.compile_failed = "out of memory at the compiled batch size"
                    logger.warning("out of memory in the compiled network; running eagerly")
                    raise
                self._fall_back(exc)
        return self._eager(x)

    def _fall_back(self, exc: Exception) -> None:
        """Eager from now on, after one warning naming the compilation's failure."""
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        self.compile_failed = f"{type(exc).__name__}: {first}"
        logger.warning(
            "torch.compile failed (%s); running the network eagerly", self.compile_failed
        )
        self.compiled = None

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self.network(x)

    def _compiled_call(self, x: torch.Tensor) -> torch.Tensor:
        assert self.compiled is not None
        n = x.shape[0]
        if self.batch is None:
            self.batch = n
        if n < self.batch:  # same shape every call: one compilation
            pad = x.new_zeros((self.batch - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=self.memory_format)
        _sync(self.device)
        t0 = time.perf_counter()
        with autocast(self.device, self.dtype):
            y = self.compiled(x) if x.shape[0] == self.batch else self.network(x)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        if self.warmup_seconds is None:
            self.warmup_seconds = seconds
        else:
            self.compiled_seconds.append(seconds)
        return y[:n]


# ----------------------------------------------------------------------------- speed cache


MAX_CACHE_BYTES = 1_000_000


def cache_dir() -> Path:
    """``NAPARI_SEGTOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/napari-segtool`` (``~/.cache``)."""
    explicit = os.environ.get("NAPARI_SEGTOOL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-segtool"


def machine_id(device: torch.device) -> str:
    """What a timing depends on besides the network: the device, its threads and torch."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} {_cpu_name()} {torch.get_num_threads()} threads"
    return f"{device.type} {name} torch {torch.__version__}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or "cpu"


def speed_key(device: torch.device, network_description: str, example_shape: tuple) -> str:
    """A cache key: machine, network (architecture and size) and input batch shape."""
    text = f"{machine_id(device)} | {network_description} | {tuple(example_shape)}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _seconds(value: object) -> float | None:
    """A finite positive number read from the cache, else None (no bools, no huge integers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


class SpeedCache:
    """Timings measured on this machine (seconds per call), kept in a small JSON file.

    The file is checked when read: anything but a dict of dicts of finite positive numbers,
    or a file over :data:`MAX_CACHE_BYTES`, is ignored (and rewritten on the next update).
    Writes are atomic. ``path=None`` keeps the timings in memory only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, dict[str, float]] = self._read()

    @classmethod
    def default(cls) -> SpeedCache:
        return cls(cache_dir() / "speed.json")

    def _read(self) -> dict[str, dict[str, float]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            if self.path.stat().st_size > MAX_CACHE_BYTES:
                return {}
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
            return {}
        if not isinstance(raw, dict):
            return {}
        clean: dict[str, dict[str, float]] = {}
        for key, entry in raw.items():
            if isinstance(key, str) and isinstance(entry, dict):
                clean[key] = {
                    k: s
                    for k, v in entry.items()
                    if isinstance(k, str) and (s := _seconds(v)) is not None
                }
        return clean

    def get(self, key: str) -> dict[str, float]:
        return dict(self._data.get(key, {}))

    def update(self, key: str, values: dict[str, float]) -> None:
        good = {k: float(v) for k, v in values.items() if math.isfinite(v) and v > 0}
        if not good:
            return
        self._data.setdefault(key, {}).update(good)
        if self.path is None:
            return
        text = json.dumps(self._data, indent=1, sort_keys=True).encode()
        try:
            atomic_write(self.path, lambda fh: fh.write(text))
        except OSError as exc:  # a read-only home must not stop a segmentation
            logger.debug("could not write the speed cache %s: %s", self.path, exc)


# ----------------------------------------------------------------------------- one job's plan


@dataclass(frozen=True)
class ExecutionPlan:
    """How one job runs its network, with the reasons, for the log and the result."""

    precision: str
    precision_reason: str
    memory_format: str
    compile: bool
    compile_reason: str
    threads: int
    key: str
    cache: SpeedCache | None
    seconds_per_call: float | None

    def finish(self, runner: NetworkRunner) -> dict[str, object]:
        """Record a compiled run's measured warm-up and speed-up; the plan as a dict."""
        compiled = runner.compiled is not None
        if compiled and runner.warmup_seconds and runner.compiled_seconds:
            steady = sorted(runner.compiled_seconds)[len(runner.compiled_seconds) // 2]
            values = {f"compile_warmup_{self.precision}": runner.warmup_seconds - steady}
            if self.seconds_per_call:
                values[f"compile_speedup_{self.precision}"] = self.seconds_per_call / steady
            if self.cache is not None:
                self.cache.update(self.key, values)
        return {
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "memory_format": self.memory_format,
            "compiled": compiled,
            "compile_reason": self.compile_reason,
            "compile_failed": runner.compile_failed,
            "threads": self.threads,
        }


def plan_execution(
    network: nn.Module,
    *,
    spatial_dims: int,
    description: str,
    device: torch.device,
    precision: str,
    compile: str,
    memory_format: str,
    calls: int,
    batch_shape: tuple[int, ...],
    cache: SpeedCache | None = None,
) -> ExecutionPlan:
    """Decide precision and compilation for a job of ``calls`` network calls on batches of
    ``batch_shape``, measuring on ``network`` (an inference copy) where the cache has nothing.

    ``description`` names the network (architecture and sizes) in the cache key.
    """
    threads = use_all_cores()
    tune_allocator()
    fmt = effective_memory_format(memory_format, device)
    key = speed_key(device, f"{description} {fmt}", batch_shape)
    example = torch.zeros(batch_shape, device=device).contiguous(
        memory_format=torch_memory_format(spatial_dims, fmt)
    )

    def measure(p: str) -> float:
        return time_forward(network, example, p)

    choice = resolve_precision(precision, device, measure=measure, cache=cache, key=key)
    entry = cache.get(key) if cache is not None else {}
    spc = choice.seconds.get(choice.precision) or entry.get(f"forward_{choice.precision}")
    if compile == "auto" and calls >= MIN_COMPILE_CALLS and spc is None:
        spc = measure(choice.precision)
        if cache is not None:
            cache.update(key, {f"forward_{choice.precision}": spc})
    decision = decide_compile(
        compile,
        calls=calls,
        seconds_per_call=spc or 0.0,
        warmup_seconds=entry.get(
            f"compile_warmup_{choice.precision}", DEFAULT_COMPILE_WARMUP_S.get(device.type, 60.0)
        ),
        speedup=entry.get(
            f"compile_speedup_{choice.precision}", DEFAULT_COMPILE_SPEEDUP.get(device.type, 1.0)
        ),
    )
    logger.info(
        "network on %s: %s; %s; %s, %d threads",
        device, choice.reason, decision.reason, fmt.replace("_", "-"), threads,
    )  # fmt: skip
    return ExecutionPlan(
        precision=choice.precision,
        precision_reason=choice.reason,
        memory_format=fmt,
        compile=decision.compile,
        compile_reason=decision.reason,
        threads=threads,
        key=key,
        cache=cache,
        seconds_per_call=spc,
    )
