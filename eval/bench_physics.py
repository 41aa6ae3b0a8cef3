"""Benchmark: jitted supercell-free phonons vs phonopy finite displacements on Perov-5.

Times ``autoperi_jax.physics.phonon_frequencies`` (jit + vmap, one padded batch) on Gamma plus a
Monkhorst-Pack grid for a batch of Perov-5 test crystals, and phonopy's finite-displacement
workflow (supercell, symmetry-reduced +/- displacements, forces from the NumPy reference
calculator of the same UFF Lennard-Jones potential, force constants, frequencies on the same
q-points) on a subset, in the same run, and reports the time per crystal, the ratio and the
largest disagreement of the frequencies.

Usage::

    python -m eval.bench_physics --out bench_physics.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def load_perov(n: int, split: str = "test"):
    """The first ``n`` Perov-5 crystals of ``split`` as ``ase.Atoms``."""
    import pandas as pd
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    from autoperi_jax.datasets import resolve_dataset

    df = pd.read_csv(resolve_dataset(f"perov_5:{split}"), nrows=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [AseAtomsAdaptor.get_atoms(Structure.from_str(c, fmt="cif")) for c in df["cif"]]


def bench_jax(structures, potential, qpoints, repeats: int) -> dict:
    """Compile once, then time the batched phonon call ``repeats`` times."""
    from functools import partial

    import jax
    import jax.numpy as jnp

    from autoperi_jax import physics

    cell = jnp.asarray(np.array([a.cell[:] for a in structures]))
    frac = jnp.asarray(np.array([a.get_scaled_positions() for a in structures]))
    numbers = jnp.asarray(np.array([a.numbers for a in structures]))
    masses = jnp.asarray(np.array([a.get_masses() for a in structures]))
    mask = jnp.ones(numbers.shape, dtype=bool)
    n_images = physics.n_images_for_cutoff(np.asarray(cell), potential.cutoff)
    q = jnp.asarray(qpoints, dtype=frac.dtype)

    def one(c, f, z, m, msk):
        return physics.phonon_frequencies(c, f, z, msk, q, potential=potential,
                                          n_images=n_images, masses=m).frequencies  # fmt: skip

    fn = jax.jit(jax.vmap(one))
    t0 = time.perf_counter()
    freqs = jax.block_until_ready(fn(cell, frac, numbers, masses, mask))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        freqs = jax.block_until_ready(fn(cell, frac, numbers, masses, mask))
        times.append(time.perf_counter() - t0)
    # the stability loss alone (what a training step evaluates), same q-points
    loss_fn = jax.jit(jax.vmap(partial(_stability, q=q, potential=potential, n_images=n_images)))
    jax.block_until_ready(loss_fn(cell, frac, numbers, mask))
    loss_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loss_fn(cell, frac, numbers, mask))
        loss_times.append(time.perf_counter() - t0)
    loss_time = float(np.median(loss_times))
    best = float(np.median(times))
    return {
        "n_crystals": len(structures),
        "n_images": list(n_images),
        "first_call_s": first,
        "median_s": best,
        "per_crystal_ms": 1e3 * best / len(structures),
        "stability_loss_per_crystal_ms": 1e3 * loss_time / len(structures),
        "dtype": str(frac.dtype),
        "frequencies": np.asarray(freqs),
    }


def _stability(c, f, z, msk, *, q, potential, n_images):
    from autoperi_jax import physics

    return physics.stability_loss(c, f, z, msk, q, potential=potential, n_images=n_images)


def bench_phonopy(structures, potential, qpoints) -> dict:
    """phonopy finite displacements (+/-, 1e-3 A) with the NumPy calculator, per crystal."""
    from autoperi_jax import physics

    per, freqs, sizes = [], [], []
    for atoms in structures:
        heights = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell[:]).T, axis=1)
        supercell = tuple(int(np.ceil((2 * potential.cutoff + 0.5) / h)) for h in heights)
        t0 = time.perf_counter()
        ph = physics.phonopy_from_atoms(atoms, physics.NumpyPairCalculator(potential), supercell)
        ph.run_qpoints(qpoints)
        f = ph.qpoints.frequencies
        per.append(time.perf_counter() - t0)
        freqs.append(np.sort(f, axis=-1))
        sizes.append(int(np.prod(supercell)) * len(atoms))
    return {
        "n_crystals": len(structures),
        "total_s": float(np.sum(per)),
        "per_crystal_ms": 1e3 * float(np.mean(per)),
        "supercell_atoms_mean": float(np.mean(sizes)),
        "frequencies": np.asarray(freqs),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_physics.json"))
    parser.add_argument("--n-jax", type=int, default=256, help="crystals in the jitted batch")
    parser.add_argument("--n-phonopy", type=int, default=16, help="crystals run through phonopy")
    parser.add_argument("--cutoff", type=float, default=5.0, help="pair-potential cutoff [A]")
    parser.add_argument("--mesh", type=int, nargs=3, default=(4, 4, 4))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--x64", action="store_true", help="run JAX in float64")
    args = parser.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from autoperi_jax import physics

    structures = load_perov(args.n_jax)
    potential = physics.uff_lennard_jones(cutoff=args.cutoff)
    qpoints = physics.gamma_and_mp_grid(tuple(args.mesh))
    jx = bench_jax(structures, potential, qpoints, args.repeats)
    ph = bench_phonopy(structures[: args.n_phonopy], potential, qpoints)
    f_jax = jx.pop("frequencies")[: args.n_phonopy]
    f_ph = ph.pop("frequencies")
    scale = np.abs(f_ph).max(axis=-1, keepdims=True)
    max_rel = float(np.max(np.abs(f_jax - f_ph) / scale))
    result = {
        "command": "python -m eval.bench_physics "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "potential": f"UFF Lennard-Jones, cutoff {args.cutoff} A, smooth switch",
        "qpoints": f"Gamma + {args.mesh[0]}x{args.mesh[1]}x{args.mesh[2]} Monkhorst-Pack"
        f" ({len(qpoints)} q)",
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "jax_version": jax.__version__,
        "jax": jx,
        "phonopy": ph,
        "speedup_per_crystal": ph["per_crystal_ms"] / jx["per_crystal_ms"],
        "max_rel_freq_diff_vs_phonopy": max_rel,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(
        "| method | crystals | q-points | time per crystal [ms] |\n"
        "|---|---:|---:|---:|\n"
        f"| jax jit+vmap ({jx['dtype']}, {result['device']}) | {jx['n_crystals']} | "
        f"{len(qpoints)} | {jx['per_crystal_ms']:.3f} |\n"
        f"| jax stability loss only | {jx['n_crystals']} | {len(qpoints)} | "
        f"{jx['stability_loss_per_crystal_ms']:.3f} |\n"
        f"| phonopy finite displacements + NumPy forces | {ph['n_crystals']} | "
        f"{len(qpoints)} | {ph['per_crystal_ms']:.1f} |\n\n"
        f"speed-up per crystal: {result['speedup_per_crystal']:.0f}x; first jitted call "
        f"(compile + run) {jx['first_call_s']:.2f} s; max |f_jax - f_phonopy| / max|f| = "
        f"{max_rel:.2e}"
    )
    return result


if __name__ == "__main__":
    main()
