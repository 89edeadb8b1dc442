"""SPP mask optimizer: a discretized differential inclusion on the masks, as an optax transform.

Both forms of algorithm.md §3 share one update. g_k is the task gradient w.r.t. the masks M_k; base
is sgd (identity) or adam (`scale_by_adam_precise`: bias-corrected m_hat / (sqrt(v_hat) + eps), see
"Bias corrections" below); lr_k is the learning rate at step k (the count before the update; t = k + 1
is Adam's step number):

    M_{k+1}     = M_k - kappa * lr_k * base(g_k + (M_k - Gamma_k) / nu)    (no coupling if nu = inf)
    Z_{k+1}     = Z_k + s_k * (M' - Gamma_k),   M' = M_{k+1} if z_uses_updated_mask else M_k
    Gamma_{k+1} = kappa * Shrink(Z_{k+1}, lam)

    paper    (§3.1, split linearized Bregman): s_k = lr_k / nu. With sgd and lr = alpha this is
             M_{k+1} = M_k - kappa alpha [g + (M_k - Gamma_k) / nu],
             Z_{k+1} = Z_k + alpha / nu (M_k - Gamma_k).
    official (§3.2, reference code): s_k = lr_k / (1 - b1^t) for adam, lr_k for sgd.

    Shrink "l1" = sign(z) max(|z| - lam, 0) (the l1 prox), "nonneg" = max(z - lam, 0).

Curvature form (mode "curvature", this library's; algorithm.md §9 says why): the same split inclusion, but
run on the local Fisher model of the loss instead of the raw stochastic gradient. The caller passes
`curvature` = c_k, the per-entry mean over the batch's examples of the squared per-example mask gradient
at M_k (the diagonal empirical Fisher, a second moment: its noise falls with the batch where the gradient's
mean drowns in it). With h_k = EMA_b2(c) / c_bar (c_bar = mean of c_0 over all entries, fixed at the first
step, so nu is in units of the typical curvature and no setting depends on the loss scale):

    q_k(M)      = 1/2 sum_i h_{k,i} (M_i - 1)^2           (loss increase; the model is an optimum at M = 1)
    M_{k+1}     = argmin_M q_k(M) + 1/(2 nu) ||M - Gamma_k||^2 = (h_k + Gamma_k / nu) / (h_k + 1 / nu)
    Z_{k+1}     = Z_k + lr_k (M_{k+1} - Gamma_k)
    Gamma_{k+1} = kappa * Shrink(Z_{k+1}, lam)

The M step is exact (the kappa -> inf limit of the split step, solvable because the model is diagonal),
and h is re-estimated at every step at the current M, so the model follows the path: once the weak entries
have shrunk, the curvature of the rest is measured in the thinned network. Gamma grows from 0; an entry
with M = 1 enters after lam / lr steps, one the model lets shrink to M ~ nu h much later.

Bias corrections (official form, base adam). The reference code (PyTorch Adam, non-capturable) computes
c1 = 1 - b1^t and c2 = 1 - b2^t in Python double and steps

    m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2                       (float32)
    M -= (lr_k / c1) m / (sqrt(v) / sqrt(c2) + eps),   Z step s_k = lr_k / c1.

optax.scale_by_adam and a float32 `1 - f32(b1)^t` get c2 wrong by ~1.3e-5 relative (t = 1) to 2e-5:
f32(0.999) = 0.999 + 1.3e-8, and 1 - b2^t is only 1e-3 (t = 1) to 0.33 (t = 400), so the rounding of b2
is amplified by t b2^(t-1) / (1 - b2^t) ~ 1e3. The error is systematic, the same factor on every entry's
step, so M drifts by ~lr t 1e-5 and Z = sum_k s_k (M_{k+1} - Gamma_k), which integrates M while
Gamma = 0, by ~lr^2 t^2 1e-5: 5.7e-5 after 400 steps at lr 2e-2 (bench/adam_precision.py). Here, in
float32 inside jit: c = 1 - b^t = -expm1(t log b) with log b computed on the host in float64 (math.log)
and rounded once (`one_minus_pow`, relative error ~1e-7, < 4e-7 measured for t <= 5000), in Adam's
step and in s_k. The moments are kept as float32 lerps m += (1 - b1)(g - m), v += (1 - b2)(g^2 - v)
(the same equations): the decay they apply, 1 - f32(1 - b2), is off by 5e-11, where f32(b2) is off by
1.3e-8 and biases v the same systematic way, by up to ~t 1.3e-8 relative. What is left against a
float64 computation is the float32 rounding of the stored M and Z (< 1e-5 in Z after 400 steps,
tests/test_spp.py).

Step size (paper form): on a quadratic loss with curvature <= L, the in-support step is stable when
kappa * alpha <= nu / (1 + nu * L) (sufficient; with kappa * alpha >= nu it never converges, M and
Gamma oscillate with period 2).

On device, every step, it records per entry the step at which it first entered the support of Gamma
(`t_in`, +inf if never) and how many steps it has spent in the support (`steps_in_support`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.errors import ConfigError

Masks = dict[str, jax.Array]  # the mask pytree (spp_jax.groups.Masks); any pytree of arrays works

MODES = ("paper", "official", "curvature")
BASES = ("sgd", "adam")
SHRINKS = ("l1", "nonneg")

_DEFAULTS: dict[str, dict[str, Any]] = {
    # paper: learning_rate (alpha) has no default and must be given.
    "paper": dict(
        learning_rate=None, kappa=10.0, nu=1.0, lam=1.0, shrink="l1", base="sgd", eps=1e-8,
        z_uses_updated_mask=False,
    ),
    "official": dict(
        learning_rate=1e-3, kappa=1.0, nu=math.inf, lam=3.0, shrink="nonneg", base="adam", eps=1e-4,
        z_uses_updated_mask=True,
    ),
    # curvature: nu in units of 1 / (mean curvature at step 1); learning_rate is the Z step.
    "curvature": dict(
        learning_rate=0.1, kappa=1.0, nu=30.0, lam=1.0, shrink="nonneg", base="exact", eps=1e-8,
        z_uses_updated_mask=True,
    ),
}  # fmt: skip


class CurvatureState(NamedTuple):
    """`SPPState.base_state` of the curvature form: the curvature EMA and its step-1 mean."""

    ema: Masks  # float32 EMA_b2 of the curvature passed to update
    scale: jax.Array  # float32 scalar: mean curvature of the first update (0 before it)


class SPPState(NamedTuple):
    """State of `spp`. All per-entry fields have the tree structure and shapes of the masks."""

    count: jax.Array  # int32 scalar: steps taken so far
    base_state: optax.OptState  # state of the base mask step (scale_by_adam or identity)
    z: Masks  # Z, float32
    gamma: Masks  # Gamma, float32
    t_in: Masks  # float32: `count` after the update that first put the entry in supp(Gamma); inf
    steps_in_support: Masks  # int32: number of updates after which the entry was in supp(Gamma)


def shrink(z: jax.Array, lam: float | jax.Array, kind: str = "l1") -> jax.Array:
    """Shrink(z, lam) of algorithm.md §3.1.

    "l1": sign(z) max(|z| - lam, 0), the prox of lam |.|; "nonneg": max(z - lam, 0).
    """
    if kind == "l1":
        return jnp.sign(z) * jnp.maximum(jnp.abs(z) - lam, 0.0)
    if kind == "nonneg":
        return jnp.maximum(z - lam, 0.0)
    raise ConfigError(f"shrink={kind!r} is not allowed; use one of {SHRINKS}")


_shrink = shrink  # `spp` has an argument named `shrink`


def support(state: SPPState) -> Masks:
    """Bool pytree: True where Gamma != 0 (the sub-network named by the current path point)."""
    return jax.tree.map(lambda g: g != 0, state.gamma)


def official_entry_step(a: Any, lr: float, lam: float, b1: float = 0.9) -> np.ndarray:
    """Entry step of official mode (algorithm.md §3.2) for constant masks `a` (numpy, float64).

    While Gamma_i = 0, Z_i after T steps is a_i * sum_{t=1..T} lr / (1 - b1^t); entry i enters at
    the first T with Z_i > lam. Returns that T as float, inf where a_i <= 0 (never enters).
    Assumes a constant learning rate and base adam (b1 = 0 gives the sgd case).
    """
    a = np.asarray(a, np.float64)
    with np.errstate(divide="ignore"):
        thr = np.where(a > 0, lam / (lr * np.where(a > 0, a, 1.0)), np.inf)  # need S(T) > thr
    # S(T) = sum_{t<=T} 1/(1 - b1^t); past t0 every term is 1.0 in float64: S grows by exactly 1.
    t0 = 1 if b1 == 0 else max(1, math.ceil(math.log(1e-18) / math.log(b1)))
    cum = np.cumsum(1.0 / (1.0 - b1 ** np.arange(1, t0 + 1, dtype=np.float64)))
    early = np.searchsorted(cum, thr, side="right") + 1.0  # first T <= t0 with S(T) > thr
    late = t0 + np.floor(thr - cum[-1]) + 1.0  # first T > t0 with S(t0) + (T - t0) > thr
    out = np.where(thr < cum[-1], early, late)
    return np.where(a > 0, out, np.inf)


def _log_decay(b: float) -> np.float32:
    """log(b) in float64 on the host, rounded once to float32 (-inf for b = 0, so that b^t = 0)."""
    return np.float32(math.log(b) if b > 0 else -math.inf)


def one_minus_pow(log_b: np.float32 | jax.Array, t: jax.Array) -> jax.Array:
    """1 - b^t = -expm1(t log b) in float32, log_b = `_log_decay(b)`; relative error ~1e-7 (t < 2^24)."""
    return -jnp.expm1(jnp.asarray(t, jnp.float32) * log_b)


def scale_by_adam_precise(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """Adam as the reference code (PyTorch, non-capturable) computes it; see "Bias corrections" above.

    Returns m / c1 / (sqrt(v) / sqrt(c2) + eps) with c = 1 - b^t = `one_minus_pow`, t = the new count,
    and the moments m, v updated as float32 lerps. The state is optax.scale_by_adam's, an
    `optax.ScaleByAdamState(count, mu, nu)` with float32 mu and nu: checkpoints and code reading
    `SPPState.base_state` work with either.
    """
    log_b1, log_b2 = _log_decay(b1), _log_decay(b2)

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        mu, nu = jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v + (1.0 - b2) * (g * g - v), state.nu, updates)
        count = optax.safe_increment(state.count)
        c1, sqrt_c2 = one_minus_pow(log_b1, count), jnp.sqrt(one_minus_pow(log_b2, count))
        out = jax.tree.map(lambda m, v: m / c1 / (jnp.sqrt(v) / sqrt_c2 + eps), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _initial_state(params: Masks, base_state: Any) -> SPPState:
    """Count 0, Z = Gamma = 0, t_in = inf, no steps in support, for masks shaped like `params`."""
    # Z and Gamma need their own buffers: one array in two leaves breaks buffer donation.
    zeros = lambda: jax.tree.map(lambda m: jnp.zeros(jnp.shape(m), jnp.float32), params)
    return SPPState(
        count=jnp.zeros([], jnp.int32),
        base_state=base_state,
        z=zeros(),
        gamma=zeros(),
        t_in=jax.tree.map(lambda m: jnp.full(jnp.shape(m), jnp.inf, jnp.float32), params),
        steps_in_support=jax.tree.map(lambda m: jnp.zeros(jnp.shape(m), jnp.int32), params),
    )


def _track(state: SPPState, gamma: Masks, count: jax.Array) -> tuple[Masks, Masks]:
    """t_in and steps_in_support after an update that left `gamma` at step `count`."""
    inside = jax.tree.map(lambda ga: ga != 0, gamma)
    now = count.astype(jnp.float32)
    t_in = jax.tree.map(lambda t, i: jnp.where(jnp.isinf(t) & i, now, t), state.t_in, inside)
    steps = jax.tree.map(lambda n, i: n + i.astype(jnp.int32), state.steps_in_support, inside)
    return t_in, steps


def _curvature_form(
    schedule: Callable, kappa: float, nu: float, lam: float, shrink_kind: str, decay: float
) -> optax.GradientTransformationExtraArgs:
    """The curvature form of `spp` (module docstring, "Curvature form")."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def init_fn(params: Masks) -> SPPState:
        ema = jax.tree.map(lambda m: jnp.zeros(jnp.shape(m), jnp.float32), params)
        return _initial_state(params, CurvatureState(ema=ema, scale=jnp.zeros([], jnp.float32)))

    def update_fn(grads: Masks, state: SPPState, params: Masks | None = None, curvature=None, **extra):
        del grads, extra
        if params is None or curvature is None:
            raise ConfigError(
                "spp: the curvature form's update() needs params = the current masks M_k and curvature = the "
                "mean squared per-example mask gradient (search.make_search_step passes both)"
            )
        c = jax.tree.map(f32, curvature)
        first = state.count == 0
        ema = jax.tree.map(lambda e, ci: jnp.where(first, ci, decay * e + (1.0 - decay) * ci),
                           state.base_state.ema, c)  # fmt: skip
        leaves = jax.tree.leaves(c)
        mean_c = sum(x.sum() for x in leaves) / sum(x.size for x in leaves)
        scale = jnp.where(first, jnp.maximum(mean_c, jnp.finfo(jnp.float32).tiny), state.base_state.scale)
        h = jax.tree.map(lambda e: e / scale, ema)
        m_next = jax.tree.map(lambda hi, ga: (hi + ga / nu) / (hi + 1.0 / nu), h, state.gamma)
        lr_k = f32(schedule(state.count))
        z = jax.tree.map(lambda zi, mi, ga: zi + lr_k * (mi - ga), state.z, m_next, state.gamma)
        gamma = jax.tree.map(lambda zi: kappa * _shrink(zi, lam, shrink_kind), z)
        count = state.count + 1
        t_in, steps = _track(state, gamma, count)
        updates = jax.tree.map(lambda n, p: (n - f32(p)).astype(jnp.asarray(p).dtype), m_next, params)
        return updates, SPPState(count, CurvatureState(ema, scale), z, gamma, t_in, steps)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"spp: {name}={value!r} is out of range; allowed: {allowed}")


def spp(
    mode: str = "official",
    *,
    learning_rate: float | optax.Schedule | None = None,
    kappa: float | None = None,
    nu: float | None = None,
    lam: float | None = None,
    shrink: str | None = None,
    base: str | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    z_uses_updated_mask: bool | None = None,
    curvature_decay: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
    """The SPP mask optimizer (module docstring has the equations). `None` takes the mode's default.

    Args:
      mode: "official" (algorithm.md §3.2, the reference code), "paper" (§3.1, split LBI) or
        "curvature" (the split inclusion on the local Fisher model, module docstring: "Curvature form").
      learning_rate: float > 0 or an optax schedule of the step count. Paper: alpha, REQUIRED (no
        default). Official: 1e-3. Curvature: the Z step, 0.1.
      kappa: damping, finite > 0; scales the mask step and Gamma = kappa * Shrink(Z).
        Paper: 10. Official: 1. Curvature: 1 (Gamma only; its M step is exact).
      nu: coupling, > 0; inf = no coupling (the mask step sees the task gradient alone).
        Paper: 1 (must be finite: its Z step is alpha / nu). Official: inf. Curvature: 30 (finite), in
        units of 1 / (mean curvature at step 1).
      lam: shrink threshold, >= 0. Paper: 1. Official: 3. Curvature: 1.
      shrink: "l1" or "nonneg". Paper: "l1". Official: "nonneg". Curvature: "nonneg".
      base: base mask step, "sgd" or "adam" (paper, official); "exact" (the curvature form's exact M step).
        Paper: "sgd". Official: "adam".
      b1, b2: Adam decay rates in [0, 1) (b1 also sets official mode's bias-corrected Z step).
      eps: Adam epsilon, > 0. Paper: 1e-8 (optax default). Official: 1e-4.
      z_uses_updated_mask: Z step uses M_{k+1} instead of M_k. Paper: False. Official: True.
        Curvature: always M_{k+1} (this argument and eps are not used).
      curvature_decay: curvature form: EMA decay in [0, 1) of the curvature passed to update.

    Returns:
      A transformation whose `update(grads, state, params)` needs params = the current masks M_k;
      it returns updates = M_{k+1} - M_k (`optax.apply_updates(masks, updates)` gives M_{k+1}).
      The curvature form also needs `curvature=` (module docstring) and does not read `grads`.
    """
    _check("mode", mode, mode in MODES, f"one of {MODES}")
    given = dict(
        learning_rate=learning_rate, kappa=kappa, nu=nu, lam=lam, shrink=shrink, base=base, eps=eps,
        z_uses_updated_mask=z_uses_updated_mask,
    )  # fmt: skip
    hp = {k: _DEFAULTS[mode][k] if v is None else v for k, v in given.items()}
    lr, kappa, nu, lam, eps = (hp[k] for k in ("learning_rate", "kappa", "nu", "lam", "eps"))
    shrink_kind, base, z_new = hp["shrink"], hp["base"], bool(hp["z_uses_updated_mask"])
    if mode == "curvature":
        _check("base", base, base == "exact", "'exact' in mode curvature")
    else:
        _check("base", base, base in BASES, f"one of {BASES}")
    _check("shrink", shrink_kind, shrink_kind in SHRINKS, f"one of {SHRINKS}")
    if lr is None:
        raise ConfigError("spp: learning_rate=None; paper mode needs an explicit alpha > 0")
    _check("learning_rate", lr, callable(lr) or lr > 0, "> 0 or an optax schedule")
    _check("kappa", kappa, 0 < kappa < math.inf, "finite > 0")
    _check("nu", nu, nu > 0, "> 0 (inf = no coupling)")
    if mode in ("paper", "curvature") and math.isinf(nu):
        raise ConfigError(
            f"spp: nu=inf in {mode} mode "
            + (
                "makes the Z step alpha/nu zero, so Gamma never moves; "
                if mode == "paper"
                else "leaves the exact M step no pull towards Gamma; "
            )
            + "use a finite nu > 0 or mode='official'"
        )
    _check("lam", lam, 0 <= lam < math.inf, "finite >= 0")
    _check("b1", b1, 0 <= b1 < 1, "[0, 1)")
    _check("b2", b2, 0 <= b2 < 1, "[0, 1)")
    _check("eps", eps, eps > 0, "> 0")

    schedule: Callable[[jax.Array], jax.Array] = lr if callable(lr) else (lambda _: lr)
    if mode == "curvature":
        _check("curvature_decay", curvature_decay, 0 <= curvature_decay < 1, "[0, 1)")
        return _curvature_form(schedule, kappa, nu, lam, shrink_kind, curvature_decay)
    inner = scale_by_adam_precise(b1=b1, b2=b2, eps=eps) if base == "adam" else optax.identity()
    log_b1 = _log_decay(b1)
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def init_fn(params: Masks) -> SPPState:
        return _initial_state(params, inner.init(jax.tree.map(f32, params)))

    def update_fn(grads: Masks, state: SPPState, params: Masks | None = None, **extra_args):
        del extra_args
        if params is None:
            raise ConfigError("spp: update() needs params = the current masks M_k (got params=None)")
        m = jax.tree.map(f32, params)
        g = jax.tree.map(f32, grads)
        if not math.isinf(nu):  # augmented gradient of L + 1/(2 nu) ||M - Gamma||^2
            g = jax.tree.map(lambda gi, mi, ga: gi + (mi - ga) / nu, g, m, state.gamma)
        direction, base_state = inner.update(g, state.base_state, m)
        lr_k = f32(schedule(state.count))
        step = jax.tree.map(lambda d: -kappa * lr_k * d, direction)
        m_next = jax.tree.map(jnp.add, m, step)

        count = state.count + 1
        if mode == "paper":
            s = lr_k / nu
        elif base == "adam":
            s = lr_k / one_minus_pow(log_b1, count)  # lr_k / (1 - b1^t), t = count (module docstring)
        else:
            s = lr_k
        z = jax.tree.map(lambda zi, mi, ga: zi + s * (mi - ga), state.z, m_next if z_new else m,
                         state.gamma)  # fmt: skip
        gamma = jax.tree.map(lambda zi: kappa * _shrink(zi, lam, shrink_kind), z)
        t_in, steps = _track(state, gamma, count)
        updates = jax.tree.map(lambda st, p: st.astype(jnp.asarray(p).dtype), step, params)
        return updates, SPPState(count, base_state, z, gamma, t_in, steps)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
