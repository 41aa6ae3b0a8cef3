"""f(k_ij) options: what each one sees (see autoperi_jax.nn.embeddings)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.nn import IMAGE_EMBEDDINGS, ImageEmbedding


def _edges():
    shifts = jnp.array([[0, 0, 1], [1, 0, 0], [0, -1, 0], [0, 0, 0]])
    senders = jnp.array([0, 1, 1, 2])
    receivers = jnp.array([0, 0, 1, 0])
    frac_delta = jnp.array([[0, 0, 1.0], [1.2, 0.1, 0], [0, -1.0, 0], [0.3, 0.2, 0.1]])
    cell = jnp.broadcast_to(jnp.diag(jnp.array([3.0, 4.0, 5.0])), (4, 3, 3))
    return shifts, senders, receivers, frac_delta, cell


@pytest.mark.parametrize("kind", IMAGE_EMBEDDINGS)
def test_shapes(kind):
    m = ImageEmbedding(kind, features=6)
    args = _edges()
    params = m.init(jax.random.PRNGKey(0), *args)
    out = m.apply(params, *args)
    if kind == "none":
        assert out is None
    else:
        assert out.shape == (4, 6)
        assert bool(jnp.all(jnp.isfinite(out)))


def test_self_image_sees_only_self_edges_and_translation_length():
    m = ImageEmbedding("self_image", features=6)
    shifts, s, r, fd, cell = _edges()
    params = m.init(jax.random.PRNGKey(0), shifts, s, r, fd, cell)
    out = np.asarray(m.apply(params, shifts, s, r, fd, cell))
    # edges 1 and 3 join different atoms: only the bias remains, whatever k is
    np.testing.assert_allclose(out[1], out[3], atol=1e-6)
    # re-labelling k on a non-self edge (what re-wrapping does) changes nothing
    shifted = shifts.at[1].set(jnp.array([5, -2, 1]))
    np.testing.assert_allclose(m.apply(params, shifted, s, r, fd, cell), out, atol=1e-6)
    # self edges with translations of different length differ ([0,0,1] -> 5 A, [0,-1,0] -> 4 A)
    assert np.abs(out[0] - out[2]).max() > 1e-3
    # a self-edge translation of the same length in another direction gives the same value
    flipped = shifts.at[0].set(jnp.array([0, 0, -1]))
    np.testing.assert_allclose(m.apply(params, flipped, s, r, fd, cell)[0], out[0], atol=1e-6)


def test_raw_depends_on_the_integer_label():
    m = ImageEmbedding("raw", features=6, max_image=2)
    shifts, s, r, fd, cell = _edges()
    params = m.init(jax.random.PRNGKey(0), shifts, s, r, fd, cell)
    out = m.apply(params, shifts, s, r, fd, cell)
    relabelled = m.apply(params, shifts.at[1].set(jnp.array([1, 1, 0])), s, r, fd, cell)
    assert float(jnp.abs(out[1] - relabelled[1]).max()) > 1e-3
    # out-of-range images are clipped to the table
    far = m.apply(params, shifts.at[1].set(jnp.array([7, 0, 0])), s, r, fd, cell)
    edge = m.apply(params, shifts.at[1].set(jnp.array([2, 0, 0])), s, r, fd, cell)
    np.testing.assert_allclose(far[1], edge[1])
