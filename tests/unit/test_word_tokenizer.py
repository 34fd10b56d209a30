"""The synthetic suite's word-level tokenizer: one token per word, with or without a leading
space, and no [UNK] anywhere in a suite or in its prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from maml_ds.data.prompts import PromptFormat, build_training_prompt
from maml_ds.data.reader import TEST_SEEDS, load_meta_train_examples, load_target_examples
from maml_ds.data.synth import SEP, read_suite_summary
from maml_ds.data.word_tokenizer import EOS, UNK, word_level_tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_one_token_per_word_spaces_removed_newlines_kept() -> None:
    tokenizer = word_level_tokenizer([SEP, "bato", "kimu", "bato"])
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (EOS, EOS, UNK)
    assert (tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1) and len(tokenizer) == 6
    text = "bato kimu [SEP] kimu"
    assert _ids(tokenizer, text) == [4, 5, 3, 5]
    assert tokenizer.decode(_ids(tokenizer, text)) == text
    assert _ids(tokenizer, " bato") == _ids(tokenizer, "bato") == [4]
    assert _ids(tokenizer, "bato\n\n\nkimu") == [4, 2, 2, 2, 5]
    assert _ids(tokenizer, "bato zzz") == [4, 1]
    with pytest.raises(ValueError, match="not a word"):
        word_level_tokenizer(["two words"])


@pytest.fixture(scope="module")
def suite_tokenizer(synth_dir: Path) -> PreTrainedTokenizerFast:
    summary = read_suite_summary(synth_dir)
    assert summary.tokenizer == "tokenizer"
    return PreTrainedTokenizerFast.from_pretrained(synth_dir / summary.tokenizer)


def test_the_suite_tokenizer_knows_every_word_of_every_file(
    synth_dir: Path, suite_tokenizer: PreTrainedTokenizerFast
) -> None:
    summary = read_suite_summary(synth_dir)
    unk = suite_tokenizer.unk_token_id
    for rel in summary.files:
        if rel.endswith(".jsonl"):
            text = (synth_dir / rel).read_text(encoding="utf-8")
            for line in text.splitlines():
                record = json.loads(line)
                for piece in (record["input"], *record["options"]):
                    ids = _ids(suite_tokenizer, piece)
                    assert unk not in ids and len(ids) == len(piece.split()), (rel, piece)
    labels = {w for t in summary.tasks.values() for w in t.options or ()}
    assert labels
    for label in labels:  # the space format puts nothing between an input and its label
        assert _ids(suite_tokenizer, " " + label) == _ids(suite_tokenizer, label) != [unk]
        assert len(_ids(suite_tokenizer, label)) == 1


@pytest.mark.parametrize("newlines", [True, False])
def test_metaicl_prompts_of_the_suite_have_no_unknown_token(
    synth_dir: Path, suite_tokenizer: PreTrainedTokenizerFast, newlines: bool
) -> None:
    summary = read_suite_summary(synth_dir)
    fmt = PromptFormat(newlines=newlines)
    k = summary.parameters["k"]
    for name, task in summary.tasks.items():
        if task.split == "train":
            examples = load_meta_train_examples(synth_dir, name, min_examples=k + 1)
            demos, targets = examples[:k], examples[k:]
        else:
            demos, targets = load_target_examples(synth_dir, name, seed=TEST_SEEDS[0], k=k)
        for target in targets:
            prompt = build_training_prompt(suite_tokenizer, demos, target, fmt)
            assert suite_tokenizer.unk_token_id not in prompt.input_ids, name
