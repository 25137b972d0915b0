"""λScale's multicast timing model against hand-computed small cases."""
import pytest

from refengine.sim.multicast import (binomial_rounds, group_sizes, multicast, sending_order)


def test_one_receiver_gets_one_block_per_round_in_order():
    # n = 2: the source sends block t at tick t; nothing else moves
    assert binomial_rounds(2, 3) == [[(0, 1, 0)], [(0, 1, 1)], [(0, 1, 2)]]


def test_four_nodes_two_blocks_is_the_hand_drawn_hypercube():
    # tick 1 (dimension 1): 0 → 2 block 0; tick 2 (dimension 0): 0 → 1 block 1, 2 → 3 block 0;
    # tick 3 (dimension 1): 0 → 2 block 1, 1 → 3 block 1, 3 → 1 block 0 — m + log2 n − 1 ticks
    assert [sorted(r) for r in binomial_rounds(4, 2)] == [
        [(0, 2, 0)], [(0, 1, 1), (2, 3, 0)], [(0, 2, 1), (1, 3, 1), (3, 1, 0)]]


def test_a_surplus_node_twins_with_position_one():
    # n = 3: hypercube of 2, node 2 twins node 1; node 1 passes blocks on to its twin
    rounds = binomial_rounds(3, 2)
    assert rounds[0] == [(0, 1, 0)]
    assert sorted(rounds[1]) == [(0, 1, 1), (1, 2, 0)]
    assert [dst for _, dst, _ in rounds[2]] == [2]


@pytest.mark.parametrize("nodes", range(2, 18))
@pytest.mark.parametrize("blocks", [1, 2, 5, 16])
def test_everyone_has_everything_within_m_plus_log_n_rounds(nodes, blocks):
    rounds = binomial_rounds(nodes, blocks)
    log_n = nodes.bit_length() - 1
    power_of_two = nodes & (nodes - 1) == 0
    held = [set(range(blocks))] + [set() for _ in range(nodes - 1)]
    for edges in rounds:
        if power_of_two:                                   # one send per node per tick
            assert len({src for src, _, _ in edges}) == len(edges)
        for src, dst, block in edges:                      # only held blocks, only new ones
            assert block in held[src] and block not in held[dst]
        for _, dst, block in edges:
            held[dst].add(block)
    assert all(len(h) == blocks for h in held)
    if power_of_two:
        assert len(rounds) == blocks + log_n - 1
    else:                                                  # twins may cost one tick more
        assert len(rounds) <= blocks + log_n


def test_k_way_split_and_rotated_block_groups():
    assert group_sizes(5, 2) == [3, 2]
    assert group_sizes(4, 4) == [1, 1, 1, 1]
    # 4 execution blocks × 2 parts, k = 2: group 0 sends blocks 0, 2 then 1, 3; group 1 the reverse
    assert sending_order(0, 2, 4, 2) == [0, 1, 4, 5, 2, 3, 6, 7]
    assert sending_order(1, 2, 4, 2) == [2, 3, 6, 7, 0, 1, 4, 5]
    assert sending_order(0, 1, 3, 1) == [0, 1, 2]


def test_k1_one_receiver_is_a_unicast():
    # 2 blocks × 2 parts at 1 s a part: block 0 lands after 2 s, the copy is whole after 4 s
    mc = multicast(receivers=1, sources=1, blocks=2, parts=2, part_seconds=1.0)
    assert mc.arrivals == ((2.0, 4.0),)
    assert mc.complete == (4.0,) and mc.covered == 4.0


def test_k1_three_receivers_follow_the_binomial_rounds():
    # the 4-node hypercube above: node 1 gets block 1 at tick 2, block 0 at 3; node 2 block 0 at
    # 1, block 1 at 3; node 3 block 0 at 2, block 1 at 3; together they hold both after tick 2
    mc = multicast(receivers=3, sources=1, blocks=2, parts=1, part_seconds=0.5)
    assert mc.arrivals == ((1.5, 1.0), (0.5, 1.5), (1.0, 1.5))
    assert mc.covered == 1.0


def test_k2_receivers_start_from_different_halves():
    mc = multicast(receivers=2, sources=2, blocks=2, parts=1, part_seconds=1.0)
    assert mc.arrivals == ((1.0, 2.0), (2.0, 1.0))
    assert mc.covered == 1.0                       # a pipeline after half the transfer


def test_k4_covers_the_model_after_a_quarter():
    mc = multicast(receivers=4, sources=4, blocks=4, parts=1, part_seconds=1.0)
    assert [a.index(1.0) for a in mc.arrivals] == [0, 1, 2, 3]
    assert mc.complete == (4.0,) * 4 and mc.covered == 1.0


def test_sources_beyond_receivers_are_idle():
    assert multicast(2, 8, 2, 1, 1.0) == multicast(2, 2, 2, 1, 1.0)
    with pytest.raises(ValueError):
        multicast(0, 1, 2, 1, 1.0)
