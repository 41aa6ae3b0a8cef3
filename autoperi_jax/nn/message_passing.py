"""Equivariant periodic message passing (method section 2.2).

One layer (`PeriodicInteraction`) computes, for every edge j -> i with image k_ij,

    m_ij = ( W h_j  (x)  SH(r_ij) ) * MLP( B(|r_ij|) ++ f(k_ij) ++ s_i ++ s_j ) * u(|r_ij|/c)
    h_i' = Gate( W_1 h_i + W_2 sum_j m_ij / sqrt(avg_neighbours) ++ c_i ) + W_3 h_i

where ``(x)`` is the e3nn tensor product with the spherical harmonics of the edge
direction, ``B`` the Bessel x envelope radial basis (`autoperi_jax.nn.radial`), ``f`` the
image embedding (`autoperi_jax.nn.embeddings.ImageEmbedding`), ``u`` the polynomial
envelope (so every message vanishes smoothly at the cutoff c), ``s_i``/``s_j`` the scalar
(0e) channels of the two endpoint features and ``c_i`` optional per-node conditioning
scalars (latent code, flow time). The MLP output gives one weight per irrep copy of the
tensor-product output, so phi(h_i, h_j, SH(r_ij), f(k_ij)) of the method is an equivariant
function of all four inputs; ``Gate`` is `e3nn_jax.gate`. This is the NequIP interaction
block (Batzner et al. 2022) with the method's extra inputs h_i and f(k_ij).

The edge vector ``r_ij = (f_j + k_ij - f_i) @ cell`` is computed here, inside the traced
function (`autoperi_jax.graph.edge_vectors`), so gradients reach fractional coordinates
and the cell. Padding edges have zero length; their direction, basis and messages are
masked with a double ``where`` so no NaN reaches any gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from autoperi_jax.graph import edge_vectors, safe_norm
from autoperi_jax.nn.embeddings import ImageEmbedding
from autoperi_jax.nn.radial import RadialEmbedding, polynomial_envelope

__all__ = [
    "EdgeGeometry",
    "PeriodicGNN",
    "PeriodicInteraction",
    "edge_geometry",
    "sh_tensor_product",
]


class EdgeGeometry(dict):
    """Per-edge geometry (a dict so it is a pytree): ``vectors`` [E, 3], ``lengths`` [E],
    ``directions`` [E, 3] (unit, 0 on padding), ``frac_delta`` [E, 3], ``cell`` [E, 3, 3]."""


def edge_geometry(
    frac: jnp.ndarray,  # [N, 3]
    cell: jnp.ndarray,  # [G, 3, 3]
    senders: jnp.ndarray,  # [E]
    receivers: jnp.ndarray,  # [E]
    shifts: jnp.ndarray,  # [E, 3] int
    edge_graph: jnp.ndarray,  # [E]
    edge_mask: jnp.ndarray,  # [E] bool
) -> EdgeGeometry:
    """Edge vectors, lengths and unit directions computed from coordinates and the cell.

    Args:
      frac: [N, 3] fractional coordinates.
      cell: [G, 3, 3] rows are lattice vectors.
      senders, receivers: [E] j and i.
      shifts: [E, 3] integer image vectors k_ij.
      edge_graph: [E] graph of each edge.
      edge_mask: [E] False on padding edges.

    Returns:
      `EdgeGeometry`; every field is exactly 0 on masked edges.
    """
    frac_delta = frac[senders] + shifts.astype(frac.dtype) - frac[receivers]  # [E, 3]
    m = edge_mask[:, None]
    frac_delta = jnp.where(m, frac_delta, 0.0)
    vec = edge_vectors(frac, cell, senders, receivers, shifts, edge_graph)  # [E, 3]
    vec = jnp.where(m, vec, 0.0)
    length = safe_norm(vec)  # [E]
    ok = length > 1e-6
    direction = jnp.where(ok[:, None], vec / jnp.where(ok, length, 1.0)[:, None], 0.0)
    return EdgeGeometry(
        vectors=vec,
        lengths=length,
        directions=direction,
        frac_delta=frac_delta,
        cell=cell[edge_graph],
    )


# ----------------------------------------------------------- fused tensor product
@functools.lru_cache(maxsize=64)
def _tp_plan(irreps_in: str, irreps_sh: str, irreps_filter: str):
    """Dense Clebsch-Gordan tensor of every allowed path of a channel-wise product.

    Returns ``(cg [D_in, D_sh, K], out)`` where ``out`` lists ``(l, p, n_paths)`` per
    output irrep, in the order of the K axis (irrep, path, m).
    """
    ins = [mi.ir for mi in e3nn.Irreps(irreps_in)]
    shs = [mi.ir for mi in e3nn.Irreps(irreps_sh)]
    allowed = {mi.ir for mi in e3nn.Irreps(irreps_filter)}
    off_in = np.cumsum([0] + [ir.dim for ir in ins])
    off_sh = np.cumsum([0] + [ir.dim for ir in shs])
    paths: dict[e3nn.Irrep, list[tuple[int, int]]] = {}
    for a, ir1 in enumerate(ins):
        for b, ir2 in enumerate(shs):
            for ir3 in ir1 * ir2:
                if ir3 in allowed:
                    paths.setdefault(ir3, []).append((a, b))
    order = sorted(paths)
    k_total = sum(len(paths[ir]) * ir.dim for ir in order)
    cg = np.zeros((off_in[-1], off_sh[-1], k_total))
    k, out = 0, []
    for ir3 in order:
        for a, b in paths[ir3]:
            c = e3nn.clebsch_gordan(ins[a].l, shs[b].l, ir3.l) * np.sqrt(ir3.dim)
            cg[off_in[a] : off_in[a + 1], off_sh[b] : off_sh[b + 1], k : k + ir3.dim] = c
            k += ir3.dim
        out.append((ir3.l, ir3.p, len(paths[ir3])))
    return cg, tuple(out)


def sh_tensor_product(
    src: e3nn.IrrepsArray,  # [E, channels x (ir_1 + ir_2 + ...)]
    sh: e3nn.IrrepsArray,  # [E, irreps_sh]
    irreps_filter: e3nn.Irreps,
) -> e3nn.IrrepsArray:
    """Channel-wise ("uvu") tensor product of edge features with spherical harmonics.

    Equal to ``e3nn_jax.tensor_product(src, sh, filter_ir_out=irreps_filter)`` (component
    normalisation, same output layout), but computed as two batched matrix products with one dense
    Clebsch-Gordan tensor instead of one small einsum per path, which is several times
    faster on CPU for the edge counts of a training batch.

    Args:
      src: [E, ...] features whose irreps all have the same multiplicity u (e.g.
        ``16x0e+16x1o+16x2e``).
      sh: [E, irreps_sh] spherical harmonics of the edge directions.
      irreps_filter: output irreps to keep.

    Returns:
      [E, irreps_out] with multiplicity u x (number of paths) per output irrep.
    """
    muls = {mi.mul for mi in src.irreps}
    if len(muls) != 1:
        raise ValueError(f"sh_tensor_product needs a uniform multiplicity, got {src.irreps}")
    u = muls.pop()
    irreps_in = "+".join(str(mi.ir) for mi in src.irreps)
    cg, out = _tp_plan(irreps_in, str(sh.irreps), str(e3nn.Irreps(irreps_filter)))
    chunks_in = [
        c if c is not None else jnp.zeros((*src.shape[:-1], u, mi.ir.dim), src.dtype)
        for c, mi in zip(src.chunks, src.irreps)
    ]  # None marks a chunk of zeros
    x = jnp.concatenate(chunks_in, axis=-1)  # [E, u, D_in]
    tmp = jnp.einsum("ej,ijk->eik", sh.array, jnp.asarray(cg, x.dtype))  # [E, D_in, K]
    y = jnp.einsum("eui,eik->euk", x, tmp)  # [E, u, K]
    chunks, irreps, k = [], [], 0
    for l, p, n in out:
        d = 2 * l + 1
        c = y[:, :, k : k + n * d].reshape(y.shape[0], u, n, d)
        c = jnp.swapaxes(c, 1, 2).reshape(y.shape[0], n * u, d)  # path-major, as e3nn
        chunks.append(c)
        irreps.append((u * n, (l, p)))
        k += n * d
    return e3nn.from_chunks(irreps, chunks, (y.shape[0],), y.dtype)


class _EdgeNodeDense(nn.Module):
    """``Dense(concat([e_ij, s_i, s_j]))`` computed as ``A e_ij + (B s)_i + (C s)_j``.

    The same function and parameters as `flax.linen.Dense` on the concatenation (kernel
    [E_in + 2 F, features], bias), but the node terms are projected once per node and
    then gathered, instead of once per edge (edges outnumber nodes ~20x).
    """

    features: int

    @nn.compact
    def __call__(self, edge_x, node_x, receivers, senders):
        e_in, f = edge_x.shape[-1], node_x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (e_in + 2 * f, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        node_i = node_x @ kernel[e_in : e_in + f]  # [N, features]
        node_j = node_x @ kernel[e_in + f :]
        return edge_x @ kernel[:e_in] + node_i[receivers] + node_j[senders] + bias


class PeriodicInteraction(nn.Module):
    """One equivariant periodic message-passing layer (module docstring).

    Attributes:
      irreps_out: node feature irreps after the layer (e.g. ``"64x0e+16x1o+8x2e"``).
      mlp_hidden: width of the edge-weight MLP.
      avg_num_neighbors: normalisation of the neighbour sum.
      edge_channels: multiplicity u of every irrep of the edge features W h_j.
    """

    irreps_out: str
    mlp_hidden: int = 64
    avg_num_neighbors: float = 12.0
    edge_channels: int = 16

    @nn.compact
    def __call__(
        self,
        h: e3nn.IrrepsArray,  # [N, irreps_in]
        sh: e3nn.IrrepsArray,  # [E, irreps_sh]
        edge_scalars: jnp.ndarray,  # [E, S] radial basis ++ f(k)
        senders: jnp.ndarray,  # [E]
        receivers: jnp.ndarray,  # [E]
        edge_weight: jnp.ndarray,  # [E] envelope, 0 on padding
        cond: jnp.ndarray | None = None,  # [N, C]
        pooled: e3nn.IrrepsArray | None = None,  # [N, irreps_in] graph mean of h
    ) -> e3nn.IrrepsArray:
        target = e3nn.Irreps(self.irreps_out)
        n = h.shape[0]
        # Uniform multiplicity on the edge side so the product is one fused contraction.
        edge_irreps = e3nn.Irreps(
            "+".join(f"{self.edge_channels}x{mi.ir}" for mi in target.regroup())
        )
        src = e3nn.flax.Linear(edge_irreps, force_irreps_out=True, name="linear_src")(h)
        messages = sh_tensor_product(src[senders], sh, target)  # [E, M]
        scal = h.filter(keep="0e").array
        w = nn.silu(
            _EdgeNodeDense(self.mlp_hidden, name="phi_0")(edge_scalars, scal, receivers, senders)
        )
        w = nn.silu(nn.Dense(self.mlp_hidden, name="phi_1")(w))
        w = nn.Dense(messages.irreps.num_irreps, name="phi_out")(w)  # [E, num_irreps]
        w = w * edge_weight[:, None]  # smooth at the cutoff, exactly 0 on padding
        messages = messages * w
        agg = e3nn.scatter_sum(messages, dst=receivers, output_size=n)
        agg = agg / self.avg_num_neighbors  # MACE-style: coherent messages add linearly
        parts = [h, agg]
        if pooled is not None:
            parts.append(pooled)
        if cond is not None:
            parts.append(e3nn.IrrepsArray(f"{cond.shape[-1]}x0e", cond))
        x = e3nn.concatenate(parts).regroup()
        num_gated = target.filter(drop="0e + 0o").num_irreps
        irreps_update = target + e3nn.Irreps(f"{num_gated}x0e") if num_gated else target
        x = e3nn.flax.Linear(irreps_update, force_irreps_out=True, name="linear_update")(x)
        x = e3nn.gate(x)
        skip = e3nn.flax.Linear(target, force_irreps_out=True, name="linear_skip")(h)
        return (x + skip).regroup()


class PeriodicGNN(nn.Module):
    """Stack of `PeriodicInteraction` layers on a periodic graph.

    Attributes:
      num_layers: message-passing layers.
      hidden_irreps: node irreps of every layer.
      sh_lmax: highest spherical-harmonic degree of the edge direction.
      num_basis: radial basis size.
      cutoff: radial cutoff (A); edges beyond it carry exactly zero weight.
      mlp_hidden: width of the edge-weight MLPs.
      avg_num_neighbors: normalisation of neighbour sums.
      image_embedding: f(k_ij) option (`autoperi_jax.nn.embeddings`).
      image_features: width of f(k_ij).
      edge_channels: multiplicity of the edge features in the tensor product.
      global_context: also feed every layer the (equivariant) mean of the node features
        over the node's graph, so information crosses the whole cell in one layer.
    """

    num_layers: int = 3
    hidden_irreps: str = "64x0e+16x1o+8x2e"
    sh_lmax: int = 2
    num_basis: int = 8
    cutoff: float = 6.0
    mlp_hidden: int = 64
    avg_num_neighbors: float = 12.0
    image_embedding: str = "self_image"
    image_features: int = 16
    edge_channels: int = 16
    global_context: bool = False

    @nn.compact
    def __call__(
        self,
        node_scalars: jnp.ndarray,  # [N, F]
        frac: jnp.ndarray,  # [N, 3]
        cell: jnp.ndarray,  # [G, 3, 3]
        senders: jnp.ndarray,  # [E]
        receivers: jnp.ndarray,  # [E]
        shifts: jnp.ndarray,  # [E, 3] int
        edge_mask: jnp.ndarray,  # [E] bool
        edge_graph: jnp.ndarray,  # [E]
        cond: jnp.ndarray | None = None,  # [N, C]
        node_vectors: jnp.ndarray | None = None,  # [N, V, 3]
        node_graph: jnp.ndarray | None = None,  # [N]
        node_mask: jnp.ndarray | None = None,  # [N] bool
        num_graphs: int | None = None,
    ) -> tuple[e3nn.IrrepsArray, EdgeGeometry]:
        """Runs the layers.

        Args:
          node_scalars: [N, F] invariant input features.
          frac: [N, 3] fractional coordinates.
          cell: [G, 3, 3] cells, rows are lattice vectors.
          senders, receivers: [E] j and i.
          shifts: [E, 3] k_ij.
          edge_mask: [E] False on padding edges.
          edge_graph: [E] graph index of each edge.
          cond: [N, C] optional invariant conditioning fed to every layer.
          node_vectors: [N, V, 3] optional equivariant (1o) input features.
          node_graph, node_mask, num_graphs: graph of each node, real-node mask and the
            number of graphs; required with ``global_context``.

        Returns:
          node features [N, hidden_irreps] (IrrepsArray) and the `EdgeGeometry`.
        """
        geo = edge_geometry(frac, cell, senders, receivers, shifts, edge_graph, edge_mask)
        sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(self.sh_lmax), geo["directions"], normalize=False
        )
        radial = RadialEmbedding(self.num_basis, self.cutoff, name="radial")(geo["lengths"])
        parts: list[Any] = [radial]
        fk = ImageEmbedding(self.image_embedding, self.image_features, name="image")(
            shifts, senders, receivers, geo["frac_delta"], geo["cell"]
        )
        if fk is not None:
            parts.append(fk)
        edge_scalars = jnp.where(edge_mask[:, None], jnp.concatenate(parts, axis=-1), 0.0)
        edge_weight = jnp.where(
            edge_mask, polynomial_envelope(geo["lengths"] / self.cutoff), 0.0
        )  # [E]
        h = e3nn.IrrepsArray(f"{node_scalars.shape[-1]}x0e", node_scalars)
        if node_vectors is not None:
            vec = e3nn.IrrepsArray(
                f"{node_vectors.shape[-2]}x1o", node_vectors.reshape(h.shape[0], -1)
            )
            h = e3nn.concatenate([h, vec]).regroup()
        for layer in range(self.num_layers):
            pooled = None
            if self.global_context:
                m = node_mask[:, None].astype(h.dtype)
                count = jax.ops.segment_sum(m, node_graph, num_graphs)
                mean = jax.ops.segment_sum(h.array * m, node_graph, num_graphs)
                mean = mean / jnp.maximum(count, 1.0)
                pooled = e3nn.IrrepsArray(h.irreps, mean[node_graph])
            h = PeriodicInteraction(
                self.hidden_irreps,
                self.mlp_hidden,
                self.avg_num_neighbors,
                self.edge_channels,
                name=f"layer_{layer}",
            )(h, sh, edge_scalars, senders, receivers, edge_weight, cond, pooled)
        return h, geo
