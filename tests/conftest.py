"""Shared fixtures. Tests never touch the user's cache: AUTOPERI_CACHE points at a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("AUTOPERI_CACHE")
    os.environ["AUTOPERI_CACHE"] = str(tmp_path_factory.mktemp("autoperi_cache"))
    yield
    if old is None:
        os.environ.pop("AUTOPERI_CACHE", None)
    else:
        os.environ["AUTOPERI_CACHE"] = old


@pytest.fixture(scope="session")
def perov_test():
    """Every Perov-5 test structure as a GraphDataset (bundled copy, 3,785 crystals)."""
    from autoperi_jax.datasets import load_dataset

    return load_dataset("perov_5:test", progress=False)


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
