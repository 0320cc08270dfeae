"""I-JEPA predictor attention: ours (one shared stream per image) vs the official per-block rows.

Official I-JEPA runs the predictor once per target block: the context tokens and that block's
mask tokens attend to each other fully. Here one row per image holds the context and all M blocks,
context tokens attend only to context (the level rule). This script trains `--method ijepa` with
either predictor; 'per-block' repeats the context encodings per block (the encoder still runs once,
as in the official code) and lets every real token attend to every real token of its row.
    PYTHONPATH=. python results/ijepa-predictor/compare.py shared|per-block [train.py flags]
"""
import sys
import time

import torch
import torch.nn.functional as F

import model as vit
import train

mode, argv = sys.argv[1], sys.argv[2:]
assert mode in ("shared", "per-block")


def full_mask(levels, groups, is_target):
    """(B, L, L): every real token attends to every real token (official I-JEPA predictor rows)."""
    real = levels > 0  # (B, L)
    eye = torch.eye(levels.shape[1], dtype=torch.bool, device=levels.device)
    return (real[:, :, None] & real[:, None, :]) | eye


def per_block_loss(encoder, predictor, images, targets, plan):
    """I-JEPA plans only (context level 1, block m = level 2 group m, every block the same size)."""
    ctx = encoder(images, plan.ctx_idx, plan.ctx_lvl)  # (B, Lc, D); context level 1: full attention
    B, M = plan.tgt_idx.shape[0], int(plan.tgt_grp.max())
    n = (plan.tgt_lvl > 0).sum(1)  # (B,) real target tokens = M * T per row
    T = int(n[0]) // M
    assert bool((n == M * T).all()), "per-block rows need equal block sizes (no fallback rows)"
    idx = plan.tgt_idx[:, :M * T].reshape(B * M, T)  # (B*M, T) tokens sorted by group
    ones = torch.ones_like(idx)
    rep = lambda t: t.repeat_interleave(M, 0)  # (B, ...) -> (B*M, ...)
    saved = vit.level_mask
    vit.level_mask = full_mask
    try:
        pred = predictor(rep(ctx), rep(plan.ctx_idx), rep(plan.ctx_lvl), idx, 2 * ones, ones)  # (B*M, T, D)
    finally:
        vit.level_mask = saved
    tgt = rep(targets).gather(1, idx[..., None].expand(-1, -1, targets.shape[-1]))  # (B*M, T, D)
    return F.smooth_l1_loss(pred.float(), tgt, beta=1.0)


if mode == "per-block":
    train.jepa_loss = per_block_loss
t = time.time()
train.main(["--method", "ijepa"] + argv)
print(f"{mode}: wall {time.time() - t:.1f} s")
