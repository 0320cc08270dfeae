"""
Evaluate a DSeq-JEPA (or I-JEPA) checkpoint: kNN, linear probe, fine-tuning, pictures of the plans.

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
  finetune: MAE-style: AdamW, layer-wise lr decay 0.75, warmup + cosine, label smoothing 0.1
            (compact: RandomResizedCrop + flip only, no RandAugment / mixup / drop-path)
  picture : image | saliency | ranked regions | the DSeq plan step by step | an I-JEPA plan, plus
            the top-region / object overlap on the synthetic set (a number that should rise)
  regions : ranked regions per held-out image, and which ablation flags change its DSeq plan
Bank / training features come from the training split, queries from the val split. The CLI runs in
one process; train.py also calls knn_monitor (sharded over torchrun ranks) and plan_picture.

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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import config
import data
import masking
import model as vit
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
    g.add_argument("--picture-images", type=int, default=6, help="held-out images (rows) in the plan picture")
    g.add_argument("--overlap-images", type=int, default=256, help="held-out images scored for top-region/object overlap")
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
    probe = get_args_parser()  # parsed again with every default hidden: the dests of the typed flags
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(probe.parse_known_args(argv)[0]))
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
    for key, value in saved.items():
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
# Linear probe: a grid of heads trained in one pass, chosen on a split held out from train


PROBE_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop scale of the official probe and MAE's linear probe


def dataset_labels(ds):
    """(N,) int64 labels of a build_dataset set, without decoding any image."""
    if hasattr(ds, "tensors"):  # in-memory sets
        return ds.tensors()[1].cpu()
    return torch.tensor([y for _, y in ds.samples])  # ImageFolder


def probe_loader(args, source, idx, batch_size, device, augment):
    """Images idx of the training set `source` for the probe: augment -> shuffled RandomResizedCrop
    scale PROBE_CROP_SCALE (not pretraining's --crop-scale) + horizontal flip, resized bilinearly
    (the official probe uses bicubic); else the eval crop in a fixed order. In-memory sets stay in
    memory (batched crops, as _eval_loader)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    if hasattr(source, "tensors"):
        images, labels = source.tensors()
        sub = data.ArrayDataset(images[idx.to(images.device)], labels[idx.to(labels.device)])
    else:
        sub = torch.utils.data.Subset(source, idx.tolist())
    on_device = hasattr(sub, "tensors") and args.device_data != "off"
    loader = data.build_loader(sub, args.img_size, batch_size, augment, num_workers=args.num_workers,
                               seed=args.seed, device=device, on_device=on_device,
                               crop_scale=PROBE_CROP_SCALE, flip=augment)
    loader.source = sub
    return loader


def whitening(feats, eps=1e-6):
    """feats (N, F) -> (mean (F,), W (F, F)): (x - mean) W has identity covariance (PCA whitening).
    Directions with variance below eps x the largest are scaled as if they had that variance. A
    probe on whitened features is still a linear classifier of the original ones, but plain SGD
    converges on it: frozen ViT features are very ill-conditioned (demo: condition number ~1e11)."""
    x = feats.double()
    mean = x.mean(0)  # (F,)
    var, vecs = torch.linalg.eigh(torch.cov((x - mean).T))  # (F,), (F, F) columns = directions
    return mean.float(), (vecs / var.clamp_min(eps * var.max()).sqrt()).float()  # (F,), (F, F)


def holdout_split(labels, frac, seed):
    """Stratified, seeded split of the training set: labels (N,) -> (fit_idx, holdout_idx), both
    sorted. From each class, round(frac * n_c) images (at least 1 when frac > 0) are held out to
    choose the probe's lr / wd; the test split is never used for that choice."""
    labels = torch.as_tensor(labels).cpu()
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()  # (n_c,)
        k = min(len(idx) - 1, max(1, round(frac * len(idx)))) if frac > 0 else 0
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    held = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


class ProbeGrid(nn.Module):
    """Every (lr, wd) head of the grid for one feature kind, as one batched weight tensor.

    BatchNorm1d without affine standardises the frozen features (shared by all heads: it has no
    parameters, only running statistics), then head h computes x W_h + b_h.
    weight (H, F, C), bias (H, 1, C); forward x (B, F) -> logits (H, B, C).
    """

    def __init__(self, dim, num_classes, n_heads):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.weight = nn.Parameter(torch.randn(n_heads, dim, num_classes) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, num_classes))

    def forward(self, x):
        return torch.einsum("bf,hfc->hbc", self.norm(x), self.weight) + self.bias  # (H, B, C)


@torch.no_grad()
def sgd_nesterov_step(params, buffers, lr, wd, momentum=0.9):
    """torch.optim.SGD(momentum=0.9, nesterov=True, dampening=0) with a per-head lr and wd:
    g = grad + wd p;  buf = momentum buf + g;  p -= lr (g + momentum buf).
    params: tensors (H, ...), buffers: same shapes (start at 0), lr / wd: (H,) tensors.
    (The official probe's SGD had no momentum at all: fault 6.)"""
    for p, buf in zip(params, buffers):
        shape = (-1,) + (1,) * (p.dim() - 1)  # (H, 1, 1): one value per head
        g = p.grad + wd.view(shape) * p
        buf.mul_(momentum).add_(g)
        p.sub_(lr.view(shape) * (g + momentum * buf))


def probe_lr_at(epoch, base_lr, epochs):
    """Step decay x0.1 at epochs 8, 16, 24 of 28, the milestones scaled when epochs != 28."""
    return base_lr * 0.1 ** sum(epoch >= m * epochs / 28 for m in (8, 16, 24))


def cached_batches(feats, labels, batch_size, seed):
    """Epoch -> shuffled batches ({kind: (B, F)}, (B,)) of cached features. The last partial batch is
    kept unless it holds one image (BatchNorm needs two)."""
    def batches(epoch):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + epoch))
        for idx in order.to(labels.device).split(batch_size):  # (B,) each
            if len(idx) > 1:
                yield {k: f[idx] for k, f in feats.items()}, labels[idx]
    return batches


def streamed_batches(pool, loader, device):
    """Epoch -> batches of features pool(images) extracted on the fly: freshly augmented crops (the
    paper's probe training) or, without augmentation, a reshuffled pass when the features do not
    fit in memory."""
    def batches(epoch):
        loader.set_epoch(epoch)
        for images, y in loader:
            if len(y) < 2:  # BatchNorm needs two images
                continue
            with torch.no_grad():
                f = pool(images.to(device, non_blocking=True))
            yield f, y.to(device)
    return batches


@torch.no_grad()
def grid_accuracy(grid, feats, labels, chunk=4096):
    """Top-1 and top-5 (percent) of every head: feats (N, F), labels (N,) -> ((H,), (H,)) tensors."""
    top1 = top5 = 0
    for x, y in zip(feats.split(chunk), labels.split(chunk)):
        top = grid(x).topk(min(5, grid.weight.shape[2]), dim=2).indices  # (H, b, 5)
        hit = top == y[None, :, None]  # (H, b, 5)
        top1, top5 = top1 + hit[..., 0].sum(1), top5 + hit.any(2).sum(1)  # (H,)
    return 100 * top1.float() / len(labels), 100 * top5.float() / len(labels)


def linear_probe(train_batches, holdout, test, num_classes, args, device, batch_size, fit=None):
    """Train a grid of heads per feature kind on the same batches, choose each kind's head on the
    held-out part of train, report its accuracy on the test (val) split.

    train_batches(epoch) yields ({kind: (B, F)}, labels (B,)). holdout / test / fit: (feats
    {kind: (N, F)}, labels (N,)); fit = the cached training features (None when streamed).
    Every head: SGD Nesterov momentum 0.9, lr x batch / 256 with the step decay of probe_lr_at,
    the grid's (lr, wd); the heads never interact (each has its own weights and loss term).
    -> {kind: {lr, wd, holdout_top1, train_top1, val_top1, val_top5, grid: [{lr, wd, holdout_top1,
    train_top1}, ...]}}. train_top1: on the cached training features after training (eval mode),
    or when streamed, on the last epoch's batches as they were seen (train mode, augmented).
    """
    pairs = [(lr, wd) for lr in args.probe_lr for wd in args.probe_wd]  # (lr per 256 images, wd), lr-major
    heads = nn.ModuleDict({k: ProbeGrid(f.shape[1], num_classes, len(pairs)) for k, f in test[0].items()}).to(device)
    base_lr = torch.tensor([lr * batch_size / 256 for lr, _ in pairs], device=device)  # (H,)
    wd = torch.tensor([w for _, w in pairs], device=device)  # (H,)
    params = list(heads.parameters())
    buffers = [torch.zeros_like(p) for p in params]
    heads.train()
    for epoch in tqdm(range(args.probe_epochs), desc="linear probe", leave=False, dynamic_ncols=True):
        lr = probe_lr_at(epoch, base_lr, args.probe_epochs)  # (H,)
        correct, seen = {k: 0 for k in heads}, 0  # counted over the last epoch only
        for feats, y in train_batches(epoch):
            loss = 0.0
            for k, grid in heads.items():
                logits = grid(feats[k])  # (H, B, C)
                # sum over heads of each head's mean cross-entropy: head h's gradient is its own
                loss = loss + F.cross_entropy(logits.flatten(0, 1), y.repeat(len(pairs)), reduction="sum") / len(y)
                correct[k] = correct[k] + (logits.argmax(2) == y).sum(1)  # (H,)
            for p in params:
                p.grad = None
            loss.backward()
            sgd_nesterov_step(params, buffers, lr, wd)
            seen += len(y)
    heads.eval()
    out = {}
    for k, grid in heads.items():
        hold1, _ = grid_accuracy(grid, holdout[0][k], holdout[1])  # (H,)
        train1 = grid_accuracy(grid, fit[0][k], fit[1])[0] if fit is not None else 100 * correct[k].float() / max(seen, 1)
        test1, test5 = grid_accuracy(grid, test[0][k], test[1])  # (H,)
        h = int(hold1.argmax())  # the first best head in grid order: ties go to the smaller lr
        out[k] = {"lr": pairs[h][0], "wd": pairs[h][1], "holdout_top1": hold1[h].item(),
                  "train_top1": train1[h].item(), "val_top1": test1[h].item(), "val_top5": test5[h].item(),
                  "grid": [{"lr": lr_, "wd": wd_, "holdout_top1": hold1[i].item(), "train_top1": train1[i].item()}
                           for i, (lr_, wd_) in enumerate(pairs)]}
    return out


def linear_eval(pool, args, bank_loader, bank, val, device, cache):
    """The linear-probe evaluation: hold out a stratified --probe-holdout share of the training split,
    train the grid of heads on the rest, choose each kind's head on the held-out part, test it on val.
    Training features are the cache `bank` (PCA-whitened with --probe-whiten, statistics of the fit
    part only) or, when not cached, pool(images) of crops streamed every epoch (augmented with
    --probe-aug). bank / val: ({kind: (N, F)}, labels (N,)); bank is (None, None) when not cached.
    -> linear_probe's {kind: {lr, wd, ..., grid}}, each with n_fit and n_holdout."""
    (feats, labels), source = bank, bank_loader.source
    all_labels = labels.cpu() if labels is not None else dataset_labels(source)
    fit_idx, hold_idx = holdout_split(all_labels, args.probe_holdout, args.seed)  # (N_fit,), (N_hold,)
    test, fit = val, None
    if cache:
        take = lambda idx: ({k: f[idx.to(f.device)] for k, f in feats.items()},  # noqa: E731
                            labels[idx.to(labels.device)])
        fit, hold = take(fit_idx), take(hold_idx)
        if args.probe_whiten:  # the same map for holdout and test
            white = {k: whitening(f) for k, f in fit[0].items()}
            fit, hold, test = [({k: (f - white[k][0]) @ white[k][1] for k, f in part.items()}, y)
                               for part, y in (fit, hold, test)]  # each (N, F)
        batches = cached_batches(*fit, args.probe_batch_size, args.seed)
    else:
        hold = extract(pool, probe_loader(args, source, hold_idx, args.eval_batch_size, device, augment=False),
                       device, "holdout features")
        loader = probe_loader(args, source, fit_idx, args.probe_batch_size, device, augment=args.probe_aug)
        loader.sampler.shuffle = True  # without augmentation an eval loader has a fixed order
        batches = streamed_batches(pool, loader, device)
    threads = torch.get_num_threads()
    if cache and device.type == "cpu":  # tiny steps: thread barriers cost more than they save, and
        torch.set_num_threads(1)        # on busy cores they dominate (measured 0.7 s vs 8-40 s, demo set)
    probe = linear_probe(batches, hold, test, bank_loader.num_classes, args, device, args.probe_batch_size, fit=fit)
    torch.set_num_threads(threads)
    for r in probe.values():
        r.update(n_fit=len(fit_idx), n_holdout=len(hold_idx))
    return probe


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
# The picture: saliency, ranked regions, the DSeq plan step by step, an I-JEPA plan

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 200, 0], [145, 30, 180],
                    [245, 130, 48], [70, 220, 220], [240, 50, 230]], np.float32)  # R_1, R_2, ...
GREY = np.array([150, 150, 150], np.float32)  # the background region R_N
# "magma"-like colour map, written as 5 anchors and linear interpolation: dark = low saliency
CMAP = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float32)
CONTEXT_TINT = np.array([0, 190, 255], np.float32)  # context, in the DSeq steps and the I-JEPA plan
TARGET_TINT = np.array([255, 215, 0], np.float32)  # DSeq target: yellow stripes, whatever its shape


def stripes(shape, period=6):
    """(H, W) bool diagonal stripes: marks an area as the target without outlining its edge (an
    outline of the background target would trace R_1's edge and make the context look targeted)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy + xx) % period < period // 2


def colormap(v):
    """v (...) in [0, 1] -> (..., 3) float RGB, piecewise linear through CMAP."""
    x = np.clip(v, 0, 1) * (len(CMAP) - 1)
    i = np.minimum(x.astype(int), len(CMAP) - 2)
    f = (x - i)[..., None]
    return CMAP[i] * (1 - f) + CMAP[i + 1] * f


def region_colours(r, N):
    """Region numbers (...) -> (..., 3): R_k gets PALETTE[k-1] (cycled), background (N or 0) grey."""
    colours = PALETTE[(np.maximum(r, 1) - 1) % len(PALETTE)]
    return np.where(((r == N) | (r == 0))[..., None], GREY, colours)


def outline(mask, thickness=2):
    """mask (H, W) bool -> its inner border (H, W) bool, `thickness` pixels wide."""
    inner = mask
    for _ in range(thickness):
        p = np.pad(inner, 1)  # outside the panel counts as "not in the mask": edges get a border
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def plan_maps(plan, P):
    """Plan -> dense per-row maps: context level (R, P) (0 = not context) and target membership
    (R, G + 1, P) bool, [r, g, j] = patch j is a target of group g (group 0 = padding, unused)."""
    R, G = plan.ctx_idx.shape[0], int(plan.tgt_grp.max())
    ctx = torch.zeros(R, P, dtype=torch.long).scatter_reduce(1, plan.ctx_idx, plan.ctx_lvl, "amax")  # (R, P)
    tgt = torch.zeros(R, (G + 1) * P, dtype=torch.bool)
    tgt.scatter_(1, plan.tgt_grp * P + plan.tgt_idx, True)  # (R, (G+1)*P): slot = group * P + patch
    return ctx, tgt.view(R, G + 1, P)  # (R, P), (R, G+1, P)


def object_overlap(regions, masks, p):
    """How well the top region R_1 finds the class object. regions (n, P) of a patch grid (h, w),
    masks (n, h*p, w*p) bool object pixels, p the patch size; a patch is "object" if at least half
    of its pixels are. -> {top_region_object_overlap: share of images whose R_1 shares a patch with
    the object (no R_1 = a miss), top_region_object_precision: mean share of R_1's patches on the
    object, object_area: share of object patches (the precision a random region would get)}."""
    n, h, w = masks.shape[0], masks.shape[1] // p, masks.shape[2] // p
    obj = masks.float().view(n, h, p, w, p).mean((2, 4)).flatten(1) >= 0.5  # (n, P) mostly-object patches
    top = regions == 1  # (n, P)
    hit = (top & obj).sum(1)  # (n,)
    has_top = top.any(1)
    precision = hit[has_top] / top.sum(1)[has_top]  # (n_top,) share of R_1's patches on the object
    return {"top_region_object_overlap": (hit > 0).float().mean().item(),
            "top_region_object_precision": precision.mean().item() if has_top.any() else 0.0,
            "object_area": obj.float().mean().item()}


@torch.no_grad()
def plan_picture(target_encoder, args, path, device):
    """PNG of held-out images, one row each: image | saliency | ranked regions | DSeq steps | I-JEPA.

    The plans come from masking.py exactly as in training (dseq_plan in causal mode with the run's
    order / prediction flags; sample_multiblock + ijepa_plan). On data with object masks (synthetic)
    also scores the first --overlap-images held-out images: a patch is "object" if at least half of
    its pixels are, and an image counts when its top region R_1 shares a patch with the object.
    Returns {path, size, top_region_object_overlap, top_region_object_precision, object_area, ...}.
    """
    n_show, n_score = _opt(args, "picture_images"), _opt(args, "overlap_images")
    one_process = argparse.Namespace(**{**vars(args), "num_workers": 0})  # rank 0 alone calls this
    loader = _eval_loader(one_process, "val", max(n_show, n_score), device=device)
    images, _ = next(iter(loader))  # the first held-out images, eval crop: (n, 3, S, S)
    images = images.to(device)
    n, N, (h, w) = len(images), args.regions, target_encoder.grid
    was_training = target_encoder.training
    target_encoder.eval()
    z = target_encoder.features(images, layers=(args.saliency_layer,))[0].float()  # (n, P, D)
    regions, sal = saliency.discriminative_regions(z, target_encoder.cls_token.float(), grid=(h, w),
                                                   n_regions=N, alpha=args.alpha)  # (n, P) each
    target_encoder.train(was_training)
    regions, sal = regions.cpu(), sal.float().cpu()
    ranked = regions.masked_fill(regions >= N, 0).amax(1)  # (n,) K, the ranked regions of each image
    stats = {"images": n, "ranked_regions_per_image": ranked.float().mean().item()}

    stats.update(top_region_object_overlap=None, top_region_object_precision=None, object_area=None)
    if hasattr(loader.source, "object_mask"):  # synthetic data knows where the object is
        masks = torch.stack([loader.source.object_mask(i) for i in range(n)])  # (n, S, S)
        stats.update(object_overlap(regions, masks, args.patch_size))

    # --- the plans of the shown images, built by masking.py as in training
    m, gen = min(n_show, n), torch.Generator().manual_seed(args.seed)
    regions, sal, P = regions[:m], sal[:m], h * w
    dplan = masking.dseq_plan(regions, mode="causal", order=args.region_order, prediction=args.prediction,
                              generator=gen, num_regions=N)
    d_ctx, d_tgt = plan_maps(dplan, P)  # (m, P), (m, G+1, P)
    ctx_mask, tgt_masks = masking.sample_multiblock(m, (h, w), gen, n_targets=args.num_targets,
                                                    target_scale=tuple(args.target_scale),
                                                    context_scale=tuple(args.context_scale))
    i_ctx, i_tgt = plan_maps(masking.ijepa_plan(ctx_mask, tgt_masks), P)  # (m, P), (m, M+1, P)

    # --- layout: panels of >= ~128 px (nearest upscaling), a title block above. A row with L
    # non-empty regions has L - 1 DSeq steps; columns no shown row uses are dropped (one is kept for
    # the "I-JEPA fallback" note when no row has a DSeq plan).
    S = images.shape[-1]
    scale = max(1, round(128 / S))
    panel, cell, pad, line = S * scale, args.patch_size * scale, 4, 13
    steps = torch.where(dplan.dseq[:m], dplan.n_regions[:m], 0) - 1  # (m,) DSeq steps per row
    n_steps = max(1, int(steps.max()))
    cols = 3 + n_steps + 1
    title_h = 5 * line + 2 * pad  # 4 lines of legend (short enough for the narrowest picture) + heads
    W, H = pad + cols * (panel + pad), title_h + m * (panel + pad) + pad
    canvas = np.full((H, W, 3), 255, np.float32)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1) * 255
    rgb = (images[:m].cpu() * std + mean).clamp(0, 255).permute(0, 2, 3, 1).numpy()  # (m, S, S, 3)
    up = lambda a, s: a.repeat(s, 0).repeat(s, 1)  # (h, w, ...) -> (h*s, w*s, ...) nearest
    labels = []  # (x, y, text) drawn after the pixels

    def place(row, col, pix):
        y, x = title_h + row * (panel + pad), pad + col * (panel + pad)
        canvas[y:y + panel, x:x + panel] = pix
        return x, y

    for b in range(m):
        img = up(rgb[b], scale)  # (panel, panel, 3)
        dim = 0.3 * img + 40  # what is not context: dark, still readable
        reg = regions[b].numpy().reshape(h, w)  # (h, w)
        place(b, 0, img)
        s = sal[b].numpy()
        place(b, 1, up(colormap((s - s.min()) / (s.max() - s.min() + 1e-6)).reshape(h, w, 3), cell))
        x0, y0 = place(b, 2, 0.4 * img + 0.6 * up(region_colours(reg, N), cell))
        for r in np.unique(reg):  # the number at the region's patch nearest its centroid
            rows_, cols_ = np.nonzero(reg == r)
            j = np.argmin((rows_ - rows_.mean()) ** 2 + (cols_ - cols_.mean()) ** 2)
            labels.append((x0 + (cols_[j] + 0.5) * cell, y0 + (rows_[j] + 0.5) * cell, str(r)))
        # DSeq steps: step k has context = levels 1..k tinted blue, target = the next region striped
        # yellow, the rest dark; the panel names the region numbers drawn (bg = the background R_N)
        L = int(dplan.n_regions[b]) if bool(dplan.dseq[b]) else 0
        name = lambda r: f"{r} (bg)" if r in (0, N) else str(r)
        for k in range(1, n_steps + 1):
            if k >= L:
                place(b, 2 + k, np.full_like(img, 235))
                if k == 1:
                    labels.append((x0 + panel + pad + panel / 2, y0 + panel / 2, "< 2 regions:\nI-JEPA fallback"))
                continue
            ctx_p = ((d_ctx[b] >= 1) & (d_ctx[b] <= k)).numpy()  # (P,) context patches at step k
            tgt_p = d_tgt[b, k + 1].numpy()  # (P,) target patches of step k
            ctx, tgt = up(ctx_p.reshape(h, w), cell), up(tgt_p.reshape(h, w), cell)  # (panel, panel) each
            striped = tgt & stripes(tgt.shape)
            pix = np.where(ctx[..., None], 0.45 * img + 0.55 * CONTEXT_TINT,
                           np.where(striped[..., None], 0.4 * img + 0.6 * TARGET_TINT,
                                    np.where(tgt[..., None], img, dim)))
            x, y = place(b, 2 + k, pix)
            rc = ",".join(name(r) for r in np.unique(reg.reshape(-1)[ctx_p]))
            rt = ",".join(name(r) for r in np.unique(reg.reshape(-1)[tgt_p]))
            labels.append((x + panel / 2, y + 8, f"{rc} -> {rt}"))
        # I-JEPA: context tinted, the M target blocks bright and outlined in PALETTE colours (may overlap)
        ctx = up((i_ctx[b] > 0).numpy().reshape(h, w), cell)
        tgt = up(i_tgt[b, 1:].any(0).numpy().reshape(h, w), cell)
        pix = np.where(ctx[..., None], 0.55 * img + 0.45 * CONTEXT_TINT, np.where(tgt[..., None], img, dim))
        for g in range(1, i_tgt.shape[1]):
            border = outline(up(i_tgt[b, g].numpy().reshape(h, w), cell), 2)
            pix = np.where(border[..., None], PALETTE[(g - 1) % len(PALETTE)], pix)
        place(b, cols - 1, pix)

    im = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    overlap = stats["top_region_object_overlap"]
    legend = [f"DSeq-JEPA plans on held-out images: saliency <q, z_j> of block {args.saliency_layer}, "
              f"N = {N} regions (alpha {args.alpha})",
              f"order '{args.region_order}', {args.prediction} prediction"
              + ("" if overlap is None else f"; R_1 overlaps the object in {100 * overlap:.0f}% of {n} images"),
              "DSeq step k: context tinted blue, target striped yellow, rest dark; the panel names the",
              "regions 'context -> target' (bg = background).  I-JEPA: context blue, target blocks outlined"]
    for i, text in enumerate(legend):
        draw.text((pad, pad + i * line), text, fill=(0, 0, 0))
    heads = ["image", "saliency (min-max)", f"regions 1..{N} ({N} = bg)"]
    heads += [f"DSeq step {k}" for k in range(1, n_steps + 1)] + [f"I-JEPA, {args.num_targets} blocks"]
    for c, text in enumerate(heads):
        draw.text((pad + c * (panel + pad), pad + 4 * line), text, fill=(0, 0, 0))
    for x, y, text in labels:
        draw.multiline_text((x, y), text, fill=(0, 0, 0) if "\n" in text else (255, 255, 255), anchor="mm",
                            align="center", stroke_width=0 if "\n" in text else 2, stroke_fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)
    return {"path": path, "size": [W, H], "step_columns": n_steps, **stats}


# ----------------------------------------------------------------------------------------------
# Region statistics: how many ranked regions the extractor finds, and which ablations change a plan

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


def saliency_maps(encoder, loader, args, device, autocast):
    """Raw CLS saliency maps of the whole split: (N, P) fp32 on the CPU, in dataset order."""
    def maps(images):
        with autocast:
            z = encoder.features(images, layers=(args.saliency_layer,))[0]  # (B, P, D)
        return {"A": saliency.saliency_map(z.float(), encoder.cls_token)}  # (B, P)
    return extract(maps, loader, device, "saliency")[0]["A"].cpu()


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
    probe = {}
    if "linear" in evals:
        probe = linear_eval(pool, args, bank_loader, (bank, bank_y), (val, val_y), device, cache)
        for f, r in probe.items():
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
        pic = plan_picture(encoder, args, os.path.join(args.out_dir, f"plans_{name}.png"), device)
        for metric in ("top_region_object_overlap", "top_region_object_precision", "object_area",
                       "ranked_regions_per_image"):
            add("picture", "saliency", metric, pic[metric], images=pic["images"])
        print(f"wrote {pic['path']}")

    # 6. region statistics of the held-out split (the regions eval)
    regions = None
    if "regions" in evals:
        alphas = [float(a) for a in (args.region_alphas or str(args.alpha)).split(",")]
        loader = _eval_loader(args, "val", args.eval_batch_size, device=device)
        A = saliency_maps(encoder, loader, args, device, autocast)  # (N_val, P)
        regions = region_statistics(A, encoder.grid, alphas, args.regions, args.seed)
        for alpha, s in regions.items():
            add("regions", "saliency", "ranked_regions_per_image", s["ranked_mean"], alpha=alpha, images=s["images"])
        add("regions", "saliency", "positional_share", s["positional_share"], images=s["images"])
        print_region_table(regions, args.regions)

    # 7. one JSON file per run, and a table
    report = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "init": init,
              "checkpoint": args.checkpoint,
              "step": ckpt["step"] if ckpt else None,
              "data": {"dataset": args.dataset, "data_path": args.data_path, "bank_split": "train",
                       "eval_split": "val", "img_size": args.img_size},
              "results": results, "probe": probe, "config": vars(args),
              "regions": {str(a): s for a, s in regions.items()} if regions else None}
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
    for f, r in probe.items():
        print(f"linear probe '{f}': chose lr {r['lr']:g} wd {r['wd']:g} of {len(r['grid'])} heads on "
              f"{r['n_holdout']} held-out training images (train top-1 {r['train_top1']:.2f})")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # the message names the data and the fix; a traceback adds nothing
        config.fail(config.data_error_line(e))
