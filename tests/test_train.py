"""train.py: the step, schedules, EMA, resume, preemption, DDP and config errors, on the CPU."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import masking
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
    args = train.parse_args(["--lr", "1e-3", "--start-lr", "1e-4", "--final-lr", "1e-6"])
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
    ij = train.parse_args(["--method", "ijepa"])
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


def test_no_weight_decay_on_biases_and_norms():
    args = train.parse_args(TINY)
    enc, pred, _ = train.build_models(args)
    opt = train.make_optimizer(enc, pred, args)
    decay, no_decay = opt.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    norm_w = enc.norm.weight
    assert any(p is norm_w for p in no_decay["params"]) and no_decay["weight_decay"] == 0


def test_loss_ignores_padding_and_matches_a_plain_mean():
    args = train.parse_args(TINY)
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
    ckpt = train.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["step"] == 3 and ckpt["config"]["model"] == "micro"


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
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_presets_set_defaults_and_flags_override():
    args = train.parse_args(["--preset", "in1k-vit-base", "--data-path", "x", "--epochs", "3"])
    assert (args.model, args.batch_size, args.img_size, args.epochs) == ("base", 2048, 224, 3)
    demo = train.parse_args([])
    assert demo.preset == "demo" and demo.dataset == "synthetic"


# ---------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on half batches average to the single-process gradient


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import masking, train
    from torch.nn.parallel import DistributedDataParallel as DDP
    args = train.parse_args({tiny!r})
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
        dist.destroy_process_group()
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
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    str(script), str(multi)], check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(multi)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)


def test_torchrun_two_processes_end_to_end(tmp_path):
    """The same script under torchrun (gloo on CPU): trains, only rank 0 writes, kNN at the end."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                    os.path.join(ROOT, "train.py"), *TINY, "--epochs", "1", "--out-dir", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 11))  # 160 images / global batch 16; one writer, no duplicates
    assert any("knn_top1" in r for r in rows)
    assert train.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 10


@pytest.mark.parametrize("flags", [["--prediction", "flat"], ["--region-order", "reverse"], ["--region-order", "random"],
                                   ["--region-order", "raster"], ["--region-source", "blocks"],
                                   ["--lambda-coin", "batch"], ["--regions", "3"]])
def test_ablation_flags_reach_the_plan(flags):
    """Every ablation of the paper's tables is a flag that changes the plan, not the networks."""
    from contextlib import nullcontext
    args = train.parse_args(TINY + flags)
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
    """--compile (the CUDA default) also runs on the CPU: the step works through the compiled
    encoder / predictor / target features, and checkpoints hold the raw modules' keys."""
    out, step, rows = run(tmp_path, "--compile", "--stop-at-step", "2")
    assert step == 2 and all(math.isfinite(r["loss"]) for r in rows)
    ckpt = weights(out)
    args = train.parse_args(TINY)
    enc, pred, _ = train.build_models(args)
    assert set(ckpt["encoder"]) == set(enc.state_dict()) and set(ckpt["predictor"]) == set(pred.state_dict())
