"""Small files of a Hugging Face hub repo, read on the driver before anything starts: the cache first,
then (network allowed) the hub asked ONCE. ``hf_hub_download`` alone retries a missing network for half
a minute (five retries with backoff), which a first run with a typo in ``--model`` should not wait for."""

from __future__ import annotations

import os

HUB_TIMEOUT_S = 10  # one request's timeout


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def cached_file(repo_id: str, name: str, revision: str | None = None) -> str | None:
    """The path of ``name`` of ``repo_id`` in the Hugging Face cache, None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, name, revision=revision)
    return found if isinstance(found, str) else None


def hub_commit(repo_id: str, name: str, revision: str | None = None) -> str:
    """The hub's commit of ``repo_id``, from one metadata request for ``name`` (no retries); raises the
    hub client's error (unknown repo or file, gated, no network)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, name, revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None)
    return get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S).commit_hash or "unknown"


def hub_file(repo_id: str, name: str, revision: str | None = None) -> str:
    """``name`` of ``repo_id``: from the cache, else (online) downloaded once the hub has answered one
    request; ``FileNotFoundError`` offline when it is not cached."""
    found = cached_file(repo_id, name, revision)
    if found is not None:
        return found
    if hub_offline():
        raise FileNotFoundError(f"{repo_id}/{name}: not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    hub_commit(repo_id, name, revision)  # fails fast where the download would retry
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, name, revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None)
