"""High-level API of a trained generative model: ``autoperi_jax.load(workdir)``.

A run trained with ``autoperi train`` (the autoencoder) and ``autoperi train-flow`` (the
latent flow and the property predictor) holds a self-contained inference bundle in
``RUN/flow/model`` (Orbax pytree + JSON metadata, `autoperi_jax.checkpoint.save_pytree`):
the autoencoder parameters and settings, the flow parameters and settings, the latent and
property statistics and the predictor. `load` reads only that bundle, so the library never
depends on the trainer's checkpoint layout::

    import jax, autoperi_jax

    gen = autoperi_jax.load("runs/p5_c")          # or autoperi_jax.load_pretrained("perov_5")
    crystals = gen.sample(jax.random.key(0), 100, conditions={"heat_ref": 0.5},
                          spacegroup=221)
    out = gen.sample_fn(gen.params, jax.random.key(1), 64)      # padded arrays, jitted
    z = gen.encode(crystals)                                     # [n, D]
    again = gen.decode(z, jax.random.key(2))
    props = gen.predict(crystals)                                # {name: [n]}
    preds = gen.predict_structures("SrTiO3", 20, jax.random.key(3))  # structure prediction

Batches: `Generator.sample` draws batch ``b`` with ``fold_in(key, b)`` and always runs
full batches of ``batch_size`` (one compiled shape), so the first m crystals of a call
do not depend on ``n`` and the same key gives the same crystals.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.checkpoint import load_pytree
from autoperi_jax.convert import decoded_to_crystals, outputs_to_crystals, sample_name
from autoperi_jax.crystal import Crystal
from autoperi_jax.distinct import DistinctFilter
from autoperi_jax.elements import composition_row, formula_label
from autoperi_jax.flow import FlowConfig
from autoperi_jax.graph import GraphSettings, PaddingBudget, batch_graphs, crystal_to_graph
from autoperi_jax.matching import MapChunks, consensus_scores
from autoperi_jax.model import ModelSettings, make_decode_fn, make_encode_fn
from autoperi_jax.nn.autoencoder import Autoencoder
from autoperi_jax.protocol import CDVAE_MATCHER
from autoperi_jax.sampling import (
    PropertyHead,
    SamplerSettings,
    decoding_settings,
    draws_spacegroups,
    make_predict_fn,
    make_sample_fn,
)

__all__ = [
    "BUNDLE",
    "Generator",
    "available_pretrained",
    "encode_graphs",
    "load",
    "load_pretrained",
    "outputs_to_crystals",
    "pretrained_path",
    "rank_predictions",
]

BUNDLE = Path("flow") / "model"  # inside a run folder
CSP_BUNDLE = "csp"  # the structure-prediction flow, a folder inside the model bundle
PRETRAINED_DIR = Path(__file__).parent / "pretrained"  # shipped bundles, one folder each


def _next_pow2(x: int, minimum: int = 64) -> int:
    return max(minimum, 1 << max(int(x) - 1, 0).bit_length())


def padded_batches(graphs: Sequence[Any], batch_size: int) -> Iterator[tuple[Any, int]]:
    """Padded `jraph.GraphsTuple` batches of ``graphs`` in order, with ``batch_size + 1``
    graph slots each and node / edge budgets rounded up to powers of two (a few compiled
    shapes whatever the data). Yields (batch, number of real graphs)."""
    for start in range(0, len(graphs), batch_size):
        chunk = list(graphs[start : start + batch_size])
        n_node = sum(len(g.numbers) for g in chunk)
        n_edge = sum(len(g.senders) for g in chunk)
        budget = PaddingBudget(_next_pow2(n_node + 1), _next_pow2(n_edge), batch_size + 1)
        yield batch_graphs(chunk, budget), len(chunk)


def encode_graphs(
    encode_fn: Any, params: Any, graphs: Sequence[Any], batch_size: int = 256
) -> np.ndarray:
    """Latents of periodic graphs, in order.

    Args:
      encode_fn: jitted ``encode(params, batch) -> z [G, D]`` (`make_encode_fn`).
      params: autoencoder parameters.
      graphs: `autoperi_jax.graph.CrystalGraph` records.
      batch_size: crystals per batch.

    Returns:
      [n, D] float32 numpy array.
    """
    out = []
    for batch, count in padded_batches(graphs, batch_size):
        out.append(np.asarray(encode_fn(params, batch))[:count])
    if not out:
        raise ValueError("no graphs to encode")
    return np.concatenate(out)


@dataclasses.dataclass
class Generator:
    """A trained generative model (returned by `load`).

    Attributes:
      model: the `Autoencoder`.
      settings: its `ModelSettings` (decoding).
      normalisers: lattice normalisers.
      graph_cutoff, graph_max_neighbors: the encoder's host graph settings.
      flow_config: the latent flow's `FlowConfig`.
      cond_names: the properties the flow is conditioned on.
      pred_names: the properties the predictor outputs.
      sampler: the `SamplerSettings` of ``sample_fn``.
      params: ``{"autoencoder", "flow", "predictor", "stats"}`` (`autoperi_jax.sampling`).
      sample_fn: ``jax.jit(sample, static_argnums=2)``: the pure sample function.
      meta: the bundle's metadata (training metrics included).
      path: the bundle folder (where `predict_structures` finds its ``csp`` flow).
      prior_groups: the space groups of the training prior (None = any).
    """

    model: Autoencoder
    settings: ModelSettings
    normalisers: dict[str, Any]
    graph_cutoff: float
    graph_max_neighbors: int | None
    flow_config: FlowConfig
    cond_names: tuple[str, ...]
    pred_names: tuple[str, ...]
    predictor_hidden: tuple[int, ...]
    sampler: SamplerSettings
    params: dict[str, Any]
    sample_fn: Any
    meta: dict[str, Any]
    path: Path | None = None
    prior_groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self._csp: tuple[dict[str, Any], Any, dict[str, Any]] | None = None
        self._encode = jax.jit(make_encode_fn(self.model))
        self._decode = jax.jit(make_decode_fn(self.model, self._decode_settings, self.normalisers))
        self._predict = jax.jit(
            make_predict_fn(
                PropertyHead(self.predictor_hidden, len(self.pred_names)), self.pred_names
            )
        )

    @property
    def _decode_settings(self) -> ModelSettings:
        return decoding_settings(self.settings, self.sampler)

    @property
    def nfe(self) -> int:
        """Decoder network evaluations per decoded candidate (Euler steps of the coordinate
        flow)."""
        return self._decode_settings.num_steps

    @property
    def decoded_per_sample(self) -> float:
        """Candidates decoded per returned crystal in unconditioned sampling
        (`autoperi_jax.sampling.SamplerSettings.spare_fraction`): 1 when only the
        composition is checked (it is chosen before decoding), ``1 + spare_fraction``
        when the symmetry layer (space-group prior) or the contact check runs. The real
        ratio for a batch of n is ``ceil(spare_fraction * n) / n + 1``."""
        s = self.sampler
        decoded_pool = draws_spacegroups(s, self.flow_config) or s.accept_min_ratio > 0
        return 1.0 + s.spare_fraction if decoded_pool else 1.0

    @property
    def nfe_per_sample(self) -> float:
        """Decoder network evaluations per returned crystal, unconditioned sampling
        (``nfe * decoded_per_sample``)."""
        return self.nfe * self.decoded_per_sample

    # ----------------------------------------------------------------------- sampling
    def sample_batches(
        self,
        key: jax.Array,
        n: int,
        conditions: Mapping[str, Any] | None = None,
        spacegroup: int | None = None,
        batch_size: int = 256,
        temperature: float | None = None,
        unique: bool = False,
        max_batches: int | None = None,
    ) -> Iterator[list[Crystal]]:
        """Iterator over the crystals of `sample` batch by batch (for writing as it goes);
        with ``unique`` each batch's crystals that duplicate an earlier one are left out
        (see `sample`), so a batch may yield fewer crystals than drawn, or none. Bad
        arguments raise here, before the first batch is asked for."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batches is not None and not unique:
            raise ValueError("max_batches limits unique=True sampling only")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        if unique and max_batches is None:
            max_batches = 4 * math.ceil(n / batch_size) + 4
        conditions = {k: float(v) for k, v in (conditions or {}).items()}
        return self._batches(key, n, conditions, spacegroup, batch_size, temperature, max_batches)

    def _batches(
        self,
        key: jax.Array,
        n: int,
        conditions: dict[str, float],
        spacegroup: int | None,
        batch_size: int,
        temperature: float | None,
        limit: int | None,
    ) -> Iterator[list[Crystal]]:
        """`sample_batches`' generator (arguments checked); ``limit``: the batch budget of
        unique sampling, None = plain sampling."""
        unique = limit is not None
        if unique:
            seen = DistinctFilter()
        done = 0
        b = 0
        while done < n:
            if unique and b >= limit:
                warnings.warn(
                    f"sample(unique=True): {done} distinct crystals of the {n} asked for after "
                    f"{b} batches of {batch_size} ({seen.n_seen} drawn); returning those. "
                    "Pass a larger max_batches (--max-batches) or ask for fewer; if most draws "
                    "were duplicates, the model has few distinct structures under these "
                    "conditions (a higher temperature spreads it).",
                    stacklevel=2,
                )
                return
            out = self.sample_fn(
                self.params,
                jax.random.fold_in(key, b),
                batch_size,
                conditions,
                None if spacegroup is None else int(spacegroup),
                temperature,
            )
            b += 1
            if not unique:
                count = min(batch_size, n - done)
                crystals = outputs_to_crystals(out, start=done, count=count)
            else:
                crystals = []
                for c in outputs_to_crystals(out):
                    if done + len(crystals) == n:
                        break
                    if seen.add(c):  # renamed in output order
                        crystals.append(c.replace(name=sample_name(done + len(crystals))))
            done += len(crystals)
            yield crystals

    def sample(
        self,
        key: jax.Array,
        n: int,
        conditions: Mapping[str, Any] | None = None,
        spacegroup: int | None = None,
        batch_size: int = 256,
        temperature: float | None = None,
        unique: bool = False,
        max_batches: int | None = None,
    ) -> list[Crystal]:
        """Draws ``n`` crystals.

        Args:
          key: PRNG key; batch b uses ``fold_in(key, b)``.
          n: number of crystals.
          conditions: {property: value in physical units} (any subset of ``cond_names``).
          spacegroup: requested space group 1..230 (None = any).
          batch_size: crystals per compiled call.
          temperature: base-noise temperature (None = the sampler's).
          unique: return n mutually distinct crystals: a drawn crystal that pymatgen's
            ``StructureMatcher`` (default tolerances, within its reduced formula) matches
            to an earlier kept one is dropped and batches are drawn until n are kept
            (`autoperi_jax.distinct.DistinctFilter`, host side; ``sample_fn`` is
            unchanged). The result is the draw-order list of first occurrences, so
            uniqueness (`eval.metrics.uniqueness`) is 1 by construction.
          max_batches: with ``unique`` only: stop after this many batches (default
            ``4 ceil(n / batch_size) + 4``) with a warning and fewer than n crystals.

        Returns:
          ``n`` `Crystal` objects with the predicted properties in ``properties`` (fewer
          only with ``unique`` when ``max_batches`` ran out first).
        """
        out: list[Crystal] = []
        for crystals in self.sample_batches(
            key, n, conditions, spacegroup, batch_size, temperature, unique, max_batches
        ):
            out.extend(crystals)
        return out

    # ------------------------------------------------------- structure prediction
    @property
    def has_csp(self) -> bool:
        """Whether the bundle holds a structure-prediction flow (``csp/``)."""
        return self.path is not None and (self.path / CSP_BUNDLE / "meta.json").exists()

    def _csp_parts(self) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """(params, jitted sample function, meta) of the ``csp`` flow, loaded once."""
        if self._csp is None:
            if not self.has_csp:
                raise FileNotFoundError(
                    f"{self.path}: this model has no structure-prediction flow ({CSP_BUNDLE}/); "
                    "train one with `autoperi train-flow --workdir RUN --config "
                    "train/configs/csp_perov_5.py`"
                )
            tree, meta = load_pytree(self.path / CSP_BUNDLE)
            tree = jax.tree.map(jnp.asarray, tree)
            if meta["autoencoder_step"] != self.meta["autoencoder"]["step"]:
                raise ValueError(
                    f"{self.path / CSP_BUNDLE}: trained on the autoencoder of step "
                    f"{meta['autoencoder_step']}, this bundle's is step "
                    f"{self.meta['autoencoder']['step']}"
                )
            flow_config = FlowConfig(**meta["flow_config"])
            params = {
                "autoencoder": self.params["autoencoder"],
                "flow": tree["flow"],
                "predictor": self.params["predictor"],
                "stats": {**self.params["stats"], **tree["stats"]},
            }
            fn = make_sample_fn(
                self.model,
                self.settings,
                self.normalisers,
                flow_config,
                tuple(meta["cond_names"]),
                self.pred_names,
                self.predictor_hidden,
                self.sampler,
                prior_groups=self.prior_groups,
            )
            self._csp = (params, jax.jit(fn, static_argnums=2), meta)
        return self._csp

    @property
    def csp_fn(self) -> Any:
        """The jitted pure structure-prediction function, ``csp_fn(csp_params, key, n,
        conditions=None, spacegroup=None, temperature=None, composition=[n, A])`` (the
        sample function of `autoperi_jax.sampling.make_sample_fn` on the composition
        flow); its parameters are `csp_params`."""
        return self._csp_parts()[1]

    @property
    def csp_params(self) -> dict[str, Any]:
        """The parameters of `csp_fn` (this autoencoder and predictor, the csp flow)."""
        return self._csp_parts()[0]

    def composition_row(self, composition: Any) -> np.ndarray:
        """[A] int32: the sorted atomic numbers of one cell, 0-padded to the model's
        atom budget (`autoperi_jax.elements.composition_row`).

        Raises:
          ValueError: a bad composition, or more atoms than the model's ``max_atoms``.
        """
        return composition_row(composition, self.settings.max_atoms)

    def predict_structures_batches(
        self,
        compositions: Sequence[Any],
        n: int,
        key: jax.Array,
        names: Sequence[str] | None = None,
        spacegroup: int | None = None,
        batch_size: int = 256,
        temperature: float | None = None,
    ) -> Iterator[list[Crystal]]:
        """`predict_structures` for many compositions, batch by batch: ``n`` predictions
        for each, named ``{names[i]}#{j}`` (the naming ``autoperi eval --task csp``
        reads); rows are composition-major (i, then j), batch b drawn with
        ``fold_in(key, b)``. Every composition is checked before the first batch."""
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
        rows = np.stack([self.composition_row(c) for c in compositions])  # [C, A]
        if names is None:
            names = [f"prediction_{i:06d}" for i in range(len(rows))]
        if len(names) != len(rows):
            raise ValueError(f"{len(names)} names for {len(rows)} compositions")
        params, fn, _ = self._csp_parts()
        return self._predict_batches(
            params, fn, rows, list(names), n, key, spacegroup, batch_size, temperature
        )

    def _predict_batches(
        self,
        params: dict[str, Any],
        fn: Any,
        rows: np.ndarray,
        names: list[str],
        n: int,
        key: jax.Array,
        spacegroup: int | None,
        batch_size: int,
        temperature: float | None,
    ) -> Iterator[list[Crystal]]:
        """Batches of ``n`` predictions per row of ``rows`` [C, A] (a generator, so the
        checks of `predict_structures_batches` run before the first batch is drawn)."""
        total = len(rows) * n
        sg = None if spacegroup is None else int(spacegroup)
        for b, start in enumerate(range(0, total, batch_size)):
            idx = np.arange(start, start + batch_size)
            comp = rows[np.minimum(idx, total - 1) // n]  # [B, A]; the tail repeats a row
            key_b = jax.random.fold_in(key, b)
            out = fn(params, key_b, batch_size, None, sg, temperature, jnp.asarray(comp))
            count = min(batch_size, total - start)
            crystals = outputs_to_crystals(out, count=count)
            for r, c in zip(idx[:count], crystals):
                object.__setattr__(c, "name", f"{names[r // n]}#{r % n}")
            yield crystals

    def predict_structures(
        self,
        composition: Any,
        n: int,
        key: jax.Array,
        spacegroup: int | None = None,
        batch_size: int = 256,
        temperature: float | None = None,
        rank: bool = False,
    ) -> list[Crystal]:
        """Crystal structure prediction: ``n`` structures of the given atoms.

        The composition flow of the bundle (``csp/``, `train.flow_stage` with
        ``composition = True``) draws z ~ p(z | composition [, space group]) and the
        decoder builds the lattice and the coordinates for exactly these atoms (count and
        species are not sampled); each prediction is the first of ``1 + retries``
        candidates that passes the sampler's contact check (`SamplerSettings`).

        Args:
          composition: a formula for one cell (``"SrTiO3"``), a pymatgen ``Composition``,
            or a list of atomic numbers.
          n: number of predictions.
          key: PRNG key; batch b uses ``fold_in(key, b)``.
          spacegroup: ask for this group (1..230) too; None = any.
          batch_size: rows per compiled call (``min(batch_size, n)`` here).
          temperature: base-noise temperature (None = ``sampler.conditioned_temperature``).
          rank: order the predictions by how much the others agree with each
            (`rank_predictions`, StructureMatcher on the host: n (n - 1) / 2 matches,
            ~16 ms each for 5-atom cells), so the first is the model's most frequent
            structure rather than one draw.

        Returns:
          ``n`` `Crystal` objects named ``{formula}#{j}``, with exactly the given atoms
          (with ``rank``, ``j`` is the rank and ``properties["consensus"]`` the score).
        """
        row = self.composition_row(composition)
        name = formula_label(row)
        out: list[Crystal] = []
        for crystals in self.predict_structures_batches(
            [composition], n, key, [name], spacegroup, min(batch_size, n), temperature
        ):
            out.extend(crystals)
        return rank_predictions(out, n) if rank else out

    # ------------------------------------------------------------ encode / decode
    def _graphs(self, crystals: Sequence[Crystal]) -> list[Any]:
        gs = GraphSettings(cutoff=self.graph_cutoff, max_neighbors=self.graph_max_neighbors)
        return [crystal_to_graph(c, gs) for c in crystals]

    def encode(self, crystals: Sequence[Crystal], batch_size: int = 256) -> np.ndarray:
        """Latents z [n, D] of crystals (deterministic encoder; posterior mean otherwise)."""
        return encode_graphs(
            self._encode, self.params["autoencoder"], self._graphs(crystals), batch_size
        )

    def decode(self, z: Any, key: jax.Array, batch_size: int = 256) -> list[Crystal]:
        """Crystals decoded from latents z [n, D] (batch b uses ``fold_in(key, b)``; no
        symmetrisation or constraint layer: the autoencoder's own decoding)."""
        z = np.asarray(z, np.float32)
        out: list[Crystal] = []
        for b, start in enumerate(range(0, len(z), batch_size)):
            chunk = z[start : start + batch_size]
            pad = np.zeros((batch_size, z.shape[1]), np.float32)
            pad[: len(chunk)] = chunk
            dec = self._decode(
                self.params["autoencoder"], jnp.asarray(pad), jax.random.fold_in(key, b)
            )
            names = [f"decoded_{start + i:06d}" for i in range(len(chunk))]
            out.extend(decoded_to_crystals(dec, np.arange(batch_size) < len(chunk), names))
        return out

    def reconstruct(
        self, crystals: Sequence[Crystal], key: jax.Array, batch_size: int = 256
    ) -> list[Crystal]:
        """Encode then decode, in order; the decoded crystals keep the input names.

        Equal to `autoperi_jax.model.make_reconstruct_fn` on the same batches (crystal g
        of batch b draws its noise from ``fold_in(fold_in(key, b), g)`` in both). Decodes
        with the sampler's start noise; ``load(..., prior_noise=0.0)`` gives the
        deterministic decoding of `autoperi reconstruct`."""
        out = self.decode(self.encode(crystals, batch_size), key, batch_size)
        for c, ref in zip(out, crystals):
            object.__setattr__(c, "name", ref.name)
        return out

    def predict(self, crystals: Sequence[Crystal], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Predicted properties {name: [n]} (physical units) of crystals: encoder + head."""
        return self.predict_z(self.encode(crystals, batch_size))

    def predict_z(self, z: Any) -> dict[str, np.ndarray]:
        """Predicted properties {name: [n]} of latents z [n, D]."""
        out = self._predict(
            self.params["predictor"], jnp.asarray(z, jnp.float32), self.params["stats"]
        )
        return {k: np.asarray(v) for k, v in out.items()}


def _known(cls: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``fields`` that are dataclass fields of ``cls`` (a bundle written
    by an older version may lack new fields, which then take their defaults; fields
    removed since are dropped)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    return {k: v for k, v in fields.items() if k in names}


def rank_predictions(
    crystals: Sequence[Crystal], n: int, map_chunks: MapChunks | None = None
) -> list[Crystal]:
    """Each consecutive group of ``n`` predictions (one composition, as
    `Generator.predict_structures_batches` yields them) ordered by
    `autoperi_jax.matching.consensus_scores` under the CSP protocol's matcher
    (``CDVAE_MATCHER``), highest first (ties keep the drawn order), renamed
    ``{name}#{rank}``, with the score in ``properties["consensus"]``.

    On Perov-5 validation compositions (400, 8 draws each, T = 1) the first-ranked
    prediction matched 58.2 % (RMSE 0.090) against 55.8 % (0.114) for the first draw.
    """
    if n < 1 or len(crystals) % n:
        raise ValueError(f"{len(crystals)} predictions are not groups of n = {n}")
    groups = [list(crystals[s : s + n]) for s in range(0, len(crystals), n)]
    scores = consensus_scores(groups, CDVAE_MATCHER, map_chunks=map_chunks)
    out: list[Crystal] = []
    for grp, sc in zip(groups, scores):
        for r, i in enumerate(np.argsort(-sc, kind="stable")):
            c = grp[i]
            base = c.name.rpartition("#")[0] or c.name
            props = {**c.properties, "consensus": float(sc[i])}
            out.append(dataclasses.replace(c, name=f"{base}#{r}", properties=props))
    return out


def load(
    workdir: str | Path, sampler: SamplerSettings | None = None, **overrides: Any
) -> Generator:
    """Loads the generative model of a run (``RUN/flow/model``, written by
    ``autoperi train-flow``).

    Args:
      workdir: the run folder (or the bundle folder itself).
      sampler: `SamplerSettings` (default: those saved by the flow stage).
      **overrides: fields of `SamplerSettings` to change (e.g. ``num_steps=5``,
        ``temperature=0.8``).

    Returns:
      A `Generator`.
    """
    workdir = Path(workdir)
    bundle = workdir if (workdir / "meta.json").exists() else workdir / BUNDLE
    if not (bundle / "meta.json").exists():
        raise FileNotFoundError(
            f"{workdir}: no generative model ({bundle}/meta.json); run "
            f"`autoperi train-flow --workdir {workdir}` first"
        )
    tree, meta = load_pytree(bundle)
    tree = jax.tree.map(jnp.asarray, tree)
    ae = meta["autoencoder"]
    model = Autoencoder(**_known(Autoencoder, ae["model"]))
    settings = ModelSettings(**_known(ModelSettings, ae["settings"]))
    flow_config = FlowConfig(**meta["flow_config"])
    if sampler is None:
        saved = dict(meta.get("sampler", {}))
        if "n_images" in saved:
            saved["n_images"] = tuple(saved["n_images"])
        sampler = SamplerSettings(**saved)
    if overrides:
        sampler = dataclasses.replace(sampler, **overrides)
    cond_names = tuple(meta["cond_names"])
    pred_names = tuple(meta["pred_names"])
    hidden = tuple(meta["predictor_hidden"])
    prior = np.asarray(tree["stats"].get("spacegroup_prior", np.zeros(0)))
    prior_groups = tuple(int(g) for g in np.flatnonzero(prior > 0)) if prior.any() else None
    sample = make_sample_fn(
        model,
        settings,
        ae["normalisers"],
        flow_config,
        cond_names,
        pred_names,
        hidden,
        sampler,
        prior_groups=prior_groups,
    )
    return Generator(
        model=model,
        settings=settings,
        normalisers=ae["normalisers"],
        graph_cutoff=float(ae["graph"]["cutoff"]),
        graph_max_neighbors=ae["graph"]["max_neighbors"],
        flow_config=flow_config,
        cond_names=cond_names,
        pred_names=pred_names,
        predictor_hidden=hidden,
        sampler=sampler,
        params=tree,
        sample_fn=jax.jit(sample, static_argnums=2),
        meta=meta,
        path=bundle,
        prior_groups=prior_groups,
    )


def available_pretrained() -> list[str]:
    """Names of the models shipped inside the package (``autoperi_jax/pretrained/NAME``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "meta.json").exists())


def pretrained_path(name: str) -> Path:
    """Folder of the shipped model ``name`` (a `load` bundle plus its ``MODEL_CARD.md``).

    Raises:
      FileNotFoundError: naming the models that are shipped.
    """
    path = PRETRAINED_DIR / name
    if not (path / "meta.json").exists():
        names = ", ".join(available_pretrained()) or "none"
        raise FileNotFoundError(
            f"no pretrained model {name!r} (shipped: {names}); for your own run use "
            f"`autoperi_jax.load(RUN)` / `--workdir RUN`"
        )
    return path


def load_pretrained(
    name: str = "perov_5", sampler: SamplerSettings | None = None, **overrides: Any
) -> Generator:
    """Loads a model shipped inside the package; no network, no training run needed.

    ``perov_5``: the Perov-5 autoencoder + latent flow + property predictor trained with
    ``train/configs/perov_5.py`` and ``train/configs/flow_perov_5.py``; its training
    command, wall time, hardware and measured metrics are in
    ``autoperi_jax/pretrained/perov_5/MODEL_CARD.md``.

    Args:
      name: a name from `available_pretrained`.
      sampler, **overrides: as in `load`.

    Returns:
      A `Generator`::

        gen = autoperi_jax.load_pretrained("perov_5")
        crystals = gen.sample(jax.random.key(0), 16, spacegroup=221)
    """
    return load(pretrained_path(name), sampler, **overrides)
