"""Baseline scores and allocation rules: definitions, dead entries score zero, records select like paths."""

import jax
import numpy as np
import pytest

from spp_jax import baselines, selection
from spp_jax.errors import ConfigError
from spp_jax.search import classification_loss
from tests.helpers import mu_adapter, random_images, random_params


def _batches(adapter, n=2):
    return [
        {"image": random_images(adapter, 4, seed=s), "label": np.arange(4) % adapter.config.num_classes}
        for s in range(n)
    ]


def _spp_like_record(spec, rng):
    """A path-shaped record: most entries entered at some step, some never."""
    t_in = {
        g.name: np.where(rng.random(g.shape) < 0.8, rng.integers(1, 50, g.shape), np.inf) for g in spec.groups
    }
    return {
        "t_in": {k: v.astype(np.float32) for k, v in t_in.items()},
        "steps_in_support": {g.name: np.zeros(g.shape, np.int32) for g in spec.groups},
        "z": {g.name: rng.random(g.shape).astype(np.float32) for g in spec.groups},
    }


def test_score_record_selects_the_highest_scores():
    spec = mu_adapter().mask_spec()
    scores = baselines.importance_scores("random", spec, seed=3)
    keep = selection.select_subnetwork(spec, baselines.score_record(spec, scores), "groups:0.25")
    for g in spec.groups:
        s, k = scores[g.name].reshape(-1), keep[g.name].reshape(-1)
        assert k.sum() == round(0.25 * g.num_entries)
        assert s[k].min() > s[~k].max()  # exactly the top quarter by score


def test_random_scores_are_seeded():
    spec = mu_adapter().mask_spec()
    a, b = (baselines.importance_scores("random", spec, seed=s) for s in (0, 0))
    c = baselines.importance_scores("random", spec, seed=1)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["mlp"], c["mlp"])


@pytest.mark.parametrize("kind", ["path", "scores"])
def test_per_group_allocation_keeps_the_same_fraction_of_every_group(kind):
    spec = mu_adapter().mask_spec()
    rng = np.random.default_rng(0)
    if kind == "path":
        record = _spp_like_record(spec, rng)
    else:
        record = baselines.score_record(spec, baselines.importance_scores("random", spec, seed=0))
    alloc = baselines.allocate(spec, record, "per_group")
    pos = selection.rank_positions(spec, record["t_in"], record["steps_in_support"], record["z"])
    previous = None
    for frac in (0.3, 0.6, 0.9):
        keep = selection.select_subnetwork(spec, alloc, f"params:{frac}")
        fracs = {g.name: keep[g.name].mean() for g in spec.groups}
        assert max(fracs.values()) - min(fracs.values()) <= 2.0 / min(g.num_entries for g in spec.groups)
        for g in spec.groups:  # inside a group, the record's own order decides
            p, k = pos[g.name].reshape(-1), keep[g.name].reshape(-1)
            if k.any() and (~k).any():
                assert p[k].max() < p[~k].min()
        if previous is not None:  # nested family
            assert all((keep[g] | ~previous[g]).all() for g in keep)
        previous = keep
    assert baselines.allocate(spec, record, "global") is record


def _kill_vo_entry(adapter, params, layer, j):
    """Zero the value column j (kernel and bias) of one layer: its vo mask then multiplies zeros."""
    attn = params[f"encoderblock_{layer}"]["attn"]
    attn["value"]["kernel"] = attn["value"]["kernel"].at[:, :, j].set(0.0)
    attn["value"]["bias"] = attn["value"]["bias"].at[:, j].set(0.0)
    attn["out"]["kernel"] = attn["out"]["kernel"].at[:, j, :].set(0.0)
    return params


@pytest.mark.parametrize("name", ["magnitude", "taylor", "fisher"])
def test_an_entry_without_effect_scores_zero_and_ranks_last(name):
    adapter = mu_adapter()
    spec = adapter.mask_spec()
    params = _kill_vo_entry(adapter, random_params(adapter), layer=1, j=2)
    scores = baselines.importance_scores(
        name, spec, adapter=adapter, params=params, batches=_batches(adapter)
    )
    assert scores["vo"][1, 2] == 0.0
    assert (np.delete(scores["vo"].reshape(-1), 1 * spec.group("vo").size + 2) > 0).all()
    keep = selection.select_subnetwork(spec, baselines.score_record(spec, scores), "groups:vo=0.9")
    assert not keep["vo"][1, 2]


def test_taylor_and_fisher_aggregate_per_batch_mask_gradients():
    adapter = mu_adapter()
    spec, params, batches = adapter.mask_spec(), random_params(adapter), _batches(adapter, 3)

    def grad(batch):  # dL/dM at M = 1, written out independently of baselines.mask_gradients
        def loss(m):
            logits = adapter.module().apply({"params": params}, batch["image"], masks=m)
            return classification_loss(logits, batch["label"])[0]

        return jax.grad(loss)(spec.init_masks())

    g = [grad(b) for b in batches]
    kw = dict(adapter=adapter, params=params, batches=batches)
    taylor, fisher = (baselines.importance_scores(n, spec, **kw) for n in ("taylor", "fisher"))
    for name in spec.names:
        np.testing.assert_allclose(taylor[name], np.abs(sum(x[name] for x in g)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(fisher[name], sum(np.square(x[name]) for x in g), rtol=1e-5, atol=1e-10)


def test_magnitude_is_the_product_of_the_slice_norms():
    adapter = mu_adapter(groups=("qk", "vo", "mlp", "heads"))
    params = random_params(adapter)
    m = adapter.entry_weight_norms(params)
    blk = params["encoderblock_1"]
    fc1, fc2 = np.asarray(blk["mlp"]["fc1"]["kernel"]), np.asarray(blk["mlp"]["fc2"]["kernel"])
    np.testing.assert_allclose(m["mlp"][1, 5], np.linalg.norm(fc1[:, 5]) * np.linalg.norm(fc2[5]), rtol=1e-5)
    q, k = np.asarray(blk["attn"]["query"]["kernel"]), np.asarray(blk["attn"]["key"]["kernel"])
    np.testing.assert_allclose(
        m["qk"][1, 3], np.linalg.norm(q[:, :, 3]) * np.linalg.norm(k[:, :, 3]), rtol=1e-5
    )
    v, o = np.asarray(blk["attn"]["value"]["kernel"]), np.asarray(blk["attn"]["out"]["kernel"])
    np.testing.assert_allclose(m["heads"][1, 1], np.linalg.norm(v[:, 1]) * np.linalg.norm(o[1]), rtol=1e-5)
    assert {k: a.shape for k, a in m.items()} == {g.name: g.shape for g in adapter.mask_spec().groups}


def test_bad_names_and_missing_inputs_are_one_line_errors():
    spec = mu_adapter().mask_spec()
    with pytest.raises(ConfigError, match="ranking 'snip' is unknown"):
        baselines.importance_scores("snip", spec)
    with pytest.raises(ConfigError, match="fisher score needs"):
        baselines.importance_scores("fisher", spec)
    with pytest.raises(ConfigError, match="allocation 'uniform' is unknown"):
        baselines.allocate(spec, {}, "uniform")
    bad = {g.name: np.full(g.shape, np.nan, np.float32) for g in spec.groups}
    with pytest.raises(ConfigError, match="NaN"):
        baselines.score_record(spec, bad)
