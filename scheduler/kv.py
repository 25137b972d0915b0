"""KV-cache demand and watermark sizing of one instance (SLINFER §4.3.1, §4.3.2, §4.3.4).

M_require (Eq. 2) = C · max(Σ_r (I_r + max(O_r, Ō)), L_min): every request is assumed to reach at
least the average output length Ō, and all to peak together. The artifact's variant ("pad", the
default) reserves the current length + 512 tokens per request instead. L_min is the model's
maximum context (4096), so a live instance can always take one full-length request.

Watermark hysteresis with w = 0.25: M_recommend = M_require · (1 + w); scale up early, straight to
M_recommend, as soon as M_cur < M_require; scale down lazily, only when M_recommend · (1 + w) <
M_cur. Compromise (§4.3.4): if M_recommend does not fit the node's free optimistic budget, settle
for all the budget has (M_cur + free), which is ≥ M_require whenever admission placed the request.

Invariants: demands are in blocks, rounded up per sequence (paged KV); the floor applies to every
live instance, idle ones included, so a keep-alive instance can take a request without resizing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from scheduler.config import SchedulerConfig
from scheduler.specs import ModelSpec
from scheduler.state import Request


@dataclass
class OutputEstimator:
    """Ō per model: an EWMA of finished requests' output lengths over a global prior (§9 row 1)."""

    prior: float
    alpha: float = 0.05
    means: dict[str, float] = field(default_factory=dict)

    def mean(self, model: str) -> float:
        return self.means.get(model, self.prior)

    def observe(self, model: str, output_tokens: int) -> None:
        self.means[model] = (1 - self.alpha) * self.mean(model) + self.alpha * output_tokens


def floor_blocks(model: ModelSpec) -> int:
    """L_min in blocks: what every live instance keeps, idle or not (one full-context request)."""
    return model.blocks_for(model.max_context)


def required_blocks(model: ModelSpec, requests: Iterable[Request], config: SchedulerConfig,
                    outputs: OutputEstimator) -> int:
    """M_require in blocks for an instance holding `requests` (§4.3.1)."""
    if config.kv_estimate == "pad":
        pad = config.kv_pad_tokens
        total = sum(model.blocks_for(r.context + pad) for r in requests)
    else:
        o_bar = outputs.mean(model.name)
        total = sum(model.blocks_for(math.ceil(r.input_tokens + max(r.generated, o_bar)))
                    for r in requests)
    return max(total, floor_blocks(model))


def recommended_blocks(required: int, watermark: float) -> int:
    """M_recommend = M_require · (1 + w) (§4.3.2)."""
    return math.ceil(required * (1.0 + watermark))


def scale_up_target(current: int, required: int, watermark: float, free_blocks: int) -> int | None:
    """New KV target if the instance must grow, else None: early scale-up with compromise.

    The node can give the instance at most `current + free_blocks` in all (its own target is
    already in the budget `free_blocks` is left of); a target beyond that would wait in the
    reservation station forever, with the instance's requests behind it."""
    if current >= required:
        return None
    target = min(recommended_blocks(required, watermark), current + max(free_blocks, 0))
    return target if target > current else None


def scale_down_target(current: int, required: int, watermark: float) -> int | None:
    """New KV target if the instance may shrink, else None: lazy scale-down (hysteresis)."""
    recommended = recommended_blocks(required, watermark)
    if recommended * (1.0 + watermark) < current:
        return recommended
    return None

