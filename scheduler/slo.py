"""SLOs and headroom (SLINFER §4.2.1, Eq. 1).

TTFT_SLO(L) = min(max(0.5, L/512), 8) s for an L-token prompt, TPOT_SLO = 0.25 s. The deadline is
cumulative: token k+1 is due at ST + grace + TTFT_SLO + k·TPOT_SLO, so tokens produced early bank
slack for later ones. Headroom = deadline of the next token − now; negative headroom means an SLO
has already been missed.

Invariants:
- the scheduler plans against the *internal* SLOs, shrunk by `margin` (artifact: 5 %, §4.2.1);
  metrics judge against the paper's SLOs (`margin=0`);
- `grace` is the cold-start time of the request's instance (§4.5; measured, or estimated and
  bounded by the actual wait, `lifecycle.py`), 0 otherwise;
- the deadline itself lives on `state.Request.deadline`, which the token scheduler reads often.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SloPolicy:
    ttft_floor: float = 0.5
    ttft_tokens_per_s: float = 512.0
    ttft_cap: float = 8.0
    tpot: float = 0.25
    margin: float = 0.0

    def ttft(self, input_tokens: int) -> float:
        """First-token SLO for an `input_tokens` prompt (Sarathi-Serve/DistServe style, §4.2.1)."""
        raw = min(max(self.ttft_floor, input_tokens / self.ttft_tokens_per_s), self.ttft_cap)
        return raw * (1.0 - self.margin)

    @property
    def tpot_slo(self) -> float:
        return self.tpot * (1.0 - self.margin)

    def met(self, arrival: float, grace: float, input_tokens: int, first_token: float,
            finish: float, output_tokens: int) -> bool:
        """The paper's verdict (§6.1): TTFT within SLO + grace, and mean TPOT within SLO."""
        if first_token - arrival > self.ttft(input_tokens) + grace:
            return False
        if output_tokens <= 1:
            return True
        return (finish - first_token) / (output_tokens - 1) <= self.tpot_slo
