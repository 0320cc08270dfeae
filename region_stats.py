"""
Region statistics (evaluate.py --eval regions): how many ranked regions R_1..R_K the saliency
extractor finds per image, and which ablation flags of train.py change an image's DSeq plan at all.
A flag that changes no plan cannot change a result, so read an ablation table next to these shares.

    region_statistics(A, grid, alphas, n_regions, seed) -> {alpha: {images, hist, ranked_mean,
        positional_share, differs: {flag: share of images whose plan the flag changes}}}
    plan_steps(plan, n)          the prediction steps of each sample, comparable across plan kinds
    print_region_table(stats, N) the same as a text table

Imports the bottom layer only (saliency, masking); the maps A come from evaluate.saliency_maps.
"""

import torch

import masking
import saliency


# The ablation flags of train.py, each as the dseq_plan / extractor settings it changes. "default" is
# the paper's DSeq-JEPA plan: saliency order, sequential prediction, causal pass, N = --regions.
ABLATIONS = {
    "prediction=flat": dict(prediction="flat"),
    "region-order=reverse": dict(order="reverse"),
    "region-order=random": dict(order="random"),
    "region-order=raster": dict(order="raster"),
    "dseq-pass=replicate": dict(mode="replicate"),
    "regions=3": dict(n_regions=3),
    "regions=7": dict(n_regions=7),
}


def plan_steps(plan, n):
    """The prediction steps of each of n samples, as sets we can compare across plan kinds.

    A step is (T, (C_1, ..., C_j)): T = the patches of one target group (frozenset), C_1..C_j = the
    context patches its prediction sees, split by encoder level in increasing order (frozensets).
    By the level rule a context token of level l is encoded from the context of levels <= l, so the
    tuple fixes both WHAT the prediction sees and HOW the encoder saw it: causal R_1 -> R_2 -> R_3
    predicts R_3 from ([R_1], [R_2]); replicate predicts it from ([R_1 u R_2]), a different step.
    Returns a list of n frozensets of steps (empty for a sample without a DSeq plan, L < 2)."""
    out = [set() for _ in range(n)]
    for r in range(plan.sample.shape[0]):
        ctx = [(i, l) for i, l in zip(plan.ctx_idx[r].tolist(), plan.ctx_lvl[r].tolist()) if l > 0]
        groups = {}  # group -> (level, patches)
        for i, l, g in zip(plan.tgt_idx[r].tolist(), plan.tgt_lvl[r].tolist(), plan.tgt_grp[r].tolist()):
            if l > 0:
                groups.setdefault(g, (l, set()))[1].add(i)
        for level, patches in groups.values():
            seen = sorted({l for _, l in ctx if l < level})
            parts = tuple(frozenset(i for i, l in ctx if l == v) for v in seen)
            out[plan.sample[r].item()].add((frozenset(patches), parts))
    return [frozenset(s) for s in out]


@torch.no_grad()
def region_statistics(A, grid, alphas, n_regions=5, seed=0):
    """Histogram of ranked regions per image and, per ablation flag, the share of plans it changes.

    A: (n, P) raw saliency maps (saliency.saliency_map) of the held-out images, grid (h, w).
    For each alpha (regions = saliency.regions_from_saliency(A, grid, N, alpha)):
      hist[K] = images with K ranked regions R_1..R_K (K = 0..N-1), ranked_mean = mean K;
      differs[flag] = share of images whose set of prediction steps (plan_steps) under that flag
      differs from the default plan's. So an image with K <= 1 is changed by no flag; flat, reverse
      and replicate change every image with K >= 2; regions=3 those with K >= 3, regions=7 those
      with K >= 5; random and raster order those whose ranked regions they reorder.
    positional_share (the same for every alpha): the R^2 of "saliency = a fixed picture", the share
    of the variance of the Eq. 1 maps A~ (n, P) explained by position alone,
    sum_j n (mean_i A~_ij - mean A~)^2 / sum_ij (A~_ij - mean A~)^2. Near 1, the regions are the
    same patches in every image whatever it shows (a positional artefact).
    Returns {alpha: {"images", "hist", "ranked_mean", "positional_share", "differs": {flag: share}}}."""
    n, N = A.shape[0], n_regions
    An = saliency.normalise(A).double()  # (n, P) Eq. 1, what Otsu thresholds
    dev = An - An.mean()  # (n, P)
    between = n * (An.mean(0) - An.mean()).pow(2).sum()  # the per-position mean map's sum of squares
    positional_share = (between / dev.pow(2).sum().clamp_min(1e-12)).item()
    out = {}
    for alpha in alphas:
        regions, _ = saliency.regions_from_saliency(A, grid, N, alpha)  # (n, P)
        K = regions.masked_fill(regions >= N, 0).amax(1)  # (n,) ranked regions per image
        default = plan_steps(masking.dseq_plan(regions, num_regions=N), n)
        differs = {}
        for flag, kw in ABLATIONS.items():
            kw = dict(kw)
            n_reg = kw.pop("n_regions", N)
            if n_reg == N and flag.startswith("regions="):
                continue  # the run's own N: not an ablation here
            r = regions if n_reg == N else saliency.regions_from_saliency(A, grid, n_reg, alpha)[0]
            plan = masking.dseq_plan(r, generator=torch.Generator().manual_seed(seed), num_regions=n_reg, **kw)
            changed = [a != b for a, b in zip(plan_steps(plan, n), default)]
            differs[flag] = sum(changed) / n
        out[alpha] = {"images": n, "hist": torch.bincount(K, minlength=N).tolist(),
                      "ranked_mean": K.float().mean().item(), "positional_share": positional_share,
                      "differs": differs}
    return out


def print_region_table(stats, N):
    """The regions eval as a text table: one row per alpha."""
    flags = list(next(iter(stats.values()))["differs"])
    head = f"{'alpha':>6} {'images':>6} " + " ".join(f"{'K=' + str(k):>6}" for k in range(N)) + f" {'mean K':>7}"
    print("\nranked regions per held-out image (share of images with K ranked regions):\n" + head)
    for alpha, s in stats.items():
        print(f"{alpha:>6g} {s['images']:>6} " + " ".join(f"{c / s['images']:>6.3f}" for c in s["hist"])
              + f" {s['ranked_mean']:>7.3f}")
    share = next(iter(stats.values()))["positional_share"]
    print(f"positional share of the saliency variance (1 = the same map in every image): {share:.3f}")
    print("\nshare of held-out images whose DSeq plan a flag changes:\n"
          + f"{'alpha':>6} " + " ".join(f"{f:>21}" for f in flags))
    for alpha, s in stats.items():
        print(f"{alpha:>6g} " + " ".join(f"{s['differs'][f]:>21.3f}" for f in flags))
