"""What the memory model knows about a model, read on the meta device (nothing allocated).

Parameter counts come from the model's config (`maml_ds.models.model_config`: a built-in, a
GPT-2 family id or a local folder; nothing is downloaded); activation bytes from one forward on
the meta device under a saved-tensors hook. docs/memory.md says how each number is used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from maml_ds.models import model_config, model_from_config

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TINY_VOCAB = 2048
"""Vocabulary assumed for the tiny built-ins (their tokenizer is trained locally, <= 2048)."""


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of a causal LM, read from its config (parameters counted on the meta device)."""

    name: str
    num_params: int
    """Trainable parameters, each shared tensor once (GPT-2's tied LM head)."""
    largest_layer_params: int
    """Most parameters held directly by one module (DeepSpeed's ZeRO-3 'largest layer')."""
    largest_tensor_params: int
    """The biggest single parameter tensor (the per-tensor optimizer scratch at ZeRO-0)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    max_positions: int

    def s_theta(self, precision: str) -> int:
        """S(theta): bytes of one copy of the parameters in `precision`."""
        return self.num_params * DTYPE_BYTES[precision]


def load_model_config(name: str, *, vocab_size: int | None = None) -> PretrainedConfig:
    """`maml_ds.models.model_config`, the tiny built-ins defaulting to DEFAULT_TINY_VOCAB."""
    return model_config(name, vocab_size=DEFAULT_TINY_VOCAB if vocab_size is None else vocab_size)


def model_facts(name: str, *, vocab_size: int | None = None) -> ModelFacts:
    """Parameter counts of a model, from its config only (built on the meta device)."""
    config = load_model_config(name, vocab_size=vocab_size)
    model = model_from_config(config, device="meta")
    params = [p for p in model.parameters() if p.requires_grad]  # each shared tensor once
    largest_layer = max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
    )

    def attr(*names: str, default: int = 0) -> int:
        for n in names:
            value = getattr(config, n, None)
            if isinstance(value, int):
                return value
        return default

    return ModelFacts(
        name=name,
        num_params=sum(p.numel() for p in params),
        largest_layer_params=int(largest_layer),
        largest_tensor_params=max(p.numel() for p in params),
        num_layers=attr("num_hidden_layers", "n_layer"),
        hidden_size=attr("hidden_size", "n_embd"),
        num_heads=attr("num_attention_heads", "n_head"),
        vocab_size=attr("vocab_size"),
        max_positions=attr("max_position_embeddings", "n_positions", "n_ctx"),
    )


def all_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position (fp16/bf16 logits upcast, as
    maml_ds.losses does). Every token scored: an upper bound of MetaICL's scored tokens, and a
    shape the meta device can run (no data-dependent masking)."""
    vocab = logits.shape[-1]
    scored = logits[:, :-1].reshape(-1, vocab)  # [B*(T-1), V]
    if scored.dtype in (torch.float16, torch.bfloat16):
        scored = scored.float()
    return torch.nn.functional.cross_entropy(scored, input_ids[:, 1:].reshape(-1))


def count_activation_bytes(
    config: PretrainedConfig,
    *,
    seq_len: int,
    micro_batch_size: int,
    precision: str,
    attn_implementation: str,
    activation_checkpointing: bool = False,
) -> int:
    """Bytes autograd saves for backward in one forward + loss, plus the logits tensor.

    Runs the real model on the meta device with a saved-tensors hook and adds each saved
    tensor's storage once (views count their base). `sdpa` is counted as a fused kernel keeps
    it: the eager model's saved tensors without the [batch, heads, seq, seq] attention
    probabilities, plus each layer's fp32 log-sum-exp [batch, heads, seq] (the meta device has
    no fused kernel to run). With `activation_checkpointing` each layer
    keeps only its input (micro x seq x hidden), and one layer at a time is recomputed: the
    count is the rest of the model (embeddings, final norm, logits, loss) + L inputs + one layer,
    from the counts of the same model with 1 and 2 layers.
    """
    if activation_checkpointing:
        one, two = (
            count_activation_bytes(
                _with_layers(config, n), seq_len=seq_len, micro_batch_size=micro_batch_size,
                precision=precision, attn_implementation=attn_implementation,
            )
            for n in (1, 2)
        )  # fmt: skip
        per_layer = two - one
        layer_input = micro_batch_size * seq_len * _hidden_size(config) * DTYPE_BYTES[precision]
        return (one - per_layer) + _num_layers(config) * layer_input + per_layer
    fused = attn_implementation == "sdpa"
    model = model_from_config(
        config, attn_implementation="eager", dtype=TORCH_DTYPES[precision], device="meta"
    )
    model.train()
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    saved: dict[int, tuple[torch.Tensor, int]] = {}
    param_ids = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        square = t.dim() == 4 and tuple(t.shape[-2:]) == (seq_len, seq_len)
        if fused and square:
            return t
        if id(t) not in param_ids and id(base) not in param_ids:
            saved[id(base)] = (base, base.numel() * base.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        all_token_loss(logits, ids)
    logits_bytes = logits.numel() * logits.element_size()
    if id(logits) not in saved and (logits._base is None or id(logits._base) not in saved):
        saved[id(logits)] = (logits, logits_bytes)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    logsumexp = _num_layers(config) * micro_batch_size * heads * seq_len * 4 if fused else 0
    return sum(nbytes for _, nbytes in saved.values()) + logsumexp


def _num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def _hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def _with_layers(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    out = copy.deepcopy(config)
    out.num_hidden_layers = num_layers  # GPT-2's n_layer through its attribute map
    return out


_ACTIVATION_CACHE: dict[tuple, int] = {}


def activation_bytes(
    facts: ModelFacts,
    *,
    seq_len: int,
    micro_batch_size: int,
    precision: str,
    attn_implementation: str,
    activation_checkpointing: bool = False,
) -> int:
    """`count_activation_bytes` for a model of `model_facts` (cached)."""
    key = (
        facts.name, facts.vocab_size, seq_len, micro_batch_size, precision, attn_implementation,
        activation_checkpointing,
    )  # fmt: skip
    if key not in _ACTIVATION_CACHE:
        config = load_model_config(facts.name)
        if facts.vocab_size:  # what the facts were counted with (tiny: the tokenizer's)
            config.vocab_size = facts.vocab_size
        _ACTIVATION_CACHE[key] = count_activation_bytes(
            config,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            precision=precision,
            attn_implementation=attn_implementation,
            activation_checkpointing=activation_checkpointing,
        )
    return _ACTIVATION_CACHE[key]
