"""``phonon_stable_rate``: pair-potential relaxation, then harmonic phonons (issue 7).

Rule (ours; CDVAE has no stability metric): every constructed crystal is relaxed in its
fixed cell with jax-md FIRE under a pair potential (``autoperi_jax.physics``; default the
UFF Lennard-Jones potential, Rappe et al. 1992, smooth 8 A cutoff), then its squared
phonon frequencies are computed from the force-constant Hessian on Gamma plus a
Monkhorst-Pack grid (default 2x2x2, the three acoustic modes at Gamma excluded). A crystal
is *phonon-stable* when ``min omega^2 >= -tolerance`` (default 1e-3 THz^2, no mode below
~0.03i THz: well above the float32 noise of the Hessian, ~1e-6 of the largest omega^2,
and below the soft modes of even weakly bound crystals: simple cubic argon under
Lennard-Jones has omega^2 = -0.09 THz^2). The rate is the stable share of the crystals in
``mask`` (typically the valid samples). A pair potential is a cheap proxy, not DFT: on
the ionic Perov-5 crystals UFF Lennard-Jones finds most real structures unstable, so
always read the rate beside the reference set's own rate (``evaluate`` reports both).

Crystals are padded to the largest atom count and processed in fixed-size batches with one
static image stencil (the largest any crystal needs), so everything compiles once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoperi_jax.crystal import Crystal

__all__ = ["StabilityOptions", "phonon_stability"]


@dataclass(frozen=True)
class StabilityOptions:
    """Settings of `phonon_stability` (recorded in metrics.json).

    Attributes:
      potential: ``uff_lj`` (Lennard-Jones), ``uff_morse``, or a fitted potential: a shipped
        name (``fitted_chgnet``, `autoperi_jax.physics.fitted`) or a JSON path.
      cutoff: pair cutoff [A] of the UFF potentials (a fitted one keeps its own).
      relax_steps: FIRE step budget (positions only, cell fixed).
      fmax: FIRE convergence threshold [eV/A].
      mesh: Monkhorst-Pack q-grid added to Gamma.
      tolerance: squared frequency [THz^2] below -tolerance counts as imaginary.
      batch_size: crystals per compiled call.
      max_images: crystals needing a wider image stencil than this per axis (tiny or
        extremely flat cells) are not evaluated (NaN) instead of blowing up the stencil.
    """

    potential: str = "uff_lj"
    cutoff: float = 8.0
    relax_steps: int = 300
    fmax: float = 1e-2
    mesh: tuple[int, int, int] = (2, 2, 2)
    tolerance: float = 1e-3
    batch_size: int = 64
    max_images: int = 4


def _potential(opts: StabilityOptions):
    from autoperi_jax import physics

    if opts.potential == "uff_lj":
        return physics.uff_lennard_jones(cutoff=opts.cutoff)
    if opts.potential == "uff_morse":
        return physics.uff_morse(cutoff=opts.cutoff)
    from autoperi_jax.physics import fitted

    try:
        return fitted.load_potential(opts.potential)
    except FileNotFoundError as e:
        raise ValueError(
            f"unknown potential {opts.potential!r}: use 'uff_lj', 'uff_morse', a fitted "
            f"potential's JSON or one of {fitted.shipped_potentials()}"
        ) from e


def phonon_stability(
    crystals: Sequence[Crystal | None],
    mask: np.ndarray | None = None,
    opts: StabilityOptions = StabilityOptions(),
    progress: bool = True,
) -> dict[str, np.ndarray | float]:
    """Relaxes and phonon-checks ``crystals[mask]``.

    Args:
      crystals: structures (``None`` entries are skipped).
      mask: ``[n]`` bool, which crystals to evaluate (default: every non-None one).
      opts: `StabilityOptions`.
      progress: progress bar.

    Returns:
      dict with ``min_omega2`` ``[n]`` THz^2 (NaN where not evaluated), ``stable`` ``[n]``
      bool, ``relax_converged`` ``[n]`` bool, ``evaluated`` ``[n]`` bool, and the scalars
      ``phonon_stable_rate`` (stable / evaluated), ``relax_converged_rate`` and
      ``n_evaluated``; ``relaxed_frac``: per crystal the ``[n_atoms, 3]`` relaxed
      fractional coordinates (None where not evaluated).
    """
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from autoperi_jax import physics

    n = len(crystals)
    mask = np.array([c is not None for c in crystals]) if mask is None else np.asarray(mask)
    mask = mask & np.array([c is not None and c.num_atoms > 0 for c in crystals], bool)
    pot = _potential(opts)
    # one static stencil: the widest any evaluated crystal needs, capped at max_images
    need = {
        i: physics.n_images_for_cutoff(crystals[i].cell, pot.cutoff) for i in np.flatnonzero(mask)
    }
    todo = [i for i, k in need.items() if max(k) <= opts.max_images]
    out_min = np.full(n, np.nan)
    out_conv = np.zeros(n, bool)
    evaluated = np.zeros(n, bool)
    relaxed: list[np.ndarray | None] = [None] * n
    if todo:
        n_images = tuple(int(max(need[i][a] for i in todo)) for a in range(3))
        n_max = max(crystals[i].num_atoms for i in todo)
        q = jnp.asarray(physics.gamma_and_mp_grid(opts.mesh), jnp.float32)

        def one(cell, frac, numbers, atom_mask):
            r = physics.relax(
                cell, frac, numbers, atom_mask, potential=pot, n_images=n_images,
                n_steps=opts.relax_steps, fmax=opts.fmax,
            )  # fmt: skip
            w2 = physics.min_omega2(
                r.cell, r.frac, numbers, atom_mask, q, potential=pot, n_images=n_images
            )
            return w2, r.converged, r.frac

        fn = jax.jit(jax.vmap(one))
        b = opts.batch_size
        for start in tqdm(
            range(0, len(todo), b), disable=not progress, desc="phonon stability", unit="batch"
        ):
            idx = todo[start : start + b]
            cell = np.tile(np.eye(3) * 10.0, (b, 1, 1))
            frac = np.zeros((b, n_max, 3))
            numbers = np.ones((b, n_max), np.int32)
            am = np.zeros((b, n_max), bool)
            for row, i in enumerate(idx):
                c = crystals[i]
                cell[row], frac[row, : c.num_atoms] = c.cell, c.frac_coords
                numbers[row, : c.num_atoms] = c.numbers
                am[row, : c.num_atoms] = True
            am[len(idx) :, 0] = True  # padding rows: one H atom in a big box (discarded)
            w2, conv, rfrac = jax.device_get(
                fn(
                    jnp.asarray(cell, jnp.float32),
                    jnp.asarray(frac, jnp.float32),
                    jnp.asarray(numbers),
                    jnp.asarray(am),
                )
            )
            out_min[idx] = w2[: len(idx)]
            out_conv[idx] = conv[: len(idx)]
            evaluated[idx] = np.isfinite(w2[: len(idx)])
            for row, i in enumerate(idx):
                if evaluated[i]:
                    relaxed[i] = np.asarray(rfrac[row, : crystals[i].num_atoms], np.float64)
    stable = evaluated & (np.nan_to_num(out_min, nan=-np.inf) >= -opts.tolerance)
    n_eval = int(evaluated.sum())
    return {
        "min_omega2": out_min,
        "stable": stable,
        "relax_converged": out_conv & evaluated,
        "evaluated": evaluated,
        "phonon_stable_rate": float(stable.sum() / n_eval) if n_eval else float("nan"),
        "relax_converged_rate": float((out_conv & evaluated).sum() / n_eval)
        if n_eval
        else float("nan"),
        "n_evaluated": float(n_eval),
        "relaxed_frac": relaxed,
    }
