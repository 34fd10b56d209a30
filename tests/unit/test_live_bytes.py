"""LiveTensorBytes: exact live-storage accounting with known allocations and frees."""

from __future__ import annotations

import torch

from maml_ds.meta import LiveTensorBytes


def test_counts_allocations_frees_and_peak() -> None:
    with LiveTensorBytes() as mem:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        assert mem.current_bytes == 4000
        b = torch.zeros(250, 10, dtype=torch.float64)  # 20000 bytes
        assert mem.current_bytes == 24000
        del a
        assert mem.current_bytes == 20000
        c = torch.ones(100, dtype=torch.int8)
        assert mem.current_bytes == 20100
        del b, c
        assert mem.current_bytes == 0
    assert mem.peak_bytes == 24000
    assert mem.num_allocations == 3


def test_views_and_in_place_ops_do_not_count() -> None:
    before = torch.zeros(64, 64)  # allocated outside: never counted
    with LiveTensorBytes() as mem:
        view = before.view(-1)[:100]
        before.add_(1.0)
        view.mul_(2.0)
        transposed = before.t()
        assert mem.current_bytes == 0
        new = before + 1.0  # a new storage: counted once, also through its views
        alias = new[3:].reshape(-1)
        alias.add_(1.0)
        assert mem.current_bytes == 64 * 64 * 4
        del new
        assert mem.current_bytes == 64 * 64 * 4  # `alias` keeps the storage alive
        del alias
        assert mem.current_bytes == 0
    del view, transposed
    assert mem.peak_bytes == 64 * 64 * 4


def test_frees_after_exit_still_count_and_reset_peak() -> None:
    with LiveTensorBytes() as mem:
        kept = torch.empty(512, dtype=torch.float64)
        tmp = torch.empty(1024, dtype=torch.float64)
        del tmp
    assert (mem.current_bytes, mem.peak_bytes) == (4096, 12288)
    mem.reset_peak()
    assert mem.peak_bytes == 4096
    del kept
    assert mem.current_bytes == 0


def training_step_peak(hidden: int) -> tuple[int, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    x = torch.randn(128, 32)
    with LiveTensorBytes() as mem:
        loss = model(x).pow(2).mean()
        loss.backward()
        del loss
    grad_bytes = sum(p.grad.numel() * 4 for p in model.parameters())
    return mem.peak_bytes, mem.current_bytes - grad_bytes


def test_forward_backward_is_exact_and_repeatable() -> None:
    peak, leftover = training_step_peak(256)
    assert (peak, leftover) == training_step_peak(256)
    assert leftover == 0  # after backward only the parameters' .grad remain
    # Activations (128 x 256 floats, twice: linear output and tanh) bound the peak from below.
    assert peak >= 2 * 128 * 256 * 4
    bigger, _ = training_step_peak(512)
    assert bigger > peak


def test_host_side_storages_are_counted_apart() -> None:
    from maml_ds.meta import host_side

    with LiveTensorBytes() as mem:
        device = torch.empty(1000, dtype=torch.float32)
        with host_side():
            host = device.clone()  # what a GPU run keeps in pinned host memory
        assert (mem.current_bytes, mem.host_bytes) == (4000, 4000)
        del host
        assert (mem.current_bytes, mem.host_bytes) == (4000, 0)
        del device
    assert mem.peak_bytes == 4000
