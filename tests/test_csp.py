"""Crystal structure prediction: the composition input, the composition flow, the predictor
(`Generator.predict_structures`) and ``autoperi csp``."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymatgen.core import Composition

import autoperi_jax
from autoperi_jax.cli import main
from autoperi_jax.crystal import read_structures
from autoperi_jax.elements import composition_numbers, formula_label
from autoperi_jax.flow import FlowConfig, FlowContext, make_flow
from train.flow_stage import composition_rows

SRTIO3 = [8, 8, 8, 22, 38]


@pytest.fixture(scope="module")
def gen():
    return autoperi_jax.load_pretrained("perov_5")


def test_composition_numbers_reads_formulas_compositions_and_numbers():
    assert composition_numbers("SrTiO3").tolist() == SRTIO3
    assert composition_numbers(Composition("Ba2TiO4")).tolist() == [8] * 4 + [22, 56, 56]
    assert composition_numbers([38, 8, 22, 8, 8]).tolist() == SRTIO3
    assert formula_label([38, 22, 8, 8, 8, 0, 0]) == "SrTiO3"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("", "empty composition"),
        ("Xy2O", "unknown element 'Xy'"),
        ("Fe0.5O", "not a formula"),
        (Composition("Fe0.5O"), "count 0.5"),
        ([0, 8], "atomic number 0"),
        ([], "empty composition"),
    ],
)
def test_bad_compositions_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        composition_numbers(bad)


def test_composition_rows_sort_and_pad():
    rows = composition_rows([np.array([38, 8, 22]), np.array([6])], 4)
    assert rows.tolist() == [[8, 22, 38, 0], [6, 0, 0, 0]]


def test_composition_context_is_a_set_and_changes_the_density():
    flow = make_flow(FlowConfig(dim=6, n_layers=2, hidden=(16,), use_composition=True))
    params = flow.init(jax.random.PRNGKey(0))
    # the zero-initialised flow ignores its context; perturb every parameter
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    z = jax.random.normal(jax.random.PRNGKey(2), (3, 6))
    a = jnp.array([[8, 8, 8, 22, 38]] * 3)
    lp = flow.log_prob(params, z, FlowContext(composition=a))
    shuffled = flow.log_prob(params, z, FlowContext(composition=a[:, ::-1]))
    other = flow.log_prob(params, z, FlowContext(composition=jnp.array([[8, 8, 8, 22, 56]] * 3)))
    np.testing.assert_allclose(lp, shuffled, rtol=1e-5, atol=1e-5)  # slot order is irrelevant
    assert np.all(np.abs(np.asarray(lp - other)) > 1e-4)
    # the round trip is exact given the context
    u, _ = flow.inverse_and_log_det(params, z, FlowContext(composition=a))
    back, _ = flow.forward_and_log_det(params, u, FlowContext(composition=a))
    np.testing.assert_allclose(back, z, atol=1e-5)
    with pytest.raises(ValueError, match="needs a composition"):
        flow.log_prob(params, z, None)


def test_predictions_keep_the_given_composition(gen):
    assert gen.has_csp
    preds = gen.predict_structures("BaTiO3", 6, jax.random.PRNGKey(0))
    assert [p.name for p in preds] == [f"BaTiO3#{j}" for j in range(6)]
    for p in preds:
        assert collections.Counter(p.numbers.tolist()) == {8: 3, 22: 1, 56: 1}
        assert np.all(np.isfinite(p.frac_coords)) and abs(np.linalg.det(p.cell)) > 10.0
    # several compositions at once: composition-major rows named ID#j, same atoms
    rows = gen.predict_structures_batches(
        ["SrTiO3", [3, 9, 9, 9, 41]], 3, jax.random.PRNGKey(1), ["a", "b"], batch_size=4
    )
    out = [c for batch in rows for c in batch]
    assert [c.name for c in out] == ["a#0", "a#1", "a#2", "b#0", "b#1", "b#2"]
    assert all(sorted(c.numbers.tolist()) == SRTIO3 for c in out[:3])
    assert all(sorted(c.numbers.tolist()) == [3, 9, 9, 9, 41] for c in out[3:])
    with pytest.raises(ValueError, match="has 7 atoms; this model's cells hold at most 5"):
        gen.predict_structures("Ba2TiO4", 2, jax.random.PRNGKey(0))


def test_csp_command_writes_predictions_and_refuses_bad_input(gen, tmp_path, capsys):
    out = tmp_path / "pred.extxyz"
    assert main(["csp", "--pretrained", "perov_5", "--composition", "SrTiO3", "-n", "2",
                 "--rank", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    got = read_structures(out)
    assert [c.name for c in got] == ["SrTiO3#0", "SrTiO3#1"]
    assert got[0].properties["consensus"] == got[1].properties["consensus"]  # one pair
    assert all(sorted(c.numbers.tolist()) == SRTIO3 for c in got)
    before = out.read_bytes()
    for bad, message in (("SrXx3", "unknown element 'Xx'"), ("Sr2Ti2O6", "10 atoms")):
        code = main(["csp", "--pretrained", "perov_5", "--composition", bad, "-n", "2",
                     "--out", str(out), "--no-progress"])  # fmt: skip
        assert code != 0 and message in capsys.readouterr().err
        assert out.read_bytes() == before  # nothing written is lost


def test_consensus_ranking_against_structure_matcher():
    """Two near-copies of rocksalt NaCl agree with each other, a CsCl-type cell of the same
    atoms with neither: the copies rank first with score exp(-rms / scale), rms from
    pymatgen's StructureMatcher called directly, and the odd one scores 0."""
    from ase.build import bulk
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from autoperi_jax.api import rank_predictions
    from autoperi_jax.crystal import Crystal
    from autoperi_jax.matching import CONSENSUS_SCALE, consensus_scores
    from autoperi_jax.protocol import CDVAE_MATCHER

    rocksalt = bulk("NaCl", "rocksalt", a=5.64)
    a = Crystal.from_ase(rocksalt, name="NaCl#0")
    moved = rocksalt.copy()
    moved.positions[1] += [0.08, -0.05, 0.03]
    b = Crystal.from_ase(moved, name="NaCl#1")
    c = Crystal.from_ase(bulk("NaCl", "cesiumchloride", a=3.3), name="NaCl#2")
    rms = StructureMatcher(**CDVAE_MATCHER).get_rms_dist(a.to_pymatgen(), b.to_pymatgen())[0]
    assert 0.005 < rms < 0.1
    assert StructureMatcher(**CDVAE_MATCHER).fit(a.to_pymatgen(), c.to_pymatgen()) is False
    (scores,) = consensus_scores([[c, a, b]], CDVAE_MATCHER)
    w = np.exp(-rms / CONSENSUS_SCALE)
    np.testing.assert_allclose(scores, [0.0, w, w], rtol=1e-6)
    ranked = rank_predictions([c, a, b], 3)
    assert [r.name for r in ranked] == ["NaCl#0", "NaCl#1", "NaCl#2"]
    assert [r.properties["consensus"] for r in ranked] == pytest.approx([w, w, 0.0])
    for r, want in zip(ranked, (a, b, c)):  # the copies first (ties keep the drawn order)
        np.testing.assert_array_equal(r.frac_coords, want.frac_coords)
    with pytest.raises(ValueError, match="not groups of n = 2"):
        rank_predictions([a, b, c], 2)
