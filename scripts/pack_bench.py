"""
Padding vs sub-batches vs packing, for the context encoder and the predictor (issue: every token
does work). A micro-benchmark of the transformer blocks alone, fed the real token layouts of
masking.make_plan on a 14 x 14 grid:

  pad      today's layout: every plan row padded to the widest row, (R, Lmax) tokens, the level
           rule as a boolean SDPA mask (model.level_mask)
  split4   rows sorted by real length, cut into 4 sub-batches, each padded to its own widest row
           (a multiple of 8): the same SDPA blocks, run 4 times
  split8   the same with 8 sub-batches (train.py's default --pack-splits): less padding, more launches
  flex     every real token of every row packed into ONE row, (1, T) tokens (T rounded up to 128),
           the level rule AND "same plan row" as a FlexAttention block mask: no padding at all

Each variant runs forward + backward of the network's blocks (ViT-B/16 context encoder: 12 x 768;
its predictor: 6 x 384) under bf16 autocast; the median over --repeats of CUDA-event timings is
reported with real / computed tokens. Before timing, the packed output is checked against the
padded one (same weights, same tokens): a wrong mask would show here, not as a fast number.

    python scripts/pack_bench.py --json results/gpu/pack_bench.json       # on a GPU
    python scripts/pack_bench.py --dry                                    # tiny CPU run (checks)
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402  (blob_maps: synthetic saliency with 4 ranked regions)
import masking  # noqa: E402
import model  # noqa: E402
import saliency  # noqa: E402


def plan_for(kind, B, grid, gen):
    """A real plan of one step: ijepa (lambda 0), dseq (lambda 1, 4 ranked regions) or mix (0.5)."""
    if kind == "ijepa":
        return masking.make_plan(None, 0.0, gen, grid, batch_size=B, device="cpu")
    A = bench.blob_maps(B, grid, gen)  # (B, P)
    regions, _ = saliency.regions_from_saliency(A, grid, 5, 0.15)  # (B, P)
    return masking.make_plan(regions, 1.0 if kind == "dseq" else 0.5, gen, grid)


def rows_of(plan, net):
    """Per-row token attributes of one network: levels, groups, is_target, each (R, L), 0 = pad."""
    if net == "encoder":
        lv = plan.ctx_lvl
        return lv, torch.zeros_like(lv), torch.zeros_like(lv, dtype=torch.bool)
    lv = torch.cat([plan.ctx_lvl, plan.tgt_lvl], 1)  # (R, Lc + Lt)
    grp = torch.cat([torch.zeros_like(plan.ctx_lvl), plan.tgt_grp], 1)  # (R, Lc + Lt)
    tgt = torch.cat([torch.zeros_like(plan.ctx_lvl, dtype=torch.bool), plan.tgt_lvl > 0], 1)  # (R, Lc + Lt)
    return lv, grp, tgt


def compact(lv, grp, tgt, width):
    """Move each row's real tokens to the front and cut/pad to `width`. Returns (R, width) x 3."""
    order = torch.sort((lv == 0).long(), dim=1, stable=True).indices  # real tokens first
    lv, grp, tgt = (t.gather(1, order) for t in (lv, grp, tgt))  # (R, L) each
    pad = max(0, width - lv.shape[1])
    f = lambda t: torch.nn.functional.pad(t, (0, pad))[:, :width]  # (R, width)
    return f(lv), f(grp), f(tgt)


def round_up(n, m):
    return -(-n // m) * m


def layouts(lv, grp, tgt, splits):
    """Sub-batches [(levels, groups, is_target)] of the padded (splits=1) or split layout."""
    n = (lv > 0).sum(1)  # (R,) real tokens per row
    order = torch.argsort(n)  # shortest rows first
    out = []
    for chunk in order.chunk(splits):
        width = round_up(int(n[chunk].max()), 8)
        out.append(compact(lv[chunk], grp[chunk], tgt[chunk], width))
    return out


def packed(lv, grp, tgt, multiple=128):
    """All real tokens in one row: (T,) levels, groups, is_target, row id (-1 = tail padding)."""
    real = lv > 0  # (R, L)
    row = torch.arange(lv.shape[0])[:, None].expand_as(lv)[real]  # (T_real,)
    T = round_up(row.numel(), multiple)
    pad = lambda t, v: torch.cat([t, t.new_full((T - t.numel(),), v)])  # (T,)
    return pad(lv[real], 0), pad(grp[real], 0), pad(tgt[real], False), pad(row, -1)


def level_rule_mod(lvl, grp, tgt, row):
    """FlexAttention mask_mod of model.level_mask for packed rows: same row AND the level rule."""
    def mask_mod(b, h, q, k):
        ctx_q = ~tgt[k] & (lvl[k] <= lvl[q])
        tgt_q = (~tgt[k] & (lvl[k] < lvl[q])) | (tgt[k] & (grp[q] == grp[k]))
        rule = torch.where(tgt[q], tgt_q, ctx_q) & (lvl[k] > 0) & (lvl[q] > 0)
        return ((row[q] == row[k]) & rule) | (q == k)
    return mask_mod


class FlexBlocks(torch.nn.Module):
    """The same Blocks with attention through flex_attention (the block mask replaces the SDPA mask)."""

    def __init__(self, blocks, flex):
        super().__init__()
        self.blocks, self.flex = blocks, flex

    def forward(self, x, block_mask):
        for blk in self.blocks:
            a = blk.attn
            B, L, C = x.shape
            qkv = a.qkv(blk.norm1(x)).view(B, L, 3, a.num_heads, C // a.num_heads)  # (B, L, 3, H, C/H)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, C/H)
            y = self.flex(q, k, v, block_mask=block_mask)  # (B, H, L, C/H)
            x = x + a.proj(y.transpose(1, 2).reshape(B, L, C))  # (B, L, C)
            x = x + blk.mlp(blk.norm2(x))
        return x


def run_sdpa(blocks, parts, D, device, xs):
    """Forward + backward over the sub-batches; returns the outputs (list of (r, w, D))."""
    ys = []
    for (lv, grp, tgt), x in zip(parts, xs):
        mask = model.level_mask(lv, grp, tgt)  # (r, w, w)
        y = x
        for blk in blocks:
            y = blk(y, mask)
        y.float().square().mean().backward()
        ys.append(y)
    return ys


def timeit(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser("pack_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny widths on the CPU, flex run eagerly (a correctness check)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = flex_attention if device.type == "cpu" else torch.compile(flex_attention)
    nets = {"encoder": (768, 12, 12), "predictor": (384, 6, 12)}  # width, depth, heads (ViT-B/16 + its predictor)
    if args.dry:
        nets = {"encoder": (32, 2, 2), "predictor": (32, 2, 2)}
        args.batch_sizes, args.repeats, args.warmup = [4], 1, 0
    grid, gen = (14, 14), torch.Generator().manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    for B in args.batch_sizes:
        for kind in ("ijepa", "dseq", "mix"):
            plan = plan_for(kind, B, grid, gen)
            for net, (D, depth, heads) in nets.items():
                torch.manual_seed(0)
                blocks = torch.nn.ModuleList(model.Block(D, heads) for _ in range(depth)).to(device)
                lv, grp, tgt = rows_of(plan, net)
                real = int((lv > 0).sum())
                rec = {"batch": B, "plan": kind, "net": net, "rows": lv.shape[0], "real_tokens": real}
                for name, splits in (("pad", 1), ("split4", 4), ("split8", 8)):
                    parts = [tuple(t.to(device) for t in part) for part in layouts(lv, grp, tgt, splits)]
                    xs = [torch.randn(*part[0].shape, D, device=device, requires_grad=True) for part in parts]
                    computed = sum(part[0].numel() for part in parts)
                    with amp:
                        ms = timeit(lambda: run_sdpa(blocks, parts, D, device, xs), device, args.repeats, args.warmup)
                    rec[name] = {"ms": round(ms, 3), "computed_tokens": computed, "waste": round(1 - real / computed, 3)}
                # Packed: one row, flex block mask (built every step, as a training step would).
                plv, pgrp, ptgt, prow = (t.to(device) for t in packed(lv, grp, tgt))
                T = plv.numel()
                grad = device.type == "cuda"  # FlexAttention has no backward on the CPU: --dry checks forward
                x = torch.randn(1, T, D, device=device, requires_grad=grad)
                fb = FlexBlocks(blocks, flex)

                # One mask_mod closure and one block mask per layout: a new closure every call would
                # make torch.compile recompile flex_attention every step (the first GPU run timed out so).
                mod = level_rule_mod(plv, pgrp, ptgt, prow)
                t0 = time.perf_counter()
                bm = create_block_mask(mod, None, None, T, T, device=device.type)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                mask_ms = 1e3 * (time.perf_counter() - t0)  # built once per plan in a training step

                def flex_step():
                    with torch.set_grad_enabled(grad):
                        y = fb(x, bm)
                    if grad:
                        y.float().square().mean().backward()
                    return y
                with amp:
                    ms = timeit(flex_step, device, args.repeats, args.warmup)
                    # Correctness: the packed output equals the padded output token for token.
                    width = round_up(int((lv > 0).sum(1).max()), 8)  # rows in plan order, as packed
                    pad_parts = [tuple(t.to(device) for t in compact(lv, grp, tgt, width))]
                    xp = torch.zeros(*pad_parts[0][0].shape, D, device=device)
                    sel = pad_parts[0][0] > 0  # (R, Lmax) real tokens, in the same (row, order) as packed
                    xp[sel] = x.detach()[0, :real]
                    yp = run_sdpa(blocks, pad_parts, D, device, [xp.requires_grad_()])[0]
                    yf = flex_step()
                    err = (yp[sel].float() - yf[0, :real].float()).abs().max().item()
                    scale = yp[sel].float().abs().max().item()
                rec["flex"] = {"ms": round(ms, 3), "mask_ms": round(mask_ms, 2), "computed_tokens": T, "waste": round(1 - real / T, 3),
                               "max_abs_err_vs_pad": err, "max_abs_out": scale}
                rows.append(rec)
                print(f"B={B:4d} {kind:6s} {net:9s} real {real:6d} | pad {rec['pad']['ms']:8.2f} ms waste "
                      f"{rec['pad']['waste']:.2f} | split4 {rec['split4']['ms']:8.2f} ms waste {rec['split4']['waste']:.2f} "
                      f"| split8 {rec['split8']['ms']:8.2f} ms waste {rec['split8']['waste']:.2f} "
                      f"| flex {ms:8.2f} ms (+ mask {mask_ms:.1f}) waste {rec['flex']['waste']:.2f} err {err:.2e}/{scale:.1e}", flush=True)
                if err > 0.05 * max(scale, 1.0):
                    sys.exit(f"error: packed flex output differs from the padded output ({err:.3g})")
    out = {"command": "python scripts/pack_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
