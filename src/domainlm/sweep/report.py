"""Plots, Markdown and self-contained HTML for sweeps and for single runs (`domainlm report RUN`)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from domainlm import outputs
from domainlm.errors import DomainLMError
from domainlm.train.logging import read_log

# what `domainlm report` writes into its --out (a file of the user's under one of these names is refused)
REPORT_OUTPUTS = ("report.md", "report.html", "curve_*.png")


def pyplot():
    from domainlm.plots import pyplot

    return pyplot()


def plot_curves(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    title: str,
    ylabel: str,
    errors: dict[str, list[float]] | None = None,
) -> Path:
    """One line per name; points (x, y); optional error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        if errors and name in errors:
            ax.errorbar(xs, ys, yerr=errors[name], marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def html_page(title: str, blocks: list[tuple[str, object]]) -> str:
    """blocks: ("h2", text) | ("table", (header, rows)) | ("img", path) | ("pre", text) | ("p", text) |
    ("lead", text: the conclusion, set apart) | ("ul", [text, ...])."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}"
        "th{background:#f4f4f4}tr.floor td{background:#fff7e0}"
        "tr.win td{background:#eaf7ea}.lead{font-size:1.2em;border-left:5px solid #2a7;background:#f3fbf6;"
        "padding:.8em 1em}pre{background:#f8f8f8;padding:1em;overflow:auto}.note{color:#555;font-size:.9em}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for kind, content in blocks:
        if kind == "table":
            header, rows = content
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            for r in rows:
                css = " class='floor'" if r[0] == "floor" else " class='win'" if any(c.endswith("*") for c in r) else ""
                parts.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
            parts.append("</table>")
        elif kind == "lead":
            parts.append(f"<p class='lead'>{html.escape(str(content))}</p>")
        elif kind == "note":
            parts.append(f"<p class='note'>{html.escape(str(content))}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(x))}</li>" for x in content) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(Path(content).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(Path(content).name)}' src='data:image/png;base64,{data}'></p>")
        else:
            parts.append(f"<{kind}>{html.escape(str(content))}</{kind}>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report_run(run: str, out: str | None = None, overwrite: bool = False) -> Path:
    """Curves, stats and config of a `pretrain` or `finetune` output folder, as report.md and report.html in a folder
    of their own (default: RUN/report), never over the run's own files."""
    folder = outputs.folder(run, "RUN")
    log = read_log(folder / "log.jsonl")
    if not log:
        if (folder / "log.jsonl").is_file():
            raise DomainLMError(
                f"{folder / 'log.jsonl'} holds no records yet (the run logs its first one after "
                "--logging-freq steps); nothing to report"
            )
        raise DomainLMError(f"{folder} has no log.jsonl: not a `domainlm pretrain` or `finetune` output folder")
    target = Path(out) if out else folder / "report"
    if outputs.inside(folder, target):
        raise DomainLMError(
            f"--out {target} is (or holds) RUN {folder}; the report goes into a folder of its own "
            f"(default: {folder / 'report'})"
        )
    with outputs.run_folder(target, "report", patterns=REPORT_OUTPUTS, overwrite=overwrite) as rf:
        rf.begin()
        blocks: list[tuple[str, object]] = []
        md = [f"# Report: {folder}", ""]
        keys = [
            k
            for k in ("loss", "mlm_loss", "sop_loss", "mlm_acc", "sop_acc", "acc", "accuracy", "f1_micro")
            if any(k in r for r in log)
        ]
        for key in keys:
            series = {
                split: [(r["step"], r[key]) for r in log if r["split"] == split and key in r]
                for split in ("train", "valid")
            }
            png = rf.file(f"curve_{key}.png")
            with rf.writing(png.name):
                plot_curves(series, png, key, key)
            md += [f"![{key}]({png.name})", ""]
            blocks.append(("img", png))
        for name in ("results.json", "metrics.json", "data.json", "stats.json"):
            if (folder / name).is_file():
                text = json.dumps(json.loads((folder / name).read_text(encoding="utf-8")), indent=2, ensure_ascii=False)
                md += [f"## {name}", "", "```json", text, "```", ""]
                blocks += [("h2", name), ("pre", text)]
        if (folder / "config.yaml").is_file():
            text = (folder / "config.yaml").read_text(encoding="utf-8")
            md += ["## config.yaml", "", "```yaml", text, "```"]
            blocks += [("h2", "config.yaml"), ("pre", text)]
        rf.write_text("report.md", "\n".join(md) + "\n")
        rf.write_text("report.html", html_page(f"Report: {folder}", blocks))
    return target / "report.html"
