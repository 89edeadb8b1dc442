"""SPP mask optimizer: a discretized differential inclusion on the masks, as an optax transform.

Both forms of algorithm.md §3 share one update. g_k is the task gradient w.r.t. the masks M_k; base
is sgd (identity) or adam (optax.scale_by_adam: bias-corrected m_hat / (sqrt(v_hat) + eps)); lr_k is
the learning rate at step k (the count before the update; t = k + 1 is Adam's step number):

    M_{k+1}     = M_k - kappa * lr_k * base(g_k + (M_k - Gamma_k) / nu)    (no coupling if nu = inf)
    Z_{k+1}     = Z_k + s_k * (M' - Gamma_k),   M' = M_{k+1} if z_uses_updated_mask else M_k
    Gamma_{k+1} = kappa * Shrink(Z_{k+1}, lam)

    paper    (§3.1, split linearized Bregman): s_k = lr_k / nu. With sgd and lr = alpha this is
             M_{k+1} = M_k - kappa alpha [g + (M_k - Gamma_k) / nu],
             Z_{k+1} = Z_k + alpha / nu (M_k - Gamma_k).
    official (§3.2, reference code): s_k = lr_k / (1 - b1^t) for adam, lr_k for sgd.

    Shrink "l1" = sign(z) max(|z| - lam, 0) (the l1 prox), "nonneg" = max(z - lam, 0).

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

MODES = ("paper", "official")
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
}  # fmt: skip


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
) -> optax.GradientTransformationExtraArgs:
    """The SPP mask optimizer (module docstring has the equations). `None` takes the mode's default.

    Args:
      mode: "official" (algorithm.md §3.2, the reference code) or "paper" (§3.1, split LBI).
      learning_rate: float > 0 or an optax schedule of the step count. Paper: alpha, REQUIRED (no
        default). Official: 1e-3.
      kappa: damping, finite > 0; scales the mask step and Gamma = kappa * Shrink(Z).
        Paper: 10. Official: 1.
      nu: coupling, > 0; inf = no coupling (the mask step sees the task gradient alone).
        Paper: 1 (must be finite: its Z step is alpha / nu). Official: inf.
      lam: shrink threshold, >= 0. Paper: 1. Official: 3.
      shrink: "l1" or "nonneg". Paper: "l1". Official: "nonneg".
      base: base mask step, "sgd" or "adam". Paper: "sgd". Official: "adam".
      b1, b2: Adam decay rates in [0, 1) (b1 also sets official mode's bias-corrected Z step).
      eps: Adam epsilon, > 0. Paper: 1e-8 (optax default). Official: 1e-4.
      z_uses_updated_mask: Z step uses M_{k+1} instead of M_k. Paper: False. Official: True.

    Returns:
      A transformation whose `update(grads, state, params)` needs params = the current masks M_k;
      it returns updates = M_{k+1} - M_k (`optax.apply_updates(masks, updates)` gives M_{k+1}).
    """
    _check("mode", mode, mode in MODES, f"one of {MODES}")
    given = dict(
        learning_rate=learning_rate, kappa=kappa, nu=nu, lam=lam, shrink=shrink, base=base, eps=eps,
        z_uses_updated_mask=z_uses_updated_mask,
    )  # fmt: skip
    hp = {k: _DEFAULTS[mode][k] if v is None else v for k, v in given.items()}
    lr, kappa, nu, lam, eps = (hp[k] for k in ("learning_rate", "kappa", "nu", "lam", "eps"))
    shrink_kind, base, z_new = hp["shrink"], hp["base"], bool(hp["z_uses_updated_mask"])
    _check("base", base, base in BASES, f"one of {BASES}")
    _check("shrink", shrink_kind, shrink_kind in SHRINKS, f"one of {SHRINKS}")
    if lr is None:
        raise ConfigError("spp: learning_rate=None; paper mode needs an explicit alpha > 0")
    _check("learning_rate", lr, callable(lr) or lr > 0, "> 0 or an optax schedule")
    _check("kappa", kappa, 0 < kappa < math.inf, "finite > 0")
    _check("nu", nu, nu > 0, "> 0 (inf = no coupling)")
    if mode == "paper" and math.isinf(nu):
        raise ConfigError(
            "spp: nu=inf in paper mode makes the Z step alpha/nu zero, so Gamma never moves; "
            "use a finite nu > 0 or mode='official'"
        )
    _check("lam", lam, 0 <= lam < math.inf, "finite >= 0")
    _check("b1", b1, 0 <= b1 < 1, "[0, 1)")
    _check("b2", b2, 0 <= b2 < 1, "[0, 1)")
    _check("eps", eps, eps > 0, "> 0")

    schedule: Callable[[jax.Array], jax.Array] = lr if callable(lr) else (lambda _: lr)
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps) if base == "adam" else optax.identity()
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def init_fn(params: Masks) -> SPPState:
        # Z and Gamma need their own buffers: one array in two leaves breaks buffer donation.
        zeros = lambda: jax.tree.map(lambda m: jnp.zeros(jnp.shape(m), jnp.float32), params)
        return SPPState(
            count=jnp.zeros([], jnp.int32),
            base_state=inner.init(jax.tree.map(f32, params)),
            z=zeros(),
            gamma=zeros(),
            t_in=jax.tree.map(lambda m: jnp.full(jnp.shape(m), jnp.inf, jnp.float32), params),
            steps_in_support=jax.tree.map(lambda m: jnp.zeros(jnp.shape(m), jnp.int32), params),
        )

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
            s = lr_k / (1.0 - f32(b1) ** count.astype(jnp.float32))
        else:
            s = lr_k
        z = jax.tree.map(lambda zi, mi, ga: zi + s * (mi - ga), state.z, m_next if z_new else m,
                         state.gamma)  # fmt: skip
        gamma = jax.tree.map(lambda zi: kappa * _shrink(zi, lam, shrink_kind), z)
        inside = jax.tree.map(lambda ga: ga != 0, gamma)
        now = count.astype(jnp.float32)
        t_in = jax.tree.map(lambda t, i: jnp.where(jnp.isinf(t) & i, now, t), state.t_in, inside)
        steps = jax.tree.map(lambda n, i: n + i.astype(jnp.int32), state.steps_in_support, inside)
        updates = jax.tree.map(lambda st, p: st.astype(jnp.asarray(p).dtype), step, params)
        return updates, SPPState(count, base_state, z, gamma, t_in, steps)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
