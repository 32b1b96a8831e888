"""A packed early-exit engine: each prefix once, no per-candidate K/V copy, full batches.

Drop-in replacement for `optirag.engine.reference.ReferenceEngine` (same `score(...)`, same
`ScoreResult`); the reference engine stays as the obviously-correct path
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

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from optirag.backbones import Backbone
from optirag.backbones.attention import attention_with_lse, flash_cpu, has_flash_cpu, merge
from optirag.backbones.backbone import Rotary
from optirag.early_exit import ExitHeads, ExitRule, ScoreResult, check_score_call, prob_yes

LAUNCH_TOKENS = 32_768  # a launch's prompt tokens by default (`compute.batch_tokens`)


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


@dataclass(eq=False)
class _Launch:
    """Metadata of one launch, built on the host from its units; what the attention of every
    layer of the block reads (`attend`, called by optirag.backbones.attention)."""

    engine: PackedEngine
    tp: int  # prefix tokens at the head of the stream
    ts: int  # suffix tokens after them
    rows: torch.Tensor  # (R,) original row index of each row
    last: torch.Tensor  # (R,) stream position of each row's last token
    rotary: Rotary  # (cos, sin) (1, T, D) per layer type
    longest: int  # the longest prompt (prefix + suffix) of the launch
    # prefixes, right-padded (Up, Pmax)
    num_prefixes: int
    pmax: int
    p_len: np.ndarray  # (Up,) prefix lengths
    pre_slot: torch.Tensor | None  # (Tp,) slot of each prefix token in (Up * Pmax)
    # rows, right-padded (R, Smax)
    smax: int
    row_slot: torch.Tensor  # (Ts,) slot of each suffix token in (R * Smax)
    q_len: np.ndarray  # (Up,) suffix tokens of each prefix's rows
    suffix_pos: np.ndarray  # (Ts,) absolute position of each suffix token
    # per prefix, on the host: its length and the span of its rows' tokens in the suffix part
    prefix_spans: list[tuple[int, int, int]]  # (P, first suffix token, end)
    biases: dict = field(default_factory=dict)  # masks built for this launch, by kind

    def attend(self, q, k, v, *, scale, softcap=None, window=None) -> torch.Tensor:
        """q (1, Hq, T, D), k/v (1, KVH, T, D) of the packed stream -> (1, T, Hq, D)."""
        return self.engine._attention(q, k, v, self, scale, softcap, window)

    def _device(self, a: np.ndarray, dtype=torch.long) -> torch.Tensor:
        return self.engine._to_device(np.ascontiguousarray(a)).to(dtype)

    def _cached(self, key: tuple, make) -> torch.Tensor:
        """A mask built once per launch, however many layers read it."""
        if key not in self.biases:
            self.biases[key] = make()
        return self.biases[key]

    def causal_bias(self, n: int, window: int | None) -> torch.Tensor:
        """(n * rep, n) float32 over folded query rows: 0 where a query may see a key of
        its own sequence (causal, within the window), -inf elsewhere."""
        return self._cached(("causal", n, window), lambda: self._causal_bias(n, window))

    def _causal_bias(self, n: int, window: int | None) -> torch.Tensor:
        q = np.arange(n * self.engine.rep)[:, None] // self.engine.rep
        keys = np.arange(n)[None, :]
        ok = (keys <= q) & ((q - keys < window) if window else True)
        return self._device(np.where(ok, 0.0, -np.inf), torch.float32)

    @functools.cached_property
    def groups(self) -> _Groups:
        """Suffix queries of one prefix each, cut into near-equal chunks of <= group_tokens
        (G, Cmax), for the batched prefix attention."""
        q_len, size_cap = self.q_len, self.engine.group_tokens
        chunks = -(-q_len // size_cap)  # (Up,)
        size = -(-q_len // chunks)  # (Up,) tokens per chunk
        cmax = int(size.max())
        local = _ragged_arange(q_len)  # token index within its prefix's queries
        first_group = np.cumsum(chunks) - chunks
        group = np.repeat(first_group, q_len) + local // np.repeat(size, q_len)
        slot = group * cmax + local % np.repeat(size, q_len)
        num = int(chunks.sum())
        owner = np.repeat(np.arange(len(q_len)), chunks)  # (G,)
        return _Groups(
            num,
            cmax,
            slot,
            owner,
            self._device(slot),
            None if num == len(q_len) else self._device(owner),
        )

    def prefix_bias(self, window: int | None) -> torch.Tensor:
        """(G, 1, Cmax * rep or 1, Pmax) float32: a chunk's queries see their prefix's real
        keys (within the window)."""
        return self._cached(("prefix", window), lambda: self._prefix_bias(window))

    def _prefix_bias(self, window: int | None) -> torch.Tensor:
        g, rep = self.groups, self.engine.rep
        keys = np.arange(self.pmax)[None, None, :]
        valid = keys < self.p_len[g.owner][:, None, None]  # (G, 1, Pmax)
        if window:
            q_pos = np.zeros(g.num * g.cmax, dtype=np.int64)
            q_pos[g.slot] = self.suffix_pos
            q_pos = np.repeat(q_pos.reshape(g.num, g.cmax), rep, axis=1)[:, :, None]
            valid = valid & (q_pos - keys < window)  # (G, Cmax * rep, Pmax)
        return self._device(np.where(valid, 0.0, -np.inf)[:, None], torch.float32)


@dataclass
class _Groups:
    num: int
    cmax: int
    slot: np.ndarray  # (Ts,) on the host
    owner: np.ndarray  # (G,) on the host
    slot_dev: torch.Tensor  # (Ts,) slot of each suffix token in (G * Cmax)
    owner_dev: torch.Tensor | None  # (G,) prefix each chunk attends to; None: 0..G-1


# ----------------------------------------------------------------------------- the engine


class PackedEngine:
    """Scores token sequences with early exit, as `ReferenceEngine` does:

    - plain: `score(suffixes)`, each suffix a whole prompt;
    - shared prefixes: `score(suffixes, prefixes, prefix_of)`, row i's prompt being
      prefixes[prefix_of[i]] + suffixes[i].

    `max_tokens` caps the tokens (prefix + suffix) of one launch; `group_tokens` caps the
    suffix queries that attend to one prefix in one batched kernel. Neither changes a score.
    `attention`: how the two partial attentions of suffix tokens get their log-sum-exp:
    'fused' (the CPU flash kernel, which returns it; the default on CPU) or 'explicit'
    (softmax written out with matmuls; the default elsewhere, e.g. CUDA).
    `compaction` is accepted for compatibility: exited rows always stop running here (the
    reference engine's test shows compaction does not change results). Layers with a logit
    soft-cap or a sliding window shorter than a launch's longest prompt take the 'explicit'
    kernels whatever `attention` says (the CPU flash kernel has no soft-cap).
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: ExitHeads,
        rule: ExitRule,
        *,
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
        cfg = backbone.config
        self.rep = cfg.num_attention_heads // cfg.num_key_value_heads
        if attention not in ("auto", "fused", "explicit"):
            raise ValueError(f"attention {attention!r}: auto, fused or explicit")
        fused_ok = backbone.device.type == "cpu" and has_flash_cpu()
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
        check_score_call(self.rule, self.heads, keep_hidden, side)
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
                x = bb.run_layers(x[None], start, end, meta.rotary, attention=meta)[0]  # (T, H)
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

        suffix_pos = np.repeat(row_offset, s_len) + _ragged_arange(s_len)
        positions = np.concatenate([_ragged_arange(p_len), suffix_pos])
        rotary = self.backbone.rotary(x[None], self._to_device(positions)[None])  # (1, T, D)
        smax = int(s_len.max())
        row_slot = np.repeat(np.arange(len(rows)), s_len) * smax + _ragged_arange(s_len)
        pmax = int(p_len.max()) if len(p_len) else 0
        pre_slot = None
        if len(pre_units):
            pre_slot = np.repeat(np.arange(len(p_len)), p_len) * pmax + _ragged_arange(p_len)
        q_len = np.array([len(u.row_tok) for u in pre_units], dtype=np.int64)  # (Up,)
        q_end = np.cumsum(q_len)
        spans = [(int(a), int(b - n), int(b)) for a, n, b in zip(p_len, q_len, q_end, strict=True)]
        dev = lambda a: None if a is None else self._to_device(a)  # noqa: E731
        meta = _Launch(
            engine=self,
            tp=tp,
            ts=ts,
            rows=dev(rows),
            last=dev(tp + np.cumsum(s_len) - 1),
            rotary=rotary,
            longest=int((row_offset + s_len).max()),
            num_prefixes=len(pre_units),
            pmax=pmax,
            p_len=p_len,
            pre_slot=dev(pre_slot),
            smax=smax,
            row_slot=dev(row_slot),
            q_len=q_len,
            suffix_pos=suffix_pos,
            prefix_spans=spans,
        )
        return meta, x

    def _take(self, src: _States, idx: np.ndarray) -> torch.Tensor:
        if not src.embedded:
            return self.backbone.embed(src.tensor[self._to_device(idx)])  # (n, H)
        if len(idx) == len(src.tensor) and np.array_equal(idx, np.arange(len(idx))):
            return src.tensor  # the whole stream, in order: no copy
        return src.tensor.index_select(0, self._to_device(idx))

    # ------------------------------------------------------------------------- the model

    def _attention(self, q, k, v, m: _Launch, scale, softcap, window) -> torch.Tensor:
        """One layer's attention on the packed stream: q (1, Hq, T, D), k/v (1, KVH, T, D)
        -> (1, T, Hq, D). Prefix tokens attend causally within their prefix; suffix tokens
        see their own suffix causally and their prefix's keys, merged by log-sum-exp."""
        q, k, v = (z[0].transpose(0, 1) for z in (q, k, v))  # (T, heads, D)
        hq, d, rep = q.shape[1], q.shape[2], self.rep
        window = window if window is not None and window < m.longest else None  # else a no-op
        plain = softcap is None and window is None
        out = []
        kp = vp = None
        if m.tp:
            qp, kp, vp = (_pad(z[: m.tp], m.pre_slot, m.num_prefixes, m.pmax) for z in (q, k, v))
            if plain:
                o = F.scaled_dot_product_attention(  # (Up, Hq, Pmax, D)
                    qp.transpose(1, 2), _kv(kp, rep), _kv(vp, rep), is_causal=True, scale=scale
                )
                o = o.transpose(1, 2).reshape(-1, hq, d)
            else:
                o, _ = attention_with_lse(
                    _fold(qp, k.shape[1], rep),
                    kp.transpose(1, 2),
                    vp.transpose(1, 2),
                    m.causal_bias(m.pmax, window),
                    scale,
                    softcap,
                )
                o = _unfold(o, m.pmax, rep).to(q.dtype)
            out.append(o[m.pre_slot])  # (Tp, Hq, D)
            kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)  # (Up, KVH, Pmax, D)
        fused = self.fused and plain
        out.append(
            self._suffix_attention(
                q[m.tp :], k[m.tp :], v[m.tp :], kp, vp, m, scale, softcap, window, fused
            )
        )
        return (torch.cat(out) if len(out) > 1 else out[0])[None]

    def _suffix_attention(self, q, k, v, kp, vp, m: _Launch, scale, softcap, window, fused):
        """Suffix queries (Ts, Hq, D): causal over their own suffix, plus (with prefixes)
        their own prefix's keys/values kp, vp (Up, KVH, Pmax, D), merged by log-sum-exp."""
        r, kvh, rep = len(m.rows), k.shape[1], self.rep
        # (a) own suffix, causal: rows right-padded to (R, Smax), query heads folded per KV head
        qs = _fold(_pad(q, m.row_slot, r, m.smax), kvh, rep)  # (R, KVH, Smax * rep, D)
        ks = _pad(k, m.row_slot, r, m.smax).transpose(1, 2)  # (R, KVH, Smax, D)
        vs = _pad(v, m.row_slot, r, m.smax).transpose(1, 2)
        self_bias = m.causal_bias(m.smax, window)
        if kp is None and softcap is None:  # plain prompts: nothing to merge
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=self_bias.to(q.dtype), scale=scale
            )
            return _unfold(o, m.smax, rep)[m.row_slot]  # (Ts, Hq, D)
        if fused:
            o_s, lse_s = flash_cpu(qs, ks, vs, scale, self_bias.to(q.dtype).expand(r, 1, -1, -1))
        else:
            o_s, lse_s = attention_with_lse(qs, ks, vs, self_bias, scale, softcap)
        o_s, lse_s = (_unfold(z, m.smax, rep)[m.row_slot] for z in (o_s, lse_s))
        if kp is None:
            return o_s.to(q.dtype)
        # (b) own prefix, no per-row copy of its keys/values
        if fused:  # CPU: one kernel call per prefix, its rows' queries as one sequence
            o_p = torch.empty_like(o_s)  # (Ts, Hq, D)
            lse_p = torch.empty_like(lse_s)  # (Ts, Hq, 1)
            kp, vp = kp.contiguous(), vp.contiguous()
            for u, (p, a, b) in enumerate(m.prefix_spans):
                qu = _fold(q[None, a:b], kvh, rep)  # (1, KVH, Q_u * rep, D)
                o, lse = flash_cpu(qu, kp[u : u + 1, :, :p], vp[u : u + 1, :, :p], scale)
                o_p[a:b], lse_p[a:b] = _unfold(o, b - a, rep), _unfold(lse, b - a, rep)
        else:  # batched: queries in chunks of one prefix each (G, Cmax), key-length mask
            g = m.groups
            qg = _fold(_pad(q, g.slot_dev, g.num, g.cmax), kvh, rep)  # (G, KVH, Cmax * rep, D)
            if g.owner_dev is not None:  # a prefix with several chunks: K/V copy per chunk
                kp, vp = kp[g.owner_dev], vp[g.owner_dev]  # (G, KVH, Pmax, D)
            o_p, lse_p = attention_with_lse(qg, kp, vp, m.prefix_bias(window), scale, softcap)
            o_p, lse_p = (_unfold(z, g.cmax, rep)[g.slot_dev] for z in (o_p, lse_p))
        return merge(o_s, lse_s, o_p, lse_p).to(q.dtype)


# ----------------------------------------------------------------------------- kernels


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
