"""Selection: exact top-k, nested family, deterministic ties (algorithm.md §4, §7 item 7)."""

import itertools
import json
import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.errors import CheckpointMismatch, ConfigError, UnreachableTarget
from spp_jax.groups import MaskGroup, MaskSpec
from spp_jax.selection import (
    FlopsFraction,
    GroupFraction,
    ParamsFraction,
    PathStep,
    keep_summary,
    parse_target,
    rank_entries,
    rank_positions,
    select_subnetwork,
    support_from_t_in,
    target_from_json,
    target_to_json,
)

SPEC = MaskSpec(
    groups=(
        MaskGroup("qk", 3, 8, params_per_entry=10.0, macs_per_entry=20.0),
        MaskGroup("vo", 3, 8, params_per_entry=12.0, macs_per_entry=20.0),
        MaskGroup("mlp", 3, 32, params_per_entry=5.0, macs_per_entry=4.0),
    ),
    base_params=100.0,
    base_macs=500.0,
)
FRACTIONS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0]


def make_record(seed=0, never=0.6, step=None):
    """Record with many ties and a `never` share of entries that never entered (t_in = inf)."""
    rng = np.random.default_rng(seed)
    rec = {"t_in": {}, "steps_in_support": {}, "z": {}, "gamma": {}}
    for g in SPEC.groups:
        entered = rng.random(g.shape) >= never
        t = np.where(entered, rng.choice([0.0, 10.0, 20.0, 30.0], g.shape), np.inf)
        rec["t_in"][g.name] = t.astype(np.float32)
        rec["steps_in_support"][g.name] = np.where(entered, rng.integers(0, 3, g.shape), 0)
        rec["z"][g.name] = rng.choice([0.0, 0.5, 1.0], g.shape).astype(np.float32)
        gamma = np.where(t <= (np.inf if step is None else step), rng.random(g.shape) + 0.1, 0)
        rec["gamma"][g.name] = gamma.astype(np.float32)
    return rec


def flat(tree):
    return np.concatenate([np.asarray(tree[g.name]).reshape(-1) for g in SPEC.groups])


def rank(rec):
    return rank_entries(SPEC, rec["t_in"], rec["steps_in_support"], rec["z"])


def subset(a, b):
    return all(not np.any(a[k] & ~b[k]) for k in a)


def per_entry(attr):
    return np.concatenate([np.full(g.num_entries, getattr(g, attr)) for g in SPEC.groups])


# --- ranking --------------------------------------------------------------------------------------


def test_rank_matches_reference_sort_and_is_deterministic():
    rec = make_record(1)
    t, s, z = (flat(rec[k]) for k in ("t_in", "steps_in_support", "z"))
    expected = sorted(range(t.size), key=lambda i: (t[i], -s[i], -z[i], i))
    order = rank(rec)
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(order, rank(rec))
    jax_rec = {k: {n: jnp.asarray(v) for n, v in d.items()} for k, d in rec.items()}
    np.testing.assert_array_equal(order, rank(jax_rec))
    pos = rank_positions(SPEC, rec["t_in"], rec["steps_in_support"], rec["z"])
    np.testing.assert_array_equal(flat(pos)[order], np.arange(t.size))


def test_ties_broken_by_steps_then_z_then_index():
    n = SPEC.groups[0].size
    rec = make_record(0)
    for key in rec:
        for g in SPEC.groups:
            rec[key][g.name] = np.zeros(g.shape, rec[key][g.name].dtype)
    for g in SPEC.groups:
        rec["t_in"][g.name][:] = np.inf
    # Layer 0 of qk: all t_in = 5; entries 0..3 differ in steps, 4..5 only in z, 6..7 fully tied.
    rec["t_in"]["qk"][0] = 5.0
    rec["steps_in_support"]["qk"][0] = [1, 3, 2, 0, 0, 0, 0, 0]
    rec["z"]["qk"][0] = [9.0, 0.0, 0.0, 0.0, 0.5, 2.0, 0.0, 0.0]
    top = list(rank(rec)[:n])
    assert top == [1, 2, 0, 5, 4, 3, 6, 7]

    # Permuting the data permutes the entries, not the order of distinct keys.
    rng = np.random.default_rng(3)
    base = make_record(4)
    for g in SPEC.groups:  # make every (t_in, steps, z) key distinct
        base["z"][g.name] = rng.permutation(g.num_entries).reshape(g.shape).astype(np.float32)
    keys = np.stack([flat(base[k]).astype(np.float64) for k in ("t_in", "steps_in_support", "z")])
    perm = rng.permutation(keys.shape[1])
    permuted = {}
    for k in ("t_in", "steps_in_support", "z"):
        v, off = flat(base[k])[perm], 0
        permuted[k] = {}
        for g in SPEC.groups:
            permuted[k][g.name] = v[off : off + g.num_entries].reshape(g.shape)
            off += g.num_entries
    np.testing.assert_array_equal(keys[:, rank(base)], keys[:, perm][:, rank(permuted)])


# --- exact counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,never", [(0, 0.6), (1, 0.8), (2, 0.0)])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_group_fraction_exact_count_and_top_k(seed, never, fraction):
    rec = make_record(seed, never)
    keep = select_subnetwork(SPEC, rec, GroupFraction(fraction))
    pos = rank_positions(SPEC, rec["t_in"], rec["steps_in_support"], rec["z"])
    for g in SPEC.groups:
        assert keep[g.name].dtype == bool and keep[g.name].shape == g.shape
        assert keep[g.name].sum() == math.floor(fraction * g.num_entries + 0.5)
        kept, dropped = pos[g.name][keep[g.name]], pos[g.name][~keep[g.name]]
        if kept.size and dropped.size:
            assert kept.max() < dropped.min()


def test_group_fraction_dict_and_unknown_group():
    rec = make_record(0)
    keep = select_subnetwork(SPEC, rec, parse_target("groups:qk=0.5,mlp=0.25"))
    assert keep["qk"].sum() == 12 and keep["mlp"].sum() == 24 and keep["vo"].all()
    with pytest.raises(ConfigError, match="attn"):
        select_subnetwork(SPEC, rec, GroupFraction({"attn": 0.5}))


def test_exact_top_k_differs_from_threshold_selection():
    """>50% never entered: the reference `score >= kth score` keeps every tie and prunes nothing."""
    rec = make_record(5, never=0.8)
    assert (flat(rec["t_in"]) == np.inf).mean() > 0.5
    keep = select_subnetwork(SPEC, rec, GroupFraction(0.5))
    for g in SPEC.groups:
        s = np.asarray(rec["steps_in_support"][g.name]).reshape(-1)
        k = g.num_entries // 2
        threshold_count = int((s >= np.sort(s)[::-1][k - 1]).sum())
        assert keep[g.name].sum() == k
        assert threshold_count == g.num_entries != k  # prunes nothing


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_params_fraction_is_maximal_prefix(fraction):
    rec = make_record(0)
    order = rank(rec)
    keep = select_subnetwork(SPEC, rec, ParamsFraction(fraction))
    kept = flat(keep)
    n_kept = int(kept.sum())
    assert kept[order[:n_kept]].all()  # a prefix of the ranking
    cost = per_entry("params_per_entry")
    budget = fraction * SPEC.block_params
    used = keep_summary(SPEC, keep)["params"] - SPEC.base_params
    assert used <= budget + 1e-9
    if n_kept < order.size:
        assert used + cost[order[n_kept]] > budget


@pytest.mark.parametrize("fraction", [0.65, 0.7, 0.8, 0.95, 1.0])
def test_flops_fraction_is_maximal_prefix(fraction):
    rec = make_record(2)
    order = rank(rec)
    keep = select_subnetwork(SPEC, rec, FlopsFraction(fraction))
    kept = flat(keep)
    n_kept = int(kept.sum())
    assert kept[order[:n_kept]].all()
    budget = fraction * SPEC.total_macs
    macs = keep_summary(SPEC, keep)["macs"]
    assert macs <= budget + 1e-9
    if n_kept < order.size:
        assert macs + per_entry("macs_per_entry")[order[n_kept]] > budget


# --- nesting, round_to, min_per_layer -------------------------------------------------------------


@pytest.mark.parametrize("round_to", [1, 4, 3])
@pytest.mark.parametrize("kind", ["groups", "params", "flops", "step"])
def test_nested_family(kind, round_to):
    rec = make_record(3)
    if kind == "step":
        targets = [PathStep(s) for s in (0, 5, 10, 20, 30, 1000)]
    else:
        lo = SPEC.base_macs / SPEC.total_macs if kind == "flops" else 0.0
        targets = [parse_target(f"{kind}:{lo + (1 - lo) * f}") for f in FRACTIONS]
    keeps = []
    for t in targets:
        r = dict(rec)
        if kind == "step":  # the record of that path point: gamma != 0 exactly when t_in <= step
            r["gamma"] = {k: (v <= t.step).astype(np.float32) for k, v in rec["t_in"].items()}
        keeps.append(select_subnetwork(SPEC, r, t, round_to=round_to))
    for sparse, dense in itertools.pairwise(keeps):
        assert subset(sparse, dense)
    sizes = [sum(int(v.sum()) for v in k.values()) for k in keeps]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


@pytest.mark.parametrize("round_to", [3, 4, 8])
@pytest.mark.parametrize("target", ["groups:0.3", "params:0.4", "flops:0.8", "step:10"])
def test_round_to_counts(target, round_to):
    rec = make_record(6)
    rec["gamma"] = {k: (v <= 10).astype(np.float32) for k, v in rec["t_in"].items()}
    base = select_subnetwork(SPEC, rec, target)
    keep = select_subnetwork(SPEC, rec, target, round_to=round_to)
    assert subset(base, keep)
    pos = rank_positions(SPEC, rec["t_in"], rec["steps_in_support"], rec["z"])
    for g in SPEC.groups:
        for layer in range(g.depth):
            c, c0 = int(keep[g.name][layer].sum()), int(base[g.name][layer].sum())
            assert c % round_to == 0 or c == g.size
            assert c - c0 < round_to  # rounds UP by fewer than round_to entries per layer
            added = pos[g.name][layer][keep[g.name][layer] & ~base[g.name][layer]]
            rest = pos[g.name][layer][~keep[g.name][layer]]
            if added.size and rest.size:  # the added entries are the layer's next-ranked ones
                assert added.max() < rest.min()


def test_min_per_layer():
    rec = make_record(0, never=0.9)
    keep = select_subnetwork(SPEC, rec, "groups:0.0", min_per_layer={"mlp": 5}, round_to=4)
    assert (keep["qk"].sum(1) == 0).all() and (keep["mlp"].sum(1) == 8).all()
    keep = select_subnetwork(SPEC, rec, "params:0.0", min_per_layer=2)
    assert all((v.sum(1) == 2).all() for v in keep.values())
    with pytest.raises(ConfigError, match="min_per_layer"):
        select_subnetwork(SPEC, rec, "params:0.5", min_per_layer={"nope": 1})
    with pytest.raises(ConfigError, match="9"):
        select_subnetwork(SPEC, rec, "params:0.5", min_per_layer=9)
    with pytest.raises(ConfigError, match="round_to"):
        select_subnetwork(SPEC, rec, "params:0.5", round_to=0)


# --- path step ------------------------------------------------------------------------------------


def test_path_step_uses_gamma_and_t_in_reconstruction():
    rec = make_record(7, step=20)
    keep = select_subnetwork(SPEC, rec, PathStep(20))
    for g in SPEC.groups:
        np.testing.assert_array_equal(keep[g.name], rec["gamma"][g.name] != 0)
    rebuilt = support_from_t_in(rec["t_in"], 20)
    for g in SPEC.groups:
        np.testing.assert_array_equal(rebuilt[g.name], keep[g.name])
    no_gamma = types.SimpleNamespace(t_in=rec["t_in"], steps_in_support=None, z=None, gamma=None)
    fallback = select_subnetwork(SPEC, no_gamma, PathStep(20))
    assert all(np.array_equal(fallback[k], keep[k]) for k in keep)


def test_record_as_object_and_mismatch():
    rec = make_record(0)
    obj = types.SimpleNamespace(**rec)
    a = select_subnetwork(SPEC, obj, "params:0.3")
    b = select_subnetwork(SPEC, rec, "params:0.3")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    bad = dict(rec, t_in={**rec["t_in"], "qk": np.zeros((2, 8), np.float32)})
    with pytest.raises(CheckpointMismatch, match="qk"):
        select_subnetwork(SPEC, bad, "params:0.3")


# --- errors, parsing, summary ---------------------------------------------------------------------


def test_unreachable_flops_target():
    min_fraction = SPEC.base_macs / SPEC.total_macs
    with pytest.raises(UnreachableTarget, match="smallest reachable fraction") as e:
        select_subnetwork(SPEC, make_record(0), FlopsFraction(min_fraction / 2))
    assert f"{min_fraction:.6g}" in str(e.value) and "\n" not in str(e.value)
    keep = select_subnetwork(SPEC, make_record(0), FlopsFraction(min_fraction))
    assert not any(v.any() for v in keep.values())


@pytest.mark.parametrize("cls", [GroupFraction, ParamsFraction, FlopsFraction])
@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_out_of_range_fractions(cls, value):
    with pytest.raises(ConfigError, match=r"\[0, 1\]") as e:
        cls(value)
    assert repr(value) in str(e.value)


def test_bad_configs():
    with pytest.raises(ConfigError, match=r"2\.0"):
        GroupFraction({"qk": 2.0})
    with pytest.raises(ConfigError, match="-3"):
        PathStep(-3)
    for text in ["params", "size:0.5", "params:abc", "groups:qk=", "step:1.5", ""]:
        with pytest.raises(ConfigError, match="cannot parse"):
            parse_target(text)


@pytest.mark.parametrize(
    "text", ["params:0.5", "flops:0.4", "groups:0.5", "groups:qk=0.5,vo=0.5,mlp=0.3", "step:1200"]
)
def test_parse_target_round_trip(text):
    t = parse_target(text)
    assert t.describe() == text
    assert parse_target(t.describe()) == t
    assert target_from_json(json.loads(json.dumps(target_to_json(t)))) == t


def test_parse_target_values():
    assert parse_target(" Params : 0.25 ") == ParamsFraction(0.25)
    assert parse_target("groups:qk=0.5, mlp=1") == GroupFraction({"qk": 0.5, "mlp": 1.0})
    assert parse_target("step:1200") == PathStep(1200)


def test_keep_summary():
    rec = make_record(0)
    keep = select_subnetwork(SPEC, rec, GroupFraction(0.5))
    s = keep_summary(SPEC, keep)
    json.dumps(s)
    assert s["groups"]["mlp"]["kept"] == 48 and s["groups"]["mlp"]["fraction"] == 0.5
    assert sum(s["groups"]["qk"]["per_layer"]) == 12 and len(s["groups"]["qk"]["per_layer"]) == 3
    params = SPEC.base_params + 12 * 10 + 12 * 12 + 48 * 5
    assert s["params"] == params and s["macs"] == SPEC.base_macs + 24 * 20 + 48 * 4
    assert s["params_fraction"] == pytest.approx(params / SPEC.total_params)
    assert s["block_params_fraction"] == pytest.approx(0.5)
    full = keep_summary(SPEC, SPEC.full_keep())
    assert full["params_fraction"] == 1.0 and full["block_params_fraction"] == 1.0


def test_prefixed_groups_of_different_sizes_and_prefix_targets():
    """Towers and stages: groups named with a prefix, each its own depth and size (a Swin stage, a CLIP
    tower), ranked, selected and addressed by prefix."""
    spec = MaskSpec(
        (
            MaskGroup("text/qk", 2, 4, 10.0, 10.0),
            MaskGroup("text/mlp", 2, 8, 5.0, 5.0),
            MaskGroup("vision/mlp", 3, 6, 7.0, 7.0),
        ),
        base_params=100.0,
        base_macs=100.0,
    )
    rng = np.random.default_rng(0)
    record = {
        "t_in": {g.name: rng.integers(1, 50, g.shape).astype(np.float32) for g in spec.groups},
        "steps_in_support": {g.name: np.zeros(g.shape, np.int32) for g in spec.groups},
        "z": {g.name: rng.random(g.shape).astype(np.float32) for g in spec.groups},
    }
    keep = select_subnetwork(spec, record, "groups:text=0.5,text/mlp=0.25")
    assert keep["text/qk"].sum() == 4 and keep["text/mlp"].sum() == 4 and keep["vision/mlp"].all()
    keep = select_subnetwork(spec, record, "groups:vision/=0")
    assert not keep["vision/mlp"].any() and keep["text/qk"].all()
    with pytest.raises(ConfigError, match="unknown group"):
        select_subnetwork(spec, record, "groups:audio=0.5")
    keep = select_subnetwork(spec, record, "params:0.5")
    kept = sum(keep[g.name].sum() * g.params_per_entry for g in spec.groups)
    assert kept <= 0.5 * spec.block_params
