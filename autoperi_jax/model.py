"""Pure functions around `autoperi_jax.nn.Autoencoder`: layouts, the velocity field, decoding.

Everything here is a pure function or a factory returning one (jax-md style), so the
training step, the sharded trainer of a later issue and user code share it:

* `make_encode_fn(model)` -> ``encode(params, batch) -> z``;
* `make_decode_fn(model, settings, normalisers)` -> ``decode(params, z, key)``: decode
  lattice -> composition -> coordinates -> bonds from latents (the generative model
  samples z with the latent flow, `autoperi_jax.sampling`);
* `make_reconstruct_fn(model, settings, normalisers)` -> ``reconstruct(params, batch,
  key)``: encode, then decode;
* `decoded_to_crystals` (re-exported from `autoperi_jax.convert`, the host side) turns the
  padded decoder output into `Crystal` objects.

The torus maths of the coordinate flow (`wrap_centered`, `flow_path`, `couple`,
`align_translation`, `ot_pair`, `sort_by_species`) lives in `autoperi_jax.torus`, and the
in-jit candidate edge list (`periodic_candidates`) in `autoperi_jax.graph`, beside the
other neighbour lists; both are re-exported here.

The training loss is built from these parts in `autoperi_jax.loss`.

Decoding integrates dx/dt = v(x, t | z) from x_0 with ``num_steps`` Euler steps on the
torus (one velocity evaluation per step). By default the network predicts the
displacement to the end point and v = D / (1 - t) (``ModelSettings.flow_target``), so the
last step lands on the predicted structure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.convert import decoded_bonds, decoded_to_crystals
from autoperi_jax.crystal import cell_to_lattice_params, lattice_params_to_cell, wrap_frac
from autoperi_jax.elements import atom_features
from autoperi_jax.graph import CandidateEdges, node_graph_index, periodic_candidates
from autoperi_jax.nn.autoencoder import Autoencoder
from autoperi_jax.nn.decoder import VelocityInputs
from autoperi_jax.torus import (
    align_translation,
    couple,
    flow_path,
    ot_pair,
    sort_by_species,
    wrap_centered,
)

__all__ = [
    "CandidateEdges",
    "DenseCrystals",
    "ModelSettings",
    "align_translation",
    "bond_targets",
    "cell_to_y",
    "compute_normalisers",
    "connectivity_logits",
    "counts_from_fractions",
    "couple",
    "decode_composition",
    "decoded_bonds",
    "decoded_to_crystals",
    "dense_layout",
    "dense_velocity",
    "edge_budget",
    "flow_path",
    "init_params",
    "lattice_from_y",
    "make_decode_fn",
    "make_encode_fn",
    "make_reconstruct_fn",
    "ot_pair",
    "per_graph_normal",
    "per_graph_uniform",
    "periodic_candidates",
    "sort_by_species",
    "velocity_inputs",
    "wrap_centered",
]

Array = jnp.ndarray
_ATOM_FEATURES = atom_features(np.arange(119))  # [119, 3]; row 0 (padding) is zeros


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Static settings of the losses and of decoding (from the config, at the edge).

    Attributes:
      max_atoms: atom slots A (must match the model's ``max_atoms``).
      flow_cutoff: cutoff (A) of the velocity field's in-jit neighbour list (= the
        model's ``dec_cutoff``).
      flow_max_shift: image range per axis of that list's fallback (each pair otherwise
        enumerates the images its cell needs; `periodic_candidates`).
      flow_edges_per_crystal: average edge budget per crystal of that list (the batch
        holds ``G * flow_edges_per_crystal`` slots; `periodic_candidates`).
      connect_cutoff, connect_max_shift, connect_edges_per_crystal: the same for bond
        candidates.
      bond_tolerance: relative tolerance of the covalent-radius bond criterion.
      num_steps: Euler steps (velocity evaluations) of the coordinate decoder.
      lambda_lattice, lambda_atom, lambda_coord, lambda_connect: loss weights
        lambda_1..lambda_4 of the method.
      kl_weight: beta of the KL term (Gaussian posterior only).
      z_l2: weight of an L2 penalty on z (deterministic posterior).
      z_noise: std of Gaussian noise added to z in training (deterministic posterior).
      time_power: flow times are sampled as t = u ** time_power, u ~ U(0, 1); values
        below 1 put more training signal near the data end (t -> 1).
      flow_target: ``'endpoint'`` (default): the network predicts the displacement
        D = x_1 - x_t to the end of the path and v = D / max(1 - t, t_floor); or
        ``'velocity'``: the network output is v itself. Both are trained with the same
        velocity loss |v - w|^2 (so ``'endpoint'`` weights the end-point error by
        1 / max(1 - t, t_floor)^2). The endpoint form suits an equivariant network: near
        t = 1 an atom next to a symmetric site needs a small displacement, whereas the
        constant straight-line velocity would have to be read off a vanishing asymmetry
        and amplified by 1 / (1 - t). With ``num_steps`` Euler steps the last step lands
        exactly on the predicted end point.
      t_floor: lower bound of 1 - t in the endpoint division (<= 1 / num_steps).
      ot_max_atoms: pair noise and data atoms of the same species optimally (`ot_pair`,
        an exact in-jit assignment, O(A^3) per crystal) when ``max_atoms`` is at most this.
      ot_translation: translate each data crystal to the noise (`align_translation`).
      ot_rounds: alternations of translation alignment and pairing (0 = independent
        coupling, plain flow matching).
      flow_prior: where the flow starts: ``'uniform'`` noise on the torus, or
        ``'learned'``: the `CoordinateGuess` of z plus wrapped Gaussian noise of std
        ``prior_noise`` (fractional). The latent flow of the generative model samples z,
        so the decoder may be (nearly) deterministic; starting from a guess turns the
        flow into an equivariant refinement and avoids registering the structure onto
        uniform noise, which the velocity field learns slowly.
      prior_noise: std of the noise added to the learned prior.
      lambda_guess: weight of the guess loss (min over translations and same-species
        pairings of the squared periodic error) inside ``L_coord``.
      guess_stop_gradient: the guess loss trains the `CoordinateGuess` only, not the
        encoder: the guess reads ``stop_gradient(z)``. On MP-20 the guess cannot place
        20 slot-ordered atoms from z and its loss stays high; measured on the shipped
        mp_20 model (3 batches of 64 validation crystals), its gradient on the encoder's
        z_comp head had norm 100 against the composition loss's 9 and the flow loss's
        0.5, so the composition code was shaped by the guess.
      beta_phys: weight beta of ``L_phys`` (method section 2.5) on the decoder's one-shot
        structure (the `CoordinateGuess` on the true cell and species; needs
        ``flow_prior='learned'`` and a ``phys_fn`` in `autoperi_jax.loss.make_loss_fn`);
        0 = not computed.
      decode_edge_share: share of ``flow_edges_per_crystal`` the velocity field's edge
        list holds when decoding (`make_decode_fn`); a step whose batch overflows it is
        evaluated on the full budget instead (``lax.cond``), so the result is the same.
        The training budget is sized for the densest batches: MP-20 decoding used about
        half of it, and the GNN's cost follows the slots. Training ignores it.
    """

    max_atoms: int = 20
    flow_cutoff: float = 5.0
    flow_max_shift: int = 2
    flow_edges_per_crystal: int = 128
    connect_cutoff: float = 5.0
    connect_max_shift: int = 2
    connect_edges_per_crystal: int = 128
    bond_tolerance: float = 0.25
    num_steps: int = 20
    lambda_lattice: float = 1.0
    lambda_atom: float = 1.0
    lambda_coord: float = 10.0
    lambda_connect: float = 0.1
    kl_weight: float = 1e-3
    z_l2: float = 0.0
    z_noise: float = 0.0
    time_power: float = 1.0
    flow_target: str = "endpoint"
    t_floor: float = 0.05
    ot_max_atoms: int = 64
    ot_translation: bool = True
    ot_rounds: int = 2
    flow_prior: str = "learned"
    prior_noise: float = 0.03
    lambda_guess: float = 1.0
    guess_stop_gradient: bool = False
    beta_phys: float = 0.0
    decode_edge_share: float = 1.0


# --------------------------------------------------------------------------- lattice
def cell_to_y(lattice: Any) -> Any:
    """Unstandardised lattice vector of the canonical (lower-triangular) cell.

    Args:
      lattice: [..., 6] lattice parameters (A, degrees); numpy or jax.

    Returns:
      [..., 6]: log L00, log L11, log L22, L10 / L11, L20 / L22, L21 / L22 of
      ``L = lattice_params_to_cell(lattice)`` (a along x, b in the xy plane).
    """
    xp = jnp if isinstance(lattice, jax.Array) else np
    L = lattice_params_to_cell(lattice)
    d0, d1, d2 = L[..., 0, 0], L[..., 1, 1], L[..., 2, 2]
    d2 = xp.maximum(d2, 1e-6)
    return xp.stack(
        [
            xp.log(d0),
            xp.log(d1),
            xp.log(d2),
            L[..., 1, 0] / d1,
            L[..., 2, 0] / d2,
            L[..., 2, 1] / d2,
        ],
        axis=-1,
    )


def lattice_from_y(y: Array, normalisers: dict[str, Any]) -> Array:
    """Cell from a standardised lattice vector; always a valid right-handed cell.

    Args:
      y: [..., 6] standardised output of the lattice decoder.
      normalisers: ``lattice_mean`` / ``lattice_std`` [6] (`compute_normalisers`).

    Returns:
      [..., 3, 3] lower-triangular cell with positive diagonal (det > 0).
    """
    y = y * jnp.asarray(normalisers["lattice_std"]) + jnp.asarray(normalisers["lattice_mean"])
    # Clip the logs so that an untrained head cannot overflow exp().
    d = jnp.exp(jnp.clip(y[..., :3], -3.0, 5.0))
    zero = jnp.zeros_like(d[..., 0])
    rows = [
        jnp.stack([d[..., 0], zero, zero], -1),
        jnp.stack([y[..., 3] * d[..., 1], d[..., 1], zero], -1),
        jnp.stack([y[..., 4] * d[..., 2], y[..., 5] * d[..., 2], d[..., 2]], -1),
    ]
    return jnp.stack(rows, -2)


def compute_normalisers(graphs: Sequence[Any], min_std: float = 1e-3) -> dict[str, list[float]]:
    """Statistics of the training set needed to decode (saved with checkpoints).

    Args:
      graphs: `autoperi_jax.graph.CrystalGraph` records of the training split.
      min_std: floor of the standard deviations (Perov-5 cells are all cubic, so the
        off-diagonal entries have zero spread).

    Returns:
      JSON-able dict: ``lattice_mean``, ``lattice_std`` [6].
    """
    cells = np.stack([np.asarray(g.cell, np.float64) for g in graphs])
    y = cell_to_y(cell_to_lattice_params(cells))
    return {
        "lattice_mean": y.mean(0).tolist(),
        "lattice_std": np.maximum(y.std(0), min_std).tolist(),
    }


# ---------------------------------------------------------------------------- layouts
class DenseCrystals(NamedTuple):
    """A batch of crystals as dense per-crystal arrays, A atom slots each (`dense_layout`).

    Attributes:
      numbers: [G, A] int32 atomic numbers (0 on empty slots).
      frac: [G, A, 3] fractional coordinates.
      features: [G, A, 3] `autoperi_jax.elements.atom_features` of the species.
      mask: [G, A] bool, the real atoms.
      n_atoms: [G] int32 atoms per crystal (0 for padding graphs).
      cell: [G, 3, 3] cells (rows = lattice vectors).
    """

    numbers: Array
    frac: Array
    features: Array
    mask: Array
    n_atoms: Array
    cell: Array


def dense_layout(graph, max_atoms: int) -> DenseCrystals:
    """Per-crystal dense arrays [G, A] of a padded `jraph.GraphsTuple`.

    A is ``max_atoms``, or the width of ``globals["slot_mask"]`` when the batch has one
    (a bucket of small crystals, `autoperi_jax.graph.PaddingBudget.atom_slots`). Node
    ``n`` of graph ``g`` goes to slot ``n - offset[g]``; the padding graph's nodes and
    slots past A are dropped (the host checks the atom budget).
    """
    nodes = graph.nodes
    n_total = nodes["numbers"].shape[0]
    slot_mask = graph.globals.get("slot_mask")
    A = max_atoms if slot_mask is None else slot_mask.shape[1]
    G = graph.n_node.shape[0]
    node_graph = node_graph_index(graph.n_node, n_total)  # [N]
    offsets = jnp.cumsum(graph.n_node) - graph.n_node  # [G]
    slot = jnp.arange(n_total) - offsets[node_graph]  # [N]
    ok = nodes["mask"] & (slot < A) & graph.globals["mask"][node_graph]
    flat = jnp.where(ok, node_graph * A + slot, G * A)  # out of range -> dropped

    def scatter(x, fill=0):
        out = jnp.full((G * A, *x.shape[1:]), fill, x.dtype)
        return out.at[flat].set(x, mode="drop").reshape(G, A, *x.shape[1:])

    n_atoms = jnp.where(graph.globals["mask"], jnp.minimum(graph.n_node, A), 0)
    return DenseCrystals(
        numbers=scatter(nodes["numbers"]),
        frac=scatter(nodes["frac_coords"]),
        features=scatter(nodes["features"]),
        mask=scatter(ok, False),
        n_atoms=n_atoms.astype(jnp.int32),
        cell=graph.globals["cell"],
    )


def edge_budget(per_crystal: int, atom_slots: int, max_atoms: int) -> int:
    """Candidate-edge slots per crystal for a dense layout of ``atom_slots`` < ``max_atoms``
    slots: ``per_crystal`` scaled by atom_slots / max_atoms (edges grow with the atoms at a
    given density), rounded up to a multiple of 8; ``per_crystal`` itself at full width."""
    if atom_slots >= max_atoms:
        return per_crystal
    return int(-(-per_crystal * atom_slots // (8 * max_atoms)) * 8)


def bond_targets(numbers_i: Array, numbers_j: Array, distances: Array, tolerance: float) -> Array:
    """Covalent-radius bond criterion d < (1 + tol) (r_i + r_j); [E] bool."""
    radius = jnp.asarray(_ATOM_FEATURES[:, 1])
    return distances < (1.0 + tolerance) * (radius[numbers_i] + radius[numbers_j])


# ------------------------------------------------------------------------------ flow
def velocity_inputs(
    numbers: Array,  # [G, A] int
    feats: Array,  # [G, A, 3]
    x: Array,  # [G, A, 3]
    cell: Array,  # [G, 3, 3]
    mask: Array,  # [G, A] bool
    cand: CandidateEdges,
    self_cond: Array | None = None,  # [G * A, 3] Cartesian
) -> VelocityInputs:
    """Dense crystals and their candidate edges as the velocity field's flat inputs."""
    G, A = mask.shape
    return VelocityInputs(
        numbers=numbers.reshape(-1),
        atom_features=feats.reshape(-1, 3),
        frac=x.reshape(-1, 3),
        cell=cell,
        node_graph=jnp.repeat(jnp.arange(G), A),
        node_mask=mask.reshape(-1),
        senders=cand.senders,
        receivers=cand.receivers,
        shifts=cand.shifts,
        edge_mask=cand.mask,
        edge_graph=cand.edge_graph,
        self_cond=self_cond,
    )


def flow_candidates(
    x: Array,  # [G, A, 3] in [0, 1)
    cell: Array,  # [G, 3, 3]
    mask: Array,  # [G, A] bool
    settings: ModelSettings,
    share: float = 1.0,
) -> CandidateEdges:
    """The velocity field's in-jit edge list (`periodic_candidates` within
    ``flow_cutoff``), with ``share`` of the training budget (static)."""
    full = edge_budget(settings.flow_edges_per_crystal, mask.shape[1], settings.max_atoms)
    budget = full if share >= 1.0 else max(8, math.ceil(share * full / 8) * 8)
    return periodic_candidates(
        x, cell, mask, settings.flow_cutoff, settings.flow_max_shift, min(budget, full)
    )


def dense_velocity(
    model: Autoencoder,
    params: Any,
    z: Array,  # [G, D]
    t: Array,  # [G]
    numbers: Array,  # [G, A] int
    feats: Array,  # [G, A, 3]
    x: Array,  # [G, A, 3]
    cell: Array,  # [G, 3, 3]
    mask: Array,  # [G, A] bool
    settings: ModelSettings,
    self_cond: Array | None = None,  # [G, A, 3] fractional displacement to previous x1-hat
    cand: CandidateEdges | None = None,
) -> tuple[Array, CandidateEdges]:
    """The coordinate decoder's velocity field on dense crystals.

    Wraps ``x`` into [0, 1) (so the field is periodic in every atom), builds the in-jit
    periodic graph (`periodic_candidates`) and evaluates `Autoencoder.velocity`, divided
    by max(1 - t, t_floor) for the ``'endpoint'`` parameterisation. With a
    self-conditioned model, ``self_cond`` is the previous end-point prediction minus ``x``
    (zeros when there is none). ``cand``: the edge list of ``wrap_frac(x)`` when the
    caller built it (`flow_candidates`), else the full-budget list is built here.

    Returns:
      fractional velocities [G, A, 3] (mean-free per crystal, 0 on padding) and the
      `CandidateEdges` it used.
    """
    G, A = mask.shape
    x = wrap_frac(x)
    sc = None
    if model.self_condition:
        sc = jnp.zeros_like(x) if self_cond is None else wrap_centered(self_cond)
        sc = jnp.einsum("gai,gij->gaj", sc * mask[..., None], cell).reshape(-1, 3)
    if cand is None:
        cand = flow_candidates(x, cell, mask, settings)
    inputs = velocity_inputs(numbers, feats, x, cell, mask, cand, sc)
    v = model.apply(params, z, t, inputs, method=Autoencoder.velocity)
    v = v.reshape(G, A, 3)
    if settings.flow_target == "endpoint":
        v = v / jnp.maximum(1.0 - t, settings.t_floor)[:, None, None]
    elif settings.flow_target != "velocity":
        raise ValueError(f"flow_target must be 'endpoint' or 'velocity': {settings.flow_target}")
    return v, cand


def per_graph_uniform(key: Array, n_graph: int, shape: tuple[int, ...]) -> Array:
    """[n_graph, *shape] U(0, 1) draws, graph g from ``fold_in(key, g)``: a crystal's
    randomness does not depend on the batch size or padding around it."""
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(n_graph))
    return jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)


def per_graph_normal(key: Array, n_graph: int, shape: tuple[int, ...]) -> Array:
    """As `per_graph_uniform`, standard normal."""
    keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(n_graph))
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def connectivity_logits(
    model: Autoencoder,
    params: Any,
    z: Array,  # [G, D]
    numbers: Array,  # [G, A] int
    frac: Array,  # [G, A, 3]
    cell: Array,  # [G, 3, 3]
    mask: Array,  # [G, A] bool
    settings: ModelSettings,
) -> tuple[Array, CandidateEdges, Array, Array]:
    """Bond logits of every candidate periodic edge within ``connect_cutoff``.

    Returns:
      logits [M], the `CandidateEdges`, and the species of the receiver and the sender
      of each edge [M].
    """
    cand = periodic_candidates(
        frac,
        cell,
        mask,
        settings.connect_cutoff,
        settings.connect_max_shift,
        edge_budget(settings.connect_edges_per_crystal, mask.shape[1], settings.max_atoms),
    )
    flat_numbers = numbers.reshape(-1)
    ni, nj = flat_numbers[cand.receivers], flat_numbers[cand.senders]
    logits = model.apply(
        params, z, ni, nj, cand.distances, cand.edge_graph, method=Autoencoder.connectivity
    )
    return logits, cand, ni, nj


def init_params(model: Autoencoder, batch, settings: ModelSettings, key: Array) -> Any:
    """Initial parameters of ``model`` from an example padded batch (any size)."""
    dense = dense_layout(batch, settings.max_atoms)
    G, A = dense.mask.shape
    cand = periodic_candidates(
        dense.frac,
        dense.cell,
        dense.mask,
        settings.flow_cutoff,
        settings.flow_max_shift,
        settings.flow_edges_per_crystal,
    )
    sc = jnp.zeros((G * A, 3)) if model.self_condition else None
    inputs = velocity_inputs(
        dense.numbers, dense.features, dense.frac, dense.cell, dense.mask, cand, sc
    )
    flat = dense.numbers.reshape(-1)
    connect_args = (flat[cand.receivers], flat[cand.senders], cand.distances, cand.edge_graph)
    t = jnp.zeros((G,))
    return model.init(key, batch, t, inputs, connect_args)


# ---------------------------------------------------------------------------- decode
def make_encode_fn(model: Autoencoder) -> Callable[[Any, Any], Array]:
    """Builds ``encode(params, batch) -> z``: the latent of every crystal of a padded batch.

    Args:
      model: the `Autoencoder`.

    Returns:
      A pure function returning z [G, D] (the posterior mean for ``posterior='gaussian'``;
      rows of padding graphs hold whatever the encoder gives them).
    """

    def encode(params, batch):
        enc = model.apply(params, batch, method=Autoencoder.encode)
        return enc["z_mean"] if model.posterior == "gaussian" else enc["z"]

    return encode


def counts_from_fractions(logits: Array, n_atoms: Array, max_atoms: int) -> Array:
    """Element-fraction logits -> the species-sorted atom list of ``n_atoms`` atoms.

    Largest-remainder rounding of the expected counts n p_e: every element gets
    floor(n p_e) atoms, the atoms left over go to the largest remainders. The counts
    sum to n exactly, and they are the true counts whenever every |n p_e - c_e| < 1/2.
    Element 0 (padding) gets none.

    Args:
      logits: [G, 119] element logits.
      n_atoms: [G] int atom counts (<= max_atoms).
      max_atoms: slots A of the output.

    Returns:
      [G, A] int32 atomic numbers, ascending over the first n_atoms slots, 0 after.
    """
    logits = logits.at[..., 0].set(-jnp.inf)
    n = n_atoms.astype(jnp.float32)
    expected = jax.nn.softmax(logits, -1) * n[:, None]  # [G, 119]
    base = jnp.floor(expected)
    left = n_atoms - jnp.sum(base, -1).astype(jnp.int32)  # [G], 0 <= left < 119
    rank = jnp.argsort(jnp.argsort(-(expected - base), -1), -1)  # 0 = largest remainder
    counts = base.astype(jnp.int32) + (rank < left[:, None]).astype(jnp.int32)
    cum = jnp.cumsum(counts, -1)  # [G, 119]
    slots = jnp.arange(max_atoms)
    numbers = jax.vmap(lambda c: jnp.searchsorted(c, slots, side="right"))(cum)
    return jnp.where(slots[None, :] < n_atoms[:, None], numbers, 0).astype(jnp.int32)


def decode_composition(
    model: Autoencoder, params: Any, z: Array, n_atoms: Array | None = None
) -> tuple[Array, Array]:
    """The decoder's composition of z: most likely atom count, then species per slot.

    Args:
      model, params: the autoencoder.
      z: [G, D] latents.
      n_atoms: [G] counts to decode species for (default: the decoded counts).

    Returns:
      ``n_atoms`` [G] and ``numbers`` [G, A] (atomic numbers, 0 on slots >= n_atoms).
    """
    G = z.shape[0]
    if n_atoms is None:
        count_logits, _ = model.apply(
            params, z, jnp.zeros(G, jnp.int32), method=Autoencoder.decode_composition
        )
        n_atoms = jnp.argmax(count_logits, -1) + 1
    _, species_logits = model.apply(params, z, n_atoms, method=Autoencoder.decode_composition)
    if model.composition_head == "fractions":
        return n_atoms, counts_from_fractions(species_logits, n_atoms, model.max_atoms)
    species_logits = species_logits.at[..., 0].set(-jnp.inf)
    numbers = jnp.argmax(species_logits, -1)
    mask = jnp.arange(numbers.shape[-1])[None, :] < n_atoms[:, None]
    return n_atoms, jnp.where(mask, numbers, 0).astype(jnp.int32)


def make_decode_fn(
    model: Autoencoder, settings: ModelSettings, normalisers: dict[str, Any]
) -> Callable[..., dict[str, Array]]:
    """Builds ``decode(params, z, key, graph_mask=None, cell=None, n_atoms=None,
    numbers=None) -> decoded``: lattice, atom count and species, coordinates
    (``settings.num_steps`` Euler steps of the torus flow from the `CoordinateGuess` of z
    plus noise drawn with ``key``, or uniform noise) and bonds.

    Every step is one velocity evaluation of the decoder GNN, so the number of network
    evaluations per crystal (NFE) is ``settings.num_steps``.

    Args:
      model, settings, normalisers: as in `autoperi_jax.loss.make_loss_fn`.

    Returns:
      A pure, jit-able function. Arguments: ``z`` [G, D]; ``key`` a PRNG key (per-crystal
      noise from ``fold_in(key, g)``); optional ``graph_mask`` [G] bool (False rows decode
      to empty crystals, default all True); optional teacher values for diagnostics:
      ``cell`` [G, 3, 3] (instead of the decoded lattice), ``n_atoms`` [G] and ``numbers``
      [G, A] (species sorted by atomic number, instead of the decoded composition; give
      both). Output dict: ``cell`` [G, 3, 3], ``numbers`` [G, A] (0 on empty slots),
      ``frac`` [G, A, 3], ``mask`` [G, A], ``n_atoms`` [G], ``z`` [G, D], and the decoded
      bonds as one edge list over the batch: ``bond_graph``, ``bond_senders``,
      ``bond_receivers`` (slot indices within the crystal), ``bond_shifts`` k_ij,
      ``bond_mask`` (a candidate edge classified as bonded) [M], and ``overflow``.
    """
    A = settings.max_atoms
    norm = {k: jnp.asarray(v, jnp.float32) for k, v in normalisers.items()}
    feature_table = jnp.asarray(_ATOM_FEATURES)

    def decode(params, z, key, graph_mask=None, cell=None, n_atoms=None, numbers=None):
        G = z.shape[0]
        if graph_mask is None:
            graph_mask = jnp.ones((G,), bool)
        if cell is None:
            cell = lattice_from_y(model.apply(params, z, method=Autoencoder.decode_lattice), norm)
        if n_atoms is None:
            n_atoms, decoded = decode_composition(model, params, z)
            numbers = decoded if numbers is None else numbers
        elif numbers is None:
            numbers = decode_composition(model, params, z, n_atoms)[1]
        mask = (jnp.arange(A)[None, :] < n_atoms[:, None]) & graph_mask[:, None]
        numbers = jnp.where(mask, numbers, 0).astype(jnp.int32)
        feats = feature_table[numbers]
        if settings.flow_prior == "learned":
            guess = model.apply(params, z, numbers, method=Autoencoder.guess_coordinates)
            x = wrap_frac(guess + settings.prior_noise * per_graph_normal(key, G, (A, 3)))
        else:
            x = per_graph_uniform(key, G, (A, 3))
        dt = 1.0 / settings.num_steps

        def velocity(x, t, sc, cand):
            args = (model, params, z, t, numbers, feats, x, cell, mask, settings)
            return dense_velocity(*args, self_cond=sc, cand=cand)[0]

        def decode_velocity(x, t, sc):
            if settings.decode_edge_share >= 1.0:
                return velocity(x, t, sc, None)
            lean = flow_candidates(wrap_frac(x), cell, mask, settings, settings.decode_edge_share)
            return jax.lax.cond(
                lean.overflow,
                lambda c: velocity(x, t, sc, None),  # the full budget
                lambda c: velocity(x, t, sc, c),
                lean,
            )

        def step(carry, k):
            x, x1_hat = carry
            t = jnp.full((G,), k * dt)
            sc = jnp.where(k > 0, x1_hat - x, 0.0)
            v = decode_velocity(x, t, sc)
            x1_hat = x + v * jnp.maximum(1.0 - t, settings.t_floor)[:, None, None]
            return (wrap_frac(x + dt * v), x1_hat), None

        (x, _), _ = jax.lax.scan(step, (x, x), jnp.arange(settings.num_steps))
        x = jnp.where(mask[..., None], x, 0.0)
        logits, cc, _, _ = connectivity_logits(model, params, z, numbers, x, cell, mask, settings)
        bond = (logits > 0) & cc.mask
        return {
            "cell": cell,
            "numbers": numbers,
            "frac": x,
            "mask": mask,
            "n_atoms": jnp.where(graph_mask, n_atoms, 0),
            "z": z,
            "bond_graph": cc.edge_graph,
            "bond_senders": cc.senders % A,
            "bond_receivers": cc.receivers % A,
            "bond_shifts": cc.shifts,
            "bond_mask": bond,
            "overflow": cc.overflow,
        }

    return decode


def make_reconstruct_fn(
    model: Autoencoder,
    settings: ModelSettings,
    normalisers: dict[str, Any],
    teacher_lattice: bool = False,
    teacher_composition: bool = False,
) -> Callable[[Any, Any, Array], dict[str, Array]]:
    """Builds ``reconstruct(params, batch, key) -> decoded``: `make_encode_fn` then
    `make_decode_fn` (lattice, atom count and species, coordinates from the flow drawn with
    ``key``, bonds).

    Args:
      model, settings, normalisers: as in `autoperi_jax.loss.make_loss_fn`.
      teacher_lattice: use the true cell instead of the decoded one (diagnostics).
      teacher_composition: use the true count and species (diagnostics).

    Returns:
      A pure function whose output dict is that of `make_decode_fn` (``z`` is the
      encoder's latent; padding graphs have ``n_atoms`` 0 and empty masks).
    """
    A = settings.max_atoms
    encode = make_encode_fn(model)
    decode = make_decode_fn(model, settings, normalisers)

    def reconstruct(params, batch, key):
        z = encode(params, batch)
        gmask = batch.globals["mask"]
        cell = n_atoms = numbers = None
        if teacher_lattice:
            cell = lattice_params_to_cell(batch.globals["lattice"])
        if teacher_composition:
            dense = dense_layout(batch, A)
            n_atoms = dense.n_atoms
            numbers = jnp.sort(jnp.where(dense.mask, dense.numbers, 1000), axis=1)
        return decode(params, z, key, gmask, cell=cell, n_atoms=n_atoms, numbers=numbers)

    return reconstruct
