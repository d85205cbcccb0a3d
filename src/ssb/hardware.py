"""The hardware a run uses: device, dtype and CPU threads, chosen once, logged and recorded.

- **dtype** (`model.dtype=auto`): bfloat16 on GPUs with bf16 (float16 on older ones); on CPUs
  bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX-BF16 *and* torch running
  its AVX-512 kernels), else float32. Without native bf16, torch emulates bf16 matmuls: 2-3x
  slower than float32 for a forward pass, and a LoRA backward can fall into torch's scalar
  reference GEMM (`cpublas_gemm_impl`), minutes per step (`ssb bench` measures both).
- **threads** (`model.threads`): torch's intra-op threads follow the physical cores this process
  may run on (its CPU affinity and cgroup quota), divided among the processes of a multi-process
  launch on one machine; hyper-threads add nothing to GEMM-bound work.
- **device** (`model.device=auto`): CUDA when usable, else MPS, else CPU, logged with the reason;
  a GPU asked for but not usable is an error naming the cause, never a silent CPU run.

`hardware_info` is what every run's manifest and every `ssb bench` result record.
"""

from __future__ import annotations

import logging
import os
import platform
from functools import cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ssb")

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class DeviceError(RuntimeError):
    """The configured device cannot be used; the message says why."""


# --------------------------------------------------------------------------- CPU


@cache
def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        if entry:
            cpus.append(entry)
    return cpus


def cpu_model() -> str:
    info = _cpuinfo()
    return (info[0].get("model name") if info else None) or platform.processor() or "unknown"


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels run with ("AVX512", "AVX2", "DEFAULT", ...); the
    environment variable ATEN_CPU_CAPABILITY lowers it (how an AVX2-only CPU is emulated)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: the CPU has AVX512-BF16 or AMX-BF16 (Linux flags)
    and torch runs its AVX-512 kernels (not lowered by ATEN_CPU_CAPABILITY)."""
    info = _cpuinfo()
    flags = set(info[0].get("flags", "").split()) if info else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and cpu_capability().startswith("AVX512")


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 quota (containers), rounded up; None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def physical_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, with hyper-thread siblings
    counted once, capped by a cgroup CPU quota."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = list(range(os.cpu_count() or 1))
    info = _cpuinfo()
    cores = set()
    for cpu in allowed:
        entry = info[cpu] if cpu < len(info) else {}
        core = (entry.get("physical id"), entry.get("core id"))
        cores.add(core if None not in core else ("cpu", cpu))
    count = len(cores) or 1
    limit = _cgroup_cpu_limit()
    return min(count, limit) if limit else count


def local_processes() -> int:
    """Processes of a multi-process launch on this machine (accelerate/torchrun set it)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, or the physical cores available shared among
    the local processes. Returns the number set."""
    n = threads if threads else max(1, physical_cores() // local_processes())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def host_memory() -> tuple[int, int] | None:
    """(available, total) host RAM in bytes, as the kernel counts them (/proc/meminfo's
    MemAvailable: free plus reclaimable cache); None where there is no such file."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * 1024  # the file counts kB
    if "MemAvailable" not in fields or "MemTotal" not in fields:
        return None
    return fields["MemAvailable"], fields["MemTotal"]


# --------------------------------------------------------------------------- device and dtype


def cuda_unusable_reason() -> str | None:
    """Why CUDA cannot be used here (None when it can)."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build"
    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"no GPU is visible (CUDA_VISIBLE_DEVICES={visible!r})"
    try:
        count = torch._C._cuda_getDeviceCount()
    except Exception as exc:  # the driver's own words, e.g. "driver too old"
        return f"CUDA could not start: {exc}"
    if count == 0:
        return "no CUDA device was found (driver missing, or no GPU in this machine)"
    return "torch.cuda.is_available() is False (driver too old for this torch build?)"


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolve `model.device`. "auto": cuda (cuda:$LOCAL_RANK under a multi-process launch) when
    usable, else mps, else cpu, logging the choice and why. A named GPU that cannot be used is a
    `DeviceError` naming the cause."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        reason = cuda_unusable_reason()
        if reason is None:
            # Under `accelerate launch` / torchrun each process takes its own GPU.
            local_rank = os.environ.get("LOCAL_RANK")
            if local_rank is not None and local_rank.isdigit():
                return torch.device("cuda", int(local_rank) % max(torch.cuda.device_count(), 1))
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            log.info("device: mps (CUDA not usable: %s)", reason)
            return torch.device("mps")
        log.info("device: cpu (CUDA not usable: %s)", reason)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"model.device: unknown device {name!r} ({exc})") from None
    if device.type == "cuda":
        reason = cuda_unusable_reason()
        if reason is not None:
            raise DeviceError(f"model.device={name!r}, but CUDA is not usable: {reason}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"model.device: {name!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("model.device: 'mps' requested but MPS is not available")
    return device


def pick_dtype(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """Resolve `model.dtype` ("auto": see the module docstring)."""
    if isinstance(name, torch.dtype):
        return name
    device = torch.device(device) if isinstance(device, str) else device
    key = (name or "auto").strip().lower()
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if key not in _DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r} (auto, bfloat16, float16, float32)")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hardware_info(
    device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """What a figure or a run was made on (the manifest's and `ssb bench`'s `hardware`)."""
    info: dict[str, Any] = {
        "device": str(device) if device is not None else None,
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    emulated = {
        k: os.environ[k]
        for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
        if k in os.environ
    }
    if emulated:
        info["isa_limits"] = emulated
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def cpu_class() -> str:
    """A short label for result tables: "AVX512-BF16" (native bf16) or the torch ISA level."""
    return "AVX512-BF16" if cpu_has_native_bf16() else cpu_capability()
