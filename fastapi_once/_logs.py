"""The package's logger, and how a once and key are named where operators can read them.

Keys often come from client request data (a token, a signed URL): logs, errors and status name
a key by a short stable digest, never by its text.
"""

from __future__ import annotations

import hashlib
import logging

logger = logging.getLogger("fastapi_once")


def key_digest(key: object) -> str:
    """A short digest of ``key`` that is stable across processes and reveals nothing of it."""
    return hashlib.blake2b(repr(key).encode(), digest_size=4).hexdigest()


def label(name: str, key: object, *, unkeyed: object = None) -> str:
    """How logs name the attempt of ``name`` for ``key`` (``unkeyed``: no key at all)."""
    return name if key is unkeyed else f"{name}[#{key_digest(key)}]"
