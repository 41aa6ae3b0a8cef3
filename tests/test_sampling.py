"""The jitted sample function (`autoperi_jax.sampling.make_sample_fn`) on an untrained tiny
autoencoder and a randomly perturbed (so context-dependent) flow: static shapes, no host
callbacks, determinism, masks, conditioning / null token, the space-group path and the
minimum-distance constraint. One compiled function serves every test: the conditions
dict always names ``heat_ref`` (NaN = null token) and the space group is a traced array
(0 = none)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import spglib

from autoperi_jax.convert import outputs_to_crystals
from autoperi_jax.flow import FlowConfig, make_flow
from autoperi_jax.physics import covalent_soft_sphere, min_distance_ratio
from autoperi_jax.sampling import PropertyHead, SamplerSettings, make_sample_fn
from autoperi_jax.symmetry import AXIS_PERMUTATIONS, get_table
from autoperi_jax.testing import tiny_model, tiny_params

N = 8
NAMES = ("heat_ref", "dir_gap")
NAN = float("nan")


@pytest.fixture(scope="module")
def setup():
    model, settings = tiny_model()
    ae = tiny_params(model, settings)
    # cubic-ish 4 A cells from the untrained lattice head
    norm = {"lattice_mean": [float(np.log(4.0))] * 3 + [0.0] * 3, "lattice_std": [0.05] * 6}
    dim = model.latent_lattice + model.latent_comp + model.latent_struct
    fc = FlowConfig(dim=dim, n_layers=2, hidden=(16,), n_props=2, use_spacegroup=True,
                    context_features=8)  # fmt: skip
    flow = make_flow(fc)
    # the flow is the identity at init; perturb it so that the context matters
    pf = flow.init(jax.random.PRNGKey(1))
    leaves, tree = jax.tree.flatten(pf)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    pf = jax.tree.unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    ph = PropertyHead((16,), 2).init(jax.random.PRNGKey(3), jnp.zeros((1, dim)))
    stats = {
        "z_mean": jnp.zeros(dim), "z_std": jnp.ones(dim),
        "cond_mean": jnp.array([1.4, 0.1]), "cond_std": jnp.array([0.7, 0.5]),
        "pred_mean": jnp.array([1.4, 0.1]), "pred_std": jnp.array([0.7, 0.5]),
    }  # fmt: skip
    params = {"autoencoder": ae, "flow": pf, "predictor": ph, "stats": stats}
    raw = make_sample_fn(model, settings, norm, fc, NAMES, NAMES, (16,), SamplerSettings())
    sample = jax.jit(raw, static_argnums=2)

    def run(key=0, heat=NAN, sg=0):
        out = sample(params, jax.random.PRNGKey(key), N, {"heat_ref": heat}, jnp.int32(sg))
        return jax.device_get(out)

    return raw, run, params, model


@pytest.fixture(scope="module")
def plain(setup):
    return setup[1]()


def test_static_shapes_masks_and_no_callbacks(setup, plain):
    raw, _, params, model = setup
    A = model.max_atoms
    shapes = jax.eval_shape(lambda p, k: raw(p, k, N), params, jax.random.PRNGKey(0))
    assert shapes["cell"].shape == (N, 3, 3) and shapes["frac"].shape == (N, A, 3)
    assert shapes["numbers"].shape == (N, A) and shapes["mask"].shape == (N, A)
    assert shapes["z"].shape == (N, 12) and shapes["properties"]["heat_ref"].shape == (N,)
    jaxpr = jax.make_jaxpr(lambda p, k: raw(p, k, N, {"heat_ref": 0.5}, 221))
    assert "callback" not in str(jaxpr(params, jax.random.PRNGKey(0)))
    out = plain
    np.testing.assert_array_equal(out["mask"], np.arange(A)[None] < out["n_atoms"][:, None])
    assert np.all((out["numbers"] > 0) == out["mask"])
    assert np.all(out["frac"][~out["mask"]] == 0.0)
    assert np.all(out["n_atoms"] >= 1) and np.all(np.isfinite(out["cell"]))
    assert np.all(out["spacegroup"] == 0) and np.all(out["symmetry_residual"] == 0)
    assert len(outputs_to_crystals(out)) == N


def test_deterministic_for_a_fixed_key(setup, plain):
    run = setup[1]
    again = run()
    for k in ("cell", "frac", "numbers", "z"):
        np.testing.assert_array_equal(plain[k], again[k])
    assert not np.allclose(plain["z"], run(key=1)["z"])


def test_conditions_change_the_context_and_the_null_token_is_the_default(setup, plain):
    raw, run, params, _ = setup
    lo, hi = run(heat=0.0), run(heat=3.0)
    assert np.abs(lo["z"] - hi["z"]).max() > 1e-3
    assert np.abs(lo["properties"]["heat_ref"] - hi["properties"]["heat_ref"]).max() > 1e-4
    # NaN = the null token = leaving the name out = conditions=None (checked on the flow
    # part only: eval_shape-free, compiling the whole sampler again would be slow)
    from autoperi_jax.sampling import _context

    stats = params["stats"]
    fc = FlowConfig(dim=12, n_props=2, use_spacegroup=True)
    a = _context(N, {"heat_ref": NAN}, None, NAMES, stats, fc)
    b = _context(N, None, None, NAMES, stats, fc)
    np.testing.assert_array_equal(a.present, b.present)
    assert not np.any(a.present)
    c = _context(N, {"heat_ref": 2.1}, 99, NAMES, stats, fc)
    np.testing.assert_allclose(c.props[:, 0], (2.1 - 1.4) / 0.7, rtol=1e-6)
    assert np.all(c.present[:, 0]) and not np.any(c.present[:, 1])
    assert np.all(c.spacegroup == 99)
    with pytest.raises(ValueError, match="unknown condition"):
        _context(N, {"band_gap": 1.0}, None, NAMES, stats, fc)


def _has_group_rotations(crystal, group: int, symprec: float = 0.1) -> bool:
    """spglib's rotations of the crystal contain every rotation of ``group`` (for one of
    the axis permutations `symmetrize` tries): the crystal is invariant under the group,
    so spglib reports the group or a supergroup of it."""
    sym = spglib.get_symmetry((crystal.cell, crystal.frac_coords, crystal.numbers), symprec)
    if sym is None:
        return False
    found = {r.tobytes() for r in np.asarray(sym["rotations"], np.int32)}
    table = get_table("conventional")
    rots = np.asarray(table.rotations[group][table.mask[group]], np.int32)
    for p in np.rint(AXIS_PERMUTATIONS).astype(np.int32):
        conj = np.einsum("ji,gjk,kl->gil", p, rots, p)
        if all(r.tobytes() in found for r in conj):
            return True
    return False


def test_spacegroup_path(setup, plain):
    """`symmetrize` guarantees invariance under the group when its matching succeeds; the
    sampler checks that with a second projection and otherwise keeps the decoded
    structure (``symmetrized`` False: untrained decoders give compositions with no
    arrangement in the group and collapsed atoms). Every crystal reported symmetrised,
    without overlapping atoms, is invariant under the requested operations (spglib at
    symprec 0.1: that group or a supergroup), and the label reaches the flow."""
    run = setup[1]
    n_checked = 0
    for group in (221, 47):
        out = run(sg=group)
        assert np.all(out["spacegroup"] == group)
        for c, ok in zip(outputs_to_crystals(out), out["symmetrized"]):
            assert c.properties["spacegroup_requested"] == group
            if ok and (c.num_atoms == 1 or c.min_distance() > 0.5):
                assert _has_group_rotations(c, group), (group, c)
                n_checked += 1
    assert n_checked >= 3
    assert np.abs(out["z"] - plain["z"]).max() > 1e-3  # the label conditions the flow


def test_constraint_layer_enforces_the_minimum_distance(setup, plain):
    """After the layer no pair is closer than ~the species-aware minimum
    0.6 (r_cov_i + r_cov_j), except atoms decoded onto one point (no direction to push
    them apart; untrained decoders collapse atoms) and cells too small to hold the atoms,
    which the test skips."""
    from autoperi_jax.elements import COVALENT_RADIUS

    pot = covalent_soft_sphere(0.6)
    n_checked = 0
    for c in outputs_to_crystals(plain):
        if c.num_atoms == 1 or c.min_distance() < 1e-3:
            continue
        # spheres of radius 0.6 r_cov must fit (packing fraction <= 0.5; untrained decoders
        # also put 4 actinides in 45 A^3, where no arrangement satisfies the minimum)
        spheres = np.sum(4 / 3 * np.pi * (0.6 * np.asarray(COVALENT_RADIUS)[c.numbers]) ** 3)
        if spheres > 0.5 * c.volume:
            continue
        ratio = float(min_distance_ratio(c.cell, c.frac_coords, c.numbers, n_images=(2, 2, 2),
                                         potential=pot))  # fmt: skip
        assert ratio >= 0.9, (c, ratio)
        n_checked += 1
    assert n_checked >= 3


def _contact_ratio(c) -> float:
    """Smallest d_ij / (r_cov_i + r_cov_j) over all periodic pairs, from ASE's neighbour
    list (an independent implementation of `min_distance_ratio`)."""
    from ase.neighborlist import neighbor_list

    from autoperi_jax.elements import COVALENT_RADIUS

    atoms = c.to_ase()
    i, j, d = neighbor_list("ijd", atoms, 6.0)
    if len(d) == 0:
        return np.inf
    r = np.asarray(COVALENT_RADIUS)[atoms.numbers]
    return float(np.min(d / (r[i] + r[j])))


def test_candidate_checks_keep_charge_balanced_well_separated_crystals(setup, plain):
    """``composition_valid`` reports the evaluation's CDVAE rule on every sampled crystal,
    ``geometry_ok`` ASE's closest contact, and extra candidates raise the share of crystals
    passing both, for unconditioned sampling (i.i.d. spares, the first n accepted kept)
    and conditioned sampling (``retries`` per crystal). This untrained decoder's
    compositions are charge balanced about 7 times in 8 and it often stacks atoms."""
    from eval.metrics import smact_validity

    raw, _, params, model = setup
    assert np.array_equal(
        plain["composition_valid"],
        [smact_validity(c.numbers) for c in outputs_to_crystals(plain)],
    )
    _, settings = tiny_model()
    norm = {"lattice_mean": [float(np.log(4.0))] * 3 + [0.0] * 3, "lattice_std": [0.05] * 6}
    fc = FlowConfig(dim=12, n_layers=2, hidden=(16,), n_props=2, use_spacegroup=True,
                    context_features=8)  # fmt: skip
    n, min_ratio = 64, 0.5
    share = {}
    for check in (False, True):
        s = SamplerSettings(composition_check=check, retries=3 if check else 0,
                            spare_fraction=1.0 if check else 0.0,
                            accept_min_ratio=min_ratio if check else 0.0)  # fmt: skip
        fn = jax.jit(make_sample_fn(model, settings, norm, fc, NAMES, NAMES, (16,), s),
                     static_argnums=2)  # fmt: skip
        for conditioned in (False, True):
            cond = {"heat_ref": 1.0} if conditioned else None
            out = jax.device_get(fn(params, jax.random.PRNGKey(5), n, cond))
            crystals = outputs_to_crystals(out)
            comp = np.array([smact_validity(c.numbers) for c in crystals])
            geom = np.array([_contact_ratio(c) >= min_ratio - 1e-4 for c in crystals])
            np.testing.assert_array_equal(out["composition_valid"], comp if check else True)
            if check:
                assert np.all(geom[out["geometry_ok"]])
            if check and not conditioned:
                # decoded candidates were screened on their composition first: with the
                # pool's worth of passing proposals, none is returned with a failing one
                assert out["composition_valid"].all()
            share[check, conditioned] = np.mean(comp & geom)
    for conditioned in (False, True):
        assert share[False, conditioned] < 0.9, share  # without the checks many fail
        assert share[True, conditioned] > share[False, conditioned], share


def test_a_lean_decoder_edge_list_gives_the_full_budget_result(setup):
    """`ModelSettings.decode_edge_share` (the sampler's ``decode_edge_share``): decoding
    on a list of 0.7 of the edge budget equals the full budget's result where it fits,
    and a share too small for any step (8 slots per crystal) takes the full-budget branch
    and gives its result."""
    import dataclasses

    from autoperi_jax.model import flow_candidates, make_decode_fn
    from autoperi_jax.testing import tiny_model

    _, _, params, model = setup
    _, settings = tiny_model()
    norm = {"lattice_mean": [float(np.log(4.0))] * 3 + [0.0] * 3, "lattice_std": [0.05] * 6}
    G, A = 6, settings.max_atoms
    z = jax.random.normal(jax.random.PRNGKey(4), (G, model.latent_lattice + model.latent_comp
                                                  + model.latent_struct))  # fmt: skip
    cell = jnp.broadcast_to(jnp.eye(3) * 4.5, (G, 3, 3))
    n_atoms = jnp.full((G,), A, jnp.int32)
    numbers = jnp.tile(jnp.array([38, 22, 8, 8, 8])[:A], (G, 1))
    out = {}
    for share in (1.0, 0.7, 0.02):
        st = dataclasses.replace(settings, decode_edge_share=share, num_steps=3)
        decode = jax.jit(make_decode_fn(model, st, norm))
        out[share] = jax.device_get(
            decode(params["autoencoder"], z, jax.random.PRNGKey(5), None, cell, n_atoms, numbers)
        )
    full = out[1.0]
    ends = [flow_candidates(full["frac"], cell, full["mask"], settings, sh) for sh in (0.7, 0.02)]
    assert not bool(ends[0].overflow) and bool(ends[1].overflow)
    for share in (0.7, 0.02):  # equal up to float rounding (XLA fuses a branch its own way)
        d = out[share]["frac"] - full["frac"]
        assert np.abs(d - np.round(d)).max() < 1e-5, share
    with pytest.raises(ValueError, match="decode_edge_share must be in"):
        SamplerSettings(decode_edge_share=0.0)


@pytest.mark.parametrize("name", ["retries", "spare_fraction", "accept_min_ratio"])
def test_negative_candidate_settings_are_refused(name):
    with pytest.raises(ValueError, match=f"SamplerSettings.{name} must be >= 0"):
        SamplerSettings(**{name: -1})
    with pytest.raises(ValueError, match="constraint_max_neighbors must be >= 1"):
        SamplerSettings(constraint_max_neighbors=0)


@pytest.mark.slow  # 30-60 s: the default run stays under 15 min on 2 cores
def test_spacegroup_prior_draws_within_its_groups_with_a_cut_table(setup):
    """With the space-group prior, ``prior_groups`` (what `autoperi_jax.api.load` passes:
    the groups with non-zero prior) restricts the draws to those groups and cuts the
    symmetry layer's table to them: the same crystals as the full table when it names the
    prior's support; a smaller set than the support is never left."""
    _, _, params, model = setup
    _, settings = tiny_model()
    norm = {"lattice_mean": [float(np.log(4.0))] * 3 + [0.0] * 3, "lattice_std": [0.05] * 6}
    fc = FlowConfig(dim=12, n_layers=2, hidden=(16,), n_props=2, use_spacegroup=True,
                    context_features=8)  # fmt: skip
    prior = np.zeros(231, np.float32)
    prior[[221, 99, 25]] = [0.5, 0.3, 0.2]
    params = {**params, "stats": {**params["stats"], "spacegroup_prior": jnp.asarray(prior)}}
    s = SamplerSettings(spacegroup_prior=True)
    out = {}
    for groups in (None, (25, 99, 221), (99,)):
        fn = make_sample_fn(model, settings, norm, fc, NAMES, NAMES, (16,), s, groups)
        out[groups] = jax.device_get(jax.jit(fn, static_argnums=2)(params, jax.random.key(4), N))
    full, cut, only = out[None], out[(25, 99, 221)], out[(99,)]
    assert set(full["spacegroup"]) <= {221, 99, 25} and len(set(full["spacegroup"])) > 1
    for k in ("cell", "frac", "numbers", "spacegroup", "symmetrized"):
        np.testing.assert_allclose(cut[k], full[k], atol=1e-5, err_msg=k)
    assert np.all(only["spacegroup"] == 99)


@pytest.mark.slow  # 30-60 s: the default run stays under 15 min on 2 cores
def test_conditioned_temperature_applies_only_when_something_is_requested(setup):
    """``SamplerSettings.conditioned_temperature`` is the default T of conditioned sampling
    (a property or a group requested), ``temperature`` that of unconditioned sampling; an
    explicit ``temperature`` argument overrides both. Checked against a sampler with the
    default settings given each T explicitly (the flow part only: the same base noise)."""
    _, _, params, model = setup
    _, settings = tiny_model()
    norm = {"lattice_mean": [float(np.log(4.0))] * 3 + [0.0] * 3, "lattice_std": [0.05] * 6}
    fc = FlowConfig(dim=12, n_layers=2, hidden=(16,), n_props=2, use_spacegroup=True,
                    context_features=8)  # fmt: skip
    cheap = dict(constraint_steps=0, composition_check=False)  # no checks, one candidate

    def build(s):
        fn = make_sample_fn(model, settings, norm, fc, NAMES, NAMES, (16,), s)
        return jax.jit(fn, static_argnums=2)

    two = build(SamplerSettings(temperature=1.3, conditioned_temperature=0.7, **cheap))
    ref = build(SamplerSettings(**cheap))
    key, cond = jax.random.PRNGKey(5), {"heat_ref": 0.5}
    z = lambda out: np.asarray(out["z"])  # noqa: E731
    np.testing.assert_array_equal(
        z(two(params, key, N, cond)), z(ref(params, key, N, cond, None, 0.7))
    )
    np.testing.assert_array_equal(z(two(params, key, N)), z(ref(params, key, N, None, None, 1.3)))
    np.testing.assert_array_equal(
        z(two(params, key, N, cond, None, 1.3)), z(ref(params, key, N, cond, None, 1.3))
    )
    assert (
        np.abs(
            z(ref(params, key, N, cond, None, 0.7)) - z(ref(params, key, N, cond, None, 1.3))
        ).max()
        > 1e-3
    )
