"""Masked ViT: dense equivalence, mask placement, position-embedding resampling, cost declaration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.adapters.vit import vit_cost
from spp_jax.errors import ConfigError
from spp_jax.models.vit import VARIANTS, VisionTransformer, bicubic_matrix, resample_posemb, vit_config
from tests.helpers import as_masks, mu_adapter, random_images, random_keep, random_params


@pytest.mark.parametrize("groups", [("qk", "vo", "mlp"), ("qk", "vo", "mlp", "heads")])
def test_all_ones_masks_equal_dense_exactly(groups):
    a = mu_adapter(groups)
    params, x = random_params(a), random_images(a)
    m = a.module()
    dense = m.apply({"params": params}, x)
    masked = m.apply({"params": params}, x, masks=a.mask_spec().init_masks())
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(masked))


def test_masks_change_the_function():
    a = mu_adapter()
    params, x = random_params(a), random_images(a)
    keep = random_keep(a.mask_spec(), np.random.default_rng(0))
    m = a.module()
    assert not np.allclose(
        m.apply({"params": params}, x), m.apply({"params": params}, x, masks=as_masks(keep))
    )


def test_mlp_mask_place_matters_only_for_continuous_masks():
    pre, post = mu_adapter(), mu_adapter(mlp_mask_pre_act=False)
    params, x = random_params(pre), random_images(pre)
    spec = pre.mask_spec()
    binary = as_masks(random_keep(spec, np.random.default_rng(1)))
    run = lambda a, m: a.module().apply({"params": params}, x, masks=m)
    np.testing.assert_allclose(run(pre, binary), run(post, binary), atol=1e-6)
    cont = {k: v * 0.5 + 0.7 for k, v in binary.items()}
    assert not np.allclose(run(pre, cont), run(post, cont), atol=1e-4)


def test_mask_spec_shapes_have_depth_axis():
    a = mu_adapter(("qk", "vo", "mlp", "heads"))
    c = a.config
    shapes = {g.name: g.shape for g in a.mask_spec().groups}
    assert shapes == {
        "qk": (c.depth, c.head_dim),
        "vo": (c.depth, c.head_dim),
        "mlp": (c.depth, c.mlp_dim),
        "heads": (c.depth, c.num_heads),
    }
    assert all(leaf is not None for leaf in jax.tree.leaves(a.mask_spec().init_masks()))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cost_formula_counts_every_param(variant):
    c = vit_config(variant, num_classes=10)
    shapes = jax.eval_shape(
        lambda: VisionTransformer(c).init(jax.random.key(0), jnp.zeros((1, c.image_size, c.image_size, 3)))
    )["params"]
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert vit_cost(c, c.dense_layers())[0] == n_params


def test_declared_dense_cost_equals_counted_cost():
    a = mu_adapter()
    spec = a.mask_spec()
    assert spec.total_params == a.arch_cost(a.dense_spec())[0]
    assert spec.total_macs == a.arch_cost(a.dense_spec())[1]


def test_bicubic_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(0).normal(size=(1, 3, 7, 7)).astype(np.float32)
    for n_out in (4, 5, 7, 11):
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(grid), size=(n_out, n_out), mode="bicubic", align_corners=False
        ).numpy()
        m = bicubic_matrix(7, n_out)
        ours = np.einsum("ia,jb,ncab->ncij", m, m, grid)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_posemb_resampled_for_other_input_size():
    a = mu_adapter()
    params = random_params(a)
    c = a.config
    big = jnp.ones((2, c.image_size * 2, c.image_size * 2, 3))
    out = a.module().apply({"params": params}, big)
    assert out.shape == (2, c.num_classes) and np.isfinite(out).all()
    pe = params["pos_embedding"][:, 1:]
    same = resample_posemb(pe, c.posemb_grid, c.posemb_grid)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(pe))


def test_bad_configs_raise_one_line_errors():
    with pytest.raises(ConfigError, match="unknown ViT variant"):
        vit_config("XXL/3")
    with pytest.raises(ConfigError, match="not divisible"):
        vit_config("mu", num_heads=3)
    with pytest.raises(ConfigError, match="mask groups"):
        mu_adapter(("qk", "ffn"))
