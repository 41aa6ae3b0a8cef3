"""The jitted train step: non-finite guard, counters, EMA and step keys (tiny loss, fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.loop import initial_state, make_train_step, mean_metrics


def _loss_fn(params, batch, key):
    """|w - batch|^2 plus a key-dependent term, so the step key matters."""
    noise = jax.random.normal(key, params["w"].shape)
    loss = jnp.sum((params["w"] - batch) ** 2) + 1e-3 * jnp.sum(noise * params["w"])
    return loss, {"loss": loss}


def _state(tx, ema: bool):
    return initial_state({"w": jnp.arange(3.0)}, tx, ema)


def test_nonfinite_steps_are_skipped_and_counted():
    tx = optax.adam(0.1)
    step = jax.jit(make_train_step(_loss_fn, tx, ema_decay=0.5), donate_argnums=(0,))
    key = jax.random.PRNGKey(0)
    good = jnp.ones(3)
    state, m = step(_state(tx, ema=True), good, key)
    assert float(m["skipped"]) == 0 and int(m["nonfinite_run"]) == 0
    before = jax.device_get(state)
    for k, bad in enumerate([good * jnp.nan, good.at[1].set(jnp.inf)]):
        state, m = step(state, bad, key)
        assert float(m["skipped"]) == 1.0 and float(m["grads_finite"]) == 0.0
        assert int(m["nonfinite_run"]) == k + 1 and int(m["nonfinite_total"]) == k + 1
        after = jax.device_get(state)
        # params, optimiser state and EMA unchanged; the step still advances
        for name in ("params", "opt_state", "ema_params"):
            for a, b in zip(jax.tree.leaves(after[name]), jax.tree.leaves(before[name])):
                np.testing.assert_array_equal(a, b)
        assert int(after["step"]) == int(before["step"]) + k + 1
    state, m = step(state, good, key)
    assert float(m["skipped"]) == 0 and int(m["nonfinite_run"]) == 0
    assert int(m["nonfinite_total"]) == 2
    assert not np.array_equal(state["params"]["w"], before["params"]["w"])
    assert np.all(np.isfinite(state["ema_params"]["w"]))


def test_step_key_is_fold_in_of_the_step():
    """The same (state, batch, key) gives the same update; a different step counter gives
    another key (the randomness replays on resume because it is a function of step)."""
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(_loss_fn, tx))
    key = jax.random.PRNGKey(1)
    s0 = _state(tx, ema=False)
    a, _ = step(s0, jnp.ones(3), key)
    b, _ = step(s0, jnp.ones(3), key)
    np.testing.assert_array_equal(a["params"]["w"], b["params"]["w"])
    s5 = dict(s0, step=jnp.int32(5))
    c, _ = step(s5, jnp.ones(3), key)
    assert not np.array_equal(a["params"]["w"], c["params"]["w"])


def test_mean_metrics_leave_out_skipped_steps():
    hist = [
        {"loss": 1.0, "skipped": 0.0, "nonfinite_total": 0},
        {"loss": float("nan"), "skipped": 1.0, "nonfinite_total": 1},
        {"loss": 3.0, "skipped": 0.0, "nonfinite_total": 1},
    ]
    m = mean_metrics(hist)
    assert m == {"loss": 2.0, "skipped": 1.0, "nonfinite_total": 1.0}
