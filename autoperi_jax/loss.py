"""The autoencoder's training loss, one pure function per named term.

`make_loss_fn(model, settings, normalisers, phys_fn=None)` returns
``loss_fn(params, batch, key) -> (loss, metrics)``, the weighted sum

    loss = lambda_1 L_lattice + lambda_2 L_atom + lambda_3 L_coord + lambda_4 L_connect
           + regulariser(z) [+ beta_phys L_phys]

of the terms below, each a pure function of the parameters, the latent z and the batch
that returns ``(value, metrics)``. To add a term: write it here beside them, give it a
weight in `autoperi_jax.model.ModelSettings`, and add it to the sum in `make_loss_fn`.

The terms (method section 2.3), every one masked for padding graphs / atoms / edges:

* ``L_lattice``: mean squared error of the standardised lattice vector y (`cell_to_y`);
* ``L_atom``: cross-entropy of the atom count plus the mean cross-entropy of the species
  of every atom slot (atoms sorted by atomic number);
* ``L_coord``: conditional flow matching on the flat torus (Lipman et al., ICLR 2023;
  FlowMM, Miller et al., ICML 2024). The flow starts at x_0, by default the
  `CoordinateGuess` of z plus a little wrapped Gaussian noise (``flow_prior='learned'``;
  ``'uniform'`` noise is the other option). The data x_1 is coupled to x_0 by translating
  it to the nearest translate (`align_translation`) and pairing same-species atoms
  optimally (`ot_pair`): z is translation invariant and identical atoms are
  interchangeable, so every such x_1 is a valid end point. With w = wrap(x_1 - x_0) made
  mean-free, x_t = (x_0 + t w) mod 1 and the target velocity is w:
  ``L_flow = sum_i |v(x_t, t | z) - w_i|^2 / n`` (fractional units). With the learned
  prior ``L_coord = L_flow + lambda_guess L_guess``, L_guess the same coupled squared
  error of the guess itself;
* ``L_connect``: binary cross-entropy of every candidate periodic edge (i, j, k_ij) within
  ``connect_cutoff`` of the true structure against the covalent-radius bond criterion
  ``d_ij < (1 + bond_tolerance) (r_cov(Z_i) + r_cov(Z_j))`` (radii of
  `autoperi_jax.elements`).
* ``L_phys`` (`physics_loss`, ``beta_phys > 0``): the physics losses of
  `autoperi_jax.physics.objective` on the decoder's one-shot structure.

Measured on 32 Perov-5 training crystals after 1000 steps (the same small model;
teacher-forced lattice and composition; StructureMatcher RMSE): uniform prior with
independent coupling 0.236; with the translation / pairing coupling 0.244 (its flow
loss halves, 0.099 -> 0.043, but samples do not improve); that plus self-conditioning
0.236, or plus 5 wider layers (64x0e+32x1o) 0.228; learned prior 0.010. From uniform
noise the velocity field must register the whole structure onto random points early in
the flow, which this network did not learn; starting from the guess turns decoding into
an equivariant refinement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from autoperi_jax.crystal import wrap_frac
from autoperi_jax.model import (
    DenseCrystals,
    ModelSettings,
    bond_targets,
    cell_to_y,
    connectivity_logits,
    counts_from_fractions,
    dense_layout,
    dense_velocity,
    lattice_from_y,
    per_graph_normal,
    per_graph_uniform,
)
from autoperi_jax.nn.autoencoder import Autoencoder
from autoperi_jax.torus import couple, flow_path, sort_by_species, wrap_centered

__all__ = [
    "composition_loss",
    "connectivity_loss",
    "coordinate_loss",
    "latent_sample",
    "lattice_loss",
    "make_loss_fn",
    "physics_loss",
]

Array = jnp.ndarray
Metrics = dict[str, Array]
PhysFn = Callable[..., dict[str, Array]]


def _masked_mean(x: Array, mask: Array) -> Array:
    m = mask.astype(x.dtype)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _graph_mean(x: Array, gm: Array) -> Array:
    """Mean of a per-crystal value [G] over the real crystals (``gm`` [G] float mask)."""
    return jnp.sum(x * gm) / jnp.maximum(jnp.sum(gm), 1.0)


def latent_sample(
    model: Autoencoder,
    enc: dict[str, Array],
    settings: ModelSettings,
    key: Array,
    gm: Array,  # [G] float
) -> tuple[Array, Array, Metrics]:
    """The training latent z [G, D] and its regulariser.

    Gaussian posterior: z = mu + sigma eps (reparameterised), regulariser
    ``kl_weight * KL(q || N(0, I))``. Deterministic: z (plus ``z_noise`` Gaussian noise),
    regulariser ``z_l2 * |z|^2``.
    """
    if model.posterior == "gaussian":
        mu, logvar = enc["z_mean"], enc["z_logvar"]
        eps = per_graph_normal(key, mu.shape[0], mu.shape[1:])
        z = mu + jnp.exp(0.5 * logvar) * eps
        kl = _graph_mean(0.5 * jnp.sum(jnp.exp(logvar) + mu**2 - 1.0 - logvar, -1), gm)
        return z, settings.kl_weight * kl, {"kl": kl}
    z = enc["z"]
    z_sq = _graph_mean(jnp.sum(z**2, -1), gm)
    if settings.z_noise > 0:
        z = z + settings.z_noise * per_graph_normal(key, z.shape[0], z.shape[1:])
    return z, settings.z_l2 * z_sq, {"z_sq": z_sq}


def lattice_loss(
    model: Autoencoder,
    params: Any,
    z: Array,  # [G, D]
    lattice: Array,  # [G, 6] true lattice parameters (A, degrees)
    gm: Array,  # [G] float
    normalisers: dict[str, Array],
) -> tuple[Array, Metrics]:
    """``L_lattice``: mean squared error of the standardised lattice vector y; also the
    mean absolute error of the decoded lengths a, b, c (A)."""
    mean, std = normalisers["lattice_mean"], normalisers["lattice_std"]
    y_true = (cell_to_y(lattice) - mean) / std  # [G, 6]
    y_pred = model.apply(params, z, method=Autoencoder.decode_lattice)
    loss = _graph_mean(jnp.mean((y_pred - y_true) ** 2, -1), gm)
    len_pred = jnp.linalg.norm(lattice_from_y(y_pred, normalisers), axis=-1)
    mae = _graph_mean(jnp.mean(jnp.abs(len_pred - lattice[:, :3]), -1), gm)
    return loss, {"lattice_mae_A": mae}


def composition_loss(
    model: Autoencoder,
    params: Any,
    z: Array,  # [G, D]
    dense: DenseCrystals,
    gmask: Array,  # [G] bool
) -> tuple[Array, Metrics]:
    """``L_atom``: cross-entropy of the atom count plus the mean cross-entropy of the
    species of every atom (``l_count`` + ``l_species``): per slot of the atoms sorted by
    atomic number (``composition_head='slots'``) or under the predicted element
    fractions (``'fractions'``). The dense layout may be narrower than the decoder (an
    atom-count bucket): the species of its A slots are scored, the count over all
    ``model.max_atoms`` classes. Metrics: ``count_acc``, ``species_acc`` (slots of the
    decoded sorted list given the true count) and ``composition_acc`` (all of them)."""
    A = dense.mask.shape[1]
    gm = gmask.astype(jnp.float32)
    count_logits, species_logits = model.apply(
        params, z, dense.n_atoms, method=Autoencoder.decode_composition
    )
    count_target = jnp.clip(dense.n_atoms - 1, 0, count_logits.shape[-1] - 1)
    count_lp = jax.nn.log_softmax(count_logits)
    l_count = _graph_mean(-jnp.take_along_axis(count_lp, count_target[:, None], 1)[:, 0], gm)
    sorted_numbers = jnp.sort(jnp.where(dense.mask, dense.numbers, 1000), axis=1)
    slot_mask = (jnp.arange(A)[None, :] < dense.n_atoms[:, None]) & gmask[:, None]
    sorted_numbers = jnp.where(slot_mask, sorted_numbers, 0)
    if model.composition_head == "fractions":
        sp_lp = jax.nn.log_softmax(species_logits)  # [G, 119]
        sp_nll = -jnp.take_along_axis(sp_lp, sorted_numbers, -1)  # [G, A]
        decoded = counts_from_fractions(species_logits, dense.n_atoms, A)
    else:
        species_logits = species_logits[:, :A]  # [G, A, 119]
        sp_lp = jax.nn.log_softmax(species_logits)
        sp_nll = -jnp.take_along_axis(sp_lp, sorted_numbers[..., None], -1)[..., 0]
        decoded = jnp.argmax(species_logits, -1)
    l_species = _masked_mean(sp_nll, slot_mask)
    hit = (decoded == sorted_numbers) | ~slot_mask  # [G, A]
    return l_count + l_species, {
        "l_count": l_count,
        "l_species": l_species,
        "count_acc": _graph_mean(jnp.argmax(count_logits, -1) == count_target, gm),
        "species_acc": _masked_mean(hit.astype(jnp.float32), slot_mask),
        "composition_acc": _graph_mean(jnp.all(hit, -1), gm),
    }


def coordinate_loss(
    model: Autoencoder,
    params: Any,
    z: Array,  # [G, D]
    dense: DenseCrystals,  # species-sorted for the learned prior (`sort_by_species`)
    gm: Array,  # [G] float
    settings: ModelSettings,
    keys: tuple[Array, Array, Array],
) -> tuple[Array, Metrics, Array | None]:
    """``L_coord``: conditional flow matching on the torus, plus ``lambda_guess`` times
    the coupled error of the `CoordinateGuess` for the learned prior.

    Args:
      keys: PRNG keys of the flow times, of the prior noise and of the self-conditioning
        coin.

    Returns:
      the loss, its metrics (``l_flow``, ``l_guess``, ``flow_overflow``, ``flow_edges``)
      and the guess [G, A, 3] (None for the uniform prior), for `physics_loss`.
    """
    k_t, k_x0, k_sc = keys
    G, A = dense.mask.shape
    A_max = settings.max_atoms  # noise is drawn for every slot, so a bucket changes nothing
    amask = dense.mask
    metrics: Metrics = {}
    t = per_graph_uniform(k_t, G, ()) ** settings.time_power
    guess = None
    if settings.flow_prior == "learned":
        numbers = jnp.pad(dense.numbers, ((0, 0), (0, A_max - A)))
        z_guess = jax.lax.stop_gradient(z) if settings.guess_stop_gradient else z
        guess = model.apply(params, z_guess, numbers, method=Autoencoder.guess_coordinates)
        guess = guess[:, :A]  # [G, A, 3]
        x1g = couple(
            jax.lax.stop_gradient(guess), dense.frac, dense.numbers, amask, dense.cell, settings
        )
        metrics["l_guess"] = _masked_mean(jnp.sum(wrap_centered(guess - x1g) ** 2, -1), amask)
        noise = settings.prior_noise * per_graph_normal(k_x0, G, (A_max, 3))[:, :A]
        x0 = wrap_frac(jax.lax.stop_gradient(guess) + noise)
    elif settings.flow_prior == "uniform":
        x0 = per_graph_uniform(k_x0, G, (A_max, 3))[:, :A]
    else:
        raise ValueError(f"flow_prior must be 'uniform' or 'learned': {settings.flow_prior}")
    x1 = couple(x0, dense.frac, dense.numbers, amask, dense.cell, settings)
    xt, target = flow_path(x0, x1, t, amask)

    def vel(self_cond):
        return dense_velocity(
            model, params, z, t, dense.numbers, dense.features, xt, dense.cell, amask,
            settings, self_cond=self_cond,
        )  # fmt: skip

    self_cond = None
    if model.self_condition:
        # Half of the batches: a first pass without self-conditioning gives the
        # (gradient-stopped) end-point estimate the second pass is conditioned on.
        floor = jnp.maximum(1.0 - t, settings.t_floor)[:, None, None]
        self_cond = jax.lax.cond(
            jax.random.bernoulli(k_sc),
            lambda: jax.lax.stop_gradient(vel(None)[0] * floor),
            lambda: jnp.zeros_like(xt),
        )
    v, cand = vel(self_cond)
    loss = metrics["l_flow"] = _masked_mean(jnp.sum((v - target) ** 2, -1), amask)
    if guess is not None:
        loss = loss + settings.lambda_guess * metrics["l_guess"]
    metrics["flow_overflow"] = cand.overflow.astype(jnp.float32)
    metrics["flow_edges"] = _graph_mean(cand.num_edges, gm)
    return loss, metrics, guess


def connectivity_loss(
    model: Autoencoder,
    params: Any,
    z: Array,  # [G, D]
    dense: DenseCrystals,
    settings: ModelSettings,
) -> tuple[Array, Metrics]:
    """``L_connect``: binary cross-entropy of every candidate edge of the true structure
    against the covalent-radius bond criterion (`autoperi_jax.model.bond_targets`)."""
    logits, cc, ni, nj = connectivity_logits(
        model, params, z, dense.numbers, dense.frac, dense.cell, dense.mask, settings
    )
    bonded = bond_targets(ni, nj, cc.distances, settings.bond_tolerance)
    y = bonded.astype(jnp.float32)
    bce = jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    acc = _masked_mean(((logits > 0) == bonded).astype(jnp.float32), cc.mask)
    return _masked_mean(bce, cc.mask), {"connect_acc": acc}


def physics_loss(
    phys_fn: PhysFn,
    dense: DenseCrystals,  # species-sorted, as for `coordinate_loss`
    guess: Array,  # [G, A, 3] the one-shot decoded coordinates (with gradients)
    gm: Array,  # [G] float
) -> tuple[Array, Metrics]:
    """``L_phys``: the mean ``total`` of ``phys_fn`` over the real crystals, on the true
    cell and species with the decoder's guessed coordinates; each part is logged as
    ``l_phys_PART``."""
    phys = phys_fn(dense.cell, guess, dense.numbers, dense.mask, dense.frac)
    metrics = {
        ("l_phys" if k == "total" else f"l_phys_{k}"): _graph_mean(v, gm) for k, v in phys.items()
    }
    return metrics["l_phys"], metrics


def make_loss_fn(
    model: Autoencoder,
    settings: ModelSettings,
    normalisers: dict[str, Any],
    phys_fn: PhysFn | None = None,
) -> Callable[[Any, Any, Array], tuple[Array, Metrics]]:
    """Builds the training loss.

    Args:
      model: the `Autoencoder` (its ``max_atoms`` must equal ``settings.max_atoms``).
      settings: `ModelSettings` (the weights and the flow-matching options).
      normalisers: `autoperi_jax.model.compute_normalisers` of the training set.
      phys_fn: ``phys_fn(cell [G, 3, 3], frac [G, A, 3], numbers [G, A], mask [G, A],
        ref_frac [G, A, 3]) -> {"total": [G], part: [G], ...}``, the physics losses of
        each decoded structure (``ref_frac``: the true coordinates, for references;
        `autoperi_jax.physics.objective.make_objective_fn`); used when
        ``settings.beta_phys > 0``.

    Returns:
      ``loss_fn(params, batch, key) -> (loss, metrics)``: pure, jit-able; ``batch`` is a
      padded `jraph.GraphsTuple`, ``key`` a PRNG key (flow times, noise, posterior
      samples). ``metrics`` holds every loss term and accuracies, averaged over real
      graphs / atoms / edges.
    """
    if model.max_atoms != settings.max_atoms:
        raise ValueError(f"model.max_atoms={model.max_atoms} != settings {settings.max_atoms}")
    if settings.beta_phys > 0 and (phys_fn is None or settings.flow_prior != "learned"):
        raise ValueError("beta_phys > 0 needs a phys_fn and flow_prior='learned'")
    norm = {k: jnp.asarray(normalisers[k], jnp.float32) for k in ("lattice_mean", "lattice_std")}

    def loss_fn(params, batch, key):
        k_post, k_t, k_x0, k_sc = jax.random.split(key, 4)
        gmask = batch.globals["mask"]  # [G]
        gm = gmask.astype(jnp.float32)
        enc = model.apply(params, batch, method=Autoencoder.encode)
        z, reg, metrics = latent_sample(model, enc, settings, k_post, gm)
        l_lattice, m = lattice_loss(model, params, z, batch.globals["lattice"], gm, norm)
        metrics.update(m)
        dense = dense_layout(batch, settings.max_atoms)
        l_atom, m = composition_loss(model, params, z, dense, gmask)
        metrics.update(m)
        if settings.flow_prior == "learned":
            dense = sort_by_species(dense)  # the composition decoder's slot order
        l_coord, m, guess = coordinate_loss(
            model, params, z, dense, gm, settings, (k_t, k_x0, k_sc)
        )
        metrics.update(m)
        l_connect, m = connectivity_loss(model, params, z, dense, settings)
        metrics.update(m)
        loss = (
            settings.lambda_lattice * l_lattice
            + settings.lambda_atom * l_atom
            + settings.lambda_coord * l_coord
            + settings.lambda_connect * l_connect
            + reg
        )
        if settings.beta_phys > 0:
            l_phys, m = physics_loss(phys_fn, dense, guess, gm)
            metrics.update(m)
            loss = loss + settings.beta_phys * l_phys
        metrics.update(
            loss=loss, l_lattice=l_lattice, l_atom=l_atom, l_coord=l_coord, l_connect=l_connect
        )
        return loss, metrics

    return loss_fn
