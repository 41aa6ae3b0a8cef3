"""Embeddings: atomic species, periodic image vectors f(k_ij), flow time.

Image embedding options (method section 2.2, ``f(k_ij)`` in the message function) and the
symmetries each keeps. Every option keeps rotation of the cell and permutation of atoms
(k_ij lives in the lattice basis and is carried by its edge). The differences are in the
operations that change the integer labels k_ij without changing the crystal:

* translation of all atoms by t (mod 1): an atom that crosses the cell face is wrapped,
  n_i = floor(f_i + t);
* re-wrapping one atom into another image (f_i -> f_i + n_i);
* the choice of lattice basis (e.g. a Niggli-reduced vs a conventional cell).

Under both wrapping operations k_ij -> k_ij + n_j - n_i (`autoperi_jax.graph.rewrap`), so any
function of k_ij alone changes. Self-image edges (i == j) are the exception: there
n_j - n_i = 0 and k_ii is a lattice translation T = k @ cell.

=============  ==========  ===========  =============  ========  ===================
option         rotation    permutation  translation /  padding   lattice basis
                                        re-wrap
=============  ==========  ===========  =============  ========  ===================
``none``       yes         yes          yes            yes       yes
``raw``        yes         yes          NO             yes       NO
``self_image`` yes         yes          yes            yes       yes
``frac``       yes         yes          yes            yes       NO
=============  ==========  ===========  =============  ========  ===================

* ``none``: no image feature (the message sees k_ij only through r_ij).
* ``raw``: the method's learned embedding of the integer triplet, a table over
  ``[-max_image, max_image]^3`` (larger |k| are clipped). It depends on where the cell
  origin sits and on which image each atom was wrapped into.
* ``self_image``: a flag for edges that join an atom to its own periodic image plus a
  Gaussian expansion of the length of the lattice translation |k_ii @ cell| on those edges
  (zero on the others). Both are invariant to every operation above.
* ``frac``: an MLP of the fractional edge vector d_ij = f_j + k_ij - f_i, i.e. r_ij written
  in the lattice basis: rotation, translation and re-wrapping leave it unchanged (the k_ij
  shift cancels the wrap), but it depends on the lattice basis, like the lattice
  parameters themselves.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import linen as nn

from autoperi_jax.graph import safe_norm
from autoperi_jax.nn.radial import gaussian_basis

__all__ = ["IMAGE_EMBEDDINGS", "ImageEmbedding", "SpeciesEmbedding", "TimeEmbedding"]

IMAGE_EMBEDDINGS = ("none", "raw", "self_image", "frac")


class SpeciesEmbedding(nn.Module):
    """Learned embedding of the atomic number plus a projection of tabulated features.

    Attributes:
      features: output width.
    """

    features: int

    @nn.compact
    def __call__(self, numbers: jnp.ndarray, atom_features: jnp.ndarray) -> jnp.ndarray:
        """Args:
          numbers: [n] int atomic numbers (0 = padding).
          atom_features: [n, 3] electronegativity, covalent radius, flag.

        Returns:
          [n, features].
        """
        emb = nn.Embed(119, self.features, name="table")(numbers)
        return emb + nn.Dense(self.features, name="tabulated")(atom_features)


class ImageEmbedding(nn.Module):
    """f(k_ij): scalar edge features from the periodic image vectors (module docstring).

    Attributes:
      kind: one of `IMAGE_EMBEDDINGS`.
      features: output width.
      max_image: table range of ``raw`` per axis.
      max_length: range (A) of the Gaussian expansion of |T| in ``self_image``.
      num_basis: Gaussians of ``self_image``.
    """

    kind: str = "self_image"
    features: int = 16
    max_image: int = 3
    max_length: float = 8.0
    num_basis: int = 8

    @nn.compact
    def __call__(
        self,
        shifts: jnp.ndarray,  # [E, 3] int
        senders: jnp.ndarray,  # [E] int
        receivers: jnp.ndarray,  # [E] int
        frac_delta: jnp.ndarray,  # [E, 3] f_j + k_ij - f_i
        edge_cell: jnp.ndarray,  # [E, 3, 3]
    ) -> jnp.ndarray | None:
        """Returns [E, features], or None for ``none``."""
        if self.kind == "none":
            return None
        if self.kind == "raw":
            m = self.max_image
            k = jnp.clip(shifts, -m, m) + m
            side = 2 * m + 1
            index = (k[:, 0] * side + k[:, 1]) * side + k[:, 2]
            return nn.Embed(side**3, self.features, name="table")(index)
        if self.kind == "self_image":
            is_self = (senders == receivers).astype(frac_delta.dtype)  # [E]
            translation = jnp.einsum("ea,eab->eb", shifts.astype(frac_delta.dtype), edge_cell)
            length = safe_norm(translation)  # [E]
            basis = gaussian_basis(length, 0.0, self.max_length, self.num_basis)
            x = is_self[:, None] * jnp.concatenate([jnp.ones_like(length)[:, None], basis], -1)
            return nn.Dense(self.features, name="proj")(x)
        if self.kind == "frac":
            h = nn.silu(nn.Dense(self.features, name="dense_0")(frac_delta))
            return nn.Dense(self.features, name="dense_1")(h)
        raise ValueError(f"unknown image embedding {self.kind!r}; use one of {IMAGE_EMBEDDINGS}")


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the flow time t in [0, 1] (Vaswani et al. 2017), then MLP.

    Attributes:
      features: output width.
      num_frequencies: sin/cos pairs.
    """

    features: int
    num_frequencies: int = 16

    @nn.compact
    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        """Args: t: [G] times. Returns: [G, features]."""
        freqs = jnp.exp(jnp.linspace(0.0, math.log(1000.0), self.num_frequencies))
        ang = t[:, None] * freqs[None, :]
        x = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
        return nn.Dense(self.features)(nn.silu(nn.Dense(self.features)(x)))
