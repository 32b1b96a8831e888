"""bench/stream_summary.py: issue 30's figures from the axes' results, each against its goal."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from stream_summary import GOALS, summarize  # noqa: E402


def axes(**changed) -> dict[str, dict]:
    """Axes whose every figure meets its goal, but for `changed` (field: {axis: value})."""
    out: dict[str, dict] = {"users": {}, "pairs": {}, "items": {}}
    for field, (wanted, _, bound) in GOALS.items():
        for axis in wanted:
            out[axis][field] = bound / 2
    for field, values in changed.items():
        for axis, value in values.items():
            out[axis][field] = value
    return out


def test_every_figure_is_held_to_its_goal():
    assert summarize(axes())["all_met"]
    at_bound = summarize(axes(build_s_per_user_ratio_users={"users": 1.15}))
    assert at_bound["met"]["build_s_per_user_ratio_users"] and at_bound["all_met"]
    over = summarize(axes(objects_written_over_bound={"pairs": 1.01}))
    assert over["objects_written_over_bound"] == {"users": 0.5, "pairs": 1.01}
    assert not over["met"]["objects_written_over_bound"] and not over["all_met"]
    strict = summarize(axes(driver_peak_private_gib={"items": 1.0}))  # < 1.0, not <=
    assert not strict["met"]["driver_peak_private_gib"]


def test_a_missing_axis_is_not_met():
    partial = axes()
    del partial["pairs"]
    summary = summarize(partial)
    assert not summary["met"]["objects_written_over_bound"]
    assert summary["objects_written_over_bound"] == {"users": 0.5}
    assert summary["met"]["object_store_peak_ratio_users"] and not summary["all_met"]
