"""PNG plots of an inspect report, drawn with matplotlib (the optional ``plot`` extra).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no global figure state and no
GUI backend, so drawing works headless and in threads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelfuse.analysis.inspect import InspectReport

COSINE_PLOT = "cosine_by_layer.png"
CONFLICT_PLOT = "sign_conflict_by_layer.png"
NORM_PLOT = "norm_by_layer.png"
_DPI = 120


def _tick_label(group: str) -> str:
    return group.removeprefix("layer ") if group.startswith("layer ") else {"embeddings": "emb"}.get(group, group)


def _set_layer_ticks(axes: Any, groups: Sequence[str]) -> None:
    """One tick per group, thinned to about 40 labels for deep models."""
    step = max(1, len(groups) // 40)
    positions = [i for i in range(len(groups)) if i % step == 0 or i == len(groups) - 1]
    axes.set_xticks(positions)
    axes.set_xticklabels([_tick_label(groups[i]) for i in positions], fontsize=8)
    axes.set_xlabel("layer (emb = embeddings, head = final norm and head)")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(figure: Any, path: Path) -> Path:
    # Draw into a temporary sibling and rename, so a crash never leaves a half-written PNG.
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}.png")
    figure.savefig(partial, format="png")
    partial.replace(path)
    return path


def _width(groups: Sequence[str]) -> float:
    return min(24.0, max(7.0, 2.5 + 0.3 * len(groups)))


def cosine_heatmap(report: InspectReport, path: Path) -> Path:
    """Heatmap of pairwise task-vector cosine: one row per expert pair, one column per layer group."""
    layers = report.layers
    groups = list(layers)
    count = len(report.names)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    figure = _figure(_width(groups), 1.6 + 0.45 * max(len(pairs), 1))
    axes = figure.add_subplot()
    if not pairs:
        axes.text(0.5, 0.5, "one expert: no pairwise cosine", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return _save(figure, path)
    values = [[float("nan") if (c := layers[g].cosine[i][j]) is None else c for g in groups] for i, j in pairs]
    # Symmetric colour scale around 0 so sign reads as colour; task-vector cosines are often small.
    finite = [abs(v) for row in values for v in row if v == v]
    bound = max(finite, default=1.0) or 1.0
    image = axes.imshow(values, aspect="auto", cmap="coolwarm", vmin=-bound, vmax=bound, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="cosine similarity")
    axes.set_yticks(range(len(pairs)))
    axes.set_yticklabels([f"{report.names[i]} · {report.names[j]}" for i, j in pairs], fontsize=8)
    if len(groups) <= 40 and len(pairs) <= 15:
        for row, line in enumerate(values):
            for column, value in enumerate(line):
                if value == value:
                    label = f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.2g}"
                    colour = "white" if abs(value) > 0.6 * bound else "black"
                    axes.text(column, row, label, ha="center", va="center", fontsize=7, color=colour)
    _set_layer_ticks(axes, groups)
    axes.set_title("pairwise cosine similarity of task vectors per layer")
    return _save(figure, path)


def conflict_plot(report: InspectReport, path: Path) -> Path:
    """Sign-conflict rate (after TIES trimming) and overlap of the kept entries, by depth."""
    layers = report.layers
    groups = list(layers)
    figure = _figure(_width(groups), 3.8)
    axes = figure.add_subplot()
    positions = range(len(groups))
    nan = float("nan")
    conflict = [nan if (v := layers[g].sign_conflict_rate) is None else v for g in groups]
    overlap = [nan if (v := layers[g].overlap) is None else v for g in groups]
    axes.plot(positions, conflict, marker="o", label="sign-conflict rate (among entries kept by >= 2 experts)")
    axes.plot(positions, overlap, marker=".", linestyle=":", label="overlap (share of entries kept by >= 2 experts)")
    if len(report.names) == 2:
        axes.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="0.5: signs unrelated (2 experts)")
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("fraction of entries")
    _set_layer_ticks(axes, groups)
    axes.set_title(f"sign conflicts after TIES trimming at density {report.density:g}")
    axes.legend(fontsize=8, loc="upper right")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def norm_plot(report: InspectReport, path: Path) -> Path:
    """Task-vector L2 norm per expert, and the same relative to the base norm, by depth."""
    layers = report.layers
    groups = list(layers)
    figure = _figure(_width(groups), 6.0)
    top, bottom = figure.subplots(2, 1, sharex=True)
    positions = range(len(groups))
    nan = float("nan")
    for index, name in enumerate(report.names):
        top.plot(positions, [layers[g].norms[index] for g in groups], marker="o", label=name)
        relative = [nan if (v := layers[g].relative_norms[index]) is None else v for g in groups]
        bottom.plot(positions, relative, marker="o", label=name)
    top.set_ylabel("|tau| (L2)")
    top.set_title("task-vector norm by layer")
    bottom.axhline(report.relative_norm_threshold, color="red", linestyle="--", linewidth=1,
                   label=f"warning threshold {report.relative_norm_threshold:g}")
    bottom.set_ylabel("|tau| / |base|")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    _set_layer_ticks(bottom, groups)
    return _save(figure, path)


def write_plots(report: InspectReport, folder: Path) -> list[Path]:
    """Write the three PNG plots into ``folder`` (which must exist); returns their paths.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    return [cosine_heatmap(report, folder / COSINE_PLOT), conflict_plot(report, folder / CONFLICT_PLOT),
            norm_plot(report, folder / NORM_PLOT)]
