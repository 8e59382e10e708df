"""The SteerLM recipe end to end: regression RM -> annotate unlabelled data -> conditioned SFT -> steer.

Two spawned processes (megatron's groups are created once per process): the
rm recipe trains a tiny regression reward model on the synthetic arithmetic
attributes; the steerlm recipe then labels a copy of the same data whose
labels were removed, fine-tunes a tiny policy on it with
``configs/steerlm_tiny.yaml`` (conditioned on correctness and verbosity), and
generates greedily for the held-out prompts asking for verbosity 0 (terse: a
bare number) and 4 (verbose: a sentence with its reason), correctness fixed at 4.
The config checks and the record conversion need no megatron and run here.
"""

import json
from pathlib import Path

import pytest
from distributed import run_distributed
from omegaconf import OmegaConf

from aligner.algorithms.steerlm import ATTRIBUTE_CLOSE, ATTRIBUTE_OPEN, parse_attributes
from aligner.config import load_config
from aligner.data import HELPSTEER2_ATTRIBUTES, read_records
from aligner.recipes.steerlm import SteerLMRunConfig, conditioned_sft_records

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAMES = ["correctness", "verbosity"]  # configs/steerlm_tiny.yaml's attribute_names
MAX_NEW_TOKENS = 24  # a verbose answer is about 13 tokens with its eos
# Terse answers are 1-2 characters, verbose ones about 40: asking for verbosity 4
# must at least double the mean length (it is ~40x once the attributes are learned).
MIN_LENGTH_RATIO = 2.0
# The briefly trained RM's labels agree with the synthetic truth on nearly every record (~97% on
# correctness, 100% on verbosity); a lower bar leaves room for a different draw of the run.
MIN_LABEL_AGREEMENT = 0.85
# The rm recipe on regression data with mixed-length batches: 120 steps fit the five attributes.
RM_OVERRIDES = ["rm.kind=regression", "data.group_by_length=false", "trainer.micro_batch_size=16"]
RM_STEPS = 120

pytestmark = pytest.mark.slow


def rm_worker(overrides: list[str]) -> None:
    from aligner.recipes import rm

    rm.run(load_config(rm.RMRunConfig, CONFIGS / "rm_tiny.yaml", overrides))


def steerlm_worker(overrides: list[str], prompts: list[str]) -> dict:
    """Annotate + train with the tiny config; the training records' attribute lines and greedy responses."""
    from aligner.data import load_tokenizer
    from aligner.generation.steerlm import generate_with_attributes
    from aligner.recipes import steerlm

    config = load_config(steerlm.SteerLMRunConfig, CONFIGS / "steerlm_tiny.yaml", overrides)
    run = steerlm.run(config)
    policy = run.states["policy"].model
    tokenizer = load_tokenizer(config.data.tokenizer)
    names = config.steerlm.attribute_names
    responses = {
        verbosity: steerlm.steer(
            policy,
            tokenizer,
            prompts,
            {"correctness": 4, "verbosity": verbosity},
            names=names,
            max_new_tokens=MAX_NEW_TOKENS,
        )
        for verbosity in (0, 4)
    }
    one_by_one = [
        generate_with_attributes(
            policy,
            tokenizer,
            [{"role": "user", "content": prompt}],
            {"correctness": 4, "verbosity": 4},
            names=names,
            max_new_tokens=MAX_NEW_TOKENS,
            greedy=True,
        )
        for prompt in prompts[:3]
    ]
    return {
        "system_turns": [record.messages[0]["content"] for record in run.data.dataset.records],
        "responses": responses,
        "one_by_one": one_by_one,
        "history": run.summary.history,
    }


def write_unlabelled(source: Path, target: Path) -> Path:
    """``source``'s rows with empty attribute labels (what SteerLM's annotation fills in)."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps({**row, "attributes": {}}) + "\n" for row in rows))
    return target


@pytest.fixture(scope="module")
def steered(demo):
    data = demo / "data" / "regression"
    paths = [f"data.tokenizer={demo / 'tokenizer'}", "logging.tensorboard_dir=null", "logging.progress_bar=false"]
    rm_dir = demo / "runs" / "rm_regression"
    run_distributed(
        rm_worker,
        1,
        args=(
            [
                *RM_OVERRIDES,
                *paths,
                f"data.train={data / 'train.jsonl'}",
                f"data.val={data / 'val.jsonl'}",
                f"trainer.max_steps={RM_STEPS}",
                "trainer.val_every=0",
                f"checkpoint.dir={rm_dir}",
            ],
        ),
    )
    rm_model = OmegaConf.load(CONFIGS / "rm_tiny.yaml").model.config  # the architecture the rm run trained
    rm_model_overrides = [f"steerlm.rm_model.config.{key}={value}" for key, value in rm_model.items()]
    unlabelled = demo / "data" / "regression_unlabelled"
    overrides = [
        *paths,
        f"data.train={write_unlabelled(data / 'train.jsonl', unlabelled / 'train.jsonl')}",
        f"data.val={write_unlabelled(data / 'val.jsonl', unlabelled / 'val.jsonl')}",
        f"checkpoint.dir={demo / 'runs' / 'steerlm'}",
        f"steerlm.annotate_rm_checkpoint={rm_dir}",
        f"steerlm.rm_attribute_names=[{','.join(HELPSTEER2_ATTRIBUTES)}]",
        *rm_model_overrides,
    ]
    prompts = sorted({json.loads(line)["prompt"] for line in (data / "val.jsonl").read_text().splitlines()})
    (result,) = run_distributed(steerlm_worker, 1, args=(overrides, prompts))
    return result, prompts, read_records(data / "train.jsonl", "regression")


def test_verbosity_4_gives_longer_answers_than_verbosity_0(steered):
    result, prompts, _ = steered
    terse, verbose = result["responses"][0], result["responses"][4]
    mean = {name: sum(map(len, texts)) / len(texts) for name, texts in (("terse", terse), ("verbose", verbose))}
    print(f"held-out prompts: {len(prompts)}; mean response length (characters): {mean}")
    print("verbosity 0:", terse[:3], "verbosity 4:", verbose[:3])
    assert mean["verbose"] >= MIN_LENGTH_RATIO * mean["terse"], mean
    assert all(len(long) > len(short) for short, long in zip(terse, verbose, strict=True)), (terse, verbose)
    assert result["history"][-1]["loss"] < 0.5 * result["history"][0]["loss"]


def test_batched_steering_matches_one_prompt_at_a_time(steered):
    result, _, _ = steered
    assert result["one_by_one"] == result["responses"][4][:3]


def test_unlabelled_records_are_annotated_by_the_reward_model(steered):
    result, _, truth = steered
    lines = result["system_turns"]
    assert len(lines) == len(truth)
    assert all(line.startswith(ATTRIBUTE_OPEN) and line.endswith(ATTRIBUTE_CLOSE) for line in lines)
    labels = [parse_attributes(line[len(ATTRIBUTE_OPEN) : -len(ATTRIBUTE_CLOSE)], NAMES) for line in lines]
    for name in NAMES:
        agrees = [label[name] == record.attributes[name] for label, record in zip(labels, truth, strict=True)]
        agreement = sum(agrees) / len(agrees)
        print(f"{name}: annotation agrees with the synthetic label on {agreement:.1%} of records")
        assert agreement >= MIN_LABEL_AGREEMENT, name


def test_dataset_labels_become_the_system_turn(demo):
    records = read_records(demo / "data" / "regression" / "train.jsonl", "regression")[:4]
    for record, conversation in zip(records, conditioned_sft_records(records, NAMES), strict=True):
        values = ",".join(f"{name}:{int(record.attributes[name])}" for name in NAMES)
        assert conversation.messages == [
            {"role": "system", "content": f"{ATTRIBUTE_OPEN}{values}{ATTRIBUTE_CLOSE}"},
            *record.prompt,
            {"role": "assistant", "content": record.response},
        ]
        assert conversation.origin == record.origin


def test_unknown_attribute_name_is_an_error_naming_it(demo, tmp_path):
    records = read_records(demo / "data" / "regression" / "train.jsonl", "regression")
    with pytest.raises(ValueError, match=r"train.jsonl:1: no label for attribute\(s\) \['verbosty'\]"):
        conditioned_sft_records(records, ["correctness", "verbosty"])
    unlabelled = read_records(
        write_unlabelled(demo / "data" / "regression" / "train.jsonl", tmp_path / "u.jsonl"), "regression"
    )
    with pytest.raises(ValueError, match="annotate_rm_checkpoint"):
        conditioned_sft_records(unlabelled, NAMES)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["steerlm.attribute_names=[verbosity,verbosity]"], r"steerlm.attribute_names: .*repeated"),
        (["steerlm.attribute_names=[]"], r"steerlm.attribute_names: .*non-empty"),
        (["steerlm.atribute_names=[verbosity]"], "atribute_names"),
        (["steerlm.annotate_rm_checkpoint=/rm"], "needs steerlm.rm_model"),
        (["steerlm.rm_attribute_names=[verbosity]"], "set steerlm.annotate_rm_checkpoint too"),
        (
            [
                "steerlm.annotate_rm_checkpoint=/rm",
                "steerlm.rm_model.hf_path=/rm_hf",
                "steerlm.rm_attribute_names=[helpfulness,verbosity]",
            ],
            r"steerlm.attribute_names \['correctness'\] are not outputs of the reward model",
        ),
    ],
)
def test_bad_steerlm_config_is_an_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(SteerLMRunConfig, CONFIGS / "steerlm_tiny.yaml", overrides)
