"""Host-side reconstruction checks (`autoperi_jax.reconstruct`: matcher, bond graph)."""

import numpy as np

from autoperi_jax.reconstruct import bond_graph, connectivity_metrics
from autoperi_jax.testing import random_crystal
from train.trainer import match_metrics


def _bonds_of(c, cutoff=4.0, tol=0.25):
    edges = sorted(bond_graph(c, cutoff, tol))
    e = np.array(edges, int).reshape(-1, 5)
    return {"receivers": e[:, 0], "senders": e[:, 1], "shifts": e[:, 2:]}


def test_match_metrics_perfect_and_shuffled():
    rng = np.random.default_rng(0)
    refs = [random_crystal(rng, n_atoms=4, species=(8, 22, 38)) for _ in range(3)]
    # same crystals, translated and with atoms permuted: a perfect reconstruction
    preds = []
    for c in refs:
        p = rng.permutation(c.num_atoms)
        preds.append(c.replace(frac_coords=c.frac_coords[p] + 0.3, numbers=c.numbers[p]))
    m = match_metrics(preds, refs, check_composition=False)
    assert m["match_rate"] == 1.0 and m["rmse"] < 1e-6
    # wrong species never match
    wrong = [c.replace(numbers=np.full(c.num_atoms, 9)) for c in refs]
    assert match_metrics(wrong, refs, check_composition=False)["match_rate_any"] == 0.0


def test_connectivity_metrics():
    rng = np.random.default_rng(1)
    refs = [random_crystal(rng, n_atoms=4, species=(8, 22, 38), min_distance=1.5) for _ in range(3)]
    bonds = [_bonds_of(c) for c in refs]
    assert sum(len(b["senders"]) for b in bonds) > 0
    m = connectivity_metrics(refs, bonds, refs, 4.0, 0.25)
    assert m == {"bond_f1": 1.0, "coordination_match": 1.0}
    empty = [{k: v[:0] for k, v in b.items()} for b in bonds]
    m = connectivity_metrics(refs, empty, refs, 4.0, 0.25)
    assert m["bond_f1"] == 0.0
