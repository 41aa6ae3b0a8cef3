"""Radial basis and envelope: smooth cutoff, finite values and gradients at r = 0."""

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.nn.radial import RadialEmbedding, bessel_basis, polynomial_envelope


def test_envelope_is_smooth_at_the_cutoff():
    x = jnp.array([0.0, 0.5, 0.999, 1.0, 1.2])
    u = polynomial_envelope(x)
    assert float(u[0]) == 1.0
    np.testing.assert_allclose(u[3:], 0.0, atol=1e-7)
    assert 0 < float(u[1]) < 1
    du = jax.vmap(jax.grad(polynomial_envelope))(x)
    d2u = jax.vmap(jax.grad(jax.grad(polynomial_envelope)))(x)
    # value, first and second derivative vanish at x = 1 (DimeNet envelope)
    np.testing.assert_allclose(du[2:], 0.0, atol=1e-3)
    np.testing.assert_allclose(d2u[3:], 0.0, atol=1e-3)
    assert abs(float(d2u[1])) > 0.1


def test_bessel_finite_at_zero_with_finite_gradient():
    r = jnp.array([0.0, 1e-8, 0.3, 2.0])
    b = bessel_basis(r, 8, 5.0)
    assert b.shape == (4, 8)
    assert bool(jnp.all(jnp.isfinite(b)))
    # the r -> 0 limit is continuous
    np.testing.assert_allclose(b[0], bessel_basis(jnp.array([1e-4]), 8, 5.0)[0], rtol=1e-3)
    g = jax.grad(lambda r: jnp.sum(bessel_basis(r, 8, 5.0)))(r)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_radial_embedding_vanishes_beyond_cutoff():
    m = RadialEmbedding(num_basis=6, cutoff=4.0)
    r = jnp.array([0.0, 1.0, 3.99, 4.0, 6.0])
    y = m.apply({}, r)
    assert y.shape == (5, 6)
    np.testing.assert_allclose(y[3:], 0.0, atol=1e-7)
    assert float(jnp.abs(y[1]).max()) > 0.1
