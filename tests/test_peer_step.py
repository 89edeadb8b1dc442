"""bench/peer_step.py's PyTorch restatement of the reference search step computes what spp_jax does: equal
weights and inputs give the same loss and mask gradients, and three official steps the same M, Z, Gamma."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")

_PATH = Path(__file__).resolve().parents[1] / "bench" / "peer_step.py"


pytestmark = pytest.mark.slow  # compared with the reference packages: the full suite


def _peer_step():
    spec = importlib.util.spec_from_file_location("peer_step", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["vit", "llama"])
def test_torch_restatement_matches_spp_jax(arch):
    diffs = _peer_step().check(arch)  # asserts loss/gradients within 2e-5, M/Z/Gamma within 5e-5
    assert diffs["loss"] < 1e-5
    assert 0.0 < diffs["gamma_nonzero_frac"] < 1.0  # the shrink is exercised on both sides of lam
