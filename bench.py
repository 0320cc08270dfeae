"""
Benchmark: does a DSeq-JEPA step cost about what an I-JEPA step costs? (The paper's cost table
reports +16 % FLOPs; the official DSeq step costs ~5.8x an I-JEPA step, fault 5 in the README.)

    python bench.py --json bench.json              # CPU defaults: ViT-tiny, 224 px / 16, batch 4, ~3 min
    python bench.py --device cuda --batch-size 256 --json bench.json   # bf16, eager and torch.compile side by side

1. Time of the FULL training step (train.train_step: targets + saliency, plan, context encoder,
   predictor, loss; then backward, loss.item(), AdamW step, EMA, as train.main's loop), same
   models, batch and images for every config, run ROUND-ROBIN one step each (start rotated every
   round) so that load from other processes hits all alike; round r steps on image batch r % 2
   with each config's plan generator reseeded to seed + r % 2 (two steps per config, repeated:
   warm-up rounds >= 2 compile every graph the timed rounds meet); medians over --steps rounds.
   --modes: eager and / or torch.compile (default on CUDA: both, one after the other, then a
   side-by-side table; the same models from --seed, the same plans); per config:
     ijepa            --method ijepa: no saliency at all, the true I-JEPA step (the baseline)
     causal           lambda 1, DSeq plan in one block-causal pass (ours, the default)
     replicate        lambda 1, one row per step of Eq. 5 (the official structure, correct contexts)
     mix              lambda 0.5, per-sample coin, causal
   Plain rows use the untrained encoder's own saliency: read "dseq" (share of samples that really
   got a DSeq plan; < 2 regions fall back to I-JEPA) and "regions" (non-empty regions incl. the
   background) before trusting a ratio. "+blobs" rows feed synthetic maps (four separated blobs)
   through the real Otsu / components / ranking, so every sample gets N-1 = 4 ranked regions: the
   costliest DSeq plan. "x wall" / "x cpu": ratio to ijepa by wall clock / by process CPU time.
   lr is 0: AdamW does all its arithmetic, but the weights (and so the regions) never change.
   CPU threads default to 1: on a shared 2-core box OpenMP threads spin against other processes
   and the same step took 150-340 ms with 2 threads vs a steady 130 ms CPU time with 1.
2. Tokens per image from the plans, context encoder ("enc tok") and predictor, real / padded.
3. Peak memory. CUDA: torch.cuda.max_memory_allocated, reset before every step, max per config.
   CPU: RSS never drops within a process, so each config runs in a FRESH subprocess: one warm-up
   step, reset the peak counter (/proc/self/clear_refs), one step; "mem" = VmHWM, the peak RSS of
   the whole process (torch, models, AdamW state included) during that step.
4. Model FLOPs per image, analytic, from the plans' REAL token counts (2 FLOPs per multiply-add):
     block(L, d)   = 24 L d^2 + 4 L^2 d      (qkv 6, proj 2, MLP 16 L d^2; QK^T and AV 2 L^2 d)
     embed         = 2 P (3 p^2) D           (patch conv over all P patches before token dropping)
     encoder row   = embed + depth * block(Lc + 1, D)                   (+1: the CLS token)
     predictor row = 2 Lc D Dp + pdepth * block(Lc + Lt, Dp) + 2 Lt Dp D
     target        = embed + depth * block(P + 1, D)                    (no grad: forward only)
     step          = 3 * sum over plan rows (encoder + predictor) + B * target  (fwd + 2x bwd)
   Norms, GELU, softmax, loss, AdamW, EMA are left out (~1 %). MFU (CUDA, or with --peak-tflops)
   = step FLOPs / median wall time / the card's dense bf16 peak (PEAK_BF16_TFLOPS by device name;
   null for a card not in it). With torch.compile: graphs compiled per config and in all, during
   the timed rounds (recompiles; they would pollute the timing), and torch._dynamo's recompile
   reasons. Plans and sub-batches then come in a few static shapes (masking.compile_shapes).
5. Saliency regions for --sal-batch smooth random maps: saliency.regions_from_saliency (batched,
   on the device) vs the per-image OpenCV loop of tests/opencv_reference.py; outputs asserted equal.
6. Loader: images per second per core (one process, one thread, CPU time) of the ImageFolder
   training pipeline on generated 500 x 375 JPEGs, against a plain PIL decode + crop-resize +
   to-tensor loop and against the same pipeline decoding every JPEG in full (no draft).
Targets: DSeq causal step <= 1.2x the I-JEPA step; batched saliency >= 20x the OpenCV loop.
All train.py flags work (--model, --img-size, --batch-size, --device, --amp, --compile, ...).
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

import config
import data
import masking
import saliency
import train

# Defaults sized for a 2-core CPU (whole script ~3 min when the machine is quiet); any train.py
# flag given on the command line wins over these (argparse keeps the last occurrence).
TRAIN_DEFAULTS = ["--model", "tiny", "--img-size", "224", "--patch-size", "16", "--pred-dim", "192",
                  "--pred-depth", "6", "--batch-size", "4", "--num-workers", "0", "--device-data", "off",
                  "--no-picture"]
# name: (method, lambda, dseq pass, synthetic blob maps)
CONFIGS = {"ijepa": ("ijepa", 0.0, "causal", False), "causal": ("dseq", 1.0, "causal", False),
           "replicate": ("dseq", 1.0, "replicate", False), "mix": ("dseq", 0.5, "causal", False),
           "causal+blobs": ("dseq", 1.0, "causal", True), "replicate+blobs": ("dseq", 1.0, "replicate", True),
           "mix+blobs": ("dseq", 0.5, "causal", True)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts


def get_parser():
    p = argparse.ArgumentParser("bench.py", epilog="all train.py flags are accepted as well")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step per config each)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 CPU, 3 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: see the docstring)")
    p.add_argument("--maps", choices=["saliency", "blobs", "both"], default="both",
                   help="saliency: the encoder's own maps; blobs: synthetic maps with N-1 regions")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: measure peak RSS per config in fresh subprocesses")
    p.add_argument("--sal-batch", type=int, default=256, help="maps for the saliency comparison (0 = skip)")
    p.add_argument("--sal-repeats", type=int, default=5, help="repeats of each saliency timing")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=None,
                   help="time the configs eager and / or with torch.compile, one mode after the other (default: "
                        "both on CUDA, side by side; on the CPU the mode --compile says)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                   help="only these configs of the main table (default: all that --maps allows)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU "
                   "(default on CUDA with bf16: H100/H200 SXM 989, A100 312 dense bf16)")
    p.add_argument("--loader-images", type=int, default=64, help="JPEGs (500 x 375, made in a temp folder) "
                   "for the loader's img/s/core (0 = skip)")
    p.add_argument("--pack-batches", type=int, nargs="*", default=[8, 64, 256],
                   help="batch sizes for the padding table: real / computed tokens of both networks, with and "
                        "without --pack-splits (none = skip)")
    p.add_argument("--pack-time-batch", type=int, default=64,
                   help="batch of the step-time comparison, --pack-splits K vs 1, I-JEPA and causal+blobs (0 = skip)")
    p.add_argument("--pack-steps", type=int, default=3, help="timed rounds of that comparison (after 1 warm-up)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--official-cost", action="store_true",
                   help="only the analytic FLOPs of the official DSeq step structure vs an I-JEPA step (no timing)")
    p.add_argument("--pack-time-only", action="store_true",
                   help="only the step-time comparison of --pack-time-batch (--pack-splits K vs 1, I-JEPA and the "
                        "worst-case causal plan), e.g. with more --pack-steps on a quiet machine")
    p.add_argument("--demo-time", action="store_true",
                   help="only time `python train.py` (the demo; extra train.py flags pass through): wall time, peak RSS")
    p.add_argument("--step-overhead", action="store_true",
                   help="only the full step against the bare networks on the same real tokens, for the demo and for "
                        "ViT-T/16 at 224 px batch 64 (--steps paired rounds; threads as train.py sets them)")
    p.add_argument("--overhead-settings", nargs="+", choices=list(OVERHEAD_SETTINGS), default=list(OVERHEAD_SETTINGS),
                   help="--step-overhead: which settings to time (an A/B of the demo's flags needs only the demo)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one memory probe
    p.add_argument("--probe-images", default=None, help=argparse.SUPPRESS)
    return p


def blob_maps(B, grid, gen):
    """(B, P) synthetic saliency: a cross-shaped separator (the background) cuts the grid into four
    blobs of random, close levels (Otsu splits at the gap, not between blobs), each >= ~18 % of a
    14 x 14 grid. Ranks R_1..R_4 fall on random quadrants. The blobs are the LARGER side of Otsu's
    split, so their configs run the paper's saliency polarity (--saliency-polarity minority would
    take the separator instead: one region)."""
    h, w = grid
    r = h // 2 - 1 + torch.randint(0, 2, (B, 1, 1), generator=gen)  # (B, 1, 1) separator row
    c = w // 2 - 1 + torch.randint(0, 2, (B, 1, 1), generator=gen)  # (B, 1, 1) separator column
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    quad = ((rows > r).long() * 2 + (cols > c).long()).flatten(1)  # (B, P) blob 0..3
    level = 0.9 + 0.1 * torch.rand(B, 4, generator=gen)  # (B, 4)
    A = level.gather(1, quad) + 0.01 * torch.rand(B, h * w, generator=gen)  # (B, P)
    return torch.where(((rows == r) | (cols == c)).flatten(1), 0.01 * A, A)  # separator ~ 0


@contextmanager
def fixed_saliency(A):
    """Replace only the raw map A = <q, z_j> / sqrt(D); Eq. 1-3 in saliency.py still run."""
    real = saliency.saliency_map
    if A is not None:
        saliency.saliency_map = lambda z, cls_token: A[: z.shape[0]]
    try:
        yield
    finally:
        saliency.saliency_map = real


def setup(args, targs, device):
    """Models, optimizer, compiled step modules and per-config args, exactly as train.main builds them."""
    torch.manual_seed(targs.seed)
    models = train.build_models(targs)
    for m in models:
        m.to(device)
    encoder, predictor, _ = models
    optimizer = train.make_optimizer(encoder, predictor, targs)
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # see the docstring: same weights for every config and round
    step_models = train.wrap_for_speed(models, targs, 1, device)  # as train.main (one process)
    cfgs = {}
    for name, (method, lam, dseq_pass, blobs) in CONFIGS.items():
        if (blobs and args.maps == "saliency") or (not blobs and method == "dseq" and args.maps == "blobs") \
                or name not in (getattr(args, "configs", None) or CONFIGS):
            continue
        cargs = argparse.Namespace(**{**vars(targs), "method": method, "dseq_pass": dseq_pass,
                                      "saliency_polarity": "paper" if blobs else targs.saliency_polarity})
        gen = torch.Generator(device=device).manual_seed(targs.seed)  # same plan stream per config
        cfgs[name] = dict(args=cargs, lam=lam, blobs=blobs, gen=gen)
    return models, step_models, optimizer, cfgs


def full_step(models, step_models, optimizer, images, cfg, maps, autocast):
    """One training step as train.main's loop runs it. Returns the plan."""
    with fixed_saliency(maps if cfg["blobs"] else None):
        loss, plan, _ = train.train_step(step_models, images, cfg["lam"], cfg["args"], cfg["gen"], autocast)  # 1.-5.
    loss.backward()  # 6.
    loss.item()  # the loop's host sync
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    train.ema_update(models[2], models[0], cfg["args"].ema[0])  # 7.
    return plan


# --step-overhead: the full step against the bare networks on the same real token counts
OVERHEAD_SETTINGS = {"demo": [],  # python train.py's preset: micro ViT, 32 px / 4, batch 64
                     "vit_t16_224": ["--model", "tiny", "--img-size", "224", "--patch-size", "16", "--pred-dim",
                                     "192", "--pred-depth", "6", "--batch-size", "64", "--num-train", "128"]}


def plain_step(models, optimizer, images, Lc, Lt, momentum):
    """The networks alone on Lc context and Lt target tokens per image: target encoder forward (no
    grad), context encoder and predictor forward + backward with no plan, no saliency and no attention
    mask (every token sees every token), smooth-L1, AdamW, EMA. What step_overhead divides by."""
    encoder, predictor, target_encoder = models
    B, P = images.shape[0], encoder.num_patches
    with torch.no_grad():
        h = target_encoder.features(images)[0]  # (B, P, D)
        targets = F.layer_norm(h, (h.shape[-1],))
    perm = torch.rand(B, P).argsort(1)  # (B, P) a random split of each image's patches
    ctx_idx, tgt_idx = perm[:, :Lc], perm[:, Lc:Lc + Lt]  # (B, Lc), (B, Lt)
    ctx = encoder(images, ctx_idx)  # (B, Lc, D)
    pos = predictor.pos_embed[0]  # (P, Dp)
    x = torch.cat([predictor.predictor_embed(ctx) + pos[ctx_idx], predictor.mask_token + pos[tgt_idx]], 1)  # (B, Lc + Lt, Dp)
    for block in predictor.blocks:
        x = block(x)
    pred = predictor.predictor_proj(predictor.norm(x[:, Lc:]))  # (B, Lt, D)
    tgt = targets.gather(1, tgt_idx[..., None].expand(-1, -1, targets.shape[-1]))  # (B, Lt, D)
    loss = F.smooth_l1_loss(pred, tgt)
    loss.backward()
    loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    train.ema_update(target_encoder, encoder, momentum)


def step_overhead(args, extra):
    """overhead_ratio per setting: median over rounds of (full step / plain_step), timed wall clock
    and interleaved (full, plain, full, plain, ...) in one process so that load hits both alike.
    Each round's plain step runs right after its full step, on THAT step's real tokens: plans vary
    from step to step (at lambda 0.5 half the samples are DSeq plans), so a plain step on another
    step's token counts would pair unlike work (it did, in the alternating order used before).
    The full step is train.main's: the next batch from the loader, train_step (targets + saliency,
    plan, sub-batches, masks), backward, loss.item(), AdamW, EMA, at lambda 0.5 (the middle of the
    curriculum: half the samples DSeq plans; 0 under --method ijepa); plain_step gets that step's real tokens per image."""
    out = {"rounds": args.steps, "overhead_ratio": {}, "settings": {}}
    for name in args.overhead_settings:
        flags = OVERHEAD_SETTINGS[name]
        targs = config.parse_args(flags + extra + ["--no-picture"])
        device = config.pick_device(targs, 0)
        config.fit_threads(targs, device)
        torch.manual_seed(targs.seed)
        models = train.build_models(targs)
        optimizer = train.make_optimizer(models[0], models[1], targs)
        loader = data.build_train_loader(targs, targs.batch_size, 0, 1, device)
        gen = torch.Generator(device=device).manual_seed(targs.seed)
        batches = iter(())
        lam = 0.0 if targs.method == "ijepa" else 0.5  # --method ijepa: its own plans only (train.py's lambda)

        def full():
            nonlocal batches
            images = next(batches, None)
            if images is None:  # a new epoch
                loader.set_epoch(0)
                batches = (x for x, _ in loader)
                images = next(batches)
            loss, plan, stats = train.train_step(models, images, lam, targs, gen, nullcontext())
            loss.backward()
            loss.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train.ema_update(models[2], models[0], targs.ema[0])
            return round(stats["context_tokens"].item()), round(stats["target_tokens"].item())

        Lc, Lt = full()  # warm-up; the plain step gets the full step's real tokens per image
        images = next(iter(loader))[0]
        plain_step(models, optimizer, images, Lc, Lt, targs.ema[0])
        times = {"full": [], "plain": []}
        for rnd in range(args.steps):
            t = time.perf_counter()
            Lc, Lt = full()
            times["full"].append(time.perf_counter() - t)
            t = time.perf_counter()
            plain_step(models, optimizer, images, Lc, Lt, targs.ema[0])  # this round's own tokens
            times["plain"].append(time.perf_counter() - t)
        ratios = [f / p for f, p in zip(times["full"], times["plain"])]
        ratio = statistics.median(ratios)
        out["overhead_ratio"][name] = ratio
        out["settings"][name] = {"flags": flags, "full_ms": 1e3 * statistics.median(times["full"]),
                                 "plain_ms": 1e3 * statistics.median(times["plain"]), "batch": targs.batch_size,
                                 "pack_splits": targs.pack_splits, "threads": torch.get_num_threads(),
                                 "ratio_per_round": [round(r, 3) for r in ratios],
                                 "ratio_of_medians": statistics.median(times["full"]) / statistics.median(times["plain"])}
        print(f"{name}: full step {out['settings'][name]['full_ms']:.0f} ms, plain {out['settings'][name]['plain_ms']:.0f}"
              f" ms, overhead ratio {ratio:.2f} (median of {args.steps} paired rounds)")
    return out


def computed_tokens(parts):
    """Tokens the context encoder and the predictor compute for a list of (sub-)plans, padding included."""
    enc = sum(p.ctx_idx.numel() for p in parts)  # rows x Lc per sub-batch
    return enc, enc + sum(p.tgt_idx.numel() for p in parts)  # predictor: rows x (Lc + Lt)


def plan_numbers(plan, B, enc, pred, patch, targs=None):
    """Tokens per image (real / computed, split as train.py splits it under targs' --pack-splits;
    targs None: one padded batch) and model GFLOPs per image from the plan's real tokens (docstring 4)."""
    n_c, n_t = (plan.ctx_lvl > 0).sum(1).double(), (plan.tgt_lvl > 0).sum(1).double()  # (R,) each
    enc_pad, pred_pad = computed_tokens(split(plan, targs.pack_splits, targs, enc) if targs else [plan])
    D, depth, Dp, pdepth, P = enc.embed_dim, enc.depth, pred.pred_dim, len(pred.blocks), enc.num_patches
    block = lambda L, d: 24 * L * d * d + 4 * L * L * d
    embed = 2 * P * 3 * patch * patch * D
    rows = embed + depth * block(n_c + 1, D) + 2 * n_c * D * Dp + pdepth * block(n_c + n_t, Dp) + 2 * n_t * Dp * D
    flops = 3 * rows.sum().item() + B * (embed + depth * block(P + 1, D))
    return dict(enc_real=n_c.sum().item() / B, enc_pad=enc_pad / B, pred_real=(n_c + n_t).sum().item() / B,
                pred_pad=pred_pad / B, gflop_img=flops / B / 1e9, dseq=plan.dseq.float().mean().item(),
                regions=plan.n_regions.float().mean().item())


PACK_PLANS = (("ijepa", 0.0, "own"), ("causal", 1.0, "own"), ("causal+blobs", 1.0, "blobs"), ("mix", 0.5, "own"),
              ("mix+blobs", 0.5, "blobs"))  # name, lambda, regions (the encoder's own saliency or blob maps)


def split(plan, k, targs, enc):
    """masking.split_plan as train.train_step calls it, for --pack-splits k (a number or auto)."""
    k, pass_cost, rows = masking.pack_settings(k, targs.pack_rows, enc.embed_dim, enc.num_patches,
                                               plan.sample.device.type)
    return masking.split_plan(plan, k, geometric=bool(targs.compile), max_rows=rows, pass_cost=pass_cost)


def pack_tokens(targs, models, batch_sizes, device):
    """Padding waste (docstring 7): for each batch size and plan kind, real and computed tokens of the
    context encoder and the predictor per image, one padded batch (--pack-splits 1) vs the split."""
    enc, _, target_encoder = models
    grid, K = enc.grid, targs.pack_splits
    dseq_args = argparse.Namespace(**{**vars(targs), "method": "dseq", "dseq_pass": "causal"})
    gen = torch.Generator(device=device).manual_seed(targs.seed)
    out = {}
    for B in batch_sizes:
        loader_args = argparse.Namespace(**{**vars(targs), "num_train": max(targs.num_train, B)})
        images = next(iter(data.build_train_loader(loader_args, B, 0, 1, "cpu")))[0].to(device)  # (B, 3, H, W)
        with torch.no_grad():
            own = train.make_targets(target_encoder, images, dseq_args)[1]  # (B, P) untrained saliency
        A = blob_maps(B, grid, torch.Generator().manual_seed(targs.seed)).to(device)  # (B, P)
        maps = {"own": own, "blobs": saliency.regions_from_saliency(A, grid, targs.regions, targs.alpha)[0]}
        for name, lam, source in PACK_PLANS:
            plan = train.make_plan(None if lam == 0 else maps[source], lam, gen, grid, dseq_args, B, device)
            real_c = (plan.ctx_lvl > 0).sum().item()  # real context tokens of the batch
            real_p = real_c + (plan.tgt_lvl > 0).sum().item()  # predictor: context + target tokens
            row = {"batch": B, "plan": name, "dseq": plan.dseq.float().mean().item(),
                   "enc_real": real_c / B, "pred_real": real_p / B}
            for k in dict.fromkeys([1, K]):
                parts = split(plan, k, targs, enc)
                enc_c, pred_c = computed_tokens(parts)
                row[f"k{k}"] = {"sub_batches": len(parts), "enc_computed": enc_c / B, "pred_computed": pred_c / B,
                                "enc_waste": 1 - real_c / enc_c, "pred_waste": 1 - real_p / pred_c}
            out[f"{name}@{B}"] = row
    return out


def pack_time(args, targs, device, autocast):
    """Step time at batch --pack-time-batch, --pack-splits K vs 1 (and K with --pack-rows 0, no row
    limit per sub-batch), for I-JEPA and causal+blobs (the worst DSeq causal plan, every row about as
    long), round-robin in one process as the main table; medians of the process CPU time on a CPU (less
    moved by other jobs than wall clock, yet +-10 % with four of them on two cores), of wall time on
    CUDA. "excess" = (time / I-JEPA time) / (real-token GFLOPs / I-JEPA's) - 1: what a plan costs
    beyond its real tokens, against I-JEPA run the same way; "excess_vs_fastest" against the fastest
    I-JEPA of all (so a setting cannot look good by slowing the baseline down)."""
    B, K = args.pack_time_batch, targs.pack_splits
    targs = argparse.Namespace(**{**vars(targs), "batch_size": B, "num_train": max(targs.num_train, 2 * B)})
    models, step_models, optimizer, _ = setup(argparse.Namespace(**{**vars(args), "maps": "blobs"}), targs, device)
    images = next(iter(data.build_train_loader(targs, B, 0, 1, "cpu")))[0].to(device)  # (B, 3, H, W)
    maps = blob_maps(B, models[0].grid, torch.Generator().manual_seed(targs.seed)).to(device)  # (B, P)
    cfgs = {}
    for name in ("ijepa", "causal+blobs"):
        method, lam, dseq_pass, blobs = CONFIGS[name]
        settings = {"k1": (1, None), f"k{K}": (K, targs.pack_rows)}  # k1 ignores the row limit
        if K != 1 and targs.pack_rows != 0:  # with --pack-rows 0, kK already is the no-limit run
            settings[f"k{K} rows0"] = (K, 0)
        for key, (k, rows) in settings.items():
            cargs = argparse.Namespace(**{**vars(targs), "method": method, "dseq_pass": dseq_pass, "pack_splits": k,
                                          "pack_rows": rows, "saliency_polarity": "paper"})  # blob maps: see blob_maps
            cfgs[f"{name} {key}"] = dict(args=cargs, lam=lam, blobs=blobs,
                                         gen=torch.Generator(device=device).manual_seed(targs.seed))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, flops, plans = {n: [] for n in cfgs}, {}, {}
    names = list(cfgs)
    for rnd in range(1 + args.pack_steps):
        for i in range(len(names)):
            name = names[(rnd + i) % len(names)]
            sync()
            t, c = time.perf_counter(), time.process_time()
            plan = full_step(models, step_models, optimizer, images, cfgs[name], maps, autocast)
            sync()
            if rnd > 0:  # CPU: process CPU time (robust to other jobs on the machine); CUDA: wall clock
                times[name].append(time.perf_counter() - t if device.type == "cuda" else time.process_time() - c)
                flops[name] = plan_numbers(plan, B, models[0], models[1], targs.patch_size)["gflop_img"]
                plans[name] = plan
    out = {"batch": B, "splits": K, "rows": targs.pack_rows, "steps": args.pack_steps}
    for name in names:
        out[name] = {"ms": 1e3 * statistics.median(times[name]), "gflop_img": flops[name],
                     "sub_batches": len(split(plans[name], cfgs[name]["args"].pack_splits, cfgs[name]["args"],
                                              models[0]))}
    fastest = min((n for n in names if n.startswith("ijepa")), key=lambda n: out[n]["ms"])
    out["fastest_ijepa"] = fastest
    for name in names:
        base = "ijepa " + name.split(" ", 1)[1]  # I-JEPA with the same settings
        r = out[name]
        r["x_ijepa"] = r["ms"] / out[base]["ms"]
        r["excess"] = r["x_ijepa"] / (r["gflop_img"] / out[base]["gflop_img"]) - 1
        r["excess_vs_fastest"] = r["ms"] / out[fastest]["ms"] / (r["gflop_img"] / out[fastest]["gflop_img"]) - 1
    for name in ("ijepa", "causal+blobs"):
        out[f"{name} split/unsplit"] = out[f"{name} k{K}"]["ms"] / out[f"{name} k1"]["ms"]
    return out


def print_pack_time(t):
    """The lines of pack_time's result."""
    print(f"\nstep time at batch {t['batch']}, median of {t['steps']} rounds (rows0: --pack-rows 0, no row limit):")
    for n, r in t.items():
        if isinstance(r, dict):
            print(f"  {n:22} {r['sub_batches']:2d} sub-batches {r['ms']:8.0f} ms  x{r['x_ijepa']:.2f} I-JEPA run alike, "
                  f"{100 * r['excess']:+5.1f} % over its real tokens ({100 * r['excess_vs_fastest']:+5.1f} % against "
                  f"the fastest I-JEPA, {t['fastest_ijepa']})")
    print(f"split / one padded batch: I-JEPA {t['ijepa split/unsplit']:.2f}, causal+blobs "
          f"{t['causal+blobs split/unsplit']:.2f}")


def pack_excess(t):
    """The worst-case step's cost beyond its real tokens at the run's settings, against the fastest I-JEPA."""
    return t[f"causal+blobs k{t['splits']}"]["excess_vs_fastest"]


def status_mib(key):  # a field of /proc/self/status, kB -> MiB
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024


def memory_probe(args, targs, device):
    """Child process: one warm-up step, reset the peak-RSS counter, one measured step."""
    models, step_models, optimizer, cfgs = setup(args, targs, device)
    images, maps = torch.load(args.probe_images)
    autocast, _ = config.make_autocast(targs, device)
    full_step(models, step_models, optimizer, images, cfgs[args.probe], maps, autocast)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := current RSS
    before = status_mib("VmRSS")
    full_step(models, step_models, optimizer, images, cfgs[args.probe], maps, autocast)
    print(json.dumps({"peak_mib": status_mib("VmHWM"), "step_mib": status_mib("VmHWM") - before}))


def bench_saliency(B, grid, N, alpha, repeats, device):
    """Batched regions on `device` vs the per-image OpenCV loop, which must first copy the maps to
    the host (what the official step pays on a GPU); same smooth random maps, outputs asserted
    identical. Returns median times and the speed-up."""
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
        from opencv_reference import opencv_regions_reference
    except ImportError as e:  # cv2 (or the reference file) missing: skip this part
        return {"skipped": str(e)}
    gen = torch.Generator().manual_seed(0)
    A = torch.cat([F.interpolate(torch.randn(n, 1, k, k, generator=gen), grid, mode="bicubic")
                   for n, k in ((B // 2, 3), (B - B // 2, 5))]).flatten(1).to(device)  # (B, P) blobs of 2 sizes

    def batched():
        regions = saliency.regions_from_saliency(A, grid, N, alpha)[0]  # (B, P)
        return regions.cpu() if device.type == "cuda" else regions  # waits for the device

    def loop():  # the host copy is part of the loop's cost; its result stays on the host too
        return torch.from_numpy(opencv_regions_reference(A.cpu().numpy(), grid, N, alpha))

    ours = batched()
    assert torch.equal(ours, loop()), "batched regions differ from the per-image OpenCV loop"
    times = {}
    for name, fn in (("batched", batched), ("opencv_loop", loop)):
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        times[name] = statistics.median(t)
    ranked = (ours.masked_fill(ours >= N, 0).amax(1) > 0).float().mean().item()
    return {"batch": B, "grid": list(grid), "batched_ms": 1e3 * times["batched"],
            "opencv_loop_ms": 1e3 * times["opencv_loop"], "speedup": times["opencv_loop"] / times["batched"],
            "share_with_ranked_region": ranked, "identical": True}


def write_json(result, path, quiet=False):
    """Print result (unless quiet) and write it to path (if given); -> result."""
    if not quiet:
        print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def official_cost(targs, n_images=256):
    """Model FLOPs of the official DSeq-JEPA step structure (fault 5) over an I-JEPA step, from token
    counts, with the formula of plan_numbers (docstring 4). I-JEPA: the real multi-block plans of
    masking.py (context ~ 0.85-1 of the grid minus 4 targets of 0.15-0.2). Official DSeq: every image
    repeated once per step of Eq. 5 (N - 1 rows), and every row runs the context encoder and the
    predictor over ALL P tokens (the hidden ones are masked in attention, not dropped), targets R_{k+1}
    (P / N tokens on average). Both add one target-encoder pass over the full image."""
    enc, pred, _ = train.build_models(targs)
    gen = torch.Generator().manual_seed(targs.seed)
    ctx, tgts = masking.sample_multiblock(n_images, enc.grid, gen, n_targets=targs.num_targets,
                                          target_scale=tuple(targs.target_scale),
                                          context_scale=tuple(targs.context_scale))
    ijepa = plan_numbers(masking.ijepa_plan(ctx, tgts), n_images, enc, pred, targs.patch_size)
    D, depth, Dp, pdepth, P, N = enc.embed_dim, enc.depth, pred.pred_dim, len(pred.blocks), enc.num_patches, targs.regions
    block = lambda L, d: 24 * L * d * d + 4 * L * L * d
    embed = 2 * P * 3 * targs.patch_size ** 2 * D
    n_t = P / N
    row = embed + depth * block(P + 1, D) + 2 * P * D * Dp + pdepth * block(P, Dp) + 2 * n_t * Dp * D
    official = (3 * (N - 1) * row + embed + depth * block(P + 1, D)) / 1e9
    return {"command": "python bench.py " + shlex.join(sys.argv[1:]), "model": targs.model, "img_size": targs.img_size,
            "patch_size": targs.patch_size, "pred_dim": targs.pred_dim, "pred_depth": targs.pred_depth,
            "regions": N, "ijepa_gflop_img": ijepa["gflop_img"], "ijepa_enc_tokens": ijepa["enc_real"],
            "ijepa_pred_tokens": ijepa["pred_real"], "official_dseq_gflop_img": official,
            "official_over_ijepa": official / ijepa["gflop_img"]}


def demo_time(train_argv):
    """Run `python train.py TRAIN_ARGV` (the demo by default) in a fresh process: wall time and the
    child's peak RSS (getrusage of children), plus its final kNN line."""
    import resource
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                "--out-dir", tmp, *train_argv]
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kB
        knn = [json.loads(l) for l in open(os.path.join(tmp, "metrics.jsonl")) if "knn_top1" in l][-1]
    return {"command": "python bench.py " + shlex.join(sys.argv[1:]), "train_argv": train_argv,
            "machine": machine(torch.device("cpu")), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "wall_s": wall, "wall": f"{int(wall // 60)} min {wall % 60:.0f} s", "peak_rss_gb": rss_kb / 2**20,
            "knn_top1": knn["knn_top1"], "steps": knn["step"]}
def make_jpegs(root, n, size=(500, 375), seed=0):
    """n JPEGs (quality 90) of ImageNet's typical 500 x 375 in ROOT/train/c{0,1}/, an ImageFolder
    tree: smooth random colour fields with a little noise, so they compress like photographs."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        folder = os.path.join(root, "train", f"c{i % 2}")
        os.makedirs(folder, exist_ok=True)
        low = torch.rand(1, 3, 6, 8, generator=gen) * 255  # (1, 3, 6, 8) coarse colours
        img = F.interpolate(low, (size[1], size[0]), mode="bicubic", align_corners=False)[0]  # (3, H, W)
        img = img + 8 * torch.randn(img.shape, generator=gen)
        Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(
            os.path.join(folder, f"{i:05d}.JPEG"), quality=90)


def bench_loader(n, repeats, img_size=224):
    """Images per second per core of the ImageFolder training pipeline (decode, RandomResizedCrop,
    resize, to-tensor, normalise; one process, one thread) on n generated 500 x 375 JPEGs, against
    a plain PIL loop (decode in full, crop-resize, to-tensor) and the pipeline without the JPEG
    draft decode. Medians over `repeats` passes, run round-robin."""
    import numpy as np
    from PIL import Image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        make_jpegs(root, n)
        base = data.ImageFolder(root, "train")
        keyed = data.TransformedDataset(base, data.Transform(img_size, True), seed=0)

        def plain():  # what any loader must at least do; the crop box is the pipeline's
            for i, (path, _) in enumerate(base.samples):
                with Image.open(path) as im:
                    img = im.convert("RGB")
                (top, left, h, w), _ = keyed.transform.box(*img.size, np.random.default_rng([0, 0, i]))
                img = img.resize((img_size, img_size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
                torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)  # (3, S, S)

        def full_decode():  # the pipeline before the draft decode: decode the whole file, then crop
            for i in range(n):
                img, _ = base[i]
                keyed.transform(img, np.random.default_rng([0, 0, i]))

        def pipeline():  # what the DataLoader workers run
            for i in range(n):
                keyed[(i, 0)]

        fns = {"pil_loop": plain, "full_decode": full_decode, "pipeline": pipeline}
        times = {k: [] for k in fns}
        for r in range(repeats):
            for k in list(fns)[r % 3:] + list(fns)[:r % 3]:
                t = time.process_time()  # CPU time of this process: what a core is busy for
                fns[k]()
                times[k].append(time.process_time() - t)
    torch.set_num_threads(threads)
    res = {f"{k}_img_s_core": n / statistics.median(v) for k, v in times.items()}
    res.update(images=n, repeats=repeats, size="500x375", img_size=img_size,
               pipeline_vs_pil=res["pipeline_img_s_core"] / res["pil_loop_img_s_core"])
    return res


def machine(device):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def time_configs(args, targs, device, warmup, models, step_models, optimizer, cfgs, batches, maps, autocast):
    """The main table's timing (docstring 1): round-robin, one full step per config, start rotated
    every round; round r steps on batch r % 2 with each config's plan generator reseeded to
    seed + r % 2, so the rounds repeat two steps per config: warm-up rounds (>= 2) compile every
    graph the timed rounds meet, and eager and compiled time the same work. Returns (per-config
    wall / cpu / mem / plans lists and graphs compiled, {graphs_compiled, recompiles_during_timing,
    recompile_reasons} when compiled, else {})."""
    from torch._dynamo.utils import counters as dynamo  # ["stats"]["unique_graphs"]: graphs compiled
    B, names = targs.batch_size, list(cfgs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    res = {n: dict(wall=[], cpu=[], mem=[], plans=[], graphs=0) for n in names}
    start, graphs_at_warmup = dynamo["stats"]["unique_graphs"], None
    for rnd in range(warmup + args.steps):
        if rnd == warmup:
            graphs_at_warmup = dynamo["stats"]["unique_graphs"]
        for i in range(len(names)):
            name = names[(rnd + i) % len(names)]  # rotate the start: no config always runs first
            cfgs[name]["gen"].manual_seed(targs.seed + rnd % 2)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = dynamo["stats"]["unique_graphs"]
            t, c = time.perf_counter(), time.process_time()
            plan = full_step(models, step_models, optimizer, batches[rnd % 2], cfgs[name], maps, autocast)
            sync()
            res[name]["graphs"] += dynamo["stats"]["unique_graphs"] - before
            if rnd >= warmup:
                res[name]["wall"].append(time.perf_counter() - t)
                res[name]["cpu"].append(time.process_time() - c)
                res[name]["plans"].append(plan_numbers(plan, B, models[0], models[1], targs.patch_size, targs))
                if device.type == "cuda":
                    res[name]["mem"].append(torch.cuda.max_memory_allocated(device) / 2**20)
    if graphs_at_warmup is None:
        graphs_at_warmup = dynamo["stats"]["unique_graphs"]
    if not targs.compile:
        return res, {}
    return res, {"graphs_compiled": dynamo["stats"]["unique_graphs"] - start,
                 "recompiles_during_timing": dynamo["stats"]["unique_graphs"] - graphs_at_warmup,
                 "recompile_reasons": sorted({str(k)[:200] for k in dynamo.get("recompiles", {})})}


def probe_memory(argv, names, images, maps, res):
    """CPU peak memory (docstring 3): one fresh process per config, its numbers into res."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.pt")
        torch.save((images.cpu(), maps.cpu()), path)
        for name in names:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--probe", name,
                                  "--probe-images", path], capture_output=True, text=True, check=True)
            probe = json.loads(out.stdout.strip().splitlines()[-1])
            res[name]["mem"], res[name]["step_mib"] = [probe["peak_mib"]], probe["step_mib"]


def summarise(res, cfgs, B, peak_tflops):
    """Per config: medians of time, means of the plan numbers, ratios to I-JEPA (of the same mode,
    when it ran), MFU = model FLOPs of the real tokens / median step time / peak (None: peak unknown)."""
    base = {k: statistics.median(res["ijepa"][k]) if "ijepa" in res else None for k in ("wall", "cpu")}
    rows = {}
    for name, r in res.items():
        plans, wall, cpu = r["plans"], statistics.median(r["wall"]), statistics.median(r["cpu"])
        row = {k: sum(p[k] for p in plans) / len(plans) for k in plans[0]}
        row.update(lam=cfgs[name]["lam"], wall_ms=1e3 * wall, cpu_ms=1e3 * cpu, img_s=B / wall,
                   ratio_wall=wall / base["wall"] if base["wall"] else None,
                   ratio_cpu=cpu / base["cpu"] if base["cpu"] else None,
                   mem_mib=max(r["mem"]) if r["mem"] else None, step_mib=r.get("step_mib"), graphs=r["graphs"],
                   mfu=row["gflop_img"] * B * 1e9 / wall / (peak_tflops * 1e12) if peak_tflops else None)
        rows[name] = row
    return rows


def memory_kind(device):
    return "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of a fresh process"


def print_table(rows, mode, steps, device, memory, peak_tflops, graphs):
    """The main table of one mode."""
    mfu = bool(peak_tflops)
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"\nfull training step, {mode}, median of {steps}; x I-JEPA by wall clock and by process CPU time; "
          f"memory (MiB): {memory_kind(device)}; tokens per image: real/padded")
    print(f"{'config':16}{'lam':>4}{'wall ms':>9}{'cpu ms':>8}{'img/s':>7}{'x wall':>7}{'x cpu':>6}{'mem':>6}"
          f"{'dseq':>6}{'regions':>8}{'enc tok':>10}{'pred tok':>10}{'GFLOP/img':>10}" + ("   MFU" if mfu else ""))
    for name, r in rows.items():
        print(f"{name:16}{r['lam']:>4.1f}{r['wall_ms']:>9.0f}{r['cpu_ms']:>8.0f}{r['img_s']:>7.1f}"
              f"{fmt(r['ratio_wall'], '.2f'):>7}{fmt(r['ratio_cpu'], '.2f'):>6}{fmt(r['mem_mib'], '.0f'):>6}"
              f"{r['dseq']:>6.2f}{r['regions']:>8.2f}{r['enc_real']:>5.0f}/{r['enc_pad']:<4.0f}"
              f"{r['pred_real']:>5.0f}/{r['pred_pad']:<4.0f}{r['gflop_img']:>10.2f}" + (f"{100 * r['mfu']:>5.1f}%" if mfu else ""))
    if device.type == "cpu" and memory and all(r["step_mib"] is not None for r in rows.values()):
        print("peak RSS growth during the measured step (MiB): " + ", ".join(f"{n} {r['step_mib']:.0f}" for n, r in rows.items()))
    if mfu:
        print(f"MFU against {peak_tflops:g} TFLOP/s (override with --peak-tflops)")
    if graphs:
        print(f"torch.compile: {graphs['graphs_compiled']} graphs compiled, "
              f"{graphs['recompiles_during_timing']} of them during the timed rounds (should be 0)")


def print_side_by_side(by_mode, graphs):
    """Eager and compiled per config: step time, img/s, MFU, peak memory, graphs, speed-up."""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print("\neager vs torch.compile (median ms per step, img/s, MFU, peak MiB; graphs: first compiled in the "
          "config's steps, shapes met by a config before are reused)")
    print(f"{'config':16}{'eager ms':>9}{'img/s':>8}{'MFU':>7}{'MiB':>7} |{'comp. ms':>9}{'img/s':>8}{'MFU':>7}"
          f"{'MiB':>7}{'graphs':>7} |{'speed-up':>9}")
    for name, e in by_mode["eager"].items():
        c = by_mode["compiled"].get(name)
        if c is None:
            continue
        print(f"{name:16}{e['wall_ms']:>9.1f}{e['img_s']:>8.0f}{fmt(e['mfu'] and 100 * e['mfu'], '.1f'):>7}"
              f"{fmt(e['mem_mib'], '.0f'):>7} |{c['wall_ms']:>9.1f}{c['img_s']:>8.0f}"
              f"{fmt(c['mfu'] and 100 * c['mfu'], '.1f'):>7}{fmt(c['mem_mib'], '.0f'):>7}{c['graphs']:>7} |"
              f"{e['wall_ms'] / c['wall_ms']:>8.2f}x")
    g = graphs["compiled"]
    print(f"compiled: {g['graphs_compiled']} graphs in all, {g['recompiles_during_timing']} during the timed rounds")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = get_parser().parse_known_args(argv)
    if args.step_overhead:  # the demo's own flags, not this script's defaults
        return write_json({"command": "python bench.py " + shlex.join(argv), "machine": machine(torch.device("cpu")),
                           **step_overhead(args, rest)}, args.json)
    targs = config.parse_args(TRAIN_DEFAULTS + rest)  # train.py's flags, help and checks
    device = config.pick_device(targs, 0)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    if args.probe:
        return memory_probe(args, targs, device)
    if args.official_cost:
        return write_json(official_cost(targs), args.json)
    if args.demo_time:
        return write_json(demo_time(rest), args.json)
    if args.pack_time_only:
        t = pack_time(args, targs, device, config.make_autocast(targs, device)[0])
        excess = pack_excess(t)
        print_pack_time(t)
        print(f"target: causal+blobs <= 5 % over its real tokens: {'MET' if excess <= 0.05 else 'MISSED'}")
        return write_json({"command": "python bench.py " + shlex.join(argv), "machine": machine(device),
                           "time": t, "target_met": excess <= 0.05}, args.json)
    info = {"command": "python bench.py " + shlex.join(argv), "machine": machine(device)}
    autocast, _ = config.make_autocast(targs, device)
    amp = targs.amp if targs.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    modes = args.modes or (["eager", "compiled"] if device.type == "cuda" else ["compiled" if targs.compile else "eager"])
    print(info["command"])
    print(" | ".join(f"{k} {v}" for k, v in info["machine"].items()), f"| device {device} | amp {amp} "
          f"| modes {' '.join(modes)} | model {targs.model} {targs.img_size}px/{targs.patch_size} | batch "
          f"{targs.batch_size} | {args.steps} timed rounds after {warmup} warm-up", flush=True)

    # --- images (synthetic dataset, data.py) and blob maps for the "+blobs" rows; then each mode
    # (eager, compiled) builds the same models from --seed and times every config, one mode after
    # the other, so a compiled run cut off by a time limit leaves the eager numbers written
    B = targs.batch_size
    targs.num_train = max(targs.num_train, 2 * B)
    batches = iter(data.build_train_loader(targs, B, 0, 1, "cpu"))
    batches = [next(batches)[0].to(device) for _ in range(2)]  # two batches, alternated by round
    if args.peak_tflops is None and device.type == "cuda" and amp == "bf16":
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in info["machine"]["gpu"]), None)
    by_mode, graph_info = {}, {}
    for mode in modes:
        mtargs = argparse.Namespace(**{**vars(targs), "compile": mode == "compiled"})
        models, step_models, optimizer, cfgs = setup(args, mtargs, device)
        grid, names = models[0].grid, list(cfgs)
        maps = blob_maps(B, grid, torch.Generator().manual_seed(targs.seed)).to(device)  # (B, P)
        res, graph_info[mode] = time_configs(args, mtargs, device, warmup, models, step_models, optimizer, cfgs,
                                             batches, maps, autocast)
        if device.type == "cpu" and args.memory and mode == modes[0]:  # one fresh process per config
            probe_memory(argv + ["--compile", "on" if mtargs.compile else "off"], names, batches[1], maps, res)
        by_mode[mode] = summarise(res, cfgs, B, args.peak_tflops)
        print_table(by_mode[mode], mode, args.steps, device, args.memory, args.peak_tflops, graph_info[mode])
        if args.json:  # what is done so far (the final write below replaces it)
            write_json({**info, "partial": True, "modes": by_mode, "graphs": graph_info}, args.json, quiet=True)
        if mode != modes[-1]:
            del models, step_models, optimizer, cfgs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = by_mode[modes[0]]
    if len(modes) == 2:
        print_side_by_side(by_mode, graph_info)
    if "compiled" in graph_info:
        info.update(graph_info["compiled"])

    # --- saliency: batched vs per-image OpenCV
    sal = bench_saliency(args.sal_batch, grid, targs.regions, targs.alpha, args.sal_repeats, device) \
        if args.sal_batch else {"skipped": "--sal-batch 0"}
    if "skipped" in sal:
        print(f"\nsaliency comparison skipped ({sal['skipped']})")
    else:
        print(f"\nsaliency regions, B = {sal['batch']}, grid {grid[0]}x{grid[1]}, median of {args.sal_repeats}: "
              f"batched {sal['batched_ms']:.1f} ms, per-image OpenCV loop {sal['opencv_loop_ms']:.1f} ms, "
              f"speed-up {sal['speedup']:.1f}x (outputs identical; {100 * sal['share_with_ranked_region']:.0f} % "
              f"of maps have a ranked region)")

    # --- padding: real / computed tokens with and without sub-batches, and the step time they buy
    pack = {"tokens": pack_tokens(targs, models, args.pack_batches, device)} if args.pack_batches else {}
    if pack:
        K = targs.pack_splits
        print(f"\npadding waste (share of computed tokens that are padding), context encoder / predictor, "
              f"one padded batch vs --pack-splits {K}; grid {grid[0]}x{grid[1]}")
        for key, r in pack["tokens"].items():
            one, split = r["k1"], r[f"k{K}"]
            print(f"{key:18} dseq {r['dseq']:4.2f}  real {r['enc_real']:5.1f} / {r['pred_real']:5.1f}   "
                  f"k1 {100 * one['enc_waste']:4.1f} % / {100 * one['pred_waste']:4.1f} %   "
                  f"k{K} ({split['sub_batches']} sub-batches) {100 * split['enc_waste']:4.1f} % / "
                  f"{100 * split['pred_waste']:4.1f} %")
    if args.pack_time_batch:
        pack["time"] = pack_time(args, targs, device, autocast)
        print_pack_time(pack["time"])

    # --- loader: img/s per core of the ImageFolder pipeline on JPEGs
    loader = bench_loader(args.loader_images, 3) if args.loader_images else {"skipped": "--loader-images 0"}
    if "skipped" not in loader:
        print(f"\nloader, {loader['images']} JPEGs 500x375 -> {loader['img_size']} px, one core, median of 3: "
              f"pipeline {loader['pipeline_img_s_core']:.0f} img/s, without JPEG draft "
              f"{loader['full_decode_img_s_core']:.0f}, plain PIL loop {loader['pil_loop_img_s_core']:.0f} "
              f"(pipeline / PIL {loader['pipeline_vs_pil']:.2f}); 1,000 img/s per GPU needs "
              f"~{1000 / loader['pipeline_img_s_core']:.1f} loader workers")

    # --- targets
    checks = {}
    for name in ("causal", "causal+blobs"):
        for k in ("wall", "cpu") if name in rows else ():
            checks[f"{name} <= 1.2x ijepa ({k})"] = rows[name][f"ratio_{k}"] <= 1.2
    if "speedup" in sal:
        checks["saliency >= 20x opencv"] = sal["speedup"] >= 20
    K = targs.pack_splits
    for key, r in pack.get("tokens", {}).items():
        if r["batch"] >= 64:
            checks[f"{key} padding <= 10 %"] = max(r[f"k{K}"]["enc_waste"], r[f"k{K}"]["pred_waste"]) <= 0.10
    if "time" in pack:
        checks["causal+blobs <= 5 % over its real tokens"] = pack_excess(pack["time"]) <= 0.05
    print("targets: " + "; ".join(f"{k}: {'MET' if v else 'MISSED'}" for k, v in checks.items()))
    result = {**info, "config": {k: getattr(targs, k) for k in ("model", "img_size", "patch_size", "batch_size",
              "pred_dim", "pred_depth", "regions", "alpha", "compile", "pack_splits", "pack_rows")}, "amp": amp, "steps": args.steps,
              "warmup": warmup, "memory": memory_kind(device), "peak_tflops": args.peak_tflops, "rows": rows,
              "modes": by_mode, "graphs": graph_info,
              "saliency": sal, "packing": pack, "loader": loader, "targets": checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
