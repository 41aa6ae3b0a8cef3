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


def _dense(crystals: list[Crystal]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    G, A = len(crystals), max(c.num_atoms for c in crystals)
    frac = np.zeros((G, A, 3), np.float32)
    cell = np.stack([c.cell for c in crystals]).astype(np.float32)
    mask = np.zeros((G, A), bool)
    for g, c in enumerate(crystals):
        assert np.all((c.frac_coords >= 0) & (c.frac_coords < 1))  # as the list assumes
        frac[g, : c.num_atoms] = c.frac_coords
        mask[g, : c.num_atoms] = True
    return frac, cell, mask


def _assert_equals_ase(cand, crystals: list[Crystal], cutoff: float, skip=()) -> None:
    A = max(c.num_atoms for c in crystals)
    m = np.asarray(cand.mask)
    eg, recv = np.asarray(cand.edge_graph)[m], np.asarray(cand.receivers)[m]
    send, shifts = np.asarray(cand.senders)[m], np.asarray(cand.shifts)[m]
    dist = np.asarray(cand.distances)[m]
    for g, c in enumerate(crystals):
        if g in skip:
            continue
        i, j, S, d = ase_neighbor_list("ijSd", c.to_ase(), cutoff)
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


_candidates = jax.jit(periodic_candidates, static_argnums=(3, 4, 5, 6))


@pytest.mark.parametrize("cutoff", [4.0, 5.0])
def test_candidates_equal_ase_on_mp20_and_carbon24_cells(general_crystals, cutoff):
    crystals = general_crystals
    assert min(_plane_spacing(c.cell) for c in crystals) < 1.9  # cells far below the cutoff
    frac, cell, mask = _dense(crystals)
    max_shift = int(max(np.floor(cutoff / _plane_spacing(c.cell)) + 1 for c in crystals))
    for per_edge in (4, 0):  # the per-pair image boxes; the fixed-range fallback
        cand = _candidates(frac, cell, mask, cutoff, max_shift, 1200, per_edge)
        assert not bool(cand.overflow)
        assert bool(np.all(np.asarray(cand.complete)))
        _assert_equals_ase(cand, crystals, cutoff)


def test_image_boxes_cover_cells_beyond_the_fallback_range(general_crystals):
    # [-2, 2]^3 covers none of the 1.8-1.9 A Carbon-24 cells at 5 A; the boxes need none
    crystals, cutoff = general_crystals, 5.0
    frac, cell, mask = _dense(crystals)
    boxes = _candidates(frac, cell, mask, cutoff, 2, 1200, 4)
    ranged = _candidates(frac, cell, mask, cutoff, 2, 1200, 0)  # no box buffer: fallback
    assert bool(np.all(np.asarray(boxes.complete)))
    assert not bool(np.all(np.asarray(ranged.complete)))
    _assert_equals_ase(boxes, crystals, cutoff)
    # where the fallback's range covers the cell, the two lists are the same, in order
    ok = np.flatnonzero(np.asarray(ranged.complete))
    assert len(ok) >= 6
    for g in ok:
        b = np.asarray(boxes.mask) & (np.asarray(boxes.edge_graph) == g)
        r = np.asarray(ranged.mask) & (np.asarray(ranged.edge_graph) == g)
        for field in ("receivers", "senders", "shifts", "distances"):
            np.testing.assert_array_equal(
                np.asarray(getattr(boxes, field))[b], np.asarray(getattr(ranged, field))[r]
            )


def test_a_degenerate_cell_takes_the_fallback_and_spares_the_others(general_crystals):
    crystals, cutoff = general_crystals[:6], 4.0
    frac, cell, mask = _dense(crystals)
    cell[2] = np.nan  # e.g. a diverged lattice decoder
    cand = _candidates(frac, cell, mask, cutoff, 3, 1200, 4)
    assert not np.any(np.asarray(cand.mask) & (np.asarray(cand.edge_graph) == 2))
    _assert_equals_ase(cand, crystals, cutoff, skip=(2,))
