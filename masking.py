"""Masks and prediction plans: I-JEPA multi-block masks, DSeq-JEPA region plans, the lambda mix.

Read next to the paper (the method) and model.level_mask (levels). A JEPA step is a *plan*: which
patches the context encoder sees, which patches the predictor predicts, and who may look at whom.
Every plan here is written in one currency, the level rule of model.level_mask, so the encoder
and the predictor never need to know which method produced it.

Internally a plan is first built as dense per-patch maps, one row per plan row:
    ctx  (C, P)     level of each patch as a context token, 0 = not context
    tlvl (C, S, P)  level of each patch as a target token in slot s, 0 = not a target there
    tgrp (C, S, P)  group of that target token
A patch can be a target in several slots (I-JEPA blocks overlap; S = M blocks), at most once as
context. `_pack` turns the maps into the padded index lists of the Plan with one host sync.

Host syncs (reading a number on the CPU): `_pack` reads the row count and the two widths once per
plan; `_region_levels` reads `regions.max()` once when the caller does not pass num_regions.
Nothing else waits for the device: no per-image Python loop, no data-dependent shapes elsewhere.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

_BIG = 2**62  # sort key of an absent token: after every real one

# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """One step's plan as padded batch tensors, all on one device (R rows; R = B except replicate).

    The level rule (model.level_mask): a context token of level l attends context tokens of level
    <= l; a target token of level l and group g attends context tokens of level < l and the target
    tokens of its own group g. Level 0 marks padding, which is neither attended to nor scored.

    sample    (R,)     int64  image of each row
    ctx_idx   (R, Lc)  int64  patch index (row * w + col) of each context token; 0 at padding
    ctx_lvl   (R, Lc)  int64  level >= 1 of each context token; 0 = padding
    tgt_idx   (R, Lt)  int64  patch index of each target token; a patch may appear in two groups
    tgt_lvl   (R, Lt)  int64  level >= 2 of each target token; 0 = padding
    tgt_grp   (R, Lt)  int64  group >= 1 of each target token; 0 = padding
    dseq      (B,)     bool   sample follows its discriminative (DSeq) plan, else I-JEPA blocks
    n_regions (B,)     int64  non-empty regions of the sample (ranked + background), whether or not
                              the lambda coin used them: the region extractor's statistic to log
    Tokens of a row are sorted by level, then group, then patch (raster); padding comes last.

    ctx_full  bool (not a tensor, not a field): every row's context is level 1 with no padding, so
              the context encoder's mask would be all True and it may run unmasked (model.py's
              fast path). Known from the plan's one host sync; False where unknown.
    """

    ctx_full = False  # a plain attribute, set by _pack; dataclass fields stay tensors only
    row_tokens = None  # plain attribute, set by _pack: (3, R) host tensor for split_plan, or None

    sample: torch.Tensor
    ctx_idx: torch.Tensor
    ctx_lvl: torch.Tensor
    tgt_idx: torch.Tensor
    tgt_lvl: torch.Tensor
    tgt_grp: torch.Tensor
    dseq: torch.Tensor
    n_regions: torch.Tensor

    def to(self, device):  # e.g. a plan built on the CPU for a CUDA step
        plan = Plan(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
        plan.ctx_full, plan.row_tokens = self.ctx_full, self.row_tokens
        return plan


def _first_tokens(key, count, width):
    """Columns of the `width` smallest keys per row, ascending, and which of them are real.

    key (C, K) int64 (absent tokens = _BIG), count (C,) real tokens per row -> (C, width) each."""
    order = key.argsort(dim=1)[:, :width]  # (C, min(width, K))
    order = F.pad(order, (0, width - order.shape[1]))  # (C, width): columns past K point at 0
    valid = torch.arange(width, device=key.device) < count[:, None]  # (C, width)
    return order, valid


def pad_width(n, multiple, geometric=False):
    """Padded size of n tokens (or rows): n rounded up to `multiple` (never 0, so no tensor is
    empty). geometric: in steps of the larger of `multiple` and an eighth of the power of two at or
    above n (multiple 8: 8, 16, ..., 64, 80, 96, 112, 128, 160, ...): 4 sizes per octave, < 25 %
    padding, so a whole run sees a handful of shapes and torch.compile compiles few graphs."""
    step = max(multiple, 1 << max(0, (n - 1).bit_length() - 3)) if geometric else multiple
    return max(1, -(-n // step)) * step


def _pack(sample, ctx, tlvl, tgrp, dseq, n_regions, pad_multiple, keep=None, row_key=None,
          geometric=False):
    """Dense maps ctx (C, P), tlvl / tgrp (C, S, P) -> Plan of the rows where keep (C,) is True,
    ordered by row_key (C,). Widths are the longest kept row rounded up by pad_width; geometric
    (for torch.compile) also pads the replicate mode's row count with empty rows (all level 0).
    The one host sync of a plan is here."""
    C, S, P = tlvl.shape
    n_ctx = (ctx > 0).sum(1)  # (C,)
    n_tgt = (tlvl > 0).flatten(1).sum(1)  # (C,)
    keep = torch.ones(C, dtype=torch.bool, device=ctx.device) if keep is None else keep  # (C,)
    # Host sync: the padded shapes depend on the data. The padded 0 makes C = 0 rows legal. The
    # shortest context and its top level ride along: they say whether the encoder needs a mask.
    widths = [F.pad(n * keep, (0, 1)).max() for n in (n_ctx, n_tgt)]
    shortest = F.pad(torch.where(keep, n_ctx, _BIG), (0, 1), value=_BIG).min()
    top_level = F.pad((ctx * keep[:, None]).flatten(), (0, 1)).max()
    # The per-row token counts and top levels ride along in the same read, for split_plan.
    key = torch.zeros_like(n_ctx) if row_key is None else torch.where(keep, row_key, _BIG)  # (C,)
    numbers = torch.cat([torch.stack([keep.sum()] + widths + [shortest, top_level]),
                         n_ctx, n_tgt, ctx.amax(1), key]).tolist()
    R, Lc, Lt, shortest, top_level = numbers[:5]
    per_row = torch.tensor(numbers[5:]).view(4, C)  # (4, C) on the host: n_ctx, n_tgt, top level, key
    if row_key is None:
        per_row = per_row[:3]  # (3, R)
    else:  # replicate mode: keep R of the C candidate rows, in row_key order (unique keys: any sort agrees)
        rows = torch.where(keep, row_key, _BIG).argsort()[:R]  # (R,)
        per_row = per_row[:3, per_row[3].argsort()[:R]]  # (3, R) the same rows, read on the host
        sample, ctx, tlvl, tgrp = sample[rows], ctx[rows], tlvl[rows], tgrp[rows]
        n_ctx, n_tgt = n_ctx[rows], n_tgt[rows]
        if geometric and pad_width(R, pad_multiple, True) > R:  # empty rows: level 0 everywhere
            extra = pad_width(R, pad_multiple, True) - R
            sample = F.pad(sample, (0, extra))  # (R',): image 0, never scored
            ctx, n_ctx, n_tgt = F.pad(ctx, (0, 0, 0, extra)), F.pad(n_ctx, (0, extra)), F.pad(n_tgt, (0, extra))
            tlvl, tgrp = F.pad(tlvl, (0, 0, 0, 0, 0, extra)), F.pad(tgrp, (0, 0, 0, 0, 0, extra))  # (R', S, P)
            shortest = 0
            per_row = F.pad(per_row, (0, extra))  # (3, R'): empty rows, no tokens
    Lc, Lt = pad_width(Lc, pad_multiple, geometric), pad_width(Lt, pad_multiple, geometric)

    # Context tokens: key = level-major, raster within a level (the causal mask is then
    # block-lower-triangular, easy to eyeball); absent patches sort last and become padding.
    patch = torch.arange(P, device=ctx.device)
    key = torch.where(ctx > 0, ctx * P + patch, _BIG)  # (R, P)
    order, valid = _first_tokens(key, n_ctx, Lc)  # (R, Lc)
    ctx_lvl = torch.where(valid, ctx.gather(1, order), 0)  # (R, Lc)
    ctx_idx = torch.where(valid, order, 0)  # (R, Lc)

    # Target tokens: the S slots of a row side by side; key = (level, group, slot, patch).
    tlvl, tgrp = tlvl.flatten(1), tgrp.flatten(1)  # (R, S*P)
    span = max(S, P) + 1  # exceeds every level and group value, so the key is lexicographic
    slot_patch = torch.arange(S * P, device=ctx.device)  # (S*P,) = slot * P + patch
    key = torch.where(tlvl > 0, (tlvl * span + tgrp) * (S * P) + slot_patch, _BIG)  # (R, S*P)
    order, valid = _first_tokens(key, n_tgt, Lt)  # (R, Lt)
    tgt_lvl = torch.where(valid, tlvl.gather(1, order), 0)  # (R, Lt)
    tgt_grp = torch.where(valid, tgrp.gather(1, order), 0)  # (R, Lt)
    tgt_idx = torch.where(valid, order % P, 0)  # (R, Lt) slot * P + patch -> patch
    plan = Plan(sample, ctx_idx, ctx_lvl, tgt_idx, tgt_lvl, tgt_grp, dseq, n_regions)
    plan.ctx_full = shortest == Lc and top_level <= 1  # one level, no padding: no mask needed
    plan.row_tokens = per_row  # (3, R) host int64: real context / target tokens, top context level
    return plan


# ----------------------------------------------------------------------------------------------
# I-JEPA multi-block masks (Assran et al. 2023)


def _rand(shape, generator, device):
    """U[0, 1) from `generator` (drawn on the generator's device, then moved): the generator is the
    only source of randomness, so the same seed gives the same masks on any training device."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _block_size(u, scale, aspect, grid, leave_one):
    """Block height and width (0-dim int64 tensors) from ONE uniform u (0-dim), as the official
    I-JEPA sampler: keep = floor(P * s) patches with s = lo + u (hi - lo) and aspect h / w =
    lo + u (hi - lo) with the SAME u. Scale and aspect are therefore coupled (small blocks are
    wide, large blocks tall): on a 14 x 14 grid the targets take only 5 distinct shapes, from 5 x 6
    to 8 x 5, all within 0.15-0.2 of the grid. Two independent draws would give 10 shapes, some
    outside that range (5 x 5 = 0.128, 7 x 6 = 0.214). We keep the official coupling: it is not
    among the official faults, and it is the distribution the I-JEPA numbers were measured with."""
    H, W = grid
    s = scale[0] + u * (scale[1] - scale[0])
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    keep = torch.floor(H * W * s)
    # The official code forces h < H and w < W (no full-height block); a full grid is allowed here.
    h = torch.round(torch.sqrt(keep * ar)).long().clamp(1, H)
    w = torch.round(torch.sqrt(keep / ar)).long().clamp(1, W)
    if leave_one:  # a target block never covers the whole grid: the fallback below needs one patch
        full = ((h == H) & (w == W)).long()
        h, w = (h, w - full) if W > 1 else (h - full, w)
    return h, w


def official_min_context(num_patches):
    """Smallest context the sampler accepts before retrying: the official I-JEPA config sets
    min_keep = 10 and accepts a context of MORE than min_keep patches, i.e. >= 11, on grids of
    14 x 14 (196 patches) and larger. On smaller grids 10 patches would be a large share of the
    image (16 % of 8 x 8), so min_keep scales with the grid there: floor(10 * P / 196), which
    gives >= 4 context patches on the demo's 8 x 8 grid and >= 1 on tiny test grids."""
    return 1 + min(10, 10 * num_patches // 196)


def sample_multiblock(batch_size, grid, generator=None, device="cpu", n_targets=4,
                      target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                      context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0),
                      min_context=None, max_tries=8):
    """I-JEPA multi-block masks: M target blocks and one context block per image, the targets cut
    out of the context (targets may overlap each other).

    grid (h, w); returns context (B, P) bool and targets (B, M, P) bool, P = h*w, on `device`.

    Block size: one target size and one context size per batch, as the official sampler (its
    collator draws both once per batch; that is a design choice, not one of its faults, and it
    keeps every image's target rows the same length, so no target padding). Scale and aspect of a
    block come from one uniform (see _block_size). The distribution of masks matches the official
    one, minus its faults: here each block's top-left corner is uniform over
    ALL valid positions (last row / column reachable, context not pinned to the top-left), a
    context may span the whole grid, and nothing is truncated to the batch minimum (plans pad).

    Retries, bounded and vectorised: `max_tries` placements are drawn for every image at once; an
    image takes the first whose context keeps >= min_context patches (default
    official_min_context(P): > 10 patches on 14 x 14 grids, as the official min_keep = 10), else
    the placement with the largest context. If even that context is empty (only possible on tiny grids), the fallback
    keeps target block 1 alone and makes every other patch context. A target block never covers
    the whole grid, so every image ends with >= 1 context patch and >= 1 target patch.
    No host sync; randomness only from `generator`.
    """
    H, W = grid
    B, M, T, P = batch_size, n_targets, max_tries, grid[0] * grid[1]
    if P < 2 or M < 1 or T < 1:
        raise ValueError(f"need a grid of >= 2 patches (got {grid}), n_targets >= 1 (got {M}) and "
                         f"max_tries >= 1 (got {T})")

    min_context = official_min_context(P) if min_context is None else min_context

    # 1. One block size per batch for the targets and one for the context, one uniform each.
    u = _rand(2, generator, device)  # (2,)
    th, tw = _block_size(u[0], target_scale, target_aspect, grid, True)
    ch, cw = _block_size(u[1], context_scale, context_aspect, grid, False)
    bh = torch.stack([th] * M + [ch])  # (M+1,) heights: M targets, then the context
    bw = torch.stack([tw] * M + [cw])  # (M+1,)

    # 2. T candidate placements per image: top in 0..H-h and left in 0..W-w, both inclusive.
    u = _rand((B, T, M + 1, 2), generator, device)  # (B, T, M+1, 2)
    top = (u[..., 0] * (H - bh + 1)).long()  # (B, T, M+1)
    left = (u[..., 1] * (W - bw + 1)).long()  # (B, T, M+1)
    r = torch.arange(H, device=device)
    c = torch.arange(W, device=device)
    in_rows = (r >= top[..., None]) & (r < (top + bh)[..., None])  # (B, T, M+1, H)
    in_cols = (c >= left[..., None]) & (c < (left + bw)[..., None])  # (B, T, M+1, W)
    blocks = (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)  # (B, T, M+1, P)
    targets = blocks[:, :, :M]  # (B, T, M, P)
    context = blocks[:, :, M] & ~targets.any(2)  # (B, T, P) the targets are cut out of the context

    # 3. Pick per image: argmax returns the FIRST maximum, so clamping the context size at
    # min_context makes it "the first good try, else the first try with the largest context".
    score = context.sum(-1).clamp(max=min_context)  # (B, T)
    pick = score.argmax(1)  # (B,)
    b = torch.arange(B, device=device)
    context, targets = context[b, pick], targets[b, pick]  # (B, P), (B, M, P)

    # 4. Fallback for an empty context: target block 1 alone, everything else is context.
    empty = ~context.any(1)  # (B,)
    context = torch.where(empty[:, None], ~targets[:, 0], context)  # (B, P)
    later = torch.arange(M, device=device) > 0  # (M,) blocks 2..M
    targets = targets & ~(empty[:, None, None] & later[None, :, None])  # (B, M, P)
    return context, targets


def ijepa_plan(context_mask, target_masks, *, pad_multiple=1):
    """I-JEPA plan: context tokens level 1; target block m (m = 1..M) level 2, group m, so each
    block is predicted from the context alone (a patch in two blocks appears twice).

    context_mask (B, P) bool, target_masks (B, M, P) bool -> Plan with R = B rows."""
    ctx, tlvl, tgrp = _ijepa_maps(context_mask, target_masks)
    none = torch.zeros(ctx.shape[0], dtype=torch.long, device=ctx.device)  # (B,) no DSeq plans
    return _pack(torch.arange(len(none), device=ctx.device), ctx, tlvl, tgrp, none.bool(), none,
                 pad_multiple)


def _ijepa_maps(context_mask, target_masks):
    M = target_masks.shape[1]
    group = torch.arange(1, M + 1, device=target_masks.device)[None, :, None]  # (1, M, 1)
    return context_mask.long(), 2 * target_masks.long(), group * target_masks  # (B,P), (B,M,P) x2


# ----------------------------------------------------------------------------------------------
# DSeq-JEPA plans from ranked regions (the paper's Eq. 3-5)


def _region_levels(regions, order, generator, num_regions):
    """Rank the regions of each sample and compact empty ranks.

    regions (B, P) int64: 1..N-1 ranked R_k, N background, 0 = in no region (ignored).
    Returns lvl (B, P): the position 1..L of the patch's region in the prediction order (0 for
    patches in no region), L (B,) non-empty regions per sample, and N.
    The order ablations permute only the ranked regions; the background R_N always comes last,
    because it is the leftover of the image, not a region one could rank (Eq. 5's last target).
    """
    B, P = regions.shape
    N = int(regions.max()) if num_regions is None else num_regions  # host sync when not given
    v = torch.arange(N + 1, device=regions.device)  # (V,) region values 0..N
    present = torch.zeros(B, N + 1, dtype=torch.bool, device=regions.device)
    present.scatter_(1, regions, True)  # (B, V) value occurs in the sample
    present[:, 0] = False  # 0 = patch in no region

    # Sort key of every ranked value; the background is placed after all of them, absent last.
    if order == "saliency":  # R_1 (most salient) first: the paper's order
        key = v.expand(B, -1).float()  # (B, V)
    elif order == "reverse":  # least salient ranked region first ("inverse" ablation)
        key = -v.expand(B, -1).float()  # (B, V)
    elif order == "raster":  # by the region's first patch in raster order ("spatial" ablation)
        patch = torch.arange(P, device=regions.device).expand(B, -1)  # (B, P)
        first = torch.full((B, N + 1), P, device=regions.device)  # (B, V)
        key = first.scatter_reduce(1, regions, patch, reduce="amin").float()  # (B, V)
    elif order == "random":  # an independent random permutation per sample
        key = _rand((B, N + 1), generator, regions.device)  # (B, V)
    else:
        raise ValueError(f"unknown region order {order!r}: use saliency, random, reverse or raster")
    key = torch.where(v == N, 1e9, key)  # background after every ranked region
    key = torch.where(present, key, float("inf"))  # empty ranks after everything: compacted away
    pos = torch.arange(1, N + 2, device=regions.device).expand(B, -1)  # (B, V)
    lvl_of_value = torch.zeros_like(pos).scatter(1, key.argsort(1), pos) * present  # (B, V)
    return lvl_of_value.gather(1, regions), present.sum(1), N  # (B, P), (B,), int


def _dseq_maps(lvl, L, N, mode, prediction):
    """Dense DSeq maps (sample, ctx, tlvl, tgrp, step) with one target slot, from compacted
    levels lvl (B, P) and region counts L (B,). step is None for the one-row plans (causal,
    flat) and the step k of each candidate row in replicate mode. Samples with L < 2 get no
    tokens."""
    if mode not in ("causal", "replicate") or prediction not in ("sequential", "flat"):
        raise ValueError(f"unknown plan mode {mode!r} or prediction {prediction!r}: use mode "
                         "causal or replicate, prediction sequential or flat")
    B = lvl.shape[0]
    b = torch.arange(B, device=lvl.device)
    if prediction == "flat":  # R_1 is the context; R_2..R_L all predicted from it alone
        ctx = (lvl == 1).long() * (L >= 2)[:, None]  # (B, P)
        tlvl = 2 * (lvl >= 2).long()  # (B, P)
        return b, ctx, tlvl[:, None], (lvl * (lvl >= 2))[:, None], None
    if mode == "causal":  # one row: R_k is context of level k (k < L) and target level k (k >= 2)
        ctx = lvl * (lvl <= L[:, None] - 1)  # (B, P) the last region is never context
        tlvl = lvl * (lvl >= 2)  # (B, P) R_1 is never a target; group k = region k
        return b, ctx, tlvl[:, None], tlvl[:, None], None
    # replicate: row k = 1..N-1 has context R_1..R_k (all level 1) and target R_{k+1}
    k = torch.arange(1, N, device=lvl.device)[None, :, None]  # (1, N-1, 1)
    lv = lvl[:, None, :]  # (B, 1, P)
    ctx = ((lv >= 1) & (lv <= k)).long()  # (B, N-1, P) all of R_1..R_k, not a lagged prefix
    tgt = (lv == k + 1).long()  # (B, N-1, P)
    step = k.flatten().expand(B, -1)  # (B, N-1)
    return (b[:, None].expand(B, N - 1).flatten(), ctx.flatten(0, 1),  # (B*(N-1),), (B*(N-1), P)
            2 * tgt.flatten(0, 1)[:, None], tgt.flatten(0, 1)[:, None], step.flatten())

def dseq_plan(regions, mode="causal", order="saliency", prediction="sequential", generator=None,
              *, num_regions=None, pad_multiple=1):
    """DSeq-JEPA plan from ranked regions (Eq. 5): predict R_{k+1} from R_1..R_k, k = 1..L-1.

    regions (B, P) int64: 1..N-1 ranked R_k, N background, 0 = in no region (ignored); empty ranks
    are compacted per sample (levels 1..L, background last). num_regions = N (else regions.max(),
    one host sync). order permutes the ranked regions, never the background (see _region_levels).
      causal (default): one row per sample, R_k context level k and target level k group k.
      replicate: for k = 1..L-1 one row (sample = b), context R_1..R_k level 1, target R_{k+1}
        level 2 group 1. The official code feeds contexts R1, R1, R1uR2, ...: a lag we do not copy.
      prediction='flat': one row, context R_1 level 1, each R_k (k >= 2) level 2 group k
        (whatever the mode: every target sees the same context, so one row suffices).
    A sample with fewer than two non-empty regions gets no tokens (causal/flat: an empty row;
    replicate: no row) and dseq False: make_plan gives it an I-JEPA plan instead.
    """
    lvl, L, N = _region_levels(regions, order, generator, num_regions)
    sample, ctx, tlvl, tgrp, step = _dseq_maps(lvl, L, N, mode, prediction)
    if step is None:
        return _pack(sample, ctx, tlvl, tgrp, L >= 2, L, pad_multiple)
    keep = step <= L[sample] - 1  # (B*(N-1),) replicate: only the steps this sample has
    return _pack(sample, ctx, tlvl, tgrp, L >= 2, L, pad_multiple, keep, sample * N + step)


def blocks_to_regions(context_mask, target_masks):
    """Region map of the "random blocks, sequential" ablation: I-JEPA blocks as regions.

    context_mask (B, P) bool, target_masks (B, M, P) bool -> regions (B, P) int64 with
    R_1 = the context, R_{m+1} = target block m (a patch in several blocks joins the first),
    0 = a patch in no block. There is no separate background: use N = M + 1, so the last block
    takes the background's place and is predicted last (M = 4 gives the paper's N = 5)."""
    in_block = target_masks.any(1)  # (B, P)
    first = target_masks.to(torch.uint8).argmax(1)  # (B, P) first block holding the patch
    return torch.where(in_block, first + 2, context_mask.long())  # (B, P)


# ----------------------------------------------------------------------------------------------
# The lambda curriculum: DSeq plan with probability lambda, else I-JEPA blocks


def make_plan(regions, lam, generator, grid, *, batch_size=None, device=None, mode="causal",
              order="saliency", prediction="sequential", source="saliency", per_batch_coin=False,
              pad_multiple=8, geometric=False, num_regions=None, **multiblock_kwargs):
    """The plan of one training step: each sample follows its DSeq plan with probability lam and
    otherwise an I-JEPA multi-block plan; samples with < 2 non-empty regions always fall back.

    regions (B, P) int64 (saliency.py's map; None allowed when lam == 0 or source == 'blocks',
    then pass batch_size and device). grid (h, w). source='blocks': the regions are this step's
    I-JEPA blocks (blocks_to_regions). per_batch_coin: one coin for the whole batch (the official
    code) instead of one per sample (the paper's text). Widths Lc, Lt are rounded up to
    pad_multiple, and with geometric=True to 4 sizes per octave (pad_width; train.py uses it under
    torch.compile; the replicate mode's rows are then padded the same way). One host sync (in
    _pack), plus one when regions is given without num_regions.
    multiblock_kwargs go to sample_multiblock. Returns a Plan (R = B, or more in replicate mode).
    """
    if source not in ("saliency", "blocks"):
        raise ValueError(f"unknown region source {source!r}: use saliency or blocks")
    if regions is not None:
        B, device = regions.shape[0], regions.device
        if regions.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"regions have {regions.shape[1]} patches but grid {grid} has "
                             f"{grid[0] * grid[1]}: pass the encoder's patch grid")
    elif batch_size is None or (lam > 0 and source == "saliency"):
        raise ValueError("make_plan needs regions when lam > 0 (source='saliency'), and "
                         "batch_size when regions is None")
    else:
        B, device = batch_size, device or "cpu"

    # 1. I-JEPA blocks for every sample: the fallback, and the regions of source='blocks'.
    context, targets = sample_multiblock(B, grid, generator, device, **multiblock_kwargs)
    ctx_i, tlvl_i, tgrp_i = _ijepa_maps(context, targets)  # (B, P), (B, M, P), (B, M, P)
    M, b = targets.shape[1], torch.arange(B, device=device)
    if regions is None and source == "saliency":  # pure I-JEPA (lambda = 0, no saliency yet)
        none = torch.zeros(B, dtype=torch.long, device=device)
        return _pack(b, ctx_i, tlvl_i, tgrp_i, none.bool(), none, pad_multiple, geometric=geometric)
    if source == "blocks":
        regions, num_regions = blocks_to_regions(context, targets), M + 1

    # 2. The DSeq plan each sample would follow, and the lambda coin.
    lvl, L, N = _region_levels(regions, order, generator, num_regions)
    sample, ctx_d, tlvl_d, tgrp_d, step = _dseq_maps(lvl, L, N, mode, prediction)
    coin = _rand(1 if per_batch_coin else B, generator, device) < lam  # (1,) or (B,)
    dseq = coin & (L >= 2)  # (B,) fewer than two regions: nothing to predict from -> I-JEPA
    tlvl_d = F.pad(tlvl_d, (0, 0, 0, M - 1))  # (C, M, P): the DSeq slot first, then empty slots
    tgrp_d = F.pad(tgrp_d, (0, 0, 0, M - 1))  # (C, M, P)

    # 3. Merge. One row per sample: pick the sample's DSeq or I-JEPA maps.
    if step is None:
        pick = dseq[:, None]  # (B, 1)
        return _pack(b, torch.where(pick, ctx_d, ctx_i),  # (B, P)
                     torch.where(pick[..., None], tlvl_d, tlvl_i),  # (B, M, P)
                     torch.where(pick[..., None], tgrp_d, tgrp_i), dseq, L, pad_multiple,
                     geometric=geometric)
    # Replicate: candidate rows = every (sample, step) DSeq row and every sample's I-JEPA row;
    # keep the existing steps of DSeq samples and the I-JEPA row of the others, sorted by sample.
    keep = torch.cat([dseq[sample] & (step <= L[sample] - 1), ~dseq])  # (C + B,)
    return _pack(torch.cat([sample, b]), torch.cat([ctx_d, ctx_i]), torch.cat([tlvl_d, tlvl_i]),
                 torch.cat([tgrp_d, tgrp_i]), dseq, L, pad_multiple, keep,
                 torch.cat([sample * N + step, b * N]), geometric)


# ----------------------------------------------------------------------------------------------
# Sub-batch packing: every token does work


MIN_CHUNK_ROWS = 8  # the default row limit never goes below this: on a CPU, cutting I-JEPA's runs into
# 4-row chunks made its step 4 % slower in a side run (per-pass overhead); small batches gain no cache

# --pack-splits auto: what one more sub-batch costs, in split_plan's token units (rows x (2 Lc + Lt)),
# times the encoder width squared (a pass's fixed cost is per kernel, ~ depth; a token's cost is
# ~ depth x width^2, so their ratio goes as 1 / width^2). CPU: measured on the demo (micro, width
# 96), where a sub-batch pass of both networks (forward + backward) costs what ~400 token units do
# (bench.py --step-overhead); on ViT-T/16 at 224 px that is ~100 units, against the thousands a
# split saves, so auto splits there and barely on the demo. CUDA: an estimate from kernel launch
# time (~500 launches of ~5 us per pass against ~1.3 us per ViT-B token on an H200), not measured.
PASS_COST = {"cpu": 400 * 96 ** 2, "cuda": 2000 * 768 ** 2}
AUTO_SPLITS = 8  # auto considers up to this many sub-batches
CACHE_ELEMENTS = 2 ** 18  # auto on a CPU: a sub-batch holds <= this many activations (rows x P x width)
# per tensor: on ViT-T/16 at 224 px that is the 8-row chunks that measured best (docs/performance.md)


def pack_settings(splits, rows, width, patches, device_type):
    """--pack-splits / --pack-rows -> split_plan's (k, pass_cost, max_rows).

    splits: "auto" or a number K (K: exactly today's rule, no pass cost); rows: --pack-rows (None =
    the default limit); width: encoder width D; patches: P tokens per image; device_type: "cpu" |
    "cuda" | ... auto lets split_plan's search weigh each extra sub-batch at PASS_COST / D^2 token
    units, so it splits only where the padding saved pays for the pass (never more computed tokens
    than one padded batch); on a CPU it also bounds a sub-batch's activations (CACHE_ELEMENTS)."""
    if splits != "auto":
        return int(splits), 0.0, rows
    cost = PASS_COST["cpu" if device_type == "cpu" else "cuda"] / width ** 2
    if rows is None:
        rows = max(MIN_CHUNK_ROWS, CACHE_ELEMENTS // (patches * width)) if device_type == "cpu" else 0
    return AUTO_SPLITS, cost, rows


def split_plan(plan, k, pad_multiple=8, geometric=False, max_rows=None, pass_cost=0.0):
    """Cut a plan into sub-plans of similar row lengths and bounded size, each padded to its own widths.

    A Plan pads every row to the widest one; rows differ a lot (I-JEPA contexts of 0.85-1 of the
    grid minus the targets, DSeq contexts from one region to most of the image, mixed batches
    both). Here the real rows are sorted by (context length, target length) and cut into <= k
    contiguous runs that minimise the tokens computed by both networks,
        sum over runs of rows * (Lc + (Lc + Lt))      (encoder Lc, predictor Lc + Lt),
    Lc, Lt = pad_width of the run's longest context / target,
    found by dynamic programming over the cut points (numpy tables of <= (P + 1)^2, no loop per row).
    A run with fewer computed tokens never costs more; ties keep fewer runs. pass_cost (token units,
    pack_settings for --pack-splits auto) is added per run, so more runs are chosen only where they
    save more tokens than their passes cost; 0 (an explicit K) is the plain token count. Then every run of more
    than max_rows rows (default max(ceil(R' / k), MIN_CHUNK_ROWS), R' = non-empty rows; 0 = no
    limit) is cut into equal chunks, each again padded to its own widths (padding can only shrink).
    Why: the DP keeps rows of equal length together (cutting them saves no padding), so a batch
    whose rows are all alike, e.g. DSeq causal with 4 ranked regions per image, stayed one big
    sub-batch while an I-JEPA batch ran as k small ones; on a CPU the big one's activations leave
    the cache: at batch 64 it cost 6-19 % more than its real-token FLOPs predict relative to
    I-JEPA, 1-4 % less once cut into k = 8 (bench.py --pack-time-only, two idle runs). At most
    about 2k sub-plans come out.
    Rows without any token (replicate mode's compile padding) are dropped: they are never scored.

    geometric (torch.compile, static shapes): no DP. Every sub-plan has the same number of rows,
    chunk_rows(R, k, max_rows) (R = the plan's rows, itself one of few values), so that a compiled
    graph is one (Lc, Lt) bucket and not one per (rows, Lc, Lt): the sorted rows are cut into
    consecutive chunks of that size, the first one filled up with empty rows (copies of the
    shortest row, all level 0: never attended to, never scored). Widths are pad_width(geometric).
    The price, on 200 plans of batch 128, 14 x 14 patches, k = 8, lambda 0 -> 1 (smooth random
    saliency maps): 19 % of the computed tokens are padding, against 9 % with the DP at multiples of
    8, which gave 260 encoder and 772 predictor shapes (rows, Lc, Lt) where this gives 9 and 33.

    plan: a Plan with R rows; returns a list of Plans whose rows are plan's non-empty rows, each
    exactly once (plus the empty filler rows under geometric), with columns [:Lc], [:Lt] of the same
    tokens (so the same levels, the same masks, the same loss terms). dseq / n_regions stay
    per-sample (B,). k <= 1 returns [plan] (one padded batch, whatever max_rows).
    No host sync for plans from _pack (it reads the row lengths in the plan's one sync); the runs'
    row indices go to the device in one non-blocking copy.
    """
    if k <= 1:
        return [plan]
    if plan.row_tokens is not None:  # read by _pack in the plan's one host sync
        n_c, n_t, top = plan.row_tokens.numpy()  # 3 x (R,)
    else:  # a plan made by hand: one host sync here
        n_c, n_t = (plan.ctx_lvl > 0).sum(1), (plan.tgt_lvl > 0).sum(1)  # (R,) real tokens per row
        top = plan.ctx_lvl.amax(1)  # (R,) highest context level of each row
        n_c, n_t, top = torch.stack([n_c, n_t, top]).cpu().numpy()  # 3 x (R,)
    rows = np.flatnonzero(n_c + n_t > 0)  # (R',) rows with at least one token
    rows = rows[np.lexsort((n_t[rows], n_c[rows]))]  # (R',) by context length, then target length
    R = len(rows)
    if R == 0:
        return [plan]
    filler = 0
    if geometric:  # equal chunks, the first one filled up with copies of the shortest row
        size = chunk_rows(plan.sample.shape[0], k, max_rows)
        filler = -(-R // size) * size - R
        rows = np.concatenate([np.full(filler, rows[0]), rows])  # (R' + filler,)
        bounds = [(start, start + size) for start in range(0, len(rows), size)]
    c, t = n_c[rows], n_t[rows]  # (rows,) each, in the sorted order
    c[:filler], t[:filler] = 0, 0  # the filler rows hold no token
    width = np.array([pad_width(n, pad_multiple, geometric) for n in range(max(c.max(), t.max()) + 1)])
    if not geometric:
        bounds = _dp_runs(c, t, width, k, max_rows, pass_cost)
    order = torch.from_numpy(rows)  # (rows,) all runs' rows, copied to the device at once
    if plan.sample.is_cuda:  # pinned + non_blocking: the copy does not wait for the device
        order = order.pin_memory().to(plan.sample.device, non_blocking=True)
    parts = []
    for start, end in bounds:
        Lc, Lt = int(width[c[end - 1]]), int(width[t[start:end].max()])
        Lc, Lt = min(Lc, plan.ctx_idx.shape[1]), min(Lt, plan.tgt_idx.shape[1])
        idx = order[start:end]  # (r,) rows of this run
        ctx_lvl, tgt_lvl, tgt_grp = plan.ctx_lvl[idx, :Lc], plan.tgt_lvl[idx, :Lt], plan.tgt_grp[idx, :Lt]
        if start < filler:  # level 0 makes a filler row padding; the tensors keep their shapes
            live = (torch.arange(end - start, device=idx.device) >= filler - start)[:, None]  # (r, 1)
            ctx_lvl, tgt_lvl, tgt_grp = ctx_lvl * live, tgt_lvl * live, tgt_grp * live
        part = Plan(plan.sample[idx], plan.ctx_idx[idx, :Lc], ctx_lvl,  # (r,), (r, Lc) x2
                    plan.tgt_idx[idx, :Lt], tgt_lvl, tgt_grp, plan.dseq, plan.n_regions)  # (r, Lt) x3
        part.ctx_full = bool((c[start:end] == Lc).all() and (top[rows[start:end]] <= 1).all())
        parts.append(part)
    return parts


def _dp_runs(c, t, width, k, max_rows, pass_cost=0.0):
    """split_plan's runs without geometric: (start, end) row ranges of the sorted rows (context
    lengths c, target lengths t, both (R,)), <= k DP runs, then cut into chunks of <= max_rows."""
    R = len(c)
    # Candidate cut points: where the context length changes (a cut between two rows of equal
    # context length can only shorten target lists; <= P + 1 candidates keep the tables small).
    pos = np.flatnonzero(np.diff(c, prepend=-1, append=-1))  # (Q,) 0, change points, R
    i, j = np.arange(len(pos))[:, None], np.arange(len(pos))[None, :]  # (Q, 1), (1, Q)
    # Cost of the run rows[pos[i]:pos[j]] for every i < j: its longest context is c[pos[j] - 1]
    # (sorted); its longest target list is a running maximum of t from pos[i].
    t_from = np.where(np.arange(R)[None, :] >= pos[:-1, None], t[None, :], 0)  # (Q-1, R)
    max_t = np.zeros((len(pos), len(pos)), dtype=np.int64)  # (Q, Q) [i, j] = max t[pos[i]:pos[j]]
    max_t[:-1, 1:] = np.maximum.accumulate(t_from, axis=1)[:, pos[1:] - 1]
    max_c = np.concatenate([[0], c[pos[1:] - 1]])[None, :]  # (1, Q) [j] = c[pos[j] - 1]
    rows_ij = pos[j] - pos[i]  # (Q, Q) rows in run i:j
    cost = np.where(rows_ij >= 1, rows_ij * (2 * width[max_c] + width[max_t]) + pass_cost, np.inf)  # (Q, Q)
    # best[m][j]: least cost of rows[:pos[j]] in m runs; cut[m][j]: where its last run starts.
    best, cut = [np.where(j[0] == 0, 0.0, np.inf)], [None]
    for m in range(1, min(k, R) + 1):
        total = best[-1][:, None] + cost  # (Q, Q) [i, j] = first m-1 runs end at i, last is i:j
        cut.append(total.argmin(0))  # (Q,)
        best.append(total.min(0))  # (Q,)
    m = int(np.argmin([b[-1] for b in best]))  # first minimum: fewest runs at the least cost
    runs, end = [], len(pos) - 1
    for level in range(m, 0, -1):  # backtrack: the last run first
        start = int(cut[level][end])
        runs.insert(0, (int(pos[start]), int(pos[end])))
        end = start
    # Runs longer than max_rows -> equal chunks
    cap = max(-(-R // k), MIN_CHUNK_ROWS) if max_rows is None else (max_rows or R)
    bounds = []
    for start, end in runs:
        n = end - start
        chunks = -(-n // cap)
        edges = [start + n * i // chunks for i in range(chunks + 1)]  # sizes differ by <= 1
        bounds.extend(zip(edges[:-1], edges[1:]))
    return bounds


def chunk_rows(R, k, max_rows=None):
    """Rows of every sub-plan of split_plan(geometric=True) for a plan of R rows: --pack-rows if set,
    else ceil(R / k), at least MIN_CHUNK_ROWS unless max_rows == 0; never more than R."""
    size = max_rows or (-(-R // k) if max_rows == 0 else max(-(-R // k), MIN_CHUNK_ROWS))
    return min(size, R)


def compile_shapes(batch, num_patches, k, n_targets=4, num_regions=5, replicate=False, max_rows=None,
                   pad_multiple=8):
    """Every sub-batch shape a run can give torch.compile (plans and split_plan with geometric=True):
    (row counts, context widths Lc, target widths Lt), each a sorted list. A graph of the context
    encoder is one (rows, Lc) (twice: with and without its mask), a graph of the predictor one
    (rows, Lc, Lt), so rows x Lc x Lt bounds the graphs of either (train.py's recompile limit).
    Plan rows: the batch; replicate: one row per Eq. 5 step, batch .. (num_regions - 1) x batch,
    padded geometrically (_pack). Targets: at most n_targets blocks of <= num_patches (I-JEPA)."""
    plan_rows = range(batch, (num_regions - 1) * batch + 1) if replicate else [batch]
    plan_rows = {pad_width(r, pad_multiple, True) if replicate else r for r in plan_rows}
    rows = {r if k <= 1 else chunk_rows(r, k, max_rows) for r in plan_rows}
    ctx = {pad_width(n, pad_multiple, True) for n in range(num_patches + 1)}
    tgt = {pad_width(n, pad_multiple, True) for n in range(max(n_targets, 1) * num_patches + 1)}
    return sorted(rows), sorted(ctx), sorted(tgt)
