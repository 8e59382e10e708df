"""Every aligner op works under torch.compile(fullgraph=True) and passes torch.library.opcheck.

opcheck checks each ``torch.ops.aligner`` op's schema, fake kernel (shapes, dtypes,
strides), autograd registration and AOT dispatch against the real kernel.
"""

import pytest
import torch

from aligner import ops

# torch.compile: graph capture, fake kernels and autograd are exercised by the
# aot_eager backend in seconds; one test also runs inductor end to end.
BACKEND = "aot_eager"
# Compiled and eager run the same kernels; only the order of surrounding fp32 ops may differ.
COMPILED_ATOL = 1e-5


def _logits():
    return torch.randn(2, 3, 37).requires_grad_()


def _labels():
    labels = torch.randint(0, 37, (2, 3))
    labels[1, 2] = -100
    labels[0, 0] = 4
    return labels


def _mask(shape):
    mask = torch.rand(shape) < 0.7
    mask.view(-1)[0] = True
    return mask


# name -> (function of tensors, its tensor arguments); the differentiable ones return a scalar loss.
def _differentiable_cases():
    labels = _labels()
    mask = _mask((4, 9))
    return {
        "token_logprobs": (lambda x: ops.token_logprobs(x, labels, temperature=0.7).sum(), (_logits(),)),
        "token_entropy": (lambda x: (ops.token_entropy(x, temperature=1.3) ** 2).sum(), (_logits(),)),
        "token_logprobs_and_entropy": (
            lambda x: sum(out.sum() for out in ops.token_logprobs_and_entropy(x, labels)),
            (_logits(),),
        ),
        "kl_penalty": (
            lambda a, b: ops.kl_penalty(a, b, estimator="k3").mean(),
            (-torch.rand(4, 9).requires_grad_(), -torch.rand(4, 9).requires_grad_()),
        ),
        "masked_mean": (lambda x: ops.masked_mean(x * 2, mask, dim=-1).sum(), (torch.randn(4, 9).requires_grad_(),)),
        "masked_var": (lambda x: ops.masked_var(x, mask), (torch.randn(4, 9).requires_grad_(),)),
        "masked_whiten": (
            lambda x: (ops.masked_whiten(x, mask, shift_mean=False) ** 2).sum(),
            (torch.randn(4, 9).requires_grad_(),),
        ),
        # chunk_size=4 over 6 rows: a full chunk and a partial one, both traced.
        "linear_token_logprobs": (
            lambda h, w: sum(
                out.sum() for out in ops.linear_token_logprobs(h, w, labels, chunk_size=4, return_entropy=True)
            ),
            (torch.randn(2, 3, 16).requires_grad_(), (torch.randn(37, 16) / 4).requires_grad_()),
        ),
    }


def _constant_cases():
    mask, valid = _mask((4, 9)), _mask((3, 4))
    return {
        "gae": (
            lambda r, v: ops.gae(r, v, mask, gamma=0.9, lam=0.8, mask_mode="carry_forward"),
            (torch.randn(4, 9), torch.randn(4, 9)),
        ),
        "group_advantages": (
            lambda r: ops.group_advantages(r, 4, baseline="leave_one_out", valid=valid),
            (torch.randn(3, 4),),
        ),
    }


def _assert_close(got, expected):
    if isinstance(got, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=0, atol=COMPILED_ATOL)
    else:
        for g, e in zip(got, expected, strict=True):
            _assert_close(g, e)


@pytest.mark.parametrize("name", list(_differentiable_cases()))
def test_compiled_forward_and_backward(name):
    torch._dynamo.reset()
    fn, inputs = _differentiable_cases()[name]
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)
    eager_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = compiled(*inputs)
    expected = fn(*eager_inputs)
    _assert_close(loss, expected)
    _assert_close(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, eager_inputs))


@pytest.mark.parametrize("name", list(_constant_cases()))
def test_compiled_constant_ops(name):
    torch._dynamo.reset()
    fn, inputs = _constant_cases()[name]
    _assert_close(torch.compile(fn, fullgraph=True, backend=BACKEND)(*inputs), fn(*inputs))


def test_inductor_end_to_end():
    """A PPO-style loss through every differentiable op, compiled by the default backend."""
    torch._dynamo.reset()
    labels = _labels()
    mask = labels != -100

    def loss_fn(logits, ref_logprobs, advantages):
        logprobs, entropy = ops.token_logprobs_and_entropy(logits, labels, temperature=0.9)
        kl = ops.kl_penalty(logprobs, ref_logprobs, estimator="k3")
        whitened = ops.masked_whiten(advantages, mask)
        policy = -ops.masked_mean(logprobs * whitened, mask)
        return policy + 0.1 * ops.masked_mean(kl, mask) - 0.01 * ops.masked_mean(entropy, mask, dim=-1).sum()

    inputs = (_logits(), -torch.rand(2, 3) * 3, torch.randn(2, 3))
    eager_logits = inputs[0].detach().clone().requires_grad_()
    loss = torch.compile(loss_fn, fullgraph=True)(*inputs)
    expected = loss_fn(eager_logits, *inputs[1:])
    _assert_close(loss, expected)
    _assert_close(torch.autograd.grad(loss, inputs[0]), torch.autograd.grad(expected, eager_logits))


def _opcheck_cases():
    """(op name, args) for every op under torch.ops.aligner; several cases per op where it branches."""
    logits = torch.randn(3, 5, 37)
    labels = torch.randint(0, 37, (3, 5))
    labels[0, 1] = -100
    lse = torch.logsumexp(logits / 0.7, -1)
    entropy = torch.rand(3, 5)
    grad = torch.randn(3, 5)
    logprobs, ref_logprobs = -torch.rand(4, 9), -torch.rand(4, 9)
    x, mask = torch.randn(4, 9), _mask((4, 9))
    return [
        ("logprobs_entropy_forward", (logits.requires_grad_(), labels, 0.7, -100, True, True)),
        ("logprobs_entropy_forward", (logits.bfloat16(), labels.int(), 1.0, -100, True, False)),
        ("logprobs_entropy_forward", (logits.half(), None, 1.3, -100, False, True)),
        ("logprobs_entropy_backward", (grad, grad, logits.detach(), labels, lse, entropy, 0.7, -100)),
        ("logprobs_entropy_backward", (None, grad, logits.detach().bfloat16(), None, lse, entropy, 0.7, -100)),
        ("logprobs_entropy_backward", (grad, None, logits.detach(), labels, lse, None, 0.7, -100)),
        ("kl_penalty_forward", (logprobs.requires_grad_(), ref_logprobs.requires_grad_(), 3)),
        ("kl_penalty_forward", (logprobs.detach().bfloat16(), ref_logprobs.detach(), 1)),
        ("kl_penalty_backward", (torch.randn(4, 9), logprobs.detach(), ref_logprobs.detach(), 2)),
        ("masked_moments", (x.requires_grad_(), mask)),
        ("masked_moments", (x.detach().half(), mask.float())),
        ("masked_whiten", (x.requires_grad_(), mask, True, 1e-8)),
        ("masked_whiten", (x.detach().bfloat16(), mask.long(), False, 1e-5)),
        ("gae", (torch.randn(4, 9), torch.randn(4, 9), mask, 0.9, 0.8, False)),
        ("gae", (torch.randn(4, 9), torch.randn(4, 9), mask, 1.0, 0.95, True)),
        ("group_advantages", (torch.randn(12), None, 4, False, True, 1e-6)),
        ("group_advantages", (torch.randn(3, 4), _mask((3, 4)), 4, True, False, 1e-6)),
        ("linear_argmax", (torch.randn(5, 24), torch.randn(4100, 24))),
        ("linear_argmax", (torch.randn(0, 8), torch.randn(3, 8))),
    ]


# Ops with a CUDA kernel only; their opcheck runs on the GPU (tests/cuda/test_linear_cuda.py).
CUDA_ONLY_OPS = {"linear_logprobs_forward"}


def _registered_ops():
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("aligner::"))


def test_every_registered_op_has_an_opcheck_case():
    assert _registered_ops(), "no torch.ops.aligner ops registered"
    assert sorted({name for name, _ in _opcheck_cases()} | CUDA_ONLY_OPS) == _registered_ops()


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.aligner, name).default, args)


def test_linear_greedy_compiles():
    torch._dynamo.reset()
    hidden, weight = torch.randn(2, 3, 16), torch.randn(50, 16)
    tokens, logprobs = torch.compile(ops.linear_greedy, backend=BACKEND, fullgraph=True)(hidden, weight)
    expected_tokens, expected_logprobs = ops.linear_greedy(hidden, weight)
    assert torch.equal(tokens, expected_tokens)
    _assert_close(logprobs, expected_logprobs)


def test_linear_token_logprobs_label_check_runs_in_the_compiled_graph():
    compiled = torch.compile(lambda h, w, y: ops.linear_token_logprobs(h, w, y), backend=BACKEND, fullgraph=True)
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    compiled(hidden, weight, torch.tensor([0, 10, -100, 3]))
    with pytest.raises(RuntimeError, match="labels"):
        compiled(hidden, weight, torch.tensor([0, 11, -100, 3]))
