"""JSON lines for events and actions, so any run can be logged and replayed in a test (DESIGN.md).

Each record is `{"type": <class name>, **fields}`; tuples come back as tuples.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from scheduler import actions, events

_TYPES = {
    cls.__name__: cls
    for module in (events, actions)
    for cls in vars(module).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__
}


def encode(item: Any) -> dict[str, Any]:
    """One event or action as a JSON-ready dict."""
    return {"type": type(item).__name__, **dataclasses.asdict(item)}


def decode(record: dict[str, Any]) -> Any:
    """The event or action `encode` produced (lists become tuples again)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k != "type"}
    try:
        cls = _TYPES[record["type"]]
    except KeyError:
        raise ValueError(f"unknown event/action type {record.get('type')!r}") from None
    return cls(**fields)
