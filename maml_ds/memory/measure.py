"""`maml-ds memory --measure`: real training updates of a small model beside the prediction.

Every measurement goes through the training code itself (`maml_ds.training.setup` + the
method's step function) on a synthetic suite written to a temporary folder: MetaICL steps that
accumulate n micro-batches, or MAML meta-updates of n tasks. CPU: `LiveTensorBytes` over
everything `setup` creates; GPU: torch.cuda.max_memory_allocated. docs/memory.md has the numbers.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from maml_ds.config import ConfigError, RunConfig
from maml_ds.memory.facts import model_facts
from maml_ds.memory.model import MemorySetup
from maml_ds.memory.report import build_report, engine_refusal, paper_bytes, with_num_tasks
from maml_ds.models import MEASURE_MODEL

MEASURE_SEQ_LEN = 128
MEASURE_BUCKET = 200_000
"""Small reduction buckets for measurement (docs/memory.md: the default dominates small
models)."""
DEMONSTRATIONS_PER_128_TOKENS = 32
"""Enough that every prompt of the synthetic suite fills its tokens (with MetaICL's 16 one
family stays ~105 tokens per 128)."""


class MeasurementUnavailable(ConfigError):
    """--measure cannot run this combination here."""


def measure_precision(precision: str, on_gpu: bool) -> tuple[str, str | None]:
    """The precision to measure with, and a note when it differs (fp16 needs a GPU)."""
    if precision == "fp16" and not on_gpu:
        return "bf16", "fp16 cannot run on CPU: measured with bf16 (same bytes per element)"
    return precision, None


@dataclass(frozen=True)
class MeasureFixture:
    """Where a small synthetic suite and its BPE tokenizer live (what `setup` reads), with
    enough demonstrations per prompt to fill `seq_len` tokens."""

    root: Path
    seq_len: int = MEASURE_SEQ_LEN

    @property
    def data_dir(self) -> str:
        return str(self.root / "data")

    @property
    def tokenizer_dir(self) -> str:
        return str(self.root / "tokenizer")

    @property
    def num_demonstrations(self) -> int:
        return DEMONSTRATIONS_PER_128_TOKENS * math.ceil(self.seq_len / 128)

    def write(self, seed: int = 0) -> MeasureFixture:
        """Write the suite and train the tokenizer (nothing is downloaded; about a second)."""
        from maml_ds.data.synth import SMALL_SUITE, write_synthetic_suite
        from maml_ds.models import iter_data_texts, train_bpe_tokenizer

        sizes = {
            **SMALL_SUITE,
            "test_examples_per_task": 4,
            "train_examples_per_task": max(
                SMALL_SUITE["train_examples_per_task"], self.num_demonstrations + 1
            ),
        }
        write_synthetic_suite(Path(self.data_dir), seed=seed, **sizes)
        tokenizer = train_bpe_tokenizer(iter_data_texts(self.data_dir), vocab_size=512)
        tokenizer.save_pretrained(self.tokenizer_dir)
        return self


def measure_run_config(
    setup: MemorySetup,
    fixture: MeasureFixture,
    out_dir: str | Path,
    *,
    model: str = MEASURE_MODEL,
    num_micro_batches: int = 1,
    seed: int = 0,
) -> RunConfig:
    """The training config that runs `setup` (one rank's share) on the fixture.

    MetaICL accumulates `num_micro_batches` micro-batches per step; a MAML method's n is in its
    name. Prompts are cut to `setup.seq_len` tokens.
    """
    cfg = RunConfig(method=setup.method, max_steps=2, seed=seed, out_dir=str(out_dir))
    cfg.deterministic = False  # it would set process-wide torch flags
    cfg.model.name, cfg.model.tokenizer = model, fixture.tokenizer_dir
    cfg.model.attn_implementation = setup.attn_implementation
    cfg.model.activation_checkpointing = setup.activation_checkpointing
    cfg.data.data_dir = fixture.data_dir
    cfg.data.num_demonstrations = fixture.num_demonstrations
    cfg.data.max_length = setup.seq_len
    cfg.data.max_length_per_example = min(64, setup.seq_len)
    cfg.meta.second_order = setup.second_order  # type: ignore[assignment]
    cfg.meta.keep_support_gradients = setup.keep_support_gradients
    cfg.meta.adapted_rounding = setup.adapted_rounding
    ds = cfg.deepspeed
    ds.zero_stage, ds.precision = setup.zero_stage, setup.precision
    ds.micro_batch_size = setup.micro_batch_size
    ds.gradient_accumulation_steps = num_micro_batches
    ds.reduce_bucket_size = ds.allgather_bucket_size = setup.reduce_bucket_size
    return cfg


def measure(
    setup: MemorySetup, num_tasks: Sequence[int] = (1, 2, 4, 8), *, seed: int = 0
) -> list[dict[str, Any]]:
    """Measured peak of the measure model beside the prediction, for each n.

    MAML: one meta-update of n tasks; MetaICL: one step accumulating n micro-batches (the
    analogue of n tasks; the prediction is flat in n). This process's world size, the setup's
    ZeRO stage and precision, buckets of MEASURE_BUCKET elements, `measure_update_peak` after
    one warm-up update. What the engine refuses at start-up (maml_ds.config.engine_problems)
    raises MeasurementUnavailable. The process group stays up (the caller ends it).
    """
    import deepspeed

    from maml_ds import distributed as D

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    on_gpu = deepspeed.get_accelerator().device_name() != "cpu"
    precision, note = measure_precision(setup.precision, on_gpu)
    base = replace(
        setup,
        precision=precision,  # type: ignore[arg-type]
        seq_len=min(setup.seq_len, MEASURE_SEQ_LEN),
        num_nodes=1,
        gpus_per_node=1,
        reduce_bucket_size=MEASURE_BUCKET,
    ).validate()
    refusal = engine_refusal(base)  # before anything is started
    if refusal is not None:
        raise MeasurementUnavailable(
            [
                f"--measure --method {setup.method} --zero {setup.zero_stage} --precision "
                f"{precision}: maml_ds.training.maml refuses this at start-up, nothing to measure: "
                f"{refusal}"
            ]
        )
    # DeepSpeed caches its process groups: a re-initialised group breaks them, so the group
    # stays up until the caller ends it (maml_ds.distributed.shutdown).
    D.init_distributed()
    base = replace(base, gpus_per_node=D.world_size())
    facts = model_facts(MEASURE_MODEL)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fixture = MeasureFixture(Path(tmp) / "fixture", base.seq_len).write(seed)
        for n in num_tasks:
            setup_n = with_num_tasks(base, n)
            predicted = build_report(facts, setup_n)
            cfg = measure_run_config(
                setup_n,
                fixture,
                Path(tmp) / f"run-n{n}",
                num_micro_batches=1 if setup_n.is_maml else n,
                seed=seed,
            )
            measured = measure_update_peak(cfg, on_gpu=on_gpu)
            results.append(
                {
                    "num_tasks": n,
                    "method": setup_n.method,
                    "model": MEASURE_MODEL,
                    "num_params": facts.num_params,
                    "seq_len": setup_n.seq_len,
                    "precision": precision,
                    "zero_stage": setup_n.zero_stage,
                    "world_size": setup_n.world_size,
                    "counter": "torch.cuda.max_memory_allocated" if on_gpu else "LiveTensorBytes",
                    "measured_peak_bytes": measured,
                    "predicted_peak_bytes": predicted.predicted_peak_bytes,
                    "predicted_peak_phase": predicted.peak_phase,
                    "ratio": measured / predicted.predicted_peak_bytes,
                    "paper_bytes": paper_bytes(facts, setup_n)[1],
                    "note": note,
                }
            )
    return results


@dataclass
class UpdateMeasurement:
    """This rank's numbers of `measure_updates`."""

    peak_bytes: int
    """Peak over the measured updates (the warm-up excluded; what `setup` left alive counts)."""
    counter: str
    setup_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    reserved_peak_bytes: int | None = None
    """GPU only: torch.cuda.max_memory_reserved."""


def measure_update_peak(cfg: RunConfig, *, on_gpu: bool | None = None) -> int:
    """This rank's peak bytes of one training update of `cfg` after one warm-up update."""
    return measure_updates(cfg, on_gpu=on_gpu).peak_bytes


def measure_updates(
    cfg: RunConfig, *, num_warmup: int = 1, num_steps: int = 1, on_gpu: bool | None = None
) -> UpdateMeasurement:
    """`maml_ds.training.setup(cfg)`, `num_warmup` updates (optimizer state, the engine's
    layout, DeepSpeed's buffers), then the peak bytes and wall time of `num_steps` more.

    CPU: `LiveTensorBytes` over everything from `setup` on (parameter storages a folder load
    creates outside torch ops are added); GPU: torch.cuda.max_memory_allocated minus what was
    allocated before `setup`.
    """
    from maml_ds import distributed as D
    from maml_ds.meta.live_bytes import LiveTensorBytes
    from maml_ds.training import setup, step_function

    if on_gpu is None:
        import deepspeed

        on_gpu = deepspeed.get_accelerator().device_name() != "cpu"
    gc.collect()
    counter = None
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    else:
        counter = LiveTensorBytes().__enter__()
    try:
        started = time.perf_counter()
        ctx = setup(cfg)
        uncounted = 0 if counter is None else _uncounted_parameter_bytes(ctx.engine.module, counter)
        step = step_function(ctx)
        setup_seconds = time.perf_counter() - started
        for _ in range(num_warmup):
            step(ctx)
        D.barrier()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            counter.reset_peak()
        step_seconds = []
        for _ in range(num_steps):
            start = time.perf_counter()
            step(ctx)
            if on_gpu:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - start)
        if on_gpu:
            result = UpdateMeasurement(
                peak_bytes=int(torch.cuda.max_memory_allocated() - base),
                counter="torch.cuda.max_memory_allocated",
                setup_seconds=setup_seconds,
                step_seconds=step_seconds,
                reserved_peak_bytes=int(torch.cuda.max_memory_reserved()),
            )
        else:
            result = UpdateMeasurement(
                peak_bytes=int(counter.peak_bytes + uncounted),
                counter="LiveTensorBytes",
                setup_seconds=setup_seconds,
                step_seconds=step_seconds,
            )
        del ctx, step
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
    gc.collect()
    return result


def _uncounted_parameter_bytes(module: torch.nn.Module, counter: Any) -> int:
    """Bytes of parameter storages the counter did not see created (a model loaded from a
    folder gets storages from the file loader, not from torch ops), each storage once."""
    live = counter._live  # data_ptr -> bytes of the storages it counts
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        storage = p.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() == 0 or ptr in seen or ptr in live:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total
