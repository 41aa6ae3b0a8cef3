"""``autoperi train``, ``reconstruct`` and ``train-flow`` (registered by `autoperi_jax.cli`;
``sample`` is the library's, `autoperi_jax.commands`).

Examples::

  autoperi train --config train/configs/perov_5.py --workdir runs/perov \\
      --config.model.image_embedding=raw --config.num_train_steps=2000
  autoperi reconstruct --workdir runs/perov --split test --out recon.extxyz
  autoperi eval --task recon --samples recon.extxyz --reference perov_5:test
  autoperi train-flow --workdir runs/perov --steps 20000
  autoperi sample --workdir runs/perov -n 10000 --out gen.extxyz --seed 0
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

from autoperi_jax.cli import main as cli_main
from autoperi_jax.commands import add_model_source, model_source

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
    """Exit codes: 0 = finished, or stopped by SIGTERM / SIGINT after saving a checkpoint
    at the current step (re-run the same command to resume; ``summary.json`` says
    ``"interrupted": true``); 3 = stopped by the non-finite guard (the last good checkpoint
    is kept)."""
    # Multi-host set-up must come before any other JAX call (flags or AUTOPERI_* / JAX_*
    # environment variables; see autoperi_jax.distributed.maybe_initialize_distributed).
    # lazy, as every jax import here: the parser is built for --help too (0.2 s; jax 0.6 s)
    from autoperi_jax.distributed import maybe_initialize_distributed

    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from train.trainer import train_and_evaluate  # lazy: jax, optax, the model (~2 s)

    config = apply_overrides(load_config(args.config), args.overrides)
    try:
        result = train_and_evaluate(config, args.workdir)
    except FloatingPointError as e:
        print(f"autoperi train: error: {e}", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2, default=float))
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from autoperi_jax.reconstruct import connectivity_metrics, reconstruct_run
    from train.trainer import match_metrics

    preds, refs, secs, bonds, settings = reconstruct_run(
        model_source(args),
        args.split,
        args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        num_steps=args.num_steps,
        limit=args.limit,
        progress=not args.no_progress,
        prior_noise=None if args.prior_noise < 0 else args.prior_noise,
    )
    print(f"wrote {len(preds)} structures to {args.out} in {secs:.1f} s")
    if args.match:
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


def _add_override_parser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` with the `_OverrideParser` class (argparse creates every
    sub-parser with one class, so it is swapped for this call only)."""
    parser_class = subparsers._parser_class
    subparsers._parser_class = _OverrideParser
    try:
        return subparsers.add_parser(name, **kwargs)
    finally:
        subparsers._parser_class = parser_class


def register(subparsers) -> None:
    """Adds ``train`` and ``reconstruct`` to the ``autoperi`` command line."""
    p = _add_override_parser(
        subparsers,
        "train",
        help="train the periodic autoencoder",
        description="Train with an ml_collections config; override fields with "
        "--config.KEY=VALUE (e.g. --config.model.image_embedding=raw). Re-running the "
        "same command resumes from the last checkpoint; exit 0 = finished or stopped "
        "by SIGTERM/SIGINT after saving, 3 = stopped by the non-finite guard.",
        epilog="examples:\n"
        "  autoperi train --config train/configs/perov_5.py --workdir runs/perov\n"
        "  autoperi train --config train/configs/test.py --workdir runs/smoke  # ~1 min\n"
        "  autoperi train --config train/configs/mp_20.py --workdir runs/mp20 "
        "--config.data.data_dir=~/data\n"
        "  # two hosts (run on each, I = 0 and 1):\n"
        "  autoperi train --config train/configs/perov_5.py --workdir runs/perov "
        "--coordinator host0:1234 --num-processes 2 --process-id I\n"
        "then: autoperi train-flow --workdir runs/perov; autoperi sample --workdir "
        "runs/perov -n 100 --out gen.extxyz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="config file, e.g. train/configs/perov_5.py")
    p.add_argument("--workdir", required=True, help="run folder (metrics, checkpoints)")
    p.add_argument(
        "--coordinator",
        default=None,
        help="multi-host: HOST:PORT of process 0 (else $AUTOPERI_COORDINATOR or "
        "$JAX_COORDINATOR_ADDRESS; AUTOPERI_DISTRIBUTED=auto for TPU pods / SLURM)",
    )
    p.add_argument(
        "--num-processes", type=int, default=None, help="multi-host: number of processes"
    )
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
    p.set_defaults(func=_train)

    r = subparsers.add_parser(
        "reconstruct",
        help="encode and decode a dataset split with a trained run",
        description="Writes the reconstructions in the order of the split, so "
        "`autoperi eval --task recon --samples OUT --reference DATASET:SPLIT` aligns them.",
        epilog="examples:\n"
        "  autoperi reconstruct --pretrained perov_5 --split test --out recon.extxyz --match\n"
        "  autoperi reconstruct --workdir runs/perov --split test --out recon.extxyz\n"
        "  autoperi eval --task recon --samples recon.extxyz --reference perov_5:test "
        "--out runs/eval_recon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_source(r, "run folder of `autoperi train`")
    r.add_argument("--split", default="test", choices=["train", "val", "test"])
    r.add_argument("--out", required=True, help="output .extxyz (or a folder of CIFs)")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--seed", type=int, default=0, help="seed of the coordinate-flow noise")
    r.add_argument("--num-steps", type=int, default=None, help="Euler steps (default: config)")
    r.add_argument("--limit", type=int, default=None, help="only the first N structures")
    r.add_argument(
        "--prior-noise",
        type=float,
        default=0.0,
        help="std (fractional) of the noise around the coordinate guess where decoding "
        "starts; 0 (default) decodes deterministically, -1 uses the training value",
    )
    r.add_argument(
        "--match", action="store_true", help="also print a quick StructureMatcher match rate"
    )
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_reconstruct)
    _register_train_flow(subparsers)


# ------------------------------------------------------------------ latent flow (issue 4)
def _train_flow(args: argparse.Namespace) -> int:
    from train.flow_stage import train_flow  # lazy: jax, optax, the model (~2 s)

    config = load_config(args.config or "flow_perov_5")
    with config.unlocked():
        for field, value in (
            ("num_steps", args.steps),
            ("batch_size", args.batch_size),
            ("learning_rate", args.lr),
            ("seed", args.seed),
        ):
            if value is not None:
                config[field] = value
        if args.layers is not None:
            config.flow.n_layers = args.layers
        if args.hidden is not None:
            config.flow.hidden = tuple(int(h) for h in args.hidden.split(","))
        if args.properties is not None:
            config.properties = tuple(p for p in args.properties.split(",") if p)
        if args.predictor_steps is not None:
            config.predictor.num_steps = args.predictor_steps
        if args.no_progress:
            config.progress = False
    apply_overrides(config, args.overrides)
    checkpoint = None
    if args.pretrained:
        from autoperi_jax.api import pretrained_path  # lazy: jax + the model
        from train.flow_stage import checkpoint_from_bundle

        checkpoint = checkpoint_from_bundle(pretrained_path(args.pretrained))
    summary = train_flow(args.workdir, config, checkpoint)
    print(json.dumps(summary, indent=2, default=float))
    return 0


def _register_train_flow(subparsers) -> None:
    """``train-flow``."""
    f = _add_override_parser(
        subparsers,
        "train-flow",
        help="train the latent flow and property predictor of an autoencoder run",
        description="Second stage: encodes the train / val splits with the run's frozen "
        "encoder, trains the conditional RealNVP on the standardised latents and a "
        "property predictor, and saves RUN/flow/model (see train/flow_stage.py). "
        "Override config fields with --config.KEY=VALUE.",
        epilog="examples:\n  autoperi train-flow --workdir runs/perov --steps 20000\n"
        "  autoperi train-flow --pretrained perov_5 --workdir runs/gap_flow "
        "--properties dir_gap,ind_gap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument(
        "--workdir",
        required=True,
        help="run folder of `autoperi train` (with --pretrained: the output folder)",
    )
    f.add_argument(
        "--pretrained",
        metavar="NAME",
        help="train a new flow + predictor on a shipped model's autoencoder (e.g. perov_5) "
        "instead of the run's; results go to WORKDIR/flow",
    )
    f.add_argument("--config", default=None, help="flow config (default flow_perov_5)")
    f.add_argument("--steps", type=int, default=None, help="flow training steps")
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--lr", type=float, default=None, help="peak learning rate")
    f.add_argument("--layers", type=int, default=None, help="coupling layers")
    f.add_argument("--hidden", default=None, help="conditioner widths, e.g. 256,256")
    f.add_argument("--properties", default=None, help="condition columns, e.g. heat_ref,dir_gap")
    f.add_argument("--predictor-steps", type=int, default=None)
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_train_flow)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point that accepts ``--config.*`` overrides (``python -m train.cli``)."""
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
