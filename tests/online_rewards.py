"""Reward functions for the online recipe tests, named in configs as ``online_rewards:<name>``."""


def digit_share(prompts, responses, extras):
    """The share of digits in a response: varies between samples of a random model (groups have spread)."""
    return [sum(ch.isdigit() for ch in response) / max(len(response), 1) for response in responses]
