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
