"""
Line charts as PNG files, drawn with PIL (no plotting library at run time): the learning curve a
run writes beside plans.png (train.py), and the seeds table's curves (seeds.py).

    chart(panels, path)     panels side by side; each a dict with
        title:  str
        series: [(label, (r, g, b), [(step, value), ...]), ...]          lines with dots
        bands:  [(label, (r, g, b), [(step, low, high), ...]), ...]     optional spread (mean +- std)
        levels: [(label, (r, g, b), value), ...]                          dashed horizontal lines
        log:    bool                                                      log-scaled y axis
    learning_panels(rows, levels) -> the two panels of one run: held-out kNN top-1 against step with
        the random-init and raw-pixel levels, and target_std (the collapse signal) against step.
"""

import math

from PIL import Image, ImageDraw

W, H, PAD = 420, 300, 46  # one panel; PAD holds the axis labels
INK, GRID = (40, 40, 40), (225, 225, 225)
COLOURS = {"dseq": (200, 60, 40), "ijepa": (40, 90, 200), "random": (120, 120, 120), "pixels": (40, 150, 70)}


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _panel(p):
    """One panel as a PIL image: axes, grid, levels, bands, series and a legend."""
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    log = p.get("log", False)
    f = (lambda v: math.log10(max(v, 1e-6))) if log else (lambda v: v)
    points = [(x, y) for _, _, s in p["series"] for x, y in s]
    points += [(x, v) for _, _, b in p.get("bands", []) for x, lo, hi in b for v in (lo, hi)]
    xs = [x for x, _ in points] or [0, 1]
    ys = [f(y) for _, y in points] + [f(v) for _, _, v in p.get("levels", [])]
    x0, x1 = 0, max(max(xs), 1)
    y0, y1 = min(ys or [0]), max(ys or [1])
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 1, y1 + 1
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    left, right, top, bottom = PAD, W - 10, 24, H - PAD + 12
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (f(y) - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    for t in _ticks(y0, y1):
        yy = bottom - (t - y0) / (y1 - y0) * (bottom - top)
        d.line([(left, yy), (right, yy)], fill=GRID)
        d.text((4, yy - 6), f"{10 ** t:.3g}" if log else f"{t:g}", fill=INK)
    for t in _ticks(x0, x1):
        d.line([(px(t), bottom), (px(t), bottom + 4)], fill=INK)
        d.text((px(t) - 10, bottom + 6), f"{t:g}", fill=INK)
    d.rectangle([left, top, right, bottom], outline=INK)
    d.text((left, 6), p["title"], fill=INK)
    d.text((right - 30, bottom + 20), "step", fill=INK)
    legend = []
    for label, colour, value in p.get("levels", []):
        y = py(value)
        for a in range(int(left), int(right), 10):  # dashed
            d.line([(a, y), (min(a + 5, right), y)], fill=colour, width=2)
        legend.append((f"{label} {value:.3g}", colour))
    for label, colour, band in p.get("bands", []):
        if len(band) > 1:
            light = tuple(int(c + (255 - c) * 0.75) for c in colour)
            poly = [(px(x), py(hi)) for x, _, hi in band] + [(px(x), py(lo)) for x, lo, _ in reversed(band)]
            d.polygon(poly, fill=light)
    for label, colour, series in p["series"]:
        pts = [(px(x), py(y)) for x, y in series]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        if series:
            legend.append((f"{label} {series[-1][1]:.3g}", colour))
    for i, (text, colour) in enumerate(legend):  # top left, inside the axes
        d.rectangle([left + 6, top + 6 + 12 * i, left + 14, top + 14 + 12 * i], fill=colour)
        d.text((left + 18, top + 4 + 12 * i), text, fill=INK)
    return im


def chart(panels, path):
    """Draw panels side by side into one PNG at path; returns path."""
    ims = [_panel(p) for p in panels]
    out = Image.new("RGB", (W * len(ims), H), "white")
    for i, im in enumerate(ims):
        out.paste(im, (i * W, 0))
    out.save(path)
    return path


def learning_panels(rows, levels, label="trained", colour=COLOURS["dseq"]):
    """The learning curve of one run from its metrics.jsonl rows: kNN top-1 (rows with knn_top1)
    against step, with levels [(label, colour, kNN)] (random init, raw pixels) as dashed lines, and
    target_std (rows with target_std) against step on a log axis."""
    knn = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    std = [(r["step"], r["target_std"]) for r in rows if "target_std" in r]
    return [{"title": "held-out kNN top-1 (%), target encoder", "series": [(label, colour, knn)], "levels": levels},
            {"title": "target_std (spread of pooled targets; -> 0 = collapse)", "series": [(label, colour, std)],
             "log": True}]
