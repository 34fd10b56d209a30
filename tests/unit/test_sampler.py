"""Meta-training samplers: deterministic, resumable, never a target among its demonstrations;
limited-data subsampling keeps label proportions."""

from __future__ import annotations

from collections import Counter

import pytest

from maml_ds.data.reader import Example
from maml_ds.data.sampler import MetaICLSampler, TaskSampler, subsample_stratified
from maml_ds.data.tasks import DataError


def make_tasks(sizes: dict[str, int]) -> dict[str, list[Example]]:
    return {
        name: [
            Example(name, f"{name} in {i}", f"out{i % 3}", ("out0", "out1", "out2"))
            for i in range(n)
        ]
        for name, n in sizes.items()
    }


def test_metaicl_sampler_is_deterministic_and_demonstrations_are_other_examples():
    tasks = make_tasks({"a": 10, "b": 7})
    one = MetaICLSampler(tasks, num_demonstrations=4, seed=3).take(40)
    two = MetaICLSampler(tasks, num_demonstrations=4, seed=3).take(40)
    assert one == two
    assert one != MetaICLSampler(tasks, num_demonstrations=4, seed=4).take(40)
    for prompt in one:
        assert len(prompt.demonstrations) == 4
        assert prompt.target not in prompt.demonstrations
        assert len(set(prompt.demonstrations)) == 4
        assert all(d.task == prompt.task == prompt.target.task for d in prompt.demonstrations)
    # One epoch visits every example exactly once.
    first_epoch = [p.target for p in one[:17]]
    assert sorted(first_epoch, key=repr) == sorted(
        [e for ex in tasks.values() for e in ex], key=repr
    )


def test_metaicl_sampler_resumes_exactly():
    tasks = make_tasks({"a": 10, "b": 7})
    straight = MetaICLSampler(tasks, num_demonstrations=4, seed=1).take(30)
    first = MetaICLSampler(tasks, num_demonstrations=4, seed=1)
    head = first.take(12)
    resumed = MetaICLSampler(tasks, num_demonstrations=4, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.take(18) == straight


def test_sampler_rejects_tasks_smaller_than_k_plus_one():
    with pytest.raises(DataError, match=r"at least k\+1 = 5 examples.*b \(4 lines\)"):
        MetaICLSampler(make_tasks({"a": 10, "b": 4}), num_demonstrations=4, seed=0)


def test_task_sampler_batches_are_one_dataset_and_disjoint():
    tasks = make_tasks({"a": 30, "b": 30, "c": 30})
    sampler = TaskSampler(tasks, num_demonstrations=4, seed=0)
    seen_tasks = set()
    for _ in range(6):
        batches = sampler.take(num_batches=4, batch_size=2)
        assert len(batches) == 4 and all(len(b) == 2 for b in batches)
        prompts = [p for b in batches for p in b]
        assert len({p.task for p in prompts}) == 1
        targets = [p.target for p in prompts]
        assert len(set(targets)) == len(targets)  # support and query disjoint
        for p in prompts:
            assert p.target not in p.demonstrations
        seen_tasks.add(prompts[0].task)
    assert len(seen_tasks) > 1
    again = TaskSampler(tasks, num_demonstrations=4, seed=0)
    again.load_state_dict({"num_drawn": 5})
    assert again.take(num_batches=4, batch_size=2) == sampler.task_at(
        5, num_batches=4, batch_size=2
    )
    with pytest.raises(DataError, match="needs 40 distinct targets"):
        sampler.take(num_batches=4, batch_size=10)


def test_subsample_stratified_keeps_proportions_and_is_deterministic():
    examples = [
        Example("t", f"x{i}", label, ("p", "q", "r"))
        for i, label in enumerate(["p"] * 53 + ["q"] * 31 + ["r"] * 16)
    ]
    kept = subsample_stratified(examples, 0.1, seed=7)
    assert kept == subsample_stratified(examples, 0.1, seed=7)
    assert kept != subsample_stratified(examples, 0.1, seed=8)
    assert len(kept) == 10
    counts = Counter(e.output for e in kept)
    full = Counter(e.output for e in examples)
    for label, n in full.items():
        assert abs(counts[label] - 0.1 * n) <= 1.0
    assert [examples.index(e) for e in kept] == sorted(examples.index(e) for e in kept)
    assert subsample_stratified(examples, 1.0, seed=0) == examples
    with pytest.raises(ValueError):
        subsample_stratified(examples, 0.0, seed=0)
