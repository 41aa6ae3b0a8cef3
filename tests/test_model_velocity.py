"""Symmetries of the coordinate decoder's velocity field v(x_t, t | z, species, cell).

The velocity is returned in fractional units: rotating the cell leaves it unchanged
(equivalently, the Cartesian velocity v @ cell rotates with the cell); permuting atoms
permutes it; translating all atoms or moving one atom to another periodic image leaves it
unchanged; extra padding changes nothing.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.elements import atom_features
from autoperi_jax.graph import PaddingBudget, batch_graphs
from autoperi_jax.model import dense_layout, dense_velocity
from autoperi_jax.testing import (
    assert_symmetry,
    random_graph,
    random_rotation,
    tiny_model,
    tiny_params,
)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    graphs = [random_graph(rng, 5.0, n_atoms=(3, 5)) for _ in range(3)]
    model, settings = tiny_model()
    batch = jax.tree.map(jnp.asarray, batch_graphs(graphs, PaddingBudget(24, 600, 4)))
    params = tiny_params(model, settings)
    d = dense_layout(batch, settings.max_atoms)
    z = jax.random.normal(jax.random.PRNGKey(1), (4, 12))
    t = jnp.array([0.1, 0.5, 0.9, 0.0])

    @jax.jit
    def v_of(inp):
        return dense_velocity(
            model, params, inp["z"], inp["t"], inp["numbers"], inp["features"], inp["frac"],
            inp["cell"], inp["mask"], settings,
        )[0]  # fmt: skip

    fields = ("numbers", "features", "frac", "cell", "mask")
    inp = {"z": z, "t": t, **{k: getattr(d, k) for k in fields}}
    return v_of, inp, [len(g.numbers) for g in graphs]


def test_velocity_is_mean_free_and_zero_on_padding(setup):
    v_of, inp, sizes = setup
    v = v_of(inp)
    m = inp["mask"][..., None]
    np.testing.assert_allclose(jnp.sum(v * m, 1), 0.0, atol=1e-5)
    assert float(jnp.abs(jnp.where(m, 0.0, v)).max()) == 0.0
    assert float(jnp.abs(v[:3]).max()) > 1e-4


def test_rotation(setup):
    v_of, inp, _ = setup
    R = random_rotation(np.random.default_rng(0))
    rot = dict(inp, cell=inp["cell"] @ R.T)
    assert_symmetry(v_of, inp, rot, atol=1e-5, msg="rotation (fractional velocity)")
    # the Cartesian velocity rotates with the cell
    cart = jnp.einsum("gai,gij->gaj", v_of(inp), inp["cell"])
    cart_rot = jnp.einsum("gai,gij->gaj", v_of(rot), rot["cell"])
    np.testing.assert_allclose(cart_rot, cart @ R.T, atol=1e-5)


def test_permutation(setup):
    v_of, inp, sizes = setup
    rng = np.random.default_rng(1)
    perm = np.tile(np.arange(5), (4, 1))
    for g, n in enumerate(sizes):
        perm[g, :n] = rng.permutation(n)
    take = lambda x: jnp.take_along_axis(x, perm.reshape(4, 5, *([1] * (x.ndim - 2))), 1)  # noqa: E731
    permuted = dict(inp, **{k: take(inp[k]) for k in ("numbers", "features", "frac", "mask")})
    assert_symmetry(v_of, inp, permuted, take, atol=1e-5, msg="permutation")


def test_translation_and_periodic_images(setup):
    v_of, inp, _ = setup
    rng = np.random.default_rng(2)
    shift = rng.uniform(size=(4, 1, 3))
    moved = dict(inp, frac=jnp.mod(inp["frac"] + shift, 1.0))
    assert_symmetry(v_of, inp, moved, atol=1e-5, msg="translation")
    n = np.zeros((4, 5, 3))
    n[0, 1] = (1, -2, 0)
    n[2, 0] = (0, 0, 3)
    imaged = dict(inp, frac=inp["frac"] + n)
    assert_symmetry(v_of, inp, imaged, atol=1e-5, msg="re-wrap")
    # ...while moving a single atom does change the field (the checks above are not vacuous)
    nudged = dict(inp, frac=inp["frac"].at[0, 1].add(0.05))
    assert float(jnp.abs(v_of(nudged) - v_of(inp)).max()) > 1e-4


def test_extra_padding(setup):
    v_of, inp, _ = setup

    def pad(x, value=0):
        return jnp.concatenate([x, jnp.full((2, *x.shape[1:]), value, x.dtype)], 0)

    padded = {k: pad(v) for k, v in inp.items() if k != "cell"}
    padded["cell"] = jnp.concatenate([inp["cell"], jnp.broadcast_to(jnp.eye(3), (2, 3, 3))])
    np.testing.assert_allclose(v_of(padded)[:4], v_of(inp), atol=1e-6)


def test_rotation_permutation_translation_at_20_atoms(mp20_largest):
    """The velocity field on real MP-20 test crystals of 16-20 atoms (20 slots): rotating
    the cell rotates the Cartesian velocity, permuting atoms permutes it, translating all
    atoms leaves it unchanged."""
    crystals = mp20_largest
    A = 20
    model, settings = tiny_model(max_atoms=A, dec_layers=1)
    settings = dataclasses.replace(settings, flow_edges_per_crystal=1200)
    params = tiny_params(model, settings)
    G = len(crystals)
    numbers = np.zeros((G, A), np.int32)
    frac = np.zeros((G, A, 3), np.float32)
    for g, c in enumerate(crystals):
        numbers[g, : c.num_atoms], frac[g, : c.num_atoms] = c.numbers, c.frac_coords
    inp = {
        "numbers": jnp.asarray(numbers),
        "features": jnp.asarray(atom_features(numbers), jnp.float32),
        "frac": jnp.asarray(frac),
        "cell": jnp.asarray(np.stack([c.cell for c in crystals]), jnp.float32),
        "mask": jnp.asarray(numbers > 0),
    }
    z = jax.random.normal(jax.random.PRNGKey(1), (G, 12))
    t = jnp.array([0.2, 0.5, 0.8])

    @jax.jit
    def v_of(x):
        v, cand = dense_velocity(
            model, params, z, t, x["numbers"], x["features"], x["frac"], x["cell"], x["mask"],
            settings,
        )  # fmt: skip
        return v, cand.overflow

    v, overflow = v_of(inp)
    assert not bool(overflow) and float(jnp.abs(v).max()) > 1e-4
    R = random_rotation(np.random.default_rng(3))
    rot = dict(inp, cell=inp["cell"] @ R.T)
    np.testing.assert_allclose(
        jnp.einsum("gai,gij->gaj", v_of(rot)[0], rot["cell"]),
        jnp.einsum("gai,gij->gaj", v, inp["cell"]) @ R.T,
        atol=2e-5,
    )
    rng = np.random.default_rng(4)
    perm = np.tile(np.arange(A), (G, 1))
    for g, c in enumerate(crystals):
        perm[g, : c.num_atoms] = rng.permutation(c.num_atoms)
    take = lambda x: jnp.take_along_axis(x, perm.reshape(G, A, *([1] * (x.ndim - 2))), 1)  # noqa: E731
    permuted = dict(inp, **{k: take(inp[k]) for k in ("numbers", "features", "frac", "mask")})
    np.testing.assert_allclose(v_of(permuted)[0], take(v), atol=2e-5)
    moved = dict(inp, frac=jnp.mod(inp["frac"] + rng.uniform(size=(G, 1, 3)), 1.0))
    np.testing.assert_allclose(v_of(moved)[0], v, atol=2e-5)
