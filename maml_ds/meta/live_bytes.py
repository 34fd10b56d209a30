"""Exact live-tensor-bytes accounting on any device, CPU included.

On CPU neither RSS/VmHWM (glibc keeps freed pages), tracemalloc (does not see torch) nor torch's
MemTracker give a usable peak. `LiveTensorBytes` is a TorchDispatchMode that sees every op: it
adds the bytes of each storage an op creates and subtracts them when the storage dies (a weakref
finalizer on the storage), and keeps the peak.
The numbers are exact and repeatable; compare them between runs (k = 1 vs k = 4, n = 1 vs n = 8)
rather than reading them as absolute process memory. Storages made under `host_side()` (what a
GPU run keeps in host memory, e.g. the moment snapshot) are counted apart, in `host_bytes`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_host = threading.local()


@contextlib.contextmanager
def host_side() -> Iterator[None]:
    """Tensors made in this block live in host memory on a GPU run (pinned CPU copies): on a
    CPU-only run, where host and device are one memory, `LiveTensorBytes` counts them apart."""
    before = getattr(_host, "active", False)
    _host.active = True
    try:
        yield
    finally:
        _host.active = before


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` copied into host memory: pinned and asynchronous from a GPU, a clone on CPU; made
    under `host_side()`, so `LiveTensorBytes` counts it as host bytes."""
    with host_side():
        if t.device.type == "cpu":
            return t.clone()
        pinned = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        return pinned.copy_(t, non_blocking=True)


class LiveTensorBytes(TorchDispatchMode):
    """Count the bytes of tensor storages created inside the context, and their peak.

    Only storages created by ops run inside the context count; tensors that existed before
    (model parameters, inputs) count 0, also when ops return views of them or update them in
    place. A storage counts once, however many tensors view it, until it is freed, also after
    the context has exited (frees after exit still lower `current_bytes`).

    Example::

        with LiveTensorBytes() as mem:
            loss = model(x).sum()
            loss.backward()
        print(mem.peak_bytes, mem.current_bytes)

    Attributes:
        current_bytes: bytes of counted storages alive now.
        peak_bytes: the maximum of current_bytes since entering (or `reset_peak`).
        num_allocations: number of storages counted.
        host_bytes: bytes of storages made under `host_side()` alive now (not in the others).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.num_allocations = 0
        self.host_bytes = 0
        self._host_live: dict[int, int] = {}
        # Live counted storages: data_ptr -> nbytes. A finalizer removes the entry when the
        # storage dies, before the allocator can hand the address out again.
        self._live: dict[int, int] = {}

    def reset_peak(self) -> None:
        """Restart the peak from the bytes alive now."""
        self.peak_bytes = self.current_bytes

    def _release(self, ptr: int) -> None:
        self.current_bytes -= self._live.pop(ptr)

    def _release_host(self, ptr: int) -> None:
        self.host_bytes -= self._host_live.pop(ptr)

    def _track(self, tensor: torch.Tensor, input_ptrs: set[int]) -> None:
        if tensor.device.type == "meta" or tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._live or ptr in self._host_live or ptr in input_ptrs:
            return  # empty, already counted, or a view / in-place result of an input
        if getattr(_host, "active", False):
            self._host_live[ptr] = nbytes
            self.host_bytes += nbytes
            weakref.finalize(storage, self._release_host, ptr)
            return
        self._live[ptr] = nbytes
        self.current_bytes += nbytes
        self.num_allocations += 1
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        weakref.finalize(storage, self._release, ptr)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        flat_inputs, _ = tree_flatten((args, kwargs))
        input_ptrs = {
            t.untyped_storage().data_ptr()
            for t in flat_inputs
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_sparse
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, input_ptrs)
        return out
