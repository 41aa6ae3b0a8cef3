"""Periodic message passing: fused tensor product, equivariance, padding-safe gradients."""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.graph import batch_graphs, edge_graph_index
from autoperi_jax.nn.message_passing import PeriodicGNN, edge_geometry, sh_tensor_product
from autoperi_jax.testing import (
    assert_symmetry,
    pad_more,
    random_batch,
    random_rotation,
    rotate_graph,
    rotation_on_irreps,
)


@pytest.mark.parametrize("lmax", [1, 2])
def test_sh_tensor_product_equals_e3nn(lmax):
    key = jax.random.PRNGKey(0)
    irreps = "+".join(f"5x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1))
    src = e3nn.normal(irreps, key, (7,))
    sh = e3nn.spherical_harmonics(
        e3nn.Irreps.spherical_harmonics(lmax), jax.random.normal(key, (7, 3)), normalize=True
    )
    target = e3nn.Irreps("0e+1o+2e")
    ref = e3nn.tensor_product(src, sh, filter_ir_out=target)
    out = sh_tensor_product(src, sh, target)
    assert out.irreps == ref.irreps
    np.testing.assert_allclose(out.array, ref.array, atol=1e-5)


def _inputs(batch):
    b = jax.tree.map(jnp.asarray, batch)
    eg = edge_graph_index(b.n_edge, b.senders.shape[0])
    x = jax.nn.one_hot(b.nodes["numbers"] % 7, 7)
    return (
        x,
        b.nodes["frac_coords"],
        b.globals["cell"],
        b.senders,
        b.receivers,
        b.edges["shifts"],
        b.edges["mask"],
        eg,
    )


@pytest.fixture(scope="module")
def gnn_and_params():
    rng = np.random.default_rng(0)
    batch, graphs = random_batch(rng, 3, 5.0)
    gnn = PeriodicGNN(
        num_layers=2, hidden_irreps="8x0e+4x1o+2x2e", sh_lmax=2, cutoff=5.0, mlp_hidden=16,
        edge_channels=4,
    )  # fmt: skip
    params = jax.jit(gnn.init)(jax.random.PRNGKey(1), *_inputs(batch))
    fn = jax.jit(lambda p, *a: gnn.apply(p, *a)[0].array)
    return gnn, params, fn, graphs


def test_features_rotate_with_the_cell(gnn_and_params):
    gnn, params, fn, graphs = gnn_and_params
    R = random_rotation(np.random.default_rng(3))
    D = rotation_on_irreps(gnn.hidden_irreps, R)
    rotated = [rotate_graph(g, R) for g in graphs]
    n_real = sum(len(g.numbers) for g in graphs)

    def f(gs):
        return fn(params, *_inputs(batch_graphs(gs)))[:n_real]

    # scalars invariant, l=1 and l=2 features rotate with D(R)
    assert_symmetry(f, graphs, rotated, lambda y: y @ D.T, atol=1e-4, msg="rotation")


def test_padding_and_zero_length_edges_give_finite_gradients(gnn_and_params):
    gnn, params, fn, graphs = gnn_and_params
    padded = pad_more(graphs, extra_nodes=5, extra_edges=20, extra_graphs=2)
    inputs = _inputs(padded)
    n_real = sum(len(g.numbers) for g in graphs)
    np.testing.assert_allclose(
        fn(params, *inputs)[:n_real], fn(params, *_inputs(batch_graphs(graphs)))[:n_real],
        atol=1e-5,
    )  # fmt: skip

    def loss(p, frac, cell):
        x, _, _, *rest = inputs
        return jnp.sum(gnn.apply(p, x, frac, cell, *rest)[0].array ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, inputs[1], inputs[2])
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    # gradients reach positions and the cell of real atoms
    assert float(jnp.abs(grads[1][:n_real]).max()) > 0
    assert float(jnp.abs(grads[2][:3]).max()) > 0


def test_edge_geometry_matches_host_distances():
    rng = np.random.default_rng(5)
    batch, graphs = random_batch(rng, 2, 4.5)
    x, frac, cell, s, r, k, m, eg = _inputs(batch)
    geo = edge_geometry(frac, cell, s, r, k, eg, m)
    from autoperi_jax.graph import neighbor_list

    d_host = np.concatenate([neighbor_list(g.frac_coords, g.cell, 4.5)[3] for g in graphs])
    n = len(d_host)
    np.testing.assert_allclose(geo["lengths"][:n], d_host, rtol=1e-5)
    assert float(jnp.abs(geo["lengths"][n:]).max(initial=0.0)) == 0.0
    np.testing.assert_allclose(jnp.linalg.norm(geo["directions"][:n], axis=-1), 1.0, rtol=1e-5)
