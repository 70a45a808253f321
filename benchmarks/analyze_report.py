"""Time and Hessian-vector products of one ``lightning-gd analyze`` report against PyHessian 0.1 on the same model
and batch.

Ours: ``analyze(--config CONFIG --ckpt_path CKPT [ANALYSIS ARGS])`` in this process (its report's products and
phase times). PyHessian (Yao et al. 2020; pip ``pyhessian``, the ``bench`` extra): ``eigenvalues(top_n=5)``,
``trace()`` and ``density()`` with their defaults (maxIter=100, tol=1e-3; iter=100) on the same module, loaded with
the same checkpoint, and the same batch (the report's first training batch), in eval mode; its products are counted
by wrapping ``pyhessian.hessian.hessian_vector_product``. PyHessian runs twice: as it is, and inside
``sdpa_kernel(SDPBackend.MATH)`` (the attention kernel our operator switches to: the fused CPU kernel has no double
backward). A training step (forward + backward of the module's ``training_step`` on the batch) is timed in the same
run, so that every time is also given in training steps (ratios are what survives a loaded machine).

Commands (2-core CPU)::

    python benchmarks/analyze_report.py --config quickstart --ckpt runs/quickstart/version_0/checkpoints/last.ckpt \\
        --out benchmarks/figures/analyze_report_quickstart.json
    python benchmarks/analyze_report.py --config llama-125m --ckpt CKPT --out ... -- --data.seq_len 64 ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from _harness import counted_pyhessian
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_gd.analysis import analyze
from lightning_gd.analysis.run import AnalysisSettings, _AnalyzeCLI, _draw_batches, _load, _load_weights
from lightning_gd.callbacks._curvature import _training_step_loss
from lightning_gd.cli import _resolve_config_names


def build(config: str, ckpt: str, extra: list[str]):
    """The module (with the checkpoint's weights) and the report's first batch, as ``analyze`` builds them."""
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = _AnalyzeCLI(args=_resolve_config_names(["--config", config, "--ckpt_path", ckpt, *extra]), run=False,
                          save_config_callback=None)  # fmt: skip
    finally:
        sys.argv = saved
    model = cli.model
    cli.trainer.strategy.connect(model)
    model.trainer = cli.trainer
    cli.trainer.strategy.precision_plugin.convert_module(model)
    _load_weights(model, _load(ckpt))
    settings = AnalysisSettings(num_batches=1, seed=int(dict(cli.config["analysis"]).get("seed", 0)))
    batch = _draw_batches(cli.datamodule, model, settings)[0]
    return model, batch


def time_training_step(model, batch, repeats: int = 5) -> float:
    model.train()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = _training_step_loss(model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def run_pyhessian(model, batch, math_kernel: bool) -> dict:
    def criterion(logits, targets):
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())

    x, y = batch
    out: dict = {"math_kernel": math_kernel}
    torch.manual_seed(0)
    try:
        with counted_pyhessian() as (ph, count), sdpa_kernel(SDPBackend.MATH) if math_kernel else _nothing():
            start = time.perf_counter()
            try:
                h = ph.hessian(model, criterion, data=(x, y), cuda=False)
            except Exception as err:  # noqa: BLE001 - recorded: PyHessian failing is a result
                out["init"] = {"error": f"{type(err).__name__}: {err}"[:300]}
                return out
            out["init"] = {"time_s": time.perf_counter() - start}
            calls = {
                "eigenvalues(top_n=5)": lambda: h.eigenvalues(top_n=5)[0],
                "trace()": lambda: h.trace(),
                "density()": lambda: h.density(),
            }
            for name, call in calls.items():
                count[0] = 0
                start = time.perf_counter()
                try:
                    value = call()
                    entry = {"time_s": time.perf_counter() - start, "products": count[0]}
                    if name.startswith("eigenvalues"):
                        entry["values"] = [float(v) for v in value]
                    elif name == "trace()":
                        entry["value"] = float(sum(value) / len(value))
                        entry["probes"] = len(value)
                except Exception as err:  # noqa: BLE001
                    entry = {"error": f"{type(err).__name__}: {err}"[:300], "time_s": time.perf_counter() - start,
                             "products": count[0], "trace": traceback.format_exc(limit=2)[-300:]}  # fmt: skip
                out[name] = entry
                print(f"PyHessian{' (math kernel)' if math_kernel else ''} {name}: {entry}", flush=True)
    finally:
        model.zero_grad(set_to_none=True)
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-pyhessian-math", action="store_true", help="only PyHessian as it is")
    parser.add_argument("--skip-ours", action="store_true", help="only the training step and PyHessian")
    parser.add_argument("extra", nargs="*", help="overrides for the config and --analysis.* (after --)")
    args = parser.parse_args()
    load = os.getloadavg()
    result: dict = {"config": args.config, "checkpoint": args.ckpt, "overrides": args.extra, "load_before": load}
    model, batch = build(args.config, args.ckpt, args.extra)
    result["parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["batch_shape"] = list(batch[0].shape)
    step = time_training_step(model, batch)
    result["training_step_s"] = step
    print(f"training step {step:.3f} s (load {load})", flush=True)
    del model, batch  # one copy of the model at a time (llama-125m: the analysis holds its own and its vectors)
    gc.collect()

    if args.skip_ours:
        model, batch = build(args.config, args.ckpt, args.extra)
        result["pyhessian"] = run_pyhessian(model, batch, math_kernel=False)
        if not args.skip_pyhessian_math:
            result["pyhessian_math_kernel"] = run_pyhessian(model, batch, math_kernel=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    start = time.perf_counter()
    report = analyze(["--config", args.config, "--ckpt_path", args.ckpt, "--trainer.enable_progress_bar", "false",
                      *args.extra])  # fmt: skip
    ours = time.perf_counter() - start
    result["ours"] = {
        "wall_s": ours, "wall_in_training_steps": ours / step, "phases_s": report["time_s"],
        "products": report["products"], "loss_evaluations": (report.get("landscape") or {}).get("loss_evaluations", 0),
        "top": report["top"]["eigenvalues"], "trace": [report["trace"]["value"], report["trace"]["stderr"]],
        "settings": report["settings"],
    }  # fmt: skip
    product_s = sum(v for k, v in report["time_s"].items() if k != "landscape") / report["products"]["total"]
    result["ours"]["seconds_per_product"] = product_s
    result["ours"]["product_in_training_steps"] = product_s / step
    print(json.dumps(result["ours"], indent=1), flush=True)

    model, batch = build(args.config, args.ckpt, args.extra)  # fresh: the analysis moved nothing, but be sure
    result["pyhessian"] = run_pyhessian(model, batch, math_kernel=False)
    if not args.skip_pyhessian_math:
        result["pyhessian_math_kernel"] = run_pyhessian(model, batch, math_kernel=True)
    result["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
