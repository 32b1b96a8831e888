"""A packed early-exit engine: each prefix once, no per-candidate K/V copy, full batches.

Drop-in replacement for `optirag.early_exit.EarlyExitScorer` (same constructor, same
`score(...)`, same `ScoreResult`); the reference engine stays as the obviously-correct path
that tests compare against (tests/test_packed.py).

Layout of one launch (one block of layers on a set of rows), a flat token stream, no padding
in the linear layers:

    x: (T, H) = [ prefix tokens of every resident prefix | suffix tokens of every row ]
                  Tp tokens                                 Ts tokens

Attention, per layer (the cascade split; research note gpu_anchors.md section 7):
  - prefix tokens: causal attention within their own prefix (SDPA, right-padded, is_causal);
  - suffix tokens: (a) attention to their own prefix's keys/values: the suffix queries of one
    prefix are cut into chunks of at most `group_tokens` and each chunk attends to that
    prefix's (Pmax) keys with a key-length mask only, (b) causal attention within their own
    suffix; (a) and (b) are merged with their log-sum-exp. A prefix's keys/values are never
    copied per candidate (at most once per query chunk, and not at all when each prefix fits
    in one chunk). Suffix positions continue from their prefix's length.

Early exit: blocks run breadth first. A launch takes units (a prefix and some of its rows) from
the block's queue until `max_tokens`; survivors of a launch go to the next block's queue, so
the next block's launches are refilled from all of the call's survivors and stay full (only
each block's last launch is partial). A prefix runs in a block only while one of its rows
does. One host sync per launch (the exit mask). No row reads another row's tokens, so a row's
score does not depend on its batch mates (beyond float rounding of the batched kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from optirag.backbone import Backbone
from optirag.early_exit import EarlyExitScorer, ExitHeads, ExitRule, ScoreResult, prob_yes

EngineKind = Literal["packed", "reference"]
LAUNCH_TOKENS = 32_768  # a launch's prompt tokens by default (`compute.batch_tokens`)


def make_engine(
    kind: EngineKind,
    backbone: Backbone,
    heads: ExitHeads,
    rule: ExitRule,
    compaction: bool = True,
    max_tokens: int = LAUNCH_TOKENS,
):
    """The engine behind a config key (`exits.engine: packed | reference`); `max_tokens` is
    the packed engine's launch size (`compute.batch_tokens`)."""
    if kind == "packed":
        return PackedEarlyExitScorer(
            backbone, heads, rule, compaction=compaction, max_tokens=max_tokens
        )
    if kind == "reference":
        return EarlyExitScorer(backbone, heads, rule, compaction=compaction)
    raise ValueError(f"unknown engine {kind!r}: packed or reference")


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class _States:
    """Where the token states of some units live: the call's token ids (before block 0,
    `embedded` False) or the output stream of a launch."""

    tensor: torch.Tensor  # (T,) token ids or (T, H) hidden states
    embedded: bool


@dataclass
class _Unit:
    """A prefix (or none: plain prompts) and some of its rows, waiting for the next block."""

    prefix: int  # index into `prefixes`, -1 for plain prompts
    rows: np.ndarray  # (R,) original row indices
    src: _States
    prefix_tok: np.ndarray  # (P,) positions of the prefix's tokens in src (empty if plain)
    row_tok: np.ndarray  # (sum S,) positions of the rows' suffix tokens in src, row-major

    @property
    def tokens(self) -> int:
        return len(self.prefix_tok) + len(self.row_tok)


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """concat(arange(n) for n in lengths), vectorised."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total) - np.repeat(starts, lengths)


@dataclass
class _Launch:
    """Device-side metadata of one launch; built on the host from its units."""

    tp: int  # prefix tokens at the head of the stream
    ts: int  # suffix tokens after them
    rows: torch.Tensor  # (R,) original row index of each row
    last: torch.Tensor  # (R,) stream position of each row's last token
    cos: torch.Tensor  # (T, 1, D)
    sin: torch.Tensor  # (T, 1, D)
    # prefixes, right-padded (Up, Pmax)
    num_prefixes: int
    pmax: int
    pre_slot: torch.Tensor | None  # (Tp,) slot of each prefix token in (Up * Pmax)
    # rows, right-padded (R, Smax)
    smax: int
    row_slot: torch.Tensor  # (Ts,) slot of each suffix token in (R * Smax)
    # query chunks of one prefix each, right-padded (G, Cmax)
    num_groups: int
    cmax: int
    grp_slot: torch.Tensor | None  # (Ts,) slot of each suffix token in (G * Cmax)
    grp_prefix: torch.Tensor | None  # (G,) prefix (0..Up-1) each chunk attends to; None: 0..G-1
    key_bias: torch.Tensor | None  # (G, 1, 1, Pmax) float32, -inf past the prefix's length
    # per prefix, on the host: its length and the span of its rows' tokens in the suffix part
    prefix_spans: list[tuple[int, int, int]]  # (P, first suffix token, end)
    self_bias: torch.Tensor  # (Smax * rep, Smax) float32, -inf above the causal diagonal


# ----------------------------------------------------------------------------- the engine


class PackedEarlyExitScorer:
    """Scores token sequences with early exit, as `EarlyExitScorer` does:

    - plain: `score(suffixes)`, each suffix a whole prompt;
    - shared prefixes: `score(suffixes, prefixes, prefix_of)`, row i's prompt being
      prefixes[prefix_of[i]] + suffixes[i].

    `max_tokens` caps the tokens (prefix + suffix) of one launch; `group_tokens` caps the
    suffix queries that attend to one prefix in one batched kernel. Neither changes a score.
    `attention`: how the two partial attentions of suffix tokens get their log-sum-exp:
    'fused' (the CPU flash kernel, which returns it; the default on CPU) or 'explicit'
    (softmax written out with matmuls; the default elsewhere, e.g. CUDA).
    `compaction` is accepted for compatibility: exited rows always stop running here (the
    reference engine's test shows compaction does not change results).
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: ExitHeads,
        rule: ExitRule,
        compaction: bool = True,
        max_tokens: int = LAUNCH_TOKENS,
        group_tokens: int = 2_048,
        attention: Literal["auto", "fused", "explicit"] = "auto",
    ) -> None:
        self.backbone = backbone
        self.heads = heads
        self.rule = rule
        self.compaction = compaction
        self.max_tokens = max_tokens
        self.group_tokens = group_tokens
        cfg = backbone.model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.rep = self.num_heads // self.num_kv_heads
        if attention not in ("auto", "fused", "explicit"):
            raise ValueError(f"attention {attention!r}: auto, fused or explicit")
        fused_ok = backbone.device.type == "cpu" and hasattr(
            torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
        )
        if attention == "fused" and not fused_ok:
            raise ValueError("fused attention needs the CPU flash kernel (torch >= 2.2, CPU)")
        self.fused = fused_ok if attention == "auto" else attention == "fused"

    # ------------------------------------------------------------------------- public API

    @torch.inference_mode()
    def score(
        self,
        suffixes: list[list[int]],
        prefixes: list[list[int]] | None = None,
        prefix_of: list[int] | None = None,
        keep_hidden: bool = False,
        side: torch.Tensor | None = None,
    ) -> ScoreResult:
        """`side`: (N, K) CF features for hybrid heads. `keep_hidden` also returns each
        head's input, the last-token state (N, heads, H), for head training; it needs the
        'none' rule so every row reaches every head."""
        if keep_hidden and self.rule.kind != "none":
            raise ValueError("keep_hidden needs ExitRule('none')")
        self.heads.check_side(side)
        bb, dev = self.backbone, self.backbone.device
        n, num_heads = len(suffixes), len(self.heads.layers)
        if any(len(s) == 0 for s in suffixes) or (prefixes and any(len(p) == 0 for p in prefixes)):
            raise ValueError("empty token sequence")
        if prefixes and (prefix_of is None or len(prefix_of) != n):
            raise ValueError("shared prefixes need prefix_of, one prefix index per row")

        scores = torch.full((n,), float("nan"), device=dev)
        exit_layers = torch.zeros(n, dtype=torch.int16, device=dev)
        head_probs = torch.full((n, num_heads), float("nan"), device=dev)
        hidden_out = torch.zeros(n, num_heads, bb.hidden_size, device=dev) if keep_hidden else None
        side = None if side is None else side.to(dev)
        suf_len = np.array([len(s) for s in suffixes], dtype=np.int64)  # (N,)
        layer_tokens = 0

        queue = self._first_units(suffixes, prefixes, prefix_of, suf_len) if n else []
        start = 0
        for h, end in enumerate(self.heads.layers):
            survivors: list[_Unit] = []
            for units in self._fill(queue):
                meta, x = self._prepare(units, suf_len)
                layer_tokens += (meta.tp + meta.ts) * (end - start)
                for layer in bb.model.model.layers[start:end]:
                    x = self._layer(layer, x, meta)  # (T, H)
                last = x[meta.last]  # (R, H) each row's last token
                if hidden_out is not None:
                    hidden_out[meta.rows, h] = last.float()
                p = prob_yes(self.heads.heads[h](last, None if side is None else side[meta.rows]))
                p_prev = head_probs[meta.rows, h - 1] if h > 0 else None
                fire = self.rule.fires(p, p_prev) | (h == num_heads - 1)  # (R,)
                head_probs[meta.rows, h] = p
                scores[meta.rows] = torch.where(fire, p, scores[meta.rows])
                exit_layers[meta.rows] = torch.where(
                    fire, torch.full_like(exit_layers[meta.rows], end), exit_layers[meta.rows]
                )
                keep = ~fire.cpu().numpy()  # the launch's one host sync
                survivors += self._survivors(units, keep, _States(x, True), meta, suf_len)
            queue, start = survivors, end
            if not queue:
                break

        return ScoreResult(
            scores=scores.float().cpu(),
            exit_layers=exit_layers.cpu(),
            head_probs=head_probs.float().cpu(),
            layer_tokens=layer_tokens,
            hidden=hidden_out.cpu() if hidden_out is not None else None,
        )

    # ------------------------------------------------------------------------- scheduling

    def _first_units(self, suffixes, prefixes, prefix_of, suf_len) -> list[_Unit]:
        """Block 0's queue: every prefix with its rows (split when they exceed a launch), or
        plain rows in launch-sized units. Token ids of the whole call in one flat tensor:
        [every prefix | every suffix]."""
        prefixes = prefixes or []
        pre_len = np.array([len(p) for p in prefixes], dtype=np.int64)
        flat = [t for p in prefixes for t in p] + [t for s in suffixes for t in s]
        ids = torch.tensor(flat, dtype=torch.long)
        src = _States(self._to_device(ids), embedded=False)
        pre_start = np.cumsum(pre_len) - pre_len
        suf_start = int(pre_len.sum()) + np.cumsum(suf_len) - suf_len

        n = len(suffixes)
        row_prefix = np.asarray(prefix_of, dtype=np.int64) if prefixes else np.full(n, -1)
        order = np.argsort(row_prefix, kind="stable")  # a prefix's rows together, in order
        bounds = np.flatnonzero(np.r_[True, row_prefix[order][1:] != row_prefix[order][:-1], True])
        units = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            rows = order[a:b]
            u = int(row_prefix[rows[0]])
            p_tok = pre_start[u] + np.arange(pre_len[u]) if u >= 0 else np.zeros(0, np.int64)
            # cut the rows into pieces that fit in a launch with their prefix
            cuts = _greedy_cuts(suf_len[rows], max(self.max_tokens - len(p_tok), 1))
            for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
                r = rows[c0:c1]
                tok = np.repeat(suf_start[r], suf_len[r]) + _ragged_arange(suf_len[r])
                units.append(_Unit(u, r, src, p_tok, tok))
        return units

    def _fill(self, queue: list[_Unit]):
        """Yield launches: consecutive units up to `max_tokens` (a unit alone may exceed)."""
        batch, tokens = [], 0
        for unit in queue:
            if batch and tokens + unit.tokens > self.max_tokens:
                yield batch
                batch, tokens = [], 0
            batch.append(unit)
            tokens += unit.tokens
        if batch:
            yield batch

    def _survivors(self, units, keep, out: _States, meta: _Launch, suf_len) -> list[_Unit]:
        """Units for the next block: each unit's rows that did not exit, reading their states
        (and their prefix's) from this launch's output stream. A prefix with no surviving row
        is dropped."""
        nxt, r0, p0, s0 = [], 0, 0, meta.tp
        for unit in units:
            lens = suf_len[unit.rows]
            k = keep[r0 : r0 + len(unit.rows)]
            p_tok = p0 + np.arange(len(unit.prefix_tok))
            if k.any():
                starts = s0 + np.cumsum(lens) - lens
                tok = np.repeat(starts[k], lens[k]) + _ragged_arange(lens[k])
                nxt.append(_Unit(unit.prefix, unit.rows[k], out, p_tok, tok))
            r0 += len(unit.rows)
            p0 += len(unit.prefix_tok)
            s0 += int(lens.sum())
        return nxt

    # ------------------------------------------------------------------------- a launch

    def _to_device(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
        dev = self.backbone.device
        if dev.type == "cuda":  # pinned + async: an H2D copy must not wait for the stream
            return t.pin_memory().to(dev, non_blocking=True)
        return t.to(dev)

    def _prepare(self, units: list[_Unit], suf_len) -> tuple[_Launch, torch.Tensor]:
        """The launch's input stream x (T, H) and its metadata."""
        # Group units by source so each source is gathered once; order within a launch is
        # free (no row reads another's tokens).
        by_src: dict[int, list[_Unit]] = {}
        for unit in units:
            by_src.setdefault(id(unit.src), []).append(unit)
        units[:] = [u for group in by_src.values() for u in group]
        pre_units = [u for u in units if u.prefix >= 0]

        parts_pre, parts_suf = [], []
        for group in by_src.values():
            src = group[0].src
            pre_idx = np.concatenate([u.prefix_tok for u in group])
            suf_idx = np.concatenate([u.row_tok for u in group])
            if len(pre_idx):
                parts_pre.append(self._take(src, pre_idx))
            parts_suf.append(self._take(src, suf_idx))
        x = torch.cat(parts_pre + parts_suf) if len(parts_pre + parts_suf) > 1 else parts_suf[0]

        rows = np.concatenate([u.rows for u in units])
        s_len = suf_len[rows]  # (R,)
        p_len = np.array([len(u.prefix_tok) for u in pre_units], dtype=np.int64)  # (Up,)
        tp, ts = int(p_len.sum()), int(s_len.sum())
        rows_per_unit = np.array([len(u.rows) for u in units])
        row_offset = np.repeat([len(u.prefix_tok) for u in units], rows_per_unit)  # (R,)

        positions = np.concatenate(
            [_ragged_arange(p_len), np.repeat(row_offset, s_len) + _ragged_arange(s_len)]
        )
        cos, sin = self.backbone.rotary(x, self._to_device(positions)[None])  # (1, T, D)
        smax = int(s_len.max())
        row_slot = np.repeat(np.arange(len(rows)), s_len) * smax + _ragged_arange(s_len)
        q_pos = np.arange(smax * self.rep) // self.rep  # folded (Smax, rep) query rows
        self_bias = np.where(np.arange(smax)[None, :] <= q_pos[:, None], 0.0, -np.inf)

        pmax = int(p_len.max()) if len(p_len) else 0
        pre_slot = grp_slot = grp_prefix = key_bias = None
        num_groups = cmax = 0
        if len(pre_units):
            pre_slot = np.repeat(np.arange(len(p_len)), p_len) * pmax + _ragged_arange(p_len)
        q_len = np.array([len(u.row_tok) for u in pre_units], dtype=np.int64)  # (Up,)
        q_end = np.cumsum(q_len)
        spans = [(int(a), int(b - n), int(b)) for a, n, b in zip(p_len, q_len, q_end, strict=True)]
        if len(pre_units) and not self.fused:
            # each prefix's suffix queries, cut into near-equal chunks of <= group_tokens
            chunks = -(-q_len // self.group_tokens)  # (Up,)
            size = -(-q_len // chunks)  # (Up,) tokens per chunk
            cmax = int(size.max())
            local = _ragged_arange(q_len)  # token index within its prefix's queries
            first_group = np.cumsum(chunks) - chunks
            group = np.repeat(first_group, q_len) + local // np.repeat(size, q_len)
            grp_slot = group * cmax + local % np.repeat(size, q_len)
            num_groups = int(chunks.sum())
            owner = np.repeat(np.arange(len(pre_units)), chunks)  # (G,)
            grp_prefix = None if num_groups == len(pre_units) else owner
            valid = np.arange(pmax)[None, :] < p_len[owner][:, None]  # (G, Pmax)
            key_bias = np.where(valid, 0.0, -np.inf)[:, None, None, :]
        dev = lambda a, dt=torch.long: None if a is None else self._to_device(  # noqa: E731
            np.ascontiguousarray(a)).to(dt)  # fmt: skip
        meta = _Launch(
            tp=tp,
            ts=ts,
            rows=dev(rows),
            last=dev(tp + np.cumsum(s_len) - 1),
            cos=cos[0, :, None, :],
            sin=sin[0, :, None, :],
            num_prefixes=len(pre_units),
            pmax=pmax,
            pre_slot=dev(pre_slot),
            smax=smax,
            row_slot=dev(row_slot),
            num_groups=num_groups,
            cmax=cmax,
            grp_slot=dev(grp_slot),
            grp_prefix=dev(grp_prefix),
            key_bias=dev(key_bias, torch.float32),
            prefix_spans=spans,
            self_bias=dev(self_bias, torch.float32),
        )
        return meta, x

    def _take(self, src: _States, idx: np.ndarray) -> torch.Tensor:
        if not src.embedded:
            return self.backbone.embed(src.tensor[self._to_device(idx)])  # (n, H)
        if len(idx) == len(src.tensor) and np.array_equal(idx, np.arange(len(idx))):
            return src.tensor  # the whole stream, in order: no copy
        return src.tensor.index_select(0, self._to_device(idx))

    # ------------------------------------------------------------------------- the model

    def _layer(self, layer, x: torch.Tensor, m: _Launch) -> torch.Tensor:
        """One Llama decoder layer on the packed stream x (T, H), with the weights of the
        transformers modules the backbone wraps (norms, projections and MLP are their own
        modules, so merged LoRA weights are used as they are)."""
        attn = layer.self_attn
        t, hq, kvh, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        h = layer.input_layernorm(x)  # (T, H)
        q = attn.q_proj(h).view(t, hq, d)  # (T, Hq, D)
        k = attn.k_proj(h).view(t, kvh, d)  # (T, KVH, D)
        v = attn.v_proj(h).view(t, kvh, d)
        q, k = _rope(q, m.cos, m.sin), _rope(k, m.cos, m.sin)

        out = []
        kp = vp = None
        if m.tp:
            qp, kp, vp = (_pad(z[: m.tp], m.pre_slot, m.num_prefixes, m.pmax) for z in (q, k, v))
            o = F.scaled_dot_product_attention(  # (Up, Hq, Pmax, D)
                qp.transpose(1, 2), _kv(kp, self.rep), _kv(vp, self.rep),
                is_causal=True, scale=attn.scaling,
            )  # fmt: skip
            out.append(o.transpose(1, 2).reshape(-1, hq, d)[m.pre_slot])  # (Tp, Hq, D)
            kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)  # (Up, KVH, Pmax, D)
        out.append(self._suffix_attention(q[m.tp :], k[m.tp :], v[m.tp :], kp, vp, attn, m))
        o = torch.cat(out) if len(out) > 1 else out[0]  # (T, Hq, D)
        x = x + attn.o_proj(o.reshape(t, hq * d))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _suffix_attention(self, q, k, v, kp, vp, attn, m: _Launch) -> torch.Tensor:
        """Suffix queries (Ts, Hq, D): causal over their own suffix, plus (with prefixes)
        their own prefix's keys/values kp, vp (Up, KVH, Pmax, D), merged by log-sum-exp."""
        r, kvh, rep = len(m.rows), self.num_kv_heads, self.rep
        # (a) own suffix, causal: rows right-padded to (R, Smax), query heads folded per KV head
        qs = _fold(_pad(q, m.row_slot, r, m.smax), kvh, rep)  # (R, KVH, Smax * rep, D)
        ks = _pad(k, m.row_slot, r, m.smax).transpose(1, 2)  # (R, KVH, Smax, D)
        vs = _pad(v, m.row_slot, r, m.smax).transpose(1, 2)
        if kp is None:  # plain prompts: nothing to merge
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=m.self_bias.to(q.dtype), scale=attn.scaling
            )
            return _unfold(o, m.smax, rep)[m.row_slot]  # (Ts, Hq, D)
        o_s, lse_s = self._attend(qs, ks, vs, m.self_bias, attn.scaling)
        o_s, lse_s = (_unfold(z, m.smax, rep)[m.row_slot] for z in (o_s, lse_s))
        # (b) own prefix, no per-row copy of its keys/values
        if self.fused:  # CPU: one kernel call per prefix, its rows' queries as one sequence
            o_p = torch.empty_like(o_s)  # (Ts, Hq, D)
            lse_p = torch.empty_like(lse_s)  # (Ts, Hq, 1)
            kp, vp = kp.contiguous(), vp.contiguous()
            for u, (p, a, b) in enumerate(m.prefix_spans):
                qu = _fold(q[None, a:b], kvh, rep)  # (1, KVH, Q_u * rep, D)
                o, lse = _flash(qu, kp[u : u + 1, :, :p], vp[u : u + 1, :, :p], attn.scaling)
                o_p[a:b], lse_p[a:b] = _unfold(o, b - a, rep), _unfold(lse, b - a, rep)
        else:  # batched: queries in chunks of one prefix each (G, Cmax), key-length mask
            qg = _fold(_pad(q, m.grp_slot, m.num_groups, m.cmax), kvh, rep)  # (G,KVH,Cmax*rep,D)
            if m.grp_prefix is not None:  # a prefix with several chunks: K/V copy per chunk
                kp, vp = kp[m.grp_prefix], vp[m.grp_prefix]  # (G, KVH, Pmax, D)
            o_p, lse_p = _explicit_attention(qg, kp, vp, m.key_bias, attn.scaling)
            o_p, lse_p = (_unfold(z, m.cmax, rep)[m.grp_slot] for z in (o_p, lse_p))
        # merge: the softmax over [prefix keys ; suffix keys] from the two normalised parts
        lse = torch.logaddexp(lse_s, lse_p)  # (Ts, Hq, 1)
        o = o_s * torch.exp(lse_s - lse) + o_p * torch.exp(lse_p - lse)
        return o.to(q.dtype)

    def _attend(self, q, k, v, bias, scale):
        """Attention with its log-sum-exp: q (B, KVH, Q, D), k/v (B, KVH, K, D), additive
        float32 bias broadcastable to (B, KVH, Q, K) -> out (B, KVH, Q, D) float32, normalised,
        and lse (B, KVH, Q, 1) float32."""
        if self.fused:
            return _flash(q, k, v, scale, bias.to(q.dtype).expand(q.shape[0], 1, *bias.shape))
        return _explicit_attention(q, k, v, bias, scale)


# ----------------------------------------------------------------------------- kernels


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama rotary embedding on (T, heads, D) with cos/sin (T, 1, D)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _pad(z: torch.Tensor, slot: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """Packed (n, heads, D) -> right-padded (b, s, heads, D); pads are zero."""
    buf = z.new_zeros(b * s, *z.shape[1:])
    buf.index_copy_(0, slot, z)
    return buf.view(b, s, *z.shape[1:])


def _kv(z: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, S, KVH, D) -> (B, KVH * rep, S, D): each KV head repeated for its query heads."""
    return z.transpose(1, 2).repeat_interleave(rep, dim=1)


def _fold(q: torch.Tensor, kvh: int, rep: int) -> torch.Tensor:
    """(B, S, Hq, D) -> (B, KVH, S * rep, D): the query heads sharing a KV head become extra
    query rows (row s * rep + j is position s, head kv * rep + j, as transformers' repeat_kv
    pairs them), so GQA needs no K/V copy."""
    b, s, _, d = q.shape
    return q.view(b, s, kvh, rep, d).transpose(1, 2).reshape(b, kvh, s * rep, d)


def _unfold(o: torch.Tensor, s: int, rep: int) -> torch.Tensor:
    """(B, KVH, S * rep, X) -> (B * S, Hq, X), the inverse of _fold's layout."""
    b, kvh, _, x = o.shape
    return o.view(b, kvh, s, rep, x).transpose(1, 2).reshape(b * s, kvh * rep, x)


def _flash(q, k, v, scale, mask=None):
    """The CPU flash kernel, which also returns the log-sum-exp (see _attend)."""
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    return o.float(), lse[..., None]


def _explicit_attention(q, k, v, bias, scale):
    """Softmax attention written out, with its log-sum-exp (see _attend); any device."""
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale + bias  # (B, KVH, Q, K)
    top = logits.amax(dim=-1, keepdim=True)  # finite: every query sees >= 1 key
    e = torch.exp(logits - top)
    total = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(e.to(v.dtype), v).float() / total
    return out, top + torch.log(total)


def _greedy_cuts(lengths: np.ndarray, room: int) -> list[int]:
    """Boundaries cutting consecutive items of `lengths` into runs of at most `room` tokens
    (an item longer than `room` gets a run of its own)."""
    cuts, total = [0], 0
    for i, n in enumerate(lengths):
        if total and total + n > room:
            cuts.append(i)
            total = 0
        total += int(n)
    cuts.append(len(lengths))
    return cuts
