"""Host conversion of the padded device outputs into `Crystal` objects.

The jitted functions return padded arrays with masks (`autoperi_jax.model.make_decode_fn`,
`autoperi_jax.sampling.make_sample_fn`); these numpy functions turn them into one
`Crystal` (or one bond list) per real crystal, in batch order, outside jit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from autoperi_jax.crystal import Crystal

__all__ = ["decoded_bonds", "decoded_to_crystals", "outputs_to_crystals", "sample_name"]


def decoded_bonds(decoded: dict[str, Any], graph_mask: Any) -> list[dict[str, np.ndarray]]:
    """Host split of the decoded bond list, one dict per real graph.

    Returns:
      per crystal: ``senders``, ``receivers`` [B] (atom indices of the decoded crystal,
      the order of `decoded_to_crystals`) and ``shifts`` [B, 3] (k_ij) of every edge the
      connectivity decoder classified as bonded.
    """
    d = jax.tree.map(np.asarray, decoded)
    keep = d["bond_mask"]
    out = []
    for g in np.flatnonzero(np.asarray(graph_mask)):
        sel = keep & (d["bond_graph"] == g)
        out.append(
            {
                "senders": d["bond_senders"][sel],
                "receivers": d["bond_receivers"][sel],
                "shifts": d["bond_shifts"][sel],
            }
        )
    return out


def decoded_to_crystals(
    decoded: dict[str, Any], graph_mask: Any, names: Sequence[str] | None = None
) -> list[Crystal]:
    """Host conversion of `make_reconstruct_fn` output to `Crystal` objects.

    Args:
      decoded: the decoder output (jax or numpy arrays).
      graph_mask: [G] bool, False for padding graphs (skipped).
      names: one name per real graph, in order.

    Returns:
      One `Crystal` per real graph, in batch order.
    """
    d = jax.tree.map(np.asarray, decoded)
    out = []
    real = np.flatnonzero(np.asarray(graph_mask))
    for k, g in enumerate(real):
        m = d["mask"][g]
        if not m.any():  # a count head can't produce 0 atoms, but keep the file aligned
            m = np.zeros_like(m)
            m[0] = True
        out.append(
            Crystal(
                cell=d["cell"][g].astype(np.float64),
                frac_coords=d["frac"][g][m].astype(np.float64),
                numbers=np.maximum(d["numbers"][g][m], 1).astype(np.int64),
                name=names[k] if names is not None else "",
            )
        )
    return out


def sample_name(i: int, prefix: str = "sample") -> str:
    """Name of the i-th crystal of a sampling run: ``{prefix}_{i:06d}``."""
    return f"{prefix}_{i:06d}"


def outputs_to_crystals(
    out: Mapping[str, Any], start: int = 0, count: int | None = None, prefix: str = "sample"
) -> list[Crystal]:
    """Host conversion of `make_sample_fn` output to `Crystal` objects.

    Predicted properties go to ``Crystal.properties`` (so extxyz files carry them in
    ``atoms.info`` for ``autoperi eval --property``), with ``spacegroup_requested`` and
    ``symmetrized`` (1 / 0) when a group was requested; crystal i is named
    ``sample_name(start + i, prefix)``. Non-finite numbers (never expected) become a degenerate
    but readable structure that every validity check rejects.

    Args:
      out: the sample function's output (jax or numpy arrays).
      start: index of the first crystal (for names).
      count: keep only the first ``count`` crystals (None = all).
      prefix: name prefix.
    """
    d = jax.tree.map(np.asarray, dict(out))
    n = d["cell"].shape[0] if count is None else count
    d["frac"] = np.nan_to_num(d["frac"])
    bad = ~np.isfinite(d["cell"]).all((1, 2)) | (np.linalg.det(d["cell"]) <= 1e-6)
    d["cell"] = np.where(bad[:, None, None], np.eye(3), d["cell"])
    names = [sample_name(start + i, prefix) for i in range(n)]
    crystals = decoded_to_crystals(d, np.arange(d["cell"].shape[0]) < n, names)
    props = d.get("properties", {})
    for i, c in enumerate(crystals):
        p = {k: float(v[i]) for k, v in props.items()}
        if "spacegroup" in d and d["spacegroup"][i] > 0:
            p["spacegroup_requested"] = int(d["spacegroup"][i])
            p["symmetrized"] = int(d["symmetrized"][i])
        c.properties.update(p)
    return crystals
