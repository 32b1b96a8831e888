"""The size of one shuffle map task's shard per partition for the context stage's routed
history rows, zstd-compressed as Ray Data's object-store shuffle sends them: a shard under
Ray's inline limit (100 KiB, `max_direct_call_object_size`) is returned inline and kept in
its owner's heap, the driver's.

    python bench/shuffle_shard_size.py   # bench/results/shuffle_shard_size.json

On bench/stream.py's synthetic data (2 x 10^5 users, 10 history rows each); the shard size
scales with the map task's input (compute.shuffle_batch_mib) over the partitions.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from optirag import schema as S  # noqa: E402
from optirag import storage  # noqa: E402
from optirag.config import load_config  # noqa: E402
from optirag.ids import range_of  # noqa: E402
from optirag.pipelines import context, synthetic  # noqa: E402

INLINE_KIB = 100


def zstd_kib(table: pa.Table) -> float:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().size / 1024


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(
            None,
            [
                f"storage.root={workdir}",
                "synthetic.num_users=200000",
                "synthetic.num_items=20000",
                "synthetic.history_per_user=10",
                "synthetic.candidate_users=100",
            ],
        )
        synthetic.run(cfg.synthetic, cfg.storage)
        history = storage.read_table(f"{workdir}/synthetic/interactions/train", cfg.storage)
    for partitions in (50, 150, 200):
        keyed = context._keyed(
            history, context.HISTORY, range_of(history[S.USER_ID].to_numpy(), partitions)
        )
        keys = keyed[context.KEY].to_numpy()
        kib = [zstd_kib(keyed.filter(pa.array(keys == p))) for p in range(partitions)]
        per_mib = float(np.median(kib)) * 2**20 / keyed.nbytes  # shard KiB per MiB of input
        rows.append(
            {
                "partitions": partitions,
                "input_mib": round(keyed.nbytes / 2**20, 1),
                "median_shard_kib": round(float(np.median(kib)), 1),
                "shard_kib_at_128_mib": round(per_mib * 128, 1),
                "shard_kib_at_1024_mib": round(per_mib * 1024, 1),
            }
        )
    result = {
        "machine": machine(),
        "command": "python bench/shuffle_shard_size.py",
        "inline_limit_kib": INLINE_KIB,
        "runs": rows,
    }
    write_results(
        "shuffle_shard_size",
        result,
        [
            (
                r["partitions"],
                r["input_mib"],
                r["median_shard_kib"],
                r["shard_kib_at_128_mib"],
                r["shard_kib_at_1024_mib"],
            )
            for r in rows
        ],
        ("partitions", "input MiB", "median shard KiB", "at 128 MiB input", "at 1024 MiB input"),
    )


if __name__ == "__main__":
    main()
