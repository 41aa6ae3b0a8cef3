"""CDVAE's structure and composition fingerprints, computed in parallel and cached on disk.

* Structure fingerprint: matminer ``CrystalNNFingerprint.from_preset("ops")`` of every site,
  averaged over the sites of a structure (61 numbers). CDVAE ``scripts/compute_metrics.py``,
  ``Crystal.get_fingerprints``. A structure whose fingerprint raises is recorded as failed;
  CDVAE then marks the crystal invalid and drops it from coverage.
* Composition fingerprint: matminer ``ElementProperty.from_preset("magpie")`` of the
  composition (132 numbers), without NaN imputation as in the matminer CDVAE used (0.7.3).
  Before any distance it is standardised with CDVAE's fixed ``CompScalerMeans`` /
  ``CompScalerStds`` (`cdvae_comp_scale`), NaN -> 0.

The cache is a folder of numpy ``.npz`` files (``allow_pickle=False``; never pickle) holding
``keys`` (one SHA-256 per structure or composition, covering the exact cell, coordinates and
species and the matminer / pymatgen versions), the fingerprints and a success flag. A
structure seen in any earlier run (the reference split, the training split) is not
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoperi_jax.crystal import Crystal
from autoperi_jax.parallel import parallel_map

__all__ = [
    "COMP_SCALER_MEANS",
    "COMP_SCALER_STDS",
    "N_COMP",
    "N_STRUCT",
    "FingerprintCache",
    "cdvae_comp_scale",
    "composition_fingerprints",
    "fingerprint_versions",
    "structure_fingerprints",
]

N_STRUCT = 61  # CrystalNNFingerprint "ops" preset, matminer 0.10.1
N_COMP = 132  # Magpie: 22 elemental properties x 6 statistics
CACHE_VERSION = 1

# CDVAE's composition-fingerprint normaliser: `CompScalerMeans` / `CompScalerStds` in
# txie-93/cdvae cdvae/common/constants.py (used by scripts/eval_utils.py `CompScaler`,
# a StandardScaler with replace_nan_token=0). Carried as data so the distances and the
# coverage cut-offs mean what they meant in the paper.
# fmt: off
COMP_SCALER_MEANS = np.array([
    21.194441759304013, 58.20212663122281, 37.0076848719188, 36.52738520455582,
    13.350626389725019, 29.468922184630255, 28.71735137747704, 78.8868535524408,
    50.16950217496375, 59.56764743604155, 19.020429484306277, 61.335572740454325,
    47.14515893344343, 141.75135923307818, 94.60620029962553, 85.95794070476977,
    34.07300576173523, 68.06189371516912, 637.9862061297893, 1817.2394155466848,
    1179.2532094169414, 1127.2743149568837, 431.51034284549826, 909.1060025135899,
    3.7744320927984534, 13.673707104881585, 9.899275012083132, 9.620186927095652,
    3.8426065581251856, 9.96950217496375, 3.305461575640406, 5.483035282745288,
    2.1775737071048815, 4.215114560306594, 0.8206087101824266, 3.732092798453359,
    109.16732721121315, 179.5570323827936, 70.38970517158047, 136.0978305229613,
    27.027545809538527, 119.16713388110198, 1.2721433060967857, 2.4614001837260617,
    1.1892568776289631, 1.9844483610247092, 0.4691462290494881, 2.100143582306204,
    1.4829869502174964, 1.9899951667472209, 0.5070082165297245, 1.7956250375970633,
    0.2056251946617602, 1.745867568873852, 0.05650072498791687, 2.3618656355727405,
    2.3053649105848235, 1.2829636137262992, 0.9995555685850794, 1.5150314161430642,
    0.7731271145480909, 7.4648139197680035, 6.691686805219913, 4.010677272036105,
    2.612307566507693, 3.303528274528758, 0.2739487675205413, 5.889753504108265,
    5.615804736587724, 2.3244356612494683, 2.1426251769710905, 1.4464475592073465,
    4.739246012566457, 14.578395360077332, 9.839149347510874, 9.413701584608935,
    3.537059747455868, 8.550410826486225, 0.008119864668922184, 0.43286611889801835,
    0.4247462542290962, 0.16687837041055423, 0.17139889490813626, 0.10898985016916385,
    0.06283228612856452, 2.6573707104881583, 2.594538424359594, 1.219602938224228,
    1.0596390454742999, 1.1120831319478008, 0.14842919284678588, 3.8473658772353794,
    3.6989366843885936, 1.4541605082183982, 1.3862277372859781, 0.8018849685838569,
    0.03542774287095215, 2.4474625422909617, 2.4120347994200095, 0.7745217539010397,
    0.9145812330586208, 0.3198646689221846, 1.552730787820203, 6.910681488641856,
    5.357950700821653, 3.615163570754227, 1.9072256165179793, 2.6702271628806185,
    14.608536589568727, 34.83222477045747, 20.223688180890715, 22.47901710732293,
    7.17674504190757, 18.641837024143584, 0.009066988883518605, 0.9185191396809959,
    0.9094521507974755, 0.4368550481994018, 0.38905942883427047, 0.48375558240695804,
    0.0012985909686158003, 0.21708593995837092, 0.21578734898975546, 0.08167977375391729,
    0.08155386250705281, 0.06036340747305611, 116.32010633156113, 217.5905751570807,
    101.27046882551957, 162.87154200548844, 41.920624308665566, 136.4664572257129,
])
COMP_SCALER_STDS = np.array([
    16.35781741152948, 20.189540126474725, 20.516298414514758, 16.816765336550194,
    7.966591328222124, 22.270791076753067, 21.802116630115243, 12.804546460581966,
    24.756629388687983, 13.930306216047477, 10.214535652334533, 27.801612936980938,
    39.74031558353379, 54.269739685575814, 53.70466607591569, 42.852342044453444,
    20.78341194242935, 56.28783510219931, 563.8004405882157, 732.0722574247563,
    736.2122907972664, 606.351603075103, 272.62646060896407, 810.6156779688841,
    3.0362262146833428, 3.2075174256751606, 4.0633818989245665, 2.9738244769894764,
    1.7805586029644034, 5.643243225066782, 1.1994336274579853, 0.8939013979423364,
    1.2297581799896975, 1.0066021334519983, 0.49129747526397105, 1.4159553146070951,
    31.754756468836774, 28.054241463256226, 38.16336054795611, 25.83485338379922,
    15.388376641904662, 39.67137484594156, 0.31988340032011076, 0.6833658037760536,
    0.7464197945553585, 0.4881349085029781, 0.3176591553643101, 0.8601748146737138,
    0.5864801661863596, 0.10048913710210677, 0.5836289120986499, 0.2811748167435902,
    0.2468696279341553, 0.5007375747433073, 0.37237566669029587, 1.7235989187720187,
    1.7058836077743305, 1.1558859351244697, 0.7677842566598179, 1.9203550253462733,
    2.1289400248865182, 3.5326064169848332, 3.708508303762512, 2.8709941136664567,
    1.6110681295257014, 4.310192504023775, 1.6644182118209292, 6.228287671164213,
    6.1200848808512305, 3.1986202996110302, 2.4492978142248867, 4.030497343977163,
    3.662028270049814, 6.8192125550358345, 6.614243783887738, 4.334987449618594,
    2.568319610320196, 5.9494890200106925, 0.08974370432893491, 0.4954725441517777,
    0.494304434278516, 0.2309340434963803, 0.2072873961103969, 0.31162647950590266,
    0.39805702757060923, 1.8111691089355726, 1.7973395144505941, 0.9486995373104102,
    0.7538753151875139, 1.5233177017753785, 0.7952606701778913, 3.711190225170556,
    3.638721437232604, 1.7171165424006831, 1.4307904413917036, 2.1047820817622904,
    0.49193748323158065, 4.064840532426175, 4.035286619587313, 1.4858577214526643,
    1.5799117659864677, 1.6130080156145745, 1.555249156140194, 4.776932951077492,
    4.569790780459629, 2.224617778217326, 1.7217507416156546, 2.5969733650703763,
    7.215001918238936, 19.252513469778584, 18.775394044177858, 9.447222764774764,
    6.7467931836261235, 11.106825644766616, 0.27206794253092115, 1.6449321034573106,
    1.6236282792648686, 0.8506917026741503, 0.7020945355184042, 1.2281895279350408,
    0.04134438177238229, 0.5508855867341717, 0.5486095551438679, 0.24239297524046477,
    0.2127779137935831, 0.3036750942874694, 80.06063945615361, 21.345794811194104,
    80.16475677581042, 52.58533928558554, 35.40836791039412, 85.980205895116,
])
# fmt: on
assert COMP_SCALER_MEANS.shape == COMP_SCALER_STDS.shape == (N_COMP,)


def cdvae_comp_scale(comp_fps: np.ndarray) -> np.ndarray:
    """CDVAE's ``CompScaler.transform``: ``(x - means) / stds`` with NaN replaced by 0.

    Args:
      comp_fps: [n, 132] raw Magpie fingerprints (NaN where matminer has no data).

    Returns:
      [n, 132] standardised fingerprints.
    """
    x = (np.asarray(comp_fps, dtype=np.float64) - COMP_SCALER_MEANS) / COMP_SCALER_STDS
    return np.where(np.isnan(x), 0.0, x)


# --------------------------------------------------------------------------- featurisers
_FEATURIZERS: dict[str, object] = {}


def _featurizer(kind: str):
    """One featurizer per process (building CrystalNN's tables is not free)."""
    if kind not in _FEATURIZERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "crystalnn":
                from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

                _FEATURIZERS[kind] = CrystalNNFingerprint.from_preset("ops")
            elif kind == "magpie":
                from matminer.featurizers.composition.composite import ElementProperty

                _FEATURIZERS[kind] = ElementProperty.from_preset("magpie", impute_nan=False)
            else:
                raise ValueError(f"unknown fingerprint kind {kind!r}")
    return _FEATURIZERS[kind]


def _crystalnn_chunk(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list:
    """Worker: mean CrystalNN site fingerprint of each (cell, frac, numbers), or None."""
    from pymatgen.core import Lattice, Structure

    fp = _featurizer("crystalnn")
    out = []
    for cell, frac, numbers in items:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = Structure(Lattice(cell), numbers.tolist(), frac, coords_are_cartesian=False)
                sites = [fp.featurize(s, i) for i in range(len(s))]
            out.append(np.asarray(sites, dtype=np.float64).mean(axis=0))
        except Exception:  # CDVAE: a failing fingerprint makes the crystal invalid
            out.append(None)
    return out


def _magpie_chunk(items: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list:
    """Worker: Magpie fingerprint of each (elements, counts) composition, or None."""
    from pymatgen.core import Composition
    from pymatgen.core.periodic_table import Element

    fp = _featurizer("magpie")
    out = []
    for elems, counts in items:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                comp = Composition({Element.from_Z(z): c for z, c in zip(elems, counts)})
                out.append(np.asarray(fp.featurize(comp), dtype=np.float64))
        except Exception:
            out.append(None)
    return out


# --------------------------------------------------------------------------------- cache
def fingerprint_versions() -> str:
    """The fingerprint libraries' versions, ``matminer=X,pymatgen=Y`` (part of every cache
    key: another version may give other numbers)."""
    import importlib.metadata as md

    return ",".join(f"{p}={md.version(p)}" for p in ("matminer", "pymatgen"))


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$AUTOPERI_CACHE/eval_fingerprints``, else
    ``~/.cache/autoperi_jax/eval_fingerprints``."""
    if cache_dir is not None:
        return Path(cache_dir)
    from autoperi_jax.datasets import cache_root

    return cache_root() / "eval_fingerprints"


class FingerprintCache:
    """Per-structure fingerprints in ``.npz`` files under one folder (no pickle).

    Each file holds ``keys`` [n] str, ``values`` [n, d] float64, ``ok`` [n] bool and a JSON
    ``meta``. Files are written atomically; unreadable files are ignored with a warning.
    """

    max_files = 32  # consolidated into one file beyond this

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def _files(self, kind: str) -> list[Path]:
        return sorted(self.folder.glob(f"{kind}-*.npz"))

    def load(self, kind: str) -> dict[str, tuple[np.ndarray, bool]]:
        table: dict[str, tuple[np.ndarray, bool]] = {}
        for f in self._files(kind):
            try:
                with np.load(f, allow_pickle=False) as z:
                    keys, values, ok = z["keys"], z["values"], z["ok"]
            except Exception as e:
                warnings.warn(f"ignoring unreadable fingerprint cache {f}: {e}", stacklevel=2)
                continue
            for k, v, o in zip(keys.tolist(), values, ok.tolist()):
                table[k] = (v, bool(o))
        return table

    def store(self, kind: str, entries: dict[str, tuple[np.ndarray, bool]], dim: int) -> None:
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        files = self._files(kind)
        if len(files) >= self.max_files:  # consolidate everything into one file
            merged = self.load(kind)
            merged.update(entries)
            entries = merged
        keys = sorted(entries)
        values = np.stack(
            [np.asarray(entries[k][0], np.float64).reshape(dim) for k in keys]
        ).astype(np.float64)
        ok = np.array([entries[k][1] for k in keys], dtype=bool)
        digest = hashlib.sha256("".join(keys).encode()).hexdigest()[:20]
        path = self.folder / f"{kind}-{digest}.npz"
        tmp = self.folder / f".{kind}-{digest}.tmp{os.getpid()}.npz"
        meta = json.dumps({"kind": kind, "version": CACHE_VERSION, "libs": fingerprint_versions()})
        np.savez_compressed(tmp, keys=np.array(keys, dtype=str), values=values, ok=ok, meta=meta)
        os.replace(tmp, path)
        if len(files) >= self.max_files:
            for f in files:
                if f != path:
                    f.unlink(missing_ok=True)


def _structure_key(c: Crystal, salt: str) -> str:
    h = hashlib.sha256(salt.encode())
    h.update(np.ascontiguousarray(c.cell, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(c.frac_coords, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(c.numbers, dtype=np.int64).tobytes())
    return h.hexdigest()


def _reduced(numbers: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    elems, counts = np.unique(np.asarray(numbers, dtype=np.int64), return_counts=True)
    counts = counts // np.gcd.reduce(counts)
    return tuple(int(e) for e in elems), tuple(int(c) for c in counts)


def _cached_compute(
    kind: str,
    keys: list[str | None],
    payloads: list,
    worker,
    dim: int,
    workers: int | None,
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    progress: bool,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    n = len(keys)
    values = np.full((n, dim), np.nan)
    ok = np.zeros(n, dtype=bool)
    cache = FingerprintCache(default_cache_dir(cache_dir))
    table = cache.load(kind) if use_cache else {}
    todo: dict[str, int] = {}  # key -> payload index (deduplicated)
    for i, k in enumerate(keys):
        if k is None:
            continue
        if k in table:
            v, o = table[k]
            values[i], ok[i] = v, o
        elif k not in todo:
            todo[k] = i
    if todo:
        order = list(todo)
        results = parallel_map(
            worker,
            [payloads[todo[k]] for k in order],
            workers=workers,
            chunk_size=chunk_size,
            desc=f"{kind} fingerprints",
            progress=progress,
            unit="structure",
        )
        new = {}
        for k, r in zip(order, results):
            if r is None or np.shape(r) != (dim,):
                new[k] = (np.full(dim, np.nan), False)
            else:
                new[k] = (np.asarray(r, np.float64), True)
        for i, k in enumerate(keys):
            if k in new:
                values[i], ok[i] = new[k]
        if use_cache:
            cache.store(kind, new, dim)
    return values, ok


def structure_fingerprints(
    crystals: Sequence[Crystal | None],
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """CDVAE structure fingerprints: CrystalNN "ops" site fingerprints averaged per structure.

    Args:
      crystals: structures; ``None`` entries (unparsable samples) get no fingerprint.
      workers: processes (default: every core).
      cache_dir: fingerprint cache (default `default_cache_dir`).
      use_cache: read and write the cache.
      progress: progress bar.

    Returns:
      fps [n, 61] (NaN rows where it failed) and ok [n] bool.
    """
    salt = f"crystalnn-ops|v{CACHE_VERSION}|{fingerprint_versions()}"
    keys = [None if c is None else _structure_key(c, salt) for c in crystals]
    payloads = [None if c is None else (c.cell, c.frac_coords, c.numbers) for c in crystals]
    return _cached_compute(
        "crystalnn", keys, payloads, _crystalnn_chunk, N_STRUCT, workers, cache_dir, use_cache,
        progress, chunk_size=16,
    )  # fmt: skip


def composition_fingerprints(
    crystals: Sequence[Crystal | None],
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw Magpie composition fingerprints (CDVAE's ``CompFP``), keyed by reduced formula.

    Magpie statistics depend on atomic fractions only, so a composition and its multiples
    share one fingerprint.

    Returns:
      fps [n, 132] (raw; NaN where matminer lacks data; use `cdvae_comp_scale`) and ok [n].
    """
    salt = f"magpie|v{CACHE_VERSION}|{fingerprint_versions()}"
    comps = [None if c is None else _reduced(c.numbers) for c in crystals]
    keys = [
        None if rc is None else hashlib.sha256(f"{salt}|{rc}".encode()).hexdigest() for rc in comps
    ]
    return _cached_compute(
        "magpie", keys, comps, _magpie_chunk, N_COMP, workers, cache_dir, use_cache, progress,
        chunk_size=256,
    )  # fmt: skip
