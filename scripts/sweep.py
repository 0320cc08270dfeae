"""Recipe sweeps: train.py once per variant, the kNN curve of each into one JSON.

    python scripts/sweep.py --out results/shapes/sweep-lr.json --base "--method ijepa" \
        --variant lr1e-3="--lr 1e-3" --variant lr2e-3="--lr 2e-3"

Each variant is one `python train.py` run (the demo preset unless --base says otherwise) with
--knn-every set, so its metrics.jsonl holds the held-out kNN of the untrained target encoder (step
0: the random-init level at the SAME init) and of the target encoder every few epochs. The JSON
keeps per variant: the exact command, kNN at step 0 and at the end, the gap, the curve, the last
loss and target_std. A finished run (seeds.pretraining_complete: its checkpoint and the end-of-run
kNN line) is reused, so a sweep that stopped can be rerun with the same command; one trained with
other flags (another --base, or a preset that changed since) stops the sweep with an error. One seed
per variant: a sweep finds candidates; the seeds table (seeds.py) measures the one that is chosen.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository
from seeds import check_pretraining, pretraining_complete  # noqa: E402  (checkpoint.pt + the end-of-run kNN line)


def read_metrics(path):
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    knn = {}  # step -> top1 (a step logged twice after a kill -9 keeps its last row)
    for r in rows:
        if "knn_top1" in r:
            knn[r["step"]] = r["knn_top1"]
    train = [r for r in rows if "loss" in r]
    return knn, train


def end_mean(train, key, last=5):
    """Mean of `key` over the last `last` logged training rows, or None where the run does not log it."""
    rows = train[-last:]
    return sum(r[key] for r in rows) / len(rows) if rows and key in rows[-1] else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the sweep's JSON (results/...)")
    p.add_argument("--runs-dir", default="runs/sweep", help="one train.py out-dir per variant below this")
    p.add_argument("--base", default="", help="flags every variant gets, one string")
    p.add_argument("--variant", action="append", required=True, metavar='NAME="FLAGS"',
                   help="a variant: its name and its extra flags (repeat the option)")
    p.add_argument("--knn-every", type=int, default=2, help="epochs between kNN checks")
    a = p.parse_args()
    out = json.load(open(a.out)) if os.path.exists(a.out) else {"runs": {}}
    out["command"] = shlex.join(["python", "scripts/sweep.py", *sys.argv[1:]])
    for spec in a.variant:
        name, _, flags = spec.partition("=")
        run_dir = os.path.join(a.runs_dir, name)
        cmd = [sys.executable, "train.py", *shlex.split(a.base), *shlex.split(flags),
               "--knn-every", str(a.knn_every), "--no-picture", "--out-dir", run_dir]
        t0, old = time.time(), out["runs"].get(name, {})
        trained = not pretraining_complete(os.path.join(ROOT, run_dir)) or old.get("flags") != flags
        if not trained:  # reused only if trained with these flags: a changed --base or preset is an error
            check_pretraining(os.path.join(ROOT, run_dir), cmd[2:])
        if trained:
            print(f"[sweep] {name}: {shlex.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        knn, train = read_metrics(os.path.join(ROOT, run_dir, "metrics.jsonl"))
        steps = sorted(knn)
        row = {"flags": flags, "command": shlex.join(["python", *cmd[1:]]),
               "knn_step0": knn[steps[0]], "knn_end": knn[steps[-1]], "gap": knn[steps[-1]] - knn[steps[0]],
               "knn_curve": [[s, knn[s]] for s in steps], "steps": steps[-1],
               "loss_end": train[-1]["loss"] if train else None,
               "target_std_end": train[-1].get("target_std") if train else None,
               # DSeq's sequences at the end: ranked regions R_1..R_{N-1} per image, and the share of the
               # samples that followed a DSeq plan (the rest: lambda's coin, or < 2 regions)
               "ranked_regions_end": end_mean(train, "ranked_regions"),
               "dseq_share_end": end_mean(train, "dseq_share"),
               "wall_s": round(time.time() - t0, 1) if trained else old.get("wall_s")}
        out["runs"][name] = row
        print(f"[sweep] {name}: kNN {row['knn_step0']:.1f} -> {row['knn_end']:.1f} (gap {row['gap']:+.1f}), "
              f"loss {row['loss_end']}, target_std {row['target_std_end']}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
