"""The simulator's event kinds, in tie-break order at equal times: a tier report informs the next
decision; work deferred behind a hand-over's catch-up starts once the hand-over is reported."""
TIER, MEMORY, STEP, HANDED, DEFERRED, CANCEL, ARRIVAL, TICK, SAMPLE = range(9)
