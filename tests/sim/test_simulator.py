"""End-to-end: short replays of the paper's trace, JSON-lines replay, and the `simulate` command."""
import io
import json
import re

import pytest
from click.testing import CliRunner

from refengine.sim.commands import simulate
from refengine.sim.experiment import RunSpec, run
from refengine.sim.simulator import Simulation
from refengine.sim.workload import Workload, slinfer_trace
from scheduler import Scheduler, preset
from scheduler.codec import decode, encode
from sim_checks import needs_traces, simulate_checked

pytestmark = needs_traces


def first_seconds(n_models: int, seconds: float) -> Workload:
    w = slinfer_trace(n_models)
    return Workload(w.name, w.models, tuple(r for r in w.requests if r.arrival < seconds), seconds)


@pytest.mark.parametrize("system", ["slinfer", "sllm", "sllm+c", "sllm+c+s"])
def test_short_replay_keeps_every_invariant(system):
    simulate_checked(first_seconds(32, 90.0), system, "7b", cpus=4, gpus=4)


def test_slinfer_beats_exclusive_gpus_on_the_same_minute():
    specs = [RunSpec(s, "7b", 64, duration=120.0) for s in ("slinfer", "sllm")]
    ours, sllm = (run(s)["summary"] for s in specs)
    assert ours["slo_met"] > sllm["slo_met"]
    assert ours["gpu_nodes_used"] < sllm["gpu_nodes_used"]


def test_a_logged_run_replays_to_the_same_actions():
    log = io.StringIO()
    w = first_seconds(16, 40.0)
    sim = Simulation(w, preset("slinfer"), size="3b", log=log)
    sim.run()
    fresh = Scheduler(sim.models.values(), sim.node_specs.values(), sim.cost, preset("slinfer"))
    lines = log.getvalue().splitlines()
    assert len(lines) > 100
    for line in lines:
        record = json.loads(line)
        actions = fresh.handle(decode(record["event"]), record["t"])
        assert [encode(a) for a in actions] == record["actions"]


def test_simulate_command(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(simulate, ["--models", "16", "--duration", "60", "--systems",
                                           "slinfer,sllm", "--jobs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "slinfer 16x7b" in result.output and "SLO-met" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["spec"]["system"] for m in metrics] == ["slinfer", "sllm"]
    assert {p.name for p in out.iterdir()} >= {"ttft_cdf.png", "nodes_used.png", "slo_met.png"}


def test_simulate_with_overrides(tmp_path):
    result = CliRunner().invoke(simulate, [
        "--models", "16", "--duration", "30", "--systems", "slinfer", "--shadow", "full",
        "--watermark", "0.5", "--keep-alive", "2", "--migration", "--migration-rounds", "2",
        "--no-plots", "--out", str(tmp_path),
        "--log", str(tmp_path / "run.jsonl")])
    assert result.exit_code == 0, result.output
    assert ("slinfer 16x7b 4C+4G watermark=0.5 keep_alive=2 shadow=full migration=True "
            "migration_rounds=2") in result.output
    assert (tmp_path / "run.jsonl").read_text().count("\n") > 50


def test_simulate_with_clients_leaving(tmp_path):
    """Half the clients leave early, the same ones for every system (the seed's own stream); the
    SLO rate is of those that stayed."""
    result = CliRunner().invoke(simulate, [
        "--models", "16", "--duration", "60", "--systems", "slinfer,sllm", "--leave-rate", "0.5",
        "--jobs", "1", "--no-plots", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "slinfer 16x7b 4C+4G leave-rate=0.5" in result.output
    runs = [m["summary"] for m in json.loads((tmp_path / "metrics.json").read_text())]
    for s in runs:
        assert 0.3 * s["requests"] < s["cancelled"] < 0.6 * s["requests"]
        assert s["slo_met_rate"] == pytest.approx(s["slo_met"] / (s["requests"] - s["cancelled"]))
    spec = RunSpec(models=16, duration=60.0, leave_rate=0.5)
    assert spec.cancellations(spec.build_workload()) == spec.cancellations(spec.build_workload())


@pytest.mark.parametrize("args, message", [
    (["--trace", "/nonexistent.json"], "does not exist"),
    (["--models", "30"], "16..128"),
    (["--systems", "vllm"], "unknown system"),
    (["--log", "x.jsonl"], "exactly one system"),
    (["--cpus", "0", "--gpus", "0"], "at least one node"),
    (["--workload", "pareto", "--models", "0"], "'--models': 0 is not in the range x>=1"),
    (["--workload", "pareto", "--rps", "0"], "'--rps': 0.0 is not in the range x>0"),
    (["--duration", "-5"], "'--duration'"),
    (["--keep-alive", "-1"], "'--keep-alive'"),
    (["--watermark", "-0.1"], "'--watermark'"),
    (["--migration-rounds", "3"], "--migration-rounds needs --migration"),
    (["--migration", "--migration-rounds", "0"], "'--migration-rounds': 0 is not in the range"),
    (["--leave-rate", "1.5"], "'--leave-rate': 1.5 is not in the range 0<=x<=1"),
])
def test_simulate_rejects_bad_input_clearly(args, message):
    result = CliRunner().invoke(simulate, args + ["--no-plots"])
    assert result.exit_code != 0
    assert message in result.output


@pytest.mark.parametrize("text, message", [
    ("not json", "is not JSON"),
    ('{"minutes": 30}', "is not a SLINFER workload .* KeyError: 'functions'"),
    ('{"functions": [{"arrival_s": [1, 2], "input_tokens": [3], "output_tokens": [4]}]}',
     "is not a SLINFER workload .*ValueError: zip\\(\\) argument 2 is shorter"),
    ('{"functions": [{"arrival_s": ["soon"], "input_tokens": [3], "output_tokens": [4]}]}',
     "is not a SLINFER workload .*ValueError: could not convert string to float: 'soon'"),
])
def test_a_damaged_trace_is_one_line_naming_it_before_any_run(tmp_path, text, message):
    trace = tmp_path / "trace.json"
    trace.write_text(text)
    result = CliRunner().invoke(simulate, ["--trace", str(trace), "--models", "16", "--no-plots",
                                           "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "simulating" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(f"Error: trace {re.escape(str(trace))} {message}", lines[0])
