"""The reset message every store sends between processes: what it reads back, what it refuses."""

from __future__ import annotations

import pytest

from fastapi_once.backends._store import UNKEYED, Reset


@pytest.mark.parametrize("key", [None, UNKEYED, "a" * 40])
def test_a_reset_reads_back_as_it_was_sent(key: str | None) -> None:
    """to_json and from_json round-trip every kind of reset: all keys, the unkeyed one, a key."""
    reset = Reset("app.config", key, "pid 1 on web-1 abc")
    assert Reset.from_json(reset.to_json()) == reset
    assert Reset.from_json(reset.to_json().encode()) == reset


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        b"\xff\xfe",
        "[1, 2]",
        '"text"',
        '{"name": "x"}',
        '{"name": 1, "key": null, "origin": "o"}',
        '{"name": "n", "key": 0, "origin": "o"}',
        '{"name": "n", "key": false, "origin": "o"}',
        '{"name": "n", "key": ["k"], "origin": "o"}',
        '{"name": "n", "key": null, "origin": {"o": 1}}',
    ],
)
def test_a_message_that_is_not_a_reset_is_refused_with_a_warning(
    message: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can write to a store's channel can send anything: a message with a field
    missing or not a string (a key may be null) is no reset, and says so in the log."""
    assert Reset.from_json(message) is None
    assert [r.getMessage() for r in caplog.records] == [
        "ignored a reset message that is not one of ours"
    ]
    assert caplog.records[0].levelname == "WARNING"
