"""What the core does for the cross-process backends: forget here the keys another process reset.

A backend that hears of a reset elsewhere (a message on its resets channel) calls
:func:`forget_shared` in its loop; the backend's own record is already gone.
"""

from __future__ import annotations

from ._core import registry
from ._keys import shared_key_digest
from ._loops import drain
from ._records import KeyView


async def forget_shared(name: str, digest: str | None) -> None:
    """Forget, in the running loop only, the keyed across values another process reset.

    Every keyed once named ``name`` retires (and cleans up) its value for the key whose shared
    digest is ``digest``, or every value if None; the backend's record is already gone.
    """
    for target in [o for o in registry() if o.name == name and o.keyed]:
        store = target.store_seen()
        if store is None:
            continue
        views = [
            KeyView(store, key)
            for key in list(store.records)
            if digest is None or _shared_digest(name, key) == digest
        ]
        if views:
            await drain(lambda views=views: views, f"{name}.reset()")  # type: ignore[misc]


def _shared_digest(name: str, key: object) -> str | None:
    try:
        return shared_key_digest(name, key)
    except TypeError:  # a key no backend was given
        return None
