"""λScale's model multicast as a timing model (λPipe; `../shared/papers/lambdascale.md` §3–4).

A model is cut into `blocks` execution blocks of consecutive layers, each sent as `parts` transfer
blocks (the artifact's Llama-2 configs: 8 × 2). New nodes (receivers) get it from nodes already
serving it on GPU (sources):

- **k-way split** (§3.1): with k = min(receivers, sources), the receivers form k near-equal groups
  (⌊N/k⌋ or ⌊N/k⌋ + 1 members), group i served by source i alone. Execution blocks are dealt into
  k interleaved block groups (block b → group b mod k) and group i sends block group i first, then
  i + 1, … wrapping, so different groups receive different blocks first and the receivers together
  hold the whole model after about 1/k of the transfer.
- **Binomial pipeline** inside a group (§3.2): the source and the group's receivers form a logical
  hypercube of 2^⌊log2 n⌋ positions (surplus nodes twinned with positions 1, 2, …). At tick t every
  position sends one block across dimension t mod ⌊log2 n⌋: the source sends its t-th block (the
  last once t passes the end), any other position the highest block it or its twin holds; a block
  the receiver already has is not sent, and twins also swap one block the partner lacks. Every
  node holds everything after m + ⌊log2 n⌋ − 1 ticks for a power-of-two n (at most one tick more
  with twins), against m·⌈log2 n⌉ for a store-and-forward tree.
- **Rounds are barriers** (the artifact's controller starts tick t + 1 when all of tick t landed):
  a tick lasts one transfer block's time on a link, times the most blocks any node takes in that
  tick (a twin may take two).

`multicast` returns, per receiver, when each execution block arrived and when its copy was
complete, and when the receivers *together* first held every block: from then a cross-node
pipeline can serve while the rest arrives (§4). Pure functions of counts and seconds.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

Edge = tuple[int, int, int]     # (sending node, receiving node, block index in sending order)


def binomial_rounds(nodes: int, blocks: int) -> list[list[Edge]]:
    """Ticks of the binomial pipeline from node 0 (holding `blocks` blocks) to nodes 1..n−1."""
    if nodes < 2 or blocks < 1:
        return []
    dims = nodes.bit_length() - 1
    size = 1 << dims
    twin = {x: x + size - 1 for x in range(1, nodes - size + 1)}
    held = [set(range(blocks))] + [set() for _ in range(nodes - 1)]
    limit = blocks + dims + 2

    def members(x: int) -> tuple[int, ...]:
        return (x, twin[x]) if x in twin else (x,)

    rounds: list[list[Edge]] = []
    while any(len(h) < blocks for h in held):
        if len(rounds) == limit:
            raise RuntimeError(f"binomial pipeline of {nodes} nodes stalled")
        tick = len(rounds) + 1
        start = [frozenset(h) for h in held]
        sends: list[Edge] = []
        for x in range(size):
            if x == 0:
                block = min(tick, blocks) - 1
            else:
                have = set().union(*(start[p] for p in members(x)))
                if not have:
                    continue
                block = max(have)
            src = next(p for p in members(x) if block in start[p])
            dst = next((p for p in members(x ^ (1 << (tick % dims))) if block not in start[p]),
                       None)
            if dst is not None:
                sends.append((src, dst, block))
        for x, y in twin.items():
            for a, b in ((x, y), (y, x)):
                if start[a] - start[b]:
                    sends.append((a, b, max(start[a] - start[b])))
        edges = list({(dst, block): (src, dst, block) for src, dst, block in sends}.values())
        for _, dst, block in edges:
            held[dst].add(block)
        rounds.append(edges)
    return rounds


def group_sizes(receivers: int, k: int) -> list[int]:
    """Receivers per source: near-equal, the larger groups first."""
    q, r = divmod(receivers, k)
    return [q + 1] * r + [q] * (k - r)


def sending_order(group: int, k: int, blocks: int, parts: int) -> list[int]:
    """Transfer blocks in the order group `group` of `k` sends them (block groups rotated)."""
    order = []
    for j in range(k):
        for b in range((group + j) % k, blocks, k):
            order += [b * parts + p for p in range(parts)]
    return order


@dataclass(frozen=True)
class Multicast:
    arrivals: tuple[tuple[float, ...], ...]   # [receiver][execution block] → seconds from start
    covered: float                            # receivers together hold every block

    @property
    def complete(self) -> tuple[float, ...]:
        """Per receiver: when its own copy is whole."""
        return tuple(max(a) for a in self.arrivals)


def multicast(receivers: int, sources: int, blocks: int, parts: int,
              part_seconds: float) -> Multicast:
    """Timing of sending a model to `receivers` nodes from `sources` nodes (k-way + binomial)."""
    if receivers < 1 or sources < 1:
        raise ValueError("a multicast needs at least one receiver and one source")
    k = min(receivers, sources)
    arrivals = []
    for group, size in enumerate(group_sizes(receivers, k)):
        order = sending_order(group, k, blocks, parts)
        got = [[0.0] * (blocks * parts) for _ in range(size)]
        t = 0.0
        for edges in binomial_rounds(size + 1, len(order)):
            t += part_seconds * max(Counter(dst for _, dst, _ in edges).values(), default=0)
            for _, dst, j in edges:
                got[dst - 1][order[j]] = t
        for parts_at in got:
            arrivals.append(tuple(max(parts_at[b * parts:(b + 1) * parts])
                                  for b in range(blocks)))
    covered = max(min(a[b] for a in arrivals) for b in range(blocks))
    return Multicast(tuple(arrivals), covered)
