"""
Pictures of a run, drawn with numpy and PIL (no plotting library at run time).

The plan picture (plans.png of train.py, evaluate.py --eval picture): one row per held-out image,
    image | CLS saliency | ranked regions | the DSeq plan step by step | an I-JEPA plan,
built by masking.py exactly as in training, plus the top-region / object overlap on the synthetic
set (a number that should rise as the saliency learns to find the class object).

    plan_picture(target_encoder, args, path, device) -> {path, size, step_columns, images,
        ranked_regions_per_image, top_region_object_overlap, top_region_object_precision, object_area}

Line charts (learning.png of train.py, the seeds table's curves of seeds.py):

    chart(panels, path)     panels side by side; each a dict with
        title:  str
        series: [(label, (r, g, b), [(step, value), ...]), ...]          lines with dots
        bands:  [(label, (r, g, b), [(step, low, high), ...]), ...]     optional spread (mean +- std)
        levels: [(label, (r, g, b), value), ...]                          dashed horizontal lines
        log:    bool                                                      log-scaled y axis
    learning_panels(rows, levels) -> the two panels of one run: held-out kNN top-1 against step with
        the random-init and raw-pixel levels, and target_std (the collapse signal) against step.

Imports the bottom layer only (data, masking, saliency): evaluate.py and train.py both call it.
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import masking
import saliency

# ----------------------------------------------------------------------------------------------
# The plan picture: saliency, ranked regions, the DSeq plan step by step, an I-JEPA plan

PICTURE_IMAGES = 6  # held-out images (rows) shown; evaluate.py --picture-images
OVERLAP_IMAGES = 256  # held-out images scored for the top-region / object overlap; --overlap-images
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 200, 0], [145, 30, 180],
                    [245, 130, 48], [70, 220, 220], [240, 50, 230]], np.float32)  # R_1, R_2, ...
GREY = np.array([150, 150, 150], np.float32)  # the background region R_N
# "magma"-like colour map, written as 5 anchors and linear interpolation: dark = low saliency
CMAP = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float32)
CONTEXT_TINT = np.array([0, 190, 255], np.float32)  # context, in the DSeq steps and the I-JEPA plan
TARGET_TINT = np.array([255, 215, 0], np.float32)  # DSeq target: yellow stripes, whatever its shape


def stripes(shape, period=6):
    """(H, W) bool diagonal stripes: marks an area as the target without outlining its edge (an
    outline of the background target would trace R_1's edge and make the context look targeted)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy + xx) % period < period // 2


def colormap(v):
    """v (...) in [0, 1] -> (..., 3) float RGB, piecewise linear through CMAP."""
    x = np.clip(v, 0, 1) * (len(CMAP) - 1)
    i = np.minimum(x.astype(int), len(CMAP) - 2)
    f = (x - i)[..., None]
    return CMAP[i] * (1 - f) + CMAP[i + 1] * f


def region_colours(r, N):
    """Region numbers (...) -> (..., 3): R_k gets PALETTE[k-1] (cycled), background (N or 0) grey."""
    colours = PALETTE[(np.maximum(r, 1) - 1) % len(PALETTE)]
    return np.where(((r == N) | (r == 0))[..., None], GREY, colours)


def outline(mask, thickness=2):
    """mask (H, W) bool -> its inner border (H, W) bool, `thickness` pixels wide."""
    inner = mask
    for _ in range(thickness):
        p = np.pad(inner, 1)  # outside the panel counts as "not in the mask": edges get a border
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def plan_maps(plan, P):
    """Plan -> dense per-row maps: context level (R, P) (0 = not context) and target membership
    (R, G + 1, P) bool, [r, g, j] = patch j is a target of group g (group 0 = padding, unused)."""
    R, G = plan.ctx_idx.shape[0], int(plan.tgt_grp.max())
    ctx = torch.zeros(R, P, dtype=torch.long).scatter_reduce(1, plan.ctx_idx, plan.ctx_lvl, "amax")  # (R, P)
    tgt = torch.zeros(R, (G + 1) * P, dtype=torch.bool)
    tgt.scatter_(1, plan.tgt_grp * P + plan.tgt_idx, True)  # (R, (G+1)*P): slot = group * P + patch
    return ctx, tgt.view(R, G + 1, P)  # (R, P), (R, G+1, P)


def object_overlap(regions, masks, p):
    """How well the top region R_1 finds the class object. regions (n, P) of a patch grid (h, w),
    masks (n, h*p, w*p) bool object pixels, p the patch size; a patch is "object" if at least half
    of its pixels are. -> {top_region_object_overlap: share of images whose R_1 shares a patch with
    the object (no R_1 = a miss), top_region_object_precision: mean share of R_1's patches on the
    object, object_area: share of object patches (the precision a random region would get)}."""
    n, h, w = masks.shape[0], masks.shape[1] // p, masks.shape[2] // p
    obj = masks.float().view(n, h, p, w, p).mean((2, 4)).flatten(1) >= 0.5  # (n, P) mostly-object patches
    top = regions == 1  # (n, P)
    hit = (top & obj).sum(1)  # (n,)
    has_top = top.any(1)
    precision = hit[has_top] / top.sum(1)[has_top]  # (n_top,) share of R_1's patches on the object
    return {"top_region_object_overlap": (hit > 0).float().mean().item(),
            "top_region_object_precision": precision.mean().item() if has_top.any() else 0.0,
            "object_area": obj.float().mean().item()}


@torch.no_grad()
def plan_picture(target_encoder, args, path, device):
    """PNG of held-out images, one row each: image | saliency | ranked regions | DSeq steps | I-JEPA.

    The plans come from masking.py exactly as in training (dseq_plan in causal mode with the run's
    order / prediction flags; sample_multiblock + ijepa_plan). On data with object masks (synthetic)
    also scores the first --overlap-images held-out images: a patch is "object" if at least half of
    its pixels are, and an image counts when its top region R_1 shares a patch with the object.
    Returns {path, size, top_region_object_overlap, top_region_object_precision, object_area, ...}.
    """
    n_show = getattr(args, "picture_images", PICTURE_IMAGES)  # train.py's args lack evaluate's flags
    n_score = getattr(args, "overlap_images", OVERLAP_IMAGES)
    one_process = argparse.Namespace(**{**vars(args), "num_workers": 0})  # rank 0 alone calls this
    loader = data.build_eval_loader(one_process, "val", max(n_show, n_score), device=device,
                                    class_to_idx=getattr(args, "class_to_idx", None))  # labels unused
    images, _ = next(iter(loader))  # the first held-out images, eval crop: (n, 3, S, S)
    images = images.to(device)
    n, N, (h, w) = len(images), args.regions, target_encoder.grid
    was_training = target_encoder.training
    target_encoder.eval()
    z = target_encoder.features(images, layers=(args.saliency_layer,))[0].float()  # (n, P, D)
    regions, sal = saliency.discriminative_regions(z, target_encoder.cls_token.float(), grid=(h, w),
                                                   n_regions=N, alpha=args.alpha,
                                                   polarity=args.saliency_polarity)  # (n, P) each
    target_encoder.train(was_training)
    regions, sal = regions.cpu(), sal.float().cpu()
    ranked = regions.masked_fill(regions >= N, 0).amax(1)  # (n,) K, the ranked regions of each image
    stats = {"images": n, "ranked_regions_per_image": ranked.float().mean().item()}

    stats.update(top_region_object_overlap=None, top_region_object_precision=None, object_area=None)
    if hasattr(loader.source, "object_mask"):  # synthetic data knows where the object is
        masks = torch.stack([loader.source.object_mask(i) for i in range(n)])  # (n, S, S)
        stats.update(object_overlap(regions, masks, args.patch_size))

    # --- the plans of the shown images, built by masking.py as in training
    m, gen = min(n_show, n), torch.Generator().manual_seed(args.seed)
    regions, sal, P = regions[:m], sal[:m], h * w
    dplan = masking.dseq_plan(regions, mode="causal", order=args.region_order, prediction=args.prediction,
                              generator=gen, num_regions=N)
    d_ctx, d_tgt = plan_maps(dplan, P)  # (m, P), (m, G+1, P)
    ctx_mask, tgt_masks = masking.sample_multiblock(m, (h, w), gen, n_targets=args.num_targets,
                                                    target_scale=tuple(args.target_scale),
                                                    context_scale=tuple(args.context_scale))
    i_ctx, i_tgt = plan_maps(masking.ijepa_plan(ctx_mask, tgt_masks), P)  # (m, P), (m, M+1, P)

    # --- layout: panels of >= ~128 px (nearest upscaling), a title block above. A row with L
    # non-empty regions has L - 1 DSeq steps; columns no shown row uses are dropped (one is kept for
    # the "I-JEPA fallback" note when no row has a DSeq plan).
    S = images.shape[-1]
    scale = max(1, round(128 / S))
    panel, cell, pad, line = S * scale, args.patch_size * scale, 4, 13
    steps = torch.where(dplan.dseq[:m], dplan.n_regions[:m], 0) - 1  # (m,) DSeq steps per row
    n_steps = max(1, int(steps.max()))
    cols = 3 + n_steps + 1
    title_h = 5 * line + 2 * pad  # 4 lines of legend (short enough for the narrowest picture) + heads
    W, H = pad + cols * (panel + pad), title_h + m * (panel + pad) + pad
    canvas = np.full((H, W, 3), 255, np.float32)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1) * 255
    rgb = (images[:m].cpu() * std + mean).clamp(0, 255).permute(0, 2, 3, 1).numpy()  # (m, S, S, 3)
    up = lambda a, s: a.repeat(s, 0).repeat(s, 1)  # (h, w, ...) -> (h*s, w*s, ...) nearest
    labels = []  # (x, y, text) drawn after the pixels

    def place(row, col, pix):
        y, x = title_h + row * (panel + pad), pad + col * (panel + pad)
        canvas[y:y + panel, x:x + panel] = pix
        return x, y

    for b in range(m):
        img = up(rgb[b], scale)  # (panel, panel, 3)
        dim = 0.3 * img + 40  # what is not context: dark, still readable
        reg = regions[b].numpy().reshape(h, w)  # (h, w)
        place(b, 0, img)
        s = sal[b].numpy()
        place(b, 1, up(colormap((s - s.min()) / (s.max() - s.min() + 1e-6)).reshape(h, w, 3), cell))
        x0, y0 = place(b, 2, 0.4 * img + 0.6 * up(region_colours(reg, N), cell))
        for r in np.unique(reg):  # the number at the region's patch nearest its centroid
            rows_, cols_ = np.nonzero(reg == r)
            j = np.argmin((rows_ - rows_.mean()) ** 2 + (cols_ - cols_.mean()) ** 2)
            labels.append((x0 + (cols_[j] + 0.5) * cell, y0 + (rows_[j] + 0.5) * cell, str(r)))
        # DSeq steps: step k has context = levels 1..k tinted blue, target = the next region striped
        # yellow, the rest dark; the panel names the region numbers drawn (bg = the background R_N)
        L = int(dplan.n_regions[b]) if bool(dplan.dseq[b]) else 0
        name = lambda r: f"{r} (bg)" if r in (0, N) else str(r)
        for k in range(1, n_steps + 1):
            if k >= L:
                place(b, 2 + k, np.full_like(img, 235))
                if k == 1:
                    labels.append((x0 + panel + pad + panel / 2, y0 + panel / 2, "< 2 regions:\nI-JEPA fallback"))
                continue
            ctx_p = ((d_ctx[b] >= 1) & (d_ctx[b] <= k)).numpy()  # (P,) context patches at step k
            tgt_p = d_tgt[b, k + 1].numpy()  # (P,) target patches of step k
            ctx, tgt = up(ctx_p.reshape(h, w), cell), up(tgt_p.reshape(h, w), cell)  # (panel, panel) each
            striped = tgt & stripes(tgt.shape)
            pix = np.where(ctx[..., None], 0.45 * img + 0.55 * CONTEXT_TINT,
                           np.where(striped[..., None], 0.4 * img + 0.6 * TARGET_TINT,
                                    np.where(tgt[..., None], img, dim)))
            x, y = place(b, 2 + k, pix)
            rc = ",".join(name(r) for r in np.unique(reg.reshape(-1)[ctx_p]))
            rt = ",".join(name(r) for r in np.unique(reg.reshape(-1)[tgt_p]))
            labels.append((x + panel / 2, y + 8, f"{rc} -> {rt}"))
        # I-JEPA: context tinted, the M target blocks bright and outlined in PALETTE colours (may overlap)
        ctx = up((i_ctx[b] > 0).numpy().reshape(h, w), cell)
        tgt = up(i_tgt[b, 1:].any(0).numpy().reshape(h, w), cell)
        pix = np.where(ctx[..., None], 0.55 * img + 0.45 * CONTEXT_TINT, np.where(tgt[..., None], img, dim))
        for g in range(1, i_tgt.shape[1]):
            border = outline(up(i_tgt[b, g].numpy().reshape(h, w), cell), 2)
            pix = np.where(border[..., None], PALETTE[(g - 1) % len(PALETTE)], pix)
        place(b, cols - 1, pix)

    im = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    overlap = stats["top_region_object_overlap"]
    legend = [f"DSeq-JEPA plans on held-out images: saliency <q, z_j> of block {args.saliency_layer}, "
              f"N = {N} regions (alpha {args.alpha})",
              f"order '{args.region_order}', {args.prediction} prediction"
              + ("" if overlap is None else f"; R_1 overlaps the object in {100 * overlap:.0f}% of {n} images"),
              "DSeq step k: context tinted blue, target striped yellow, rest dark; the panel names the",
              "regions 'context -> target' (bg = background).  I-JEPA: context blue, target blocks outlined"]
    for i, text in enumerate(legend):
        draw.text((pad, pad + i * line), text, fill=(0, 0, 0))
    heads = ["image", "saliency (min-max)", f"regions 1..{N} ({N} = bg)"]
    heads += [f"DSeq step {k}" for k in range(1, n_steps + 1)] + [f"I-JEPA, {args.num_targets} blocks"]
    for c, text in enumerate(heads):
        draw.text((pad + c * (panel + pad), pad + 4 * line), text, fill=(0, 0, 0))
    for x, y, text in labels:
        draw.multiline_text((x, y), text, fill=(0, 0, 0) if "\n" in text else (255, 255, 255), anchor="mm",
                            align="center", stroke_width=0 if "\n" in text else 2, stroke_fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)
    return {"path": path, "size": [W, H], "step_columns": n_steps, **stats}


# ----------------------------------------------------------------------------------------------
# Line charts: the learning curve and the seeds table's curves

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


def learning_picture(out_dir, method, pixels):
    """OUT_DIR/learning.png from OUT_DIR/metrics.jsonl (train.py's end of run): kNN and target_std
    against step, beside the random-init level (step 0's kNN) and raw pixels' kNN (pixels).
    Returns (path, the metrics rows, the levels drawn as (label, colour, value))."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    levels = [("raw pixels", COLOURS["pixels"], pixels)]
    start = [r["knn_top1"] for r in rows if r.get("step") == 0 and "knn_top1" in r]
    if start:
        levels.insert(0, ("random init (step 0)", COLOURS["random"], start[-1]))
    colour = COLOURS["ijepa" if method == "ijepa" else "dseq"]
    return chart(learning_panels(rows, levels, method, colour), os.path.join(out_dir, "learning.png")), rows, levels
