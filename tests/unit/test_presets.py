"""Preset choice from the machine's devices (faked: no GPU needed), the real-launch device
checks, and the ranks' environment on CPU."""

from __future__ import annotations

import pytest

from launcher.presets import PRESETS, Device, device_problems, preset_for_devices

V100_32 = Device("Tesla V100-SXM2-32GB", 31.7)
V100_16 = Device("Tesla V100-PCIE-16GB", 15.8)
A100_80 = Device("NVIDIA A100-SXM4-80GB", 79.2)
H100_80 = Device("NVIDIA H100 80GB HBM3", 79.1)
A100_40 = Device("NVIDIA A100-SXM4-40GB", 39.4)


@pytest.mark.parametrize(
    ("devices", "name", "reason"),
    [
        ([V100_32] * 8, "v100-32gb", "8 x Tesla V100-SXM2-32GB (32 GiB): v100-32gb"),
        ([V100_16] * 4, "v100-16gb", "4 x Tesla V100-PCIE-16GB (16 GiB): v100-16gb"),
        ([A100_80] * 8, "a100-80gb", "8 x NVIDIA A100-SXM4-80GB (79 GiB): a100-80gb (bf16)"),
        ([H100_80], "a100-80gb", "1 x NVIDIA H100 80GB HBM3 (79 GiB): a100-80gb (bf16)"),
        ([A100_40] * 2, "v100-32gb", "no preset of its own, v100-32gb (fp16) fits its memory"),
        ([], "cpu", "no CUDA device on this machine: CPU ranks"),
    ],
)
def test_preset_follows_the_devices(devices, name, reason):
    preset, why = preset_for_devices(devices)
    assert preset.name == name
    assert reason in why


def test_device_problems_of_a_real_launch():
    v100 = PRESETS["v100-32gb"]
    (no_cuda,) = device_problems(v100, 8, [])
    assert no_cuda == (
        "preset v100-32gb needs CUDA, but this machine has no CUDA device "
        "(torch.cuda.is_available() is False): use --preset cpu or launch on a GPU node"
    )
    (too_many,) = device_problems(v100, 8, [V100_32] * 4)
    assert too_many == (
        "--gpus 8 but this machine has 4 CUDA device(s) (Tesla V100-SXM2-32GB): lower --gpus to 4"
    )
    assert device_problems(v100, 8, [V100_32] * 8) == []
    assert device_problems(PRESETS["cpu"], 64, []) == []  # CPU ranks: no device to count


def test_cpu_ranks_share_the_cores():
    cpu = PRESETS["cpu"]
    assert cpu.env(4, {}, 16) == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "4"}
    assert cpu.env(32, {}, 16)["OMP_NUM_THREADS"] == "1"
    assert cpu.env(2, {"OMP_NUM_THREADS": "3"}, 16) == {"DS_ACCELERATOR": "cpu"}  # the user's
    assert PRESETS["a100-80gb"].env(8, {}, 64) == {}
