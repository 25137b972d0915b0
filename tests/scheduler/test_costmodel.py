import json

import pytest

from scheduler.costmodel import CostModel, interpolate, load_table


def test_interpolation_clamps_below_and_scales_above():
    xs, ys = [1, 128, 256], [10.0, 20.0, 40.0]
    assert interpolate(xs, ys, 0.5) == 10.0                   # clamp to the first sample
    assert interpolate(xs, ys, 192) == pytest.approx(30.0)    # linear inside
    assert interpolate(xs, ys, 512) == pytest.approx(80.0)    # y_last · x / x_last


def test_shipped_artifact_tables():
    cost = CostModel.shipped()
    for profile in ("llama-3.2-3b", "llama-2-7b", "llama-2-13b", "llama-3.1-8b"):
        for hw in ("xeon-6462c", "a100-80gb"):
            assert (profile, hw) in cost
    cpu7 = cost.table("llama-2-7b", "xeon-6462c")
    assert cpu7.prefill(1024) == pytest.approx(0.567)        # Table I: 567 ms TTFT at 1K
    assert cpu7.decode(1, 1024) == pytest.approx(0.071)      # 71 ms TPOT bs1-1K
    assert cpu7.decode(32, 3950) == pytest.approx(0.459)     # bs32 near 4K
    # between rows: batch first inside each row, then across context
    mid = cpu7.decode(4, 768)
    assert mid == pytest.approx((0.077 + 0.081) / 2)
    gpu7 = cost.table("llama-2-7b", "a100-80gb")
    assert gpu7.decode(48, 3950) == pytest.approx(0.049 * 48 / 24)  # proportional beyond batch 24


def test_json_round_trip_and_errors(tmp_path):
    table = CostModel.shipped().table("llama-2-13b", "a100-80gb")
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table.to_dict()))
    again = load_table(path)
    assert again.prefill(700) == pytest.approx(table.prefill(700))
    assert again.decode(10, 1500) == pytest.approx(table.decode(10, 1500))
    bad = table.to_dict() | {"format": "other"}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format"):
        load_table(path)
    unsorted = table.to_dict()
    unsorted["prefill"]["tokens"] = [4, 2, 1, 8, 16, 32, 64]
    path.write_text(json.dumps(unsorted))
    with pytest.raises(ValueError, match="ascending"):
        load_table(path)
    with pytest.raises(KeyError, match="no latency table"):
        CostModel([table]).table("llama-2-7b", "a100-80gb")
