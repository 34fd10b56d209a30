"""Models and tokenizers without downloads.

``--model`` accepts, in this order:

1. a local folder (``save_pretrained`` output, or a maml-ds run/export folder);
2. a built-in random-init config: ``tiny`` (2 layers x 64 dims), ``tiny-128`` (2 x 128), or
   ``random:gpt2`` / ``random:gpt2-medium`` / ``random:gpt2-large`` / ``random:gpt2-xl``
   (the GPT-2 family architectures, random init);
3. anything else is a Hugging Face id (e.g. ``gpt2-medium``), downloaded by transformers only
   because the user named it.

Built-in configs come with a byte-level BPE tokenizer trained locally on the data with
``tokenizers`` and saved next to the run, so later commands (eval, adapt) reuse it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from maml_ds.config import ConfigError

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Gpt2Arch:
    """Architecture facts of a GPT-2 family member."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 50257
    n_positions: int = 1024

    def to_config(self, vocab_size: int | None = None) -> GPT2Config:
        return GPT2Config(
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            vocab_size=vocab_size or self.vocab_size,
            n_positions=self.n_positions,
            bos_token_id=0,
            eos_token_id=0,
        )

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of GPT2LMHeadModel (tied LM head counted once)."""
        d, L, V, P = self.n_embd, self.n_layer, self.vocab_size, self.n_positions
        per_layer = 12 * d * d + 13 * d  # attn qkv+proj, mlp fc+proj, 2 layer norms, biases
        return V * d + P * d + L * per_layer + 2 * d


GPT2_FAMILY: dict[str, Gpt2Arch] = {
    "gpt2": Gpt2Arch(12, 768, 12),
    "gpt2-medium": Gpt2Arch(24, 1024, 16),
    "gpt2-large": Gpt2Arch(36, 1280, 20),
    "gpt2-xl": Gpt2Arch(48, 1600, 25),
}
# Tiny configs: vocab_size is replaced by the locally trained tokenizer's size.
TINY: dict[str, Gpt2Arch] = {
    "tiny": Gpt2Arch(2, 64, 2, vocab_size=0),
    "tiny-128": Gpt2Arch(2, 128, 4, vocab_size=0),
}
BUILTIN_NAMES = tuple(TINY) + tuple(f"random:{name}" for name in GPT2_FAMILY)


def builtin_arch(name: str) -> Gpt2Arch | None:
    """The built-in architecture for a model name (``tiny``, ``random:gpt2``...), or None."""
    if name in TINY:
        return TINY[name]
    if name.startswith("random:"):
        base = name.removeprefix("random:")
        if base not in GPT2_FAMILY:
            raise ConfigError(
                [f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_NAMES)}"]
            )
        return GPT2_FAMILY[base]
    return None


def arch_by_name(name: str) -> Gpt2Arch | None:
    """Architecture facts for names used by the memory report: gpt2.., tiny, random:gpt2.."""
    return GPT2_FAMILY.get(name) or builtin_arch(name)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained locally on ``texts`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def iter_data_texts(data_dir: str | Path, max_lines_per_file: int = 4096) -> Iterator[str]:
    """Inputs, outputs and options of every ``*.jsonl`` under a MetaICL data folder."""
    files = sorted(Path(data_dir).glob("*/*.jsonl"))
    if not files:
        raise ConfigError(
            [
                f"no MetaICL data (*/*.jsonl) under {data_dir} to train a tokenizer on; "
                "create data with `maml-ds data synth --out DIR` or pass --tokenizer"
            ]
        )
    for path in files:
        with path.open() as fh:
            for i, line in enumerate(fh):
                if i >= max_lines_per_file:
                    break
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the reader reports malformed lines with file:line
                if not isinstance(row, dict):
                    continue
                yield str(row.get("input", ""))
                yield str(row.get("output", ""))
                for option in row.get("options") or []:
                    yield str(option)


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(str(path_or_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_tokenizer(
    model_name: str,
    *,
    tokenizer: str | None,
    run_dir: str | Path | None,
    data_dir: str | Path | None,
) -> PreTrainedTokenizerFast:
    """The tokenizer for a run: explicit > saved in the run > the model's own > trained here.

    A tokenizer trained here is saved to ``run_dir/tokenizer`` (when given) for later commands.
    """
    if tokenizer:
        return load_tokenizer(tokenizer)
    saved = Path(run_dir) / "tokenizer" if run_dir else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    if builtin_arch(model_name) is None:
        return load_tokenizer(model_name)
    if data_dir is None:
        raise ConfigError(
            [
                f"model {model_name!r} is a built-in random-init config: give --tokenizer, or "
                "--data so a tokenizer can be trained on it"
            ]
        )
    tok = train_bpe_tokenizer(iter_data_texts(data_dir))
    if saved is not None:
        saved.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(saved)
    return tok


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(
    model_name: str,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    dropout: float | None = 0.0,
) -> PreTrainedModel:
    """A model by name: local folder, built-in random-init config, or HF id (see module doc).

    ``dropout`` overrides GPT-2's resid/embd/attn dropout (None keeps the model's own).
    """
    overrides = {} if dropout is None else {k: dropout for k in _DROPOUT_KEYS}
    path = Path(model_name)
    arch = None if path.is_dir() else builtin_arch(model_name)
    if arch is None:
        model = _from_pretrained(model_name, attn_implementation, dtype)
        for key, value in overrides.items():
            if hasattr(model.config, key):
                setattr(model.config, key, value)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and dropout is not None:
                module.p = dropout
        return model
    if arch.vocab_size == 0 and vocab_size is None:
        raise ConfigError([f"model {model_name!r} needs the tokenizer's vocab size"])
    vocab = max(arch.vocab_size, _round_up(vocab_size or 0, 64))
    config = arch.to_config(vocab)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(dtype)


_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def _from_pretrained(name: str | Path, attn_implementation: str, dtype: torch.dtype):
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(name), attn_implementation=attn_implementation, dtype=dtype
        )
    except OSError as err:
        raise ConfigError(
            [
                f"cannot load model {str(name)!r} ({err}); give a local folder, a built-in config "
                f"({', '.join(BUILTIN_NAMES)}) or a Hugging Face id"
            ]
        ) from err


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
