"""A finished sweep's results as a table (the floor's row, raw and Holm-adjusted p-values, each seed's value beside
the mean) and as plots (the metric by pretraining step, the pretraining curves); summary.py decides and words the
conclusion around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domainlm.outputs import Writer
from domainlm.sweep.report import plot_curves
from domainlm.train.logging import read_log


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def pval(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def table(cfg, results: list[dict], floor: dict | None, split: str) -> tuple[list[str], list[list[str]], list[list]]:
    primary, others = cfg.metrics[0], cfg.metrics[1:]
    group_names = sorted({g for r in results for g in r["per_group"]}) if cfg.groups else []
    header = [
        "model",
        "checkpoint",
        f"{primary} mean ± std",
        "per seed",
        *others,
        "Δ vs base",
        "p",
        "p (Holm)",
        *[f"{g} accuracy" for g in group_names],
    ]
    csv_header = [
        "model",
        "checkpoint",
        "step",
        *[f"{m}_{k}" for m in cfg.metrics for k in ("mean", "std")],
        "per_seed",
        "difference_vs_base",
        "p_value",
        "p_holm",
        "beats_base",
        "best",
        *[f"group_{g}" for g in group_names],
        "failed_seeds",
    ]
    rows, csv_rows = [], [csv_header]
    for r in results:
        vs = r.get("vs_base", {})
        if primary in r:
            seeds = " ".join(pct(v) for v in r["values"][primary])
            if r["failed_seeds"]:
                seeds += f" (failed: seed {', '.join(map(str, r['failed_seeds']))})"
            cells = [
                f"{pct(r[primary]['mean'])} ± {pct(r[primary]['std'])}",
                seeds,
                *[f"{pct(r[m]['mean'])} ± {pct(r[m]['std'])}" for m in others],
            ]
        else:
            cells = ["failed", "", *["" for _ in others]]
        cells += [
            f"{100 * vs['metric_difference']:+.1f}" if "metric_difference" in vs else "",
            pval(vs["p_value"]) if vs else "",
            (pval(vs["p_holm"]) + ("*" if vs["win"] else "†" if vs.get("loss") else "")) if vs else "",
        ]
        cells += [pct(r["per_group"][g]) if g in r["per_group"] else "" for g in group_names]
        rows.append([r["model"], ("★ " if r.get("star") else "") + r["checkpoint"], *cells])
        csv_rows.append(
            [
                r["model"],
                r["checkpoint"],
                r["step"],
                *[r.get(m, {}).get(k, "") for m in cfg.metrics for k in ("mean", "std")],
                " ".join(f"{v:.6f}" for v in r["values"][primary]),
                vs.get("difference", ""),
                vs.get("p_value", ""),
                vs.get("p_holm", ""),
                vs.get("win", ""),
                bool(r.get("star")),
                *[r["per_group"].get(g, "") for g in group_names],
                " ".join(map(str, r["failed_seeds"])),
            ]
        )
    for r in results:  # the blends: Δ and p against the model alone
        b, vs = r.get("blend", {}), r.get("blend", {}).get("vs_model", {})
        if primary in b:
            rows.append(
                [
                    f"{r['model']} + floor",
                    r["checkpoint"],
                    f"{pct(b[primary]['mean'])} ± {pct(b[primary]['std'])}",
                    " ".join(pct(v) for v in b["values"][primary]),
                    *[f"{pct(b[m]['mean'])} ± {pct(b[m]['std'])}" if m in b else "" for m in others],
                    f"{100 * vs['difference']:+.1f}" if vs else "",
                    pval(vs["p_value"]) if vs else "",
                    (pval(vs["p_holm"]) + ("*" if vs["win"] else "")) if vs else "",
                    *["" for _ in group_names],
                ]
            )
    blended = next((r["blend"] for r in results if primary in r.get("blend", {}).get("floor", {})), None)
    if blended:  # the floors the blends were mixed with: each seed's own rows
        f = blended["floor"]
        rows.append(
            [
                "floor, per seed",
                "each cell's own rows (what its blend mixes in)",
                f"{pct(f[primary]['mean'])} ± {pct(f[primary]['std'])}",
                " ".join(pct(v) for v in blended["floor_values"][primary]),
                *[f"{pct(f[m]['mean'])} ± {pct(f[m]['std'])}" if m in f else "" for m in others],
                "",
                "",
                "",
                *["" for _ in group_names],
            ]
        )
    if floor:
        m = floor[split]
        per_group = m.get("per_group", {})
        rows.append(
            [
                "floor",
                floor["method"],
                pct(m[primary]),
                "(deterministic)",
                *[pct(m[x]) for x in others],
                "",
                "",
                "",
                *[pct(per_group[g]["accuracy"]) if g in per_group else "" for g in group_names],
            ]
        )
        csv_rows.append(
            [
                "floor",
                floor["method"],
                "",
                *[v for x in cfg.metrics for v in (m[x], 0.0)],
                "",
                "",
                "",
                "",
                "",
                "",
                *[per_group.get(g, {}).get("accuracy", "") for g in group_names],
                "",
            ]
        )
    return header, rows, csv_rows


def plots(cfg, results: list[dict], floor: dict | None, split: str, out: Writer) -> list[Path]:
    from domainlm.sweep.report import pyplot

    plt = pyplot()
    primary = cfg.metrics[0]
    fig, ax = plt.subplots(figsize=(8, 5))
    models = list(dict.fromkeys(r["model"] for r in results))
    steps = sorted({r["step"] for r in results})
    spread = (max(steps) - min(steps) or 1) * 0.012
    for model in models:
        points = sorted((r["step"], r) for r in results if r["model"] == model and primary in r)
        if not points:
            continue
        xs = [s for s, _ in points]
        line = ax.errorbar(
            xs,
            [100 * r[primary]["mean"] for _, r in points],
            yerr=[100 * r[primary]["std"] for _, r in points],
            marker="o",
            capsize=4,
            label=f"{model}: mean ± std",
        )
        for s, r in points:
            values = r["values"][primary]
            offsets = (np.arange(len(values)) - (len(values) - 1) / 2) * spread + spread * 1.5
            ax.scatter(
                s + offsets,
                [100 * v for v in values],
                s=14,
                alpha=0.6,
                color=line[0].get_color(),
                label=f"{model}: each seed" if s == xs[0] else None,
            )
            if r.get("star"):
                ax.annotate(
                    "★",
                    (s, 100 * r[primary]["mean"]),
                    textcoords="offset points",
                    xytext=(0, 8),
                    ha="center",
                    fontsize=14,
                )
    if floor:
        ax.axhline(100 * floor[split][primary], color="#c70", linestyle="--", label=f"floor: {floor['method']}")
    ax.set_title(f"{primary} on {split} by pretraining step (step 0: base model)")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(f"{primary} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    path = out.file("metric_vs_step.png")
    with out.writing(path.name):
        fig.savefig(path, dpi=100)
    plt.close(fig)
    images = [path]
    losses = {}
    for spec in cfg.models:
        folder = (spec.pretrain or {}).get("out") or spec.snapshots
        if spec.pretrain is not None and not folder:
            folder = str(out.root() / "pretrain" / spec.name)
        if isinstance(folder, str) and (Path(folder) / "log.jsonl").is_file():
            rows = read_log(Path(folder) / "log.jsonl", "train")
            losses[spec.name] = [(r["step"], r.get("mlm_loss", r["loss"])) for r in rows]
    if any(losses.values()):
        path = out.file("pretraining_loss.png")
        with out.writing(path.name):
            images.append(plot_curves(losses, path, "pretraining MLM loss (training batches)", "mlm_loss"))
    return images
