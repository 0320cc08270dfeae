"""
Evaluate a DSeq-JEPA (or I-JEPA) checkpoint: kNN, linear probe, fine-tuning, the plan picture, region
statistics.

    python evaluate.py --checkpoint out/demo/checkpoint.pt                      # kNN + linear probe
    python evaluate.py --checkpoint out/demo/checkpoint.pt --eval knn,linear,finetune,picture --features both
    python evaluate.py --init random                                       # random-init baseline
    python evaluate.py --pixels --eval knn,linear                          # raw-pixel baseline

Protocols (the paper's, after I-JEPA). Features come from the frozen TARGET encoder f_bar:
  last    = average-pooled patch tokens of the last block, after the final LayerNorm   (B, D)
  concat4 = the average-pooled outputs of the last 4 blocks, each through the final LayerNorm,
            concatenated                                                            (B, 4D)
  kNN     : cosine similarity of L2-normalised features, k = 20, votes weighted exp(sim / 0.07)
  linear  : BatchNorm1d(affine=False) + Linear per feature kind, SGD momentum 0.9 Nesterov (the
            official probe silently ran WITHOUT momentum, fault 6), lr x batch / 256, 28 epochs,
            x0.1 at 8 / 16 / 24. A GRID of heads (--probe-lr x --probe-wd) is trained in one pass
            over each batch (one batched weight tensor, DINO-style); each kind's head is chosen on a
            stratified --probe-holdout share of TRAIN, never on the test split. Default: features
            extracted once and cached; --probe-whiten PCA-whitens the cache (frozen ViT features are
            so ill-conditioned that SGD stays far from the optimum); --probe-aug: RandomResizedCrop
            (0.08, 1) + flip (bilinear; the official probe uses bicubic), re-extracted every epoch.
            The protocol is linear_eval below; the grid's heads and optimiser are in probe.py.
  finetune: MAE-style: AdamW, layer-wise lr decay 0.75, warmup + cosine, label smoothing 0.1
            (compact: RandomResizedCrop + flip only, no RandAugment / mixup / drop-path)
  picture : image | saliency | ranked regions | the DSeq plan step by step | an I-JEPA plan, plus
            the top-region / object overlap on the synthetic set (a number that should rise):
            pictures.plan_picture
  regions : ranked regions per held-out image, and which ablation flags change its DSeq plan:
            region_stats.region_statistics over the maps of saliency_maps below
Bank / training features come from the training split, queries from the val split. The CLI runs in
one process; train.py also calls knn_monitor (sharded over torchrun ranks) and pictures.plan_picture.

Configuration: ONE parser, config.py's, plus the "evaluation" group below. With --checkpoint, every
training flag is read from the checkpoint's saved config EXCEPT the machine flags in MACHINE_KEYS
and the flags typed on the command line, which win; typed model flags must agree with the
checkpoint. --out-dir defaults to the checkpoint's folder. The official evaluation could not load
its own checkpoints (unexpected `cls_token`, fault 6): here loading is strict, and a mismatch names
the missing / unexpected keys and the flags.
"""

import argparse
import copy
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import config
import data
import model as vit
import pictures
import probe
import region_stats
import saliency

MODEL_KEYS = ("model", "img_size", "patch_size", "pred_dim", "pred_depth")  # must match the weights
# Properties of the machine running the evaluation, never taken from the training run's config.
MACHINE_KEYS = ("preset", "device", "amp", "compile", "seed", "num_workers", "device_data", "out_dir",
                "resume", "no_auto_resume", "resume_override")
EVALS = ("knn", "linear", "finetune", "picture", "regions")


def get_args_parser():
    """config.py's parser (the one shared configuration) plus an "evaluation" group."""
    p = config.get_args_parser()
    p.description = "Evaluate a DSeq-JEPA / I-JEPA checkpoint, or a random-init / raw-pixel baseline"
    g = p.add_argument_group("evaluation")
    g.add_argument("--checkpoint", default=None, help="train.py checkpoint (checkpoint.pt or a kept "
                   "checkpoint-epNNNN.pt); its target encoder is evaluated")
    g.add_argument("--init", choices=["checkpoint", "random"], default="checkpoint",
                   help="random: a randomly initialised encoder of the configured size (baseline)")
    g.add_argument("--pixels", action="store_true",
                   help="baseline: features = the flattened normalised pixels, no encoder (knn / linear)")
    g.add_argument("--eval", default="knn,linear", help=f"comma list of {', '.join(EVALS)}")
    g.add_argument("--features", choices=["last", "concat4", "both"], default="both",
                   help="last block, concat of the last 4 blocks, or both (paper: both)")
    g.add_argument("--eval-batch-size", type=int, default=256, help="images per forward pass (per process) for features")
    g.add_argument("--knn-k", type=int, nargs="+", default=[20], help="neighbours; several allowed, e.g. 10 20 100 (paper: 20)")
    g.add_argument("--knn-t", type=float, default=0.07, help="temperature of the exp(sim / T) votes (paper: 0.07)")
    g.add_argument("--probe-epochs", type=int, default=28, help="linear-probe epochs (paper: 28, lr x0.1 at 8/16/24)")
    g.add_argument("--probe-batch-size", type=int, default=256, help="linear-probe batch size")
    g.add_argument("--probe-lr", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                   help="linear-probe lr per 256 images; several = a grid of heads trained in one pass, the best "
                        "chosen on --probe-holdout (paper: 0.01 x batch / 256; at 0.01 our short probes under-fit)")
    g.add_argument("--probe-wd", type=float, nargs="+", default=[0.0, 1e-4, 5e-4],
                   help="linear-probe weight decay(s), crossed with --probe-lr in the grid (paper: 5e-4)")
    g.add_argument("--probe-holdout", type=float, default=0.1,
                   help="share of the training split held out (stratified, seeded by --seed) to choose the "
                        "probe's lr / wd; the test split is never used for that")
    g.add_argument("--probe-whiten", action=argparse.BooleanOptionalAction, default=False,
                   help="cached features only: whiten them (PCA on the probe's training part) before the heads; "
                        "the same linear classifiers, but SGD converges on ill-conditioned features (paper: off)")
    g.add_argument("--probe-aug", action=argparse.BooleanOptionalAction, default=False,
                   help="probe training on RandomResizedCrop scale (0.08, 1) + horizontal flip (bilinear), "
                        "features re-extracted every epoch (paper / MAE probe: on, bicubic)")
    g.add_argument("--probe-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="extract the features once and train on the cache (default: on without --probe-aug; "
                        "turn off when the features do not fit in memory)")
    g.add_argument("--ft-epochs", type=int, default=100, help="fine-tuning epochs (MAE ViT-B: 100)")
    g.add_argument("--ft-batch-size", type=int, default=128, help="fine-tuning batch size")
    g.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning peak lr per 256 images (MAE: 5e-4)")
    g.add_argument("--ft-min-lr", type=float, default=1e-6, help="fine-tuning lr at the end of the cosine (MAE: 1e-6)")
    g.add_argument("--ft-warmup-epochs", type=float, default=5, help="fine-tuning linear warmup epochs (MAE: 5)")
    g.add_argument("--ft-wd", type=float, default=0.05, help="fine-tuning weight decay (MAE: 0.05)")
    g.add_argument("--ft-layer-decay", type=float, default=0.75, help="layer-wise lr decay (paper: 0.75)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="fine-tuning label smoothing (paper: 0.1)")
    g.add_argument("--picture-images", type=int, default=pictures.PICTURE_IMAGES, help="held-out images (rows) in the plan picture")
    g.add_argument("--overlap-images", type=int, default=pictures.OVERLAP_IMAGES, help="held-out images scored for top-region/object overlap")
    g.add_argument("--region-alphas", default=None,
                   help="regions eval: comma list of area filters to tabulate, e.g. 0.05,0.1,0.15 (default: the run's --alpha)")
    g.add_argument("--eval-name", default=None, help="results go to OUT_DIR/eval_NAME.json (default: init kind + time)")
    return p


def _opt(args, name):
    """An evaluation flag; train.py's args (config's parser without this group) lack it: its default."""
    return getattr(args, name) if hasattr(args, name) else get_args_parser().get_default(name)


def resolve_config(argv=None):
    """Parse argv; with --checkpoint, fill in the training flags from the checkpoint's config.
    Returns (args, checkpoint dict or None)."""
    parser = get_args_parser()
    args = config.parse_args(argv, parser)
    typed = get_args_parser()  # parsed again with every default hidden: the dests of the typed flags
    for action in typed._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(typed.parse_known_args(argv)[0]))
    bad = [e for e in args.eval.split(",") if e not in EVALS]
    if bad:
        parser.error(f"--eval {args.eval}: unknown {bad}; choose from {', '.join(EVALS)}")
    if args.pixels and ({"finetune", "picture", "regions"} & set(args.eval.split(","))):
        parser.error("--pixels has no encoder to fine-tune or picture; use --eval knn,linear")
    if not 0 < args.probe_holdout < 1:
        parser.error(f"--probe-holdout {args.probe_holdout}: give a share in (0, 1), e.g. 0.1")
    if args.probe_whiten and (args.probe_aug or args.probe_cache is False):
        parser.error("--probe-whiten needs cached features (its statistics come from them); "
                     "drop --probe-aug / --no-probe-cache or --probe-whiten")
    if args.probe_aug and args.probe_cache:
        parser.error("--probe-cache cannot cache augmented features (new crops every epoch); "
                     "drop one of the flags")
    if args.checkpoint is None:
        if args.init == "checkpoint" and not args.pixels:
            parser.error("give --checkpoint PATH, or --init random / --pixels for a baseline")
        if "out_dir" not in given:  # a baseline's own folder, never a training run's
            args.out_dir = os.path.join("out", f"{args.preset}-{'pixels' if args.pixels else args.init}")
        return args, None
    if args.init == "random" or args.pixels:
        parser.error("--checkpoint cannot be combined with --init random or --pixels (baselines need no weights)")
    # one-line error if missing, corrupt or not a training checkpoint; the fix names OUR flag
    ckpt = config.load_checkpoint(args.checkpoint, fix="check --checkpoint: it must name a checkpoint written by train.py "
                                 "(checkpoint.pt, or a checkpoint-epNNNN.pt kept by --keep-every)")
    saved = ckpt["config"]
    for key in MODEL_KEYS:
        if key in given and getattr(args, key) != saved.get(key):
            config.fail(f"--{key.replace('_', '-')} {getattr(args, key)} does not match checkpoint "
                        f"{args.checkpoint}, trained with --{key.replace('_', '-')} {saved.get(key)}; drop the flag "
                        "(model flags are read from the checkpoint)")
    for key, value in {**config.BEFORE_FLAG, **saved}.items():  # a flag newer than the run: its old value
        if key not in given and key not in MACHINE_KEYS and hasattr(args, key):
            setattr(args, key, value)
    if "out_dir" not in given:
        args.out_dir = os.path.dirname(args.checkpoint) or "."
    args.class_to_idx = saved.get("class_to_idx")  # the run's train class map (imagefolder), if saved
    return args, ckpt


def load_target_encoder(ckpt, args, path):
    """The checkpoint's EMA target encoder f_bar, loaded strictly (cls_token included) and frozen."""
    encoder = vit.vit(args.model, img_size=args.img_size, patch_size=args.patch_size,
                      patch_init_std=args.patch_init_std)
    state, own = ckpt["target_encoder"], encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        flags = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in MODEL_KEYS)
        config.fail(f"checkpoint {path} does not fit the target encoder built from {flags}: "
                    f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}, shape mismatches (checkpoint vs "
                    f"model) {shapes[:4]}. Evaluate it with the flags it was trained with (its saved config).")
    encoder.load_state_dict(state, strict=True)
    return encoder.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# Features


def _dist():
    """(rank, world size): torchrun's process group if one is initialised, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_class_map(args):
    """ImageFolder labels for every split: the run's saved train map, else the train folder's own
    (sorted class folders of DATA_PATH/train). A val folder missing a class keeps the right labels; one
    with a class the map lacks is a DataError. None for the other datasets (labels come with the data)."""
    if args.dataset != "imagefolder":
        return None
    saved = getattr(args, "class_to_idx", None)
    if saved:
        return saved
    d = os.path.join(args.data_path, "train")
    if not os.path.isdir(d):
        return None  # ImageFolder reports the missing folder
    return {c: i for i, c in enumerate(sorted(e.name for e in os.scandir(d) if e.is_dir()))}


def _eval_loader(args, split, batch_size, rank=0, world=1, device="cpu", augment=False):
    """data.build_eval_loader with the train class map (in-memory sets are batched in memory under
    --device-data auto, on the CPU too)."""
    return data.build_eval_loader(args, split, batch_size, rank, world, device, augment=augment,
                                  class_to_idx=train_class_map(args))


def pooled_features(encoder, images, kinds, autocast=nullcontext()):
    """images (B, 3, H, W) -> {kind: (B, F) float32}; encoder None = raw pixels, kind "pixels"."""
    if encoder is None:
        return {"pixels": images.flatten(1).float()}  # (B, 3*H*W)
    layers = (-4, -3, -2, -1) if "concat4" in kinds else (-1,)
    with autocast:
        pooled = [h.float().mean(1) for h in encoder.features(images, layers=layers)]  # each (B, P, D) -> (B, D)
        out = {}
        if "last" in kinds:
            out["last"] = pooled[-1]  # (B, D)
        if "concat4" in kinds:
            out["concat4"] = torch.cat(pooled, 1)  # (B, 4D)
    return out


def interleave(parts, n):
    """Undo DistributedSampler(shuffle=False) sharding: rank r holds positions r, r + W, r + 2W, ...
    of the index list 0..N-1, padded with repeats to a multiple of W. parts: W tensors (N_pad / W, ...)
    -> (N, ...) in dataset order, padding dropped."""
    return torch.stack(parts, 1).flatten(0, 1)[:n]  # (N_pad/W, W, ...) -> (N_pad, ...): position j*W + r


def gather_shards(x, n):
    """Every rank's shard x (N_pad / W, ...) -> the whole set (N, ...) on every rank (all_gather)."""
    rank, world = _dist()
    if world == 1:
        return x[:n]
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return interleave(parts, n)


@torch.no_grad()
def extract(features, loader, device, desc):
    """The one pass over a split that every evaluation makes: features(images (B, 3, H, W) on
    `device`) -> {name: (B, F)} for each batch -> ({name: (N, F)}, labels (N,)) on `device`, in
    dataset order. Under DDP each rank runs its shard and all ranks get everything."""
    feats, labels = {}, []
    for images, y in tqdm(loader, desc=desc, disable=_dist()[0] != 0, leave=False, dynamic_ncols=True):
        for k, f in features(images.to(device, non_blocking=True)).items():
            feats.setdefault(k, []).append(f)
        labels.append(y.to(device))
    n = len(loader.source)  # real images; the sampler pads the last shard with repeats
    return {k: gather_shards(torch.cat(v), n) for k, v in feats.items()}, gather_shards(torch.cat(labels), n)


# ----------------------------------------------------------------------------------------------
# kNN (weighted vote, T = 0.07)


@torch.no_grad()
def knn_votes(bank, bank_labels, queries, num_classes, ks=(20,), T=0.07, max_entries=2**26):
    """Weighted kNN votes. bank (N, F), bank_labels (N,), queries (Q, F) -> {k: votes (Q, C)}.

    Cosine similarity of L2-normalised features; each of the k nearest bank images votes for its
    class with weight exp(sim / T). The (Q, N) similarity matrix is built in query chunks of at most
    max_entries (2^26 fp32 = 256 MB), so an ImageNet-sized bank fits.
    """
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    kmax = min(max(ks), len(bank))
    chunk = max(1, max_entries // len(bank))
    votes = {k: [] for k in ks}
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # (q, kmax), most similar first
        weight, label = (sim / T).exp(), bank_labels[idx]  # (q, kmax) each
        for k in ks:
            v = torch.zeros(len(q), num_classes, device=q.device)
            votes[k].append(v.scatter_add_(1, label[:, :k], weight[:, :k]))  # (q, C)
    return {k: torch.cat(v) for k, v in votes.items()}


def topk_accuracy(scores, labels):
    """scores (Q, C), labels (Q,) -> (top-1 %, top-5 %); top-5 is 100 when C <= 5."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (Q, 5)
    hit = top == labels[:, None]  # (Q, 5)
    return 100 * hit[:, 0].float().mean().item(), 100 * hit.any(1).float().mean().item()


def knn_monitor(target_encoder, args, device):
    """Held-out kNN accuracy of the target encoder, "last" features (encoder None: raw pixels, the
    baseline drawn beside it): bank = the training split (no augmentation, eval crops), queries =
    the val split. DDP-aware: every rank extracts its shard, all ranks get the same result.
    -> {top1, top5, k, split, n_bank, n_query, ...} (percent)."""
    rank, world = _dist()
    bs, ks, T = _opt(args, "eval_batch_size"), _opt(args, "knn_k"), _opt(args, "knn_t")
    autocast, _ = config.make_autocast(args, device)
    kind = "last" if target_encoder is not None else "pixels"
    was_training = target_encoder is not None and target_encoder.training
    if target_encoder is not None:
        target_encoder.eval()
    bank_loader = _eval_loader(args, "train", bs, rank, world, device)
    pool = lambda x: pooled_features(target_encoder, x, [kind], autocast)  # noqa: E731
    bank, bank_y = extract(pool, bank_loader, device, "kNN bank")
    query, query_y = extract(pool, _eval_loader(args, "val", bs, rank, world, device), device, "kNN queries")
    if target_encoder is not None:
        target_encoder.train(was_training)
    votes = knn_votes(bank[kind], bank_y, query[kind], bank_loader.num_classes, ks, T)
    main_k = 20 if 20 in ks else ks[0]
    out = {"k": main_k, "split": "val", "features": kind, "n_bank": len(bank_y), "n_query": len(query_y)}
    for k in ks:
        top1, top5 = topk_accuracy(votes[k], query_y)
        out.update({"top1": top1, "top5": top5} if k == main_k else {f"top1_k{k}": top1, f"top5_k{k}": top5})
    return out


# ----------------------------------------------------------------------------------------------
# Linear probe: a grid of heads trained in one pass, chosen on a split held out from train (the
# grid, its optimiser and the held-out split: probe.py)


def linear_eval(pool, args, bank_loader, bank, val, device, cache):
    """The linear-probe evaluation: hold out a stratified --probe-holdout share of the training split,
    train the grid of heads on the rest, choose each kind's head on the held-out part, test it on val.
    Training features are the cache `bank` (PCA-whitened with --probe-whiten, statistics of the fit
    part only) or, when not cached, pool(images) of crops streamed every epoch (augmented with
    --probe-aug). bank / val: ({kind: (N, F)}, labels (N,)); bank is (None, None) when not cached.
    -> probe.linear_probe's {kind: {lr, wd, ..., grid}}, each with n_fit and n_holdout."""
    (feats, labels), source = bank, bank_loader.source
    all_labels = labels.cpu() if labels is not None else probe.dataset_labels(source)
    fit_idx, hold_idx = probe.holdout_split(all_labels, args.probe_holdout, args.seed)  # (N_fit,), (N_hold,)
    test, fit = val, None
    if cache:
        take = lambda idx: ({k: f[idx.to(f.device)] for k, f in feats.items()},  # noqa: E731
                            labels[idx.to(labels.device)])
        fit, hold = take(fit_idx), take(hold_idx)
        if args.probe_whiten:  # the same map for holdout and test
            white = {k: probe.whitening(f) for k, f in fit[0].items()}
            fit, hold, test = [({k: (f - white[k][0]) @ white[k][1] for k, f in part.items()}, y)
                               for part, y in (fit, hold, test)]  # each (N, F)
        batches = probe.cached_batches(*fit, args.probe_batch_size, args.seed)
    else:
        hold = extract(pool, probe.probe_loader(args, source, hold_idx, args.eval_batch_size, device, augment=False),
                       device, "holdout features")
        loader = probe.probe_loader(args, source, fit_idx, args.probe_batch_size, device, augment=args.probe_aug)
        loader.sampler.shuffle = True  # without augmentation an eval loader has a fixed order
        batches = probe.streamed_batches(pool, loader, device)
    threads = torch.get_num_threads()
    if cache and device.type == "cpu":  # tiny steps: thread barriers cost more than they save, and
        torch.set_num_threads(1)        # on busy cores they dominate (measured 0.7 s vs 8-40 s, demo set)
    chosen = probe.linear_probe(batches, hold, test, bank_loader.num_classes, args, device, args.probe_batch_size,
                                fit=fit)
    torch.set_num_threads(threads)
    for r in chosen.values():
        r.update(n_fit=len(fit_idx), n_holdout=len(hold_idx))
    return chosen


# ----------------------------------------------------------------------------------------------
# Fine-tuning (MAE recipe, compact)


def layer_decay_groups(encoder, head, weight_decay, decay):
    """AdamW groups with lr_scale = decay^(depth + 1 - layer): patch embedding and CLS are layer 0,
    block i is layer i + 1, the final norm and the head layer depth + 1 (full lr). Biases, norms and
    the CLS token get no weight decay."""
    groups = {}
    named = list(encoder.named_parameters()) + [(f"head.{n}", p) for n, p in head.named_parameters()]
    for name, p in named:
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("patch_embed", "cls_token")):
            layer = 0
        else:
            layer = encoder.depth + 1
        no_wd = p.ndim <= 1 or name == "cls_token"
        group = groups.setdefault((layer, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                                   "lr_scale": decay ** (encoder.depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def ft_lr_at(step, peak, total, warmup, final):
    """Linear warmup from 0, then cosine from peak to final; a pure function of the step."""
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def finetune(encoder, args, device):
    """Full fine-tuning of a copy of the encoder with an average-pooled linear head (no CLS).
    -> {val_top1, val_top5, train_loss} (percent; train_loss = mean of the last epoch)."""
    autocast, scaler = config.make_autocast(args, device)  # scaler only for --amp fp16
    train_loader = _eval_loader(args, "train", args.ft_batch_size, device=device, augment=True)
    val_loader = _eval_loader(args, "val", args.eval_batch_size, device=device)
    net = copy.deepcopy(encoder).requires_grad_(True).train().to(device)
    head = nn.Linear(net.embed_dim, train_loader.num_classes).to(device)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # near-zero start: the first steps do not wreck the encoder
    nn.init.zeros_(head.bias)
    peak = args.ft_lr * args.ft_batch_size / 256
    opt = torch.optim.AdamW(layer_decay_groups(net, head, args.ft_wd, args.ft_layer_decay), lr=peak)
    total = args.ft_epochs * len(train_loader)
    warmup = round(args.ft_warmup_epochs * len(train_loader))
    step, losses = 0, []
    # full fine-tuning is the slow evaluation (the demo's 100 epochs: 30+ min on a 2-core CPU):
    # say so up front, and show every step with its ETA
    print(f"fine-tuning {args.ft_epochs} epochs x {len(train_loader)} steps = {total} steps of "
          f"{args.ft_batch_size} images (--ft-epochs sets the length)")
    bar = tqdm(total=total, desc="fine-tune", dynamic_ncols=True)
    for epoch in range(args.ft_epochs):
        train_loader.set_epoch(epoch)
        losses = []
        for images, y in train_loader:
            for group in opt.param_groups:
                group["lr"] = ft_lr_at(step, peak, total, warmup, args.ft_min_lr) * group["lr_scale"]
            with autocast:
                logits = head(net(images.to(device)).mean(1))  # (B, P, D) -> (B, D) -> (B, C)
            loss = F.cross_entropy(logits.float(), y.to(device), label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            losses.append(loss.detach())
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, refresh=False)  # no loss here: .item() would sync every step
    bar.close()
    net.eval()

    def logits(images):
        with autocast:
            return {"logits": head(net(images).mean(1)).float()}  # (B, C)
    scores, labels = extract(logits, val_loader, device, "fine-tune val")
    top1, top5 = topk_accuracy(scores["logits"], labels)
    train_loss = torch.stack(losses).mean().item() if losses else None
    return {"val_top1": top1, "val_top5": top5, "train_loss": train_loss}


# ----------------------------------------------------------------------------------------------
# Region statistics: the saliency maps of the held-out split (the statistics: region_stats.py)


def saliency_maps(encoder, loader, args, device, autocast):
    """CLS saliency maps of the whole split, oriented by the run's --saliency-polarity (saliency.orient):
    (N, P) fp32 on the CPU, in dataset order."""
    def maps(images):
        with autocast:
            z = encoder.features(images, layers=(args.saliency_layer,))[0]  # (B, P, D)
        A = saliency.saliency_map(z.float(), encoder.cls_token)  # (B, P)
        return {"A": saliency.orient(A, args.saliency_polarity)}  # the run's polarity, so "paper" below reads it
    return extract(maps, loader, device, "saliency")[0]["A"].cpu()


# ----------------------------------------------------------------------------------------------
# The command line


def main(argv=None):
    """The command line (see the top of the file). Returns the report that is also written as JSON."""
    args, ckpt = resolve_config(argv)
    device = config.pick_device(args, 0)
    torch.manual_seed(args.seed)  # the random-init baseline and the probe heads are reproducible
    evals = args.eval.split(",")
    init = "pixels" if args.pixels else args.init
    encoder, kinds = None, ["pixels"]
    if not args.pixels:
        if ckpt is not None:
            encoder = load_target_encoder(ckpt, args, args.checkpoint)
        else:
            encoder = vit.vit(args.model, img_size=args.img_size, patch_size=args.patch_size, patch_init_std=args.patch_init_std).requires_grad_(False)
        encoder = encoder.eval().to(device)
        kinds = ["last", "concat4"] if args.features == "both" else [args.features]
    autocast, _ = config.make_autocast(args, device)
    cache = args.probe_cache if args.probe_cache is not None else not args.probe_aug
    what = args.checkpoint or f"{args.model} ViT" if encoder is not None else "(no encoder)"
    print(f"evaluating {init} {what} ({args.dataset}, {args.img_size} px) on {device}: {', '.join(evals)}; "
          f"features {', '.join(kinds)}")
    results = []  # one row per number: {eval, features, metric, value, ...settings}

    def add(ev, feats, metric, value, **extra):
        results.append({"eval": ev, "features": feats, "metric": metric, "value": value, **extra})

    # 1. features of the training split (the kNN bank, the cached probe) and of the val split
    if "knn" in evals or "linear" in evals:
        bank_loader = _eval_loader(args, "train", args.eval_batch_size, device=device)
        val_loader = _eval_loader(args, "val", args.eval_batch_size, device=device)
        num_classes = bank_loader.num_classes
        pool = lambda x: pooled_features(encoder, x, kinds, autocast)  # noqa: E731
        bank, bank_y = None, None
        if "knn" in evals or ("linear" in evals and cache):
            bank, bank_y = extract(pool, bank_loader, device, "train features")
        val, val_y = extract(pool, val_loader, device, "val features")
    # 2. kNN
    if "knn" in evals:
        for f in kinds:
            votes = knn_votes(bank[f], bank_y, val[f], num_classes, args.knn_k, args.knn_t)
            for k in args.knn_k:
                top1, top5 = topk_accuracy(votes[k], val_y)
                add("knn", f, "val_top1", top1, k=k, T=args.knn_t)
                add("knn", f, "val_top5", top5, k=k, T=args.knn_t)
    # 3. linear probe: a grid of heads, chosen on a held-out part of train, on cached features or
    #    on features streamed every epoch (augmented crops with --probe-aug)
    chosen = {}  # the linear probe's chosen heads, per feature kind
    if "linear" in evals:
        chosen = linear_eval(pool, args, bank_loader, (bank, bank_y), (val, val_y), device, cache)
        for f, r in chosen.items():
            for metric in ("train_top1", "holdout_top1", "val_top1", "val_top5"):
                add("linear", f, metric, r[metric], lr=r["lr"], wd=r["wd"], epochs=args.probe_epochs,
                    augment=args.probe_aug, whiten=args.probe_whiten, n_fit=r["n_fit"], n_holdout=r["n_holdout"])
    # 4. fine-tuning
    if "finetune" in evals:
        for metric, value in finetune(encoder, args, device).items():
            add("finetune", "last", metric, value, epochs=args.ft_epochs)
    # 5. the picture and the top-region / object overlap
    name = args.eval_name or f"{init}_{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(args.out_dir, exist_ok=True)
    if "picture" in evals:
        pic = pictures.plan_picture(encoder, args, os.path.join(args.out_dir, f"plans_{name}.png"), device)
        for metric in ("top_region_object_overlap", "top_region_object_precision", "object_area",
                       "ranked_regions_per_image"):
            add("picture", "saliency", metric, pic[metric], images=pic["images"])
        print(f"wrote {pic['path']}")

    # 6. region statistics of the held-out split (the regions eval)
    by_alpha = None
    if "regions" in evals:
        alphas = [float(a) for a in (args.region_alphas or str(args.alpha)).split(",")]
        loader = _eval_loader(args, "val", args.eval_batch_size, device=device)
        A = saliency_maps(encoder, loader, args, device, autocast)  # (N_val, P)
        by_alpha = region_stats.region_statistics(A, encoder.grid, alphas, args.regions, args.seed)
        for alpha, s in by_alpha.items():
            add("regions", "saliency", "ranked_regions_per_image", s["ranked_mean"], alpha=alpha, images=s["images"])
        add("regions", "saliency", "positional_share", s["positional_share"], images=s["images"])
        region_stats.print_region_table(by_alpha, args.regions)

    # 7. one JSON file per run, and a table
    report = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "init": init,
              "checkpoint": args.checkpoint,
              "step": ckpt["step"] if ckpt else None,
              "data": {"dataset": args.dataset, "data_path": args.data_path, "bank_split": "train",
                       "eval_split": "val", "img_size": args.img_size},
              "results": results, "probe": chosen, "config": vars(args),
              "regions": {str(a): s for a, s in by_alpha.items()} if by_alpha else None}
    path = os.path.join(args.out_dir, f"eval_{name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\n{'eval':<10}{'features':<10}{'metric':<30}{'value':>10}")
    for r in results:
        metric = r["metric"] + (f" (k={r['k']})" if "k" in r else "") + (f" (a={r['alpha']:g})" if "alpha" in r else "")
        digits = 3 if r["eval"] in ("picture", "regions") else 2  # shares / counts vs accuracies in percent
        value = "n/a" if r["value"] is None else f"{r['value']:.{digits}f}"
        print(f"{r['eval']:<10}{r['features']:<10}{metric:<30}{value:>10}")
    if data.unreadable_images():  # each was named once when first met
        print(f"{data.unreadable_images()} unreadable images were skipped (replaced by their neighbours)")
    for f, r in chosen.items():
        print(f"linear probe '{f}': chose lr {r['lr']:g} wd {r['wd']:g} of {len(r['grid'])} heads on "
              f"{r['n_holdout']} held-out training images (train top-1 {r['train_top1']:.2f})")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # the message names the data and the fix; a traceback adds nothing
        config.fail(config.data_error_line(e))
