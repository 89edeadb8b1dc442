"""The search step: masks-only gradients, frozen weights, NaN guard, and sharded == single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spp_jax import sharding
from spp_jax import spp as spp_lib
from spp_jax.search import init_search_state, make_search_step
from tests.helpers import mu_adapter, random_images, random_params


def _setup(batch=16, mode="official", **spp_kw):
    a = mu_adapter()
    spec = a.mask_spec()
    params = random_params(a)
    tx = spp_lib.spp(mode, **spp_kw)
    step = make_search_step(a.module().apply, spec, tx, curvature=mode == "curvature")
    x = random_images(a, n=batch, seed=3)
    labels = jnp.arange(batch) % a.config.num_classes
    return a, spec, params, tx, step, {"image": x, "label": labels}


def test_init_masked_model_is_dense_and_z_gamma_zero():
    a, spec, params, tx, _, batch = _setup()
    state = init_search_state(spec, tx)
    m = a.module()
    np.testing.assert_array_equal(
        m.apply({"params": params}, batch["image"]),
        m.apply({"params": params}, batch["image"], masks=state.masks),
    )
    for tree in (state.opt_state.z, state.opt_state.gamma):
        assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(tree))


def test_frozen_weights_bitwise_unchanged_and_masks_move():
    a, spec, params, tx, step, batch = _setup(learning_rate=0.05)
    before = jax.tree.map(np.array, params)
    state = init_search_state(spec, tx)
    jstep = jax.jit(step)
    for _ in range(3):
        state, metrics = jstep(state, params, batch)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
    assert state.params is None
    assert any(float(jnp.abs(v - 1).max()) > 0 for v in jax.tree.leaves(state.masks))
    assert int(state.step) == 3 and int(metrics["nonfinite"]) == 0


def test_search_step_computes_no_weight_gradients():
    """A masks-only step costs clearly fewer FLOPs than one that also differentiates the weights."""
    a, spec, params, tx, step, batch = _setup()
    state = init_search_state(spec, tx)

    def full_grad(params, masks):
        f = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            a.module().apply({"params": p}, batch["image"], masks=masks), batch["label"]
        ).mean()
        return jax.grad(f)(params)

    def flops(fn, *args):
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    search = flops(step, state, params, batch)
    weights = flops(full_grad, params, state.masks)
    assert search < 0.85 * weights, (search, weights)


def test_nonfinite_loss_keeps_old_state():
    a, spec, params, tx, step, batch = _setup()
    state = init_search_state(spec, tx)
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    new, metrics = jax.jit(step)(state, params, bad)
    assert int(metrics["nonfinite"]) == 1
    jax.tree.map(
        np.testing.assert_array_equal, jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, new)
    )


def test_joint_weight_training_is_an_option():
    a = mu_adapter()
    spec, params = a.mask_spec(), random_params(a)
    tx, wtx = spp_lib.spp("official"), optax.adamw(1e-3)
    step = make_search_step(a.module().apply, spec, tx, weights_tx=wtx)
    state = init_search_state(spec, tx, params=params, weights_tx=wtx)
    x = random_images(a, n=8)
    state, _ = jax.jit(step)(state, None, {"image": x, "label": jnp.arange(8) % 5})
    moved = jax.tree.map(lambda p, q: float(jnp.abs(p - q).max()), state.params, params)
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize(
    "mode,kw", [("official", {}), ("paper", {"learning_rate": 0.05}), ("curvature", {"lam": 0.2})]
)
def test_sharded_step_equals_single_device(mode, kw):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    a, spec, params, tx, step, batch = _setup(batch=16, mode=mode, **kw)

    single = jax.jit(step)
    s1 = init_search_state(spec, tx)
    for _ in range(4):
        s1, m1 = single(s1, params, batch)

    mesh = sharding.make_mesh()
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    sharded = jax.jit(
        step,
        in_shardings=(rep, rep, data),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    s8 = sharding.replicate(init_search_state(spec, tx), mesh)
    p8 = sharding.replicate(params, mesh)
    b8 = sharding.shard_batch(jax.tree.map(np.asarray, batch), mesh)
    assert len(b8["image"].sharding.device_set) == 8
    for _ in range(4):
        s8, m8 = sharded(s8, p8, b8)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    for name in ("masks",):
        jax.tree.map(close, getattr(s1, name), getattr(s8, name))
    for name in ("z", "gamma", "t_in", "steps_in_support"):
        jax.tree.map(close, getattr(s1.opt_state, name), getattr(s8.opt_state, name))
    close(m1["loss"], m8["loss"])
