"""The curvature form of the SPP transform (spp_jax.spp, "Curvature form") and its per-example search step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spp_jax.errors import ConfigError
from spp_jax.search import init_search_state, make_search_step
from spp_jax.spp import CurvatureState, spp
from spp_jax.tasks.image_classification import classification_loss
from tests.helpers import mu_adapter, random_images, random_params
from tests.test_spp import SPEC

pytestmark = pytest.mark.slow  # per-example gradients of whole models: the full suite


def _curvatures(seed: int, steps: int) -> list[dict[str, np.ndarray]]:
    """Per entry a level spread over three decades (like squared mask gradients) times per-step noise."""
    rng = np.random.default_rng(seed)
    level = {g.name: 10.0 ** rng.uniform(-6, -3, g.shape) for g in SPEC.groups}
    return [{k: (v * 10.0 ** rng.uniform(-0.3, 0.3, v.shape)).astype(np.float32) for k, v in level.items()}
            for _ in range(steps)]  # fmt: skip


def _reference(curvs, lr, kappa, nu, lam, decay):
    """The module docstring's equations restated in float64 numpy."""
    names = [g.name for g in SPEC.groups]
    m = {k: np.ones(SPEC.group(k).shape) for k in names}
    z = {k: np.zeros_like(v) for k, v in m.items()}
    gamma = {k: np.zeros_like(v) for k, v in m.items()}
    t_in = {k: np.full_like(v, np.inf) for k, v in m.items()}
    steps = {k: np.zeros(v.shape, int) for k, v in m.items()}
    ema, scale = None, None
    for k, c in enumerate(curvs):
        c = {n: np.asarray(v, np.float64) for n, v in c.items()}
        if ema is None:
            ema, scale = c, np.mean(np.concatenate([v.ravel() for v in c.values()]))
        else:
            ema = {n: decay * ema[n] + (1 - decay) * c[n] for n in names}
        for n in names:
            h = ema[n] / scale
            m[n] = (h + gamma[n] / nu) / (h + 1 / nu)
            z[n] = z[n] + lr * (m[n] - gamma[n])
            gamma[n] = kappa * np.maximum(z[n] - lam, 0.0)
            t_in[n] = np.where(np.isinf(t_in[n]) & (gamma[n] != 0), k + 1, t_in[n])
            steps[n] += gamma[n] != 0
    return m, z, gamma, t_in, steps


@pytest.mark.parametrize("kappa,nu,lam", [(1.0, 30.0, 1.0), (2.0, 5.0, 0.5)])
def test_curvature_form_matches_numpy(kappa, nu, lam):
    lr, decay, n = 0.15, 0.8, 15
    curvs = _curvatures(0, n)
    opt = spp("curvature", learning_rate=lr, kappa=kappa, nu=nu, lam=lam, curvature_decay=decay)
    masks = SPEC.init_masks()
    state = opt.init(masks)
    update = jax.jit(opt.update)
    for c in curvs:
        u, state = update(jax.tree.map(jnp.zeros_like, masks), state, masks, curvature=c)
        masks = optax.apply_updates(masks, u)
    m, z, gamma, t_in, steps = _reference(curvs, lr, kappa, nu, lam, decay)
    assert isinstance(state.base_state, CurvatureState)
    for name in m:
        np.testing.assert_allclose(masks[name], m[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.z[name], z[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.gamma[name], gamma[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(state.t_in[name], t_in[name])
        np.testing.assert_array_equal(state.steps_in_support[name], steps[name])
    entered = np.concatenate([np.isfinite(v).ravel() for v in t_in.values()])
    assert 0 < entered.mean() < 1, "the case must have entries on both sides of the support"


def test_larger_constant_curvature_enters_first():
    c = _curvatures(1, 1)[0]
    opt = spp("curvature", learning_rate=0.05, nu=3.0)
    masks = SPEC.init_masks()
    state = opt.init(masks)
    for _ in range(200):
        u, state = opt.update(masks, state, masks, curvature=c)
        masks = optax.apply_updates(masks, u)
    flat_c = np.concatenate([np.ravel(c[g.name]) for g in SPEC.groups])
    flat_t = np.concatenate([np.ravel(state.t_in[g.name]) for g in SPEC.groups])
    order = np.argsort(-flat_c)
    assert np.isfinite(flat_t).any() and not np.isfinite(flat_t).all()
    t = flat_t[order]
    assert (t[1:] >= t[:-1]).all(), "entry time must not decrease as curvature falls"


def test_curvature_form_needs_curvature_and_refuses_bad_settings():
    masks = SPEC.init_masks()
    opt = spp("curvature")
    with pytest.raises(ConfigError, match="curvature") as err:
        opt.update(masks, opt.init(masks), masks)
    assert "\n" not in str(err.value)
    for kwargs, name in ((dict(nu=math.inf), "nu"), (dict(base="adam"), "base"),
                         (dict(curvature_decay=1.0), "curvature_decay")):  # fmt: skip
        with pytest.raises(ConfigError, match=name):
            spp("curvature", **kwargs)


def test_search_step_passes_mean_squared_per_example_gradients():
    a = mu_adapter()
    spec, params = a.mask_spec(), random_params(a)
    tx = spp("curvature")
    step = jax.jit(make_search_step(a.module().apply, spec, tx, curvature=True))
    batch = {"image": random_images(a, n=6, seed=4), "label": jnp.arange(6) % a.config.num_classes}
    state, metrics = step(init_search_state(spec, tx), params, batch)

    def grad(i):  # one example at a time, in a python loop
        def loss(m):
            logits = a.module().apply({"params": params}, batch["image"][i : i + 1], masks=m)
            return classification_loss(logits, batch["label"][i : i + 1])[0]

        return jax.grad(loss)(spec.init_masks())

    per_ex = [grad(i) for i in range(6)]
    for name in spec.names:
        want = np.mean([np.square(g[name]) for g in per_ex], axis=0)
        np.testing.assert_allclose(state.opt_state.base_state.ema[name], want, rtol=1e-4, atol=1e-12)
    logits = a.module().apply({"params": params}, batch["image"])
    np.testing.assert_allclose(metrics["loss"], classification_loss(logits, batch["label"])[0], rtol=1e-5)


def test_curvature_step_refuses_trained_weights():
    a = mu_adapter()
    with pytest.raises(ConfigError, match="trained weights"):
        make_search_step(a.module().apply, a.mask_spec(), spp("curvature"), optax.sgd(0.1), curvature=True)


def test_per_example_gradients_compile_to_one_batched_pass():
    """The vmap over batches of one is not a loop: the curvature step multiplies as often as the official one
    (bench/README.md, "already one batched pass")."""
    a = mu_adapter()
    spec, params = a.mask_spec(), random_params(a)
    batch = {"image": random_images(a, n=8, seed=1), "label": jnp.arange(8) % a.config.num_classes}
    compiled = {}
    for form in ("official", "curvature"):
        tx = spp(form)
        step = jax.jit(make_search_step(a.module().apply, spec, tx, curvature=form == "curvature"))
        compiled[form] = step.lower(init_search_state(spec, tx), params, batch).compile()
    texts = {k: c.as_text() for k, c in compiled.items()}
    assert " while(" not in texts["curvature"]
    assert texts["curvature"].count(" dot(") == texts["official"].count(" dot(") > 0
    flops = {k: c.cost_analysis() for k, c in compiled.items()}
    flops = {k: (v[0] if isinstance(v, list) else v)["flops"] for k, v in flops.items()}
    assert flops["official"] <= flops["curvature"] < 1.05 * flops["official"]
