"""
The networks of DSeq-JEPA (and I-JEPA): a ViT encoder and a narrow ViT predictor, both driven by
one attention rule over token *levels*.

Reading guide (DSeq-JEPA, arXiv 2511.17354; I-JEPA, arXiv 2301.08243):
  - context encoder f  = VisionTransformer, trained, sees only context patches
  - target encoder f_bar = an EMA copy of f (train.py), sees the whole image
  - predictor g        = Predictor, maps context outputs + positional mask tokens to predictions
  - level_mask         = the one rule that turns a plan (masking.py) into attention masks

The level rule. Every token has a level (1, 2, ...; 0 = padding) and targets a group:
  - a context token of level l attends to context tokens of level <= l   (block-causal, GPT-style)
  - a target token of level l, group g attends to context tokens of level < l
    and to target tokens of its own group g
I-JEPA is "context = level 1, target block m = level 2 / group m". DSeq-JEPA's Eq. 5,
s_{R_{k+1}} = g(p_{R_{k+1}}, h_{R_1}, ..., h_{R_k}), is "region R_k = context level k and
target level k / group k", which gives every step of the sequence in ONE encoder + ONE predictor
pass. The encoder never needs to know which method is running.

Notation in comments: B batch (or plan rows), P = h*w patches, L tokens in a sequence,
D encoder width, Dp predictor width, H heads.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# The level rule


def level_mask(levels, groups, is_target):
    """Boolean self-attention mask of the level rule.

    levels:    (B, L) int64, level >= 1 of each token, 0 = padding
    groups:    (B, L) int64, group of each target token (ignored for context tokens)
    is_target: (B, L) bool, True for target (mask) tokens, False for context tokens
    returns:   (B, L, L) bool, [b, i, j] True = token i may attend to token j

    Padding keys are never attended to. A padding query attends only to itself, so that no row
    of the softmax is empty (an all-False row would give NaN); its output is never read.
    """
    lq, lk = levels[:, :, None], levels[:, None, :]  # (B, L, 1), (B, 1, L)
    tq, tk = is_target[:, :, None], is_target[:, None, :]  # (B, L, 1), (B, 1, L)
    same_group = groups[:, :, None] == groups[:, None, :]  # (B, L, L)
    context_query = ~tk & (lk <= lq)  # context sees context of its own or earlier levels
    target_query = (~tk & (lk < lq)) | (tk & same_group)  # target sees earlier context + own group
    allowed = torch.where(tq, target_query, context_query) & (lk > 0) & (lq > 0)  # (B, L, L)
    eye = torch.eye(levels.shape[1], dtype=torch.bool, device=levels.device)  # (L, L)
    return allowed | eye


def attention_bias(mask):
    """mask (B, L, L) bool from level_mask -> (B, 1, L, L) fp32 additive bias: 0 where allowed, -inf
    elsewhere, broadcast over heads. This is what scaled_dot_product_attention makes of a bool mask,
    at every call, i.e. in every block; a pass builds it once here for all its blocks (Attention casts
    it to the queries' dtype, exact for 0 and -inf), so the outputs are the same bits."""
    bias = torch.zeros(mask.shape[0], 1, *mask.shape[1:], device=mask.device)  # (B, 1, L, L)
    return bias.masked_fill_(~mask[:, None], float("-inf"))


# ----------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos positional embedding


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positional table, (P, dim) float32, P = h*w in raster order.

    The first dim/2 channels encode the patch row, the last dim/2 the column; each half is
    [sin(pos * omega_k), cos(pos * omega_k)] with omega_k = 1 / 10000^(k / (dim/4)), k < dim/4.
    Works for any grid h x w (not only square). dim must be divisible by 4.
    """
    h, w = grid
    if dim % 4 != 0:
        raise ValueError(f"embedding width {dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each

    def encode(pos):  # (P,) -> (P, dim/2)
        angles = pos[:, None] * omega[None, :]  # (P, dim/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(rows.reshape(-1)), encode(cols.reshape(-1))], axis=1)  # (P, dim)
    return torch.from_numpy(table).float()


# ----------------------------------------------------------------------------------------------
# Transformer parts


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, packed=None):
        """x: (B, L, C); mask: (B, L, L) bool, its attention_bias (B, 1, L, L) (what the encoder and
        the predictor pass: built once per pass), or None (everything attends to everything).
        packed: None, or a Packed: then x is (T, C), the real tokens of all its segments one after
        the other, and mask is a list, one bias (or None) per segment; each segment is laid out as its
        own (B, L) batch for the attention alone and the result comes back packed, (T, C).

        mask=None is the fast path: without a mask, scaled_dot_product_attention may take the
        flash kernel on a GPU. The target encoder's full-image pass and evaluation always run it,
        the context encoder when its plan is one level without padding (masking.Plan.ctx_full);
        the predictor always needs the level rule (context never sees targets)."""
        qkv = self.qkv(x)  # (B, L, 3C), or (T, 3C) packed
        if packed is None:
            return self.proj(self._attend(qkv, mask))
        parts = [self._attend(packed.unpack(q, s), m) for s, (q, m) in enumerate(zip(packed.split(qkv), mask))]
        return self.proj(torch.cat([packed.pack(y, s) for s, y in enumerate(parts)]))  # (T, C)

    def _attend(self, qkv, mask):
        """qkv (B, L, 3C), mask: a bias (B, 1, L, L), a bool (B, L, L) or None -> (B, L, C)."""
        B, L, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, C/H)
        if mask is not None:  # (B, 1, L, L), broadcast over heads
            mask = mask[:, None] if mask.dtype == torch.bool else mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, C/H)
        return y.transpose(1, 2).reshape(B, L, C)  # (B, L, C)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, mask=None, packed=None):
        """x: (B, L, C), or (T, C) packed (Attention); everything but the attention is per token."""
        x = x + self.attn(self.norm1(x), mask, packed)
        return x + self.mlp(self.norm2(x))


class Packed:
    """Padding-free layout of one or more padded batches (segments, e.g. a plan's sub-batches) for ONE
    pass: the residual stream holds only their T real tokens, (T, C), so every per-token op
    (LayerNorm, the qkv / proj / MLP matmuls, GELU) runs once over all of them and computes no
    padding; only the attention sees each segment's own (B_s, L_s) layout (Attention).

    Why: on a CPU a small model's step is bound by the number of ops more than by FLOPs (the demo:
    ~1.1k aten ops forward and ~1.9k backward per pass of both networks, whatever its rows), so
    the sub-batches that save padding cost a pass each; packed, they cost one pass plus a few ops per
    segment and block. Used in eager mode on a CPU only: torch.compile wants static shapes, and T
    is known only after a host sync (nonzero), the one thing a GPU step avoids. Real tokens' outputs
    are those of the padded passes up to the order of float sums (tests/test_model.py); padding
    slots come out as zeros."""

    DEVICES = ("cpu",)
    # Widest network that packs. A wider one is bound by FLOPs, not ops, and the copies packing adds
    # (each segment's (B_s * L_s, 3C) layout for the attention, and back) cost more than the padding and
    # passes saved. Side A/B runs, interleaved in one process on the 2-core CPU (docs/performance.md): the
    # demo (width 96, predictor 64) 1.29 vs 1.37 x its tokens packed vs not, ViT-T/16 at 224 px (width 192) 1.29 vs 1.19.
    MAX_WIDTH = 128

    @staticmethod
    def wanted(x, width):
        """Pack passes of a network `width` wide on x's device? (never while torch.compile traces)"""
        return x.device.type in Packed.DEVICES and width <= Packed.MAX_WIDTH and not torch.compiler.is_compiling()

    def __init__(self, levels):
        """levels: list of (B_s, L_s) int64, one per segment, 0 = padding."""
        self.shapes = [lv.shape for lv in levels]
        # (T_s,) flat positions of segment s's real tokens; None = no padding (take all, no copy)
        self.keep = [None if bool((lv > 0).all()) else lv.flatten().nonzero().squeeze(1) for lv in levels]
        self.counts = [lv.numel() if k is None else len(k) for lv, k in zip(levels, self.keep)]

    def pack(self, x, s):
        """Segment s's (B_s, L_s, C) -> (T_s, C) real tokens."""
        return x.flatten(0, 1) if self.keep[s] is None else x.flatten(0, 1)[self.keep[s]]

    def unpack(self, x, s):
        """Segment s's (T_s, C) -> (B_s, L_s, C), zeros at its padding slots."""
        B, L = self.shapes[s]
        if self.keep[s] is None:
            return x.view(B, L, -1)
        return x.new_zeros(B * L, x.shape[-1]).index_copy(0, self.keep[s], x).view(B, L, -1)

    def split(self, x):
        """(T, C) -> the segments' (T_s, C) pieces."""
        return x.split(self.counts)

    def run(self, blocks, norm, xs, masks):
        """xs: list of (B_s, L_s, C) padded inputs, masks: their attention biases -> list of
        (B_s, L_s, C) = norm(blocks(x)) per segment, computed as one packed pass."""
        t = torch.cat([self.pack(x, s) for s, x in enumerate(xs)])  # (T, C)
        for block in blocks:
            t = block(t, masks, self)
        return [self.unpack(y, s) for s, y in enumerate(self.split(norm(t)))]


def init_weights(module, blocks):
    """I-JEPA-style init: trunc-normal(0.02) weights, zero biases, unit LayerNorms, and every
    residual output projection scaled by 1/sqrt(2 * layer) so deep stacks start near identity."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for layer, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


# ----------------------------------------------------------------------------------------------
# Encoder (context encoder f and target encoder f_bar)


class VisionTransformer(nn.Module):
    """ViT encoder with a learnable [CLS] token whose only job is to define saliency.

    img_size, patch_size: int or (H, W); the grid is (H / patch, W / patch) = (h, w).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, patch_init_std=0.02):
        super().__init__()
        (H, W), (ph, pw) = _pair(img_size), _pair(patch_size)
        if H % ph or W % pw:
            raise ValueError(f"image size {(H, W)} is not divisible by the patch size {(ph, pw)}")
        self.grid = (H // ph, W // pw)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        # --- patch embedding: one linear map per non-overlapping patch, written as a strided conv
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=(ph, pw), stride=(ph, pw))
        # --- fixed positions (not learned, as I-JEPA); the CLS token gets none
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid)[None], persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # --- transformer
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self, self.blocks)
        # The patch embedding's init sets how much of a token is image content at step 0: the
        # sin-cos positions have unit size, and at std 0.02 a 4 x 4 x 3 patch adds only ~0.1 of
        # that, so a tiny run's targets start as (and tend to stay) positions only, which the
        # predictor can regress without looking at the image. The demo preset uses 0.2 (docs/learning.md).
        # (a rescale of init_weights' trunc-normal(0.02) draw: the same distribution, and no extra
        # random numbers, so the default 0.02 initialises bit for bit as before)
        self.patch_embed.weight.data.mul_(patch_init_std / 0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, x, idx=None):
        """Patch tokens with positions, optionally only those at idx; CLS prepended.

        x: (B, 3, H, W); idx: (B, L) patch indices or None (all P)
        returns (B, 1 + L, D)
        """
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, D)
        t = t + self.pos_embed
        if idx is not None:  # token dropping: the context encoder only sees context patches
            t = t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # (B, L, D)
        cls = self.cls_token.expand(t.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, t], dim=1)  # (B, 1 + L, D)

    def forward(self, x, idx=None, levels=None):
        """Context encoder pass.

        x: (B, 3, H, W) images; idx: (B, L) context patch indices (None = all patches);
        levels: (B, L) levels of those tokens under the level rule, 0 = padding (None = everything
        visible to everything, the plain ViT).
        returns (B, L, D) patch outputs after the final LayerNorm, CLS stripped.
        Sub-batches in one pass: x, idx and levels lists (one entry per sub-batch; a levels entry
        None = no mask, no padding) -> a list of outputs (Packed; on a GPU one padded pass each).
        """
        if isinstance(x, (list, tuple)):
            return self._forward_parts(x, idx, levels)
        t, lv, mask = self._tokens(x, idx, levels)  # (B, 1 + L, D), (B, 1 + L), bias
        if lv is not None and Packed.wanted(lv, self.embed_dim):  # only the real tokens go through the blocks
            return Packed([lv]).run(self.blocks, self.norm, [t], [mask])[0][:, 1:]  # (B, L, D), zeros at padding
        for block in self.blocks:
            t = block(t, mask)
        return self.norm(t)[:, 1:]  # (B, L, D)

    def _tokens(self, x, idx, levels):
        """A pass's inputs: tokens (B, 1 + L, D), their levels with CLS (B, 1 + L) or None, and the
        level rule's attention bias (B, 1, 1 + L, 1 + L) or None (levels None: no mask)."""
        t = self.embed(x, idx)  # (B, 1 + L, D)
        if levels is None:
            return t, None, None
        # CLS is a level-1 context token: later regions cannot leak into level 1 through it.
        lv = torch.cat([torch.ones_like(levels[:, :1]), levels], dim=1)  # (B, 1 + L)
        no_group = torch.zeros_like(lv)
        mask = level_mask(lv, no_group, torch.zeros_like(lv, dtype=torch.bool))  # (B, 1+L, 1+L)
        return t, lv, attention_bias(mask)  # (B, 1, 1+L, 1+L), once for every block

    def _forward_parts(self, xs, idxs, levels):
        if not Packed.wanted(xs[0], self.embed_dim):
            return [self(x, i, lv) for x, i, lv in zip(xs, idxs, levels)]
        ts, lvs, masks = zip(*(self._tokens(x, i, lv) for x, i, lv in zip(xs, idxs, levels)))
        lvs = [torch.ones(t.shape[:2], dtype=torch.long, device=t.device) if lv is None else lv for t, lv in zip(ts, lvs)]
        return [y[:, 1:] for y in Packed(lvs).run(self.blocks, self.norm, ts, masks)]  # each (B_s, L_s, D)

    def features(self, x, layers=(-1,)):
        """Full-image outputs of chosen blocks, each passed through the final LayerNorm.

        Used by the target encoder (block -2 for saliency, -1 for the regression targets) and by
        evaluation ("last" and "concat of the last 4").
        x: (B, 3, H, W); layers: block indices (negative counts from the end)
        returns list of (B, P, D), CLS stripped, in the order of `layers`
        """
        wanted = [l % self.depth for l in layers]
        t, out = self.embed(x), {}  # (B, 1 + P, D)
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            t = block(t)
            if i in wanted:
                out[i] = self.norm(t)[:, 1:]  # (B, P, D)
        return [out[i] for i in wanted]


# ----------------------------------------------------------------------------------------------
# Predictor g


class Predictor(nn.Module):
    """Narrow ViT that predicts target-encoder features at target positions.

    Context encodings are projected to the predictor width and given their positions; each target
    token is the ONE learnable mask token plus the position of the patch it must predict. Both run
    through the blocks together under the level rule, so each target sees exactly the context its
    plan allows (and the other tokens of its own group, never other groups).
    """

    def __init__(self, grid, embed_dim=768, pred_dim=384, depth=6, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        self.embed_dim, self.pred_dim = embed_dim, pred_dim
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(pred_dim, tuple(grid))[None], persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.blocks = nn.ModuleList([Block(pred_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        init_weights(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, ctx_idx, ctx_lvl, tgt_idx, tgt_lvl, tgt_grp):
        """
        ctx: (R, Lc, D) context-encoder outputs; ctx_idx, ctx_lvl: (R, Lc) their patch indices
        and levels; tgt_idx, tgt_lvl, tgt_grp: (R, Lt) target patch indices, levels, groups
        (level 0 = padding, as everywhere).
        returns (R, Lt, D) one prediction per target token.
        Sub-batches in one pass: every argument a list (one entry per sub-batch) -> a list of
        predictions (Packed; on a GPU one padded pass each).
        """
        if isinstance(ctx, (list, tuple)):
            args = list(zip(ctx, ctx_idx, ctx_lvl, tgt_idx, tgt_lvl, tgt_grp))
            if not Packed.wanted(ctx[0], self.pred_dim):
                return [self(*a) for a in args]
            xs, levels, masks = zip(*(self._tokens(*a) for a in args))
            outs = Packed(levels).run(self.blocks, self.norm, xs, masks)  # each (R_s, Lc_s + Lt_s, Dp)
            return [self.predictor_proj(y[:, a[1].shape[1]:]) for y, a in zip(outs, args)]  # each (R_s, Lt_s, D)
        x, levels, mask = self._tokens(ctx, ctx_idx, ctx_lvl, tgt_idx, tgt_lvl, tgt_grp)
        Lc = ctx_idx.shape[1]
        if Packed.wanted(levels, self.pred_dim):  # only the real tokens go through the blocks (Packed)
            return self.predictor_proj(Packed([levels]).run(self.blocks, self.norm, [x], [mask])[0][:, Lc:])  # (R, Lt, D)
        for block in self.blocks:
            x = block(x, mask)
        return self.predictor_proj(self.norm(x[:, Lc:]))  # (R, Lt, D)

    def _tokens(self, ctx, ctx_idx, ctx_lvl, tgt_idx, tgt_lvl, tgt_grp):
        """A pass's inputs: tokens (R, Lc + Lt, Dp), their levels (R, Lc + Lt), the level rule's bias."""
        pos = self.pos_embed[0]  # (P, Dp)
        c = self.predictor_embed(ctx) + pos[ctx_idx]  # (R, Lc, Dp)
        t = self.mask_token + pos[tgt_idx]  # (R, Lt, Dp)
        x = torch.cat([c, t], dim=1)  # (R, Lc + Lt, Dp)
        levels = torch.cat([ctx_lvl, tgt_lvl], dim=1)  # (R, Lc + Lt)
        groups = torch.cat([torch.zeros_like(ctx_lvl), tgt_grp], dim=1)  # (R, Lc + Lt)
        is_target = torch.cat([torch.zeros_like(ctx_lvl, dtype=torch.bool),
                               torch.ones_like(tgt_lvl, dtype=torch.bool)], dim=1)  # (R, Lc + Lt)
        return x, levels, attention_bias(level_mask(levels, groups, is_target))  # bias (R, 1, Lc + Lt, Lc + Lt)


# ----------------------------------------------------------------------------------------------
# Sizes. Standard ViT shapes (width, depth, heads); micro is ours, for CPU tests and the demo.

SIZES = {
    "micro": (96, 6, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def vit(size, **kwargs):
    """Encoder of a named size, e.g. vit("base", img_size=224, patch_size=16)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    width, depth, heads = SIZES[size]
    return VisionTransformer(embed_dim=width, depth=depth, num_heads=heads, **kwargs)


def vit_micro(**kw): return vit("micro", **kw)
def vit_tiny(**kw): return vit("tiny", **kw)
def vit_small(**kw): return vit("small", **kw)
def vit_base(**kw): return vit("base", **kw)
def vit_large(**kw): return vit("large", **kw)
def vit_huge(**kw): return vit("huge", **kw)


def predictor_for(encoder, pred_dim=384, depth=6, num_heads=None):
    """Predictor matched to an encoder's grid and width; heads default to the encoder's (I-JEPA)."""
    num_heads = num_heads or encoder.num_heads
    return Predictor(encoder.grid, encoder.embed_dim, pred_dim, depth, num_heads)
