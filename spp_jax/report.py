"""Run report: `report.json`, a readable `report.md` and two PNG plots in the run's workdir.

`write_report(workdir, report)` takes one dict (only "dense" and "path" are required; every other key,
and every field inside an entry, may be missing):

    {"model":   {"variant", "init", "image_size", "params", "macs"},
     "data":    {"dataset", "train_split", "eval_split", "num_classes"},
     "config":  {any flat settings worth showing, e.g. "search/mode": "official"},
     "stages":  {"dense": s, "search": s, "extract": s, "finetune": s, "evaluate": s},   # wall seconds
     "dense":   {"accuracy", "params", "macs", "throughput"},
     "path":    [{"step", "support": {group: frac, ..., "all": frac}, "kept_params_frac",
                  "kept_macs_frac", "accuracy"}, ...],
     "targets": [{"target", "params", "macs", "params_frac", "macs_frac", "layers", "accuracy_masked",
                  "accuracy_finetuned", "throughput", "dir", "extra_masked", "extra_finetuned"}, ...],
     "references": {name: value of the metric, ...}}   # model-free references (e.g. TF-IDF + LR)

Tasks with metrics besides the main one (e.g. retrieval recall) put them, as {name: value} dicts, in
"dense"["extra"] and each target's "extra_masked" / "extra_finetuned": the report adds a table of them.

The metric is accuracy unless the report says otherwise: `"metric": {"name": "perplexity",
"higher_is_better": false, "throughput_unit": "tok/s"}` makes every "accuracy" key above read "perplexity"
(`perplexity`, `perplexity_masked`, `perplexity_finetuned`) and the plot `perplexity_vs_params.png`.
Accuracies are fractions in [0, 1] and are shown as percentages, perplexities as numbers; FLOPs are 2 * MACs
(per example; per token for a language model); throughput is images/s (or the report's unit). Files written:
    report.json              the dict (numpy/jax values converted, non-finite floats as null)
    report.md                summary, stage times, dense vs targets table, path summary
    path.png                 support fraction per group against search step, kept params/MACs below
    accuracy_vs_params.png   accuracy against kept params fraction (path, targets before/after fine-tuning)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_accuracy", "plot_path", "render_markdown", "to_jsonable", "write_report"]

_STAGES = ("dense", "search", "extract", "finetune", "evaluate")
_DASH = "–"
_UNIT_OF = {"img/s": "image", "seq/s": "sequence"}  # what one FLOPs figure is per


# ------------------------------------------------------------------------------------------------
# JSON


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON copy of `obj`: numpy/jax scalars and arrays become Python numbers and lists, tuples
    become lists, mapping keys become strings, NaN/inf become None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, str | bool) or obj is None:
        return obj
    if isinstance(obj, int | float):
        return None if isinstance(obj, float) and not math.isfinite(obj) else obj
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__"):  # numpy or jax array
        return to_jsonable(np.asarray(obj).tolist())
    return str(obj)


# ------------------------------------------------------------------------------------------------
# Formatting helpers


def _num(x: Any) -> float | None:
    """`x` as a finite float, or None when missing / not a number / non-finite."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _acc(x: Any) -> str:
    f = _num(x)
    return _DASH if f is None else f"{100 * f:.2f}%"


def _pct(x: Any) -> str:
    f = _num(x)
    return _DASH if f is None else f"{100 * f:.1f}%"


def _count(x: Any) -> str:
    f = _num(x)
    if f is None:
        return _DASH
    if abs(f) >= 1e6:
        return f"{f / 1e6:.2f}M"
    if abs(f) >= 1e3:
        return f"{f / 1e3:.1f}K"
    return f"{f:.0f}"


def _seconds(x: Any) -> str:
    f = _num(x)
    if f is None:
        return _DASH
    if f < 60:
        return f"{f:.1f} s"
    h, rem = divmod(round(f), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _ratio(num: Any, den: Any) -> float | None:
    a, b = _num(num), _num(den)
    return None if a is None or not b else a / b


def _frac(entry: Mapping, key: str, frac_key: str, dense: Mapping) -> float | None:
    """Fraction of the dense model's `key` (params/macs); falls back to the entry's own `frac_key`."""
    r = _ratio(entry.get(key), dense.get(key))
    return r if r is not None else _num(entry.get(frac_key))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _dict(report: Mapping, key: str) -> Mapping:
    v = report.get(key)
    return v if isinstance(v, Mapping) else {}


def _list(report: Mapping, key: str) -> list[Mapping]:
    v = report.get(key)
    return [e for e in v if isinstance(e, Mapping)] if isinstance(v, Sequence) else []


def _groups(path: Sequence[Mapping]) -> list[str]:
    """Group names in the order first seen, 'all' last."""
    names: list[str] = []
    for p in path:
        for g in _dict(p, "support"):
            if g not in names and g != "all":
                names.append(g)
    if any("all" in _dict(p, "support") for p in path):
        names.append("all")
    return names


def _sample(n: int, k: int = 6) -> list[int]:
    """Up to k indices spread evenly over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _layers(layers: Any) -> str:
    """Compact per-layer dims: 'heads 6,6,..; qk 64,..; vo ..; mlp ..' for LayerDims dicts; of a
    {tower: layers} dict, one such line per tower."""
    if isinstance(layers, Mapping) and layers:
        return " / ".join(f"{tower}: {_layers(v)}" for tower, v in layers.items())
    if not isinstance(layers, Sequence) or not layers:
        return _DASH
    keys = (("num_heads", "heads"), ("num_kv_heads", "kv heads"), ("qk_dim", "qk"), ("v_dim", "vo"),
            ("mlp_dim", "mlp"))  # fmt: skip
    if all(isinstance(ly, Mapping) for ly in layers):
        # a decoder layer lists its kept RoPE pairs: qk dims = 2 per pair
        layers = [{**ly, "qk_dim": 2 * len(ly["rope_pairs"])} if "rope_pairs" in ly else ly for ly in layers]
        parts = [
            f"{short} " + ",".join(str(ly.get(k, "?")) for ly in layers)
            for k, short in keys
            if any(k in ly for ly in layers)
        ]
        if parts:
            return "; ".join(parts)
    return ", ".join(str(ly) for ly in layers)


# ------------------------------------------------------------------------------------------------
# Markdown


def _metric(report: Mapping) -> tuple[str, Any, str]:
    """(metric name, its formatter, throughput unit) of a report (module docstring)."""
    m = _dict(report, "metric")
    name = m.get("name", "accuracy")
    fmt = _acc if name == "accuracy" else (lambda x: _DASH if _num(x) is None else f"{_num(x):.2f}")
    return name, fmt, m.get("throughput_unit", "img/s")


def render_markdown(report: Mapping) -> str:
    """The report as markdown text (see the module docstring for the dict)."""
    metric, fmt, unit = _metric(report)
    short = "acc." if metric == "accuracy" else metric
    model, data, config = _dict(report, "model"), _dict(report, "data"), _dict(report, "config")
    stages, dense = _dict(report, "stages"), _dict(report, "dense")
    path, targets = _list(report, "path"), _list(report, "targets")

    title = model.get("variant") or "model"
    lines = [f"# SPP report: {title}", ""]
    summary = [
        ("Model", model.get("variant")),
        ("Initialisation", model.get("init")),
        ("Image size", model.get("image_size")),
        ("Dense params", _count(model.get("params", dense.get("params")))),
        ("Dense GFLOPs", _gflops(model.get("macs", dense.get("macs")))),
        ("Dataset", data.get("dataset")),
        ("Train split", data.get("train_split")),
        ("Eval split", data.get("eval_split")),
        ("Classes", data.get("num_classes")),
        ("Sequence length (tokens)", data.get("seq_len")),
        ("Block length (tokens)", data.get("block_len")),
        ("Eval blocks", data.get("eval_blocks")),
    ]
    summary += [(str(k), v) for k, v in config.items()]
    summary += [(f"Reference: {k}", fmt(v)) for k, v in _dict(report, "references").items()]
    lines += [f"- **{k}**: {v}" for k, v in summary if v not in (None, _DASH, "")]
    lines.append("")

    if stages:
        names = [s for s in _STAGES if s in stages] + [s for s in stages if s not in _STAGES]
        total = sum(_num(stages[s]) or 0.0 for s in names)
        rows = [[s, _seconds(stages[s]), _pct(_ratio(stages[s], total))] for s in names]
        rows.append(["**total**", _seconds(total), "100.0%" if total else _DASH])
        lines += ["## Stage wall time", "", *_table(["stage", "wall time", "share"], rows), ""]

    lines += ["## Dense model and targets", ""]
    dense_tp = dense.get("throughput")
    header = [
        "model", "kept params", "% dense", "GFLOPs", "% dense", f"{short} masked (before FT)",
        f"{short} fine-tuned", unit, "speedup",
    ]  # fmt: skip
    rows = [
        [
            "dense",
            _count(dense.get("params")),
            "100.0%",
            _gflops(dense.get("macs")),
            "100.0%",
            fmt(dense.get(metric)),
            fmt(dense.get(metric)),
            _tp(dense_tp),
            "1.00x" if _num(dense_tp) else _DASH,
        ]
    ]
    for t in targets:
        speed = _ratio(t.get("throughput"), dense_tp)
        rows.append(
            [
                str(t.get("target", "?")),
                _count(t.get("params")),
                _pct(_frac(t, "params", "params_frac", dense)),
                _gflops(t.get("macs")),
                _pct(_frac(t, "macs", "macs_frac", dense)),
                fmt(t.get(f"{metric}_masked")),
                fmt(t.get(f"{metric}_finetuned")),
                _tp(t.get("throughput")),
                _DASH if speed is None else f"{speed:.2f}x",
            ]
        )
    lines += _table(header, rows)
    lines += [
        "",
        f"GFLOPs = 2 x MACs per {_UNIT_OF.get(unit, 'token')}. Dense {metric} is shown in "
        f"both {metric} columns. Masked {metric} = the dense model with the target's binary keep-set as "
        "masks, before fine-tuning.",
        "",
    ]
    lines += _extra_table(dense, targets)
    arch = [t for t in targets if t.get("layers") or t.get("dir")]
    if arch:
        lines += ["### Target architectures", ""]
        for t in arch:
            where = f" (`{t['dir']}`)" if t.get("dir") else ""
            lines.append(f"- **{t.get('target', '?')}**{where}: {_layers(t.get('layers'))}")
        lines.append("")

    lines += ["## Solution path", ""]
    if not path:
        lines += ["No path points recorded.", ""]
    else:
        steps = [p.get("step") for p in path]
        lines += [
            f"- **Path points**: {len(path)}",
            f"- **First step**: {steps[0]}",
            f"- **Last step**: {steps[-1]}",
            "",
        ]
        groups = _groups(path)
        has_acc = any(_num(p.get(metric)) is not None for p in path)
        header = ["step", *[f"support {g}" for g in groups], "kept params", "kept MACs"]
        header += [metric] if has_acc else []
        rows = []
        for i in _sample(len(path)):
            p = path[i]
            sup = _dict(p, "support")
            row = [str(p.get("step", _DASH)), *[_pct(sup.get(g)) for g in groups]]
            row += [_pct(p.get("kept_params_frac")), _pct(p.get("kept_macs_frac"))]
            row += [fmt(p.get(metric))] if has_acc else []
            rows.append(row)
        lines += _table(header, rows)
        lines.append("")
    lines += ["![solution path](path.png)", "", f"![{metric} vs params]({metric}_vs_params.png)", ""]
    return "\n".join(lines)


def _extra_table(dense: Mapping, targets: Sequence[Mapping]) -> list[str]:
    """The task's extra metrics (fractions, shown as %): dense, and each target masked / fine-tuned."""
    names = list(_dict(dense, "extra"))
    for t in targets:
        names += [k for key in ("extra_masked", "extra_finetuned") for k in _dict(t, key) if k not in names]
    if not names:
        return []
    header = ["model", *[f"{n} {when}" for n in names for when in ("masked", "fine-tuned")]]
    rows = [["dense", *[_acc(_dict(dense, "extra").get(n)) for n in names for _ in range(2)]]]
    for t in targets:
        m, f = _dict(t, "extra_masked"), _dict(t, "extra_finetuned")
        rows.append([str(t.get("target", "?")), *[_acc(d.get(n)) for n in names for d in (m, f)]])
    return ["### Other metrics", "", *_table(header, rows), ""]


def _gflops(macs: Any) -> str:
    f = _num(macs)
    if f is None:
        return _DASH
    g = 2 * f / 1e9
    return f"{g:.2f}" if g >= 0.1 else f"{g:.3g}"


def _tp(x: Any) -> str:
    f = _num(x)
    return _DASH if f is None else f"{f:.1f}"


# ------------------------------------------------------------------------------------------------
# Plots


def _series(points: Sequence[Mapping], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for p in points:
        x, y = _num(p.get(xkey)), _num(p.get(ykey))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_path(report: Mapping, filename: str) -> None:
    """Support fraction per group (and 'all') against step; kept params/MACs fractions below."""
    path = _list(report, "path")
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for g in _groups(path):
        pts = [p for p in path if _num(_dict(p, "support").get(g)) is not None]
        xs = [_num(p.get("step")) for p in pts]
        ys = [_num(_dict(p, "support")[g]) for p in pts]
        keep = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None]
        if keep:
            style = dict(color="black", linewidth=2, linestyle="--") if g == "all" else {}
            top.plot(*zip(*keep, strict=True), label=g, **style)
    top.set_ylabel("support fraction of Gamma")
    top.set_ylim(-0.02, 1.02)
    top.set_title("Solution path: support per mask group")
    for key, label in (("kept_params_frac", "kept params"), ("kept_macs_frac", "kept MACs")):
        xs, ys = _series(path, "step", key)
        if xs:
            bottom.plot(xs, ys, label=label)
    bottom.set_xlabel("search step")
    bottom.set_ylabel("fraction of dense")
    bottom.set_ylim(-0.02, 1.02)
    for ax in (top, bottom):
        _finish(ax, "no data")
    fig.savefig(filename, dpi=110)


def _finish(ax, empty_text: str) -> None:
    """Grid, and a legend when something was drawn (else say there was nothing to draw)."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes)


def plot_accuracy(report: Mapping, filename: str) -> None:
    """The metric (accuracy in %, or perplexity on a log scale) against kept params fraction: path points,
    targets before/after FT, dense star."""
    metric = _metric(report)[0]
    scale = 100 if metric == "accuracy" else 1
    dense, path, targets = _dict(report, "dense"), _list(report, "path"), _list(report, "targets")
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    xs, ys = _series(path, "kept_params_frac", metric)
    if xs:
        order = np.argsort(xs)
        ax.plot(np.take(xs, order), scale * np.take(ys, order), ".-", color="0.6", label="path (masked)")
    for key, label, marker in (
        (f"{metric}_masked", "targets, before fine-tuning", "o"),
        (f"{metric}_finetuned", "targets, after fine-tuning", "s"),
    ):
        pts = [(_frac(t, "params", "params_frac", dense), _num(t.get(key)), t) for t in targets]
        pts = [(x, y, t) for x, y, t in pts if x is not None and y is not None]
        if pts:
            ax.scatter(
                [x for x, _, _ in pts], [scale * y for _, y, _ in pts], marker=marker, s=45, label=label
            )
            if key == f"{metric}_finetuned":
                for x, y, t in pts:
                    ax.annotate(str(t.get("target", "")), (x, scale * y), fontsize=7, xytext=(4, 4),
                                textcoords="offset points")  # fmt: skip
    acc = _num(dense.get(metric))
    if acc is not None:
        ax.scatter([1.0], [scale * acc], marker="*", s=220, color="gold", edgecolor="black", label="dense")
    ax.set_xlabel("kept params (fraction of dense)")
    if metric == "accuracy":
        ax.set_ylabel("accuracy (%)")
    else:
        ax.set_ylabel(f"{metric} (log scale)")
        if ax.get_legend_handles_labels()[0]:
            ax.set_yscale("log")
    ax.set_title(f"{metric.capitalize()} against kept params")
    _finish(ax, f"no {metric} recorded")
    fig.savefig(filename, dpi=110)


# ------------------------------------------------------------------------------------------------


def write_report(workdir: str, report: dict) -> None:
    """Write report.json, report.md, path.png and <metric>_vs_params.png into `workdir` (created)."""
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    os.makedirs(workdir, exist_ok=True)
    data = to_jsonable(report)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(render_markdown(data))
    plot_path(data, os.path.join(workdir, "path.png"))
    plot_accuracy(data, os.path.join(workdir, f"{_metric(data)[0]}_vs_params.png"))
