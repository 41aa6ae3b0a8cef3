"""End to end: the decoded crystal (lattice, composition, coordinates) does not depend on
how the input crystal is rotated, numbered, translated, wrapped or padded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.graph import PaddingBudget, batch_graphs
from autoperi_jax.model import compute_normalisers, make_reconstruct_fn
from autoperi_jax.testing import (
    permute_graph,
    random_graph,
    random_rotation,
    rewrap_atom,
    rotate_graph,
    tiny_model,
    tiny_params,
    translate_graph,
)

BUDGET = PaddingBudget(24, 600, 4)


@pytest.fixture(scope="module")
def decode():
    rng = np.random.default_rng(21)
    graphs = [random_graph(rng, 5.0, n_atoms=(3, 5)) for _ in range(3)]
    model, settings = tiny_model()
    params = tiny_params(model, settings)
    fn = jax.jit(make_reconstruct_fn(model, settings, compute_normalisers(graphs)))

    def run(gs):
        out = fn(params, jax.tree.map(jnp.asarray, batch_graphs(gs, BUDGET)), jax.random.PRNGKey(3))
        keep = ("cell", "numbers", "frac", "mask", "n_atoms", "z")
        return {k: np.asarray(out[k])[:3] for k in keep}

    return run, graphs


def _close(a, b, what):
    np.testing.assert_array_equal(a["numbers"], b["numbers"], err_msg=what)
    np.testing.assert_array_equal(a["n_atoms"], b["n_atoms"], err_msg=what)
    np.testing.assert_allclose(a["cell"], b["cell"], atol=1e-4, err_msg=what)
    d = a["frac"] - b["frac"]
    np.testing.assert_allclose(d - np.round(d), 0.0, atol=2e-4, err_msg=what)


def test_decoded_crystal_is_invariant(decode):
    run, graphs = decode
    ref = run(graphs)
    rng = np.random.default_rng(8)
    R = random_rotation(rng)
    variants = {
        "rotation": [rotate_graph(g, R) for g in graphs],
        "permutation": [permute_graph(g, rng.permutation(len(g.numbers))) for g in graphs],
        "translation": [translate_graph(g, rng.uniform(size=3)) for g in graphs],
        "rewrap": [graphs[0], rewrap_atom(graphs[1], 2, (-1, 0, 1)), graphs[2]],
    }
    for name, gs in variants.items():
        _close(ref, run(gs), name)
    # the decoded cell is in the canonical orientation whatever the input orientation
    assert np.allclose(ref["cell"][:, 0, 1:], 0) and np.allclose(ref["cell"][:, 1, 2], 0)
