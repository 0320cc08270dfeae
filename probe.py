"""
The linear probe's machinery: a GRID of heads (--probe-lr x --probe-wd) trained in one pass over each
batch, each chosen on a stratified share of TRAIN held out from it, never on the test split. The
protocol that uses it (hold out, cache or stream, whiten, choose, test) is evaluate.linear_eval.

    head    : BatchNorm1d(affine=False) + Linear per feature kind (the paper's, after I-JEPA / MAE)
    SGD     : momentum 0.9 Nesterov per head (the official probe ran WITHOUT momentum, fault 6),
              lr x batch / 256, x0.1 at epochs 8 / 16 / 24 of 28
    holdout : holdout_split, stratified and seeded; the first best head in grid order wins
    whiten  : PCA-whitening of cached features (frozen ViT features are so ill-conditioned that SGD
              stays far from the optimum); the same family of linear classifiers
    crops   : probe_loader, RandomResizedCrop (0.08, 1) + flip with --probe-aug (bilinear; the
              official probe uses bicubic), else the eval crop

Imports the bottom layer only (data), so evaluate.py reads the protocol and this file the mechanics.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

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
    memory (batched crops, as evaluate.py's eval loader)."""
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
