"""The shipped pretrained Perov-5 model: loads without network or training run, samples valid
crystals deterministically, its recorded configs are the repository's, the CLI takes
``--pretrained``, and the README's results table is what `autoperi eval` wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import autoperi_jax
from autoperi_jax.api import available_pretrained, pretrained_path
from eval.metrics import smact_validity, structure_validity
from eval.model_card import check_readme, render_table
from train.cli import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    return autoperi_jax.load_pretrained("perov_5")


def test_shipped_and_listed():
    assert "perov_5" in available_pretrained()
    path = pretrained_path("perov_5")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    # two models: generation (autoencoder + flow + predictor, 11 MB) and the CSP flow (6 MB)
    assert size < 24e6, f"shipped model is {size / 1e6:.1f} MB"
    assert (path / "MODEL_CARD.md").exists()
    with pytest.raises(FileNotFoundError, match="perov_5"):  # the message lists what exists
        pretrained_path("mp_20_does_not_exist")


def test_fixed_key_samples_are_valid_and_identical(gen):
    key = jax.random.key(0)
    a = gen.sample(key, 12, batch_size=16)
    b = gen.sample(key, 12, batch_size=16)
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.cell, y.cell)
        np.testing.assert_array_equal(x.frac_coords, y.frac_coords)
        np.testing.assert_array_equal(x.numbers, y.numbers)
    # Perov-5 cells hold 5 atoms; structural validity is CDVAE's rule (all distances >=
    # 0.5 A, volume >= 0.1 A^3); the sampler rejects candidates that are not charge
    # balanced under SMACT (its composition check) or that have atoms closer than
    # accept_min_ratio of their covalent-radius sum (ASE neighbour list below).
    from ase.neighborlist import neighbor_list

    from autoperi_jax.elements import COVALENT_RADIUS

    assert all(len(c.numbers) == 5 for c in a)
    assert all(structure_validity(c) for c in a)
    assert all(smact_validity(c.numbers) for c in a)
    assert gen.sampler.composition_check and gen.sampler.accept_min_ratio > 0
    for c in a:
        i, j, d = neighbor_list("ijd", c.to_ase(), 5.0)
        r = np.asarray(COVALENT_RADIUS)[c.numbers]
        assert np.min(d / (r[i] + r[j])) >= gen.sampler.accept_min_ratio - 1e-4
    other = gen.sample(jax.random.key(1), 12, batch_size=16)
    assert not all(np.array_equal(x.frac_coords, y.frac_coords) for x, y in zip(a, other))


def test_unique_sampling_keeps_first_occurrences_in_draw_order(gen, tmp_path):
    """``unique=True`` returns the draw-order first occurrences of the plain draws (same key,
    same batches): the greedy rule re-done here with pymatgen's default StructureMatcher,
    not with the filter; renamed in output order; a batch budget that cannot deliver n
    warns and returns what it has."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    key = jax.random.key(2)
    plain = gen.sample(key, 48, batch_size=16)
    sm = StructureMatcher()
    ss = [c.to_pymatgen() for c in plain]
    first: list[int] = []  # a draw is kept iff it matches no draw kept before it
    for i in range(len(ss)):
        if not any(sm.fit(ss[i], ss[j]) for j in first):
            first.append(i)
    assert len(first) < len(plain)  # this key draws a duplicate (crystal 11) in batch 0
    n = min(len(first), 40)
    uniq = gen.sample(key, n, batch_size=16, unique=True)
    assert [c.name for c in uniq] == [f"sample_{i:06d}" for i in range(n)]
    for c, i in zip(uniq, first):
        np.testing.assert_array_equal(c.frac_coords, plain[i].frac_coords)
        np.testing.assert_array_equal(c.numbers, plain[i].numbers)
        assert c.properties == plain[i].properties
    with pytest.warns(UserWarning, match="distinct crystals of the 20 asked for"):
        short = gen.sample(key, 20, batch_size=16, unique=True, max_batches=1)
    assert len(short) == sum(i < 16 for i in first)
    # the CLI's writer keeps what it found (ASE reads the file back)
    from ase.io import read

    from autoperi_jax.io import write_samples

    out = tmp_path / "u.extxyz"
    with pytest.warns(UserWarning, match="distinct crystals"):
        written = write_samples(gen, key, 20, out, batch_size=16, progress=False, unique=True,
                                max_batches=1)  # fmt: skip
    assert written == len(short) == len(read(out, ":"))
    with pytest.raises(ValueError, match="unique=True sampling only"):
        gen.sample(key, 4, batch_size=16, max_batches=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        gen.sample(key, 4, batch_size=0)


def test_samples_convert_to_ase_and_pymatgen(gen, tmp_path):
    from ase.io import read
    from pymatgen.core import Structure

    (c,) = gen.sample(jax.random.key(3), 1, batch_size=16)
    atoms, structure = c.to_ase(), c.to_pymatgen()
    np.testing.assert_allclose(atoms.cell[:], c.cell, atol=1e-6)
    assert list(atoms.numbers) == list(c.numbers)
    np.testing.assert_allclose(structure.lattice.matrix, c.cell, atol=1e-6)
    c.to_cif(tmp_path / "x.cif")
    back = Structure.from_file(tmp_path / "x.cif")
    assert back.composition.reduced_formula == structure.composition.reduced_formula
    assert len(read(tmp_path / "x.cif")) == 5


def test_encode_decode_reconstruct(gen, perov_test):
    crystals = [perov_test.crystal(i) for i in range(8)]
    z = gen.encode(crystals)
    assert z.shape == (8, 72) and np.isfinite(z).all()
    recon = gen.reconstruct(crystals, jax.random.key(0), batch_size=8)
    assert [c.name for c in recon] == [c.name for c in crystals]
    # The deterministic encoder + decoder recover the composition of real crystals.
    same = [sorted(r.numbers) == sorted(c.numbers) for r, c in zip(recon, crystals)]
    assert np.mean(same) >= 0.75


def test_prior_noise_zero_decodes_each_latent_deterministically(gen, perov_test):
    """``prior_noise=0`` (sampler override): the decoded structure of a z does not depend
    on the key; with the training noise it does."""
    z = gen.encode([perov_test.crystal(i) for i in range(4)])
    quiet = autoperi_jax.load_pretrained("perov_5", prior_noise=0.0)
    assert quiet.settings.prior_noise == gen.settings.prior_noise > 0

    def frac(g, seed):
        return np.concatenate([c.frac_coords for c in g.decode(z, jax.random.key(seed), 4)])

    np.testing.assert_array_equal(frac(quiet, 0), frac(quiet, 1))
    assert not np.allclose(frac(gen, 0), frac(gen, 1))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


# Options that did not exist when the model was trained (their defaults reproduce what the
# trainer did then) and options that do not change the trained parameters.
# data.data_dir: where the data was on the training machine (None in the bundle).
NOT_RECORDED_OK = {"progress", "reuse_flow", "data.data_dir"}


@pytest.mark.parametrize(
    "name,config,recorded",
    [
        ("perov_5", "perov_5", "train_config.json"),
        ("perov_5", "flow_perov_5", None),
        ("mp_20", "mp_20", "train_config.json"),
        ("mp_20", "flow_mp_20", None),
    ],
)
def test_shipped_model_was_trained_with_the_repository_configs(name, config, recorded):
    path = pretrained_path(name)
    if recorded:
        saved = json.loads((path / recorded).read_text())
    else:
        saved = json.loads((path / "meta.json").read_text())["config"]
    repo, saved = _flat(load_config(config).to_dict()), _flat(saved)
    differ = {
        k: (repo.get(k), saved[k])
        for k in saved
        if k not in NOT_RECORDED_OK and repo.get(k, "MISSING") != saved[k]
    }
    assert not differ, f"train/configs/{config}.py differs from the shipped model: {differ}"


def test_readme_results_table_is_the_shipped_eval_output():
    assert check_readme(ROOT / "README.md") == []
    table = render_table()
    gen = json.loads((pretrained_path("perov_5") / "eval" / "gen.json").read_text())
    assert f"{100 * gen['metrics']['cov_recall']:.2f} %" in table


def _cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "autoperi_jax.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_cli_sample_pretrained(tmp_path):
    from ase.io import read

    out = tmp_path / "s.extxyz"
    args = ["sample", "--pretrained", "perov_5", "-n", "5", "--batch-size", "8"]
    r = _cli(*args, "--out", str(out), "--no-progress", "--seed", "2", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    frames = read(out, ":")
    assert len(frames) == 5 and all(len(f) == 5 for f in frames)
    assert all("heat_ref" in f.info for f in frames)
    # without the candidate checks: one candidate per crystal, as drawn
    r = _cli(*args, "--out", str(tmp_path / "raw.extxyz"), "--no-progress", "--no-checks",
             cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(read(tmp_path / "raw.extxyz", ":")) == 5


def test_cli_sample_refuses_bad_options(tmp_path, capsys, monkeypatch):
    """Bad options exit 2 with one line naming the problem, before anything is written
    (in-process: the same ``main`` the console script runs, without an interpreter start)."""
    from autoperi_jax.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "s.extxyz"
    out.write_text("kept")
    args = ["sample", "--pretrained", "perov_5", "-n", "5", "--batch-size", "8", "--out", str(out)]
    for extra, message in [
        (["--max-batches", "2"], "add --unique"),
        (["--condition", "band_gap=1"], "conditioned on heat_ref, dir_gap only"),
        (["--batch-size", "0"], "batch_size must be >= 1"),  # checked by the sampler itself
    ]:
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["sample", "--pretrained", "nope", "-n", "1", "--out", str(out)]) == 2
    assert "perov_5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*args, "--workdir", "runs/x"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert out.read_text() == "kept"  # nothing written is lost


@pytest.mark.slow
def test_demo_reproduces_the_shipped_demo_metrics(tmp_path):
    """`make demo`'s commands give the numbers in eval/demo.json (and the README), and its
    files are readable by ASE and pymatgen. Same machine: identical; elsewhere XLA's
    floating point may move a sample or two, hence the 1 % tolerance."""
    from ase.io import read
    from pymatgen.core import Structure

    from eval.model_card import DEMO_ROWS

    s = ["sample", "--pretrained", "perov_5", "--seed", "0", "--no-progress"]
    r = _cli(*s, "-n", "1200", "--out", str(tmp_path / "samples.extxyz"), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cifs = tmp_path / "cubic_cifs"
    r = _cli(*s, "-n", "8", "--spacegroup", "221", "--out", str(cifs), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "--task", "gen", "--samples", str(tmp_path / "samples.extxyz"),
             "--reference", "perov_5:test", "--out", str(tmp_path / "report"), "--quiet",
             cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(read(tmp_path / "samples.extxyz", ":")) == 1200
    files = sorted(cifs.glob("*.cif"))
    assert len(files) == 8 and all(len(Structure.from_file(f)) == 5 for f in files)
    got = json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"]
    want = json.loads((pretrained_path("perov_5") / "eval" / "demo.json").read_text())["metrics"]
    for key, _, _ in DEMO_ROWS:
        assert got[key] == pytest.approx(want[key], abs=0.01), key
    assert (tmp_path / "report" / "report.md").exists()
    assert list((tmp_path / "report").glob("*.png"))


def test_cli_reconstruct_pretrained(tmp_path):
    from ase.io import read

    out = tmp_path / "r.extxyz"
    args = ["reconstruct", "--pretrained", "perov_5", "--split", "test", "--limit", "8"]
    r = _cli(*args, "--out", str(out), "--match", "--no-progress", "--batch-size", "8", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    frames = read(out, ":")
    assert len(frames) == 8
    metrics = json.loads(r.stdout[r.stdout.index("{") :])
    assert metrics["n"] == 8 and metrics["match_rate"] >= 0.75
