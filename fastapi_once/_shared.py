"""What the core does for the cross-process backends: forget here what another process reset.

A backend hears of a reset elsewhere through its store's listener and calls the callback the
core handed it when the once was made (:func:`forget_elsewhere`, see ``Backend.attach``); the
backend's own record is already gone.
"""

from __future__ import annotations

import logging

from ._core import registry
from ._keys import shared_key_digest
from ._logs import error_type, fields
from ._loops import current_loop, drain
from ._records import KeyView
from ._tasks import spawn

logger = logging.getLogger("fastapi_once")


def forget_elsewhere(name: str, digest: str | None) -> None:
    """What a backend's listener calls when another process reset once ``name``: forget it here.

    The forgetting (:func:`forget_shared`) runs in a task of its own, not in the listener's:
    it awaits the key's work in flight here, which may itself wait for a wake-up only the
    listener can deliver. Never raises; a failing cleanup is logged.
    """

    async def forget() -> None:
        try:
            await forget_shared(name, digest)
        except Exception as exc:
            kind = error_type(exc)
            logger.warning(
                "%s: a cleanup failed after a reset elsewhere: %s",
                name,
                kind,
                extra=fields(name, "cleanup_failed", error_type=kind),
            )

    spawn(current_loop(), forget(), "fastapi_once: reset from elsewhere")


async def forget_shared(name: str, digest: str | None) -> None:
    """Forget, in the running loop only, the across values another process reset.

    Every once named ``name`` retires (and cleans up) its value(s): a keyed once its value for
    the key whose shared digest is ``digest``, or every value if None; an unkeyed once its one
    value. The backend's record is already gone.
    """
    for target in [o for o in registry() if o.name == name]:
        store = target.store_seen()
        if store is None:
            continue
        views = [
            KeyView(store, key)
            for key in list(store.records)
            if digest is None or (target.keyed and _shared_digest(name, key) == digest)
        ]
        if views:
            await drain(lambda views=views: views, f"{name}.reset()")  # type: ignore[misc]


def _shared_digest(name: str, key: object) -> str | None:
    try:
        return shared_key_digest(name, key)
    except TypeError:  # a key no backend was given
        return None
