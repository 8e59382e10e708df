"""torchrun whose failed runs end with the error, once: ``python -m aligner.launch``.

    python -m aligner.launch --standalone --nproc_per_node=2 -m aligner.recipes.sft --config configs/sft_tiny.yaml

It takes torchrun's options (``python -m aligner.launch --help``) and runs
torchrun's own code (:func:`torch.distributed.run.run`: the same elastic agent,
rendezvous, restarts and worker environment), in this process. What differs is
what it prints:

- when a worker fails, torchrun prints its agent's ``ChildFailedError``
  traceback and a summary box after the worker's message; this launcher prints
  none of that. Once every worker has ended it prints the failure itself, last:
  the message of a user error (which the worker recorded in torch elastic's
  per-worker error file, ``TORCHELASTIC_ERROR_FILE``, instead of printing it,
  see :mod:`aligner.console`), else one line naming the rank that failed and
  how (its traceback, if any, is above). It exits with the worker's exit code
  (a user error's 1 or 2; ``128 + signal`` for a killed worker);
- torchrun's ``OMP_NUM_THREADS`` banner and its "failed (exitcode ...)" /
  "Sending process ... closing signal" lines are not printed (the variable is
  still set to 1 for more than one process per node, as torchrun does).

``ALIGNER_DEBUG=1`` prints everything torchrun does (and the workers' tracebacks).
Plain ``torchrun`` works as well: the worker prints the message, then torchrun
adds its box.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

from aligner.console import LAUNCHER_ENV, debug_enabled

# logger name -> message prefixes of torchrun's agent that this launcher replaces by its own last line.
_AGENT_NOISE = {
    "torch.distributed.run": ("\n*****************************************\nSetting OMP_NUM_THREADS",),
    "torch.distributed.elastic.multiprocessing.api": ("failed (exitcode", "Sending process"),
}


class _DropAgentRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _quiet_agent() -> None:
    for name, prefixes in _AGENT_NOISE.items():
        logging.getLogger(name).addFilter(_DropAgentRecords(prefixes))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_failure(failures: dict) -> tuple[str, int]:
    """``(text to print, exit code)`` for the failed workers ``{global rank: ProcessFailure}``.

    The choice, in order: a user error a worker recorded (the lowest rank's,
    which is rank 0's when every rank hit the same error); the earliest
    recorded internal error (its traceback is above); the first worker that
    failed on its own (not by the agent's SIGTERM), by time then rank.
    """
    records = {}
    for rank, failure in failures.items():
        data = failure.error_file_data.get("aligner") if isinstance(failure.error_file_data, dict) else None
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            records[rank] = data
    for kind in ("user", "internal", "interrupted"):
        ranks = [rank for rank, data in records.items() if data.get("kind") == kind]
        if ranks:
            rank = min(ranks, key=lambda r: (records[r].get("time", 0.0), r)) if kind == "internal" else min(ranks)
            code = records[rank].get("exit_code", 1)
            return records[rank]["message"], code if isinstance(code, int) and code > 0 else 1
    own = {rank: f for rank, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    rank = min(own, key=lambda r: (own[r].timestamp, r))
    failure = own[rank]
    if failure.exitcode < 0:
        number = -failure.exitcode
        hint = " (out of memory?)" if number == signal.SIGKILL else ""
        return f"error: rank {rank} was killed by {_signal_name(number)}{hint}", 128 + number
    return f"error: rank {rank} exited with code {failure.exitcode} (its output is above)", failure.exitcode


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun's agent with ``argv`` (torchrun's options, then the program); returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog = "python -m aligner.launch"
    parser.description = "torchrun (same options), printing a failed run's error last and once"
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ[LAUNCHER_ENV] = "1"
    debug = debug_enabled()
    if not debug:
        _quiet_agent()
    try:
        run(args)
    except ChildFailedError as failed:
        if debug:
            raise
        text, code = describe_failure(failed.failures)
        sys.stdout.flush()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        return code
    except SignalException as signalled:  # the launcher was told to stop (Ctrl-C, SIGTERM): workers are ended
        if debug:
            raise
        return 128 + int(signalled.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
