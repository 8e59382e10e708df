"""SteerLM's model-running pieces: reward-model annotation and conditioned generation.

``annotate`` (:mod:`aligner.recipes.steerlm`) and ``generate_with_attributes``
(:mod:`aligner.generation.steerlm`) need megatron (initialized once per process),
so one spawned world runs them and returns raw outputs next to direct forwards of
the same models; the tests compare them here.
"""

import math
import random
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch
from distributed import run_distributed

from aligner.generation.steerlm import generate_with_attributes
from aligner.models.config import ModelConfig
from aligner.recipes.steerlm import annotate

HELPSTEER = ("helpfulness", "correctness", "verbosity")


# ---------------------------------------------------------------- annotate and generate (spawned world)

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    vocab_size=64,
    max_position_embeddings=128,  # the attribute line alone is 65 characters
    init_std=0.3,
)
# Head biases: attribute 0 always far above 4, attribute 1 far below 0, attribute 2 spread around 2.
HEAD_BIAS, HEAD_STD = (20.0, -20.0, 2.0), 0.3
BATCH_SIZE = 4
MAX_NEW = 6
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789:,<>/ \n+?")


def _tokenizer():
    """A character-level Hugging Face tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def _records(seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 9, 3, 7, 1]
    return [
        {
            "prompt": f"p{i}",
            "response": f"r{i}",
            "ids": torch.randint(3, 64, (n,), generator=gen).tolist(),
            "attributes": {"helpfulness": -100},
        }  # fmt: skip
        for i, n in enumerate(lengths)
    ]


def steerlm_worker(records):
    from aligner.generation.torch_engine import generate
    from aligner.models.gpt import build_model
    from aligner.parallel import destroy, initialize

    initialize()
    result = {}
    reward_model = build_model(MODEL, num_value_outputs=len(HELPSTEER))
    with torch.no_grad():
        reward_model.output_layer.weight.normal_(0.0, HEAD_STD)
        reward_model.output_layer.bias.copy_(torch.tensor(HEAD_BIAS))
    reward_model.train()
    result["by_encode"] = annotate(records, reward_model, lambda r: r["ids"], names=HELPSTEER, batch_size=BATCH_SIZE)
    result["training_after"] = reward_model.training
    result["by_ids"] = annotate(records, reward_model, [r["ids"] for r in records], names=HELPSTEER, batch_size=1)
    reward_model.eval()
    with torch.no_grad():
        result["direct"] = [reward_model(torch.tensor([r["ids"]]), None, None)[0, -1].tolist() for r in records]
    try:
        annotate(records, reward_model, lambda r: r["ids"], names=("helpfulness", "correctness"))
    except ValueError as err:
        result["wrong_count"] = str(err)

    tokenizer = _tokenizer()
    policy = build_model(MODEL)
    chat = [{"role": "user", "content": "add 2 3"}]
    attrs = {"helpfulness": 4, "correctness": 4, "verbosity": 1}
    result["chat"] = generate_with_attributes(
        policy, tokenizer, chat, attrs, names=HELPSTEER, max_new_tokens=MAX_NEW, greedy=True
    )
    result["text"] = generate_with_attributes(
        policy, tokenizer, "add 2 3", attrs, names=HELPSTEER, max_new_tokens=MAX_NEW, greedy=True
    )
    # The same by hand: the rendered prompt, its ids, the engine, the decode.
    line = "<attributes>helpfulness:4,correctness:4,verbosity:1</attributes>"
    rendered = {"chat": f"<system>{line}\n<user>add 2 3\n<assistant>", "text": f"{line}\nadd 2 3"}
    for kind, text in rendered.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        out = generate(policy, [ids], max_new_tokens=MAX_NEW, eos_token_id=1, pad_token_id=0, greedy=True)
        response = out.tokens[0, len(ids) : int(out.lengths[0])].tolist()
        result[f"expected_{kind}"] = tokenizer.decode(response, skip_special_tokens=True)
    destroy()
    return result


def _reference_value(score: float) -> int:
    return min(4, max(0, int(Decimal(repr(score)).quantize(Decimal(1), rounding=ROUND_HALF_UP))))


@pytest.fixture(scope="module")
def world():
    seed = random.randrange(2**31)  # fresh per run; printed for replaying a failure
    print(f"steerlm records seed {seed}")
    records = _records(seed)
    return records, run_distributed(steerlm_worker, 1, args=(records,))[0]


@pytest.mark.slow
def test_annotate_reads_the_last_real_token_and_rounds(world):
    records, result = world
    expected = [{n: _reference_value(s) for n, s in zip(HELPSTEER, scores, strict=True)} for scores in result["direct"]]
    assert [r["attributes"] for r in result["by_encode"]] == expected
    assert [r["attributes"] for r in result["by_ids"]] == expected
    assert all(e["helpfulness"] == 4 and e["correctness"] == 0 for e in expected), "clamping at both ends"
    for record, annotated in zip(records, result["by_encode"], strict=True):
        assert {k: v for k, v in annotated.items() if k != "attributes"} == {
            k: v for k, v in record.items() if k != "attributes"
        }
    assert result["training_after"]
    assert all(not math.isnan(s) for scores in result["direct"] for s in scores)


@pytest.mark.slow
def test_annotate_checks_the_output_count(world):
    _, result = world
    assert re.search(r"3 outputs but 2 attribute names", result["wrong_count"])


@pytest.mark.slow
def test_generate_with_attributes_puts_the_line_in_the_prompt(world):
    _, result = world
    assert result["chat"] == result["expected_chat"]
    assert result["text"] == result["expected_text"]


def test_annotate_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        annotate([{}], torch.nn.Linear(1, 1), [[1]], names=HELPSTEER, batch_size=0)
    with pytest.raises(ValueError, match="2 token id lists for 1 records"):
        annotate([{}], torch.nn.Linear(1, 1), [[1], [2]], names=HELPSTEER)
    with pytest.raises(ValueError, match=r"record\(s\) \[1\] encode to no tokens"):
        annotate([{}, {}], torch.nn.Linear(1, 1), [[1], []], names=HELPSTEER)
