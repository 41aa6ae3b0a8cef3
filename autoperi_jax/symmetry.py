"""Space-group operations and a differentiable symmetrisation onto a requested group.

A generative model conditioned on a space group decodes a structure that is only close to
that group. `symmetrize` projects it onto the group, inside ``jax.jit``:

1. lattice: the metric tensor ``G = cell @ cell.T`` is averaged over the group's rotations,
   ``G' = mean_g W_g^T G W_g`` (the Reynolds projection onto invariant metrics), and the cell
   is rebuilt with metric ``G'`` in the input's orientation (``cell' = chol(G') Q`` where
   ``cell = chol(G) Q``);
2. origin: the group's operations hold for one origin of the standard setting; the origin
   ``t`` of the decoded structure is found among candidates built from a pivot atom
   (``(I - W_k) t = x_j - W_k x_p - w_k`` for a key operation k and every atom j of the
   pivot's species), scored by how well the images of the atoms fall on atoms, and refined
   by least squares;
3. positions: for every operation ``g: x -> W (x - t) + w + t`` each image of atom i is
   matched to the nearest atom of the same species (periodic distance in the metric
   ``G'``), and the matched atoms are mapped back and averaged,
   ``x_i' = mean_g g^-1(x_{pi_g(i)})`` (the Reynolds operator, a projection onto the
   configurations invariant under the group), a fixed number of times;
4. axis setting: the decoded axes may be a permutation of the standard setting's axes (a
   tetragonal cell with its 4-fold axis along a): steps 1-3 run for all 6 axis permutations
   (operations conjugated by the permutation) and the one that moves the atoms and the
   lattice least, and leaves no asymmetry, wins (computed for all 6, selected by argmin).

Conventions (`autoperi_jax.crystal`): ``cell`` rows are lattice vectors,
``cart = frac @ cell``. An operation ``(W, w)`` acts on fractional COLUMN vectors,
``x' = W x + w``, i.e. ``frac' = frac @ W.T + w`` on rows (as spglib); the metric is invariant
when ``W^T G W = G``.

Settings. The table holds every group's operations in spglib's standard setting (the first
Hall number of each international number: unique axis b for monoclinic groups, origin
choice 1 where there are two, hexagonal axes for rhombohedral groups), i.e. the
CONVENTIONAL cell, centring translations included (225 Fm-3m has 192 operations). Decoded
structures that are primitive cells of centred lattices use ``setting="primitive"``: the same
operations in spglib's standard primitive basis (``x_conv = P x_prim`` with spglib's ``P``
for A, C, I, F and R centring), duplicates modulo lattice translations removed.

The table ships as ``autoperi_jax/data/spacegroup_ops.npz``; regenerate it with::

    python -m autoperi_jax.symmetry

(``tests/test_symmetry.py`` checks it against spglib). If the file is missing the tables are
built from spglib on first use (about a second).

The matching (which atom an image lands on, the origin candidate, the axis permutation) is
piecewise constant and is treated as a constant; gradients flow through the averaging, the
metric and the least-squares origin (the output is locally a smooth function of the input,
so gradients equal finite differences away from matching switches).

Limits: the decoded cell must be a conventional (or, with ``setting="primitive"``, spglib's
primitive) cell of the group up to an axis permutation: other bases of the same lattice
(e.g. a Niggli-reduced cell of a monoclinic or centred lattice) are not searched. Matching
uses the nearest periodic copy from rounding fractional differences, exact for images within
half an interplanar spacing of their atom; a structure much further from the group can get
a wrong matching, which shows as a large residual. Cost per structure grows as
``6 * 192 * n_atoms^2`` (matching) and ``6 * 32 * n_atoms * 48 * 4 * n_atoms`` (origin
candidates); about 13 ms (8 atoms) and 50 ms (24 atoms) per structure on 2 CPU cores.
The padded counts (192 operations, 48 point-group operations, 32 origin offsets) shrink to
the largest among the groups a caller can request (``symmetrize(..., groups=...)``,
`table_bounds`): 48 / 48 / 8 for Perov-5's groups, about 1.7 ms per 5-atom structure.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import spglib

from autoperi_jax.lattice import wrap_frac

__all__ = [
    "MAX_OPS",
    "N_SPACEGROUPS",
    "SETTINGS",
    "SpacegroupTable",
    "build_table",
    "centrosymmetric_groups",
    "get_table",
    "group_mask",
    "has_inversion_centre",
    "standard_hall_numbers",
    "symmetrize",
    "symmetrize_crystal",
    "table_bounds",
]

MAX_OPS = 192  # operations of Fm-3m and friends in the conventional cell
N_SPACEGROUPS = 231  # row 0 = "no request" (identity only), rows 1..230
MAX_COSETS = 48  # point-group order bound: operations modulo pure translations
MAX_OFFSETS = 32  # origin-candidate offsets per key operation (see `_key_operation`)
NULL_GRID = 8  # samples of an origin component that one key operation leaves free
SETTINGS = ("conventional", "primitive")
TABLE_PATH = Path(__file__).resolve().parent / "data" / "spacegroup_ops.npz"

# spglib's standard primitive transformations: x_conv = P @ x_prim (columns of P are the
# primitive vectors in the conventional basis). spglib documentation, "Spglib dataset",
# transformation to the primitive cell.
_PRIMITIVE_P = {
    "P": np.eye(3),
    "A": np.array([[1, 0, 0], [0, 1, -1], [0, 1, 1]]) / np.array([[1.0], [2.0], [2.0]]),
    "C": np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 2]]) / np.array([[2.0], [2.0], [2.0]]),
    "I": np.array([[-1, 1, 1], [1, -1, 1], [1, 1, -1]]) / 2.0,
    "F": np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]]) / 2.0,
    "R": np.array([[2, -1, -1], [1, 1, -2], [1, 1, 1]]) / 3.0,
}


class SpacegroupTable(NamedTuple):
    """Every space group's operations in one setting, padded to `MAX_OPS` (numpy).

    Padding entries are the identity with zero translation and ``mask`` False, so every
    stored rotation is invertible.

    Attributes:
      rotations: [231, 192, 3, 3] int8 fractional rotations W (``x' = W x + w``).
      translations: [231, 192, 3] float32 translations w in [0, 1).
      mask: [231, 192] bool, True for real operations; row 0 is the identity only.
      n_ops: [231] int32 number of operations per group.
      hall_numbers: [231] int32 spglib Hall number of the setting (0 for row 0).
      coset_index: [231, 48] int32 one operation per distinct rotation (the point group);
        the origin search scores candidates with these, since pure translations do not
        depend on the origin.
      coset_mask: [231, 48] bool.
      key_op: [231] int32 index of the key operation for origin candidates.
      key_ginv: [231, 3, 3] float32 generalised inverse of ``I - W_key`` (`_key_operation`).
      key_offsets: [231, 32, 3] float32 origin offsets: ``t = Ginv (x_j - W x_p - w) + o``
        enumerates the origins that map the pivot p onto atom j under the key operation.
      key_offsets_mask: [231, 32] bool.
    """

    rotations: np.ndarray
    translations: np.ndarray
    mask: np.ndarray
    n_ops: np.ndarray
    hall_numbers: np.ndarray
    coset_index: np.ndarray
    coset_mask: np.ndarray
    key_op: np.ndarray
    key_ginv: np.ndarray
    key_offsets: np.ndarray
    key_offsets_mask: np.ndarray


# ------------------------------------------------------------------------ table building
def standard_hall_numbers() -> np.ndarray:
    """[231] spglib Hall number of each group's standard setting (entry 0 unused = 0).

    The standard setting is the first Hall number of each international number, which is
    the setting spglib standardises to.
    """
    hall = np.zeros(N_SPACEGROUPS, dtype=np.int32)
    for h in range(530, 0, -1):  # descending, so the first Hall number per group wins
        hall[spglib.get_spacegroup_type(h).number] = h
    return hall


def _database_ops(hall: int) -> tuple[np.ndarray, np.ndarray]:
    sym = spglib.get_symmetry_from_database(int(hall))
    return np.asarray(sym["rotations"], dtype=np.int64), np.asarray(sym["translations"])


def _to_primitive(rot: np.ndarray, trans: np.ndarray, centring: str):
    """Operations of a conventional cell in spglib's standard primitive basis."""
    P = _PRIMITIVE_P[centring]
    Pinv = np.linalg.inv(P)
    out_r, out_t = [], []
    for W, w in zip(rot, trans):
        Wp = Pinv @ W @ P
        wp = np.mod(Pinv @ w + 1e-9, 1.0) - 1e-9
        Wi = np.rint(Wp)
        assert np.allclose(Wp, Wi, atol=1e-8), "primitive rotation is not integer"
        dup = any(
            np.array_equal(Wi, r) and np.allclose((wp - t) - np.rint(wp - t), 0.0, atol=1e-8)
            for r, t in zip(out_r, out_t)
        )
        if not dup:
            out_r.append(Wi.astype(np.int64))
            out_t.append(np.where(np.abs(wp) < 1e-9, 0.0, wp))
    n_expected = len(rot) // round(1.0 / abs(np.linalg.det(P)))
    assert len(out_r) == n_expected, (len(out_r), n_expected)
    return np.array(out_r), np.array(out_t)


def _smith_diagonal(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unimodular L, R and diagonal D with ``L @ a @ R = D`` for an integer matrix ``a``.

    Euclid's algorithm on rows and columns (the divisibility chain of the Smith normal form
    is not needed here).
    """
    d = np.asarray(a, dtype=np.int64).copy()
    n = d.shape[0]
    left = np.eye(n, dtype=np.int64)
    right = np.eye(n, dtype=np.int64)
    for k in range(n):
        while True:
            sub = np.abs(d[k:, k:])
            if not sub.any():
                assert np.array_equal(left @ a @ right, d)
                return left, d, right
            flat = np.where(sub > 0, sub, np.iinfo(np.int64).max).argmin()
            i, j = np.unravel_index(flat, sub.shape)
            d[[k, k + i]] = d[[k + i, k]]
            left[[k, k + i]] = left[[k + i, k]]
            d[:, [k, k + j]] = d[:, [k + j, k]]
            right[:, [k, k + j]] = right[:, [k + j, k]]
            for i in range(k + 1, n):
                q = d[i, k] // d[k, k]
                d[i] -= q * d[k]
                left[i] -= q * left[k]
            for j in range(k + 1, n):
                q = d[k, j] // d[k, k]
                d[:, j] -= q * d[:, k]
                right[:, j] -= q * right[:, k]
            if not (d[k + 1 :, k].any() or d[k, k + 1 :].any()):
                break
    assert np.array_equal(left @ a @ right, d)
    return left, d, right


def _key_operation(rot: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Picks the operation whose equation ``(I - W) t = d (mod 1)`` best pins the origin.

    With ``L (I - W) R = D`` (`_smith_diagonal`), the origins solving
    ``(I - W) t = d`` modulo lattice vectors are ``t = R s`` with
    ``s_k = ((L d)_k + m_k) / D_k``, ``m_k = 0 .. |D_k| - 1``, and ``s_k`` free where
    ``D_k = 0`` (the rotation axis ``R e_k``). So ``t = Ginv d + offset`` with the
    generalised inverse ``Ginv = R D^+ L`` and ``prod |D_k|`` offsets (2 for a 4-fold axis,
    8 for the inversion). Along the axis the origin is free if every operation fixes the
    axis (a polar direction); otherwise it is sampled at `NULL_GRID` points of the axis'
    lattice vector. The operation that leaves the fewest origin dimensions open, then has
    the fewest candidates, is the key.

    Returns:
      (index, Ginv [3, 3], offsets [n, 3]) with n <= `MAX_OFFSETS`.
    """
    eye = np.eye(3, dtype=np.int64)
    # dimension of the subspace every operation fixes (the origin is free along it)
    polar_dims = 3 - int(np.linalg.matrix_rank(np.concatenate([eye - W for W in rot])))
    best = None
    for k, W in enumerate(rot):
        left, diag, right = _smith_diagonal(eye - W)
        dk = np.diag(diag)
        nonzero = dk != 0
        rank = int(nonzero.sum())
        dplus = np.diag(np.where(nonzero, 1.0 / np.where(nonzero, dk, 1), 0.0))
        ginv = right @ dplus @ left
        ranges = [range(abs(int(v))) if v != 0 else range(1) for v in dk]
        offsets = [right @ (np.array(m) * np.diag(dplus)) for m in itertools.product(*ranges)]
        grid = [np.zeros(3)]
        if rank == 2:
            axis = right[:, np.flatnonzero(~nonzero)[0]].astype(np.float64)
            if not all(np.array_equal(W2 @ axis, axis) for W2 in rot):
                # not polar along the axis: sample the origin's component along it
                grid = [s / NULL_GRID * axis for s in range(NULL_GRID)]
        offsets = np.array([np.mod(o + g, 1.0) for o in offsets for g in grid])
        open_dims = (3 - rank) - polar_dims - (len(grid) > 1)
        score = (open_dims, len(offsets))
        if best is None or score < best[0]:
            best = (score, k, ginv, offsets)
    _, k, ginv, offsets = best
    assert len(offsets) <= MAX_OFFSETS, len(offsets)
    return k, ginv, offsets


def build_table(setting: str = "conventional") -> SpacegroupTable:
    """Builds the operations table from spglib's database (host, ~1 s).

    Args:
      setting: ``"conventional"`` (spglib's standard setting, centring translations
        included) or ``"primitive"`` (the same operations in spglib's standard primitive
        basis).

    Returns:
      The `SpacegroupTable`.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    hall = standard_hall_numbers()
    rotations = np.tile(np.eye(3, dtype=np.int8), (N_SPACEGROUPS, MAX_OPS, 1, 1))
    translations = np.zeros((N_SPACEGROUPS, MAX_OPS, 3), dtype=np.float32)
    mask = np.zeros((N_SPACEGROUPS, MAX_OPS), dtype=bool)
    n_ops = np.zeros(N_SPACEGROUPS, dtype=np.int32)
    coset_index = np.zeros((N_SPACEGROUPS, MAX_COSETS), dtype=np.int32)
    coset_mask = np.zeros((N_SPACEGROUPS, MAX_COSETS), dtype=bool)
    key_op = np.zeros(N_SPACEGROUPS, dtype=np.int32)
    key_ginv = np.zeros((N_SPACEGROUPS, 3, 3), dtype=np.float32)
    key_offsets = np.zeros((N_SPACEGROUPS, MAX_OFFSETS, 3), dtype=np.float32)
    key_offsets_mask = np.zeros((N_SPACEGROUPS, MAX_OFFSETS), dtype=bool)
    mask[0, 0] = True
    n_ops[0] = 1
    coset_mask[0, 0] = True
    key_offsets_mask[0, 0] = True
    for sg in range(1, N_SPACEGROUPS):
        rot, trans = _database_ops(hall[sg])
        if setting == "primitive":
            centring = spglib.get_spacegroup_type(int(hall[sg])).international_short[0]
            rot, trans = _to_primitive(rot, trans, centring)
        n = len(rot)
        rotations[sg, :n] = rot
        translations[sg, :n] = trans
        mask[sg, :n] = True
        n_ops[sg] = n
        first: dict[bytes, int] = {}
        for i, W in enumerate(rot):
            first.setdefault(W.tobytes(), i)
        cos = sorted(first.values())
        coset_index[sg, : len(cos)] = cos
        coset_mask[sg, : len(cos)] = True
        k, ginv, offsets = _key_operation(rot[cos])
        key_op[sg] = cos[k]
        key_ginv[sg] = ginv
        key_offsets[sg, : len(offsets)] = offsets
        key_offsets_mask[sg, : len(offsets)] = True
    return SpacegroupTable(
        rotations=rotations,
        translations=translations,
        mask=mask,
        n_ops=n_ops,
        hall_numbers=hall,
        coset_index=coset_index,
        coset_mask=coset_mask,
        key_op=key_op,
        key_ginv=key_ginv,
        key_offsets=key_offsets,
        key_offsets_mask=key_offsets_mask,
    )


def save_tables(path: str | Path = TABLE_PATH) -> None:
    """Writes both settings' tables to one ``.npz`` (no pickle)."""
    arrays = {}
    for setting in SETTINGS:
        table = build_table(setting)
        for name, value in table._asdict().items():
            arrays[f"{setting}/{name}"] = value
    np.savez_compressed(path, **arrays)


@functools.cache
def get_table(setting: str = "conventional") -> SpacegroupTable:
    """The operations table of a setting: from the shipped ``.npz``, else from spglib.

    Args:
      setting: ``"conventional"`` or ``"primitive"``.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if TABLE_PATH.exists():
        with np.load(TABLE_PATH, allow_pickle=False) as data:
            return SpacegroupTable(
                **{f: np.asarray(data[f"{setting}/{f}"]) for f in SpacegroupTable._fields}
            )
    return build_table(setting)


# ---------------------------------------------------------------------- symmetrisation
def _axis_permutations() -> np.ndarray:
    """[6, 3, 3] signed permutation matrices with det +1, identity first.

    ``M`` maps the structure's fractional coordinates to the standard setting's,
    ``x_std = M x``. The sign keeps M proper, so enantiomorphic groups (P4_1 vs P4_3) are not
    swapped by an odd permutation.
    """
    out = []
    for p in itertools.permutations(range(3)):
        m = np.eye(3)[list(p)]
        out.append(m * np.linalg.det(m))
    return np.array(out)


AXIS_PERMUTATIONS = _axis_permutations()
_TOP_K = 8  # origin candidates re-scored with every atom
_N_PROBES = 4  # atoms whose images score all origin candidates
_LEFT_WEIGHT = 10.0  # selection weight of the leftover asymmetry (A) against moves (A)


def _safe_norm(x, axis: int = -1):
    """Euclidean norm with a finite gradient at zero (double-where)."""
    sq = jnp.sum(x * x, axis=axis)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _quadratic(v, metric):
    """``v^T metric v`` over the last axis, written elementwise so that XLA fuses it with
    the surrounding rounding and minimum instead of materialising [..., 3] products."""
    out = 0.0
    for a in range(3):
        out = out + metric[a, a] * v[..., a] * v[..., a]
        for b in range(a + 1, 3):
            out = out + 2.0 * metric[a, b] * v[..., a] * v[..., b]
    return out


def _min_sq_distance(images, frac, allowed, metric):
    """Squared distance [..., n_atoms] from each image to its nearest allowed atom (see
    `_match`), without the argmin (cheaper; for scoring origin candidates)."""
    diff = frac - images[..., :, None, :]
    diff = diff - jnp.round(diff)
    return jnp.min(jnp.where(allowed, _quadratic(diff, metric), jnp.inf), axis=-1)


def _match(images, frac, allowed, metric):
    """Nearest allowed atom of every image (periodic, in the metric ``metric``).

    Args:
      images: [..., n_atoms, 3] fractional images of the atoms.
      frac: [n_atoms, 3] fractional positions of the atoms they may land on.
      allowed: [n_atoms, n_atoms] True where image i may land on atom j (same species).
      metric: [3, 3] metric tensor ``cell @ cell.T``.

    Returns:
      delta [..., n_atoms, 3], the fractional vector from each image to the nearest periodic
      copy of its matched atom, and its squared length [..., n_atoms] (inf where no atom is
      allowed). The nearest copy comes from rounding the fractional difference, which is the
      true nearest copy whenever the image lies within half an interplanar spacing of its
      atom: the case for a structure near the group; far images only get a larger distance.
    """
    diff = frac - images[..., :, None, :]  # [..., n_atoms, n_atoms, 3]
    diff = diff - jnp.round(diff)
    d2 = jnp.where(allowed, _quadratic(diff, metric), jnp.inf)
    j = jax.lax.stop_gradient(jnp.argmin(d2, axis=-1))  # [..., n_atoms]
    delta = jnp.take_along_axis(diff, j[..., None, None], axis=-2)[..., 0, :]
    return delta, jnp.min(d2, axis=-1)


def _apply(rot, trans, frac, origin):
    """Images ``W (x - t) + w + t`` of every atom under every operation, on rows.

    Args:
      rot: [n_ops, 3, 3], trans: [n_ops, 3], frac: [..., 3], origin: [3].

    Returns:
      [n_ops, ..., 3].
    """
    x = frac - origin
    return jnp.einsum("gij,...j->g...i", rot, x) + (trans + origin).reshape(
        (-1,) + (1,) * (frac.ndim - 1) + (3,)
    )


def _find_origin(
    frac, same, valid, rot, trans, cos_idx, cos_mask, key, ginv, offsets, offsets_mask, metric
):
    """The origin t of the standard setting in the structure (no gradient).

    Candidates ``t = Ginv (x_j - W_k x_p - w_k) + o`` put the pivot p (first atom of the
    rarest species) onto each atom j of its species under the key operation k, for every
    offset o (`_key_operation`), plus t = 0. Each is scored by the mean squared distance from
    the images of a few probe atoms (the pivot first) under the point-group operations to
    the nearest atoms of their species; the best `_TOP_K` are re-scored with every atom.

    Args:
      frac: [n_atoms, 3]; same: [n_atoms, n_atoms] same-species mask (padding excluded);
      valid: [n_atoms]; rot, trans: [n_ops, 3, 3], [n_ops, 3] in the structure's axes;
      cos_idx, cos_mask: [48] point-group operations; key: [] key operation;
      ginv: [3, 3]; offsets, offsets_mask: [32, 3], [32]; metric: [3, 3].

    Returns:
      [3] origin.
    """
    x = jax.lax.stop_gradient(frac)
    n = x.shape[0]
    counts = jnp.sum(same, axis=-1)  # [n] atoms of each atom's species
    occurrence = jnp.sum(jnp.tril(same, -1), axis=-1)  # [n] earlier atoms of its species
    # the first atom of each species (rarest species first), then the second ones, ...
    rank = (occurrence * (n + 1) + counts) * (n + 1) + jnp.arange(n)
    order = jnp.argsort(jnp.where(valid, rank, jnp.iinfo(jnp.int32).max))
    pivot = order[0]
    # probes: the pivot and atoms of other species; their images under a wrong origin
    # rarely all land on atoms (the pivot's alone do whenever an axis passes through it,
    # one species' alone often do when that species forms a finer sublattice)
    probes = order[: min(_N_PROBES, n)]
    probe_ok = valid[probes]
    wk, tk = rot[key], trans[key]
    d = x - (wk @ x[pivot] + tk)  # [n, 3]
    cand = (d @ ginv.T)[:, None, :] + offsets[None]  # [n, n_offsets, 3]
    cand_ok = same[pivot][:, None] & offsets_mask[None]
    cand = jnp.concatenate([jnp.zeros((1, 3), x.dtype), cand.reshape(-1, 3)])
    cand_ok = jnp.concatenate([jnp.ones((1,), bool), cand_ok.reshape(-1)])
    rc, tc = rot[cos_idx], trans[cos_idx]  # [n_cos, 3, 3], [n_cos, 3]

    def probe_score(t):
        y = _apply(rc, tc, x[probes], t)  # [n_cos, n_probes, 3]
        d2 = _min_sq_distance(y, x, same[probes], metric)  # [n_cos, n_probes]
        ok = cos_mask[:, None] & probe_ok[None, :]
        return jnp.sum(jnp.where(ok, d2, 0.0)) / jnp.maximum(jnp.sum(ok), 1)

    scores = jnp.where(cand_ok, jax.vmap(probe_score)(cand), jnp.inf)
    _, top = jax.lax.top_k(-scores, _TOP_K)

    def full_score(t):
        y = _apply(rc, tc, x, t)  # [n_cos, n, 3]
        d2 = _min_sq_distance(y, x, same, metric)  # [n_cos, n]
        ok = cos_mask[:, None] & valid[None, :]
        return jnp.sum(jnp.where(ok, d2, 0.0)) / jnp.maximum(jnp.sum(ok), 1)

    full = jnp.where(jnp.isfinite(scores[top]), jax.vmap(full_score)(cand[top]), jnp.inf)
    return cand[top[jnp.argmin(full)]]


def _symmetrize_setting(cell, frac, same, valid, ops, perm, n_iter, search_origin):
    """Symmetrises one structure with the operations conjugated by one axis permutation.

    Returns:
      (cell [3, 3], unwrapped frac [n_atoms, 3], largest move [] (A) of an atom or a
      lattice vector, leftover asymmetry [] (A)).
    """
    (rot, trans, opm, cos_idx, cos_mask, key, ginv, offsets, offsets_mask) = ops
    dtype = frac.dtype
    m = perm.astype(dtype)
    # structure frame: x = M^T x_std, so W -> M^T W M and w -> M^T w (M orthogonal)
    rot = jnp.einsum("ji,gjk,kl->gil", m, rot, m)
    trans = trans @ m
    ginv = m.T @ ginv @ m
    offsets = offsets @ m
    rot_inv = jnp.round(jnp.linalg.inv(rot))
    n_ops = jnp.sum(opm).astype(dtype)
    opw = opm.astype(dtype) / n_ops  # [n_ops] averaging weights

    metric = cell @ cell.T
    # G' = G + mean_g (W^T G W - G): the terms vanish exactly for an invariant metric
    images = jnp.einsum("gji,jk,gkl->gil", rot, metric, rot) - metric
    metric_s = metric + jnp.einsum("g,gil->il", opw, images)
    metric_s = 0.5 * (metric_s + metric_s.T)
    chol = jnp.linalg.cholesky(metric)
    orient = jax.scipy.linalg.solve_triangular(chol, cell, lower=True)  # [3, 3] rotation
    # cell + (L' - L) Q rather than L' Q: exact when the metric is already invariant
    cell_s = cell + (jnp.linalg.cholesky(metric_s) - chol) @ orient

    if search_origin:
        origin = _find_origin(
            frac,
            same,
            valid,
            rot,
            trans,
            cos_idx,
            cos_mask,
            key,
            ginv,
            offsets,
            offsets_mask,
            jax.lax.stop_gradient(metric_s),
        )
    else:
        origin = jnp.zeros((3,), dtype)

    eye = jnp.eye(3, dtype=dtype)
    i_minus_w = eye - rot  # [n_ops, 3, 3]
    n_valid = jnp.sum(valid).astype(dtype)
    lhs = jnp.einsum("g,gji,jk,gkl->il", opw * n_valid, i_minus_w, metric_s, i_minus_w)
    lhs = lhs + 1e-6 * jnp.trace(lhs) * eye + 1e-12 * eye

    def step(_, carry):
        x, t = carry
        delta, _ = _match(_apply(rot, trans, x, t), x, same, metric_s)  # [n_ops, n, 3]
        delta = jnp.where(valid[None, :, None], delta, 0.0)
        # least-squares origin update for this matching; it is a smooth function of the
        # positions, so the result's gradient includes how the origin follows the atoms
        rhs = jnp.einsum("g,gji,jk,gk->i", opw, i_minus_w, metric_s, jnp.sum(delta, axis=1))
        tau = jnp.linalg.solve(lhs, rhs)
        delta = delta - jnp.einsum("gij,j->gi", i_minus_w, tau)[:, None, :]
        # Reynolds operator: x_i <- mean_g g^-1(x_pi_g(i)) = x_i + mean_g W_g^-1 delta_gi
        corr = jnp.einsum("g,gij,gaj->ai", opw, rot_inv, delta)
        return jnp.where(valid[:, None], x + corr, x), t + tau

    x, t = jax.lax.fori_loop(0, n_iter, step, (frac, origin))
    # atom moves in the new cell, lattice changes apart: both independent of the origin and
    # of which periodic image an atom is given by
    moved = _safe_norm((x - frac) @ cell_s)  # [n_atoms]
    atom_res = jnp.max(jnp.where(valid, moved, 0.0))
    lattice_res = jnp.max(_safe_norm(cell_s - cell))
    # what is left: images of the result that miss an atom (0 when the matching was a
    # consistent permutation, so one averaging made the structure symmetric)
    d2 = _min_sq_distance(_apply(rot, trans, x, t), x, same, metric_s)
    left = jnp.sqrt(jnp.max(jnp.where(opm[:, None] & valid[None, :], d2, 0.0)))
    return cell_s, x, jnp.maximum(atom_res, lattice_res), jax.lax.stop_gradient(left)


def symmetrize(
    cell,
    frac,
    numbers,
    mask,
    spacegroup,
    n_iter: int = 3,
    setting: str = "conventional",
    search_origin: bool = True,
    permute_axes: bool = True,
    groups: tuple[int, ...] | None = None,
    return_asymmetry: bool = False,
):
    """Projects a structure onto a space group's operations (jittable, vmap-able).

    See the module docstring for the four steps. Shapes are static; ``spacegroup`` may be
    traced, so one compiled function serves a batch with mixed groups under ``jax.vmap``.

    Args:
      cell: [3, 3] rows are lattice vectors (A).
      frac: [n_atoms, 3] fractional coordinates.
      numbers: [n_atoms] int atomic numbers (atoms only match atoms of the same number).
      mask: [n_atoms] bool, False for padding atoms (returned unchanged).
      spacegroup: [] int in 0..230 (clipped); 0 = no request (the identity: the input comes
        back with wrapped coordinates and residual 0).
      n_iter: matching + averaging rounds (static).
      setting: ``"conventional"`` (the cell is a conventional cell of the group, as spglib
        standardises it) or ``"primitive"`` (spglib's standard primitive cell); static.
      search_origin: look for the origin of the standard setting (static); if False the
        origin is only refined by least squares from t = 0.
      permute_axes: try the 6 axis permutations (static); if False only the identity.
      groups: the groups ``spacegroup`` can take (static; None = any). The padded table is
        cut to the largest operation, point-group and origin-offset counts among them
        (`table_bounds`), which is exact for these groups and much cheaper when they are
        small (Perov-5's five groups: 48 of 192 operations, 8 of 32 offsets). A group
        outside the set comes back unchanged with residual ``inf``.
      return_asymmetry: also return the asymmetry left in the output (static).

    Returns:
      (cell [3, 3], frac [n_atoms, 3] wrapped to [0, 1), residual []). ``residual`` (A) is
      the largest distance an atom (measured in the new cell) or a lattice vector moved,
      plus the asymmetry left afterwards (the largest distance from an image of an atom
      under the group to the nearest atom of its species; ~1e-6 when the symmetrisation
      succeeded). Callers flag structures far from the requested group with it: Perov-5
      structures perturbed by 0.05-0.15 A and 1 % strain give 0.05-0.3 A.
      With ``return_asymmetry`` a fourth entry []: that leftover asymmetry alone (A; 0 for
      group 0, inf for a group outside ``groups``). A symmetric output is a fixed point
      of the projection, so it is what a second projection's residual measures, without
      its cost.
    """
    table = get_table(setting)
    dtype = jnp.result_type(frac, jnp.float32)
    cell = jnp.asarray(cell, dtype)  # [3, 3]
    frac = jnp.asarray(frac, dtype)  # [n_atoms, 3]
    numbers = jnp.asarray(numbers)  # [n_atoms]
    valid = jnp.asarray(mask, bool)  # [n_atoms]
    sg = jnp.clip(jnp.asarray(spacegroup, jnp.int32), 0, N_SPACEGROUPS - 1)
    same = (numbers[:, None] == numbers[None, :]) & valid[:, None] & valid[None, :]
    n_ops, n_cos, n_off = table_bounds(groups, setting)  # 192, 48, 32 for all groups
    ops = (
        jnp.asarray(table.rotations[:, :n_ops], dtype)[sg],  # [n_ops, 3, 3]
        jnp.asarray(table.translations[:, :n_ops], dtype)[sg],  # [n_ops, 3]
        jnp.asarray(table.mask[:, :n_ops])[sg],  # [n_ops]
        jnp.asarray(table.coset_index[:, :n_cos])[sg],  # [n_cos]
        jnp.asarray(table.coset_mask[:, :n_cos])[sg],  # [n_cos]
        jnp.asarray(table.key_op)[sg],  # []
        jnp.asarray(table.key_ginv, dtype)[sg],  # [3, 3]
        jnp.asarray(table.key_offsets[:, :n_off], dtype)[sg],  # [n_off, 3]
        jnp.asarray(table.key_offsets_mask[:, :n_off])[sg],  # [n_off]
    )
    perms = AXIS_PERMUTATIONS if permute_axes else AXIS_PERMUTATIONS[:1]

    def run(perm):
        return _symmetrize_setting(cell, frac, same, valid, ops, perm, n_iter, search_origin)

    cells, fracs, moved, left = jax.lax.map(run, jnp.asarray(perms, dtype))
    residuals = moved + left
    # a setting that leaves the structure asymmetric loses against one that does not
    best = jax.lax.stop_gradient(jnp.argmin(residuals + _LEFT_WEIGHT * left))
    cell_out, frac_out, residual = cells[best], fracs[best], residuals[best]
    asymmetry = left[best]
    identity = sg == 0
    if groups is not None:
        # a group beyond the cut table would be projected onto some of its operations
        inside = jnp.asarray(group_mask(groups))[sg]
        identity = identity | ~inside
        residual = jnp.where(inside, residual, jnp.inf)
        asymmetry = jnp.where(inside, asymmetry, jnp.inf)
    cell_out = jnp.where(identity, cell, cell_out)
    frac_out = wrap_frac(jnp.where(identity, frac, frac_out))
    residual = jnp.where(sg == 0, 0.0, residual)
    if return_asymmetry:
        return cell_out, frac_out, residual, jnp.where(sg == 0, 0.0, asymmetry)
    return cell_out, frac_out, residual


def table_bounds(
    groups: tuple[int, ...] | None = None, setting: str = "conventional"
) -> tuple[int, int, int]:
    """Largest (operation, point-group operation, origin-offset) counts of ``groups`` (None:
    all 230 groups: `MAX_OPS`, `MAX_COSETS`, `MAX_OFFSETS`). Every row of the table keeps
    its real entries first, so ``table[:, :count]`` holds all of these groups' entries.

    Raises:
      ValueError: a group outside 0..230, or no group.
    """
    if groups is None:
        return MAX_OPS, MAX_COSETS, MAX_OFFSETS
    g = np.asarray(groups, np.int64).reshape(-1)
    if g.size == 0 or g.min() < 0 or g.max() >= N_SPACEGROUPS:
        raise ValueError(f"groups must be space-group numbers 0..230, got {tuple(groups)}")
    t = get_table(setting)
    return (
        int(t.n_ops[g].max()),
        int(t.coset_mask[g].sum(-1).max()),
        int(t.key_offsets_mask[g].sum(-1).max()),
    )


def group_mask(groups: Iterable[int]) -> np.ndarray:
    """[231] bool, True on the rows of the space groups in ``groups`` (ints 0-230)."""
    return np.isin(np.arange(N_SPACEGROUPS), np.asarray(tuple(groups), int))


def centrosymmetric_groups(setting: str = "conventional") -> np.ndarray:
    """[231] bool: the group's operations include the inversion ``-I`` (row 0: False)."""
    t = get_table(setting)
    inv = np.all(t.rotations == -np.eye(3, dtype=t.rotations.dtype), axis=(-2, -1))
    out = np.any(inv & t.mask, axis=1)
    out[0] = False
    return out


def has_inversion_centre(cell, frac, numbers, atom_mask, tol: float = 0.1):
    """Whether a structure is mapped onto itself by an inversion within ``tol`` (A).

    An inversion centre ``c`` maps atom i onto an atom j of its species, so
    ``2c = x_i + x_j`` modulo lattice vectors; every same-species pair (i, j) gives one
    candidate, and the structure is centrosymmetric if for some candidate every image
    ``x_i + x_j - x_k`` lies within ``tol`` of an atom of k's species (nearest periodic copy
    from rounding fractional differences: exact for near-orthogonal cells, otherwise it can
    only miss a centre). spglib's symmetry search uses the same kind of tolerance
    (``symprec``), so a polar structure whose polar displacement is below it gets a
    centrosymmetric group there. Jittable; cost ``A^4`` distance evaluations.

    Args:
      cell: [3, 3] rows are lattice vectors (A).
      frac: [A, 3] fractional coordinates.
      numbers: [A] atomic numbers.
      atom_mask: [A] bool, real atoms.
      tol: distance tolerance (A).

    Returns:
      [] bool.
    """
    same = (numbers[:, None] == numbers[None, :]) & atom_mask[:, None] & atom_mask[None, :]
    # images of atom k under the inversion of pair (i, j): [i, j, k, 3]
    img = frac[:, None, None, :] + frac[None, :, None, :] - frac[None, None, :, :]
    d = img[:, :, :, None, :] - frac[None, None, None, :, :]  # [i, j, k, l, 3]
    d = d - jnp.round(d)
    dist2 = jnp.sum((d @ cell) ** 2, -1)  # [i, j, k, l]
    allowed = same[None, None, :, :]  # l must be of k's species
    hit = jnp.any(allowed & (dist2 <= tol**2), axis=-1)  # [i, j, k]
    ok_k = hit | ~atom_mask[None, None, :]
    centre = jnp.all(ok_k, axis=-1) & same  # [i, j]
    return jnp.any(centre) & jnp.any(atom_mask)


def symmetrize_crystal(crystal, spacegroup: int, return_residual: bool = False, **kwargs):
    """Host helper: `symmetrize` one `autoperi_jax.crystal.Crystal` (jitted once per atom
    count and options; float32 unless float64 is enabled).

    Args:
      crystal: the structure.
      spacegroup: requested group 0..230.
      return_residual: also return the residual (A).
      **kwargs: `symmetrize` options (n_iter, setting, search_origin, permute_axes).

    Returns:
      The symmetrised `Crystal` (same atoms, properties and name), and the residual if
      ``return_residual``.
    """
    fn = _jitted(tuple(sorted(kwargs.items())))
    cell, frac, res = jax.device_get(
        fn(
            crystal.cell,
            crystal.frac_coords,
            crystal.numbers,
            np.ones(crystal.num_atoms, bool),
            np.int32(spacegroup),
        )
    )
    out = crystal.replace(
        cell=np.asarray(cell, np.float64), frac_coords=np.asarray(frac, np.float64)
    )
    return (out, float(res)) if return_residual else out


@functools.cache
def _jitted(options: tuple):
    return jax.jit(functools.partial(symmetrize, **dict(options)))


if __name__ == "__main__":
    save_tables()
    print(f"wrote {TABLE_PATH}")
