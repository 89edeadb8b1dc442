"""Tests of the SPP mask optimizer (spp_jax/spp.py) against algorithm.md §3 and §7."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import lasso_path

from bench.adam_precision import problem, reference, trajectory
from spp_jax.groups import MaskGroup, MaskSpec
from spp_jax.spp import SPPState, _log_decay, official_entry_step, one_minus_pow, shrink, spp, support

SPEC = MaskSpec(
    groups=(MaskGroup("qk", 2, 8, 1.0, 1.0), MaskGroup("mlp", 2, 16, 1.0, 1.0)),
    base_params=0.0,
    base_macs=0.0,
)


def random_masks(seed: int, low: float = -1.0, high: float = 2.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {g.name: jnp.asarray(rng.uniform(low, high, g.shape), jnp.float32) for g in SPEC.groups}


def run(opt, masks, steps: int, grad_fn=None):
    """`steps` jitted updates; grad_fn(masks) -> grads (default: zero grads). Returns (masks, state,
    per-step support history {group: bool[steps, depth, size]})."""
    grad_fn = grad_fn or (lambda m: jax.tree.map(jnp.zeros_like, m))

    @jax.jit
    def go(masks):
        def body(carry, _):
            m, st = carry
            u, st = opt.update(grad_fn(m), st, m)
            return (optax.apply_updates(m, u), st), support(st)

        (m, st), hist = jax.lax.scan(body, (masks, opt.init(masks)), None, length=steps)
        return m, st, hist

    return go(masks)


def np_tree(tree):
    return jax.tree.map(np.asarray, tree)


# 1. Init -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_init(mode):
    masks = SPEC.init_masks()
    opt = spp(mode, learning_rate=1e-2)
    st = opt.init(masks)
    assert isinstance(st, SPPState)
    assert int(st.count) == 0 and st.count.dtype == jnp.int32
    chex.assert_trees_all_equal_structs(st.z, masks)
    for name, m in masks.items():
        assert st.z[name].shape == m.shape and st.z[name].dtype == jnp.float32
        np.testing.assert_array_equal(st.z[name], 0.0)
        np.testing.assert_array_equal(st.gamma[name], 0.0)
        assert np.isposinf(np.asarray(st.t_in[name])).all()
        np.testing.assert_array_equal(st.steps_in_support[name], 0)
        assert st.steps_in_support[name].dtype == jnp.int32
        assert not np.asarray(support(st)[name]).any()


def test_update_requires_params():
    masks = SPEC.init_masks()
    opt = spp()
    with pytest.raises(ValueError, match="params"):
        opt.update(jax.tree.map(jnp.zeros_like, masks), opt.init(masks))


# 2. Shrink is the prox --------------------------------------------------------------------------
def test_shrink_is_l1_prox():
    rng = np.random.default_rng(0)
    z = rng.uniform(-3, 3, 200)
    lam = 0.7
    grid = np.linspace(-4, 4, 80001)  # spacing 1e-4
    obj = 0.5 * (grid[None, :] - z[:, None]) ** 2 + lam * np.abs(grid[None, :])
    np.testing.assert_allclose(shrink(jnp.asarray(z), lam, "l1"), grid[obj.argmin(1)], atol=2e-4)
    pos = grid[grid >= 0]  # nonneg: prox of lam*x + indicator(x >= 0)
    obj = 0.5 * (pos[None, :] - z[:, None]) ** 2 + lam * pos[None, :]
    np.testing.assert_allclose(shrink(jnp.asarray(z), lam, "nonneg"), pos[obj.argmin(1)], atol=2e-4)
    with pytest.raises(ValueError, match="shrink"):
        shrink(jnp.asarray(z), lam, "l2")


@pytest.mark.parametrize("kind", ["l1", "nonneg"])
def test_gamma_zero_iff_z_below_lam(kind):
    lam, kappa = 0.3, 2.5
    rng = np.random.default_rng(1)
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in SPEC.init_masks().items()}
    opt = spp("official", learning_rate=0.05, lam=lam, kappa=kappa, shrink=kind)
    _, st, _ = run(opt, random_masks(1), 5, lambda m: grads)
    z = np.concatenate([np.ravel(v) for v in np_tree(st.z).values()])
    gamma = np.concatenate([np.ravel(v) for v in np_tree(st.gamma).values()])
    below = np.abs(z) <= lam if kind == "l1" else z <= lam
    assert 0 < below.sum() < below.size  # both cases occur
    np.testing.assert_array_equal(gamma == 0, below)
    np.testing.assert_allclose(gamma, kappa * np.asarray(shrink(jnp.asarray(z), lam, kind)), rtol=1e-6)


# 3. Official mode, constant masks: entry step, no entry for a <= 0, Gamma -> a -----------------------
def test_official_entry_steps_and_limit():
    lr, lam, b1, steps = 0.02, 3.0, 0.9, 3000
    rng = np.random.default_rng(2)  # |a| in [0.2, 1.2]: all positive entries enter by step ~725
    masks = {
        g.name: jnp.asarray(
            rng.choice([-1, 1], g.shape, p=[0.25, 0.75]) * rng.uniform(0.2, 1.2, g.shape), jnp.float32
        )
        for g in SPEC.groups
    }
    masks["qk"] = masks["qk"].at[0, 0].set(0.0)
    opt = spp("official", learning_rate=lr)  # default lam = 3, b1 = 0.9, adam, nonneg, kappa = 1
    m_end, st, _ = run(opt, masks, steps)  # zero grads: Adam's step is exactly zero, M is constant
    chex.assert_trees_all_equal(m_end, masks)
    assert int(st.count) == steps
    # the bias-correction offset: sum_t 1/(1-b1^t) = T + C - tail(T), C = sum_{t>=1} b1^t / (1 - b1^t)
    offset = sum(b1**t / (1 - b1**t) for t in range(1, 5000))
    n_entered = 0
    for name, a in np_tree(masks).items():
        a = a.astype(np.float64)
        t_in = np.asarray(st.t_in[name], np.float64)
        expect = official_entry_step(a, lr, lam, b1)
        pos = a > 0
        assert np.isposinf(t_in[~pos]).all() and np.isposinf(expect[~pos]).all()
        np.testing.assert_array_equal(np.asarray(st.gamma[name])[~pos], 0.0)
        # float32 accumulation may flip an entry that is within 1e-4 of the threshold by one step
        thr = lam / (lr * np.where(pos, a, 1.0))
        near = np.abs(thr - np.round(thr - offset) - offset) < 1e-3
        assert np.abs(t_in[pos] - expect[pos]).max() <= 1
        np.testing.assert_array_equal(t_in[pos & ~near], expect[pos & ~near])
        # approx: entry at the first T with T + C > lam / (lr a) (tail < 1e-2 for T >= 90)
        d = t_in[pos] - (thr[pos] - offset)
        assert (d > -0.01).all() and (d <= 1.01).all(), d
        # after entry Z += s_t (a - Gamma) and Gamma = Z - lam: Gamma -> a geometrically, until the
        # float32 increment s_t (a - Gamma) drops below half an ulp of Z ~ lam + a (~1.2e-5 here)
        np.testing.assert_allclose(np.asarray(st.gamma[name])[pos], a[pos], rtol=0, atol=3e-5)
        # 10. consistency with the step count (no exits for constant M)
        sis = np.asarray(st.steps_in_support[name])
        np.testing.assert_array_equal(sis[pos], steps - t_in[pos] + 1)
        np.testing.assert_array_equal(sis[~pos], 0)
        n_entered += pos.sum()
    assert n_entered > 10


def test_official_entry_step_closed_form():
    a = np.array([1.0, 0.5, 0.0, -1.0, 0.01])
    lr, lam, b1 = 1e-3, 3.0, 0.9
    got = official_entry_step(a, lr, lam, b1)
    cum = np.cumsum(lr / (1 - b1 ** np.arange(1, 400_001)))  # brute force
    for ai, gi in zip(a, got, strict=True):
        want = np.inf if ai <= 0 else np.argmax(cum * ai > lam) + 1
        assert gi == want


# 4. Constant M: support never shrinks ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nonneg", "l1"])
def test_support_monotone_for_constant_masks(kind):
    steps = 1500
    masks = random_masks(3, -1.5, 1.5)
    opt = spp("official", learning_rate=0.02, shrink=kind)
    _, st, hist = run(opt, masks, steps)
    for name, h in np_tree(hist).items():
        h = h.reshape(steps, -1)
        assert h[-1].sum() > h[steps // 10].sum() > 0  # entries enter over time
        assert (h[1:] >= h[:-1]).all()  # never leaves
        if kind == "l1":  # negative masks enter too, with Gamma < 0
            assert (np.asarray(st.gamma[name]) < 0).any()
        # 10. steps_in_support == count - t_in + 1 where entered
        t_in = np.asarray(st.t_in[name]).ravel()
        sis = np.asarray(st.steps_in_support[name]).ravel()
        np.testing.assert_array_equal(sis, np.where(np.isinf(t_in), 0, steps - t_in + 1))
        np.testing.assert_array_equal(sis, h.sum(0))


# 5. Paper form on sparse linear regression ~ Lasso path ----------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_paper_form_entry_order_matches_lasso_path(seed):
    n, p, k = 200, 20, 5
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    x = (x - x.mean(0)) / x.std(0)
    beta_true = np.zeros(p)
    true_idx = rng.choice(p, k, replace=False)
    beta_true[true_idx] = [3.0, -2.5, 2.0, -1.5, 1.0]
    y = x @ beta_true + 1.0 * rng.standard_normal(n)
    y -= y.mean()

    # Lasso path on a fine grid: entry "time" = index of the first alpha with a nonzero coefficient
    amax = np.abs(x.T @ y).max() / n
    _, coefs, _ = lasso_path(x, y, alphas=np.geomspace(amax, amax * 1e-4, 2000))
    nz = coefs != 0
    lasso_t = np.where(nz.any(1), nz.argmax(1), np.inf)

    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    loss = lambda b: 0.5 / n * jnp.sum((yj - xj @ b) ** 2)
    # large kappa, small alpha. Stability of the coupled (beta, Gamma) step on a quadratic needs
    # kappa*alpha <= nu / (1 + nu*L) (L ~ 1.7 here): 0.05 <= 0.085. (kappa*alpha = 0.1 oscillates.)
    opt = spp("paper", learning_rate=0.005, kappa=10.0, nu=0.1, lam=1.0)
    beta, st, _ = run(opt, jnp.zeros(p, jnp.float32), 40000, jax.grad(loss))
    spp_t = np.asarray(st.t_in, np.float64)

    first_lasso = set(np.argsort(lasso_t, kind="stable")[:k])
    first_spp = set(np.argsort(spp_t, kind="stable")[:k])
    assert first_spp == first_lasso == set(true_idx)
    both = np.isfinite(lasso_t) & np.isfinite(spp_t)
    assert both.sum() >= 12  # noise variables enter too: the rank test covers more than the signal
    rho = spearmanr(lasso_t[both], spp_t[both]).statistic
    assert rho >= 0.8, rho
    # the end of the path is the least-squares fit: beta and Gamma settle there, no oscillation
    ols = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(float(loss(beta)), float(loss(jnp.asarray(ols))), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(st.gamma)[true_idx], ols[true_idx], atol=0.02)


# 6. Paper form with sgd equals the hand formula ----------------------------------------------------
@pytest.mark.parametrize("z_new", [False, True])
def test_paper_sgd_matches_formula(z_new):
    alpha, kappa, nu, lam, steps = 0.05, 3.0, 0.5, 0.05, 6
    rng = np.random.default_rng(4)
    masks = random_masks(4)
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in masks.items()} for _ in range(steps)
    ]
    opt = spp("paper", learning_rate=alpha, kappa=kappa, nu=nu, lam=lam, z_uses_updated_mask=z_new)
    update = jax.jit(opt.update)
    m, st = masks, opt.init(masks)
    ref_m = np_tree(masks)
    ref_z = {k: np.zeros_like(v) for k, v in ref_m.items()}
    ref_g = {k: np.zeros_like(v) for k, v in ref_m.items()}
    ref_t = {k: np.full(v.shape, np.inf) for k, v in ref_m.items()}
    for step in range(1, steps + 1):
        u, st = update(jax.tree.map(jnp.asarray, grads[step - 1]), st, m)
        m = optax.apply_updates(m, u)
        for k in ref_m:
            mk, gk = ref_m[k], ref_g[k]
            m_next = mk - kappa * alpha * (grads[step - 1][k] + (mk - gk) / nu)
            ref_z[k] = ref_z[k] + alpha / nu * ((m_next if z_new else mk) - gk)
            ref_g[k] = kappa * np.sign(ref_z[k]) * np.maximum(np.abs(ref_z[k]) - lam, 0)
            ref_t[k] = np.where(np.isinf(ref_t[k]) & (ref_g[k] != 0), step, ref_t[k])
            np.testing.assert_allclose(u[k], m_next - mk, rtol=1e-5, atol=1e-6)
            ref_m[k] = m_next
            np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(st.z[k], ref_z[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(st.gamma[k], ref_g[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(st.t_in[k], ref_t[k])
    n_in = sum(int((g != 0).sum()) for g in ref_g.values())
    assert 0 < n_in < sum(g.size for g in ref_g.values())  # the test exercised the shrink


# 7. Official form: Adam step and bias-corrected Z step ------------------------------------------------
@pytest.mark.parametrize("nu", [math.inf, 2.0])
def test_official_matches_numpy_adam(nu):
    lr, lam, b1, b2, eps, steps = 0.1, 0.2, 0.9, 0.999, 1e-4, 8
    rng = np.random.default_rng(5)
    masks = random_masks(5, 0.0, 1.5)
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in masks.items()} for _ in range(steps)
    ]
    opt = spp("official", learning_rate=lr, lam=lam, nu=nu)  # defaults: adam, eps 1e-4, nonneg
    update = jax.jit(opt.update)
    m, st = masks, opt.init(masks)
    ref_m = np_tree(masks)
    mu = {k: np.zeros_like(v, np.float64) for k, v in ref_m.items()}
    nu2 = {k: np.zeros_like(v, np.float64) for k, v in ref_m.items()}
    ref_z = {k: np.zeros_like(v, np.float64) for k, v in ref_m.items()}
    ref_g = {k: np.zeros_like(v, np.float64) for k, v in ref_m.items()}
    for t in range(1, steps + 1):
        u, st = update(jax.tree.map(jnp.asarray, grads[t - 1]), st, m)
        m = optax.apply_updates(m, u)
        for k in ref_m:
            g = grads[t - 1][k] + (0.0 if math.isinf(nu) else (ref_m[k] - ref_g[k]) / nu)
            mu[k] = b1 * mu[k] + (1 - b1) * g
            nu2[k] = b2 * nu2[k] + (1 - b2) * g**2
            mhat, vhat = mu[k] / (1 - b1**t), nu2[k] / (1 - b2**t)
            ref_m[k] = ref_m[k] - lr * mhat / (np.sqrt(vhat) + eps)
            ref_z[k] = ref_z[k] + lr / (1 - b1**t) * (ref_m[k] - ref_g[k])
            ref_g[k] = np.maximum(ref_z[k] - lam, 0.0)
            np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(st.z[k], ref_z[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(st.gamma[k], ref_g[k], rtol=1e-5, atol=1e-5)
    n_in = sum(int((g != 0).sum()) for g in ref_g.values())
    assert 0 < n_in < sum(g.size for g in ref_g.values())


@pytest.mark.parametrize("lr", [2e-2, 1e-3])  # 2e-2: the default config's search.lr
def test_official_matches_float64_reference(lr):
    """400 steps of the official form on fixed float32 gradients (independent of M) against the official
    dynamics in float64 (bench/adam_precision.py: PyTorch's Adam, eps added after sqrt(v) / sqrt(1 - b2^t),
    Z step lr / (1 - b1^t), nonneg shrink, lam 3). Only the optimizer arithmetic differs, so what is left
    is float32 rounding. With optax.scale_by_adam and 1 - f32(b1)^t, max |dZ| was 5.7e-5 at lr 2e-2."""
    m0, grads = problem(lr, steps=400)
    ref = reference(m0, grads, lr)
    got = trajectory(spp("official", learning_rate=lr), m0, grads)
    entered = (ref["gamma"] > 0).any(0)
    assert 20 <= entered.sum() <= m0.size - 20  # entries that enter and entries that never enter
    err = {k: np.abs(got[k] - ref[k]) for k in ("z", "m", "gamma")}  # [steps, n]
    at = lambda t: " ".join(f"d{k} {e[t].max():.1e}" for k, e in err.items())
    msg = f"after 100: {at(99)}; 200: {at(199)}; 400: {at(399)}; all steps: {at(slice(None))}"
    print(f"lr {lr}: {msg}")
    assert err["z"].max() < 1e-5, msg
    assert err["gamma"].max() < 1e-5, msg
    assert (err["m"] < 1e-5 * np.maximum(1.0, np.abs(ref["m"]))).all(), msg  # M up to 9: ulp 1e-6


def test_precise_adam_corrections_and_state():
    t = np.arange(1, 100_001)
    for b in (0.0, 0.5, 0.9, 0.999, 0.99999):
        got = np.asarray(one_minus_pow(_log_decay(b), jnp.asarray(t, jnp.int32)), np.float64)
        want = -np.expm1(t * math.log(b)) if b > 0 else np.ones_like(t, np.float64)
        np.testing.assert_allclose(got, want, rtol=5e-7, atol=0)
    # the base state is optax.scale_by_adam's: resume checkpoints and readers of base_state keep working
    masks = SPEC.init_masks()
    st = spp("official").init(masks).base_state
    assert isinstance(st, optax.ScaleByAdamState)
    chex.assert_trees_all_equal_shapes_and_dtypes(st, optax.scale_by_adam().init(masks))


# 8. Validation -----------------------------------------------------------------------------------
BAD = [
    ("mode", dict(mode="lbi")),
    ("base", dict(base="rmsprop")),
    ("shrink", dict(shrink="l2")),
    ("learning_rate", dict(learning_rate=0.0)),
    ("learning_rate", dict(learning_rate=-1e-3)),
    ("learning_rate", dict(learning_rate=math.nan)),
    ("kappa", dict(kappa=0.0)),
    ("kappa", dict(kappa=-1.0)),
    ("kappa", dict(kappa=math.inf)),
    ("nu", dict(nu=0.0)),
    ("nu", dict(nu=-2.0)),
    ("nu", dict(nu=math.nan)),
    ("lam", dict(lam=-0.1)),
    ("lam", dict(lam=math.nan)),
    ("b1", dict(b1=1.0)),
    ("b1", dict(b1=-0.1)),
    ("b2", dict(b2=1.0)),
    ("b2", dict(b2=-0.5)),
    ("eps", dict(eps=0.0)),
    ("eps", dict(eps=-1e-8)),
    ("learning_rate", dict(mode="paper")),  # paper mode has no default alpha
    ("nu", dict(mode="paper", learning_rate=0.1, nu=math.inf)),  # Z would never move
]


@pytest.mark.parametrize(("name", "kwargs"), BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_validation(name, kwargs):
    with pytest.raises(ValueError) as err:
        spp(**kwargs)
    msg = str(err.value)
    assert name in msg and "\n" not in msg
    bad = kwargs.get(name)
    if bad is not None:
        assert repr(bad) in msg


def test_valid_edge_values_accepted():
    spp("official", nu=math.inf, lam=0.0, b1=0.0, b2=0.0, base="sgd")
    spp("paper", learning_rate=optax.constant_schedule(0.1), base="adam", shrink="nonneg")


# 9. jit and schedules --------------------------------------------------------------------------
def test_jit_and_schedule():
    sched = optax.exponential_decay(0.2, transition_steps=1, decay_rate=0.7)
    lam, steps = 0.3, 6
    rng = np.random.default_rng(6)
    masks = random_masks(6, 0.5, 1.5)
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in masks.items()} for _ in range(steps)
    ]
    opt = spp("official", learning_rate=sched, base="sgd", lam=lam)
    jit_update = jax.jit(opt.update)
    m_j, st_j = masks, opt.init(masks)
    m_e, st_e = masks, opt.init(masks)
    ref_m = np_tree(masks)
    ref_z = {k: np.zeros_like(v, np.float64) for k, v in ref_m.items()}
    ref_g = {k: np.zeros_like(v, np.float64) for k, v in ref_m.items()}
    for t in range(1, steps + 1):
        g = jax.tree.map(jnp.asarray, grads[t - 1])
        u, st_j = jit_update(g, st_j, m_j)
        m_j = optax.apply_updates(m_j, u)
        u, st_e = opt.update(g, st_e, m_e)
        m_e = optax.apply_updates(m_e, u)
        lr_t = 0.2 * 0.7 ** (t - 1)  # schedule(count before the update)
        for k in ref_m:
            ref_m[k] = ref_m[k] - lr_t * grads[t - 1][k]
            ref_z[k] = ref_z[k] + lr_t * (ref_m[k] - ref_g[k])  # sgd: s_t = lr_t
            ref_g[k] = np.maximum(ref_z[k] - lam, 0.0)
    chex.assert_trees_all_close(m_j, m_e, rtol=1e-6)
    chex.assert_trees_all_close(st_j, st_e, rtol=1e-6, atol=1e-6)  # Gamma = Z - lam: abs error
    for k in ref_m:
        np.testing.assert_allclose(m_j[k], ref_m[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st_j.z[k], ref_z[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st_j.gamma[k], ref_g[k], rtol=1e-5, atol=1e-6)
    assert any(np.asarray(s).any() for s in support(st_j).values())
