"""The library's generation command, ``autoperi sample``, and its model-source options.

`autoperi_jax.cli` registers it between the train plugin's commands and the eval
plugin's (the order of ``autoperi --help``). `add_model_source` / `model_source` are the
``--workdir RUN`` / ``--pretrained NAME`` options every command that loads a trained model
shares (``reconstruct`` and ``train-flow`` in train/, ``bench`` in eval/).

Example::

  autoperi sample --pretrained perov_5 -n 1000 --out gen.extxyz --seed 0

Only argparse at import: building the parser must stay fast (``autoperi --help`` 0.2 s),
so each command's handler imports jax and the model when it runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_model_source", "model_source", "register"]


def add_model_source(p: argparse.ArgumentParser, workdir_help: str, required: bool = True) -> None:
    """``--workdir RUN`` or ``--pretrained NAME`` (a model shipped in the package); when
    not ``required``, neither means ``--pretrained perov_5``."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--workdir", help=workdir_help)
    g.add_argument(
        "--pretrained",
        metavar="NAME",
        help="a model shipped with the package instead of a run (e.g. perov_5)",
    )


def model_source(args: argparse.Namespace) -> Path:
    """The bundle folder or run folder named by `add_model_source`'s options."""
    if args.workdir:
        return Path(args.workdir)
    from autoperi_jax.api import pretrained_path  # lazy: jax + the model (~2 s)

    return pretrained_path(args.pretrained or "perov_5")


def _parse_conditions(items: Sequence[str] | None) -> dict[str, float]:
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--condition expects NAME=VALUE, got {item!r}")
        out[name.strip()] = float(value)
    return out


def _sample(args: argparse.Namespace) -> int:
    # lazy: jax and the model (~2 s) load only when a command runs, not for --help
    import jax

    from autoperi_jax.api import load
    from autoperi_jax.io import write_samples

    if args.max_batches is not None and not args.unique:
        raise ValueError("--max-batches limits --unique sampling only: add --unique")
    overrides: dict[str, Any] = {}
    if args.num_steps is not None:
        overrides["num_steps"] = args.num_steps
    if args.prior_noise is not None:
        overrides["prior_noise"] = args.prior_noise
    if args.no_spacegroup_prior:
        overrides["spacegroup_prior"] = False
    if args.retries is not None:
        overrides["retries"] = args.retries
    if args.no_checks:
        overrides.update(
            composition_check=False, accept_min_ratio=0.0, retries=0, spare_fraction=0.0
        )
    gen = load(model_source(args), **overrides)
    conditions = _parse_conditions(args.condition)
    unknown = sorted(set(conditions) - set(gen.cond_names))
    if unknown:
        raise ValueError(
            f"--condition {', '.join(unknown)}: this model is conditioned on "
            f"{', '.join(gen.cond_names) or 'no property'} only"
        )
    t0 = time.perf_counter()
    n = write_samples(
        gen,
        jax.random.PRNGKey(args.seed),
        args.n,
        args.out,
        conditions or None,
        args.spacegroup,
        args.batch_size,
        args.temperature,
        not args.no_progress,
        args.unique,
        args.max_batches,
    )
    secs = time.perf_counter() - t0
    asked = "" if n == args.n else f" (of the {args.n} asked for: see the warning above)"
    print(
        f"wrote {n} crystals{asked} to {args.out} in {secs:.1f} s ({n / secs:.1f}/s, "
        f"{gen.nfe} decoder evaluations per decoded candidate)"
    )
    return 0


def _csp(args: argparse.Namespace) -> int:
    import jax

    from autoperi_jax.api import load
    from autoperi_jax.datasets import load_crystals
    from autoperi_jax.elements import formula_label
    from autoperi_jax.io import write_batches

    overrides: dict[str, Any] = {}
    if args.num_steps is not None:
        overrides["num_steps"] = args.num_steps
    if args.retries is not None:
        overrides["retries"] = args.retries
    gen = load(model_source(args), **overrides)
    spec = None
    if args.composition:
        compositions = list(args.composition)
        names = [formula_label(gen.composition_row(c)) for c in compositions]
    else:
        dataset = gen.meta["autoencoder"]["dataset"]
        spec = args.split if ":" in args.split else f"{dataset}:{args.split}"
        kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
        crystals = load_crystals(spec, **kwargs)[: args.limit]
        compositions = [c.numbers for c in crystals]
        names = [c.name for c in crystals]
        print(f"{spec}: {len(crystals)} compositions, {args.n} predictions each")
    key = jax.random.PRNGKey(args.seed)
    batches = gen.predict_structures_batches(
        compositions, args.n, key, names, args.spacegroup, args.batch_size, args.temperature
    )  # every composition checked here, before the output is touched
    t0 = time.perf_counter()
    total = len(compositions) * args.n
    if args.rank:  # every composition's n predictions are needed before its first
        from autoperi_jax.api import rank_predictions
        from autoperi_jax.parallel import parallel_map

        def map_chunks(fn, items):
            return parallel_map(fn, items, args.workers, 64, "rank", not args.no_progress, "pair")

        drawn = [c for b in batches for c in b]
        batches = [rank_predictions(drawn, args.n, map_chunks)]
    n = write_batches(batches, args.out, total, not args.no_progress, "csp")
    secs = time.perf_counter() - t0
    print(
        f"wrote {n} predicted structures to {args.out} in {secs:.1f} s ({n / secs:.1f}/s, "
        f"{gen.nfe} decoder evaluations per decoded candidate)"
    )
    if spec is not None:
        print(f"then: autoperi eval --task csp --samples {args.out} --reference {spec} --k 1,20")
    return 0


def _register_csp(subparsers) -> None:
    c = subparsers.add_parser(
        "csp",
        help="predict the crystal structure of a composition",
        description="Crystal structure prediction: for a given composition (the atoms of "
        "one cell) draws latents from the model's composition flow and decodes a lattice "
        "and coordinates for exactly those atoms. With --split, N predictions for every "
        "crystal of a dataset split, named ID#j, for `autoperi eval --task csp`.",
        epilog="examples:\n"
        "  autoperi csp --pretrained perov_5 --composition SrTiO3 -n 20 --out srtio3/\n"
        "  autoperi csp --pretrained perov_5 --split test -n 20 --out csp_test.extxyz\n"
        "  autoperi csp --pretrained perov_5 --composition KNbO3 -n 8 --rank --out knbo3.extxyz\n"
        "  autoperi eval --task csp --samples csp_test.extxyz --reference perov_5:test --k 1,20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_source(c, "run folder whose flow/model holds a csp/ flow")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--composition",
        action="append",
        metavar="FORMULA",
        help="atoms of one cell, e.g. SrTiO3 or Ba2TiO4 (repeatable)",
    )
    what.add_argument(
        "--split",
        help="every composition of a split: train|val|test of the model's dataset, or "
        "DATASET:SPLIT",
    )
    c.add_argument("-n", type=int, required=True, help="predictions per composition")
    c.add_argument("--out", required=True, help="output .extxyz, or a folder for CIFs")
    c.add_argument("--data-dir", default=None, help="folder holding the split's files")
    c.add_argument("--limit", type=int, default=None, help="only the first N of the split")
    c.add_argument("--spacegroup", type=int, default=None, help="ask for this group (1-230)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--temperature", type=float, default=None, help="base-noise temperature")
    c.add_argument("--num-steps", type=int, default=None, help="decoder Euler steps (NFE)")
    c.add_argument(
        "--retries", type=int, default=None, help="extra candidates when the contact check fails"
    )
    c.add_argument(
        "--rank",
        action="store_true",
        help="order each composition's predictions by how many of the others agree "
        "(StructureMatcher), the most supported first: #0 is the best single answer",
    )
    c.add_argument("--workers", type=int, default=None, help="processes for --rank")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_csp)


def register(subparsers) -> None:
    """Adds ``sample`` and ``csp`` to the ``autoperi`` command line."""
    s = subparsers.add_parser(
        "sample",
        help="generate crystals with a trained run (after train-flow)",
        description="Draws crystals from the latent flow, decodes them, optionally "
        "symmetrises them onto a space group, and writes each batch as it finishes. "
        "Batch b uses fold_in(PRNGKey(seed), b): the same seed and batch size give "
        "identical files.",
        epilog="examples:\n"
        "  autoperi sample --pretrained perov_5 -n 1000 --out gen.extxyz --seed 0\n"
        "  autoperi sample --workdir runs/p5_c -n 10000 --out gen.extxyz "
        "--condition heat_ref=0.5 --spacegroup 221 --seed 0\n"
        "  autoperi sample --pretrained perov_5 -n 100 --out cifs/   # one CIF each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_source(s, "run folder of `autoperi train-flow` (holds flow/model)")
    s.add_argument("-n", type=int, required=True, help="number of crystals")
    s.add_argument("--out", required=True, help="output .extxyz, or a folder for CIFs")
    s.add_argument(
        "--condition",
        action="append",
        metavar="NAME=VALUE",
        help="target property in physical units (repeatable)",
    )
    s.add_argument("--spacegroup", type=int, default=None, help="requested space group 1-230")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="base-noise temperature (default: the model's; perov_5: 1.1 unconditioned, "
        "1.0 with --condition or --spacegroup)",
    )
    s.add_argument("--num-steps", type=int, default=None, help="decoder Euler steps (NFE)")
    s.add_argument(
        "--prior-noise",
        type=float,
        default=None,
        help="noise (fractional std) around the coordinate guess where decoding starts "
        "(default: the model's; 0 = deterministic decoding of each z)",
    )
    s.add_argument(
        "--no-spacegroup-prior",
        action="store_true",
        help="without --spacegroup: sample the marginal flow, no symmetry layer (faster) "
        "instead of drawing a group from the training distribution",
    )
    s.add_argument(
        "--retries",
        type=int,
        default=None,
        help="extra candidates per crystal when the composition check or the symmetry "
        "layer rejects one (default: the model's, 1)",
    )
    s.add_argument(
        "--no-checks",
        action="store_true",
        help="one candidate per crystal, kept as drawn: no charge-balance or contact check, "
        "failed symmetrisations keep the decoded structure (the model without rejection)",
    )
    s.add_argument(
        "--unique",
        action="store_true",
        help="write N mutually distinct crystals: a drawn crystal that pymatgen's "
        "StructureMatcher (default tolerances) matches to an earlier one is dropped and "
        "more batches are drawn (host side; uniqueness 1 by construction), at most "
        "--max-batches of them",
    )
    s.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="with --unique: stop after this many batches and keep the distinct crystals "
        "found so far (default 4 ceil(N / batch size) + 4)",
    )
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_sample)
    _register_csp(subparsers)
