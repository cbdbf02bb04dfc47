"""Settings as dataclass fields: each field's metadata names the kind of value it takes, and from
that come both how a command-line flag's text is read and the check every value passes, whether it
came from a flag, a recipe file or a saved run.

Light on purpose (no torch, no Lightning): the command line reads its flags with these kinds before
it knows which command runs.

Field metadata (a plain dict, so any dataclass can carry it): ``help``; ``kind``, a name in KINDS (else
the annotation's: bool, int, float, text, mapping); ``choices`` (None among them is spelled "none" on
the command line); ``flag``, the flag's name without dashes (else the field's, with dashes; a switch
that is on by default is spelled no-NAME); ``metavar``; ``nested`` (a dataclass whose fields are this
mapping's keys, each a flag of its own); ``section`` (which group of a command's --help lists the
flag). A mapping without ``nested`` is given on the command line as repeated KEY=VALUE flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_duration(text: str) -> float:
    """'30m', '2h', '90s' or plain seconds -> seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"time budget {text!r}: expected a duration such as 90s, 30m or 2h")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _switch(text: str) -> bool:
    raise ValueError(f"{text!r}: a switch takes no value")


def parse_key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as YAML reads a recipe's model_args (0.5, true, shifted)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{text!r} is not KEY=VALUE (e.g. stem=shifted)")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        with contextlib.suppress(ValueError):
            parsed = float(parsed)  # YAML 1.1 reads 1e-12 as text
    return key.strip(), parsed


@dataclass(frozen=True)
class Kind:
    """A setting's value type: ``read`` turns a flag's text into a value (ValueError naming the text if it
    cannot), and every value, from a flag or a recipe, must be one of ``types`` and pass ``allowed``."""

    read: Callable[[str], Any]
    types: tuple[type, ...]
    noun: str  # what a value of the wrong type should have been
    allowed: Callable[[Any], bool] = lambda value: True
    rule: str = ""  # what `allowed` asks, for messages

    def parse(self, text: str) -> Any:
        value = self.read(text)
        if not self.allowed(value):
            raise ValueError(f"{value} {self.rule}")
        return value

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not of this kind, or None."""
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            return f"must be {self.noun}"
        return None if self.allowed(value) else self.rule


_NUMBER = (int, float)
KINDS: dict[str, Kind] = {
    "text": Kind(str, (object,), "text"),
    "bool": Kind(_switch, (bool,), "true or false"),
    "int": Kind(_whole_number, (int,), "a whole number"),
    "positive_int": Kind(_whole_number, (int,), "a whole number", lambda v: v > 0, "must be positive"),
    "non_negative_int": Kind(_whole_number, (int,), "a whole number", lambda v: v >= 0, "must be >= 0"),
    "float": Kind(_number, _NUMBER, "a number", math.isfinite, "must be finite"),
    "non_negative_float": Kind(_number, _NUMBER, "a number", lambda v: v >= 0, "must be >= 0"),
    "positive_float": Kind(_number, _NUMBER, "a number", lambda v: 0 < v < math.inf, "must be positive"),
    "fraction": Kind(_number, _NUMBER, "a number", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "portion": Kind(_number, _NUMBER, "a number", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "probability": Kind(_number, _NUMBER, "a number", lambda v: 0 <= v <= 1, "must be a probability in [0, 1]"),
    "duration": Kind(parse_duration, _NUMBER, "a duration", lambda v: 0 < v < math.inf,
                     "must be a positive duration such as 30m"),
    "mapping": Kind(parse_key_value, (dict,), "a mapping"),  # on the command line: one KEY=VALUE per flag
}


def value_type(hint: Any) -> tuple[Any, int | None]:
    """An annotation's value type without None, and a fixed tuple's length (else None):
    ``tuple[float, float]`` is (float, 2), ``int | None`` is (int, None), ``dict[str, Any]`` is (dict, None)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return args[0], len(args)
    return typing.get_origin(hint) or hint, None


def kind_of(item: dataclasses.Field, hint: Any) -> Kind | None:
    """The field's Kind: its metadata's, else the one its annotation (``hint``) implies."""
    name = item.metadata.get("kind")
    if name is None:
        base, _ = value_type(hint)
        name = {bool: "bool", int: "int", float: "float", str: "text", dict: "mapping"}.get(base)
    return KINDS[name] if name else None


def check_values(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """Each value against its field's choices and kind (a tuple field element by element); None passes
    where the field's default is None. Errors name the key, the value, the rule and what the key does."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.name not in values:
            continue
        value = values[item.name]
        if value is None and item.default is None:
            continue
        choices = item.metadata.get("choices")
        if choices is not None:
            if value not in choices:
                _refuse(item, value, f"must be one of {list(choices)}", where)
            continue
        kind = kind_of(item, hints[item.name])
        if kind is None:
            continue
        _, length = value_type(hints[item.name])
        if length is not None:
            if not isinstance(value, list | tuple) or len(value) != length:
                _refuse(item, value, f"must be {length} values", where)
            problems = [kind.problem(v) for v in value]
            problem = next((p for p in problems if p), None)
        else:
            problem = kind.problem(value)
        if problem:
            _refuse(item, value, problem, where)


def _refuse(item: dataclasses.Field, value: Any, problem: str, where: str) -> typing.NoReturn:
    about = item.metadata.get("help")
    raise ValueError(f"{where}{item.name}={value!r}: {problem}" + (f" ({about})" if about else ""))


def nearest(word: str, valid: Iterable[str]) -> str:
    """'; did you mean a, b?' for the valid names closest to word, or ''."""
    close = difflib.get_close_matches(word, sorted(valid), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


