"""Periodic neighbour lists, padding and batching, against ASE and analytic truths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.neighborlist import neighbor_list as ase_neighbor_list
from conftest import random_triclinic

from autoperi_jax.crystal import Crystal
from autoperi_jax.graph import (
    BatchIterator,
    GraphSettings,
    PaddingBudget,
    _shift_range,
    batch_graphs,
    crystal_to_graph,
    dense_neighbor_list,
    edge_graph_index,
    edge_vectors,
    make_buckets,
    neighbor_list,
    rewrap,
    safe_norm,
)

CUTOFF = 8.0
BOUNDARY = 1e-6  # pairs this close to the cutoff may fall on either side in float64


def ase_triples(crystal: Crystal, cutoff: float):
    i, j, S, d = ase_neighbor_list("ijSd", crystal.to_ase(), cutoff)
    keep = np.abs(d - cutoff) > BOUNDARY
    return {(a, b, *s): dd for a, b, s, dd in zip(i[keep], j[keep], S[keep].tolist(), d[keep])}


def our_triples(recv, send, shifts, dist, cutoff):
    keep = np.abs(dist - cutoff) > BOUNDARY
    return {
        (a, b, *s): dd
        for a, b, s, dd in zip(
            recv[keep], send[keep], np.asarray(shifts)[keep].tolist(), dist[keep]
        )
    }


def assert_same_edges(ours: dict, ref: dict):
    assert ours.keys() == ref.keys(), (
        f"{len(ours.keys() - ref.keys())} extra, {len(ref.keys() - ours.keys())} missing"
    )
    k = list(ref)
    np.testing.assert_allclose([ours[x] for x in k], [ref[x] for x in k], atol=1e-5)


@pytest.fixture(scope="module")
def ase_perov_edges(perov_test):
    """ASE's (i, j, k) -> distance of every Perov-5 test structure, computed once."""
    return [ase_triples(perov_test.crystal(i), CUTOFF) for i in range(len(perov_test))]


def test_host_neighbor_list_matches_ase_on_every_perov5_test_structure(perov_test, ase_perov_edges):
    assert len(perov_test) == 3785
    for i in range(len(perov_test)):
        c = perov_test.crystal(i)
        r, s, k, d = neighbor_list(c.frac_coords, c.cell, CUTOFF)
        assert_same_edges(our_triples(r, s, k, d, CUTOFF), ase_perov_edges[i])


@pytest.mark.parametrize("seed", range(12))
def test_host_neighbor_list_matches_ase_on_small_triclinic_cells(seed):
    rng = np.random.default_rng(seed)
    c = random_triclinic(rng, n_atoms=int(rng.integers(1, 6)), min_len=2.0)
    r, s, k, d = neighbor_list(c.frac_coords, c.cell, CUTOFF)
    ref = ase_triples(c, CUTOFF)
    assert len(ref) > 0
    assert_same_edges(our_triples(r, s, k, d, CUTOFF), ref)
    # own images are edges, the zero-shift self pair is not
    own = (r == s) & np.any(k != 0, axis=1)
    assert own.any()
    assert not np.any((r == s) & np.all(k == 0, axis=1))


def test_cutoff_graph_is_symmetric(perov_test):
    c = perov_test.crystal(0)
    r, s, k, _ = neighbor_list(c.frac_coords, c.cell, 6.0)
    fwd = set(zip(r.tolist(), s.tolist(), map(tuple, k.tolist())))
    rev = set(zip(s.tolist(), r.tolist(), map(tuple, (-k).tolist())))
    assert fwd == rev


def _dense_all(frac, cell, n_atoms, max_shift, max_edges):
    mask = jnp.arange(frac.shape[1]) < n_atoms[:, None]
    fn = jax.jit(
        jax.vmap(lambda f, c, m: dense_neighbor_list(f, c, m, CUTOFF, max_shift, max_edges))
    )
    return jax.tree.map(np.asarray, fn(frac, cell, mask))


def test_in_jit_neighbor_list_matches_ase_on_perov5_test(perov_test, ase_perov_edges, x64):
    n = len(perov_test)
    crystals = [perov_test.crystal(i) for i in range(n)]
    max_shift = max(int(_shift_range(c.cell, CUTOFF).max()) for c in crystals)
    frac = np.stack([c.frac_coords for c in crystals])
    cell = np.stack([c.cell for c in crystals])
    for start in range(0, n, 512):
        sl = slice(start, start + 512)
        out = _dense_all(frac[sl], cell[sl], np.full(len(frac[sl]), 5), max_shift, 1600)
        assert out["complete"].all() and not out["overflow"].any()
        for b in range(len(crystals[sl])):
            m = out["mask"][b]
            ours = our_triples(
                out["receivers"][b][m],
                out["senders"][b][m],
                out["shifts"][b][m],
                out["distances"][b][m],
                CUTOFF,
            )
            assert_same_edges(ours, ase_perov_edges[start + b])


def test_in_jit_neighbor_list_on_padded_triclinic_cells_and_flags(x64):
    rng = np.random.default_rng(7)
    crystals = [random_triclinic(rng, int(rng.integers(1, 5)), 2.0) for _ in range(8)]
    max_shift = max(int(_shift_range(c.cell, CUTOFF).max()) for c in crystals)
    n_max = 4
    frac = np.zeros((8, n_max, 3))
    cell = np.stack([c.cell for c in crystals])
    n_atoms = np.array([c.num_atoms for c in crystals])
    for b, c in enumerate(crystals):
        frac[b, : c.num_atoms] = c.frac_coords
    out = _dense_all(frac, cell, n_atoms, max_shift, 8000)
    assert out["complete"].all() and not out["overflow"].any()
    for b, c in enumerate(crystals):
        m = out["mask"][b]
        ours = our_triples(
            out["receivers"][b][m],
            out["senders"][b][m],
            out["shifts"][b][m],
            out["distances"][b][m],
            CUTOFF,
        )
        assert_same_edges(ours, ase_triples(c, CUTOFF))
    # too few slots -> overflow; too small an image range -> incomplete
    small = _dense_all(frac, cell, n_atoms, max_shift, 16)
    np.testing.assert_array_equal(small["overflow"], small["num_edges"] > 16)
    assert small["overflow"].sum() >= 4
    narrow = _dense_all(frac, cell, n_atoms, 1, 8000)
    assert not narrow["complete"].all()


def test_max_neighbors_keeps_nearest_and_ties():
    # simple cubic: 6 nearest neighbours at a, 12 at sqrt(2) a
    c = Crystal(np.eye(3) * 3.0, np.zeros((1, 3)), np.array([29]))
    r, s, k, d = neighbor_list(c.frac_coords, c.cell, GraphSettings(6.0, max_neighbors=4))
    assert len(d) == 6 and np.allclose(d, 3.0)  # 4 requested, the 2 tied ones kept too
    r, s, k, d = neighbor_list(c.frac_coords, c.cell, GraphSettings(6.0, max_neighbors=7))
    assert len(d) == 18 and np.allclose(np.sort(d)[6:], 3.0 * np.sqrt(2))


def test_rewrap_keeps_edge_vectors(perov_test):
    rng = np.random.default_rng(0)
    g = perov_test.graphs[3]
    # unwrapped coordinates: every atom moved by its own lattice vector, plus a shift
    shifted = g.frac_coords + rng.integers(-2, 3, size=g.frac_coords.shape) + 0.37
    before = edge_vectors(shifted, g.cell, g.senders, g.receivers, g.shifts)
    wrapped, shifts = rewrap(shifted, g.senders, g.receivers, g.shifts)
    assert np.all((wrapped >= 0) & (wrapped < 1))
    after = edge_vectors(wrapped, g.cell, g.senders, g.receivers, shifts)
    np.testing.assert_allclose(after, before, atol=1e-9)


def _per_graph_edge_length_sum(batch):
    """A per-graph result computed in jit: sum of edge lengths of each graph."""
    e = batch.senders.shape[0]
    eg = edge_graph_index(batch.n_edge, e)
    r = edge_vectors(
        batch.nodes["frac_coords"],
        batch.globals["cell"],
        batch.senders,
        batch.receivers,
        batch.edges["shifts"],
        eg,
    )
    d = jnp.where(batch.edges["mask"], safe_norm(r), 0.0)
    return jax.ops.segment_sum(d, eg, num_segments=batch.n_node.shape[0])


def test_padding_changes_no_per_graph_result(perov_test):
    graphs = perov_test.graphs[:6]
    tight = batch_graphs(graphs)
    loose = batch_graphs(graphs, PaddingBudget(n_node=64, n_edge=4096, n_graph=11))
    f = jax.jit(_per_graph_edge_length_sum)
    a, b = np.asarray(f(tight)), np.asarray(f(loose))
    np.testing.assert_allclose(a[:6], b[:6], rtol=1e-6)
    assert np.all(b[6:] == 0)
    # and the value is right: ASE distances, float32
    ref = [np.sum(ase_neighbor_list("d", perov_test.crystal(i).to_ase(), 6.0)) for i in range(6)]
    np.testing.assert_allclose(a[:6], ref, rtol=1e-5)


def test_padding_edges_have_finite_gradients(perov_test):
    batch = batch_graphs(perov_test.graphs[:3], PaddingBudget(32, 2048, 5))

    def loss(frac, cell):
        b = batch._replace(
            nodes={**batch.nodes, "frac_coords": frac}, globals={**batch.globals, "cell": cell}
        )
        return jnp.sum(_per_graph_edge_length_sum(b))

    gf, gc = jax.grad(loss, argnums=(0, 1))(batch.nodes["frac_coords"], batch.globals["cell"])
    assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gc))


def test_batch_layout_and_masks(perov_test):
    graphs = perov_test.graphs[:4]
    b = batch_graphs(graphs, PaddingBudget(40, 2048, 6))
    assert b.n_node.tolist()[:4] == [5] * 4 and b.n_node.sum() == 40
    assert b.n_edge.sum() == 2048
    assert b.nodes["mask"].sum() == 20 and b.globals["mask"].tolist() == [1, 1, 1, 1, 0, 0]
    assert b.edges["mask"].sum() == sum(len(g.senders) for g in graphs)
    assert np.all(b.nodes["numbers"][20:] == 0)
    np.testing.assert_allclose(b.globals["lattice"][4], [1, 1, 1, 90, 90, 90], atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        batch_graphs(graphs, PaddingBudget(10, 2048, 6))


def test_buckets_bound_the_number_of_shapes_per_epoch(perov_test):
    graphs = perov_test.graphs[:1000]
    it = BatchIterator(graphs, batch_size=32, seed=1)
    assert len(it.buckets) <= 3
    shapes = set()
    for _ in range(it.steps_per_epoch):
        b = next(it)
        shapes.add((b.nodes["numbers"].shape[0], b.senders.shape[0], b.n_node.shape[0]))
    assert len(shapes) <= len(it.buckets)
    assert it.epoch == 0 and it.step_in_epoch == it.steps_per_epoch


def test_iterator_is_deterministic_and_resumable(perov_test):
    graphs = perov_test.graphs[:200]
    a = BatchIterator(graphs, batch_size=16, seed=3)
    batches = [next(a) for _ in range(20)]  # crosses an epoch boundary (12 steps/epoch)
    b = BatchIterator(graphs, batch_size=16, seed=3)
    for _ in range(7):
        next(b)
    state = b.state()
    c = BatchIterator(graphs, batch_size=16, seed=3)
    c.restore(state)
    for ref in batches[7:]:
        got = next(c)
        jax.tree.map(np.testing.assert_array_equal, got, ref)
    d = BatchIterator(graphs, batch_size=16, seed=4)
    assert not np.array_equal(next(d).nodes["numbers"], batches[0].nodes["numbers"])


def test_sharded_iterator_covers_the_global_batch(perov_test):
    graphs = perov_test.graphs[:96]
    everything = sorted((*g.numbers.tolist(), float(np.float32(g.cell[0, 0]))) for g in graphs)
    full = BatchIterator(graphs, 24, seed=5, shuffle=True, local_shards=None)
    ref = next(full)
    ref_keys = sorted(_graph_keys(ref))
    parts = []
    shapes = set()
    for p in range(2):
        it = BatchIterator(graphs, 24, seed=5, local_shards=3, process_index=p, process_count=2)
        stacked = next(it)
        assert stacked.nodes["numbers"].shape[0] == 3  # leading shard axis
        for s in range(3):
            shard = jax.tree.map(lambda x, s=s: x[s], stacked)
            shapes.add(shard.senders.shape)
            parts += _graph_keys(shard)
    assert sorted(parts) == ref_keys and len(parts) == 24
    assert len(shapes) == 1
    assert len(set(ref_keys)) == 24 and set(ref_keys) <= set(everything)
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(graphs, 25, local_shards=2)


def _graph_keys(batch):
    keys = []
    off = 0
    for g, n in enumerate(batch.n_node.tolist()):
        if batch.globals["mask"][g]:
            z = batch.nodes["numbers"][off : off + n].tolist()
            keys.append((*z, float(np.float32(batch.globals["cell"][g][0, 0]))))
        off += n
    return keys


def test_crystal_to_graph_properties_and_features(perov_test):
    c = perov_test.crystal(0)
    g = crystal_to_graph(c, GraphSettings(5.0), ["heat_ref", "missing"])
    assert g.properties[0] == pytest.approx(c.properties["heat_ref"])
    assert np.isnan(g.properties[1])
    b = batch_graphs([g])
    feats = b.nodes["features"][:5]
    from ase.data import covalent_radii

    np.testing.assert_allclose(feats[:, 1], covalent_radii[c.numbers], atol=1e-6)
    assert make_buckets(np.array([5]), np.array([len(g.senders)]), 1)[-1].fits(5, len(g.senders), 1)


def test_first_true_equals_nonzero_with_a_size():
    """`first_true` (the edge lists' compaction) is ``jnp.nonzero(size=, fill_value=0)``:
    fewer, as many and more True entries than the size, none at all, and under vmap."""
    from autoperi_jax.graph import first_true

    rng = np.random.default_rng(0)
    for p in (0.0, 0.01, 0.2, 0.9):
        flat = jnp.asarray(rng.uniform(size=500) < p)
        for size in (1, 7, 100, 600):
            want = jnp.nonzero(flat, size=size, fill_value=0)[0]
            np.testing.assert_array_equal(first_true(flat, size), want, err_msg=f"{p} {size}")
    rows = jnp.asarray(rng.uniform(size=(4, 300)) < 0.1)
    got = jax.vmap(lambda f: first_true(f, 40))(rows)
    want = np.stack([np.asarray(jnp.nonzero(r, size=40, fill_value=0)[0]) for r in rows])
    np.testing.assert_array_equal(got, want)
