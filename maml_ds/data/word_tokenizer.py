"""A word-level tokenizer for the synthetic suite: every word is one token.

With a BPE, " "+label is two tokens for most made-up label words (a separator token before the
label), the condition under which tiny models fail to learn in context; here spaces are pure
separators, so the space format puts nothing between an input and its label, and "\\n" is a
token of its own. docs/synthetic-suite.md ("The tokenizer").
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
UNK = "[UNK]"
NEWLINE = "\n"
SPECIAL_TOKENS = (EOS, UNK, NEWLINE)
"""The first ids, in this order: EOS (also the padding token) = 0, [UNK] = 1, "\\n" = 2."""


def word_level_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is SPECIAL_TOKENS then `words` in their order (repeats
    dropped): text splits on " " (removed) and "\\n" (each one a token), every piece is one id,
    anything else is [UNK]; decoding joins the tokens with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *words):
        if not word or " " in word or (NEWLINE in word and word != NEWLINE) or word[:2] == "##":
            raise ValueError(
                f"{word!r} is not a word: non-empty, without spaces or newlines, not '##...'"
            )
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split(NEWLINE, behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # no word carries "##": joins with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, unk_token=UNK
    )
