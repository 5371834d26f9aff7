"""Where a checkpoint comes from: a local path, or a Hugging Face hub id downloaded into the local cache.

A source that is not an existing path and reads ``owner/name`` (optionally ``owner/name@revision``) is fetched
with ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE`` (then only the local cache,
``HF_HUB_CACHE`` / ``HF_HOME``, is read) and reuses what is cached.
"""

from __future__ import annotations

import re
from pathlib import Path

from cdlm.errors import CheckpointError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def resolve_source(source: str | Path) -> Path:
    """Return a local path for ``source``: the path itself when it exists, else the hub snapshot it names.

    Args:
        source: a local file or directory, or a hub id ``owner/name[@revision]``.

    Returns:
        The existing local path (for a hub id, the snapshot directory in the cache).

    Raises:
        CheckpointError: the path does not exist and is not a hub id, or the hub id cannot be had (not in the
            local cache while offline, unknown repository or revision, no network).
    """
    path = Path(source)
    if path.exists():
        return path
    match = HUB_ID.match(str(source))
    if match is None or str(source).startswith((".", "/", "~")):
        raise CheckpointError(
            f"{source}: no such file or directory, and not a Hugging Face hub id (owner/name[@revision])"
        )
    return _download(match["repo"], match["revision"])


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch (or find in the cache) the snapshot of ``repo_id`` at ``revision``."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"{where}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1; "
                "download it once with network access, or pass a local directory"
            ) from err
        raise CheckpointError(f"{where}: cannot be downloaded and is not cached: {err}") from err
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise CheckpointError(f"{where}: no such Hugging Face repository or revision ({type(err).__name__})") from err
