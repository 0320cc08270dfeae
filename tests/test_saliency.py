"""saliency.py against the official OpenCV pipeline (tests/opencv_reference.py) and the paper.

Claims tested: Eq. 1-3 give the same regions as the per-image OpenCV extractor on every map; the
Otsu search is OpenCV's; the batched 8-connected components are cv2's partition for any input,
including shapes that need the most hooking rounds; the output convention (ranks 1..K, background
N) and the area filter hold; degenerate maps give no NaN; nothing reads tensor data on the host.
"""
import sys
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # repo root: `import saliency`
import saliency  # noqa: E402
from opencv_reference import opencv_regions_reference, opencv_threshold  # noqa: E402

GRIDS = [(4, 4), (5, 7), (7, 5), (8, 8), (10, 16), (14, 14), (16, 9), (20, 20), (24, 12), (32, 32)]


# ---------------------------------------------------------------- exact Otsu helpers (Python ints)
def otsu_optimal_levels(u8):
    """All levels i whose between-class variance is the exact maximum ([] for a constant map)."""
    hist = np.bincount(u8.ravel(), minlength=256).tolist()
    P, T = u8.size, sum(i * n for i, n in enumerate(hist))
    c = s = 0
    best, levels = (0, 1), []
    for i, n in enumerate(hist):
        c, s = c + n, s + i * n
        if c == 0 or c == P:
            continue
        num, den = (s * P - c * T) ** 2, c * (P - c)
        if num * best[1] > best[0] * den:
            best, levels = (num, den), [i]
        elif num * best[1] == best[0] * den:
            levels.append(i)
    return levels


def otsu_is_tie(u8):
    """True when two optimal levels give different foregrounds: OpenCV's pick is rounding noise."""
    levels = otsu_optimal_levels(u8)
    return bool(levels) and bool(((u8 > levels[0]) & (u8 <= levels[-1])).any())


def lowest_level_threshold(u8):
    levels = otsu_optimal_levels(u8)
    t = levels[0] if levels else 0
    return t, (u8 > t).astype(np.uint8) * 255


@contextmanager
def opencv_ipp(enabled):
    """cv2's Otsu runs Intel IPP when available; its C path is the algorithm in thresh.cpp."""
    old = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(enabled)
    try:
        yield
    finally:
        cv2.ipp.setUseIPP(old)


def same_partition(a, b):
    """a, b: (h, w) labellings with 0 = background. True if they split the pixels identically."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist()))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def u8_maps(A, grid):
    """The Eq. 2 8-bit maps exactly as the reference computes them, (B, h, w) uint8."""
    lo, hi = A.min(1, keepdims=True), A.max(1, keepdims=True)
    return ((A - lo) / (hi - lo + 1e-6) * 255).astype(np.uint8).reshape(-1, *grid)


# ---------------------------------------------------------------- saliency maps (float32, (B, P))
def smooth_maps(rng, n, h, w):                                       # blurred noise: big blobs
    x = rng.standard_normal((n, h, w))
    sig = rng.uniform(0.7, 3.0, n)
    return np.stack([gaussian_filter(x[i], sig[i], mode='wrap') for i in range(n)]).reshape(n, -1)


def noise_maps(rng, n, h, w):                                        # white noise: many specks
    return rng.standard_normal((n, h * w)) * rng.uniform(0.1, 10, (n, 1))


def quantised_maps(rng, n, h, w):                                    # few values: exact ties
    x = smooth_maps(rng, n, h, w)
    x = (x - x.min(1, keepdims=True)) / np.ptp(x, 1, keepdims=True)
    levels = rng.integers(2, 7, (n, 1))
    return np.round(x * levels) / levels


def twin_blob_maps(rng, n, h, w):                                    # equal-score twin regions
    out = np.zeros((n, h, w))
    for i in range(n):
        bh, bw = max(2, h // 2 - 1), max(1, w // 2 - 1)
        blob = rng.uniform(0.2, 1.0, (bh, bw)) * (rng.random((bh, bw)) < 0.9)
        out[i, :bh, :bw] = blob                                      # top-left copy ...
        out[i, h - bh:, w - bw:] = blob                              # ... and bottom-right twin
    return out.reshape(n, -1)


def constant_maps(rng, n, h, w):
    return np.repeat(rng.uniform(-5, 5, (n, 1)), h * w, 1)


def single_pixel_maps(rng, n, h, w):
    out = np.zeros((n, h * w))
    out[np.arange(n), rng.integers(0, h * w, n)] = rng.choice([-1.0, 1.0], n)  # bright or dark
    return out


KINDS = dict(smooth=smooth_maps, noise=noise_maps, quantised=quantised_maps,
             twins=twin_blob_maps, constant=constant_maps, single=single_pixel_maps)


def ours(A, grid, n_regions=5, alpha=0.15):
    regions, sal = saliency.regions_from_saliency(torch.from_numpy(A), grid, n_regions, alpha)
    return regions.numpy(), sal.numpy()


# ---------------------------------------------------------------- Eq. 1-3 parity with OpenCV
PARITY_SETTINGS = [(5, 0.15), (3, 0.05), (7, 0.02), (5, 0.0)]


def opencv_parity(n_regions, alpha):
    """Batched regions vs the per-image OpenCV extractor on every kind of map and grid.
    -> {agree, total, otsu_ties, ties_where_cv2_picked_our_level} (maps)."""
    rng = np.random.default_rng(n_regions * 100 + int(alpha * 100))
    per_kind = 24 if (n_regions, alpha) == (5, 0.15) else 4              # 1440 + 3 x 240 maps
    total = agree = ties = tie_agree_cv2 = 0
    for grid in GRIDS:
        A = np.concatenate([make(rng, per_kind, *grid) for make in KINDS.values()])
        A = A.astype(np.float32)
        got, _ = ours(A, grid, n_regions, alpha)
        with opencv_ipp(False):                                          # OpenCV's C algorithm
            want = opencv_regions_reference(A, grid, n_regions, alpha)
        tie = np.array([otsu_is_tie(u) for u in u8_maps(A, grid)])
        # On an exact Otsu tie OpenCV's level is float noise; we take the lowest optimal level.
        if tie.any():
            pinned = opencv_regions_reference(A[tie], grid, n_regions, alpha,
                                              threshold=lowest_level_threshold)
            tie_agree_cv2 += int((want[tie] == got[tie]).all(1).sum())
            want[tie] = pinned
        total, ties = total + len(A), ties + int(tie.sum())
        agree += int((got == want).all(1).sum())
    return {"agree": agree, "total": total, "otsu_ties": ties, "ties_where_cv2_picked_our_level": tie_agree_cv2}


@pytest.mark.parametrize('n_regions, alpha', PARITY_SETTINGS)
def test_regions_match_opencv_pipeline(n_regions, alpha):
    """Every map, every grid: the batched regions equal the per-image OpenCV extractor's."""
    r = opencv_parity(n_regions, alpha)
    print(f'\nN={n_regions} alpha={alpha}: {r["agree"]}/{r["total"]} maps match '
          f'({100 * r["agree"] / r["total"]:.2f}%); {r["otsu_ties"]} exact Otsu ties, cv2 picked our level '
          f'on {r["ties_where_cv2_picked_our_level"]}')
    assert r["agree"] == r["total"]


def test_regions_match_opencv_as_shipped():
    """Same check against cv2 with its default (IPP) Otsu, on maps without an exact Otsu tie."""
    rng = np.random.default_rng(7)
    total = agree = 0
    for grid in GRIDS:
        A = np.concatenate([make(rng, 8, *grid) for make in KINDS.values()]).astype(np.float32)
        keep = ~np.array([otsu_is_tie(u) for u in u8_maps(A, grid)])
        with opencv_ipp(True):
            want = opencv_regions_reference(A[keep], grid)
        agree += int((ours(A[keep], grid)[0] == want).all(1).sum())
        total += int(keep.sum())
    print(f'\ncv2 default build: {agree}/{total} maps match')
    assert agree == total


def test_equal_scores_rank_by_first_pixel():
    """Two identical blobs score exactly the same (Eq. 3); the one whose first pixel comes first in
    raster order is R_1 (our documented tie rule)."""
    A = np.zeros((2, 14, 14), np.float32)
    blob = np.random.default_rng(0).uniform(0.5, 1.0, (6, 6)).astype(np.float32)
    A[0, 0:6, 8:14] = A[0, 8:14, 0:6] = blob                          # top-right, bottom-left
    A[1, 1:7, 1:7] = A[1, 8:14, 8:14] = blob[::-1]                    # diagonal pair, 1 px apart
    got, sal = ours(A.reshape(2, -1), (14, 14))
    got, sal = got.reshape(2, 14, 14), sal.reshape(2, 14, 14)
    assert (got[0, 0:6, 8:14] == 1).all() and (got[0, 8:14, 0:6] == 2).all()
    assert (got[1, 1:7, 1:7] == 1).all() and (got[1, 8:14, 8:14] == 2).all()
    assert sal[0][got[0] == 1].sum() == sal[0][got[0] == 2].sum()     # an exact tie
    assert np.array_equal(got.reshape(2, -1), opencv_regions_reference(A.reshape(2, -1), (14, 14)))


# ---------------------------------------------------------------- Otsu (Eq. 2) alone
def test_otsu_matches_opencv():
    """Random 8-bit maps of every shape of histogram: same level as cv2 unless the optimum is an
    exact tie between different foregrounds; there ours is the lowest optimal level."""
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(1500):
        P = int(rng.integers(2, 1025))
        kind = rng.integers(0, 6)
        if kind == 0:
            m = rng.integers(0, 256, P)                                  # flat histogram
        elif kind == 1:
            m = rng.choice(rng.choice(256, rng.integers(1, 6), replace=False), P)  # few levels
        elif kind == 2:
            m = (rng.beta(0.5, 2.0, P) * 255).astype(int)                # skewed
        elif kind == 3:
            m = np.full(P, rng.integers(0, 256))                         # constant
        elif kind == 4:                                                  # bimodal
            m = np.where(rng.random(P) < 0.5, rng.integers(0, 40), rng.integers(200, 256))
        else:                                                            # mirror-symmetric: ties
            lv = rng.choice(128, rng.integers(1, 4), replace=False)
            m = np.repeat(np.concatenate([lv, 255 - lv]), np.tile(rng.integers(1, 40, len(lv)), 2))
        maps.append(m.astype(np.uint8))
    same_level = same_mask = ties = 0
    for m in maps:
        t = int(saliency.otsu_threshold(torch.from_numpy(m)[None])[0])
        levels = otsu_optimal_levels(m)
        assert t == (levels[0] if levels else 0)                         # the exact definition
        with opencv_ipp(False):
            t_cv, _ = opencv_threshold(m[None])
        if otsu_is_tie(m):
            ties += 1
            assert t_cv in levels                                        # a tie, not a bug
            continue
        same_level += t == t_cv
        same_mask += np.array_equal(m > t, m > t_cv)
    n = len(maps) - ties
    print(f'\notsu: level {same_level}/{n}, foreground {same_mask}/{n} (+{ties} exact ties)')
    assert same_mask == n and same_level == n


def test_otsu_exact_tie_takes_lowest_level():
    """Symmetric histogram: {38} vs {142, 246} and {38, 142} vs {246} split it equally well.
    OpenCV's C and IPP builds pick by rounding noise; the exact comparison takes the lowest."""
    m = np.repeat(np.array([38, 142, 246], np.uint8), [22, 26, 22])[None]
    levels = otsu_optimal_levels(m)                                   # 38..141 and 142..245
    assert levels == list(range(38, 246)) and otsu_is_tie(m)
    assert int(saliency.otsu_threshold(torch.from_numpy(m))[0]) == 38
    for ipp in (False, True):
        with opencv_ipp(ipp):
            assert opencv_threshold(m)[0] in levels


# ---------------------------------------------------------------- 8-connected components
def snake(h, w):                                                     # boustrophedon, 1 px wide
    m = np.zeros((h, w), bool)
    m[::2] = True
    for r in range(1, h, 2):
        m[r, w - 1 if r % 4 == 1 else 0] = True
    return m


def spiral(h, w):
    m = np.zeros((h, w), bool)
    top, left, bottom, right = 0, 0, h - 1, w - 1
    while top <= bottom and left <= right:
        m[top, left:right + 1] = True
        m[top:bottom + 1, right] = True
        if top + 2 <= bottom:
            m[bottom, left:right + 1] = True
        if left + 2 <= right:
            m[top + 2:bottom + 1, left] = True
        if top + 2 <= bottom and left + 2 <= right:
            m[top + 2, left:left + 3] = True                         # step inwards
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    return m


def comb(h, w):                                                      # most runs in one component
    m = np.zeros((h, w), bool)
    m[:, ::2] = True
    m[0] = True
    return m


def zigzag(h, w):                                                    # diagonal-only contacts
    m = np.zeros((h, w), bool)
    for c in range(w):
        m[(c // 2) % h if (c // h) % 2 == 0 else h - 1 - (c // 2) % h, c] = True
    m[np.arange(h), np.arange(h) % w] = True
    return m


def hard_shapes(h, w):
    shapes = [snake(h, w), snake(w, h).T, spiral(h, w), comb(h, w), comb(w, h).T, zigzag(h, w),
              np.indices((h, w)).sum(0) % 2 == 0, np.ones((h, w), bool), np.zeros((h, w), bool)]
    shapes.append(~shapes[2])
    return [s[::-1] for s in shapes] + [s[:, ::-1] for s in shapes] + shapes


@pytest.mark.parametrize('early_exit', [True, False])   # CPU default / the fixed GPU schedule
@pytest.mark.parametrize('grid', [(14, 14), (32, 32), (1, 9), (9, 1), (2, 2), (3, 17), (13, 6)])
def test_connected_components_match_opencv(grid, early_exit):
    """Random masks of all densities plus snakes, spirals and combs (the inputs that need the most
    hooking rounds): same partition as cv2, labels = 1 + raster index of the first pixel. (cv2's
    own label order is its 2x2-block scan order, so a stable sort over cv2 labels would break
    exact score ties differently from our first-pixel rule.)"""
    h, w = grid
    rng = np.random.default_rng(h * 100 + w)
    masks = [rng.random((h, w)) < d for d in np.linspace(0.1, 0.9, 9) for _ in range(30)]
    masks += hard_shapes(h, w)
    fg = torch.from_numpy(np.stack(masks))
    labels = saliency.connected_components(fg, early_exit).numpy()
    for m, lab in zip(masks, labels):
        n, cv = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        assert same_partition(lab, cv)
        blocks = []
        for k in range(1, n):
            comp = (cv == k).reshape(-1)
            assert lab.reshape(-1)[comp][0] == 1 + np.argmax(comp)
            rows, cols = np.nonzero(cv == k)
            blocks.append(min(zip(rows // 2, cols // 2)))
        assert blocks == sorted(blocks)          # cv2 numbers by first 2x2 block, not first pixel


# ---------------------------------------------------------------- output convention, degenerates
def test_output_convention_and_area_filter():
    """Ranks are 1..K (contiguous), K <= N-1, background N, every ranked region has area >=
    alpha*h*w, and scores do not increase with rank (Eq. 3)."""
    rng = np.random.default_rng(3)
    for grid, n_regions, alpha in [((14, 14), 5, 0.15), ((16, 9), 3, 0.05), ((8, 8), 7, 0.02)]:
        A = np.concatenate([smooth_maps(rng, 64, *grid), noise_maps(rng, 64, *grid)])
        regions, sal = ours(A.astype(np.float32), grid, n_regions, alpha)
        assert regions.dtype == np.int64 and regions.shape == A.shape
        for r, s in zip(regions, sal):
            ranks = sorted(set(r.tolist()) - {n_regions})
            assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= n_regions - 1
            assert all((r == k).sum() >= alpha * grid[0] * grid[1] for k in ranks)
            means = [s[r == k].mean() for k in ranks]
            assert means == sorted(means, reverse=True)


def test_degenerate_maps():
    """Constant, single-pixel and near-constant maps: no NaN, no crash, sensible regions."""
    P = 14 * 14
    A = torch.zeros(6, P)
    A[1] = 3.0                                                        # constant
    A[2, 37] = 1.0                                                    # one bright patch
    A[3] = 1.0
    A[3, 37] = 0.0                                                    # one dark patch
    A[4] = torch.linspace(0, 1e-7, P)                                 # range far below the 1e-6 eps
    A[5, :98] = 1.0                                                   # top half bright
    regions, sal = saliency.regions_from_saliency(A, (14, 14))
    assert not sal.isnan().any() and (sal >= 0).all() and (sal < 1).all()
    assert (regions[:3] == 5).all()                                   # no foreground / too small
    assert (regions[3] == 1).sum() == P - 1 and regions[3, 37] == 5   # one big region
    assert np.array_equal(regions[4].numpy(), opencv_regions_reference(A[4:5].numpy(), (14, 14))[0])
    assert (regions[5, :98] == 1).all() and (regions[5, 98:] == 5).all()
    assert (saliency.regions_from_saliency(A[2:3], (14, 14), alpha=0.0)[0] == 1).sum() == 1
    assert (saliency.regions_from_saliency(A, (14, 14), n_regions=1)[0] == 1).all()


# ---------------------------------------------------------------- --saliency-polarity minority
def test_minority_polarity_is_the_paper_rule_on_the_map_negated_where_its_foreground_is_larger():
    """Oracle, one image at a time with cv2: the paper's foreground larger than half the grid ->
    negate the raw map; then the whole OpenCV reference extractor. Otsu levels pinned to the
    lowest optimum in both (OpenCV's pick on an exact tie is rounding noise)."""
    rng = np.random.default_rng(11)
    flipped = total = 0
    for grid in [(8, 8), (14, 14), (16, 9)]:
        A = np.concatenate([make(rng, 16, *grid) for make in KINDS.values()]).astype(np.float32)
        want = np.empty(A.shape, np.int64)
        for b, (a, u8) in enumerate(zip(A, u8_maps(A, grid))):
            larger = 2 * (lowest_level_threshold(u8)[1] > 0).sum() > u8.size
            flipped += int(larger)
            want[b] = opencv_regions_reference((-a if larger else a)[None], grid, 5, 0.1,
                                               threshold=lowest_level_threshold)[0]
        got = saliency.regions_from_saliency(torch.from_numpy(A), grid, 5, 0.1, polarity="minority")[0]
        assert np.array_equal(got.numpy(), want)
        total += len(A)
    assert 0.2 * total < flipped < 0.8 * total  # both branches are exercised


def test_minority_polarity_takes_the_small_dark_object_the_paper_rule_misses():
    """A small object whose features score LOW against q on a high, noisy ground: the paper's R_1 is
    the ground around it; minority's R_1 is the object, as it is for the same object scoring high."""
    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 8, 8, generator=g) * 0.2 + 1.0                  # ground near 1
    A[0, 2:5, 3:6] = -1.0                                             # a 3 x 3 object, low
    A[1, 2:5, 3:6] = 3.0                                              # the same object, high
    obj = torch.zeros(8, 8, dtype=torch.bool)
    obj[2:5, 3:6] = True
    paper = saliency.regions_from_saliency(A.flatten(1), (8, 8), 5, 0.1)[0].view(2, 8, 8)
    minority, sal = saliency.regions_from_saliency(A.flatten(1), (8, 8), 5, 0.1, polarity="minority")
    minority = minority.view(2, 8, 8)
    assert (paper[0][~obj] == 1).all() and (paper[0][obj] == 5).all()   # the ground is "salient"
    assert torch.equal(paper[1], minority[1])                            # already the smaller side
    for r in minority:
        assert (r[obj] == 1).all() and (r[~obj] == 5).all()
    assert torch.equal(saliency.orient(A.flatten(1), "paper"), A.flatten(1))
    with pytest.raises(ValueError, match="polarity"):
        saliency.orient(A.flatten(1), "majority")


# ---------------------------------------------------------------- API
def test_discriminative_regions_api():
    """A = <q, z_j>/sqrt(D) in fp32 (also under autocast), CLS as (1, 1, D) or (D,), any grid."""
    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(4, 6 * 10, 32, generator=g), torch.randn(1, 1, 32, generator=g)
    A = saliency.saliency_map(z, q)
    assert A.shape == (4, 60) and A.dtype == torch.float32
    torch.testing.assert_close(A, torch.einsum('bpd,d->bp', z, q.reshape(-1)) / 32 ** 0.5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(saliency.saliency_map(z.bfloat16(), q), saliency.saliency_map(
            z.bfloat16().float(), q))
    regions, sal = saliency.discriminative_regions(z, q.reshape(-1), grid=(6, 10))
    want, want_sal = saliency.regions_from_saliency(A, (6, 10))
    assert torch.equal(regions, want) and torch.equal(sal, want_sal)
    assert torch.equal(sal, saliency.normalise(A))
    A.requires_grad_(True)
    assert not saliency.regions_from_saliency(A, (6, 10))[1].requires_grad
    with pytest.raises(ValueError, match='grid'):
        saliency.regions_from_saliency(A, (7, 10))


def test_no_host_reads():
    """The meta device has shapes but no data: anything that reads values on the host (.item(),
    .tolist(), data-dependent Python branches) would fail here. Also checks device-agnostic code."""
    z = torch.empty(8, 14 * 14, 64, device='meta')
    regions, sal = saliency.discriminative_regions(z, torch.empty(64, device='meta'), (14, 14))
    assert regions.device.type == 'meta' and regions.shape == (8, 196)
    assert regions.dtype == torch.int64 and sal.shape == (8, 196)
    fg = torch.empty(8, 14, 14, dtype=torch.bool, device='meta')
    assert saliency.connected_components(fg).shape == (8, 14, 14)


if __name__ == "__main__":
    # python tests/test_saliency.py --json results/saliency_parity.json: the README's parity count
    import json
    settings = {f"N={n} alpha={a}": opencv_parity(n, a) for n, a in PARITY_SETTINGS}
    result = {"command": "python tests/test_saliency.py " + " ".join(sys.argv[1:]), "cv2": cv2.__version__,
              "settings": settings, "agree": sum(r["agree"] for r in settings.values()),
              "total": sum(r["total"] for r in settings.values())}
    print(json.dumps(result, indent=1))
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(result, f, indent=1)
