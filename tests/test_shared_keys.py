"""Keys across processes: keys equal in a process name one record in every process."""

from __future__ import annotations

from fastapi_once._keys import key_digest, shared_key_digest


def test_keys_equal_in_a_process_are_one_shared_record() -> None:
    """1, 1.0 and True are one key in a dict, so one record across processes (0.2: three)."""
    assert len({shared_key_digest("n", k) for k in (1, 1.0, True)}) == 1
    assert len({shared_key_digest("n", k) for k in (0, 0.0, -0.0, False)}) == 1
    assert shared_key_digest("n", (1, "a")) == shared_key_digest("n", (True, "a"))
    assert key_digest(1) == key_digest(True)  # logs name them alike too


def test_keys_unequal_in_a_process_are_different_shared_records() -> None:
    """A str and its bytes, a number and its text, a tuple and its part stay apart."""
    keys = ["1", 1, b"1", 1.5, "1.5", (1,), ("1",), None, "None", (), "", b"", float("inf")]
    assert len({shared_key_digest("n", k) for k in keys}) == len(keys)
