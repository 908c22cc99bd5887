"""The figures of `curation report`: numpy in, PNG bytes out.

Every figure is drawn on matplotlib's Agg canvas, chosen explicitly (`FigureCanvasAgg` on a bare `Figure`): no
pyplot, no global backend switch, no display, so importing or calling this module changes nothing for other code
in the process. The PNGs carry no timestamp, so the same run folder gives the same bytes.
"""

import io

import numpy as np

DPI = 100
KEPT_COLOUR = "#4878a8"
DROPPED_COLOUR = "#d9a0a0"
BEFORE_COLOUR = "#c06040"
AFTER_COLOUR = "#4878a8"
THRESHOLD_COLOUR = "#404040"
SERIES_COLOURS = ("#4878a8", "#c06040", "#58a058", "#8060a8")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _thousands(value: float) -> str:
    return f"{int(round(value)):,}"


def funnel(labels: list[str], rows_in: list[int], rows_out: list[int], reasons: dict[str, int]) -> bytes:
    """Rows out of each stage (bar) with its drops stacked after it, first stage on top; beside it the rows
    dropped by each reason over the whole run."""
    figure = _figure(11, 0.9 + 0.32 * max(len(labels), len(reasons), 4))
    left, right = figure.subplots(1, 2, width_ratios=(3, 2))
    positions = np.arange(len(labels))
    kept = np.asarray(rows_out, dtype=np.float64)
    dropped = np.maximum(np.asarray(rows_in, dtype=np.float64) - kept, 0)
    left.barh(positions, kept, color=KEPT_COLOUR, label="rows out")
    left.barh(positions, dropped, left=kept, color=DROPPED_COLOUR, label="dropped")
    widest = float((kept + dropped).max()) if len(labels) else 1.0
    for position, value, lost in zip(positions, kept, dropped, strict=True):
        text = _thousands(value) + (f"  (-{_thousands(lost)})" if lost else "")
        left.text(value + lost + widest * 0.01, position, text, va="center", fontsize=8)
    left.set_yticks(positions, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlim(0, max(widest, 1.0) * 1.3)
    left.set_xlabel("rows")
    left.set_title("Rows out of each stage (and rows it dropped)")
    left.legend(loc="lower right", fontsize=8)
    ordered = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    if ordered:
        names = [name for name, _ in ordered]
        counts = np.asarray([count for _, count in ordered], dtype=np.float64)
        places = np.arange(len(names))
        right.barh(places, counts, color=DROPPED_COLOUR)
        for place, count in zip(places, counts, strict=True):
            right.text(count + counts.max() * 0.01, place, _thousands(count), va="center", fontsize=8)
        right.set_yticks(places, names, fontsize=8)
        right.invert_yaxis()
        right.set_xlim(0, counts.max() * 1.25)
    else:
        right.text(0.5, 0.5, "no row was dropped", ha="center", va="center", transform=right.transAxes)
        right.set_yticks([])
    right.set_xlabel("rows dropped")
    right.set_title("Rows dropped by reason (whole run)")
    return _png(figure)


def entry_rank(count_before: np.ndarray, count_after: np.ndarray | None, t: float | None, title: str) -> bytes:
    """MetaCLIP's picture: entry counts sorted in decreasing order against their rank, log-log, before and after
    balancing, with the threshold t as a horizontal line."""
    from matplotlib.ticker import FuncFormatter

    figure = _figure(8, 4.2)
    axes = figure.subplots()
    for counts, colour, label in ((count_before, BEFORE_COLOUR, "before balancing"),
                                  (count_after, AFTER_COLOUR, "after balancing")):
        if counts is None:
            continue
        positive = np.sort(np.asarray(counts, dtype=np.float64)[np.asarray(counts) > 0])[::-1]
        if positive.size:
            axes.plot(np.arange(1, positive.size + 1), positive, color=colour, lw=1.6,
                      label=f"{label} ({positive.size:,} entries, {_thousands(positive.sum())} matches)")
    if t is not None and t > 0:
        axes.axhline(t, color=THRESHOLD_COLOUR, ls="--", lw=1, label=f"t = {t:,.6g}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    axes.yaxis.set_major_formatter(plain)
    axes.set_xlabel("entry rank (1 = most matched)")
    axes.set_ylabel("matches of the entry (c_e)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return _png(figure)


def _shared_bins(series: list[np.ndarray], upper_quantile: float, integer: bool, bins: int) -> np.ndarray:
    values = np.concatenate([s for s in series if s.size]) if any(s.size for s in series) else np.zeros(1)
    high = float(np.quantile(values, upper_quantile)) if values.size else 1.0
    low = float(values.min()) if values.size else 0.0
    if integer:
        high = max(high, low + 1)
        step = max(1, int(np.ceil((high - low + 1) / bins)))
        return np.arange(np.floor(low), np.ceil(high) + step + 1, step) - 0.5
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, bins + 1)


def distributions(panels: list[dict], title: str | None = None) -> bytes:
    """Histograms side by side, one panel per dict: {"series": [(label, values)], "xlabel", "title", optional
    "integer" (integer bins), "threshold" (value, label), "clip" (upper quantile: larger values are counted in the
    last bin)}. Each series is drawn as its share of rows, so that inputs of different sizes compare."""
    figure = _figure(5.2 * len(panels), 3.8)
    axes_list = np.atleast_1d(figure.subplots(1, len(panels)))
    for axes, panel in zip(axes_list, panels, strict=True):
        series = [(label, np.asarray(values, dtype=np.float64)) for label, values in panel["series"]]
        series = [(label, values[np.isfinite(values)]) for label, values in series]
        clip = panel.get("clip", 1.0)
        edges = _shared_bins([values for _, values in series], clip, panel.get("integer", False), 40)
        if not any(values.size for _, values in series):
            axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
        for index, (label, values) in enumerate(series):
            if not values.size:
                continue
            clipped = np.clip(values, edges[0], edges[-1] - 1e-9 * max(1.0, abs(edges[-1])))
            weights = np.full(values.size, 1.0 / values.size)
            axes.hist(clipped, bins=edges, weights=weights, histtype="step", lw=1.8,
                      color=SERIES_COLOURS[index % len(SERIES_COLOURS)],
                      label=f"{label} (n = {values.size:,}, median {np.median(values):.4g})")
        threshold = panel.get("threshold")
        if threshold is not None:
            axes.axvline(threshold[0], color=THRESHOLD_COLOUR, ls="--", lw=1, label=threshold[1])
        axes.set_xlabel(panel["xlabel"] + (f"\n(the last bin holds the values above the {clip:.1%} quantile)"
                                           if clip < 1.0 else ""), fontsize=9)
        axes.set_ylabel("share of rows")
        axes.set_title(panel["title"], fontsize=10)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    return _png(figure)


def group_sizes(panels: list[tuple[str, np.ndarray]]) -> bytes:
    """Histogram of duplicate-group sizes (rows per group, survivor included), one panel per kind of duplicate;
    number of groups on a log axis."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    figure = _figure(4.4 * len(panels), 3.6)
    axes_list = np.atleast_1d(figure.subplots(1, len(panels)))
    for axes, (title, sizes) in zip(axes_list, panels, strict=True):
        sizes = np.asarray(sizes, dtype=np.int64)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("rows in the group (survivor included)")
        axes.set_ylabel("groups")
        if not sizes.size:
            axes.text(0.5, 0.5, "no groups", ha="center", va="center", transform=axes.transAxes)
            continue
        largest = int(sizes.max())
        if largest <= 40:
            values, counts = np.unique(sizes, return_counts=True)
            axes.bar(values, counts, width=0.8, color=KEPT_COLOUR)
            axes.set_xlim(1.4, max(largest, 6) + 0.6)
            axes.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        else:
            edges = np.unique(np.geomspace(2, largest + 1, 30).astype(int))
            axes.hist(sizes, bins=edges, color=KEPT_COLOUR)
            axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_ylim(bottom=0.5)
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else ""))
        axes.text(0.98, 0.95, f"{sizes.size:,} groups, largest {largest:,}", ha="right", va="top",
                  transform=axes.transAxes, fontsize=8)
        axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


def cluster_sizes(sizes: np.ndarray, title: str) -> bytes:
    """Cluster sizes sorted in decreasing order against their rank."""
    figure = _figure(6, 3.4)
    axes = figure.subplots()
    ordered = np.sort(np.asarray(sizes, dtype=np.float64))[::-1]
    axes.bar(np.arange(1, ordered.size + 1), ordered, width=1.0, color=KEPT_COLOUR)
    axes.set_xlabel("cluster rank (1 = largest)")
    axes.set_ylabel("rows in the cluster")
    if ordered.size and ordered[ordered > 0].size and ordered.max() > 50 * max(ordered[ordered > 0].min(), 1):
        axes.set_yscale("log")
    axes.set_title(title, fontsize=10)
    axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


def complexity_quota(complexity: np.ndarray, quota: np.ndarray, size: np.ndarray, title: str) -> bytes:
    """Density-based pruning per cluster: its complexity against its size and the quota it was given."""
    figure = _figure(7.5, 4.2)
    axes = figure.subplots()
    complexity = np.asarray(complexity, dtype=np.float64)
    axes.vlines(complexity, quota, size, color="#dddddd", lw=1.5, zorder=0)
    axes.scatter(complexity, size, s=26, facecolors="none", edgecolors="#999999", label="cluster size (rows in)")
    axes.scatter(complexity, quota, s=18, color=KEPT_COLOUR, label="quota (rows kept)")
    positive = np.concatenate([np.asarray(size, float), np.asarray(quota, float)])
    positive = positive[positive > 0]
    if positive.size and positive.max() > 100 * positive.min():
        axes.set_yscale("log")
    axes.set_xlabel("cluster complexity C = d_inter x d_intra")
    axes.set_ylabel("rows")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def stage_seconds(labels: list[str], seconds: list[float], rows_per_second: list[float | None]) -> bytes:
    """Wall-clock seconds of each stage, first stage on top, with its rows/s written beside the bar."""
    figure = _figure(9, 0.9 + 0.3 * max(len(labels), 4))
    axes = figure.subplots()
    positions = np.arange(len(labels))
    values = np.asarray(seconds, dtype=np.float64)
    axes.barh(positions, values, color=KEPT_COLOUR)
    widest = float(values.max()) if values.size else 1.0
    for position, value, rate in zip(positions, values, rows_per_second, strict=True):
        text = f"{value:,.1f} s" + (f"  ({rate:,.0f} rows in/s)" if rate is not None else "")
        axes.text(value + widest * 0.01, position, text, va="center", fontsize=8)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, max(widest, 1e-3) * 1.35)
    axes.set_xlabel("seconds (wall clock)")
    axes.set_title("Time per stage")
    return _png(figure)
