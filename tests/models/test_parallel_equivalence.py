"""Tensor- and pipeline-parallel GPTModel shards compute what one process computes.

Every case loads the same full weights (tests/model_weights.py, independent of the model
code) into ``build_model`` shards and runs one training step through
megatron-core's schedule: ``forward_backward_no_pipelining`` at PP=1, the 1F1B
schedule at PP=2, two micro-batches each, gloo on CPU; the tied-embedding case
(with Qwen3's per-head query/key norms) also goes through megatron's
DistributedDataParallel and finalize_model_grads.
"""

from dataclasses import replace

import pytest
import torch
from distributed import run_distributed
from model_weights import random_full_state_dict

from aligner.models.config import ModelConfig

# Odd vocabulary: TP=2 pads it to 132, so the padding path is exercised.
CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    vocab_size=131,
    rope_theta=10000.0,
)
MICRO_BATCHES, MICRO_BATCH, SEQ = 2, 2, 12
VALUE_OUTPUTS = 3
# fp32 throughout; sharding only reorders sums (row-parallel all-reduce, split
# matmuls), which moves results by a few ulps.
ATOL, RTOL = 1e-5, 1e-4


def _run_step(model, batches, loss_from_output):
    """One forward+backward over the micro-batches; returns (per-micro-batch outputs, losses) on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = []

    def forward_step(data_iterator, model):
        tokens, targets = next(data_iterator)
        output = model(tokens, None, None, runtime_gather_output=True)

        def loss_func(output):
            outputs.append(output.detach())
            loss = loss_from_output(output, targets)
            return loss, {"loss": loss.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )
    return outputs, [entry["loss"] for entry in losses]


def _full_grads(model, grad_attr: str) -> dict[str, torch.Tensor]:
    """Gradients in the full layout: swap them into the parameters and gather."""
    from aligner.models.sharding import gather_full_state_dict

    for param in model.parameters():
        param.data = getattr(param, grad_attr)
    return gather_full_state_dict(model)


KINDS = ("lm", "value", "tied_qk_norm_lm_ddp")


def worker(tp: int, pp: int, state_dict, batches):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from aligner.models.gpt import build_model, mask_padded_vocab
    from aligner.models.sharding import load_full_state_dict
    from aligner.parallel import destroy, initialize

    initialize(tp=tp, pp=pp)

    def lm_loss(logits, targets):  # logits [b, s, padded_vocab], gathered
        logits = mask_padded_vocab(logits, CONFIG.vocab_size)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def value_loss(values, targets):  # values [b, s, k]
        return (values * torch.linspace(-1, 1, VALUE_OUTPUTS)).square().mean()

    result = {
        "last_stage": parallel_state.is_pipeline_last_stage(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
    }
    for kind in KINDS:
        if kind == "tied_qk_norm_lm_ddp":
            # Tied embeddings: at PP=2 the last stage holds a copy of the embedding whose
            # gradient megatron's DDP + finalize_model_grads must add to the first stage's.
            # Query/key norms: replicated weights that each TP rank applies to its own heads,
            # so finalize_model_grads must sum their gradients over the TP ranks.
            model = build_model(replace(CONFIG, tie_word_embeddings=True, qk_layernorm=True), init_weights=False)
            load_full_state_dict(model, {k: v for k, v in state_dict.items() if k != "output_layer.weight"})
            model.config.finalize_model_grads_func = finalize_model_grads
            wrapped = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
            wrapped.zero_grad_buffer()
            outputs, losses = _run_step(wrapped, batches, lm_loss)
            grad_attr = "main_grad"
        else:
            model = build_model(
                CONFIG, num_value_outputs=VALUE_OUTPUTS if kind == "value" else None, init_weights=False
            )
            load_full_state_dict(model, state_dict)
            outputs, losses = _run_step(model, batches, lm_loss if kind == "lm" else value_loss)
            grad_attr = "grad"
        result[kind] = {"outputs": outputs, "losses": losses, "grads": _full_grads(model, grad_attr)}
    destroy()
    return result


def _merge(results: list[dict]) -> dict:
    """One view of a parallel run: outputs/losses from a last-stage rank, grads from every stage."""
    last = next(r for r in results if r["last_stage"])
    merged = {}
    for kind in KINDS:
        grads = {}
        for r in results:
            if r["tp_rank"] == 0:
                grads.update(r[kind]["grads"])
        merged[kind] = {"outputs": last[kind]["outputs"], "losses": last[kind]["losses"], "grads": grads}
    return merged


@pytest.fixture(scope="module")
def inputs():
    tokens = torch.randint(0, CONFIG.vocab_size, (MICRO_BATCHES, MICRO_BATCH, SEQ + 1))
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    state_dict = random_full_state_dict(CONFIG, int(torch.randint(0, 2**31, ())), VALUE_OUTPUTS)
    for i in range(CONFIG.num_layers):  # read only by the qk-norm case
        for norm in ("q_layernorm", "k_layernorm"):
            state_dict[f"decoder.layers.{i}.self_attention.{norm}.weight"] = 1.0 + 0.1 * torch.randn(CONFIG.head_dim)
    return state_dict, batches


@pytest.fixture(scope="module")
def reference(inputs):
    state_dict, batches = inputs
    return _merge(run_distributed(worker, 1, args=(1, 1, state_dict, batches)))


def _assert_same_step(got: dict, want: dict) -> None:
    for kind in KINDS:
        g, w = got[kind], want[kind]
        for out_g, out_w in zip(g["outputs"], w["outputs"], strict=True):
            torch.testing.assert_close(out_g[..., : out_w.shape[-1]], out_w, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(torch.stack(g["losses"]), torch.stack(w["losses"]), atol=ATOL, rtol=RTOL)
        assert g["grads"].keys() == w["grads"].keys()
        for name in w["grads"]:
            torch.testing.assert_close(g["grads"][name], w["grads"][name], atol=ATOL, rtol=RTOL, msg=f"{kind} {name}")


@pytest.mark.slow
def test_tensor_parallel_step_matches_single_process(inputs, reference):
    state_dict, batches = inputs
    got = _merge(run_distributed(worker, 2, args=(2, 1, state_dict, batches)))
    # TP=2 pads the vocabulary to 132: those logits are masked by the loss and must be 0 (zero padding rows).
    for logits in got["lm"]["outputs"]:
        assert logits.shape[-1] == 132
        assert torch.all(logits[..., CONFIG.vocab_size :] == 0)
    _assert_same_step(got, reference)


@pytest.mark.slow
def test_pipeline_parallel_1f1b_step_matches_single_process(inputs, reference):
    state_dict, batches = inputs
    got = _merge(run_distributed(worker, 2, args=(1, 2, state_dict, batches)))
    _assert_same_step(got, reference)
