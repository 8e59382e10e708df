"""aligner.console and aligner.launch: a user's error as one message, last and once; quiet third-party warnings."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from aligner import console
from aligner.console import (
    DEBUG_HINT,
    FALLBACK_NOTICE,
    UsageError,
    UserError,
    exit_code_for,
    format_user_error,
    is_user_error,
    run_entry_point,
    setup_console_logging,
)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LAUNCH = [sys.executable, "-m", "aligner.launch"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No debug switch, launcher or torchrun variables from outside; SIGTERM's handler restored."""
    for name in (console.DEBUG_ENV, console.LAUNCHER_ENV, console.GRACE_ENV, "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------------------------------------------
# Which errors are the user's, and how they read.


@pytest.mark.parametrize(
    "error",
    [
        UserError("data.train is required"),
        UsageError("unknown option --foo"),
        ValueError("tp=3 does not divide 4 processes"),
        json.JSONDecodeError("Expecting value", "x", 0),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train.jsonl"),
        FileNotFoundError("tokenizer path /x does not exist"),
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file"),
        IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
        PermissionError(errno.EACCES, "Permission denied", "/runs"),
        FileExistsError(errno.EEXIST, "File exists", "/runs/x"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        FloatingPointError("non-finite loss at step 12"),
        MemoryError(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_user_errors(error):
    assert is_user_error(error)


def test_torch_out_of_memory_is_a_user_error():
    import torch

    assert is_user_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


@pytest.mark.parametrize(
    "error",
    [
        TypeError("save_checkpoint() takes 4 positional arguments but 6 were given"),
        KeyError("missing"),
        AttributeError("'NoneType' object has no attribute 'shape'"),
        RuntimeError("Connection closed by peer"),
        ImportError("no module named wandb"),
        ValueError("too many values to unpack (expected 2)"),
        ValueError("not enough values to unpack (expected 3, got 2)"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        OSError(errno.EIO, "Input/output error"),
        AssertionError(),
    ],
    ids=lambda error: f"{type(error).__name__}:{str(error)[:20]}",
)
def test_bugs_are_not_user_errors(error):
    assert not is_user_error(error)


def test_messages():
    assert format_user_error(FileNotFoundError(2, "No such file or directory", "/x/y")) == (
        "no such file or directory: /x/y"
    )
    assert format_user_error(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device"
    assert format_user_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")) == (
        "invalid cross-device link: /a -> /b"
    )
    assert format_user_error(FileNotFoundError("tokenizer path /x does not exist")) == (
        "tokenizer path /x does not exist"
    )
    assert format_user_error(ValueError("line one\nline two")) == "line one\nline two"
    assert format_user_error(MemoryError()) == "out of memory (MemoryError)"
    assert format_user_error(UserError()) == "UserError"


def test_exit_codes():
    assert exit_code_for(UserError("x")) == 1
    assert exit_code_for(ValueError("x")) == 1
    assert exit_code_for(UsageError("x")) == 2
    config = pytest.importorskip("aligner.config")
    if not hasattr(config, "ConfigError"):
        pytest.skip("aligner.config has no ConfigError")
    assert exit_code_for(config.ConfigError("optim.lr: must be > 0")) == 2


# --------------------------------------------------------------------------------------------------------------
# run_entry_point, in this process.


def _raise(error: BaseException):
    def main():
        raise error

    return main


def test_user_error_prints_one_message_and_exits(capsys):
    with pytest.raises(SystemExit) as exited:
        run_entry_point(_raise(UserError("data.train: /nope.jsonl does not exist\nsecond line")))
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: data.train: /nope.jsonl does not exist\nsecond line\n{DEBUG_HINT}\n"


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exited:
        run_entry_point(_raise(UsageError("override 'x' is not key=value")))
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("error: override 'x' is not key=value\n")


def test_bug_keeps_its_traceback(capsys):
    with pytest.raises(KeyError, match="missing"):
        run_entry_point(_raise(KeyError("missing")))
    assert capsys.readouterr().err == ""  # the interpreter prints the traceback of what propagates


def test_debug_shows_user_errors_as_they_are(monkeypatch, capsys):
    monkeypatch.setenv(console.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="bad value"):
        run_entry_point(_raise(ValueError("bad value")))
    assert capsys.readouterr().err == ""


def test_success_and_system_exit_pass_through(capsys):
    assert run_entry_point(lambda: 42) is None
    with pytest.raises(SystemExit) as exited:
        run_entry_point(_raise(SystemExit(3)))
    assert exited.value.code == 3
    assert capsys.readouterr().err == ""


def test_keyboard_interrupt(capsys):
    with pytest.raises(SystemExit) as exited:
        run_entry_point(_raise(KeyboardInterrupt()))
    assert exited.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_other_rank_waits_the_grace_period_then_names_itself(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(console.GRACE_ENV, "0.3")
    start = time.monotonic()
    with pytest.raises(SystemExit):
        run_entry_point(_raise(FileNotFoundError(2, "No such file or directory", "/data/shard1.jsonl")))
    assert time.monotonic() - start >= 0.3
    assert capsys.readouterr().err == f"error: rank 1: no such file or directory: /data/shard1.jsonl\n{DEBUG_HINT}\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a launcher's SIGTERM ends the wait silently


def test_rank_zero_does_not_wait(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(console.GRACE_ENV, "30")
    start = time.monotonic()
    with pytest.raises(SystemExit):
        run_entry_point(_raise(ValueError("x")))
    assert time.monotonic() - start < 5
    assert capsys.readouterr().err.startswith("error: x\n")


def test_rank_zero_waits_when_a_peer_died(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(console.GRACE_ENV, "0.3")
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        run_entry_point(_raise(RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:20884")))
    assert time.monotonic() - start >= 0.3


def test_under_the_launcher_the_worker_records_instead_of_printing(monkeypatch, tmp_path, capsys):
    error_file = tmp_path / "0" / "error.json"
    monkeypatch.setenv(console.LAUNCHER_ENV, "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with pytest.raises(SystemExit) as exited:
        run_entry_point(_raise(UsageError("bad override")))
    assert exited.value.code == 2
    assert capsys.readouterr().err == ""
    record = json.loads(error_file.read_text())
    assert record["aligner"]["kind"] == "user"
    assert record["aligner"]["message"] == f"error: bad override\n{DEBUG_HINT}"
    assert record["aligner"]["exit_code"] == 2
    assert int(record["message"]["extraInfo"]["timestamp"]) > 0  # torch elastic's format

    with pytest.raises(KeyError):
        run_entry_point(_raise(KeyError("missing")))
    record = json.loads(error_file.read_text())
    assert record["aligner"]["kind"] == "internal"
    assert record["aligner"]["message"] == "error: rank 0 failed: KeyError: 'missing' (traceback above)"
    assert "KeyError" in record["message"]["extraInfo"]["py_callstack"]


def test_describe_failure(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from aligner.launch import describe_failure

    files = iter(range(1000))

    def failure(rank: int, exitcode: int, aligner: dict | None = None) -> ProcessFailure:
        path = tmp_path / f"{next(files)}.json"
        if aligner is not None:
            now = time.time()
            info = {"py_callstack": "", "timestamp": str(int(now))}
            path.write_text(
                json.dumps({"message": {"message": aligner["message"], "extraInfo": info}, "aligner": aligner})
            )
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))

    user = {"kind": "user", "message": "error: bad\n(hint)", "exit_code": 2, "time": 1.0}
    other = {"kind": "user", "message": "error: rank 1: bad", "exit_code": 1, "time": 0.5}
    assert describe_failure({0: failure(0, 2, user), 1: failure(1, 1, other)}) == ("error: bad\n(hint)", 2)
    assert describe_failure({0: failure(0, -15), 1: failure(1, 1, other)}) == ("error: rank 1: bad", 1)
    bug = {"kind": "internal", "message": "error: rank 1 failed: KeyError: 'x' (traceback above)", "time": 2.0}
    assert describe_failure({0: failure(0, -15), 1: failure(1, 1, bug)}) == (bug["message"], 1)
    assert describe_failure({0: failure(0, -9), 1: failure(1, -15)}) == (
        "error: rank 0 was killed by SIGKILL (out of memory?)",
        137,
    )
    assert describe_failure({0: failure(0, -15), 1: failure(1, 3)}) == (
        "error: rank 1 exited with code 3 (its output is above)",
        3,
    )


# --------------------------------------------------------------------------------------------------------------
# Logging and warnings, in this process.


@pytest.fixture
def console_logging(monkeypatch):
    """Undo setup_console_logging: its handler, the levels it set, PYTHONWARNINGS and the notice flag."""
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))
    monkeypatch.setattr(console, "_notice_printed", False)
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "aligner", "megatron")}
    yield
    for handler in list(root.handlers):
        if isinstance(handler, console._ConsoleHandler):
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_setup_console_logging_rank0(console_logging, monkeypatch, capsys):
    monkeypatch.setattr(console, "fallback_notice", lambda: FALLBACK_NOTICE)
    setup_console_logging(0)
    setup_console_logging(0)  # again: one handler, one notice
    logging.getLogger("aligner.data").info("kept 512 of 512 records")
    logging.getLogger("aligner").warning("3 examples dropped")
    logging.getLogger("megatron.core.optimizer").info("DDP config ...")
    lines = capsys.readouterr().err.splitlines()
    assert [line[9:] for line in lines] == [FALLBACK_NOTICE, "kept 512 of 512 records", "warning: 3 examples dropped"]
    assert all(line[2] == line[5] == ":" and line[8] == " " for line in lines)  # HH:MM:SS
    assert "ignore:Apex is not installed:UserWarning" in os.environ["PYTHONWARNINGS"].split(",")


def test_setup_console_logging_other_rank(console_logging, monkeypatch, capsys):
    monkeypatch.setattr(console, "fallback_notice", lambda: FALLBACK_NOTICE)
    setup_console_logging(3)
    logging.getLogger("aligner").info("kept 512 of 512 records")
    logging.getLogger("aligner").warning("slow data")
    lines = capsys.readouterr().err.splitlines()
    assert [line[9:] for line in lines] == ["warning: rank 3: slow data"]


def test_warning_filters_are_narrow():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_third_party_warnings()

        def warn(message: str, module: str, category: type[Warning] = UserWarning) -> None:
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)

        warn(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            "megatron.core.optimizer",
        )
        warn("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.gpt.gpt_layer_specs")
        warn("full scope is deprecated. Use empty cuda_graph_scope", "megatron.core.transformer.transformer_config")
        warn("Transformer Engine and Apex are not installed.", "megatron.core.optimizer", DeprecationWarning)
        warn("Apex is not installed. Falling back to Torch Norm", "my_project.layers")
        warn("something else megatron wants you to know", "megatron.core.optimizer")
        warn("a real warning from aligner", "aligner.data.encode")
    assert [str(w.message) for w in caught] == [
        "Transformer Engine and Apex are not installed.",
        "Apex is not installed. Falling back to Torch Norm",
        "something else megatron wants you to know",
        "a real warning from aligner",
    ]


def test_no_cuda_runtime_line_is_dropped(caplog):
    console.quiet_third_party_warnings()
    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for c++")
    assert [record.getMessage() for record in caplog.records] == ["Error checking compiler version for c++"]


# --------------------------------------------------------------------------------------------------------------
# Real processes: plain torchrun, the launcher, megatron's warnings with a checkpoint save.


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNER_", "TORCHELASTIC_", "PYTHONWARNINGS"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


WORKER = textwrap.dedent(
    """
    import os, sys, time
    from aligner.console import UsageError, run_entry_point

    def main():
        rank = int(os.environ["RANK"])
        mode = sys.argv[1]
        if mode == "all":
            raise UsageError("override 'trainer.max_steps' expects an integer, got 'ten'")
        if mode == "rank1" and rank == 1:
            raise FileNotFoundError(2, "No such file or directory", "/nope/shard1.jsonl")
        if mode == "bug1" and rank == 1:
            {}["missing"]
        if mode == "kill0" and rank == 0:
            os.kill(os.getpid(), 9)
        if mode != "ok":
            time.sleep(120)  # the launcher ends this rank when the other one fails

    if __name__ == "__main__":
        run_entry_point(main)
    """
)


def _run(command: list[str], script: Path, mode: str, timeout: float = 180, **env: str):
    argv = [*command, "--standalone", "--nproc_per_node=2", str(script), mode]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env(**env))


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


MESSAGE = "error: override 'trainer.max_steps' expects an integer, got 'ten'"


@pytest.mark.slow
def test_plain_torchrun_prints_the_message_once_before_its_box(worker):
    result = _run(TORCHRUN, worker, "all")
    assert result.returncode != 0
    assert result.stderr.count(MESSAGE) == 1, result.stderr
    assert result.stderr.count(DEBUG_HINT) == 1
    assert "Traceback" not in result.stderr.split(MESSAGE)[0]  # no worker traceback
    assert "ChildFailedError" in result.stderr.split(MESSAGE)[1]  # torchrun's box comes after: it cannot be stopped


@pytest.mark.slow
def test_plain_torchrun_a_rank_failing_alone_prints(worker):
    result = _run(TORCHRUN, worker, "rank1", ALIGNER_ERROR_GRACE_S="0.5")
    assert result.stderr.count("error: rank 1: no such file or directory: /nope/shard1.jsonl") == 1, result.stderr


@pytest.mark.slow
def test_launcher_ends_with_the_message_once(worker):
    result = _run(LAUNCH, worker, "all")
    assert result.returncode == 2
    assert result.stderr.endswith(f"{MESSAGE}\n{DEBUG_HINT}\n"), result.stderr
    assert result.stderr.count(MESSAGE) == 1
    for noise in ("ChildFailedError", "OMP_NUM_THREADS", "Traceback", "exitcode", "SIGTERM"):
        assert noise not in result.stderr


@pytest.mark.slow
def test_launcher_a_rank_failing_alone(worker):
    result = _run(LAUNCH, worker, "rank1")
    assert result.returncode == 1
    assert result.stderr == f"error: rank 1: no such file or directory: /nope/shard1.jsonl\n{DEBUG_HINT}\n"


@pytest.mark.slow
def test_launcher_a_bug_keeps_its_traceback(worker):
    result = _run(LAUNCH, worker, "bug1", ALIGNER_ERROR_GRACE_S="1")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[-1] == "error: rank 1 failed: KeyError: 'missing' (traceback above)"
    assert lines[0] == "Traceback (most recent call last):"
    assert result.stderr.count("Traceback") == 1


@pytest.mark.slow
def test_launcher_a_killed_worker_and_success(worker):
    result = _run(LAUNCH, worker, "kill0")
    assert result.returncode == 128 + 9
    assert result.stderr == "error: rank 0 was killed by SIGKILL (out of memory?)\n"
    result = _run(LAUNCH, worker, "ok")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


CHECKPOINT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from aligner.console import run_entry_point, setup_console_logging
    from aligner.models.gpt import build_model  # megatron-core at import, as the recipes do
    from megatron.core import dist_checkpointing

    def main():
        setup_console_logging(0)
        from aligner.models.config import ModelConfig
        from aligner.parallel import initialize

        initialize(seed=1)
        config = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=300, max_position_embeddings=64)
        model = build_model(ModelConfig.from_dict(config))
        os.makedirs(sys.argv[1])
        # torch_dist: starts its results queue's manager with spawn (which re-imports this module)
        # and forks its write workers.
        dist_checkpointing.save(model.sharded_state_dict(), sys.argv[1])
        print("saved", flush=True)

    if __name__ == "__main__":
        run_entry_point(main)
    """
)

THIRD_PARTY_NOISE = ("Warning:", "warnings.warn(", "Falling back", "not installed", "No CUDA runtime", "deprecated")


@pytest.mark.slow
def test_megatron_fallback_warnings_collapse_to_one_line(tmp_path: Path):
    (tmp_path / "ckpt_probe.py").write_text(CHECKPOINT_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "ckpt_probe", str(tmp_path / "checkpoint")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "saved\n"
    assert (tmp_path / "checkpoint" / "metadata.json").exists()
    noise = [line for line in result.stderr.splitlines() if any(word in line for word in THIRD_PARTY_NOISE)]
    assert noise == [], result.stderr
    lines = result.stderr.splitlines()
    if console.fallback_notice() is None:  # Transformer Engine and Apex installed: nothing to say
        assert lines == []
    else:
        assert [line[9:] for line in lines] == [console.fallback_notice()], result.stderr
