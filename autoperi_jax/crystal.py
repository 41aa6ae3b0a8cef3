"""The `Crystal` type, lattice geometry, wrapping, symmetry operations and file I/O.

Geometry convention (the only one in this code base):

* ``cell`` is ``[3, 3]`` with ROWS the lattice vectors a, b, c (ASE convention);
* Cartesian positions are ``cart = frac @ cell``;
* an edge from atom i to the image ``k_ij`` of atom j has vector
  ``r_ij = (frac[j] + k_ij - frac[i]) @ cell`` (see `autoperi_jax.graph.edge_vectors`).

jax-md wants columns (``box = cell.T``); convert only at that boundary.

The lattice-parameter functions (`cell_to_lattice_params`, `lattice_params_to_cell`,
`wrap_frac`) live in `autoperi_jax.lattice` and are re-exported here; they accept numpy or
jax arrays, so the decoder and the host-side I/O share one implementation.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoperi_jax.elements import ATOMIC_MASS
from autoperi_jax.graph import min_image_free_distances
from autoperi_jax.lattice import cell_to_lattice_params, lattice_params_to_cell, wrap_frac

__all__ = [
    "Crystal",
    "CrystalError",
    "cell_to_lattice_params",
    "lattice_params_to_cell",
    "read_structures",
    "wrap_frac",
    "write_structures",
]


class CrystalError(ValueError):
    """A structure that cannot be represented or is physically malformed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Crystal:
    """One periodic crystal structure (host side, numpy).

    Attributes:
      cell: [3, 3] float64, rows are the lattice vectors in A; right-handed (det > 0).
      frac_coords: [n_atoms, 3] float64 fractional coordinates, wrapped into [0, 1).
      numbers: [n_atoms] int64 atomic numbers (1..118).
      properties: scalar properties by name (e.g. ``{"heat_ref": -0.2}``).
      name: an identifier (material_id, file name) used in error messages.
    """

    cell: np.ndarray
    frac_coords: np.ndarray
    numbers: np.ndarray
    properties: Mapping[str, float] = dataclasses.field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        where = f"structure {self.name!r}" if self.name else "structure"
        cell = np.asarray(self.cell, dtype=np.float64)
        frac = np.asarray(self.frac_coords, dtype=np.float64)
        numbers = np.asarray(self.numbers)
        if cell.shape != (3, 3):
            raise CrystalError(f"{where}: cell must have shape [3, 3], got {cell.shape}")
        if frac.ndim != 2 or frac.shape[1] != 3:
            raise CrystalError(f"{where}: frac_coords must have shape [n, 3], got {frac.shape}")
        if frac.shape[0] == 0:
            raise CrystalError(f"{where}: has no atoms")
        if numbers.shape != (frac.shape[0],):
            raise CrystalError(
                f"{where}: numbers has shape {numbers.shape}, expected ({frac.shape[0]},)"
            )
        if not (np.all(np.isfinite(cell)) and np.all(np.isfinite(frac))):
            raise CrystalError(f"{where}: cell or coordinates contain NaN or inf")
        if not np.issubdtype(numbers.dtype, np.integer) or np.any((numbers < 1) | (numbers > 118)):
            raise CrystalError(f"{where}: atomic numbers must be integers in 1..118")
        volume = float(np.linalg.det(cell))
        if volume <= 1e-8:
            hint = (
                " (the cell is left-handed: swap two lattice vectors)"
                if volume < -1e-8
                else " (degenerate cell: the lattice vectors are coplanar)"
            )
            raise CrystalError(f"{where}: cell volume is {volume:.4g} A^3 <= 0{hint}")
        object.__setattr__(self, "cell", cell)
        object.__setattr__(self, "frac_coords", wrap_frac(frac))
        object.__setattr__(self, "numbers", numbers.astype(np.int64))
        object.__setattr__(self, "properties", dict(self.properties))

    # ----------------------------------------------------------------------------- basics
    @property
    def num_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def volume(self) -> float:
        """Cell volume in A^3."""
        return float(np.linalg.det(self.cell))

    @property
    def cart_coords(self) -> np.ndarray:
        """[n_atoms, 3] Cartesian positions in A (``frac @ cell``)."""
        return self.frac_coords @ self.cell

    @property
    def lattice_params(self) -> np.ndarray:
        """[6] a, b, c (A), alpha, beta, gamma (degrees)."""
        return cell_to_lattice_params(self.cell)

    @property
    def density(self) -> float:
        """Mass density in g/cm^3."""
        mass_amu = float(np.sum(np.asarray(ATOMIC_MASS)[self.numbers]))
        return mass_amu * 1.66053906660 / self.volume

    @property
    def formula(self) -> str:
        return self.to_pymatgen().composition.reduced_formula

    def replace(self, **changes: Any) -> Crystal:
        return dataclasses.replace(self, **changes)

    def min_distance(self) -> float:
        """Shortest interatomic distance over all periodic images (A).

        An atom's distance to its own images counts too, so a one-atom cell returns its
        shortest lattice translation.
        """
        return float(min_image_free_distances(self.frac_coords, self.cell).min())

    def validate(self, min_distance: float = 0.5, max_atoms: int | None = None) -> None:
        """Raises `CrystalError` if two atoms are closer than ``min_distance`` A or the
        structure has more than ``max_atoms`` atoms."""
        where = f"structure {self.name!r}" if self.name else "structure"
        if max_atoms is not None and self.num_atoms > max_atoms:
            raise CrystalError(
                f"{where}: has {self.num_atoms} atoms, more than the budget max_atoms="
                f"{max_atoms}; raise max_atoms or filter the dataset"
            )
        d = self.min_distance()
        if d < min_distance:
            raise CrystalError(
                f"{where}: two atoms are {d:.3f} A apart, closer than {min_distance} A "
                "(overlapping atoms; check the coordinates or the cell)"
            )

    # --------------------------------------------------------------------- conversions
    @classmethod
    def from_ase(cls, atoms, name: str = "", properties: Mapping[str, float] | None = None):
        """From an `ase.Atoms` that is periodic in all three directions."""
        where = f"structure {name!r}" if name else "structure"
        if not all(atoms.pbc):
            raise CrystalError(
                f"{where}: is not periodic in all directions (pbc={list(atoms.pbc)}); "
                "crystals need a 3D periodic cell"
            )
        props = dict(properties or {})
        if properties is None:
            for k, v in atoms.info.items():
                if isinstance(v, int | float | np.integer | np.floating) and not isinstance(
                    v, bool
                ):
                    props[k] = float(v)
        return cls(
            cell=np.asarray(atoms.cell[:], dtype=np.float64),
            frac_coords=atoms.get_scaled_positions(wrap=False),
            numbers=atoms.numbers.copy(),
            properties=props,
            name=name or str(atoms.info.get("name", "")),
        )

    def to_ase(self):
        """An `ase.Atoms` with pbc=True; properties go to ``atoms.info``."""
        from ase import Atoms  # lazy: only conversions need ase

        atoms = Atoms(
            numbers=self.numbers, scaled_positions=self.frac_coords, cell=self.cell, pbc=True
        )
        atoms.info.update(self.properties)
        if self.name:
            atoms.info["name"] = self.name
        return atoms

    @classmethod
    def from_pymatgen(cls, structure, name: str = "", properties=None) -> Crystal:
        """From a pymatgen `Structure` (ordered sites only)."""
        where = f"structure {name!r}" if name else "structure"
        if not structure.is_ordered:
            raise CrystalError(f"{where}: has partially occupied (disordered) sites")
        return cls(
            cell=np.asarray(structure.lattice.matrix, dtype=np.float64),
            frac_coords=np.asarray(structure.frac_coords, dtype=np.float64),
            numbers=np.asarray(structure.atomic_numbers, dtype=np.int64),
            properties=dict(properties or {}),
            name=name,
        )

    def to_pymatgen(self):
        """A pymatgen `Structure` with the same cell (rows) and fractional coordinates."""
        from pymatgen.core import Lattice, Structure  # lazy: only pymatgen conversions need it

        return Structure(
            Lattice(self.cell), self.numbers.tolist(), self.frac_coords, coords_are_cartesian=False
        )

    @classmethod
    def from_cif(cls, cif: str | os.PathLike, name: str = "", properties=None) -> Crystal:
        """From CIF text or a path to a ``.cif`` file (first data block).

        Raises:
          CrystalError: naming ``name`` (or the file) when the CIF cannot be parsed.
        """
        from pymatgen.core import Structure  # lazy: only pymatgen conversions need it

        text = str(cif)
        if "\n" not in text and Path(text).suffix.lower() == ".cif":
            path = Path(text)
            name = name or str(path)
            try:
                text = path.read_text()
            except OSError as e:
                raise CrystalError(f"cannot read CIF file {path}: {e}") from e
        where = f"structure {name!r}" if name else "CIF"
        if not text.strip():
            raise CrystalError(f"{where}: CIF text is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_str(text, fmt="cif")
        except Exception as e:  # pymatgen raises many types for bad CIFs
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CrystalError(f"{where}: malformed CIF ({msg})") from e
        return cls.from_pymatgen(structure, name=name, properties=properties)

    def to_cif(self, path: str | os.PathLike | None = None) -> str:
        """CIF text (pymatgen `CifWriter`, P1); also written to ``path`` if given."""
        from pymatgen.io.cif import CifWriter  # lazy: only CIF output needs it

        text = str(CifWriter(self.to_pymatgen()))
        if path is not None:
            Path(path).write_text(text)
        return text

    # ---------------------------------------------------------------- standardisation
    def niggli(self) -> Crystal:
        """Niggli-reduced cell (pymatgen), same atoms; orientation is kept."""
        s = self.to_pymatgen().get_reduced_structure(reduction_algo="niggli")
        return self._with_structure(s)

    def standardize(self, to_primitive: bool = False, symprec: float = 0.1) -> Crystal:
        """spglib standardisation: conventional cell, or the primitive cell if
        ``to_primitive``. The result is idealised to the detected space group and rotated to
        spglib's standard orientation.

        Args:
          to_primitive: reduce to the standardized primitive cell.
          symprec: spglib distance tolerance in A.
        """
        import spglib  # lazy: only symmetry analysis needs it

        res = spglib.standardize_cell(
            (self.cell, self.frac_coords, self.numbers),
            to_primitive=to_primitive,
            no_idealize=False,
            symprec=symprec,
        )
        if res is None:
            raise CrystalError(f"structure {self.name!r}: spglib could not standardize it")
        lattice, frac, numbers = res
        return self.replace(cell=lattice, frac_coords=frac, numbers=numbers)

    def canonical_orientation(self) -> Crystal:
        """The same crystal rotated so that a is along x and b in the xy plane."""
        return self.replace(cell=lattice_params_to_cell(self.lattice_params))

    def _with_structure(self, s) -> Crystal:
        return Crystal(
            cell=s.lattice.matrix,
            frac_coords=s.frac_coords,
            numbers=np.asarray(s.atomic_numbers),
            properties=self.properties,
            name=self.name,
        )

    # ------------------------------------------------------------------ symmetry ops
    def rotate(self, rotation: np.ndarray) -> Crystal:
        """Rigidly rotates the crystal: cart -> cart @ R.T, i.e. cell rows -> R @ row.

        Fractional coordinates are unchanged.

        Args:
          rotation: [3, 3] proper rotation matrix.
        """
        return self.replace(cell=self.cell @ np.asarray(rotation).T)

    def translate(self, shift_frac: np.ndarray) -> Crystal:
        """Moves every atom by ``shift_frac`` [3] (fractional), wrapping into the cell."""
        return self.replace(frac_coords=self.frac_coords + np.asarray(shift_frac))

    def symmetry_operations(self, symprec: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """The structure's space-group operations in fractional coordinates (spglib).

        Returns:
          rotations [n_ops, 3, 3] int and translations [n_ops, 3], acting as
          ``frac' = frac @ W.T + w``.
        """
        import spglib  # lazy: only symmetry analysis needs it

        sym = spglib.get_symmetry((self.cell, self.frac_coords, self.numbers), symprec=symprec)
        if sym is None:
            return np.eye(3, dtype=np.int64)[None], np.zeros((1, 3))
        return np.asarray(sym["rotations"]), np.asarray(sym["translations"])

    def apply_operation(self, rotation: np.ndarray, translation: np.ndarray) -> Crystal:
        """Applies ``frac' = frac @ W.T + w`` (W integer, in the crystal's basis)."""
        return self.replace(
            frac_coords=self.frac_coords @ np.asarray(rotation).T + np.asarray(translation)
        )

    def spacegroup(self, symprec: float = 0.1) -> int:
        """International space-group number (spglib); 0 if spglib finds none."""
        import spglib  # lazy: only symmetry analysis needs it

        ds = spglib.get_symmetry_dataset(
            (self.cell, self.frac_coords, self.numbers), symprec=symprec
        )
        return 0 if ds is None else int(ds.number)

    def __repr__(self) -> str:
        a, b, c, al, be, ga = self.lattice_params
        label = f"{self.name!r}, " if self.name else ""
        return (
            f"Crystal({label}{self.num_atoms} atoms, Z={self.numbers.tolist()}, "
            f"abc=({a:.3f}, {b:.3f}, {c:.3f}), angles=({al:.2f}, {be:.2f}, {ga:.2f}))"
        )


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation [3, 3] (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def augment(
    crystal: Crystal,
    rng: np.random.Generator,
    rotate: bool = True,
    shift: bool = True,
    symmetry: bool = False,
    symprec: float = 0.1,
) -> Crystal:
    """Training-time augmentation (method section 2.6).

    Args:
      crystal: the structure.
      rng: explicit numpy generator (seeded by the caller).
      rotate: apply a uniformly random rotation of the cell.
      shift: move the origin by a uniform random fractional vector.
      symmetry: apply one random operation of the structure's own space group (spglib),
        which maps the crystal onto itself but changes atom order and periodic images.
      symprec: spglib tolerance (A) for ``symmetry``.

    Returns:
      The augmented `Crystal`; physically the same crystal.
    """
    out = crystal
    if symmetry:
        rots, trans = crystal.symmetry_operations(symprec)
        i = int(rng.integers(len(rots)))
        out = out.apply_operation(rots[i], trans[i])
    if shift:
        out = out.translate(rng.uniform(size=3))
    if rotate:
        out = out.rotate(random_rotation(rng))
    return out


# ---------------------------------------------------------------------------- file I/O
def read_structures(path: str | os.PathLike, index: str = ":") -> list[Crystal]:
    """Reads every structure of an ASE-readable file (extxyz, POSCAR, CIF, ASE .db, ...).

    Scalar entries of ``atoms.info`` (extxyz header, ASE db key-value pairs) become
    properties.

    Raises:
      CrystalError: naming the file (and the frame) when it is empty, cannot be parsed, or
        holds a non-periodic structure.
    """
    import ase.io  # lazy: ase.io 0.5 s, only file I/O needs it

    path = Path(path)
    if not path.exists():
        raise CrystalError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CrystalError(f"{path}: file is empty")
    try:
        if path.suffix == ".db":
            import ase.db  # lazy: only ASE databases need it

            with ase.db.connect(path) as db:
                images = []
                for row in db.select():
                    atoms = row.toatoms()
                    atoms.info.update(row.key_value_pairs)
                    atoms.info.setdefault("name", f"{path.name}:id={row.id}")
                    images.append(atoms)
        else:
            images = ase.io.read(path, index=index)
    except Exception as e:
        raise CrystalError(f"{path}: cannot read structures ({type(e).__name__}: {e})") from e
    if not isinstance(images, list):
        images = [images]
    if not images:
        raise CrystalError(f"{path}: holds no structures")
    out = []
    for i, atoms in enumerate(images):
        name = str(atoms.info.get("name", f"{path.name}[{i}]"))
        out.append(Crystal.from_ase(atoms, name=name))
    return out


def write_structures(
    crystals: Sequence[Crystal], path: str | os.PathLike, append: bool = False
) -> None:
    """Writes crystals to an extxyz file (properties in the comment line), or a folder of
    CIFs when ``path`` has no ``.xyz``/``.extxyz`` suffix.

    Both are read back by ASE (``ase.io.read(path, ':')``) and pymatgen.
    """
    import ase.io  # lazy: ase.io 0.5 s, only file I/O needs it

    path = Path(path)
    if path.suffix in (".xyz", ".extxyz"):
        buf = io.StringIO()
        ase.io.write(buf, [c.to_ase() for c in crystals], format="extxyz")
        with open(path, "a" if append else "w") as f:
            f.write(buf.getvalue())
        return
    path.mkdir(parents=True, exist_ok=True)
    start = len(list(path.glob("*.cif"))) if append else 0
    for i, c in enumerate(crystals):
        stem = c.name or f"crystal_{start + i:06d}"
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)
        c.to_cif(path / f"{safe}.cif")
