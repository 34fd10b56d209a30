r"""The MetaICL prompt: demonstrations + one target example, as token ids with a scored mask.

Layout (docs/evaluation.md, "What is computed"). `|` separates pieces; each piece is tokenized
on its own with `add_special_tokens=False` and the token lists are concatenated; no BOS/EOS,
also with tokenizers that add a BOS themselves (Llama, Mistral): none appears inside a prompt,
and none is put at position 0 (random-init models need none; a pretrained Llama's BOS is not
added):

    direct:  x1 | \ny1 | \n\n\nx2 | \ny2 | ... | \n\n\nx_test | \n<option>   (option scored)
    channel: y1 | \nx1 | \n\n\ny2 | \nx2 | ... | \n\n\n<option> | \nx_test   (x_test scored)

Separator rules (as in MetaICL's `_prepro_each_datapoint`, newline format):
- direct: a non-first input gets "\n\n\n" before it ("\n\n" when the input is empty); the
  output (and every option) gets "\n" unless the example has no label (options all "", e.g.
  `[]` for free-form tasks), in which case input and output touch.
- channel: a non-first output (and every option) gets "\n\n\n"; the input gets "\n" unless it
  is empty or the example has no label.
Space format (`newlines=False`, MetaICL's original format, used for the Raw-LM baselines):
- direct: a non-first input gets " "; the output (every option) always gets " ".
- channel: a non-first output (every option) gets " "; the input always gets " ".
"The first" is the first demonstration, or the target when there are no demonstrations.

Lengths: each example is capped at `max_length_per_example` (256) by keeping the first
`256 - 2 - len(output piece)` tokens of its input piece (at test time minus the longest option
piece instead); the whole sequence is capped at `max_length` (1024) with demonstrations and at
`max_length_per_example` without, by cutting the demonstration prefix from the left.

The prefix/target split lets evaluation encode the demonstrations once and reuse their KV cache:
`build_prompt(...) == join_prompt(encode_demonstrations(...), *encode_target(...), ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from maml_ds.data.reader import Example
from maml_ds.data.tasks import DataError
from maml_ds.losses import mean_scored_loss, scored_loss_sum, scored_token_loss

__all__ = [
    "EncodedPrompt",
    "PromptFormat",
    "build_option_prompts",
    "build_prompt",
    "build_training_prompt",
    "collate",
    "encode_demonstrations",
    "encode_example",
    "encode_target",
    "has_no_label",
    "join_prompt",
    # re-exported from maml_ds.losses, where they live
    "mean_scored_loss",
    "scored_loss_sum",
    "scored_token_loss",
]

# MetaICL keeps 2 tokens of each example's 256 free (room that BOS/EOS once took); kept as is so
# that truncation points match MetaICL token for token.
_RESERVED_PER_EXAMPLE = 2


@dataclass(frozen=True)
class PromptFormat:
    """How examples become a token sequence."""

    method: Literal["direct", "channel"] = "direct"
    """direct: score the output given the input; channel: score the input given the output."""
    newlines: bool = True
    """True: MetaICL's newline separators. False: the space format (" "+x, " "+y) of the Raw-LM
    baselines on stock GPT-2."""
    max_length_per_example: int = 256
    """Token cap of one example (demonstration or target); also the whole-sequence cap when there
    are no demonstrations."""
    max_length: int = 1024
    """Whole-sequence cap when demonstrations are used (MetaICL: min(256*k, 1024); see `for_k`)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.method not in ("direct", "channel"):
            problems.append(f"method must be 'direct' or 'channel', got {self.method!r}")
        if not isinstance(self.newlines, bool):
            problems.append(f"newlines must be a bool, got {self.newlines!r}")
        per_example_ok = isinstance(self.max_length_per_example, int) and not isinstance(
            self.max_length_per_example, bool
        )
        if not per_example_ok or self.max_length_per_example <= _RESERVED_PER_EXAMPLE:
            problems.append(
                f"max_length_per_example must be an int > {_RESERVED_PER_EXAMPLE}, "
                f"got {self.max_length_per_example!r}"
            )
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool):
            problems.append(f"max_length must be an int, got {self.max_length!r}")
        elif per_example_ok and self.max_length < self.max_length_per_example:
            problems.append(
                f"max_length ({self.max_length}) must be >= max_length_per_example "
                f"({self.max_length_per_example})"
            )
        if problems:
            raise ValueError("invalid PromptFormat:\n  - " + "\n  - ".join(problems))

    def total_cap(self, has_demonstrations: bool) -> int:
        """Token cap of a whole prompt."""
        return self.max_length if has_demonstrations else self.max_length_per_example

    def for_k(self, k: int) -> PromptFormat:
        """MetaICL's cap for k demonstrations: min(max_length_per_example * k, max_length).

        Equal to `self` for k >= 4 with the defaults; matters only for k < 4.
        """
        if k <= 0:
            return self
        return replace(self, max_length=min(self.max_length, self.max_length_per_example * k))


@dataclass
class EncodedPrompt:
    """One prompt: token ids and which of them the loss scores."""

    input_ids: list[int]
    scored_mask: list[bool]
    position_offset: int = 0
    """Position id of the first token (copy pre-training trains later positions too)."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.scored_mask):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and scored_mask ({len(self.scored_mask)}) "
                "must have the same length"
            )

    @property
    def num_scored(self) -> int:
        return sum(self.scored_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


def has_no_label(options: Sequence[str]) -> bool:
    """MetaICL's "no label" case: every option is "" (vacuously true for free-form `[]`)."""
    return all(o == "" for o in options)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefixes(
    input_text: str, fmt: PromptFormat, *, is_first: bool, no_label: bool
) -> tuple[str, str]:
    """The separators that go before the input piece and before the output piece."""
    if not fmt.newlines:  # space format
        if fmt.method == "direct":
            return ("" if is_first else " "), " "
        return " ", ("" if is_first else " ")
    if fmt.method == "direct":
        x_prefix = "" if is_first else ("\n\n" if input_text == "" else "\n\n\n")
        y_prefix = "" if no_label else "\n"
        return x_prefix, y_prefix
    x_prefix = "" if (input_text == "" or no_label) else "\n"
    y_prefix = "" if is_first else "\n\n\n"
    return x_prefix, y_prefix


def encode_example(
    tokenizer: Any,
    example_input: str,
    example_output: str,
    fmt: PromptFormat,
    *,
    is_first: bool,
    max_output_len: int | None = None,
    no_label: bool = False,
) -> tuple[list[int], list[int]]:
    """(input-piece ids, output-piece ids) of one example, separators included, capped.

    The pieces are returned as x then y whatever the method; the caller orders them (direct
    x+y, channel y+x). The input piece keeps its first `max_length_per_example - 2 - m` tokens,
    m = len(output piece), or `max_output_len` at test time (the longest option piece), so the
    output is never cut. Beyond MetaICL (which fails there): an output piece that alone exceeds
    `max_length_per_example - 2` keeps its first tokens and the input piece is dropped.
    `no_label`: the example has no label (free-form), see `has_no_label`.
    """
    x_prefix, y_prefix = _prefixes(example_input, fmt, is_first=is_first, no_label=no_label)
    x_ids = _tokenize(tokenizer, x_prefix + example_input)
    y_ids = _tokenize(tokenizer, y_prefix + example_output)
    room = fmt.max_length_per_example - _RESERVED_PER_EXAMPLE
    if max_output_len is None:
        if len(y_ids) > room:
            y_ids = y_ids[:room]
        reserved = len(y_ids)
    else:
        if len(y_ids) > max_output_len:
            raise ValueError(
                f"output piece has {len(y_ids)} tokens > max_output_len={max_output_len}"
            )
        if max_output_len > room:
            raise DataError(
                f"an option is {max_output_len} tokens long (separator included), more than "
                f"max_length_per_example - {_RESERVED_PER_EXAMPLE} = {room}: no room is left for "
                "the input. Raise max_length_per_example or shorten the options"
            )
        reserved = max_output_len
    return x_ids[: room - reserved], y_ids


def encode_demonstrations(tokenizer: Any, demos: Sequence[Example], fmt: PromptFormat) -> list[int]:
    """The demonstration prefix: every demonstration encoded and concatenated, in order."""
    return encode_scored_demonstrations(tokenizer, demos, fmt)[0]


def encode_scored_demonstrations(
    tokenizer: Any, demos: Sequence[Example], fmt: PromptFormat
) -> tuple[list[int], list[bool]]:
    """The demonstration prefix and, per token, whether it is the piece the method scores
    (direct: the output piece; channel: the input piece)."""
    ids: list[int] = []
    scored: list[bool] = []
    for i, demo in enumerate(demos):
        x_ids, y_ids = encode_example(
            tokenizer,
            demo.input,
            demo.output,
            fmt,
            is_first=i == 0,
            no_label=has_no_label(demo.options),
        )
        first, second = (x_ids, y_ids) if fmt.method == "direct" else (y_ids, x_ids)
        ids += first + second
        scored += [False] * len(first) + [True] * len(second)
    return ids, scored


def encode_target(
    tokenizer: Any,
    input: str,
    output: str,
    fmt: PromptFormat,
    *,
    has_demonstrations: bool,
    max_output_len: int | None = None,
    no_label: bool = False,
) -> tuple[list[int], list[bool]]:
    """Target ids and their scored mask: the output piece (direct) or the input piece (channel)."""
    x_ids, y_ids = encode_example(
        tokenizer,
        input,
        output,
        fmt,
        is_first=not has_demonstrations,
        max_output_len=max_output_len,
        no_label=no_label,
    )
    if fmt.method == "direct":
        return x_ids + y_ids, [False] * len(x_ids) + [True] * len(y_ids)
    return y_ids + x_ids, [False] * len(y_ids) + [True] * len(x_ids)


def join_prompt(
    prefix_ids: Sequence[int],
    target_ids: Sequence[int],
    target_scored: Sequence[bool],
    fmt: PromptFormat,
    *,
    has_demonstrations: bool,
    prefix_scored: Sequence[bool] | None = None,
) -> EncodedPrompt:
    """Prefix + target under the whole-sequence cap; the prefix loses its EARLIEST tokens.

    The target is never cut (the per-example cap already keeps it within max_length_per_example).
    `prefix_scored`: which prefix tokens the loss scores too (default: none).
    """
    if len(target_ids) != len(target_scored):
        raise ValueError(
            f"target_ids ({len(target_ids)}) and target_scored ({len(target_scored)}) "
            "differ in length"
        )
    if not has_demonstrations and len(prefix_ids) > 0:
        raise ValueError("a non-empty demonstration prefix was given with has_demonstrations=False")
    cap = fmt.total_cap(has_demonstrations)
    if len(target_ids) > cap:
        raise ValueError(
            f"the target alone has {len(target_ids)} tokens, more than the prompt cap {cap}"
        )
    keep = cap - len(target_ids)
    cut = max(0, len(prefix_ids) - keep)
    prefix = list(prefix_ids[cut:])
    if prefix_scored is None:
        prefix_mask = [False] * len(prefix)
    else:
        if len(prefix_scored) != len(prefix_ids):
            raise ValueError("prefix_scored must have one entry per prefix token")
        prefix_mask = [bool(s) for s in prefix_scored[cut:]]
    return EncodedPrompt(
        input_ids=prefix + list(target_ids),
        scored_mask=prefix_mask + [bool(s) for s in target_scored],
    )


def build_prompt(
    tokenizer: Any,
    demos: Sequence[Example],
    input: str,
    output: str,
    fmt: PromptFormat,
    *,
    max_output_len: int | None = None,
    no_label: bool = False,
    score_demonstrations: bool = False,
) -> EncodedPrompt:
    """The full prompt of one target (input, output) after the demonstrations;
    `score_demonstrations`: the demonstrations' scored pieces count in the loss too."""
    has_demonstrations = len(demos) > 0
    target_ids, target_scored = encode_target(
        tokenizer,
        input,
        output,
        fmt,
        has_demonstrations=has_demonstrations,
        max_output_len=max_output_len,
        no_label=no_label,
    )
    prefix_ids, prefix_scored = encode_scored_demonstrations(tokenizer, demos, fmt)
    return join_prompt(
        prefix_ids,
        target_ids,
        target_scored,
        fmt,
        has_demonstrations=has_demonstrations,
        prefix_scored=prefix_scored if score_demonstrations else None,
    )


def build_training_prompt(
    tokenizer: Any,
    demos: Sequence[Example],
    example: Example,
    fmt: PromptFormat,
    *,
    score_demonstrations: bool = False,
) -> EncodedPrompt:
    """A meta-training instance: k demonstrations + the example, scored on its gold output
    (direct) or its input (channel); with `score_demonstrations` every demonstration's too."""
    return build_prompt(
        tokenizer,
        demos,
        example.input,
        example.output,
        fmt,
        no_label=has_no_label(example.options),
        score_demonstrations=score_demonstrations,
    )


def option_piece_lengths(
    tokenizer: Any, example: Example, fmt: PromptFormat, *, is_first: bool
) -> list[int]:
    """Token count of each option's output piece (with its separator): the per-example cap
    at test time reserves the longest of them."""
    _, y_prefix = _prefixes(
        example.input, fmt, is_first=is_first, no_label=has_no_label(example.options)
    )
    return [len(_tokenize(tokenizer, y_prefix + option)) for option in example.options]


def option_targets(
    tokenizer: Any, example: Example, fmt: PromptFormat, *, has_demonstrations: bool
) -> list[tuple[list[int], list[bool]]]:
    """(target ids, scored mask) of each option of a test example, in option order.

    The input is capped against the LONGEST option piece, so every option sees the same input.
    Evaluation joins these to a demonstration prefix (`build_option_prompts`, or once per
    prefix with a KV cache).
    """
    if len(example.options) < 2:
        raise DataError(
            f"test example of task {example.task!r} has {len(example.options)} option(s); "
            "ranking needs at least 2"
        )
    no_label = has_no_label(example.options)
    max_output_len = max(
        option_piece_lengths(tokenizer, example, fmt, is_first=not has_demonstrations)
    )
    return [
        encode_target(
            tokenizer,
            example.input,
            option,
            fmt,
            has_demonstrations=has_demonstrations,
            max_output_len=max_output_len,
            no_label=no_label,
        )
        for option in example.options
    ]


def build_option_prompts(
    tokenizer: Any, demos: Sequence[Example], example: Example, fmt: PromptFormat
) -> list[EncodedPrompt]:
    """One prompt per option of a test example, in option order (see `option_targets`)."""
    has_demonstrations = len(demos) > 0
    targets = option_targets(tokenizer, example, fmt, has_demonstrations=has_demonstrations)
    prefix = encode_demonstrations(tokenizer, demos, fmt)
    prompts = []
    for option, (target_ids, target_scored) in zip(example.options, targets, strict=True):
        prompt = join_prompt(
            prefix, target_ids, target_scored, fmt, has_demonstrations=has_demonstrations
        )
        # Position 0 is never predicted (logits[t] predict token t+1).
        if not any(prompt.scored_mask[1:]):
            scored = "input" if fmt.method == "channel" else "option"
            raise DataError(
                f"task {example.task!r}: the {scored} tokens of option {option!r} are empty or "
                f"first in the sequence, so there is nothing to score (input={example.input!r})"
            )
        prompts.append(prompt)
    return prompts


def collate(prompts: Sequence[EncodedPrompt], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompts into a batch.

    Returns input_ids [B, T] long, attention_mask [B, T] long (1 = real token), scored_mask
    [B, T] bool; T = the longest prompt. Padding is never scored. position_ids [B, T] only when
    a prompt has a position offset (copy pre-training).
    """
    if not prompts:
        raise ValueError("collate needs at least one prompt")
    batch_size, seq_len = len(prompts), max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((batch_size, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
    scored_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    for row, p in enumerate(prompts):
        n = len(p.input_ids)
        input_ids[row, :n] = torch.tensor(p.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        scored_mask[row, :n] = torch.tensor(p.scored_mask, dtype=torch.bool)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "scored_mask": scored_mask}
    if any(p.position_offset for p in prompts):
        offsets = torch.tensor([p.position_offset for p in prompts], dtype=torch.long)
        batch["position_ids"] = offsets[:, None] + torch.arange(seq_len)[None, :]
    return batch
