"""Decoder heads, in the method's order: lattice -> composition -> coordinates -> bonds.

* `LatticeDecoder`: z_lattice -> 6 standardised numbers y of a lower-triangular cell
  (`autoperi_jax.model.lattice_from_y`): log of the three positive diagonal entries and
  three off-diagonal ratios. Every y gives a valid right-handed cell in the canonical
  orientation of `autoperi_jax.crystal.lattice_params_to_cell` (a along x, b in the xy
  plane), so the head never produces a degenerate lattice.
* `CompositionDecoder`: z_comp -> atom count (classes 1..max_atoms) and, given the count,
  the species of each slot with the atoms sorted by atomic number (a canonical order of
  the multiset, so the target is permutation invariant).
* `CoordinateGuess`: an optional first guess of the fractional coordinates from z,
  used as the start of the flow instead of uniform noise (``flow_prior='learned'``).
* `VelocityField`: the coordinate decoder, a flow-matching velocity on the flat torus
  (FlowMM, Miller et al., ICML 2024; DiffCSP, Jiao et al., NeurIPS 2023): an equivariant
  periodic GNN on the current coordinates x_t, the (decoded) cell and species, conditioned
  on z and t at every layer; it outputs a Cartesian vector per atom (1o), converted to
  fractional units with the inverse cell, so it is rotation equivariant in Cartesian space
  and invariant in fractional space.
* `ConnectivityDecoder`: a symmetric edge classifier over candidate periodic edges
  (i, j, k_ij) of the decoded structure (`autoperi_jax.graph.periodic_candidates`).
"""

from __future__ import annotations

from typing import NamedTuple

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
from flax import linen as nn

from autoperi_jax.nn.embeddings import SpeciesEmbedding, TimeEmbedding
from autoperi_jax.nn.message_passing import PeriodicGNN
from autoperi_jax.nn.radial import gaussian_basis

__all__ = [
    "CompositionDecoder",
    "ConnectivityDecoder",
    "CoordinateGuess",
    "LatticeDecoder",
    "VelocityField",
    "VelocityInputs",
]


class VelocityInputs(NamedTuple):
    """What `VelocityField` reads besides (z, t): the current structure as flat nodes
    (N = G * A slots) and its in-jit periodic edge list (`autoperi_jax.graph.periodic_candidates`).

    Attributes:
      numbers: [N] int atomic numbers (0 on padding slots).
      atom_features: [N, 3] `autoperi_jax.elements.atom_features` of the species.
      frac: [N, 3] current fractional coordinates x_t in [0, 1).
      cell: [G, 3, 3] cells (rows = lattice vectors).
      node_graph: [N] crystal of each slot.
      node_mask: [N] bool, the real atoms.
      senders, receivers: [E] flat node indices of the edges (j -> i).
      shifts: [E, 3] int image vectors k_ij.
      edge_mask: [E] bool, the real edges.
      edge_graph: [E] crystal of each edge.
      self_cond: [N, 3] Cartesian displacement to the previous end-point prediction
        (self-conditioning; None for a model without it).
    """

    numbers: jnp.ndarray
    atom_features: jnp.ndarray
    frac: jnp.ndarray
    cell: jnp.ndarray
    node_graph: jnp.ndarray
    node_mask: jnp.ndarray
    senders: jnp.ndarray
    receivers: jnp.ndarray
    shifts: jnp.ndarray
    edge_mask: jnp.ndarray
    edge_graph: jnp.ndarray
    self_cond: jnp.ndarray | None = None


def _mlp(x: jnp.ndarray, hidden: int, out: int, name: str, layers: int = 2) -> jnp.ndarray:
    for i in range(layers):
        x = nn.silu(nn.Dense(hidden, name=f"{name}_{i}")(x))
    return nn.Dense(out, name=f"{name}_out")(x)


class LatticeDecoder(nn.Module):
    """z_lattice [G, d] -> standardised lattice vector y [G, 6] (module docstring)."""

    hidden: int = 128

    @nn.compact
    def __call__(self, z_lattice: jnp.ndarray) -> jnp.ndarray:
        return _mlp(z_lattice, self.hidden, 6, "mlp")


class CompositionDecoder(nn.Module):
    """Atom count and species from z_comp.

    Two heads (``head``):

    * ``'slots'``: the species of slot s of the atom list sorted by atomic number, one
      119-way classifier per slot. The target of slot s depends on the counts of every
      lighter element, so the head has to learn cumulative counts.
    * ``'fractions'``: one 119-way distribution p over elements per crystal, the
      element fractions (CDVAE's composition head); the atoms are then n * p rounded to
      integers (`autoperi_jax.model.counts_from_fractions`). Exact whenever every
      |n p_e - c_e| < 1/2.

    Attributes:
      max_atoms: largest atom count (static slot count A).
      hidden: MLP width.
      head: ``'slots'`` or ``'fractions'``.
    """

    max_atoms: int
    hidden: int = 128
    head: str = "slots"

    @nn.compact
    def __call__(
        self,
        z_comp: jnp.ndarray,  # [G, d]
        n_atoms: jnp.ndarray,  # [G] int, atoms to decode (true in training)
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Returns count logits [G, A] (class c = c + 1 atoms) and species logits:
        [G, A, 119] for slot s of the atom list sorted by atomic number (``'slots'``),
        or [G, 119] element-fraction logits given ``n_atoms`` (``'fractions'``)."""
        count_logits = _mlp(z_comp, self.hidden, self.max_atoms, "count")
        n_emb = nn.Embed(self.max_atoms + 1, self.hidden, name="count_embed")(
            jnp.clip(n_atoms, 0, self.max_atoms)
        )
        g = nn.silu(nn.Dense(self.hidden, name="graph")(z_comp)) + n_emb  # [G, H]
        if self.head == "fractions":
            return count_logits, _mlp(nn.silu(g), self.hidden, 119, "fractions")
        if self.head != "slots":
            raise ValueError(f"composition head must be 'slots' or 'fractions': {self.head}")
        slots = nn.Embed(self.max_atoms, self.hidden, name="slot_embed")(
            jnp.arange(self.max_atoms)
        )  # [A, H]
        x = nn.silu(g[:, None, :] + slots[None, :, :])
        species_logits = _mlp(x, self.hidden, 119, "species")
        return count_logits, species_logits


class CoordinateGuess(nn.Module):
    """First guess of the fractional coordinates from z (the learned flow prior).

    Slot s holds the s-th atom of the species-sorted list; the output is in the lattice
    basis, so it does not change when the input crystal is rotated, translated or
    permuted (z does not). Identical atoms are told apart by their slot.

    Attributes:
      max_atoms: slots A.
      hidden: MLP width.
    """

    max_atoms: int
    hidden: int = 128

    @nn.compact
    def __call__(
        self,
        z: jnp.ndarray,  # [G, D]
        numbers: jnp.ndarray,  # [G, A] species-sorted, 0 on empty slots
    ) -> jnp.ndarray:
        """Returns [G, A, 3] fractional coordinates (not wrapped)."""
        g = nn.silu(nn.Dense(self.hidden, name="z_proj")(z))[:, None, :]  # [G, 1, H]
        sp = nn.Embed(119, self.hidden, name="species")(numbers)  # [G, A, H]
        slot = nn.Embed(self.max_atoms, self.hidden, name="slot")(jnp.arange(self.max_atoms))
        x = nn.silu(g + sp + slot[None])
        return _mlp(x, self.hidden, 3, "mlp", layers=3)


class VelocityField(nn.Module):
    """Equivariant periodic velocity field v(x_t, t | z, species, cell).

    Attributes:
      gnn: periodic GNN (fields set by the caller).
      embed_features: node embedding width.
      cond_features: width of the per-layer conditioning on (z, t).
    """

    gnn: PeriodicGNN
    embed_features: int = 64
    cond_features: int = 64

    @nn.compact
    def __call__(
        self,
        z: jnp.ndarray,  # [G, D]
        t: jnp.ndarray,  # [G]
        inputs: VelocityInputs,
    ) -> jnp.ndarray:
        """Returns the fractional velocity [N, 3]: mean-free over each graph's atoms and
        0 on padding atoms. ``inputs.self_cond`` is the Cartesian displacement from each
        atom to the end point predicted at the previous step (self-conditioning; zeros
        when there is none), an equivariant (1o) input feature."""
        n_graph = z.shape[0]
        node_graph, node_mask = inputs.node_graph, inputs.node_mask
        temb = TimeEmbedding(self.cond_features, name="time")(t)  # [G, C]
        zc = nn.silu(nn.Dense(self.cond_features, name="z_proj_0")(z))
        zc = nn.Dense(self.cond_features, name="z_proj_1")(zc)
        cond_g = nn.silu(zc + temb)  # [G, C]
        x = SpeciesEmbedding(self.embed_features, name="species")(
            inputs.numbers, inputs.atom_features
        )
        x = x + nn.Dense(self.embed_features, name="cond_in")(cond_g)[node_graph]
        node_vectors = None
        if inputs.self_cond is not None:
            length = jnp.sqrt(jnp.sum(inputs.self_cond**2, -1, keepdims=True) + 1e-12)
            x = x + nn.Dense(self.embed_features, name="self_cond_in")(
                jnp.concatenate([length, (length > 1e-5).astype(length.dtype)], -1)
            )
            node_vectors = inputs.self_cond[:, None, :]
        h, _ = self.gnn(
            x,
            inputs.frac,
            inputs.cell,
            inputs.senders,
            inputs.receivers,
            inputs.shifts,
            inputs.edge_mask,
            inputs.edge_graph,
            cond=cond_g[node_graph],
            node_vectors=node_vectors,
            node_graph=node_graph,
            node_mask=node_mask,
            num_graphs=n_graph,
        )
        v_cart = e3nn.flax.Linear("1x1o", name="out")(h).array  # [N, 3]
        inv_cell = jnp.linalg.inv(inputs.cell)[node_graph]  # [N, 3, 3]
        v = jnp.einsum("nb,nba->na", v_cart, inv_cell)  # cart = frac @ cell
        m = node_mask[:, None].astype(v.dtype)
        count = jnp.maximum(jax.ops.segment_sum(m[:, 0], node_graph, n_graph), 1.0)
        mean = jax.ops.segment_sum(v * m, node_graph, n_graph) / count[:, None]
        return (v - mean[node_graph]) * m


class ConnectivityDecoder(nn.Module):
    """Bond logit of each candidate periodic edge; symmetric in (i, j).

    Attributes:
      hidden: MLP width.
      cutoff: range (A) of the distance expansion.
      num_basis: Gaussians of the distance expansion.
    """

    hidden: int = 64
    cutoff: float = 5.0
    num_basis: int = 16

    @nn.compact
    def __call__(
        self,
        z_struct: jnp.ndarray,  # [G, d]
        numbers_i: jnp.ndarray,  # [E] int
        numbers_j: jnp.ndarray,  # [E] int
        distances: jnp.ndarray,  # [E]
        edge_graph: jnp.ndarray,  # [E]
    ) -> jnp.ndarray:
        """Returns [E] logits."""
        table = nn.Embed(119, self.hidden, name="species")
        ei, ej = table(numbers_i), table(numbers_j)
        rbf = gaussian_basis(distances, 0.0, self.cutoff, self.num_basis)
        zg = nn.Dense(self.hidden, name="z_proj")(z_struct)[edge_graph]
        x = jnp.concatenate([ei + ej, ei * ej, rbf, zg], -1)
        return _mlp(x, self.hidden, 1, "mlp")[:, 0]
