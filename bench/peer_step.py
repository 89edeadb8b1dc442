"""spp_jax's SPP search step against a PyTorch restatement of the reference code's step, one process.

    python bench/peer_step.py [--tokens 17,65] [--batch 64] [--steps 5] [--llm_batch 1] [--llm_seq 256] \
        [--out bench/results/peer_step.json]
    python bench/peer_step.py --device cuda --variant B/16 --tokens 197 --batch 256 --llm_seq 2048 \
        --llm_batch 4 --dtype bfloat16 --jax_attention xla,cudnn      # on a GPU (bench/gpu_peer_step.sh)

The PyTorch side (bench/peer_torch.py) restates the reference search step (docs/algorithm.md §3.2, the
official form):
  * ViT: timm-style pre-LN blocks (fused qkv Linear, GELU MLP, exact erf GELU, LayerNorm eps 1e-6, class
    token, linear head). Masks as in spp_jax/models/vit.py: qk [depth, head_dim] scales q and k (one entry
    per head dim, shared across heads), vo [depth, head_dim] scales v, mlp [depth, mlp_dim] scales fc1's
    output before the GELU. Attention is `F.scaled_dot_product_attention` (timm's default, "sdpa") or the
    explicit softmax(q k^T) v ("explicit"); both are timed and the faster is the table's torch column.
  * Llama (SmolLM2-135M shape): RMSNorm, grouped-query causal attention with rotate-half RoPE, SwiGLU MLP,
    tied LM head; qk [depth, head_dim / 2] scales q and k dims j and j + head_dim / 2 (one RoPE pair) after
    RoPE, vo scales v, mlp scales silu(gate) * up, as in spp_jax/models/llama.py.
  * The step: loss.backward() with EVERY weight requires_grad=True (as in the reference script: torch forms
    weight gradients that nothing uses), AdamW (weight decay 0, eps 1e-4) on the mask parameters only, then
    Z += lr / (1 - b1^t) * (M - Gamma), Gamma = max(Z - lam, 0) (lam 3) under no_grad.
The spp_jax side is built as bench/search_step.py builds it: `make_search_step` (official and curvature
forms) and the full fine-tuning step (grads w.r.t. every weight, AdamW), jitted. Both sides use the same
random weights (spp_jax's init with a random head, copied into torch), the same batch, float32, and their
default thread counts. Each torch step runs in a child process of its own (in one process the step after a
torch step ran ~40% slower), and both processes run under tcmalloc as the launch scripts do
(spp_jax/allocator.py; SPP_JAX_TCMALLOC=0 measures glibc's malloc instead).
On a GPU (`--device cuda`) both sides run there: the torch step in its child process (its JAX on the CPU,
only to build the same weights), float32 matmuls as TF32 on both sides (XLA's default on GPUs; torch's
`allow_tf32`), or with `--dtype bfloat16` torch under `torch.autocast(bfloat16)` (the reference script's
AMP) against spp_jax's bfloat16 compute dtype; `--jax_attention xla,cudnn` times spp_jax with each
attention core.
Each step is compiled and warmed up first; then the kinds are timed round-robin (step i of every kind before
step i + 1 of any, each round starting at another kind), so outside load falls on all of them alike;
medians of --steps calls.

`--check` compares the torch loss and mask gradients, and the masks, Z and Gamma after three steps, with
spp_jax's on a tiny config (tests/test_peer_step.py runs the same check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import jax
import numpy as np
import optax
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_torch import TorchOfficialStep, to_torch, torch_batch, torch_model
from search_step import build

from spp_jax.allocator import use_tcmalloc
from spp_jax.finetune import init_train_state, make_train_step
from spp_jax.search import init_search_state, make_search_step
from spp_jax.spp import spp

# --------------------------------------------------------------------------------------------------
# Setup and timing


def setup(arch: str, variant: str, batch: int, image_size: int = 64, seq: int = 256, seed: int = 0,
          num_classes: int = 1000, dtype: str = "float32"):  # fmt: skip
    """(namespace, adapter, task, params, batch) as bench/search_step.py builds them, with a random head
    (the zero-initialised head would give zero mask gradients)."""
    a = SimpleNamespace(
        arch=arch, variant=variant, batch=batch, image_size=image_size, seq=seq, seed=seed,
        num_classes=num_classes, groups="qk,vo,mlp", dtype=dtype,
    )  # fmt: skip
    adapter, task, params, data = build(a)
    if arch == "vit":
        head = params["head"]
        k = jax.random.key(seed + 7)
        params = {**params, "head": {**head, "kernel": 0.02 * jax.random.normal(k, head["kernel"].shape)}}
    return a, adapter, task, params, data


def interleaved(runs: dict, steps: int, pause: float = 0.2) -> dict:
    """Time every `runs[name]()` (one step, blocking) `steps` times, round-robin: step i of every kind runs
    before step i + 1 of any, so load from outside the process falls on all kinds alike; round i starts at
    kind i (mod the number of kinds), so no kind always runs right after the same other one. A run that
    returns a float (a step in another process) is timed by it. `pause` seconds before each step let the
    previous step's idle worker threads go to sleep. Median / min."""
    times, kinds = {k: [] for k in runs}, list(runs)
    for i in range(steps):
        for k in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            run = runs[k]
            time.sleep(pause)
            t0 = time.perf_counter()
            r = run()
            times[k].append(r if isinstance(r, float) else time.perf_counter() - t0)
    return {
        k: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "times_ms": [1e3 * x for x in t]}
        for k, t in times.items()
    }


def jax_runner(fn, args) -> tuple[Callable[[], None], float]:
    """(run, compile seconds): `run()` calls the compiled `fn` once, feeding its state output back."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    args = list(args)

    def run():
        args[0] = jax.block_until_ready(compiled(*args))[0]

    run()  # warm-up
    return run, compile_s


def _torch_worker(conn, setup_args: tuple, attn: str, device: str = "cpu", dtype: str = "float32") -> None:
    """Child process: build the torch step from the same setup, then time one step per "step" message.
    On a GPU: JAX stays on the CPU (it only builds the weights), float32 matmuls run as TF32 (as XLA's do),
    bfloat16 means the forward pass under autocast."""
    if device != "cpu":
        jax.config.update("jax_platforms", "cpu")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    a, adapter, _, params, data = setup(*setup_args)
    amp = None if dtype == "float32" else getattr(torch, dtype)
    model = torch_model(a, adapter, params, attn).to(device)
    tstep = TorchOfficialStep(model, autocast=amp)
    tb = {k: v.to(device) for k, v in torch_batch(data).items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    for _ in range(2):  # warm-up
        tstep(tb)
    sync()
    conn.send(torch.get_num_threads())
    while conn.recv() == "step":
        t0 = time.perf_counter()
        tstep(tb)
        sync()
        conn.send(time.perf_counter() - t0)


class TorchProcess:
    """A torch step in its own process. In one process with the jitted steps, the step timed right after a
    torch step ran ~40% slower (ViT-S/16, 65 tokens: 7.6 s against 5.4 s), so each side keeps its threads
    and allocator to itself; the parent only ever waits while the other side runs."""

    def __init__(self, setup_args: tuple, attn: str, device: str = "cpu", dtype: str = "float32"):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, setup_args, attn, device, dtype)
        self.proc = ctx.Process(target=_torch_worker, args=args, daemon=True)
        self.proc.start()
        self.threads = self.conn.recv()

    def __call__(self) -> float:
        self.conn.send("step")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join()


def measure(arch, variant, batch, steps, image_size=64, seq=256, attns=("sdpa", "explicit"),
            finetune=True, device="cpu", dtype="float32", jax_attentions=("xla",)) -> dict:  # fmt: skip
    """Torch reference steps (per attention form, on `device`) and spp_jax's official / curvature search and
    fine-tune steps (per attention core in `jax_attentions`, compute `dtype`) on one model and batch, each
    compiled / warmed up, then timed round-robin (`interleaved`). spp_jax keys are "official",
    "curvature", "finetune" for the first core; a further core (key suffix "@<core>") times the official
    and fine-tune steps only."""
    a, adapter, task, params, data = setup(arch, variant, batch, image_size, seq, dtype=dtype)
    spec = adapter.mask_spec()
    out = {"arch": arch, "variant": variant, "batch": batch, "device": device, "dtype": dtype}
    if arch == "vit":
        out["image_size"], out["tokens"] = image_size, adapter.config.num_tokens
    else:
        out["seq"] = seq
    # model FLOPs as bench/search_step.py counts them: 4 x MACs per example for a search step (forward +
    # activation backward), 6 x for fine-tuning; llama MACs are per token
    macs = adapter.arch_cost(adapter.dense_spec())[1] * (seq if arch == "llama" else 1) * batch
    out["model_flops"] = {"search": 4 * macs, "finetune": 6 * macs}
    runs, compile_s, workers, errors = {}, {}, [], {}
    for attn in attns if arch == "vit" else ("sdpa",):
        workers.append(TorchProcess((arch, variant, batch, image_size, seq), attn, device, dtype))
        runs[f"torch/{attn}"] = workers[-1]
        out["torch_threads"] = workers[-1].threads
    for i, impl in enumerate(jax_attentions):
        adapter_i = dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, attention=impl))
        apply, suffix = adapter_i.module().apply, "" if i == 0 else f"@{impl}"
        kinds = (
            [("official", "search")]
            + [("curvature", "search")] * (i == 0)
            + [("finetune", "train")] * finetune
        )
        for kind, what in kinds:
            try:
                if what == "search":
                    tx = spp(kind)
                    step = make_search_step(apply, spec, tx, task=task, curvature=kind == "curvature")
                    args = (init_search_state(spec, tx), params, data)
                else:
                    tx = optax.adamw(1e-4, weight_decay=0.05)
                    step, args = make_train_step(apply, tx, task=task), (init_train_state(params, tx), data)
                runs[kind + suffix], compile_s[kind + suffix] = jax_runner(step, args)
            except Exception as e:  # e.g. a fused kernel this jaxlib or GPU refuses: report, time the rest
                errors[kind + suffix] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(f"{kind + suffix}: {errors[kind + suffix]}", flush=True)
    timed = interleaved(runs, steps)
    for w in workers:
        w.close()
    out["errors"] = errors
    out["torch"] = {k.split("/")[1]: v for k, v in timed.items() if k.startswith("torch/")}
    out["torch_best"] = min(out["torch"], key=lambda k: out["torch"][k]["median_ms"])
    out["torch_ms"] = out["torch"][out["torch_best"]]["median_ms"]
    for k, sec in compile_s.items():
        out[k] = {**timed[k], "compile_s": sec}
    for k in compile_s:
        mode, _, impl = k.partition("@")
        if mode == "finetune":
            continue
        out[k]["torch_over_jax"] = out["torch_ms"] / out[k]["median_ms"]
        ft = out.get("finetune" + (f"@{impl}" if impl else ""))
        if ft:
            out[k]["search_over_finetune"] = out[k]["median_ms"] / ft["median_ms"]
    return out


# --------------------------------------------------------------------------------------------------
# Correctness check (tests/test_peer_step.py)


def check(arch: str = "vit", steps: int = 3, lr: float = 0.05, lam: float = 0.9, atol: float = 2e-5,
          state_atol: float = 5e-5) -> dict[str, float]:  # fmt: skip
    """Tiny config ("mu"), equal weights and inputs: torch and spp_jax loss, mask gradients and, after
    `steps` official steps at `lr` and `lam` (so that Gamma leaves 0), masks, Z and Gamma. Returns the max abs
    differences; raises AssertionError beyond `atol` (loss, gradients: relative to the largest entry) or
    `state_atol` (M, Z, Gamma: Adam's g / (sqrt(v) + eps) turns float32 rounding in the small gradients
    into step differences up to lr / eps times larger)."""
    a = SimpleNamespace(arch=arch, variant="mu", batch=2, image_size=16, seq=12, seed=0, num_classes=5)
    rng = np.random.default_rng(0)
    if arch == "vit":
        from spp_jax.adapters import ViTAdapter
        from spp_jax.models.vit import vit_config
        from spp_jax.tasks.image_classification import ImageClassification

        adapter, task = ViTAdapter(vit_config("mu", image_size=16, num_classes=5)), ImageClassification()
        data = {"image": rng.normal(size=(2, 16, 16, 3)).astype(np.float32), "label": np.array([1, 3])}
        example = data["image"][:1]
    else:
        from spp_jax.adapters.llama import LlamaAdapter
        from spp_jax.models.llama import llama_config
        from spp_jax.tasks.causal_lm import CausalLM

        adapter, task = LlamaAdapter(llama_config("mu")), CausalLM()
        data = {"tokens": rng.integers(0, adapter.config.vocab_size, (2, 13)).astype(np.int32)}
        example = data["tokens"][:1, :8]
    params = jax.jit(adapter.module().init)(jax.random.key(0), example)["params"]
    # perturb every leaf: zero-init biases and head, unit norm scales would hide mapping bugs
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
    spec = adapter.mask_spec()
    masks = spec.init_masks()
    # non-trivial masks for the gradient comparison
    masks = {k: (0.5 + rng.random(m.shape)).astype(np.float32) for k, m in masks.items()}
    from spp_jax.tasks import model_loss

    apply = adapter.module().apply
    (loss_j, _), grads_j = jax.jit(
        jax.value_and_grad(
            lambda m: model_loss(apply, task, params, data, masks=m, train=False), has_aux=True
        )
    )(masks)
    tstep = TorchOfficialStep(torch_model(a, adapter, params, "explicit"), lr=lr)
    tb = torch_batch(data)
    with torch.no_grad():
        for k, m in tstep.masks.items():
            m.copy_(to_torch(masks[k]))
    loss_t = tstep.loss(tb)
    loss_t.backward()
    diffs = {"loss": abs(float(loss_t.detach()) - float(loss_j))}
    for k in masks:
        gj, gt = np.asarray(grads_j[k]), tstep.masks[k].grad.numpy()
        diffs[f"grad/{k}"] = float(np.abs(gj - gt).max() / max(np.abs(gj).max(), 1e-12))
    # the official dynamics from M = 1 on both sides
    tx = spp("official", learning_rate=lr, lam=lam)
    state = init_search_state(spec, tx)
    jstep = jax.jit(make_search_step(apply, spec, tx, task=task))
    tstep = TorchOfficialStep(torch_model(a, adapter, params, "sdpa"), lr=lr, lam=lam)
    for _ in range(steps):
        state, _ = jstep(state, params, data)
        tstep(tb)
    for name, j, t in (("M", state.masks, tstep.masks), ("Z", state.opt_state.z, tstep.z),
                       ("Gamma", state.opt_state.gamma, tstep.gamma)):  # fmt: skip
        for k in masks:
            jj, tt = np.asarray(j[k]), t[k].detach().numpy()
            diffs[f"{name}/{k}"] = float(np.abs(jj - tt).max() / max(np.abs(jj).max(), 1.0))
    diffs["gamma_nonzero_frac"] = float(
        np.mean([np.mean(np.asarray(g) > 0) for g in state.opt_state.gamma.values()])
    )
    tol = lambda k: atol if k == "loss" or k.startswith("grad/") else state_atol
    bad = {k: v for k, v in diffs.items() if k != "gamma_nonzero_frac" and not v <= tol(k)}
    assert not bad, f"torch restatement differs from spp_jax: {bad}"
    return diffs


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="S/16")
    ap.add_argument("--tokens", default="17,65", help="ViT token counts (1 + (image/16)^2), comma separated")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--llm_variant", default="smollm2-135m")
    ap.add_argument("--llm_seq", type=int, default=256)
    ap.add_argument("--llm_batch", type=int, default=1, help="0 = skip the LLM row")
    ap.add_argument("--llm_finetune", type=int, default=1, help="also time the LLM fine-tune step")
    ap.add_argument("--device", default="cpu", help="torch device: cpu | cuda (spp_jax uses JAX's default)")
    ap.add_argument("--dtype", default="float32", help="compute dtypes, comma separated: float32,bfloat16")
    ap.add_argument("--jax_attention", default="xla", help="spp_jax attention cores, comma separated")
    ap.add_argument("--torch_attention", default="sdpa,explicit", help="ViT torch attention forms")
    ap.add_argument("--check", action="store_true", help="only the correctness check (tiny config)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    use_tcmalloc()  # as the launch scripts run (spp_jax/allocator.py); the torch side inherits it
    if a.check:
        for arch in ("vit", "llama"):
            print(arch, json.dumps(check(arch), indent=1))
        return

    meta = {
        "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "torch": torch.__version__, "torch_device": a.device, "steps": a.steps,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }  # fmt: skip
    rows, split = [], lambda text: tuple(text.split(","))

    def add(row: dict) -> None:  # the file is rewritten after every row: a run cut short keeps its rows
        rows.append(row)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)

    common = dict(device=a.device, attns=split(a.torch_attention))
    for dtype in split(a.dtype):
        impls = tuple(i for i in split(a.jax_attention) if dtype != "float32" or i == "xla")
        kw = dict(common, dtype=dtype, jax_attentions=impls)
        for n in (int(t) for t in a.tokens.split(",") if t):
            grid = math.isqrt(n - 1)
            assert grid * grid == n - 1, f"{n} tokens is not 1 + a square"
            add(measure("vit", a.variant, a.batch, a.steps, image_size=16 * grid, **kw))
        if a.llm_batch:
            add(measure("llama", a.llm_variant, a.llm_batch, a.steps, seq=a.llm_seq,
                        finetune=bool(a.llm_finetune), **kw))  # fmt: skip

    print(f"device {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), jax {jax.__version__}, "
          f"torch {torch.__version__} on {a.device} ({torch.get_num_threads()} threads)")  # fmt: skip
    print("| model | tokens | batch | dtype | torch ms | spp_jax form | spp_jax search ms "
          "| ratio (torch / spp_jax) | spp_jax fine-tune ms | search / fine-tune |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"ViT-{r['variant']}" if r["arch"] == "vit" else r["variant"]
        n = r.get("tokens", r.get("seq"))
        for key in (k for k in r if k.split("@")[0] in ("official", "curvature")):
            m, impl = r[key], key.partition("@")[2]
            ft = r.get("finetune" + (f"@{impl}" if impl else ""), {}).get("median_ms")
            sf = m.get("search_over_finetune")
            ft_s = "-" if ft is None else f"{ft:.0f}"
            sf_s = "-" if sf is None else f"{sf:.2f}"
            torch_s = f"{r['torch_ms']:.0f} ({r['torch_best']})"
            print(f"| {name} | {n} | {r['batch']} | {r['dtype']} | {torch_s} | {key} | "
                  f"{m['median_ms']:.0f} | {m['torch_over_jax']:.2f} | {ft_s} | {sf_s} |")  # fmt: skip
        for key, err in r["errors"].items():
            print(f"| {name} | {n} | {r['batch']} | {r['dtype']} | - | {key} | failed: {err} | | | |")


if __name__ == "__main__":
    main()
