"""Export of the fp32 master weights: `RUN/final` and `maml-ds export`, at ZeRO-0, 2 and 3.

Run as a script (`deepspeed tests/cli/test_export.py worker ...`) it is the ZeRO-3 worker: train,
take the engine's logits, export, compare with the exported model's logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

TRAIN = ["--model", "tiny", "--k", "4", "--max-examples-per-task", "40", "--lr", "1e-3"]


def export(*args, code: int = 0):
    """`maml-ds export ARGS` in this process (it reads files only: no ranks, no engine)."""
    from typer.testing import CliRunner

    from launcher.cli import app

    result = CliRunner().invoke(app, ["export", *map(str, args)])
    assert result.exit_code == code, result.output
    return result


def safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def master(run: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want) - {"lm_head.weight"}  # tied to the embedding: saved once
    for name, tensor in got.items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name


@pytest.fixture(scope="module")
def bf16_run(synth_dir, tmp_path_factory):
    from tests.helpers import maml_ds

    run = tmp_path_factory.mktemp("export") / "bf16"
    maml_ds(
        "train", "--method", "metaicl", "--data", synth_dir, "--out", run, "--max-steps", "2",
        "--zero", "2", "--precision", "bf16", *TRAIN, timeout=300,
    )  # fmt: skip
    return run


def test_final_is_the_fp32_master_at_zero2_bf16(bf16_run):
    want = master(bf16_run, "step2")
    assert_bit_equal(safetensors(bf16_run / "final"), want)
    # ... not the 16-bit module weights upcast (what final/ held before)
    module = torch.load(
        bf16_run / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    assert module["transformer.h.0.mlp.c_fc.weight"].dtype == torch.bfloat16
    assert not torch.equal(
        module["transformer.h.0.mlp.c_fc.weight"].float(), want["transformer.h.0.mlp.c_fc.weight"]
    )
    config = json.loads((bf16_run / "final" / "config.json").read_text())
    assert config["dtype"] == "float32"  # from_pretrained's dtype="auto" loads fp32
    note = json.loads((bf16_run / "final" / "maml_ds_export.json").read_text())
    assert note["run_dir"] == str(bf16_run.resolve()) and note["step"] == 2
    assert (note["zero_stage"], note["precision"], note["dtype"]) == (2, "bf16", "fp32")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_run / "final")
    assert model.dtype == torch.float32
    assert torch.equal(model.transformer.wte.weight.detach(), want["transformer.wte.weight"])


def test_export_command_at_zero2_bf16_and_dtype(bf16_run, tmp_path):
    export(bf16_run, tmp_path / "fp32")
    want = master(bf16_run, "step2")
    assert_bit_equal(safetensors(tmp_path / "fp32"), want)
    assert (tmp_path / "fp32" / "tokenizer.json").is_file()
    note = json.loads((tmp_path / "fp32" / "maml_ds_export.json").read_text())
    assert note["source"] == str((bf16_run / "checkpoints" / "step2").resolve())
    export(bf16_run / "checkpoints" / "step2", tmp_path / "bf16", "--dtype", "bf16")
    got = safetensors(tmp_path / "bf16")
    assert all(torch.equal(t, want[k].to(torch.bfloat16)) for k, t in got.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_refusals(bf16_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = export(bf16_run, tmp_path / "full", code=2)
    assert "already exists and is not empty" in result.stderr
    result = export(bf16_run / "final", tmp_path / "o", code=2)
    assert "not a maml-ds run with checkpoints nor a DeepSpeed checkpoint" in result.stderr


def test_a_stopped_run_can_be_exported(synth_dir, tmp_path):
    """`--stop-after` leaves no final/; export reads its checkpoint (ZeRO-0: the module file)."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import maml_ds

    run = tmp_path / "run"
    maml_ds(
        "train", "--method", "metaicl", "--data", synth_dir, "--out", run, "--max-steps", "4",
        "--stop-after", "2", *TRAIN, timeout=300,
    )  # fmt: skip
    assert not (run / "final").exists()
    export(run, tmp_path / "hf")
    module = torch.load(
        run / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    assert_bit_equal(safetensors(tmp_path / "hf"), module)
    assert json.loads((tmp_path / "hf" / "maml_ds_export.json").read_text())["step"] == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_zero3_export_gives_the_engines_logits(synth_dir, tmp_path):
    """2 ranks at ZeRO-3: final/ (shards consolidated) gives the engine's logits within 1e-6 and
    equals `maml-ds export` of the checkpoint bit for bit."""
    from tests.helpers import deepspeed_run

    run = tmp_path / "run"
    deepspeed_run(Path(__file__), "worker", synth_dir, run, num_ranks=2, timeout=600)
    result = json.loads((run / "logits.json").read_text())
    assert result["max_abs_diff"] < 1e-6, result
    export(run, tmp_path / "hf")
    assert_bit_equal(safetensors(tmp_path / "hf"), master(run, "step2"))
    final = safetensors(run / "final")
    assert all(torch.equal(t, final[k]) for k, t in safetensors(tmp_path / "hf").items())


def _worker(data_dir: str, run_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from maml_ds import distributed as D
    from maml_ds.config import RunConfig
    from maml_ds.training import export_model, fit, setup

    cfg = RunConfig(method="metaicl", out_dir=run_dir, max_steps=2)
    cfg.data.data_dir, cfg.data.num_demonstrations = data_dir, 4
    cfg.data.max_examples_per_task = 40
    cfg.optim.lr = 1e-3
    cfg.deepspeed.zero_stage = 3
    cfg.deepspeed.stage3_param_persistence_threshold = 0  # every parameter partitioned
    ctx = setup(cfg)
    fit(ctx)
    ids = torch.tensor([ctx.tokenizer("input: the cat sat on the mat output: yes")["input_ids"]])
    with torch.no_grad():
        engine_logits = ctx.engine(input_ids=ids).logits.float()
    export_model(ctx, Path(run_dir) / "final")
    if D.is_main():
        model = AutoModelForCausalLM.from_pretrained(Path(run_dir) / "final")
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        diff = float((logits - engine_logits).abs().max())
        (Path(run_dir) / "logits.json").write_text(json.dumps({"max_abs_diff": diff}))
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # set by DeepSpeed
    if args[:1] == ["worker"]:
        _worker(*args[1:3])
