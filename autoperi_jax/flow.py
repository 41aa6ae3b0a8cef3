"""Conditional RealNVP flow over the latent vector z = [z_lattice | z_comp | z_struct].

Method section 2.4. A stack of invertible maps carries a standard-normal base variable u to
the latent z (distrax semantics: *forward* is u -> z):

    z = f(u) = f_K o ... o f_1 (u),        u ~ N(0, I_dim),

and the exact log-likelihood follows from the change of variables

    log p(z | c) = log N(f^{-1}(z | c); 0, I) + log |det J_{f^{-1}}(z | c)|
                 = log N(u; 0, I) - sum_i log |det J_{f_i}(u_{i-1} | c)|.

Bijectors (each a Linen module exposing ``forward_and_log_det(x, context)`` and
``inverse_and_log_det(y, context)``, the log-determinant per sample, shape [batch]):

* `AffineCoupling` (RealNVP, Dinh et al., ICLR 2017): with a fixed binary mask m
  (1 = conditioning coordinate, passed through unchanged)

      y = m * x + (1 - m) * (x * exp(a) + t),   (a, t) = (1 - m) * NN(m * x, c),
      a = s_max * tanh(s / s_max),               log |det J| = sum_j a_j.

  The tanh keeps every per-layer log-scale in (-s_max, s_max), so a large conditioner
  output cannot make the flow blow up (the Glow / nflows "soft clamp"). The last
  conditioner layer is zero-initialised: a = t = 0 and the flow is exactly the identity
  at initialisation.
* `Permute`: a fixed permutation, stored as a constant (not a parameter); log det = 0.
* `InvertibleLinearLU` (Glow, Kingma & Dhariwal, NeurIPS 2018), optional before each
  coupling: y = W x with W = L (U + diag(exp(log_s))), L unit lower triangular,
  U strictly upper triangular; log |det J| = sum log_s; identity at initialisation.

Masks and permutations (`layer_plan`). ``mask`` picks the base pattern of the first
coupling: ``'halves'`` (the first floor(dim/2) coordinates condition) or ``'checkerboard'``
(even coordinates condition). Between couplings a fixed permutation reorders z:
``'none'``, ``'reverse'`` or ``'random'`` (seeded by ``seed``, a numpy constant). Each
later coupling uses the base pattern or its complement, whichever transforms more of the
coordinates that the previous coupling left unchanged: with ``'none'`` and ``'reverse'``
two consecutive couplings together transform every coordinate, with ``'random'`` the
better of the two is taken. After the last coupling a final fixed permutation restores
the order of z, so the flow is exactly the identity at initialisation.

Latent parts (``parts``, e.g. ``(("lattice", 8), ("comp", 32), ("struct", 64))``, in the
order they are concatenated in z). With ``mask='parts'`` the couplings alternate two
kinds, and permutations act only inside each part, so a coordinate never leaves its part
and a mask can name parts:

* within-part couplings (even layers): every part is split in halves; the kept half of
  *every* part conditions the update of the other half of *every* part. Each such layer
  updates lattice, composition and structure coordinates at once, each conditioned on all
  three parts: this is what mixes the parts in every layer.
* block couplings (odd layers): one whole part is transformed given all the other parts,
  cycling lattice -> comp -> struct -> lattice ..., i.e. the flow explicitly models
  p(z_struct | z_lattice, z_comp) and the other orders.
With ``use_lu`` the LU layers mix coordinates of different parts linearly, so the masks
then act on mixtures; it is off by default.

The base is N(0, I) and every per-layer log-scale is bounded by s_max: standardise z
(per-coordinate training mean / std) before the flow, as one does for any RealNVP.

Conditioning (`ContextEncoder`, `FlowContext`). The conditioner of every coupling sees a
context vector c built from

* normalised target properties ``props`` [batch, n_props] with a per-property ``present``
  mask [batch, n_props]: a present property k enters as gelu(v_k w_k + b_k), a missing one
  is replaced by a learned null embedding e_k^null (classifier-free-guidance style). Train
  with `drop_context` (random property dropout) and the same flow gives p(z | any subset
  of properties), including the marginal p(z) (every property missing). Missing values
  may be NaN: they are zeroed before the embedding (double-``where``) so gradients stay
  finite.
* an optional space-group label ``spacegroup`` [batch] in 0..230 through a learned
  embedding table, label 0 meaning "unconditioned / any space group".
* an optional composition ``composition`` [batch, A]: the atomic numbers of one cell
  (0 = empty slot), for crystal structure prediction (``use_composition``): every atom
  enters as gelu(Dense([Embed(Z), features(Z)])) with the tabulated electronegativity and
  covalent radius of `autoperi_jax.elements.atom_features` (so an element seen rarely in
  training still lands near chemically similar ones), averaged over the cell's atoms,
  beside an embedding of the atom count; a cell with no atoms takes a learned null
  embedding.

Usage (every function is pure, params explicit, static shapes, jittable)::

    flow = make_flow(FlowConfig(dim=64, n_props=2, use_spacegroup=True))
    params = flow.init(jax.random.key(0))
    ctx = FlowContext(props=y, present=jnp.isfinite(y), spacegroup=sg)
    lp = flow.log_prob(params, z, ctx)                       # [batch]
    loss = flow.loss(params, z, ctx)                         # L_gen = -mean log p(z | c)
    z_new, lp_new = jax.jit(flow.sample, static_argnums=2)(params, key, 16, ctx_one)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.scipy.linalg import solve_triangular

from autoperi_jax.elements import atom_features

__all__ = [
    "AffineCoupling",
    "ConditionalRealNVP",
    "ContextEncoder",
    "Flow",
    "FlowConfig",
    "FlowContext",
    "InvertibleLinearLU",
    "Permute",
    "drop_context",
    "gen_loss",
    "join_parts",
    "layer_plan",
    "make_flow",
    "split_parts",
    "standard_normal_log_prob",
]

Array = jnp.ndarray
Params = Any

MASKS = ("halves", "checkerboard", "parts")
PERMUTATIONS = ("none", "reverse", "random")
N_SPACEGROUPS = 231  # labels 0..230; 0 = unconditioned / any
N_ELEMENTS = 119  # atomic numbers 0..118; 0 = empty slot
MAX_COUNT = 256  # atom counts above this share the last count embedding


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Static settings of the flow (from a config file, at the edge).

    Attributes:
      dim: size of z.
      n_layers: number of affine coupling layers K.
      hidden: widths of the hidden layers of every conditioner MLP.
      n_props: number of target properties (0 = none).
      use_spacegroup: condition on a space-group label (0..230, 0 = any).
      use_composition: condition on the atoms of one cell (crystal structure prediction).
      context_features: width of the context vector fed to every conditioner.
      scale_max: s_max, bound of every per-layer log-scale.
      mask: ``'halves'``, ``'checkerboard'`` or ``'parts'`` (module docstring).
      permutation: ``'none'``, ``'reverse'`` or ``'random'`` between couplings.
      use_lu: an `InvertibleLinearLU` before every coupling.
      parts: ((name, size), ...) in the order of z; sizes sum to ``dim``. Required by
        ``mask='parts'``; otherwise only names the parts for `split_parts`.
      seed: seed of the ``'random'`` permutations (numpy constants, not parameters).
    """

    dim: int
    n_layers: int = 8
    hidden: tuple[int, ...] = (256, 256)
    n_props: int = 0
    use_spacegroup: bool = False
    use_composition: bool = False
    context_features: int = 64
    scale_max: float = 3.0
    mask: str = "halves"
    permutation: str = "reverse"
    use_lu: bool = False
    parts: tuple[tuple[str, int], ...] = ()
    seed: int = 0

    def __post_init__(self):
        # Tuples keep the config hashable (it is a Linen module attribute).
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "parts", tuple((str(n), int(s)) for n, s in self.parts))
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2, got {self.dim}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {self.permutation!r}")
        if self.n_props < 0:
            raise ValueError(f"n_props must be >= 0, got {self.n_props}")
        if self.scale_max <= 0:
            raise ValueError(f"scale_max must be > 0, got {self.scale_max}")
        if self.parts:
            sizes = [s for _, s in self.parts]
            if min(sizes) < 1 or sum(sizes) != self.dim:
                raise ValueError(f"part sizes {sizes} must be >= 1 and sum to dim={self.dim}")
            if len({n for n, _ in self.parts}) != len(self.parts):
                raise ValueError(f"part names must be unique: {self.parts}")
        if self.mask == "parts" and len(self.parts) < 2:
            raise ValueError("mask='parts' needs at least two entries in `parts`")

    @property
    def conditional(self) -> bool:
        """Whether the conditioners receive a context vector."""
        return self.n_props > 0 or self.use_spacegroup or self.use_composition

    @property
    def part_slices(self) -> dict[str, slice]:
        """{name: slice of z} of the named parts."""
        out, start = {}, 0
        for name, size in self.parts:
            out[name] = slice(start, start + size)
            start += size
        return out


class FlowContext(NamedTuple):
    """Conditioning inputs of the flow (a pytree; any field may be None).

    Leading dimensions are either the batch size or 1 (broadcast); a single scalar
    space group is also accepted. Missing fields mean "unconditioned": no ``props`` =
    every property missing (null embeddings), no ``present`` = ``isfinite(props)``,
    no ``spacegroup`` = label 0.

    Attributes:
      props: [batch, n_props] normalised target properties (NaN allowed where missing).
      present: [batch, n_props] bool, True where the property is given.
      spacegroup: [batch] int space-group labels in 0..230 (0 = any).
      composition: [batch, A] int atomic numbers of one cell, 0 on empty slots (the
        order of the slots does not matter).
    """

    props: Array | None = None
    present: Array | None = None
    spacegroup: Array | None = None
    composition: Array | None = None


def standard_normal_log_prob(u: Array) -> Array:
    """log N(u; 0, I) summed over the last axis.

    Args:
      u: [batch, dim].

    Returns:
      [batch] ``-0.5 * (|u|^2 + dim * log(2 pi))``.
    """
    return -0.5 * (jnp.sum(u**2, axis=-1) + u.shape[-1] * math.log(2.0 * math.pi))


def gen_loss(log_probs: Array, weights: Array | None = None) -> Array:
    """L_gen = -mean log p(z) (method section 2.4), optionally masked.

    Args:
      log_probs: [batch] log p(z_b | c_b).
      weights: [batch] optional weights (0 for padding graphs).

    Returns:
      Scalar ``-sum_b w_b log p_b / max(sum_b w_b, 1e-8)`` (plain mean without weights).
    """
    if weights is None:
        return -jnp.mean(log_probs)
    weights = weights.astype(log_probs.dtype)
    # a padding row may hold a non-finite log prob: select it away (its cotangent is then
    # exactly 0) instead of multiplying it by 0
    safe = jnp.where(weights > 0, log_probs, 0.0)
    return -jnp.sum(weights * safe) / jnp.maximum(jnp.sum(weights), 1e-8)


def split_parts(z: Array, config: FlowConfig) -> dict[str, Array]:
    """Splits z [..., dim] into its named parts {name: [..., size]}."""
    if not config.parts:
        raise ValueError("config.parts is empty")
    return {name: z[..., sl] for name, sl in config.part_slices.items()}


def join_parts(parts: dict[str, Array], config: FlowConfig) -> Array:
    """Inverse of `split_parts`: concatenates the parts in the order of ``config.parts``."""
    return jnp.concatenate([parts[name] for name, _ in config.parts], axis=-1)


def drop_context(
    key: Array, context: FlowContext, p_props: float = 0.2, p_spacegroup: float = 0.2
) -> FlowContext:
    """Classifier-free-guidance dropout of the conditions, for training.

    Every property of every sample is marked missing independently with probability
    ``p_props`` and every space group is replaced by 0 with probability
    ``p_spacegroup``, so that one flow learns p(z | any subset of conditions), the
    marginal p(z) included.

    Args:
      key: PRNG key.
      context: batched context ([batch, n_props] / [batch] fields).
      p_props: drop probability of each property.
      p_spacegroup: drop probability of the space group.

    Returns:
      The context with more properties missing / more labels 0.
    """
    k_props, k_sg = jax.random.split(key)
    props, present, sg = context.props, context.present, context.spacegroup
    if props is not None:
        if present is None:
            present = jnp.isfinite(props)
        keep = jax.random.uniform(k_props, present.shape) >= p_props
        present = jnp.logical_and(present, keep)
    if sg is not None:
        sg = jnp.asarray(sg)
        keep = jax.random.uniform(k_sg, sg.shape) >= p_spacegroup
        sg = jnp.where(keep, sg, 0)
    return context._replace(props=props, present=present, spacegroup=sg)


# --------------------------------------------------------------------------- layer plan


def _base_masks(config: FlowConfig) -> list[np.ndarray]:
    """The two candidate masks (pattern, complement) of the non-part couplings."""
    d = config.dim
    if config.mask == "checkerboard":
        m = np.arange(d) % 2 == 0
    else:  # halves (also the within-part pattern, applied per part below)
        m = np.arange(d) < d // 2
    return [m, ~m]


def _within_part_masks(config: FlowConfig) -> list[np.ndarray]:
    """Halves inside every part (pattern, complement); positions of parts never move."""
    m = np.zeros(config.dim, bool)
    for sl in config.part_slices.values():
        size = sl.stop - sl.start
        m[sl.start : sl.start + size // 2] = True
    return [m, ~m]


def _permutation(config: FlowConfig, rng: np.random.Generator) -> np.ndarray:
    """One fixed permutation (new position j holds old coordinate perm[j])."""
    blocks = list(config.part_slices.values()) if config.mask == "parts" else [slice(0, config.dim)]
    perm = np.arange(config.dim)
    for sl in blocks:  # parts: permute inside each part only
        idx = np.arange(sl.start, sl.stop)
        if config.permutation == "reverse":
            perm[sl] = idx[::-1]
        elif config.permutation == "random":
            perm[sl] = rng.permutation(idx)
    return perm


def _transformed(mask: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[dim] bool over ORIGINAL coordinates: those a coupling with ``mask`` transforms."""
    out = np.zeros(mask.shape[0], bool)
    out[order[~mask]] = True
    return out


def layer_plan(config: FlowConfig) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Masks and permutations of the couplings, as numpy constants.

    Args:
      config: the flow settings.

    Returns:
      K pairs (mask, perm): ``mask`` [dim] bool in the coordinate order seen by coupling
      i (True = conditioning), ``perm`` [dim] int applied after coupling i (None for
      ``permutation='none'``). The last ``perm`` restores the order of z, so the output
      coordinates are z's (parts included) and the flow is the identity at init.
    """
    rng = np.random.default_rng(config.seed)
    order = np.arange(config.dim)  # order[j] = original coordinate at position j
    last_transformed: dict[str, np.ndarray] = {}
    plan = []
    part_names = [n for n, _ in config.parts]
    for i in range(config.n_layers):
        if config.mask == "parts" and i % 2 == 1:
            family = "block"
            sl = config.part_slices[part_names[(i // 2) % len(part_names)]]
            cond = np.ones(config.dim, bool)
            cond[sl] = False  # parts never move, so positions = original coordinates
            candidates = [cond]
        else:
            family = "coupling"
            candidates = (
                _within_part_masks(config) if config.mask == "parts" else _base_masks(config)
            )
        prev = last_transformed.get(family)
        if prev is None:
            mask = candidates[0]
        else:
            # the candidate that transforms most of the original coordinates the previous
            # coupling of this family left unchanged (first maximum: ties keep the pattern)
            gains = [np.sum(_transformed(m, order) & ~prev) for m in candidates]
            mask = candidates[int(np.argmax(gains))]
        last_transformed[family] = _transformed(mask, order)
        perm = None
        if config.permutation != "none":
            if i < config.n_layers - 1:
                perm = _permutation(config, rng)
            elif np.any(order != np.arange(config.dim)):
                perm = np.argsort(order)  # back to the order of z: identity at init
            if perm is not None:
                order = order[perm]
        plan.append((mask, perm))
    return plan


# --------------------------------------------------------------------------- bijectors


class MLP(nn.Module):
    """Conditioner network: Dense-gelu stack, last layer zero-initialised.

    Attributes:
      hidden: hidden widths.
      out_features: output width.
    """

    hidden: tuple[int, ...]
    out_features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, h in enumerate(self.hidden):
            x = nn.gelu(nn.Dense(h, name=f"dense_{i}")(x))
        return nn.Dense(
            self.out_features,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="out",
        )(x)


class AffineCoupling(nn.Module):
    """Masked affine coupling bijector (RealNVP, Dinh et al. 2017).

    Forward (u-side x -> z-side y), m = mask (1 = conditioning):

        (s, t) = NN([m * x, c]),   a = (1 - m) * s_max * tanh(s / s_max),
        y = x * exp(a) + (1 - m) * t,        log |det dy/dx| = sum_j a_j.

    Inverse: x = (y - (1 - m) * t) * exp(-a) with (s, t) from m * y = m * x.

    Attributes:
      mask: [dim] bools, True = conditioning coordinate (unchanged).
      hidden: hidden widths of the conditioner.
      scale_max: s_max.
    """

    mask: tuple[bool, ...]
    hidden: tuple[int, ...]
    scale_max: float = 3.0

    def setup(self):
        self.conditioner = MLP(self.hidden, 2 * len(self.mask))

    def _scale_shift(self, x_cond: Array, context: Array | None) -> tuple[Array, Array]:
        h = x_cond if context is None else jnp.concatenate([x_cond, context], axis=-1)
        s, t = jnp.split(self.conditioner(h), 2, axis=-1)  # [batch, dim] each
        free = 1.0 - jnp.asarray(self.mask, x_cond.dtype)  # [dim]
        log_scale = free * self.scale_max * jnp.tanh(s / self.scale_max)
        return log_scale, free * t

    def forward_and_log_det(self, x: Array, context: Array | None = None) -> tuple[Array, Array]:
        """Args:
          x: [batch, dim].
          context: [batch, context_features] or None.

        Returns:
          y [batch, dim], log |det dy/dx| [batch].
        """
        m = jnp.asarray(self.mask, x.dtype)
        log_scale, shift = self._scale_shift(x * m, context)
        return x * jnp.exp(log_scale) + shift, jnp.sum(log_scale, axis=-1)

    def inverse_and_log_det(self, y: Array, context: Array | None = None) -> tuple[Array, Array]:
        """Args:
          y: [batch, dim].
          context: [batch, context_features] or None.

        Returns:
          x [batch, dim], log |det dx/dy| [batch].
        """
        m = jnp.asarray(self.mask, y.dtype)
        log_scale, shift = self._scale_shift(y * m, context)
        return (y - shift) * jnp.exp(-log_scale), -jnp.sum(log_scale, axis=-1)


class Permute(nn.Module):
    """Fixed permutation y = x[:, perm] (a constant, not a parameter); log det = 0.

    Attributes:
      perm: [dim] ints, new position j holds old coordinate perm[j].
    """

    perm: tuple[int, ...]

    def forward_and_log_det(self, x: Array, context: Array | None = None) -> tuple[Array, Array]:
        """y = x[:, perm]; returns (y [batch, dim], zeros [batch])."""
        return x[:, np.asarray(self.perm)], jnp.zeros(x.shape[0], x.dtype)

    def inverse_and_log_det(self, y: Array, context: Array | None = None) -> tuple[Array, Array]:
        """x = y[:, argsort(perm)]; returns (x [batch, dim], zeros [batch])."""
        return y[:, np.argsort(np.asarray(self.perm))], jnp.zeros(y.shape[0], y.dtype)


class InvertibleLinearLU(nn.Module):
    """Invertible linear map in LU form (Glow, Kingma & Dhariwal 2018).

    y = W x, W = L (U + diag(exp(log_s))), L = I + strictly-lower(L_p),
    U = strictly-upper(U_p); log |det W| = sum_j log_s_j. All parameters start at zero,
    so W = I. (No pivoting permutation: the fixed `Permute` layers play that role.)

    Attributes:
      dim: size of x.
    """

    dim: int

    def setup(self):
        zeros = nn.initializers.zeros
        self.lower = self.param("lower", zeros, (self.dim, self.dim))
        self.upper = self.param("upper", zeros, (self.dim, self.dim))
        self.log_s = self.param("log_s", zeros, (self.dim,))

    def _factors(self) -> tuple[Array, Array, Array]:
        eye = jnp.eye(self.dim, dtype=self.lower.dtype)
        l_mat = jnp.tril(self.lower, -1) + eye  # [dim, dim]
        u_mat = jnp.triu(self.upper, 1) + jnp.diag(jnp.exp(self.log_s))  # [dim, dim]
        return l_mat, u_mat, self.log_s

    def forward_and_log_det(self, x: Array, context: Array | None = None) -> tuple[Array, Array]:
        """Args: x [batch, dim]. Returns: y = x W^T [batch, dim], log|det W| [batch]."""
        l_mat, u_mat, log_s = self._factors()
        y = (x @ u_mat.T) @ l_mat.T
        return y, jnp.broadcast_to(jnp.sum(log_s), x.shape[:1]).astype(y.dtype)

    def inverse_and_log_det(self, y: Array, context: Array | None = None) -> tuple[Array, Array]:
        """Args: y [batch, dim]. Returns: x = W^{-1} y [batch, dim], -log|det W| [batch]."""
        l_mat, u_mat, log_s = self._factors()
        v = solve_triangular(l_mat, y.T, lower=True, unit_diagonal=True)  # [dim, batch]
        x = solve_triangular(u_mat, v, lower=False).T
        return x, jnp.broadcast_to(-jnp.sum(log_s), y.shape[:1]).astype(x.dtype)


# --------------------------------------------------------------------------- context


class ContextEncoder(nn.Module):
    """Context vector c from properties (with null embeddings), a space group and a
    composition.

    e_k = gelu(v_k w_k + b_k) if property k is present else e_k^null (learned),
    e_sg = Embed(spacegroup) (label 0 = any),
    e_comp = [mean_a gelu(Dense([Embed(Z_a), features(Z_a)])), Embed(n)] over the n atoms
    of the cell (a learned null embedding when n = 0),
    c = Dense(gelu(Dense([e_1, ..., e_P, e_sg, e_comp]))).

    Attributes:
      n_props: number of properties P.
      use_spacegroup: whether to embed the space group.
      features: width of each embedding and of c.
      use_composition: whether to embed a composition.
    """

    n_props: int
    use_spacegroup: bool
    features: int
    use_composition: bool = False

    @nn.compact
    def __call__(
        self, props: Array, present: Array, spacegroup: Array, composition: Array | None = None
    ) -> Array:
        """Args:
          props: [batch, n_props] (ignored where not present; may be NaN there).
          present: [batch, n_props] bool.
          spacegroup: [batch] int in 0..230.
          composition: [batch, A] int atomic numbers (0 = empty slot); with
            ``use_composition`` only.

        Returns:
          c [batch, features].
        """
        f = self.features
        embs = []
        if self.n_props:
            w = self.param("value_kernel", nn.initializers.normal(1.0), (self.n_props, f))
            b = self.param("value_bias", nn.initializers.zeros, (self.n_props, f))
            null = self.param("null_embedding", nn.initializers.normal(1.0), (self.n_props, f))
            safe = jnp.where(present, props, 0.0)  # NaN-free for gradients (double where)
            e = nn.gelu(safe[..., None] * w + b)  # [batch, n_props, f]
            e = jnp.where(present[..., None], e, null)
            embs.append(e.reshape(e.shape[0], self.n_props * f))
        if self.use_spacegroup:
            sg = jnp.clip(spacegroup, 0, N_SPACEGROUPS - 1)
            embs.append(nn.Embed(N_SPACEGROUPS, f, embedding_init=nn.initializers.normal(1.0))(sg))
        if self.use_composition:
            embs.append(self._composition(composition))
        h = jnp.concatenate(embs, axis=-1)
        h = nn.gelu(nn.Dense(f, name="mix")(h))
        return nn.Dense(f, name="out")(h)

    def _composition(self, numbers: Array) -> Array:
        """e_comp [batch, 2 features] of atomic numbers [batch, A] (class docstring)."""
        f = self.features
        numbers = jnp.clip(numbers, 0, N_ELEMENTS - 1)
        occupied = numbers > 0  # [batch, A]
        table = jnp.asarray(atom_features(np.arange(N_ELEMENTS)))  # [119, 3], constants
        embed = nn.Embed(N_ELEMENTS, f, embedding_init=nn.initializers.normal(1.0), name="element")
        h = jnp.concatenate([embed(numbers), table[numbers]], -1)  # [batch, A, f + 3]
        h = nn.gelu(nn.Dense(f, name="atom")(h))  # [batch, A, f]
        count = jnp.sum(occupied, -1)  # [batch]
        mean = jnp.sum(h * occupied[..., None], 1) / jnp.maximum(count, 1)[:, None]
        null = self.param("null_composition", nn.initializers.normal(1.0), (f,))
        mean = jnp.where((count > 0)[:, None], mean, null)
        n_embed = nn.Embed(
            MAX_COUNT + 1, f, embedding_init=nn.initializers.normal(1.0), name="count"
        )
        return jnp.concatenate([mean, n_embed(jnp.minimum(count, MAX_COUNT))], -1)


# --------------------------------------------------------------------------- flow


class ConditionalRealNVP(nn.Module):
    """The flow z = f(u | c) as a Linen module (use the pure wrappers of `make_flow`).

    Attributes:
      config: `FlowConfig`.
    """

    config: FlowConfig

    def setup(self):
        cfg = self.config
        if cfg.conditional:
            self.context_encoder = ContextEncoder(
                cfg.n_props, cfg.use_spacegroup, cfg.context_features, cfg.use_composition
            )
        layers = []
        for mask, perm in layer_plan(cfg):
            if cfg.use_lu:
                layers.append(InvertibleLinearLU(cfg.dim))
            layers.append(AffineCoupling(tuple(bool(b) for b in mask), cfg.hidden, cfg.scale_max))
            if perm is not None:
                layers.append(Permute(tuple(int(p) for p in perm)))
        self.layers = layers

    def _encode(self, context: FlowContext | None, batch: int, dtype: Any) -> Array | None:
        cfg = self.config
        context = FlowContext() if context is None else FlowContext(*context)
        if not cfg.conditional:
            if any(x is not None for x in context):
                raise ValueError(
                    "this flow is unconditional (n_props=0, no space group or composition)"
                )
            return None
        if context.props is not None and cfg.n_props == 0:
            raise ValueError("context has props but config.n_props == 0")
        if context.spacegroup is not None and not cfg.use_spacegroup:
            raise ValueError("context has a spacegroup but config.use_spacegroup is False")
        if context.composition is not None and not cfg.use_composition:
            raise ValueError("context has a composition but config.use_composition is False")
        if cfg.use_composition and context.composition is None:
            raise ValueError("this flow predicts structures: its context needs a composition")
        p = cfg.n_props
        if context.props is None:
            props = jnp.zeros((batch, p), dtype)
            present = jnp.zeros((batch, p), bool)
        else:
            props = jnp.asarray(context.props, dtype)
            if props.ndim < 2 or props.shape[-1] != p:
                raise ValueError(f"props must be [batch, {p}], got {props.shape}")
            props = jnp.broadcast_to(props, (batch, p))
            present = jnp.isfinite(props) if context.present is None else context.present
            present = jnp.broadcast_to(jnp.asarray(present, bool), (batch, p))
        if context.spacegroup is None:
            sg = jnp.zeros((batch,), jnp.int32)
        else:
            sg = jnp.broadcast_to(jnp.asarray(context.spacegroup, jnp.int32), (batch,))
        comp = None
        if cfg.use_composition:
            comp = jnp.asarray(context.composition, jnp.int32)
            if comp.ndim != 2:
                raise ValueError(f"composition must be [batch, A], got {comp.shape}")
            comp = jnp.broadcast_to(comp, (batch, comp.shape[-1]))
        return self.context_encoder(props, present, sg, comp).astype(dtype)

    def _check(self, x: Array) -> None:
        if x.ndim != 2 or x.shape[-1] != self.config.dim:
            raise ValueError(f"expected [batch, {self.config.dim}], got {x.shape}")

    def forward_and_log_det(
        self, u: Array, context: FlowContext | None = None
    ) -> tuple[Array, Array]:
        """z = f(u | c).

        Args:
          u: [batch, dim] base-space points.
          context: `FlowContext` or None (unconditioned).

        Returns:
          z [batch, dim], log |det J_f(u)| [batch].
        """
        self._check(u)
        c = self._encode(context, u.shape[0], u.dtype)
        log_det = jnp.zeros(u.shape[0], u.dtype)
        for layer in self.layers:
            u, ld = layer.forward_and_log_det(u, c)
            log_det = log_det + ld
        return u, log_det

    def inverse_and_log_det(
        self, z: Array, context: FlowContext | None = None
    ) -> tuple[Array, Array]:
        """u = f^{-1}(z | c).

        Args:
          z: [batch, dim] latents.
          context: `FlowContext` or None (unconditioned).

        Returns:
          u [batch, dim], log |det J_{f^{-1}}(z)| [batch].
        """
        self._check(z)
        c = self._encode(context, z.shape[0], z.dtype)
        log_det = jnp.zeros(z.shape[0], z.dtype)
        for layer in reversed(self.layers):
            z, ld = layer.inverse_and_log_det(z, c)
            log_det = log_det + ld
        return z, log_det

    def log_prob(self, z: Array, context: FlowContext | None = None) -> Array:
        """log p(z | c) = log N(f^{-1}(z); 0, I) + log |det J_{f^{-1}}(z)|, shape [batch]."""
        u, log_det = self.inverse_and_log_det(z, context)
        return standard_normal_log_prob(u) + log_det

    def __call__(self, z: Array, context: FlowContext | None = None) -> Array:
        """`log_prob` (touches every parameter, used by ``init``)."""
        return self.log_prob(z, context)


@dataclasses.dataclass(frozen=True)
class Flow:
    """Pure functions of a `ConditionalRealNVP` (jax-md style: params are explicit).

    Attributes:
      config: the flow settings.
      module: the Linen module.
    """

    config: FlowConfig
    module: ConditionalRealNVP

    def init(self, key: Array) -> Params:
        """Parameters of the flow (float32); the flow is exactly the identity at init.

        Args:
          key: PRNG key.
        """
        return _jitted_init(self.config)(key)

    def forward_and_log_det(
        self, params: Params, u: Array, context: FlowContext | None = None
    ) -> tuple[Array, Array]:
        """z = f(u | c): returns z [batch, dim] and log |det J_f(u)| [batch]."""
        return self.module.apply(params, u, context, method=ConditionalRealNVP.forward_and_log_det)

    def inverse_and_log_det(
        self, params: Params, z: Array, context: FlowContext | None = None
    ) -> tuple[Array, Array]:
        """u = f^{-1}(z | c): returns u [batch, dim] and log |det J_{f^{-1}}(z)| [batch]."""
        return self.module.apply(params, z, context, method=ConditionalRealNVP.inverse_and_log_det)

    def log_prob(self, params: Params, z: Array, context: FlowContext | None = None) -> Array:
        """Exact log p(z | c) [batch] by the change of variables (module docstring).

        Args:
          params: flow parameters.
          z: [batch, dim].
          context: `FlowContext` or None (marginal: every condition missing).
        """
        return self.module.apply(params, z, context, method=ConditionalRealNVP.log_prob)

    def loss(
        self,
        params: Params,
        z: Array,
        context: FlowContext | None = None,
        weights: Array | None = None,
    ) -> Array:
        """L_gen = -sum_b w_b log p(z_b | c_b) / sum_b w_b (a plain mean without weights).

        Args:
          params: flow parameters.
          z: [batch, dim] latents.
          context: `FlowContext` or None.
          weights: [batch] optional, 0 for padding graphs; their z may hold anything,
            NaN included (zeroed before the flow, then left out: finite gradients).
        """
        if weights is not None:
            z = jnp.where(weights[:, None] > 0, z, 0.0)  # first where of a double where
        return gen_loss(self.log_prob(params, z, context), weights)

    def sample(
        self,
        params: Params,
        key: Array,
        n: int,
        context: FlowContext | None = None,
        temperature: float | Array = 1.0,
    ) -> tuple[Array, Array]:
        """Draws z = f(T eps | c), eps ~ N(0, I). Jit with ``n`` static (argnum 2).

        Args:
          params: flow parameters.
          key: PRNG key.
          n: number of samples (static).
          context: `FlowContext` with leading dims n or 1, or None (unconditioned).
          temperature: T, scales the base noise (T < 1 trades diversity for density).

        Returns:
          z [n, dim] and the model's log p(z | c) [n] (of the T = 1 model:
          log N(u; 0, I) - log |det J_f(u)| with u = T eps).
        """
        u = temperature * jax.random.normal(key, (n, self.config.dim), jnp.float32)
        z, log_det = self.forward_and_log_det(params, u, context)
        return z, standard_normal_log_prob(u) - log_det


@functools.cache
def _jitted_init(config: FlowConfig) -> Any:
    """One compiled init per config (eager Linen init dispatches op by op: slow on CPU)."""
    module = ConditionalRealNVP(config)
    z = jnp.zeros((1, config.dim), jnp.float32)
    context = None
    if config.conditional:  # every conditioning parameter is created whatever the context
        p = config.n_props
        props = jnp.zeros((1, p), jnp.float32) if p else None
        present = jnp.ones((1, p), bool) if p else None
        sg = jnp.zeros((1,), jnp.int32) if config.use_spacegroup else None
        comp = jnp.ones((1, 1), jnp.int32) if config.use_composition else None
        context = FlowContext(props, present, sg, comp)
    return jax.jit(lambda key: module.init(key, z, context))


def make_flow(config: FlowConfig) -> Flow:
    """Builds the pure flow functions for ``config``."""
    return Flow(config, ConditionalRealNVP(config))
