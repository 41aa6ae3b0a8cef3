"""The second stage end to end on a tiny run: ``autoperi train-flow`` lowers the flow's
validation NLL and writes a loadable bundle; `autoperi_jax.load` samples, encodes, decodes
and predicts; ``autoperi sample`` writes readable extxyz files batch by batch, identical
for the same seed, with the predicted properties that ``autoperi eval`` reads."""

import json

import jax
import numpy as np
import pytest

from autoperi_jax.cli import main
from autoperi_jax.crystal import read_structures
from autoperi_jax.io import write_samples
from train.cli import load_config


@pytest.fixture(scope="module")
def flow_setup(tiny_perov_data):
    """An untrained tiny autoencoder (the test config; initial parameters stand in for a
    trained run, which would cost a minute of compilation) on the first rows of the
    Perov-5 splits, and a tiny flow-stage config factory."""
    import jax.numpy as jnp

    from autoperi_jax.api import padded_batches
    from autoperi_jax.model import compute_normalisers, init_params
    from train.trainer import build_model, build_settings, load_split

    config = load_config("train/configs/test.py")
    config.data.data_dir = tiny_perov_data
    model, settings = build_model(config), build_settings(config)
    graphs = load_split(config, "train", progress=False).graphs
    batch, _ = next(padded_batches(graphs[:4], 4))
    params = jax.jit(lambda k, b: init_params(model, b, settings, k))(
        jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, batch)
    )
    ckpt = {"config": config, "params": params, "normalisers": compute_normalisers(graphs),
            "step": 0}  # fmt: skip

    def flow_config():
        fc = load_config("flow_perov_5")
        fc.progress = False
        fc.num_steps = 120
        fc.val_every = 60
        fc.log_every = 20
        fc.batch_size = 32
        fc.warmup_steps = 10
        fc.learning_rate = 3e-3
        fc.encode_batch_size = 32
        fc.flow.n_layers = 2
        fc.flow.hidden = (32,)
        fc.flow.context_features = 16
        fc.predictor.hidden = (32,)
        fc.predictor.num_steps = 40
        fc.predictor.val_every = 20
        fc.predictor.batch_size = 32
        fc.sampler.num_steps = 2
        fc.sampler.constraint_steps = 5
        fc.z_noise_parts = {"comp": 0.1}  # per-part dequantisation noise (noise_scales)
        return fc

    return ckpt, flow_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, flow_setup):
    """A tiny flow stage (`flow_setup`)."""
    from train.flow_stage import train_flow

    ckpt, flow_config = flow_setup
    workdir = tmp_path_factory.mktemp("run")
    summary = train_flow(workdir, flow_config(), checkpoint=ckpt)
    return workdir, summary


@pytest.fixture(scope="module")
def gen(run):
    from autoperi_jax import load

    return load(run[0])


def test_train_flow_lowers_the_nll_and_saves_a_bundle(run):
    workdir, summary = run
    assert summary["val_nll"] < summary["val_nll_init"] - 1.0
    records = [json.loads(line) for line in open(workdir / "flow" / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert len(train) == 120 // 20 and all(np.isfinite(r["l_gen"]) for r in train)
    assert train[-1]["l_gen"] < train[0]["l_gen"]
    assert [r["step"] for r in val] == [0, 60, 120]
    assert any(r["split"] == "predictor" for r in records)
    assert set(summary["predictor_val_mae"]) == {"heat_ref", "dir_gap", "heat_all", "ind_gap"}
    assert np.isfinite(summary["predictor_val_mae"]["heat_ref"])
    assert (workdir / "flow" / "model" / "meta.json").exists()
    assert (workdir / "flow" / "latents_train.npz").exists()
    assert not list(workdir.rglob("*.pkl")) and not list(workdir.rglob("*.pickle"))


def test_interrupted_flow_stage_resumes_to_the_uninterrupted_result(
    run, flow_setup, tmp_path, monkeypatch
):
    """A stop request at step 45 of 120 (mid-epoch, between validations) saves a checkpoint
    and returns; the same call again resumes there and ends on the uninterrupted run's
    flow, bit for bit, with the same validation NLLs and train records (but the one
    whose window holds the interruption)."""
    import shutil

    import train.loop
    from autoperi_jax.checkpoint import load_pytree
    from train.flow_stage import train_flow

    ckpt, flow_config = flow_setup
    workdir, summary = run
    (tmp_path / "flow").mkdir()
    for split in ("train", "val"):  # the encoded latents: no second encoding
        shutil.copy(workdir / "flow" / f"latents_{split}.npz", tmp_path / "flow")
    requested = train.loop.StopRequest.requested
    monkeypatch.setattr(train.loop.StopRequest, "requested", lambda self, step, every: step == 45)
    assert train_flow(tmp_path, flow_config(), checkpoint=ckpt) == {"interrupted": True}
    assert not (tmp_path / "flow" / "model").exists()
    monkeypatch.setattr(train.loop.StopRequest, "requested", requested)
    resumed = train_flow(tmp_path, flow_config(), checkpoint=ckpt)

    for k in ("val_nll", "val_nll_init", "best_step"):
        assert resumed[k] == summary[k], k
    ours, theirs = (
        load_pytree(tmp_path / "flow" / "model")[0],
        load_pytree(workdir / "flow" / "model")[0],
    )
    for a, b in zip(jax.tree.leaves(ours["flow"]), jax.tree.leaves(theirs["flow"])):
        np.testing.assert_array_equal(a, b)

    def records(path):
        out = {}
        for line in open(path / "flow" / "metrics.jsonl"):
            r = json.loads(line)
            if r["split"] in ("train", "val"):
                out[(r["split"], r["step"])] = {k: v for k, v in r.items() if k != "time_s"}
        return out

    a, b = records(tmp_path), records(workdir)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k != ("train", 60))


def test_generator_api(gen):
    # every sampling call in this module uses conditions={"heat_ref": value}: one compile
    key = jax.random.PRNGKey(0)
    crystals = gen.sample(key, 6, {"heat_ref": 1.0}, batch_size=4)
    assert len(crystals) == 6 and gen.nfe == 2
    assert {"heat_ref", "dir_gap", "heat_all", "ind_gap"} <= set(crystals[0].properties)
    assert not any("spacegroup_requested" in c.properties for c in crystals)
    # no condition: space-group prior (the flow config's default), groups drawn from the
    # training labels, then the symmetry layer
    prior = np.asarray(gen.params["stats"]["spacegroup_prior"])
    assert gen.sampler.spacegroup_prior and abs(prior.sum() - 1) < 1e-5
    free = gen.sample(key, 4, batch_size=4)
    assert all(prior[c.properties["spacegroup_requested"]] > 0 for c in free)
    # batch b uses fold_in(key, b): the first crystals do not depend on n
    first = gen.sample(key, 4, {"heat_ref": 1.0}, batch_size=4)
    np.testing.assert_array_equal(first[3].frac_coords, crystals[3].frac_coords)
    out = gen.sample_fn(gen.params, jax.random.fold_in(key, 0), 4, {"heat_ref": 1.0}, None, None)
    np.testing.assert_allclose(np.asarray(out["frac"])[3][: crystals[3].num_atoms],
                               crystals[3].frac_coords, atol=1e-6)  # fmt: skip
    z = gen.encode(crystals, batch_size=4)
    assert z.shape == (6, gen.flow_config.dim) and np.all(np.isfinite(z))
    props = gen.predict(crystals, batch_size=4)
    assert set(props) == set(gen.pred_names) and props["heat_ref"].shape == (6,)
    np.testing.assert_allclose(props["heat_ref"], gen.predict_z(z)["heat_ref"], rtol=1e-5)
    decoded = gen.decode(z, key, batch_size=4)
    assert len(decoded) == 6
    recon = gen.reconstruct(crystals, key, batch_size=4)
    assert [c.name for c in recon] == [c.name for c in crystals]
    np.testing.assert_array_equal(recon[5].frac_coords, decoded[5].frac_coords)


def test_sample_cli_and_same_seed_identical(run, gen, tmp_path, capsys):
    from eval.samples import load_structure_set

    workdir, _ = run
    out = tmp_path / "a.extxyz"
    rc = main(["sample", "--workdir", str(workdir), "-n", "10", "--out", str(out),
               "--batch-size", "4", "--seed", "3", "--condition", "heat_ref=1.0",
               "--no-progress", "--no-spacegroup-prior"])  # fmt: skip
    assert rc == 0 and "wrote 10 crystals" in capsys.readouterr().out
    crystals = read_structures(out)
    assert len(crystals) == 10 and all("heat_ref" in c.properties for c in crystals)
    samples = load_structure_set(out, progress=False)
    assert samples.has_property("heat_ref")
    assert np.isfinite(samples.property_values("heat_ref")).all()
    assert not any("spacegroup_requested" in c.properties for c in crystals)
    # the same with the fixture's (already compiled) generator: same bytes for the same
    # seed, other bytes for another seed
    write_samples(gen, jax.random.PRNGKey(3), 10, tmp_path / "b.extxyz", {"heat_ref": 1.0},
                  batch_size=4, progress=False)  # fmt: skip
    write_samples(gen, jax.random.PRNGKey(3), 10, tmp_path / "c.extxyz", {"heat_ref": 1.0},
                  batch_size=4, progress=False)  # fmt: skip
    assert (tmp_path / "b.extxyz").read_bytes() == (tmp_path / "c.extxyz").read_bytes()
    write_samples(gen, jax.random.PRNGKey(4), 10, tmp_path / "d.extxyz", {"heat_ref": 1.0},
                  batch_size=4, progress=False)  # fmt: skip
    assert (tmp_path / "d.extxyz").read_bytes() != (tmp_path / "b.extxyz").read_bytes()


def test_cli_parsers():
    from autoperi_jax.cli import build_parser

    a = build_parser().parse_args(["train-flow", "--workdir", "w", "--steps", "5",
                                   "--config.flow.n_layers=2"])  # fmt: skip
    assert a.workdir == "w" and a.steps == 5 and a.overrides == ["--config.flow.n_layers=2"]
    s = build_parser().parse_args(["sample", "--workdir", "w", "-n", "3", "--out", "x.extxyz",
                                   "--condition", "heat_ref=0.5", "--condition", "dir_gap=1",
                                   "--spacegroup", "221"])  # fmt: skip
    assert s.n == 3 and s.spacegroup == 221 and s.seed == 0
    from autoperi_jax.commands import _parse_conditions

    assert _parse_conditions(s.condition) == {"heat_ref": 0.5, "dir_gap": 1.0}
    with pytest.raises(ValueError):
        _parse_conditions(["heat_ref"])


def test_sample_writes_each_finished_batch_before_a_crash(gen, tmp_path):
    class Crashing:
        """Yields two batches of the real generator, then fails."""

        def sample_batches(self, *args, **kwargs):
            batches = gen.sample_batches(*args, **kwargs)
            yield next(batches)
            yield next(batches)
            raise RuntimeError("killed")

    out = tmp_path / "partial.extxyz"
    with pytest.raises(RuntimeError, match="killed"):
        write_samples(Crashing(), jax.random.PRNGKey(0), 12, out, {"heat_ref": 1.0},
                      batch_size=4, progress=False)  # fmt: skip
    assert len(read_structures(out)) == 8
    # a folder gets one CIF per crystal and the properties as CSV
    folder = tmp_path / "cifs"
    n = write_samples(gen, jax.random.PRNGKey(0), 5, folder, {"heat_ref": 1.0}, batch_size=4,
                      progress=False)  # fmt: skip
    assert n == 5
    assert len(list(folder.glob("sample_*.cif"))) == 5
    lines = (folder / "properties.csv").read_text().splitlines()
    assert lines[0].startswith("name,") and "heat_ref" in lines[0] and len(lines) == 6


def test_noise_scales_per_latent_part():
    from train.flow_stage import noise_scales

    parts = (("lattice", 2), ("comp", 3), ("struct", 1))
    np.testing.assert_array_equal(
        noise_scales(0.05, {"comp": 0.2}, parts, 6), np.float32([0.05] * 2 + [0.2] * 3 + [0.05])
    )
    np.testing.assert_array_equal(noise_scales(0.1, None, parts, 6), np.full(6, 0.1, np.float32))
    with pytest.raises(ValueError, match=r"\['compo'\], not latent parts"):
        noise_scales(0.05, {"compo": 0.2}, parts, 6)


def test_checkpoint_from_shipped_bundle_is_its_autoencoder(perov_test):
    """`autoperi train-flow --pretrained perov_5` trains on the shipped encoder: the
    checkpoint it builds encodes exactly like the shipped model."""
    import autoperi_jax
    from autoperi_jax.api import encode_graphs, pretrained_path
    from autoperi_jax.model import make_encode_fn
    from train.flow_stage import checkpoint_from_bundle
    from train.trainer import build_model

    ckpt = checkpoint_from_bundle(pretrained_path("perov_5"))
    gen = autoperi_jax.load_pretrained("perov_5")
    crystals = [perov_test.crystal(i) for i in range(4)]
    z_ref = gen.encode(crystals)
    encode = jax.jit(make_encode_fn(build_model(ckpt["config"])))
    z = encode_graphs(encode, ckpt["params"], gen._graphs(crystals))
    np.testing.assert_allclose(z, z_ref, atol=1e-5)
    assert ckpt["step"] == 6000 and ckpt["config"].data.dataset == "perov_5"


def test_composition_flow_trains_beside_the_bundle_and_predicts(run, flow_setup):
    """``composition = True`` (train/configs/csp_perov_5.py): a second flow written to
    RUN/flow/model/csp next to the generation bundle, which it leaves untouched; the
    loaded model then predicts structures with exactly the given atoms."""
    from autoperi_jax import load
    from train.flow_stage import train_flow

    workdir, _ = run
    ckpt, flow_config = flow_setup
    bundle_meta = (workdir / "flow" / "model" / "meta.json").read_bytes()
    fc = flow_config()
    fc.composition, fc.properties, fc.predict_properties = True, (), ()
    fc.num_steps, fc.val_every = 60, 60
    summary = train_flow(workdir, fc, checkpoint=ckpt)
    assert summary["val_nll"] < summary["val_nll_init"] - 1.0
    assert (workdir / "flow" / "model" / "meta.json").read_bytes() == bundle_meta
    gen = load(workdir)
    assert gen.has_csp and gen.csp_fn is not None
    preds = gen.predict_structures("TiBaO3", 3, jax.random.key(0))
    assert [p.name for p in preds] == ["BaTiO3#0", "BaTiO3#1", "BaTiO3#2"]
    for p in preds:
        assert sorted(p.numbers.tolist()) == [8, 8, 8, 22, 56]


def test_sample_check_counts_valid_unique_novel():
    """`sample_quality` against cases whose answer is known: no training crystals (every
    valid sample is novel), the samples themselves as the training set (none is), and
    every sample drawn twice (half are the first of their structure). The shipped model,
    whose raw samples are mostly valid (the tiny run's are not)."""
    from autoperi_jax import load_pretrained
    from autoperi_jax.api import pretrained_path
    from autoperi_jax.convert import outputs_to_crystals
    from autoperi_jax.distinct import reduced_formula
    from train.flow_stage import checkpoint_from_bundle, make_sample_check, sample_quality

    shipped = load_pretrained("perov_5")
    ckpt = checkpoint_from_bundle(pretrained_path("perov_5"))
    fc = load_config("flow_perov_5")
    fc.sample_check = 12
    check = make_sample_check(ckpt, shipped.params["stats"], shipped.flow_config, fc, [])
    flow = shipped.params["flow"]
    q = sample_quality(check, flow)
    assert q["sample_valid"] > 0  # else the cases below assert nothing
    assert q["sample_valid"] <= min(q["sample_struct_valid"], q["sample_comp_valid"])
    assert q["sample_novel"] == 1.0
    assert q["sample_vun"] == pytest.approx(q["sample_valid"] * q["sample_unique"])

    out = jax.device_get(
        check.sample({**check.fixed, "flow": flow}, jax.random.PRNGKey(check.seed))
    )
    crystals = outputs_to_crystals(out)
    seen = check._replace(train=crystals, train_formulas=[reduced_formula(c) for c in crystals])
    q_seen = sample_quality(seen, flow)
    assert q_seen["sample_novel"] == 0.0 and q_seen["sample_vun"] == 0.0
    assert q_seen["sample_valid"] == q["sample_valid"]

    twice = check._replace(
        sample=lambda p, k: jax.tree.map(lambda x: np.concatenate([x, x]), check.sample(p, k))
    )
    q_twice = sample_quality(twice, flow)
    assert q_twice["sample_valid"] == q["sample_valid"]
    assert q_twice["sample_unique"] == pytest.approx(q["sample_unique"] / 2)


def test_flow_stage_keeps_the_step_with_the_best_sample_share(flow_setup, tmp_path, monkeypatch):
    """``select_on = sample_*`` keeps the validation step with the highest share, not the
    lowest NLL (scripted shares: the tiny untrained autoencoder's samples are all invalid,
    so real ones would tie at 0)."""
    import train.flow_stage as fs

    shares = iter([0.1, 0.5, 0.9, 0.3])  # steps 0, 20, 40, 60
    monkeypatch.setattr(fs, "sample_quality", lambda check, params: {"sample_vun": next(shares)})
    ckpt, flow_config = flow_setup
    fc = flow_config()
    fc.num_steps, fc.val_every, fc.predictor.num_steps = 60, 20, 20
    fc.sample_check, fc.select_on = 8, "sample_vun"
    summary = fs.train_flow(tmp_path, fc, checkpoint=ckpt)
    val = [json.loads(r) for r in open(tmp_path / "flow" / "metrics.jsonl")]
    assert [(r["step"], r["sample_vun"]) for r in val if r["split"] == "val"] == [
        (0, 0.1), (20, 0.5), (40, 0.9), (60, 0.3)
    ]  # fmt: skip
    assert summary["best_step"] == 40 and summary["select_on"] == "sample_vun"
    assert summary["best_sample_quality"] == {"sample_vun": 0.9}
    with pytest.raises(ValueError, match="sample_check"):
        fc.sample_check = 0
        fs.train_flow(tmp_path / "again", fc, checkpoint=ckpt)
