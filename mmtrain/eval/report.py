"""What an evaluation leaves behind for people: a console table, a metric-vs-CFG plot and a
self-contained folder with ``report.html`` (images as PNG files next to it)."""
from __future__ import annotations

import html
import math
from pathlib import Path

from mmtrain.atomic import atomic_write_text


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def config_yaml(cfg) -> str:
    import json

    import yaml

    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


def print_table(title: str, columns: list[str], rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*(format_value(row.get(c)) for c in columns))
    Console(width=200).print(table)


def plot_against_cfg(rows: list[dict], metrics: list[str], path: Path, title: str = "") -> Path | None:
    """One panel per metric, one line per AR step count, CFG scale on x. None when no metric has values."""
    metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for steps in sorted({r["ar_steps"] for r in rows}):
            pts = sorted((r["cfg_scale"], r[metric]) for r in rows if r["ar_steps"] == steps and r.get(metric) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"S={steps}")
        ax.set_xlabel("CFG scale")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(title="AR steps")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:200px}figure img{width:192px;image-rendering:pixelated;border:1px solid #ddd}
figcaption{font-size:12px;line-height:1.3}.ok{color:#17702a}.bad{color:#b3261e}pre{background:#f7f7f7;padding:8px;overflow:auto}
.unavailable{color:#8a5a00}"""


class HtmlReport:
    """Sections appended in order, written once with :meth:`write`."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def facts(self, items: dict) -> None:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                       for k, v in items.items())
        self.parts.append(f"<table>{rows}</table>")

    def table(self, columns: list[str], rows: list[dict]) -> None:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(r.get(c)))}</td>" for c in columns) + "</tr>"
                       for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def unavailable(self, reasons: dict[str, str]) -> None:
        if reasons:
            items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in reasons.items())
            self.parts.append(f"<p class='unavailable'>Not computed:</p><ul class='unavailable'>{items}</ul>")

    def image(self, src: str, alt: str) -> None:
        self.parts.append(f"<p><img src='{html.escape(src)}' alt='{html.escape(alt)}'></p>")

    def gallery(self, items: list[tuple[str, list[tuple[str, str]]]]) -> None:
        """``items``: (image file relative to the report, [(text, css class), ...] lines under it)."""
        figures = []
        for src, lines in items:
            text = "<br>".join(f"<span class='{c}'>{html.escape(t)}</span>" if c else html.escape(t) for t, c in lines)
            figures.append(f"<figure><img src='{html.escape(src)}'><figcaption>{text}</figcaption></figure>")
        self.parts.append(f"<div class='grid'>{''.join(figures)}</div>")

    def preformatted(self, title: str, text: str) -> None:
        self.parts.append(f"<details><summary>{html.escape(title)}</summary><pre>{html.escape(text)}</pre></details>")

    def write(self, path: Path) -> Path:
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>")
        atomic_write_text(path, doc)
        return path
