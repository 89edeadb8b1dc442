"""The nested fine-tune: one set of shared weights trained so that every member of a weight family is good
at once (the sandwich rule of BigNAS and once-for-all, on the nested members of a solution path).

Each step trains `members_per_step` members of the family's grid (sorted largest first): always the
largest and the smallest, plus members drawn uniformly without replacement from the sizes between them
(seeded by the step, so a resumed run draws the same ones). Member m's loss is the fine-tune's
(algorithm.md §6):

    L_m = (1 - a) L_task(y, s_m) + a T^2 KL(softmax(t / T) || softmax(s_m / T))

with one teacher pass per step shared by every member; the gradients of all members, each taken through
its cut of the family's arrays (spp_jax.family.MemberSlicer: a member only costs its own FLOPs), are summed
into one AdamW update of the family's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.task import Task

Params = Any


class NestedState(NamedTuple):
    """The family's weights and their optimizer state (a pytree orbax stores as it is)."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState


def init_state(params: Params, tx: optax.GradientTransformation) -> NestedState:
    params = jax.tree.map(jnp.asarray, params)
    return NestedState(jnp.zeros((), jnp.int32), params, tx.init(params))


def draw_members(step: int, seed: int, grid_size: int, per_step: int) -> tuple[int, ...]:
    """Grid indices (0 = largest) trained at `step`: the largest, the smallest and `per_step - 2` of the
    others, drawn without replacement by a generator seeded with (seed, step)."""
    if per_step >= grid_size:
        return tuple(range(grid_size))
    middle = np.random.default_rng([seed, step]).choice(
        np.arange(1, grid_size - 1), size=per_step - 2, replace=False
    )
    return (0, *sorted(int(m) for m in middle), grid_size - 1)


def make_member_grad(
    slicer: Callable[[Params], Params],
    apply_fn: Callable,
    task: Task,
    distill_alpha: float | None,
    distill_temp: float,
) -> Callable:
    """`grad(family_params, batch, teacher_out, rng) -> (grads, loss, metric)` of one member's loss
    (module docstring; `distill_alpha=None`: the task loss alone, teacher_out ignored)."""

    def grad(params: Params, batch: dict[str, jax.Array], teacher_out: Any, rng: jax.Array):
        inputs = task.inputs(batch)

        def loss_fn(p):
            out = apply_fn({"params": slicer(p)}, *inputs, train=True, rngs={"dropout": rng})
            loss, aux = task.loss(out, batch)
            if distill_alpha is not None:
                kl = task.distill_loss(out, teacher_out, batch, distill_temp)
                loss = (1 - distill_alpha) * loss + distill_alpha * kl
            return loss, aux

        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return g, loss, aux

    return grad


def make_update(tx: optax.GradientTransformation) -> Callable:
    """`update(state, grads_list) -> (state, nonfinite)`: one AdamW step on the summed gradients of the
    step's members; a step with a non-finite gradient is not applied."""

    def update(state: NestedState, grads: Sequence[Params]):
        total = jax.tree.map(lambda *g: sum(g[1:], g[0]), *grads)
        updates, opt_state = tx.update(total, state.opt_state, state.params)
        new = NestedState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        finite = jnp.isfinite(optax.tree.norm(total))
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, (~finite).astype(jnp.int32)

    return update


def step_flops(batch_size: int, teacher_macs: float | None, member_macs: Sequence[float]) -> float:
    """Training FLOPs of one step: a teacher forward pass (2 FLOPs per MAC) when distilling, and a forward
    plus backward pass (3 forward passes' worth) of every member, per example."""
    teacher = 2.0 * teacher_macs if teacher_macs else 0.0
    return batch_size * (teacher + sum(6.0 * m for m in member_macs))
