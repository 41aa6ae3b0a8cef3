"""Radial basis with a smooth cutoff: Bessel functions times a polynomial envelope.

    e_n(r) = sqrt(2 / r_c) * sin(n * pi * r / r_c) / r * u(r / r_c),   n = 1..num_basis

with the DimeNet envelope (Klicpera, Gross, Guennemann, "Directional Message Passing for
Molecular Graphs", ICLR 2020, eq. 7-8), used by NequIP (Batzner et al., Nat. Commun. 13,
2453, 2022) and Allegro (Musaelian et al., Nat. Commun. 14, 579, 2023):

    u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)   for x < 1, else 0.

u and its first two derivatives vanish at the cutoff, so an edge that enters or leaves the
neighbour list changes every message continuously (needed for the flow's velocity field,
which rebuilds its graph at every Euler step). Zero-length padding edges are routed
through a double ``where`` so values and gradients stay finite.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

__all__ = ["RadialEmbedding", "bessel_basis", "gaussian_basis", "polynomial_envelope"]


def polynomial_envelope(x: jnp.ndarray, p: int = 6) -> jnp.ndarray:
    """DimeNet polynomial envelope u(x) (module docstring), 0 for x >= 1.

    Args:
      x: [...] distances divided by the cutoff.
      p: polynomial order (6 in NequIP / DimeNet).

    Returns:
      [...] envelope values in [0, 1].
    """
    xp = jnp.clip(x, 0.0, 1.0)
    u = (
        1.0
        - (p + 1.0) * (p + 2.0) / 2.0 * xp**p
        + p * (p + 2.0) * xp ** (p + 1)
        - p * (p + 1.0) / 2.0 * xp ** (p + 2)
    )
    return jnp.where(x < 1.0, u, 0.0)


def bessel_basis(r: jnp.ndarray, num_basis: int, cutoff: float) -> jnp.ndarray:
    """Spherical Bessel (order 0) basis sqrt(2/c) sin(n pi r / c) / r.

    Args:
      r: [...] distances in A (>= 0; 0 for padding edges).
      num_basis: number of functions.
      cutoff: c in A.

    Returns:
      [..., num_basis]; the r -> 0 limit n pi / c * sqrt(2/c) at r == 0, with a finite
      (zero) gradient there.
    """
    n = jnp.arange(1, num_basis + 1, dtype=r.dtype)
    ok = r > 1e-6
    r_safe = jnp.where(ok, r, 1.0)[..., None]
    val = jnp.sin(n * jnp.pi * r_safe / cutoff) / r_safe
    limit = n * jnp.pi / cutoff
    return jnp.sqrt(2.0 / cutoff) * jnp.where(ok[..., None], val, limit)


def gaussian_basis(x: jnp.ndarray, start: float, stop: float, num: int) -> jnp.ndarray:
    """Gaussian smearing of scalars on an even grid (SchNet); [...] -> [..., num]."""
    centers = jnp.linspace(start, stop, num, dtype=x.dtype)
    width = (stop - start) / max(num - 1, 1)
    return jnp.exp(-0.5 * ((x[..., None] - centers) / width) ** 2)


class RadialEmbedding(nn.Module):
    """Bessel basis x polynomial envelope (module docstring).

    Attributes:
      num_basis: number of Bessel functions.
      cutoff: radius in A where every edge feature reaches zero smoothly.
      envelope_p: envelope order p.
    """

    num_basis: int = 8
    cutoff: float = 5.0
    envelope_p: int = 6

    def __call__(self, r: jnp.ndarray) -> jnp.ndarray:
        """Args: r: [n_edges] distances. Returns: [n_edges, num_basis]."""
        env = polynomial_envelope(r / self.cutoff, self.envelope_p)  # [E]
        # Scale so the basis is O(1) over typical bond lengths.
        return bessel_basis(r, self.num_basis, self.cutoff) * env[..., None] * self.cutoff**0.5
