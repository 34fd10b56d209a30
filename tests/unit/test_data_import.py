"""`data import` (rows -> MetaICL files) and `data build` (the registry), offline.

The real-data slices in tests/fixtures/real_data are the first lines of the original files of
three hr_to_lr target tasks (attribution in its README). The registry is built from local
`datasets` folders shaped like each registered dataset (field names and label features as
published), so only the download itself is left untested.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

from maml_ds.data.check import check_setting
from maml_ds.data.importer import (
    Table,
    TaskRecipe,
    import_task,
    load_source,
    load_splits,
    parse_label_map,
    sample_demonstrations,
)
from maml_ds.data.reader import load_examples, task_file
from maml_ds.data.registry import REGISTRY, build_tasks, is_complete, registered_tasks
from maml_ds.data.tasks import DataError, load_setting, load_task_config

datasets.disable_progress_bars()  # save_to_disk of the small fixtures, quietly
REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
SEEDS = (100, 13, 21, 42, 87)
K = 4

POEM_COLUMNS = ["id", "verse", "label"]
MQP_COLUMNS = ["dr_id", "question_1", "question_2", "label"]
CLIMATE_MAP = "SUPPORTS=Supports,REFUTES=Refutes,NOT_ENOUGH_INFO=Not enough info,DISPUTED=Disputed"


def import_real(out: Path) -> dict:
    """The three real slices, imported as MetaICL prepared them (docs/data.md)."""
    poem = import_task(
        load_source(REAL / "poem_sentiment" / "train.tsv", columns=POEM_COLUMNS),
        TaskRecipe(
            "poem_sentiment",
            "{verse}",
            "label",
            parse_label_map("-1=negative,0=no_impact,1=positive"),
        ),
        out,
        test=load_source(REAL / "poem_sentiment" / "dev.tsv", columns=POEM_COLUMNS),
        k=K,
    )
    mqp = import_task(
        load_source(REAL / "medical_questions_pairs" / "mqp.csv", columns=MQP_COLUMNS),
        TaskRecipe(
            "medical_questions_pairs",
            "question 1: {question_1} [SEP] question 2: {question_2}",
            "label",
            parse_label_map("0=Similar,1=Dissimilar"),  # MetaICL's names (registry note)
        ),
        out,
        k=K,
    )
    climate = import_task(
        load_source(REAL / "climate_fever" / "climate-fever.jsonl"),
        TaskRecipe("climate_fever", "{claim}", "claim_label", parse_label_map(CLIMATE_MAP)),
        out,
        k=K,
    )
    return {s.task: s for s in (poem, mqp, climate)}


def write_setting(out: Path, name: str, test: list[str], train: list[str] | None = None) -> Path:
    path = out / "config" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": train or [], "test": test, "unseen_domain_test": test}))
    return path


def test_real_sources_import_to_metaicl_folders_that_check_passes(tmp_path):
    summaries = import_real(tmp_path)
    write_setting(tmp_path, "real", list(summaries))
    report = check_setting(tmp_path, "real", k=K)
    assert report.problems == [] and report.warnings == []
    for task in summaries:
        # options and label names equal MetaICL's task config
        metaicl = load_task_config(task)
        assert load_task_config(task, tmp_path) == metaicl
        lines = load_examples(tmp_path, task, k=K, seed=13, split="test")
        assert {e.output for e in lines} <= set(metaicl.options)
        assert all(e.options == metaicl.options and e.task == task for e in lines)
    # poem_sentiment: the 3 'mixed' rows of the slice are dropped and counted; dev.tsv is test
    poem = summaries["poem_sentiment"]
    assert (poem.train.num_rows, poem.train.num_kept, poem.train.num_dropped) == (40, 37, 3)
    assert poem.num_test == 12 and not poem.test_held_out
    # no test split: 20% held out (MetaICL: int(0.8 n) train lines)
    assert (summaries["medical_questions_pairs"].num_pool, summaries["climate_fever"].num_test) == (
        32,
        6,
    )
    assert report.test["poem_sentiment"].num_demonstrations == dict.fromkeys(SEEDS, K)


def test_lines_are_metaicl_preprocessed(tmp_path):
    import_real(tmp_path)
    first = json.loads(
        task_file(tmp_path, "medical_questions_pairs", K, 100, "test").read_text().splitlines()[0]
    )
    assert list(first) == ["task", "input", "output", "options"]
    assert first["input"].startswith("question 1: ") and " [SEP] question 2: " in first["input"]
    assert first["options"] == ["Dissimilar", "Similar"]


def test_sampling_follows_metaicl(tmp_path):
    """Per seed: numpy's legacy shuffle of the pool, first k demos, next k dev; the test set is
    identical across seeds; a held-out test set never meets the demonstrations."""
    import_real(tmp_path)
    task = "climate_fever"
    tests = {s: task_file(tmp_path, task, K, s, "test").read_bytes() for s in SEEDS}
    assert len(set(tests.values())) == 1
    test_inputs = {e.input for e in load_examples(tmp_path, task, k=K, seed=100, split="test")}
    demo_sets = []
    for seed in SEEDS:
        demos = load_examples(tmp_path, task, k=K, seed=seed, split="train")
        dev = load_examples(tmp_path, task, k=K, seed=seed, split="dev")
        assert len(demos) == len(dev) == K
        assert not {e.input for e in demos} & {e.input for e in dev}
        assert not {e.input for e in demos + dev} & test_inputs
        demo_sets.append(tuple(e.input for e in demos))
    assert len(set(demo_sets)) == len(SEEDS)

    pool = list(range(10))
    order = list(range(10))
    np.random.seed(21)  # MetaICL seeds the global generator, then shuffles its list
    np.random.shuffle(order)
    assert sample_demonstrations(pool, 3, 21) == (order[:3], order[3:6])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "nope.csv"}, "source not found: nope.csv"),
        ({"template": "{verse} {rhyme}"}, "unknown field 'rhyme'"),
        ({"label_map": "7=negative"}, "0 rows to draw demonstrations from"),
        (
            {"k": 40},
            "29 rows to draw demonstrations from .after holding out the test set., fewer than k=40",
        ),
        ({"template": "{}"}, "name each field"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, kwargs, message):
    source = kwargs.get("source", REAL / "poem_sentiment" / "train.tsv")
    with pytest.raises(DataError, match=message) as err:
        train = load_source(source, columns=POEM_COLUMNS)
        recipe = TaskRecipe(
            "poem_sentiment",
            kwargs.get("template", "{verse}"),
            "label",
            parse_label_map(kwargs.get("label_map", "-1=negative,0=no_impact,1=positive")),
        )
        import_task(train, recipe, tmp_path, k=kwargs.get("k", K))
    assert "\n" not in str(err.value)


def test_csv_with_header_parquet_and_label_set(tmp_path):
    rows = [{"text": f"t{i}", "gold": ["b", "a", "c"][i % 3]} for i in range(30)]
    csv_path = tmp_path / "own.csv"
    csv_path.write_text("text,gold\n" + "".join(f"{r['text']},{r['gold']}\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "own.parquet")
    outs = []
    for i, source in enumerate((csv_path, tmp_path / "own.parquet")):
        out = tmp_path / f"out{i}"
        summary = import_task(load_source(source), TaskRecipe("own", "{text}", "gold"), out, k=K)
        assert summary.config.options == ("a", "b", "c")  # the label set, sorted
        outs.append(task_file(out, "own", K, 42, "train").read_text())
    assert outs[0] == outs[1]


def test_hf_folder_class_labels_and_multi_choice(tmp_path):
    features = datasets.Features(
        {"q": datasets.Value("string"), "y": datasets.ClassLabel(names=["no", "yes"])}
    )
    ds = datasets.Dataset.from_dict(
        {"q": [f"q{i}" for i in range(12)], "y": [i % 2 for i in range(12)]}, features=features
    )
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(
        tmp_path / "hf"
    )
    train, test = load_splits(tmp_path / "hf", ["train", "validation"])
    summary = import_task(train, TaskRecipe("yn", "Q: {q}", "y"), tmp_path / "out", test=test, k=K)
    assert summary.config.options == ("no", "yes")  # ClassLabel names, no label map needed
    assert load_examples(tmp_path / "out", "yn", k=K, seed=100, split="test")[1].output == "yes"

    mc = [{"q": f"q{i}", "choices": ["x", "y", "z"], "answer": i % 3} for i in range(10)]
    mc.append({"q": "bad", "choices": ["x", "y"], "answer": "w"})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    summary = import_task(
        load_source(tmp_path / "mc.jsonl"),
        TaskRecipe("mc", "{q}", "answer", options_field="choices"),
        tmp_path / "out",
        k=K,
    )
    assert summary.config.task_type == "multi-choice"
    assert summary.train.num_dropped == 1
    line = load_examples(tmp_path / "out", "mc", k=K, seed=100, split="train")[0]
    assert line.options == ("x", "y", "z") and line.output in line.options


def test_recipe_replaces_text_in_field_values(tmp_path):
    rows = [{"text": f"line {i}\nnext\\n", "y": "ab"[i % 2]} for i in range(8)]
    recipe = TaskRecipe("nl", "{text}", "y", replace={"\n": " "})
    import_task(Table(rows=rows, where="rows"), recipe, tmp_path, k=K, seeds=(100,))
    lines = load_examples(tmp_path, "nl", k=K, seed=100, split="train")
    # the field's newline per the recipe, then MetaICL's literal backslash-n rule
    assert {e.input for e in lines} <= {f"line {i} next " for i in range(8)}


# ---------------------------------------------------------------------------------------------
# The registry (data build), from local datasets shaped like the published ones

TEXT, INT = datasets.Value("string"), datasets.Value("int32")
_PAIR = {"sentence1": TEXT, "sentence2": TEXT, "idx": INT}
_ETHOS = dict.fromkeys(
    [
        "violence",
        "directed_vs_generalized",
        "gender",
        "race",
        "national_origin",
        "disability",
        "religion",
        "sexual_orientation",
    ],
    INT,
)
_CHOICES = {"text": datasets.Sequence(TEXT), "label": datasets.Sequence(TEXT)}
_LETTERED = {"id": TEXT, "choices": _CHOICES, "answerKey": TEXT}
_ALL_SPLITS = ("train", "validation", "test")
# dataset (config) -> (features as published, splits)
PUBLISHED: dict[tuple[str, str | None], tuple[dict, tuple[str, ...]]] = {
    ("takala/financial_phrasebank", "sentences_allagree"): (
        {"sentence": TEXT, "label": ["negative", "neutral", "positive"]},
        ("train",),
    ),
    ("curaihealth/medical_questions_pairs", None): (
        {"dr_id": INT, "question_1": TEXT, "question_2": TEXT, "label": ["0", "1"]},
        ("train",),
    ),
    ("google-research-datasets/poem_sentiment", None): (
        {"id": INT, "verse_text": TEXT, "label": ["negative", "positive", "no_impact", "mixed"]},
        ("train", "validation", "test"),
    ),
    ("tdiggelm/climate_fever", None): (
        {
            "claim_id": TEXT,
            "claim": TEXT,
            "claim_label": ["SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO", "DISPUTED"],
        },
        ("test",),
    ),
    ("nyu-mll/glue", "mrpc"): (
        {**_PAIR, "label": ["not_equivalent", "equivalent"]},
        ("train", "validation", "test"),
    ),
    ("nyu-mll/glue", "rte"): (
        {**_PAIR, "label": ["entailment", "not_entailment"]},
        ("train", "validation", "test"),
    ),
    ("nyu-mll/glue", "wnli"): (
        {**_PAIR, "label": ["not_entailment", "entailment"]},
        ("train", "validation", "test"),
    ),
    ("aps/super_glue", "cb"): (
        {
            "premise": TEXT,
            "hypothesis": TEXT,
            "idx": INT,
            "label": ["entailment", "contradiction", "neutral"],
        },
        ("train", "validation", "test"),
    ),
    ("RobZamp/sick", None): (
        {
            "id": TEXT,
            "sentence_A": TEXT,
            "sentence_B": TEXT,
            "label": ["entailment", "neutral", "contradiction"],
            "relatedness_score": datasets.Value("float32"),
        },
        ("train", "validation", "test"),
    ),
    ("odegiber/hate_speech18", None): (
        {
            "text": TEXT,
            "user_id": INT,
            "subforum_id": INT,
            "num_contexts": INT,
            "label": ["noHate", "hate", "idk/skip", "relation"],
        },
        ("train",),
    ),
    ("iamollas/ethos", "multilabel"): ({"text": TEXT, **_ETHOS}, ("train",)),
    ("cardiffnlp/tweet_eval", "hate"): (
        {"text": TEXT, "label": ["non-hate", "hate"]},
        ("train", "validation", "test"),
    ),
    ("cardiffnlp/tweet_eval", "stance_atheism"): (
        {"text": TEXT, "label": ["none", "against", "favor"]},
        ("train", "validation", "test"),
    ),
    ("cardiffnlp/tweet_eval", "stance_feminist"): (
        {"text": TEXT, "label": ["none", "against", "favor"]},
        ("train", "validation", "test"),
    ),
    ("tau/commonsense_qa", None): (
        {**_LETTERED, "question": TEXT, "question_concept": TEXT},
        _ALL_SPLITS,
    ),
    ("allenai/ai2_arc", "ARC-Challenge"): ({**_LETTERED, "question": TEXT}, _ALL_SPLITS),
    ("allenai/openbookqa", "main"): ({**_LETTERED, "question_stem": TEXT}, _ALL_SPLITS),
    ("jaredfern/codah", "fold_0"): (
        {
            "id": INT,
            "question_category": ["Idioms", "Reference", "Polysemy", "Negation", "Quantitative"],
            "question_propmt": TEXT,
            "candidate_answers": datasets.Sequence(TEXT),
            "correct_answer_idx": INT,
        },
        _ALL_SPLITS,
    ),
    ("allenai/scitail", "snli_format"): (
        {
            "sentence1_binary_parse": TEXT,
            "sentence1_parse": TEXT,
            "sentence1": TEXT,
            "sentence2_parse": TEXT,
            "sentence2": TEXT,
            "annotator_labels": datasets.Sequence(TEXT),
            "gold_label": TEXT,
        },
        _ALL_SPLITS,
    ),
    ("nyu-mll/glue", "sst2"): (
        {"sentence": TEXT, "label": ["negative", "positive"], "idx": INT},
        _ALL_SPLITS,
    ),
    ("nyu-mll/glue", "qnli"): (
        {"question": TEXT, "sentence": TEXT, "label": ["entailment", "not_entailment"], "idx": INT},
        _ALL_SPLITS,
    ),
    ("nyu-mll/glue", "mnli"): (
        {
            "premise": TEXT,
            "hypothesis": TEXT,
            "label": ["entailment", "neutral", "contradiction"],
            "idx": INT,
        },
        ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"),
    ),
    ("nyu-mll/glue", "qqp"): (
        {
            "question1": TEXT,
            "question2": TEXT,
            "label": ["not_duplicate", "duplicate"],
            "idx": INT,
        },
        _ALL_SPLITS,
    ),
    ("google-research-datasets/paws", "labeled_final"): (
        {"id": INT, "sentence1": TEXT, "sentence2": TEXT, "label": ["0", "1"]},
        _ALL_SPLITS,
    ),
    ("fancyzhx/ag_news", None): (
        {"text": TEXT, "label": ["World", "Sports", "Business", "Sci/Tech"]},
        ("train", "test"),
    ),
    ("fancyzhx/yelp_polarity", None): ({"text": TEXT, "label": ["1", "2"]}, ("train", "test")),
    ("SemEvalWorkshop/emo", None): (
        {"text": TEXT, "label": ["others", "happy", "sad", "angry"]},
        ("train", "test"),
    ),
    ("microsoft/wiki_qa", None): (
        {
            "question_id": TEXT,
            "question": TEXT,
            "document_title": TEXT,
            "answer": TEXT,
            "label": ["0", "1"],
        },
        _ALL_SPLITS,
    ),
    ("facebook/anli", None): (
        {
            "uid": TEXT,
            "premise": TEXT,
            "hypothesis": TEXT,
            "label": ["entailment", "neutral", "contradiction"],
            "reason": TEXT,
        },
        ("train_r1", "dev_r1", "test_r1", "train_r2", "dev_r2", "test_r2"),
    ),
    ("allenai/qasc", None): (
        {
            **_LETTERED,
            "question": TEXT,
            "fact1": TEXT,
            "fact2": TEXT,
            "combinedfact": TEXT,
            "formatted_question": TEXT,
        },
        _ALL_SPLITS,
    ),
}
NUM_ROWS = 16


def _fake_dataset(features: dict, splits: tuple[str, ...], out: Path) -> Path:
    feats = datasets.Features(
        {
            name: datasets.ClassLabel(names=f) if isinstance(f, list) else f
            for name, f in features.items()
        }
    )
    columns = {}
    options = [[f"option {j} of row {i}" for j in range(4)] for i in range(NUM_ROWS)]
    special = {
        "choices": [{"text": o, "label": list("ABCD")} for o in options],
        "answerKey": ["ABCD"[i % 4] for i in range(NUM_ROWS)],
        "candidate_answers": options,
        "correct_answer_idx": [i % 4 for i in range(NUM_ROWS)],
        "annotator_labels": [["neutral"]] * NUM_ROWS,
        "gold_label": [["entailment", "neutral"][i % 2] for i in range(NUM_ROWS)],
    }
    for name, feature in feats.items():
        if name in special:
            columns[name] = special[name]
        elif isinstance(feature, datasets.ClassLabel):
            columns[name] = [i % feature.num_classes for i in range(NUM_ROWS)]
        elif feature.dtype == "string":
            columns[name] = [f"{name} {i} of {out.name}" for i in range(NUM_ROWS)]
        elif name in _ETHOS:
            columns[name] = [i % 2 for i in range(NUM_ROWS)]
        else:
            columns[name] = [i for i in range(NUM_ROWS)]
    ds = datasets.Dataset.from_dict(columns, features=feats)
    datasets.DatasetDict(dict.fromkeys(splits, ds)).save_to_disk(out)
    return out


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    folders = {
        key: _fake_dataset(*shape, root / f"{key[0].replace('/', '_')}_{key[1]}")
        for key, shape in PUBLISHED.items()
    }
    return {task: folders[(e.dataset, e.config)] for task, e in REGISTRY.items()}


def test_registry_covers_the_unseen_domain_tasks_and_matches_metaicl_configs():
    hr_to_lr = load_setting("hr_to_lr")
    assert set(hr_to_lr.unseen_domain_test) <= set(REGISTRY)
    assert len(set(REGISTRY) & set(hr_to_lr.test) - set(hr_to_lr.unseen_domain_test)) >= 10
    assert registered_tasks(hr_to_lr)[:4] == list(hr_to_lr.unseen_domain_test)
    for task, entry in REGISTRY.items():
        config = load_task_config(task)
        if config.is_classification:
            assert set(entry.label_map.values()) == set(config.options), task
        else:
            assert config.task_type == "multi-choice" and entry.options_field, task
        assert (entry.dataset, entry.config) in PUBLISHED, task


def test_build_every_registered_task_offline(tmp_path, fake_sources):
    seeds = (100, 13)
    result = build_tasks(list(REGISTRY), tmp_path, k=K, seeds=seeds, sources=fake_sources)
    assert result.failed == {} and sorted(result.built) == sorted(REGISTRY)
    write_setting(tmp_path, "registered", list(REGISTRY))
    report = check_setting(tmp_path, "registered", k=K, seeds=seeds)
    assert report.problems == []
    mrpc = load_examples(tmp_path, "glue-mrpc", k=K, seed=13, split="test")
    assert mrpc[0].input == "sentence 1: sentence1 0 of nyu-mll_glue_mrpc [SEP] sentence 2: " + (
        "sentence2 0 of nyu-mll_glue_mrpc"
    )
    assert mrpc[0].output == "not_equivalent" and mrpc[0].options == (
        "equivalent",
        "not_equivalent",
    )
    (qa,) = load_examples(tmp_path, "openbookqa", k=K, seed=100, split="test")[1:2]
    assert qa.input == "question_stem 1 of allenai_openbookqa_main"
    assert qa.options == tuple(f"option {j} of row 1" for j in range(4))
    assert qa.output == "option 1 of row 1"  # answerKey B
    # MetaICL drops what is not among its options: poem 'mixed', hate_speech18 idk/skip+relation
    assert result.built["poem_sentiment"].train.num_dropped == NUM_ROWS // 4
    assert result.built["hate_speech18"].train.num_dropped == NUM_ROWS // 2
    assert result.built["climate_fever"].test_held_out


def test_build_reports_a_failed_task_goes_on_and_resumes(tmp_path, fake_sources):
    tasks = ["poem_sentiment", "glue-rte", "sick"]
    sources = {**{t: fake_sources[t] for t in tasks}, "glue-rte": tmp_path / "missing"}
    seen = []
    result = build_tasks(
        tasks, tmp_path, k=K, seeds=(100,), sources=sources, on_task=lambda *a: seen.append(a)
    )
    assert sorted(result.built) == ["poem_sentiment", "sick"]
    assert "source not found" in result.failed["glue-rte"]
    assert ("glue-rte", "failed") in seen and ("sick", "built") in seen
    sources["glue-rte"] = fake_sources["glue-rte"]
    again = build_tasks(tasks, tmp_path, k=K, seeds=(100,), sources=sources)
    assert again.skipped == ["poem_sentiment", "sick"] and list(again.built) == ["glue-rte"]
    assert all(is_complete(tmp_path, t, K, (100,)) for t in tasks)
    with pytest.raises(DataError, match="no registry entry for \\['quarel'\\]"):
        build_tasks(["quarel"], tmp_path)


def test_build_from_hf_equals_import_of_the_original_files(tmp_path):
    """poem_sentiment's hub dataset is made from its TSVs (label -1/0/1/2 -> ClassLabel
    negative/no_impact/positive/mixed): building it equals importing the TSVs byte for byte."""
    hf_label = {"-1": 0, "0": 2, "1": 1, "2": 3}
    splits = {}
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = [r for r in load_source(REAL / "poem_sentiment" / name, columns=POEM_COLUMNS).rows]
        splits[split] = {
            "id": [int(r["id"]) for r in rows],
            "verse_text": [r["verse"] for r in rows],
            "label": [hf_label[r["label"]] for r in rows],
        }
    features, _ = PUBLISHED[("google-research-datasets/poem_sentiment", None)]
    feats = datasets.Features(
        {n: datasets.ClassLabel(names=f) if isinstance(f, list) else f for n, f in features.items()}
    )
    datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(c, features=feats) for s, c in splits.items()}
    ).save_to_disk(tmp_path / "hf")
    build_tasks(
        ["poem_sentiment"], tmp_path / "built", k=K, sources={"poem_sentiment": tmp_path / "hf"}
    )
    import_real(tmp_path / "imported")
    for seed in SEEDS:
        for split in ("train", "dev", "test"):
            built = task_file(tmp_path / "built", "poem_sentiment", K, seed, split).read_bytes()
            imported = task_file(tmp_path / "imported", "poem_sentiment", K, seed, split)
            assert built == imported.read_bytes()


def test_build_meta_training_tasks(tmp_path, fake_sources):
    """A training task: only `{task}_16384_100_train.jsonl`, up to 16384 lines of its train
    split (MetaICL's do_train), which the meta-training reader loads."""
    tasks = ["glue-sst2", "glue-mnli"]
    result = build_tasks(
        tasks, tmp_path, k=16384, seeds=(100,), sources=fake_sources, meta_train=True
    )
    assert result.failed == {}
    assert sorted(p.name for p in (tmp_path / "glue-mnli").iterdir()) == [
        "glue-mnli_16384_100_train.jsonl"
    ]
    write_setting(tmp_path, "train_only", ["glue-sst2"], train=tasks)
    shutil.rmtree(tmp_path / "glue-sst2")  # the target files are checked separately
    build_tasks(["glue-sst2"], tmp_path, k=K, seeds=SEEDS, sources=fake_sources)
    build_tasks(
        ["glue-sst2"], tmp_path, k=16384, seeds=(100,), sources=fake_sources, meta_train=True
    )
    report = check_setting(tmp_path, "train_only", k=K)
    assert report.problems == []
    assert report.train["glue-mnli"].num_train == NUM_ROWS  # fewer rows than 16384: all of them
    line = load_examples(tmp_path, "glue-sst2", k=16384, seed=100, split="train")[0]
    assert line.input.startswith("sentence: ") and line.options == ("negative", "positive")
