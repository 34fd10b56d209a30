"""Copy pre-training data (maml_ds/data/copy_stream.py) and the prompt pieces it relies on:
scored demonstrations and position offsets (maml_ds/data/prompts.py)."""

from __future__ import annotations

from maml_ds.data.copy_stream import CopyStream, copy_inventory
from maml_ds.data.prompts import EncodedPrompt, PromptFormat, build_training_prompt, collate
from maml_ds.data.reader import Example
from maml_ds.data.word_tokenizer import word_level_tokenizer


def _stream(**overrides) -> CopyStream:
    options = dict(seed=3, min_length=4, max_length=6, max_prefix=2, position_offset=50,
                   offset_from=10)  # fmt: skip
    return CopyStream(list(range(10, 40)), **{**options, **overrides})


def test_a_sequence_is_prefix_string_string_scored_on_the_repeat_after_its_first_token():
    for index in range(30):
        seq = _stream().sequence_at(index)
        ids, scored = seq.input_ids, seq.scored_mask
        first = scored.index(True)
        length = len(ids) - first + 1  # the repeat minus its first token is scored
        prefix = len(ids) - 2 * length
        assert 0 <= prefix <= 2 and 4 <= length <= 6
        assert ids[prefix : prefix + length] == ids[prefix + length :]
        assert scored == [i >= prefix + length + 1 for i in range(len(ids))]
        assert all(10 <= t < 40 for t in ids)


def test_same_seed_and_position_same_sequence_and_resume_continues_exactly():
    a, b = _stream(), _stream()
    first = a.take(7) + a.take(5)
    again = b.take(7)
    state = b.state_dict()
    resumed = _stream()
    resumed.load_state_dict(state)
    assert first == again + resumed.take(5)
    assert _stream(seed=4).take(12) != first


def test_position_offsets_start_at_offset_from():
    stream = _stream()
    seqs = stream.take(40)
    assert all(s.position_offset == 0 for s in seqs[:10])
    offsets = [s.position_offset for s in seqs[10:]]
    assert all(0 <= o <= 50 for o in offsets) and len(set(offsets)) > 5
    assert all(s.position_offset == 0 for s in _stream(position_offset=0).take(40))


def test_collate_gives_position_ids_only_when_a_sequence_is_offset():
    plain = [EncodedPrompt([1, 2, 3], [False, True, True]), EncodedPrompt([4], [False])]
    assert "position_ids" not in collate(plain, 0)
    shifted = [EncodedPrompt([1, 2, 3], [False, True, True], 7), EncodedPrompt([4], [False])]
    batch = collate(shifted, 0)
    assert batch["position_ids"].tolist() == [[7, 8, 9], [0, 1, 2]]


def test_copy_inventory_is_every_ordinary_token():
    tok = word_level_tokenizer(["ba", "di", "fo", "[SEP]"])
    inventory = copy_inventory(tok)
    words = {tok.convert_ids_to_tokens(i) for i in inventory}
    assert {"ba", "di", "fo"} <= words
    assert not words & {tok.eos_token, tok.unk_token, "\n"}


def test_scored_demonstrations_mark_every_demonstration_label():
    tok = word_level_tokenizer(["ba", "di", "fo", "gu", "yes", "no"])
    demos = [Example("t", "ba di", "yes", ("yes", "no")), Example("t", "fo", "no", ("yes", "no"))]
    target = Example("t", "gu ba", "yes", ("yes", "no"))
    for newlines in (True, False):
        fmt = PromptFormat(newlines=newlines)
        plain = build_training_prompt(tok, demos, target, fmt)
        scored = build_training_prompt(tok, demos, target, fmt, score_demonstrations=True)
        assert plain.input_ids == scored.input_ids
        words = [tok.convert_ids_to_tokens(i) for i, s in zip(scored.input_ids,
                 scored.scored_mask, strict=True) if s]  # fmt: skip
        assert [w for w in words if w != "\n"] == ["yes", "no", "yes"]
        assert sum(plain.scored_mask) < sum(scored.scored_mask)
    # A prefix cut from the left keeps the marks of what survives, aligned with the tokens.
    short = PromptFormat(max_length_per_example=8, max_length=9)
    cut = build_training_prompt(tok, demos, target, short, score_demonstrations=True)
    assert len(cut.input_ids) == 9
    words = [tok.convert_ids_to_tokens(i) for i, s in zip(cut.input_ids, cut.scored_mask,
             strict=True) if s]  # fmt: skip
    assert [w for w in words if w != "\n"] == ["no", "yes"]
