"""The ``autoperi`` command line.

The library's commands are ``data`` (here) and ``sample`` (`autoperi_jax.commands`). The
``train`` and ``eval`` packages add theirs (``train``, ``reconstruct``, ``train-flow``;
``eval``, ``bench``, ...) through a ``register(subparsers)`` function in the modules named
by `PLUGINS`. Those are found by name with `importlib`, entry-point style, never imported
statically: train/ and eval/ import the library and the library does not import them
(``tests/test_imports.py`` checks it), and a library installed without them still has a
working command line. Names rather than ``importlib.metadata`` entry points because the
packages ship in one distribution and run from a source checkout (``PYTHONPATH``) without
reinstalling; this module is the one place that knows the two names.

Everything heavy (jax, the model, the datasets) is imported by the command that needs it,
when it runs: building the parser for ``autoperi --help`` takes 0.2 s, importing jax alone
0.6 s.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Mapping, Sequence

from autoperi_jax import __version__, commands

#: Modules of the packages that add sub-commands with ``register(subparsers)``, found by
#: name (see the module docstring); the library's ``sample`` goes between the two.
PLUGINS = ("train.cli", "eval.cli")

EPILOG = """examples:
  autoperi data info perov_5                 # the Perov-5 training split (fetched once)
  autoperi data info perov_5:test --cutoff 6
  autoperi data info my_structures.extxyz
  autoperi data info mp_20:val --data-dir ~/data  # a local copy, ~/data/mp_20/val.csv
"""


def _add_data(sub) -> None:
    p = sub.add_parser(
        "data",
        help="inspect and preprocess datasets",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    dsub = p.add_subparsers(dest="data_command", required=True)
    info = dsub.add_parser(
        "info",
        help="counts, atoms per cell, elements, properties and rejected rows of a dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    info.add_argument("dataset", help="perov_5[:split], mp_20[:split], ... or a path")
    add_dataset_options(info)
    info.set_defaults(func=_data_info)
    batches = dsub.add_parser(
        "batches",
        help="padding buckets, compiled shapes per epoch and padding waste of a dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  autoperi data batches perov_5 --batch-size 128 --buckets 3",
    )
    batches.add_argument("dataset", help="perov_5[:split], mp_20[:split], ... or a path")
    batches.add_argument("--batch-size", type=int, default=128)
    batches.add_argument("--buckets", type=int, default=3, help="number of padding budgets")
    batches.add_argument("--seed", type=int, default=0)
    add_dataset_options(batches)
    batches.set_defaults(func=_data_batches)


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that reads a dataset."""
    p.add_argument("--data-dir", help="folder holding NAME/SPLIT.csv (else $AUTOPERI_DATA)")
    p.add_argument("--cache-dir", help="preprocessing cache (else $AUTOPERI_CACHE)")
    p.add_argument("--cutoff", type=float, default=6.0, help="graph cutoff in A (default 6)")
    p.add_argument("--max-neighbors", type=int, default=None, help="cap per atom (ties kept)")
    p.add_argument("--max-atoms", type=int, default=None, help="reject larger structures")
    p.add_argument(
        "--standardize",
        choices=["niggli", "conventional", "primitive"],
        default=None,
        help="cell standardisation before building graphs",
    )
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="skip malformed rows and report them"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")


def load_from_args(args: argparse.Namespace, spec: str):
    """`load_dataset` with the options of `add_dataset_options`; returns (dataset, seconds)."""
    # lazy, as each import of a handler here: the dataset code (numpy, ~60 ms) stays out
    # of building the parser (--help)
    from autoperi_jax.datasets import timed_load
    from autoperi_jax.graph import GraphSettings

    return timed_load(
        spec,
        settings=GraphSettings(cutoff=args.cutoff, max_neighbors=args.max_neighbors),
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        on_error="skip" if args.skip_bad_rows else "raise",
        standardize=args.standardize,
        max_atoms=args.max_atoms,
        workers=args.workers,
    )


def _data_info(args: argparse.Namespace) -> int:
    from autoperi_jax.datasets import summarize

    ds, seconds = load_from_args(args, args.dataset)
    print(summarize(ds, seconds))
    return 0


def _data_batches(args: argparse.Namespace) -> int:
    from autoperi_jax.graph import BatchIterator, make_buckets

    ds, seconds = load_from_args(args, args.dataset)
    buckets = make_buckets(ds.n_node, ds.n_edge, args.batch_size, args.buckets, seed=args.seed)
    it = BatchIterator(ds.graphs, args.batch_size, buckets=buckets, seed=args.seed)
    shapes: set[tuple[int, int]] = set()
    real_n = real_e = pad_n = pad_e = 0
    t = time.perf_counter()
    for _ in range(it.steps_per_epoch):
        b = next(it)
        shapes.add((b.nodes["mask"].shape[0], b.edges["mask"].shape[0]))
        real_n += int(b.nodes["mask"].sum())
        real_e += int(b.edges["mask"].sum())
        pad_n += b.nodes["mask"].shape[0]
        pad_e += b.edges["mask"].shape[0]
    dt = time.perf_counter() - t
    print(f"{ds.source}: {len(ds)} structures (loaded in {seconds:.2f} s)")
    print(f"batch size {args.batch_size}, {it.steps_per_epoch} batches per epoch")
    for b in buckets:
        print(f"  bucket: {b.n_node} nodes, {b.n_edge} edges, {b.n_graph} graphs")
    print(f"distinct batch shapes in one epoch: {len(shapes)} (buckets: {len(buckets)})")
    print(f"padding waste: nodes {1 - real_n / pad_n:.1%}, edges {1 - real_e / pad_e:.1%}")
    print(f"host batching: {it.steps_per_epoch / dt:.1f} batches/s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoperi",
        description="autoperi-jax: periodic-graph crystal generative modelling in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"autoperi-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    train_plugin, eval_plugin = PLUGINS
    _register_plugin(sub, train_plugin)  # train, reconstruct, train-flow
    commands.register(sub)  # sample: after train-flow, the order of the workflow
    _register_plugin(sub, eval_plugin)  # eval, bench, ...
    return parser


def _register_plugin(sub, name: str) -> None:
    """Imports plugin ``name`` by name and lets it add its sub-commands; a plugin that is
    not installed adds none."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in (name, name.partition(".")[0]):  # a real missing dependency inside
            raise
        return
    module.register(sub)


def configure_compilation_cache(environ: Mapping[str, str] | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process, so a command run again
    with the same shapes loads its compiled programs instead of compiling them (a repeated
    ``autoperi sample --pretrained perov_5 -n 256``: 23-26 s -> 11 s on 2 CPU cores).
    Every compilation is kept (minimum compile time 0), not only those over JAX's default
    1 s: the sampler and loaders run many small jitted functions. ``autoperi`` calls it for
    every command but ``bench``, which measures compilations.

    Where: ``$AUTOPERI_XLA_CACHE`` if set (``off`` or ``0`` turns it off), else
    ``$AUTOPERI_CACHE/xla``, else ``~/.cache/autoperi_jax/xla``. A
    ``JAX_COMPILATION_CACHE_DIR`` already set is JAX's own setting and left alone, as is
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``. Compiled programs are XLA executables
    keyed by JAX on the program, the shapes, the devices and the flags, never pickles.

    Returns:
      The cache folder in use, or None when it is off.
    """
    import jax  # lazy: 0.6 s, only once a command runs

    env = os.environ if environ is None else environ
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    choice = env.get("AUTOPERI_XLA_CACHE", "")
    if choice.lower() in ("off", "0", "false", "no"):
        return None
    from autoperi_jax.datasets import cache_root

    folder = choice or str(cache_root(env) / "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


def _initialize_distributed_first(argv: Sequence[str] | None) -> None:
    """``autoperi train`` on several hosts: `jax.distributed.initialize` must come before any
    JAX computation, so the multi-host flags (or AUTOPERI_* / JAX_* variables, see
    `autoperi_jax.distributed.maybe_initialize_distributed`) are read before the parser is
    built and any plugin is imported: no import can compute first (jax-md, for one,
    computes at import time; the parser itself imports none of it, see
    ``tests/test_cli.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--coordinator")
    pre.add_argument("--num-processes", type=int)
    pre.add_argument("--process-id", type=int)
    flags, _ = pre.parse_known_args(argv[1:])
    from autoperi_jax.distributed import maybe_initialize_distributed  # lazy: jax, 0.6 s

    maybe_initialize_distributed(flags.coordinator, flags.num_processes, flags.process_id)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``autoperi ARGV``; returns the exit code (2 = bad input or option value)."""
    from autoperi_jax.crystal import CrystalError  # lazy: numpy + the dataset code
    from autoperi_jax.datasets import DatasetError

    _initialize_distributed_first(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "xla_cache", True):  # off where compilations are measured (bench)
        configure_compilation_cache()
    try:
        return int(args.func(args) or 0)
    except (DatasetError, CrystalError, FileNotFoundError, ValueError) as e:
        # Bad input or a bad option value: one line naming what is wrong, no traceback.
        print(f"autoperi: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
