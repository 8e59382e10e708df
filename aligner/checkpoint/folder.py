"""The checkpoint folder, checked before step 1: writable, enough free space, and one writer at a time.

A run that checkpoints takes ``<dir>/LOCK`` (created atomically; it holds the
owner's host, pid and start time) and removes it when it finishes. A second run
pointed at the same folder is refused with the owner named. A lock whose owner
is gone (same host, no such process: a crash or ``kill -9``) is taken over with a
warning; a lock from another host is never taken over (delete it by hand when
that run is gone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from aligner.config import ConfigError

LOCK = "LOCK"
log = logging.getLogger("aligner")


def check_writable(root: Path, needed_bytes: int) -> None:
    """``root`` exists (created if missing), takes a file, and has ``needed_bytes`` free (call on one rank).

    Raises:
        ConfigError: the folder cannot be created or written, or has too little free space.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"checkpoint.dir {root} is not writable: {error.strerror or error}") from None
    free = shutil.disk_usage(root).free
    if free < needed_bytes:
        raise ConfigError(
            f"checkpoint.dir {root} has {free / 2**30:.2f} GiB free, but one checkpoint of this run takes about "
            f"{needed_bytes / 2**30:.2f} GiB (weights and Adam state); free some space or choose another folder"
        )


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell: assume it runs
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(root: Path) -> Path:
    """Take ``root/LOCK`` for this process (call on one rank); returns the lock's path.

    Re-entrant within one process. A stale lock (owner gone, same host) is taken over.

    Raises:
        ConfigError: another live run (or one on another host) holds the lock.
    """
    path = root / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and owner.get("pid") == me["pid"]:
                return path
            if owner and _owner_alive(owner):
                raise ConfigError(
                    f"checkpoint.dir {root} is in use by a run on host {owner.get('host')} (pid {owner.get('pid')}, "
                    f"since {owner.get('since')}); two writers would overwrite each other's checkpoints. Choose "
                    f"another checkpoint.dir, or delete {path} if that run is gone"
                ) from None
            log.warning("taking over %s from a run that is gone (%s)", path, owner or "unreadable lock")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(me) + "\n")
        return path
    raise ConfigError(f"could not take {path}: another run keeps recreating it")


def release_lock(path: Path) -> None:
    """Remove the lock if this process holds it."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
