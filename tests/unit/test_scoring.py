"""Evaluation scoring: prompt lengths, KV-cached == full-sequence scoring, the cache, adapt,
the split between ranks and the progress lines.

Models are random-init tiny GPT-2s (`build_model("tiny")`, deterministic init) with the fixture
tokenizer; data come from the fixture synthetic suite.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import replace

import pytest
import torch

from maml_ds.data.prompts import (
    PromptFormat,
    build_option_prompts,
    build_training_prompt,
    collate,
    encode_demonstrations,
    join_prompt,
    mean_scored_loss,
    option_targets,
)
from maml_ds.data.reader import Example, load_examples, load_target_examples
from maml_ds.data.tasks import load_setting, load_task_config
from maml_ds.eval.adapt import AdaptOptions, adapt_model, adaptation_prompts, run_adaptation
from maml_ds.eval.cache import load_cached, model_fingerprint
from maml_ds.eval.progress import EvalProgress, ProgressOptions, format_duration
from maml_ds.eval.run import EvalOptions, evaluate
from maml_ds.eval.scoring import ScoringStats, argmin_first, score_examples
from maml_ds.eval.shard import assign_ranks
from maml_ds.models import build_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model("tiny", vocab_size=len(tokenizer), seed=0).eval()


@pytest.fixture(scope="module")
def sdpa_model(tokenizer):
    """The attention kernel `maml-ds eval` loads models with."""
    return build_model("tiny", vocab_size=len(tokenizer), seed=0, attn_implementation="sdpa").eval()


def _long_example(i: int, n_words: int, options=("pufa", "nata", "gati")) -> Example:
    words = " ".join(f"zovi{(i * 7 + j) % 13} bota" for j in range(n_words))
    return Example(task="t", input=words, output=options[i % len(options)], options=options)


# ---------------------------------------------------------------------------------------------
# Prompt lengths at test time


def test_test_prompts_capped_at_1024_with_demonstrations_left_truncated(tokenizer):
    fmt = EvalOptions().prompt_format()  # the protocol's defaults, k=16
    assert (fmt.max_length, fmt.max_length_per_example, fmt.total_cap(True)) == (1024, 256, 1024)
    demos = [_long_example(i, 120) for i in range(16)]  # each demo capped at 256 tokens
    target = _long_example(99, 20)
    prefix = encode_demonstrations(tokenizer, demos, fmt)
    assert len(prefix) > 1024
    prompts = build_option_prompts(tokenizer, demos, target, fmt)
    targets = option_targets(tokenizer, target, fmt, has_demonstrations=True)
    for prompt, (ids, scored) in zip(prompts, targets, strict=True):
        assert len(prompt.input_ids) == 1024
        assert prompt.input_ids[-len(ids) :] == ids  # the target is never cut
        assert prompt.scored_mask[-len(ids) :] == scored
        # the prefix lost its EARLIEST tokens: what is left is its end
        assert prompt.input_ids[: 1024 - len(ids)] == prefix[len(prefix) - (1024 - len(ids)) :]
        assert prompt == join_prompt(prefix, ids, scored, fmt, has_demonstrations=True)


def test_test_prompts_capped_at_256_without_demonstrations(tokenizer):
    fmt = EvalOptions(baseline="no-icl").prompt_format()
    assert fmt.total_cap(False) == 256 and not fmt.newlines  # the stock-model format
    target = _long_example(3, 200)
    prompts = build_option_prompts(tokenizer, [], target, fmt)
    full_input = tokenizer(target.input, add_special_tokens=False)["input_ids"]
    for prompt in prompts:
        assert len(prompt.input_ids) <= 256
        # per example, the END of the input is cut, its start kept; the option is intact
        num_input = len(prompt.input_ids) - prompt.num_scored
        assert prompt.input_ids[:num_input] == full_input[:num_input]
    assert EvalOptions(baseline="raw-lm").prompt_format().newlines is False
    assert EvalOptions().prompt_format().newlines is True


# ---------------------------------------------------------------------------------------------
# KV-cached scoring == full-sequence scoring


def _jobs(synth_dir, num_tasks=4, num_examples=6):
    setting = load_setting("synthetic", synth_dir)
    tasks = [t for t in setting.test if t.startswith(("qa", "topic", "nli", "keyword"))]
    out = []
    for task in tasks[:num_tasks]:
        demos, tests = load_target_examples(synth_dir, task, seed=100)
        out.append((demos, tests[:num_examples]))
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["direct", "channel"])
@pytest.mark.parametrize(
    "fmt_kwargs",
    [{}, {"max_length": 48, "max_length_per_example": 32}],
    ids=["1024-cap", "truncated-48"],
)
def test_kv_cached_scoring_equals_full_sequence_scoring(
    request, tokenizer, synth_dir, variant, fmt_kwargs, attn
):
    model = request.getfixturevalue("model" if attn == "eager" else "sdpa_model")
    fmt = PromptFormat(method=variant, **fmt_kwargs)
    cached_stats, full_stats = ScoringStats(), ScoringStats()
    jobs = _jobs(synth_dir)
    for demos, tests in jobs:
        cached = score_examples(
            model, tokenizer, demos, tests, fmt, batch_size=5, use_kv_cache=True, stats=cached_stats
        )
        full = score_examples(
            model, tokenizer, demos, tests, fmt, batch_size=3, use_kv_cache=False, stats=full_stats
        )
        for ex, row_c, row_f in zip(tests, cached, full, strict=True):
            assert len(row_c) == len(ex.options)
            torch.testing.assert_close(torch.tensor(row_c), torch.tensor(row_f), atol=1e-5, rtol=0)
            assert argmin_first(row_c) == argmin_first(row_f)
    if fmt_kwargs:  # prefixes were cut differently per target length: several caches per task
        assert cached_stats.num_prefix_passes > len(jobs)
    else:
        assert cached_stats.num_prefix_passes == len(jobs)
    assert cached_stats.num_forward_tokens < full_stats.num_forward_tokens
    assert cached_stats.num_sequences == full_stats.num_sequences


def test_kv_cached_scoring_matches_unbatched_reference(model, tokenizer, synth_dir):
    """Against the plainest possible reference: each option prompt run alone."""
    from maml_ds.losses import scored_token_loss

    fmt = PromptFormat(method="channel", max_length=40, max_length_per_example=32)
    demos, tests = _jobs(synth_dir, num_tasks=1, num_examples=4)[0]
    cached = score_examples(model, tokenizer, demos, tests, fmt, use_kv_cache=True)
    with torch.no_grad():
        for ex, row in zip(tests, cached, strict=True):
            for prompt, loss in zip(
                build_option_prompts(tokenizer, demos, ex, fmt), row, strict=True
            ):
                batch = collate([prompt], tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"]).logits
                assert float(scored_token_loss(logits, batch)[0]) == pytest.approx(loss, abs=1e-5)


def test_kv_cached_scoring_when_the_first_target_token_is_scored(model, tokenizer, synth_dir):
    """An option as long as the per-example room leaves no input: the first target token is
    scored and must be predicted by the prefix's last position."""
    options = ("zovi bota riza lovu tola mavi", "lati")
    longest = max(len(tokenizer("\n" + o, add_special_tokens=False)["input_ids"]) for o in options)
    fmt = PromptFormat(method="direct", max_length_per_example=longest + 2, max_length=64)
    demos, _ = _jobs(synth_dir, num_tasks=1)[0]
    tests = [Example("t", "mika dopa", options[i % 2], options) for i in range(3)]
    ids, scored = option_targets(tokenizer, tests[0], fmt, has_demonstrations=True)[0]
    assert scored[0]  # no input tokens are left before the option
    cached = score_examples(model, tokenizer, demos, tests, fmt, use_kv_cache=True)
    full = score_examples(model, tokenizer, demos, tests, fmt, use_kv_cache=False)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(full), atol=1e-5, rtol=0)


def test_ties_go_to_the_first_option():
    assert argmin_first([1.0, 0.5, 0.5]) == 1
    assert argmin_first([0.2, 0.2]) == 0


# ---------------------------------------------------------------------------------------------
# The per-(task, seed) cache never turns into a 0


def test_cache_reused_and_corrupt_or_partial_files_recomputed(
    model, tokenizer, synth_dir, tmp_path
):
    setting = load_setting("synthetic", synth_dir)
    tasks = list(setting.test[:3])
    options = EvalOptions(seeds=(100, 13))
    kwargs = dict(
        data_dir=synth_dir,
        setting="synthetic",
        options=options,
        label="m",
        model_name="tiny",
        cache_dir=tmp_path,
        tasks=tasks,
        show_progress=False,
    )
    first = evaluate(model, tokenizer, **kwargs)
    scores = {t: {s: r.score for s, r in by.items()} for t, by in first.per_task.items()}
    assert any(v > 0 for by in scores.values() for v in by.values())
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == len(tasks) * 2

    second = evaluate(model, tokenizer, **kwargs)
    assert all(r.cached for by in second.per_task.values() for r in by.values())
    assert second.aggregate == first.aggregate

    # corrupt: cut mid-file; partial: valid JSON, rows missing; tampered: a stored score of 0
    # and predictions that disagree with the losses; foreign: another key
    corrupt, partial, tampered, foreign = files[:4]
    corrupt.write_text(corrupt.read_text()[:50])
    raw = json.loads(partial.read_text())
    raw["losses"] = raw["losses"][:2]
    partial.write_text(json.dumps(raw))
    raw = json.loads(tampered.read_text())
    raw["score"], raw["predictions"][0] = 0.0, "not an option"
    tampered.write_text(json.dumps(raw))
    raw = json.loads(foreign.read_text())
    raw["key"] = "0" * 64
    foreign.write_text(json.dumps(raw))

    third = evaluate(model, tokenizer, **kwargs)
    assert {t: {s: r.score for s, r in by.items()} for t, by in third.per_task.items()} == scores
    assert sum(not r.cached for by in third.per_task.values() for r in by.values()) == 4
    assert third.aggregate == first.aggregate
    fourth = evaluate(model, tokenizer, **kwargs)  # the bad files were rewritten
    assert all(r.cached for by in fourth.per_task.values() for r in by.values())


def test_load_cached_recomputes_the_score_from_the_losses(synth_dir, tmp_path):
    task = load_setting("synthetic", synth_dir).test[0]
    _, tests = load_target_examples(synth_dir, task, seed=100)
    config = load_task_config(task, synth_dir)
    # losses that pick the gold option everywhere: a perfect score, whatever the file claims
    losses = [[0.0 if o == ex.output else 1.0 for o in ex.options] for ex in tests]
    path = tmp_path / "entry.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "key": "k",
                "losses": losses,
                "score": 0.0,
                "predictions": [ex.output for ex in tests],
            }
        )
    )
    result = load_cached(path, key="k", tests=tests, task_config=config, seed=100)
    assert result is not None and result.score == 1.0
    assert load_cached(path, key="other", tests=tests, task_config=config, seed=100) is None
    assert (
        load_cached(tmp_path / "missing.json", key="k", tests=tests, task_config=config, seed=100)
        is None
    )


# ---------------------------------------------------------------------------------------------
# Very few-shot adaptation (paper 5.4)


def _points(synth_dir, task=None, seed=100):
    setting = load_setting("synthetic", synth_dir)
    task = task or setting.unseen_domain_test[0]
    return load_examples(synth_dir, task, k=16, seed=seed, split="train")


def test_adaptation_prompts_never_contain_their_target(tokenizer, synth_dir):
    points = _points(synth_dir)
    assert len(points) == 16
    fmt = EvalOptions().prompt_format()
    prompts = adaptation_prompts(tokenizer, points, fmt, AdaptOptions(), seed=100)
    assert len(prompts) == 16
    assert sorted(p.target_index for p in prompts) == list(range(16))  # one pass
    for p in prompts:
        assert p.target_index not in p.demo_indices
        assert len(set(p.demo_indices)) == len(p.demo_indices) <= 15
        encoded = build_training_prompt(
            tokenizer, [points[i] for i in p.demo_indices], points[p.target_index], fmt
        )
        assert len(encoded.input_ids) <= 256
    # a tighter token budget binds before the 16-demonstration cap
    small = adaptation_prompts(tokenizer, points, fmt, AdaptOptions(max_prompt_tokens=40), seed=100)
    assert max(len(p.demo_indices) for p in small) < max(len(p.demo_indices) for p in prompts)
    for p in small:
        assert p.target_index not in p.demo_indices
        if p.demo_indices:
            encoded = build_training_prompt(
                tokenizer, [points[i] for i in p.demo_indices], points[p.target_index], fmt
            )
            assert len(encoded.input_ids) <= 40
    # deterministic per seed, different across seeds
    assert adaptation_prompts(tokenizer, points, fmt, AdaptOptions(), seed=100) == prompts
    assert adaptation_prompts(tokenizer, points, fmt, AdaptOptions(), seed=13) != prompts


def _reference_adapt(model, tokenizer, points, fmt, prompts, lr):
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    for p in prompts:
        encoded = build_training_prompt(
            tokenizer, [points[i] for i in p.demo_indices], points[p.target_index], fmt
        )
        batch = collate([encoded], tokenizer.pad_token_id)
        loss = mean_scored_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_adapt_takes_exactly_the_expected_adamw_steps(model, tokenizer, synth_dir):
    points = _points(synth_dir)
    fmt = EvalOptions(variant="channel").prompt_format()
    options = AdaptOptions(lr=1e-3, steps=16)
    prompts = adaptation_prompts(tokenizer, points, fmt, options, seed=100)
    adapted = copy.deepcopy(model)
    stats = adapt_model(adapted, tokenizer, points, fmt, options, seed=100)
    assert stats.num_steps == 16 and len(stats.losses) == 16

    ref16, ref15 = copy.deepcopy(model), copy.deepcopy(model)
    _reference_adapt(ref16, tokenizer, points, fmt, prompts, options.lr)
    _reference_adapt(ref15, tokenizer, points, fmt, prompts[:15], options.lr)
    original, short = dict(model.named_parameters()), dict(ref15.named_parameters())
    moved_16 = moved_15 = 0.0
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            torch.testing.assert_close(p, dict(ref16.named_parameters())[name], atol=1e-7, rtol=0)
            moved_16 = max(moved_16, float((p - original[name]).abs().max()))
            moved_15 = max(moved_15, float((p - short[name]).abs().max()))
    assert moved_16 > 1e-3  # the weights did move...
    assert moved_15 > 1e-5  # ...and by 16 steps, not 15


def test_run_adaptation_evaluates_adapted_weights_and_restores_them(
    model, tokenizer, synth_dir, tmp_path
):
    before = model_fingerprint(model)
    setting = load_setting("synthetic", synth_dir)
    options = EvalOptions(seeds=(100,))
    adapt_options = AdaptOptions(lr=1e-3, steps=16)
    result = run_adaptation(
        model,
        tokenizer,
        data_dir=synth_dir,
        setting="synthetic",
        eval_options=options,
        adapt_options=adapt_options,
        label="a",
        model_name="tiny",
        show_progress=False,
        keep_dir=tmp_path / "keep",
    )
    assert model_fingerprint(model) == before  # not kept in the model
    assert result.tasks == setting.unseen_domain_test and result.kind == "adapt"
    assert result.options.unseen_only
    plain = evaluate(
        model,
        tokenizer,
        data_dir=synth_dir,
        setting="synthetic",
        options=replace(options, unseen_only=True),
        label="p",
        model_name="tiny",
        show_progress=False,
    )
    for task in result.tasks:
        info = result.per_task[task][100].info
        assert info["adapt_steps"] == 16 and info["adapt_max_weight_change"] > 0
        assert result.per_task[task][100].losses != plain.per_task[task][100].losses
    kept = sorted(p.parent.name for p in (tmp_path / "keep").rglob("config.json"))
    assert kept == ["seed100"] * len(result.tasks)


def test_rank_split_is_balanced_deterministic_and_complete():
    costs = [64, 64, 48, 48, 32, 32, 16, 16, 80]
    owner = assign_ranks(costs, 2)
    assert owner == assign_ranks(costs, 2)  # every rank computes the same split
    load = [sum(c for c, r in zip(costs, owner, strict=True) if r == rank) for rank in (0, 1)]
    assert sum(load) == sum(costs) and max(load) - min(load) <= min(costs)  # greedy's bound
    assert owner == [1, 1, 0, 0, 1, 1, 0, 0, 0]  # most costly first, to the least loaded
    assert assign_ranks(costs, 1) == [0] * len(costs)
    assert sorted(set(assign_ranks([1.0] * 3, 4))) == [0, 1, 2]  # more ranks than work


def test_progress_lines_every_n_pairs_or_t_seconds_with_an_eta():
    now = [0.0]
    stream = io.StringIO()
    progress = EvalProgress(
        "eval hr_to_lr",
        num_pairs=5,
        num_sequences=100,
        options=ProgressOptions(every_pairs=2, every_seconds=30.0),
        stream=stream,
        is_terminal=False,
        clock=lambda: now[0],
    )
    with progress:
        progress.pair_done(cached_sequences=20)  # from the cache: no time, not in the rate
        for _ in range(4):  # a long pair: a line once 30 s have passed within it
            now[0] += 10.0
            progress.scored(5)
        progress.pair_done()  # 2 pairs: a line
        now[0] += 10.0
        progress.scored(20)
        progress.pair_done()
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == [  # ETA = elapsed x sequences left / sequences scored: 30 x 65 / 15 = 130 s
        "eval hr_to_lr: 1/5 pairs, 35/100 sequences (35.0%), elapsed 0:00:30, ETA 0:02:10",
        "eval hr_to_lr: 2/5 pairs, 40/100 sequences (40.0%), elapsed 0:00:40, ETA 0:02:00",
        "eval hr_to_lr: 3/5 pairs, 60/100 sequences (60.0%), elapsed 0:00:50, done",
    ]
    assert format_duration(3725.2) == "1:02:05"
