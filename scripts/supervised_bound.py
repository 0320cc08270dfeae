"""The supervised reference: what the demo's encoder reaches on the demo's data when it is told the labels.

    python scripts/supervised_bound.py --json results/shapes/supervised_bound-seed0.json --seed 0 [train.py flags]

Self-supervised numbers alone cannot say whether a budget is too small or an objective too weak. This
trains the same encoder (train.py's flags build it: the demo preset unless told otherwise) with a
linear head on its mean-pooled last-layer features and cross-entropy on the labels, for the same number
of steps, batch and crops as the pretraining run would take, then measures it with the SAME held-out kNN
monitor train.py logs (evaluate.knn_monitor). Its kNN is the ceiling a pretraining run of that budget
can be compared with; the random-init and pixel levels (docs/learning.md) are the floor. Optimiser:
AdamW, the run's --lr / --start-lr / --warmup-epochs / --final-lr on train.py's cosine, weight decay
0.05 (a common ViT value, not tuned). One seed per call (--seed).
"""
import argparse
import json
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository
import config  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="write the result here")
    p.add_argument("--weight-decay-sup", type=float, default=0.05, help="AdamW weight decay of this run")
    own, rest = p.parse_known_args(argv)
    args = config.parse_args(rest + ["--no-picture"])
    device = config.pick_device(args, 0)
    config.fit_threads(args, device)
    torch.manual_seed(args.seed)
    encoder = train.build_models(args)[0].to(device)  # the context encoder, as pretraining builds it
    loader = data.build_train_loader(args, args.batch_size, 0, 1, device)
    head = torch.nn.Linear(encoder.embed_dim, loader.num_classes).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=own.weight_decay_sup)
    steps_per_epoch = len(loader)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    start_knn = evaluate.knn_monitor(encoder, args, device)["top1"]
    step, correct, seen, t0 = 0, 0, 0, time.time()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            for g in opt.param_groups:
                g["lr"] = train.lr_at(step, args, total, warmup)  # the pretraining run's schedule
            pooled = evaluate.pooled_features(encoder, images, ["last"])["last"]  # (B, D): what the kNN reads
            logits = head(pooled)  # (B, classes)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if epoch == args.epochs - 1:  # training accuracy over the last epoch
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}", flush=True)
    knn = evaluate.knn_monitor(encoder, args, device)
    out = {"command": shlex.join(["python", "scripts/supervised_bound.py", *(sys.argv[1:] if argv is None else argv)]),
           "flags": rest, "seed": args.seed, "steps": step, "batch_size": args.batch_size, "epochs": args.epochs,
           "knn_top1_step0": start_knn, "knn_top1": knn["top1"], "knn_top5": knn["top5"],
           "train_top1_last_epoch": 100.0 * correct / max(1, seen), "wall_s": round(time.time() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(own.json)), exist_ok=True)
    with open(own.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"supervised: kNN {start_knn:.1f} at step 0 -> {knn['top1']:.1f} after {step} steps; "
          f"train top-1 {out['train_top1_last_epoch']:.1f} (last epoch) -> {own.json}")
    return out


if __name__ == "__main__":
    main()
