"""
Pretrain a ViT with DSeq-JEPA (or I-JEPA, the same code with lambda = 0).

    python train.py                                   # demo: micro ViT, synthetic data, CPU minutes
    python train.py --preset fashion-mnist-tiny --data-path DIR
    torchrun --nproc_per_node=8 train.py --preset in1k-vit-base --data-path /data/imagenet

The step (train_step below) reads top to bottom as the paper:
  1. targets + saliency from the EMA target encoder (no grad)       saliency.py, Eq. 1-3
  2. the plan: which patches are context / targets at which level   masking.py, Eq. 5 + lambda
  3. context encoder on the context tokens                          model.py
  4. predictor on the plan's targets                                model.py
  5. smooth-L1 loss on layer-normed targets (fp32)
  6. backward + AdamW step (train loop)
  7. EMA update of the target encoder
Schedules (lr, wd, EMA momentum, lambda) are pure functions of the global step: resuming needs only
the step. Only rank 0 logs and writes. Flags, checkpoints, devices: config.py (shared with evaluate.py);
processes and the output folder: plumbing.py. This file is the method and the loop.
"""

import copy
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config
import data
import evaluate
import masking
import model as vit
import pictures
import plumbing
import saliency

# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step (resume = knowing the step).


def lr_at(step, args, total, warmup):
    if step < warmup:
        return args.start_lr + (args.lr - args.start_lr) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return args.final_lr + (args.lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * t))


def wd_at(step, args, total):  # cosine ramp UP from 0.04 to 0.4, as I-JEPA
    t = step / max(1, total)
    return args.final_weight_decay + (args.weight_decay - args.final_weight_decay) * 0.5 * (1 + math.cos(math.pi * t))


def ema_at(step, args, total):
    return args.ema[0] + (args.ema[1] - args.ema[0]) * step / max(1, total)


def lambda_at(step, args, total):  # curriculum: probability of a discriminative plan, 0 -> 1
    return 0.0 if args.method == "ijepa" else step / max(1, total)


# ----------------------------------------------------------------------------------------------
# Models and the step


def build_models(args):
    """Context encoder f, predictor g, and target encoder f_bar (a frozen copy, updated by EMA)."""
    encoder = vit.vit(args.model, img_size=args.img_size, patch_size=args.patch_size,
                      patch_init_std=args.patch_init_std)
    predictor = vit.predictor_for(encoder, pred_dim=args.pred_dim, depth=args.pred_depth)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    return encoder, predictor, target_encoder


def make_optimizer(encoder, predictor, args):
    """AdamW; biases and 1-D (norm) weights get no weight decay, as I-JEPA. foreach (CUDA's default) also
    on the CPU, whose default loops in Python over every tensor: the same bits, 850 fewer Python ops a demo step."""
    params = [p for m in (encoder, predictor) for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0, "no_decay": True}],
                             lr=args.lr, foreach=True)


def make_targets(target_encoder, images, args):
    """Step 1: regression targets and discriminative regions, from the EMA target encoder.
    images: (B, 3, H, W) -> targets (B, P, D) fp32, regions (B, P) int64 or None, stats dict"""
    z_sal, h = target_encoder.features(images, layers=(args.saliency_layer, -1))  # (B, P, D) x 2
    targets = F.layer_norm(h.float(), (h.shape[-1],))  # (B, P, D), the I-JEPA target
    targets = standardise_over_images(targets) if args.target_norm == "batch" else targets  # (B, P, D)
    # Collapse signal: spread of the pooled representation across images (-> 0 if collapsed).
    stats = {"target_std": h.float().mean(1).std(0).mean()}
    regions = None
    if args.method == "dseq" and args.region_source == "saliency":
        regions, _ = saliency.discriminative_regions(z_sal.float(), target_encoder.cls_token.float(),
                                                     grid=target_encoder.grid, n_regions=args.regions,
                                                     alpha=args.alpha, polarity=args.saliency_polarity)  # (B, P)
        ranked = (regions < args.regions).float()  # (B, P), patch lies in some R_1..R_{N-1}
        stats["ranked_regions"] = regions.masked_fill(regions >= args.regions, 0).amax(1).float().mean()
        stats["salient_share"] = ranked.mean()
    return targets, regions, stats


def standardise_over_images(targets, eps=1e-6):
    """--target-norm batch: targets (B, P, D) fp32, each (patch, channel) at mean 0 / std 1 over the images
    of this micro-batch on all ranks. Removes what a target shares with its position in every image: at a small scale mostly
    the position embedding, which the predictor reads off its mask tokens for free (docs/learning.md)."""
    s = torch.stack([targets.sum(0), targets.square().sum(0), torch.full_like(targets[0], targets.shape[0])])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(s)  # (3, P, D): sums, sums of squares, image counts over all ranks
    mean = s[0] / s[2]  # (P, D)
    return (targets - mean) * torch.rsqrt((s[1] / s[2] - mean.square()).clamp_min(0) + eps)  # (B, P, D)


def make_plan(regions, lam, generator, grid, args, batch_size, device):
    """Step 2: the per-sample lambda mix of discriminative and multi-block plans (masking.py)."""
    return masking.make_plan(regions, lam, generator, grid, batch_size=batch_size, device=device,
                             mode=args.dseq_pass, order=args.region_order, prediction=args.prediction,
                             source=args.region_source, per_batch_coin=args.lambda_coin == "batch",
                             num_regions=args.regions, n_targets=args.num_targets,
                             geometric=bool(args.compile),  # few shapes -> few compiled graphs
                             target_scale=tuple(args.target_scale), context_scale=tuple(args.context_scale))


def jepa_loss(encoder, predictor, images, targets, plan):
    """Steps 3-5 for a given plan, or for the sub-plans of one plan (masking.split_plan).

    images: (B, 3, H, W); targets: (B, P, D) fp32; plan rows R (R = B except replicate mode)
    returns the smooth-L1 loss, mean over real target tokens and channels (fp32). A list of
    sub-plans gives the same mean: the sum of every sub-plan's per-token losses over the total
    number of real target tokens (not a mean of sub-plan means, which would weigh short rows up).
    Sub-plans run as ONE pass of each network where model.Packed packs them (a CPU, eager: fewer
    ops), else one pass each (a compiled graph per sub-plan shape).
    """
    parts = plan if isinstance(plan, list) else [plan]
    # One row per image (R = B) means sample = arange(B): skip the copy. Replicate rows repeat images.
    xs = [images if p.sample.shape[0] == images.shape[0] else images[p.sample] for p in parts]  # (R, 3, H, W) each
    fields = [[getattr(p, f) for p in parts] for f in ("ctx_idx", "ctx_lvl", "tgt_idx", "tgt_lvl", "tgt_grp")]
    # 3. context encoder: only the plan's context patches, block-causal over levels (no mask at all
    # when a row set is one level without padding: the flash-attention fast path on a GPU)
    # 4. predictor: one mask token per target position, sees what the level rule allows
    if len(parts) > 1 and vit.Packed.wanted(images, targets.shape[-1]) and not hasattr(encoder, "_orig_mod"):  # eager (not compiled)
        ctx = encoder(xs, fields[0], [None if p.ctx_full else p.ctx_lvl for p in parts])  # (R_s, Lc_s, D) each
        preds = predictor(ctx, *fields)  # (R_s, Lt_s, D) each
    else:
        preds = [predictor(encoder(x, p.ctx_idx, None if p.ctx_full else p.ctx_lvl), *f)
                 for x, p, *f in zip(xs, parts, *fields)]
    sums, counts = zip(*(_scored(targets, p, pred) for p, pred in zip(parts, preds)))
    return torch.stack(sums).sum() / torch.stack(counts).sum()


def _scored(targets, plan, pred):
    """5. loss for one plan: pred (R, Lt, D) against the target encoder's features at the target
    positions -> (sum of per-token losses, number of real target tokens)."""
    tgt = targets[plan.sample[:, None], plan.tgt_idx]  # (R, Lt, D) in one gather, no (R, P, D) copy first
    per_token = F.smooth_l1_loss(pred.float(), tgt, reduction="none", beta=1.0).mean(-1)  # (R, Lt)
    real = (plan.tgt_lvl > 0).float()  # (R, Lt), padding is not scored
    return (per_token * real).sum(), real.sum()


@torch.no_grad()
def ema_update(target_encoder, encoder, momentum):
    """Step 7: f_bar <- m * f_bar + (1 - m) * f, in one foreach call (no per-parameter loop)."""
    tgt = list(target_encoder.parameters())
    torch._foreach_mul_(tgt, momentum)  # no .detach() per parameter: no_grad already keeps autograd out
    torch._foreach_add_(tgt, list(encoder.parameters()), alpha=1.0 - momentum)


def train_step(models, images, lam, args, generator, autocast):
    """Steps 1-5 for one micro-batch with curriculum probability lam (lambda_at of the step).
    Returns (loss, plan, stats); backward / optimizer step / EMA are the loop's."""
    encoder, predictor, target_encoder = models
    with torch.no_grad(), autocast:
        targets, regions, stats = make_targets(target_encoder, images, args)  # 1.
    plan = make_plan(regions, lam, generator, target_encoder.grid, args, images.shape[0], images.device)  # 2.
    # Rows of similar length run together, each sub-batch padded to its own width (same loss);
    # --pack-splits auto weighs the padding a split saves against the passes it adds.
    k, pass_cost, max_rows = masking.pack_settings(args.pack_splits, args.pack_rows, target_encoder.embed_dim,
                                                   target_encoder.num_patches, images.device.type)
    parts = masking.split_plan(plan, k, geometric=bool(args.compile), max_rows=max_rows, pass_cost=pass_cost)
    with autocast:
        loss = jepa_loss(encoder, predictor, images, targets, parts if len(parts) > 1 else plan)  # 3.-5.
    stats["dseq_share"] = plan.dseq.float().mean()
    stats["regions_per_image"] = plan.n_regions.float().mean()
    stats["context_tokens"] = (plan.ctx_lvl > 0).sum() / images.shape[0]
    stats["target_tokens"] = (plan.tgt_lvl > 0).sum() / images.shape[0]
    return loss, plan, stats


def wrap_for_speed(models, args, world, device):
    """DDP and torch.compile around the modules the step calls. The raw modules stay the caller's,
    for EMA, checkpoints and evaluation (eager, any batch size); the EMA target encoder is never
    wrapped in DDP (it gets no gradients). Returns (encoder, predictor, target_encoder) to pass to train_step."""
    encoder, predictor, target_encoder = models
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # No buffer broadcast in forward (our only buffers are the fixed sin-cos tables): it is a
        # collective, and with sub-batches (--pack-splits) ranks may run different numbers of forwards.
        encoder, predictor = (DDP(m, device_ids=ids, broadcast_buffers=False) for m in (encoder, predictor))
    if args.compile:
        # Static shapes, as DINOv3 compiles: plans and sub-batches come in a few shapes (masking.
        # compile_shapes), each compiled into its own specialised graph when first met (metrics.jsonl
        # counts them). Dynamic shapes crashed Inductor twice on an H200 (torch 2.11, docs/performance.md), both
        # times in symbolic-size code that specialised graphs never reach.
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config
        k, _, max_rows = masking.pack_settings(args.pack_splits, args.pack_rows, target_encoder.embed_dim,
                                               target_encoder.num_patches, device.type)  # as train_step splits
        rows, ctx, tgt = masking.compile_shapes(
            args.batch_size // (world * args.accum_steps), target_encoder.num_patches, k, args.num_targets,
            args.regions if args.region_source == "saliency" else args.num_targets + 1, args.dseq_pass == "replicate",
            max_rows)
        limit = len(rows) * len(ctx) * len(tgt)  # predictor graphs at most (the encoder's: rows x Lc x 2)
        dynamo_config.automatic_dynamic_shapes = False  # a shape seen twice stays static, never symbolic
        for name, old, value in (("recompile_limit", "cache_size_limit", limit),  # old names: torch < 2.6
                                 ("accumulated_recompile_limit", "accumulated_cache_size_limit", 3 * limit)):
            name = name if hasattr(dynamo_config, name) else old
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))
        # Kept until a static-shape GPU run shows it is not needed (none has run yet): the dynamic-shape
        # backward crashed in Inductor's mix-order reduction of LayerNorm's backward (pytorch issue 186426).
        if hasattr(inductor_config.triton, "mix_order_reduction"):
            inductor_config.triton.mix_order_reduction = False
        encoder, predictor = (torch.compile(m, dynamic=False) for m in (encoder, predictor))
        # A shallow copy shares the parameters (the EMA reaches it) and compiles the step's feature pass
        # (saliency stays eager); the raw module stays eager for the kNN monitor's other batch sizes.
        target_encoder = copy.copy(target_encoder)
        target_encoder.features = torch.compile(target_encoder.features, dynamic=False)
    return encoder, predictor, target_encoder


def eager_fallback(error, models, args, world, device, step):
    """Step models without torch.compile after a compiler error. Compilation is lazy (a new shape
    at its first forward, its backward at the first backward), so the error surfaces inside a step;
    one process says so in one line and the caller reruns the step. Under torchrun a failed backward
    may have sent some gradient buckets while the other ranks wait for the rest: no rerun can match."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner  # the compiler's own error, not dynamo's / Inductor's wrapper around it
    what = (f"torch.compile failed at step {step} with torch {torch.__version__} ({type(error).__name__}: "
            f"{(str(error).strip().splitlines() or [''])[0][:200]})")
    if world > 1:
        config.fail(f"{what}; rerun with --compile off")
    tqdm.write(f"warning: {what}; training goes on in eager mode (--compile off skips compiling)", file=sys.stderr)
    eager = copy.copy(args)
    eager.compile = False  # plans keep the compiled shapes (the same loss): only the modules change
    return wrap_for_speed(models, eager, world, device)


def optimizer_step(step_models, micro_batches, lam, optimizer, scaler, args, generator, autocast, world, device):
    """Steps 1-6 of one optimizer step: forward and backward of every micro-batch (gradients summed
    in the parameters), clipping, the AdamW step. Returns (loss, stats): the mean loss as a float64
    device scalar (no host sync; float64 sums the fp32 losses exactly as the host's float did) and
    the last micro-batch's stats. A failure before the AdamW step leaves the weights untouched."""
    run_encoder, run_predictor = step_models[:2]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro, images in enumerate(micro_batches):
        images = images.to(device, non_blocking=True)
        # DDP all-reduces gradients only after the last micro-step of the accumulation
        defer = world > 1 and micro < len(micro_batches) - 1
        with (run_encoder.no_sync() if defer else nullcontext()), \
                (run_predictor.no_sync() if defer else nullcontext()):
            loss, _, stats = train_step(step_models, images, lam, args, generator, autocast)
            loss = loss / args.accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach().double()
    if scaler:
        scaler.unscale_(optimizer)
    if args.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, stats


# ----------------------------------------------------------------------------------------------
# The training loop. Parser, checkpoints, devices and processes are config.py's.


def main(argv=None):
    """Flags (checked at parse time), processes (torchrun / srun), then the run, holding OUT_DIR: a
    second run into the same folder stops here with one line, before anything is read or written."""
    args = config.parse_args(argv)
    rank, world, local_rank = plumbing.setup_distributed()
    with plumbing.out_dir_lock(args.out_dir):
        try:
            return run(args, rank, world, local_rank)
        except KeyboardInterrupt:  # Ctrl-C stops at once; SIGTERM is the signal that checkpoints first
            plumbing.interrupted(os.path.join(args.out_dir, "checkpoint.pt"))


def run(args, rank, world, local_rank):
    # --- config: device, precision, resume
    master = rank == 0
    device = config.pick_device(args, local_rank)
    config.fit_threads(args, device)
    autocast, scaler = config.make_autocast(args, device)
    per_step = args.batch_size // (world * args.accum_steps)  # images per process per micro-step
    if per_step * world * args.accum_steps != args.batch_size:
        config.fail(f"--batch-size {args.batch_size} is not divisible by processes x --accum-steps "
                    f"({world} x {args.accum_steps}); pick a multiple of {world * args.accum_steps}")
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    resume, ckpt = find_resume(args, ckpt_path)

    # --- data (data.py): the training split with the paper's crops, the held-out split for kNN.
    # ImageFolder labels follow the TRAIN class map, saved with the run (config + checkpoint) and
    # used for every later split, so a val folder missing or adding a class cannot shift labels.
    saved_map = ckpt["config"].get("class_to_idx") if ckpt is not None else None
    loader = data.build_train_loader(args, per_step, rank, world, device, class_to_idx=saved_map)
    args.class_to_idx = getattr(loader.source, "class_to_idx", None)
    if args.dataset == "imagefolder":  # a val class the map does not know: fail now, not after the run
        data.build_dataset("imagefolder", args.data_path, "val", class_to_idx=args.class_to_idx)
    steps_per_epoch = len(loader) // args.accum_steps
    if steps_per_epoch == 0:
        config.fail(f"the training set has fewer than one batch of {per_step * args.accum_steps} images per "
                    f"process; lower --batch-size")
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)

    # --- models, optimizer, plan generator. Every rank builds the same three networks from --seed:
    # DDP broadcasts the encoder and predictor from rank 0, but nothing broadcasts the EMA target encoder.
    torch.manual_seed(args.seed)
    models = tuple(m.to(device) for m in build_models(args))  # Module.to moves in place, returns the module
    encoder, predictor, target_encoder = models
    optimizer = make_optimizer(encoder, predictor, args)
    # What must differ per process comes from seed + rank: the plans (and any numpy / python draws).
    # The data shards and crops differ by rank through the sampler, keyed by --seed (data.py).
    seed = args.seed + rank
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)  # drives masking.py only

    step = 0
    if resume:  # weights, optimizer, scaler and every rank's random streams (read and checked above)
        step = config.restore(ckpt, resume, models, optimizer, scaler, generator)
        if master:
            print(f"resumed from {resume} at step {step}")
    if master:
        print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "class_to_idx"))
        print(f"processes {world} x micro-batch {per_step} x accum {args.accum_steps} = batch {args.batch_size}; "
              f"{steps_per_epoch} steps/epoch, {total} steps; peak lr {args.lr:g}; device {device}; "
              f"encoder {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M params")
        text = json.dumps(vars(args), indent=1)
        plumbing.write_atomic(os.path.join(args.out_dir, "config.json"), lambda f: f.write(text), False, len(text))
    plumbing.check_writes()  # rank 0 could not write config.json: every rank stops now

    step_models, compiled = wrap_for_speed(models, args, world, device), args.compile
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"] if compiled else 0  # process-wide count

    preempt = config.Preemption()
    log = plumbing.RunLog(os.path.join(args.out_dir, "metrics.jsonl"), master)
    stop_at = min(total, args.stop_at_step or total)
    bar = tqdm(total=stop_at, initial=step, disable=not master, dynamic_ncols=True)
    epoch, skip = divmod(step, steps_per_epoch)
    if step == 0 and args.knn_every:  # the untrained target encoder: the random-init level of the curve
        knn_monitor(target_encoder, args, device, step, epoch, log, master)
    t_last = time.perf_counter()
    # Host syncs on CUDA: one per step, the plan's (masking._pack). The loss and its finiteness stay on
    # the device until a check step: a log or checkpoint step, the last one, or (one process) a stop
    # signal; on the CPU every step. Every rank knows these steps in advance, so they agree there
    # (config.agree_to_stop; under torchrun a signal waits for the next). first_bad keeps the first
    # non-finite loss until read: caught before any checkpoint.
    first_bad = torch.full((2,), -1.0, dtype=torch.float64, device=device)  # (step, loss) of it
    stop = False  # agreed by all ranks at check steps, never a rank-local decision
    while step < stop_at and not stop:
        # resumed mid-epoch: the same order, the sampler starts after what was seen (nothing is re-read)
        loader.set_epoch(epoch, start_batch=skip * args.accum_steps)
        batches = iter(loader)
        skip = 0
        for _ in range(steps_per_epoch - step % steps_per_epoch):
            # --- 6. schedules for this step, then accumulate gradients over micro-batches
            sched = {"lr": lr_at(step, args, total, warmup), "wd": wd_at(step, args, total),
                     "ema": ema_at(step, args, total), "lambda": lambda_at(step, args, total)}
            for group in optimizer.param_groups:
                group["lr"] = sched["lr"]
                if not group.get("no_decay"):
                    group["weight_decay"] = sched["wd"]
            micro_batches = [next(batches)[0] for _ in range(args.accum_steps)]
            plan_state = generator.get_state() if compiled else None  # host-side state: no sync
            rest = (micro_batches, sched["lambda"], optimizer, scaler, args, generator, autocast, world, device)
            try:
                loss_sum, stats = optimizer_step(step_models, *rest)
            except Exception as error:  # a compiler error: rerun the step eager (eager_fallback)
                if not compiled or isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                step_models, compiled = eager_fallback(error, models, args, world, device, step), False
                generator.set_state(plan_state)  # the same plans, from clean gradients
                optimizer.zero_grad(set_to_none=True)
                loss_sum, stats = optimizer_step(step_models, *rest)
            # --- 7. EMA update of the target encoder
            ema_update(target_encoder, encoder, sched["ema"])
            now_bad = ~loss_sum.isfinite() & (first_bad[0] < 0)  # on the device
            first_bad = torch.where(now_bad, torch.stack([torch.full_like(loss_sum, step), loss_sum]), first_bad)
            step += 1
            keep = step // steps_per_epoch if args.keep_every and step % (args.keep_every * steps_per_epoch) == 0 else 0
            check = (device.type != "cuda" or step % args.log_every == 0 or step % args.ckpt_every == 0 or keep
                     or step >= stop_at or (world == 1 and preempt.requested))
            if check:  # --- every rank agrees to go on, stop (signal), or give up (non-finite loss anywhere; a
                # NaN on one rank reached every rank's weights through the gradient all-reduce anyway)
                bad_step, bad_loss, loss_now = torch.cat([first_bad, loss_sum[None]]).tolist()
                stop, diverged = config.agree_to_stop(preempt.requested, bad_step >= 0, device)
                if diverged:
                    what, at = (bad_loss, int(bad_step)) if bad_step >= 0 else ("not finite on another process", step - 1)
                    config.fail(f"loss is {what} at step {at}; stopping without writing a checkpoint "
                                f"(the last good one in {args.out_dir} is intact). Try a lower --lr or --clip-grad 1.0.")

            # --- logging, checkpoints, preemption
            if master:
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                bar.update(1)
                if check:
                    bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{sched['lr']:.2e}", lam=f"{sched['lambda']:.2f}",
                                    img_s=f"{args.batch_size / dt:.0f}")
                if step % args.log_every == 0 or step == stop_at:
                    row = {"step": step, "epoch": epoch, "loss": loss_now, **sched, "step_time": dt,
                           "img_per_s": args.batch_size / dt, "peak_mem_mb": config.peak_memory_mb(device)}
                    row.update({k: float(v) for k, v in stats.items()})
                    if compiled:  # graphs this run compiled so far (new shapes compile lazily, when first met)
                        row["graphs_compiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
                    log.write(row)
            if step % args.ckpt_every == 0 or keep or step == stop_at or stop:  # every rank: gathers the RNG states
                config.save_checkpoint(ckpt_path, models, optimizer, scaler, step, args, generator, keep)
            if step >= stop_at or stop:
                break
        if step % steps_per_epoch == 0:
            epoch += 1
            if args.knn_every and epoch % args.knn_every == 0 and step < total:
                knn_monitor(target_encoder, args, device, step, epoch, log, master)
    bar.close()
    if master and data.unreadable_images():  # each was named once when first met
        print(f"{data.unreadable_images()} unreadable images were skipped (replaced by their neighbours)")
    if stop:
        if master:
            print(f"preempted: checkpoint at step {step} in {ckpt_path}; rerun the same command to resume")
    elif step >= total:
        end_of_run(target_encoder, args, device, step, epoch, log, master)
    log.close()
    plumbing.check_writes()  # a failed write of the last steps (the log, a picture) stops every rank alike
    plumbing.leave_group()  # every rank gets here before any tears gloo down (rank 0's last kNN runs alone)
    return step


def find_resume(args, ckpt_path):
    """The checkpoint to resume: --resume, else OUT_DIR/checkpoint.pt if there is one (unless
    --no-auto-resume). Read and compared with these flags (config.check_resume_config) before
    anything is built or written. Returns (path, checkpoint), or (None, None) for a fresh run."""
    path = args.resume or (ckpt_path if os.path.exists(ckpt_path) and not args.no_auto_resume else None)
    if path is None:
        return None, None
    ckpt = config.load_checkpoint(path)
    config.check_resume_config(ckpt["config"], args, path)
    return path, ckpt


def knn_monitor(target_encoder, args, device, step, epoch, log, master):
    """Held-out kNN accuracy of the target encoder (evaluate.py): the progress signal JEPA lacks."""
    result = evaluate.knn_monitor(target_encoder, args, device)  # every rank takes part under DDP
    if master:
        print(f"epoch {epoch} step {step}: kNN top-1 {result['top1']:.2f}% (k={result['k']}, {result['split']})")
        log.write({"step": step, "epoch": epoch, **{f"knn_{k}": v for k, v in result.items()}})


def end_of_run(target_encoder, args, device, step, epoch, log, master):
    """After the last step: the kNN monitor (always); with --picture the learning curve (learning.png:
    kNN and target_std against step, beside the random-init level, step 0's kNN, and raw pixels' kNN)
    and the picture of saliency regions and plans (plans.png)."""
    knn_monitor(target_encoder, args, device, step, epoch, log, master)
    if args.picture:  # every rank takes part in the pixels' kNN under DDP
        pixels = evaluate.knn_monitor(None, args, device)["top1"]
    if master and args.picture:
        with plumbing.writing(args.out_dir):  # a picture that cannot be written: one line naming it
            path, rows, levels = pictures.learning_picture(args.out_dir, args.method, pixels)
            log.write({"step": step, "pixels_knn": pixels})
            print(f"wrote {path}: kNN {rows[-1].get('knn_top1', float('nan')):.2f} at step {step}, "
                  + ", ".join(f"{label} {v:.2f}" for label, _, v in levels))
            path = os.path.join(args.out_dir, "plans.png")
            pic = pictures.plan_picture(target_encoder, args, path, device=device)
            overlap = {k: v for k, v in pic.items() if k.startswith(("top_region", "object_area", "ranked"))}
            print(f"wrote {path}; " + ", ".join(f"{k} {v}" for k, v in overlap.items() if v is not None))
            log.write({"step": step, **overlap})


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # the message names the data and the fix; a traceback adds nothing
        config.fail(config.data_error_line(e))
    if plumbing.process_env()[1] > 1:  # a torchrun / srun process: leave without the teardown that can
        plumbing.end_process(0)  # abort on the gloo threads DDP keeps alive (plumbing.end_process)
