"""Does this node see the driver's local OUT and --kv-cache? (a multi-node cluster's shared storage)

On a cluster of several nodes a local path is only right when every node mounts the same storage
there. The driver writes a probe file into each local folder and keeps it for the whole run; each
actor and write task checks it before its first write on a node, so a node that the autoscaler adds
during the run is checked too, not only the nodes there at the start.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass

from ..faults import fault_point
from .layout import PROBE_PREFIX


class NotShared(Exception):
    """A local OUT or --kv-cache that some node of a multi-node cluster does not see (exit 2)."""


def sees(path: str, token: str) -> bool:
    """On a node: is the driver's probe file there, with its content?"""
    try:
        fault_point("storage.probe")
        with open(path) as f:
            return f.read() == token
    except Exception:  # noqa: BLE001 - missing, unreadable, or simulated: not seen
        return False


_seen: set[str] = set()  # tokens this process has checked


@dataclass(frozen=True)
class StorageProbe:
    """The driver's probe files: (option, folder, probe path) each, and the token they hold."""

    files: tuple[tuple[str, str, str], ...]
    token: str

    @classmethod
    def create(cls, folders: dict[str, str | None]) -> StorageProbe | None:
        """Write a probe into each local folder of ``folders`` (option -> path; URIs and None skipped)."""
        local = {option: path for option, path in folders.items() if path and "://" not in path}
        if not local:
            return None
        token = uuid.uuid4().hex
        files = []
        try:
            for option, folder in local.items():
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, PROBE_PREFIX + token)
                with open(path, "w") as f:
                    f.write(token)
                files.append((option, folder, path))
        except BaseException:
            cls(tuple(files), token).remove()
            raise
        return cls(tuple(files), token)

    def unseen(self) -> tuple[str, str] | None:
        """On a node: the first (option, folder) whose probe this node does not see, or None."""
        return next(((option, folder) for option, folder, path in self.files if not sees(path, self.token)), None)

    def check(self) -> None:
        """Raise ``NotShared`` (naming this node and the path) when this node does not see every probe."""
        if self.token in _seen:
            return
        if (missing := self.unseen()) is not None:
            raise NotShared(not_shared_message(*missing, _node_description(), "Nothing was written from that node."))
        _seen.add(self.token)

    def remove(self) -> None:
        for _, _, path in self.files:
            with contextlib.suppress(OSError):
                os.remove(path)


def not_shared_message(option: str, folder: str, node: str, outcome: str) -> str:
    return (f"{option} {folder} is a local path that node {node} does not see: on a multi-node cluster OUT and "
            f"--kv-cache must be on storage every node mounts at the same path, or an object-store URI "
            f"(s3://...). {outcome}")


def _node_description() -> str:
    try:
        import ray

        context = ray.get_runtime_context()
        return f"{context.get_node_id()} ({ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - outside Ray
        import socket

        return socket.gethostname()


def probed(cls: type, probe: StorageProbe | None) -> type:
    """``cls`` whose constructor first checks ``probe`` (same name, so Ray's actor names stay)."""
    if probe is None:
        return cls

    class Probed(cls):
        def __init__(self, *args, **kwargs):
            probe.check()
            super().__init__(*args, **kwargs)

    Probed.__name__, Probed.__qualname__ = cls.__name__, cls.__qualname__
    return Probed
