"""Helpers for tests, shipped to users: random crystals and graphs, the symmetry operations
a crystal model must respect, and symmetry assertions.

Every operation below maps a `autoperi_jax.graph.CrystalGraph` to another description of
the SAME periodic crystal (DESIGN.md, "Symmetries the model must respect"):

* `rotate_graph`: rigid rotation (cell rows -> R row; fractional coordinates fixed);
* `permute_graph`: renumber the atoms (edges follow their atoms);
* `translate_graph`: move every atom by t (fractional), wrap into [0, 1) and update
  the image vectors with `autoperi_jax.graph.rewrap`;
* `rewrap_atom`: describe one atom by another of its periodic images (f_a -> f_a + n),
  with image vectors k_aj -> k_aj + n, k_ia -> k_ia - n so every edge vector is kept;
* padding: `batch_graphs` with a larger `PaddingBudget` (`pad_more`).

`assert_symmetry` compares a function on the original and the transformed input (with an
optional map applied to the original output, e.g. a rotation of vector outputs), with
float32 tolerances, in the spirit of `e3nn_jax.utils.assert_equivariant`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.crystal import Crystal, lattice_params_to_cell, random_rotation
from autoperi_jax.graph import (
    CrystalGraph,
    GraphSettings,
    PaddingBudget,
    batch_graphs,
    crystal_to_graph,
    rewrap,
)
from autoperi_jax.model import ModelSettings, init_params
from autoperi_jax.nn import Autoencoder

__all__ = [
    "assert_symmetry",
    "max_difference",
    "pad_more",
    "permute_graph",
    "random_batch",
    "random_crystal",
    "random_graph",
    "random_rotation",
    "rewrap_atom",
    "rotate_graph",
    "rotation_on_irreps",
    "tiny_model",
    "tiny_params",
    "translate_graph",
]

DEFAULT_SPECIES = (8, 9, 7, 22, 38, 56, 41, 73, 3, 11, 19, 55)


def random_crystal(
    rng: np.random.Generator,
    n_atoms: int | tuple[int, int] = (2, 5),
    species: Sequence[int] = DEFAULT_SPECIES,
    length_range: tuple[float, float] = (3.3, 5.0),
    angle_jitter: float = 10.0,
    min_distance: float = 1.0,
    max_tries: int = 200,
) -> Crystal:
    """A random (physically arbitrary) crystal with no two atoms closer than
    ``min_distance``: lengths uniform in ``length_range``, angles 90 +- ``angle_jitter``
    degrees, uniform fractional coordinates, species drawn from ``species``.

    Args:
      rng: explicit numpy generator.
      n_atoms: a count or an inclusive range.
      species: atomic numbers to draw from.
      length_range: cell lengths (A).
      angle_jitter: maximum deviation of the angles from 90 degrees.
      min_distance: rejection threshold (A).
      max_tries: attempts before giving up.
    """
    for _ in range(max_tries):
        n = n_atoms if isinstance(n_atoms, int) else int(rng.integers(n_atoms[0], n_atoms[1] + 1))
        params = np.concatenate(
            [rng.uniform(*length_range, size=3), 90.0 + rng.uniform(-1, 1, 3) * angle_jitter]
        )
        cell = lattice_params_to_cell(params)
        c = Crystal(cell, rng.uniform(size=(n, 3)), rng.choice(np.asarray(species), size=n))
        if c.min_distance() >= min_distance:
            return c
    raise RuntimeError("could not draw a crystal satisfying min_distance")


def random_graph(
    rng: np.random.Generator, settings: GraphSettings | float = 5.0, **kwargs: Any
) -> CrystalGraph:
    """`random_crystal` as a periodic graph (``kwargs`` go to `random_crystal`)."""
    if not isinstance(settings, GraphSettings):
        settings = GraphSettings(cutoff=float(settings))
    return crystal_to_graph(random_crystal(rng, **kwargs), settings)


def random_batch(
    rng: np.random.Generator,
    n_graphs: int = 3,
    settings: GraphSettings | float = 5.0,
    budget: PaddingBudget | None = None,
    **kwargs: Any,
):
    """A padded `jraph.GraphsTuple` of ``n_graphs`` random graphs (numpy arrays).

    Returns:
      (batch, graphs): the padded batch and the unpadded `CrystalGraph` list.
    """
    graphs = [random_graph(rng, settings, **kwargs) for _ in range(n_graphs)]
    return batch_graphs(graphs, budget), graphs


# ---------------------------------------------------------------- symmetry operations
def rotate_graph(g: CrystalGraph, rotation: np.ndarray) -> CrystalGraph:
    """Rigid rotation: Cartesian x -> R x, i.e. ``cell -> cell @ R.T``.

    Args:
      g: the graph.
      rotation: [3, 3] proper rotation R.
    """
    return g._replace(cell=np.asarray(g.cell) @ np.asarray(rotation).T)


def permute_graph(g: CrystalGraph, perm: np.ndarray) -> CrystalGraph:
    """Renumbers atoms: new atom ``a`` is old atom ``perm[a]``; edges follow.

    Args:
      g: the graph.
      perm: [n_atoms] permutation.
    """
    perm = np.asarray(perm)
    inv = np.argsort(perm)
    return g._replace(
        numbers=np.asarray(g.numbers)[perm],
        frac_coords=np.asarray(g.frac_coords)[perm],
        senders=inv[g.senders],
        receivers=inv[g.receivers],
    )


def translate_graph(g: CrystalGraph, shift: np.ndarray) -> CrystalGraph:
    """Moves every atom by ``shift`` [3] (fractional), wrapping into [0, 1) with the
    image vectors updated (`autoperi_jax.graph.rewrap`)."""
    frac, shifts = rewrap(
        np.asarray(g.frac_coords) + np.asarray(shift), g.senders, g.receivers, g.shifts
    )
    return g._replace(frac_coords=frac, shifts=shifts)


def rewrap_atom(g: CrystalGraph, atom: int, image: Sequence[int]) -> CrystalGraph:
    """Describes atom ``atom`` by its periodic image ``f + n`` (``n = image``).

    Every edge keeps its Cartesian vector: with n_a = n and 0 for the other atoms,
    k'_ij = k_ij + n_i - n_j (the inverse of the update in `autoperi_jax.graph.rewrap`).
    The coordinate of ``atom`` leaves [0, 1) unless ``image`` is 0.
    """
    n = np.zeros((len(g.numbers), 3), np.int64)
    n[atom] = np.asarray(image)
    frac = np.asarray(g.frac_coords, np.float64) + n
    shifts = np.asarray(g.shifts) + n[g.receivers] - n[g.senders]
    return g._replace(frac_coords=frac, shifts=shifts)


def pad_more(
    graphs: Sequence[CrystalGraph],
    extra_nodes: int = 7,
    extra_edges: int = 13,
    extra_graphs: int = 2,
):
    """`batch_graphs` of ``graphs`` with a budget larger than the tightest one."""
    n = sum(len(g.numbers) for g in graphs)
    e = sum(len(g.senders) for g in graphs)
    return batch_graphs(
        graphs, PaddingBudget(n + 1 + extra_nodes, e + extra_edges, len(graphs) + 1 + extra_graphs)
    )


def rotation_on_irreps(irreps: Any, rotation: np.ndarray) -> np.ndarray:
    """Block-diagonal matrix D(R) acting on an e3nn irreps layout ([dim, dim]).

    ``x_rotated = x @ D.T`` for a feature vector x laid out as ``irreps``.
    """
    return np.asarray(e3nn.Irreps(irreps).D_from_matrix(np.asarray(rotation)))


# ------------------------------------------------------------------------ tiny model
def tiny_model(image_embedding: str = "self_image", max_atoms: int = 5, **overrides: Any):
    """A very small `autoperi_jax.nn.Autoencoder` and matching `ModelSettings` for tests
    (cutoffs 4 A, l <= 1, two layers, widths 4-16).

    Returns:
      (model, settings).
    """
    fields = dict(
        max_atoms=max_atoms, image_embedding=image_embedding, enc_layers=2,
        enc_irreps="8x0e+4x1o", enc_cutoff=5.0, dec_layers=2, dec_irreps="8x0e+4x1o",
        dec_cutoff=4.0, sh_lmax=1, edge_channels=4, mlp_hidden=16, embed_features=8,
        head_hidden=16, latent_lattice=3, latent_comp=4, latent_struct=5, connect_cutoff=4.0,
    )  # fmt: skip
    fields.update(overrides)
    model = Autoencoder(**fields)
    settings = ModelSettings(
        max_atoms=max_atoms,
        flow_cutoff=model.dec_cutoff,
        connect_cutoff=model.connect_cutoff,
        flow_edges_per_crystal=200,
        connect_edges_per_crystal=200,
        num_steps=3,
    )
    return model, settings


@functools.lru_cache(maxsize=8)
def tiny_params(model: Any, settings: Any, seed: int = 0) -> Any:
    """Initial parameters of a (hashable) model, cached per process so test modules that
    use the same tiny model share one initialisation (and its compilation)."""
    batch, _ = random_batch(np.random.default_rng(seed), 2, model.enc_cutoff, n_atoms=(2, 3))
    batch = jax.tree.map(jnp.asarray, batch)
    return jax.jit(lambda k, b: init_params(model, b, settings, k))(jax.random.PRNGKey(seed), batch)


# ------------------------------------------------------------------------- assertions
def assert_symmetry(
    fn: Callable[[Any], Any],
    x: Any,
    x_transformed: Any,
    transform_output: Callable[[Any], Any] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    msg: str = "",
) -> None:
    """Asserts ``fn(x_transformed) == transform_output(fn(x))`` (trees, float32 tolerances).

    Args:
      fn: function of one input returning an array or a pytree of arrays.
      x, x_transformed: the input and its symmetry-transformed version.
      transform_output: how the output transforms (identity = invariance).
      atol, rtol: tolerances (float32 defaults).
      msg: prefix of the failure message (name the symmetry).
    """
    y = jax.device_get(fn(x))
    y_t = jax.device_get(fn(x_transformed))
    expected = transform_output(y) if transform_output is not None else y
    chex.assert_trees_all_close(y_t, expected, atol=atol, rtol=rtol, custom_message=msg)


def max_difference(a: Any, b: Any) -> float:
    """Largest absolute difference between two pytrees of arrays."""
    diffs = jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))), a, b)
    return float(max(jax.tree.leaves(diffs)))
