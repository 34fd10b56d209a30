"""MetaICL's tasks from their Hugging Face datasets: one declarative entry per task.

Each entry says where the rows are (dataset id, config, splits) and how MetaICL's preprocessing
(CrossFit's task scripts, as MetaICL ships them) turns a row into a line: the input template and
the label map, keyed by the stored label value (a ClassLabel's index). The options are MetaICL's
task configs (`metaicl_config/tasks/`). `build_tasks` writes them with `importer.import_task`.
docs/data.md: the entry format, how to add a task, the quirks kept from MetaICL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maml_ds.data.importer import (
    ImportSummary,
    TaskRecipe,
    import_task,
    load_splits,
    task_config_file,
)
from maml_ds.data.reader import SPLITS, TEST_SEEDS, task_file
from maml_ds.data.tasks import DataError, Setting

__all__ = [
    "REGISTRY",
    "BuildResult",
    "RegistryEntry",
    "build_tasks",
    "is_complete",
    "registered_tasks",
]


@dataclass(frozen=True)
class RegistryEntry:
    """Where one MetaICL task's rows come from and how they become lines."""

    task: str
    """MetaICL's task name."""
    dataset: str
    """Hugging Face hub id (`datasets.load_dataset(dataset, config)`)."""
    input_template: str
    """`{field}` placeholders over the dataset's fields (`TaskRecipe.input_template`)."""
    label_map: Mapping[int | str, str] | None = None
    """Classification: stored label value -> MetaICL's label name; other values are dropped and
    counted. None for a multi-choice task."""
    config: str | None = None
    """The dataset's config name (e.g. 'mrpc' of 'nyu-mll/glue')."""
    label_field: str = "label"
    train_split: str = "train"
    """The split the demonstrations are drawn from."""
    test_split: str | None = "validation"
    """The split that is the test set (MetaICL tests on the validation split); None: 20% of
    `train_split` held out with seed 42, as MetaICL does for datasets without one."""
    options_field: str | None = None
    """Multi-choice: the (nested) field with each row's options, e.g. `choices.text`."""
    option_keys_field: str | None = None
    """Multi-choice: the field with each option's key when the label is a key (`answerKey`)."""
    replace: Mapping[str, str] = field(default_factory=dict)
    """Text replaced in the field values (MetaICL's scripts put some newlines to spaces)."""
    note: str = ""
    """A quirk of MetaICL's preprocessing that the entry keeps (shown by `data build --list`)."""

    def recipe(self) -> TaskRecipe:
        label_map = None
        if self.label_map is not None:
            label_map = {str(value): label for value, label in self.label_map.items()}
        return TaskRecipe(
            task=self.task,
            input_template=self.input_template,
            label_field=self.label_field,
            label_map=label_map,
            options_field=self.options_field,
            option_keys_field=self.option_keys_field,
            replace=self.replace,
        )


_NEWLINE_TO_SPACE = {"\n": " "}
_SENTENCE_PAIR = "sentence 1: {sentence1} [SEP] sentence 2: {sentence2}"
_STANCE = {0: "none", 1: "against", 2: "favor"}
_ETHOS_BINARY = {0: "false", 1: "true"}


def _ethos(dimension: str) -> RegistryEntry:
    return RegistryEntry(
        task=f"ethos-{dimension}",
        dataset="iamollas/ethos",
        config="multilabel",
        input_template="{text}",
        label_field=dimension,
        label_map=_ETHOS_BINARY,
        test_split=None,
    )


def _lettered_choices(task: str, dataset: str, question: str, **kwargs) -> RegistryEntry:
    """A multi-choice task whose rows hold `choices: {text, label}` and `answerKey`: CrossFit
    writes `question (A) text1 (B) text2 ...`, which MetaICL parses back into input and options."""
    return RegistryEntry(
        task=task,
        dataset=dataset,
        input_template=f"{{{question}}}",
        label_field="answerKey",
        options_field="choices.text",
        option_keys_field="choices.label",
        **kwargs,
    )


def _tweet_eval(subset: str, label_map: Mapping[int, str]) -> RegistryEntry:
    return RegistryEntry(
        task=f"tweet_eval-{subset}",
        dataset="cardiffnlp/tweet_eval",
        config=subset,
        input_template="{text}",
        label_map=label_map,
        replace=_NEWLINE_TO_SPACE,
    )


# The unseen-domain test tasks of hr_to_lr first, then the other test tasks, then training tasks.
REGISTRY: dict[str, RegistryEntry] = {
    e.task: e
    for e in (
        RegistryEntry(
            task="financial_phrasebank",
            dataset="takala/financial_phrasebank",
            config="sentences_allagree",
            input_template="{sentence}",
            label_map={0: "negative", 1: "neutral", 2: "positive"},
            test_split=None,
        ),
        RegistryEntry(
            task="medical_questions_pairs",
            dataset="curaihealth/medical_questions_pairs",
            input_template="question 1: {question_1} [SEP] question 2: {question_2}",
            label_map={0: "Similar", 1: "Dissimilar"},
            test_split=None,
            note="MetaICL names label 0 'Similar' and 1 'Dissimilar'; the dataset's README says "
            "1 means similar. Kept as MetaICL has it, so results compare with MetaICL's",
        ),
        RegistryEntry(
            task="poem_sentiment",
            dataset="google-research-datasets/poem_sentiment",
            input_template="{verse_text}",
            label_map={0: "negative", 1: "positive", 2: "no_impact"},
            note="label 3 (mixed) is not among MetaICL's options: those rows are dropped",
        ),
        RegistryEntry(
            task="climate_fever",
            dataset="tdiggelm/climate_fever",
            input_template="{claim}",
            label_field="claim_label",
            label_map={0: "Supports", 1: "Refutes", 2: "Not enough info", 3: "Disputed"},
            train_split="test",
            test_split=None,
            note="the dataset has only a 'test' split: MetaICL holds 20% of it out as the test set",
        ),
        RegistryEntry(
            task="glue-mrpc",
            dataset="nyu-mll/glue",
            config="mrpc",
            input_template=_SENTENCE_PAIR,
            label_map={0: "not_equivalent", 1: "equivalent"},
        ),
        RegistryEntry(
            task="glue-rte",
            dataset="nyu-mll/glue",
            config="rte",
            input_template=_SENTENCE_PAIR,
            label_map={0: "entailment", 1: "not_entailment"},
        ),
        RegistryEntry(
            task="glue-wnli",
            dataset="nyu-mll/glue",
            config="wnli",
            input_template=_SENTENCE_PAIR,
            label_map={0: "not_entailment", 1: "entailment"},
        ),
        RegistryEntry(
            task="superglue-cb",
            dataset="aps/super_glue",
            config="cb",
            input_template="premise: {premise} [SEP] hypothesis: {hypothesis}",
            label_map={0: "entailment", 1: "contradiction", 2: "neutral"},
        ),
        RegistryEntry(
            task="sick",
            dataset="RobZamp/sick",
            input_template="sentence 1: {sentence_A} [SEP] sentence 2: {sentence_B}",
            label_map={0: "entailment", 1: "neutral", 2: "contradiction"},
            note="sick is both a train and a test task of non_nli_to_nli (MetaICL's setting)",
        ),
        RegistryEntry(
            task="hate_speech18",
            dataset="odegiber/hate_speech18",
            input_template="{text}",
            label_map={0: "noHate", 1: "hate"},
            test_split=None,
            note="labels 2 (idk/skip) and 3 (relation) are dropped, as MetaICL does",
        ),
        _ethos("national_origin"),
        _ethos("race"),
        _ethos("religion"),
        _tweet_eval("hate", {0: "non-hate", 1: "hate"}),
        _tweet_eval("stance_atheism", _STANCE),
        _tweet_eval("stance_feminist", _STANCE),
        _lettered_choices(
            "commonsense_qa",
            "tau/commonsense_qa",
            "question",
            replace={"\t": " ", "\n": " "},
        ),
        _lettered_choices(
            "ai2_arc",
            "allenai/ai2_arc",
            "question",
            config="ARC-Challenge",
            note="some rows key their options 1-4 instead of A-D; MetaICL parses both",
        ),
        _lettered_choices("openbookqa", "allenai/openbookqa", "question_stem", config="main"),
        _lettered_choices("qasc", "allenai/qasc", "question"),
        RegistryEntry(
            task="codah",
            dataset="jaredfern/codah",
            config="fold_0",
            input_template="{question_propmt}",  # sic: the dataset's field name
            label_field="correct_answer_idx",
            options_field="candidate_answers",
        ),
        RegistryEntry(
            task="emo",
            dataset="SemEvalWorkshop/emo",
            input_template="{text}",
            label_map={0: "others", 1: "happy", 2: "sad", 3: "angry"},
            test_split="test",
        ),
        RegistryEntry(
            task="wiki_qa",
            dataset="microsoft/wiki_qa",
            input_template="question: {question} [SEP] answer: {answer}",
            label_map={0: "false", 1: "true"},
        ),
        RegistryEntry(
            task="anli",
            dataset="facebook/anli",
            input_template="premise: {premise} [SEP] hypothesis: {hypothesis}",
            label_map={0: "entailment", 1: "neutral", 2: "contradiction"},
            train_split="train_r1",
            test_split="dev_r1",
            replace=_NEWLINE_TO_SPACE,
            note="round 1 only: train_r1, tested on dev_r1",
        ),
        RegistryEntry(
            task="scitail",
            dataset="allenai/scitail",
            config="snli_format",
            input_template=_SENTENCE_PAIR,
            label_field="gold_label",
            label_map={"entailment": "entailment", "neutral": "neutral"},
        ),
        # meta-training tasks (MetaICL: only `{task}_16384_100_train.jsonl`, from the train split)
        RegistryEntry(
            task="glue-sst2",
            dataset="nyu-mll/glue",
            config="sst2",
            input_template="sentence: {sentence}",
            label_map={0: "negative", 1: "positive"},
        ),
        RegistryEntry(
            task="glue-qnli",
            dataset="nyu-mll/glue",
            config="qnli",
            input_template="question: {question} [SEP] sentence: {sentence}",
            label_map={0: "entailment", 1: "not_entailment"},
        ),
        RegistryEntry(
            task="glue-mnli",
            dataset="nyu-mll/glue",
            config="mnli",
            input_template="premise: {premise} [SEP] hypothesis: {hypothesis}",
            label_map={0: "entailment", 1: "neutral", 2: "contradiction"},
            test_split="validation_matched",
        ),
        RegistryEntry(
            task="glue-qqp",
            dataset="nyu-mll/glue",
            config="qqp",
            input_template="question 1: {question1} [SEP] question 2: {question2}",
            label_map={0: "not_duplicate", 1: "duplicate"},
        ),
        RegistryEntry(
            task="paws",
            dataset="google-research-datasets/paws",
            config="labeled_final",
            input_template=_SENTENCE_PAIR,
            label_map={0: "not_duplicate", 1: "duplicate"},
        ),
        RegistryEntry(
            task="ag_news",
            dataset="fancyzhx/ag_news",
            input_template="{text}",
            label_map={0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"},
            test_split="test",
        ),
        RegistryEntry(
            task="yelp_polarity",
            dataset="fancyzhx/yelp_polarity",
            input_template="{text}",
            label_map={0: "negative", 1: "positive"},
            test_split="test",
            note="MetaICL's test set is a 20% sample of 'test'; only its training file is used",
        ),
    )
}


def registered_tasks(setting: Setting | None = None) -> list[str]:
    """Tasks with an entry: all of them, or those of `setting` (unseen-domain test tasks first,
    then the other test tasks, then the training tasks)."""
    if setting is None:
        return list(REGISTRY)
    order = dict.fromkeys(setting.unseen_domain_test + setting.test + setting.train)
    return [t for t in order if t in REGISTRY]


def is_complete(
    out_dir: Path | str, task: str, k: int, seeds: Sequence[int], *, meta_train: bool = False
) -> bool:
    """Every file a build writes for the task exists (each is written whole, or not at all)."""
    splits = ("train",) if meta_train else SPLITS
    paths = [task_file(out_dir, task, k, s, split) for s in seeds for split in splits]
    return task_config_file(out_dir, task).is_file() and all(p.is_file() for p in paths)


@dataclass(frozen=True)
class BuildResult:
    """What `build_tasks` did with each task."""

    built: dict[str, ImportSummary]
    skipped: list[str]
    """Tasks already complete in the output folder."""
    failed: dict[str, str]
    """Task -> the one-line reason it could not be built."""


def build_tasks(
    tasks: Sequence[str],
    out_dir: Path | str,
    *,
    k: int = 16,
    seeds: Sequence[int] = TEST_SEEDS,
    sources: Mapping[str, str | Path] | None = None,
    meta_train: bool = False,
    force: bool = False,
    on_task: Callable[[str, str], None] | None = None,
) -> BuildResult:
    """Build each task from its registry entry; a task that fails is recorded and the rest go on.

    `sources` maps a task to a local dataset folder (`save_to_disk`) or `hf:ID` used instead of
    the entry's hub id. `meta_train`: build meta-training files (pass k=16384, seeds=(100,)).
    A task whose files are all present is skipped unless `force`.
    `on_task(task, status)` is called with status "start", "built", "skipped" or "failed".
    """
    unknown = [t for t in tasks if t not in REGISTRY]
    if unknown:
        raise DataError(
            f"no registry entry for {unknown}; `maml-ds data build --list` shows the tasks "
            "that have one (or import the task with `maml-ds data import`)"
        )
    sources = dict(sources or {})
    unknown = sorted(set(sources) - set(REGISTRY))
    if unknown:
        raise DataError(f"--source names task(s) {unknown} without a registry entry")
    notify = on_task or (lambda task, status: None)
    built: dict[str, ImportSummary] = {}
    skipped: list[str] = []
    failed: dict[str, str] = {}
    for task in tasks:
        if not force and is_complete(out_dir, task, k, seeds, meta_train=meta_train):
            skipped.append(task)
            notify(task, "skipped")
            continue
        notify(task, "start")
        entry = REGISTRY[task]
        source = sources.get(task, f"hf:{entry.dataset}")
        try:
            splits = [entry.train_split, *filter(None, [entry.test_split])]
            train, *test = load_splits(source, splits, config=entry.config)
            built[task] = import_task(
                train,
                entry.recipe(),
                out_dir,
                test=test[0] if test else None,
                k=k,
                seeds=seeds,
                meta_train=meta_train,
            )
        except DataError as e:
            failed[task] = str(e)
            notify(task, "failed")
            continue
        notify(task, "built")
    return BuildResult(built=built, skipped=skipped, failed=failed)
