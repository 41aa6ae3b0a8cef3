"""The in-jit periodic candidate list (`periodic_candidates`) on general crystals: MP-20
cells (1-20 atoms, many species) and Carbon-24 cells (plane spacings down to 1.8 A, far
below the cutoff), against ASE's ``neighbor_list('ijSd')`` as the independent truth."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase.neighborlist import neighbor_list as ase_neighbor_list

from autoperi_jax.crystal import Crystal
from autoperi_jax.graph import periodic_candidates


def _plane_spacing(cell: np.ndarray) -> float:
    return float(1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0).max())


@pytest.fixture(scope="module")
def general_crystals(mp20_test_head, carbon24_test_head) -> list[Crystal]:
    # the six Carbon-24 cells with the smallest plane spacing (1.78-1.94 A)
    carbon = sorted(carbon24_test_head, key=lambda c: _plane_spacing(c.cell))[:6]
    return mp20_test_head[:12] + carbon


@pytest.mark.parametrize("cutoff", [4.0, 5.0])
def test_candidates_equal_ase_on_mp20_and_carbon24_cells(general_crystals, cutoff):
    crystals = general_crystals
    assert min(_plane_spacing(c.cell) for c in crystals) < 1.9  # cells far below the cutoff
    G, A = len(crystals), max(c.num_atoms for c in crystals)
    frac = np.zeros((G, A, 3), np.float32)
    cell = np.stack([c.cell for c in crystals]).astype(np.float32)
    mask = np.zeros((G, A), bool)
    for g, c in enumerate(crystals):
        frac[g, : c.num_atoms] = c.frac_coords
        mask[g, : c.num_atoms] = True
    max_shift = int(max(np.floor(cutoff / _plane_spacing(c.cell)) + 1 for c in crystals))
    cand = jax.jit(periodic_candidates, static_argnums=(3, 4, 5))(
        frac, cell, mask, cutoff, max_shift, 1200
    )
    assert not bool(cand.overflow)
    assert bool(np.all(np.asarray(cand.complete)))
    m = np.asarray(cand.mask)
    eg, recv = np.asarray(cand.edge_graph)[m], np.asarray(cand.receivers)[m]
    send, shifts = np.asarray(cand.senders)[m], np.asarray(cand.shifts)[m]
    dist = np.asarray(cand.distances)[m]
    for g, c in enumerate(crystals):
        atoms = c.to_ase()
        assert np.all((c.frac_coords >= 0) & (c.frac_coords < 1))  # as the list assumes
        i, j, S, d = ase_neighbor_list("ijSd", atoms, cutoff)
        ours = eg == g
        got = {
            (int(a) % A, int(b) % A, *map(int, k)): float(r)
            for a, b, k, r in zip(recv[ours], send[ours], shifts[ours], dist[ours])
        }
        want = {(int(a), int(b), *map(int, k)): float(r) for a, b, k, r in zip(i, j, S, d)}
        assert set(got) == set(want), f"crystal {g}: {len(got)} vs {len(want)} edges"
        np.testing.assert_allclose(
            [got[k] for k in want], list(want.values()), atol=2e-4, err_msg=f"crystal {g}"
        )
        assert int(np.asarray(cand.num_edges)[g]) == len(want)
