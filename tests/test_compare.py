"""The compare job (jobs/compare.py) on small committed runs written by hand in the real
layout: every expected number below is computed by hand in the comments, not by the module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from optirag import artifacts as A
from optirag import cli, storage
from optirag import comparison as C
from optirag import schema as S
from optirag.config import CompareConfig, Config, StorageConfig
from optirag.pipelines import compare

# (user, item) -> score. Users 1, 2 and 5 are scored by both sides; (3, 10) only by A;
# (3, 11) and (4, 10) only by B.
SCORES_A = {
    (1, 10): 0.9,
    (1, 11): 0.5,
    (1, 12): 0.1,
    (2, 10): 0.3,
    (2, 11): 0.6,
    (2, 12): 0.7,
    (5, 10): 0.5,
    (5, 11): 0.5,
    (3, 10): 0.4,
}
SCORES_B = {
    (1, 10): 0.8,
    (1, 11): 0.2,
    (1, 12): 0.6,
    (2, 10): 0.4,
    (2, 11): 0.5,
    (2, 12): 0.9,
    (5, 10): 0.2,
    (5, 11): 0.3,
    (3, 11): 0.7,
    (4, 10): 0.1,
}
EXITS_A = {
    (1, 10): 2,
    (1, 11): 4,
    (1, 12): 6,
    (2, 10): 6,
    (2, 11): 6,
    (2, 12): 2,
    (5, 10): 4,
    (5, 11): 4,
    (3, 10): 2,
}
EXITS_B = {
    (1, 10): 1,
    (1, 11): 2,
    (1, 12): 3,
    (2, 10): 3,
    (2, 11): 2,
    (2, 12): 1,
    (5, 10): 3,
    (5, 11): 3,
    (3, 11): 3,
    (4, 10): 3,
}
# The candidates' pass-through label column, the same on both sides.
LABELS = {
    (1, 10): 1,
    (1, 11): 0,
    (1, 12): 0,
    (2, 10): 0,
    (2, 11): 1,
    (2, 12): 1,
    (5, 10): 0,
    (5, 11): 1,
    (3, 10): 1,
    (3, 11): 0,
    (4, 10): 1,
}


def score_table(scores: dict, exits: dict, version: str, labels: dict | None = None) -> pa.Table:
    keys = list(scores)
    columns = {
        S.USER_ID: pa.array([u for u, _ in keys], pa.int64()),
        S.ITEM_ID: pa.array([i for _, i in keys], pa.int64()),
        S.SCORE: pa.array([scores[k] for k in keys], pa.float32()),
        S.EXIT_LAYER: pa.array([exits[k] for k in keys], pa.int16()),
        S.MODEL_VERSION: pa.array([version] * len(keys), pa.string()),
    }
    if labels is not None:
        columns[S.LABEL] = pa.array([labels[k] for k in keys], pa.int8())
    return pa.table(columns)


def write_run(run_root: str, table: pa.Table, store: StorageConfig, layers, wall_s: float):
    """A committed run as runs.commit leaves it: score shards, _manifest.json, _SUCCESS."""
    run = A.RunPaths(run_root)
    attempt = run.attempt(1)
    half = table.num_rows // 2  # two shards, to read more than one file
    shards = {0: table.slice(0, half), 1: table.slice(half)}
    for shard_id, rows in shards.items():
        storage.write_table(rows, attempt.scores(shard_id), store)
    version = table[S.MODEL_VERSION][0].as_py()
    exits = table[S.EXIT_LAYER].to_pylist()
    manifest = {
        "run_id": run_root.rsplit("/", 1)[-1],
        "attempt": attempt.name,
        "candidates": table.num_rows,
        "scored": table.num_rows,
        "rejected": {},
        "exit_histogram": {str(k): exits.count(k) for k in sorted(set(exits))},
        "mean_exit_layer": sum(exits) / len(exits),
        "model_version": version,
        "wall_s": wall_s,
        "pairs_per_s": table.num_rows / wall_s,
        "model_version_parts": {"exits": {"rule": "agreement", "layers": layers}},
        "files": {
            "scores": [attempt.scores(s) for s in shards],
            "rejects": [attempt.rejects(s) for s in shards],
        },
        "config": {"exits": {"layers": layers if isinstance(layers, list) else None}},
    }
    storage.write_json(manifest, attempt.manifest, store)
    storage.write_json(
        {
            "attempt": attempt.name,
            "manifest": attempt.manifest,
            "run_id": manifest["run_id"],
            "model_version": version,
        },
        run.success,
        store,
    )


@pytest.fixture
def two_runs(local_storage):
    root = local_storage.root
    a, b = f"{root}/scores/runA", f"{root}/scores/runB"
    write_run(a, score_table(SCORES_A, EXITS_A, "vA", LABELS), local_storage, [2, 4, 6], 3.0)
    # B's heads were untrained: its manifest names no exit-layer list.
    write_run(b, score_table(SCORES_B, EXITS_B, "vB", LABELS), local_storage, "3 evenly", 4.0)
    return local_storage, a, b


def config(store: StorageConfig, **compare_keys) -> Config:
    return Config(storage=store, compare=CompareConfig(**compare_keys))


def read_outputs(store: StorageConfig, folder: str) -> tuple[dict, str, Path]:
    out = Path(store.root) / "compare" / folder
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=_no_constants)
    return metrics, (out / "report.md").read_text(), out


def _no_constants(name: str):
    raise AssertionError(f"metrics.json holds {name}: not plain JSON")


def test_compare_reproduces_hand_computed_statistics(two_runs):
    store, a, b = two_runs
    summary = compare.run(config(store, a=a, b=b, top_k=1))
    m, report, out = read_outputs(store, "runA-vs-runB")
    assert summary["output"].endswith("compare/runA-vs-runB")

    assert (m["pairs"], m["only_a"], m["only_b"], m["users"]) == (8, 1, 2, 3)
    assert m["join_keys"] == [S.USER_ID, S.ITEM_ID]

    # Joined A scores: .9 .5 .1 .3 .6 .7 .5 .5 -> mean 4.1 / 8, median (.5 + .5) / 2.
    qa = m["a"]["scores"]["quantiles"]
    assert m["a"]["scores"]["mean"] == pytest.approx(4.1 / 8, abs=1e-6)
    assert (qa["0"], qa["0.5"], qa["1"]) == pytest.approx((0.1, 0.5, 0.9), abs=1e-6)
    # B: .8 .2 .6 .4 .5 .9 .2 .3 -> mean 3.9 / 8. The empirical CDFs differ most at 0.4:
    # A has 2 of 8 scores <= 0.4, B 4 of 8 -> KS statistic 2/8.
    assert m["score_shift"]["mean_diff"] == pytest.approx((3.9 - 4.1) / 8, abs=1e-6)
    assert m["score_shift"]["ks_statistic"] == pytest.approx(0.25)

    # Rank agreement. User 1: A ranks (3, 2, 1), B ranks (3, 1, 2): sum d^2 = 2, rho =
    # 1 - 6*2/(3*8) = 0.5; pairs (10,11) and (10,12) concordant, (11,12) discordant: tau
    # = 1/3. User 2: same order on both sides: rho = tau = 1. User 5: A is constant -> left
    # out. Means: 0.75 and 2/3, over 2 of the 3 users with >= 2 pairs.
    r = m["rank_agreement"]
    assert (r["users_with_2_pairs"], r["users_used"]) == (3, 2)
    assert r["spearman_mean"] == pytest.approx(0.75)
    assert r["kendall_tau_b_mean"] == pytest.approx(2 / 3)

    # Top-1: user 1 {10} vs {10}: 1; user 2 {12} vs {12}: 1; user 5 A ties .5/.5 -> item 10
    # (lower id), B {11}: 0. Mean 2/3.
    assert m["topk_overlap"]["k"] == 1 and m["topk_overlap"]["users"] == 3
    assert m["topk_overlap"]["mean"] == pytest.approx(2 / 3)

    # Exit layers on the 8 joined pairs. A: 2,4,6,6,6,2,4,4 -> mean 34/8, deepest 6 (the
    # manifest's layers). B: 1,2,3,3,2,1,3,3 -> mean 18/8, deepest 3 (the deepest exit seen).
    ea, eb = m["a"]["exits"], m["b"]["exits"]
    assert ea["histogram"] == {"2": 2, "4": 3, "6": 3}
    assert ea["mean_exit_layer"] == pytest.approx(34 / 8)
    assert ea["layer_compute"] == pytest.approx(34 / 8 / 6)
    assert eb["deepest_exit_layer"] == 3 and eb["layer_compute"] == pytest.approx(18 / 8 / 3)
    # Speed from the manifests: 9 pairs in 3 s, 10 pairs in 4 s.
    assert m["a"]["speed"]["pairs_per_s"] == pytest.approx(3.0)
    assert m["b"]["speed"]["pairs_per_s"] == pytest.approx(2.5)

    # Labels (the scores' own label column) on the 8 joined pairs: positives
    # (1,10) (2,11) (2,12) (5,11), negatives (1,11) (1,12) (2,10) (5,10).
    # A: positives .9 .6 .7 .5 vs negatives .5 .1 .3 .5: 4 + 4 + 4 + (0.5 + 1 + 1 + 0.5)
    # = 15 of 16. B: positives .8 .5 .9 .3 vs negatives .2 .6 .4 .2: 4 + 3 + 4 + 2 = 13 of 16.
    lab = m["labels"]
    assert lab["source"] == "the scores' label column" and lab["pairs"] == 8
    assert lab["a"]["auc"] == pytest.approx(15 / 16)
    assert lab["b"]["auc"] == pytest.approx(13 / 16)
    diff = lab["auc_diff_b_minus_a"]
    assert diff["diff"] == pytest.approx(-2 / 16)
    assert diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1]

    def logloss(pos, neg):
        return -(sum(math.log(p) for p in pos) + sum(math.log(1 - p) for p in neg)) / 8

    ll_a = logloss([0.9, 0.6, 0.7, 0.5], [0.5, 0.1, 0.3, 0.5])
    ll_b = logloss([0.8, 0.5, 0.9, 0.3], [0.2, 0.6, 0.4, 0.2])
    assert lab["a"]["logloss"] == pytest.approx(ll_a, abs=1e-6)
    assert lab["logloss_diff_b_minus_a"]["diff"] == pytest.approx(ll_b - ll_a, abs=1e-6)
    lo, hi = lab["logloss_diff_b_minus_a"]["ci95"]
    assert lo <= ll_b - ll_a <= hi and lo < hi
    assert sum(row["count"] for row in lab["a"]["calibration"]["bins"]) == 8

    for png in ("scores.png", "exit_layers.png", "calibration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in report
    assert "| AUC | 0.9375 | 0.8125 |" in report


def test_topk_overlap_with_k_larger_than_a_user(two_runs):
    store, a, b = two_runs
    compare.run(config(store, a=a, b=b, top_k=2, name_a="x", name_b="y"))
    m, _, _ = read_outputs(store, "x-vs-y")
    # Top-2: user 1 {10, 11} vs {10, 12}: 1/2; user 2 {12, 11} vs {12, 11}: 1; user 5 has 2
    # pairs, min(2, 2) = 2, {10, 11} on both sides: 1. Mean 2.5 / 3.
    assert m["topk_overlap"]["mean"] == pytest.approx(2.5 / 3)


def test_a_labels_table_replaces_the_scores_label_column(two_runs):
    store, a, b = two_runs
    # Other labels than the scores carry; (5, 11) has none (left out); (2, 12) twice.
    rows = [
        (1, 10, 0),
        (1, 11, 1),
        (1, 12, 0),
        (2, 10, 1),
        (2, 11, 0),
        (2, 12, 1),
        (2, 12, 1),
        (5, 10, 1),
        (9, 9, 1),
    ]
    labels = pa.table(
        {
            S.USER_ID: pa.array([r[0] for r in rows], pa.int64()),
            S.ITEM_ID: pa.array([r[1] for r in rows], pa.int64()),
            S.LABEL: pa.array([r[2] for r in rows], pa.int8()),
        }
    )
    uri = f"{store.root}/followed/labels.parquet"
    storage.write_table(labels, uri, store)
    compare.run(config(store, a=a, b=b, labels_uri=uri))
    m, _, _ = read_outputs(store, "runA-vs-runB")
    lab = m["labels"]
    assert lab["source"] == uri and lab["pairs"] == 7 and lab["repeated_label_rows"] == 1
    # A: positives (1,11) .5, (2,10) .3, (2,12) .7, (5,10) .5 vs negatives .9 .1 .6:
    # 1 + 1 + 2 + 1 = 5 of 12. B: positives .2 .4 .9 .2 vs negatives .8 .6 .5: 0+0+3+0 = 3 of 12.
    assert lab["a"]["auc"] == pytest.approx(5 / 12)
    assert lab["b"]["auc"] == pytest.approx(3 / 12)
    assert lab["auc_diff_b_minus_a"]["diff"] == pytest.approx(-2 / 12)
    # Everything that needs no label is still on all 8 joined pairs.
    assert m["pairs"] == 8 and m["rank_agreement"]["users_used"] == 2


def test_a_pair_scored_twice_fails_naming_the_side(local_storage):
    a, b = f"{local_storage.root}/scores/good", f"{local_storage.root}/scores/twice"
    write_run(a, score_table(SCORES_A, EXITS_A, "vA"), local_storage, [2, 4, 6], 1.0)
    twice = pa.concat_tables([score_table(SCORES_B, EXITS_B, "vB")] * 2)
    write_run(b, twice, local_storage, [1, 2, 3], 1.0)
    with pytest.raises(ValueError, match=r"side B \(twice\).*repeated"):
        compare.run(config(local_storage, a=a, b=b))


def test_backfill_partitions_join_on_date_and_a_model_is_chosen(local_storage):
    """Two model versions backfilled side by side, `date=.../model=.../` under one folder."""
    out = A.BackfillPaths(f"{local_storage.root}/scores")
    day1 = ({(1, 10): 0.9, (1, 11): 0.5, (1, 12): 0.1}, {(1, 10): 0.8, (1, 11): 0.2, (1, 12): 0.6})
    # Day 2 reverses A's order; B agrees with it. A also scored (1, 13) on day 2.
    day2 = (
        {(1, 10): 0.1, (1, 11): 0.5, (1, 12): 0.9, (1, 13): 0.3},
        {(1, 10): 0.2, (1, 11): 0.4, (1, 12): 0.6},
    )
    for date, (sa, sb) in (("2026-11-01", day1), ("2026-11-02", day2)):
        for version, scores in (("vA", sa), ("vB", sb)):
            exits = dict.fromkeys(scores, 3)
            write_run(
                out.run_root("date", date, version),
                score_table(scores, exits, version),
                local_storage,
                [1, 2, 3],
                1.0,
            )
    both = f"{local_storage.root}/scores"
    with pytest.raises(ValueError, match=r"side A .*model_a"):
        compare.run(config(local_storage, a=both, b=both))
    compare.run(config(local_storage, a=both, b=both, model_a="vA", model_b="vB"))
    m, _, _ = read_outputs(local_storage, "vA-vs-vB")
    assert m["join_keys"] == [S.USER_ID, S.ITEM_ID, "date"]
    assert (m["pairs"], m["only_a"], m["only_b"], m["users"]) == (6, 1, 0, 1)
    # One ranking per user and day: day 1 rho .5 / tau 1/3 (as user 1 above), day 2 rho =
    # tau = 1 (same order). Joined on (user, item) alone day 1's .9 would meet day 2's .2.
    r = m["rank_agreement"]
    assert r["users_used"] == 2
    assert r["spearman_mean"] == pytest.approx(0.75)
    assert r["kendall_tau_b_mean"] == pytest.approx(2 / 3)
    assert m["a"]["model_versions"] == ["vA"] and m["a"]["speed"]["runs"] == 2
    assert "labels" not in m

    # The same two backfills named by their manifests (`_backfills/<name>.json`).
    sides = {}
    for name, version in (("full-depth", "vA"), ("early-exit", "vB")):
        sides[name] = f"{local_storage.root}/scores/_backfills/{name}.json"
        runs = {
            d: {"run": out.run_root("date", d, version), "status": "committed"}
            for d in ("2026-11-01", "2026-11-02")
        }
        if version == "vB":  # issue 29: a failed partition was left out without a word
            failed = {"status": "failed", "error": "StorageError: bad input"}
            runs["2026-11-03"] = {"run": out.run_root("date", "2026-11-03", version), **failed}
        storage.write_json(
            {"name": name, "partition_key": "date", "partitions": runs}, sides[name], local_storage
        )
    compare.run(config(local_storage, a=sides["full-depth"], b=sides["early-exit"]))
    m2, report, _ = read_outputs(local_storage, "full-depth-vs-early-exit")
    assert m2["join_keys"] == m["join_keys"] and m2["rank_agreement"] == r
    assert (m2["pairs"], m2["only_a"], m2["only_b"]) == (6, 1, 0)
    assert m2["b"]["incomplete_partitions"] == {"2026-11-03": "failed: StorageError: bad input"}
    assert m2["a"]["incomplete_partitions"] == {}
    assert "B has 1 partitions not committed" in report and "2026-11-03 (failed" in report


def test_calibration_bins_and_expected_calibration_error():
    # Bin [0, .1): two pairs predicted .05, one positive -> observed .5; bin [.9, 1]: two
    # pairs predicted .95, both positive. ECE = (2 * .45 + 2 * .05) / 4 = .25.
    cal = C.calibration(np.array([0, 1, 1, 1]), np.array([0.05, 0.05, 0.95, 0.95]))
    first, last = cal["bins"][0], cal["bins"][-1]
    assert (first["count"], first["mean_predicted"], first["observed_rate"]) == (
        2,
        pytest.approx(0.05),
        pytest.approx(0.5),
    )
    assert (last["count"], last["observed_rate"]) == (2, 1.0)
    assert cal["bins"][4]["count"] == 0 and cal["bins"][4]["observed_rate"] is None
    assert cal["ece"] == pytest.approx(0.25)


def test_cli_compare_writes_the_comparison(two_runs, capsys):
    store, a, b = two_runs
    rc = cli.compare([f"storage.root={store.root}", f"compare.a={a}", f"compare.b={b}"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 8
    assert (Path(store.root) / "compare" / "runA-vs-runB" / "report.md").exists()
    assert cli.compare([f"storage.root={store.root}"]) == 2  # compare.a and .b are required


def test_rank_agreement_of_users_with_two_pairs():
    """Two pairs are enough for a ranking (scipy's asymptotic tau p-value divides by n - 2)."""
    from optirag.comparison import rank_agreement

    lists = np.array([1, 1, 2, 2, 2])
    a = np.array([0.1, 0.2, 0.3, 0.2, 0.1])
    b = np.array([0.2, 0.1, 0.3, 0.2, 0.1])  # user 1 reversed, user 2 in the same order
    r = rank_agreement(lists, a, b)
    assert (r["users_with_2_pairs"], r["users_used"]) == (2, 2)
    assert r["spearman_mean"] == pytest.approx(0.0)
    assert r["kendall_tau_b_mean"] == pytest.approx(0.0)
    assert rank_agreement(lists[:2], a[:2], b[:2])["kendall_tau_b_mean"] == pytest.approx(-1.0)


def test_speed_of_runs_scored_together_counts_their_overlap_once():
    from optirag.pipelines.compare import Side

    def side(*manifests):
        return Side("a", "loc", pa.table({}), list(manifests), set())

    overlapping = side(
        {"scored": 30, "wall_s": 10.0, "started_at": 100.0, "committed_at": 110.0},
        {"scored": 10, "wall_s": 8.0, "started_at": 104.0, "committed_at": 112.0},
        {"scored": 20, "wall_s": 5.0, "started_at": 120.0, "committed_at": 125.0},
    )
    assert overlapping.speed()["wall_s"] == 17.0  # [100, 112] and [120, 125]
    assert overlapping.speed()["pairs_per_s"] == pytest.approx(60 / 17)
    older = side({"scored": 30, "wall_s": 10.0}, {"scored": 10, "wall_s": 8.0})  # no spans
    assert older.speed()["wall_s"] == 18.0
