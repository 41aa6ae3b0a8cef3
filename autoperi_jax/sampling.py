"""The jitted sample function: latent flow -> decoder -> symmetry -> physical constraint.

Method section 2.4 end to end, as one pure function of ``(params, key)`` with static
shapes and no host callbacks (jax-md style factory)::

    sample = make_sample_fn(model, settings, normalisers, flow_config, cond_names,
                            pred_names)
    out = jax.jit(sample, static_argnums=2)(params, key, 256,
                                            conditions={"heat_ref": 0.5}, spacegroup=221)

Pipeline for a batch of ``n`` crystals (every step batched, shapes fixed by ``n`` and the
decoder's ``max_atoms`` A):

0. with ``SamplerSettings.spacegroup_prior`` and neither a group nor a property
   requested, a group is drawn per crystal from the training distribution of groups
   and treated as requested below (p(x) = sum_g p(g) p(x | g));
1. base noise ``u ~ N(0, T^2 I)`` (temperature T: ``SamplerSettings.temperature``, or
   ``conditioned_temperature`` with a requested property or group) -> `ConditionalRealNVP`
   forward ``z_std = f(u | c)`` with the context c built from the conditions: every
   property given in ``conditions`` (physical units) is standardised with the training
   mean / std of the flow stage; a property not given takes the flow's learned null
   embedding, so ``conditions=None`` samples the marginal p(z); ``spacegroup`` (an int or
   [n] ints, 1..230) is the flow's space-group label, 0 = any;
2. de-standardise, ``z = z_std * z_std_stat + z_mean`` (`autoperi_jax.model` z layout);
3. decode (`autoperi_jax.model.make_decode_fn`): lattice, count, species, coordinates by
   ``num_steps`` Euler steps of the torus flow from the learned guess (NFE = num_steps);
   with ``SamplerSettings.composition_check`` a candidate whose composition is not
   charge balanced (`autoperi_jax.physics.composition_valid`) or, with a group, whose
   symmetrisation failed is rejected: unconditioned sampling draws
   ``n (1 + spare_fraction)`` i.i.d. candidates and keeps the first n accepted,
   conditioned sampling ``1 + retries`` candidates per crystal and keeps each one's
   first accepted. Without a group the composition is checked before the coordinates
   are decoded, so only chosen candidates pay for the decoder GNN;
4. if ``spacegroup`` is given: `autoperi_jax.symmetry.symmetrize` projects cell and atoms
   onto the group's operations (vmapped; ``spacegroup`` may be traced). A structure
   invariant under the group's operations has that group or a supergroup of it; the
   projection fails when the decoded composition or arrangement has no match in the
   group; the asymmetry left in the result detects that (what a second projection would
   measure: a symmetric structure is its fixed point) and such a crystal keeps its
   decoded structure (``SamplerSettings.symmetry_*``); for
   a group without inversion, a result with an inversion centre within
   ``inversion_tolerance`` (a centrosymmetric supergroup at spglib's tolerance) is
   rejected too;
5. the constraint layer `autoperi_jax.physics.repulsive_constraint`: a fixed number of
   gradient steps on a soft-sphere overlap energy so that no two atoms (over all periodic
   images) sit closer than ``fraction * (r_cov_i + r_cov_j)``. The energy is invariant
   under the crystal's symmetry operations, so its gradient steps keep a symmetrised
   structure symmetric;
6. properties predicted from z by the flow stage's `PropertyHead` (an MLP on the
   encoder's standardised latent, trained by ``autoperi train-flow``), in physical units.

``params`` is one pytree: ``{"autoencoder", "flow", "predictor", "stats"}`` where
``stats`` holds ``z_mean``, ``z_std`` [D], ``cond_mean``, ``cond_std`` [P],
``pred_mean``, ``pred_std`` [Q] and ``spacegroup_prior`` [231] (training share of each
space-group label) (`autoperi_jax.api.load` assembles it from a run).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from autoperi_jax.flow import FlowConfig, FlowContext, make_flow
from autoperi_jax.model import ModelSettings, decode_composition, make_decode_fn
from autoperi_jax.nn.autoencoder import Autoencoder
from autoperi_jax.symmetry import (
    centrosymmetric_groups,
    group_mask,
    has_inversion_centre,
    symmetrize,
)

__all__ = [
    "PropertyHead",
    "SamplerSettings",
    "decoding_settings",
    "draws_spacegroups",
    "make_predict_fn",
    "make_sample_fn",
]

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Static settings of `make_sample_fn`.

    Attributes:
      temperature: default T of the base noise (a traced argument of ``sample`` may
        override it).
      conditioned_temperature: default T when a property or a space group is requested
        (None = ``temperature``). The shipped Perov-5 model draws unconditioned samples
        at T = 1.1 (its flow under-samples the edge of the latent distribution) and
        conditioned ones at 1.0, which lands closer to property targets and requested
        groups (`train/configs/flow_perov_5.py`).
      num_steps: Euler steps of the coordinate decoder (NFE per crystal); None keeps the
        autoencoder's ``ModelSettings.num_steps``.
      prior_noise: std (fractional) of the noise around the coordinate guess where the
        decoding flow starts; None keeps the autoencoder's ``ModelSettings.prior_noise``
        (its training value), 0 decodes each z deterministically.
      decode_edge_share: share of the training edge budget in the decoder's edge list
        (`autoperi_jax.model.ModelSettings.decode_edge_share`: a step that overflows it
        runs on the full budget, so samples do not depend on it; 0.6 halves the decoder's
        time on MP-20).
      constraint_steps: gradient steps of the repulsive constraint layer (0 = off).
      constraint_step_size: its step size (A^2/eV; 0.5 resolves an isolated pair in one).
      constraint_fraction: minimum distance as a fraction of the covalent-radius sum
        (`autoperi_jax.physics.covalent_soft_sphere`).
      n_images: static image stencil of the constraint layer; (2, 2, 2) covers the
        largest soft-sphere diameter (2.9 A) for cell heights down to 1.5 A.
      constraint_max_neighbors: edge slots per atom slot in the constraint layer's
        neighbour list (`autoperi_jax.physics.batched_repulsive_constraint`: one list of
        the batch, built at the start; a crystal that lost edges to a full list, or whose
        atoms moved far enough that an unlisted pair could touch, is redone on the dense
        stencil, so the result is the dense layer's).
      symmetrize_iter: matching + averaging rounds of `autoperi_jax.symmetry.symmetrize`.
      symmetry_setting: ``"conventional"`` or ``"primitive"`` cells (`symmetrize`).
      guidance: w of latent guidance: z = f(u | null) + w (f(u | c) - f(u | null)) with
        the same base noise u (the flow-map analogue of classifier-free guidance, Ho &
        Salimans 2022); 1 = the conditional flow itself (no second pass), w > 1 pushes
        samples further towards the conditions. ``log_prob`` stays that of f(u | c).
      composition_check: a candidate is accepted only if its decoded composition passes
        the charge-neutrality + electronegativity rule the field evaluates with
        (`autoperi_jax.physics.composition_valid`, SMACT 2.2.1 data as in CDVAE), checked
        on the composition before the coordinates are decoded.
      screen_compositions: unconditioned sampling with the composition check, where
        candidates are decoded (the contact check or the space-group prior): the flow and
        composition head propose twice the pool and the decoder gets the first ones (in
        draw order) whose composition passes, instead of the first proposals, so no
        decoder time goes to candidates the check rejects and fewer slots fall back to
        rejected ones. False: the pool as proposed (how the shipped Perov-5 numbers were
        sampled; its bundle keeps it).
      retries: conditioned sampling (a property or a space group requested): extra
        candidates per crystal, ``1 + retries`` with the crystal's own conditions; the
        first one the checks accept (the composition check, and the symmetry layer with
        a group) is kept, else candidate 0. The decoder's composition sometimes has no
        arrangement in the group (three anions that are not all alike cannot fill
        Pm-3m's 3c orbit), or is not charge balanced. With a group every candidate is
        decoded and symmetrised (``1 + retries`` times the cost); without one only the
        flow and the composition head run per candidate.
      spare_fraction: unconditioned sampling: ``ceil(spare_fraction * n)`` extra i.i.d.
        candidates (each with its own group from the prior); the first n accepted ones in
        draw order are returned (rejection sampling; if fewer than n pass, rejected ones
        fill the rest). Costs ``1 + spare_fraction`` times a plain draw where candidates
        are decoded (with the prior or the contact check; see ``screen_compositions``);
        otherwise only the flow and the composition head run for the spares.
      accept_min_ratio: reject a candidate whose closest pair of atoms (after the
        constraint layer, over all periodic images) is closer than this fraction of the
        sum of their covalent radii (0 = no check). Perov-5: the smallest value over
        2,000 validation crystals is 0.68. Every candidate is then decoded.
      inversion_tolerance: with a requested (or drawn) group that has no inversion (e.g.
        99 P4mm, 25 Pmm2), reject a candidate that has an inversion centre within this
        tolerance (A; `autoperi_jax.symmetry.has_inversion_centre`): its polar distortion
        is too small, and spglib (symprec of the same size) would report a
        centrosymmetric supergroup (P4/mmm for P4mm). 0 = off.
      spacegroup_prior: when neither a space group nor a property condition is given,
        draw a group per crystal from the training distribution of groups
        (``stats["spacegroup_prior"]`` [231], written by the flow stage) and sample as if
        it had been requested: p(x) = sum_g p(g) p(x | g), with the symmetry layer
        applied. Off, or with property conditions (p(g | property) is not modelled): the
        flow's null label and no symmetrisation.
      symmetry_max_residual: largest residual (A: atom / lattice moves plus leftover
        asymmetry) of an accepted symmetrisation (the shipped Perov-5 model uses 0.2:
        candidates that needed larger moves were the ones far from every test structure).
      symmetry_tolerance: the symmetrised structure is symmetric if the asymmetry left in
        it (A: the largest distance from an image of an atom under the group to the
        nearest atom of its species; a second projection's residual measures the same, a
        symmetric structure being its fixed point) is below this. A crystal failing
        either test (e.g. a composition with no
        arrangement in the group: three different anions cannot fill the 3c orbit of
        Pm-3m) keeps its unsymmetrised decoded structure rather than a mangled one, and
        ``symmetrized`` is False for it.
      symmetry_min_distance: also keep the decoded structure when the symmetrised one has
        two atoms closer than this (A; the projection merged them: 10 of 10,000 Perov-5
        samples were structurally invalid without this check).
    """

    temperature: float = 1.0
    conditioned_temperature: float | None = None
    num_steps: int | None = None
    prior_noise: float | None = None
    decode_edge_share: float = 0.6
    constraint_steps: int = 20
    constraint_step_size: float = 0.4
    constraint_fraction: float = 0.6
    n_images: tuple[int, int, int] = (2, 2, 2)
    constraint_max_neighbors: int = 32
    symmetrize_iter: int = 3
    symmetry_setting: str = "conventional"
    symmetry_max_residual: float = 1.0
    symmetry_tolerance: float = 0.02
    symmetry_min_distance: float = 0.5
    spacegroup_prior: bool = False
    guidance: float = 1.0
    composition_check: bool = True
    screen_compositions: bool = True
    retries: int = 1
    spare_fraction: float = 0.25
    accept_min_ratio: float = 0.0
    inversion_tolerance: float = 0.1

    def __post_init__(self):
        for name in ("retries", "spare_fraction", "accept_min_ratio", "inversion_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"SamplerSettings.{name} must be >= 0 (0 turns it off), got "
                    f"{getattr(self, name)!r}"
                )
        if not 0.0 < self.decode_edge_share <= 1.0:
            raise ValueError(
                f"SamplerSettings.decode_edge_share must be in (0, 1], got "
                f"{self.decode_edge_share!r}"
            )
        if self.constraint_max_neighbors < 1:
            raise ValueError(
                "SamplerSettings.constraint_max_neighbors must be >= 1, got "
                f"{self.constraint_max_neighbors!r}"
            )


class PropertyHead(nn.Module):
    """Property regression head on the encoder's latent (same encoder + this head).

    ``y = MLP(z_std)``: Dense-silu layers, then a linear output of ``n_out`` standardised
    property values (targets standardised with the training mean / std).

    Attributes:
      hidden: hidden widths.
      n_out: number of properties.
    """

    hidden: tuple[int, ...]
    n_out: int

    @nn.compact
    def __call__(self, z_std: Array) -> Array:
        """z_std [B, D] standardised latents -> [B, n_out] standardised properties."""
        x = z_std
        for i, h in enumerate(self.hidden):
            x = nn.silu(nn.Dense(h, name=f"dense_{i}")(x))
        return nn.Dense(self.n_out, name="out")(x)


def make_predict_fn(
    head: PropertyHead, names: Sequence[str]
) -> Callable[[Any, Array, Any], dict[str, Array]]:
    """``predict(params_head, z [B, D], stats) -> {name: [B]}`` in physical units, with
    ``stats`` holding ``z_mean``, ``z_std`` [D], ``pred_mean``, ``pred_std`` [Q]."""
    names = tuple(names)

    def predict(params_head, z, stats):
        z_std = (z - stats["z_mean"]) / stats["z_std"]
        y = head.apply(params_head, z_std) * stats["pred_std"] + stats["pred_mean"]
        return {k: y[:, i] for i, k in enumerate(names)}

    return predict


def _context(
    n: int,
    conditions: Mapping[str, Any] | None,
    spacegroup: Any,
    cond_names: Sequence[str],
    stats: Mapping[str, Array],
    flow_config: FlowConfig,
    composition: Array | None = None,
) -> FlowContext | None:
    """Flow context of a batch: standardised given properties, null token elsewhere;
    the composition [n, A] for a structure-prediction flow."""
    if not flow_config.conditional:
        return None
    props = present = sg = None
    if flow_config.n_props:
        cols, pres = [], []
        conditions = dict(conditions or {})
        unknown = sorted(set(conditions) - set(cond_names))
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; the flow knows {list(cond_names)}")
        for i, name in enumerate(cond_names):
            if name in conditions:
                v = jnp.broadcast_to(jnp.asarray(conditions[name], jnp.float32), (n,))
                ok = jnp.isfinite(v)
                v = (jnp.where(ok, v, 0.0) - stats["cond_mean"][i]) / stats["cond_std"][i]
            else:
                v, ok = jnp.zeros((n,), jnp.float32), jnp.zeros((n,), bool)
            cols.append(v)
            pres.append(ok)
        props, present = jnp.stack(cols, -1), jnp.stack(pres, -1)  # [n, P]
    if flow_config.use_spacegroup and spacegroup is not None:
        sg = jnp.broadcast_to(jnp.asarray(spacegroup, jnp.int32), (n,))
    return FlowContext(props, present, sg, composition if flow_config.use_composition else None)


def decoding_settings(settings: ModelSettings, sampler: SamplerSettings) -> ModelSettings:
    """The autoencoder's `ModelSettings` with the sampler's decoding overrides
    (``num_steps``, ``prior_noise`` where they are set, ``decode_edge_share``)."""
    settings = dataclasses.replace(settings, decode_edge_share=float(sampler.decode_edge_share))
    if sampler.num_steps is not None:
        settings = dataclasses.replace(settings, num_steps=int(sampler.num_steps))
    if sampler.prior_noise is not None:
        settings = dataclasses.replace(settings, prior_noise=float(sampler.prior_noise))
    return settings


def draws_spacegroups(sampler: SamplerSettings, flow_config: FlowConfig) -> bool:
    """Whether unconditioned sampling draws a space group per crystal from the training
    prior and symmetrises onto it (then every candidate is decoded, as when the contact
    check runs: acceptance is known only after the decoder)."""
    return bool(sampler.spacegroup_prior and flow_config.use_spacegroup)


def make_sample_fn(
    model: Autoencoder,
    settings: ModelSettings,
    normalisers: dict[str, Any],
    flow_config: FlowConfig,
    cond_names: Sequence[str] = (),
    pred_names: Sequence[str] = (),
    predictor_hidden: tuple[int, ...] = (256, 256),
    sampler: SamplerSettings = SamplerSettings(),
    prior_groups: Sequence[int] | None = None,
) -> Callable[..., dict[str, Any]]:
    """Builds the pure ``sample(params, key, n, conditions=None, spacegroup=None,
    temperature=None)`` (module docstring). Jit it with ``n`` static (argnum 2).

    Args:
      model: the autoencoder (`autoperi_jax.nn.Autoencoder`).
      settings: its `ModelSettings` (``num_steps`` replaced by ``sampler.num_steps`` if set).
      normalisers: lattice normalisers of the autoencoder run.
      flow_config: settings of the latent flow (``dim`` = size of z).
      cond_names: the flow's condition properties, in the order of its context.
      pred_names: the properties of the `PropertyHead` (empty: no prediction).
      predictor_hidden: hidden widths of that head.
      sampler: `SamplerSettings`.
      prior_groups: the groups the space-group prior can draw (those with a non-zero
        ``stats["spacegroup_prior"]``; `autoperi_jax.api.load` passes them). Draws are
        restricted to them and the symmetry layer of prior draws cuts its operations table
        to them (`autoperi_jax.symmetry.table_bounds`: the same result, ~3x cheaper for
        Perov-5's groups). None = any group (the full table).

    Returns:
      ``sample`` whose arguments are ``params`` (module docstring), ``key``, ``n``
      (static), ``conditions`` (dict name -> scalar or [n] values in physical units; NaN
      or a missing name = unconditioned on it), ``spacegroup`` (None, or an int / [n]
      ints in 1..230, 0 = none for that sample) and ``temperature`` (None = the sampler's:
      ``conditioned_temperature`` when a property or a group is requested and it is set,
      else ``temperature``).
      Its output dict holds ``cell`` [n, 3, 3], ``frac`` [n, A, 3] (0 on empty slots),
      ``numbers`` [n, A] (0 on empty slots), ``mask`` [n, A] (slot a < n_atoms),
      ``n_atoms`` [n], ``z`` [n, D], ``log_prob`` [n] (flow log-density of the
      standardised z), ``symmetry_residual`` [n] (A; 0 without a space group),
      ``symmetrized`` [n] (False where the symmetrisation failed and the decoded structure
      was kept), ``composition_valid`` [n] (the composition check; all True when it is
      off), ``geometry_ok`` [n] (the contact check), ``inversion_ok`` [n] (False: a group
      without inversion was requested and the result has an inversion centre),
      ``spacegroup`` [n] (requested label, 0 = none) and ``properties`` {name: [n]}.
    """
    # lazy: jax-md computes at import (7.5 s); the Generator API loads without it
    from autoperi_jax.physics import (
        batched_min_distance_ratio,
        batched_repulsive_constraint,
        composition_valid,
        covalent_soft_sphere,
        min_distance,
    )

    settings = decoding_settings(settings, sampler)
    flow = make_flow(flow_config)
    decode = make_decode_fn(model, settings, normalisers)
    cond_names = tuple(cond_names)
    if len(cond_names) != flow_config.n_props:
        raise ValueError(
            f"{len(cond_names)} condition names for a flow with n_props={flow_config.n_props}"
        )
    predict = make_predict_fn(PropertyHead(tuple(predictor_hidden), len(pred_names)), pred_names)
    potential = covalent_soft_sphere(fraction=sampler.constraint_fraction)
    contact = covalent_soft_sphere(fraction=1.0)  # d_ij = r_cov_i + r_cov_j
    centro_table = centrosymmetric_groups(sampler.symmetry_setting)  # [231] bool
    n_images = tuple(int(v) for v in sampler.n_images)

    def constrain(cell, frac, numbers, mask):  # [n, 3, 3], [n, A, 3], [n, A], [n, A]
        return batched_repulsive_constraint(
            cell,
            frac,
            numbers,
            mask,
            n_images=n_images,
            n_steps=sampler.constraint_steps,
            step_size=sampler.constraint_step_size,
            potential=potential,
            max_neighbors=sampler.constraint_max_neighbors,
        )

    if prior_groups is not None:
        prior_groups = tuple(sorted({int(g) for g in prior_groups}))
        in_prior = jnp.asarray(group_mask(prior_groups))  # [231]

    def sym(cell, frac, numbers, mask, sg, groups):
        return symmetrize(
            cell,
            frac,
            numbers,
            mask,
            sg,
            n_iter=sampler.symmetrize_iter,
            setting=sampler.symmetry_setting,
            groups=groups,
            return_asymmetry=True,
        )

    def propose(params, key, n, conditions, spacegroup, temperature, composition=None):
        """Flow -> z and the decoder's composition of z for n crystals (cheap: no GNN);
        a structure-prediction flow keeps the given ``composition`` [n, A] instead."""
        stats = params["stats"]
        ctx = _context(n, conditions, spacegroup, cond_names, stats, flow_config, composition)
        temp = sampler.temperature if temperature is None else temperature
        z_std, log_prob = flow.sample(params["flow"], key, n, ctx, temp)  # [n, D], [n]
        if sampler.guidance != 1.0 and ctx is not None:
            # the same base noise through the unconditioned flow (null token everywhere),
            # then extrapolate from it towards the conditioned latent
            u = temp * jax.random.normal(key, (n, flow_config.dim), jnp.float32)
            z_null, _ = flow.forward_and_log_det(params["flow"], u, None)
            z_std = z_null + sampler.guidance * (z_std - z_null)
        z = z_std * stats["z_std"] + stats["z_mean"]
        if composition is not None:  # the atoms are given: nothing to check
            numbers = composition.astype(jnp.int32)
            n_atoms = jnp.sum(numbers > 0, -1).astype(jnp.int32)
            comp_ok = jnp.ones((n,), bool)
            return {"z": z, "log_prob": log_prob, "n_atoms": n_atoms, "numbers": numbers,
                    "composition_valid": comp_ok}  # fmt: skip
        n_atoms, numbers = decode_composition(model, params["autoencoder"], z)  # [n], [n, A]
        if sampler.composition_check:
            mask = jnp.arange(numbers.shape[1])[None, :] < n_atoms[:, None]
            comp_ok = jax.vmap(composition_valid)(numbers, mask)
        else:
            comp_ok = jnp.ones((n,), bool)
        return {"z": z, "log_prob": log_prob, "n_atoms": n_atoms, "numbers": numbers,
                "composition_valid": comp_ok}  # fmt: skip

    def realise(params, key, prop, spacegroup, groups=None):
        """Decoder (coordinates for the proposed composition) -> symmetry layer (``groups``:
        the static set ``spacegroup`` is drawn from, None = any)."""
        z = prop["z"]
        n = z.shape[0]
        dec = decode(
            params["autoencoder"], z, key, n_atoms=prop["n_atoms"], numbers=prop["numbers"]
        )
        cell, frac, numbers, mask = dec["cell"], dec["frac"], dec["numbers"], dec["mask"]
        if spacegroup is None:
            sg = jnp.zeros((n,), jnp.int32)
            residual = jnp.zeros((n,), cell.dtype)
            ok = jnp.ones((n,), bool)
        else:
            sg = jnp.broadcast_to(jnp.asarray(spacegroup, jnp.int32), (n,))

            cell_s, frac_s, residual, asymmetry = jax.vmap(functools.partial(sym, groups=groups))(
                cell, frac, numbers, mask, sg
            )  # [n, 3, 3], [n, A, 3], [n], [n]
            # the projection can also merge atoms (two atoms of a species onto one site of
            # the group): keep the decoded structure then too
            d_min = jax.vmap(
                lambda c, f, m: min_distance(c, jax.lax.stop_gradient(f), m, n_images=n_images)
            )(cell_s, frac_s, mask)  # [n]
            ok = (
                (residual <= sampler.symmetry_max_residual)
                & (asymmetry <= sampler.symmetry_tolerance)
                & (d_min >= sampler.symmetry_min_distance)
            )  # [n]
            cell = jnp.where(ok[:, None, None], cell_s, cell)
            frac = jnp.where(ok[:, None, None], frac_s, frac)
        if sampler.constraint_steps > 0:
            frac = constrain(cell, frac, numbers, mask)
        frac = jnp.where(mask[..., None], frac, 0.0)
        if sampler.accept_min_ratio > 0:
            ratio = batched_min_distance_ratio(
                cell,
                frac,
                numbers,
                mask,
                n_images=n_images,
                potential=contact,
                upto=max(1.0, sampler.accept_min_ratio),
            )
            geometry_ok = ratio >= sampler.accept_min_ratio
        else:
            geometry_ok = jnp.ones((n,), bool)
        if spacegroup is not None and sampler.inversion_tolerance > 0:
            # a group without inversion: a centrosymmetric result is a supergroup
            polar = ~jnp.asarray(centro_table)[sg] & (sg > 0)
            centre = jax.vmap(
                lambda c, f, z, m: has_inversion_centre(c, f, z, m, sampler.inversion_tolerance)
            )(cell, frac, numbers, mask)
            inversion_ok = ~(polar & centre)
        else:
            inversion_ok = jnp.ones((n,), bool)
        return {
            **prop, "cell": cell, "frac": frac, "numbers": numbers, "mask": mask,
            "n_atoms": dec["n_atoms"], "symmetry_residual": residual, "symmetrized": ok,
            "geometry_ok": geometry_ok, "inversion_ok": inversion_ok, "spacegroup": sg,
        }  # fmt: skip

    def accepted(out):
        return (
            out["symmetrized"] & out["composition_valid"] & out["geometry_ok"] & out["inversion_ok"]
        )

    def take(tree, rows):
        return jax.tree.map(lambda x: x[rows], tree)

    def sample(params, key, n, conditions=None, spacegroup=None, temperature=None,
               composition=None):  # fmt: skip
        stats = params["stats"]
        k_flow, k_dec = jax.random.split(key)
        if flow_config.use_composition != (composition is not None):
            raise ValueError(
                "a structure-prediction flow (use_composition) samples for a given "
                "composition [n, A], a generation flow without one"
            )
        if composition is not None:
            composition = jnp.asarray(composition, jnp.int32)
            if composition.shape != (n, settings.max_atoms):
                raise ValueError(
                    f"composition must be [n, max_atoms] = [{n}, {settings.max_atoms}], "
                    f"got {composition.shape}"
                )
        requested = spacegroup is not None or bool(conditions) or composition is not None
        if temperature is None and requested and sampler.conditioned_temperature is not None:
            temperature = sampler.conditioned_temperature
        draw_groups = not requested and draws_spacegroups(sampler, flow_config)
        grouped = spacegroup is not None or draw_groups
        checked = grouped or sampler.composition_check or sampler.accept_min_ratio > 0
        if not requested:
            # unconditioned: n + m i.i.d. candidates (symmetry-aware with the prior: g ~
            # p_train(g), then z ~ p(z | g)); the first n accepted ones in draw order are
            # rejection samples of p(crystal | accepted)
            pool = n + (math.ceil(sampler.spare_fraction * n) if checked else 0)
            # candidates that are decoded anyway (contact check, drawn groups): the flow
            # and composition head propose twice the pool (cheap) and the decoder gets
            # the first `pool` whose composition passes, not candidates it will reject
            screen = sampler.screen_compositions and sampler.composition_check
            screen = screen and (draw_groups or sampler.accept_min_ratio > 0)
            n_prop = 2 * pool if screen else pool
            if draw_groups:
                logits = jnp.log(jnp.asarray(stats["spacegroup_prior"], jnp.float32))
                if prior_groups is not None:
                    logits = jnp.where(in_prior, logits, -jnp.inf)
                spacegroup = jax.random.categorical(
                    jax.random.fold_in(key, 7), logits, shape=(n_prop,)
                )
            prop = propose(params, k_flow, n_prop, None, spacegroup, temperature)
            if screen:
                first = jnp.argsort(~prop["composition_valid"], stable=True)[:pool]
                prop = take(prop, first)
                spacegroup = None if spacegroup is None else spacegroup[first]

            def pick(ok):
                return jnp.argsort(~ok, stable=True)[:n]

        else:
            # K candidates per crystal (candidate-major rows) with its conditions and group;
            # each crystal keeps its first accepted candidate, else candidate 0
            K = 1 + sampler.retries if checked else 1
            rep = lambda x: jnp.tile(jnp.broadcast_to(jnp.asarray(x), (n,)), K)  # noqa: E731
            cond_k = {k: rep(v) for k, v in (conditions or {}).items()} or conditions
            spacegroup = None if spacegroup is None else rep(spacegroup)
            comp_k = None if composition is None else jnp.tile(composition, (K, 1))
            prop = propose(params, k_flow, n * K, cond_k, spacegroup, temperature, comp_k)

            def pick(ok):
                ok = ok.reshape(K, n)
                first = jnp.where(jnp.any(ok, 0), jnp.argmax(ok, 0), 0)  # [n]
                return first * n + jnp.arange(n)

        if grouped or sampler.accept_min_ratio > 0:
            out = realise(params, k_dec, prop, spacegroup, prior_groups if draw_groups else None)
            out = take(out, pick(accepted(out)))
        else:
            # only the composition can fail: choose before the (costly) decoder GNN
            out = realise(params, k_dec, take(prop, pick(prop["composition_valid"])), None)
        props = predict(params["predictor"], out["z"], stats) if pred_names else {}
        return {**out, "properties": props}

    return sample
