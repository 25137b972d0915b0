"""Which model names can be served, and which prepared weights back each.

The SLINFER experiments serve N replicas of one checkpoint as N distinct models; so does refengine:
`--replicas N` adds the names `<default>-r1` … `<default>-rN`, all backed by the default weights
(each gets its own instances, KV cache and SLOs; only the weights on disk are shared). A catalogue
file lists names explicitly: `{"models": [{"name": "chat-a", "weights": "smollm2-135m-instruct"}]}`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class UnknownModelError(KeyError):
    """A model name that is not in the catalogue; str() is a one-line message listing the known ones."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class ModelSpec:
    name: str       # what clients ask for
    weights: str    # the prepared weights in the model cache that back it


class Catalogue:
    def __init__(self, specs: list[ModelSpec]):
        self.specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"model name {spec.name!r} appears twice in the catalogue")
            self.specs[spec.name] = spec

    @classmethod
    def default(cls, replicas: int = 0) -> "Catalogue":
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        names = [DEFAULT_MODEL] + [f"{DEFAULT_MODEL}-r{i}" for i in range(1, replicas + 1)]
        return cls([ModelSpec(name, DEFAULT_MODEL) for name in names])

    @classmethod
    def from_file(cls, path: Path) -> "Catalogue":
        try:
            raw = json.loads(Path(path).read_text())
            return cls([ModelSpec(str(m["name"]), str(m.get("weights", DEFAULT_MODEL))) for m in raw["models"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read catalogue {path}: {e}") from None

    def __getitem__(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(self.names)}")
        return self.specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def weights(self) -> set[str]:
        return {spec.weights for spec in self.specs.values()}
