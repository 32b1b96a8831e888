"""The compare job: two scoring runs or backfills (A vs B) on the pairs both scored.

Each side is every committed run at or under its location (a run folder, a backfill's output,
a whole scores location) or listed by a backfill's manifest, optionally only the rows of one
model version (two variants backfilled side by side share one folder). The sides are joined
on (user, item) and every Hive partition column both have (`date`, ...; never the model
folder), and the statistics of optirag.comparison are written with plots and a report to
`compare/<a>-vs-<b>/` (optirag.artifacts.ComparePaths). Labels come from `compare.labels_uri`
when given, else from the scores' own label column when they carry one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from optirag import artifacts as A
from optirag import comparison as C
from optirag import schema as S
from optirag import storage
from optirag.config import CompareConfig, Config, ConfigError, StorageConfig

log = logging.getLogger(__name__)

LABELS = pa.schema(
    [
        S.INTERACTIONS.field(S.USER_ID),
        S.INTERACTIONS.field(S.ITEM_ID),
        S.INTERACTIONS.field(S.LABEL),
    ]
)
PLOT_SCORES, PLOT_EXITS, PLOT_CALIBRATION = "scores", "exit_layers", "calibration"


@dataclass
class Side:
    """One side's score rows, the manifests of its committed runs and its Hive columns."""

    name: str
    location: str
    table: pa.Table
    manifests: list[dict]
    partitions: set[str]
    incomplete: dict[str, str] = field(default_factory=dict)  # a manifest's uncommitted partitions

    def deepest_layer(self, exits: np.ndarray) -> int:
        """The deepest exit layer of the side's model (the exit layers its manifests list),
        else the deepest one its pairs exited at."""
        layers = []
        for manifest in self.manifests:
            found = manifest.get("model_version_parts", {}).get("exits", {}).get("layers")
            if isinstance(found, list):
                layers += found
        return int(max(layers)) if layers else int(exits.max())

    def speed(self) -> dict:
        """Pairs over the time the side's runs took: the union of their [started_at,
        committed_at] spans (a backfill's partitions are scored together and overlap), or
        the sum of wall_s for manifests without the spans."""
        scored = sum(m.get("scored") or 0 for m in self.manifests)
        spans = [(m.get("started_at"), m.get("committed_at")) for m in self.manifests]
        if all(a is not None and b is not None for a, b in spans):
            wall = _union_length(spans)
        else:
            wall = sum(m.get("wall_s") or 0.0 for m in self.manifests)
        return {
            "runs": len(self.manifests),
            "scored": scored,
            "wall_s": round(wall, 2),
            "pairs_per_s": scored / wall if wall else None,
        }


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def read_side(location: str, model: str | None, name: str, store: StorageConfig) -> Side:
    """The score rows of every committed run at or under `location` (only those of model
    version `model` when given), with their runs' manifests."""
    runs = [
        (values, A.read_manifest(attempt, store))
        for values, attempt in A.committed_runs(location, store)
    ]
    if not runs:
        raise storage.StorageError(f"{location}: no committed scoring run (no _SUCCESS)")
    chosen = [(v, m) for v, m in runs if model is None or m.get("model_version") == model]
    if not chosen:
        found = sorted({str(m.get("model_version")) for _, m in runs})
        raise ValueError(
            f"{location}: no run of model version {model!r} (found: {', '.join(found)})"
        )
    table = A.read_run_scores(chosen, store)  # the chosen runs' files only
    S.check_columns(table.schema, S.SCORE_COLUMNS, source=location)
    if model is not None:
        table = table.filter(pc.equal(table[S.MODEL_VERSION], model))
    log.info(
        "side %s: %d score rows from %d runs under %s", name, table.num_rows, len(chosen), location
    )
    partitions = {key for values, _ in chosen for key in values}
    return Side(
        name,
        location,
        table,
        [m for _, m in chosen],
        partitions,
        incomplete_partitions(location, name, store),
    )


def incomplete_partitions(location: str, name: str, store: StorageConfig) -> dict[str, str]:
    """{value: status (and error)} of a backfill manifest's partitions that hold no committed
    run (failed, not run, pending): compared without them, so said aloud."""
    if not A.is_backfill_manifest(location):
        return {}
    entries = storage.read_json(location, store).get("partitions", {})
    out = {
        v: e.get("status", "?") + (f": {e['error']}" if e.get("error") else "")
        for v, e in entries.items()
        if e.get("status") not in ("committed", "skipped")
    }
    if out:
        log.warning(
            "side %s (%s): %d partitions are not committed and not compared: %s",
            name,
            location,
            len(out),
            ", ".join(sorted(out)),
        )
    return out


def side_names(cc: CompareConfig) -> tuple[str, str]:
    def default(location: str, model: str | None) -> str:
        return model or A.side_name(location)

    return cc.name_a or default(cc.a, cc.model_a), cc.name_b or default(cc.b, cc.model_b)


def read_labels(
    cc: CompareConfig, sides: tuple[Side, Side], keys: list[str], store: StorageConfig
) -> tuple[pd.DataFrame | None, str | None]:
    """(labels frame, where the labels came from), or (None, None) when there are none."""
    if cc.labels_uri:
        table = storage.read_table(cc.labels_uri, store, LABELS)
        columns = [k for k in keys if k in table.column_names] + [S.LABEL]
        return table.select(columns).to_pandas(), cc.labels_uri
    carrying = [s for s in sides if S.LABEL in s.table.column_names]
    if not carrying:
        return None, None
    frames = [s.table.select([*keys, S.LABEL]).to_pandas() for s in carrying]
    if len(frames) == 2:
        both = frames[0].merge(frames[1], on=keys, suffixes=("", "_b"))
        other = both[C.column(S.LABEL, "b")]
        differ = both[S.LABEL].ne(other) & both[S.LABEL].notna() & other.notna()
        if differ.any():
            raise ValueError(
                f"A and B carry different labels for {int(differ.sum())} pairs; "
                "give compare.labels_uri"
            )
    return pd.concat(frames, ignore_index=True).drop_duplicates(), "the scores' label column"


def run(cfg: Config) -> dict:
    """Compare; writes the comparison's report, metrics and plots and returns a summary."""
    cc, store = cfg.compare, cfg.storage
    if not (cc.a and cc.b):
        raise ConfigError("compare.a and compare.b are required (run folders or backfills)")
    names = side_names(cc)
    sides = (
        read_side(cc.a, cc.model_a, names[0], store),
        read_side(cc.b, cc.model_b, names[1], store),
    )
    shared = (sides[0].partitions & sides[1].partitions) - {A.MODEL_PARTITION_KEY}
    keys = [S.USER_ID, S.ITEM_ID, *sorted(shared)]
    paired = C.pair_up(sides[0].table, sides[1].table, keys, names)
    if not len(paired.frame):
        raise ValueError(f"A ({cc.a}) and B ({cc.b}) have no pair in common on {keys}")
    deepest = tuple(
        s.deepest_layer(paired.exits(side)) for s, side in zip(sides, C.SIDES, strict=True)
    )
    metrics = C.compare(paired, deepest, cc.top_k)
    for side, s in zip(C.SIDES, sides, strict=True):
        metrics[side].update(
            name=s.name,
            location=s.location,
            speed=s.speed(),
            incomplete_partitions=s.incomplete,
            model_versions=sorted({str(m.get("model_version")) for m in s.manifests}),
        )
    labels, label_source = read_labels(cc, sides, keys, store)
    if labels is not None:
        labelled, repeated = C.attach_labels(paired, labels)
        metrics["labels"] = C.label_metrics(labelled, cc.bootstrap_resamples, cc.seed)
        metrics["labels"].update(source=label_source, repeated_label_rows=repeated)
        if not len(labelled.frame):
            log.warning("no joined pair has a label in %s: no label metrics", label_source)
    metrics = C.plain(metrics)

    paths = A.ComparePaths.of(A.compare_location(cfg), *names)
    plots = {
        PLOT_SCORES: C.plot_scores(paired.scores("a"), paired.scores("b"), names),
        PLOT_EXITS: C.plot_exits(paired.exits("a"), paired.exits("b"), names),
    }
    if "labels" in metrics and "a" in metrics["labels"]:
        curves = (metrics["labels"]["a"]["calibration"], metrics["labels"]["b"]["calibration"])
        plots[PLOT_CALIBRATION] = C.plot_calibration(curves, names)
    report = render_report(metrics, {k: paths.plot_name(k) for k in plots})
    A.save_comparison(paths, metrics, report, plots, store)
    log.info("comparison written to %s", paths.root)
    summary = {
        "output": paths.root,
        "pairs": metrics["pairs"],
        "only_a": metrics["only_a"],
        "only_b": metrics["only_b"],
        "spearman_mean": metrics["rank_agreement"]["spearman_mean"],
        "topk_overlap": metrics["topk_overlap"]["mean"],
    }
    if "labels" in metrics and "auc_diff_b_minus_a" in metrics["labels"]:
        summary["auc_diff_b_minus_a"] = metrics["labels"]["auc_diff_b_minus_a"]
    return summary


def _num(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _incomplete_lines(a: dict, b: dict) -> list[str]:
    lines = []
    for label, side in (("A", a), ("B", b)):
        if missing := side.get("incomplete_partitions"):
            shown = "; ".join(f"{v} ({status})" for v, status in sorted(missing.items()))
            lines += [
                f"**{label} has {len(missing)} partitions not committed, left out of "
                f"this comparison:** {shown}.",
                "",
            ]
    return lines


def render_report(metrics: dict, plots: dict[str, str]) -> str:
    a, b = metrics["a"], metrics["b"]
    lab = metrics.get("labels", {})
    lines = [
        f"# {a['name']} vs {b['name']}",
        "",
        f"A: `{a['location']}` ({', '.join(a['model_versions'])}); "
        f"B: `{b['location']}` ({', '.join(b['model_versions'])}).",
        "",
        *_incomplete_lines(a, b),
        f"Pairs both scored: {metrics['pairs']} ({metrics['users']} users), joined on "
        f"{', '.join(metrics['join_keys'])}; only in A: {metrics['only_a']}, only in B: "
        f"{metrics['only_b']}.",
        "",
        f"| | A: {a['name']} | B: {b['name']} |",
        "|---|---|---|",
        f"| mean score | {_num(a['scores']['mean'])} | {_num(b['scores']['mean'])} |",
        f"| median score | {_num(a['scores']['quantiles']['0.5'])} | "
        f"{_num(b['scores']['quantiles']['0.5'])} |",
        f"| mean exit layer | {_num(a['exits']['mean_exit_layer'], '.2f')} | "
        f"{_num(b['exits']['mean_exit_layer'], '.2f')} |",
        f"| layer compute per pair | {_num(a['exits']['layer_compute'], '.3f')} | "
        f"{_num(b['exits']['layer_compute'], '.3f')} |",
        f"| pairs/s (manifests) | {_num(a['speed']['pairs_per_s'], '.1f')} | "
        f"{_num(b['speed']['pairs_per_s'], '.1f')} |",
    ]
    if "a" in lab:
        for key, label in (("auc", "AUC"), ("logloss", "LogLoss")):
            lines.append(f"| {label} | {_num(lab['a'][key])} | {_num(lab['b'][key])} |")
        lines.append(
            f"| ECE | {_num(lab['a']['calibration']['ece'])} | "
            f"{_num(lab['b']['calibration']['ece'])} |"
        )
    shift, rank, top = metrics["score_shift"], metrics["rank_agreement"], metrics["topk_overlap"]
    lines += [
        "",
        f"Score shift B - A: mean {_num(shift['mean_diff'], '+.4f')}, mean |B - A| "
        f"{_num(shift['mean_abs_diff'])}, KS statistic {_num(shift['ks_statistic'])}.",
        f"Rank agreement per user (of {rank['users_with_2_pairs']} with >= 2 pairs, "
        f"{rank['users_used']} with a ranking on both sides): Spearman "
        f"{_num(rank['spearman_mean'])}, Kendall tau-b {_num(rank['kendall_tau_b_mean'])} "
        "(means).",
        f"Top-{top['k']} overlap per user: {_num(top['mean'])} (mean over {top['users']} users).",
    ]
    if "a" in lab:
        for key, label in (("auc_diff_b_minus_a", "AUC"), ("logloss_diff_b_minus_a", "LogLoss")):
            d = lab[key]
            lo, hi = d["ci95"]
            lines.append(
                f"{label} B - A: {_num(d['diff'], '+.4f')} [{_num(lo, '+.4f')}, {_num(hi, '+.4f')}]"
            )
        resamples = lab["bootstrap"]["resamples"]
        lines += [
            "",
            f"Labels from {lab['source']}: {lab['pairs']} labelled pairs "
            f"({lab['users']} users, {lab['positives']} positive); 95% intervals from "
            f"a paired user-level bootstrap ({resamples} resamples).",
        ]
    elif lab:
        lines += ["", f"Labels from {lab['source']}: no joined pair has a label."]
    lines.append("")
    for plot, name in plots.items():
        lines += [f"![{plot}]({name})", ""]
    return "\n".join(lines)
