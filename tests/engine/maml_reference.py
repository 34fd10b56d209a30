"""Single-process reference of one MAML meta-update: meta_gradient + SharedMomentAdamW.

Plain PyTorch on the full global batches (no DeepSpeed, no ranks), from the same initial model,
tasks and prompts as the engine run of the same RunConfig.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from maml_ds.config import RunConfig
from maml_ds.data.prompts import PromptFormat, build_training_prompt, collate
from maml_ds.data.sampler import TaskSampler
from maml_ds.losses import scored_loss_sum
from maml_ds.meta import SharedMomentAdamW, meta_gradient
from maml_ds.models import build_model, load_tokenizer
from maml_ds.training import load_training_tasks


def reference_update(cfg: RunConfig, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = build_model(cfg.model.name, vocab_size=len(tokenizer), seed=cfg.seed)
    fmt = PromptFormat(method=cfg.data.variant).for_k(cfg.data.num_demonstrations)
    sampler = TaskSampler(
        load_training_tasks(cfg), num_demonstrations=cfg.data.num_demonstrations, seed=cfg.seed
    )
    spec = cfg.method_spec
    k, n = spec.num_inner_steps, spec.num_tasks
    params = dict(model.named_parameters())
    opt = SharedMomentAdamW(
        params.values(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, inner_optimizer=cfg.meta.inner_optimizer,
        outer_optimizer=cfg.meta.outer_optimizer, share_moments=cfg.meta.shared_moments,
    )  # fmt: skip

    def loss_fn(p, batch):
        logits = functional_call(
            model, p, args=(), kwargs={"input_ids": batch["input_ids"],
                                       "attention_mask": batch["attention_mask"]},
        ).logits  # fmt: skip
        total, count = scored_loss_sum(logits, batch)
        return total.sum() / count.sum()

    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    for _ in range(n):
        batches = sampler.take(
            num_batches=2 * k, batch_size=cfg.deepspeed.micro_batch_size * world_size
        )
        encoded = [
            collate([build_training_prompt(tokenizer, p.demonstrations, p.target, fmt) for p in b],
                    tokenizer.pad_token_id)
            for b in batches
        ]  # fmt: skip
        result = meta_gradient(
            loss_fn, {k_: v.detach() for k_, v in params.items()}, encoded[:k], encoded[k:],
            inner_lr=cfg.meta.inner_lr, inner_optimizer=cfg.meta.inner_optimizer,
            second_order="first-order" if spec.first_order else cfg.meta.second_order,
            adam_state=opt.inner_state(params), betas=cfg.optim.betas, eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, fd_mode=cfg.meta.fd_mode,
            fd_scale=cfg.meta.fd_scale,
        )  # fmt: skip
        opt.load_inner_state(params, result.adam_state)
        for name, g in result.grads.items():
            grads[name] += g / n
    for name, p in params.items():
        p.grad = grads[name]
    opt.step()
    moments = {}
    if cfg.meta.outer_optimizer == "adamw":
        moments = {
            key: {name: opt.state[p][key] for name, p in params.items()}
            for key in ("exp_avg", "exp_avg_sq")
        }
    return {"params": {n_: p.detach() for n_, p in params.items()}, "moments": moments}
