"""The test config trains end to end: decreasing loss, finite gradients, checkpoints,
and `autoperi reconstruct` writes the split in order."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from autoperi_jax.checkpoint import load_checkpoint
from autoperi_jax.cli import main
from autoperi_jax.crystal import read_structures
from train.cli import load_config
from train.trainer import train_and_evaluate


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_perov_data):
    """Trains the test config on the first rows of the Perov-5 splits (written to
    a temporary data dir so preprocessing stays small)."""
    config = load_config("train/configs/test.py")
    config.data.data_dir = tiny_perov_data
    workdir = tmp_path_factory.mktemp("run")
    result = train_and_evaluate(config, workdir)
    return workdir, config, result


def test_loss_decreases_without_nans(run):
    workdir, config, result = run
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == config.num_train_steps // config.log_every
    assert all(r["grads_finite"] == 1.0 for r in train)
    assert all(np.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert result["eval"]["split"] == "val" and np.isfinite(result["eval"]["loss"])


def test_checkpoint_restores(run):
    workdir, config, _ = run
    ckpt = load_checkpoint(workdir)
    assert ckpt["step"] == config.num_train_steps
    assert ckpt["config"].to_dict() == json.loads(json.dumps(config.to_dict()))
    assert len(ckpt["normalisers"]["lattice_mean"]) == 6
    assert ckpt["data"]["epoch"] >= 1


def test_reconstruct_cli_writes_split_in_order(run, tmp_path, capsys):
    workdir, config, _ = run
    out = tmp_path / "recon.extxyz"
    rc = main(
        ["reconstruct", "--workdir", str(workdir), "--split", "test", "--out", str(out),
         "--batch-size", "16", "--match"]
    )  # fmt: skip
    assert rc == 0
    crystals = read_structures(out)
    from autoperi_jax.datasets import load_dataset
    from autoperi_jax.graph import GraphSettings

    ref = load_dataset(
        "perov_5:test", settings=GraphSettings(config.data.cutoff, config.data.max_neighbors),
        properties=list(config.data.properties), progress=False, data_dir=config.data.data_dir,
    )  # fmt: skip
    n = config.data.limit_test
    assert len(crystals) == n
    assert [c.name for c in crystals] == ref.ids[:n]
    printed = capsys.readouterr().out
    assert "match_rate" in printed


def test_init_from_starts_from_the_source_parameters(run, tmp_path):
    """``config.init_from``: step 0 holds the source run's parameters and normalisers
    (learning rate 0, so two steps keep them), a fresh optimiser; a different model
    config is refused with the differing keys named."""
    src, config, _ = run
    source = load_checkpoint(src)
    tuned = config.copy_and_resolve_references()
    tuned.init_from = str(src)
    tuned.num_train_steps, tuned.learning_rate, tuned.eval_every = 2, 0.0, 0
    train_and_evaluate(tuned, tmp_path / "tuned")
    ck = load_checkpoint(tmp_path / "tuned")
    assert ck["step"] == 2 and ck["normalisers"] == source["normalisers"]
    for a, b in zip(jax.tree.leaves(ck["raw_params"]), jax.tree.leaves(source["raw_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    other = tuned.copy_and_resolve_references()
    other.model.latent_struct = config.model.latent_struct + 1
    with pytest.raises(ValueError, match="latent_struct"):
        train_and_evaluate(other, tmp_path / "other")


def test_reconstruction_is_deterministic_without_prior_noise(run):
    """prior_noise 0 (the default) starts the decoding flow at the coordinate guess, so the
    seed does not matter; the training noise makes the seed matter."""
    from autoperi_jax.reconstruct import reconstruct_run

    workdir = run[0]

    def frac(seed, noise):
        out = reconstruct_run(
            workdir, "test", limit=4, batch_size=4, seed=seed, progress=False,
            prior_noise=noise,
        )  # fmt: skip
        assert out.settings.prior_noise == (noise if noise is not None else 0.03)
        return np.concatenate([c.frac_coords for c in out.preds])

    np.testing.assert_array_equal(frac(0, 0.0), frac(1, 0.0))
    assert not np.allclose(frac(0, None), frac(1, None))


def test_init_partial_copies_what_fits_and_reads_bundles(run, tmp_path, capsys):
    """``config.init_partial``: a model with another composition head starts from the
    source's parameters wherever path and shape agree (the GNNs, the lattice head) and
    fresh elsewhere (the new head, the z_comp input layer), and says which; a shipped
    bundle name is a source too."""
    from train.trainer import _source

    src, config, _ = run
    source = load_checkpoint(src)["raw_params"]
    tuned = config.copy_and_resolve_references()
    tuned.init_from, tuned.init_partial = str(src), True
    tuned.model.composition_head = "fractions"
    tuned.num_train_steps, tuned.learning_rate, tuned.eval_every = 1, 0.0, 0
    train_and_evaluate(tuned, tmp_path / "partial")
    assert "start fresh" in capsys.readouterr().out
    got = load_checkpoint(tmp_path / "partial")["raw_params"]
    theirs = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(source)}
    same, fresh = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(got):
        key = jax.tree_util.keystr(path)
        if key in theirs and np.shape(theirs[key]) == np.shape(leaf):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(theirs[key]), key)
            same.append(key)
        else:
            fresh.append(key)
    assert any("velocity_field" in k for k in same) and any("lattice_decoder" in k for k in same)
    assert any("fractions" in k for k in fresh) and any("z_comp_0" in k for k in fresh)
    assert not any("z_lattice_0" in k for k in fresh)

    model, params, normalisers = _source(Path("perov_5"))
    assert model["max_atoms"] == 5 and len(normalisers["lattice_mean"]) == 6
    assert "encoder" in params["params"]
