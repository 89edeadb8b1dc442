"""Baseline scores and allocation rules: definitions, dead entries score zero, records select like paths."""

import ast
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.vit import get_config
from spp_jax import baselines, lasso, selection
from spp_jax.architectures.vit import ViTArchitecture
from spp_jax.errors import ConfigError
from spp_jax.run_config import validate_config
from spp_jax.stages.context import RunContext
from spp_jax.stages.extract import ranking_record
from spp_jax.tasks.image_classification import ImageClassification, classification_loss
from tests.helpers import mu_adapter, random_images, random_params

pytestmark = pytest.mark.slow  # every criterion on compiled models: the full suite


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


@pytest.mark.parametrize("name", ["magnitude", "taylor", "fisher", "wanda"])
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


def test_taylor_and_fisher_aggregate_per_example_mask_gradients():
    adapter = mu_adapter()
    spec, params, batches = adapter.mask_spec(), random_params(adapter), _batches(adapter, 3)

    def grad(image, label):  # dL/dM of one example at M = 1, written out with a python loop
        def loss(m):
            logits = adapter.module().apply({"params": params}, image[None], masks=m)
            return classification_loss(logits, label[None])[0]

        return jax.grad(loss)(spec.init_masks())

    g = [grad(b["image"][i], b["label"][i]) for b in batches for i in range(len(b["label"]))]
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


# -- wanda ----------------------------------------------------------------------------------------------


def _hand_activations(adapter, params, images):
    """Per layer, the activations each mask multiplies, recomputed from the params and the LayerNorm outputs
    (flax's captured intermediates), independently of the module's mask-point records."""
    c = adapter.config
    _, state = adapter.module().apply({"params": params}, images, capture_intermediates=True)
    acts = []
    for i in range(c.depth):
        inter, blk = state["intermediates"][f"encoderblock_{i}"], params[f"encoderblock_{i}"]
        x1, x2 = inter["ln1"]["__call__"][0], inter["ln2"]["__call__"][0]  # attention / MLP inputs
        dense = lambda x, p: jnp.einsum("bnd,dhk->bnhk", x, p["kernel"]) + p["bias"]
        attn = blk["attn"]
        q, k, v = (dense(x1, attn[n]) for n in ("query", "key", "value"))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.head_dim), axis=-1)
        h = x2 @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
        acts.append(
            {
                "qk": (q, k),
                "vo": (v,),
                "heads": (jnp.einsum("bhqk,bkhd->bqhd", w, v).transpose(0, 1, 3, 2),),  # head axis last
                "mlp": (h if c.mlp_mask_pre_act else jax.nn.gelu(h, approximate=c.gelu_approximate),),
            }
        )
    return acts


@pytest.mark.parametrize("pre_act", [True, False])
def test_wanda_is_activation_norm_times_consuming_weight_norm(pre_act):
    adapter = mu_adapter(groups=("qk", "vo", "mlp", "heads"), mlp_mask_pre_act=pre_act)
    params, batches = random_params(adapter), _batches(adapter, 2)
    scores = baselines.importance_scores("wanda", adapter.mask_spec(), adapter=adapter, params=params,
                                         batches=batches)  # fmt: skip
    per_batch = [_hand_activations(adapter, params, b["image"]) for b in batches]
    sq = lambda x: np.square(np.asarray(x, np.float64)).reshape(-1, x.shape[-1]).sum(0)
    for i in range(adapter.config.depth):
        blk = params[f"encoderblock_{i}"]
        o, fc2 = np.asarray(blk["attn"]["out"]["kernel"]), np.asarray(blk["mlp"]["fc2"]["kernel"])
        weight = {
            "qk": 1.0,
            "vo": np.linalg.norm(o.transpose(1, 0, 2).reshape(o.shape[1], -1), axis=1),
            "heads": np.linalg.norm(o.reshape(o.shape[0], -1), axis=1),
            "mlp": np.linalg.norm(fc2, axis=1),
        }
        for g, w in weight.items():
            n_act = len(per_batch[0][i][g])
            norms = [np.sqrt(sum(sq(acts[i][g][a]) for acts in per_batch)) for a in range(n_act)]
            np.testing.assert_allclose(scores[g][i], np.prod(norms, axis=0) * w, rtol=2e-4, err_msg=g)


def test_wanda_scores_zero_where_the_consuming_weight_slice_is_zero():
    adapter = mu_adapter()
    params = random_params(adapter)
    fc2 = params["encoderblock_0"]["mlp"]["fc2"]
    fc2["kernel"] = fc2["kernel"].at[5].set(0.0)
    out = params["encoderblock_1"]["attn"]["out"]
    out["kernel"] = out["kernel"].at[:, 3, :].set(0.0)
    scores = baselines.importance_scores(
        "wanda", adapter.mask_spec(), adapter=adapter, params=params, batches=_batches(adapter, 1)
    )
    assert scores["mlp"][0, 5] == 0.0 and scores["vo"][1, 3] == 0.0
    assert (np.delete(scores["mlp"].reshape(-1), 5) > 0).all()
    assert (np.delete(scores["vo"].reshape(-1), adapter.config.head_dim + 3) > 0).all()


def test_mask_point_records_leave_ordinary_applies_unchanged():
    adapter = mu_adapter(groups=("qk", "vo", "mlp", "heads"))
    spec, params, x = adapter.mask_spec(), random_params(adapter), random_images(adapter, 2)
    module, ones = adapter.module(), spec.init_masks()
    dense = module.apply({"params": params}, x)
    masked = module.apply({"params": params}, x, masks=ones)
    recorded, state = module.apply({"params": params}, x, masks=ones, mutable=[baselines.MASK_INPUTS])
    np.testing.assert_array_equal(dense, masked)
    np.testing.assert_array_equal(dense, recorded)
    assert set(state) == {baselines.MASK_INPUTS}
    assert set(module.init(jax.random.key(0), x, masks=ones)) == {"params"}  # init records nothing


# -- lasso ----------------------------------------------------------------------------------------------


def _lasso(adapter, penalties, steps, lr, n_batches=10, calib_batches=8):
    batches = _batches(adapter, n_batches)
    return lasso.lasso_runs(
        adapter.module().apply, adapter.mask_spec(), random_params(adapter), lambda: iter(batches),
        penalties, steps=steps, lr=lr, calib_batches=calib_batches,
    )  # fmt: skip


def test_lasso_step_is_a_gradient_step_then_the_nonnegative_soft_threshold():
    adapter = mu_adapter()
    spec, params, batch = adapter.mask_spec(), random_params(adapter), _batches(adapter, 1)[0]

    def loss(m):  # written out independently of spp_jax.lasso
        logits = adapter.module().apply({"params": params}, batch["image"], masks=m)
        return classification_loss(logits, batch["label"])[0]

    g = jax.grad(loss)(spec.init_masks())
    gbar = sum(np.abs(np.asarray(v)).sum() for v in g.values()) / sum(x.num_entries for x in spec.groups)
    (final,), nonzero, got_gbar = _lasso(adapter, (1.5,), steps=1, lr=0.3, n_batches=1, calib_batches=1)
    np.testing.assert_allclose(got_gbar, gbar, rtol=1e-5)
    for name in spec.names:
        want = np.maximum(1.0 - 0.3 / gbar * np.asarray(g[name]) - 0.3 * 1.5, 0.0)
        np.testing.assert_allclose(final[name], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(nonzero[name], want != 0)
    assert 0 < sum((final[n] == 0).sum() for n in spec.names) < sum(x.num_entries for x in spec.groups)


def test_lasso_without_penalty_prunes_nothing_and_a_huge_one_everything():
    adapter = mu_adapter()
    spec = adapter.mask_spec()
    (free, huge), nonzero, _ = _lasso(adapter, (0.0, 1e6), steps=5, lr=0.02)
    record = lasso.lasso_record(spec, [free, huge], nonzero)
    for name in spec.names:
        assert (free[name] > 0).all() and (huge[name] == 0).all()
        np.testing.assert_array_equal(record["t_in"][name], 1.0)  # zeroed at exactly one penalty
        np.testing.assert_array_equal(record["steps_in_support"][name], 5)  # 5 steps of run 1, 0 of run 2


def test_larger_lasso_penalties_keep_smaller_nearly_nested_sets_and_the_record_ranks_by_survival():
    adapter = mu_adapter()
    spec = adapter.mask_spec()
    finals, nonzero, _ = _lasso(adapter, (0.5, 1.0, 2.0, 4.0), steps=10, lr=0.1, calib_batches=2)
    alive = [np.concatenate([f[n].reshape(-1) != 0 for n in spec.names]) for f in finals]
    counts = [int(a.sum()) for a in alive]
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0, counts
    for small, large in itertools.pairwise(alive):
        # a lasso path need not be nested, but nearly all survivors of a larger penalty survive a smaller one
        assert (large & ~small).sum() <= 0.25 * large.sum()
    record = lasso.lasso_record(spec, finals, nonzero)
    order = selection.rank_entries(spec, record["t_in"], record["steps_in_support"], record["z"])
    assert (np.diff(sum(alive)[order]) <= 0).all()  # more penalties survived = ranked earlier
    level = {n: record["t_in"][n] <= 2 for n in spec.names}  # survived at least 2 of the 4 penalties
    target = "groups:" + ",".join(f"{n}={float(level[n].mean())!r}" for n in spec.names)
    keep = selection.select_subnetwork(spec, record, target)
    for n in spec.names:
        np.testing.assert_array_equal(keep[n], level[n])


def test_lasso_record_orders_by_penalties_survived_then_steps_then_mean_mask():
    spec = mu_adapter().mask_spec()
    shape = spec.group("mlp").shape
    finals = [{g.name: np.full(g.shape, 0.5, np.float32) for g in spec.groups} for _ in range(3)]
    finals[2]["mlp"][0, 0] = 0.0  # a: survives 2 of 3 penalties
    finals[1]["mlp"][0, 1] = finals[2]["mlp"][0, 1] = 0.0  # b: survives 1
    finals[0]["mlp"][0, 2] = 0.9  # c: survives all, largest mean mask
    nonzero = {g.name: np.full(g.shape, 30, np.int32) for g in spec.groups}
    nonzero["mlp"][0, 3] = 31  # d: survives all, nonzero one step longer than the rest
    record = lasso.lasso_record(spec, finals, nonzero)
    pos = selection.rank_positions(spec, record["t_in"], record["steps_in_support"], record["z"])["mlp"]
    assert pos[0, 3] < pos[0, 2] < pos[0, 4] < pos[0, 0] < pos[0, 1]
    np.testing.assert_allclose(record["z"]["mlp"][0, 2], (0.9 + 0.5 + 0.5) / 3, rtol=1e-6)
    assert record["t_in"]["mlp"].shape == shape


# -- wiring ---------------------------------------------------------------------------------------------


def test_launch_extract_offers_every_ranking():
    tree = ast.parse((Path(__file__).resolve().parents[1] / "launch" / "extract.py").read_text())
    values = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "RANKINGS"]
    assert len(values) == 1 and tuple(ast.literal_eval(values[0])) == baselines.RANKINGS


@pytest.mark.parametrize("name", ["wanda", "lasso"])
def test_run_ranking_record_builds_the_new_baselines_from_search_data(name):
    cfg = get_config("mu")
    cfg.extract.lasso_steps, cfg.search.batch_size, cfg.extract.score_batches = 3, 8, 2
    rng = np.random.default_rng(0)
    train = [{"image": rng.integers(0, 255, (28, 28, 1), np.uint8), "label": i % 10} for i in range(32)]
    task, arch = ImageClassification(cfg), ViTArchitecture()
    adapter = arch.build_adapter(cfg, task, num_classes=10)
    ctx = RunContext(cfg, task, arch, adapter, train_src=[], eval_src=[], search_src=train)
    spec = adapter.mask_spec()
    record = ranking_record(ctx, random_params(adapter), name, seed=0)
    keep = selection.select_subnetwork(spec, record, "params:0.5")
    assert {k: v.shape for k, v in keep.items()} == {g.name: g.shape for g in spec.groups}
    if name == "lasso":
        assert max(v.max() for v in record["t_in"].values()) <= len(cfg.extract.lasso_penalties)


@pytest.mark.parametrize(
    "key, value",
    [
        ("lasso_penalties", ()),
        ("lasso_penalties", (1.0, -0.5)),
        ("lasso_penalties", ("a",)),
        ("lasso_penalties", (1.0, float("nan"))),
        ("lasso_steps", 0),
        ("lasso_steps", -3),
        ("lasso_lr", 0.0),
        ("lasso_lr", float("inf")),
    ],
)
def test_bad_lasso_config_values_are_one_line_errors(key, value):
    cfg = get_config("mu")
    with cfg.unlocked():
        cfg.extract[key] = value
    with pytest.raises(ConfigError, match=f"extract.{key}=.* is not allowed") as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)
