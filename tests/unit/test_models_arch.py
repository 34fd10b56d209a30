"""Modern architectures without downloads: built-in Llama-style configs and any local HF
config.json (Llama, Qwen2, Mistral, GPT-2) built with random init for train and memory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from maml_ds.memory import model_facts
from maml_ds.models import BUILTINS, build_model, is_config_only, model_config, model_from_config

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 640}  # fmt: skip
CONFIGS = {
    "llama": LlamaConfig(**SMALL),
    "qwen2": Qwen2Config(**SMALL),
    "mistral": MistralConfig(**SMALL),
    "gpt2": GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=640),
}


def test_llama_builtins_count_their_parameters():
    arch = BUILTINS["random:llama-1b"]
    model = model_from_config(model_config("random:llama-1b"), device="meta")
    assert sum(p.numel() for p in model.parameters()) == arch.num_parameters
    assert 1.0e9 < arch.num_parameters < 1.2e9
    tiny = build_model("tiny-llama", vocab_size=512, seed=3)
    assert type(tiny).__name__ == "LlamaForCausalLM" and tiny.config.vocab_size == 512


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_any_local_config_json_is_a_random_init_model(kind, tmp_path):
    CONFIGS[kind].save_pretrained(tmp_path)
    assert is_config_only(tmp_path) and is_config_only(tmp_path / "config.json")
    a = build_model(str(tmp_path), vocab_size=512, seed=5)
    b = build_model(str(tmp_path), vocab_size=512, seed=5)
    assert type(a).config_class is type(CONFIGS[kind])
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name  # seeded: the same model twice
    ids = torch.randint(0, 512, (1, 12))
    assert torch.isfinite(a(input_ids=ids).logits).all()
    facts = model_facts(str(tmp_path))
    assert facts.num_params == sum(p.numel() for p in a.parameters())
    with pytest.raises(Exception, match="vocab_size 640 < the tokenizer's 1000"):
        build_model(str(tmp_path), vocab_size=1000)


def test_a_folder_with_weights_is_not_config_only(tmp_path):
    build_model("tiny", vocab_size=512).save_pretrained(tmp_path)
    assert not is_config_only(tmp_path)


@pytest.mark.parametrize(
    ("method", "zero", "extra"),
    [
        ("metaicl", "3", "--activation-checkpointing"),
        ("fomaml-2-2", "2", "--attn-implementation"),
        ("maml-2-1", "3", "--activation-checkpointing"),
    ],
)
def test_train_a_tiny_llama(method, zero, extra, synth_dir, tokenizer_dir, tmp_path):
    """MetaICL at ZeRO-3 with checkpointing; FOMAML at ZeRO-2 with SDPA (the gather path);
    second-order MAML at ZeRO-3 with checkpointing (the sharded path: Llama's rotary buffers
    need no meta-device shadow there)."""
    from tests.helpers import maml_ds

    out = tmp_path / "run"
    maml_ds(
        "train", "--method", method, "--data", synth_dir, "--setting", "synthetic",
        "--model", "tiny-llama", "--tokenizer", tokenizer_dir, "--out", out, "--max-steps", "2",
        "--k", "4", "--zero", zero, *([extra, "sdpa"] if "attn" in extra else [extra]),
    )  # fmt: skip
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
