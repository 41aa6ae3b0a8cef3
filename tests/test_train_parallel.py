"""`train_and_evaluate` itself on several devices and processes (slow: ``pytest -m slow``).

* 4 forced CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``) give the same
  losses and parameters as 1 device on the same global batch (``num_shards=4`` in both: the
  padding and the per-shard randomness depend on the shards, not on the devices);
* two local processes (``--coordinator 127.0.0.1:PORT --num-processes 2 --process-id i``, CPU
  gloo collectives), two devices each, train together (with validation on every process)
  and agree with the single-process run; their shared checkpoint restores on one device.

Plain SGD: Adam divides each gradient by its own running RMS, so a near-zero gradient whose
float32 summation order differs between layouts can flip sign and move by a whole learning
rate (see tests/test_parallel.py); SGD compares the sharding exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6

pytestmark = pytest.mark.slow


def _data_dir(path: Path) -> Path:
    import pandas as pd

    from autoperi_jax.datasets import resolve_dataset

    (path / "perov_5").mkdir(parents=True, exist_ok=True)
    for split, n in {"train": 32, "val": 8, "test": 8}.items():
        frame = pd.read_csv(resolve_dataset(f"perov_5:{split}"), nrows=n)
        frame.to_csv(path / "perov_5" / f"{split}.csv", index=False)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("parallel")
    data = _data_dir(base / "data")
    overrides = [
        f"--config.data.data_dir={data}",
        "--config.data.limit_train=32",
        "--config.batch_size=16",
        "--config.num_shards=4",
        "--config.optimizer=sgd",
        "--config.learning_rate=0.01",
        "--config.warmup_steps=0",
        f"--config.num_train_steps={STEPS}",
        "--config.checkpoint_every=3",
        "--config.log_every=1",
        "--config.eval_every=0",
    ]
    return base, overrides


def _cmd(workdir: Path, overrides: list[str], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "autoperi_jax.cli", "train", "--config", "train/configs/test.py",
        "--workdir", str(workdir), *overrides, *extra,
    ]  # fmt: skip


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("AUTOPERI_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "AUTOPERI_DISTRIBUTED"):
        env.pop(k, None)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _result(workdir: Path) -> tuple[list[float], np.ndarray, dict]:
    import jax

    from autoperi_jax.checkpoint import load_checkpoint

    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    ck = load_checkpoint(workdir)
    assert ck["step"] == STEPS
    flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(ck["params"])])
    return losses, flat, json.loads((workdir / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_device(setup):
    base, overrides = setup
    workdir = base / "one"
    proc = subprocess.run(
        _cmd(workdir, overrides), cwd=ROOT, env=_env(1), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses, params, summary = _result(workdir)
    assert summary["num_devices"] == 1 and summary["num_shards"] == 4
    assert len(set(losses)) == STEPS  # the loss moves: training happened
    return losses, params


def test_four_devices_equal_one_device(setup, one_device):
    base, overrides = setup
    workdir = base / "four"
    proc = subprocess.run(
        _cmd(workdir, overrides), cwd=ROOT, env=_env(4), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses, params, summary = _result(workdir)
    assert summary["num_devices"] == 4 and summary["num_processes"] == 1
    np.testing.assert_allclose(losses, one_device[0], rtol=2e-5)
    np.testing.assert_allclose(params, one_device[1], rtol=1e-4, atol=1e-6)


def test_two_processes_equal_one_process(setup, one_device, free_port):
    base, overrides = setup
    workdir = base / "two_processes"
    addr = f"127.0.0.1:{free_port}"
    procs = []
    for i in range(2):
        flags = ["--coordinator", addr, "--num-processes", "2", "--process-id", str(i)]
        # validation (and best-checkpoint metrics) on every process as well
        flags += ["--config.eval_every=3", "--config.data.limit_val=8"]
        pipe = subprocess.PIPE
        cmd = _cmd(workdir, overrides, *flags)
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=_env(2), text=True, stdout=pipe, stderr=pipe)
        )
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    losses, params, summary = _result(workdir)
    assert summary["num_processes"] == 2 and summary["num_devices"] == 4
    assert summary["last_eval"]["step"] == STEPS and summary["best_step"] in (3, 6)
    np.testing.assert_allclose(losses, one_device[0], rtol=2e-5)
    np.testing.assert_allclose(params, one_device[1], rtol=1e-4, atol=1e-6)
