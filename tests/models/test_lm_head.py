"""The fused LM head (aligner.models.lm_head) equals the logits path, without ever holding the logits.

For each layout (one process; TP=2 and PP=2 on 2 gloo processes) and each model
(a vocabulary of 100 or 131 padded to 128 * tp, tied or untied embeddings, fp32),
one training step runs through megatron-core's forward_backward schedule twice on
the same weights and micro-batches:

- the logits path: ``model(input_ids, None, None)`` -> vocab-parallel logits ->
  ``sequence_logprobs(logits, labels, vocab_size=..., tp_group=...)`` (padding masked),
  entropy from the masked logits;
- the fused path: ``lm_hidden_states`` -> ``lm_token_logprobs(..., return_entropy=True)``.

The loss is the same random weighting of the per-token log-probs and entropies, so
the per-token values and every parameter's gradient must agree. At TP=2 a vocabulary
of 100 is padded to 256, which leaves rank 1 no real vocabulary row at all; 131
leaves it 3. Tied models are wrapped in megatron's DistributedDataParallel (the head
unwraps ``.module``; at PP=2 finalize_model_grads adds the last stage's copy of the
embedding gradient to the first stage's).
"""

from dataclasses import replace

import pytest
import torch
from distributed import run_distributed
from model_weights import random_full_state_dict

from aligner.models.config import ModelConfig

CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=100,
    vocab_pad_multiple=128,  # megatron-LM's padding: a multiple of 128 * tp
    max_position_embeddings=64,
)
# (vocab_size, tied embeddings, temperature). Padded to 128 at tp=1 and 256 at tp=2:
# at tp=2 rank 1 holds 0 real rows of 100 and 3 real rows of 131.
MODELS = ((100, False, 1.0), (100, True, 0.7), (131, False, 1.3), (131, True, 1.0))
MICRO_BATCHES, MICRO_BATCH, SEQ = 2, 3, 10
# fp32 throughout. The two paths compute the same sums in different orders: the fused
# head merges per-rank log-sum-exps and recomputes the logits chunk by chunk, where the
# logits path runs one matmul and one kernel pass over masked columns; the hidden
# states' gradient sums the vocab shards' partials in another order. That moves results
# by a few float32 ulps of O(1) values, amplified a little through two layers' backward.
ATOL, RTOL = 1e-5, 1e-4


def _model_name(model) -> str:
    vocab, tied, temperature = model
    return f"vocab{vocab}-{'tied' if tied else 'untied'}-T{temperature}"


def _batches(vocab_size: int, generator: torch.Generator):
    """Right-padded rows of different lengths, -100 on prompts and padding, labels at 0 and vocab_size - 1."""
    batches = []
    for _ in range(MICRO_BATCHES):
        input_ids = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long)
        labels = torch.full((MICRO_BATCH, SEQ), -100, dtype=torch.long)
        for row in range(MICRO_BATCH):
            length = int(torch.randint(4, SEQ + 1, (), generator=generator))
            input_ids[row, :length] = torch.randint(0, vocab_size, (length,), generator=generator)
            prompt = int(torch.randint(1, length - 1, (), generator=generator))
            labels[row, prompt - 1 : length - 1] = input_ids[row, prompt:length]
            labels[row, length - 2] = vocab_size - 1  # the last real id
        labels[0, 0] = 0
        batches.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "w_logprobs": torch.randn(MICRO_BATCH, SEQ, generator=generator),
                "w_entropy": torch.randn(MICRO_BATCH, SEQ, generator=generator),
            }
        )
    return batches


def _reference_entropy(logits, vocab_size, temperature):
    """Entropy over the real vocabulary from (vocab-parallel) logits, padding masked as sequence_logprobs does."""
    from megatron.core import parallel_state

    from aligner.models.gpt import mask_padded_vocab
    from aligner.ops import token_entropy
    from aligner.parallel.vocab_parallel import vocab_parallel_entropy

    tp = parallel_state.get_tensor_model_parallel_world_size()
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    masked = mask_padded_vocab(logits, vocab_size, start)
    if tp == 1:
        return token_entropy(masked, temperature=temperature)
    group = parallel_state.get_tensor_model_parallel_group()
    return vocab_parallel_entropy(masked, group, temperature=temperature)


def _run_step(model, batches, vocab_size, temperature, fused):
    """One forward+backward through megatron's schedule; (log-probs, entropies, logprobs-only agree) per micro-batch."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from aligner.algorithms.logprobs import sequence_logprobs
    from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs

    records = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        labels = batch["labels"]
        input_ids = batch["input_ids"]
        output = lm_hidden_states(model, input_ids) if fused else model(input_ids, None, None)

        def loss_func(output):
            if fused:
                logprobs, entropy = lm_token_logprobs(
                    model, output, labels, temperature=temperature, return_entropy=True
                )
                # Without entropy only the labelled rows go through the head (other chunks, so
                # not bitwise); the loss takes this path's log-probs, so its gradients are tested.
                alone = lm_token_logprobs(model, output, labels, temperature=temperature)
                # labelled_only: the entropy of the labelled rows alone (the loss takes it there, so its
                # gradients are tested too), 0 elsewhere; the log-probs as without entropy
                labelled_lp, labelled_entropy = lm_token_logprobs(
                    model, output, labels, temperature=temperature, return_entropy=True, labelled_only=True
                )
                has_label = labels != -100
                same_alone = (
                    torch.allclose(alone, logprobs, atol=ATOL, rtol=RTOL)
                    and torch.allclose(labelled_lp, alone, atol=ATOL, rtol=RTOL)
                    and torch.allclose(labelled_entropy, torch.where(has_label, entropy, 0.0), atol=ATOL, rtol=RTOL)
                )
                logprobs = alone
                entropy = torch.where(has_label, labelled_entropy, entropy)
            else:
                logprobs, _, _ = sequence_logprobs(
                    output,
                    labels,
                    vocab_size=vocab_size,
                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                    temperature=temperature,
                )
                entropy = _reference_entropy(output, vocab_size, temperature)
                same_alone = True
            records.append((logprobs.detach(), entropy.detach(), same_alone))
            loss = (logprobs * batch["w_logprobs"]).sum() + (entropy * batch["w_entropy"]).sum()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )
    return records


def _grads(model, wrapped) -> dict[str, torch.Tensor]:
    """This rank's gradients (megatron DDP's main_grad when wrapped), then cleared."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.main_grad if wrapped is not None else param.grad
        grads[name] = grad.detach().clone()
        param.grad = None
    if wrapped is not None:
        wrapped.zero_grad_buffer()
    return grads


def _both_paths(seed, vocab_size, tied, temperature, batches):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from aligner.models.gpt import build_model
    from aligner.models.sharding import load_full_state_dict

    config = replace(CONFIG, vocab_size=vocab_size, tie_word_embeddings=tied)
    state_dict = random_full_state_dict(config, seed)
    if tied:
        del state_dict["output_layer.weight"]
    model = build_model(config, init_weights=False)
    load_full_state_dict(model, state_dict)
    wrapped = None
    if tied:
        model.config.finalize_model_grads_func = finalize_model_grads
        wrapped = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
        wrapped.zero_grad_buffer()
    result = {}
    for path, fused in (("logits", False), ("fused", True)):
        records = _run_step(wrapped or model, batches, vocab_size, temperature, fused)
        result[path] = {"records": records, "grads": _grads(model, wrapped)}
    return model, result


def _errors(model, vocab_size) -> dict[str, str]:
    """What lm_token_logprobs raises on bad input (on every rank: before any collective)."""
    from aligner.models.lm_head import lm_token_logprobs

    hidden = torch.randn(4, 2, CONFIG.hidden_size)
    labels = torch.zeros(2, 4, dtype=torch.long)
    padding_label = labels.clone()
    padding_label[1, 2] = vocab_size  # the first padding id
    errors = {}
    for name, call in {
        "padding label": lambda: lm_token_logprobs(model, hidden, padding_label),
        "labels [S, B]": lambda: lm_token_logprobs(model, hidden, labels.t()),
        "temperature 0": lambda: lm_token_logprobs(model, hidden, labels, temperature=0.0),
    }.items():
        try:
            call()
            errors[name] = "no error"
        except Exception as error:  # noqa: BLE001 - the parent checks the type
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def _model_errors() -> dict[str, str]:
    """What the head says about models it does not apply to."""
    from aligner.models.gpt import build_model
    from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs

    value_model = build_model(CONFIG, num_value_outputs=1)
    input_ids = torch.zeros(1, 4, dtype=torch.long)
    errors = {}
    for name, call in {
        "value model hidden": lambda: lm_hidden_states(value_model, input_ids),
        "value model logprobs": lambda: lm_token_logprobs(
            value_model, torch.zeros(4, 1, CONFIG.hidden_size), torch.zeros(1, 4, dtype=torch.long)
        ),
        "not a GPTModel": lambda: lm_hidden_states(torch.nn.Linear(2, 2), input_ids),
    }.items():
        try:
            call()
            errors[name] = "no error"
        except Exception as error:  # noqa: BLE001 - the parent checks the type
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def worker(tp: int, pp: int, seed: int, batches_per_model, memory: bool = False):
    from megatron.core import parallel_state

    from aligner.parallel import destroy, initialize

    initialize(tp=tp, pp=pp)
    out = {"last_stage": parallel_state.is_pipeline_last_stage(), "models": {}}
    if memory:  # in the single-process run: one process start less
        out["memory"] = _memory_check()
    for (vocab_size, tied, temperature), batches in zip(MODELS, batches_per_model, strict=True):
        model, result = _both_paths(seed, vocab_size, tied, temperature, batches)
        if out["last_stage"] and not tied:
            result["errors"] = _errors(model, vocab_size)
        out["models"][_model_name((vocab_size, tied, temperature))] = result
    if tp == pp == 1:
        out["model_errors"] = _model_errors()
    if not out["last_stage"]:
        from aligner.models.lm_head import lm_token_logprobs

        try:
            lm_token_logprobs(model, torch.zeros(2, 1, CONFIG.hidden_size), torch.zeros(1, 2, dtype=torch.long))
            out["first_stage_error"] = "no error"
        except ValueError as error:
            out["first_stage_error"] = str(error)
    destroy()
    return out


@pytest.fixture(scope="module")
def inputs():
    seed = int(torch.randint(0, 2**31, ()))
    generator = torch.Generator().manual_seed(seed)
    return seed, [_batches(vocab, generator) for vocab, _, _ in MODELS]


def _check_layout(results, batches_per_model):
    for result in results:
        for model, batches in zip(MODELS, batches_per_model, strict=True):
            name = _model_name(model)
            logits_path, fused_path = result["models"][name]["logits"], result["models"][name]["fused"]
            if result["last_stage"]:
                assert len(fused_path["records"]) == MICRO_BATCHES
                for (lp_ref, ent_ref, _), (lp, ent, same_alone), batch in zip(
                    logits_path["records"], fused_path["records"], batches, strict=True
                ):
                    assert lp.shape == ent.shape == (MICRO_BATCH, SEQ) and lp.dtype == torch.float32
                    assert same_alone, name
                    assert torch.all(lp[batch["labels"] == -100] == 0)
                    torch.testing.assert_close(lp, lp_ref, atol=ATOL, rtol=RTOL, msg=f"{name} logprobs")
                    torch.testing.assert_close(ent, ent_ref, atol=ATOL, rtol=RTOL, msg=f"{name} entropy")
            assert fused_path["grads"].keys() == logits_path["grads"].keys()
            for param, want in logits_path["grads"].items():
                assert want.abs().sum() > 0 or "output_layer" in param or "word_embeddings" in param, (name, param)
                torch.testing.assert_close(
                    fused_path["grads"][param], want, atol=ATOL, rtol=RTOL, msg=f"{name} grad {param}"
                )


def _check_errors(results):
    for result in results:
        for model in MODELS:
            errors = result["models"][_model_name(model)].get("errors")
            if errors is None:
                continue
            assert errors["padding label"].startswith("IndexError"), errors
            assert f"[{model[0]}]" in errors["padding label"] and f"vocab_size={model[0]}" in errors["padding label"]
            assert errors["labels [S, B]"].startswith("ValueError: labels must be [batch, seq]"), errors
            assert errors["temperature 0"].startswith("ValueError: temperature"), errors


@pytest.fixture(scope="module")
def single_process(inputs):
    seed, batches = inputs
    return run_distributed(worker, 1, args=(1, 1, seed, batches, True))


def test_single_process_matches_logits_path(inputs, single_process):
    _, batches = inputs
    _check_layout(single_process, batches)
    _check_errors(single_process)
    errors = single_process[0]["model_errors"]
    assert errors["value model hidden"].startswith("ValueError: this is a value/reward model"), errors
    assert errors["value model logprobs"].startswith("ValueError: this is a value/reward model"), errors
    assert errors["not a GPTModel"].startswith("TypeError: expected a megatron GPTModel"), errors


@pytest.mark.slow
def test_tensor_parallel_matches_logits_path(inputs):
    seed, batches = inputs
    results = run_distributed(worker, 2, args=(2, 1, seed, batches))
    _check_layout(results, batches)
    _check_errors(results)
    # Both ranks computed the same log-probs (rank 1 with no real vocabulary row for vocab 100).
    for model in MODELS:
        name = _model_name(model)
        for (lp0, ent0, _), (lp1, ent1, _) in zip(
            results[0]["models"][name]["fused"]["records"], results[1]["models"][name]["fused"]["records"], strict=True
        ):
            assert torch.equal(lp0, lp1) and torch.equal(ent0, ent1), name
    # vocab 100: rank 1's output weight is all padding, and gets a zero gradient.
    rank1 = results[1]["models"][_model_name(MODELS[0])]["fused"]["grads"]
    assert torch.all(rank1["output_layer.weight"] == 0)


@pytest.mark.slow
def test_pipeline_parallel_matches_logits_path(inputs):
    seed, batches = inputs
    results = run_distributed(worker, 2, args=(1, 2, seed, batches))
    assert [r["last_stage"] for r in results] == [False, True]
    _check_layout(results, batches)
    _check_errors(results)
    assert "last pipeline stage" in results[0]["first_stage_error"]


# ------------------------------------------------------------------------------------------ memory

MEMORY_BATCH, MEMORY_SEQ, MEMORY_VOCAB, MEMORY_HIDDEN = 4, 512, 32000, 64


def _memory_check():
    """The largest op output of the fused path's forward + backward, and of the logits path's forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from aligner.models.gpt import build_model
    from aligner.models.lm_head import lm_hidden_states, lm_token_logprobs

    class LargestOutput(TorchDispatchMode):
        """The largest numel any op returns (forward and backward: CPU autograd runs on this thread)."""

        def __init__(self):
            super().__init__()
            self.largest, self.op, self.calls = 0, None, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.calls += 1
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.numel() > self.largest:
                    self.largest, self.op = leaf.numel(), str(func)
            return out

    config = replace(
        CONFIG,
        hidden_size=MEMORY_HIDDEN,
        ffn_hidden_size=2 * MEMORY_HIDDEN,
        vocab_size=MEMORY_VOCAB,
        vocab_pad_multiple=1,
        max_position_embeddings=MEMORY_SEQ,
    )
    model = build_model(config)
    input_ids = torch.randint(0, MEMORY_VOCAB, (MEMORY_BATCH, MEMORY_SEQ))
    labels = torch.randint(0, MEMORY_VOCAB, (MEMORY_BATCH, MEMORY_SEQ))
    labels[:, :7] = -100
    fused = LargestOutput()
    with fused:
        hidden = lm_hidden_states(model, input_ids)
        logprobs, entropy = lm_token_logprobs(model, hidden, labels, return_entropy=True)
        forward_calls = fused.calls
        (logprobs.sum() + entropy.sum()).backward()
    backward_calls = fused.calls - forward_calls
    # The recorder sees full logits when they exist: the logits path's forward.
    logits_path = LargestOutput()
    with torch.no_grad(), logits_path:
        model(input_ids, None, None)
    return {
        "fused": (fused.largest, fused.op),
        "backward_calls": backward_calls,
        "grad_is_set": model.output_layer.weight.grad is not None,
        "logits_path": (logits_path.largest, logits_path.op),
    }


def test_never_materializes_the_logits(single_process):
    from aligner.ops.linear import default_chunk_size

    result = single_process[0]["memory"]
    full_logits = MEMORY_BATCH * MEMORY_SEQ * MEMORY_VOCAB
    assert result["logits_path"][0] >= full_logits, result["logits_path"]
    assert result["backward_calls"] > 0 and result["grad_is_set"]
    largest, op = result["fused"]
    # At most one chunk of logits (or its gradient) at a time: the op's own chunk, a quarter of the logits here.
    one_chunk = default_chunk_size(MEMORY_VOCAB) * MEMORY_VOCAB
    assert largest <= one_chunk < full_logits / 3, (largest, op)
