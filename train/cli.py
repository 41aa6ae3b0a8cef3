"""``autoperi train`` and ``autoperi reconstruct`` (registered by `autoperi_jax.cli`).

Examples::

  autoperi train --config train/configs/perov_5.py --workdir runs/perov \\
      --config.model.image_embedding=raw --config.num_train_steps=2000
  autoperi reconstruct --workdir runs/perov --split test --out recon.extxyz
  autoperi eval --task recon --samples recon.extxyz --reference perov_5:test
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["apply_overrides", "load_config", "register"]


def load_config(path: str | Path):
    """``get_config()`` of a config file (path, or ``train.configs.NAME`` module name)."""
    path = Path(path)
    if not path.exists():
        candidate = Path(__file__).parent / "configs" / f"{path.stem}.py"
        if not candidate.exists():
            raise FileNotFoundError(f"config file {path} not found")
        path = candidate
    spec = importlib.util.spec_from_file_location(f"_autoperi_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.get_config()


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: Sequence[str]):
    """Applies ``--config.a.b=value`` arguments (ml_collections ``config_flags`` style).

    The value is parsed with the type of the current field (bool, int, float, str);
    fields that are None or tuples take a Python literal. Unknown fields are an error.

    Returns:
      The updated config (modified in place).
    """
    for arg in overrides:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ValueError(f"expected --config.KEY=VALUE, got {arg!r}")
        key, value = arg[len("--config.") :].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise KeyError(f"unknown config field {key!r}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config field {key!r}")
        node[leaf] = _parse_value(value, node[leaf])
    return config


def _train(args: argparse.Namespace) -> int:
    from train.trainer import train_and_evaluate

    config = apply_overrides(load_config(args.config), args.overrides)
    result = train_and_evaluate(config, args.workdir)
    print(json.dumps(result, indent=2, default=float))
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from train.trainer import (
        build_settings,
        connectivity_metrics,
        load_checkpoint,
        match_metrics,
        reconstruct_run,
    )

    preds, refs, secs, bonds = reconstruct_run(
        args.workdir,
        args.split,
        args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        num_steps=args.num_steps,
        limit=args.limit,
    )
    print(f"wrote {len(preds)} structures to {args.out} in {secs:.1f} s")
    if args.match:
        settings = build_settings(load_checkpoint(args.workdir)["config"])
        metrics = match_metrics(preds, refs)
        metrics.update(
            connectivity_metrics(
                preds, bonds, refs, settings.connect_cutoff, settings.bond_tolerance
            )
        )
        print(json.dumps(metrics, indent=2))
    return 0


class _OverrideParser(argparse.ArgumentParser):
    """Sub-parser that collects ``--config.KEY=VALUE`` arguments into ``overrides``
    (argparse cannot declare options whose names are only known from the config file)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        overrides = [a for a in args if a.startswith("--config.")]
        rest = [a for a in args if not a.startswith("--config.")]
        ns, extras = super().parse_known_args(rest, namespace)
        ns.overrides = overrides
        return ns, extras


def register(subparsers) -> None:
    """Adds ``train`` and ``reconstruct`` to the ``autoperi`` command line."""
    parser_class = subparsers._parser_class
    subparsers._parser_class = _OverrideParser
    try:
        p = subparsers.add_parser(
            "train",
            help="train the periodic autoencoder",
            description="Train with an ml_collections config; override fields with "
            "--config.KEY=VALUE (e.g. --config.model.image_embedding=raw).",
        )
    finally:
        subparsers._parser_class = parser_class
    p.add_argument("--config", required=True, help="config file, e.g. train/configs/perov_5.py")
    p.add_argument("--workdir", required=True, help="run folder (metrics, checkpoints)")
    p.set_defaults(func=_train)

    r = subparsers.add_parser(
        "reconstruct",
        help="encode and decode a dataset split with a trained run",
        description="Writes the reconstructions in the order of the split, so "
        "`autoperi eval --task recon --samples OUT --reference DATASET:SPLIT` aligns them.",
    )
    r.add_argument("--workdir", required=True, help="run folder of `autoperi train`")
    r.add_argument("--split", default="test", choices=["train", "val", "test"])
    r.add_argument("--out", required=True, help="output .extxyz (or a folder of CIFs)")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--seed", type=int, default=0, help="seed of the coordinate-flow noise")
    r.add_argument("--num-steps", type=int, default=None, help="Euler steps (default: config)")
    r.add_argument("--limit", type=int, default=None, help="only the first N structures")
    r.add_argument(
        "--match", action="store_true", help="also print a quick StructureMatcher match rate"
    )
    r.set_defaults(func=_reconstruct)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point that accepts ``--config.*`` overrides (``python -m train.cli``)."""
    from autoperi_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
