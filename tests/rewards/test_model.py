"""The reward-model scorer on checkpoints of the rm recipe: the recipe's own scores, attribute weights, layouts.

Each case is a spawned process (megatron's groups are created once per process):
the rm recipe trains a tiny reward model for two steps with the shipped tiny
config and saves its checkpoint; the scorer then loads that checkpoint and
scores sequences of the synthetic data, padded with an id outside the
vocabulary (which the scorer must never read). A two-process case loads the
same checkpoint split over two pipeline stages.
"""

from pathlib import Path

import pytest
import torch
from distributed import run_distributed

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RM_STEPS = 2
ROWS = 5
WEIGHTS = {"helpfulness": 1.0, "correctness": 2.0, "verbosity": -0.5}  # coherence, complexity weigh 0
BAD_PAD = -1  # never a token: where it reaches the model, the embedding fails
# fp32 on CPU: micro-batches of other widths and sizes (and pipeline stages) only regroup sums.
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from aligner.data import build_tokenizer, write_demo_datasets

    out = tmp_path_factory.mktemp("rm_demo")
    write_demo_datasets(out / "data", num_train=64, num_val=16)
    build_tokenizer(out / "tokenizer")
    return out


def rm_overrides(demo: Path, kind: str, run: str) -> list[str]:
    return [
        f"data.train={demo / 'data' / kind / 'train.jsonl'}",
        "data.val=null",
        f"data.tokenizer={demo / 'tokenizer'}",
        f"checkpoint.dir={demo / 'runs' / run}",
        f"trainer.max_steps={RM_STEPS}",
        "trainer.val_every=0",
        "optim.warmup_steps=0",
        "logging.tensorboard_dir=null",
        "logging.progress_bar=false",
    ]


def padded(rows: list[list[int]], pad: int = BAD_PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[N, S]`` tokens (three columns past the longest row) and ``[N]`` lengths."""
    lengths = torch.tensor([len(row) for row in rows])
    tokens = torch.full((len(rows), int(lengths.max()) + 3), pad, dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row)
    return tokens, lengths


def error_of(call) -> str:
    try:
        call()
    except (ValueError, FileNotFoundError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def pairwise_worker(config_file: str, overrides: list[str]) -> dict:
    """Train, then score pairs with the recipe's own forward step and with the scorer loaded from the checkpoint."""
    from aligner.config import load_config
    from aligner.data import EncodedDataset, collate_preference, load_tokenizer, read_records
    from aligner.recipes import rm
    from aligner.rewards.model import RewardModelScorer
    from aligner.trainers.step import evaluate

    config = load_config(rm.RMRunConfig, CONFIGS / config_file, overrides)
    state = rm.run(config).states["reward_model"]
    tokenizer = load_tokenizer(config.data.tokenizer)
    pairs = EncodedDataset(read_records(config.data.train, "preference")[:3], tokenizer, max_length=64)
    recipe_scores = []
    for example in pairs:
        batch = collate_preference([example], pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
        metrics = evaluate(state.ddp_model, [[batch]], rm.make_forward_step(config.rm))
        recipe_scores += [metrics["chosen_reward"], metrics["rejected_reward"]]
    tokens, lengths = padded([sequence.input_ids for pair in pairs for sequence in (pair.chosen, pair.rejected)])
    scorer = RewardModelScorer.from_checkpoint(config.checkpoint.dir, micro_batch_size=4)
    return {
        "recipe": torch.tensor(recipe_scores),
        "scores": scorer.score(tokens, lengths),
        "one_by_one": torch.cat([scorer.score(tokens[row : row + 1], lengths[row : row + 1]) for row in range(6)]),
        "frozen": not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters()),
        "weights_error": error_of(
            lambda: RewardModelScorer.from_checkpoint(config.checkpoint.dir, attribute_weights={"helpfulness": 1.0})
        ),
        "missing_error": error_of(lambda: RewardModelScorer.from_checkpoint(Path(config.checkpoint.dir) / "nothing")),
    }


def regression_worker(config_file: str, overrides: list[str]) -> dict:
    """Train a regression RM; score with attribute weights, alone and as a term of the combined reward."""
    from aligner.config import load_config
    from aligner.data import EncodedDataset, load_tokenizer, read_records
    from aligner.recipes import rm
    from aligner.rewards import RewardConfig, RewardInputs, RewardTerm, build_rewards
    from aligner.rewards.model import RewardModelScorer

    config = load_config(rm.RMRunConfig, CONFIGS / config_file, overrides)
    model = rm.run(config).states["reward_model"].model.eval()
    tokenizer = load_tokenizer(config.data.tokenizer)
    records = read_records(config.data.train, "regression")[:ROWS]
    encoded = EncodedDataset(records, tokenizer, max_length=64, attribute_names=config.rm.attribute_names)
    tokens, lengths = padded([example.sequence.input_ids for example in encoded])
    with torch.no_grad():  # the reference: the trained model's outputs read by hand at each last real token
        outputs = model(torch.where(tokens >= 0, tokens, tokenizer.pad_token_id), None, None)
    reference = torch.stack([outputs[row, length - 1] for row, length in enumerate(lengths.tolist())])

    checkpoint = config.checkpoint.dir
    scorer = RewardModelScorer.from_checkpoint(checkpoint, attribute_weights=WEIGHTS, micro_batch_size=2)
    inputs = RewardInputs(
        prompts=[record.prompt for record in records],
        responses=[record.response for record in records],
        extras=[{} for _ in records],
        tokens=tokens,
        lengths=lengths,
    )
    combined = build_rewards(
        RewardConfig(
            terms=[
                RewardTerm(function="aligner.rewards.arithmetic:exact_answer"),
                RewardTerm(model=checkpoint, attribute_weights=WEIGHTS, weight=0.5, name="helpful"),
            ],
            model_micro_batch_size=3,
        )
    ).score(inputs)
    out_of_vocab = tokens.clone()
    out_of_vocab[1, 2] = model.aligner_config.vocab_size
    return {
        "names": list(config.rm.attribute_names),
        "reference": reference,
        "attribute_scores": scorer.attribute_scores(tokens, lengths),
        "scores": scorer.score(tokens, lengths),
        "tokens": tokens,
        "lengths": lengths,
        "total": combined.total,
        "terms": combined.terms,
        "metrics": combined.metrics,
        "no_weights_error": error_of(lambda: RewardModelScorer.from_checkpoint(checkpoint)),
        "unknown_error": error_of(
            lambda: RewardModelScorer.from_checkpoint(checkpoint, attribute_weights={"humor": 1.0})
        ),
        "vocab_error": error_of(lambda: scorer.score(out_of_vocab, lengths)),
        "no_tokens_error": error_of(lambda: scorer(RewardInputs(inputs.prompts, inputs.responses, inputs.extras))),
    }


def pipeline_worker(checkpoint: str, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Score with the checkpoint split over two pipeline stages."""
    from aligner.parallel import initialize
    from aligner.rewards.model import RewardModelScorer

    initialize(tp=1, pp=2)
    scorer = RewardModelScorer.from_checkpoint(checkpoint, attribute_weights=WEIGHTS, micro_batch_size=2)
    return scorer.score(tokens, lengths)


@pytest.fixture(scope="module")
def pairwise(demo) -> dict:
    (result,) = run_distributed(
        pairwise_worker, 1, args=("rm_tiny.yaml", rm_overrides(demo, "preference", "rm_pairwise"))
    )
    return result


@pytest.fixture(scope="module")
def regression(demo) -> dict:
    (result,) = run_distributed(
        regression_worker, 1, args=("rm_regression_tiny.yaml", rm_overrides(demo, "regression", "rm_regression"))
    )
    return result


def test_pairwise_scores_equal_the_recipes_own_scores(pairwise):
    print("pairwise scores:", pairwise["scores"].tolist())
    assert pairwise["scores"].unique().numel() == 6  # a trained head: the comparison is not between zeros
    torch.testing.assert_close(pairwise["scores"], pairwise["recipe"].float(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(pairwise["one_by_one"], pairwise["scores"], rtol=RTOL, atol=ATOL)
    assert pairwise["scores"].dtype == torch.float32 and pairwise["scores"].shape == (6,)
    assert pairwise["frozen"]


def test_a_pairwise_model_takes_no_attribute_weights(pairwise):
    assert "a pairwise reward model has one output" in pairwise["weights_error"]
    assert pairwise["missing_error"].startswith("FileNotFoundError: reward model")


def test_regression_scores_are_the_attribute_weighted_sum(regression):
    names = regression["names"]
    reference = regression["reference"].double()
    print("attribute scores:", reference.tolist())
    assert reference.unique().numel() == reference.numel()
    torch.testing.assert_close(regression["attribute_scores"], reference.float(), rtol=RTOL, atol=ATOL)
    weights = torch.tensor([WEIGHTS.get(name, 0.0) for name in names], dtype=torch.float64)
    expected = (reference * weights).sum(dim=-1)
    torch.testing.assert_close(regression["scores"].double(), expected, rtol=RTOL, atol=ATOL)


def test_a_reward_model_term_sums_with_a_function_term(regression):
    terms = regression["terms"]
    assert set(terms) == {"exact_answer", "helpful"}
    torch.testing.assert_close(terms["helpful"], regression["scores"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        regression["total"], terms["exact_answer"] + 0.5 * terms["helpful"], rtol=RTOL, atol=ATOL
    )
    assert regression["metrics"]["reward_helpful_mean"] == pytest.approx(terms["helpful"].double().mean().item())


def test_regression_weights_must_name_the_models_attributes(regression):
    assert "set attribute_weights" in regression["no_weights_error"]
    assert "['humor'], which are not outputs of the model" in regression["unknown_error"]
    assert "token id 384 (row 1, position 2) is outside the reward model's vocabulary" in regression["vocab_error"]
    assert "reads token ids" in regression["no_tokens_error"]


def test_two_pipeline_stages_give_the_single_process_scores(demo, regression):
    checkpoint = str(demo / "runs" / "rm_regression")
    results = run_distributed(pipeline_worker, 2, args=(checkpoint, regression["tokens"], regression["lengths"]))
    for scores in results:  # every stage gets the scores
        torch.testing.assert_close(scores, regression["scores"], rtol=RTOL, atol=ATOL)
