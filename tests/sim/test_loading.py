"""The simulated tiers: host cache, load timings, execute-while-load, and `simulate --loading`."""
import io
import json
import math

import pytest
from click.testing import CliRunner

from refengine.sim.commands import simulate
from refengine.sim.loading import (HostCache, Loader, LoadTiming, Receiver, Storage,
                                   just_in_time)
from refengine.sim.loading_report import timing_table
from refengine.sim.reproduce import marked_sections
from refengine.sim.simulator import Simulation
from scheduler import Scheduler, preset
from scheduler.codec import decode, encode
from sim_checks import needs_traces, simulate_checked, workload


def test_host_cache_is_lru_never_over_budget_and_never_evicts_a_pinned_model():
    cache = HostCache(budget=30)
    assert cache.use("a", 10) == (True, [])
    assert cache.use("b", 10) == (True, [])
    cache.release("a")                                 # a, b cached; only b pinned
    assert cache.use("c", 10) == (True, [])            # 30 of 30
    cache.release("c")
    assert cache.use("d", 10) == (True, ["a"])         # a is least recently used and unpinned
    cache.release("d")
    assert cache.use("e", 25) == (False, ["c", "d"])   # b pinned: e cannot fit, is not cached
    assert cache.holds("b") and not cache.holds("e")
    assert HostCache(None).holds("anything")           # unbounded: SLINFER's every model cached


def test_a_step_runs_each_block_as_it_lands():
    timing = LoadTiming("disk", arrivals=(1.0, 2.0, 3.0, 4.0), serve=4.0)
    assert timing.step_seconds(5.0, 0.4, 0.001) == 0.4                   # loaded: full speed
    assert timing.step_seconds(0.0, 0.4, 0.001) == pytest.approx(4.1)    # waits for block 3
    # just in time: start as late as possible without stalling, finishing when the last block
    # landed plus its share of the step
    assert just_in_time(timing.arrivals, 0.4) == pytest.approx(3.7)
    assert timing.step_seconds(3.7, 0.4, 0.001) == pytest.approx(0.4)
    assert just_in_time(timing.arrivals, 0.0) == 4.0


def test_a_cross_node_pipeline_serves_once_the_receivers_hold_every_block():
    timing = LoadTiming("peer", (1.0, 4.0), serve=2.0, pipeline_from=2.0, stages=2)
    assert timing.step_seconds(2.0, 0.2, 0.01) == pytest.approx(0.21)     # one hop
    assert timing.step_seconds(1.5, 0.2, 0.01) == pytest.approx(2.6)      # no pipeline yet


GIB = 1 << 30


def gpu(node, first_step=0.0):
    return Receiver(f"i@{node}", node, "gpu", first_step)


def test_local_loading_reads_the_fastest_tier_and_queues_per_node():
    st = Storage("local", host_cache_bytes=20 * GIB)
    loader = Loader(st, ["g0", "c0"])
    timings, tiers = loader.plan("m", 10 * GIB, [gpu("g0")], peers=["g9"], now=0.0)
    disk = 10 * GIB / st.disk_to_host                  # slower than H2D: the disk sets the pace
    assert timings["i@g0"].source == "disk" and timings["i@g0"].serve == pytest.approx(disk)
    assert tiers == [("g0", "m", "host")]              # a model read from disk stays cached
    again, _ = loader.plan("m", 10 * GIB, [Receiver("j", "g0", "gpu")], [], now=0.0)
    h2d = 10 * GIB / st.gpu_host_to_device             # queued behind the first load
    assert again["j"].source == "host" and again["j"].serve == pytest.approx(disk + h2d)
    cpu, _ = loader.plan("m", 10 * GIB, [Receiver("c", "c0", "cpu")], [], now=0.0)
    assert cpu["c"].serve == pytest.approx(disk)      # CPU: no host copy yet → disk
    cpu, _ = loader.plan("m", 10 * GIB, [Receiver("d", "c0", "cpu")], [], now=50.0)
    assert cpu["d"].serve == 50.0                      # then it is used in place


def test_multicast_loading_takes_the_model_from_peers_and_serves_early():
    st = Storage("multicast", host_cache_bytes=0)
    loader = Loader(st, ["g0", "g1", "g2"])
    one, _ = loader.plan("m", 16 * GIB, [gpu("g0", first_step=0.1)], peers=["g2"], now=0.0)
    t = one["i@g0"]
    whole = 16 * GIB / st.gpu_peer
    assert t.source == "peer" and t.full == pytest.approx(whole)
    assert t.serve == pytest.approx(whole - 0.1 * 7 / 8)   # just in time for a 0.1 s prefill
    assert t.pipeline_from is None
    two, _ = loader.plan("m", 16 * GIB, [gpu("g0"), gpu("g1")], peers=["g2"], now=10.0)
    # k = 1, a binomial pipeline of 3 nodes (g1 twins g0: a chain) over 16 parts: g0 is whole
    # after 16 ticks, g1 one tick later; together they hold every block after 16
    part = 16 * GIB / 16 / st.gpu_peer
    assert [x.full for x in two.values()] == pytest.approx([10.0 + 16 * part, 10.0 + 17 * part])
    assert all(x.pipeline_from == pytest.approx(10.0 + 16 * part) for x in two.values())
    none, _ = loader.plan("m", 16 * GIB, [gpu("g1")], peers=[], now=20.0)
    assert none["i@g1"].source == "disk"               # no peer anywhere: local fallback


def test_bandwidths_told_to_the_scheduler():
    st = Storage("multicast")
    assert st.bandwidths("cpu").host_to_device == math.inf
    assert st.bandwidths("gpu").peer_to_device == st.gpu_peer
    assert Storage("local").bandwidths("gpu").peer_to_device is None


# -- the simulator with tiers ---------------------------------------------------------------------

def scale_out_burst():
    """m0 warms one GPU from disk, then a burst outgrows sllm's 32-request limit: a second
    instance, which multicast loading takes from the first GPU."""
    return workload([(0, 0.0, 500, 200)] + [(0, 4.0 + 0.01 * k, 500, 200) for k in range(40)],
                    n_models=1)


@pytest.mark.parametrize("loading, sources, second_startup", [
    ("local", {"disk": 2}, (2.5, 3.5)),                  # 12.6 GiB at 4.6 GB/s
    ("multicast", {"disk": 1, "peer": 1}, (0.3, 0.6)),   # at 30 GB/s, just in time
])
def test_a_scale_out_with_tiers(loading, sources, second_startup):
    checker = simulate_checked(scale_out_burst(), "sllm", "7b", cpus=0, gpus=2,
                               storage=Storage(loading, host_cache_bytes=0))
    rec = checker.sim.rec
    assert rec.load_sources == sources
    low, high = second_startup
    assert low < rec.startups[1] < high


def test_tier_reports_and_bandwidths_reach_the_scheduler_and_replay():
    log = io.StringIO()
    sim = Simulation(scale_out_burst(), preset("slinfer"), size="7b", cpus=1, gpus=1,
                     storage=Storage("local", host_cache_bytes=16 * GIB), log=log)
    sim.run()
    assert all(node.spec.bandwidths is not None for node in sim.scheduler.nodes.values())
    lines = [json.loads(x) for x in log.getvalue().splitlines()]
    assert any(rec["event"]["type"] == "ModelTierChanged" for rec in lines)
    fresh = Scheduler(sim.models.values(), sim.node_specs.values(), sim.cost, preset("slinfer"))
    for rec in lines:
        actions = fresh.handle(decode(rec["event"]), rec["t"])
        assert [encode(a) for a in actions] == rec["actions"]


@needs_traces                   # the Pareto workload draws its lengths from the conversation trace
def test_simulate_compares_loading_styles_quickly(tmp_path):
    result = CliRunner().invoke(simulate, [
        "--workload", "pareto", "--rps", "2", "--models", "4", "--duration", "30", "--cpus", "1",
        "--gpus", "2", "--systems", "slinfer", "--loading", "local,multicast", "--host-cache",
        "16", "--jobs", "1", "--no-plots", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "loading=local host-cache=16GiB" in result.output
    assert "loading=multicast host-cache=16GiB" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["spec"]["loading"] for m in metrics] == ["local", "multicast"]
    assert all(m["summary"]["startups"] > 0 for m in metrics)


def test_simulate_rejects_an_unknown_loading(tmp_path):
    # (a generated workload: the check must not need ../shared/traces)
    result = CliRunner().invoke(simulate, ["--loading", "rdma", "--workload", "pareto", "--no-plots"])
    assert result.exit_code != 0 and "unknown loading" in result.output


def test_the_timing_table_and_the_kept_section():
    table = timing_table().splitlines()
    assert table[2] == "| 1 | 2.94 | 1.00 | 0.45 / 0.45 | – | – |"     # 12.6 GiB: λScale's 0.45 s
    doc = "# grid\n\nold numbers\n\n<!-- begin:loading -->\n## x\nrows\n<!-- end:loading -->\n"
    assert marked_sections(doc) == "\n<!-- begin:loading -->\n## x\nrows\n<!-- end:loading -->\n"
    assert marked_sections("# grid only\n") == ""


def test_a_perturbation_that_moved_nothing_is_not_quoted_as_a_yardstick():
    from refengine.sim.loading_report import _yardstick
    assert _yardstick(23).endswith("moves that count by 23")
    assert "gives no yardstick" in _yardstick(0)
