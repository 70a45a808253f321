"""Write what ``lightning-gd analyze`` measured: ``report.json``, ``report.md``, the figures and the eigenvectors.

Rank zero only. Every file goes into the one directory it is given.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from lightning_gd.utils.plotting import new_figure, save_figure

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["report_files", "summary_lines", "write_comparison", "write_report"]

_MAX_BARS = 40  # per-parameter trace bars drawn; the rest are summed into one "other" bar
_TOP_LAYERS_IN_MD = 10


def write_report(trainer: Trainer, report: dict[str, Any], out_dir: Path, step: int) -> list[str]:
    """Write one report into ``out_dir``: the JSON, the Markdown summary, the PNGs (and to the trainer's TensorBoard
    loggers, at ``step``) and, when asked, the eigenvectors. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    tag = report["batches"]["tag"]
    written = [
        save_figure(trainer, _density_figure([report], [f"step {step}"], tag), str(out_dir), "spectral_density.png",
                    tag="analysis/spectral_density", step=step),
        save_figure(trainer, _trace_figure(report, step), str(out_dir), "per_layer_trace.png",
                    tag="analysis/per_layer_trace", step=step),
    ]  # fmt: skip
    if report.get("landscape"):
        written.append(save_figure(trainer, _landscape_1d_figure(report, step), str(out_dir), "landscape_1d.png",
                                   tag="analysis/landscape_1d", step=step))  # fmt: skip
        written.append(save_figure(trainer, _landscape_2d_figure(report, step), str(out_dir), "landscape_2d.png",
                                   tag="analysis/landscape_2d", step=step))  # fmt: skip
    if report["settings"]["save_eigenvectors"]:
        written.append(_save_eigenvectors(report, out_dir / "eigenvectors.safetensors"))
    for logger in trainer.loggers:
        logger.log_metrics(_scalars(report), step=step)
    assert [os.path.basename(p) for p in written] == report_files(report)[:-2], "report_files() is out of date"
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(_public(report), indent=1, allow_nan=True) + "\n", encoding="utf-8")
    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(report), encoding="utf-8")
    return [*written, str(json_path), str(md_path)]


def report_files(report: dict[str, Any]) -> list[str]:
    """The names of the files :func:`write_report` writes for ``report`` (the same on every rank)."""
    names = ["spectral_density.png", "per_layer_trace.png"]
    if report.get("landscape"):
        names += ["landscape_1d.png", "landscape_2d.png"]
    if report["settings"]["save_eigenvectors"]:
        names.append("eigenvectors.safetensors")
    return [*names, "report.json", "report.md"]


def write_comparison(reports: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Write two reports side by side into ``out_dir``: ``report.json`` (both), ``report.md`` (one table) and
    ``spectral_density.png`` (the two densities side by side, on the same axes)."""
    os.makedirs(out_dir, exist_ok=True)
    labels = [f"{Path(r['checkpoint']).name} (step {r['global_step']})" for r in reports]
    fig = _density_figure(reports, labels, reports[0]["batches"]["tag"])
    density = out_dir / "spectral_density.png"
    fig.tight_layout()
    fig.savefig(density)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps({"a": _public(reports[0]), "b": _public(reports[1])}, indent=1) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(_comparison_markdown(reports, labels), encoding="utf-8")
    return [str(density), str(json_path), str(md_path)]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The lines printed at the end of a run, each naming the batches it was measured on."""
    on = f"[{report['batches']['tag']}]"
    top, trace = report["top"], report["trace"]
    lines = [
        f"loss {report['loss']:.6g} {on}",
        f"top eigenvalues {_join(top['eigenvalues'])} (residual norms {_join(top['residual_norms'], '.2g')};"
        f" {top['lanczos_products']} + {top['residual_products']} products{_unconverged(top)}) {on}",
    ]
    if report.get("bottom"):
        bottom = report["bottom"]
        norms = _join(bottom["residual_norms"], ".2g")
        lines.append(
            f"bottom eigenvalues {_join(bottom['eigenvalues'])} (residual norms {norms};"
            f" {bottom['lanczos_products']} + {bottom['residual_products']} products{_unconverged(bottom)}) {on}"
        )
    lines.append(f"trace (Hutch++) {trace['value']:.6g} +- {trace['stderr']:.3g} ({trace['products']} products) {on}")
    pre = report.get("preconditioned") or {}
    if "lambda_max" in pre:
        lines.append(
            f"preconditioned sharpness lambda_max(P^-1 H) {pre['lambda_max']:.6g} against (2 + 2 beta1) / ((1 - beta1)"
            f" lr) = {pre['threshold']:.6g} (lr {pre['lr']:.3g}, beta1 {pre['beta1']:g}):"
            f" {pre['edge_of_stability']:.3g} of the threshold ({pre['lanczos_products']} + 1 products) {on}"
        )
    elif pre:
        lines.append(f"preconditioned sharpness: not measured ({pre['skipped']})")
    lines.append(f"products in all {report['products']['total']} {on}")
    return lines


# ---------------------------------------------------------------------------------------------------- figures
def _density_figure(reports: list[dict[str, Any]], labels: list[str], tag: str) -> Figure:
    """One panel per report, side by side on shared axes, with the top eigenvalues marked."""
    n = len(reports)
    fig = Figure(figsize=(6.4 if n == 1 else 5.0 * n, 4.0), dpi=100)
    axes = fig.subplots(1, n, sharex=True, sharey=True, squeeze=False)[0]
    for ax, report, label in zip(axes, reports, labels, strict=True):
        d = report["density"]
        values = np.asarray(d["density"])
        floor = max(values.max(), 1e-300) * 1e-10  # the Gaussian tails far from every node: not drawn
        ax.semilogy(d["grid"], np.where(values > floor, values, np.nan), lw=1.2)
        for i, lam in enumerate(report["top"]["eigenvalues"]):
            ax.axvline(lam, color="C3", lw=0.7, alpha=0.6, label="top eigenvalues (Lanczos)" if i == 0 else None)
        ax.set_xlabel("eigenvalue")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Hessian spectral density (SLQ) on {tag}", fontsize=10)
    return fig


def _trace_figure(report: dict[str, Any], step: int) -> Figure:
    per = report["trace"]["per_parameter"] or {}
    items = list(per.items())
    if len(items) > _MAX_BARS:
        keep = sorted(items, key=lambda kv: -abs(kv[1]))[: _MAX_BARS - 1]
        kept = {name for name, _ in keep}
        rest = [v for name, v in items if name not in kept]
        items = [kv for kv in items if kv[0] in kept] + [(f"other ({len(rest)} parameters)", sum(rest))]
    fig, ax = new_figure(7.0, max(3.0, 0.2 * len(items) + 1.2))
    names = [name for name, _ in items][::-1]  # the model's first parameter at the top
    values = [value for _, value in items][::-1]
    ax.barh(range(len(items)), values, color=["C0" if v >= 0 else "C3" for v in values])
    ax.set_yticks(range(len(items)), names, fontsize=7)
    ax.axvline(0, color="black", lw=0.6)
    _symlog_if_wide(ax, values)
    trace = report["trace"]
    ax.set_xlabel("trace of the parameter's diagonal block")
    ax.set_title(
        f"Per-parameter Hessian trace, step {step} (total {trace['value']:.4g} ± {trace['stderr']:.2g})\n"
        f"{report['batches']['tag']}, Hutch++ {trace['products']} products",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    return fig


def _landscape_1d_figure(report: dict[str, Any], step: int) -> Figure:
    land, loss0 = report["landscape"], report["loss"]
    lam = report["top"]["eigenvalues"][0]
    fig = Figure(figsize=(10.0, 3.8), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    t = np.asarray(land["eigen_1d"]["t"])
    ax1.plot(t, land["eigen_1d"]["loss"], marker="o", markersize=3, label="loss")
    slope = land["slope_along_v1"]
    ax1.plot(t, loss0 + slope * t + 0.5 * lam * t**2, ls="--", color="black", lw=1,
             label=f"L + (g·v) t + λ t²/2, λ = {lam:.4g}")  # fmt: skip
    ax1.set_xlabel("t (distance along the unit top eigenvector v)")
    ax1.set_ylabel("loss")
    ax1.set_title("along the top Hessian eigenvector", fontsize=10)
    ax1.legend(fontsize=8)
    ax2.plot(land["random_1d"]["alpha"], land["random_1d"]["loss"], marker="o", markersize=3, color="C2")
    ax2.set_xlabel("α (filter-normalized random direction d: θ + α d)")
    ax2.set_title("along a filter-normalized random direction (Li et al. 2018)", fontsize=10)
    for ax in (ax1, ax2):
        ax.axvline(0, color="grey", lw=0.6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Loss landscape (1-D), step {step}, on {report['batches']['tag']}", fontsize=10)
    return fig


def _landscape_2d_figure(report: dict[str, Any], step: int) -> Figure:
    land = report["landscape"]
    panels = []
    if "eigen_2d" in land:
        panels.append((land["eigen_2d"], "top two Hessian eigenvectors", "t1 (along v1)", "t2 (along v2)"))
    panels.append((land["random_2d"], "two filter-normalized random directions", "α (along d1)", "β (along d2)"))
    fig = Figure(figsize=(5.2 * len(panels), 4.3), dpi=100)
    for ax, (grid, title, xlabel, ylabel) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        Z = np.asarray(grid["loss"])
        finite = Z[np.isfinite(Z)]
        levels = np.linspace(finite.min(), finite.max(), 16) if finite.size and finite.max() > finite.min() else 16
        filled = ax.contourf(grid["x"], grid["y"], Z, levels=levels, cmap="viridis")
        ax.contour(grid["x"], grid["y"], Z, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
        ax.plot([0], [0], marker="*", color="red", markersize=9)
        fig.colorbar(filled, ax=ax, label="loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    fig.suptitle(f"Loss landscape (2-D), step {step}, on {report['batches']['tag']} (★: the checkpoint)", fontsize=10)
    return fig


def _symlog_if_wide(ax: Any, values: list[float]) -> None:
    magnitudes = [abs(v) for v in values if v != 0 and math.isfinite(v)]
    if magnitudes and max(magnitudes) > 1000 * min(magnitudes):
        ax.set_xscale("symlog", linthresh=max(magnitudes) / 1000)


# ---------------------------------------------------------------------------------------------------- files
def _save_eigenvectors(report: dict[str, Any], path: Path) -> str:
    """The top-k eigenvectors in the parameters' shapes: key ``v<i>/<parameter name>``, eigenvalues in metadata."""
    from safetensors.torch import save_file

    vectors = report["_eigenvectors"]
    names, shapes = report["_param_names"], report["_param_shapes"]
    sizes = [math.prod(s) for s in shapes]
    tensors = {}
    for i in range(vectors.shape[1]):
        for name, shape, part in zip(names, shapes, vectors[:, i].split(sizes), strict=True):
            tensors[f"v{i}/{name}"] = part.reshape(shape).contiguous().clone()
    metadata = {
        "eigenvalues": json.dumps(report["top"]["eigenvalues"]),
        "checkpoint": report["checkpoint"],
        "global_step": str(report["global_step"]),
        "batches": report["batches"]["description"],
        "format": "key v<i>/<parameter name>: eigenvector i (unit norm over all parameters), in the parameter's shape",
    }
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    out = {"analysis/loss": report["loss"], "analysis/trace": report["trace"]["value"]}
    out.update({f"analysis/eig_{i + 1}": v for i, v in enumerate(report["top"]["eigenvalues"])})
    if report.get("bottom"):
        out["analysis/lambda_min"] = report["bottom"]["eigenvalues"][0]
    pre = report.get("preconditioned") or {}
    if "lambda_max" in pre:
        out["analysis/preconditioned_lambda_max"] = pre["lambda_max"]
        out["analysis/edge_of_stability"] = pre["edge_of_stability"]
    return out


def _public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def _unconverged(result: dict[str, Any]) -> str:
    return "" if result["converged"] else f"; not converged to tol within {result['lanczos_products']} products"


def _join(values: list[float], fmt: str = ".6g") -> str:
    return ", ".join(format(v, fmt) for v in values)


def _markdown(report: dict[str, Any]) -> str:
    top, trace, s = report["top"], report["trace"], report["settings"]
    lines = [
        f"# Curvature report: {report['checkpoint']} (step {report['global_step']})",
        "",
        f"Every number below is measured on {report['batches']['description']}. {report['model']}, "
        f"{report['parameters']:,} parameters, {report['dtype']} on {report['device']}, Hessian-vector products by "
        f"{report['hvp_method']}.",
        "",
        "| quantity | value | products |",
        "|---|---|---|",
        f"| loss | {report['loss']:.6g} | |",
        f"| top {len(top['eigenvalues'])} eigenvalues (Lanczos, tol {s['tol']:g}{_unconverged(top)}) |"
        f" {_join(top['eigenvalues'])} | {top['lanczos_products']} + {top['residual_products']} |",
        f"| their residual norms ‖Hv − λv‖ | {_join(top['residual_norms'], '.2g')} | |",
    ]
    if report.get("bottom"):
        bottom = report["bottom"]
        lines += [
            f"| bottom {len(bottom['eigenvalues'])} eigenvalues{_unconverged(bottom)} |"
            f" {_join(bottom['eigenvalues'])} | {bottom['lanczos_products']} + {bottom['residual_products']} |",
            f"| their residual norms | {_join(bottom['residual_norms'], '.2g')} | |",
        ]
    lines.append(f"| trace (Hutch++) | {trace['value']:.6g} ± {trace['stderr']:.3g} | {trace['products']} |")
    pre = report.get("preconditioned") or {}
    if "lambda_max" in pre:
        lines += [
            f"| preconditioned sharpness λ_max(P⁻¹H) ({pre['optimizer']}, step {pre['optimizer_step']:g}) |"
            f" {pre['lambda_max']:.6g} (residual {pre['residual_norm']:.2g}) | {pre['lanczos_products']} + 1 |",
            f"| its threshold (2 + 2β1)/((1 − β1)·lr), lr {pre['lr']:.3g}, β1 {pre['beta1']:g} |"
            f" {pre['threshold']:.6g} (ratio {pre['edge_of_stability']:.3g}) | |",
        ]
    elif pre:
        lines.append(f"| preconditioned sharpness | not measured: {pre['skipped']} | |")
    d = report["density"]
    lines.append(f"| spectral density (SLQ) | {d['runs']} run(s) x {d['steps']} steps | {d['products']} |")
    lines.append(f"| all Hessian-vector products | | {report['products']['total']} |")
    land = report.get("landscape")
    if land:
        lines.append(
            f"| loss landscapes | eigenvector span ±{land['eigen_span']:.3g}, random span ±{land['span']:g},"
            f" grids {s['grid_1d']} / {s['grid_2d']}x{s['grid_2d']} | {land['loss_evaluations']} loss evaluations |"
        )
    per = trace["per_parameter"] or {}
    largest = sorted(per.items(), key=lambda kv: -abs(kv[1]))[:_TOP_LAYERS_IN_MD]
    lines += ["", f"Largest per-parameter traces ({len(per)} parameters in report.json):", ""]
    lines += ["| parameter | trace |", "|---|---|"] + [f"| `{name}` | {value:.4g} |" for name, value in largest]
    lines += ["", "Figures:", ""]
    lines += [f"![{name}]({name})" for name in report.get("files", []) if name.endswith(".png")]
    times = ", ".join(f"{k} {v:.1f} s" for k, v in report["time_s"].items())
    lines += ["", f"Time: {times}.", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + ".", ""]
    return "\n".join(lines)


def _comparison_markdown(reports: list[dict[str, Any]], labels: list[str]) -> str:
    a, b = reports

    def row(name: str, fa: Any, fb: Any) -> str:
        return f"| {name} | {fa} | {fb} |"

    def pre_text(r: dict[str, Any]) -> str:
        pre = r.get("preconditioned") or {}
        if "lambda_max" in pre:
            return f"{pre['lambda_max']:.6g} / {pre['threshold']:.6g} = {pre['edge_of_stability']:.3g}"
        return "not measured"

    lines = [
        f"# Curvature comparison: {labels[0]} vs {labels[1]}",
        "",
        f"Both measured on {a['batches']['description']}.",
        "",
        f"| quantity | {labels[0]} | {labels[1]} |",
        "|---|---|---|",
        row("loss", f"{a['loss']:.6g}", f"{b['loss']:.6g}"),
        row("top eigenvalues", _join(a["top"]["eigenvalues"], ".4g"), _join(b["top"]["eigenvalues"], ".4g")),
    ]
    if a.get("bottom") and b.get("bottom"):
        lines.append(row("bottom eigenvalues", _join(a["bottom"]["eigenvalues"], ".4g"),
                         _join(b["bottom"]["eigenvalues"], ".4g")))  # fmt: skip
    lines += [
        row("trace (Hutch++)", f"{a['trace']['value']:.5g} ± {a['trace']['stderr']:.2g}",
            f"{b['trace']['value']:.5g} ± {b['trace']['stderr']:.2g}"),
        row("preconditioned λ_max / threshold", pre_text(a), pre_text(b)),
        row("products", a["products"]["total"], b["products"]["total"]),
        "",
        "![spectral densities side by side](spectral_density.png)",
        "",
        "The full reports: `a_*/report.md` and `b_*/report.md` beside this file.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)
