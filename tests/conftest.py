"""Shared fixtures. Tests never touch the user's cache: AUTOPERI_CACHE points at a temp dir,
and the CLI's persistent compilation cache is off (AUTOPERI_XLA_CACHE=off: each test compiles
what it runs, as before; tests/test_cli.py checks the cache in processes of its own).

Tests never touch the network (AUTOPERI_OFFLINE=1; tests/test_download.py serves its files
from 127.0.0.1) and read the benchmark splits by path: $AUTOPERI_DATA, by default the
project's shared data folder beside the checkout (``../shared/data``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ["AUTOPERI_OFFLINE"] = "1"
if not os.environ.get("AUTOPERI_DATA") and SHARED_DATA.is_dir():
    os.environ["AUTOPERI_DATA"] = str(SHARED_DATA)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    new = {
        "AUTOPERI_CACHE": str(tmp_path_factory.mktemp("autoperi_cache")),
        "AUTOPERI_XLA_CACHE": "off",
    }
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def perov_test():
    """Every Perov-5 test structure as a GraphDataset (3,785 crystals, read by path)."""
    from autoperi_jax.datasets import load_dataset

    return load_dataset("perov_5:test", progress=False)


def _dataset_head(spec: str, rows: int) -> list:
    """The first ``rows`` structures of a benchmark split (read by path) as `Crystal`s."""
    import pandas as pd

    from autoperi_jax.crystal import Crystal
    from autoperi_jax.datasets import resolve_dataset

    frame = pd.read_csv(resolve_dataset(spec), nrows=rows)
    return [Crystal.from_cif(cif) for cif in frame["cif"]]


@pytest.fixture(scope="session")
def mp20_test_head() -> list:
    """The first 80 MP-20 test crystals (1-20 atoms, many species)."""
    return _dataset_head("mp_20:test", 80)


@pytest.fixture(scope="session")
def mp20_largest(mp20_test_head) -> list:
    """The three largest of `mp20_test_head` (16-20 atoms)."""
    return sorted(mp20_test_head, key=lambda c: -c.num_atoms)[:3]


@pytest.fixture(scope="session")
def carbon24_test_head() -> list:
    """The first 300 Carbon-24 test crystals (cells down to 1.8 A plane spacing)."""
    return _dataset_head("carbon_24:test", 300)


@pytest.fixture(scope="session")
def tiny_perov_data(tmp_path_factory) -> str:
    """A data dir (for ``config.data.data_dir``) holding the first ``limit_SPLIT`` rows of
    each Perov-5 split, with the limits of ``train/configs/test.py``, so the tiny
    training runs preprocess little."""
    import pandas as pd

    from autoperi_jax.datasets import resolve_dataset
    from train.cli import load_config

    config = load_config("train/configs/test.py")
    data_dir = tmp_path_factory.mktemp("tiny_perov_5")
    (data_dir / "perov_5").mkdir()
    for split in ("train", "val", "test"):
        rows = config.data[f"limit_{split}"]
        frame = pd.read_csv(resolve_dataset(f"perov_5:{split}"), nrows=rows)
        frame.to_csv(data_dir / "perov_5" / f"{split}.csv", index=False)
    return str(data_dir)


@pytest.fixture
def x64():
    """Enables float64 in JAX for one test and restores the previous setting."""
    import jax

    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def random_triclinic(rng: np.random.Generator, n_atoms: int, min_len: float = 2.0):
    """A random right-handed triclinic cell with lattice vectors of 2-6 A and random atoms."""
    from autoperi_jax.crystal import Crystal, lattice_params_to_cell

    while True:
        lengths = rng.uniform(min_len, 6.0, size=3)
        angles = rng.uniform(60.0, 120.0, size=3)
        cell = lattice_params_to_cell(np.concatenate([lengths, angles]))
        vol = np.linalg.det(cell)
        if vol > 0.3 * np.prod(lengths):  # reject nearly flat cells
            break
    return Crystal(cell, rng.uniform(size=(n_atoms, 3)), rng.integers(1, 90, size=n_atoms))
