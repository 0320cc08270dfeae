"""masking.py: the multi-block sampler and the prediction plans, as executable claims.

Plans are checked by an independent plain-Python reading: a target token of level l sees the
context tokens of level < l (model.level_mask's level rule), so "what does the prediction of R_{k+1}
see" is a set computation over the plan's rows, compared with the paper's Eq. 5.
"""

import itertools
import math
import random

import pytest
import torch

from masking import (Plan, blocks_to_regions, chunk_rows, compile_shapes, dseq_plan, ijepa_plan, make_plan,
                     official_min_context, pad_width, sample_multiblock, split_plan, pack_settings, AUTO_SPLITS,
                     MIN_CHUNK_ROWS)

torch.set_num_threads(1)

GRIDS = [(14, 14), (8, 8), (4, 4), (3, 5), (5, 3), (2, 2), (1, 2), (2, 1)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# A plain-Python reader of plans and region maps


def read_rows(plan):
    """Rows as (sample, [(patch, level)] context, [(patch, level, group)] targets), no padding."""
    rows = []
    for r in range(len(plan.sample)):
        ctx = [(i, l) for i, l in zip(plan.ctx_idx[r].tolist(), plan.ctx_lvl[r].tolist()) if l > 0]
        tgt = [t for t in zip(plan.tgt_idx[r].tolist(), plan.tgt_lvl[r].tolist(),
                              plan.tgt_grp[r].tolist()) if t[1] > 0]
        rows.append((plan.sample[r].item(), ctx, tgt))
    return rows


def groups_of(tgt):
    """{group: (levels, patches)} of a row's targets."""
    out = {}
    for i, l, g in tgt:
        levels, patches = out.setdefault(g, (set(), set()))
        levels.add(l), patches.add(i)
    return out


def visible(ctx, level):
    """Context patches a target token of level l may attend to (level rule: context level < l)."""
    return {i for i, l in ctx if l < level}


def region_sets(row, N=5, order="saliency"):
    """The regions of one region-map row as patch sets in prediction order (plain Python):
    present ranked values in the given order, the background N always last, 0 ignored."""
    sets = {}
    for j, v in enumerate(row):
        if v > 0:
            sets.setdefault(v, set()).add(j)
    ranked = sorted(v for v in sets if v != N)
    if order == "reverse":
        ranked = ranked[::-1]
    if order == "raster":
        ranked = sorted(ranked, key=lambda v: min(sets[v]))
    return [sets[v] for v in ranked] + ([sets[N]] if N in sets else [])


def random_regions(B, P, seed, N=5):
    """Region maps with empty ranks, patches in no region (0), and 0..N-1 ranked regions."""
    rng = random.Random(seed)
    out = []
    for _ in range(B):
        values = rng.sample(range(1, N + 1), rng.randint(1, N)) + [0] * rng.randint(0, 1)
        out.append([rng.choice(values) for _ in range(P)])
    return torch.tensor(out)


def is_ijepa_row(ctx, tgt, M=4):
    return ({l for _, l in ctx} == {1} and {l for _, l, _ in tgt} == {2}
            and set(groups_of(tgt)) <= set(range(1, M + 1)))


# ---------------------------------------------------------------------------------------------
# I-JEPA multi-block sampler


@pytest.mark.parametrize("grid", GRIDS)
def test_context_and_targets_are_disjoint_and_nonempty(grid):
    """Targets are cut out of the context; every image keeps >= 1 context and >= 1 target patch,
    even on grids where four blocks can cover everything (termination included)."""
    for seed in range(20):
        ctx, tgt = sample_multiblock(64, grid, gen(seed))
        assert ctx.shape == (64, grid[0] * grid[1]) and tgt.shape == (64, 4, grid[0] * grid[1])
        assert not (ctx & tgt.any(1)).any()
        assert ctx.any(1).all() and tgt.any(1).any(1).all()


def test_unreachable_min_context_and_one_try_still_terminate():
    """Bounded retries: an impossible min_context or a single try falls back, never hangs."""
    for grid, seed in itertools.product([(2, 2), (1, 3), (4, 4)], range(10)):
        for kw in (dict(min_context=1000), dict(max_tries=1), dict(n_targets=8, max_tries=1)):
            ctx, tgt = sample_multiblock(128, grid, gen(seed), **kw)
            assert not (ctx & tgt.any(1)).any() and ctx.any(1).all() and tgt.any(1).any(1).all()


def test_retries_seek_min_context():
    """A placement leaving fewer than min_context context patches is redrawn (max_tries in all)."""
    def frac(tries):
        ctx, _ = sample_multiblock(2000, (5, 5), gen(0), min_context=14, max_tries=tries)
        return ctx.sum(1).ge(14).float().mean().item()
    assert frac(1) < 0.6 and frac(8) > 0.9


def test_one_patch_grid_is_refused():
    with pytest.raises(ValueError, match="2 patches"):
        sample_multiblock(4, (1, 1), gen(0))


@pytest.mark.parametrize("grid", [(14, 14), (5, 7)])
def test_every_patch_is_reachable_in_context_and_targets(grid):
    """Placement is uniform over ALL valid corners: the last row and column are sampled too
    (the official sampler's exclusive randint never reaches them)."""
    ctx_seen = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    tgt_seen = torch.zeros_like(ctx_seen)
    for seed in range(10):
        ctx, tgt = sample_multiblock(128, grid, gen(seed))
        ctx_seen |= ctx.any(0)
        tgt_seen |= tgt.any(1).any(0)
    assert ctx_seen.all() and tgt_seen.all()


def test_context_block_is_not_pinned_to_the_top_left():
    """A 13 x 13 context on a 14 x 14 grid starts at row / column 0 or 1 with equal chance (the
    official randint(0, 1) always gives 0, so row 13 and column 13 were never context)."""
    ctx, _ = sample_multiblock(2000, (14, 14), gen(0), context_scale=(0.85, 0.86))
    ctx = ctx.view(-1, 14, 14)
    for frac in (1 - ctx[:, 0].any(1).float().mean(), 1 - ctx[:, :, 0].any(1).float().mean(),
                 ctx[:, 13].any(1).float().mean(), ctx[:, :, 13].any(1).float().mean()):
        assert 0.4 < frac < 0.6


def test_full_scale_context_is_everything_but_the_targets():
    """A context of scale 1 spans the whole grid (the official sampler caps blocks at h - 1)."""
    ctx, tgt = sample_multiblock(32, (14, 14), gen(0), context_scale=(1.0, 1.0))
    assert torch.equal(ctx, ~tgt.any(1))


def bbox(mask, grid):
    rows, cols = mask.view(grid).nonzero(as_tuple=True)
    top, left = rows.min().item(), cols.min().item()
    return top, left, rows.max().item() + 1 - top, cols.max().item() + 1 - left


def test_block_scales_and_aspects_within_bounds():
    """Targets: scale U(0.15, 0.2) of the grid, aspect h/w U(0.75, 1.5); context: scale
    U(0.85, 1), square. On a 64 x 64 grid rounding moves these by a few percent only.
    One size per batch (as the official sampler): every target block of a batch has it."""
    grid, P = (64, 64), 64 * 64
    for seed in range(10):
        ctx, tgt = sample_multiblock(8, grid, gen(seed))
        sizes = {bbox(tgt[b, m], grid)[2:] for b in range(8) for m in range(4)}
        assert len(sizes) == 1
        (h, w), = sizes
        assert tgt.sum(-1).eq(h * w).all()  # filled rectangles
        assert 0.14 <= h * w / P <= 0.21 and 0.72 <= h / w <= 1.56
        # 2 x 2 targets cannot hide an edge of the context, so its bounding box is the block.
        ctx, _ = sample_multiblock(8, grid, gen(seed), target_scale=(0.001, 0.001))
        (h, w), = {bbox(ctx[b], grid)[2:] for b in range(8)}
        assert h == w and 0.84 <= h * w / P <= 1.0


def official_block_size(u, scale, aspect, H, W):
    """The official I-JEPA size rule, written out independently in plain Python: ONE uniform u
    sets both the scale and the aspect ratio; keep = int(H W s); h, w rounded from sqrt; blocks
    shrunk below the full grid (that cap only matters for contexts, which we let span the grid)."""
    s = scale[0] + u * (scale[1] - scale[0])
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    keep = int(H * W * s)
    h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
    while h >= H:
        h -= 1
    while w >= W:
        w -= 1
    return h, w


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (8, 8), (28, 28)])
def test_target_shapes_couple_scale_and_aspect_like_the_official_sampler(grid):
    """Every target block shape the sampler draws is one the official rule (one uniform for scale
    and aspect) can give, and every such shape is drawn. On 14 x 14 that is 5 shapes from 5 x 6
    to 8 x 5; two independent draws would also give e.g. 5 x 5 (0.128) and 7 x 6 (0.214)."""
    H, W = grid
    official = {official_block_size(k / 20000, (0.15, 0.2), (0.75, 1.5), H, W) for k in range(20000)}
    seen = set()
    for seed in range(300):  # one size per batch: 300 batches, 300 draws of the size
        _, tgt = sample_multiblock(2, grid, gen(seed))
        seen.add(bbox(tgt[0, 0], grid)[2:])
    assert seen == official
    if grid == (14, 14):
        assert official == {(5, 6), (6, 6), (6, 5), (7, 5), (8, 5)}
        assert all(0.15 <= h * w / 196 <= 0.21 for h, w in official)


def test_context_keeps_more_than_min_keep_10_patches_like_the_official_sampler():
    """The official config sets min_keep = 10 and accepts a context of MORE than 10 patches; on a
    14 x 14 grid our retries enforce the same (>= 11), where the old rule took >= 4. Settings
    with large targets make a quarter of the first tries land at 4-10 context patches."""
    assert official_min_context(196) == 11 and official_min_context(256) == 11
    assert official_min_context(64) == 4 and official_min_context(4) == 1  # scaled on small grids
    kw = dict(target_scale=(0.3, 0.3), context_scale=(0.4, 0.4))
    first, _ = sample_multiblock(4000, (14, 14), gen(0), max_tries=1, **kw)
    n = first.sum(1)
    assert ((n >= 4) & (n <= 10)).float().mean() > 0.2  # the case the rule is about is common
    ctx, _ = sample_multiblock(4000, (14, 14), gen(0), **kw)
    assert ctx.sum(1).lt(11).float().mean() < 0.01  # only where all 8 tries fail (then the largest)


def test_same_seed_same_masks():
    a = sample_multiblock(16, (14, 14), gen(3))
    b = sample_multiblock(16, (14, 14), gen(3))
    c = sample_multiblock(16, (14, 14), gen(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


# ---------------------------------------------------------------------------------------------
# I-JEPA plan


def test_ijepa_plan_keeps_every_context_patch_and_each_block_as_its_own_group():
    """Context level 1; block m is level 2 group m and sees the whole context; a patch in two
    blocks appears twice. Context lengths differ per image and nothing is truncated to the
    batch minimum (the official collator drops the bottom tokens)."""
    ctx, tgt = sample_multiblock(64, (14, 14), gen(0))
    tgt[0, 1] = tgt[0, 0]  # force an overlap: block 2 = block 1
    plan = ijepa_plan(ctx, tgt)
    assert len(set(ctx.sum(1).tolist())) > 1
    for b, (s, c, t) in enumerate(read_rows(plan)):
        assert s == b and sorted(i for i, _ in c) == ctx[b].nonzero().flatten().tolist()
        assert {l for _, l in c} == {1}
        groups = groups_of(t)
        for m in range(4):
            levels, patches = groups[m + 1]
            assert levels == {2} and patches == set(tgt[b, m].nonzero().flatten().tolist())
            assert visible(c, 2) == set(ctx[b].nonzero().flatten().tolist())
    assert len(read_rows(plan)[0][2]) == tgt[0].sum()  # the shared patches appear twice


# ---------------------------------------------------------------------------------------------
# DSeq plans: Eq. 5 through the level rule


def test_causal_target_k_plus_1_sees_exactly_R1_to_Rk():
    """One row per sample: the prediction of R_{k+1} sees the context R_1..R_k (Eq. 5), the
    context tokens of R_k see R_1..R_k (block-causal), R_1 is never a target, the last region
    (background) never context, and patches in no region (0) appear nowhere."""
    for grid, seed in itertools.product([(4, 4), (3, 5), (6, 6)], range(8)):
        regions = random_regions(16, grid[0] * grid[1], seed)
        plan = dseq_plan(regions, mode="causal", num_regions=5)
        for b, (s, c, t) in enumerate(read_rows(plan)):
            R = region_sets(regions[b].tolist())
            assert s == b and plan.n_regions[b] == len(R) and plan.dseq[b] == (len(R) >= 2)
            if len(R) < 2:
                assert c == [] and t == []
                continue
            groups = groups_of(t)
            assert sorted(groups) == list(range(2, len(R) + 1))
            for k in range(1, len(R)):
                levels, patches = groups[k + 1]
                assert patches == R[k] and visible(c, min(levels)) == set().union(*R[:k])
                assert {i for i, l in c if l == k} == R[k - 1]
                assert {i for i, l in c if l <= k} == set().union(*R[:k])
            assert all(i in set().union(*R) for i, _ in c)


def test_replicate_rows_have_context_R1_to_Rk_and_target_Rk_plus_1():
    """Replicate mode: L-1 rows per sample, row k has context R_1..R_k (all level 1) and target
    R_{k+1} (level 2, group 1); rows are sorted by sample then k; samples with < 2 regions none."""
    for grid, seed in itertools.product([(4, 4), (3, 5)], range(8)):
        regions = random_regions(16, grid[0] * grid[1], seed)
        rows = read_rows(dseq_plan(regions, mode="replicate", num_regions=5))
        expected = []
        for b in range(16):
            R = region_sets(regions[b].tolist())
            expected += [(b, set().union(*R[:k]), R[k]) for k in range(1, len(R))]
        assert len(rows) == len(expected)
        for (s, c, t), (b, context, target) in zip(rows, expected):
            assert s == b and {l for _, l in c} == {1} and {i for i, _ in c} == context
            assert groups_of(t) == {1: ({2}, target)}


def lag_example():
    """4 x 4 map: R_1..R_4 one row each, background column 0 (values 1..4, 5)."""
    regions = torch.tensor([[5, 1, 1, 1, 5, 2, 2, 2, 5, 3, 3, 3, 5, 4, 4, 4]])
    return regions, region_sets(regions[0].tolist())


def test_contexts_do_not_lag_like_the_official_code():
    """The official code predicts R2, R3, R4, R5 from R1, R1, R1uR2, R1uR2uR3; Eq. 5 and this
    code use R1, R1uR2, R1uR2uR3, R1u..uR4. Fails on the lagged contexts, in both modes."""
    regions, R = lag_example()
    correct = [R[0], R[0] | R[1], R[0] | R[1] | R[2], R[0] | R[1] | R[2] | R[3]]
    lagged = [R[0], R[0], R[0] | R[1], R[0] | R[1] | R[2]]
    replicate = [{i for i, _ in c} for _, c, _ in read_rows(dseq_plan(regions, mode="replicate"))]
    _, c, t = read_rows(dseq_plan(regions, mode="causal"))[0]
    causal = [visible(c, min(groups_of(t)[k][0])) for k in range(2, 6)]
    assert replicate == correct and causal == correct and correct != lagged


def test_causal_and_replicate_give_every_target_the_same_context():
    regions = random_regions(32, 25, seed=1)
    rep = read_rows(dseq_plan(regions, mode="replicate"))
    for b, (_, c, t) in enumerate(read_rows(dseq_plan(regions, mode="causal"))):
        steps = [(row[1], row[2]) for row in rep if row[0] == b]
        for k, (rc, rt) in enumerate(steps, start=1):
            levels, patches = groups_of(t)[k + 1]
            assert patches == {i for i, _, _ in rt}
            assert visible(c, min(levels)) == {i for i, _ in rc}


def test_flat_prediction_predicts_every_region_from_R1_alone():
    regions = random_regions(32, 16, seed=2)
    for b, (_, c, t) in enumerate(read_rows(dseq_plan(regions, prediction="flat", num_regions=5))):
        R = region_sets(regions[b].tolist())
        if len(R) < 2:
            assert c == [] and t == []
            continue
        assert {i for i, _ in c} == R[0] and {l for _, l in c} == {1}
        groups = groups_of(t)
        assert [groups[g] for g in sorted(groups)] == [({2}, r) for r in R[1:]]


def order_of(plan, row=0):
    """Patch sets of a causal row in prediction order (context level k, then the last target)."""
    _, c, t = read_rows(plan)[row]
    by_level = {}
    for i, l in c:
        by_level.setdefault(l, set()).add(i)
    last = max(l for _, l, _ in t)
    return [by_level[l] for l in sorted(by_level)] + [{i for i, l, _ in t if l == last}]


ORDER_MAP = torch.tensor([[2, 2, 2, 2,  # R_2: top row (first patch 0)
                           5, 3, 3, 5,  # R_3: middle pair (first patch 5); background first at 4
                           5, 5, 5, 5,
                           1, 1, 1, 1]])  # R_1: bottom row (first patch 12); R_4 empty
R1, R2, R3, BG = {12, 13, 14, 15}, {0, 1, 2, 3}, {5, 6}, {4, 7, 8, 9, 10, 11}


@pytest.mark.parametrize("order,expected", [("saliency", [R1, R2, R3, BG]),
                                            ("reverse", [R3, R2, R1, BG]),
                                            ("raster", [R2, R3, R1, BG])])
def test_order_ablations_permute_ranked_regions_background_last(order, expected):
    """reverse = least salient first; raster = by first patch (the background starts at patch 4,
    before R_3, yet stays last); the empty R_4 is compacted away (levels 1..4)."""
    plan = dseq_plan(ORDER_MAP, order=order, num_regions=5)
    assert order_of(plan) == expected
    assert plan.n_regions.tolist() == [4]
    assert sorted({l for _, l in read_rows(plan)[0][1]}) == [1, 2, 3]


def test_random_order_is_a_seeded_permutation_per_sample():
    plan = dseq_plan(ORDER_MAP.repeat(64, 1), order="random", generator=gen(0))
    orders = [order_of(plan, b) for b in range(64)]
    assert all(o[-1] == BG and sorted(map(min, o[:3])) == [0, 5, 12] for o in orders)
    assert len({tuple(map(min, o)) for o in orders}) == 6  # all 3! permutations occur
    again = dseq_plan(ORDER_MAP.repeat(64, 1), order="random", generator=gen(0))
    assert all(torch.equal(getattr(plan, f), getattr(again, f)) for f in Plan.__dataclass_fields__)


def test_empty_ranks_are_compacted():
    """Values {2, 4, 5}: levels 1, 2, 3 (R_2 -> first, R_4 -> second, background third)."""
    regions = torch.tensor([[2, 2, 4, 4, 5, 5, 0, 0]])
    _, c, t = read_rows(dseq_plan(regions, num_regions=5))[0]
    assert sorted(c) == [(0, 1), (1, 1), (2, 2), (3, 2)]
    assert sorted(t) == [(2, 2, 2), (3, 2, 2), (4, 3, 3), (5, 3, 3)]


def test_num_regions_defaults_to_the_batch_maximum():
    regions = random_regions(16, 16, seed=3)
    a, b = dseq_plan(regions), dseq_plan(regions, num_regions=5)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in Plan.__dataclass_fields__)


def test_blocks_to_regions_first_block_wins():
    ctx = torch.tensor([[1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    tgt = torch.tensor([[[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]], dtype=torch.bool)
    assert blocks_to_regions(ctx, tgt).tolist() == [[1, 2, 2, 3, 0, 1]]


def test_random_blocks_sequential_predicts_block_m_from_context_and_earlier_blocks():
    plan = make_plan(None, 1.0, gen(0), (14, 14), batch_size=16, source="blocks")
    ctx, tgt = sample_multiblock(16, (14, 14), gen(0))  # the same draw: make_plan samples it first
    assert plan.dseq.all()
    for b, (_, c, t) in enumerate(read_rows(plan)):
        R = region_sets(blocks_to_regions(ctx, tgt)[b].tolist())
        assert R[0] == set(ctx[b].nonzero().flatten().tolist())
        for k, (levels, patches) in sorted(groups_of(t).items()):
            assert patches == R[k - 1] and visible(c, min(levels)) == set().union(*R[:k - 1])


# ---------------------------------------------------------------------------------------------
# make_plan: the lambda mix, fallback and padding


REGIONS_14 = random_regions(256, 196, seed=4)


@pytest.mark.parametrize("mode", ["causal", "replicate"])
@pytest.mark.parametrize("multiple", [8, 5])
def test_padding_has_level_and_group_0_and_widths_are_multiples(mode, multiple):
    plan = make_plan(REGIONS_14, 0.5, gen(0), (14, 14), mode=mode, pad_multiple=multiple)
    assert plan.ctx_idx.shape[1] % multiple == 0 and plan.tgt_idx.shape[1] % multiple == 0
    for idx, lvl, grp in ((plan.ctx_idx, plan.ctx_lvl, None),
                          (plan.tgt_idx, plan.tgt_lvl, plan.tgt_grp)):
        pad = lvl == 0
        assert (idx[pad] == 0).all() and (grp is None or (grp[pad] == 0).all())
        assert (pad.long().diff(dim=1) >= 0).all()  # real tokens first, then padding
        assert lvl.sum(1).gt(0).all()  # every row predicts something from something
    real = plan.tgt_lvl > 0
    assert (plan.tgt_grp[real] > 0).all() and (plan.tgt_lvl[real] >= 2).all()


def test_lam_zero_gives_only_ijepa_plans():
    for regions in (REGIONS_14, None):
        plan = make_plan(regions, 0.0, gen(0), (14, 14), batch_size=256)
        assert not plan.dseq.any() and len(plan.sample) == 256
        assert all(is_ijepa_row(c, t) for _, c, t in read_rows(plan))


@pytest.mark.parametrize("mode", ["causal", "replicate"])
def test_lam_one_gives_dseq_plans_where_regions_allow(mode):
    """Samples with < 2 non-empty regions fall back to an I-JEPA plan (dseq False)."""
    plan = make_plan(REGIONS_14, 1.0, gen(0), (14, 14), mode=mode)
    L = torch.tensor([len(region_sets(r)) for r in REGIONS_14.tolist()])
    assert (L < 2).any() and torch.equal(plan.dseq, L >= 2)
    rows = read_rows(plan)
    assert [s for s, _, _ in rows] == sorted(s for s, _, _ in rows)
    for b in range(256):
        mine = [(c, t) for s, c, t in rows if s == b]
        if L[b] < 2:
            assert len(mine) == 1 and is_ijepa_row(*mine[0]) and len(groups_of(mine[0][1])) == 4
        else:
            assert len(mine) == (1 if mode == "causal" else L[b] - 1)


def test_per_batch_coin_is_all_or_nothing():
    regions = REGIONS_14[[len(region_sets(r)) >= 2 for r in REGIONS_14.tolist()]]
    seen = set()
    for seed in range(30):
        dseq = make_plan(regions, 0.5, gen(seed), (14, 14), per_batch_coin=True).dseq
        assert dseq.all() or not dseq.any()
        seen.add(dseq.all().item())
    assert seen == {True, False}


def test_per_sample_coin_mixes_at_rate_lambda():
    regions = torch.tensor([[1] * 98 + [5] * 98]).repeat(4000, 1)  # every sample plannable
    for lam in (0.25, 0.5):
        frac = make_plan(regions, lam, gen(0), (14, 14)).dseq.float().mean().item()
        assert abs(frac - lam) < 0.03


def test_n_regions_counts_nonempty_regions_for_every_sample():
    plan = make_plan(REGIONS_14, 0.3, gen(1), (14, 14))
    expected = [len({v for v in r if v > 0}) for r in REGIONS_14.tolist()]
    assert plan.n_regions.tolist() == expected


def test_make_plan_is_deterministic_given_the_generator():
    kw = dict(order="random", mode="replicate")
    a = make_plan(REGIONS_14, 0.5, gen(7), (14, 14), **kw)
    b = make_plan(REGIONS_14, 0.5, gen(7), (14, 14), **kw)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in Plan.__dataclass_fields__)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="grid"):
        make_plan(REGIONS_14, 0.5, gen(0), (8, 8))
    with pytest.raises(ValueError, match="needs regions"):
        make_plan(None, 0.5, gen(0), (14, 14), batch_size=4)
    with pytest.raises(ValueError, match="order"):
        dseq_plan(REGIONS_14, order="spiral")
    with pytest.raises(ValueError, match="mode"):
        dseq_plan(REGIONS_14, mode="parallel")
    with pytest.raises(ValueError, match="prediction"):
        make_plan(REGIONS_14, 0.5, gen(0), (14, 14), prediction="tree")


# ---------------------------------------------------------------------------------------------
# Sub-batch packing (split_plan): the same tokens, less padding


@pytest.mark.parametrize("mode,lam", [("causal", 0.0), ("causal", 1.0), ("replicate", 1.0), ("causal", 0.5),
                                      ("replicate", 0.5)])
@pytest.mark.parametrize("max_rows", [None, 0])
def test_split_rows_cover_every_real_token_exactly_once(mode, lam, max_rows):
    """Oracle: the plan's rows read in plain Python (read_rows: real tokens = level > 0). The
    sub-plans together hold exactly those rows, each once with all its tokens, in <= k runs (no row
    limit) or in <= 2k runs of <= max(ceil(rows / k), 8) rows (the default limit), whose widths are
    the pad_width of their own longest row; no more tokens computed than unsplit."""
    B, grid, k = 24, (8, 8), 4
    regions = random_regions(B, 64, seed=3)
    plan = make_plan(regions, lam, gen(1), grid, mode=mode, num_regions=5)
    parts = split_plan(plan, k, max_rows=max_rows)
    n_rows = int(((plan.ctx_lvl > 0).any(1) | (plan.tgt_lvl > 0).any(1)).sum())  # non-empty rows
    if max_rows == 0:
        assert 1 < len(parts) <= k  # rows of these plans differ in length: a split pays
    else:
        cap = max(-(-n_rows // k), MIN_CHUNK_ROWS)
        assert 1 < len(parts) <= 2 * k and all(len(p.sample) <= cap for p in parts)
    rows = read_rows(plan)
    # the per-row counts read in the plan's one host sync are the oracle's
    assert plan.row_tokens[:2].T.tolist() == [[len(c), len(t)] for _, c, t in rows]
    expected = sorted(map(repr, (r for r in rows if r[1] or r[2])))  # non-empty rows
    got = sorted(repr(r) for p in parts for r in read_rows(p))
    assert got == expected
    for p in parts:
        n_c, n_t = (p.ctx_lvl > 0).sum(1), (p.tgt_lvl > 0).sum(1)  # (r,) real tokens per row
        assert p.ctx_idx.shape[1] == pad_width(int(n_c.max()), 8)
        assert p.tgt_idx.shape[1] == pad_width(int(n_t.max()), 8)
        assert torch.equal(p.dseq, plan.dseq) and torch.equal(p.n_regions, plan.n_regions)
        assert p.ctx_full == bool((n_c == p.ctx_idx.shape[1]).all() and p.ctx_lvl.max() <= 1)
    computed = lambda ps: sum(p.ctx_idx.numel() * 2 + p.tgt_idx.numel() for p in ps)
    assert computed(parts) < computed([plan])


def test_row_limit_cuts_the_dp_runs_and_never_adds_padding():
    """The row limit only subdivides: every sub-plan with the limit lies inside one run of the
    unlimited split (same rows, consecutive in its sorted order), and each is padded to its own
    widths, so the computed tokens can only drop."""
    regions = random_regions(40, 64, seed=5)
    plan = make_plan(regions, 1.0, gen(2), (8, 8), num_regions=5)
    free = split_plan(plan, 4, max_rows=0)
    for cap in (None, 3, 7):
        parts = split_plan(plan, 4, max_rows=cap)
        limit = cap or max(-(-40 // 4), MIN_CHUNK_ROWS)
        assert all(len(p.sample) <= limit for p in parts)
        rows_free = [set(p.sample.tolist()) for p in free]
        for p in parts:  # inside one unlimited run
            assert sum(set(p.sample.tolist()) <= r for r in rows_free) == 1
        computed = lambda ps: sum(q.ctx_idx.numel() * 2 + q.tgt_idx.numel() for q in ps)
        assert computed(parts) <= computed(free)
        assert sorted(s for p in parts for s in p.sample.tolist()) == sorted(s for p in free for s in p.sample.tolist())


@pytest.mark.parametrize("mode,lam", [("causal", 0.5), ("replicate", 1.0), ("replicate", 0.5)])
@pytest.mark.parametrize("max_rows", [None, 0, 5])
def test_compiled_split_is_equal_sub_batches_of_known_shapes(mode, lam, max_rows):
    """Under torch.compile (geometric): every sub-plan has chunk_rows(R, k) rows (R = the plan's
    rows), so a graph is one width bucket, not one per row count. Together the sub-plans hold the
    plan's non-empty rows exactly once; the filler rows hold no token (so nothing else is attended
    to or scored: the same loss); widths are the geometric pad_width of each chunk's longest row,
    and every shape lies in compile_shapes, the set train.py sizes its recompile limit by."""
    B, grid, k = 24, (8, 8), 4
    plan = make_plan(random_regions(B, 64, seed=3), lam, gen(1), grid, mode=mode, num_regions=5, geometric=True)
    parts = split_plan(plan, k, geometric=True, max_rows=max_rows)
    R, size = len(plan.sample), chunk_rows(len(plan.sample), k, max_rows)
    assert size == {None: max(-(-R // k), MIN_CHUNK_ROWS), 0: -(-R // k), 5: 5}[max_rows]  # --pack-rows' meaning
    assert len(parts) > 1 and all(len(p.sample) == size for p in parts)
    expected = sorted(repr(r) for r in read_rows(plan) if r[1] or r[2])  # the non-empty rows
    got = [r for p in parts for r in read_rows(p)]
    assert sorted(repr(r) for r in got if r[1] or r[2]) == expected
    assert len(got) - len(expected) < size  # filler: less than one chunk, all in the first one
    assert all(r[1] or r[2] for p in parts[1:] for r in read_rows(p))
    rows, ctx_widths, tgt_widths = compile_shapes(B, 64, k, num_regions=5, replicate=mode == "replicate",
                                                  max_rows=max_rows)
    for p in parts:
        n_c, n_t = (p.ctx_lvl > 0).sum(1), (p.tgt_lvl > 0).sum(1)  # (r,)
        assert p.ctx_idx.shape[1] == pad_width(int(n_c.max()), 8, True)
        assert p.tgt_idx.shape[1] == pad_width(int(n_t.max()), 8, True)
        assert p.ctx_full == bool((n_c == p.ctx_idx.shape[1]).all() and p.ctx_lvl.max() <= 1)
        assert len(p.sample) in rows and p.ctx_idx.shape[1] in ctx_widths and p.tgt_idx.shape[1] in tgt_widths


def test_rows_of_equal_length_still_run_as_k_sub_batches():
    """Every row equally long (the worst case: N-1 ranked regions everywhere, or a hand-made plan):
    cutting saves no padding, so the DP keeps one run; the default row limit still cuts it into k
    equal sub-batches (what an I-JEPA batch gets), never below MIN_CHUNK_ROWS rows each, while
    --pack-rows 0 keeps the one batch."""
    regions = torch.zeros(64, 64, dtype=torch.long)
    regions[:, :16], regions[:, 16:32], regions[:, 32:48], regions[:, 48:] = 1, 2, 3, 5  # same for all 64
    plan = make_plan(regions, 1.0, gen(0), (8, 8), num_regions=5)
    assert len(split_plan(plan, 4, max_rows=0)) == 1
    parts = split_plan(plan, 4)
    assert [len(p.sample) for p in parts] == [16, 16, 16, 16]
    assert sorted(s for p in parts for s in p.sample.tolist()) == list(range(64))
    assert all(p.ctx_idx.shape[1] == plan.ctx_idx.shape[1] for p in parts)  # no padding to drop
    assert [len(p.sample) for p in split_plan(plan, 16)] == [MIN_CHUNK_ROWS] * (64 // MIN_CHUNK_ROWS)  # the floor
    assert len(split_plan(plan, 4, max_rows=64)) == 1 and len(split_plan(plan, 4, max_rows=5)) == 13


def test_split_of_one_is_the_plan_itself():
    plan = make_plan(None, 0.0, gen(0), (8, 8), batch_size=8)
    assert split_plan(plan, 1)[0] is plan


def _computed(parts):
    """split_plan's token units: rows x (2 Lc + Lt) (encoder Lc, predictor Lc + Lt)."""
    return sum(p.ctx_idx.numel() * 2 + p.tgt_idx.numel() for p in parts)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_auto_split_pays_for_its_passes_and_never_computes_more_than_one_batch(lam):
    """--pack-splits auto = the same search with a cost per sub-batch (pass_cost). Oracle: brute force
    over every K: auto's sub-batches cost (tokens + passes) no more than the best explicit K would
    at that pass cost, never compute more tokens than one padded batch, and pass_cost 0 is exactly
    the explicit K; a pass dearer than the whole batch gives one sub-batch."""
    regions = random_regions(48, 64, seed=7)
    plan = make_plan(regions, lam, gen(3), (8, 8), num_regions=5)
    one = _computed([plan])
    for cost in (0.0, 50.0, 400.0, 5000.0):
        auto = split_plan(plan, 8, max_rows=0, pass_cost=cost)
        assert _computed(auto) <= one
        best = min(_computed(split_plan(plan, k, max_rows=0)) + cost * len(split_plan(plan, k, max_rows=0))
                   for k in range(1, 9))
        assert _computed(auto) + cost * len(auto) <= best
    same = [(p.sample.tolist(), p.ctx_idx.shape, p.tgt_idx.shape) for p in split_plan(plan, 8, pass_cost=0.0)]
    assert same == [(p.sample.tolist(), p.ctx_idx.shape, p.tgt_idx.shape) for p in split_plan(plan, 8)]
    assert len(split_plan(plan, 8, max_rows=0, pass_cost=10.0 * one)) == 1


def test_pack_settings_auto_and_explicit():
    """An explicit K is today's rule (no pass cost, --pack-rows as given); auto weighs a pass at
    PASS_COST / width^2 token units: dearer for the demo's 96-wide micro ViT than for ViT-T/16, far
    dearer on a GPU (launch-bound small models), and bounds a CPU sub-batch's activations."""
    assert pack_settings(4, None, 96, 64, "cpu") == (4, 0.0, None)
    assert pack_settings(1, 0, 96, 64, "cuda") == (1, 0.0, 0)
    k, demo, rows_demo = pack_settings("auto", None, 96, 64, "cpu")
    _, tiny, rows_tiny = pack_settings("auto", None, 192, 196, "cpu")
    _, gpu, rows_gpu = pack_settings("auto", None, 96, 64, "cuda")
    assert k == AUTO_SPLITS and demo == 4 * tiny and gpu > 10 * demo
    assert rows_tiny == MIN_CHUNK_ROWS and rows_demo > rows_tiny and rows_gpu == 0
    assert pack_settings("auto", 5, 96, 64, "cpu")[2] == 5  # an explicit --pack-rows still wins
