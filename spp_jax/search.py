"""The SPP search step: differentiate the task loss w.r.t. the masks only and apply the SPP transform.

Frozen weights (the reference behaviour, algorithm.md §3.2) are an argument of the step, not part of its
state, so no weight gradient is ever formed. Jointly training the weights is an option (`weights_tx`):
then the state also carries the weights and their optimizer state.

With `curvature=True` (the curvature form of spp_jax.spp) the step differentiates each example's loss on
its own (vmap over the batch) and passes the transform the per-entry mean of the squared per-example mask
gradients as `curvature`; the loss, accuracy and mean gradient are those of the batch as before. A loss
that is not a sum over examples (a contrastive loss, whose examples share the batch's captions) can split
the batch into `curvature_chunks` equal micro-batches instead: the curvature is then the mean squared
micro-batch gradient (the form's nu is in units of its step-1 mean, so the scale change cancels).

The step never commits a non-finite update: if the loss or a gradient is NaN/Inf the old state is kept and
`metrics["nonfinite"]` is 1, so the host can stop before writing a bad path point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from spp_jax import spp as spp_lib
from spp_jax.errors import ConfigError
from spp_jax.groups import Masks, MaskSpec
from spp_jax.task import Task, default_task, model_loss

Params = Any
ApplyFn = Callable[..., jax.Array]  # apply_fn({"params": p}, *task.inputs(batch), masks=..., train=...)


@flax.struct.dataclass
class SearchState:
    """Everything a search step changes. `params`/`params_opt_state` are None unless weights train."""

    step: jax.Array
    masks: Masks
    opt_state: spp_lib.SPPState
    params: Params = None
    params_opt_state: optax.OptState = None


def init_search_state(
    spec: MaskSpec, mask_tx: optax.GradientTransformation, params: Params = None, weights_tx=None
) -> SearchState:
    """M_0 = 1 (the masked model is the pretrained one), Z_0 = Gamma_0 = 0 (algorithm.md §3.1)."""
    masks = spec.init_masks()
    return SearchState(
        step=jnp.zeros((), jnp.int32),
        masks=masks,
        opt_state=mask_tx.init(masks),
        params=params if weights_tx is not None else None,
        params_opt_state=weights_tx.init(params) if weights_tx is not None else None,
    )


def per_example_mask_gradients(
    apply_fn: ApplyFn,
    task: Task | None,
    params: Params,
    masks: Masks,
    batch: Mapping[str, jax.Array],
    chunks: int | None = None,
) -> tuple[tuple[jax.Array, jax.Array], Masks]:
    """((loss_e, aux_e), dL_e/dM) for every example e of the batch (vmap over the leading axis of every
    batch array; `task` None = image classification), or for each of `chunks` equal micro-batches."""
    task = default_task(task)
    if chunks:
        size = jax.tree.leaves(batch)[0].shape[0]
        if size % chunks:
            raise ConfigError(
                f"search.curvature_chunks={chunks} does not divide the batch of {size}; use a divisor"
            )
        groups = jax.tree.map(lambda x: x.reshape(chunks, size // chunks, *x.shape[1:]), dict(batch))
    else:
        groups = jax.tree.map(lambda x: x[:, None], dict(batch))

    def one(group):
        return jax.value_and_grad(
            lambda m: model_loss(apply_fn, task, params, group, masks=m, train=False), has_aux=True
        )(masks)

    return jax.vmap(one)(groups)


def path_metrics(spec: MaskSpec, opt_state: spp_lib.SPPState) -> dict[str, jax.Array]:
    """Support fraction per group and the params/MACs fraction the support of Gamma keeps (on device)."""
    supp = spp_lib.support(opt_state)
    out = {f"support/{g.name}": supp[g.name].mean() for g in spec.groups}
    params, macs = spec.kept_cost(supp)
    out["kept_params_frac"] = params / spec.total_params
    out["kept_macs_frac"] = macs / spec.total_macs
    out["support/all"] = sum(supp[g.name].sum() for g in spec.groups) / sum(
        g.num_entries for g in spec.groups
    )
    return out


def make_search_step(
    apply_fn: ApplyFn,
    spec: MaskSpec,
    mask_tx: optax.GradientTransformation,
    weights_tx: optax.GradientTransformation | None = None,
    task: Task | None = None,
    curvature: bool = False,
    curvature_chunks: int | None = None,
) -> Callable[[SearchState, Params, dict[str, jax.Array]], tuple[SearchState, dict[str, jax.Array]]]:
    """Build `step(state, frozen_params, batch) -> (state, metrics)`; jit it with the shardings you want.

    One step is M_{k+1} = M_k + SPP-update(grad_M L(M_k)) and the Z/Gamma recursion of the SPP
    transform (algorithm.md §3). With `weights_tx`, weights move by their own optimizer on grad_W L.
    `curvature=True` also passes the transform `curvature` (module docstring; not with `weights_tx`), from
    per-example gradients or those of `curvature_chunks` micro-batches.
    The loss is `task`'s (spp_jax.tasks; None = image classification) on the batch's `task.inputs`.
    """
    task = default_task(task)
    if curvature and weights_tx is not None:
        raise ConfigError(
            "the curvature form's per-example curvature is not implemented with trained weights"
        )

    def step(state: SearchState, frozen_params: Params, batch: dict[str, jax.Array]):
        train_weights = weights_tx is not None
        params = state.params if train_weights else frozen_params

        def loss_of(masks, params):
            return model_loss(apply_fn, task, params, batch, masks=masks, train=False)

        extra = {}
        if curvature:
            (losses, accs), per_ex = per_example_mask_gradients(
                apply_fn, task, params, state.masks, batch, curvature_chunks
            )
            loss, acc = losses.mean(), accs.mean()
            grads = jax.tree.map(lambda g: g.mean(0), per_ex)
            extra["curvature"] = jax.tree.map(lambda g: jnp.square(g).mean(0), per_ex)
        else:
            argnums = (0, 1) if train_weights else 0
            (loss, acc), grads = jax.value_and_grad(loss_of, argnums=argnums, has_aux=True)(
                state.masks, params
            )
        mask_grads = grads[0] if train_weights else grads
        updates, opt_state = mask_tx.update(mask_grads, state.opt_state, state.masks, **extra)
        new = state.replace(
            step=state.step + 1, masks=optax.apply_updates(state.masks, updates), opt_state=opt_state
        )
        if train_weights:
            w_updates, w_state = weights_tx.update(grads[1], state.params_opt_state, state.params)
            new = new.replace(params=optax.apply_updates(state.params, w_updates), params_opt_state=w_state)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.asarray([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)])
        )
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "accuracy": acc, "nonfinite": (~finite).astype(jnp.int32)}
        metrics.update(path_metrics(spec, new.opt_state))
        return new, metrics

    return step
