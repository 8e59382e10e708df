"""Python reward functions named in a config as ``module:function``.

A reward function scores a batch of rollouts from their text::

    def exact_answer(prompts, responses, extras) -> list[float]: ...

``prompts[i]`` is rollout ``i``'s prompt as its record holds it (a string or
``{"role", "content"}`` messages), ``responses[i]`` its decoded response text,
``extras[i]`` its record's other fields (``{"answer": 8}``). It returns one
finite number per rollout; anything else is an error naming the function.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from aligner.config import ConfigError
from aligner.rewards.inputs import Prompt, RewardInputs

RewardFunction = Callable[[Sequence[Prompt], Sequence[str], Sequence[Mapping[str, Any]]], Sequence[float]]
SPEC_EXAMPLE = "aligner.rewards.arithmetic:exact_answer"


def split_spec(spec: str) -> tuple[str, str]:
    """``"package.module:function"`` -> ``("package.module", "function")``.

    Raises:
        ConfigError: ``spec`` is not ``module:attribute`` with both parts non-empty.
    """
    module_name, colon, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not colon or not module_name.strip() or not attribute.strip() or ":" in attribute:
        raise ConfigError(f"reward function {spec!r} must be written module:function (e.g. {SPEC_EXAMPLE})")
    return module_name.strip(), attribute.strip()


def resolve_reward_function(spec: str) -> RewardFunction:
    """Import the callable ``spec`` names: ``module:function`` (the attribute may be dotted: ``module:Class.method``).

    Raises:
        ConfigError: a malformed spec, a module that cannot be imported (its own import error is
            chained), a missing attribute or one that is not callable; the message names ``spec``.
    """
    module_name, attribute = split_spec(spec)
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(f"{error.name}.")):
            raise ConfigError(
                f"reward function {spec!r}: no module named {error.name!r} (is it installed, or on PYTHONPATH?)"
            ) from None
        raise ConfigError(f"reward function {spec!r}: importing {module_name!r} failed: {error}") from error
    except Exception as error:  # any exception a module raises while it is imported is the user's to see
        raise ConfigError(
            f"reward function {spec!r}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from error
    walked = module_name
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"reward function {spec!r}: {walked!r} has no attribute {part!r}")
        target, walked = getattr(target, part), f"{walked}.{part}"
    if not callable(target):
        raise ConfigError(
            f"reward function {spec!r} is a {type(target).__name__}, not callable; name a function taking "
            "(prompts, responses, extras) and returning one float per response"
        )
    return target


def check_reward_values(values: Any, count: int, name: str) -> list[float]:
    """``values`` as ``count`` floats, or an error naming the reward ``name``.

    Accepts a sequence of Python or NumPy numbers (bools count as 0/1) or a 1-D tensor / array.

    Raises:
        ValueError: not a sequence of numbers, a length other than ``count``, or a value that is NaN
            or infinite (the message names ``name`` and the first bad rows).
    """
    if isinstance(values, Tensor) or hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise ValueError(
            f"reward function {name} returned {type(values).__name__}; it must return a list of {count} floats, "
            "one per response"
        )
    if len(values) != count:
        raise ValueError(f"reward function {name} returned {len(values)} values for {count} responses")
    bad_types = [row for row, value in enumerate(values) if not isinstance(value, numbers.Real)]
    if bad_types:
        first = bad_types[0]
        raise ValueError(
            f"reward function {name} returned a non-number at row(s) {bad_types[:8]} "
            f"(row {first}: {values[first]!r}); every value must be a float"
        )
    floats = [float(value) for value in values]
    not_finite = [row for row, value in enumerate(floats) if not math.isfinite(value)]
    if not_finite:
        shown = [floats[row] for row in not_finite[:8]]
        raise ValueError(
            f"reward function {name} returned non-finite values {shown} at row(s) {not_finite[:8]}; "
            "every reward must be a finite number"
        )
    return floats


class FunctionReward:
    """A Python reward function, called on a batch and checked.

    Under tensor or pipeline parallelism every rank of a model-parallel group holds the same
    rollouts. With that ``group`` given, the function runs once per group, on its first rank, and
    the scores are broadcast to the others: an expensive function (a code sandbox, a judge model)
    is not run once per rank, and one that is not deterministic (sampling, a remote service) still
    gives every rank of the group the same rewards, so their shards of the model train on the same
    advantages. An error the function raises (or a bad return value) fails every rank of the group
    with the function's message.

    Args:
        function: ``function(prompts, responses, extras) -> Sequence[float]``.
        name: how errors and metrics name it (default: the function's ``__name__``).
        group: the ranks that hold the same rollouts (megatron's model-parallel group); None: this
            rank scores its own rollouts.
    """

    def __init__(
        self, function: RewardFunction, name: str | None = None, *, group: dist.ProcessGroup | None = None
    ) -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", type(function).__name__)
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None

    @classmethod
    def from_spec(cls, spec: str, name: str | None = None, *, group: dist.ProcessGroup | None = None) -> FunctionReward:
        """The function ``spec`` (``module:function``) names; see :func:`resolve_reward_function`."""
        return cls(resolve_reward_function(spec), name or split_spec(spec)[1].rsplit(".", 1)[-1], group=group)

    def __call__(self, inputs: RewardInputs) -> Tensor:
        """``[N]`` float32 rewards of the ``N`` rollouts; a collective over ``group`` when there is one.

        Raises:
            ValueError: see :func:`check_reward_values`; whatever the function raises passes through
                (on the group's first rank; the others raise :class:`RewardFunctionError` with its message).
        """
        if self.group is None:
            return torch.tensor(self._values(inputs), dtype=torch.float32)
        source = dist.get_process_group_ranks(self.group)[0]
        error: BaseException | None = None
        payload: list[Any] = [None]
        if dist.get_rank() == source:
            try:
                payload = [self._values(inputs)]
            except Exception as raised:  # every rank of the group must hear of it, or the others wait forever
                error, payload = raised, [f"{type(raised).__name__}: {raised}"]
        dist.broadcast_object_list(payload, src=source, group=self.group)
        if error is not None:
            raise error
        if isinstance(payload[0], str):
            raise RewardFunctionError(f"reward function {self.name} failed on rank {source}: {payload[0]}")
        return torch.tensor(payload[0], dtype=torch.float32)

    def _values(self, inputs: RewardInputs) -> list[float]:
        values = self.function(list(inputs.prompts), list(inputs.responses), list(inputs.extras))
        return check_reward_values(values, len(inputs), self.name)


class RewardFunctionError(RuntimeError):
    """A reward function failed on the rank that runs it for this rank's model-parallel group."""
