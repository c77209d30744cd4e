"""How a once's result travels between processes: JSON text, typed by the function's annotation.

Never pickle: other processes (and whoever else can write to the store) hand the text back, and
decoding it must not run code.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable
from typing import Any


class ResultCodec:
    """Turns a once's result into JSON data for a backend, and the backend's JSON data back.

    The plain codec (:data:`JSON`) passes values through (a tuple comes back as a list, a
    datetime is refused). A typed codec (:meth:`for_function`) converts with pydantic's
    ``TypeAdapter`` for the function's return annotation, so every process, the leader
    included, gets the annotated type (tuples, datetimes, enums, models, dataclasses...).
    """

    def __init__(self, fn: Any = None, *, owner: str = "", shown: str = "") -> None:
        self._fn = fn  # whose return annotation types the results; None: plain JSON
        self._owner, self._shown = owner, shown  # the once's name; the annotation as written
        #: Whether results are decoded into an annotated type (not plain JSON).
        self.typed = fn is not None
        self._type_adapter: Any = None

    @classmethod
    def for_function(cls, fn: Callable[..., Any], name: str) -> ResultCodec:
        """Return the codec for ``fn``'s return annotation (plain JSON without one).

        An annotation naming a class defined later in its module is resolved at first use.

        Raises:
            TypeError: pydantic cannot serialise the annotated type.
        """
        target: Any = fn
        while isinstance(target, functools.partial):
            target = target.func
        if not (inspect.isroutine(target) or inspect.isclass(target)):
            target = getattr(target, "__call__", target)  # noqa: B004
        raw = getattr(target, "__annotations__", {}).get("return", Any)
        if raw in (Any, "Any", "typing.Any"):
            return JSON
        shown = raw.__qualname__ if isinstance(raw, type) else repr(raw).replace("typing.", "")
        codec = cls(target, owner=name, shown=raw if isinstance(raw, str) else shown)
        try:
            if typing.get_type_hints(target, include_extras=True)["return"] is Any:
                return JSON
        except NameError:  # a class defined later in the module: resolved at first use
            return codec
        codec._adapter()  # a type pydantic cannot serialise is refused now
        return codec

    def to_data(self, name: str, value: object, backend: str) -> Any:
        """Return ``value`` as JSON data (dicts, lists, strings, numbers, booleans, None).

        Raises:
            TypeError: ``value`` cannot be encoded, or does not match the annotation (naming the
                once, the backend, and the offending type, never the value).
        """
        if not self.typed:
            return value
        from pydantic_core import PydanticSerializationError

        try:
            return self._adapter().dump_python(value, mode="json", warnings="error")
        except (PydanticSerializationError, UnicodeDecodeError):  # bytes travel as UTF-8 text
            raise TypeError(
                f"{name}'s result is not JSON-serialisable as its return annotation "
                f"{self._shown}: got a {type(value).__qualname__}; a once with across= shares "
                f"its result with other processes through {backend} as JSON. Return a value of "
                "the annotated type, made of what pydantic serialises (models, dataclasses, "
                "TypedDicts, tuples, datetimes, enums, plain data; bytes only as UTF-8 text)"
            ) from None

    def from_data(self, data: Any) -> Any:
        """Return the result ``data`` (as JSON decoded it) holds, as the annotated type.

        Raises:
            TypeError: the recorded result does not match the annotation (it was recorded by a
                version of the function with another annotation).
        """
        if not self.typed:
            return data
        from pydantic import ValidationError

        try:
            # Through JSON text, so that JSON's rules apply (a string is a datetime), also for
            # models in strict mode.
            return self._adapter().validate_json(json.dumps(data))
        except ValidationError as exc:
            where = ", ".join(
                f"{'.'.join(map(str, e['loc'])) or 'result'}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False)[:3]
            )
            raise TypeError(
                f"the recorded result of {self._owner} does not match its return annotation "
                f"{self._shown} ({where}); it was recorded by a version with another "
                "annotation: give the once a new version= (or reset it)"
            ) from None

    def _adapter(self) -> Any:
        """The annotation's ``TypeAdapter``, made at first need."""
        if self._type_adapter is None:
            from pydantic import PydanticSchemaGenerationError, TypeAdapter

            try:  # ``from __future__ import annotations`` leaves text to resolve
                annotation = typing.get_type_hints(self._fn, include_extras=True)["return"]
            except NameError as exc:
                raise TypeError(
                    f"once({self._owner}, across=...): its return annotation {self._shown} "
                    f"cannot be resolved ({exc}); define the type at module level, or remove "
                    "the annotation to share plain JSON"
                ) from None
            try:
                self._type_adapter = TypeAdapter(annotation)
            except PydanticSchemaGenerationError:
                raise TypeError(
                    f"once({self._owner}, across=...): the result is shared as JSON typed by "
                    f"the return annotation {self._shown}, which pydantic cannot serialise; "
                    "annotate a type it can (a model, dataclass, TypedDict, tuple, datetime, "
                    "enum, plain data), or remove the annotation to share plain JSON"
                ) from None
        return self._type_adapter


def encode_json(name: str, value: object, backend: str) -> str:
    """Return ``value`` as JSON text, for a backend to store.

    Raises:
        TypeError: ``value`` is not JSON-serialisable (naming the once, the backend and the
            offending type, never the value).
    """
    refused: list[str] = []  # the type JSON could not carry, if that is what failed

    def refuse(obj: object) -> object:
        refused.append(type(obj).__qualname__)
        raise TypeError

    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), default=refuse)
    except (TypeError, ValueError) as exc:
        what = type(value).__qualname__
        if refused:
            detail = what if refused[0] == what else f"{what} containing a {refused[0]} value"
        else:  # e.g. a non-string key, NaN, a circular reference
            detail = f"{what} ({exc})"
        raise TypeError(
            f"{name}'s result is not JSON-serialisable: type {detail}; a once with across= "
            f"shares its result with other processes through {backend} as JSON. Return plain "
            "data (dict, list, str, int, float, bool, None), or annotate the function's return "
            "type to share typed values"
        ) from None


#: The plain JSON codec: what a function without a return annotation uses.
JSON = ResultCodec()
