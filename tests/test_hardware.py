"""Device, dtype and thread choice (ssb.hardware): what a run uses, and what it records."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ssb import hardware
from ssb.hardware import (
    DeviceError,
    configure_threads,
    cpu_has_native_bf16,
    hardware_info,
    pick_device,
    pick_dtype,
)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_pick_device_without_gpu(no_gpu, caplog):
    caplog.set_level("INFO", logger="ssb")
    assert pick_device("auto") == torch.device("cpu")
    assert "device: cpu (CUDA not usable:" in caplog.text  # the choice is logged with why
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not usable"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="MPS"):
        pick_device("mps")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu-ish")


@pytest.mark.parametrize(
    "cuda_build,visible,count,expected",
    [
        (None, None, 0, "CPU-only build"),
        ("13.0", "", 0, "no GPU is visible"),
        ("13.0", None, RuntimeError("The NVIDIA driver on your system is too old"), "too old"),
        ("13.0", None, 0, "no CUDA device was found"),
    ],
)
def test_cuda_unusable_reason_names_the_cause(
    no_gpu, monkeypatch, cuda_build, visible, count, expected
):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    def device_count():
        if isinstance(count, Exception):
            raise count
        return count

    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", device_count, raising=False)
    assert expected in hardware.cuda_unusable_reason()
    with pytest.raises(DeviceError, match=expected):
        pick_device("cuda")


def test_pick_device_with_gpus(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")  # accelerate launch / torchrun
    assert pick_device("auto") == torch.device("cuda", 2)
    with pytest.raises(DeviceError, match="only 4"):
        pick_device("cuda:5")


def test_pick_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_dtype("float32", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float16", cuda) == torch.float16
    assert pick_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("int8", cpu)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("auto", torch.device("mps")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("auto", cuda) == torch.float16


def test_native_bf16_needs_the_flag_and_the_kernels(monkeypatch):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: [{"flags": "fpu avx2 avx512f avx512_bf16"}])
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX512")
    assert cpu_has_native_bf16()
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not cpu_has_native_bf16()
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: [{"flags": "fpu avx2 avx512f"}])
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX512")
    assert not cpu_has_native_bf16()


def test_emulated_avx2_is_seen_by_torch():
    """ATEN_CPU_CAPABILITY=avx2 (how the AVX2-only figures are reproduced on a newer CPU) lowers
    torch's kernels, and the dtype choice follows: float32."""
    code = (
        "import torch; from ssb.hardware import cpu_capability, pick_dtype;"
        "print(cpu_capability(), pick_dtype('auto', torch.device('cpu')))"
    )
    env = {"ATEN_CPU_CAPABILITY": "avx2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["AVX2", "torch.float32"]


def test_physical_cores_count_siblings_once(monkeypatch):
    # 4 logical CPUs: two cores with two hyper-threads each
    info = [{"physical id": "0", "core id": str(c)} for c in (0, 1, 0, 1)]
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: info)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(hardware, "_cgroup_cpu_limit", lambda: None)
    assert hardware.physical_cores() == 2
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0})  # taskset -c 0
    assert hardware.physical_cores() == 1
    info8 = [{"physical id": "0", "core id": str(c)} for c in range(8)]
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: info8)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert hardware.physical_cores() == 8  # a laptop with 8 cores runs on 8
    monkeypatch.setattr(hardware, "_cgroup_cpu_limit", lambda: 3)  # a container's quota
    assert hardware.physical_cores() == 3


def test_configure_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(hardware, "physical_cores", lambda: 8)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert configure_threads(None) == 8 == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share the cores
        assert configure_threads(None) == 4 == torch.get_num_threads()
        assert configure_threads(3) == 3 == torch.get_num_threads()  # model.threads wins
    finally:
        torch.set_num_threads(before)


def test_hardware_info_fields():
    info = hardware_info(torch.device("cpu"), torch.float32)
    for key in ("device", "dtype", "cpu", "cpu_capability", "native_bf16", "torch_threads"):
        assert key in info
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["torch_threads"] == torch.get_num_threads()
