"""Issue 30's scale figures in one file, bench/results/stream_scale.json, from bench/stream.py's
results along each axis (each run from a worktree of a fixed commit, hours apart):

    python bench/stream_summary.py --users stream_scale_users --pairs stream_scale_pairs \
        --items stream_scale_items

Each field is a number, or a dict of numbers per axis where the goal holds on every axis;
`goals` says what each must be, `met` whether it is, and `sources` which runs (file, command,
sizes) each axis comes from. A missing axis file is named in `missing` and its fields left out
(not met). `--scores NAME` takes the score comparison with the data flow before issue 30
(`max_abs_score_diff_vs_before`, bench/stream.py --compare-scores) from another users-axis
run when the users axis's own did not make one (its source is named under `sources`).
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

# field: (the axes it is read from, comparison, bound); one axis gives a number, several a dict
GOALS = {
    "driver_peak_private_ratio_users": (["users"], "<=", 1.10),
    "driver_peak_private_gib": (["users", "pairs", "items"], "<", 1.0),
    "largest_worker_peak_private_ratio_users": (["users"], "<=", 1.10),
    "build_s_per_user_ratio_users": (["users"], "<=", 1.15),
    "objects_written_over_bound": (["users", "pairs"], "<=", 1.0),
    "driver_storage_calls_ratio_users": (["users"], "<=", 1.05),
    "driver_shared_ratio_users": (["users"], "<=", 1.10),
    "object_store_peak_ratio_users": (["users"], "<=", 1.10),
    "driver_peak_private_ratio_items": (["items"], "<=", 1.10),
    "max_abs_score_diff_vs_before": (["users"], "<=", 1e-6),
}
REPORTED = {"worker_bytes_per_item": "items"}  # no bound: the largest process's growth per item
COMPARE = {"<=": operator.le, "<": operator.lt}


def summarize(axes: dict[str, dict]) -> dict:
    """The summary of the axes' results (axis -> bench/stream.py's result)."""
    out: dict = {"goals": {}, "met": {}}
    for field, (wanted, op, bound) in GOALS.items():
        out["goals"][field] = f"{op} {bound}" + (" on each axis" if len(wanted) > 1 else "")
        values = {a: axes[a][field] for a in wanted if a in axes and field in axes[a]}
        if len(values) < len(wanted):
            out["met"][field] = False
            if values:
                out[field] = values
            continue
        out[field] = values if len(wanted) > 1 else values[wanted[0]]
        out["met"][field] = all(COMPARE[op](v, bound) for v in values.values())
    for field, axis in REPORTED.items():
        if field in axes.get(axis, {}):
            out[field] = axes[axis][field]
    out["all_met"] = all(out["met"].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for axis in ("users", "pairs", "items"):
        parser.add_argument(f"--{axis}", help=f"the {axis} axis's results name (bench/results/)")
    parser.add_argument("--scores", help="a users-axis results name with the score comparison")
    parser.add_argument("--name", default="stream_scale")
    args = parser.parse_args()
    axes, sources, missing = {}, {}, []
    for axis in ("users", "pairs", "items"):
        name = getattr(args, axis)
        path = RESULTS / f"{name}.json"
        if not name or not path.exists():
            missing.append(axis)
            continue
        result = json.loads(path.read_text())
        if result["axis"] != axis:
            parser.error(f"{path}: a run along {result['axis']}, not {axis}")
        axes[axis] = result
        sizes = [r[axis] for r in result["runs"]]
        sources[axis] = {"file": path.name, "command": result["command"], "sizes": sizes}
    field = "max_abs_score_diff_vs_before"
    if args.scores and "users" in axes and field not in axes["users"]:
        scored = json.loads((RESULTS / f"{args.scores}.json").read_text())
        if scored["axis"] != "users" or field not in scored:
            parser.error(f"{args.scores}: no users-axis score comparison")
        axes["users"] = {**axes["users"], field: scored[field]}
        sources["scores"] = {"file": f"{args.scores}.json", "command": scored["command"]}
    summary = {
        **summarize(axes),
        "sources": sources,
        "missing": missing,
        "command": " ".join(["python", "bench/stream_summary.py", *sys.argv[1:]]),
    }
    rows = [
        (field, summary.get(field, "-"), goal, summary["met"][field])
        for field, goal in summary["goals"].items()
    ]
    write_results(args.name, summary, rows, ("figure", "value", "goal", "met"))


if __name__ == "__main__":
    main()
