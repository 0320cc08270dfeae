"""Discriminative regions from the target encoder's [CLS] saliency (DSeq-JEPA, arXiv 2511.17354).

Read next to the paper's discriminative region generation:
  A_j  = <q, z_j> / sqrt(D)                          saliency of patch j (q = the CLS parameter)
  Eq. 1  A~ = (A - min A) / (max A - min A + 1e-6)   per-image min-max normalisation
  Eq. 2  foreground = uint8(255 A~) > Otsu threshold (OpenCV THRESH_BINARY + THRESH_OTSU)
         then 8-connected components, components with area < alpha*h*w are dropped
  Eq. 3  score(R) = mean of A~ over R; the N-1 best components are R_1..R_{N-1},
         everything else is the background R_N.
  --saliency-polarity minority (not the paper's; `orient`): first negate A where the foreground is
         the larger side of Otsu's split, so R_1 is never the ground (a short run's q is a coin flip).

The official code runs this per image with OpenCV on the CPU (a host sync every step). Here every
step is batched tensor code: no loop over images, no .item()/.cpu(), so it runs on whatever device
the features are on without a host sync. Loops below run a fixed, shape-derived number of times;
only on the CPU, where reading a value is free, do connected components stop at their fixed point. tests/test_saliency.py checks parity with the OpenCV
pipeline (tests/opencv_reference.py) on thousands of maps.
"""
import math
from contextlib import nullcontext

import torch


def saliency_map(z, cls_token):
    """z: (B, P, D) block -2 patch features (after the final norm, CLS removed); cls_token: the
    target encoder's learnable CLS parameter, (1, 1, D) or (D,). Returns raw A: (B, P) fp32."""
    q = cls_token.reshape(-1).float()                                  # (D,)
    dev = z.device.type                                                # fp32 even inside autocast
    fp32 = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else None
    with fp32 or nullcontext():
        return (z.float() @ q) / math.sqrt(z.shape[-1])                # (B, P), no softmax


def normalise(A):
    """Eq. 1 per image. A: (B, P) -> A~: (B, P) fp32 in [0, 1). A constant map gives all zeros."""
    A = A.float()
    lo, hi = A.amin(1, keepdim=True), A.amax(1, keepdim=True)         # (B, 1)
    return (A - lo) / (hi - lo + 1e-6)


def otsu_foreground(A):
    """Eq. 1 then Eq. 2: A (B, P) raw saliency -> (A~ (B, P) fp32, foreground (B, P) bool)."""
    sal = normalise(A)                                                 # (B, P)
    u8 = (sal * 255).to(torch.uint8)                                   # truncation, as numpy astype
    return sal, u8 > otsu_threshold(u8)[:, None].to(torch.uint8)       # value > threshold


POLARITIES = ("paper", "minority")


def orient(A, polarity="paper"):
    """Which side of Otsu's split is the foreground. A: (B, P) raw saliency -> (B, P).

    paper: A as it is: the patches most aligned with the CLS query q are salient.
    minority (--saliency-polarity minority): A negated in every image whose paper foreground covers
    more than half of its patches, so the foreground, and R_1, is the SMALLER side of the split.
    Why: the paper's q is a learned parameter that, in a short run, stays near its random init
    (issue #14), so the sign of <q, z_object - z_background> is the init's coin: on the demo
    (docs/learning.md) a seed whose R_1 ends on the grain predicts the objects from noise and its
    target encoder collapses. A figure is smaller than its ground (the prior behind LOST's seed
    patch, the one with the fewest similar patches), so taking the smaller side fixes the sign
    without labels. Every other step (Eq. 1-3, alpha, N) is the paper's, on the oriented map."""
    if polarity == "paper":
        return A
    if polarity != "minority":
        raise ValueError(f"unknown saliency polarity {polarity!r}: use {' or '.join(POLARITIES)}")
    _, fg = otsu_foreground(A)                                         # (B, P)
    flip = 2 * fg.sum(1, keepdim=True) > fg.shape[1]                   # (B, 1) foreground > half
    return torch.where(flip, -A, A)                                    # (B, P)


def otsu_threshold(u8):
    """Otsu threshold of each row of u8: (B, P) uint8 (or int in 0..255). Returns (B,) int64.

    Same search as OpenCV's getThreshVal_Otsu: over levels i = 0..255, class 1 = pixels <= i,
    skip i when a class is empty (OpenCV's FLT_EPSILON test; exact for P < 2^23), keep the FIRST i
    with the largest between-class variance, 0 if no level qualifies (constant image).
    OpenCV accumulates that variance in floating point, so where two levels tie exactly its pick
    is decided by rounding noise (and its IPP build picks differently from its C build). We
    compare the exact rational variances instead, so ties always go to the lowest level, the same
    on every device. Variance at i = num/den / P^2 with the integers
      num = (S_i P - c_i T)^2,  den = c_i (P - c_i)
    (c_i, S_i: count and level sum of class 1, T: total level sum). Everything below is an integer
    < 2^53 held in float64 (exact) for P <= 1218 (a 34 x 34 grid); larger grids stay within
    float64 rounding of the exact answer.
    """
    B, P = u8.shape
    f64 = dict(dtype=torch.float64, device=u8.device)
    hist = torch.zeros(B, 256, **f64)
    hist.scatter_add_(1, u8.long(), torch.ones(B, P, **f64))           # (B, 256) histogram
    c = hist.cumsum(1)                                                 # (B, 256) class-1 count
    s = (hist * torch.arange(256, **f64)).cumsum(1)                    # (B, 256) class-1 level sum
    d = s * P - c * s[:, -1:]                                          # (B, 256)
    num, den = d * d, (c * (P - c)).clamp_min(1)
    # An empty class (c = 0 or c = P) has d = 0 exactly, so num/den = 0 there, while every valid
    # level has d != 0 (the two classes' means differ): no mask needed. Compare num/den exactly:
    # integer part first, then the remainder fraction (distinct fractions r/den differ by at least
    # 1/den^2, far above float64 resolution; equal fractions round to equal floats).
    quo = (num / den).floor()
    quo -= (quo * den > num).double()                                  # floor(fl(x)) can be 1 high
    frac = (num - quo * den) / den                                     # (B, 256) in [0, 1)
    frac = torch.where(quo == quo.amax(1, keepdim=True), frac, -1.0)   # (B, 256)
    return frac.argmax(1)                                              # first maximum, (B,)


def _component_roots(fg, early_exit=None):
    """8-connected components of fg: (B, h, w) bool. Returns (root (B, P) int64, K).
    early_exit: stop at the fixed point (default: on the CPU only, where reading is free).

    Works on row runs instead of pixels. Runs get ids r * ceil(w/2) + (index in row), so ids follow
    raster order; K = h * ceil(w/2) is the number of run slots. root[b, j] is the smallest run id
    of the component containing pixel j (that run holds the component's first pixel in raster
    order), or K for background.

    Rows r, r+1 form a strip; the runs of (fg[r] | fg[r+1]) are its "segments". All foreground
    pixels of a segment are connected (neighbouring columns of a segment are 8-adjacent) and
    different segments touch nowhere, so two runs are adjacent iff they share a segment. With an
    empty row padded above and below, every run lies in exactly one segment above and one below.

    Star hooking: a component is a set of stars (runs sharing one label = the star's smallest id).
    Each round every star hooks to the smallest label it touches through its segments, then
    pointer doubling flattens the hook chains so that stars are stars again.
    Why a fixed number of rounds is exact for ANY input: a star whose neighbours are all larger
    (a local minimum u) hooks nowhere; every other star hooks to a smaller one, so after a round
    the stars are the old local minima. If u's new star is again a local minimum one round later,
    every star that touched u must have joined it (one that hooked elsewhere ended at a root
    smaller than u and still touches u's star). So each star two rounds on holds >= 2 stars of
    before: the star count per component halves every two rounds, and 2 floor(log2 k0) rounds
    leave one star per component, k0 = most initial stars in a component. A hook chain is shorter
    than the star count, so ceil(log2(count - 1)) doublings flatten it. Initial stars are the
    segments of row pairs (0,1), (2,3), ... (exact components of those two-row blocks), so
    k0 <= ceil(h/2) ceil(w/2): 10 rounds for 14 x 14, 16 for 32 x 32. (Random maps and snakes
    converge in 2-3; the rest is the price of a bound that holds without looking at the data.)
    """
    B, h, w = fg.shape
    dev = fg.device
    Kw = (w + 1) // 2                                                  # most runs/segments per row
    K, S = h * Kw, (h + 1) * Kw                                        # run slots, segment slots

    def slot_ids(mask):                                                # (B, n, w) -> run slot
        starts = mask.clone()
        starts[:, :, 1:] &= ~mask[:, :, :-1]                           # first pixel of each run
        row = torch.arange(mask.shape[1], device=dev)[:, None] * Kw - 1  # (n, 1)
        return starts.long().cumsum(2) + row                           # (B, n, w), valid on mask

    rid = torch.where(fg, slot_ids(fg), K).reshape(B, -1)              # (B, P) run of each pixel
    padded = torch.nn.functional.pad(fg, (0, 0, 1, 1))                 # (B, h+2, w)
    sid = slot_ids(padded[:, :-1] | padded[:, 1:])                     # (B, h+1, w) segment ids
    # Segment above / below each run slot; unused slots (and the background slot K) get the
    # spare segment S, which no real run reads.
    above = torch.full((B, K + 1), S, dtype=torch.long, device=dev)
    below = above.clone()
    above.scatter_(1, rid, sid[:, :-1].reshape(B, -1))                 # (B, K+1)
    below.scatter_(1, rid, sid[:, 1:].reshape(B, -1))                  # (B, K+1)
    above[:, K], below[:, K] = S, S

    iota = torch.arange(K + 1, device=dev)
    block = torch.where((iota // Kw) % 2 == 0, below, above)           # (B, K+1) segment of its
    iota = iota.repeat(B, 1)                                           # row pair (below if even)
    seg_min = torch.full((B, S + 1), K, dtype=torch.long, device=dev)
    lab = seg_min.scatter_reduce_(1, block, iota, 'amin').gather(1, block)  # (B, K+1) star labels
    # On the CPU reading a value costs nothing, so stop at the fixed point (random maps need 2-3
    # rounds). On an accelerator that read would be a host sync: run the fixed schedule instead.
    early_exit = dev.type == "cpu" if early_exit is None else early_exit
    k0 = ((h + 1) // 2) * Kw
    for t in range(2 * (k0.bit_length() - 1)):                         # 2 floor(log2 k0) rounds
        stars = k0 >> (t // 2)                                         # stars per component <= this
        seg_min = torch.full((B, S + 1), K, dtype=torch.long, device=dev)
        seg_min.scatter_reduce_(1, above, lab, 'amin')                 # (B, S+1) smallest label
        seg_min.scatter_reduce_(1, below, lab, 'amin')                 #   touching each segment
        touch = torch.minimum(seg_min.gather(1, above), seg_min.gather(1, below))  # (B, K+1)
        hook = iota.clone().scatter_reduce_(1, lab, touch, 'amin')     # (B, K+1) root -> new root
        for _ in range(max(stars - 2, 0).bit_length()):                # ceil(log2(stars - 1))
            nxt = hook.gather(1, hook)                                 # pointer doubling
            if early_exit and torch.equal(nxt, hook):
                break
            hook = nxt
        nxt = hook.gather(1, lab)                                      # (B, K+1)
        if early_exit and torch.equal(nxt, lab):  # no star hooked: every star is a component
            break
        lab = nxt
    root = lab.gather(1, rid)                                          # (B, P)
    return torch.where(fg.reshape(B, -1), root, K), K


def connected_components(fg, early_exit=None):
    """8-connected components (the partition of cv2.connectedComponents(connectivity=8)).
    fg: (B, h, w) bool. Returns (B, h, w) int64: 0 = background, otherwise 1 + the raster index
    of the component's first pixel. (cv2 numbers components by their first 2x2 block instead, so
    its label order can differ; the partition is the same.)"""
    B, h, w = fg.shape
    root, K = _component_roots(fg, early_exit)                         # (B, P)
    first = torch.full((B, K + 1), -1, dtype=torch.long, device=fg.device)
    pix = torch.arange(h * w, device=fg.device).expand(B, -1)          # (B, P)
    first.scatter_reduce_(1, root, pix, 'amin', include_self=False)    # (B, K+1) first pixel
    return (first.gather(1, root) + 1).masked_fill(~fg.reshape(B, -1), 0).reshape(B, h, w)


@torch.no_grad()
def regions_from_saliency(A, grid, n_regions=5, alpha=0.15, polarity="paper"):
    """Ranked regions from a raw saliency map A: (B, P), P = h*w in raster order (CLS or Grad-CAM
    saliency). n_regions = N, alpha = area filter as a fraction of the grid, polarity = orient's.
    Returns regions (B, P) int64 (1..K_b for R_1..R_{K_b}, K_b <= N-1, N for the background R_N)
    and the normalised map A~ (B, P) fp32 of the oriented map."""
    h, w = grid
    B, P = A.shape
    if P != h * w:
        raise ValueError(f"saliency has {P} patches but grid {h}x{w} has {h * w}; pass grid=(h, w)")
    N = n_regions
    # 1. Eq. 1, then Eq. 2's 8-bit map (truncation, as numpy astype) and Otsu foreground.
    sal, fg = otsu_foreground(orient(A, polarity))                     # (B, P) each
    # 2. 8-connected components: root run id of each patch (K run slots; root K = background).
    root, K = _component_roots(fg.reshape(B, h, w))                    # (B, P) in 0..K
    # 3. Area filter (area < alpha*h*w is dropped, compared in float64 like the official code;
    #    for integer areas that is area >= ceil) and Eq. 3 mean-saliency score per component.
    #    Foreground A~ values are float32 >= 1/255, so their float64 sums are exact: scores (and
    #    exact score ties) are the same in any summation order, on any device, and as numpy's.
    area = torch.zeros(B, K + 1, dtype=torch.float64, device=A.device)
    area.scatter_add_(1, root, torch.ones_like(sal, dtype=torch.float64))  # (B, K+1)
    total = torch.zeros_like(area).scatter_add_(1, root, sal.double())     # (B, K+1)
    keep = area >= max(math.ceil(alpha * h * w), 1)
    keep[:, K] = False                                                 # slot K = background
    score = torch.where(keep, total / area.clamp_min(1), -1.0)         # scores lie in [0, 1]
    # 4. Pick the best remaining slot N-1 times. argmax returns the first maximum, i.e. on equal
    #    scores the smaller root id = the component whose first pixel comes first in raster order.
    #    Kept components (score >= 0) all go before dropped slots (-1); taken ones drop to -2.
    rank = torch.full((B, K + 1), N, dtype=torch.long, device=A.device)
    for k in range(1, N):
        best = score.argmax(1, keepdim=True)                           # (B, 1)
        rank.scatter_(1, best, k)                                      # (B, K+1)
        score.scatter_(1, best, -2.0)
    rank = torch.where(keep, rank, N)                                  # ranks 1..K_b, contiguous
    # 5. R_N = every other patch (non-foreground, small components, ranks beyond N-1).
    return rank.gather(1, root), sal                                   # (B, P), (B, P)


@torch.no_grad()
def discriminative_regions(z, cls_token, grid, n_regions=5, alpha=0.15, polarity="paper"):
    """z: (B, P, D) target-encoder block -2 patch features (final norm applied, CLS removed);
    cls_token: (1, 1, D) or (D,). Returns (regions (B, P) int64, A~ (B, P) fp32)."""
    return regions_from_saliency(saliency_map(z, cls_token), grid, n_regions, alpha, polarity)
