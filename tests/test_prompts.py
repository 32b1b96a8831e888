import numpy as np
import pytest

from optirag.config import PromptConfig
from optirag.context import ContextStore
from optirag.early_exit import ExitHeads, ExitRule
from optirag.pair_scorer import PairScorer
from optirag.prompts import UNTRUSTED_NOTE, PromptBuilder, UserContext, clean_text, item_text
from tests.conftest import default_answers

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_clean_text_strips_control_and_caps():
    assert clean_text("Toy\x00 Story\n\t(1995)\u202e", 100) == "Toy Story (1995)"
    assert clean_text("x" * 50, 10) == "x" * 9 + "…"
    assert item_text(None, None, 20) == '"(untitled)"'
    assert item_text("Heat", "Genres: Action", 80) == '"Heat [Genres: Action]"'
    assert item_text('Say "Yes"', None, 80) == "\"Say 'Yes'\""  # cannot close its quote


def test_prefix_and_suffix_split(tiny_backbone):
    builder = PromptBuilder(tiny_backbone.tokenizer, PromptConfig())
    ctx = UserContext([("A", True), ("B", False)], ["C"])
    prefix, suffix = builder.prefix_text(ctx), builder.suffix_text("Heat")
    assert prefix.endswith("Will the user like this item: ")
    assert suffix.startswith("Heat?") and suffix.endswith("Answer:")
    assert "liked: A." in prefix and "disliked: B." in prefix and "similar taste liked: C" in prefix


def test_chat_template_is_used(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        builder = PromptBuilder(tokenizer, PromptConfig(instruction="SYS"))
        prefix = builder.prefix_text(UserContext())
        assert prefix.startswith(
            f"<|system|>SYS {UNTRUSTED_NOTE}<|end|><|user|>The user has no history yet."
        )
        assert builder.suffix_text("X").endswith("<|end|><|assistant|>")
    finally:
        tokenizer.chat_template = None


def test_token_budget_drops_oldest_history_first(tiny_backbone):
    history = [(f"Old movie {i}", True) for i in range(30)]
    cfg = PromptConfig(max_prefix_tokens=320, max_history=30)
    builder = PromptBuilder(tiny_backbone.tokenizer, cfg)
    ids = builder.encode_prefix(UserContext(history, ["Neighbour pick"]))
    text = tiny_backbone.tokenizer.decode(ids)
    assert len(ids) <= 320
    assert "Old movie 29" in text and "Old movie 0;" not in text
    assert "Neighbour pick" in text
    assert ids == builder.encode_prefix(UserContext(history, ["Neighbour pick"]))


def test_batch_encoding_equals_one_by_one(tiny_backbone):
    """encode_prefixes (one batch call, then trimming the few over budget) gives each
    context's encode_prefix ids, over and under the token budget, empty and unicode."""
    cfg = PromptConfig(max_prefix_tokens=330, max_history=30, max_neighbor_items=3)
    builder = PromptBuilder(tiny_backbone.tokenizer, cfg)
    contexts = [
        UserContext(),
        UserContext([("Amélie (2001)", True), ("Heat", False)], ["Se7en", "Up"]),
        UserContext([(f"Old movie {i}", i % 2 == 0) for i in range(30)], ["A", "B", "C", "D"]),
        UserContext([], [f"Pick {i}" for i in range(40)]),
    ]
    one_by_one = [builder.encode_prefix(c) for c in contexts]
    assert len(builder.encode(builder.prefix_text(contexts[2]))) > 330  # trimming runs
    assert max(len(i) for i in one_by_one) <= 330
    assert builder.encode_prefixes(contexts) == one_by_one
    texts = [builder.prefix_text(c) for c in contexts]
    assert builder.encode_many(texts) == [builder.encode(t) for t in texts]


def _stepwise_prefix(builder: PromptBuilder, ctx: UserContext) -> list[int]:
    """The budget rule spelled out: drop the oldest history item, one at a time, then the
    last similar-user item, re-encoding each time, until the prefix fits or nothing is left."""
    cfg = builder.cfg
    history, neighbors = (
        ctx.history[-cfg.max_history :],
        ctx.neighbor_liked[: cfg.max_neighbor_items],
    )
    ids = builder.encode(builder.prefix_text(UserContext(history, neighbors)))
    while len(ids) > cfg.max_prefix_tokens and (history or neighbors):
        history, neighbors = (history[1:], neighbors) if history else (history, neighbors[:-1])
        ids = builder.encode(builder.prefix_text(UserContext(history, neighbors)))
    return ids


@pytest.mark.parametrize("budget", [120, 200, 330])
def test_trimming_search_equals_dropping_one_item_at_a_time(tiny_backbone, budget):
    """encode_prefixes' search for the number of items to drop gives the stepwise rule's ids
    on contexts of ragged lengths: short and long titles, history only, neighbours only,
    nothing to drop, and a budget below the bare prompt (everything dropped, still over)."""
    rng = np.random.default_rng(budget)
    words = ["Heat", "Amélie", "(1995)", "The", "Night", "of", "a", "very", "long", "title", "II"]

    def title() -> str:
        return " ".join(rng.choice(words, size=rng.integers(1, 12)))

    contexts = [UserContext(), UserContext([], [title()]), UserContext([(title(), True)], [])]
    for _ in range(60):
        history = [(title(), bool(rng.random() < 0.7)) for _ in range(rng.integers(0, 30))]
        contexts.append(UserContext(history, [title() for _ in range(rng.integers(0, 8))]))
    cfg = PromptConfig(max_prefix_tokens=budget, max_history=30, max_neighbor_items=8)
    builder = PromptBuilder(tiny_backbone.tokenizer, cfg)
    expected = [_stepwise_prefix(builder, c) for c in contexts]
    assert sum(len(builder.encode(builder.prefix_text(c))) > budget for c in contexts) > 20
    assert builder.encode_prefixes(contexts) == expected
    assert [builder.encode_prefix(c) for c in contexts[:10]] == expected[:10]


def test_context_has_no_future_interactions(movie_tables):
    interactions, items, neighbors = movie_tables
    store = ContextStore(interactions, items, neighbors, PromptConfig())
    ctx = store.context(1, before_ts=30)
    assert len(ctx.history) == 3  # ts 0, 10, 20
    user1 = interactions.filter(interactions["user_id"].to_numpy() == 1)
    later = {
        store.texts.history[i]
        for i, t in zip(user1["item_id"].to_pylist(), user1["ts"].to_pylist(), strict=True)
        if t >= 30
    }
    earlier = {
        store.texts.history[i]
        for i, t in zip(user1["item_id"].to_pylist(), user1["ts"].to_pylist(), strict=True)
        if t < 30
    }
    assert {t for t, _ in ctx.history} == earlier
    assert not (set(ctx.neighbor_liked) & (later | earlier))
    # The exact neighbour items: liked by user 1's neighbours (2: sim 0.9, 3: sim 0.5) before
    # the cut, unseen by user 1 before it, ranked by summed similarity, then item id.
    ids, ts, liked, users = (
        interactions[c].to_numpy() for c in ("item_id", "ts", "label", "user_id")
    )
    seen = set(ids[(users == 1) & (ts < 30)].tolist())
    weight = {}
    for neighbor, sim in ((2, 0.9), (3, 0.5)):
        for item in ids[(users == neighbor) & (ts < 30) & (liked == 1)].tolist():
            if item not in seen:
                weight[item] = weight.get(item, 0.0) + sim
    ranked = sorted(weight, key=lambda i: (-weight[i], i))[: PromptConfig().max_neighbor_items]
    assert ranked  # the fixture gives the neighbours liked items before the cut
    assert ctx.neighbor_liked == [store.texts.history[i] for i in ranked]
    after = sorted(
        set(ids[((users == 2) | (users == 3)) & (ts >= 30) & (liked == 1)].tolist())
        - set(ranked)
        - set(ids[users == 1].tolist())
    )
    assert after  # the neighbours liked other items after the cut: left out


def test_unknown_user_gets_empty_context(movie_tables):
    store = ContextStore(*movie_tables, PromptConfig())
    assert store.context(999) == UserContext([], [])
    assert 999 not in store.users and 3 in store.item_texts and 99 not in store.item_texts


@pytest.mark.parametrize("engine", ["packed", "reference"])
@pytest.mark.parametrize("share", [True, False])
def test_pair_scorer_matches_engine_on_whole_prompts(tiny_backbone, movie_tables, share, engine):
    # small calls (5 rows; 4 launches of 60 tokens, below one user's prompts, so a user's
    # rows are cut across calls and each call re-runs the prefix)
    store = ContextStore(*movie_tables, PromptConfig())
    builder = PromptBuilder(tiny_backbone.tokenizer, PromptConfig())
    heads = ExitHeads.from_backbone(
        tiny_backbone, [2, 4, 6], answers=default_answers(tiny_backbone)
    )
    scorer = PairScorer(
        tiny_backbone,
        heads,
        ExitRule("none"),
        store,
        builder,
        share_prefixes=share,
        batch_rows=5,
        engine=engine,
        batch_tokens=60,
    )
    users = np.array([3, 1, 1, 2, 3, 1, 999, 2])
    items = np.array([5, 6, 7, 8, 9, 10, 11, 12])
    calls = []
    engine_score = scorer.engine.score
    scorer.engine.score = lambda suffixes, *a, **k: (
        calls.append(len(suffixes)) or engine_score(suffixes, *a, **k)
    )
    out = scorer.score(users, items)
    assert sum(calls) == 8 and max(calls) <= 5
    assert engine == "reference" or len(calls) > 4  # more calls than users: users are cut
    one_by_one = [
        scorer.engine.score(
            [
                builder.encode_prefix(store.context(int(u)))
                + builder.encode_suffix(store.item_texts[int(i)])
            ]
        ).scores.item()
        for u, i in zip(users, items, strict=True)
    ]
    np.testing.assert_allclose(out.scores, one_by_one, atol=1e-4)
    assert out.scores.dtype == np.float32 and (out.exit_layers == 6).all()
    none = scorer.score(users[:0], items[:0], keep_hidden=True)
    assert none.scores.shape == (0,) and none.head_probs.shape == (0, 3)
    assert none.hidden.shape == (0, 3, tiny_backbone.hidden_size)


def test_item_ratings_before_a_time_and_streamed_totals(movie_tables, tmp_path):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from optirag import schema as S
    from optirag.context import ItemRatings

    interactions = movie_tables[0]
    items, ts = interactions[S.ITEM_ID].to_numpy(), interactions[S.TS].to_numpy()
    ratings = interactions[S.RATING].to_numpy()
    by_time = ItemRatings.from_interactions(interactions)
    pq.write_table(interactions, tmp_path / "h.parquet", row_group_size=5)  # many batches
    totals = ItemRatings.totals(ds.dataset(tmp_path / "h.parquet"))
    for item in range(0, 22):
        for cut in (None, 0, 25, 40, 1000):
            keep = (items == item) & (ts < (cut if cut is not None else np.inf))
            mean, count = by_time.lookup(item, cut)
            assert count == keep.sum()
            if count:
                assert mean == pytest.approx(ratings[keep].mean())
            else:
                assert np.isnan(mean)
        assert totals.lookup(item) == pytest.approx(by_time.lookup(item), nan_ok=True)


def test_target_ratings_in_prompt_respect_the_cut(movie_tables):
    import pyarrow as pa

    from optirag import schema as S

    interactions = pa.table(
        {
            S.USER_ID: [1, 2, 3, 2],
            S.ITEM_ID: [7, 7, 7, 8],
            S.LABEL: [0, 1, 1, 1],
            S.TS: [10, 20, 30, 40],
            S.RATING: [2.0, 5.0, 4.0, None],
        },
        schema=S.INTERACTIONS,
    )
    _, items, neighbors = movie_tables  # user 1's neighbours: 2 then 3
    store = ContextStore(interactions, items, neighbors, PromptConfig(target_ratings=True))
    title = store.item_texts[7]
    assert (
        store.target_text(1, 7)
        == f"{title} (mean rating 3.7 from 3 ratings; similar users rated it 5, 4)"
    )
    assert (
        store.target_text(1, 7, 25)
        == f"{title} (mean rating 3.5 from 2 ratings; similar users rated it 5)"
    )
    assert store.target_text(1, 7, 15) == f"{title} (mean rating 2.0 from 1 ratings)"
    assert store.target_text(1, 7, 5) == f"{title} (no ratings yet)"
    assert store.target_text(1, 8) == f"{store.item_texts[8]} (no ratings yet)"  # rating missing
    plain = ContextStore(interactions, items, neighbors, PromptConfig())
    assert plain.target_text(1, 7) == title


def test_feature_cache_key_follows_the_prompt_wording(tiny_backbone, monkeypatch):
    from optirag import prompts
    from optirag.config import Config
    from optirag.pipelines.states import feature_key

    cfg = Config()
    before = feature_key(cfg, tiny_backbone, [2, 4])
    monkeypatch.setattr(prompts, "rating_note", lambda mean, count, ratings: "(reworded)")
    assert feature_key(cfg, tiny_backbone, [2, 4]) != before


def test_feature_cache_key_follows_the_interaction_tables(tiny_backbone, movie_tables, tmp_path):
    import os

    from optirag import artifacts as A
    from optirag import storage
    from optirag.config import Config
    from optirag.pipelines.states import feature_key

    cfg = Config.model_validate({"storage": {"root": str(tmp_path)}})
    uri = A.interactions_uri(cfg.storage.root, "train")
    storage.write_table(movie_tables[0], uri, cfg.storage)
    before = feature_key(cfg, tiny_backbone, [2, 4])
    assert before == feature_key(cfg, tiny_backbone, [2, 4])
    assert before["tables"]["interactions/train"] is not None
    storage.write_table(movie_tables[0].slice(1), uri, cfg.storage)  # new data, same path
    assert feature_key(cfg, tiny_backbone, [2, 4]) != before
    again = feature_key(cfg, tiny_backbone, [2, 4])
    os.utime(uri, (1, 1))  # same size, another modification time
    assert feature_key(cfg, tiny_backbone, [2, 4]) != again


def test_answer_ids_are_the_answer_words_as_they_follow_the_prompt(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    builder = PromptBuilder(tokenizer, PromptConfig())  # no template: ends in "Answer:"
    assert [tokenizer.decode([i]) for i in builder.answer_ids] == [" Yes", " No"]
    ratings = PromptBuilder(tokenizer, PromptConfig(target_ratings=True))
    assert ratings.answer_ids == builder.answer_ids
    # the template's assistant turn follows its cue directly: "Yes", two tokens here
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        with pytest.raises(ValueError, match="'Yes' after the prompt's end.*answer_words"):
            _ = PromptBuilder(tokenizer, PromptConfig()).answer_ids
        # Mistral-like: the answer follows `[/INST]` after a space: " Yes", one token
        tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}</s>"
            "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
        )
        mistral = PromptBuilder(tokenizer, PromptConfig())
        assert mistral.suffix_text("X").endswith("[/INST]")
        assert mistral.answer_ids == builder.answer_ids
    finally:
        tokenizer.chat_template = None
    with pytest.raises(ValueError, match="two distinct words"):
        PromptConfig(answer_words=("Yes", " Yes"))


def test_templates_render_without_thinking_and_without_a_refused_system_role(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    gemma_like = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "<|end|>{% endfor %}<|assistant|>{% if enable_thinking is defined and not "
        "enable_thinking %}<think></think>{% endif %}"
    )
    tokenizer.chat_template = gemma_like
    try:
        builder = PromptBuilder(tokenizer, PromptConfig(instruction="SYS"))
        assert builder.prefix_text(UserContext()).startswith(f"<|user|>SYS {UNTRUSTED_NOTE}\n\n")
        assert builder.suffix_text("X").endswith("<|assistant|><think></think>")
    finally:
        tokenizer.chat_template = None
