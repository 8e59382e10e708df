"""aligner.demo_report: the table, the curves and the held-out answers of ``make demo``, on fabricated stages.

Each stage's TensorBoard events are written here with ``SummaryWriter`` (known values, so the table's
numbers are known); the exports are tiny random Llama models with the demo tokenizer. The held-out
answers are checked against a plain greedy loop (argmax of the logits, one prompt at a time).
"""

import random
import re
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import LlamaConfig, LlamaForCausalLM

from aligner.console import UserError
from aligner.data.synthetic import ArithmeticProblem, reward, write_jsonl
from aligner.data.tokenizer import build_tokenizer, load_tokenizer, stop_token_ids
from aligner.demo_report import MAX_NEW_TOKENS, PLOT_NAME, answer_held_out, load_stages, report

# Fabricated stages, listed in the order they "ran" (their events' wall times); the folder names'
# alphabetical order differs, so the discovered order is the run order only if it is read from the events.
STAGES = {
    "sft": {"train/loss": [(10, 5.0), (20, 3.0), (30, 1.0)], "val/loss": [(20, 2.5), (30, 1.5)]},
    "rm": {"train/loss": [(10, 0.7), (20, 0.1)], "val/loss": [(20, 0.2)], "val/accuracy": [(10, 0.7), (20, 0.9)]},
    "grpo": {
        # first five logged rewards average 0.2, the last five 0.8
        "train/reward_mean": [(step, 0.2) for step in range(10, 60, 10)] + [(step, 0.8) for step in range(60, 110, 10)],
        "val/reward_mean": [(0, 0.3), (100, 0.6)],
        "train/kl": [(step, 0.05) for step in range(10, 110, 10)],
        "train/loss": [(step, 0.01) for step in range(10, 110, 10)],
    },
    "dpo": {"train/loss": [(10, 0.69), (20, 0.4)], "val/loss": [(20, 0.3)], "val/accuracy": [(20, 0.95)]},
}
EXPORTS = ("sft", "dpo")  # the stages with a Hugging Face export (the reward model has none)


def held_out_rows() -> list[dict]:
    # Four-digit operands (the tokenizer's corpus goes to 20) take several tokens: prompts of several
    # lengths, so the answers come in several batches.
    lefts = [random.randrange(21) for _ in range(3)] + [random.randrange(1000, 10000) for _ in range(3)]
    problems = [ArithmeticProblem(left, "+", random.randrange(21)) for left in lefts]
    return [{"prompt": problem.question, "answer": problem.answer} for problem in problems]


def tiny_export(out: Path, tokenizer_dir: Path) -> Path:
    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine each op waits for every thread (50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A demo folder as ``make demo`` leaves it: tokenizer, held-out prompts, each stage's events, two exports."""
    demo = tmp_path_factory.mktemp("demo")
    build_tokenizer(demo / "tokenizer")
    write_jsonl(held_out_rows(), demo / "data" / "rl_prompt" / "val.jsonl")
    for order, (name, scalars) in enumerate(STAGES.items()):
        writer = SummaryWriter(log_dir=str(demo / "runs" / name / "tensorboard"))
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag, value, step, walltime=1000.0 * (order + 1) + step)
        writer.close()
    for name in EXPORTS:
        tiny_export(demo / "runs" / name / "hf", demo / "tokenizer")
    return demo


def plain_greedy(model: LlamaForCausalLM, tokenizer, question: str) -> str:
    """Argmax of the full forward's last logits, one token at a time, until a stop token."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(tokenizer)
    response = []
    with torch.inference_mode():
        for _ in range(MAX_NEW_TOKENS):
            token = int(model(torch.tensor([ids + response])).logits[0, -1].argmax())
            if token in stops:
                break
            response.append(token)
    return tokenizer.decode(response, skip_special_tokens=True)


def test_held_out_answers_are_plain_greedy_decoding_scored_by_the_exact_answer(demo_dir):
    export, tokenizer_dir = demo_dir / "runs" / "sft" / "hf", demo_dir / "tokenizer"
    answers = answer_held_out(export, tokenizer_dir, demo_dir / "data" / "rl_prompt" / "val.jsonl")
    tokenizer, model = load_tokenizer(tokenizer_dir), LlamaForCausalLM.from_pretrained(export).eval()
    assert len({len(tokenizer(question)["input_ids"]) for question in answers.questions}) > 1  # several batches
    for question, response, score in zip(answers.questions, answers.responses, answers.rewards, strict=True):
        assert response == plain_greedy(model, tokenizer, question)
        assert score == reward(question, response)
    assert answers.accuracy == sum(answers.rewards) / len(answers.rewards)


def test_report_writes_the_curves_and_prints_each_stage(demo_dir, capsys):
    lines = report(demo_dir, examples=3)
    assert capsys.readouterr().out.splitlines() == lines
    png = demo_dir / PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = {line.split()[0]: line for line in lines[1:6]}
    assert table["stage"].split() == ["stage", "held-out", "accuracy", "metrics", "of", "the", "run"]
    assert "train loss 5.000 -> 1.000, val loss 1.500" in table["sft"]
    assert table["rm"].split()[1] == "-"
    assert "val pair accuracy 0.900, train loss 0.700 -> 0.100, val loss 0.200" in table["rm"]
    assert table["grpo"].split()[1] == "-"
    assert "train reward 0.20 -> 0.80, held-out reward 0.300 -> 0.600, KL 0.050" in table["grpo"]
    assert "train loss" not in table["grpo"]
    for name in EXPORTS:  # the accuracy itself: the test above
        assert re.fullmatch(r"\d\.\d{3} \(\d/6\)", " ".join(table[name].split()[1:3])), table[name]
    start = lines.index("held-out answers before (sft) and after (dpo) alignment:")
    assert len(lines[start + 1 : lines.index("", start)]) == 3
    assert f"curves: {png}" in lines


def test_stages_are_found_in_the_order_they_ran_unless_named(demo_dir):
    assert [stage.name for stage in load_stages(demo_dir / "runs")] == list(STAGES)
    assert [stage.name for stage in load_stages(demo_dir / "runs", ["dpo", "sft"])] == ["dpo", "sft"]
    assert [stage.export is not None for stage in load_stages(demo_dir / "runs")] == [True, False, False, True]


def test_a_missing_stage_is_an_error_that_names_it(demo_dir, tmp_path):
    with pytest.raises(UserError, match=r"\['ppo'\]"):
        load_stages(demo_dir / "runs", ["sft", "ppo"])
    with pytest.raises(UserError, match="make demo"):
        report(tmp_path)
