"""phonon_stable_rate: a stable fcc Lennard-Jones crystal counts as stable, simple cubic
(unstable to shear at the zone boundary M, folded onto Gamma by a 2x2x2 supercell) does
not; padding, skipped entries and the mask do not change a crystal's result."""

import numpy as np

from autoperi_jax.crystal import Crystal
from eval.stability import StabilityOptions, phonon_stability

R_MIN_AR = 3.868  # UFF x_i of Ar [A]: the Lennard-Jones pair minimum


def _fcc(a: float) -> Crystal:
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return Crystal(np.eye(3) * a, frac, np.full(4, 18))


def _sc_supercell(a: float) -> Crystal:
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return Crystal(np.eye(3) * 2 * a, grid / 2.0, np.full(8, 18))


def test_fcc_stable_simple_cubic_unstable():
    fcc, sc = _fcc(R_MIN_AR * np.sqrt(2)), _sc_supercell(R_MIN_AR)
    crystals = [fcc, None, sc, fcc]
    mask = np.array([True, True, True, False])
    opts = StabilityOptions(batch_size=2)  # two batches: padding rows exercised
    out = phonon_stability(crystals, mask, opts, progress=False)
    np.testing.assert_array_equal(out["evaluated"], [True, False, True, False])
    np.testing.assert_array_equal(out["stable"], [True, False, False, False])
    assert out["min_omega2"][0] > -opts.tolerance
    assert out["min_omega2"][2] < -0.05  # THz^2: argon is soft, but this is no noise
    assert out["phonon_stable_rate"] == 0.5 and out["n_evaluated"] == 2
    # the same crystal alone gives the same number (padding / batching independent)
    alone = phonon_stability([sc], opts=opts, progress=False)
    np.testing.assert_allclose(alone["min_omega2"][0], out["min_omega2"][2], rtol=1e-4)
