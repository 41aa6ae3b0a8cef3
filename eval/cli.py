"""``autoperi eval``: CDVAE-protocol metrics and a readable report for generated crystals.

Registered on the root ``autoperi`` parser by `autoperi_jax.cli` through `register`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["register", "run"]

EXAMPLES = """examples:
  # unconditional generation: 10,000 samples vs the Perov-5 test split, novelty vs train
  autoperi eval --task gen --samples samples.extxyz --reference perov_5:test \\
      --train perov_5:train --out runs/eval_gen

  # reconstruction: predictions aligned with the test split by name (or by order)
  autoperi eval --task recon --samples recon.extxyz --reference perov_5:test --out runs/eval_recon

  # conditional generation on a target property value
  autoperi eval --task cond --samples cond.extxyz --reference perov_5:test \\
      --property heat_ref --target 0.5 --tolerance 0.1 --out runs/eval_cond

  # structure prediction: k = 20 predictions per test crystal, named ID#j (DiffCSP protocol)
  autoperi eval --task csp --samples csp.extxyz --reference perov_5:test --k 1,20 --out runs/csp

  # MLIP stability judge (pip install 'autoperi-jax[stability]'): CHGNet relaxation of 1,000
  # seeded valid samples and 1,000 test crystals, E_hull vs the MP-20 hull, S.U.N. rate
  autoperi eval --task gen --samples samples.extxyz --reference mp_20:test --stability chgnet \\
      --stability-samples 1000 --stability-train mp_20:train_partial --out runs/eval_stab

  # a folder of CIFs or a CSV with a 'cif' column work as --samples too; MP-20 by path:
  autoperi eval --task gen --samples cifs/ --reference ~/data/mp_20/test.csv \\
      --dataset-name mp_20 --out runs/eval_mp20

inputs:
  --samples / --reference / --train take NAME:SPLIT (perov_5:test, mp_20:val, ...: read from
  --data-dir / $AUTOPERI_DATA / the cache, else downloaded once), a CSV with a 'cif' column,
  a folder of *.cif, or any ASE file (extxyz, ...). Unreadable samples are kept and counted
  as invalid. For gen / cond, a NAME:SPLIT reference a shipped model carries statistics of
  (perov_5:test) needs no dataset (see --no-reference-stats).

outputs (in --out):
  metrics.json   every rate as a fraction in [0, 1], every protocol option, per-seed EMDs,
                 published numbers with sources
  report.md      our numbers beside CDVAE / DiffCSP / FlowMM, protocol, plots
  *.png          density / property / lattice / space-group / atoms-per-cell histograms,
                 rendered structures (recon: lattice parity plot)
"""


def register(subparsers) -> argparse.ArgumentParser:
    """Adds the ``eval`` sub-command to the root parser's ``subparsers``."""
    from eval.protocol import CDVAE_MATCHER, NOVELTY_MATCHER

    p = subparsers.add_parser(
        "eval",
        help="evaluate generated / reconstructed crystals with the CDVAE protocol",
        description="Evaluates samples with the field's metrics (CDVAE's compute_metrics.py "
        "definitions): validity, coverage, EMDs, match rate / RMSE, uniqueness, novelty; "
        "writes metrics.json, report.md and plots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument("--task", choices=["recon", "gen", "cond", "csp"], required=True)
    p.add_argument("--samples", required=True, help="generated / reconstructed structures")
    p.add_argument("--reference", required=True, help="reference set, e.g. perov_5:test")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", help="training split for novelty, e.g. perov_5:train")
    p.add_argument(
        "--property", help="property for the property EMD (default: the dataset's property)"
    )
    p.add_argument(
        "--dataset-name",
        choices=["perov_5", "mp_20", "carbon_24", "mpts_52", "other"],
        help="selects coverage cut-offs and published numbers (default: from --reference)",
    )
    p.add_argument("--num-seeds", type=int, default=10, help="EMD draws (default 10)")
    p.add_argument("--first-seed", type=int, default=0, help="seed of the first draw")
    p.add_argument("--num-draw", type=int, default=1000, help="samples per draw (default 1000)")
    p.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    p.add_argument("--struct-cutoff", type=float, help="coverage structure cut-off")
    p.add_argument("--comp-cutoff", type=float, help="coverage composition cut-off")
    p.add_argument("--symprec", type=float, default=0.1, help="spglib tolerance in A (0.1)")
    for prefix, default, what in (
        ("match", CDVAE_MATCHER, "reconstruction"),
        ("novelty", NOVELTY_MATCHER, "uniqueness / novelty"),
    ):
        for k in ("stol", "ltol", "angle_tol"):
            p.add_argument(
                f"--{prefix}-{k.replace('_', '-')}",
                type=float,
                default=default[k],
                help=f"StructureMatcher {k} for {what} (default {default[k]})",
            )
    p.add_argument(
        "--unique-novel-on",
        choices=["valid", "constructed"],
        default="valid",
        help="samples considered for uniqueness / novelty (default: valid)",
    )
    p.add_argument(
        "--no-uniqueness",
        action="store_true",
        help="skip uniqueness (StructureMatcher within each reduced formula): for one-element "
        "data such as Carbon-24 every pair of samples would be compared; CDVAE's Carbon-24 "
        "protocol reports validity, coverage and EMDs",
    )
    p.add_argument(
        "--no-novelty-distance",
        action="store_true",
        help="with --train, skip the samples' fingerprint distance to the nearest training "
        "crystal (it fingerprints the whole train split: ~25 CPU-minutes for MP-20); "
        "novelty itself is unaffected",
    )
    p.add_argument(
        "--lattice-cell",
        choices=["niggli", "as_given"],
        default="niggli",
        help="cells compared by the reconstruction lattice MAE (default: niggli)",
    )
    p.add_argument(
        "--no-fingerprint-validity",
        action="store_true",
        help="do not count a failing CrystalNN fingerprint as invalid (CDVAE does)",
    )
    p.add_argument(
        "--require-reference-valid",
        action="store_true",
        help="reconstruction: also require a valid reference (DiffCSP's variant)",
    )
    p.add_argument(
        "--k",
        default="1,20",
        help="csp: the k of the match rates, comma-separated (default 1,20); predictions "
        "are named ID#j, the j-th for test crystal ID",
    )
    p.add_argument("--target", type=float, help="cond: target property value")
    p.add_argument("--tolerance", type=float, help="cond: hit tolerance on the property")
    p.add_argument("--sampling-time-s", type=float, help="wall time spent generating samples")
    p.add_argument(
        "--phonons",
        action="store_true",
        help="gen/cond: phonon_stable_rate (UFF pair-potential relaxation + phonons, "
        "eval.stability) on valid samples and valid reference crystals",
    )
    p.add_argument("--phonon-max", type=int, help="phonons of at most N valid structures per side")
    g = p.add_argument_group(
        "MLIP stability judge (gen/cond; pip install 'autoperi-jax[stability]', eval.mlip)"
    )
    g.add_argument(
        "--stability",
        choices=["chgnet"],
        help="relax valid samples and as many valid reference crystals with CHGNet; report "
        "energies, relaxed match / RMSD, E_hull, stable and S.U.N. rates beside the reference's",
    )
    g.add_argument("--stability-samples", type=int, help="a seeded subset of N valid samples")
    g.add_argument("--stability-seed", type=int, default=0, help="subset seed (default 0)")
    g.add_argument(
        "--stability-workers",
        type=int,
        help="relaxation processes, one thread each (default min(cores, 4); 0: in this process)",
    )
    g.add_argument(
        "--stability-cache",
        help="JSON-lines cache of relaxations (default "
        "$AUTOPERI_CACHE/stability/chgnet-relax.jsonl)",
    )
    g.add_argument(
        "--stability-hull",
        default="auto",
        choices=["auto", "mp_20", "none"],
        help="convex hull for E_hull: mp_20 = every MP-20 DFT formation energy (needs "
        "mp_20/{train_meta_all,val,test} in --data-dir / $AUTOPERI_DATA); auto (default): "
        "mp_20 when those files are there",
    )
    g.add_argument(
        "--stability-train",
        help="train split for the S.U.N. novelty (default --train); unlike --train it "
        "computes no train fingerprints (e.g. mp_20:train_partial)",
    )
    g.add_argument("--stability-fmax", type=float, default=0.05, help="eV/A (default 0.05)")
    g.add_argument("--stability-steps", type=int, default=500, help="FIRE step cap (500)")
    p.add_argument("--data-dir", help="folder holding NAME/SPLIT.csv (else $AUTOPERI_DATA)")
    p.add_argument(
        "--no-reference-stats",
        action="store_true",
        help="gen/cond: read the reference split's structures even where a shipped model "
        "carries its statistics (eval.reference)",
    )
    p.add_argument("--cache-dir", help="fingerprint cache (else $AUTOPERI_CACHE/...)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--n-render", type=int, default=6, help="structures drawn in structures.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    from eval.bench import register as register_bench

    register_bench(subparsers)
    _register_reference_stats(subparsers)
    _register_stability(subparsers)
    from eval import fit_potential

    fit_potential.register(subparsers)
    return p


def _register_stability(subparsers) -> None:
    s = subparsers.add_parser(
        "stability",
        help="judge a set of structures with the MLIP (CHGNet) stability judge alone",
        description="Relaxes a seeded subset of valid structures with CHGNet and reports "
        "energies, formation energies, relaxed match / RMSD, E_hull against the MP-20 DFT "
        "hull, stable and S.U.N. rates (eval.mlip), without the CDVAE metrics: e.g. a "
        "benchmark split scored as samples, the baseline of `autoperi eval --stability`.",
        epilog="example: autoperi stability --structures mp_20:test --n 100 --seed 0 "
        "--train mp_20:train_partial --workers 1 --out runs/stability_mp20_test",
    )
    s.add_argument("--structures", required=True, help="split (mp_20:test), CSV, CIFs or file")
    s.add_argument("--out", required=True, help="output folder (stability.json)")
    s.add_argument("--n", type=int, help="seeded subset of N valid structures (default all)")
    s.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    s.add_argument("--train", help="train split for the S.U.N. novelty")
    s.add_argument("--hull", default="auto", choices=["auto", "mp_20", "none"])
    s.add_argument("--workers", type=int, help="relaxation processes (default min(cores, 4))")
    s.add_argument("--cache", help="relaxation cache (JSON lines)")
    s.add_argument("--fmax", type=float, default=0.05, help="eV/A (default 0.05)")
    s.add_argument("--steps", type=int, default=500, help="FIRE step cap (500)")
    s.add_argument("--data-dir", help="folder holding NAME/SPLIT.csv (else $AUTOPERI_DATA)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_stability_cmd)


def _stability_cmd(args: argparse.Namespace) -> int:
    import json
    import os

    from autoperi_jax.crystal import CrystalError
    from autoperi_jax.datasets import LOCAL_SPLITS, DatasetError
    from eval import mlip
    from eval.report import to_jsonable
    from eval.samples import load_structure_set

    t0 = time.perf_counter()
    progress = not args.quiet
    try:
        load = dict(data_dir=args.data_dir, workers=1, progress=progress)
        ss = load_structure_set(args.structures, **load)
        hull = None
        if args.hull != "none":
            try:
                hull = mlip.mp20_hull(args.data_dir)
            except (DatasetError, FileNotFoundError) as e:
                if args.hull == "mp_20":
                    raise
                print(f"autoperi stability: no hull, E_hull skipped ({e})", file=sys.stderr)
        train = note = None
        if args.train:
            tset = load_structure_set(args.train, **load)
            train = [c for c in tset.crystals if c is not None]
            name, _, split = args.train.partition(":")
            note = f"{args.train}: {len(train):,} structures"
            if (name, split) in LOCAL_SPLITS:
                note += f" ({LOCAL_SPLITS[name, split]}; novelty is overestimated)"
        sel, checked = mlip.seeded_valid_subset(ss.crystals, args.n, args.seed)
        settings = mlip.RelaxSettings(fmax=args.fmax, max_steps=args.steps)
        workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 4)
        t1 = time.perf_counter()
        recs = mlip.relax_structures(
            [ss.crystals[i] for i in sel], [ss.names[i] for i in sel], settings, workers,
            args.cache or mlip.default_cache_path(settings), progress,
        )  # fmt: skip
        t_relax = time.perf_counter() - t1
        metrics, arrays = mlip.summarize(recs, hull, train, progress=progress)
    except (DatasetError, CrystalError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"autoperi stability: error: {e}", file=sys.stderr)
        return 2
    rows = []
    for j, r in enumerate(recs):
        row = {k: v for k, v in r.items() if k not in ("relaxed", "key")}
        row.update({a: arrays[a][j] for a in ("e_hull", "unique", "novel") if a in arrays})
        rows.append(row)
    proto = mlip.protocol(settings, hull, mlip.STABLE_THRESHOLD)
    proto["subset"] = (
        f"{len(sel)} structures: the first valid ones (structure + SMACT composition "
        f"validity) in numpy default_rng({args.seed}).permutation order of the "
        f"{sum(c is not None for c in ss.crystals)} readable ones ({checked} checked)"
    )
    proto["novelty_train"] = note
    payload = {
        "schema": "autoperi-stability/1",
        "inputs": {"structures": args.structures, "source": ss.source, "n_structures": len(ss),
                   "train": args.train,
                   "command": "autoperi " + " ".join(sys.argv[1:]) if sys.argv else None},
        "protocol": proto,
        "metrics": metrics,
        "structures": rows,
        "wall_time_s": {"relax": t_relax, "total": time.perf_counter() - t0},
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(
        json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n"
    )
    print(f"{len(sel)} structures of {args.structures} judged")
    for k, v in metrics.items():
        if v is not None:
            print(f"  {k:36s} {v:.4f}" if isinstance(v, float) else f"  {k:36s} {v}")
    print(f"relax {t_relax:.1f} s, total {payload['wall_time_s']['total']:.1f} s; "
          f"wrote {out / 'stability.json'}")  # fmt: skip
    return 0


def _register_reference_stats(subparsers) -> None:
    r = subparsers.add_parser(
        "reference-stats",
        help="compute the statistics of a reference split that generation metrics need",
        description="Computes what `autoperi eval --task gen` needs of a reference split "
        "(validity features, CrystalNN / Magpie fingerprints, properties, names) and writes "
        "it as an .npz, e.g. for a model bundle's reference/ folder (eval.reference).",
    )
    r.add_argument("--reference", required=True, help="split, e.g. perov_5:test, or a file")
    r.add_argument("--out", required=True, help="output .npz")
    r.add_argument("--symprec", type=float, default=0.1, help="spglib tolerance in A (0.1)")
    r.add_argument("--data-dir", help="folder holding NAME/SPLIT.csv (else $AUTOPERI_DATA)")
    r.add_argument("--cache-dir", help="fingerprint cache (else $AUTOPERI_CACHE/...)")
    r.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_reference_stats)


def _reference_stats(args: argparse.Namespace) -> int:
    from autoperi_jax.crystal import CrystalError
    from autoperi_jax.datasets import DatasetError
    from eval.reference import compute_reference_stats

    try:
        stats = compute_reference_stats(
            args.reference, data_dir=args.data_dir, symprec=args.symprec,
            workers=args.workers, cache_dir=args.cache_dir, progress=not args.quiet,
        )  # fmt: skip
    except (DatasetError, CrystalError, FileNotFoundError, ValueError) as e:
        print(f"autoperi reference-stats: error: {e}", file=sys.stderr)
        return 2
    out = stats.save(args.out)
    kb = out.stat().st_size / 1024
    print(f"{len(stats)} structures of {args.reference} (sha256 {stats.source_sha256[:12]}...)")
    print(f"wrote {out} ({kb:.0f} KiB)")
    return 0


def _dataset_name(args) -> str | None:
    if args.dataset_name:
        return None if args.dataset_name == "other" else args.dataset_name
    from autoperi_jax.datasets import DATASETS

    name = str(args.reference).partition(":")[0]
    if name in DATASETS:
        return name
    parent = Path(args.reference).resolve().parent.name
    return parent if parent in DATASETS else None


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise ValueError(f"--k takes comma-separated integers (e.g. 1,20), got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"--k takes positive integers, got {text!r}")
    return ks


def _stability_inputs(args, reference, train, load):
    """The hull, the reference structures and the novelty train set of ``--stability``."""
    from autoperi_jax.datasets import LOCAL_SPLITS, DatasetError, resolve_dataset
    from eval.evaluate import StabilityInputs
    from eval.mlip import mp20_hull
    from eval.reference import ReferenceStats
    from eval.samples import load_structure_set

    try:
        import chgnet  # noqa: F401
    except ImportError:
        raise ValueError(
            "--stability chgnet needs CHGNet and torch: pip install 'autoperi-jax[stability]'"
        ) from None
    hull = None
    if args.stability_hull != "none":
        try:
            hull = mp20_hull(args.data_dir)
        except (DatasetError, FileNotFoundError) as e:
            if args.stability_hull == "mp_20":
                raise ValueError(f"--stability-hull mp_20: {e}") from e
            print(f"autoperi eval: no convex hull, E_hull / S.U.N. skipped ({e})", file=sys.stderr)
    ref_structs = None
    if isinstance(reference, ReferenceStats):
        try:  # the baseline relaxes real reference crystals: statistics hold none
            path = resolve_dataset(args.reference, args.data_dir, download=False)
            ref_structs = load_structure_set(path, **load)
        except DatasetError as e:
            print(
                f"autoperi eval: the stability baseline needs the reference split's "
                f"structures, not found ({e}); sample figures are reported without it",
                file=sys.stderr,
            )
    tcrys, note = None, None
    spec = args.stability_train or args.train
    if spec:
        tset = train if spec == args.train and train is not None else None
        tset = tset or load_structure_set(spec, **load)
        tcrys = [c for c in tset.crystals if c is not None]
        name, _, split = str(spec).partition(":")
        note = f"{spec}: {len(tcrys):,} structures"
        if (name, split) in LOCAL_SPLITS:
            note += f" ({LOCAL_SPLITS[name, split]}; novelty is overestimated)"
    return StabilityInputs(
        hull=hull, reference=ref_structs, train=tcrys, train_note=note,
        workers=args.stability_workers, cache=args.stability_cache,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Runs ``autoperi eval``; returns the exit code."""
    from autoperi_jax.crystal import CrystalError
    from autoperi_jax.datasets import DATASETS, DatasetError
    from eval.evaluate import EvalOptions, evaluate
    from eval.reference import ReferenceStats, load_reference
    from eval.report import write_report
    from eval.samples import load_structure_set

    t0 = time.perf_counter()
    progress = not args.quiet
    try:
        name = _dataset_name(args)
        prop = args.property or (DATASETS[name]["property"] if name in DATASETS else None)
        opts = EvalOptions(
            task=args.task,
            dataset_name=name,
            struct_cutoff=args.struct_cutoff,
            comp_cutoff=args.comp_cutoff,
            match_tolerances={
                "stol": args.match_stol, "ltol": args.match_ltol,
                "angle_tol": args.match_angle_tol,
            },
            novelty_tolerances={
                "stol": args.novelty_stol, "ltol": args.novelty_ltol,
                "angle_tol": args.novelty_angle_tol,
            },
            symprec=args.symprec,
            n_draw=args.num_draw,
            num_seeds=args.num_seeds,
            first_seed=args.first_seed,
            fingerprint_validity=not args.no_fingerprint_validity,
            require_reference_valid=args.require_reference_valid,
            lattice_cell=args.lattice_cell,
            unique_novel_on=args.unique_novel_on,
            novelty_distance=not args.no_novelty_distance,
            uniqueness=not args.no_uniqueness,
            property=prop,
            target=args.target,
            tolerance=args.tolerance,
            sampling_time_s=args.sampling_time_s,
            phonons=args.phonons,
            phonon_max=args.phonon_max,
            csp_ks=_parse_ks(args.k),
            stability=args.stability,
            stability_samples=args.stability_samples,
            stability_seed=args.stability_seed,
            stability_fmax=args.stability_fmax,
            stability_max_steps=args.stability_steps,
        )  # fmt: skip
        load = dict(data_dir=args.data_dir, workers=args.workers, progress=progress)
        samples = load_structure_set(args.samples, limit=args.max_samples, **load)
        if args.task in ("recon", "csp"):
            reference = load_structure_set(args.reference, **load)
        else:
            reference = load_reference(
                args.reference, symprec=opts.symprec, min_distance=opts.min_distance,
                min_volume=opts.min_volume, use_stats=not args.no_reference_stats, **load,
            )  # fmt: skip
        train = load_structure_set(args.train, **load) if args.train else None
        stab = _stability_inputs(args, reference, train, load) if args.stability else None
        result = evaluate(
            samples, reference, opts, train=train, workers=args.workers,
            cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=progress,
            stability=stab,
        )  # fmt: skip
        inputs = {
            "samples": str(args.samples),
            "samples_path": samples.source,
            "n_samples": len(samples),
            "reference": str(args.reference),
            "reference_path": reference.source,
            "reference_from": "statistics"
            if isinstance(reference, ReferenceStats)
            else "structures",
            "n_reference": len(reference),
            "train": str(args.train) if args.train else None,
            "n_train": len(train) if train is not None else None,
            "command": "autoperi " + " ".join(sys.argv[1:]) if sys.argv else None,
        }
        payload = write_report(
            result, args.out, inputs, wall_time_s=time.perf_counter() - t0,
            plots=not args.no_plots, n_render=args.n_render,
        )  # fmt: skip
    except (DatasetError, CrystalError, FileNotFoundError, ValueError) as e:
        print(f"autoperi eval: error: {e}", file=sys.stderr)
        return 2
    m = payload["metrics"]
    keys = (
        ["match_rate", "rmse", "match_rate_ceiling", "spacegroup_preserved"]
        if args.task == "recon"
        else [f"{m}_k{k}" for k in opts.csp_ks for m in ("match_rate", "rmse")]
        + ["match_rate_ceiling_k1", "composition_kept_rate"]
        if args.task == "csp"
        else [
            "validity", "struct_validity", "comp_validity", "cov_recall", "cov_precision",
            "emd_density", "emd_num_elements", "emd_property", "emd_density_all_valid",
            "emd_num_elements_all_valid", "emd_property_all_valid", "uniqueness", "novelty",
            "phonon_stable_rate", "phonon_stable_rate_reference",
            "stability_relaxed_match_rate", "stability_relaxed_match_rate_reference",
            "stability_rmsd_mean", "stability_rmsd_mean_reference",
            "stability_ehull_below_ref_rate", "stability_ehull_below_ref_rate_reference",
            "stable_rate", "stable_rate_reference", "sun_rate", "sun_rate_reference",
        ]
    )  # fmt: skip
    print(f"{args.task}: {len(samples)} samples vs {len(reference)} reference structures")
    for k in keys:
        if m.get(k) is not None:
            print(f"  {k:28s} {m[k]:.4f}")
    print(f"wall time {payload['wall_time_s']:.1f} s; report: {Path(args.out) / 'report.md'}")
    return 0
