"""Resolve `--model PATH_OR_RUN` into a model and its tokenizer, for eval and adapt.

Accepted, in this order: a maml-ds run folder (`RUN/final/` if training finished, else its
latest DeepSpeed checkpoint as fp32 weights on a model built from `RUN/config.json`); a
DeepSpeed checkpoint folder (`RUN/checkpoints` or `RUN/checkpoints/stepN`); an exported Hugging
Face folder; a built-in random-init name (needs --tokenizer) or a Hugging Face id (downloaded
only because it was named). DeepSpeed's checkpoint files are read by
`maml_ds.training.zero_layout`. docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from maml_ds.config import ConfigError, RunConfig

__all__ = ["LoadedModel", "load_model"]

logger = logging.getLogger(__name__)

Source = Literal["run-final", "run-checkpoint", "checkpoint", "hf-folder", "builtin", "hub"]
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: Any
    """A causal LM in eval mode on the requested device."""
    tokenizer: Any
    source: Source
    """How `--model` was resolved."""
    path: str
    """The folder (or name) the weights came from."""
    run_dir: Path | None = None
    """The run folder when the model came from one (default place of eval outputs)."""
    run_config: RunConfig | None = None
    """The run's resolved config (its method and variant label the results)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _is_run_dir(path: Path) -> bool:
    raw = _read_json(path / "config.json")
    return isinstance(raw, dict) and {"method", "model", "data"} <= set(raw)


def _is_hf_dir(path: Path) -> bool:
    raw = _read_json(path / "config.json")
    return isinstance(raw, dict) and "model_type" in raw


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied weight (GPT-2's lm_head = wte) may be absent from the saved state.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied or unexpected:
        raise ConfigError(
            [
                f"{where}: weights do not match the model built from the run config "
                f"(missing {untied[:5]}, unexpected {list(unexpected)[:5]})"
            ]
        )


def _model_from_run_config(cfg: RunConfig, tokenizer: Any, attn_implementation: str) -> Any:
    """The architecture of a run, without loading any pretrained weights."""
    from maml_ds.models import build_model, builtin_arch, model_from_config

    name = cfg.model.name
    if Path(name).is_dir() or builtin_arch(name) is None:  # a folder, or the id the run named
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
        return model_from_config(config, attn_implementation=attn_implementation)
    return build_model(
        name, vocab_size=len(tokenizer), seed=cfg.seed, attn_implementation=attn_implementation
    )


def _run_tokenizer(run_dir: Path, cfg: RunConfig | None, tokenizer: str | None) -> Any:
    from maml_ds.models import load_tokenizer, resolve_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    if _has_tokenizer(run_dir / "tokenizer"):
        return load_tokenizer(run_dir / "tokenizer")
    if cfg is None:
        raise ConfigError([f"{run_dir}: no tokenizer/ folder and no config; pass --tokenizer"])
    return resolve_tokenizer(
        cfg.model.name, tokenizer=cfg.model.tokenizer, run_dir=None, data_dir=None
    )


def _from_checkpoint(
    ckpt_dir: Path, tag: str, run_dir: Path, tokenizer: str | None, attn_implementation: str
) -> tuple[Any, Any, RunConfig]:
    from maml_ds.training.zero_layout import checkpoint_client_state, checkpoint_state_dict

    cfg = RunConfig.load(run_dir / "config.json") if _is_run_dir(run_dir) else None
    if cfg is None:
        client = checkpoint_client_state(ckpt_dir / tag) or {}
        raw = client.get("config")
        cfg = RunConfig.from_dict(raw) if isinstance(raw, dict) else None
    if cfg is None:
        raise ConfigError(
            [
                f"{ckpt_dir / tag}: no run config.json beside the checkpoints and none in the "
                "checkpoint; point --model at the run folder"
            ]
        )
    tok = _run_tokenizer(run_dir, cfg, tokenizer)
    model = _model_from_run_config(cfg, tok, attn_implementation)
    _load_state(model, checkpoint_state_dict(ckpt_dir, tag), str(ckpt_dir / tag))
    return model, tok, cfg


def _complete_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint a resume would take (``latest`` if complete, else the newest complete
    one), with a warning for each one passed over (training/checkpoint.py)."""
    from maml_ds.training import checkpoint

    choice, passed_over = checkpoint.resume_choice(ckpt_dir)
    for line in passed_over:
        logger.warning("not using %s", line)
    return None if choice is None else choice.tag


def load_model(
    spec: str | Path,
    *,
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Resolve `--model` (see the module docstring) into a model in eval mode and a tokenizer.

    `tokenizer` overrides the tokenizer found with the model. `device`: default CUDA when
    available, else CPU.
    """
    from maml_ds.models import build_model, builtin_arch, check_model_source, load_tokenizer
    from maml_ds.training import checkpoint
    from maml_ds.training.zero_layout import is_checkpoint_tag

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(spec)
    loaded: LoadedModel
    if path.is_dir() and _is_run_dir(path):
        cfg = RunConfig.load(path / "config.json")
        final = path / "final"
        if _is_hf_dir(final):
            own = final if _has_tokenizer(final) else path / "tokenizer"
            tok = load_tokenizer(tokenizer or own)
            model = build_model(str(final), attn_implementation=attn_implementation)
            loaded = LoadedModel(model, tok, "run-final", str(final), path, cfg)
        else:
            ckpt_dir = path / "checkpoints"
            tag = _complete_tag(ckpt_dir)
            if tag is None:
                raise ConfigError(
                    [
                        f"{path}: a run folder without final/ and without a complete checkpoint "
                        f"in {ckpt_dir}; train it first or point --model at a model folder"
                    ]
                )
            model, tok, cfg = _from_checkpoint(ckpt_dir, tag, path, tokenizer, attn_implementation)
            loaded = LoadedModel(model, tok, "run-checkpoint", str(ckpt_dir / tag), path, cfg)
    elif path.is_dir() and (path / checkpoint.LATEST).is_file():  # RUN/checkpoints
        tag = _complete_tag(path)
        if tag is None:
            raise ConfigError([f"{path}: no complete checkpoint (see the warnings above)"])
        model, tok, cfg = _from_checkpoint(path, tag, path.parent, tokenizer, attn_implementation)
        loaded = LoadedModel(model, tok, "checkpoint", str(path / tag), path.parent, cfg)
    elif path.is_dir() and is_checkpoint_tag(path):  # RUN/checkpoints/stepN
        run_dir = path.parent.parent
        model, tok, cfg = _from_checkpoint(
            path.parent, path.name, run_dir, tokenizer, attn_implementation
        )
        loaded = LoadedModel(model, tok, "checkpoint", str(path), run_dir, cfg)
    elif path.is_dir() and _is_hf_dir(path):
        if tokenizer is None and not _has_tokenizer(path):
            raise ConfigError([f"{path}: a model folder without a tokenizer; pass --tokenizer"])
        tok = load_tokenizer(tokenizer or path)
        model = build_model(str(path), attn_implementation=attn_implementation)
        loaded = LoadedModel(model, tok, "hf-folder", str(path))
        if path.name in ("final", "best") and _is_run_dir(path.parent):  # keep the run's facts
            loaded.run_dir = path.parent
            loaded.run_config = RunConfig.load(path.parent / "config.json")
    elif path.exists():
        check_model_source(path)  # names an unreadable config.json
        raise ConfigError(
            [
                f"--model {spec}: not a maml-ds run folder (config.json + final/ or checkpoints/), "
                "a DeepSpeed checkpoint folder, nor a Hugging Face model folder"
            ]
        )
    elif builtin_arch(str(spec)) is not None:
        if tokenizer is None:
            raise ConfigError(
                [
                    f"--model {spec} is a random-init built-in: pass --tokenizer (e.g. a run's "
                    "tokenizer/ folder)"
                ]
            )
        tok = load_tokenizer(tokenizer)
        model = build_model(str(spec), vocab_size=len(tok), attn_implementation=attn_implementation)
        logger.warning("--model %s: a RANDOMLY initialised model (a built-in config)", spec)
        loaded = LoadedModel(model, tok, "builtin", str(spec))
    else:
        check_model_source(spec)  # a path that does not exist is not a Hugging Face id
        tok = load_tokenizer(tokenizer or str(spec))
        model = build_model(str(spec), attn_implementation=attn_implementation)
        loaded = LoadedModel(model, tok, "hub", str(spec))
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    loaded.model.to(device=device, dtype=torch.float32)
    loaded.model.eval()
    return loaded
