"""Per-image OpenCV reference for saliency.py: the official DSeq-JEPA region extractor's logic.

An independent oracle for tests/test_saliency.py and the baseline that bench.py times against the
batched saliency.regions_from_saliency. One image at a time on the CPU, exactly as the official
code does it: numpy Eq. 1, uint8 via astype (truncation), cv2 Otsu, cv2 8-connected components,
per-component numpy area and mean score, sort, top N-1, background. Not used at run time.
"""
import cv2
import numpy as np


def opencv_threshold(u8):
    """Otsu threshold of one (h, w) uint8 map with cv2 (BINARY + OTSU): returns (thresh, fg)."""
    t, th = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return int(t), th


def opencv_regions_reference(A_np, grid, n_regions=5, alpha=0.15, threshold=opencv_threshold):
    """A_np: (B, P) raw saliency (float32). Returns regions (B, P) int64 with the convention of
    saliency.regions_from_saliency: 1..K for R_1..R_K (K <= n_regions-1), n_regions = background.
    `threshold(u8) -> (t, fg)` can replace cv2's Otsu (tests use it to pin the level on exact
    Otsu ties, where OpenCV's pick is float rounding noise)."""
    h, w = grid
    A_np = np.asarray(A_np, dtype=np.float32)
    out = np.full(A_np.shape, n_regions, dtype=np.int64)
    for b in range(A_np.shape[0]):
        a = A_np[b]
        an = (a - a.min()) / (a.max() - a.min() + 1e-6)               # Eq. 1, float32
        u8 = (an * 255).astype(np.uint8).reshape(h, w)                # Eq. 2 8-bit map
        _, fg = threshold(u8)
        n, lab = cv2.connectedComponents(fg, connectivity=8)
        lab = lab.reshape(-1)
        comps = []
        for k in range(1, n):
            mask = lab == k
            if mask.sum() < alpha * h * w:                            # area filter
                continue
            score = an[mask].mean(dtype=np.float64)                   # Eq. 3 mean saliency
            comps.append((-score, int(np.argmax(mask)), mask))        # tie: first pixel first
        comps.sort(key=lambda c: (c[0], c[1]))
        for rank, (_, _, mask) in enumerate(comps[: n_regions - 1], start=1):
            out[b, mask] = rank
    return out
