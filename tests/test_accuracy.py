"""Accuracy levers: CF side features, hybrid and MLP heads, shared-prefix extraction, slices
and bootstrap intervals, and the head-training and evaluation stages end to end (tiny model)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from optirag import artifacts as A
from optirag import baselines as B
from optirag import cf, storage
from optirag import metrics as M
from optirag import pairs as F
from optirag import schema as S
from optirag.backbones import load_backbone
from optirag.config import PromptConfig, StorageConfig
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, ExitRule
from optirag.engine import ReferenceEngine
from optirag.pair_scorer import PairScorer, make_pair_scorer
from optirag.pipelines import evaluation, train_exits
from optirag.prompts import PromptBuilder
from tests.conftest import default_answers


def test_side_features_are_exactly_the_configured_columns(movie_tables):
    train = movie_tables[0]
    users, items = np.array([1, 2, 99, 3]), np.array([5, 7, 5, 999])  # 99, 999 unseen
    side = cf.SideFeatures.fit(["item_count", "mf"], train)(users, items)
    assert side.shape == (4, 2) and side.dtype == np.float32
    counts = {i: int((train[S.ITEM_ID].to_numpy() == i).sum()) for i in (5, 7)}
    assert side[:, 0] == pytest.approx(np.log1p([counts[5], counts[7], counts[5], 0]))
    mf = cf.MatrixFactorisation.fit(train)
    assert side[:, 1] == pytest.approx(mf.logits(users, items), abs=1e-6)
    assert side[3, 1] == pytest.approx(mf.bias + mf.user_bias[2], abs=1e-6)  # cold item
    with pytest.raises(ValueError, match="unknown side features"):
        cf.SideFeatures.fit(["mf", "age"], train)


def test_side_features_round_trip(movie_tables, local_storage):
    fitted = cf.SideFeatures.fit(list(cf.SIDE_FEATURES), movie_tables[0])
    uri = storage.join(local_storage.root, "side.safetensors")
    A.save_side_features(*fitted.arrays(), uri, local_storage)
    again = cf.SideFeatures.from_arrays(*A.read_side_features(uri, local_storage))
    users, items = np.array([1, 4, 50]), np.array([3, 9, 2])
    np.testing.assert_array_equal(fitted(users, items), again(users, items))
    # read in parts, as the context stage's tasks do: any rows of any array, by byte ranges
    stored = A.StoredSideFeatures(uri, local_storage)
    arrays, _ = fitted.arrays()
    for name, array in arrays.items():
        assert stored.length(name) == len(array)
        np.testing.assert_array_equal(stored.rows(name, 3, 11), array[3:11])
        assert stored.rows(name, 5, 5).shape == (0, *array.shape[1:])
    # no user's arrays: every user gets the cold start, the items their own side
    items_only = stored.item_features()
    np.testing.assert_array_equal(items_only.item_side(items), fitted.item_side(items))
    np.testing.assert_array_equal(
        items_only.user_side(users), fitted.user_side(np.array([-(2**63)] * 3))
    )


@pytest.mark.parametrize("mlp_size", [0, 8])
def test_hybrid_heads_read_the_side_features(tiny_backbone, mlp_size):
    names = ["mf", "item_rate"]
    heads = ExitHeads.from_backbone(
        tiny_backbone, [3, 6], names, mlp_size, answers=default_answers(tiny_backbone)
    )
    states = torch.randn(5, 2, tiny_backbone.hidden_size)
    side = torch.randn(5, 2)
    with torch.no_grad():
        for head in heads.heads:  # make every side weight matter
            last = head.proj if not mlp_size else head.proj[0]
            last.weight[:, -2:] = torch.randn(last.weight.shape[0], 2)
        out = heads(states, side)
        moved = side.clone()
        moved[:, 1] += 1.0
        assert not torch.allclose(out, heads(states, moved))
    with pytest.raises(ValueError, match="side features"):
        heads(states)
    with pytest.raises(ValueError, match="side features"):
        heads(states, torch.randn(5, 3))


def test_untrained_hybrid_linear_heads_are_the_zero_shot_model(tiny_backbone):
    plain = ExitHeads.from_backbone(tiny_backbone, [3, 6], answers=default_answers(tiny_backbone))
    hybrid = ExitHeads.from_backbone(
        tiny_backbone, [3, 6], ["mf", "user_count"], answers=default_answers(tiny_backbone)
    )
    states = torch.randn(4, 2, tiny_backbone.hidden_size)
    with torch.no_grad():
        assert torch.allclose(plain(states), hybrid(states, torch.randn(4, 2)), atol=1e-6)


def test_engine_feeds_each_row_its_own_side_features_through_compaction(tiny_backbone):
    heads = ExitHeads.from_backbone(
        tiny_backbone, [2, 4, 6], ["mf"], answers=default_answers(tiny_backbone)
    )
    with torch.no_grad():
        for head in heads.heads:
            head.proj.weight[0, -1] = 3.0
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 300, size=rng.integers(3, 12)).tolist() for _ in range(12)]
    side = torch.linspace(-2, 2, 12)[:, None]
    full = ReferenceEngine(tiny_backbone, heads, ExitRule("none")).score(rows, side=side)
    early = ReferenceEngine(tiny_backbone, heads, ExitRule("confidence", 0.7)).score(
        rows, side=side
    )
    assert len(set(early.exit_layers.tolist())) > 1  # some rows left early
    scores, _ = M.simulate_exits(full.head_probs.numpy(), heads.layers, ExitRule("confidence", 0.7))
    np.testing.assert_allclose(early.scores.numpy(), scores, atol=1e-6)


@pytest.mark.parametrize("target_ratings", [False, True], ids=["plain", "target-ratings"])
def test_shared_prefix_extraction_equals_plain_extraction(
    tiny_backbone, movie_tables, target_ratings
):
    cfg = PromptConfig(target_ratings=target_ratings)
    heads = ExitHeads.from_backbone(
        tiny_backbone, [2, 4, 6], answers=default_answers(tiny_backbone)
    )
    pairs = F.training_pairs(movie_tables[0], None, 0.4, 4, seed=0)
    feats = {}
    for shared in (True, False):
        contexts = ContextStore(*movie_tables, cfg)
        scorer = PairScorer(
            tiny_backbone,
            heads,
            ExitRule("none"),
            contexts,
            PromptBuilder(tiny_backbone.tokenizer, cfg),
            share_prefixes=shared,
            batch_rows=7,
            batch_tokens=100,
        )  # small calls: users cut
        feats[shared] = F.extract_states(scorer, pairs, None)
    torch.testing.assert_close(feats[True]["states"], feats[False]["states"], atol=1e-5, rtol=1e-4)
    assert torch.equal(feats[True]["cutoff"], torch.from_numpy(pairs.cutoff))


def test_pack_calls_keep_a_prefix_together_and_respect_the_limit():
    from optirag.pair_scorer import pack_calls

    # rows of one slot per group: the reference engine's row limit (prefix costs nothing)
    sizes = [3, 2, 7, 1]
    calls = list(pack_calls(((0, [1] * k) for k in sizes), 4))
    # groups 0 and 1 are not mixed (3 + 2 > 4); group 2 alone exceeds a call: cut, and its
    # last piece is joined by group 3
    assert calls == [[(0, 0, 3)], [(1, 0, 2)], [(2, 0, 4)], [(2, 4, 7), (3, 0, 1)]]

    # tokens (the packed engine): each piece of a cut group pays its prefix again
    groups = [(5, [2, 2, 2]), (3, [1]), (4, [3, 3, 3, 3]), (1, [20])]
    calls = list(pack_calls(iter(groups), 12))
    rows = [(g, r) for c in calls for g, a, b in c for r in range(a, b)]
    assert rows == [(g, r) for g, (_, k) in enumerate(groups) for r in range(len(k))]
    for c in calls:
        cost = sum(groups[g][0] + sum(groups[g][1][a:b]) for g, a, b in c)
        assert cost <= 12 or (len(c) == 1 and c[0][2] - c[0][1] == 1)  # a lone big row
    # 11 + 4 > 12: group 1 waits; 4 + 12 > 12: group 2 is cut, 4 + 3 + 3 per piece
    assert calls == [[(0, 0, 3)], [(1, 0, 1)], [(2, 0, 2)], [(2, 2, 4)], [(3, 0, 1)]]


def test_before_cutoffs_hides_each_users_targets(movie_tables):
    train = movie_tables[0]
    pairs = F.training_pairs(train, None, 0.5, 3, seed=0)
    known = F.before_cutoffs(train, pairs.users, pairs.cutoff)
    cut = dict(zip(pairs.users.tolist(), pairs.cutoff.tolist(), strict=True))
    for u, t in zip(known[S.USER_ID].to_pylist(), known[S.TS].to_pylist(), strict=True):
        assert t < cut[u]
    assert 0 < known.num_rows < train.num_rows


def _unpaired_interval(labels, a, b, n, seed=0):
    """What the bootstrap test must reject: a and b resampled independently."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        ra, rb = rng.integers(0, len(labels), (2, len(labels)))
        diffs.append(M.auc(labels[ra], a[ra]) - M.auc(labels[rb], b[rb]))
    return np.percentile(diffs, [2.5, 97.5])


def test_weighted_aucs_equal_the_auc_of_the_resampled_pairs():
    rng = np.random.default_rng(3)
    labels, scores = rng.integers(0, 2, 60), rng.integers(0, 5, 60).astype(float)  # ties
    draws = rng.integers(0, 60, (4, 60))
    weights = np.stack([np.bincount(d, minlength=60) for d in draws]).astype(float)
    expected = [M.auc(labels[d], scores[d]) for d in draws]
    np.testing.assert_allclose(M.weighted_aucs(labels, scores, weights), expected)


def test_bootstrap_is_paired_and_resamples_users():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    base = labels + rng.normal(0, 1.5, 2000)
    better = base + 0.08 * labels  # a small, consistent gain on the same pairs
    d, lo, hi = M.auc_difference(labels, better, base, n_resamples=1000)
    assert lo < d < hi and lo > 0  # paired: the interval excludes 0 ...
    u_lo, u_hi = _unpaired_interval(labels, better, base, 300)
    assert u_lo < 0 < u_hi  # ... which an unpaired bootstrap cannot resolve
    d, lo, hi = M.auc_difference(labels, base, base + rng.normal(0, 1e-3, 2000), 1000)
    assert lo < 0 < hi
    # Clustered pairs: 40 users x 50 pairs; whether a beats b depends on the user.
    users = np.repeat(np.arange(40), 50)
    labels = rng.integers(0, 2, len(users))
    user_gain = rng.normal(0, 1.0, 40)[users]
    b = labels + rng.normal(0, 1.0, len(users))
    a = b + user_gain * (labels - 0.5)
    _, p_lo, p_hi = M.auc_difference(labels, a, b, 1000, groups=None)
    _, u_lo, u_hi = M.auc_difference(labels, a, b, 1000, groups=users)
    assert (u_hi - u_lo) > 1.5 * (p_hi - p_lo)  # pair-level intervals are too narrow
    same = M.auc_difference(labels, a, b, 1000, groups=np.arange(len(users)))
    assert same == M.auc_difference(labels, a, b, 1000)  # one pair per group: pair-level


def test_slices_and_model_table():
    train = pa.table({S.USER_ID: [1] * 25 + [2] * 3, S.ITEM_ID: list(range(28))})
    masks = M.slice_masks(train, np.array([1, 2, 3]), np.array([0, 0, 100]))
    cold, light = list(masks)[1:]
    assert masks[cold].tolist() == [True, True, True]  # item 0 has 1 rating, 100 none
    assert masks[light].tolist() == [False, True, True]
    scores = {"a": np.array([0.1, 0.9, 0.5]), "b": np.array([0.2, 0.8, 0.4])}
    empty = {"all": np.ones(3, bool), "none": np.zeros(3, bool)}
    table = M.model_table(
        scores, np.array([0, 1, 1]), empty, "a", {"a", "b"}, 50, groups=np.array([1, 1, 2])
    )
    assert table[1]["slices"]["none"]["pairs"] == 0
    assert "logloss" in table[1]["slices"]["all"]


def _write_tables(store, movie_tables):
    interactions, items, neighbors = movie_tables
    root = store.root
    storage.write_table(interactions, A.interactions_uri(root, "train"), store)
    later = interactions.set_column(3, S.TS, pa.array(interactions[S.TS].to_numpy() + 1000))
    storage.write_table(later, A.interactions_uri(root, "valid"), store)  # tuned baselines
    storage.write_table(items, A.items_uri(root), store)
    storage.write_table(neighbors, storage.join(root, "neighbors", "gcn.parquet"), store)
    rng = np.random.default_rng(1)
    for split in ("valid", "test"):
        users = np.repeat(np.arange(1, 7), 5)
        cands = pa.table(
            {
                S.USER_ID: users,
                S.ITEM_ID: rng.integers(1, 21, len(users)),
                S.LABEL: (np.arange(len(users)) % 2).astype(np.int8),
            }
        )
        storage.write_table(cands, A.candidates_uri(root, split), store)


def test_hybrid_mlp_heads_with_cf_prompt_train_evaluate_and_score(
    ray_session, local_storage, study_config, movie_tables
):
    _write_tables(local_storage, movie_tables)
    cfg = study_config(
        local_storage.root,
        heads={
            "epochs": 3,
            "side_features": ["mf", "item_rate"],
            "mlp_size": 8,
            "max_train_pairs": 10,
        },
        evaluation={"speed_pairs": 6, "speed_taus": [0.0]},
        prompts={"target_ratings": True},
    )
    trained = train_exits.run(cfg)
    assert trained["train_pairs"] == 10
    summary = evaluation.run(cfg)
    assert summary["test_pairs"] == 30
    metrics = storage.read_json(
        storage.join(local_storage.root, "evaluation", "metrics.json"), local_storage
    )
    assert metrics["side_features"] == ["mf", "item_rate"] and metrics["mlp_size"] == 8
    full = next(m for m in metrics["models"] if m["model"] == "trained heads, full depth")
    assert set(full["slices"]) == set(M.slice_masks(movie_tables[0], [], []))
    assert "diff_ci" in full["slices"]["all"]
    mf = next(b for b in metrics["baselines"] if b["model"] == B.MF_BASELINE)
    assert set(mf["chosen_on_valid"]) >= {"l2", "epochs"} and len(mf["per_seed"]) == 3
    assert {b["model"] for b in metrics["baselines"]} <= {m["model"] for m in metrics["models"]}
    # the scoring path loads the same heads and side features
    backbone = load_backbone(cfg.backbone)
    model = A.load_scoring_model(cfg, backbone)
    scorer = make_pair_scorer(cfg, backbone, model, ContextStore(*movie_tables, cfg.prompts))
    assert scorer.side_features.names == ["mf", "item_rate"]
    out = scorer.score(np.array([1, 2, 77]), np.array([3, 4, 5]))
    assert np.isfinite(out.scores).all()
    # evaluation honours the configured rule and compaction, as scoring does
    exits = cfg.exits.model_copy(
        update={"rule": "confidence", "threshold": 0.6, "compaction": False}
    )
    evaluation.run(cfg.model_copy(update={"exits": exits}))
    metrics = A.load_evaluation(cfg)
    assert (metrics["rule"], metrics["calibrated_tau"]) == ("confidence", 0.6)
    assert [(s["rule"], s["compaction"]) for s in metrics["speed"]] == [
        ("none", False),
        ("confidence", False),
    ]
    assert any(m["model"] == "early exit (calibrated confidence 0.6)" for m in metrics["models"])
    speed_rows = [r for r in evaluation.render_report(metrics).splitlines() if "| 6 |" in r]
    assert speed_rows[0].startswith("| none (full depth) |")  # not the rule's default tau


def _latent_interactions(n_users=60, n_items=40, per_user=20, seed=0):
    """Interactions whose labels follow a low-rank taste model, split in time per user."""
    rng = np.random.default_rng(seed)
    u_vec, i_vec = rng.normal(size=(n_users, 4)), rng.normal(size=(n_items, 4))
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    logit = (u_vec[users] * i_vec[items]).sum(1) + rng.normal(0, 0.5, len(users))
    ts = np.tile(np.arange(per_user), n_users)
    table = pa.table(
        {
            S.USER_ID: users,
            S.ITEM_ID: items,
            S.LABEL: (logit > 0).astype(np.int8),
            S.TS: ts,
            S.RATING: np.where(logit > 0, 5.0, 2.0).astype(np.float32),
        },
        schema=S.INTERACTIONS,
    )
    from optirag import data

    return data.split_by_time(table, 0.2, 0.2)


def test_mf_early_stopping_returns_the_best_valid_epoch():
    splits = _latent_interactions()
    valid = splits["valid"]
    v = (valid[S.USER_ID].to_numpy(), valid[S.ITEM_ID].to_numpy(), valid[S.LABEL].to_numpy())
    mf = cf.MatrixFactorisation.fit(splits["train"], epochs=12, l2=0.01, valid=v, patience=2)
    curve = mf.valid_auc
    assert mf.epochs == int(np.argmax(curve)) + 1
    assert len(curve) == 12 or len(curve) - mf.epochs == 2  # stopped `patience` after the best
    assert M.auc(v[2], mf.logits(v[0], v[1])) == pytest.approx(max(curve))
    plain = cf.MatrixFactorisation.fit(splits["train"], epochs=3)
    assert plain.epochs == 3 and plain.valid_auc == []


def test_tuned_baselines_record_choices_and_per_seed_scores():
    from optirag import baselines as B

    splits = _latent_interactions()
    test = splits["test"]
    users, items, labels = (test[c].to_numpy() for c in (S.USER_ID, S.ITEM_ID, S.LABEL))
    mf = B.tune_mf(
        splits["train"],
        splits["valid"],
        users,
        items,
        seeds=[0, 1, 2],
        l2_grid=[0.01, 1.0],
        max_epochs=6,
        patience=2,
    )
    best = max(mf.grid, key=lambda g: g["valid_auc"])
    assert mf.settings["l2"] == best["l2"] and [g["l2"] for g in mf.grid] == [0.01, 1.0]
    assert [s["seed"] for s in mf.seeds] == [0, 1, 2] and len(mf.seed_scores) == 3
    assert mf.settings["epochs"] == [s["epochs"] for s in mf.seeds]
    assert all(1 <= e <= 6 for e in mf.settings["epochs"])
    masks = {"all": np.ones(len(labels), bool)}
    report = mf.report(labels, masks)
    per_seed = [s["test_auc"]["all"] for s in report["per_seed"]]
    assert report["test_auc_over_seeds"]["all"]["mean"] == pytest.approx(np.mean(per_seed))
    assert report["test_auc_over_seeds"]["all"]["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert report["chosen_on_valid"]["l2"] == best["l2"]
    lr = B.tune_id_lr(
        splits["train"], splits["valid"], users, items, seeds=[0, 1], c_grid=[0.01, 1.0]
    )
    assert lr.settings["C"] == max(lr.grid, key=lambda g: g["valid_auc"])["C"]
    assert lr.scores.shape == (len(users),) and np.all((lr.scores > 0) & (lr.scores < 1))


def test_same_information_features_are_what_the_cf_prompt_shows_and_leak_free(movie_tables):
    from optirag import baselines as B

    interactions, items, neighbors = movie_tables
    cfg = PromptConfig(target_ratings=True, max_neighbor_ratings=3)
    store = ContextStore(interactions, items, neighbors, cfg)
    pairs = F.training_pairs(interactions, None, 0.5, 3, seed=0)
    x = B.prompt_rating_features(store, pairs.users, pairs.items, pairs.cutoff, 3)
    assert x.shape == (len(pairs), 8)
    for n in range(len(pairs)):
        u, i, cut = int(pairs.users[n]), int(pairs.items[n]), int(pairs.cutoff[n])
        mean, count, shown = store.target_ratings(u, i, cut)
        assert store.target_text(u, i, cut).endswith(cf_note := _rating_note(mean, count, shown))
        assert cf_note  # the numbers below are the ones the prompt shows
        assert x[n, 2] == pytest.approx(np.log1p(count))
        assert x[n, 4] == len(shown)
        assert x[n, 5 : 5 + len(shown)] == pytest.approx(np.asarray(shown) - 3.0)
    # Ratings at or after each pair's cut (its target's among them) change nothing.
    ts = interactions[S.TS].to_numpy()
    cut_of = dict(zip(pairs.users.tolist(), pairs.cutoff.tolist(), strict=True))
    late = ts >= max(cut_of.values())
    noisy = interactions.set_column(
        4, S.RATING, pa.array(np.where(late, 1.0, interactions[S.RATING].to_numpy()), pa.float32())
    )
    again = ContextStore(noisy, items, neighbors, cfg)
    x_again = B.prompt_rating_features(again, pairs.users, pairs.items, pairs.cutoff, 3)
    np.testing.assert_array_equal(x, x_again)
    full = B.prompt_rating_features(again, pairs.users, pairs.items, None, 3)
    assert not np.array_equal(full, x_again)  # without the cut the late ratings show


def _rating_note(mean, count, shown):
    from optirag.prompts import rating_note

    return rating_note(mean, count, shown)


@pytest.mark.slow  # minutes of Ray on 2 cores: `make test-slow` (CI runs it)
def test_choices_never_read_the_test_labels(ray_session, tmp_path, study_config, movie_tables):
    """Permuting the test labels changes the primary result but nothing chosen: the exit
    config, the baselines' settings and epochs, the control's C."""
    runs = {}
    for name in ("original", "permuted"):
        store = StorageConfig(root=str(tmp_path / name))
        _write_tables(store, movie_tables)
        if name == "permuted":
            uri = A.candidates_uri(store.root, "test")
            test = storage.read_table(uri, store)
            shuffled = np.random.default_rng(5).permutation(test[S.LABEL].to_numpy())
            storage.write_table(test.set_column(2, S.LABEL, pa.array(shuffled)), uri, store)
        cfg = study_config(
            store.root,
            heads={"epochs": 2, "side_features": ["mf"]},
            evaluation={
                "speed_pairs": 0,
                "baseline_seeds": [0, 1],
                "mf_max_epochs": 4,
                "mf_l2_grid": [0.01, 0.3],
                "lr_c_grid": [0.1, 1.0],
                "primary": {"model": "early exit", "baseline": B.MF_BASELINE},
            },
        )
        train_exits.run(cfg)
        evaluation.run(cfg)
        exit_config = storage.read_json(A.heads_file(cfg, A.EXIT_CONFIG_FILE), store)
        runs[name] = (
            exit_config,
            A.load_evaluation(cfg),
            storage.read_json(A.primary_uri(cfg), store),
        )
    (config_a, metrics_a, primary_a), (config_b, metrics_b, primary_b) = runs.values()

    def timeless(d):
        return {
            k: timeless(v) if isinstance(v, dict) else v
            for k, v in d.items()
            if not k.endswith("_s")
        }

    assert timeless(config_a) == timeless(config_b)
    chosen = [{k: b[k] for k in ("chosen_on_valid", "grid")} for b in metrics_a["baselines"]]
    assert chosen == [
        {k: b[k] for k in ("chosen_on_valid", "grid")} for b in metrics_b["baselines"]
    ]
    assert [s["valid_auc"] for b in metrics_a["baselines"] for s in b["per_seed"]] == [
        s["valid_auc"] for b in metrics_b["baselines"] for s in b["per_seed"]
    ]
    assert metrics_a["controls"] == metrics_b["controls"]
    assert primary_a["model"].startswith("early exit") and primary_a == metrics_a["primary"]
    assert primary_a["diff"] != primary_b["diff"]  # the labels did change
    roles = {m["model"]: m["role"] for m in metrics_a["models"]}
    assert roles[primary_a["model"]] == "primary"
    assert list(roles.values()).count("primary") == 1
    # What the LLM adds over the same-information control, on the same pairs
    auc_of = {m["model"]: m["slices"]["all"]["auc"] for m in metrics_a["models"]}
    over = {r["model"]: r["slices"]["all"] for r in metrics_a["vs_same_information_control"]}
    assert "trained heads, full depth" in over and primary_a["model"] in over
    for name, entry in over.items():
        assert entry["auc"] == auc_of[name]
        want = auc_of[name] - auc_of[B.SAME_INFORMATION]
        assert entry["diff_vs_reference"] == pytest.approx(want)
        assert entry["diff_ci"][0] <= entry["diff_ci"][1]
