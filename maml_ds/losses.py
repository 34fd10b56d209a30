"""Losses over the scored tokens of a collated prompt batch (see maml_ds.data.prompts.collate).

Next-token convention: logits[:, t] predict input_ids[:, t + 1], so the targets are
input_ids[:, 1:] and the mask is scored_mask[:, 1:] (a scored token at position 0 has nothing
before it and is never counted). Only the scored positions reach the cross-entropy, so a 1024-token
prompt with a 3-token answer costs 3 rows of log-softmax, not 1024. fp16/bf16 logits are upcast to
float32 for the cross-entropy; float32/float64 are kept as they are (float64 parity tests).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["mean_scored_loss", "scored_loss_sum", "scored_token_loss"]


def scored_loss_sum(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of the cross-entropy over scored tokens, and the number of them.

    logits: [B, T, V]; batch["input_ids"]: [B, T]; batch["scored_mask"]: [B, T].
    Returns (loss_sum [B] in the loss dtype, num_scored [B] long). Use it to normalise by a global
    token count across micro-batches or ranks.
    """
    input_ids = batch["input_ids"]
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)} "
            "as [B, T, V]"
        )
    mask = batch["scored_mask"][:, 1:].to(device=logits.device, dtype=torch.bool)  # [B, T-1]
    targets = input_ids[:, 1:].to(logits.device)[mask]  # [N]
    scored_logits = logits[:, :-1][mask]  # [N, V]
    if scored_logits.dtype in (torch.float16, torch.bfloat16):
        scored_logits = scored_logits.float()
    token_loss = F.cross_entropy(scored_logits, targets, reduction="none")  # [N]
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]  # [N]
    loss_sum = torch.zeros(mask.shape[0], dtype=token_loss.dtype, device=logits.device)
    loss_sum = loss_sum.index_add(0, rows, token_loss)
    return loss_sum, mask.sum(dim=1)


def scored_token_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean per-token cross-entropy over each sequence's scored tokens: [B].

    This is MetaICL's score of an option (lower is better). A sequence without scored tokens
    gets 0 (build_option_prompts refuses to build such prompts).
    """
    loss_sum, num_scored = scored_loss_sum(logits, batch)
    return loss_sum / num_scored.clamp(min=1).to(loss_sum.dtype)


def mean_scored_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropy over all scored tokens of the batch / their number: a scalar.

    Every scored token weighs the same, whichever sequence it is in (the training loss).
    """
    loss_sum, num_scored = scored_loss_sum(logits, batch)
    return loss_sum.sum() / num_scored.sum().clamp(min=1).to(loss_sum.dtype)
