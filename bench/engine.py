"""Reference engine vs packed engine, on the same pairs, in one run:

  full depth | early exit at the calibrated tau (trained heads) | early exit at tau 0.1
  x  old engine (optirag.early_exit) | new engine (optirag.engine.packed)
  x  the calls the scorer makes for that engine ("job calls": compute.batch_rows rows for
     the old one; 4 launches of compute.batch_tokens prompt tokens for the new one, which
     cuts its launches and refills them after each exit) | every pair in one call

    python bench/engine.py --config conf/demo.yaml [--users 10 --per-user 20]
    python bench/engine.py --backbone tiny          # the tiny random Llama, untrained heads
    python bench/engine.py --users 200 --per-user 50 --one-call   # on a GPU
    python bench/engine.py --shape qwen3-0.6b --users 4 --per-user 10  # a family's real shape

The pairs are bench/early_exit.py's (same seed, users, items and prompts). The pair scorer
builds each call's engine inputs once per engine (recorded, not timed); only the engines'
`score` calls are timed. Reports pairs/s, layer-tokens per pair, the model FLOPs the rows needed
(counted from the model config: q/k/v/o, MLP, attention over the real causal context, for
the layers each row and each prefix ran; padding is not counted), achieved FLOP/s and its
fraction of the device's peak (a table of known GPUs; on a CPU, or a GPU not in the table,
a large matmul in the bench's dtype measures it). bf16 on a GPU (backbone.dtype=auto).
Writes bench/results/engine.json (CPU) or engine_gpu.json (CUDA, card named in the JSON);
`_tiny` is appended for the tiny backbone, `_<shape>` for `--shape`: a registered family at a
real checkpoint's shape (SHAPES) with random weights, built once under backbone.cache_dir with
the tiny tokenizer (speed only: random heads, so early exit there says nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from optirag import schema as S  # noqa: E402
from optirag.backbones import load_backbone  # noqa: E402
from optirag.config import load_config  # noqa: E402
from optirag.context import ContextStore  # noqa: E402
from optirag.early_exit import (  # noqa: E402
    ExitHeads,
    ExitRule,
    ScoreResult,
    default_exit_layers,
)
from optirag.engine import PackedEngine, ReferenceEngine  # noqa: E402
from optirag.model_files import local_backbone  # noqa: E402
from optirag.prompts import PromptBuilder  # noqa: E402

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; SXM parts).
GPU_PEAK_BF16 = {
    "H200": 989.4,
    "H100": 989.4,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}


# Real checkpoints' shapes (their config.json), as transformers config classes and arguments.
SHAPES = {
    "qwen3-0.6b": (
        "Qwen3Config",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
}


# ----------------------------------------------------------------------------- project glue


def shaped_model(shape: str, cache_dir: str) -> Path:
    """A random checkpoint of SHAPES[shape] (bf16 safetensors) with the tiny tokenizer."""
    import transformers

    from optirag.tiny import build_tiny_llama

    path = Path(cache_dir, f"shape-{shape}")
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    build_tiny_llama(tmp, num_layers=1)  # its tokenizer; the model is replaced below
    cls, kwargs = SHAPES[shape]
    config = getattr(transformers, cls)(**kwargs, pad_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)
    return path


def _pair_scorer_class():
    from optirag.pair_scorer import PairScorer

    return PairScorer


def _prompt_tables(cfg):
    from optirag.artifacts import read_prompt_tables

    return read_prompt_tables(cfg)


def _trained_heads(cfg, backbone):
    """(heads, exit config, side features) of the trained heads, or None when there are none
    or they were trained for another depth."""
    from optirag.artifacts import has_trained_heads, load_scoring_model

    if not has_trained_heads(cfg):
        return None
    try:
        model = load_scoring_model(cfg, backbone)
    except ValueError:  # another backbone depth
        return None
    return model.heads, model.exit_config, model.side_features


class _Recorder:
    """Stands in for the engine inside the pair scorer: keeps each batch's inputs."""

    def __init__(self, num_heads: int) -> None:
        self.calls: list[tuple] = []
        self.num_heads = num_heads

    def score(self, suffixes, prefixes=None, prefix_of=None, keep_hidden=False, side=None):
        self.calls.append((suffixes, prefixes, prefix_of, side))
        n = len(suffixes)
        return ScoreResult(
            torch.zeros(n), torch.zeros(n, dtype=torch.int16), torch.zeros(n, self.num_heads)
        )


# ----------------------------------------------------------------------------- FLOPs


def layer_flops(config) -> tuple[float, float]:
    """(FLOPs per token per layer in the linear maps, FLOPs per (query, key) pair per layer
    in attention), from a Llama config."""
    h, i = config.hidden_size, config.intermediate_size
    hq, kvh = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    linear = 2 * (h * hq * d + 2 * h * kvh * d + hq * d * h + 3 * h * i)
    return float(linear), float(4 * hq * d)  # QK^T and PV


def model_flops(calls, exit_layers: np.ndarray, layers: list[int], config) -> float:
    """FLOPs the rows of `calls` needed: each row's tokens for the layers it ran, each prefix
    for the blocks any of its rows ran, attention over each token's real causal context."""
    lin, att = layer_flops(config)
    total, row0 = 0.0, 0
    for suffixes, prefixes, prefix_of, _ in calls:
        ran = exit_layers[row0 : row0 + len(suffixes)]
        row0 += len(suffixes)
        s = np.array([len(x) for x in suffixes], dtype=np.float64)
        if prefixes:
            p_len = np.array([len(x) for x in prefixes], dtype=np.float64)
            p = p_len[np.asarray(prefix_of)]
            depth = np.zeros(len(prefixes))
            np.maximum.at(depth, np.asarray(prefix_of), ran)
            total += float((depth * (p_len * lin + att * p_len * (p_len + 1) / 2)).sum())
        else:
            p = np.zeros_like(s)
        # suffix token j (0-based) attends to p + j + 1 keys
        total += float((ran * (s * lin + att * (s * p + s * (s + 1) / 2))).sum())
    return total


def device_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """The device's peak FLOP/s: a known GPU's data-sheet figure, else a measured matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_BF16.items():
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return {"flops": tflops * 1e12, "source": f"data sheet, {key} dense bf16"}
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    reps = 50 if device.type == "cuda" else 5
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    flops = 2 * n**3 * reps / (time.perf_counter() - start)
    return {"flops": flops, "source": f"measured: {n}x{n} matmul, {dtype}"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- runs


def merge_calls(calls) -> list[tuple]:
    """Every recorded batch as one call (prefixes renumbered; a prefix split across batches
    appears once per batch, as it ran)."""
    suffixes, prefixes, prefix_of, sides = [], [], [], []
    for suf, pre, of, side in calls:
        suffixes += suf
        if pre:
            prefix_of += [len(prefixes) + j for j in of]
            prefixes += pre
        if side is not None:
            sides.append(side)
    return [(suffixes, prefixes or None, prefix_of or None, torch.cat(sides) if sides else None)]


def run(engine, calls, device) -> tuple[float, ScoreResult]:
    _sync(device)
    start = time.perf_counter()
    parts = [engine.score(suf, pre, of, side=side) for suf, pre, of, side in calls]
    _sync(device)
    seconds = time.perf_counter() - start
    merged = ScoreResult(
        scores=torch.cat([r.scores for r in parts]),
        exit_layers=torch.cat([r.exit_layers for r in parts]),
        head_probs=torch.cat([r.head_probs for r in parts]),
        layer_tokens=sum(r.layer_tokens for r in parts),
    )
    return seconds, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/demo.yaml")
    parser.add_argument("--backbone", choices=["config", "tiny"], default="config")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="a family's real shape, random weights (overrides --backbone)",
    )
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--per-user", type=int, default=20)
    parser.add_argument(
        "--tau",
        type=float,
        default=0.1,
        help="early exit tau besides the calibrated one (agreement rule)",
    )
    parser.add_argument(
        "--one-call", action="store_true", help="also score every pair in one engine call"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    parser.add_argument("--name", help="results file name (default by device and backbone)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.backbone == "tiny":
        overrides.append("backbone.source=tiny")
    cfg = load_config(args.config, overrides)
    if args.shape:
        path = shaped_model(args.shape, cfg.backbone.cache_dir)
        cfg = load_config(
            args.config, [*overrides, "backbone.source=path", f"backbone.path={path}"]
        )
    backbone = load_backbone(local_backbone(cfg))
    dev = backbone.device

    trained = _trained_heads(cfg, backbone)
    if trained is not None:
        heads, exit_config, side_features = trained
    else:
        layers = cfg.exits.layers or default_exit_layers(backbone.num_layers, cfg.exits.num_heads)
        answers = PromptBuilder(backbone.tokenizer, cfg.prompts).answer_ids
        heads = ExitHeads.from_backbone(backbone, layers, answers=answers)
        exit_config, side_features = {}, None
    train, items, neighbors = _prompt_tables(cfg)
    contexts = ContextStore(train, items, neighbors, cfg.prompts)
    prompts = PromptBuilder(backbone.tokenizer, cfg.prompts)

    # bench/early_exit.py's pairs
    rng = np.random.default_rng(0)
    users = rng.choice(np.unique(train[S.USER_ID].to_numpy()), args.users, replace=False)
    catalog = items[S.ITEM_ID].to_numpy()
    pair_users = np.repeat(users, args.per_user)
    pair_items = np.concatenate([rng.choice(catalog, args.per_user, replace=False) for _ in users])

    def record(engine: str) -> list[tuple]:
        """The engine inputs of each call the pair scorer makes for this engine kind."""
        scorer = _pair_scorer_class()(
            backbone,
            heads,
            ExitRule("none"),
            contexts,
            prompts,
            share_prefixes=True,
            batch_rows=cfg.compute.batch_rows,
            side_features=side_features,
            engine=engine,
            batch_tokens=cfg.compute.batch_tokens,
        )
        scorer.engine = recorder = _Recorder(len(heads.layers))
        scorer.score(pair_users, pair_items)
        return recorder.calls

    job_calls = {"old": record("reference"), "new": record("packed")}
    n = len(pair_users)

    rules = [("full depth", ExitRule("none"))]
    if exit_config.get("threshold") is not None:
        kind = exit_config.get("rule", "agreement")
        rules.append(
            (
                f"calibrated {kind} {exit_config['threshold']}",
                ExitRule(kind, float(exit_config["threshold"])),
            )
        )
    rules.append((f"agreement tau={args.tau}", ExitRule("agreement", args.tau)))
    max_tokens = cfg.compute.batch_tokens
    engines = {
        "old": lambda rule: ReferenceEngine(backbone, heads, rule),
        "new": lambda rule: PackedEngine(backbone, heads, rule, max_tokens=max_tokens),
    }
    suf, pre, of, side = job_calls["old"][0]
    warm = [(suf[:2], pre, of[:2] if of else None, None if side is None else side[:2])]
    for make in engines.values():  # warm-up: lazy initialisation is not timed
        run(make(ExitRule("none")), warm, dev)

    peak = device_peak(dev, backbone.dtype)
    rows, reference = [], {}
    one_call = merge_calls(job_calls["old"])
    batchings = [("job calls", job_calls)]
    if args.one_call:
        batchings.append(("one call", {"old": one_call, "new": one_call}))
    for batching, calls_of in batchings:
        for rule_name, rule in rules:
            for engine_name, make in engines.items():
                calls = calls_of[engine_name]
                cpu = time.process_time()
                seconds, out = run(make(rule), calls, dev)
                cpu = time.process_time() - cpu
                exits = out.exit_layers.numpy().astype(np.float64)
                flops = model_flops(calls, exits, heads.layers, backbone.model.config)
                key = (batching, rule_name)
                if engine_name == "old":
                    reference[key] = out
                ref = reference[key]
                rows.append(
                    {
                        "engine": engine_name,
                        "batching": batching,
                        "rule": rule_name,
                        "pairs": n,
                        "seconds": round(seconds, 3),
                        "pairs_per_s": round(n / seconds, 2),
                        "process_cpu_seconds": round(cpu, 3),
                        "layer_tokens_per_pair": round(out.layer_tokens / n, 1),
                        "mean_exit_layer": round(float(exits.mean()), 2),
                        "model_gflop_per_pair": round(flops / n / 1e9, 3),
                        "achieved_tflop_s": round(flops / seconds / 1e12, 4),
                        "fraction_of_peak": round(flops / seconds / peak["flops"], 4),
                        "max_abs_score_diff_vs_old": float((out.scores - ref.scores).abs().max()),
                        "exit_layers_equal_old": bool(
                            torch.equal(out.exit_layers, ref.exit_layers)
                        ),
                    }
                )
                print(rows[-1], flush=True)

    def speed(engine, batching, rule_name):
        return next(
            r["pairs_per_s"]
            for r in rows
            if (r["engine"], r["batching"], r["rule"]) == (engine, batching, rule_name)
        )

    tau_name = rules[-1][0]
    summary = {}
    for batching, _ in batchings:
        for rule_name, _ in rules:
            summary[f"new/old pairs/s, {rule_name}, {batching}"] = round(
                speed("new", batching, rule_name) / speed("old", batching, rule_name), 2
            )
        for engine in engines:
            summary[f"{engine}: {tau_name} / full depth, {batching}"] = round(
                speed(engine, batching, tau_name) / speed(engine, batching, "full depth"), 2
            )
    prompt_tokens = [(sum(map(len, c[0])), sum(map(len, c[1] or []))) for c in one_call]
    result = {
        "machine": machine(),
        "backbone": backbone.version,
        "dtype": str(backbone.dtype),
        "family": backbone.family.name,
        "shape": args.shape,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "peak_flops": peak,
        "trained_heads": trained is not None,
        "layers": heads.layers,
        "side_features": list(heads.side_names),
        "batch_rows": cfg.compute.batch_rows,
        "batch_tokens": max_tokens,
        "engine_calls": {k: len(v) for k, v in job_calls.items()},
        "users": args.users,
        "candidates_per_user": args.per_user,
        "suffix_tokens_per_pair": round(sum(s for s, _ in prompt_tokens) / n, 1),
        "prefix_tokens_per_user": round(sum(p for _, p in prompt_tokens) / args.users, 1),
        "timed": "engine.score calls only (prompts built once beforehand)",
        "summary": summary,
        "rows": rows,
    }
    name = args.name or ("engine_gpu" if dev.type == "cuda" else "engine")
    if args.backbone == "tiny" and not args.name:
        name += "_tiny"
    if args.shape and not args.name:
        name += "_" + args.shape.replace("-", "_").replace(".", "_")
    write_results(
        name,
        result,
        [
            (
                r["engine"],
                r["batching"],
                r["rule"],
                r["pairs_per_s"],
                r["layer_tokens_per_pair"],
                r["mean_exit_layer"],
                r["achieved_tflop_s"],
                r["fraction_of_peak"],
            )
            for r in rows
        ],
        (
            "engine",
            "batching",
            "rule",
            "pairs/s",
            "layer-tokens/pair",
            "mean exit layer",
            "TFLOP/s",
            "fraction of peak",
        ),
    )
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
