"""Shared fixtures: a small synthetic suite, a locally trained tokenizer, tiny models.

Nothing here downloads: data come from the built-in synthetic generator, the tokenizer is a
byte-level BPE trained on those data, models are random-init GPT-2 configs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds a CPU comm op at start-up; a cache shared with another checkout (other
# include paths) would rebuild it at every process start (~25 s each). One cache per checkout.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from maml_ds.data.synth import SMALL_SUITE, write_synthetic_suite

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_suite(out, seed=0, **SMALL_SUITE)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(synth_dir, tmp_path_factory) -> Path:
    from maml_ds.models import iter_data_texts, train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(iter_data_texts(synth_dir), vocab_size=512).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from maml_ds.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)
