"""Fused alignment kernels with CPU and CUDA implementations.

Every function here is backed by a ``torch.ops.aligner`` custom op with a fake
kernel (``torch.compile``-ready) and, where it is differentiable, autograd. The
float64 pure-torch references the tests compare against are in
:mod:`aligner.ops.reference`.
"""

from aligner.ops.greedy import linear_argmax, linear_greedy
from aligner.ops.linear import linear_token_logprobs
from aligner.ops.logprob import IGNORE_INDEX, token_entropy, token_logprobs, token_logprobs_and_entropy
from aligner.ops.rl import gae, group_advantages, kl_penalty, masked_mean, masked_var, masked_whiten

__all__ = [
    "IGNORE_INDEX",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_argmax",
    "linear_greedy",
    "linear_token_logprobs",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
