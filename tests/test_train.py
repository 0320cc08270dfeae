"""train.py: the step, schedules, EMA, resume, preemption, DDP and config errors, on the CPU."""

import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import config
import evaluate
import masking
import plumbing
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny but complete configuration: synthetic data, micro ViT at 16 px / patch 4 (4 x 4 grid).
TINY = ["--img-size", "16", "--patch-size", "4", "--model", "micro", "--pred-dim", "32", "--pred-depth", "2",
        "--batch-size", "16", "--num-train", "160", "--num-val", "64", "--num-workers", "0", "--epochs", "2",
        "--warmup-epochs", "1", "--knn-every", "0", "--no-picture", "--device", "cpu", "--log-every", "1",
        "--alpha", "0.1"]


def run(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    step = train.main(TINY + ["--out-dir", out, *extra])
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return out, step, [r for r in rows if "loss" in r]


def weights(path):
    return torch.load(os.path.join(path, "checkpoint.pt"), weights_only=False)


# ---------------------------------------------------------------------------------------------
# Smoke runs: every method trains, the loss falls, nothing is NaN.


@pytest.mark.parametrize("method", [["--method", "ijepa"], ["--dseq-pass", "causal"], ["--dseq-pass", "replicate"]])
def test_twenty_steps_loss_falls(tmp_path, method):
    out, step, rows = run(tmp_path, *method, "--lr", "2e-3", "--start-lr", "2e-3")
    assert step == 20 and len(rows) == 20
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(l) for l in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # falls
    assert os.path.exists(os.path.join(out, "checkpoint.pt")) and os.path.exists(os.path.join(out, "config.json"))
    for key in ("lr", "wd", "ema", "lambda", "dseq_share", "regions_per_image", "context_tokens",
                "target_tokens", "target_std", "step_time", "peak_mem_mb"):
        assert key in rows[-1]
    if method[1] == "ijepa":
        assert all(r["dseq_share"] == 0 for r in rows)
    else:  # lambda rises, so later steps use discriminative plans when regions allow
        assert rows[-1]["lambda"] > 0.9 and "ranked_regions" in rows[-1]


# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of the step, at known points


def test_schedules_at_known_steps():
    args = config.parse_args(["--lr", "1e-3", "--start-lr", "1e-4", "--final-lr", "1e-6"])
    total, warmup = 1000, 100
    assert train.lr_at(0, args, total, warmup) == pytest.approx(1e-4)
    assert train.lr_at(50, args, total, warmup) == pytest.approx(5.5e-4)
    assert train.lr_at(100, args, total, warmup) == pytest.approx(1e-3)
    assert train.lr_at(550, args, total, warmup) == pytest.approx((1e-3 + 1e-6) / 2)  # cosine midpoint
    assert train.lr_at(1000, args, total, warmup) == pytest.approx(1e-6)
    assert train.wd_at(0, args, total) == pytest.approx(0.04)
    assert train.wd_at(500, args, total) == pytest.approx(0.22)
    assert train.wd_at(1000, args, total) == pytest.approx(0.4)
    assert train.ema_at(0, args, total) == pytest.approx(0.996)
    assert train.ema_at(500, args, total) == pytest.approx(0.998)
    assert train.ema_at(1000, args, total) == pytest.approx(1.0)
    assert train.lambda_at(250, args, total) == pytest.approx(0.25)
    ij = config.parse_args(["--method", "ijepa"])
    assert train.lambda_at(999, ij, total) == 0.0


def test_ema_step_equals_hand_computation():
    tgt, src = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        tgt.weight.copy_(torch.tensor([[1.0, -2.0]])); tgt.bias.fill_(0.5)
        src.weight.copy_(torch.tensor([[3.0, 4.0]])); src.bias.fill_(-1.5)
    train.ema_update(tgt, src, 0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2 ; 0.9 * -2 + 0.1 * 4 = -1.4 ; 0.9 * 0.5 + 0.1 * -1.5 = 0.3
    assert torch.allclose(tgt.weight, torch.tensor([[1.2, -1.4]]))
    assert torch.allclose(tgt.bias, torch.tensor([0.3]))


def test_ema_update_is_the_per_parameter_loop_bit_for_bit():
    """Step 7 in two foreach calls over all parameters is f_bar <- m f_bar + (1 - m) f written one parameter
    at a time, to the bit, on a micro ViT (every parameter shape of the real encoder)."""
    args = config.parse_args(TINY)
    enc, _, tgt = train.build_models(args)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p))  # the two encoders differ everywhere
    loop = [t.detach().clone().mul_(0.996).add_(p, alpha=1.0 - 0.996) for t, p in zip(tgt.parameters(), enc.parameters())]
    train.ema_update(tgt, enc, 0.996)
    assert all(torch.equal(t, want) for t, want in zip(tgt.parameters(), loop))
    assert not any(t.requires_grad for t in tgt.parameters())


def test_foreach_adamw_is_the_for_loop_adamw_bit_for_bit():
    """make_optimizer's AdamW runs foreach (a few calls over all tensors instead of a Python loop over each,
    CPU's default): weights and moments after steps with changing lr and weight decay are the for-loop's bits."""
    args = config.parse_args(TINY)
    torch.manual_seed(0)
    a = train.build_models(args)[:2]
    torch.manual_seed(0)
    b = train.build_models(args)[:2]
    fast = train.make_optimizer(*a, args)
    slow = train.make_optimizer(*b, args)
    for group in slow.param_groups:
        group["foreach"] = False  # the per-tensor loop
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) for m in a for p in m.parameters()]
        for opt, models in ((fast, a), (slow, b)):
            for p, grad in zip((p for m in models for p in m.parameters()), grads):
                p.grad = grad.clone()
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (step + 1)
            opt.param_groups[0]["weight_decay"] = 0.04 + 0.1 * step
            opt.step()
    assert fast.param_groups[0]["foreach"] is True
    pa, pb = ([p for m in models for p in m.parameters()] for models in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    for x, y in zip(pa, pb):
        assert all(torch.equal(fast.state[x][k], slow.state[y][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_no_weight_decay_on_biases_and_norms():
    args = config.parse_args(TINY)
    enc, pred, _ = train.build_models(args)
    opt = train.make_optimizer(enc, pred, args)
    decay, no_decay = opt.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    norm_w = enc.norm.weight
    assert any(p is norm_w for p in no_decay["params"]) and no_decay["weight_decay"] == 0


def test_loss_ignores_padding_and_matches_a_plain_mean():
    args = config.parse_args(TINY)
    enc, pred, _ = train.build_models(args)
    g = torch.Generator().manual_seed(0)
    ctx, tgts = masking.sample_multiblock(2, enc.grid, g, "cpu")
    plan = masking.ijepa_plan(ctx, tgts, pad_multiple=16)
    images, targets = torch.randn(2, 3, 16, 16), torch.randn(2, 16, enc.embed_dim)
    loss = train.jepa_loss(enc, pred, images, targets, plan)
    p = pred(enc(images, plan.ctx_idx, plan.ctx_lvl), plan.ctx_idx, plan.ctx_lvl, plan.tgt_idx, plan.tgt_lvl, plan.tgt_grp)
    terms = [torch.nn.functional.smooth_l1_loss(p[b, t], targets[b, plan.tgt_idx[b, t]])
             for b in range(2) for t in range(plan.tgt_idx.shape[1]) if plan.tgt_lvl[b, t] > 0]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)


def _step_grads(args, split, lam, seed=0):
    """Loss and every gradient of one train_step (fp32, CPU) with --pack-splits `split`."""
    torch.manual_seed(0)
    models = train.build_models(args)
    args.pack_splits = split
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    noop = torch.autocast("cpu", enabled=False)
    loss, plan, _ = train.train_step(models, images, lam, args, torch.Generator().manual_seed(1), noop)
    loss.backward()
    return loss, [p.grad for m in models[:2] for p in m.parameters()], plan


@pytest.mark.parametrize("method,lam", [(["--method", "ijepa"], 0.0), (["--dseq-pass", "causal"], 1.0),
                                        (["--dseq-pass", "replicate"], 1.0), (["--dseq-pass", "causal"], 0.5)])
def test_split_step_has_the_same_loss_and_gradients(method, lam):
    """Sub-batches (masking.split_plan) change which rows share a padded width, nothing else: the
    loss is the sum of per-token losses over all real target tokens, so loss and gradients equal
    those of one padded batch (fp32, up to summation order). An 8 x 8 grid, so rows differ."""
    args = config.parse_args(TINY + ["--img-size", "32", *method])
    one, one_grads, plan = _step_grads(args, 1, lam)
    split, split_grads, _ = _step_grads(args, 4, lam)
    assert len(masking.split_plan(plan, 4)) > 1  # the split really happened
    if lam > 0:
        assert plan.dseq.any()  # and DSeq rows were among them
    assert torch.allclose(one, split, rtol=1e-5, atol=1e-7)
    for a, b in zip(one_grads, split_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_target_norm_batch_standardises_each_position_and_channel_over_the_images():
    """--target-norm batch: the layer-normed targets, then per (patch, channel) mean 0 / std 1 over the
    batch's images, against a plain loop; layer (I-JEPA's target, every preset but the demo's) is untouched."""
    args = config.parse_args(TINY + ["--target-norm", "layer"])
    torch.manual_seed(0)
    tgt_enc = train.build_models(args)[2]
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer = train.make_targets(tgt_enc, images, args)[0]  # (B, P, D)
        batch = train.make_targets(tgt_enc, images, config.parse_args(TINY + ["--target-norm", "batch"]))[0]
        h = tgt_enc.features(images, layers=(-1,))[0].float()  # (B, P, D)
    assert torch.equal(layer, torch.nn.functional.layer_norm(h, (h.shape[-1],)))
    B, P, D = layer.shape
    for p in range(P):
        for d in range(0, D, 7):
            col = [float(layer[b, p, d]) for b in range(B)]
            mean = sum(col) / B
            var = sum((x - mean) ** 2 for x in col) / B
            want = [(x - mean) / math.sqrt(var + 1e-6) for x in col]
            assert batch[:, p, d].tolist() == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_pack_splits_one_is_the_single_padded_batch_exactly():
    """--pack-splits 1 runs the step on the one padded plan, bit for bit as before the split existed."""
    args = config.parse_args(TINY + ["--img-size", "32", "--pack-splits", "1"])
    loss, grads, plan = _step_grads(args, 1, 0.5)
    torch.manual_seed(0)
    enc, pred, tgt_enc = train.build_models(args)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets, regions, _ = train.make_targets(tgt_enc, images, args)
    ref = train.make_plan(regions, 0.5, torch.Generator().manual_seed(1), enc.grid, args, 16, images.device)
    # the step as it read before sub-batches: one encoder and one predictor pass over the whole plan
    ctx = enc(images, ref.ctx_idx, None if ref.ctx_full else ref.ctx_lvl)  # (B, Lc, D)
    p = pred(ctx, ref.ctx_idx, ref.ctx_lvl, ref.tgt_idx, ref.tgt_lvl, ref.tgt_grp)  # (B, Lt, D)
    t = targets.gather(1, ref.tgt_idx[..., None].expand(-1, -1, targets.shape[-1]))  # (B, Lt, D)
    per_token = torch.nn.functional.smooth_l1_loss(p.float(), t, reduction="none", beta=1.0).mean(-1)
    real = (ref.tgt_lvl > 0).float()
    ref_loss = (per_token * real).sum() / real.sum()
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, q.grad) for a, q in zip(grads, list(enc.parameters()) + list(pred.parameters())))


# ---------------------------------------------------------------------------------------------
# Resume and preemption


def test_resume_is_bit_for_bit(tmp_path):
    full, _, rows_full = run(tmp_path, name="full")
    half, step, _ = run(tmp_path, "--stop-at-step", "7", name="half")  # stops mid-epoch (10 steps/epoch)
    assert step == 7
    _, step, rows_rest = run(tmp_path, name="half")  # auto-resume from the out dir
    assert step == 20
    a, b = weights(full), weights(half)
    for key in ("encoder", "predictor", "target_encoder"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert [r["loss"] for r in rows_full[7:]] == [r["loss"] for r in rows_rest[-13:]]


def test_sigterm_writes_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "pre")
    steps_seen = []
    orig = train.ema_update

    def ema_then_signal(*a):  # deliver SIGTERM to ourselves during step 3
        orig(*a)
        steps_seen.append(1)
        if len(steps_seen) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    train.ema_update = ema_then_signal
    try:
        step = train.main(TINY + ["--out-dir", out])
    finally:
        train.ema_update = orig
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert step == 3
    ckpt = config.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["step"] == 3 and ckpt["config"]["model"] == "micro"


def test_rng_restore_per_rank_and_on_another_process_count(capsys):
    """Checkpoints hold one random state per rank. An older checkpoint's single dict is rank 0's, so
    it restores exactly in one process; states of another number of processes cannot continue, so
    the run reseeds from (seed, step, rank) and says so."""
    g = torch.Generator().manual_seed(1)
    state = config.rng_state(g)
    ref = torch.rand(3, generator=g)
    for saved in (state, [state]):  # the old format and the per-rank list
        g2 = torch.Generator()
        config.restore_rng(saved, g2, step=5, seed=0)
        assert torch.equal(torch.rand(3, generator=g2), ref)
    g3, g4 = torch.Generator(), torch.Generator()
    config.restore_rng([state, state], g3, step=5, seed=0)  # written by 2 processes, resumed by 1
    assert "random state of 2 process(es), this run has 1" in capsys.readouterr().out
    config.restore_rng([state, state], g4, step=5, seed=0)
    fresh = torch.rand(3, generator=g3)
    assert torch.equal(fresh, torch.rand(3, generator=g4)) and not torch.equal(fresh, ref)
    torch.manual_seed(0)  # leave the global stream as other tests expect it


def test_corrupt_checkpoint_is_a_clear_error_and_is_not_overwritten(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        train.main(TINY + ["--out-dir", str(out)])
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_mismatched_checkpoint_names_the_flags(tmp_path):
    out, _, _ = run(tmp_path, "--stop-at-step", "1")
    # caught by the resume config check, before the weights are even loaded
    with pytest.raises(SystemExit, match=r"--pred-dim 64 differs from the checkpoint .* \(--pred-dim 32\)"):
        train.main(TINY + ["--out-dir", out, "--pred-dim", "64"])


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out, _, _ = run(tmp_path, "--stop-at-step", "2")
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    real_loss = train.jepa_loss
    monkeypatch.setattr(train, "jepa_loss", lambda *a: real_loss(*a) * float("nan"))  # a diverged model
    with pytest.raises(SystemExit, match="loss is nan at step 2"):
        train.main(TINY + ["--out-dir", out])
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("flags, message", [
    (["--img-size", "30", "--patch-size", "16"], "multiple of patch_size"),
    (["--method", "ijepa", "--dseq-pass", "replicate"], "no effect with --method ijepa"),
    (["--regions", "1"], "at least 2"),
    (["--dataset", "cifar10"], "needs --data-path"),
])
def test_bad_flags_fail_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit):
        config.parse_args(flags)
    assert message in capsys.readouterr().err


def test_compile_is_on_for_cuda_by_default_and_a_bool_after_parsing():
    """--compile auto (the default) means on for CUDA, off on the CPU, resolved at parse time into the
    bool that train.py and bench.py read (no GPU needed: only the flags are parsed). The old spellings
    --compile / --no-compile still work."""
    parse = lambda *flags: config.parse_args(list(flags)).compile  # noqa: E731
    assert parse("--device", "cpu") is False and parse("--device", "cuda") is True and parse("--device", "cuda:1")
    assert parse() is torch.cuda.is_available()  # --device auto
    assert parse("--device", "cpu", "--compile") is True and parse("--device", "cpu", "--compile", "on") is True
    assert parse("--device", "cuda", "--compile", "off") is False and parse("--device", "cuda", "--no-compile") is False


def test_presets_set_defaults_and_flags_override():
    args = config.parse_args(["--preset", "in1k-vit-base", "--data-path", "x", "--epochs", "3"])
    assert (args.model, args.batch_size, args.img_size, args.epochs) == ("base", 2048, 224, 3)
    demo = config.parse_args([])
    assert demo.preset == "demo" and demo.dataset == "noisy_shapes" and (demo.img_size, demo.patch_size) == (64, 8)
    assert (demo.lr, demo.patch_init_std, demo.knn_every, demo.target_norm) == (2e-3, 0.02, 2, "batch")
    assert tuple(demo.ema) == (0.996, 1.0)  # the paper's EMA


# ---------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on half batches average to the single-process gradient


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import config, masking, plumbing, train
    from torch.nn.parallel import DistributedDataParallel as DDP
    args = config.parse_args({tiny!r})
    torch.manual_seed(0)
    enc, pred, tgt = train.build_models(args)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 16, 16, generator=g)
    targets = torch.randn(8, 16, enc.embed_dim, generator=g)
    ctx, tgts = masking.sample_multiblock(8, enc.grid, g, "cpu")
    plan = masking.ijepa_plan(ctx, tgts)  # same plan for the whole global batch on every process

    def rows(plan, sl):
        return masking.Plan(torch.arange(sl.stop - sl.start), plan.ctx_idx[sl], plan.ctx_lvl[sl], plan.tgt_idx[sl],
                            plan.tgt_lvl[sl], plan.tgt_grp[sl], plan.dseq[sl], plan.n_regions[sl])

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        r = dist.get_rank()
        sl = slice(4 * r, 4 * r + 4)
        e, p = DDP(enc), DDP(pred)
        train.jepa_loss(e, p, images[sl], targets[sl], rows(plan, sl)).backward()
        if r == 0:
            torch.save([q.grad for q in list(enc.parameters()) + list(pred.parameters())], sys.argv[1])
        del e, p  # the DDP reducers go before their process group, and no rank tears gloo down
        dist.barrier()  # while its peer still works (a CI run aborted once in that teardown)
        dist.destroy_process_group()
        plumbing.end_process(0)  # DDP keeps gloo's threads alive past the teardown: ~1 exit in 80 aborted
    else:
        train.jepa_loss(enc, pred, images, targets, rows(plan, slice(0, 8))).backward()
        torch.save([q.grad for q in list(enc.parameters()) + list(pred.parameters())], sys.argv[1])
""")


def test_two_process_gloo_gradients_equal_single_process(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT, tiny=TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    subprocess.run([sys.executable, str(script), str(single)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    str(script), str(multi)], check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(multi)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)


def test_end_process_runs_the_exit_hooks_flushes_and_keeps_its_code():
    """plumbing.end_process (how a torchrun process of train.py ends, past gloo's racy teardown) still runs
    Python's exit hooks (they stop DataLoader workers) and prints what stdout holds, with the code asked."""
    code = ("import atexit, sys; sys.path.insert(0, %r); import plumbing; "
            "atexit.register(lambda: print('hook ran')); print('buffered', end=' '); plumbing.end_process(3)" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and out.stdout == "buffered hook ran\n", (out.returncode, out.stdout, out.stderr)


STANDARDISE_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import train
    t = torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1  # (B, P, D)
    dist.init_process_group("gloo")
    r = dist.get_rank()
    mine = train.standardise_over_images(t[4 * r:4 * r + 4])  # (4, P, D), statistics of all 8 images
    parts = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(parts, mine)
    if r == 0:
        torch.save(torch.cat(parts), sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
""")


def test_target_norm_batch_uses_the_global_batch_under_two_processes(tmp_path):
    """Two gloo processes with half a batch each standardise with the statistics of the whole batch: the
    same targets as one process holding all of it."""
    script, out = tmp_path / "standardise.py", tmp_path / "two.pt"
    script.write_text(STANDARDISE_SCRIPT.format(root=ROOT))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    str(script), str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    t = torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert torch.allclose(torch.load(out), train.standardise_over_images(t), atol=1e-5)


def test_torchrun_two_processes_end_to_end(tmp_path):
    """The same script under torchrun (gloo on CPU): trains, only rank 0 writes, kNN at the end."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    os.path.join(ROOT, "train.py"), *TINY, "--epochs", "1", "--out-dir", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 11))  # 160 images / global batch 16; one writer, no duplicates
    assert any("knn_top1" in r for r in rows)
    assert config.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 10


@pytest.mark.parametrize("flags", [["--prediction", "flat"], ["--region-order", "reverse"], ["--region-order", "random"],
                                   ["--region-order", "raster"], ["--region-source", "blocks"],
                                   ["--lambda-coin", "batch"], ["--regions", "3"]])
def test_ablation_flags_reach_the_plan(flags):
    """Every ablation of the paper's tables is a flag that changes the plan, not the networks."""
    from contextlib import nullcontext
    args = config.parse_args(TINY + flags)
    torch.manual_seed(0)
    models = train.build_models(args)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 16, 16)
    loss, plan, stats = train.train_step(models, images, 1.0, args, g, nullcontext())  # lambda = 1
    assert torch.isfinite(loss)
    dseq_rows = plan.dseq[plan.sample]  # (R,)
    if flags[0] == "--region-source":  # random blocks predicted sequentially: 4 blocks -> levels 2..5
        assert plan.dseq.all() and plan.tgt_lvl[dseq_rows].max() > 2
    elif flags[0] == "--prediction":  # flat: every DSeq target is predicted from R_1 alone
        assert plan.dseq.any() and set(plan.tgt_lvl[dseq_rows].unique().tolist()) <= {0, 2}
    elif flags[0] == "--lambda-coin":  # one coin for the whole batch: all DSeq where regions allow
        assert plan.dseq.sum() == (plan.n_regions >= 2).sum()
    elif flags[0] == "--regions":
        assert plan.n_regions.max() <= 3


@pytest.mark.slow
def test_compile_path_trains_and_saves_raw_state_dicts(tmp_path):
    """--compile also runs on the CPU (Inductor, static shapes): the step works through the compiled
    encoder / predictor / target features, and checkpoints hold the raw modules' keys. One step of
    one padded batch (--pack-splits 1): every new shape is a C++ build of its forward and backward
    here (the sub-batches' graphs are counted in test_gpu_ready.py, without code generation)."""
    out, step, rows = run(tmp_path, "--compile", "--stop-at-step", "1", "--pack-splits", "1")
    assert step == 1 and math.isfinite(rows[0]["loss"])
    assert rows[0]["graphs_compiled"] == 3  # target features, encoder, predictor
    ckpt = weights(out)
    args = config.parse_args(TINY)
    enc, pred, _ = train.build_models(args)
    assert set(ckpt["encoder"]) == set(enc.state_dict()) and set(ckpt["predictor"]) == set(pred.state_dict())


def test_a_compiler_error_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, capsys):
    """A compiler that raises (simulated: every compiled callable raises a wrapper whose cause is
    Inductor's kind of assertion) must not end the run: one warning naming the step, the torch
    version and the compiler's own error, then the same step again eager, and the run finishes."""
    calls = []

    def broken_compile(fn, **kw):
        def compiled(*a, **k):
            calls.append(1)
            try:
                raise AssertionError("get_pw_red_splits: tiling")
            except AssertionError as inner:
                raise RuntimeError("backend compiler failed") from inner
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    out, step, rows = run(tmp_path, "--compile", "--stop-at-step", "3", "--pack-splits", "1")
    err = capsys.readouterr().err
    assert step == 3 and len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert err.count("warning: torch.compile failed") == 1 and "at step 0" in err
    assert torch.__version__ in err and "AssertionError: get_pw_red_splits" in err and "eager mode" in err
    assert len(calls) == 1  # after the fallback nothing compiled is called again


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_compiler_error_falls_back_to_eager_with_the_same_losses(tmp_path, monkeypatch, capsys, where):
    """torch.compile compiles lazily, so its errors arise inside a step: at a graph's first forward,
    or at its first backward (where Inductor crashed on the H200), after the predictor's backward
    has already put its gradients in place. Simulated by a backend that raises there: the run prints
    one warning line naming the torch version, reruns the step eager and trains on, with the losses
    and weights of the same run never compiled (torch.compile = identity: the compiled run's plan
    shapes, eager modules), and the losses of a --compile off run up to summation order."""
    import torch._dynamo.config as dynamo_config

    for key in ("automatic_dynamic_shapes", "recompile_limit", "accumulated_recompile_limit"):
        monkeypatch.setattr(dynamo_config, key, getattr(dynamo_config, key))  # put back after the test
    real, raised = torch.compile, []

    class Boom(torch.autograd.Function):  # identity on a graph input; its gradient raises in the encoder's graph
        @staticmethod
        def forward(ctx, x, encoder):
            ctx.encoder = encoder
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            if ctx.encoder:
                raised.append(1)
                raise RuntimeError("simulated Inductor crash in a backward")
            return grad, None

    def failing(gm, example_inputs):
        if where == "forward":
            raise RuntimeError("simulated Inductor crash")
        encoder = any(isinstance(x, torch.Tensor) and x.dim() == 4 for x in example_inputs)  # images, patch conv
        return lambda *a: gm(*(Boom.apply(x, encoder) if isinstance(x, torch.Tensor) and x.requires_grad else x
                               for x in a))

    # one sub-batch: the predictor's backward ends (its gradients land) before the encoder's starts
    steps = ["--stop-at-step", "3", "--pack-splits", "1"]
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    same, _, rows_same = run(tmp_path, "--compile", *steps, name="same")
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": failing}))
    capsys.readouterr()
    try:
        fell, step, rows = run(tmp_path, "--compile", *steps, name="fell")
    finally:
        torch._dynamo.reset()
    warning = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: torch.compile")]
    assert step == 3 and len(warning) == 1 and f"at step 0 with torch {torch.__version__}" in warning[0]
    assert "simulated Inductor crash" in warning[0] and "training goes on in eager mode" in warning[0]
    assert where == "forward" or raised == [1]  # the backward really failed, once
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_same]
    assert "graphs_compiled" not in rows[-1]  # eager from step 0 on
    assert_same_weights(same, fell)
    monkeypatch.setattr(torch, "compile", real)
    _, _, rows_off = run(tmp_path, "--compile", "off", *steps, name="off")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in rows_off], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Multi-process runs that must stay one run: identical networks on every rank, each rank's own
# random stream across a resume, stop decisions agreed by all ranks, a group-wide SIGTERM with
# DataLoader workers, and a mid-epoch resume that skips by sampler index.

# train.main under test hooks (monkeypatches, nothing in train.py knows about them). Environment:
#   HOOK_OUT     folder for hook_rank{R}.json: network digests after build and at the end, and a
#                digest of the plan generator's state at every step (the masks a rank draws next)
#   SIGTERM_AT   "R:N"  rank R sends itself SIGTERM after its N-th step
#   GROUP_TERM_AT N     after step N: write HOOK_OUT/ready, then wait until SIGTERM arrives (the test
#                       sends it to the whole process group)
#   NAN_AT       "R:N"  rank R's N-th loss is NaN
#   STALL_IN_SAVE N     the N-th checkpoint write stops halfway: HOOK_OUT/ready, then sleep (for a kill -9)
#   FSIZE_LIMIT  B      no file may grow past B bytes (ulimit -f): a larger write fails in the kernel, EFBIG
HOOKED_MAIN = textwrap.dedent("""
    import hashlib, io, json, os, resource, signal, sys, time
    sys.path.insert(0, {root!r})
    import torch
    import config, train

    env = os.environ.get
    rank, out = int(env("RANK", "0")), env("HOOK_OUT")
    record, held, calls = {{"plan_rng": []}}, [], {{"ema": 0, "loss": 0, "save": 0}}
    if env("FSIZE_LIMIT"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(env("FSIZE_LIMIT")),) * 2)

    def digest(models):
        return [hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes()
                                        for t in m.state_dict().values())).hexdigest() for m in models]

    def at(spec):  # "R:N" -> N on rank R, else None
        if spec and int(spec.split(":")[0]) == rank:
            return int(spec.split(":")[1])

    real_build, real_plan, real_ema, real_loss = train.build_models, train.make_plan, train.ema_update, train.jepa_loss
    real_handler = config.Preemption._handler
    got_signal = []

    def build_models(args):
        held[:] = real_build(args)
        record["build"] = digest(held)
        return held

    def make_plan(regions, lam, generator, *a, **k):
        record["plan_rng"].append(hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest())
        return real_plan(regions, lam, generator, *a, **k)

    def ema_update(*a):
        real_ema(*a)
        calls["ema"] += 1
        if at(env("SIGTERM_AT")) == calls["ema"]:
            os.kill(os.getpid(), signal.SIGTERM)
        if env("GROUP_TERM_AT") and int(env("GROUP_TERM_AT")) == calls["ema"]:
            open(os.path.join(out, "ready"), "w").close()
            while not got_signal:
                time.sleep(0.01)
            time.sleep(0.5)  # a DataLoader worker killed by the signal would be noticed here, as mid-step

    def jepa_loss(*a):
        calls["loss"] += 1
        loss = real_loss(*a)
        return loss * float("nan") if at(env("NAN_AT")) == calls["loss"] else loss

    def handler(self, signum, frame):
        got_signal.append(signum)
        real_handler(self, signum, frame)

    real_save = torch.save

    def save(obj, f, *a, **k):
        calls["save"] += 1
        if env("STALL_IN_SAVE") and int(env("STALL_IN_SAVE")) == calls["save"]:
            whole = io.BytesIO()
            real_save(obj, whole)
            f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # a path or an open file
            f.write(whole.getvalue()[:whole.tell() // 2])
            f.flush()
            open(os.path.join(out, "ready"), "w").close()
            time.sleep(600)
        return real_save(obj, f, *a, **k)

    train.build_models, train.make_plan, train.ema_update, train.jepa_loss = build_models, make_plan, ema_update, jepa_loss
    config.Preemption._handler, torch.save = handler, save
    try:
        record["step"] = train.main(sys.argv[1:])
        record["end"] = digest(held)
    finally:
        with open(os.path.join(out, f"hook_rank{{rank}}.json"), "w") as f:
            json.dump(record, f)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs, timeout=300):
    """Exit codes of procs; a hang (a rank left alone, the others waiting for it) fails the test."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"processes did not all exit within {timeout} s (a rank left alone, the others hang)")


def launch(script, out, argv, nproc=2, timeout=300, logs=None, **hooks):
    """Start `nproc` ranks of HOOKED_MAIN (what torchrun would do: RANK / WORLD_SIZE / MASTER_* in
    the environment, gloo on the CPU) and wait for all. A hang fails the test after `timeout` s.
    Rank logs and hook records go to `logs` (default: the run's folder `out`).
    Returns [(returncode, output)] per rank and the per-rank hook records."""
    logs = logs or out
    os.makedirs(logs, exist_ok=True)
    port = free_port()
    procs = []
    for r in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HOOK_OUT": str(logs), **hooks}
        if nproc > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        with open(os.path.join(logs, f"rank{r}.log"), "w") as log:  # a file: a full pipe cannot block a rank
            procs.append(subprocess.Popen([sys.executable, str(script), *argv, "--out-dir", str(out)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    codes = wait_all(procs, timeout)
    results = [(rc, open(os.path.join(logs, f"rank{r}.log")).read()) for r, rc in enumerate(codes)]
    records = []
    for r in range(nproc):
        path = os.path.join(logs, f"hook_rank{r}.json")
        records.append(json.load(open(path)) if os.path.exists(path) else None)
    return results, records


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


def assert_same_weights(out_a, out_b):
    a, b = weights(out_a), weights(out_b)
    assert a["step"] == b["step"]
    for key in ("encoder", "predictor", "target_encoder"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


DDP_TINY = TINY + ["--stop-at-step", "6"]  # 20 steps in the schedules (10 per epoch), stop at 6


@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    path = tmp_path_factory.mktemp("hooks") / "hooked_main.py"
    path.write_text(HOOKED_MAIN.format(root=ROOT))
    return path


@pytest.fixture(scope="module")
def ddp_reference(hooked, tmp_path_factory):
    """An uninterrupted 2-process run to step 6: (out dir, per-rank hook records)."""
    out = tmp_path_factory.mktemp("ddp") / "reference"
    results, records = launch(hooked, out, DDP_TINY)
    assert all(rc == 0 for rc, _ in results), results
    return out, records


@pytest.mark.slow
def test_two_processes_hold_identical_networks_but_draw_their_own_plans(ddp_reference):
    """Every rank builds encoder, predictor AND target encoder from --seed (DDP broadcasts only the
    first two), so after build and after 6 steps the three networks are bit-identical across ranks,
    while each rank's plan generator (seed + rank) differs."""
    _, (r0, r1) = ddp_reference
    assert r0["build"] == r1["build"], "networks differ across ranks after build"
    assert r0["end"] == r1["end"], "networks differ across ranks after 6 steps"
    assert r0["build"] != r0["end"]  # they trained
    assert len(r0["plan_rng"]) == 6 and all(a != b for a, b in zip(r0["plan_rng"], r1["plan_rng"]))


@pytest.mark.slow
def test_two_process_resume_is_bit_for_bit_and_each_rank_resumes_its_own_masks(hooked, ddp_reference, tmp_path):
    """Every rank's random state is saved; stopped at step 3 and resumed, each rank draws exactly the
    masks it drew in the uninterrupted run (so ranks still differ) and the weights match bit for bit."""
    ref, (r0, r1) = ddp_reference
    out = tmp_path / "resumed"
    results, _ = launch(hooked, out, TINY + ["--stop-at-step", "3"])
    assert all(rc == 0 for rc, _ in results), results
    results, (s0, s1) = launch(hooked, out, DDP_TINY)
    assert all(rc == 0 for rc, _ in results) and "resumed from" in results[0][1], results
    assert s0["plan_rng"] == r0["plan_rng"][3:] and s1["plan_rng"] == r1["plan_rng"][3:]
    assert all(a != b for a, b in zip(s0["plan_rng"], s1["plan_rng"]))
    assert_same_weights(ref, out)
    assert losses(out) == losses(ref)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(hooked, ddp_reference, tmp_path):
    """SIGTERM reaches rank 1 only (after its step 3): all ranks agree to stop at the same step,
    the checkpoint is written, and the rerun resumes to the uninterrupted run's weights."""
    ref, _ = ddp_reference
    out = tmp_path / "preempted"
    results, records = launch(hooked, out, DDP_TINY, SIGTERM_AT="1:3")
    assert all(rc == 0 for rc, _ in results), results
    assert [r["step"] for r in records] == [3, 3] and "preempted: checkpoint at step 3" in results[0][1]
    assert config.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 3
    results, _ = launch(hooked, out, DDP_TINY)
    assert all(rc == 0 for rc, _ in results) and "resumed from" in results[0][1], results
    assert_same_weights(ref, out)


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_and_keeps_the_checkpoint(hooked, ddp_reference, tmp_path):
    """A non-finite loss on rank 1 only: every rank stops with the message at the same step and the
    last good checkpoint keeps its bytes."""
    ref, _ = ddp_reference
    out = tmp_path / "diverged"
    shutil.copytree(ref, out)
    before = (out / "checkpoint.pt").read_bytes()
    results, _ = launch(hooked, out, TINY, NAN_AT="1:2")  # resumes at 6; rank 1's 2nd loss = step 7's
    for rc, text in results:
        assert rc != 0 and "at step 7; stopping without writing a checkpoint" in text, text
    assert "loss is nan" in results[1][1] and "loss is not finite on another process" in results[0][1]
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_still_checkpoints(hooked, tmp_path):
    """`timeout` and SLURM send SIGTERM to every process of the job, DataLoader workers included.
    The workers leave it to the main process, which checkpoints the last finished step; the rerun
    then matches an uninterrupted run."""
    out = tmp_path / "group"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOOK_OUT": str(out), "GROUP_TERM_AT": "3"}
    argv = [sys.executable, str(hooked), *DDP_TINY, "--num-workers", "2", "--out-dir", str(out)]
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(3000):  # the run reaches step 3 (<= 300 s), then waits for the signal
            if (out / "ready").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (out / "ready").exists(), proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGTERM)  # kill -TERM -- -PGID
        text = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "preempted: checkpoint at step 3" in text, text
    assert config.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 3
    assert train.main(DDP_TINY + ["--num-workers", "2", "--out-dir", str(out)]) == 6  # the rerun resumes
    ref, _, _ = run(tmp_path, "--stop-at-step", "6", name="uninterrupted")
    assert_same_weights(ref, out)


def test_mid_epoch_resume_reads_only_unseen_samples(tmp_path, monkeypatch):
    """Resumed at step 7 of a 10-step epoch, the loader starts at batch 7 by sampler index: the 112
    samples already seen are not read (decoded) again, and the batches match the uninterrupted run."""
    import data
    read = []
    real_getitem = data.TransformedDataset.__getitem__

    def getitem(self, key):
        if len(self) == 160:  # the training split (TINY: 160 train, 64 val images)
            read.append(tuple(key))
        return real_getitem(self, key)

    monkeypatch.setattr(data.TransformedDataset, "__getitem__", getitem)
    full, _, rows_full = run(tmp_path, "--stop-at-step", "13", name="full")
    read_full = read[:]
    read.clear()
    run(tmp_path, "--stop-at-step", "7", name="half")
    read.clear()
    half, step, rows_rest = run(tmp_path, "--stop-at-step", "13", name="half")
    assert step == 13
    assert read == read_full[7 * 16:]  # (index, epoch) keys: exactly the unseen ones, in order
    assert [r["loss"] for r in rows_rest[-6:]] == [r["loss"] for r in rows_full[7:]]
    assert_same_weights(full, half)


# ---------------------------------------------------------------------------------------------
# Faults of the folder (docs/faults.md): one run per folder, kill -9 and Ctrl-C mid-write, a full
# disk under torchrun. main: a second run resumed the first's checkpoint and both trained into one
# folder (one crashed on the shared checkpoint.pt.tmp, metrics.jsonl interleaved).

TRAIN_PY = os.path.join(ROOT, "train.py")


def start(script, out, argv, logs, **hooks):
    """One run of `script` in the background; its output (logs/run.log) and hook files go to `logs`,
    never into the run's folder `out`."""
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOOK_OUT": str(logs), **hooks}
    with open(os.path.join(logs, "run.log"), "w") as log:
        return subprocess.Popen([sys.executable, str(script), *argv, "--out-dir", str(out)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def wait_for(path, proc, timeout=300):
    """Until `path` exists (the hook's "ready"); the test fails if proc exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, open(os.path.join(os.path.dirname(path),
                                                                                      "run.log")).read()
        time.sleep(0.05)


def snapshot(folder):
    """{name: bytes} of every file in folder."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def temporary_files(folder):
    return [f for f in os.listdir(folder) if ".tmp" in f]


@pytest.mark.slow
def test_a_second_run_into_a_held_folder_stops_at_once_and_changes_nothing(hooked, tmp_path):
    """The first run holds its folder (a lock the OS drops when the process ends). A second run into it,
    here under torchrun, stops on every rank with one line naming the folder and the holder before it
    reads or writes anything; the first run's files keep their bytes and it trains on alone."""
    out = tmp_path / "run"
    first = start(hooked, out, DDP_TINY + ["--ckpt-every", "2"], tmp_path / "first", GROUP_TERM_AT="3")
    try:
        wait_for(tmp_path / "first" / "ready", first)  # inside step 3, the checkpoint of step 2 written
        before = snapshot(out)
        results, _ = launch(TRAIN_PY, out, DDP_TINY, logs=tmp_path / "second")
        holder = f"{out} is in use by another run (host {socket.gethostname()}, pid {first.pid})"
        for rc, text in results:
            lines = [line for line in text.splitlines() if line.strip()]
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: ") and holder in lines[0], text
        assert snapshot(out) == before
        first.send_signal(signal.SIGTERM)  # the first run checkpoints step 3 and stops
        assert wait_all([first]) == [0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]  # one writer
    assert config.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 3


@pytest.mark.slow
def test_kill_9_mid_checkpoint_keeps_the_last_one_and_frees_the_folder(hooked, tmp_path):
    """kill -9 while the checkpoint of step 4 is half written: checkpoint.pt still holds step 2, the OS
    released the folder's lock, and the rerun removes the half-written temporary file, resumes from step 2
    and ends where an uninterrupted run ends."""
    out = tmp_path / "run"
    argv = DDP_TINY + ["--ckpt-every", "2"]
    victim = start(hooked, out, argv, tmp_path / "victim", STALL_IN_SAVE="2")
    try:
        wait_for(tmp_path / "victim" / "ready", victim)
    finally:
        victim.kill()  # SIGKILL: no handler, no finally, no atexit
        victim.wait()
    assert temporary_files(out), os.listdir(out)  # half a checkpoint beside the whole one
    assert config.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2
    assert train.main(argv + ["--out-dir", str(out)]) == 6
    assert not temporary_files(out)
    ref, _, _ = run(tmp_path, "--stop-at-step", "6", name="uninterrupted")
    assert_same_weights(ref, out)


def test_ctrl_c_mid_checkpoint_stops_at_once_and_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) while the checkpoint of step 4 is being written: one line saying the
    last checkpoint is intact, exit code 130, no partial file, and the folder free for the rerun."""
    out = str(tmp_path / "run")
    argv = TINY + ["--stop-at-step", "6", "--ckpt-every", "2", "--out-dir", out]
    real_save, saves = torch.save, []

    def save(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:
            with open(f, "wb") if isinstance(f, str) else contextlib.nullcontext(f) as file:  # a path or a file
                file.write(b"the first bytes of a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert f"interrupted: {os.path.join(out, 'checkpoint.pt')} is intact; rerun the same command to resume" in err
    assert config.load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 2 and not temporary_files(out)
    monkeypatch.setattr(torch, "save", real_save)
    assert train.main(argv) == 6


@pytest.mark.slow
def test_a_full_disk_under_torchrun_stops_every_rank_with_one_line(hooked, ddp_reference, tmp_path):
    """A real failure from the kernel: files limited to 1 MiB (ulimit -f; the checkpoint is ~11 MiB) make
    rank 0's checkpoint of step 8 fail with EFBIG inside torch's serializer. Every rank exits with rank
    0's line (none waits in the next all-reduce), the checkpoint of step 6 keeps its bytes, and no
    partial file is left beside it."""
    ref, _ = ddp_reference
    out = tmp_path / "full"
    shutil.copytree(ref, out)
    before = (out / "checkpoint.pt").read_bytes()
    results, _ = launch(hooked, out, TINY + ["--stop-at-step", "8"], logs=tmp_path / "logs", FSIZE_LIMIT=str(2**20))
    for rc, text in results:
        errors = [line for line in text.splitlines() if "error:" in line]
        assert rc != 0 and len(errors) == 1, text
        assert f"cannot write {out / 'checkpoint.pt'}: File too large (EFBIG); it needs about" in errors[0], text
        assert "ulimit -f" in errors[0] and "Traceback" not in text
    assert (out / "checkpoint.pt").read_bytes() == before and not temporary_files(out)


# ---------------------------------------------------------------------------------------------
# Numbered checkpoints (--keep-every, --keep-last): beside the rolling checkpoint.pt, bounded, and
# each one a checkpoint that resumes and evaluates.


def test_kept_checkpoints_are_bounded_resume_and_evaluate(tmp_path):
    argv = TINY + ["--num-train", "64", "--epochs", "4", "--keep-every", "1", "--keep-last", "2"]  # 4 steps/epoch
    out = tmp_path / "run"
    assert train.main(argv + ["--out-dir", str(out), "--stop-at-step", "6"]) == 6  # keeps epoch 1 (step 4)
    assert os.path.isfile(out / "checkpoint-ep0001.pt")
    assert train.main(argv + ["--out-dir", str(out)]) == 16  # resumed: epochs 2, 3, 4 kept, only 2 stay
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == \
        ["checkpoint-ep0003.pt", "checkpoint-ep0004.pt", "checkpoint.pt"]
    assert (out / "checkpoint-ep0004.pt").read_bytes() == (out / "checkpoint.pt").read_bytes()
    kept = str(out / "checkpoint-ep0003.pt")
    assert config.load_checkpoint(kept)["step"] == 12
    # a kept checkpoint resumes (into another folder) and reaches the same end, bit for bit
    again = tmp_path / "again"
    assert train.main(argv + ["--out-dir", str(again), "--resume", kept]) == 16
    assert_same_weights(out, again)
    # ... and evaluates: its own step, its target encoder
    report = evaluate.main(["--checkpoint", kept, "--eval", "knn", "--features", "last", "--num-workers", "0",
                            "--device", "cpu", "--out-dir", str(tmp_path / "eval"), "--eval-name", "ep3"])
    assert report["step"] == 12 and report["checkpoint"] == kept
    assert report["results"][0]["eval"] == "knn" and 0 <= report["results"][0]["value"] <= 100


# ---------------------------------------------------------------------------------------------
# Processes: torchrun over several nodes, srun without torchrun, each process on its own GPU.


def test_process_env_reads_torchrun_then_srun_then_one_process():
    assert plumbing.process_env({}) == (0, 1, 0)
    inside = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert plumbing.process_env(inside) == (9, 16, 1)  # torchrun started by srun: torchrun's names win
    assert plumbing.process_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)  # srun -n 1
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu3", "SLURM_JOB_ID": "4123456"}
    assert plumbing.process_env(env) == (5, 6, 1)  # srun -n 6 inside an 8-task allocation
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "6", "1")  # for torch.distributed
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(12000 + 4123456 % 20000)
    given = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert plumbing.process_env(given) == (1, 2, 0) and (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "29500")
    with pytest.raises(SystemExit, match="no SLURM_JOB_NODELIST to find task 0's host; set MASTER_ADDR"):
        plumbing.process_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("nodes, first", [("node17", "node17"), ("a,b", "a"), ("node[03-05,09]", "node03"),
                                          ("gpu[7,2],cpu1", "gpu7"), ("r[1-2]n[08-09]", "r1n08"),
                                          ("ib-[001-004]-x,y", "ib-001-x")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert plumbing.first_host(nodes) == first


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """On node 1 of 2 x 8 GPUs the process of RANK 11 has LOCAL_RANK 3: cuda:3 for --device auto and a bare
    --device cuda (main put every bare-cuda process on cuda:0). A process shown one GPU (srun
    --gpus-per-task) takes it; a local rank beyond the node's GPUs is one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    args = config.parse_args(TINY)
    for device, want in (("auto", "cuda:3"), ("cuda", "cuda:3"), ("cuda:5", "cuda:5")):
        args.device = device
        assert config.pick_device(args, 3) == torch.device(want)
    args.device = "auto"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert config.pick_device(args, 3) == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match="local rank 3 has no GPU: this node shows 2"):
        config.pick_device(args, 3)


def run_logs(procs, logs):
    codes = wait_all(procs)
    return codes, [open(log).read() for log in logs]


@pytest.mark.slow
def test_two_nodes_of_one_process_train_the_weights_of_one_node_of_two(ddp_reference, tmp_path):
    """Two `torchrun --nnodes 2 --node_rank N --nproc_per_node 1` launchers on loopback: RANK 0 and 1,
    LOCAL_RANK 0 on both. Only global rank 0 takes the folder and writes (node 1's process, local rank 0
    there, neither locks nor logs), and the run reaches the weights and losses of 1 node x 2 processes."""
    ref, _ = ddp_reference
    out, port = tmp_path / "two-nodes", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, logs = [], [tmp_path / f"node{n}.log" for n in (0, 1)]
    for node, path in enumerate(logs):
        with open(path, "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN_PY,
                 *DDP_TINY, "--out-dir", str(out)], env=env, stdout=log, stderr=subprocess.STDOUT))
    codes, texts = run_logs(procs, logs)
    assert codes == [0, 0], texts
    assert "config:" in texts[0] and "config:" not in texts[1]  # node 1 prints and writes nothing
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r] == list(range(1, 7))
    assert losses(out) == losses(ref)
    assert_same_weights(ref, out)


def free_slurm_port():
    """A free port that a SLURM job id maps to (plumbing.SLURM_PORTS: 12000 + job id mod 20000)."""
    base, span = plumbing.SLURM_PORTS
    for port in random.Random().sample(range(base, base + span), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in the SLURM range")


@pytest.mark.slow
def test_srun_without_torchrun_trains_as_one_run_of_two_processes(ddp_reference, tmp_path):
    """`srun -n 2 python train.py` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the job's node
    list, none of torchrun's variables (main trained two separate worlds of one into one folder). Here
    two local processes with only those variables are ranks 0 and 1 of one run: rendezvous at the node
    list's first host, on a port derived from the job id, and the weights of the 2-process reference."""
    ref, _ = ddp_reference
    out, port = tmp_path / "srun", free_slurm_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    job = 20000 * 345 + port - plumbing.SLURM_PORTS[0]
    procs, logs = [], [tmp_path / f"task{t}.log" for t in (0, 1)]
    for task, path in enumerate(logs):
        env = {**base, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(task), "SLURM_NTASKS": "2",
               "SLURM_LOCALID": str(task), "SLURM_JOB_NODELIST": "127.0.0.1,node-b", "SLURM_JOB_ID": str(job)}
        with open(path, "w") as log:
            procs.append(subprocess.Popen([sys.executable, TRAIN_PY, *DDP_TINY, "--out-dir", str(out)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    codes, texts = run_logs(procs, logs)
    assert codes == [0, 0], texts
    assert "processes 2 x micro-batch 8" in texts[0] and "config:" not in texts[1]
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r] == list(range(1, 7))
    assert losses(out) == losses(ref)
    assert_same_weights(ref, out)
