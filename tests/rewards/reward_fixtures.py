"""Reward functions the spec tests name as ``reward_fixtures:<name>`` (this directory is on sys.path under pytest)."""

import math

NOT_CALLABLE = 3


def response_length(prompts, responses, extras):
    return [float(len(response)) for response in responses]


def one_short(prompts, responses, extras):
    return [1.0] * (len(responses) - 1)


def with_nan(prompts, responses, extras):
    return [math.nan if row == 1 else 0.0 for row in range(len(responses))]


def with_infinity(prompts, responses, extras):
    return [math.inf] * len(responses)


def with_text(prompts, responses, extras):
    return ["1.0"] * len(responses)


def with_none(prompts, responses, extras):
    return [None] * len(responses)


def a_number(prompts, responses, extras):
    return 1.0


class Scorers:
    @staticmethod
    def constant(prompts, responses, extras):
        return [2.0] * len(responses)


CALLS = []  # the ranks that called rank_dependent in this process


def rank_dependent(prompts, responses, extras):
    """A reward that differs by rank, as a sampled judge would: 10 * rank + row."""
    import torch.distributed as dist

    CALLS.append(dist.get_rank())
    return [10.0 * dist.get_rank() + row for row in range(len(responses))]


def fails_on_rank_zero(prompts, responses, extras):
    import torch.distributed as dist

    if dist.get_rank() == 0:
        raise ConnectionError("judge unreachable")
    return [0.0] * len(responses)


def nan_on_rank_zero(prompts, responses, extras):
    import torch.distributed as dist

    return [math.nan if dist.get_rank() == 0 else 0.0] * len(responses)
