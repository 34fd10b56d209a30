"""Copy pre-training data: the induction skill a starting model needs before meta-training.

Sequence ``i`` of a stream is a pure function of (seed, i): a random prefix, then a random
string s of the tokenizer's word tokens, then s again; the loss scores the repeat after its
first token (the first is unpredictable). From ``offset_from`` prompts on, each sequence starts
at a random position id, so the positions a 16-shot prompt reaches are trained too.
docs/pretrain.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from maml_ds.data.prompts import EncodedPrompt

__all__ = ["CopyStream", "copy_inventory"]


def copy_inventory(tokenizer: Any) -> list[int]:
    """The token ids copied: every vocabulary entry except special tokens and whitespace."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for token, index in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if index not in special and text.strip():
            ids.append(index)
    if len(ids) < 2:
        raise ValueError("the tokenizer has fewer than 2 ordinary tokens to copy")
    return sorted(ids)


class CopyStream:
    """The copy sequences of a pre-training run; state = the number of sequences drawn."""

    def __init__(
        self,
        token_ids: Sequence[int],
        *,
        seed: int,
        min_length: int,
        max_length: int,
        max_prefix: int,
        position_offset: int,
        offset_from: int,
    ):
        """`offset_from` counts sequences (the caller converts updates to sequences)."""
        self.token_ids = np.asarray(token_ids, dtype=np.int64)
        self.seed = seed
        self.min_length, self.max_length, self.max_prefix = min_length, max_length, max_prefix
        self.position_offset, self.offset_from = position_offset, offset_from
        self.position = 0

    def sequence_at(self, index: int) -> EncodedPrompt:
        rng = np.random.default_rng([self.seed, index, 5])
        prefix = rng.choice(self.token_ids, size=int(rng.integers(0, self.max_prefix + 1)))
        length = int(rng.integers(self.min_length, self.max_length + 1))
        string = rng.choice(self.token_ids, size=length)
        ids = [int(t) for t in (*prefix, *string, *string)]
        start = len(prefix) + length + 1  # the repeat's first token cannot be predicted
        offset = 0
        if self.position_offset and index >= self.offset_from:
            offset = int(rng.integers(0, self.position_offset + 1))
        return EncodedPrompt(
            input_ids=ids,
            scored_mask=[i >= start for i in range(len(ids))],
            position_offset=offset,
        )

    def take(self, count: int) -> list[EncodedPrompt]:
        out = [self.sequence_at(self.position + i) for i in range(count)]
        self.position += count
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.position = int(state["position"])
