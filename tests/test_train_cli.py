"""Config loading and --config.KEY=VALUE overrides of `autoperi train`."""

import pytest

from autoperi_jax.cli import build_parser
from train.cli import apply_overrides, load_config
from train.trainer import build_model, build_settings


def test_configs_build_models():
    for name in ("train/configs/perov_5.py", "train/configs/test.py"):
        c = load_config(name)
        model = build_model(c)
        settings = build_settings(c)
        assert model.max_atoms == settings.max_atoms == c.model.max_atoms
        assert settings.flow_cutoff == model.dec_cutoff


def test_overrides_are_typed():
    c = load_config("train/configs/test.py")
    apply_overrides(
        c,
        [
            "--config.model.image_embedding=raw",
            "--config.num_train_steps=7",
            "--config.learning_rate=1e-4",
            "--config.data.augment_shift=true",
            "--config.data.limit_train=32",
            "--config.data.properties=()",
        ],
    )
    assert c.model.image_embedding == "raw"
    assert c.num_train_steps == 7 and isinstance(c.num_train_steps, int)
    assert c.learning_rate == 1e-4
    assert c.data.augment_shift is True
    assert c.data.limit_train == 32
    assert tuple(c.data.properties) == ()
    with pytest.raises(KeyError):
        apply_overrides(c, ["--config.model.no_such_field=1"])
    with pytest.raises(ValueError):
        apply_overrides(c, ["--config.num_train_steps=many"])


def test_cli_collects_overrides():
    args = build_parser().parse_args(
        ["train", "--config", "c.py", "--workdir", "w", "--config.a=1", "--config.b.c=x"]
    )
    assert args.config == "c.py" and args.workdir == "w"
    assert args.overrides == ["--config.a=1", "--config.b.c=x"]
    assert args.coordinator is None and args.num_processes is None and args.process_id is None
    multi = build_parser().parse_args(
        ["train", "--config", "c.py", "--workdir", "w", "--coordinator", "10.0.0.1:1234",
         "--num-processes", "4", "--process-id", "3"]
    )  # fmt: skip
    assert (multi.coordinator, multi.num_processes, multi.process_id) == ("10.0.0.1:1234", 4, 3)
    r = build_parser().parse_args(["reconstruct", "--workdir", "w", "--out", "o.extxyz"])
    assert r.split == "test" and r.out == "o.extxyz"


def test_cli_initializes_distributed_before_any_jax_computation(tmp_path, free_port):
    """The multi-host flags take effect before any import or JAX call of the commands can
    compute (jax-md, imported by the eval plugin until the protocol module, computes at import
    time: "jax.distributed.initialize() must be called before any JAX calls"). One process
    with a coordinator gets past the set-up and stops at the missing config file. (The
    two-process training test is marked slow.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    drop = ("AUTOPERI_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "AUTOPERI_DISTRIBUTED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    cmd = [sys.executable, "-m", "autoperi_jax.cli", "train", "--config", str(tmp_path / "no.py"),
           "--workdir", str(tmp_path / "w"), "--coordinator", f"127.0.0.1:{free_port}",
           "--num-processes", "1", "--process-id", "0"]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert "must be called before" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode != 0 and "no.py" in proc.stderr, proc.stderr[-2000:]
