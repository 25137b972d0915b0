"""Which model names can be served, and which prepared weights back each.

The SLINFER experiments serve N replicas of one checkpoint as N distinct models; so does refengine:
`--replicas N` adds the names `<default>-r1` … `<default>-rN`, all backed by the default weights
(each gets its own instances, KV cache and SLOs; only the weights on disk are shared). A catalogue
file lists names explicitly: `{"models": [{"name": "chat-a", "weights": "smollm2-135m-instruct", "temperature": 0.7}]}`.

Each name also carries the sampling a request gets when it leaves `temperature` or `top_p` out: the
checkpoint's recommendation where one is known (as vLLM applies a checkpoint's generation config),
else OpenAI's 1.0 and 1.0. SmolLM2's model card samples at temperature 0.2, top_p 0.9; at
OpenAI's temperature 1 the 135M model, quantized to Q4_1 in the shipped GGUF, mostly babbles.
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
class SamplingDefaults:
    """What a request that omits the field samples with (OpenAI's defaults unless a model says)."""

    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2):
            raise ValueError(f"temperature must be a number in [0, 2], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")


RECOMMENDED_SAMPLING = {DEFAULT_MODEL: SamplingDefaults(temperature=0.2, top_p=0.9)}   # its model card's


def recommended_sampling(weights: str) -> SamplingDefaults:
    return RECOMMENDED_SAMPLING.get(weights, SamplingDefaults())


@dataclass(frozen=True)
class ModelSpec:
    name: str       # what clients ask for
    weights: str    # the prepared weights in the model cache that back it
    sampling: SamplingDefaults | None = None   # None: the weights' recommendation

    @property
    def default_sampling(self) -> SamplingDefaults:
        return self.sampling or recommended_sampling(self.weights)


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
            return cls([cls._entry(m) for m in raw["models"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read catalogue {path}: {e}") from None

    @staticmethod
    def _entry(raw: dict) -> ModelSpec:
        """One model of a catalogue file: name, weights (default: the default model's), and
        optionally temperature and top_p, each falling back to the weights' recommendation."""
        weights = str(raw.get("weights", DEFAULT_MODEL))
        sampling = None
        if "temperature" in raw or "top_p" in raw:
            recommended = recommended_sampling(weights)
            sampling = SamplingDefaults(raw.get("temperature", recommended.temperature),
                                        raw.get("top_p", recommended.top_p))
        return ModelSpec(str(raw["name"]), weights, sampling)

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
