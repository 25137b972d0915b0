"""The simulator's half of live migration (ServerlessLLM §4), as the live runtime carries it out:
a move copies the tokens the client has to a rebuild on the destination, which takes the source's
newer tokens before each of its prefills (multi-round migration); at the hand-over the destination
prefills what the source made since, on its node's compute, and that pass makes the request's next
token (`HandedOver`). A mixin of `Simulation`, whose state it shares: the instances, each node's
`_free_at`, the hand-overs `_arriving` behind a catch-up, the steps in flight (`_stepping`).
"""
from __future__ import annotations

from functools import partial

from refengine.sim.engine import Sequence, SimInstance
from refengine.sim.event_kinds import HANDED
from scheduler import HandedOver, HandOver, Migrate


class MigrationExecutor:
    def _migrate(self, action: Migrate) -> None:
        source = self._instances[action.source]
        seq = source.decoding(action.request_id)
        self._instances[action.destination].add(Sequence(
            seq.request_id, seq.input_tokens, self._delivered(source, seq), seq.output_tokens,
            source=action.source))

    def _start_hand_over(self, action: HandOver) -> None:
        """At once, or, if the request is still catching up from its last hand-over, once that
        catch-up has ended."""
        source = self._instances[action.source]
        if action.request_id in source.handing:
            self._arriving[action.destination] += 1
            self._deferred(source.node, partial(self._hand_over, action))
        else:
            self._hand_over(action)

    def _on_handed(self, payload) -> None:
        inst, request_id, fed, elapsed = payload
        made = bool(fed) and request_id in inst.handing     # (not if its client left meanwhile)
        finished = ()
        if made:
            finished = inst.caught_up(request_id)
            self.rec.decode_tokens[self.node_specs[inst.node].kind] += 1
            self._count_streamed((request_id,))
        self._finished(finished)
        self._handle(HandedOver(inst.instance_id, request_id, made, bool(finished), inst.kv_used,
                                elapsed))

    def _hand_over(self, action: HandOver) -> None:
        """The destination catches up behind its node's running step and makes the request's next
        token from that pass (`HANDED`); none to catch up, the request decodes on at once. (A
        request moved on while its last hand-over catches up leaves once that ends, with its
        token, as the live runtime's device thread exports it after the catch-up.)"""
        if self._arriving[action.destination]:
            self._arriving[action.destination] -= 1
        seq = self._instances[action.source].remove(action.request_id)
        dest = self._instances[action.destination]
        if seq is None:                             # its client left during the catch-up: the
            dest.remove(action.request_id)          # destination drops the rebuild
            return
        fed = dest.take_over(seq)
        self.rec.migrations += 1
        start = max(self.now, self._free_at[dest.node])
        elapsed = self._computes(dest, start, dest.table.prefill(fed)) if fed else 0.0
        self.rec.handover_pauses.append(start + elapsed - self.now)
        self._push(start + elapsed, HANDED, (dest, action.request_id, fed, elapsed))

    def _delivered(self, inst: SimInstance, seq: Sequence) -> int:
        """The tokens of `seq` the scheduler has heard of: a step in flight on `inst` already
        advanced it (its state moves when the step begins), and the live runtime sends a
        migration only the tokens its client has."""
        return seq.generated - (seq.request_id in self._stepping.get(inst.instance_id, ()))

    def _send_new_tokens(self, dest: SimInstance) -> None:
        """Before a prefill of `dest`, each rebuild there takes the tokens its source made since
        its last round (ServerlessLLM's multi-round migration), as the live runtime sends them."""
        for copy in list(dest.rebuilt.values()):
            source = self._instances.get(copy.source)
            seq = source and (source.running.get(copy.request_id)
                              or source.handing.get(copy.request_id))
            if seq is not None and (delivered := self._delivered(source, seq)) > copy.generated:
                dest.extend(copy.request_id, delivered)

