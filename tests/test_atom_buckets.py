"""Batching by atom count: classes, the iterator's epochs, and a loss that does not
change with the bucket a batch is padded to."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.graph import BatchIterator, PaddingBudget, atom_classes, batch_graphs
from autoperi_jax.loss import make_loss_fn
from autoperi_jax.model import compute_normalisers, dense_layout, edge_budget
from autoperi_jax.testing import random_graph, tiny_model, tiny_params


def test_atom_classes_are_quantile_bounds_and_fill_batches():
    n = np.array([1] * 10 + [4] * 50 + [8] * 50 + [12] * 50 + [20] * 50)
    assert atom_classes(n, 20, 1, 8) == [20]
    slots = atom_classes(n, 20, 3, 8)
    assert slots[-1] == 20 and slots == sorted(slots) and len(slots) == 3
    # a class too small for its batches merges into the next
    assert atom_classes(np.array([1, 2] + [20] * 100), 20, 2, 16) == [20]
    with pytest.raises(ValueError, match="21 atoms"):
        atom_classes(np.array([3, 21]), 20, 2, 1)


@pytest.fixture(scope="module")
def graphs():
    rng = np.random.default_rng(0)
    return [random_graph(rng, 4.0, n_atoms=(1, 8)) for _ in range(120)]


def test_iterator_batches_within_one_class_and_covers_the_epoch(graphs):
    sizes = np.array([len(g.numbers) for g in graphs])
    slots = atom_classes(sizes, 8, 3, 16)
    it = BatchIterator(graphs, 8, seed=1, atom_slots=slots, num_buckets=2)
    seen = []
    for _ in range(it.steps_per_epoch):
        b = next(it)
        width = b.globals["slot_mask"].shape[1]
        assert width in slots
        real = b.n_node[b.globals["mask"]]
        lower = max([s for s in slots if s < width], default=0)
        assert np.all((real > lower) & (real <= width))  # one class per batch
        # slot_mask: the dense layout's atom slots
        np.testing.assert_array_equal(b.globals["slot_mask"].sum(1)[b.globals["mask"]], real)
        seen.extend(real.tolist())
    # every class drops less than a batch
    per_class = [np.sum((sizes > lo) & (sizes <= hi)) for lo, hi in zip([0, *slots], slots)]
    assert len(seen) == sum(c - c % 8 for c in per_class)
    # deterministic, and resumable mid-epoch
    a = BatchIterator(graphs, 8, seed=1, atom_slots=slots)
    b = BatchIterator(graphs, 8, seed=1, atom_slots=slots)
    first = [next(a) for _ in range(5)]
    b.restore({"epoch": 0, "step_in_epoch": 3})
    for x, y in zip(first[3:], [next(b), next(b)]):
        np.testing.assert_array_equal(x.nodes["frac_coords"], y.nodes["frac_coords"])
    # the next epoch is another order
    a.restore({"epoch": 1, "step_in_epoch": 0})
    assert not all(np.array_equal(x.n_node, next(a).n_node) for x in [first[0], first[1], first[2]])


def test_loss_does_not_change_with_the_atom_bucket(graphs):
    """The same small crystals in a full-width batch (A = 8) and in a 4-slot bucket give
    the same loss, metrics and gradients (noise is drawn for all slots, then cut)."""
    small = [g for g in graphs if len(g.numbers) <= 4][:5]
    model, settings = tiny_model(max_atoms=8, enc_layers=1, dec_layers=1)
    settings = dataclasses.replace(settings, flow_edges_per_crystal=300)
    params = tiny_params(model, settings)
    norm = compute_normalisers(small)
    n = sum(len(g.numbers) for g in small)
    e = sum(len(g.senders) for g in small)
    full = batch_graphs(small, PaddingBudget(n + 1, e, 7))
    narrow = batch_graphs(small, PaddingBudget(n + 1, e, 7, atom_slots=4))
    assert dense_layout(jax.tree.map(jnp.asarray, narrow), 8).mask.shape == (7, 4)
    assert edge_budget(300, 4, 8) == 152 and edge_budget(300, 8, 8) == 300
    grad = jax.jit(jax.value_and_grad(make_loss_fn(model, settings, norm), has_aux=True))
    key = jax.random.PRNGKey(3)
    (la, ma), ga = grad(params, jax.tree.map(jnp.asarray, full), key)
    (lb, mb), gb = grad(params, jax.tree.map(jnp.asarray, narrow), key)
    assert float(ma["flow_overflow"]) == 0 and float(mb["flow_overflow"]) == 0
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    for k in ("l_lattice", "l_atom", "l_flow", "l_guess", "l_connect", "connect_acc"):
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
