"""Checkpoints through DeepSpeed, with the state DeepSpeed does not keep, verified before loading.

``engine.save_checkpoint`` / ``load_checkpoint`` hold the model, the optimizer (the shared
moments), the LR schedule and the loss scaler. We add, in ``client_state``: the training
counters, the sampler position, the resolved config and every rank's RNG states (ZeRO 0-2 save
only rank 0's client_state, so per-rank entries are gathered into it).

A save ends with ``manifest.json`` (every file and its size, the step, the world size, the
config), then the ``latest`` pointer, both atomic and written once every rank has finished: a
checkpoint is complete exactly when its manifest matches its files, checkable without unpickling.
A resume takes ``latest`` if complete, else the newest complete one, naming what it passed over
(docs/reliability.md).
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from maml_ds import distributed as D
from maml_ds.files import write_atomic

__all__ = [
    "LATEST",
    "MANIFEST",
    "CheckpointError",
    "Verdict",
    "compatibility_problems",
    "holds_checkpoints",
    "latest_tag",
    "load",
    "resume_choice",
    "save",
    "verify",
]

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
T = TypeVar("T")


class CheckpointError(FileNotFoundError):
    """A checkpoint that should exist does not, is broken, or does not fit this run."""


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names, if that folder exists (complete or not: see `verify`)."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def holds_checkpoints(ckpt_dir: str | Path) -> bool:
    """Anything a run left in ``ckpt_dir``: a ``latest`` file (even empty or dangling) or a
    checkpoint folder (even incomplete)."""
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / LATEST).is_file() or bool(_tag_folders(ckpt_dir))


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save(engine, ckpt_dir: str | Path, tag: str, client_state: dict[str, Any]) -> Path:
    """Save a checkpoint on every rank; write its manifest, then publish it as ``latest``."""
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    states: list[Any] = [None] * D.world_size()
    if dist.is_initialized() and D.world_size() > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    state = dict(client_state, maml_ds_rng=states)
    if D.is_main():  # an old manifest must never describe the files rewritten now
        (tag_dir / MANIFEST).unlink(missing_ok=True)
    D.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    D.barrier()
    if D.is_main():
        files = {
            str(f.relative_to(tag_dir)): f.stat().st_size
            for f in sorted(tag_dir.rglob("*"))
            if f.is_file() and f.name != MANIFEST
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "tag": tag,
            "step": client_state.get("train_state", {}).get("step"),
            "world_size": D.world_size(),
            "config": client_state.get("config"),
            "files": files,
        }
        write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        write_atomic(ckpt_dir / LATEST, tag)
    D.barrier()
    return tag_dir


# --------------------------------------------------------------------------------------------
# Verify and choose
# --------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What `verify` found in one checkpoint folder."""

    tag: str
    manifest: dict[str, Any] | None
    """The manifest when the checkpoint is complete, else None."""
    problem: str | None
    """Why it is not usable (None: complete)."""

    @property
    def step(self) -> int:
        if self.manifest is not None and isinstance(self.manifest.get("step"), int):
            return self.manifest["step"]
        match = re.fullmatch(r"step(\d+)", self.tag)
        return int(match.group(1)) if match else -1


def verify(tag_dir: Path) -> Verdict:
    """Whether ``tag_dir`` is a complete checkpoint: its manifest lists every file with its size."""
    tag = tag_dir.name
    if not tag_dir.is_dir():
        return Verdict(tag, None, "the folder does not exist")
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        empty = not any(tag_dir.iterdir())
        what = "an empty folder" if empty else f"no {MANIFEST}"
        return Verdict(tag, None, f"{what} (its save never finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        return Verdict(tag, None, f"{MANIFEST} is unreadable ({type(err).__name__})")
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return Verdict(tag, None, f"{name} is missing")
        if path.stat().st_size != size:
            got = path.stat().st_size
            return Verdict(tag, None, f"{name} has {got} bytes, the manifest says {size}")
    return Verdict(tag, manifest, None)


def _tag_folders(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return [p for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]


def resume_choice(
    ckpt_dir: str | Path, unloadable: dict[str, str] | None = None
) -> tuple[Verdict | None, list[str]]:
    """The checkpoint a resume takes: the one ``latest`` names when complete, else the newest
    complete one (by step); ``unloadable`` (tag -> reason) are complete ones that failed to load.
    Also one line per checkpoint passed over, with the reason."""
    ckpt_dir = Path(ckpt_dir)
    unloadable = unloadable or {}
    passed_over: list[str] = []

    def usable(verdict: Verdict) -> bool:
        problem = verdict.problem or unloadable.get(verdict.tag)
        if problem is not None:
            passed_over.append(f"checkpoint {verdict.tag} is broken: {problem}")
        return problem is None

    latest_file = ckpt_dir / LATEST
    named = latest_file.read_text().strip() if latest_file.is_file() else None
    if latest_file.is_file() and not named:
        passed_over.append(f"{latest_file} is empty")
    elif named is not None and not (ckpt_dir / named).is_dir():
        passed_over.append(f"{latest_file} names {named!r}, which does not exist")
    elif named is not None and usable(chosen := verify(ckpt_dir / named)):
        return chosen, passed_over
    verdicts = sorted(
        (verify(p) for p in _tag_folders(ckpt_dir) if p.name != named),
        key=lambda v: v.step,
        reverse=True,
    )
    for verdict in verdicts:
        if usable(verdict):
            return verdict, passed_over
    return None, passed_over


_COMPARED = (  # (config key path, flag): what DeepSpeed's checkpoint layout depends on
    (("method",), "--method"),
    (("model", "name"), "--model"),
    (("deepspeed", "zero_stage"), "--zero"),
    (("deepspeed", "precision"), "--precision"),
)


def compatibility_problems(
    manifest: dict[str, Any], config: dict[str, Any], world_size: int
) -> list[str]:
    """One line per setting that differs between a checkpoint and this run and that its state
    cannot be loaded across: method, model, ZeRO stage, precision, and the number of ranks at
    ZeRO 1-3 (DeepSpeed's partitioned files are per rank)."""
    tag, saved = manifest["tag"], manifest.get("config") or {}
    out = []
    for keys, flag in _COMPARED:
        then, now = _get(saved, keys), _get(config, keys)
        if then != now:
            out.append(
                f"checkpoint {tag} was saved with {flag} {then}, this run has {flag} {now}: "
                f"resume with {flag} {then}, or start a new run with another --out"
            )
    then_world = manifest.get("world_size")
    if _get(saved, ("deepspeed", "zero_stage")) != 0 and then_world != world_size:
        out.append(
            f"checkpoint {tag} was saved by {_ranks(then_world)}, this run has "
            f"{_ranks(world_size)}: ZeRO-{_get(saved, ('deepspeed', 'zero_stage'))} keeps "
            f"per-rank files, so resume on {_ranks(then_world)} (deepspeed --num_gpus "
            f"{then_world}), or start a new run with another --out"
        )
    return out


def _ranks(count: Any) -> str:
    return f"{count} rank" if count == 1 else f"{count} ranks"


def _get(tree: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None  # type: ignore[assignment]
    return tree


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    if D.is_main():
        print(message, file=sys.stderr, flush=True)


def load(
    engine, ckpt_dir: str | Path, *, config: dict[str, Any], world_size: int
) -> dict[str, Any]:
    """Load the checkpoint `resume_choice` names into the engine, after checking that it fits
    this run; one that fails to load falls back to the next complete one (a later load
    overwrites everything a failed one had loaded). Returns our client state for this rank. All
    ranks take rank 0's choice (the files are shared)."""
    ckpt_dir = Path(ckpt_dir)
    unloadable: dict[str, str] = {}
    while True:
        choice, passed_over = _on_main(lambda: resume_choice(ckpt_dir, unloadable))
        if choice is None:
            found = ", ".join(sorted(p.name for p in _tag_folders(ckpt_dir))) or "nothing"
            raise CheckpointError(
                f"no checkpoint to resume from in {ckpt_dir} (found: {found}"
                + "".join(f"; {line}" for line in passed_over)
                + "); point --out at the run folder that holds checkpoints/, or start a new "
                "run (without --resume) in another --out"
            )
        assert choice.manifest is not None
        problems = compatibility_problems(choice.manifest, config, world_size)
        if problems:
            raise CheckpointError("\n".join(problems))
        client, error = _try_load(engine, ckpt_dir, choice.tag)
        errors: list[str | None] = [error]
        if dist.is_initialized() and D.world_size() > 1:
            errors = [None] * D.world_size()
            dist.all_gather_object(errors, error)
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if bad:
            unloadable[choice.tag] = f"DeepSpeed could not load it ({'; '.join(bad)})"
            continue
        assert client is not None
        for line in passed_over:
            _log(f"resume: {line}")
        if passed_over:
            _log(f"resuming from {choice.tag} instead, the newest complete checkpoint")
        states = client.get("maml_ds_rng")
        if states:
            set_rng_state(states[min(D.rank(), len(states) - 1)])
        _log(f"resumed from step {choice.step} ({ckpt_dir / choice.tag})")
        return client


def _try_load(engine, ckpt_dir: Path, tag: str) -> tuple[dict[str, Any] | None, str | None]:
    """Load ``tag`` into the engine: (client state, None), or (None, the reason in one line)."""
    try:
        load_path, client = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as err:  # a damaged file (unpickling, shapes): reported, then passed over
        first_line = str(err).splitlines()[0] if str(err) else ""
        return None, f"{type(err).__name__}: {first_line}"
    if load_path is None or client is None:
        return None, "DeepSpeed found no checkpoint there"
    return client, None


def _on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result broadcast to every rank."""
    result = [fn() if D.is_main() else None]
    if dist.is_initialized() and D.world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]  # type: ignore[return-value]
