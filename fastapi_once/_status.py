"""A once's observable state: the typed snapshot that status() returns."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any, Literal

State = Literal["idle", "running", "ready", "failed", "refreshing"]


@dataclasses.dataclass(frozen=True)
class OnceStatus:
    """A snapshot of one once in one event loop.

    Attributes:
        name: the once's name.
        state: ``idle`` (nothing made or tried), ``running`` (an attempt in flight), ``ready``
            (a value is served), ``failed`` (the last attempt failed, no value), ``refreshing``
            (a value is served while a background refresh runs). For a keyed once: ``ready`` if
            any value is kept, else the state of its attempts.
        made_at: when the current value was made (UTC), or None.
        last_duration: seconds the last finished attempt took, or None.
        attempts: attempts started (refreshes included).
        last_error_type: the type name of the last attempt's exception, if it failed.
        last_error_message: its message — only when asked for with ``details=True``, since
            exception text can hold secrets.
        hits: calls served from a made value.
        joins: calls that joined an attempt in flight instead of starting one.
        keys: for a keyed once, how many keys are in each state; None otherwise.
        size: for a keyed once, how many values it keeps; None otherwise.
        stale: whether a value past its ttl is kept under ``stale_if_error=``: served (state
            ``ready`` or ``refreshing``) once making a new one has failed; before that, kept for
            the callers of the next attempt in case it fails (state ``idle``: the next call
            starts it, or ``running``).
        stale_until: when that value is retired (UTC), the soonest for a keyed once, or None.
    """

    name: str
    state: State
    made_at: datetime | None = None
    last_duration: float | None = None
    attempts: int = 0
    last_error_type: str | None = None
    last_error_message: str | None = None
    hits: int = 0
    joins: int = 0
    keys: dict[State, int] | None = None
    size: int | None = None
    stale: bool = False
    stale_until: datetime | None = None


def project(name: str, keyed: bool, store: Any, now: float, details: bool) -> OnceStatus:
    """Project a once's store (``_records.Store``, or None) as of ``now``: each record's current
    state, its value's wall-clock birth and, if that value is stale, when it is retired (see
    ``Record.view``)."""
    if store is None:
        return OnceStatus(name=name, state="idle")
    records = [r.view(now) for r in list(store.records.values())]
    last_error, last_duration = store.last_error, store.last_duration
    counts: dict[State, int] = {"ready": 0, "refreshing": 0, "running": 0, "failed": 0}
    for each, _, _ in records:
        if each != "idle":
            counts[each] += 1
    served = [made for each, made, _ in records if each in ("ready", "refreshing") and made]
    stale = [until for _, _, until in records if until is not None]
    state: State = next((s for s in ("ready", "refreshing", "running") if counts[s]), "idle")
    if state == "idle" and (counts["failed"] or last_error is not None):
        state = "failed"
    return OnceStatus(
        name=name,
        state=state,
        made_at=datetime.fromtimestamp(max(served), tz=timezone.utc) if served else None,
        last_duration=last_duration,
        attempts=store.tries,
        last_error_type=None if last_error is None else last_error[0],
        last_error_message=last_error[1] if details and last_error is not None else None,
        hits=store.hits,
        joins=store.joins,
        keys=counts if keyed else None,
        size=sum(1 for s, _, _ in records if s in ("ready", "refreshing")) if keyed else None,
        stale=bool(stale),
        stale_until=datetime.fromtimestamp(min(stale), tz=timezone.utc) if stale else None,
    )
