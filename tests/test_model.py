"""model.py: shapes, positions, and the level rule as executable claims.

Each causality test perturbs something a token must NOT see and checks that token's output does
not move, and perturbs something it MUST see and checks that it does (so the test can fail).
"""

import math

import numpy as np
import pytest
import torch

import model
from model import Predictor, VisionTransformer, level_mask, sincos_pos_embed

torch.set_num_threads(1)


def tiny_vit(img=(32, 32), patch=8, dim=32, depth=3, heads=4):
    torch.manual_seed(0)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads).eval()


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The level rule on its own, against a plain-Python reading of the rule (README "levels")


def rule_by_loop(levels, groups, is_target):
    L = len(levels)
    m = np.zeros((L, L), dtype=bool)
    for i in range(L):
        for j in range(L):
            if i == j:
                m[i, j] = True
            elif levels[i] == 0 or levels[j] == 0:
                m[i, j] = False
            elif not is_target[i]:
                m[i, j] = (not is_target[j]) and levels[j] <= levels[i]
            else:
                m[i, j] = ((not is_target[j]) and levels[j] < levels[i]) or (
                    is_target[j] and groups[j] == groups[i])
    return m


def test_level_mask_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        L = int(torch.randint(1, 12, (1,), generator=g))
        levels = torch.randint(0, 4, (3, L), generator=g)
        groups = torch.randint(1, 3, (3, L), generator=g)
        is_target = torch.rand(3, L, generator=g) < 0.5
        got = level_mask(levels, groups, is_target)
        for b in range(3):
            want = rule_by_loop(levels[b].tolist(), groups[b].tolist(), is_target[b].tolist())
            assert np.array_equal(got[b].numpy(), want)


def test_level_mask_ijepa_blocks_do_not_see_each_other():
    # context level 1 (3 tokens), target block 1 (2 tokens), target block 2 (2 tokens)
    levels = torch.tensor([[1, 1, 1, 2, 2, 2, 2]])
    groups = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    is_target = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    m = level_mask(levels, groups, is_target)[0]
    assert m[3, :3].all() and m[3, 3:5].all() and not m[3, 5:].any()  # block 1: context + itself
    assert not m[:3, 3:].any()  # context never sees targets


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_bias_built_once_per_pass_equals_the_bool_mask_in_every_block(amp):
    """The encoder and the predictor turn the level rule's mask into an additive bias once per pass
    (model.attention_bias); blocks fed the bool mask itself (SDPA converting it at every call) give the
    same outputs and the same gradients, to the bit, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([model.Block(32, 4) for _ in range(2)])
    lv = torch.tensor([[1, 1, 2, 2, 3, 0], [1, 2, 2, 3, 3, 3]])  # padding in row 0
    grp, tgt = torch.tensor([[0, 0, 0, 2, 3, 0], [0, 0, 2, 2, 3, 3]]), lv * 0 == 1
    tgt[:, 3:] = True
    mask = level_mask(lv, grp, tgt)  # (2, 6, 6)
    x = torch.randn(2, 6, 32)
    outs = []
    for m in (mask, model.attention_bias(mask)):
        blocks.zero_grad()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            y = x
            for blk in blocks:
                y = blk(y, m)
        y.float().square().sum().backward()
        outs.append([y] + [p.grad.clone() for p in blocks.parameters()])
    assert model.attention_bias(mask).shape == (2, 1, 6, 6)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


# ---------------------------------------------------------------------------------------------
# Shapes and positions


@pytest.mark.parametrize("size", list(model.SIZES))
def test_every_size_factory_builds_and_runs(size):
    width, depth, heads = model.SIZES[size]
    if size in ("large", "huge"):  # build on the meta device: shapes only, no 600M-float init
        with torch.device("meta"):
            enc = model.vit(size, img_size=32, patch_size=16)
        assert enc.blocks[0].attn.qkv.weight.shape == (3 * width, width)
    else:
        enc = model.vit(size, img_size=32, patch_size=16)  # 2 x 2 grid keeps it quick
        with torch.no_grad():
            assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 4, width)
    assert (enc.embed_dim, len(enc.blocks), enc.num_heads) == (width, depth, heads)


def test_standard_sizes_have_the_usual_parameter_counts():
    # ViT-B/16 encoder is ~85.8M parameters without a head (timm/MAE report 86M with CLS+pos)
    n = sum(p.numel() for p in model.vit_base(img_size=224, patch_size=16).parameters())
    assert 85.5e6 < n < 86.5e6


def test_non_square_grid_shapes():
    enc = tiny_vit(img=(32, 48), patch=8)
    assert enc.grid == (4, 6) and enc.num_patches == 24
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = enc(x)
        feats = enc.features(x, layers=(-2, -1))
    assert out.shape == (2, 24, 32)
    assert [f.shape for f in feats] == [(2, 24, 32), (2, 24, 32)]
    assert close(feats[1], out)  # the last block through the final norm is the plain output
    pred = Predictor(enc.grid, embed_dim=32, pred_dim=16, depth=2, num_heads=2)
    idx = torch.arange(10)[None].expand(2, -1)
    p = pred(out[:, :10], idx, torch.ones_like(idx), idx + 10, 2 * torch.ones_like(idx), torch.ones_like(idx))
    assert p.shape == (2, 10, 32)


def test_image_not_divisible_by_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        VisionTransformer(img_size=30, patch_size=8)


def test_positional_table_matches_direct_formula():
    dim, h, w = 16, 3, 5
    table = sincos_pos_embed(dim, (h, w)).numpy()
    assert table.shape == (h * w, dim)
    for p in range(h * w):
        r, c = divmod(p, w)  # raster order
        for k in range(dim // 4):
            om = 10000 ** (-k / (dim // 4))
            want = [math.sin(r * om), math.cos(r * om), math.sin(c * om), math.cos(c * om)]
            got = [table[p, k], table[p, dim // 4 + k], table[p, dim // 2 + k], table[p, 3 * dim // 4 + k]]
            assert np.allclose(got, want, atol=1e-6)


def test_cls_token_is_never_returned():
    enc = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        feats = enc.features(x, layers=(0, -1))
        # Make the CLS token enormous: if it were returned it would dominate some row.
        enc.cls_token.data.fill_(1e3)
        out2 = enc(x)
    assert out.shape[1] == enc.num_patches and all(f.shape[1] == enc.num_patches for f in feats)
    assert not close(out, out2)  # CLS does influence patches (attention) ...
    assert out2.abs().max() < 50  # ... but its own output (LayerNorm'd, huge offset) is not there


# ---------------------------------------------------------------------------------------------
# Causality of the encoder under levels


def perturb_patch(x, patch_index, grid, patch):
    x = x.clone()
    r, c = divmod(patch_index, grid[1])
    x[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 3.0
    return x


def test_level1_outputs_ignore_level2_pixels():
    enc = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    idx = torch.tensor([[0, 5, 6, 9, 12, 15]])
    levels = torch.tensor([[1, 1, 2, 2, 3, 3]])
    with torch.no_grad():
        base = enc(x, idx, levels)
        moved = enc(perturb_patch(x, 9, enc.grid, 8), idx, levels)  # patch 9 is level 2
    assert close(base[:, :2], moved[:, :2])  # level 1 blind to level 2
    assert not close(base[:, 2:], moved[:, 2:])  # levels 2 and 3 do see it


def test_all_level1_equals_plain_encoder_on_kept_tokens():
    """I-JEPA special case: level 1 everywhere = running the ViT on only the kept patches."""
    enc = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    idx = torch.tensor([[1, 3, 4, 8, 10], [0, 2, 7, 11, 15]])
    with torch.no_grad():
        leveled = enc(x, idx, torch.ones_like(idx))
        # Independent path: embed by hand, keep the tokens, run the blocks with no mask at all.
        t = enc.patch_embed(x).flatten(2).transpose(1, 2) + enc.pos_embed  # (B, P, D)
        kept = torch.stack([t[b, idx[b]] for b in range(2)])  # (B, L, D)
        h = torch.cat([enc.cls_token.expand(2, -1, -1), kept], 1)
        for blk in enc.blocks:
            h = blk(h)
        plain = enc.norm(h)[:, 1:]
        unmasked = enc(x, idx)  # levels=None: no mask at all
    assert close(leveled, plain)
    assert close(unmasked, plain)


def test_padding_slots_change_no_real_output():
    enc = tiny_vit()
    pred = Predictor(enc.grid, embed_dim=32, pred_dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(1, 3, 32, 32)
    ci, cl = torch.tensor([[0, 1, 2, 4]]), torch.tensor([[1, 1, 2, 2]])
    ti, tl, tg = torch.tensor([[5, 6, 9]]), torch.tensor([[2, 2, 3]]), torch.tensor([[2, 2, 3]])
    pad = lambda t, v, n: torch.cat([t, torch.full((1, n), v)], 1)
    with torch.no_grad():
        ctx = enc(x, ci, cl)
        out = pred(ctx, ci, cl, ti, tl, tg)
        ctx_p = enc(x, pad(ci, 7, 3), pad(cl, 0, 3))  # padded slots point at a real patch
        out_p = pred(ctx_p, pad(ci, 7, 3), pad(cl, 0, 3), pad(ti, 3, 2), pad(tl, 0, 2), pad(tg, 0, 2))
    assert close(ctx, ctx_p[:, :4])
    assert close(out, out_p[:, :3])
    assert torch.isfinite(out_p).all()


def _padded_batch(R, Lc, Lt, nc, nt, seed):
    """A random plan-like batch on a 4 x 4 grid: rows with nc / nt real context / target tokens first, then padding."""
    g = torch.Generator().manual_seed(seed)
    ci = torch.stack([torch.randperm(16, generator=g)[:Lc] for _ in range(R)])  # (R, Lc)
    ti = torch.stack([torch.randperm(16, generator=g)[:Lt] for _ in range(R)])  # (R, Lt)
    cl = torch.where(torch.arange(Lc) < torch.tensor(nc)[:, None], torch.randint(1, 4, (R, Lc), generator=g), 0)
    tl = torch.where(torch.arange(Lt) < torch.tensor(nt)[:, None], 4, 0)  # (R, Lt), 0 = padding
    tg = torch.where(tl > 0, torch.randint(1, 3, (R, Lt), generator=g), 0)
    return torch.randn(R, 3, 32, 32, generator=g), ci, cl, ti, tl, tg


@pytest.mark.parametrize("fused", [False, True])
def test_packed_tokens_give_the_padded_passes_outputs_and_gradients(monkeypatch, fused):
    """Packed (the CPU's padding-free residual stream) against the padded passes it replaces: every
    real token's output and every parameter's gradient agree up to float order; padding slots come
    out zero. fused: two sub-batches (one without padding or mask, as a ctx_full plan) as ONE pass of
    list arguments. A spy checks that the packed path ran (else the comparison would be vacuous)."""
    torch.manual_seed(1)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    pred = Predictor(enc.grid, embed_dim=32, pred_dim=16, depth=2, num_heads=2)
    parts = [_padded_batch(5, 9, 6, [9, 4, 7, 1, 9], [6, 2, 5, 3, 1], 0)]
    if fused:  # a second sub-batch of other widths whose contexts are full: no levels, no mask
        x, ci, _, ti, tl, tg = _padded_batch(3, 5, 4, [5, 5, 5], [4, 1, 2], 1)
        parts.append((x, ci, torch.ones_like(ci), ti, tl, tg))
    built = []
    init = model.Packed.__init__
    monkeypatch.setattr(model.Packed, "__init__", lambda self, lv: (built.append([l.shape for l in lv]), init(self, lv))[1])

    def run(devices):
        monkeypatch.setattr(model.Packed, "DEVICES", devices)
        enc.zero_grad(), pred.zero_grad()
        if fused:
            ctx = enc([p[0] for p in parts], [p[1] for p in parts], [parts[0][2], None])
            out = pred(ctx, *[[p[i] for p in parts] for i in range(1, 6)])
        else:
            ctx = [enc(*parts[0][:3])]
            out = [pred(ctx[0], *parts[0][1:])]
        loss = sum((o * (p[4] > 0)[..., None]).square().sum() + (c * (p[2] > 0)[..., None]).sum()
                   for o, c, p in zip(out, ctx, parts))
        loss.backward()
        grads = [p.grad.clone() for m in (enc, pred) for p in m.parameters() if p.grad is not None]
        return [c.detach() for c in ctx], [o.detach() for o in out], grads

    ctx_pad, out_pad, g_pad = run(())
    assert built == []
    ctx_pk, out_pk, g_pk = run(("cpu",))
    n = len(parts)
    assert built == [[(5, 10), (3, 6)][:n], [(5, 15), (3, 9)][:n]]  # encoder (CLS + context), predictor: one pass each
    for c_pk, c_pad, o_pk, o_pad, p in zip(ctx_pk, ctx_pad, out_pk, out_pad, parts):
        real_c, real_t = p[2] > 0, p[4] > 0
        assert c_pk.shape == c_pad.shape and o_pk.shape == o_pad.shape
        assert close(c_pk[real_c], c_pad[real_c]) and close(o_pk[real_t], o_pad[real_t])
        assert (c_pk[~real_c] == 0).all()
    assert len(g_pk) == len(g_pad) and all(close(a, b) for a, b in zip(g_pk, g_pad))


# ---------------------------------------------------------------------------------------------
# Causality of the predictor


def test_predictor_target_sees_only_earlier_context_and_own_group():
    torch.manual_seed(0)
    pred = Predictor((4, 4), embed_dim=32, pred_dim=16, depth=3, num_heads=2).eval()
    ci = torch.tensor([[0, 1, 2, 3]])
    cl = torch.tensor([[1, 1, 2, 3]])  # R_1 = {0, 1}, R_2 = {2}, R_3 = {3}
    ti = torch.tensor([[2, 3, 8, 9]])
    tl = torch.tensor([[2, 3, 4, 4]])  # target R_2 (level 2), R_3 (level 3), R_4 (level 4)
    tg = torch.tensor([[2, 3, 4, 4]])
    ctx = torch.randn(1, 4, 32)
    with torch.no_grad():
        base = pred(ctx, ci, cl, ti, tl, tg)
        c2 = ctx.clone(); c2[:, 2] += 1.0  # context of level 2 (= R_2's own encoding)
        moved = pred(c2, ci, cl, ti, tl, tg)
        assert close(base[:, 0], moved[:, 0])  # target R_2 may not see R_2 itself (level < 2 only)
        assert not close(base[:, 1], moved[:, 1])  # target R_3 sees R_2
        ti2 = ti.clone(); ti2[0, 1] = 12  # move the query of group 3 elsewhere
        moved = pred(ctx, ci, cl, ti2, tl, tg)
        assert close(base[:, [0, 2, 3]], moved[:, [0, 2, 3]])  # other groups unaffected
        ti3 = ti.clone(); ti3[0, 3] = 13  # move a query of group 4: its group mate reacts
        moved = pred(ctx, ci, cl, ti3, tl, tg)
        assert not close(base[:, 2], moved[:, 2])
        c1 = ctx.clone(); c1[:, 0] += 1.0  # R_1 is seen by every target
        moved = pred(c1, ci, cl, ti, tl, tg)
        assert not close(base, moved)


def test_predictor_uses_its_mask_token():
    """Official fault 4: their learnable mask token is never used. Ours is the target query."""
    torch.manual_seed(0)
    pred = Predictor((4, 4), embed_dim=32, pred_dim=16, depth=2, num_heads=2)
    ci, cl = torch.tensor([[0, 1]]), torch.tensor([[1, 1]])
    ti, tl, tg = torch.tensor([[5, 6]]), torch.tensor([[2, 2]]), torch.tensor([[1, 1]])
    out = pred(torch.randn(1, 2, 32), ci, cl, ti, tl, tg)
    out.sum().backward()
    assert pred.mask_token.grad is not None and pred.mask_token.grad.abs().sum() > 0


def test_gradients_flow_through_the_whole_encoder():
    enc = tiny_vit()
    idx = torch.tensor([[0, 1, 2]])
    enc(torch.randn(1, 3, 32, 32), idx, torch.tensor([[1, 2, 2]])).sum().backward()
    assert enc.cls_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())


def test_packed_only_for_narrow_networks_on_the_cpu(monkeypatch):
    """The rule model.Packed.wanted states: CPU, width <= MAX_WIDTH (wider nets lost time packed)."""
    x = torch.zeros(1)
    assert model.Packed.wanted(x, model.Packed.MAX_WIDTH) and not model.Packed.wanted(x, model.Packed.MAX_WIDTH + 1)
    monkeypatch.setattr(model.Packed, "DEVICES", ())
    assert not model.Packed.wanted(x, 8)
