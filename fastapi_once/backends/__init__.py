"""Backends that make a once run once across worker processes and hosts."""

from ._base import Backend

__all__ = ["Backend"]
