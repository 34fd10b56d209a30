"""The MetaICL prompt layout, pinned token by token with a character-level tokenizer.

The tokenizer is built here (no download): one token per character, ids
    <pad>=0 <unk>=1 "\\n"=2 " "=3 a=10 b=11 ... z=35
so `ids("\\nab") == [2, 10, 11]` and every expected sequence below can be read off the text.
"""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from maml_ds.data.prompts import (
    EncodedPrompt,
    PromptFormat,
    build_option_prompts,
    build_prompt,
    build_training_prompt,
    collate,
    encode_demonstrations,
    encode_example,
    encode_target,
    has_no_label,
    join_prompt,
)
from maml_ds.data.reader import Example
from maml_ds.data.tasks import DataError
from maml_ds.losses import mean_scored_loss, scored_loss_sum, scored_token_loss

NL, SP = 2, 3
VOCAB = {"<pad>": 0, "<unk>": 1, "\n": NL, " ": SP} | {
    c: 10 + i for i, c in enumerate(string.ascii_lowercase)
}


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return _wrap(t)


def ids(text: str) -> list[int]:
    """The char-level ids, computed independently of the tokenizer."""
    return [VOCAB[c] for c in text]


def ex(x: str, y: str, options: tuple[str, ...] = ("c", "e", "y")) -> Example:
    return Example(task="t", input=x, output=y, options=options)


DEMOS = [ex("ab", "c"), ex("d", "e")]
DIRECT = PromptFormat()
CHANNEL = PromptFormat(method="channel")


def check(prompt: EncodedPrompt, pieces: list[tuple[str, bool]]) -> None:
    """The prompt is exactly these (text, scored) pieces."""
    expected_ids = [i for text, _ in pieces for i in ids(text)]
    expected_mask = [s for text, s in pieces for _ in text]
    assert prompt.input_ids == expected_ids
    assert prompt.scored_mask == expected_mask


# --- layouts ---------------------------------------------------------------------------------


def test_direct_layout_literal(tok):
    p = build_prompt(tok, DEMOS, "f", "g", DIRECT)
    # x1 | \ny1 | \n\n\nx2 | \ny2 | \n\n\nx_test | \n<option>
    assert p.input_ids == [10, 11, 2, 12, 2, 2, 2, 13, 2, 14, 2, 2, 2, 15, 2, 16]
    assert p.scored_mask == [False] * 14 + [True, True]
    assert p.num_scored == 2


def test_channel_layout(tok):
    p = build_prompt(tok, DEMOS, "f", "g", CHANNEL)
    # y1 | \nx1 | \n\n\ny2 | \nx2 | \n\n\n<option> | \nx_test   (x_test scored)
    check(p, [("c", 0), ("\nab", 0), ("\n\n\ne", 0), ("\nd", 0), ("\n\n\ng", 0), ("\nf", 1)])


def test_no_demonstrations_target_is_first(tok):
    check(build_prompt(tok, [], "f", "g", DIRECT), [("f", 0), ("\ng", 1)])
    check(build_prompt(tok, [], "f", "g", CHANNEL), [("g", 0), ("\nf", 1)])


def test_free_form_has_no_newline_between_input_and_output(tok):
    demos = [ex("ab", "c", ()), ex("d", "e", ())]
    target = ex("f", "g", ())
    direct = build_training_prompt(tok, demos, target, DIRECT)
    check(direct, [("ab", 0), ("c", 0), ("\n\n\nd", 0), ("e", 0), ("\n\n\nf", 0), ("g", 1)])
    channel = build_training_prompt(tok, demos, target, CHANNEL)
    check(channel, [("c", 0), ("ab", 0), ("\n\n\ne", 0), ("d", 0), ("\n\n\ng", 0), ("f", 1)])


def test_labelled_training_prompt_keeps_newline(tok):
    p = build_training_prompt(tok, DEMOS, ex("f", "y"), DIRECT)
    check(p, [("ab", 0), ("\nc", 0), ("\n\n\nd", 0), ("\ne", 0), ("\n\n\nf", 0), ("\ny", 1)])


def test_has_no_label():
    assert has_no_label(())
    assert has_no_label(("", ""))
    assert not has_no_label(("a", ""))


def test_empty_input_direct_gets_two_newlines(tok):
    demos = [ex("", "c"), ex("", "e")]
    p = build_prompt(tok, demos, "", "g", DIRECT)
    # first input: nothing; non-first empty input: "\n\n" instead of "\n\n\n"
    check(p, [("", 0), ("\nc", 0), ("\n\n", 0), ("\ne", 0), ("\n\n", 0), ("\ng", 1)])


def test_empty_input_channel_has_no_separator(tok):
    demos = [ex("", "c"), ex("d", "e")]
    p = build_prompt(tok, demos, "f", "g", CHANNEL)
    check(p, [("c", 0), ("", 0), ("\n\n\ne", 0), ("\nd", 0), ("\n\n\ng", 0), ("\nf", 1)])


def test_space_format_direct(tok):
    fmt = PromptFormat(newlines=False)
    check(
        build_prompt(tok, DEMOS, "f", "g", fmt),
        [("ab", 0), (" c", 0), (" d", 0), (" e", 0), (" f", 0), (" g", 1)],
    )
    check(build_prompt(tok, [], "f", "g", fmt), [("f", 0), (" g", 1)])


def test_space_format_channel(tok):
    fmt = PromptFormat(method="channel", newlines=False)
    check(
        build_prompt(tok, DEMOS, "f", "g", fmt),
        [("c", 0), (" ab", 0), (" e", 0), (" d", 0), (" g", 0), (" f", 1)],
    )
    check(build_prompt(tok, [], "f", "g", fmt), [("g", 0), (" f", 1)])


def test_space_format_ignores_free_form(tok):
    # MetaICL's space format has no "no label" special case: " " still goes before the output.
    fmt = PromptFormat(newlines=False)
    p = build_training_prompt(tok, [ex("ab", "c", ())], ex("d", "e", ()), fmt)
    check(p, [("ab", 0), (" c", 0), (" d", 0), (" e", 1)])


def test_pieces_are_tokenized_separately():
    # A tokenizer that merges runs of newlines: tokenizing the joined text would merge the
    # demonstration output's trailing "\n" with the next "\n\n\n" into one unknown token.
    vocab = dict(VOCAB) | {"\n\n": 4, "\n\n\n": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|[\s\S]"), behavior="isolated")
    merging = _wrap(t)
    p = build_prompt(merging, [ex("a", "b\n")], "c", "d", DIRECT)
    assert p.input_ids == [10, NL, 11, NL, 5, 12, NL, 13]
    assert merging("b\n\n\n\nc", add_special_tokens=False)["input_ids"] == [11, 1, 12]


# --- per-example cap -------------------------------------------------------------------------


def test_demo_input_cut_at_end_output_kept(tok):
    fmt = PromptFormat(max_length_per_example=10, max_length=100)
    x_ids, y_ids = encode_example(tok, "abcdefghij", "kl", fmt, is_first=True)
    assert y_ids == ids("\nkl")  # output piece whole
    assert x_ids == ids("abcde")  # 10 - 2 - 3 = 5 tokens, the START of the input
    x_ids, _ = encode_example(tok, "abcdefghij", "kl", fmt, is_first=False)
    assert x_ids == ids("\n\n\nab")  # the separator counts, and is kept


def test_short_example_untouched(tok):
    fmt = PromptFormat(max_length_per_example=10, max_length=100)
    assert encode_example(tok, "abcde", "kl", fmt, is_first=True) == (ids("abcde"), ids("\nkl"))


def test_channel_cuts_the_input_too(tok):
    fmt = PromptFormat(method="channel", max_length_per_example=10, max_length=100)
    target_ids, scored = encode_target(tok, "abcdefghij", "kl", fmt, has_demonstrations=True)
    assert target_ids == ids("\n\n\nkl" + "\nab")  # 10 - 2 - 5 = 3 input-piece tokens
    assert scored == [False] * 5 + [True] * 3


def test_output_longer_than_the_cap_keeps_its_start(tok):
    fmt = PromptFormat(max_length_per_example=6, max_length=100)
    assert encode_example(tok, "ab", "cdefgh", fmt, is_first=True) == ([], ids("\ncde"))


def test_test_time_cap_uses_longest_option(tok):
    fmt = PromptFormat(max_length_per_example=10, max_length=100)
    example = Example(task="t", input="abcdefghij", output="x", options=("x", "yyy"))
    prompts = build_option_prompts(tok, [], example, fmt)
    # no demonstrations: the input is first; longest option piece "\nyyy" = 4 -> 10 - 2 - 4 = 4
    check(prompts[0], [("abcd", 0), ("\nx", 1)])
    check(prompts[1], [("abcd", 0), ("\nyyy", 1)])


def test_test_time_cap_default_256_without_demonstrations(tok):
    long_input = "a" * 300
    p = build_prompt(tok, [], long_input, "y", DIRECT, max_output_len=2)
    assert len(p.input_ids) == 254  # 252 input tokens + "\ny": within 256
    assert p.input_ids[:252] == ids("a" * 252) and p.num_scored == 2
    assert DIRECT.total_cap(has_demonstrations=False) == 256
    assert DIRECT.total_cap(has_demonstrations=True) == 1024
    # the cap without demonstrations is 256, not 1024
    with pytest.raises(ValueError, match="more than the prompt cap 256"):
        join_prompt([], [5] * 300, [True] * 300, DIRECT, has_demonstrations=False)
    assert len(join_prompt([], [5] * 300, [True] * 300, DIRECT, has_demonstrations=True)) == 300


def test_option_too_long_is_an_error(tok):
    fmt = PromptFormat(max_length_per_example=6, max_length=100)
    example = Example(task="t", input="ab", output="x", options=("x", "yyyyyyy"))
    with pytest.raises(DataError, match="no room is left for the input"):
        build_option_prompts(tok, [], example, fmt)


# --- whole-sequence cap ----------------------------------------------------------------------


def test_total_cap_cuts_prefix_from_the_left(tok):
    fmt = PromptFormat(max_length_per_example=10, max_length=12)
    demos = [ex("ab", "c"), ex("d", "e"), ex("f", "g")]
    full_prefix = ids("ab\nc\n\n\nd\ne\n\n\nf\ng")  # 4 + 6 + 6 = 16 tokens
    assert encode_demonstrations(tok, demos, fmt) == full_prefix
    p = build_prompt(tok, demos, "h", "i", fmt)
    target = ids("\n\n\nh\ni")  # 6 tokens, never cut
    assert len(p.input_ids) == 12
    assert p.input_ids == full_prefix[-6:] + target  # the earliest demonstration tokens went
    assert p.scored_mask == [False] * 10 + [True, True]


def test_join_prompt_errors():
    with pytest.raises(ValueError, match="has_demonstrations=False"):
        join_prompt([1], [2], [True], DIRECT, has_demonstrations=False)
    with pytest.raises(ValueError, match="differ in length"):
        join_prompt([], [2, 3], [True], DIRECT, has_demonstrations=True)


@pytest.mark.parametrize(
    "fmt", [DIRECT, CHANNEL, PromptFormat(newlines=False), PromptFormat("channel", False)]
)
@pytest.mark.parametrize("num_demos", [0, 1, 3])
def test_build_prompt_equals_prefix_plus_target(tok, fmt, num_demos):
    fmt = PromptFormat(fmt.method, fmt.newlines, max_length_per_example=12, max_length=20)
    demos = [ex("abcdefghijklmno", "c"), ex("", "e"), ex("pq", "y")][:num_demos]
    prefix = encode_demonstrations(tok, demos, fmt)
    target = encode_target(tok, "rstuvwxyzabcdef", "y", fmt, has_demonstrations=num_demos > 0)
    joined = join_prompt(prefix, *target, fmt, has_demonstrations=num_demos > 0)
    assert build_prompt(tok, demos, "rstuvwxyzabcdef", "y", fmt) == joined
    assert len(joined.input_ids) <= fmt.total_cap(num_demos > 0)


def test_option_prompts_share_the_prefix(tok):
    example = Example(task="t", input="f", output="e", options=("c", "e", "y"))
    prompts = build_option_prompts(tok, DEMOS, example, CHANNEL)
    prefix = encode_demonstrations(tok, DEMOS, CHANNEL)
    assert len(prompts) == 3
    for option, p in zip(example.options, prompts, strict=True):
        assert p.input_ids[: len(prefix)] == prefix
        check(
            EncodedPrompt(p.input_ids[len(prefix) :], p.scored_mask[len(prefix) :]),
            [("\n\n\n" + option, 0), ("\nf", 1)],
        )


def test_option_prompts_errors(tok):
    with pytest.raises(DataError, match="at least 2"):
        build_option_prompts(tok, DEMOS, Example("t", "f", "c", ("c",)), DIRECT)
    with pytest.raises(DataError, match="nothing to score"):
        build_option_prompts(tok, DEMOS, Example("t", "", "c", ("c", "e")), CHANNEL)


# --- format, collate, losses -----------------------------------------------------------------


def test_prompt_format_validation_lists_every_problem():
    with pytest.raises(ValueError) as err:
        PromptFormat(method="noisy", max_length_per_example=256, max_length=100)
    assert "method must be 'direct' or 'channel'" in str(err.value)
    assert "max_length (100) must be >= max_length_per_example (256)" in str(err.value)
    with pytest.raises(ValueError, match="max_length_per_example must be an int > 2"):
        PromptFormat(max_length_per_example=2)


def test_for_k_is_metaicls_min_rule():
    assert DIRECT.for_k(16).max_length == 1024
    assert DIRECT.for_k(2).max_length == 512
    assert DIRECT.for_k(0) == DIRECT


def test_collate_right_pads():
    batch = collate(
        [EncodedPrompt([5, 6, 7], [False, True, True]), EncodedPrompt([8], [True])], pad_token_id=0
    )
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["scored_mask"].dtype == torch.bool
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["scored_mask"].tolist() == [[False, True, True], [True, False, False]]
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)


def _toy_batch():
    prompts = [
        EncodedPrompt([1, 2, 3, 4], [False, False, True, True]),
        EncodedPrompt([5, 6], [True, True]),  # position 0 is scored but has nothing before it
    ]
    batch = collate(prompts, pad_token_id=0)
    logits = torch.randn(2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return batch, logits


def test_scored_token_loss_is_mean_ce_over_scored_tokens():
    batch, logits = _toy_batch()
    logp = F.log_softmax(logits, dim=-1)
    seq0 = -(logp[0, 1, 3] + logp[0, 2, 4]) / 2  # tokens 3, 4 predicted at positions 1, 2
    seq1 = -logp[1, 0, 6]  # only token 6 is predicted; token 5 (position 0) and pads are not
    losses = scored_token_loss(logits, batch)
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, torch.stack([seq0, seq1]))
    sums, counts = scored_loss_sum(logits, batch)
    assert counts.tolist() == [2, 1]
    # the batch loss weighs tokens, not sequences: (2 * seq0 + seq1) / 3
    torch.testing.assert_close(mean_scored_loss(logits, batch), (2 * seq0 + seq1) / 3)


def test_losses_backpropagate_and_upcast_half():
    batch, logits = _toy_batch()
    logits = logits.to(torch.bfloat16).requires_grad_(True)
    loss = mean_scored_loss(logits, batch)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert logits.grad is not None
    # only the positions that predict scored tokens get a gradient
    touched = logits.grad.abs().sum(-1) > 0
    assert touched.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_losses_check_shapes():
    batch, logits = _toy_batch()
    with pytest.raises(ValueError, match="do not match"):
        scored_token_loss(logits[:, :3], batch)
