"""What a run prints: aligner's log lines, the progress bar, and an error a user caused as one message, last.

Three pieces, for the entry points (``aligner/recipes/*``) and the launcher
(:mod:`aligner.launch`)::

    if __name__ == "__main__":
        run_entry_point(main)          # errors: one message, once across ranks

    setup_console_logging(rank)        # first thing in main(): log format and levels

and :func:`quiet_third_party_warnings`, which ``import aligner`` calls before
anything imports megatron-core.

Errors. :func:`run_entry_point` sorts what ``main()`` raises into

- errors a user caused (:func:`is_user_error`): a bad config, data, path or
  size. They end the run with ``error: <message>`` and one hint line on stderr,
  exit code 1 (2 for a config error), no traceback;
- everything else (an ``AttributeError``, ``KeyError``, ``TypeError``,
  ``RuntimeError``, ... in aligner or a library): a bug, printed with its full
  traceback, exit code 1.

``ALIGNER_DEBUG=1`` prints every error with its traceback, at once, on every
rank, and shows the third-party warnings again.

Once across ranks. When every rank hits the same error (a config or data file
every rank reads), global rank 0 prints it; a rank that fails alone prints its
own. Global rank 0 prints at once; another rank first waits
``ALIGNER_ERROR_GRACE_S`` seconds (default 5): if rank 0 failed too, the
launcher has ended this rank by then (torchrun sends SIGTERM to the other
workers as soon as one exits), so nothing is printed twice. A rank whose
collective failed because a peer died (gloo's "Connection closed by peer")
waits the same way, so the peer's message stays the last one. Under
``python -m aligner.launch`` (``ALIGNER_LAUNCHER=1``) workers print nothing
for a user error: they record it in torch elastic's per-worker error file and
the launcher prints it after every worker has ended, then exits with its code.

Plain ``torchrun`` keeps working: the message is printed clean by the worker,
then torchrun adds its own ``ChildFailedError`` traceback and summary box
(nothing a worker does can stop that; :mod:`aligner.launch` does).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

DEBUG_ENV = "ALIGNER_DEBUG"
GRACE_ENV = "ALIGNER_ERROR_GRACE_S"
LAUNCHER_ENV = "ALIGNER_LAUNCHER"
DEFAULT_GRACE_S = 5.0
DEBUG_HINT = f"(set {DEBUG_ENV}=1 for the traceback)"
FALLBACK_NOTICE = "running without Transformer Engine / Apex: torch fallbacks"

CONFIG_ERROR_EXIT_CODE = 2

log = logging.getLogger("aligner")


class UserError(ValueError):
    """An error the user caused (config, data, paths, sizes): the run ends with its message, no traceback.

    A ``ValueError``, so code that catches ``ValueError`` keeps working.
    Subclasses may set ``exit_code`` (the process's exit status; 1 by default).
    """

    exit_code: int = 1


class UsageError(UserError):
    """A bad command line (exit code 2, as argparse's)."""

    exit_code = CONFIG_ERROR_EXIT_CODE


def debug_enabled() -> bool:
    """``ALIGNER_DEBUG`` is set to something other than ``""``, ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------------------------
# Which errors a user caused.

# OSErrors that are about the user's paths or machine, not about aligner's code.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
_USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG})
# ValueErrors that Python raises for a programming error, never for a user's input.
_PROGRAMMING_VALUE_ERRORS = ("not enough values to unpack", "too many values to unpack")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one a user caused, shown as one message without a traceback.

    The set, and why:

    - :class:`UserError` (and ``aligner.config.ConfigError``): raised by aligner on purpose.
    - ``ValueError``: aligner's convention for bad input (a config value, a size
      that does not divide, a malformed jsonl line, an over-long example); also
      ``json.JSONDecodeError`` and ``UnicodeDecodeError`` from a user's files.
      Python's own unpacking errors (``too many values to unpack``) are bugs.
    - ``FileNotFoundError``, ``FileExistsError``, ``NotADirectoryError``,
      ``IsADirectoryError``, ``PermissionError`` and an ``OSError`` whose errno is
      ``ENOSPC``/``EDQUOT`` (disk full), ``EROFS`` or ``ENAMETOOLONG``: paths and disks.
    - ``FloatingPointError``: a run that diverged (the trainer's non-finite loss
      or gradient check names the step).
    - ``MemoryError`` and ``torch.OutOfMemoryError``: sizes (batch, sequence
      length, model) too large for the machine.

    Not in the set: ``TypeError`` (a call with the wrong arguments is a bug in
    the code that made it; configs are type-checked into ``ConfigError``),
    ``KeyError``, ``AttributeError``, ``ImportError``, ``RuntimeError`` (torch,
    gloo/NCCL, megatron internals) and any other ``OSError`` (a broken
    connection is a consequence of another rank's failure, not its cause).
    """
    if isinstance(error, UserError):
        return True
    if isinstance(error, ValueError):
        return not str(error).startswith(_PROGRAMMING_VALUE_ERRORS)
    if isinstance(error, _USER_OS_ERRORS):
        return True
    if isinstance(error, OSError):
        return error.errno in _USER_ERRNOS
    if isinstance(error, (FloatingPointError, MemoryError)):
        return True
    torch = sys.modules.get("torch")
    out_of_memory = getattr(torch, "OutOfMemoryError", None)
    return out_of_memory is not None and isinstance(error, out_of_memory)


def exit_code_for(error: BaseException) -> int:
    """The exit status for a user error: its ``exit_code``, 2 for ``aligner.config.ConfigError``, else 1."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool) and code > 0:
        return code
    config = sys.modules.get("aligner.config")
    config_error = getattr(config, "ConfigError", None)
    if isinstance(config_error, type) and isinstance(error, config_error):
        return CONFIG_ERROR_EXIT_CODE
    return 1


def format_user_error(error: BaseException) -> str:
    """The message of a user error, without the ``error:`` prefix (may span lines).

    An ``OSError`` from the system reads ``no such file or directory: /x/y``
    rather than ``[Errno 2] No such file or directory: '/x/y'``.
    """
    if isinstance(error, OSError) and error.strerror and error.errno is not None:
        text = error.strerror[:1].lower() + error.strerror[1:]
        if error.filename is not None:
            text += f": {os.fsdecode(error.filename)}"
            if error.filename2 is not None:
                text += f" -> {os.fsdecode(error.filename2)}"
        return text
    message = str(error).strip()
    if isinstance(error, MemoryError) and not message:
        return "out of memory (MemoryError)"
    return message or type(error).__name__


# ---------------------------------------------------------------------------------------------------------------
# The entry point.


def _rank_and_world() -> tuple[int, int]:
    """Global rank and world size from the launcher's environment (0 and 1 for a plain ``python`` run)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _grace_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def _wait_for_launcher() -> None:
    """Sleep the grace period; a SIGTERM (the launcher ending this worker) ends it at once, silently.

    SIGTERM gets its default action back for the wait: a handler the run
    installed (say, checkpoint on preemption) must not keep a failed worker alive.
    """
    with contextlib.suppress(ValueError):  # not the main thread: nothing to restore
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(_grace_seconds())


_PEER_FAILURE_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "Broken pipe",
)


def _is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` looks like the consequence of another process dying (a broken collective or store)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, EOFError)):
            return True
        distributed = sys.modules.get("torch.distributed")
        network_error = getattr(distributed, "DistNetworkError", None)
        if isinstance(network_error, type) and isinstance(current, network_error):
            return True
        if any(marker in str(current) for marker in _PEER_FAILURE_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def under_launcher() -> bool:
    """Whether this process is a worker of :mod:`aligner.launch` (which prints a user error for it)."""
    return os.environ.get(LAUNCHER_ENV) == "1" and bool(os.environ.get("TORCHELASTIC_ERROR_FILE"))


def _record_for_launcher(kind: str, message: str, exit_code: int, error: BaseException | None) -> bool:
    """Write this worker's failure to torch elastic's error file for :mod:`aligner.launch`; True if written.

    The file is written atomically (the launcher may read it while this process is being ended).
    """
    if not under_launcher():
        return False
    path = os.environ["TORCHELASTIC_ERROR_FILE"]
    rank, _ = _rank_and_world()
    now = time.time()
    stack = "".join(traceback.format_exception(error)) if error is not None else message
    data = {
        "message": {"message": message, "extraInfo": {"py_callstack": stack, "timestamp": str(int(now))}},
        "aligner": {"kind": kind, "message": message, "exit_code": exit_code, "rank": rank, "time": now},
    }
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as file:
            json.dump(data, file)
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def _print_error(text: str) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def user_error_text(message: str, rank: int = 0) -> str:
    """``error: <message>`` (naming the rank when it is not 0) and the hint line."""
    where = f"rank {rank}: " if rank else ""
    return f"error: {where}{message}\n{DEBUG_HINT}"


def run_entry_point(main: Callable[[], object]) -> None:
    """Run ``main()``; a user error ends the process with one message, a bug with its traceback.

    Use as ``if __name__ == "__main__": run_entry_point(main)``, in a plain
    ``python -m`` run and under torchrun or :mod:`aligner.launch` alike.

    - A user error (:func:`is_user_error`): ``error: <message>`` and
      :data:`DEBUG_HINT` on stderr, once across ranks (see the module's
      docstring), then ``SystemExit`` with :func:`exit_code_for`.
    - Any other exception: its traceback (once across ranks in the same way),
      then exit code 1.
    - ``KeyboardInterrupt``: ``interrupted`` (global rank 0), exit code 130.
    - ``SystemExit`` (``--help``, argparse errors) passes through.

    With ``ALIGNER_DEBUG=1`` every exception propagates as it is, on every rank.
    """
    try:
        main()
    except SystemExit:
        raise
    except BaseException as error:
        if debug_enabled():
            raise
        rank, world = _rank_and_world()
        if isinstance(error, KeyboardInterrupt):
            if not _record_for_launcher("interrupted", "interrupted", 130, None) and rank == 0:
                _print_error("interrupted")
            raise SystemExit(130) from None
        if is_user_error(error):
            code = exit_code_for(error)
            text = user_error_text(format_user_error(error), rank)
            if _record_for_launcher("user", text, code, error):
                raise SystemExit(code) from None  # the launcher prints it, after every worker has ended
            if world > 1 and rank != 0:
                _wait_for_launcher()
            _print_error(text)
            raise SystemExit(code) from None
        summary = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        _record_for_launcher("internal", f"error: rank {rank} failed: {summary} (traceback above)", 1, error)
        if world > 1 and (rank != 0 or _is_peer_failure(error)):
            _wait_for_launcher()
        raise


# ---------------------------------------------------------------------------------------------------------------
# Third-party warnings.

# (message prefix, category) of the warnings megatron-core (any ``megatron*`` module) gives at import and model build
# when Transformer Engine / Apex are missing: replaced by FALLBACK_NOTICE. Every entry names a warning
# megatron-core 0.16 gives on a machine without them; nothing else is filtered.
_MEGATRON_WARNINGS = (
    ("Transformer Engine and Apex are not installed", UserWarning),  # optimizer, clip_grads, FSDP mixed precision
    ("Apex is not installed", UserWarning),  # layer specs: "Falling back to Torch Norm"
    ("full scope is deprecated", UserWarning),  # TransformerConfig's own default cuda_graph_scope="full"
)
# logger name -> message prefixes dropped from it.
_LOG_RECORDS = {
    # torch, on import of torch.utils.cpp_extension (megatron imports it) with a CUDA build of torch and no GPU.
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}


class _DropRecords(logging.Filter):
    """Drop the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not message.startswith(self.prefixes)


def _pythonwarnings_entries() -> list[str]:
    # PYTHONWARNINGS: action:message:category:module:lineno; the message is a literal, case-insensitive
    # prefix and the module would have to be exact, so it is left empty (the message is specific enough).
    return [f"ignore:{message}:{category.__name__}" for message, category in _MEGATRON_WARNINGS]


def quiet_third_party_warnings(environment: bool = False) -> None:
    """Drop megatron-core's Transformer Engine / Apex fallback warnings and torch's no-CUDA-runtime line.

    Narrow: each filter names one message (and, for Python warnings, the
    ``megatron`` modules that give it); every other warning, aligner's and
    torch's included, still shows. :func:`setup_console_logging` prints
    :data:`FALLBACK_NOTICE` once instead. Idempotent; does nothing when
    ``ALIGNER_DEBUG`` is set.

    ``import aligner`` calls it, so it is in place before megatron-core is
    imported: in the run's processes and in the processes the checkpoint
    writer starts (megatron's ``torch_dist`` writer starts its results queue's
    manager with ``spawn``, which re-imports the run's main module, hence
    aligner, first; its write workers are forked and inherit the filters).

    Args:
        environment: also add the filters to ``PYTHONWARNINGS`` in ``os.environ``,
            so that child processes whose main module imports megatron before
            aligner start with them (the entry points' :func:`setup_console_logging`
            passes True; a plain ``import aligner`` leaves the environment alone).
    """
    if debug_enabled():
        return
    import warnings

    for message, category in _MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module="megatron")
    for name, prefixes in _LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(_DropRecords(prefixes))
    if environment:
        present = [entry for entry in os.environ.get("PYTHONWARNINGS", "").split(",") if entry]
        missing = [entry for entry in _pythonwarnings_entries() if entry not in present]
        if missing:
            os.environ["PYTHONWARNINGS"] = ",".join(present + missing)


def fallback_notice() -> str | None:
    """The one line that replaces megatron-core's fallback warnings, or None when nothing falls back."""
    from importlib.util import find_spec

    missing = [
        name
        for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
        if _absent(module, find_spec)
    ]
    if not missing:
        return None
    if len(missing) == 2:
        return FALLBACK_NOTICE
    return f"running without {missing[0]}: torch fallbacks"


def _absent(module: str, find_spec) -> bool:
    try:
        return find_spec(module) is None
    except (ImportError, ValueError):
        return True


# ---------------------------------------------------------------------------------------------------------------
# Logging.


class _ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and errors say so (``warning:``), and name the rank when it is not 0."""

    def __init__(self, rank: int) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            where = f"rank {self.rank}: " if self.rank else ""
            message = f"{record.levelname.lower()}: {where}{message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{self.formatTime(record, self.datefmt)} {message}"


class _ConsoleHandler(logging.StreamHandler):
    """A stderr handler that writes through ``tqdm.write`` while a progress bar is shown (no torn bars)."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm_module = sys.modules.get("tqdm")
        bar = getattr(tqdm_module, "tqdm", None)
        if bar is not None and getattr(bar, "_instances", None):
            try:
                bar.write(self.format(record), file=self.stream)
            except Exception:
                self.handleError(record)
            return
        super().emit(record)


# megatron-core logs its whole DDP / optimizer / checkpoint configuration at INFO.
_QUIET_LOGGERS = ("megatron", "megatron.core", "megatron_fsdp")

_notice_printed = False


def setup_console_logging(rank: int) -> None:
    """Console logging for a run on global rank ``rank``; call it first thing in a recipe's ``main``.

    - the ``aligner`` loggers at INFO on rank 0, WARNING on the other ranks;
    - every other logger (megatron-core's included) at WARNING;
    - one stderr handler on the root logger, ``HH:MM:SS message`` (warnings:
      ``HH:MM:SS warning: [rank N: ]message``), written above the progress bar;
    - :func:`quiet_third_party_warnings` (also for child processes), and on
      rank 0 :data:`FALLBACK_NOTICE` once, when Transformer Engine / Apex are
      missing.

    Calling it again replaces the handler it installed (not others').
    """
    global _notice_printed
    quiet_third_party_warnings(environment=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ConsoleHandler):
            root.removeHandler(handler)
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter(rank))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if rank == 0 and not _notice_printed and not debug_enabled():
        notice = fallback_notice()
        if notice is not None:
            log.info(notice)
        _notice_printed = True
