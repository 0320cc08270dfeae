"""
Where the demo's training step spends its ops (issue #23): torch.profiler over a few full steps of
`python train.py` (micro ViT, batch 64, 8 x 8 grid), counted, not timed.

    python scripts/profile_step.py --json results/profile_demo_step.json --entry after   # dseq and ijepa, ~1 min
    python scripts/profile_step.py --methods dseq --steps 2 -- --batch-size 16   # train.py flags after --

Counts are deterministic (fixed seeds, same images and plans on every run), so they compare before /
after a change on a busy machine where wall-clock times do not. Per step and per part of the step:
  aten_ops   every aten:: event, nested ones included (aten::linear -> aten::t, aten::addmm)
  top_ops    aten:: events with no aten:: parent: the ops Python (or an autograd node) dispatched
Parts are the step's numbered pieces (train.py), each labelled by wrapping the module function the
step calls; an op counts in its innermost part, so "1 targets" is the target encoder without saliency.
Self-CPU shares (of all profiled CPU time, per op name) and each part's inclusive CPU share come along
as a rough, noisy second signal.
The step is train.py's loop body: the next batch, optimizer_step (train_step, backward, AdamW), EMA.
"""

import argparse
import collections
import functools
import json
import os
import shlex
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402  (plain_step: the networks alone, what --step-overhead divides by)
import config  # noqa: E402
import data  # noqa: E402
import masking  # noqa: E402
import model  # noqa: E402
import saliency  # noqa: E402
import train  # noqa: E402

# (module, function, label): each call of module.function runs under record_function(label)
PARTS = [(train, "make_targets", "1 targets"),
         (saliency, "discriminative_regions", "1 saliency"), (masking, "make_plan", "2 plan"),
         (masking, "split_plan", "2 split"), (train, "jepa_loss", "3-5 networks + loss"),
         (model, "level_mask", "3-4 level masks"), (torch.Tensor, "backward", "6 backward"),
         (train, "ema_update", "7 EMA")]


def labelled(fn, label):
    @functools.wraps(fn)
    def run(*a, **kw):
        with record_function(label):
            return fn(*a, **kw)
    return run


def part_of(event, labels):
    """Innermost labelled part above a profiler event ("other" if none)."""
    while event is not None:
        if event.name in labels:
            return event.name
        if event.name.startswith("Optimizer."):  # torch's own labels of step and zero_grad
            return "6 AdamW"
        event = event.cpu_parent
    return "other"


def profile_method(method, steps, extra):
    targs = config.parse_args(["--method", method, "--no-picture"] + extra)
    device = config.pick_device(targs, 0)
    torch.set_num_threads(1)  # op counts do not depend on threads; one thread is kind to a shared box
    torch.manual_seed(targs.seed)
    models = train.build_models(targs)
    optimizer = train.make_optimizer(models[0], models[1], targs)
    loader = data.build_train_loader(targs, targs.batch_size, 0, 1, device)
    gen = torch.Generator(device=device).manual_seed(targs.seed)
    autocast, scaler = config.make_autocast(targs, device)
    lam = train.lambda_at(1, targs, 2)  # 0.5 for dseq (half the samples DSeq plans, as bench.py), 0 for ijepa
    batches = (x for x, _ in loader)

    def step():
        with record_function("0 data"):
            images = next(batches)
        loss, stats = train.optimizer_step(models, [images], lam, optimizer, scaler, targs, gen, autocast, 1, device)
        train.ema_update(models[2], models[0], targs.ema[0])
        loss.tolist()  # the loop's read of the loss on a CPU
        return images, round(stats["context_tokens"].item()), round(stats["target_tokens"].item())

    step()  # warm-up: AdamW state, allocator
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            images, Lc, Lt = step()
    with profile(activities=[ProfilerActivity.CPU]) as plain:  # the last step's real tokens per image
        bench.plain_step(models, optimizer, images, Lc, Lt, targs.ema[0])
    plain = [e for e in plain.events() if e.name.startswith("aten::")]
    labels = {label for *_, label in PARTS} | {"0 data"}
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if not _has_aten_parent(e)]
    per_part = collections.defaultdict(lambda: [0, 0])
    for e in aten:
        per_part[part_of(e, labels)][0] += 1
    for e in top:
        per_part[part_of(e, labels)][1] += 1
    by_name = collections.Counter(e.name for e in top)
    self_cpu = collections.Counter()
    for e in prof.key_averages():
        self_cpu[e.key] += e.self_cpu_time_total
    total_cpu = sum(self_cpu.values()) or 1
    part_cpu = collections.Counter()  # inclusive: "1 targets" holds "1 saliency", the networks the masks
    for e in prof.events():
        if e.name in labels or e.name.startswith("Optimizer."):
            part_cpu[part_of(e, labels)] += e.cpu_time_total
    return {"aten_ops_per_step": len(aten) / steps, "plain_step_aten_ops": len(plain),
            "plain_step_top_ops": sum(not _has_aten_parent(e) for e in plain), "top_ops_per_step": len(top) / steps,
            "per_part": {k: {"aten_ops": a / steps, "top_ops": t / steps} for k, (a, t) in sorted(per_part.items())},
            "top_ops_by_count": {k: v / steps for k, v in by_name.most_common(15)},
            "self_cpu_share_noisy": {k: round(v / total_cpu, 3) for k, v in self_cpu.most_common(15)},
            "part_cpu_share_noisy": {k: round(v / total_cpu, 3) for k, v in sorted(part_cpu.items())}}


def _has_aten_parent(event):
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main(argv=None):
    p = argparse.ArgumentParser("profile_step.py", epilog="flags after -- go to train.py's parser")
    p.add_argument("--methods", nargs="+", default=["dseq", "ijepa"], choices=["dseq", "ijepa"])
    p.add_argument("--steps", type=int, default=4, help="profiled steps (after one warm-up step)")
    p.add_argument("--json", default=None, help="write the summary here, as the entry --entry (other entries are kept)")
    p.add_argument("--entry", default="after", help="name of this run in --json, e.g. before / after a change")
    argv = sys.argv[1:] if argv is None else argv
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    real = [getattr(module, name) for module, name, _ in PARTS]
    for module, name, label in PARTS:
        setattr(module, name, labelled(getattr(module, name), label))
    try:
        methods = {m: profile_method(m, args.steps, extra) for m in args.methods}
    finally:  # the modules as they were (a test calls main in its own process)
        for (module, name, _), fn in zip(PARTS, real):
            setattr(module, name, fn)
    out = {"command": "python scripts/profile_step.py " + shlex.join(argv), "torch": torch.__version__,
           "steps": args.steps, "methods": methods}
    for m, r in out["methods"].items():
        print(f"{m}: {r['aten_ops_per_step']:.0f} aten ops / step, {r['top_ops_per_step']:.0f} top-level; "
              f"bench.py's plain step {r['plain_step_aten_ops']} / {r['plain_step_top_ops']}")
        for part, n in r["per_part"].items():
            print(f"  {part:22} {n['aten_ops']:8.0f} {n['top_ops']:8.0f}")
    if args.json:
        saved = {}
        if os.path.exists(args.json):
            with open(args.json) as f:
                saved = json.load(f)
        with open(args.json, "w") as f:
            json.dump({**saved, args.entry: out}, f, indent=1)
    return out


if __name__ == "__main__":
    main()
