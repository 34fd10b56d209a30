"""Loss evaluations per task of hvp-fd (each one an engine pass on the sharded ZeRO-3 path).

With `keep_support_gradients=1` (the engine's MamlStep passes it) the support gradient at
theta_0 is kept from the forward pass for k >= 2, so the replays of the
reverse pass and its last step do not recompute it: one partition-sized copy saves k - 1
passes per task (docs/engine-bench.md); keeping all k - 1 leaves no replay pass (3k per task).
The result is unchanged (bit-equal: the same pass).
"""

from __future__ import annotations

import pytest
import torch

from maml_ds.meta import meta_gradient

# (inner optimizer, fd mode, support gradients kept) -> passes per task for k = 1..4
EXPECTED = {
    ("adamw", "one-sided", 1): [3, 6, 10, 15],
    ("adamw", "central", 1): [4, 8, 13, 19],
    ("sgd", "one-sided", 1): [3, 6, 10, 15],
    ("adamw", "one-sided", 3): [3, 6, 9, 12],
}


@pytest.mark.parametrize(("inner", "fd_mode", "keep"), list(EXPECTED))
def test_passes_per_task(inner, fd_mode, keep):
    torch.manual_seed(0)
    w = torch.randn(6, 6)
    calls = []

    def loss_fn(params, batch):
        calls.append(1)
        return torch.tanh(batch @ params["w"]).pow(2).mean()

    for k, expected in enumerate(EXPECTED[inner, fd_mode, keep], start=1):
        batches = [torch.randn(4, 6) for _ in range(2 * k)]
        calls.clear()
        result = meta_gradient(
            loss_fn, {"w": w}, batches[:k], batches[k:], inner_lr=1e-2, inner_optimizer=inner,
            second_order="hvp-fd", fd_mode=fd_mode, fd_scale=1e-4,
            keep_support_gradients=keep,
        )  # fmt: skip
        assert len(calls) == expected, k
        exact = meta_gradient(
            loss_fn, {"w": w}, batches[:k], batches[k:], inner_lr=1e-2, inner_optimizer=inner,
            second_order="exact",
        )  # fmt: skip
        rel = (result.grads["w"] - exact.grads["w"]).norm() / exact.grads["w"].norm()
        assert rel < 1e-2, (k, float(rel))
