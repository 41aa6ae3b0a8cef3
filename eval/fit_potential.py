"""``autoperi fit-potential``: a pair potential fitted to CHGNet; ``autoperi potential-check``.

fit-potential (issue 23, Build 2):

1. Picks a seeded subset of crystals (``--n`` in all, split evenly over ``--structures``,
   at most ``--max-atoms`` atoms each) and splits the crystals (not their copies) into a
   fitting set and a held-out set (``--holdout``).
2. Makes copies of each: the original, ``--rattled`` copies with Gaussian displacements of
   ``--rattle`` A per Cartesian component, and ``--strained`` copies with a random
   symmetric strain (isotropic and shear components uniform in +-``--strain``) plus the
   same rattle. All seeded.
3. Labels them with CHGNet single points (energy, forces, stress; `eval.mlip`'s calculator
   on one torch thread, in this process), one JSON line per structure appended to a cache
   as soon as it is computed (keyed by a hash of the structure: a rerun skips what is
   there), with a progress bar.
4. Fits the per-element parameters of `autoperi_jax.physics.fitted` (`physics.fit`) to the
   fitting set and measures energy / force / stress errors on both sets.
5. Writes the potential and the fit's metadata (data, weights, errors) as JSON (``--out``).

potential-check measures what issue 23 asks of a potential on real crystals: for a seeded
subset of each split, the share that is phonon-stable after a fixed-cell relaxation under
it (`eval.stability.phonon_stability`, its protocol unchanged) and the share that "stays
put" under that relaxation (still matches the original under the CDVAE matcher; RMSD over
matches).

CHGNet and torch are imported only when labelling runs (``pip install
'autoperi-jax[stability]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["label_structures", "perturbed_copies", "register", "stay_put"]

EXAMPLES = """examples:
  autoperi fit-potential --structures perov_5:train,mp_20:train_partial --n 300 \\
      --out potentials/fitted_chgnet.json --cache runs/labels.jsonl
  autoperi potential-check --potentials fitted_chgnet,uff_lj,uff_morse \\
      --structures perov_5:test,mp_20:test --n 150 --out runs/potential_check.json
"""


def register(subparsers) -> None:
    """Adds ``fit-potential`` and ``potential-check`` to the root parser's ``subparsers``."""
    p = subparsers.add_parser(
        "fit-potential",
        help="fit a per-element pair potential to CHGNet energies, forces and stresses",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    p.add_argument("--structures", required=True, help="comma-separated splits / files")
    p.add_argument("--n", type=int, default=300, help="crystals in all (default 300)")
    p.add_argument("--out", required=True, help="output JSON (the potential)")
    p.add_argument("--cache", help="label cache, JSON lines (default: OUT.labels.jsonl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-atoms", type=int, default=20)
    p.add_argument("--rattled", type=int, default=2, help="rattled copies per crystal (2)")
    p.add_argument("--strained", type=int, default=2, help="strained copies per crystal (2)")
    p.add_argument("--rattle", type=float, default=0.07, help="Gaussian sigma [A] (0.07)")
    p.add_argument("--strain", type=float, default=0.03, help="strain bound (0.03)")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out crystal share (0.2)")
    p.add_argument("--steps", type=int, default=500, help="L-BFGS iterations (500)")
    p.add_argument("--cutoff", type=float, default=6.0, help="pair cutoff [A] (6)")
    p.add_argument("--w-energy", type=float, default=1.0)
    p.add_argument("--w-forces", type=float, default=1.0)
    p.add_argument("--w-stress", type=float, default=0.01, help="per GPa^2 (0.01)")
    p.add_argument("--data-dir", help="folder holding NAME/SPLIT.csv (else $AUTOPERI_DATA)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_fit_cmd)

    c = subparsers.add_parser(
        "potential-check",
        help="phonon-stable and stay-put shares of real crystals under pair potentials",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    c.add_argument("--potentials", default="fitted_chgnet,uff_lj,uff_morse")
    c.add_argument("--structures", default="perov_5:test,mp_20:test")
    c.add_argument("--n", type=int, default=150, help="seeded crystals per split (150)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="JSON with the table")
    c.add_argument("--data-dir")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_check_cmd)


# ------------------------------------------------------------------------------ data
def _load(spec: str, data_dir: str | None):
    from autoperi_jax.datasets import load_crystals

    kwargs = {"data_dir": data_dir} if data_dir else {}
    return load_crystals(spec, **kwargs)


def seeded_subset(crystals, n: int, seed: int, max_atoms: int | None = None):
    """``n`` crystals drawn without replacement (seeded), atom count <= ``max_atoms``."""
    idx = [i for i, c in enumerate(crystals) if max_atoms is None or c.num_atoms <= max_atoms]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(idx), size=min(n, len(idx)), replace=False)
    return [crystals[idx[k]] for k in sorted(pick)]


def perturbed_copies(
    crystal, rng: np.random.Generator, rattled: int, strained: int, rattle: float, strain: float
) -> list[tuple[str, Any]]:
    """``[(kind, Crystal)]``: the original, rattled and strained (+ rattled) copies."""
    from autoperi_jax.crystal import Crystal

    out = [("original", crystal)]
    cart = crystal.frac_coords @ crystal.cell
    for _ in range(rattled):
        new = cart + rng.normal(0.0, rattle, cart.shape)
        frac = np.mod(new @ np.linalg.inv(crystal.cell), 1.0)
        out.append(("rattled", Crystal(crystal.cell, frac, crystal.numbers)))
    for _ in range(strained):
        e = rng.uniform(-strain, strain, (3, 3))
        e = 0.5 * (e + e.T)
        cell = crystal.cell @ (np.eye(3) + e)
        new = crystal.frac_coords @ cell + rng.normal(0.0, rattle, cart.shape)
        frac = np.mod(new @ np.linalg.inv(cell), 1.0)
        out.append(("strained", Crystal(cell, frac, crystal.numbers)))
    return out


def _key(crystal) -> str:
    payload = {
        "numbers": np.asarray(crystal.numbers).tolist(),
        "cell": np.round(crystal.cell, 6).tolist(),
        "frac": np.round(np.mod(crystal.frac_coords, 1.0), 7).tolist(),
        "model": "chgnet-0.3.0 single point",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def label_structures(crystals, cache_path: str | os.PathLike | None, progress: bool = True):
    """CHGNet single points (energy [eV], forces [eV/A], stress [eV/A^3], ASE sign) of
    each crystal, cached one JSON line per structure; returns records in input order
    (``None`` where CHGNet failed)."""
    import warnings

    from tqdm import tqdm

    from eval.mlip import RelaxCache, _calculator, _one_torch_thread

    cache = RelaxCache(cache_path)
    out: list[dict | None] = []
    todo = sum(_key(c) not in cache for c in crystals)
    bar = tqdm(total=todo, disable=not progress or not todo, desc="CHGNet labels", unit="struct")
    with _one_torch_thread():
        for c in crystals:
            k = _key(c)
            if k not in cache:
                rec: dict[str, Any] = {"ok": False}
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        atoms = c.to_ase()
                        atoms.info.clear()
                        atoms.calc = _calculator()
                        rec = {
                            "ok": True,
                            "energy": float(atoms.get_potential_energy()),
                            "forces": atoms.get_forces().tolist(),
                            "stress": atoms.get_stress(voigt=False).tolist(),
                        }
                except ImportError:
                    raise
                except Exception as e:  # one bad structure must not stop a run
                    rec = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
                cache.add(k, rec)
                bar.update(1)
            rec = cache.records[k]
            out.append(rec if rec.get("ok") else None)
    bar.close()
    return out


def _labelled(crystal, rec):
    from autoperi_jax.physics.fit import Labelled

    return Labelled(
        cell=np.asarray(crystal.cell),
        frac=np.asarray(crystal.frac_coords),
        numbers=np.asarray(crystal.numbers),
        energy=float(rec["energy"]),
        forces=np.asarray(rec["forces"]),
        stress=np.asarray(rec["stress"]),
    )


def _fit_cmd(args: argparse.Namespace) -> int:
    from autoperi_jax.physics import fit

    t0 = time.perf_counter()
    specs = [s for s in args.structures.split(",") if s]
    rng = np.random.default_rng(args.seed)
    per_spec = [args.n // len(specs) + (k < args.n % len(specs)) for k in range(len(specs))]
    base = []
    for spec, n in zip(specs, per_spec):
        sub = seeded_subset(_load(spec, args.data_dir), n, args.seed, args.max_atoms)
        base += [(spec, c) for c in sub]
    held = rng.random(len(base)) < args.holdout
    structs, groups = [], []
    for g, (_spec, c) in enumerate(base):
        for kind, s in perturbed_copies(
            c, rng, args.rattled, args.strained, args.rattle, args.strain
        ):
            structs.append(s)
            groups.append((g, kind))
    cache = args.cache or str(Path(args.out).with_suffix("")) + ".labels.jsonl"
    t_label = time.perf_counter()
    recs = label_structures(structs, cache, not args.quiet)
    t_label = time.perf_counter() - t_label
    train, test, failed = [], [], 0
    for s, (g, _), r in zip(structs, groups, recs):
        if r is None:
            failed += 1
            continue
        (test if held[g] else train).append(_labelled(s, r))
    settings = fit.FitSettings(
        w_energy=args.w_energy, w_forces=args.w_forces, w_stress=args.w_stress,
        steps=args.steps, cutoff=args.cutoff,
    )  # fmt: skip
    t_fit = time.perf_counter()
    pot, history = fit.fit(train, settings, progress=not args.quiet)
    t_fit = time.perf_counter() - t_fit
    err_train = fit.errors(pot, train)
    err_test = fit.errors(pot, test) if test else {}
    missing = [
        int(z) for z in np.flatnonzero(fit.present_elements(test) & ~pot.fitted)
    ] if test else []  # fmt: skip
    meta = {
        "fitted_to": "CHGNet 0.3.0 (chgnet==0.4.2) single points: energy, forces, stress",
        "command": "autoperi fit-potential "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in sorted(vars(args).items())
            if k not in ("func", "quiet", "cache", "data_dir") and v is not None
        ),
        "data": {
            "structures": specs,
            "crystals": len(base),
            "held_out_crystals": int(held.sum()),
            "copies": {"original": 1, "rattled": args.rattled, "strained": args.strained},
            "rattle_sigma_A": args.rattle,
            "strain_bound": args.strain,
            "max_atoms": args.max_atoms,
            "seed": args.seed,
            "labelled": len(structs),
            "label_failures": failed,
            "fit_structures": len(train),
            "held_out_structures": len(test),
        },
        "settings": {
            **{k: v for k, v in vars(settings).items() if k != "trainable"},
            "trainable": list(settings.trainable),
            "optimizer": "optax.lbfgs (zoom)",
            "units": "energy per atom eV, forces eV/A, stress GPa",
        },
        "final_loss": history[-1],
        "errors_fit": err_train,
        "errors_held_out": err_test,
        "held_out_elements_not_fitted": missing,
        "wall_s": {"label": t_label, "fit": t_fit, "total": time.perf_counter() - t0},
    }
    from dataclasses import replace

    pot = replace(pot, meta=meta)
    pot.save(args.out)
    print(json.dumps({"fit": err_train, "held_out": err_test}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


# --------------------------------------------------------------------- check command
def stay_put(originals, relaxed) -> tuple[np.ndarray, np.ndarray]:
    """``(match [n] bool, rmsd [n])``: does each relaxed crystal still match its original
    under the CDVAE matcher, and its normalised RMS displacement (NaN without a match)."""
    import warnings

    from autoperi_jax.distinct import matcher
    from autoperi_jax.protocol import CDVAE_MATCHER

    m = matcher(CDVAE_MATCHER)
    match = np.zeros(len(originals), bool)
    rmsd = np.full(len(originals), np.nan)
    for k, (a, b) in enumerate(zip(originals, relaxed)):
        if b is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = m.get_rms_dist(a.to_pymatgen(), b.to_pymatgen())
        except Exception:
            r = None
        if r is not None:
            match[k], rmsd[k] = True, float(r[0])
    return match, rmsd


def _check_cmd(args: argparse.Namespace) -> int:
    from autoperi_jax.crystal import Crystal
    from eval.stability import StabilityOptions, phonon_stability

    rows = []
    for spec in [s for s in args.structures.split(",") if s]:
        crystals = seeded_subset(_load(spec, args.data_dir), args.n, args.seed)
        for name in [s for s in args.potentials.split(",") if s]:
            t0 = time.perf_counter()
            res = phonon_stability(
                crystals, opts=StabilityOptions(potential=name), progress=not args.quiet
            )
            relaxed = [
                Crystal(c.cell, f[: c.num_atoms], c.numbers) if ev else None
                for c, f, ev in zip(crystals, res["relaxed_frac"], res["evaluated"])
            ]
            match, rmsd = stay_put(crystals, relaxed)
            ev = res["evaluated"]
            row = {
                "structures": spec, "potential": name, "n": len(crystals),
                "n_evaluated": int(ev.sum()),
                "phonon_stable_rate": res["phonon_stable_rate"],
                "relax_converged_rate": res["relax_converged_rate"],
                "stay_put_rate": float(match[ev].mean()) if ev.any() else float("nan"),
                "rmsd_mean": float(np.nanmean(rmsd[ev & match])) if (ev & match).any()
                else float("nan"),
                "wall_s": time.perf_counter() - t0,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{spec:14s} {name:14s} stable {row['phonon_stable_rate']:.3f}  "
                f"stay-put {row['stay_put_rate']:.3f}  rmsd {row['rmsd_mean']:.4f}  "
                f"({row['n_evaluated']}/{row['n']}, {row['wall_s']:.0f} s)",
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "args": {
            k: v for k, v in vars(args).items() if k != "func"}}, indent=1))  # fmt: skip
    return 0
