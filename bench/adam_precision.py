"""Official-form SPP against a float64 restatement of the reference dynamics: old vs precise Adam.

    python3 bench/adam_precision.py [--steps 100,200,400] [--lrs 1e-3,2e-2] [--out result.json]

Old: optax.scale_by_adam and s_k = lr / (1 - f32(b1)^t) (spp_jax before the precise bias corrections,
restated in `old_official`). New: `spp("official")`. Both run jitted in float32 on the same fixed
float32 gradients (`problem`, independent of M) as `reference`, the official dynamics in float64:

    m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  c_i = 1 - b_i^t (t = k + 1)
    M_{k+1} = M_k - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps)             (PyTorch Adam)
    Z_{k+1} = Z_k + (lr / c1) (M_{k+1} - Gamma_k),  Gamma_{k+1} = max(Z_{k+1} - lam, 0)

Prints max |dZ|, |dM|, |dGamma| after each of --steps. tests/test_spp.py imports `problem`,
`reference` and `trajectory`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.spp import spp

LAM, B1, B2, EPS = 3.0, 0.9, 0.999, 1e-4  # official defaults


def problem(lr: float, steps: int = 400, n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(M_0 [n], gradients [steps, n]), float32. Three kinds of entry, n / 3 each:

    up: noisy gradients of mean -0.3 (masks grow, most enter), down: sparse spikes >= 0 (a consistent
    positive sign: masks shrink, Z falls, most never enter), noise: zero mean. Gradient scales differ by
    entry. M_0 ~ U(0, 1.5) x min(0.02 / lr, 6): at lr 1e-3 an entry needs M > ~7 to enter within 400
    steps (Z ~ lr (t + 20) M while Gamma = 0); the cap keeps |M| < 10, where float32 rounding of M is
    small enough.
    """
    rng = np.random.default_rng(seed)
    k = n // 3
    m0 = rng.uniform(0.0, 1.5, n) * min(0.02 / lr, 6.0)
    scale = rng.uniform(0.1, 2.0, n)  # gradient magnitudes differ by entry
    noise = rng.standard_normal((steps, n))
    g = np.empty((steps, n))
    g[:, :k] = -0.3 + noise[:, :k]  # up
    g[:, k : 2 * k] = (rng.random((steps, k)) < 0.05) * rng.uniform(0.5, 1.5, (steps, k))  # down: spikes
    g[:, 2 * k :] = noise[:, 2 * k :]
    return m0.astype(np.float32), (g * scale).astype(np.float32)


def reference(m0, grads, lr: float) -> dict[str, np.ndarray]:
    """The official dynamics (module docstring) in float64: {"m", "z", "gamma"}, [steps, n], per step."""
    m_, mu, nu, z, gamma = np.asarray(m0, np.float64), 0.0, 0.0, 0.0, 0.0
    out = {"m": [], "z": [], "gamma": []}
    for t, g in enumerate(np.asarray(grads, np.float64), start=1):
        mu = B1 * mu + (1 - B1) * g
        nu = B2 * nu + (1 - B2) * g * g
        s = lr / (1 - B1**t)
        m_ = m_ - s * mu / (np.sqrt(nu) / math.sqrt(1 - B2**t) + EPS)
        z = z + s * (m_ - gamma)
        gamma = np.maximum(z - LAM, 0.0)
        for key, val in (("m", m_), ("z", z), ("gamma", gamma)):
            out[key].append(val)
    return {key: np.stack(val) for key, val in out.items()}


def trajectory(opt: optax.GradientTransformationExtraArgs, m0, grads) -> dict[str, np.ndarray]:
    """Run an SPP transform (jitted scan) on the fixed gradients; same layout as `reference`."""

    @jax.jit
    def go(m0, grads):
        def body(carry, g):
            m, st = carry
            u, st = opt.update(g, st, m)
            m = optax.apply_updates(m, u)
            return (m, st), {"m": m, "z": st.z, "gamma": st.gamma}

        return jax.lax.scan(body, (m0, opt.init(m0)), grads)[1]

    return {k: np.asarray(v, np.float64) for k, v in go(jnp.asarray(m0), jnp.asarray(grads)).items()}


def old_official(lr: float) -> optax.GradientTransformationExtraArgs:
    """spp("official", learning_rate=lr) as it was: optax.scale_by_adam, Z step lr / (1 - f32(b1)^t)."""
    new = spp("official", learning_rate=lr)
    adam = optax.scale_by_adam(b1=B1, b2=B2, eps=EPS)

    def update_fn(grads, state, params=None, **extra):
        d, base_state = adam.update(grads, state.base_state, params)
        lr_k, count = jnp.float32(lr), state.count + 1
        step = -1.0 * lr_k * d  # the old code's arithmetic, in its order (kappa = 1)
        z = state.z + lr_k / (1.0 - jnp.float32(B1) ** count.astype(jnp.float32)) * (
            params + step - state.gamma
        )
        gamma = jnp.maximum(z - LAM, 0.0)
        return step, state._replace(count=count, base_state=base_state, z=z, gamma=gamma)

    return optax.GradientTransformationExtraArgs(new.init, update_fn)


def max_diffs(got: dict, ref: dict, steps: int) -> dict[str, float]:
    return {k: float(np.abs(got[k][steps - 1] - ref[k][steps - 1]).max()) for k in ("z", "m", "gamma")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="100,200,400")
    ap.add_argument("--lrs", default="1e-3,2e-2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    fmt = lambda d: f"{d['z']:8.1e} {d['m']:8.1e} {d['gamma']:8.1e}"
    print(f"{'lr':>6} {'steps':>5} {'entered':>7} | {'old dZ':>8} {'dM':>8} {'dGamma':>8} | "
          f"{'new dZ':>8} {'dM':>8} {'dGamma':>8}")  # fmt: skip
    for lr in (float(s) for s in args.lrs.split(",")):
        m0, grads = problem(lr, max(steps))
        ref = reference(m0, grads, lr)
        old = trajectory(old_official(lr), m0, grads)
        new = trajectory(spp("official", learning_rate=lr), m0, grads)
        for t in steps:
            o, w = max_diffs(old, ref, t), max_diffs(new, ref, t)
            entered = int((ref["gamma"][:t] > 0).any(0).sum())
            rows.append({"lr": lr, "steps": t, "entered": entered, "n": m0.size, "old": o, "new": w})
            print(f"{lr:>6g} {t:>5} {entered:>3}/{m0.size:<3} | {fmt(o)} | {fmt(w)}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
