"""Bundles of events: many like events (one answer's thousands of alerts) as one text.

A node that releases 5,000 hits in one answer must have their 5,000 alerts
durable before the answer leaves; as 5,000 outbox rows of ~700 bytes, each
repeating who asked and when and indexed by its key, that is about 50 ms.
A bundle holds what the events share once (and any column whose values are
all the same, such as the algorithm or the tier), the rest as one JSON array
per field, and no key per event: each key is its prefix and some of its fields
(``BundleKey``). ``bundle_events`` turns it back into each event's key and the
same canonical text ``canonical`` gives the event on its own, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def canonical(event: dict[str, object]) -> str:
    """An event's text as the outbox stores and sends it: sorted keys, no spaces, UTF-8."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class BundleKey:
    """How each event of a bundle is keyed: ``prefix``, then the values of its ``fields``
    (``str`` of each) joined by "/"; the event holds its key as ``field`` too. An alert:
    "gateway/request id/" + item + "/" + reference, as ``event_id``."""

    prefix: str
    fields: tuple[str, ...]
    field: str


@dataclass(frozen=True)
class Bundle:
    key: str  # of the events it holds (the same events: the same key)
    body: str
    events: int  # distinct keys


def encode_bundle(shared: dict[str, object], columns: dict[str, Sequence[object]], key: BundleKey) -> Bundle | None:
    """The bundle of events that have ``shared`` in common and differ in ``columns`` (one
    value per event in each); None for no event. Raises ValueError for columns of unequal
    length, a field both shared and per event, a key not made of the columns."""
    count = len(next(iter(columns.values()), ()))
    if not count:
        return None
    if any(len(values) != count for values in columns.values()):
        raise ValueError("columns of a bundle differ in length")
    if not set(key.fields) <= set(columns) or key.field in columns:
        raise ValueError("a bundle's key is made of its columns, and its field is none of them")
    _Template(shared, [*columns, key.field])  # a field both shared and per event: refused now, not when read
    constant = dict(shared)
    varying: dict[str, str] = {}
    for name, values in columns.items():
        if _all_same(values):
            constant[name] = values[0]
        else:
            varying[name] = _compact(values)
    key_text = _compact({"prefix": key.prefix, "fields": key.fields, "field": key.field})
    body = ('{"key":' + key_text + ',"shared":' + _compact(constant) + ',"columns":{'
            + ",".join(_compact(name) + ":" + text for name, text in varying.items()) + "}}")
    parts = [varying.get(name) or _compact(constant[name]) for name in key.fields]
    first = columns[key.fields[0]]
    events = count if len(set(first)) == count else len(set(zip(*(columns[f] for f in key.fields), strict=True)))
    return Bundle(hashlib.sha256("\n".join([key_text, *parts]).encode()).hexdigest(), body, events)


def bundle_events(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, canonical text) of each event of a bundle (its body, parsed)."""
    shared, columns, key = body["shared"], body["columns"], body["key"]
    count = len(next(iter(columns.values()))) if columns else 1  # every field alike: the same event
    prefix, field = key["prefix"], key["field"]
    parts = [columns[name] if name in columns else [shared[name]] * count for name in key["fields"]]
    keys = [prefix + "/".join(map(str, values)) for values in zip(*parts, strict=True)]
    template = _Template(shared, [*columns, field])
    values = zip(*(keys if name == field else columns[name] for name in template.order), strict=True)
    return list(zip(keys, map(template.encode, values), strict=True))


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# How ``json.dumps(..., ensure_ascii=False)`` writes a string (its C version, when built).
_encode_string = json.encoder.encode_basestring


def _json_value(value: object) -> str:
    """``json.dumps`` of one value as ``canonical`` writes it, without its call overhead
    for the kinds events mostly hold (str, int, bool, None); anything else goes through it."""
    if type(value) is str:
        return _encode_string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Template:
    """``canonical`` of events that share most of their fields, the shared ones encoded once:
    one string format per event instead of a ``json.dumps`` (with its key sort) each."""

    def __init__(self, shared: dict[str, object], names: Sequence[str]):
        keys = sorted([*shared, *names])
        if len(set(keys)) != len(keys):
            raise ValueError("a field is both shared and per event, or named twice")
        self.order = [key for key in keys if key not in shared]  # the per-event values, in this order
        # A str.format template: a per-event value is a field, the constant text's braces are doubled.
        self._template = "{{" + ",".join(
            _encode_string(key) + ":" + (_json_value(shared[key]).replace("{", "{{").replace("}", "}}")
                                         if key in shared else "{}") for key in keys) + "}}"

    def encode(self, values: Sequence[object]) -> str:
        """The text of one event, ``values`` its own fields in ``order``."""
        return self._template.format(*map(_json_value, values))


def _all_same(values: Sequence[object]) -> bool:
    """Whether every value is the first, as JSON writes them (1 and true, 0 and 0.0 differ):
    decided without encoding them for the kinds an event mostly holds."""
    first = values[0]
    if type(first) not in _PLAIN_KINDS:
        return _compact(values) == "[" + ",".join([_compact(first)] * len(values)) + "]"
    return values.count(first) == len(values) and set(map(type, values)) == {type(first)}


_PLAIN_KINDS = frozenset({str, int, bool, type(None)})
