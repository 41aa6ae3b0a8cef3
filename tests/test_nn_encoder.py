"""Symmetries of the latent code z for every image-embedding option f(k_ij).

z must be unchanged under rotation of the cell, permutation of atoms, translation of all
atoms (mod 1), re-wrapping an atom into another image, and extra padding. The method's
``raw`` embedding of k_ij breaks translation and re-wrapping on purpose (k_ij depends on
which image each atom was wrapped into); its test asserts that z DOES change there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.graph import GraphSettings, PaddingBudget, batch_graphs, crystal_to_graph
from autoperi_jax.nn import IMAGE_EMBEDDINGS, Autoencoder
from autoperi_jax.testing import (
    assert_symmetry,
    max_difference,
    permute_graph,
    random_graph,
    random_rotation,
    rewrap_atom,
    rotate_graph,
    translate_graph,
)

BUDGET = PaddingBudget(n_node=24, n_edge=600, n_graph=4)


@pytest.fixture(scope="module")
def graphs():
    rng = np.random.default_rng(11)
    return [random_graph(rng, 5.0, n_atoms=(3, 5)) for _ in range(3)]


def _encoder(kind, graphs, posterior="deterministic", init_budget=BUDGET):
    model = Autoencoder(
        max_atoms=5, image_embedding=kind, enc_layers=2, enc_irreps="8x0e+4x1o", sh_lmax=1,
        enc_cutoff=5.0, mlp_hidden=16, embed_features=8, head_hidden=16, edge_channels=4,
        latent_lattice=3, latent_comp=4, latent_struct=5, posterior=posterior,
    )  # fmt: skip
    batch = jax.tree.map(jnp.asarray, batch_graphs(graphs, init_budget))
    params = jax.jit(lambda k, b: model.init(k, b, method=Autoencoder.encode))(
        jax.random.PRNGKey(0), batch
    )
    fn = jax.jit(lambda b: model.apply(params, b, method=Autoencoder.encode))
    n = len(graphs)

    def z_of(gs, budget=BUDGET):
        out = fn(jax.tree.map(jnp.asarray, batch_graphs(gs, budget)))
        return {k: v[:n] for k, v in out.items()}

    return z_of


def _variants(graphs):
    rng = np.random.default_rng(5)
    R = random_rotation(rng)
    g0 = graphs[0]
    return {
        "rotation": [rotate_graph(g, R) for g in graphs],
        "permutation": [permute_graph(g, rng.permutation(len(g.numbers))) for g in graphs],
        "translation": [translate_graph(g, rng.uniform(size=3)) for g in graphs],
        "rewrap": [rewrap_atom(g0, 1, (1, -1, 2)), *graphs[1:]],
    }


@pytest.mark.parametrize("kind", [k for k in IMAGE_EMBEDDINGS if k != "raw"])
def test_latent_is_invariant(kind, graphs):
    z_of = _encoder(kind, graphs)
    ref = z_of(graphs)
    assert ref["z"].shape == (3, 12)
    for name, gs in _variants(graphs).items():
        assert_symmetry(lambda x: x, ref, z_of(gs), atol=2e-4, rtol=2e-4, msg=f"{kind}/{name}")
    if kind == "self_image":  # extra padding (a new static shape: checked once)
        big = PaddingBudget(40, 900, 7)
        assert_symmetry(lambda x: x, ref, z_of(graphs, big), atol=2e-4, rtol=2e-4, msg="pad")


def test_raw_image_embedding_breaks_translation_and_rewrap(graphs):
    """The method's raw f(k_ij): rotation / permutation / padding invariant, but z changes
    when atoms are translated across the cell boundary or re-wrapped."""
    z_of = _encoder("raw", graphs)
    ref = z_of(graphs)
    v = _variants(graphs)
    for name in ("rotation", "permutation"):
        assert_symmetry(lambda x: x, ref, z_of(v[name]), atol=2e-4, rtol=2e-4, msg=name)
    for name in ("translation", "rewrap"):
        assert max_difference(ref["z"], z_of(v[name])["z"]) > 1e-3, name
    # translation by a vector that crosses no boundary keeps every k_ij, hence z
    g = graphs[0]
    small = 0.5 * (1.0 - np.asarray(g.frac_coords).max(0))
    assert_symmetry(
        lambda x: x, ref, z_of([translate_graph(g, small), *graphs[1:]]), atol=2e-4, rtol=2e-4
    )


def test_gaussian_posterior_outputs(graphs):
    z_of = _encoder("self_image", graphs, posterior="gaussian")
    out = z_of(graphs)
    assert out["z_mean"].shape == out["z_logvar"].shape == (3, 12)
    np.testing.assert_allclose(out["z"], out["z_mean"])
    rot = _variants(graphs)["rotation"]
    assert_symmetry(lambda x: x, out, z_of(rot), atol=2e-4, rtol=2e-4, msg="rotation")


def test_latent_is_invariant_on_20_atom_mp20_crystals(mp20_largest):
    """The same symmetries on real MP-20 test crystals of 16-20 atoms (many species,
    cells of every shape), with budgets sized to them; plus extra padding."""
    assert min(c.num_atoms for c in mp20_largest) >= 16
    graphs = [crystal_to_graph(c, GraphSettings(cutoff=5.0)) for c in mp20_largest]
    n = sum(len(g.numbers) for g in graphs) + 8
    e = max(len(g.senders) for g in graphs) * 3 + 64
    budget = PaddingBudget(n, e, 4)
    z_of = _encoder("self_image", graphs, init_budget=budget)
    ref = z_of(graphs, budget)
    for name, gs in _variants(graphs).items():
        assert_symmetry(lambda x: x, ref, z_of(gs, budget), atol=5e-4, rtol=5e-4, msg=name)
    padded = PaddingBudget(n + 40, e + 500, 7)
    assert_symmetry(lambda x: x, ref, z_of(graphs, padded), atol=5e-4, rtol=5e-4, msg="pad")
