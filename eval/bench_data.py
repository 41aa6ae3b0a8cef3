"""Benchmark: preprocess every Perov-5 structure, then load it again from the cache.

    python -m eval.bench_data --out bench_data.json

Reports the cold preprocessing time (all cores, progress bar), the cached load time and
their ratio, and the padding waste of training batches. Runs in a fresh temporary cache so
the cold number is really cold.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from autoperi_jax.datasets import load_dataset
from autoperi_jax.graph import BatchIterator, GraphSettings


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="perov_5")
    p.add_argument("--cutoff", type=float, default=6.0)
    p.add_argument("--max-neighbors", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    settings = GraphSettings(cutoff=args.cutoff, max_neighbors=args.max_neighbors)
    result: dict = {"dataset": args.dataset, "settings": vars(args), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as cache:
        cold = warm = 0.0
        total = 0
        for split in ("train", "val", "test"):
            t = time.perf_counter()
            ds = load_dataset(args.dataset, split=split, settings=settings, cache_dir=cache)
            cold += time.perf_counter() - t
            total += len(ds)
            t = time.perf_counter()
            ds = load_dataset(args.dataset, split=split, settings=settings, cache_dir=cache)
            warm += time.perf_counter() - t
            if split == "train":
                it = BatchIterator(ds.graphs, args.batch_size, seed=0)
                rn = re = pn = pe = 0
                for _ in range(it.steps_per_epoch):
                    b = next(it)
                    rn += int(b.nodes["mask"].sum())
                    re += int(b.edges["mask"].sum())
                    pn += b.nodes["mask"].shape[0]
                    pe += b.edges["mask"].shape[0]
                result["padding_waste_nodes"] = 1 - rn / pn
                result["padding_waste_edges"] = 1 - re / pe
                result["buckets"] = [vars(b) for b in it.buckets]
    result.update(
        structures=total,
        cold_preprocess_s=cold,
        cached_load_s=warm,
        cache_speedup=cold / warm,
    )
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
