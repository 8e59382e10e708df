"""Process groups and vocab-parallel log-probs.

- :func:`initialize` / :func:`destroy` (:mod:`aligner.parallel.groups`): the
  default process group and megatron-core's tensor/pipeline/data-parallel groups
  from the torchrun environment (NCCL on GPUs, gloo on CPU), plus seeding;
  :func:`gather_over_data_parallel`: every data-parallel replica's Python object.
- :func:`vocab_parallel_token_logprobs`, :func:`vocab_parallel_entropy`,
  :func:`vocab_parallel_token_logprobs_and_entropy` and
  :func:`vocab_parallel_linear_token_logprobs`
  (:mod:`aligner.parallel.vocab_parallel`): the ``aligner.ops`` results when the
  vocabulary is split over a tensor-parallel group.
- :mod:`aligner.parallel.megatron_cpu`: the small shim that lets megatron-core run on
  the CPU (gloo); ``initialize`` turns it on only when no GPU is present.

``initialize`` imports megatron-core (seconds) when it is called, not before.
"""

from aligner.parallel.groups import destroy, gather_over_data_parallel, initialize
from aligner.parallel.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
    vocab_parallel_token_logprobs_and_entropy,
)

__all__ = [
    "destroy",
    "gather_over_data_parallel",
    "initialize",
    "vocab_parallel_entropy",
    "vocab_parallel_linear_token_logprobs",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_token_logprobs_and_entropy",
]
