"""Checksums of a checkpoint's files: written with every save, verified before every load.

``manifest.json`` lists every file of the checkpoint (megatron's shards and our own
files, the manifest and ``meta.json`` aside) with its size and SHA-256. Hashing is
shared out over the ranks (file ``i`` by rank ``i % world``) and gathered, so a large
checkpoint costs each rank ``1 / world`` of the reading. A checkpoint whose file is
missing, truncated or altered fails :func:`verify_checkpoint` with the path and the
file named; a resume then falls back to the newest intact checkpoint
(:func:`newest_intact_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
_SKIPPED = (MANIFEST, "meta.json")
_BLOCK = 16 * 2**20

log = logging.getLogger("aligner")


class CorruptCheckpointError(ValueError):
    """A checkpoint's files do not match its manifest (or it has none): the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name not in _SKIPPED
    )


def _shared_hashes(directory: Path, names: list[str]) -> dict[str, dict[str, int | str]]:
    """``{name: {"size", "sha256"}}`` for ``names``, hashed round-robin by the ranks; a collective."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {}
    for name in names[rank::world]:
        path = directory / name
        mine[name] = {"size": path.stat().st_size, "sha256": _sha256(path)} if path.is_file() else None
    if world == 1:
        return mine
    parts: list[dict | None] = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: entry for part in parts for name, entry in part.items()}


def write_manifest(directory: Path) -> None:
    """Hash every file of a fully written checkpoint ``directory`` into its manifest; a collective.

    Every rank must see the files (a checkpoint folder is on a shared file system).
    """
    names = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        names = [_files(directory)]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    entries = _shared_hashes(directory, names[0])
    if not dist.is_initialized() or dist.get_rank() == 0:
        text = json.dumps({"algorithm": "sha256", "files": entries}, indent=1, sort_keys=True)
        (directory / MANIFEST).write_text(text + "\n")


def verify_checkpoint(directory: str | Path) -> None:
    """Check every file of ``directory`` against its manifest; a collective when distributed.

    Raises:
        CorruptCheckpointError: no manifest, a file missing, of another size or
            another checksum, or a file the manifest does not list (the message
            names the checkpoint and the file).
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"{directory}: no {MANIFEST} (an incomplete or foreign checkpoint)")
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise CorruptCheckpointError(f"{manifest_path}: unreadable ({error})") from None
    extra = sorted(set(_files(directory)) - set(expected))
    if extra:
        raise CorruptCheckpointError(f"{directory}: file {extra[0]} is not in its {MANIFEST}")
    found = _shared_hashes(directory, sorted(expected))
    for name in sorted(expected):
        want, got = expected[name], found[name]
        if got is None:
            raise CorruptCheckpointError(f"{directory}: file {name} is missing")
        if got["size"] != want["size"]:
            raise CorruptCheckpointError(
                f"{directory}: file {name} has {got['size']} bytes, {want['size']} were written (truncated?)"
            )
        if got["sha256"] != want["sha256"]:
            raise CorruptCheckpointError(f"{directory}: file {name} does not match its checksum (corrupted)")


def newest_intact_checkpoint(candidates: list[Path]) -> Path | None:
    """The first of ``candidates`` (newest first) that passes :func:`verify_checkpoint`; a collective.

    Each one that fails is reported (a warning naming the path and the file) before the next is tried.
    """
    for index, path in enumerate(candidates):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpointError as error:
            following = candidates[index + 1].name if index + 1 < len(candidates) else "none left: starting afresh"
            if not dist.is_initialized() or dist.get_rank() == 0:
                log.warning("skipping a damaged checkpoint: %s; falling back to %s", error, following)
    return None
