"""Models, their configs and tokenizers, without downloads: the one model factory.

``--model`` accepts, in this order: a local ``config.json`` of any Hugging Face causal LM
(Llama, Qwen2, Mistral, GPT-2 ...), or a folder holding one and no weights: random init; a
local folder (``save_pretrained`` output, or a maml-ds run/export folder); a built-in
random-init config (``BUILTINS``: ``tiny``, ``tiny-128``, ``tiny-llama``, the GPT-2 family as
``random:gpt2``.. ``random:gpt2-xl``, ``random:llama-1b``, and ``measure-4x256``, the model that
``maml-ds memory --measure`` runs); anything else is a Hugging Face id, downloaded by
transformers only because the user named it. ``model_config`` + ``model_from_config`` build any
of them on a real or the meta device (the memory model sizes models this way, docs/memory.md).
Built-in configs come with a byte-level BPE tokenizer trained locally on the data with
``tokenizers`` and saved next to the run, so later commands (eval, adapt) reuse it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
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


@dataclass(frozen=True)
class LlamaArch:
    """A Llama-style decoder (RMSNorm, rotary positions, SwiGLU MLP, grouped KV heads, untied
    LM head): the modern architectures' shape for tests and GPU checks, random init."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int = 32000
    max_positions: int = 4096

    def to_config(self, vocab_size: int | None = None) -> LlamaConfig:
        return LlamaConfig(
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            vocab_size=vocab_size or self.vocab_size,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of LlamaForCausalLM (embedding and LM head separate)."""
        d, f, V = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = d // self.num_heads * self.num_kv_heads
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o, k, v, MLP, two norms
        return 2 * V * d + self.num_layers * per_layer + d


GPT2_FAMILY: dict[str, Gpt2Arch] = {
    "gpt2": Gpt2Arch(12, 768, 12),
    "gpt2-medium": Gpt2Arch(24, 1024, 16),
    "gpt2-large": Gpt2Arch(36, 1280, 20),
    "gpt2-xl": Gpt2Arch(48, 1600, 25),
}
MEASURE_MODEL = "measure-4x256"
"""The model ``maml-ds memory --measure`` runs: 4 layers x 256 dims, vocab 4096 (4.2M
parameters), small enough for a laptop, with parameters (not activations) dominating."""
BUILTINS: dict[str, Gpt2Arch | LlamaArch] = {
    # vocab_size 0: the locally trained tokenizer's size
    "tiny": Gpt2Arch(2, 64, 2, vocab_size=0),
    "tiny-llama": LlamaArch(2, 64, 176, 4, 2, vocab_size=0, max_positions=1024),
    "random:llama-1b": LlamaArch(16, 2048, 8192, 32, 8),
    "tiny-128": Gpt2Arch(2, 128, 4, vocab_size=0),
    **{f"random:{name}": arch for name, arch in GPT2_FAMILY.items()},
    MEASURE_MODEL: Gpt2Arch(4, 256, 4, vocab_size=4096, n_positions=256),
}
"""Random-init models by name: the one model registry."""
BUILTIN_NAMES = tuple(BUILTINS)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json")


def is_config_only(name: str | Path) -> bool:
    """A local `config.json` (or a folder holding one and no weights): random init from it."""
    path = Path(name)
    if path.is_file():
        return path.suffix == ".json"
    return (path / "config.json").is_file() and not any(
        any(path.glob(pattern)) for pattern in WEIGHT_FILES
    )


def builtin_arch(name: str) -> Gpt2Arch | LlamaArch | None:
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


# --------------------------------------------------------------------------------------------
# Bad model input: one ConfigError line naming the problem and the fix
# --------------------------------------------------------------------------------------------

_READ_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)
"""What transformers raises for unreadable or missing model files (JSONDecodeError and the Hub's
HFValidationError are ValueErrors; a corrupt safetensors file is a SafetensorError)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def check_model_source(name: str | Path, what: str = "--model") -> None:
    """A name that can only be a local path must exist; a folder's config.json must be JSON."""
    text, path = str(name), Path(name).expanduser()
    if not path.exists() and (text.startswith(("/", ".", "~")) or text.count("/") > 1):
        raise ConfigError(
            [
                f"{what} {text}: no such folder; give an existing model folder (save_pretrained "
                f"output or a maml-ds run), a built-in config ({', '.join(BUILTIN_NAMES)}) or a "
                "Hugging Face id"
            ]
        )
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(
                [
                    f"{config} is not valid JSON ({_first_line(err)}); export the model again "
                    f"(save_pretrained) or give {what} another folder"
                ]
            ) from err


@contextmanager
def _reading(what: str, name: str | Path, fix: str) -> Iterator[None]:
    """A user's model files that transformers cannot read -> one ConfigError line."""
    try:
        yield
    except _READ_ERRORS as err:
        raise ConfigError([f"cannot load {what} {name} ({_first_line(err)}); {fix}"]) from err


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerFast:
    check_model_source(path_or_id, "--tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(path_or_id))
    except Exception as err:
        # a file tokenizers' Rust core cannot parse raises a bare Exception; transformers
        # raises KeyError for a tokenizer.json without its keys
        if not isinstance(err, (*_READ_ERRORS, KeyError)) and type(err) is not Exception:
            raise
        raise ConfigError(
            [
                f"cannot load the tokenizer {path_or_id} ({_first_line(err)}); save it again "
                "(save_pretrained) or pass --tokenizer with a working one"
            ]
        ) from err
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
    """The tokenizer for a run: explicit > saved in the run > the model's own > the data
    folder's own (DATA/tokenizer: the synthetic suite's word-level one) > trained here.

    A tokenizer taken from the data or trained here is saved to ``run_dir/tokenizer`` (when
    given) for later commands.
    """
    if tokenizer:
        return load_tokenizer(tokenizer)
    saved = Path(run_dir) / "tokenizer" if run_dir else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    has_tokenizer = Path(model_name).is_dir() and any(Path(model_name).glob("tokenizer*"))
    if builtin_arch(model_name) is None and (has_tokenizer or not is_config_only(model_name)):
        check_model_source(model_name)
        return load_tokenizer(model_name)
    if data_dir is None:
        raise ConfigError(
            [
                f"model {model_name!r} is a built-in random-init config: give --tokenizer, or "
                "--data so a tokenizer can be trained on it"
            ]
        )
    own = Path(data_dir) / "tokenizer"
    if (own / "tokenizer.json").is_file():
        tok = load_tokenizer(own)
    else:
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
    tokenizer's, never below the built-in's own; not rounded up: rows no token uses kept a tiny
    model from learning to copy, docs/pretrain.md), a GPT-2 family id
    (``gpt2-medium``: its published architecture) or a local folder / config.json.
    """
    path = Path(name)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError([f"model folder {path} has no config.json"])
        check_model_source(path)
        with _reading("the model config", path, "export the model again (save_pretrained)"):
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
    return arch.to_config(max(arch.vocab_size, vocab_size or 0))


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
    activation_checkpointing: bool = False,
) -> PreTrainedModel:
    """A model by name: local folder, built-in random-init config, or HF id (see module doc).

    ``dropout`` overrides GPT-2's resid/embd/attn dropout (None keeps the model's own);
    ``activation_checkpointing`` turns on Hugging Face's gradient checkpointing (non-reentrant:
    every backward recomputes each layer's forward, also inside torch.autograd.grad).
    """
    overrides = {} if dropout is None else {k: dropout for k in _DROPOUT_KEYS}
    if is_config_only(model_name):  # any HF architecture's config.json, random init
        config = model_config(model_name)
        for key, value in overrides.items():
            if hasattr(config, key):
                setattr(config, key, value)
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise ConfigError(
                [f"{model_name}: vocab_size {config.vocab_size} < the tokenizer's {vocab_size}"]
            )
        model = model_from_config(
            config, attn_implementation=attn_implementation, dtype=dtype, seed=seed
        )
    elif Path(model_name).is_dir() or builtin_arch(model_name) is None:
        model = _from_pretrained(model_name, attn_implementation, dtype)
        for key, value in overrides.items():
            if hasattr(model.config, key):
                setattr(model.config, key, value)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and dropout is not None:
                module.p = dropout
    else:
        config = model_config(model_name, vocab_size=vocab_size)
        for key, value in overrides.items():
            setattr(config, key, value)
        model = model_from_config(
            config, attn_implementation=attn_implementation, dtype=dtype, seed=seed
        )
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def _from_pretrained(name: str | Path, attn_implementation: str, dtype: torch.dtype):
    check_model_source(name)
    fix = (
        "its files are damaged or incomplete: export or copy the model again"
        if Path(name).is_dir()
        else f"give a local folder, a built-in config ({', '.join(BUILTIN_NAMES)}) or a Hugging "
        "Face id"
    )
    with _reading("model", name, fix):
        return AutoModelForCausalLM.from_pretrained(
            str(name), attn_implementation=attn_implementation, dtype=dtype
        )
