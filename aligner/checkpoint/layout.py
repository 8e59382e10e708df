"""The on-disk protocol that makes a checkpoint appear atomically.

A checkpoint root holds::

    <root>/
      latest                      # text: the name of the newest complete checkpoint
      step_000120/                # complete checkpoints (see aligner.checkpoint.state)
      step_000160/
      step_000200.tmp-4711/       # a save in progress, or left behind by a crash

A save writes everything into ``step_<N>.tmp-<token>/``, then (on one rank,
after every rank has finished writing) renames it to ``step_<N>`` and only then
replaces ``latest`` atomically (a temporary file plus ``os.replace``). A crash
at any point leaves ``latest`` naming the previous complete checkpoint; a
``step_*`` directory without the ``.tmp-`` mark is always complete. Leftover
temporary directories are never read and are deleted by the next commit.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

LATEST = "latest"
TMP_MARK = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    """``step_000123`` for step 123."""
    return f"step_{step:06d}"


def temporary_dir(root: Path, step: int, token: str) -> Path:
    """Where a save of ``step`` writes before it is committed."""
    return root / f"{step_dir_name(step)}{TMP_MARK}{token}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint directory ``<root>/latest`` names, or None when there is none yet.

    Raises:
        FileNotFoundError: ``latest`` names a directory that does not exist.
    """
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def checkpoints_newest_first(root: str | Path) -> list[Path]:
    """The complete checkpoints of ``root`` that a resume may use, newest first.

    ``latest``'s checkpoint and the earlier ``step_*`` directories; later ones (an
    abandoned run's, when ``latest`` names an earlier step) are not candidates.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            steps.append((int(match.group(1)), entry))
    pointer = root / LATEST
    if pointer.is_file():
        match = _STEP_DIR.match(pointer.read_text().strip())
        if match:
            steps = [(step, path) for step, path in steps if step <= int(match.group(1))]
    return [path for _, path in sorted(steps, reverse=True)]


def commit(tmp_dir: Path, step: int, keep_last: int) -> Path:
    """Publish a fully written ``tmp_dir`` as the checkpoint of ``step`` (call on one rank only).

    Renames ``tmp_dir`` to ``step_<N>``, points ``latest`` at it, then deletes
    temporary directories, checkpoints of later steps (an abandoned run's,
    after a resume from an earlier step) and all but the ``keep_last`` newest.

    Returns:
        The committed directory.
    """
    root = tmp_dir.parent
    final = root / step_dir_name(step)
    _fsync_tree(tmp_dir)
    if final.exists():  # a complete but unpublished save of this step from a run that crashed after its rename
        shutil.rmtree(final)
    os.rename(tmp_dir, final)
    pointer_tmp = root / f"{LATEST}{TMP_MARK}{os.getpid()}"
    with open(pointer_tmp, "w") as file:
        file.write(final.name + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    _remove_stale(root, step, keep_last)
    return final


def _remove_stale(root: Path, step: int, keep_last: int) -> None:
    kept = []
    for entry in root.iterdir():
        if TMP_MARK in entry.name:
            _remove(entry)
            continue
        match = _STEP_DIR.match(entry.name)
        if match is None:
            continue
        if int(match.group(1)) > step:
            _remove(entry)
        else:
            kept.append((int(match.group(1)), entry))
    for _, entry in sorted(kept)[:-keep_last]:
        _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file of ``directory`` (also those megatron wrote) and the directory itself to disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
