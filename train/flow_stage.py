"""Second training stage: the latent flow and the property predictor on a frozen encoder.

``autoperi train-flow --workdir RUN`` (`train_flow`):

1. encodes the train and validation splits once with the run's (frozen, deterministic)
   encoder and caches z, the property columns and a space-group label per crystal in
   ``RUN/flow/latents_{split}.npz``;
2. standardises z per coordinate (train mean / std, saved) and trains the conditional
   RealNVP (`autoperi_jax.flow`) by maximum likelihood, L_gen = -mean log p(z_std | c),
   with the context c = (standardised properties of ``config.properties``, space group)
   randomly dropped to the null token (every condition of a sample with ``p_uncond``,
   then each property / the group independently), so one flow gives p(z), p(z | props),
   p(z | group) and p(z | both);
3. trains the property predictor, an MLP head on the same encoder's z
   (`autoperi_jax.sampling.PropertyHead`), for every column of
   ``config.predict_properties``, and reports its validation MAE;
4. writes a self-contained inference bundle ``RUN/flow/model`` (Orbax pytree + JSON, no
   pickle: autoencoder parameters and settings, flow, predictor, statistics) that
   `autoperi_jax.load` reads, plus ``RUN/flow/metrics.jsonl`` (``l_gen`` of the training
   steps, ``val_nll`` / ``val_nll_uncond`` in nats per crystal of the standardised z, the
   predictor's MAEs) and ``RUN/flow/summary.json``.

The flow trains with the autoencoder's loop and optimizer (`train.loop`): the same
sharded, donated step with the non-finite guard, checkpoints in ``RUN/flow/checkpoints``
(every ``checkpoint_every`` steps, default ``val_every``, and at each validation; the
best validation step is the one kept), SIGTERM / SIGINT handling, and bit-exact resume:
re-running an interrupted ``autoperi train-flow`` continues where it stopped.

Why two stages rather than training the flow jointly with the autoencoder. The encoder is
deterministic, so z = E(x) is a point and log p(z) is a density of a point set that the
encoder itself shapes. Under a joint objective L_rec + L_gen the encoder can raise log p(z)
without modelling anything: scaling z by a factor s < 1 adds -D log s to log p (the flow
undoes the scale for free), and collapsing directions the decoder does not need sends
log p to +infinity, while the decoder absorbs the scale. L_gen then stops measuring how
well the flow covers the data, and it competes with reconstruction (the reason VAEs need
a KL with a fixed-variance posterior). With the encoder frozen, z is a fixed data set, the
flow's NLL is an honest, comparable number (validation NLL detects over-fitting), and the
autoencoder keeps its reconstruction quality (98.4 % match on Perov-5 test for
runs/p5_c). Latent generative models use the same recipe (Stable Diffusion's latent
diffusion on a frozen autoencoder; CDVAE fits its property / composition heads on a
fixed latent too). The flow is cheap to retrain (minutes on a CPU) for other conditions.

Crystal structure prediction (``config.composition = True``, train/configs/csp_perov_5.py)
trains a second flow on the same latents, p(z | composition [, space group]), whose
context always holds the cell's atoms (`autoperi_jax.flow.ContextEncoder`: a set
embedding), and writes it to ``RUN/flow/model/csp`` beside the generation bundle. At
prediction time the decoder is given the atoms and decodes lattice and positions from
this flow's z (`autoperi_jax.api.Generator.predict_structures`). Why a conditional flow
over the whole z rather than the generation flow's z with the atoms forced onto the
decoder: measured on 1,000 Perov-5 validation compositions (k = 1), the forced variant
matches more often but loosely (65.9 %, RMSE 0.241: the CDVAE matcher's stol 0.5 accepts
most perovskite cells of the right atoms, wrong sites included), while the composition
flow predicts the sites (54.2 %, RMSE 0.119; 29 % of compositions within rms 0.05 against
11 %). Encoding the composition into z_comp and sampling only z_lattice / z_struct would
need an encoder of compositions alone; the flow's context does that job and keeps the
autoencoder frozen. docs/experiments.md (row 18) has the table and the selection among
draws (`autoperi_jax.api.rank_predictions`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from autoperi_jax.api import BUNDLE, CSP_BUNDLE, encode_graphs
from autoperi_jax.checkpoint import (
    Checkpointer,
    load_checkpoint,
    load_pytree,
    save_pytree,
    to_jsonable,
)
from autoperi_jax.elements import composition_row
from autoperi_jax.flow import FlowConfig, FlowContext, drop_context, make_flow
from autoperi_jax.model import make_encode_fn
from autoperi_jax.nn.autoencoder import Autoencoder
from autoperi_jax.run_config import build_model, build_settings, load_split
from autoperi_jax.sampling import PropertyHead
from train import parallel
from train.loop import (
    Logger,
    LoopSettings,
    OptimizerSettings,
    initial_state,
    make_train_step,
    optimizer,
    restore_state,
    run_loop,
)

__all__ = [
    "IndexBatches",
    "LatentBatch",
    "LatentBatches",
    "LatentData",
    "SampleCheck",
    "checkpoint_from_bundle",
    "fit_flow",
    "latent_split",
    "make_flow_loss",
    "make_sample_check",
    "sample_quality",
    "spacegroup_labels",
    "standardise",
    "train_flow",
    "train_predictor",
]

SPACEGROUP_COLUMN = "spacegroup.number"


# ------------------------------------------------------------------------------ data
def spacegroup_labels(ds: Any, symprec: float = 0.1, progress: bool = False) -> np.ndarray:
    """[n] int32 international numbers of a dataset's crystals by spglib (0 if none)."""
    return np.array(
        [
            ds.crystal(i).spacegroup(symprec)
            for i in tqdm(range(len(ds)), disable=not progress, desc="spacegroups")
        ],
        np.int32,
    )


def latent_split(
    workdir: Path, ckpt: dict[str, Any], config: ml_collections.ConfigDict, split: str
) -> dict[str, np.ndarray]:
    """Encodes one split with the run's encoder (cached in ``RUN/flow/latents_SPLIT.npz``).

    Returns:
      dict: ``z`` [n, D] float32, ``props`` [n, Q] float64 (columns ``names``, NaN where
      missing), ``names`` [Q] str, ``spacegroup`` [n] int32 (0 = unknown),
      ``composition`` [n, A] int32 (the atomic numbers of each cell in ascending order,
      0 on the slots past its atom count; A = the model's ``max_atoms``).
    """
    names = list(dict.fromkeys([*config.properties, *config.predict_properties]))
    columns = list(names)
    if config.spacegroup_source == "column":
        columns.append(SPACEGROUP_COLUMN)
    key = json.dumps(
        {
            "step": ckpt["step"],
            "columns": columns,
            "sg": config.spacegroup_source,
            "symprec": config.symprec,
            "dataset": ckpt["config"].data.to_dict(),
        },
        sort_keys=True,
        default=str,
    )
    cache = workdir / "flow" / f"latents_{split}.npz"
    fields = ("z", "props", "names", "spacegroup", "composition")
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            if str(f["key"]) == key and all(k in f for k in fields):
                return {k: f[k] for k in fields}
    ae_config = ml_collections.ConfigDict(ckpt["config"].to_dict())
    with ae_config.unlocked():
        ae_config.data.properties = tuple(columns)
    ds = load_split(ae_config, split, config.progress)
    model = build_model(ae_config)
    t0 = time.perf_counter()
    z = encode_graphs(
        jax.jit(make_encode_fn(model)), ckpt["params"], ds.graphs, config.encode_batch_size
    )
    print(f"encoded {len(z)} {split} crystals in {time.perf_counter() - t0:.1f} s")
    props = np.zeros((len(z), len(names)), np.float64)
    for q, k in enumerate(names):
        props[:, q] = ds.property_array(k)
    if config.spacegroup_source == "spglib":
        sg = spacegroup_labels(ds, config.symprec, config.progress)
    elif config.spacegroup_source == "column":
        sg = np.nan_to_num(ds.property_array(SPACEGROUP_COLUMN)).astype(np.int32)
    elif config.spacegroup_source == "none":
        sg = np.zeros(len(z), np.int32)
    else:
        raise ValueError(
            f"spacegroup_source must be spglib|column|none: {config.spacegroup_source}"
        )
    out = {
        "z": z.astype(np.float32),
        "props": props,
        "names": np.array(names),
        "spacegroup": sg,
        "composition": composition_rows(
            [g.numbers for g in ds.graphs], int(ae_config.model.max_atoms)
        ),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=np.array(key), **out)
    return out


def composition_rows(numbers: Sequence[Any], max_atoms: int) -> np.ndarray:
    """[n, max_atoms] int32: each cell's atomic numbers in ascending order, 0-padded
    (`autoperi_jax.elements.composition_row`, the context predictions are drawn with)."""
    return np.stack([composition_row(np.asarray(z), max_atoms) for z in numbers])


# ------------------------------------------------------------------------------ flow
def noise_scales(
    z_noise: float, per_part: dict[str, float] | None, parts: tuple[tuple[str, int], ...], dim: int
) -> np.ndarray:
    """[D] std of the dequantisation noise per coordinate of the standardised z:
    ``z_noise`` everywhere, except the latent parts named in ``per_part`` (e.g.
    ``{"comp": 0.2}``), which take their own value.

    Raises:
      ValueError: a name in ``per_part`` that is not one of ``parts``.
    """
    scale = np.full(dim, float(z_noise), np.float32)
    per_part = dict(per_part or {})
    start = 0
    for name, size in parts:
        if name in per_part:
            scale[start : start + size] = float(per_part.pop(name))
        start += size
    if per_part:
        raise ValueError(
            f"z_noise_parts names {sorted(per_part)}, not latent parts of this model "
            f"({[n for n, _ in parts]})"
        )
    return scale


def make_flow_loss(
    flow: Any,
    z_noise: float | np.ndarray,
    p_uncond: float,
    p_props: float,
    p_spacegroup: float,
) -> Any:
    """``loss(params, z [B, D], props [B, P], sg [B], key, composition=None) -> L_gen``:
    dequantisation noise on the standardised z (std ``z_noise``, a scalar or [D] from
    `noise_scales`), then condition dropout (module docstring). A composition flow
    (``use_composition``) always sees the composition [B, A]: it is never dropped."""
    z_noise = np.asarray(z_noise, np.float32)

    def loss(params, z, props, sg, key, composition=None):
        k_noise, k_drop, k_all = jax.random.split(key, 3)
        if np.any(z_noise > 0):
            z = z + z_noise * jax.random.normal(k_noise, z.shape, z.dtype)
        ctx = _context(flow.config, props, sg, composition)
        if ctx is not None and (ctx.props is not None or ctx.spacegroup is not None):
            ctx = drop_context(k_drop, ctx, p_props, p_spacegroup)
            keep = jax.random.uniform(k_all, (z.shape[0],)) >= p_uncond
            ctx = ctx._replace(
                present=None if ctx.present is None else ctx.present & keep[:, None],
                spacegroup=None if ctx.spacegroup is None else jnp.where(keep, ctx.spacegroup, 0),
            )
        return flow.loss(params, z, ctx)

    return loss


def _context(config: FlowConfig, props, sg, composition, conditioned: bool = True):
    """The `FlowContext` of a batch: every condition the flow takes (``conditioned``) or
    only the composition, which a composition flow always needs (the marginal)."""
    if not config.conditional:
        return None
    has_props = conditioned and props.shape[-1] > 0
    return FlowContext(
        props if has_props else None,
        jnp.isfinite(props) if has_props else None,
        sg if conditioned and config.use_spacegroup else None,
        composition if config.use_composition else None,
    )


def _nll(flow, params, data: LatentBatch, conditioned: bool, batch: int = 2048) -> float:
    """Mean -log p(z | c) (nats per crystal) over a set, with all conditions given
    (``conditioned``) or none (the marginal; a composition flow keeps the composition).
    Chunks are padded to ``batch`` rows (one compiled shape)."""
    fn = _nll_fn(flow, conditioned)
    n = len(data.z)
    batch = min(batch, n)
    total = 0.0
    for s in range(0, n, batch):
        idx = np.arange(s, s + batch) % n
        lp = np.asarray(fn(params, *(x[idx] for x in data)))
        total -= float(lp[: min(batch, n - s)].sum())
    return total / n


@functools.cache
def _nll_fn(flow, conditioned: bool):
    def fn(params, z, props, sg, composition):
        return flow.log_prob(params, z, _context(flow.config, props, sg, composition, conditioned))

    return jax.jit(fn)


# ------------------------------------------------------------------------- batches
class IndexBatches:
    """Resumable batches of row indices: every epoch a permutation of ``range(n)`` drawn
    from one ``np.random.default_rng(seed)`` stream, cut into ``n // batch_size`` batches
    (the rest dropped). The position is the step count, so `restore` replays the stream
    to any step (a resumed run sees the batches of the uninterrupted one)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self.restore({"step": 0})

    def state(self) -> dict[str, int]:
        """The position, saved with a checkpoint."""
        return {"step": self.step}

    def restore(self, state: dict[str, int]) -> None:
        """Moves to ``state["step"]`` (replaying the permutations before it)."""
        self.step = int(state["step"])
        self._rng = np.random.default_rng(self.seed)
        epochs, offset = divmod(self.step, self.steps_per_epoch)
        for _ in range(epochs):
            self._rng.permutation(self.n)
        self._perm = self._rng.permutation(self.n) if offset else None

    def __iter__(self) -> IndexBatches:
        return self

    def __next__(self) -> np.ndarray:
        offset = self.step % self.steps_per_epoch
        if offset == 0:
            self._perm = self._rng.permutation(self.n)
        self.step += 1
        return self._perm[offset * self.batch_size : (offset + 1) * self.batch_size]


class LatentBatch(NamedTuple):
    """One batch of the flow's training data (rows of the standardised split)."""

    z: np.ndarray  # [B, D] float32 standardised latents
    props: np.ndarray  # [B, P] float32 standardised conditions (NaN = missing)
    spacegroup: np.ndarray  # [B] int32 (0 = unknown)
    composition: np.ndarray  # [B, A] int32 atomic numbers, ascending, 0-padded


class LatentBatches(IndexBatches):
    """`IndexBatches` of a latent split as this process's `LatentBatch` slices: every
    process draws the same global batch and keeps its contiguous 1 / process_count part
    (the rows its devices hold of the ``data``-sharded batch)."""

    def __init__(self, data: LatentBatch, batch_size: int, seed: int, n_devices: int) -> None:
        if batch_size % n_devices:
            raise ValueError(f"batch_size={batch_size} must be divisible by {n_devices} devices")
        super().__init__(len(data.z), batch_size, seed)
        self.data = data

    def __next__(self) -> LatentBatch:
        idx = super().__next__()
        idx = idx.reshape(jax.process_count(), -1)[jax.process_index()]
        return LatentBatch(*(x[idx] for x in self.data))


# ------------------------------------------------------------------------- predictor
def train_predictor(
    z_train: np.ndarray,
    y_train: np.ndarray,
    z_val: np.ndarray,
    y_val: np.ndarray,
    config: ml_collections.ConfigDict,
    key: jax.Array,
    log: Any = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Fits `PropertyHead` on standardised z to standardised targets (masked Huber loss,
    or MSE with ``huber_delta`` 0).

    The Huber loss with a small delta (0.1 std) behaves like L1 and so targets the
    conditional median, the minimiser of the reported MAE: with the MSE the head predicts
    small positive band gaps everywhere (96 % of Perov-5 gaps are 0) and its dir_gap MAE
    (0.19 eV) was worse than always predicting 0 (0.08 eV); Huber also lowered the
    heat_ref MAE (0.16 -> 0.15 eV/atom, same head).

    Args:
      z_train, z_val: [n, D] standardised latents.
      y_train, y_val: [n, Q] standardised targets (NaN where missing).
      config: ``config.predictor`` fields (hidden, num_steps, batch_size, learning_rate,
        weight_decay, z_noise, val_every, huber_delta).
      key: PRNG key.
      log: optional ``log(record)`` callback.
      progress: tqdm bar.

    Returns:
      (params of the best validation step, {"val_mae_std": [Q] at that step, "step"}).
    """
    head = PropertyHead(tuple(config.hidden), y_train.shape[1])
    delta = float(config.get("huber_delta", 0.0))
    params = head.init(key, jnp.zeros((1, z_train.shape[1])))
    tx, _ = optimizer(
        OptimizerSettings(config.learning_rate, config.num_steps, 200, 0.01,
                          config.weight_decay, 5.0)
    )  # fmt: skip
    opt = tx.init(params)
    zt, yt = jnp.asarray(z_train), jnp.asarray(y_train, jnp.float32)

    def loss_fn(p, idx, k):
        z = zt[idx] + config.z_noise * jax.random.normal(k, (idx.shape[0], zt.shape[1]))
        y = yt[idx]
        ok = jnp.isfinite(y)
        err = jnp.where(ok, head.apply(p, z) - jnp.where(ok, y, 0.0), 0.0)
        if delta > 0:  # Huber: robust, close to L1 (the reported MAE) beyond delta
            per = jnp.where(ok, optax.huber_loss(err, delta=delta), 0.0)
        else:
            per = err**2
        return jnp.sum(per) / jnp.maximum(jnp.sum(ok), 1.0)

    @jax.jit
    def step(p, o, idx, k):
        loss, g = jax.value_and_grad(loss_fn)(p, idx, k)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    predict = jax.jit(head.apply)

    def val_mae(p):
        pred = np.asarray(predict(p, jnp.asarray(z_val)))
        ok = np.isfinite(y_val)
        return np.array(
            [np.abs(pred[ok[:, q], q] - y_val[ok[:, q], q]).mean() for q in range(y_val.shape[1])]
        )

    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    batches = IndexBatches(len(z_train), min(config.batch_size, len(z_train)), seed)
    best = (np.inf, params, None, 0)
    losses = []
    for s in tqdm(range(config.num_steps), disable=not progress, desc="predictor"):
        params, opt, loss = step(
            params, opt, jnp.asarray(next(batches)), jax.random.fold_in(key, s)
        )
        losses.append(loss)
        done = s + 1
        if done % config.val_every == 0 or done == config.num_steps:
            mae = val_mae(params)
            rec = {
                "step": done,
                "split": "predictor",
                "mse": float(np.mean(jax.device_get(losses))),
                "val_mae_std": mae.tolist(),
            }
            losses = []
            if log is not None:
                log(rec)
            if mae.sum() < best[0]:
                best = (float(mae.sum()), params, mae, done)
    return best[1], {"val_mae_std": best[2], "step": best[3]}


# ------------------------------------------------------------------------------- main
def _ae_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The bundle's description of the stage-1 autoencoder (model fields, settings,
    normalisers, input graph, step, dataset)."""
    cfg = ckpt["config"]
    model = build_model(cfg)
    fields = [f.name for f in dataclasses.fields(Autoencoder) if f.name not in ("parent", "name")]
    return {
        "model": {k: getattr(model, k) for k in fields},
        "settings": dataclasses.asdict(build_settings(cfg)),
        "normalisers": ckpt["normalisers"],
        "graph": {"cutoff": float(cfg.data.cutoff), "max_neighbors": cfg.data.max_neighbors},
        "step": int(ckpt["step"]),
        "dataset": cfg.data.dataset,
    }


def checkpoint_from_bundle(bundle: str | Path) -> dict[str, Any]:
    """The stage-1 autoencoder of an inference bundle (e.g. a shipped model,
    `autoperi_jax.api.pretrained_path`) in the form
    `autoperi_jax.checkpoint.load_checkpoint` returns, so `train_flow` can train a new
    flow on it. The bundle must hold the autoencoder's training config as
    ``train_config.json``."""
    bundle = Path(bundle)
    if not (bundle / "train_config.json").exists():
        raise FileNotFoundError(f"{bundle}: no train_config.json (the autoencoder's config)")
    tree, meta = load_pytree(bundle)
    config = ml_collections.ConfigDict(json.loads((bundle / "train_config.json").read_text()))
    return {
        "config": config,
        "params": jax.tree.map(jnp.asarray, tree["autoencoder"]),
        "normalisers": meta["autoencoder"]["normalisers"],
        "step": int(meta["autoencoder"]["step"]),
    }


class LatentData(NamedTuple):
    """The standardised splits of the flow stage and their statistics."""

    train: LatentBatch  # flow training rows (conditions only)
    val: LatentBatch
    y_train: np.ndarray  # [n, Q] standardised predictor targets (every name)
    y_val: np.ndarray
    names: list[str]  # [Q] predictor columns; the conditions are names[cond_idx]
    cond_idx: list[int]
    prop_std: np.ndarray  # [Q] float64 train std of every column (MAEs in units)
    stats: dict[str, np.ndarray]  # z_mean, z_std, cond_*, pred_*, spacegroup_prior


def standardise(
    train: dict[str, np.ndarray], val: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> LatentData:
    """z per coordinate (train mean / std, floor ``z_min_std``) and the property columns
    (train NaN-mean / std) of two `latent_split` outputs."""
    names = [str(n) for n in train["names"]]
    cond_idx = [names.index(k) for k in config.properties]
    z_mean = train["z"].mean(0)
    z_std = np.maximum(train["z"].std(0), config.z_min_std)
    pm = np.nanmean(train["props"], 0)
    ps = np.maximum(np.nanstd(train["props"], 0), 1e-6)

    def split(d):
        z = ((d["z"] - z_mean) / z_std).astype(np.float32)
        y = ((d["props"] - pm) / ps).astype(np.float32)
        return LatentBatch(z, y[:, cond_idx], d["spacegroup"], d["composition"]), y

    (t, yt), (v, yv) = split(train), split(val)
    sgt = train["spacegroup"]
    stats = {
        "z_mean": z_mean.astype(np.float32),
        "z_std": z_std.astype(np.float32),
        "cond_mean": pm[cond_idx].astype(np.float32),
        "cond_std": ps[cond_idx].astype(np.float32),
        "pred_mean": pm.astype(np.float32),
        "pred_std": ps.astype(np.float32),
        # training distribution of space-group labels (SamplerSettings.spacegroup_prior)
        "spacegroup_prior": (
            np.bincount(np.clip(sgt, 0, 230), minlength=231) / max(len(sgt), 1)
        ).astype(np.float32),
    }
    return LatentData(t, v, yt, yv, names, cond_idx, ps, stats)


def _flow_config(config: ml_collections.ConfigDict, model: dict[str, Any], dim: int) -> FlowConfig:
    """`FlowConfig` of ``config.flow`` for latents of ``dim`` (parts from the model)."""
    parts = (
        ("lattice", model["latent_lattice"]),
        ("comp", model["latent_comp"]),
        ("struct", model["latent_struct"]),
    )
    return FlowConfig(
        dim=dim,
        n_props=len(config.properties),
        use_spacegroup=config.spacegroup_source != "none",
        use_composition=bool(config.get("composition", False)),
        parts=parts if sum(s for _, s in parts) == dim else (),
        seed=config.seed,
        **{
            k: (tuple(v) if isinstance(v, list | tuple) else v)
            for k, v in config.flow.to_dict().items()
        },
    )


class FlowFit(NamedTuple):
    """What `fit_flow` returns."""

    params: Any  # the flow parameters of the best validation step
    val_nll: float  # their validation NLL
    best_step: int
    val_nll_init: float  # validation NLL of the initial flow
    interrupted: bool  # stopped by SIGTERM / SIGINT (checkpoint saved; re-run resumes)
    record: dict[str, float] | None = None  # the best step's validation record


def _val_record(flow: Any, params: Any, data: LatentData) -> dict[str, float]:
    """Validation (and first-4096-training-rows) NLLs of ``params``, nats per crystal."""
    t, v = data.train, data.val
    rec = {
        "val_nll": _nll(flow, params, v, True),
        "val_nll_uncond": _nll(flow, params, v, False),
        "train_nll": _nll(flow, params, LatentBatch(*(x[:4096] for x in t)), True),
    }
    rec["val_nll_per_dim"] = rec["val_nll"] / t.z.shape[1]
    return rec


class SampleCheck(NamedTuple):
    """What `sample_quality` needs (`make_sample_check`)."""

    sample: Any  # jitted (params, key) -> `make_sample_fn` output of n raw samples
    fixed: dict[str, Any]  # the frozen parameters: {"autoencoder", "stats"}
    train: list[Any]  # novelty reference: the training split's `Crystal`s
    train_formulas: list[str]
    seed: int


def make_sample_check(
    ckpt: dict[str, Any],
    stats: dict[str, np.ndarray],
    flow_config: FlowConfig,
    config: ml_collections.ConfigDict,
    train_crystals: Sequence[Any],
) -> SampleCheck:
    """The sample check of flow training (``config.sample_check`` samples per validation).

    The samples are the model's own, without any of the sampler's repairs or filters
    (no composition check, no space-group prior, no contact repulsion; base temperature
    1, the sampler's Euler steps): what the flow and decoder produce, which is what a
    checkpoint should be chosen on. The same key at every validation, so changes
    between validations are the flow's.
    """
    from autoperi_jax.distinct import reduced_formula
    from autoperi_jax.sampling import SamplerSettings, make_sample_fn

    cfg = ckpt["config"]
    raw = SamplerSettings(
        num_steps=config.sampler.get("num_steps"),
        composition_check=False,
        constraint_steps=0,
        spacegroup_prior=False,
    )
    fn = make_sample_fn(build_model(cfg), build_settings(cfg), ckpt["normalisers"], flow_config,
                        tuple(config.properties), sampler=raw)  # fmt: skip
    n = int(config.sample_check)
    fixed = {"autoencoder": ckpt["params"], "stats": {k: jnp.asarray(v) for k, v in stats.items()}}
    return SampleCheck(
        jax.jit(lambda params, key: fn(params, key, n)),
        fixed,
        list(train_crystals),
        [reduced_formula(c) for c in train_crystals],
        int(config.seed) + 1,
    )


def sample_quality(check: SampleCheck, flow_params: Any) -> dict[str, float]:
    """Valid x unique x novel of ``config.sample_check`` raw samples of a flow.

    ``sample_valid``: CDVAE validity (structure and SMACT composition,
    `eval.metrics.crystal_validity`); ``sample_unique`` / ``sample_novel``: shares of the
    valid samples that are the first of their structure / match no training crystal
    (`eval.metrics.uniqueness`, `eval.metrics.novelty`: pymatgen StructureMatcher with
    its default tolerances within a reduced formula); ``sample_vun``: share of all samples
    that are valid, unique and novel (what a user of the model gets that is new).
    """
    from autoperi_jax.convert import outputs_to_crystals
    from autoperi_jax.distinct import reduced_formula
    from eval.metrics import crystal_validity, novelty, uniqueness

    params = {**check.fixed, "flow": flow_params}
    out = jax.device_get(check.sample(params, jax.random.PRNGKey(check.seed)))
    crystals = outputs_to_crystals(out)
    struct, comp = crystal_validity(crystals)
    valid = struct & comp
    formulas = [reduced_formula(c) for c in crystals]
    uniq = uniqueness(crystals, formulas, valid, workers=1, progress=False)
    nov = novelty(crystals, formulas, check.train, check.train_formulas, valid, workers=1,
                  progress=False)  # fmt: skip
    vun = valid & uniq["is_first"] & nov["is_novel"]
    return {
        "sample_valid": float(valid.mean()),
        "sample_struct_valid": float(struct.mean()),
        "sample_comp_valid": float(comp.mean()),
        "sample_unique": float(uniq["uniqueness"]),
        "sample_novel": float(nov["novelty"]),
        "sample_vun": float(vun.mean()),
    }


def fit_flow(
    flow: Any,
    params0: Any,
    data: LatentData,
    config: ml_collections.ConfigDict,
    out_dir: Path,
    key: jax.Array,
    log: Logger,
    run_key: str,
    check: SampleCheck | None = None,
) -> FlowFit:
    """Trains the flow by maximum likelihood with `train.loop.run_loop` (the autoencoder's
    loop: sharded step, non-finite guard, checkpoints in ``out_dir/checkpoints`` every
    ``checkpoint_every`` steps and at each validation, resume, SIGTERM / SIGINT).

    A checkpoint folder written with another ``run_key`` (other settings or autoencoder;
    kept in ``out_dir/checkpoints.key``) is replaced; one of the same key is resumed from
    its newest readable step.

    With a ``check`` (`make_sample_check`), every validation also records
    `sample_quality`; ``config.select_on`` names the record that picks the kept step
    (``val_nll``, lowest, by default; a ``sample_*`` share, highest, e.g. ``sample_vun``).
    """
    select = str(config.get("select_on", "val_nll"))
    if select.startswith("sample_") and check is None:
        raise ValueError(f"select_on={select} needs sample_check > 0")
    mode = "max" if select.startswith("sample_") else "min"
    mesh = parallel.make_mesh()
    tx, schedule = optimizer(OptimizerSettings.from_config(config, config.num_steps))
    noise = noise_scales(
        config.z_noise, config.get("z_noise_parts", None), flow.config.parts, flow.config.dim
    )
    gen_loss = make_flow_loss(
        flow, noise, config.p_uncond, config.p_drop_props, config.p_drop_spacegroup
    )

    def loss_fn(params, batch, k):
        l_gen = gen_loss(params, batch.z, batch.props, batch.spacegroup, k, batch.composition)
        return l_gen, {"l_gen": l_gen}

    train_step = parallel.jit_train_step(make_train_step(loss_fn, tx, schedule), mesh)
    init = functools.partial(initial_state, tx=tx, ema=False)
    abstract = parallel.abstract_state(init, mesh, params0)
    batch = min(config.batch_size, len(data.train.z))
    it = LatentBatches(data.train, batch, config.seed, mesh.size)
    ckpt_dir = out_dir / "checkpoints"
    if not _resumable(out_dir, run_key):
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # another stage's: start afresh
        (out_dir / "checkpoints.key").write_text(run_key)
    ckpt = Checkpointer(
        ckpt_dir, max_to_keep=int(config.get("keep_checkpoints", 3)), best_metric=select,
        best_mode=mode, async_save=bool(config.get("async_checkpoint", True)),
    )  # fmt: skip
    if ckpt.steps():
        state, saved, _ = restore_state(ckpt, abstract)
        it.restore(saved["data"])
        val_nll_init = float(saved["val_nll_init"])
    else:
        state = parallel.create_state(init, mesh, params0)
        first = _val_record(flow, params0, data)
        if check is not None:
            first.update(sample_quality(check, params0))
        log({"step": 0, "split": "val", **first})
        val_nll_init = first["val_nll"]

    seen: dict[int, dict[str, float]] = {}  # validation records by step

    def evaluate(state: dict[str, Any]) -> dict[str, Any]:
        params = jax.device_get(state["params"])
        rec = _val_record(flow, params, data)
        if check is not None:
            rec.update(sample_quality(check, params))
        seen[int(state["step"])] = rec
        if config.progress and jax.process_index() == 0:
            line = (
                f"step {int(state['step'])}: val_nll {rec['val_nll']:.3f} "
                f"(uncond {rec['val_nll_uncond']:.3f}) train_nll {rec['train_nll']:.3f}"
            )
            if check is not None:
                line += (
                    " valid {sample_valid:.3f} unique {sample_unique:.3f} novel "
                    "{sample_novel:.3f} VUN {sample_vun:.3f}".format(**rec)
                )
            tqdm.write(line)
        return rec

    loop = LoopSettings(
        num_steps=config.num_steps,
        log_every=config.log_every,
        checkpoint_every=int(config.get("checkpoint_every", config.val_every)),
        max_nonfinite_steps=int(config.get("max_nonfinite_steps", 10)),
        best_metric=(select, select),
        progress=config.progress,
        desc="train-flow",
        postfix=(("l_gen", "l_gen"),),
    )

    def meta() -> dict[str, Any]:
        return {"data": it.state(), "val_nll_init": val_nll_init}

    try:
        result = run_loop(
            state, train_step, it, key, mesh, ckpt, meta, log, loop, time.perf_counter(),
            evaluate, lambda done: done % config.val_every == 0 or done == config.num_steps,
        )  # fmt: skip
        ckpt.wait()
        best = ckpt.best_step()
        if best is None:  # no validation yet (interrupted before the first)
            params, val_nll, record = params0, float("inf"), None
        else:
            state = result.state
            if best != int(state["step"]):
                state = ckpt.restore(abstract, best)[0]
            params = jax.device_get(state["params"])
            record = seen[best] if best in seen else _val_record(flow, params, data)
            val_nll = record["val_nll"]
    finally:
        ckpt.close()
    return FlowFit(params, val_nll, best or 0, val_nll_init, result.interrupted is not None, record)


def _resumable(out_dir: Path, run_key: str) -> bool:
    """Whether ``out_dir/checkpoints`` was written by a stage of the same ``run_key``."""
    key_file = out_dir / "checkpoints.key"
    return key_file.exists() and key_file.read_text() == run_key


def _reused_flow(workdir: Path, flow_config: FlowConfig, log: Logger) -> FlowFit:
    """``reuse_flow``: the flow of the saved bundle (same settings), not retrained."""
    saved, saved_meta = load_pytree(workdir / BUNDLE)
    if saved_meta["flow_config"] != json.loads(json.dumps(dataclasses.asdict(flow_config))):
        raise ValueError("reuse_flow: the saved flow has other settings")
    prev = saved_meta["summary"]
    log({"step": 0, "split": "info", "reused_flow": True, "val_nll": prev["val_nll"]})
    params = jax.tree.map(jnp.asarray, saved["flow"])
    return FlowFit(params, prev["val_nll"], prev["best_step"], prev["val_nll_init"], False)


def train_flow(
    workdir: str | Path,
    config: ml_collections.ConfigDict,
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains the latent flow and the property predictor of a run (module docstring).

    The flow trains with the autoencoder's loop (`fit_flow`, `train.loop.run_loop`):
    re-running an interrupted stage resumes it from ``workdir/flow/checkpoints``.

    Args:
      workdir: the autoencoder run (``autoperi train``); outputs go to ``workdir/flow``.
      config: a ``train/configs/flow_perov_5.py``-style config.
      checkpoint: the autoencoder as `autoperi_jax.checkpoint.load_checkpoint` returns
        it (``config``, ``params``, ``normalisers``, ``step``); default: the latest one
        of ``workdir``.

    Returns:
      The summary written to ``workdir/flow/summary.json`` (NLLs, predictor MAEs, times),
      or ``{"interrupted": True}`` when SIGTERM / SIGINT stopped the flow's training.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    out_dir = workdir / "flow"
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(workdir) if checkpoint is None else checkpoint
    train = latent_split(workdir, ckpt, config, "train")
    val = latent_split(workdir, ckpt, config, "val")
    t_encode = time.perf_counter() - t_start
    data = standardise(train, val, config)
    ae = _ae_meta(ckpt)
    flow_config = _flow_config(config, ae["model"], data.train.z.shape[1])
    flow = make_flow(flow_config)
    k_init, k_train, k_pred = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    params0 = flow.init(k_init)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params0))
    reuse = bool(config.get("reuse_flow", False))
    run_key = json.dumps({"config": config.to_dict(), "autoencoder_step": ae["step"]})
    fresh = not (reuse or _resumable(out_dir, run_key))  # else append to metrics.jsonl
    log = Logger(out_dir, jax.process_index() == 0, tensorboard=False, fresh=fresh)
    log(
        {
            "step": 0,
            "split": "info",
            "n_train": len(data.train.z),
            "n_val": len(data.val.z),
            "dim": flow_config.dim,
            "flow_params": n_params,
            "cond_names": list(config.properties),
            "pred_names": data.names,
            "encode_s": t_encode,
        }
    )
    t0 = time.perf_counter()
    if reuse:
        fit = _reused_flow(workdir, flow_config, log)
    else:
        check = None
        if int(config.get("sample_check", 0)) > 0 and not flow_config.use_composition:
            crystals = load_split(ckpt["config"], "train", config.progress).crystals()
            check = make_sample_check(ckpt, data.stats, flow_config, config, crystals)
        fit = fit_flow(flow, params0, data, config, out_dir, k_train, log, run_key, check)
    if fit.interrupted:
        log.close()
        return {"interrupted": True}
    t_flow = time.perf_counter() - t0
    if flow_config.use_composition:
        return _save_csp(
            workdir, config, ae, flow_config, fit, data, n_params, t_encode, t_flow, log
        )

    t1 = time.perf_counter()
    pred_params, pred = train_predictor(
        data.train.z, data.y_train, data.val.z, data.y_val, config.predictor, k_pred, log,
        config.progress,
    )  # fmt: skip
    t_pred = time.perf_counter() - t1
    names, sgt = data.names, train["spacegroup"]
    summary = {
        "val_nll": fit.val_nll,
        "best_step": fit.best_step,
        "val_nll_init": fit.val_nll_init,
        "val_nll_per_dim": fit.val_nll / flow_config.dim,
        "select_on": str(config.get("select_on", "val_nll")),
        "best_sample_quality": {
            k: v for k, v in (fit.record or {}).items() if k.startswith("sample_")
        },
        "predictor_val_mae": {
            k: float(pred["val_mae_std"][q] * data.prop_std[q]) for q, k in enumerate(names)
        },
        "predictor_val_mae_median_baseline": {
            k: float(np.nanmean(np.abs(val["props"][:, q] - np.nanmedian(train["props"][:, q]))))
            for q, k in enumerate(names)
        },
        "predictor_best_step": pred["step"],
        "flow_params": n_params,
        "encode_s": t_encode,
        "flow_train_s": t_flow,
        "predictor_train_s": t_pred,
        "spacegroup_counts_train": {
            str(k): int(v) for k, v in zip(*np.unique(sgt, return_counts=True))
        },
    }
    log({"step": config.num_steps, "split": "summary", **summary})
    log.close()
    meta = {
        "format": 1,
        "autoencoder": ae,
        "flow_config": dataclasses.asdict(flow_config),
        "cond_names": list(config.properties),
        "pred_names": names,
        "predictor_hidden": list(config.predictor.hidden),
        "sampler": config.sampler.to_dict(),
        "spacegroup_source": config.spacegroup_source,
        "symprec": config.symprec,
        "summary": summary,
        "config": config.to_dict(),
    }
    tree = {
        "autoencoder": ckpt["params"],
        "flow": fit.params,
        "predictor": pred_params,
        "stats": data.stats,
    }
    save_pytree(workdir / BUNDLE, jax.device_get(tree), meta)
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    return summary


def _save_csp(
    workdir: Path,
    config: ml_collections.ConfigDict,
    ae: dict[str, Any],
    flow_config: FlowConfig,
    fit: FlowFit,
    data: LatentData,
    n_params: int,
    t_encode: float,
    t_flow: float,
    log: Logger,
) -> dict[str, Any]:
    """Writes a composition flow (``config.composition``) as ``RUN/flow/model/csp``: the
    flow and the latent statistics (no autoencoder or predictor: it decodes with the
    bundle's own autoencoder, whose training step it records)."""
    summary = {
        "val_nll": fit.val_nll,
        "best_step": fit.best_step,
        "val_nll_init": fit.val_nll_init,
        "val_nll_per_dim": fit.val_nll / flow_config.dim,
        "flow_params": n_params,
        "encode_s": t_encode,
        "flow_train_s": t_flow,
        "n_train": len(data.train.z),
    }
    log({"step": config.num_steps, "split": "summary", **summary})
    log.close()
    meta = {
        "format": 1,
        "autoencoder_step": ae["step"],
        "dataset": ae["dataset"],
        "flow_config": dataclasses.asdict(flow_config),
        "cond_names": list(config.properties),
        "sampler": config.sampler.to_dict(),
        "summary": summary,
        "config": config.to_dict(),
    }
    # (Orbax cannot save an empty array: no cond_* without conditions)
    names = ("z_mean", "z_std", "cond_mean", "cond_std")
    stats = {k: data.stats[k] for k in names if data.stats[k].size}
    save_pytree(
        workdir / BUNDLE / CSP_BUNDLE, jax.device_get({"flow": fit.params, "stats": stats}), meta
    )
    (workdir / "flow" / "summary_csp.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    return summary
