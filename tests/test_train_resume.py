"""Resumable training through the ``autoperi train`` command (subprocesses, as a user runs it).

Every run uses the same tiny config (train/configs/test.py with the overrides below), so the
module's persistent JAX compilation cache lets every run after the first skip compilation.
The default suite runs the corruption check (it also resumes bit for bit: about 75 s on 2
busy cores, most of it the first compilation); kill -9, SIGTERM and the non-finite guard
carry the ``slow`` marker (``pytest -m slow``; the guard's step logic is also tested quickly
in test_train_guard.py). Checks:

* kill -9 mid-way, re-run the same command: the final parameters (EMA and raw) equal those
  of an uninterrupted run with the same seed (to 1e-6; they are in fact bit-identical);
* SIGTERM mid-way: the run saves a checkpoint at the current step and exits with code 0;
  re-running resumes and ends on the uninterrupted run's parameters;
* a corrupted latest checkpoint: the run warns, resumes from the previous one, and again
  ends on the same parameters;
* the non-finite guard: poisoned batches (NaN coordinates) are skipped and counted, and
  ``max_nonfinite_steps`` of them in a row stop the run (exit code 3) with a message that
  names the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12

POISON_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import train.trainer as trainer
    from autoperi_jax.graph import BatchIterator

    BAD = {int(x) for x in os.environ["POISON_STEPS"].split(",")}

    class Poisoned(BatchIterator):
        # NaN coordinates in the batches of the given 0-based step indices.
        def __next__(self):
            batch = super().__next__()
            index = self.epoch * self.steps_per_epoch + self.step_in_epoch - 1
            if index in BAD:
                nodes = dict(batch.nodes)
                nodes["frac_coords"] = np.full_like(nodes["frac_coords"], np.nan)
                batch = batch._replace(nodes=nodes)
            return batch

    trainer.BatchIterator = Poisoned
    from autoperi_jax.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def make_data_dir(path: Path, rows: dict[str, int]) -> Path:
    """The first rows of the bundled Perov-5 splits as a small data dir."""
    import pandas as pd

    from autoperi_jax.datasets import resolve_dataset

    (path / "perov_5").mkdir(parents=True, exist_ok=True)
    for split, n in rows.items():
        frame = pd.read_csv(resolve_dataset(f"perov_5:{split}"), nrows=n)
        frame.to_csv(path / "perov_5" / f"{split}.csv", index=False)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data dir, compilation cache and the override list shared by every run."""
    base = tmp_path_factory.mktemp("resume")
    data = make_data_dir(base / "data", {"train": 32, "val": 8, "test": 8})
    environ = dict(os.environ)
    environ.pop("XLA_FLAGS", None)
    environ.update(
        JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=str(ROOT),
    )
    overrides = [
        f"--config.data.data_dir={data}",
        "--config.data.limit_train=32",
        "--config.batch_size=8",
        f"--config.num_train_steps={STEPS}",
        "--config.checkpoint_every=2",
        "--config.keep_checkpoints=3",
        "--config.log_every=2",
        "--config.eval_every=0",
        "--config.ema_decay=0.9",
        "--config.tensorboard=true",
    ]
    return {"base": base, "env": environ, "overrides": overrides}


def _cmd(env, workdir: Path, *extra: str, script: str | None = None) -> list[str]:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "autoperi_jax.cli"]
    return [
        *head, "train", "--config", "train/configs/test.py", "--workdir", str(workdir),
        *env["overrides"], *extra,
    ]  # fmt: skip


def _run(env, workdir: Path, *extra: str, script: str | None = None, extra_env=None):
    proc = subprocess.run(
        _cmd(env, workdir, *extra, script=script),
        cwd=ROOT,
        env={**env["env"], **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc


def _start(env, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(env, workdir),
        cwd=ROOT,
        env=env["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit())


def _wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, timeout: float = 600) -> int:
    t = time.time()
    while time.time() - t < timeout:
        steps = _steps(workdir)
        if steps:
            return steps[-1]
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended before its first checkpoint:\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def _params(workdir: Path) -> dict[str, np.ndarray]:
    import jax

    from autoperi_jax.checkpoint import load_checkpoint

    ck = load_checkpoint(workdir)
    assert ck["step"] == STEPS
    out = {}
    for name in ("params", "raw_params"):
        leaves = jax.tree.leaves(ck[name])
        out[name] = np.concatenate([np.ravel(np.asarray(x)) for x in leaves])
    return out


def _assert_same_params(workdir: Path, reference: dict[str, np.ndarray]) -> None:
    got = _params(workdir)
    for name in ("params", "raw_params"):
        np.testing.assert_allclose(got[name], reference[name], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(env):
    """The uninterrupted run (it also fills the compilation cache)."""
    workdir = env["base"] / "reference"
    proc = _run(env, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["end_step"] == STEPS and not summary["interrupted"]
    assert summary["resumed_from"] is None and summary["nonfinite_total"] == 0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(2, STEPS + 1, 2))
    info = records[0]
    assert info["split"] == "info" and info["alpha_gen"] == 0.0 and info["beta_phys"] == 0.0
    assert _steps(workdir) == [STEPS - 4, STEPS - 2, STEPS]  # keep_checkpoints = 3
    params = _params(workdir)
    assert not np.allclose(params["params"], params["raw_params"])  # the EMA is kept
    return workdir, params


@pytest.mark.slow
def test_kill9_then_rerun_equals_uninterrupted(env, reference):
    _, ref = reference
    workdir = env["base"] / "killed"
    proc = _start(env, workdir)
    _wait_for_checkpoint(proc, workdir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _steps(workdir)
    assert before and before[-1] < STEPS, before  # killed mid-way
    again = _run(env, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] == before[-1] and summary["end_step"] == STEPS
    _assert_same_params(workdir, ref)


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resumes(env, reference):
    _, ref = reference
    workdir = env["base"] / "terminated"
    proc = _start(env, workdir)
    _wait_for_checkpoint(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["interrupted"] and summary["signal"] == signal.SIGTERM
    stopped = summary["end_step"]
    assert stopped < STEPS and _steps(workdir)[-1] == stopped  # saved at the current step
    assert f"saved checkpoint at step {stopped}" in out
    again = _run(env, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] == stopped and not summary["interrupted"]
    _assert_same_params(workdir, ref)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_warns_and_resumes_from_previous(env, reference):
    ref_dir, ref = reference
    workdir = env["base"] / "corrupt"
    shutil.copytree(ref_dir, workdir)
    (workdir / "summary.json").unlink()
    files = [f for f in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(b"\x00garbage")
    proc = _run(env, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint step {STEPS}" in proc.stderr and "unreadable" in proc.stderr
    assert f"restored checkpoint at step {STEPS - 2}" in proc.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] == STEPS - 2 and summary["end_step"] == STEPS
    _assert_same_params(workdir, ref)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop(env, reference):
    """Batches 2 and 3 (0-based) are poisoned: skipped and counted, training goes on;
    batches 6, 7, 8, ... are poisoned: the third in a row (step 9) stops the run."""
    workdir = env["base"] / "poisoned"
    proc = _run(
        env,
        workdir,
        "--config.max_nonfinite_steps=3",
        script=POISON_SCRIPT,
        extra_env={"POISON_STEPS": "2,3,6,7,8,9,10,11"},
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "training stopped at step 9: 3 consecutive steps (steps 7..9)" in proc.stderr
    assert "(5 in total)" in proc.stderr
    assert "The last good checkpoint is step 8" in proc.stderr
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert train[2]["skipped"] == 0 and train[4]["skipped"] == 2 and train[6]["skipped"] == 0
    assert train[6]["nonfinite_total"] == 2 and train[6]["nonfinite_run"] == 0
    assert np.isfinite(train[2]["loss"]) and np.isfinite(train[6]["loss"])
    assert _steps(workdir)[-1] == 8  # nothing saved after the guard fired
    import jax

    from autoperi_jax.checkpoint import load_checkpoint

    ck = load_checkpoint(workdir)
    assert ck["step"] == 8
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ck["raw_params"]))
