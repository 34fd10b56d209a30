"""Models, their configs and tokenizers, without downloads: the one model factory.

``--model`` accepts, in this order: a local folder (``save_pretrained`` output, or a maml-ds
run/export folder); a built-in random-init config (``BUILTINS``: ``tiny``, ``tiny-128``, the
GPT-2 family as ``random:gpt2``.. ``random:gpt2-xl``, and ``measure-4x256``, the model that
``maml-ds memory --measure`` runs); anything else is a Hugging Face id, downloaded by
transformers only because the user named it. ``model_config`` + ``model_from_config`` build any
of them on a real or the meta device (the memory model sizes models this way, docs/memory.md).
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
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PretrainedConfig,
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
MEASURE_MODEL = "measure-4x256"
"""The model ``maml-ds memory --measure`` runs: 4 layers x 256 dims, vocab 4096 (4.2M
parameters), small enough for a laptop, with parameters (not activations) dominating."""
BUILTINS: dict[str, Gpt2Arch] = {
    # vocab_size 0: the locally trained tokenizer's size
    "tiny": Gpt2Arch(2, 64, 2, vocab_size=0),
    "tiny-128": Gpt2Arch(2, 128, 4, vocab_size=0),
    **{f"random:{name}": arch for name, arch in GPT2_FAMILY.items()},
    MEASURE_MODEL: Gpt2Arch(4, 256, 4, vocab_size=4096, n_positions=256),
}
"""Random-init models by name: the one model registry."""
BUILTIN_NAMES = tuple(BUILTINS)


def builtin_arch(name: str) -> Gpt2Arch | None:
    """The built-in architecture for a model name (``tiny``, ``random:gpt2``...), or None."""
    if name in BUILTINS:
        return BUILTINS[name]
    if name.startswith("random:"):
        raise ConfigError(
            [f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_NAMES)}"]
        )
    return None


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


def model_config(name: str, *, vocab_size: int | None = None) -> PretrainedConfig:
    """The config of a model name, without downloading anything.

    A built-in (``tiny``, ``random:gpt2``, ``measure-4x256``...: ``vocab_size`` is the
    tokenizer's, rounded up to 64, never below the built-in's own), a GPT-2 family id
    (``gpt2-medium``: its published architecture) or a local folder / config.json.
    """
    path = Path(name)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError([f"model folder {path} has no config.json"])
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch = builtin_arch(name)
    if arch is None and name in GPT2_FAMILY:
        return GPT2_FAMILY[name].to_config()
    if arch is None:
        known = ", ".join([*GPT2_FAMILY, *BUILTIN_NAMES])
        raise ConfigError(
            [
                f"unknown model {name!r}: give a built-in config ({known}) or a local folder (or "
                "config.json) of a Hugging Face model; nothing is downloaded"
            ]
        )
    if arch.vocab_size == 0 and vocab_size is None:
        raise ConfigError([f"model {name!r} needs the tokenizer's vocab size"])
    return arch.to_config(max(arch.vocab_size, _round_up(vocab_size or 0, 64)))


def model_from_config(
    config: PretrainedConfig,
    *,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised causal LM of ``config``, cast to ``dtype`` once built.

    It is initialised in ``config.dtype`` (unset, i.e. fp32, for the built-ins); the one place
    that sets the attention kernel. ``device="meta"`` allocates nothing; ``seed`` initialises
    from ``torch.manual_seed(seed)`` without touching the caller's RNG.
    """
    with torch.random.fork_rng(devices=[], enabled=seed is not None), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype)


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
    if Path(model_name).is_dir() or builtin_arch(model_name) is None:
        model = _from_pretrained(model_name, attn_implementation, dtype)
        for key, value in overrides.items():
            if hasattr(model.config, key):
                setattr(model.config, key, value)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and dropout is not None:
                module.p = dropout
        return model
    config = model_config(model_name, vocab_size=vocab_size)
    for key, value in overrides.items():
        setattr(config, key, value)
    return model_from_config(
        config, attn_implementation=attn_implementation, dtype=dtype, seed=seed
    )


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
