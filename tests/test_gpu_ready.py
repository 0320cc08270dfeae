"""GPU readiness, checked on the CPU where it can be: the unmasked attention fast path, a bounded
set of shapes (and so of compiled graphs) under torch.compile, thread / worker defaults that fit
the machine, and (marked `cuda`, skipped here) one host sync per step."""

import copy
import warnings

import pytest
import torch

import config
import data
import masking
import model as vit
import train

TINY = ["--img-size", "16", "--patch-size", "4", "--model", "micro", "--pred-dim", "16", "--pred-depth", "1",
        "--batch-size", "4", "--alpha", "0.1", "--device", "cpu", "--num-workers", "0"]


def tiny_models(device="cpu", img_size=16):
    """Encoder (4 x 4 grid at 16 px, width 16, depth 2 so block -2 exists for saliency), predictor, target."""
    torch.manual_seed(0)
    enc = vit.VisionTransformer(img_size=img_size, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    pred = vit.predictor_for(enc, pred_dim=16, depth=1)
    return tuple(m.to(device) for m in (enc, pred, copy.deepcopy(enc).requires_grad_(False)))


# ---------------------------------------------------------------------------------------------
# Attention fast path: no mask where the level rule restricts nothing


def test_encoder_without_mask_equals_the_all_level_one_mask():
    enc = tiny_models()[0]
    x, idx = torch.randn(3, 3, 16, 16), torch.stack([torch.randperm(16)[:12] for _ in range(3)])  # (3, 12)
    masked = enc(x, idx, torch.ones_like(idx))  # level rule: every token level 1 -> all True
    fast = enc(x, idx, None)  # SDPA with attn_mask=None (the flash kernel on a GPU)
    assert torch.allclose(masked, fast, atol=1e-6, rtol=1e-5)


def test_plan_says_when_the_encoder_needs_no_mask():
    g = torch.Generator().manual_seed(0)
    full = torch.zeros(2, 16, dtype=torch.bool)
    full[:, :8] = True  # both rows: 8 context patches, a multiple of pad_multiple
    tgts = torch.zeros(2, 1, 16, dtype=torch.bool)
    tgts[:, 0, 8:10] = True
    assert masking.ijepa_plan(full, tgts, pad_multiple=8).ctx_full  # one level, no padding
    short = full.clone()
    short[1, 7] = False  # row 1 has 7 context tokens: padded, so a mask is needed
    assert not masking.ijepa_plan(short, tgts, pad_multiple=8).ctx_full
    regions = torch.arange(16).div(4, rounding_mode="floor").add(1).repeat(2, 1)  # (2, 16) 4 regions
    dseq = masking.make_plan(regions, 1.0, g, (4, 4), num_regions=5)  # causal: levels 1..3
    assert dseq.dseq.all() and not dseq.ctx_full
    assert masking.ijepa_plan(full, tgts, pad_multiple=8).to("cpu").ctx_full  # survives .to()


def test_jepa_loss_is_the_same_with_the_fast_path():
    enc, pred, _ = tiny_models()
    full = torch.zeros(2, 16, dtype=torch.bool)
    full[:, :8] = True
    tgts = torch.zeros(2, 2, 16, dtype=torch.bool)
    tgts[:, 0, 8:10], tgts[:, 1, 12:15] = True, True
    plan = masking.ijepa_plan(full, tgts, pad_multiple=8)
    images, targets = torch.randn(2, 3, 16, 16), torch.randn(2, 16, 16)
    fast = train.jepa_loss(enc, pred, images, targets, plan)
    plan.ctx_full = False  # force the masked path
    assert torch.allclose(fast, train.jepa_loss(enc, pred, images, targets, plan), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# A bounded set of shapes under torch.compile


def test_geometric_widths_are_few_and_waste_under_a_quarter():
    sizes = {masking.pad_width(n, 8, geometric=True) for n in range(1, 1025)}
    assert len(sizes) <= 8 + 4 * 4  # multiples of 8 up to 64, then 4 per octave up to 1024
    for n in range(1, 1025):
        w = masking.pad_width(n, 8, geometric=True)
        assert w >= n and w % 8 == 0 and w - n < max(8, n / 4)  # < 25 % above 64 tokens
    assert masking.pad_width(5, 8) == 8 and masking.pad_width(0, 8) == 8  # never 0 columns


@pytest.mark.parametrize("mode", ["causal", "replicate"])
def test_geometric_plan_pads_rows_and_tokens_and_is_the_same_plan(mode):
    regions = torch.randint(1, 6, (16, 196), generator=torch.Generator().manual_seed(0))  # (16, 196)
    kw = dict(mode=mode, num_regions=5)
    plain = masking.make_plan(regions, 0.5, torch.Generator().manual_seed(1), (14, 14), **kw)
    geo = masking.make_plan(regions, 0.5, torch.Generator().manual_seed(1), (14, 14), geometric=True, **kw)
    R, Lc, Lt = plain.sample.shape[0], plain.ctx_idx.shape[1], plain.tgt_idx.shape[1]
    assert geo.ctx_idx.shape[1] == masking.pad_width(Lc, 8, True)
    assert geo.tgt_idx.shape[1] == masking.pad_width(Lt, 8, True)
    assert geo.sample.shape[0] == (masking.pad_width(R, 8, True) if mode == "replicate" else R)
    # the real tokens are the same plan; extra columns and rows are padding (level 0)
    assert torch.equal(geo.ctx_lvl[:R, :Lc], plain.ctx_lvl) and torch.equal(geo.tgt_grp[:R, :Lt], plain.tgt_grp)
    assert torch.equal(geo.ctx_idx[:R, :Lc], plain.ctx_idx) and torch.equal(geo.tgt_idx[:R, :Lt], plain.tgt_idx)
    assert geo.ctx_lvl[:, Lc:].eq(0).all() and geo.tgt_lvl[R:].eq(0).all() and geo.ctx_lvl[R:].eq(0).all()
    # so the loss is the same: padding rows and columns are never scored
    enc, pred = vit.VisionTransformer(img_size=56, patch_size=4, embed_dim=16, depth=1, num_heads=2), None
    pred = vit.predictor_for(enc, pred_dim=16, depth=1)
    images, targets = torch.randn(16, 3, 56, 56), torch.randn(16, 196, 16)
    a, b = (train.jepa_loss(enc, pred, images, targets, p) for p in (plain, geo))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_compiled_lambda_mixed_run_has_one_static_graph_per_shape(monkeypatch):
    """200 steps of a lambda-mixed run (0 -> 1: I-JEPA, mixed, then DSeq plans) through
    train.wrap_for_speed's real settings: dynamic=False, no automatic dynamic shapes, the recompile
    limit from masking.compile_shapes. Backend: aot_eager behind a recorder (AOTAutograd traces
    forward and backward like Inductor's path, without code generation, so the test takes seconds;
    Inductor itself is the slow CPU test in test_train.py). Every graph has int sizes only (no
    SymInt: nothing is dynamic); there is exactly one graph per shape met (encoder (rows, Lc, mask or
    not), predictor (rows, Lc, Lt), the target features), no recompiles beyond that, and the count
    stays within the bound train.py set as the recompile limit."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    for key in ("automatic_dynamic_shapes", "recompile_limit", "accumulated_recompile_limit"):
        monkeypatch.setattr(dynamo_config, key, getattr(dynamo_config, key))  # put back after the test
    torch._dynamo.reset()
    counters.clear()
    graphs = []  # the example inputs of every graph dynamo captured

    def record(gm, example_inputs):
        graphs.append(example_inputs)
        return aot_eager(gm, example_inputs)

    # batch 16 in 2 sub-batches of 8 rows; an 8 x 8 grid: on 4 x 4 the official-rule I-JEPA sampler
    # has too few block shapes to vary the plans
    args = config.parse_args(TINY + ["--compile", "--img-size", "32", "--batch-size", "16", "--pack-splits", "2"])
    models = tiny_models(img_size=32)
    real = torch.compile
    with monkeypatch.context() as m:
        m.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": record}))
        step_models = train.wrap_for_speed(models, args, 1, torch.device("cpu"))
    g, noop = torch.Generator().manual_seed(0), torch.autocast("cpu", enabled=False)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    enc_shapes, pred_shapes = set(), set()
    try:
        for step in range(200):
            loss, plan, _ = train.train_step(step_models, images, step / 200, args, g, noop)
            loss.backward()
            for p in masking.split_plan(plan, 2, geometric=True):  # what the step ran (no randomness)
                enc_shapes.add((len(p.sample), p.ctx_idx.shape[1], p.ctx_full))
                pred_shapes.add((len(p.sample), p.ctx_idx.shape[1], p.tgt_idx.shape[1]))
        unique = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    sizes = [d for inputs in graphs for x in inputs for d in (x.shape if isinstance(x, torch.Tensor) else [x])]
    assert sizes and not any(isinstance(d, torch.SymInt) for d in sizes)  # every graph fully static
    assert len(pred_shapes) > 3 and len({s[0] for s in pred_shapes}) == 1  # plans vary; rows do not
    assert len(graphs) == unique == len(enc_shapes) + len(pred_shapes) + 1  # one graph per shape, +1 features
    rows, ctx, tgt = masking.compile_shapes(16, 64, 2, n_targets=4, num_regions=5)
    assert len(pred_shapes) <= dynamo_config.recompile_limit == len(rows) * len(ctx) * len(tgt)


# ---------------------------------------------------------------------------------------------
# Threads and workers that fit the machine


def test_default_workers_and_threads_fit_the_cpus():
    assert data.default_num_workers("cpu", cpus=2) == 0 and data.default_num_threads(0, cpus=2) == 2
    assert data.default_num_workers("cpu", cpus=32) == 4 and data.default_num_threads(4, cpus=32) == 28
    assert data.default_num_workers("cuda", cpus=12) == 11 and data.default_num_threads(11, cpus=12) == 1
    assert data.default_num_workers("cuda", cpus=1) == 1 and data.default_num_workers("cuda", cpus=128) == 16
    for cpus in range(1, 65):  # never more busy processes + threads than CPUs (except 1 CPU + CUDA)
        w = data.default_num_workers("cpu", cpus=cpus)
        assert w + data.default_num_threads(w, cpus=cpus) <= max(cpus, 1)


def test_fit_threads_respects_omp_num_threads(monkeypatch):
    args = config.parse_args(TINY[:-2])  # --num-workers left at its default
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        config.fit_threads(args, torch.device("cpu"))
        assert torch.get_num_threads() == 1  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(256)  # as if torch's default were a huge machine's
        workers = config.fit_threads(args, torch.device("cpu"))
        assert torch.get_num_threads() == data.default_num_threads(workers)  # what this one has
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Host syncs on CUDA: one per step, the plan's


@pytest.mark.cuda
def test_a_training_step_syncs_the_host_once_for_the_plan():
    device = torch.device("cuda")
    args = config.parse_args(TINY[:-4] + ["--device", "cuda", "--num-workers", "0"])
    models = tiny_models(device)
    opt = train.make_optimizer(models[0], models[1], args)
    images, g = torch.randn(4, 3, 16, 16, device=device), torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    train.ema_update(models[2], models[0], 0.99)  # first calls (lazy init) outside the check
    for step in range(3):  # step 0 builds lazy state; steps 1-2 are the steady state
        lam = (0.0, 0.5, 1.0)[step]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync raises ...
        try:
            with torch.no_grad(), autocast:
                targets, regions, _ = train.make_targets(models[2], images, args)  # 1. targets + saliency
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:  # ... except the plan's one
                warnings.simplefilter("always")
                plan = train.make_plan(regions, lam, g, models[2].grid, args, 4, device)  # 2.
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= 1, [str(w.message) for w in syncs]
            torch.cuda.set_sync_debug_mode("error")
            with autocast:
                loss = train.jepa_loss(models[0], models[1], images, targets, plan)  # 3.-5.
            loss.backward()  # 6.
            opt.step()
            opt.zero_grad(set_to_none=True)
            train.ema_update(models[2], models[0], 0.99)  # 7.
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
def test_a_whole_loop_step_syncs_the_host_once(tmp_path, monkeypatch):
    """train.main on CUDA as a user runs it (data resident on the device, bf16; --compile off: a
    first compile of a new shape may itself wait for the device), counted between the EMA updates
    of steps 3 and 5, which are neither log nor checkpoint steps: everything two whole loop steps do
    (next batch and its crops, schedules, plan, forward, backward, AdamW, EMA, the device-side loss
    and non-finite flag) syncs the host at most once per step, for the plan."""
    caught, marks = [], []
    real_ema = train.ema_update

    def ema_update(*a):
        real_ema(*a)
        marks.append(sum("synchroniz" in str(w.message) for w in caught))  # syncs so far, after each step

    monkeypatch.setattr(train, "ema_update", ema_update)
    argv = TINY[:-4] + ["--device", "cuda", "--num-workers", "0", "--num-train", "160", "--num-val", "32",
                        "--batch-size", "16", "--epochs", "1", "--knn-every", "0", "--no-picture", "--log-every", "100",
                        "--ckpt-every", "100", "--stop-at-step", "6", "--compile", "off", "--out-dir", str(tmp_path)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        caught = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            assert train.main(argv) == 6
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(marks) == 6 and 1 <= marks[4] - marks[2] <= 2, (marks, syncs[-8:])


# ---------------------------------------------------------------------------------------------
# Feeding the GPU: JPEG draft decoding shows the crop's content, only at a reduced decode


def test_draft_decoded_crops_show_the_same_content(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:384, 0:512] / 64.0  # smooth content: interpolation differences stay small
    rgb = np.stack([np.sin(xx) , np.cos(yy), np.sin(xx + yy)], -1) * 100 + 128  # (384, 512, 3)
    Image.fromarray(rgb.astype(np.uint8)).save(folder / "x.JPEG", quality=95)
    base = data.ImageFolder(str(tmp_path), "train")
    transform = data.Transform(48, augment=True, crop_scale=(0.5, 1.0), flip=True)
    keyed = data.TransformedDataset(base, transform, seed=0)
    fired = 0
    for epoch in range(6):
        rng = np.random.default_rng([0, epoch, 0])
        (top, left, h, w), _ = transform.box(512, 384, np.random.default_rng([0, epoch, 0]))
        _, _, full, scale = base.load(0, lambda W, H: transform.decode_size(W, H, (top, left, h, w)))
        fired += scale[0] < 1
        assert full == (512, 384) and scale[0] * transform.decode_size(512, 384, (top, left, h, w))[0] <= 512
        drafted = keyed[(0, epoch)][0]  # (3, 48, 48) normalised, decoded at 1/2 .. 1/8
        img, _ = base[0]  # full decode, then the same crop drawn from the same rng
        reference = transform(img, rng)
        assert drafted.shape == reference.shape == (3, 48, 48)
        # within interpolation tolerance: ~1 % of the normalised range on average, a few % at most
        assert (drafted - reference).abs().mean() < 0.03 and (drafted - reference).abs().max() < 0.3
    assert fired >= 3  # the draft decode really ran (crops of >= half the image, shrunk to 48 px)
