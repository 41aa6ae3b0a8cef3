"""Ablation of the image embedding f(k_ij): same config and budget, one run per option.

    python -m train.ablation --config train/configs/perov_5.py --root runs/ablation \\
        --options none raw self_image frac --steps 1500 --eval 512 [--config.KEY=VALUE ...]

For every option it trains ``ROOT/OPTION`` (restarting from a finished checkpoint if there
is one), then reconstructs the first ``--eval`` crystals of the test split twice: as
stored, and after a random translation of all atoms (mod 1, image vectors updated), which
changes the integer labels k_ij but not the crystal. Invariant options give the same
numbers on both; ``raw`` need not. Writes ``ROOT/ablation.json`` and prints a markdown
table (match rate / RMSE with `train.trainer.match_metrics`, CDVAE matcher tolerances).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from train.cli import apply_overrides, load_config
from train.trainer import (
    augment_graph,
    build_model,
    build_settings,
    load_checkpoint,
    load_split,
    match_metrics,
    reconstruct_dataset,
    train_and_evaluate,
)


def evaluate_run(workdir: Path, n: int, seed: int = 0) -> dict:
    """Match rate / RMSE of a trained run on the first ``n`` test crystals, stored and
    randomly translated."""
    ckpt = load_checkpoint(workdir)
    config = ckpt["config"]
    model, settings = build_model(config), build_settings(config)
    ds = load_split(config, "test", progress=False)
    n = min(n, len(ds))
    graphs, names = ds.graphs[:n], ds.ids[:n]
    refs = [ds.crystal(i) for i in range(n)]
    rng = np.random.default_rng(seed)
    moved = [augment_graph(g, rng, rotate=True, shift=True) for g in graphs]
    out = {"step": ckpt["step"]}
    for label, gs in (("stored", graphs), ("translated", moved)):
        preds, secs = reconstruct_dataset(
            model, settings, ckpt["normalisers"], ckpt["params"], gs, names, seed=seed
        )
        out[label] = {**match_metrics(preds, refs), "seconds": secs}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="train/configs/perov_5.py")
    p.add_argument("--root", required=True)
    p.add_argument("--options", nargs="+", default=["none", "raw", "self_image", "frac"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval", type=int, default=512)
    args, overrides = p.parse_known_args(argv)
    root = Path(args.root)
    results = {}
    for option in args.options:
        config = apply_overrides(load_config(args.config), overrides)
        config.model.image_embedding = option
        config.num_train_steps = args.steps
        config.eval_every = 0
        config.checkpoint_every = args.steps
        config.progress = False
        workdir = root / option
        t0 = time.perf_counter()
        train_and_evaluate(config, workdir)
        train_s = time.perf_counter() - t0
        res = evaluate_run(workdir, args.eval)
        res["train_seconds"] = train_s
        results[option] = res
        print(json.dumps({option: res}, default=float), flush=True)
        (root / "ablation.json").write_text(json.dumps(results, indent=2, default=float))
    print("\n| f(k_ij) | match rate | RMSE | match rate (translated) | RMSE (translated) |")
    print("|---|---|---|---|---|")
    for option, r in results.items():
        s, t = r["stored"], r["translated"]
        print(
            f"| {option} | {100 * s['match_rate']:.2f} % | {s['rmse']:.4f} | "
            f"{100 * t['match_rate']:.2f} % | {t['rmse']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
