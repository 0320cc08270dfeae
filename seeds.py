"""
Numbers with error bars: pretrain + evaluate named configurations over several seeds, then write
the mean +- std table.

    python seeds.py --table demo --seeds 0 1 2                          # the README's demo table (the noisy_shapes set)
    python seeds.py --table ablations --seeds 0 1 2                     # flat / order / replicate on the demo
    python seeds.py --table fmnist --seeds 0 1 --data-path ~/data/fmnist   # the Fashion-MNIST table
    python seeds.py --config my_table.json --seeds 0 1 2 --table mine   # your own configurations

A configuration is a train.py argv (None for evaluation-only baselines: random init, raw pixels)
and an evaluate.py argv. For every configuration and seed S:
    python train.py TRAIN_ARGV --seed S --out-dir RUNS/NAME/seedS          (skipped when complete)
    python evaluate.py [--checkpoint RUNS/NAME/seedS/checkpoint.pt] EVAL_ARGV --seed S
                       --out-dir RUNS/NAME/seedS --eval-name seeds       (skipped when written)
(--checkpoint checkpoint-ep0004.pt evaluates that checkpoint of each run, one train.py --keep-every kept,
as eval_seeds-ep0004.json.)
A pretraining is complete when its out dir holds checkpoint.pt and metrics.jsonl has the end-of-run
kNN line (epoch = the configured epochs). An interrupted pretraining resumes from its checkpoint
(train.py's auto-resume), so rerunning the same command finishes and reuses what is there. A finished
run is reused only if its config.json has the flags the table asks for (those train.py would refuse
to resume with another value); anything else stops with an error naming the flag, never a silent mix.
--runs-dir takes several folders (e.g. runs made on a GPU machine and on this one): each run is looked
up in them in order, an evaluated one first; new work goes into the first folder.

Writes RESULTS/TABLE.json (per-seed values, mean, sample std (n - 1), n, the argvs) and RESULTS/TABLE.md
(the table, also printed). Two rows TIE on a column when their means differ by no more than the sum
of their stds; the best row and every row tied with it are bold, and the text under the table says
which differences are ties. "{data}" in an argv is replaced by --data-path. Runs in this process
(train.main / evaluate.main), one after the other; set OMP_NUM_THREADS as for train.py.
"""

import argparse
import json
import os
import shlex
import statistics
import sys

import config
import evaluate
import pictures
import train

# The README's tables. Edit here (or pass --config FILE.json with the same shape) to change them.
FMNIST_TRAIN = ["--preset", "fashion-mnist-tiny", "--data-path", "{data}", "--model", "micro", "--pred-dim", "64",
                "--pred-depth", "3", "--epochs", "2", "--warmup-epochs", "0.5", "--batch-size", "128",
                "--num-workers", "0", "--knn-every", "0", "--ckpt-every", "100"]
FMNIST_MODEL = ["--preset", "fashion-mnist-tiny", "--data-path", "{data}", "--model", "micro", "--pred-dim", "64",
                "--pred-depth", "3", "--num-workers", "0"]
# The linear probe on cached, PCA-whitened features: the one probe here that reaches a converged fit on
# frozen ViT features (evaluate.py --probe-whiten; the BatchNorm-only grid stays short of it).
PROBE = ["--probe-whiten"]
ABLATION_EVAL = ["--eval", "knn,linear,regions", *PROBE]  # regions: at the run's own alpha
TABLES = {
    "demo": {  # python train.py (the demo preset), 6 epochs on noisy_shapes
        "dseq-causal": {"train": ["--num-workers", "0"], "eval": ["--eval", "knn,linear,picture", *PROBE]},
        "dseq-replicate": {"train": ["--num-workers", "0", "--dseq-pass", "replicate"],
                           "eval": ["--eval", "knn,linear,picture", *PROBE]},
        "ijepa": {"train": ["--num-workers", "0", "--method", "ijepa"], "eval": ["--eval", "knn,linear,picture", *PROBE]},
        "random-init": {"train": None, "eval": ["--init", "random", "--num-workers", "0", "--eval", "knn,linear,picture", *PROBE]},
        "pixels": {"train": None, "eval": ["--pixels", "--num-workers", "0", "--eval", "knn,linear", *PROBE]},
    },
    # The paper's cheap table-4/5 rows on the demo (each a train.py ablation flag on the default DSeq-JEPA
    # run); "ranked regions" shows how many plans could differ (with 1 ranked region per image, all rows
    # build the same plan "R_1 -> background").
    "ablations": {
        "dseq-causal": {"train": ["--num-workers", "0"], "eval": ABLATION_EVAL},
        "flat": {"train": ["--num-workers", "0", "--prediction", "flat"], "eval": ABLATION_EVAL},
        "random-order": {"train": ["--num-workers", "0", "--region-order", "random"], "eval": ABLATION_EVAL},
        "reverse-order": {"train": ["--num-workers", "0", "--region-order", "reverse"], "eval": ABLATION_EVAL},
        "replicate": {"train": ["--num-workers", "0", "--dseq-pass", "replicate"], "eval": ABLATION_EVAL},
    },
    "fmnist": {  # the fashion-mnist-tiny preset shrunk to a 2-core CPU (README)
        "dseq-causal": {"train": FMNIST_TRAIN, "eval": ["--eval", "knn,linear", *PROBE]},
        "dseq-replicate": {"train": FMNIST_TRAIN + ["--dseq-pass", "replicate"], "eval": ["--eval", "knn,linear", *PROBE]},
        "ijepa": {"train": FMNIST_TRAIN + ["--method", "ijepa"], "eval": ["--eval", "knn,linear", *PROBE]},
        "random-init": {"train": None, "eval": ["--init", "random", *FMNIST_MODEL, "--eval", "knn,linear", *PROBE]},
        "pixels": {"train": None, "eval": ["--pixels", "--preset", "fashion-mnist-tiny", "--data-path", "{data}",
                                           "--num-workers", "0", "--eval", "knn,linear", *PROBE]},
    },
}
# Table columns: (title, eval, features, metric). "last" falls back to "pixels" for the pixel baseline.
COLUMNS = [("kNN top-1", "knn", "last", "val_top1"),
           ("linear top-1 (last)", "linear", "last", "val_top1"),
           ("linear top-1 (concat4)", "linear", "concat4", "val_top1"),
           ("linear train top-1 (last)", "linear", "last", "train_top1"),
           ("top-region overlap", "picture", "saliency", "top_region_object_overlap"),
           ("ranked regions", "regions", "saliency", "ranked_regions_per_image")]
EVAL_NAME = "seeds"
LAST = "checkpoint.pt"  # the checkpoint of a finished run; --checkpoint names a kept one instead


def eval_name(checkpoint):
    """The evaluation's name for a run's checkpoint file: "seeds" for checkpoint.pt, "seeds-ep0004" for
    checkpoint-ep0004.pt, so that the tables of two checkpoints of the same runs never mix."""
    return EVAL_NAME if checkpoint == LAST else f"{EVAL_NAME}-{checkpoint.removeprefix('checkpoint-').removesuffix('.pt')}"


def get_args_parser():
    p = argparse.ArgumentParser("seeds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default="demo", help=f"table name: one of {', '.join(TABLES)}, or any name with --config")
    p.add_argument("--config", default=None, help="JSON file {name: {\"train\": argv or null, \"eval\": argv}} "
                                                  "instead of the built-in table")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (README tables: at least 3)")
    p.add_argument("--only", nargs="+", default=None, help="run only these configurations (the table still "
                                                           "aggregates every configuration that has results)")
    p.add_argument("--data-path", default=None, help="replaces {data} in the argvs (Fashion-MNIST: the IDX folder)")
    p.add_argument("--train-extra", default="", help="flags appended to every train.py argv, e.g. \"--epochs 2\"")
    p.add_argument("--eval-extra", default="", help="flags appended to every evaluate.py argv")
    p.add_argument("--runs-dir", nargs="+", default=["runs"], help="pretraining / evaluation outputs: RUNS/NAME/seedS/; "
                   "with several folders a run is looked up in each (an evaluated one first), new work goes to the first")
    p.add_argument("--results-dir", default="results", help="RESULTS/TABLE.json and RESULTS/TABLE.md go here")
    p.add_argument("--checkpoint", default=LAST, help="evaluate this file of every run folder: checkpoint.pt (the "
                   "finished run) or a numbered one that train.py --keep-every kept, e.g. checkpoint-ep0004.pt "
                   "(its evaluations are eval_seeds-ep0004.json; name the table apart with --table)")
    p.add_argument("--aggregate", action="store_true",
                   help="run nothing: only tabulate the results already in --runs-dir (e.g. runs made on another "
                        "machine). A pretraining without its evaluation JSON still gives the kNN column from its "
                        "end-of-run kNN line in metrics.jsonl (train.py runs the same evaluate.knn_monitor)")
    return p


def load_configs(args):
    """-> {name: {"train": argv or None, "eval": argv}} with {data} and the extra flags filled in."""
    if args.config:
        with open(args.config) as f:
            configs = json.load(f)
    elif args.table in TABLES:
        configs = TABLES[args.table]
    else:
        sys.exit(f"error: --table {args.table} is not built in ({', '.join(TABLES)}); give --config FILE.json")
    needs_data = any("{data}" in a for c in configs.values() for a in (c["train"] or []) + c["eval"])
    if needs_data and not args.data_path:
        sys.exit(f"error: table {args.table} needs --data-path (the dataset folder)")
    fill = lambda argv, extra: [a.replace("{data}", args.data_path or "") for a in argv] + extra.split()
    return {name: {"train": None if c["train"] is None else fill(c["train"], args.train_extra),
                   "eval": fill(c["eval"], args.eval_extra)} for name, c in configs.items()}


def pretraining_complete(out):
    """True when out/ holds checkpoint.pt and metrics.jsonl's end-of-run kNN line (epoch = epochs)."""
    ckpt, log, cfg = (os.path.join(out, f) for f in ("checkpoint.pt", "metrics.jsonl", "config.json"))
    if not all(os.path.isfile(f) for f in (ckpt, log, cfg)):
        return False
    with open(cfg) as f:
        epochs = json.load(f)["epochs"]
    with open(log) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return any("knn_top1" in r and r.get("epoch") == epochs for r in rows)


def check_pretraining(out, train_argv):
    """Stop (sys.exit, one line) if the pretraining in out/ was made with other run-defining flags than
    train_argv asks for: the flags train.py refuses to resume with another value (all but
    config.RESUME_FREE: device, amp, compile, --pack-splits, logging, ...). Keys its config.json
    lacks (an older run) are not compared, except config.BEFORE_FLAG's (read as their old value)."""
    with open(os.path.join(out, "config.json")) as f:
        saved = {**config.BEFORE_FLAG, **json.load(f)}  # a flag newer than the run reads as its old value
    wanted = config.parse_args(train_argv + ["--out-dir", out])
    bad = config.flag_differences(saved, wanted)
    if bad:
        sys.exit(f"error: {out} was trained with " + ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in bad)
                 + " but this table asks for " + ", ".join(f"{getattr(wanted, k)}" for k in bad)
                 + ": a finished run of other flags is never reused; move it away or use another --runs-dir")


def find_run(name, seed, runs_dirs, trained, knn_only=False, report=EVAL_NAME):
    """Out dir of one configuration at one seed among runs_dirs: the first that holds its evaluation
    JSON (eval_REPORT.json), else the first with a complete pretraining (trained configurations), else
    (knn_only, for --aggregate) the first with an end-of-run kNN line, else the first folder."""
    outs = [os.path.join(d, name, f"seed{seed}") for d in runs_dirs]
    tests = [lambda o: os.path.isfile(os.path.join(o, f"eval_{report}.json"))]
    tests += [pretraining_complete] if trained else []
    tests += [lambda o: end_of_run_knn(o) is not None] if trained and knn_only else []
    return next((o for test in tests for o in outs if test(o)), outs[0])


def run_seed(name, cfg, seed, runs_dirs, checkpoint=LAST):
    """Pretrain (unless complete) and evaluate (unless written) one configuration at one seed, at its
    checkpoint file `checkpoint`. -> path of its evaluation JSON."""
    out = find_run(name, seed, runs_dirs, cfg["train"] is not None, report=eval_name(checkpoint))
    report = os.path.join(out, f"eval_{eval_name(checkpoint)}.json")
    eval_argv = list(cfg["eval"])
    if cfg["train"] is not None:
        if pretraining_complete(out):
            check_pretraining(out, cfg["train"] + ["--seed", str(seed)])
            print(f"[{name} seed {seed}] pretraining complete in {out}: skipped")
        else:
            argv = cfg["train"] + ["--seed", str(seed), "--out-dir", out]
            print(f"[{name} seed {seed}] python train.py {' '.join(argv)}")
            train.main(argv)
            if not pretraining_complete(out):  # train.py returns normally when a signal stops it
                sys.exit(f"error: pretraining {out} stopped before its last epoch (preempted?); nothing was "
                         f"evaluated. Rerun the same command to resume it")
        eval_argv = ["--checkpoint", os.path.join(out, checkpoint)] + eval_argv
    if os.path.isfile(report):
        print(f"[{name} seed {seed}] evaluation {report} exists: skipped")
        return report
    argv = eval_argv + ["--seed", str(seed), "--out-dir", out, "--eval-name", eval_name(checkpoint)]
    print(f"[{name} seed {seed}] python evaluate.py {' '.join(argv)}")
    evaluate.main(argv)
    return report


def end_of_run_knn(out):
    """kNN top-1 of train.py's end-of-run line in out/metrics.jsonl (k = 20, last features: the same
    evaluate.knn_monitor an evaluation's kNN runs), or None when the run did not finish."""
    log, cfg = os.path.join(out, "metrics.jsonl"), os.path.join(out, "config.json")
    if not (os.path.isfile(log) and os.path.isfile(cfg)):
        return None
    with open(cfg) as f:
        epochs = json.load(f)["epochs"]
    with open(log) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    hits = [r["knn_top1"] for r in rows if "knn_top1" in r and r.get("epoch") == epochs]
    return hits[-1] if hits else None


def read_values(path):
    """One evaluation JSON -> {column title: value} for the COLUMNS it has (kNN: k = 20 or its only k)."""
    with open(path) as f:
        rows = json.load(f)["results"]
    out = {}
    for title, ev, feats, metric in COLUMNS:
        hits = [r for r in rows if r["eval"] == ev and r["metric"] == metric and r["value"] is not None
                and (r["features"] == feats or (feats == "last" and r["features"] == "pixels"))]
        if ev == "knn" and len(hits) > 1:
            hits = [r for r in hits if r.get("k") == 20] or hits[:1]
        if hits:
            out[title] = hits[0]["value"]
    return out


def aggregate(per_seed):
    """{seed: {column: value}} -> {column: {"mean", "std", "n"}}; std is the sample std (n - 1),
    0 for a single seed."""
    out = {}
    for title, *_ in COLUMNS:
        values = [v[title] for v in per_seed.values() if title in v]
        if values:
            out[title] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def ties(stats):
    """{row: {"mean", "std"}} for one column -> (best row, rows tied with it, rows clearly below).
    Tie: |mean_a - mean_b| <= std_a + std_b (the difference is within the seeds' spread)."""
    best = max(stats, key=lambda r: stats[r]["mean"])
    tied = [r for r in stats if r != best and
            stats[best]["mean"] - stats[r]["mean"] <= stats[best]["std"] + stats[r]["std"]]
    below = [r for r in stats if r != best and r not in tied]
    return best, tied, below


def markdown(table, rows, seeds):
    """The table (mean +- std, best and tied rows bold) and one line per column naming the ties."""
    cols = [t for t, *_ in COLUMNS if any(t in r["stats"] for r in rows.values())]
    lines = [f"| encoder ({len(seeds)} seeds: {', '.join(map(str, seeds))}) | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    verdicts, bold = [], {}
    for c in cols:
        stats = {name: r["stats"][c] for name, r in rows.items() if c in r["stats"]}
        best, tied, below = ties(stats)
        bold[c] = {best, *tied}
        text = f"- {c}: best {best} ({stats[best]['mean']:.2f} +- {stats[best]['std']:.2f})"
        text += f"; tied with it (difference within the spread): {', '.join(tied)}" if tied else "; no ties"
        text += f"; below it: {', '.join(below)}" if below else ""
        verdicts.append(text + ".")
    for name, r in rows.items():
        cells = []
        for c in cols:
            if c not in r["stats"]:
                cells.append("-")
                continue
            s = r["stats"][c]
            digits = 3 if s["mean"] <= 1 and "overlap" in c else 2
            cell = f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}"
            cell += f" (n = {s['n']})" if s["n"] < len(seeds) else ""
            cells.append(f"**{cell}**" if name in bold[c] and len(rows) > 1 else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([f"Table `{table}`: mean +- sample std over seeds; bold = best or tied with the best "
                      "(|difference| <= sum of the two stds).", "", *lines, "", *verdicts]) + "\n"


def curves(rows, runs_dirs, seeds):
    """Per trained row: its seeds' kNN and target_std curves from metrics.jsonl (train.py's monitor),
    as {"knn": [[step, mean, std, n], ...], "target_std": [...]} over the steps every seed logged."""
    out = {}
    for name, r in rows.items():
        if r["train"] is None:
            continue
        per_seed = []
        for s in seeds:
            log = os.path.join(find_run(name, s, runs_dirs, True, True), "metrics.jsonl")
            if os.path.isfile(log):
                with open(log) as f:
                    per_seed.append([json.loads(line) for line in f if line.strip()])
        curve = {}
        for key, field in (("knn", "knn_top1"), ("target_std", "target_std")):
            by_step = [{row["step"]: row[field] for row in rows_ if field in row} for rows_ in per_seed]
            steps = sorted(set.intersection(*(set(b) for b in by_step))) if by_step else []
            curve[key] = [[t, statistics.fmean(v := [b[t] for b in by_step]),
                           statistics.stdev(v) if len(v) > 1 else 0.0, len(v)] for t in steps]
        if curve["knn"]:
            out[name] = curve
    return out


def curves_picture(rows, curve, path):
    """The table's learning curves side by side (kNN, target_std): each trained row's mean with its
    +- std band over seeds; the random-init and raw-pixel kNN means as dashed levels."""
    palette = [pictures.COLOURS["dseq"], (150, 90, 180), (200, 140, 30), (60, 160, 160), (120, 60, 20)]
    levels = [(f"{name} (mean)", pictures.COLOURS["random" if "random" in name else "pixels"],
               rows[name]["stats"][COLUMNS[0][0]]["mean"])
              for name in rows if rows[name]["train"] is None and COLUMNS[0][0] in rows[name]["stats"]]
    knn, std = {"title": "held-out kNN top-1 (%), mean +- std over seeds", "series": [], "bands": [],
                "levels": levels}, {"title": "target_std (-> 0 = collapse), mean over seeds", "series": [], "log": True}
    others = iter(palette)
    for name, c in curve.items():
        colour = pictures.COLOURS["ijepa"] if "ijepa" in name else next(others)
        knn["series"].append((name, colour, [(t, m) for t, m, _, _ in c["knn"]]))
        knn["bands"].append((name, colour, [(t, m - sd, m + sd) for t, m, sd, _ in c["knn"]]))
        std["series"].append((name, colour, [(t, m) for t, m, _, _ in c["target_std"]]))
    return pictures.chart([knn, std], path)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    configs = load_configs(args)
    unknown = sorted(set(args.only or []) - set(configs))
    if unknown:
        sys.exit(f"error: --only {unknown}: not in table {args.table} ({', '.join(configs)})")
    for name, cfg in configs.items():
        if not args.aggregate and (args.only is None or name in args.only):
            for seed in args.seeds:
                run_seed(name, cfg, seed, args.runs_dir, args.checkpoint)
    rows = {}
    for name, cfg in configs.items():
        trained = cfg["train"] is not None
        # the end-of-run kNN line is checkpoint.pt's: no stand-in for another checkpoint's evaluation
        knn_only = args.aggregate and args.checkpoint == LAST
        outs = {s: find_run(name, s, args.runs_dir, trained, knn_only, eval_name(args.checkpoint)) for s in args.seeds}
        reports = {s: os.path.join(out, f"eval_{eval_name(args.checkpoint)}.json") for s, out in outs.items()}
        for s, out in outs.items():  # every run tabulated was trained with the table's flags
            if trained and os.path.isfile(os.path.join(out, "config.json")):
                check_pretraining(out, cfg["train"] + ["--seed", str(s)])
        per_seed = {s: read_values(p) for s, p in reports.items() if os.path.isfile(p)}
        for s, out in outs.items():  # --aggregate: the kNN of a pretraining whose evaluation is missing
            knn = end_of_run_knn(out) if knn_only and trained and s not in per_seed else None
            if knn is not None:
                per_seed[s] = {COLUMNS[0][0]: knn}
        if per_seed:
            rows[name] = {"train": cfg["train"], "eval": cfg["eval"], "per_seed": per_seed,
                          "stats": aggregate(per_seed), "reports": list(reports.values())}
    if not rows:
        sys.exit("error: no evaluation results to aggregate")
    os.makedirs(args.results_dir, exist_ok=True)
    text = markdown(args.table, rows, args.seeds)
    command = "python seeds.py " + shlex.join(argv if argv is not None else sys.argv[1:])  # copy-pastable
    path = os.path.join(args.results_dir, f"{args.table}.json")
    curve = curves(rows, args.runs_dir, args.seeds) if args.checkpoint == LAST else {}  # finished runs' logs
    with open(path, "w") as f:
        json.dump({"table": args.table, "seeds": args.seeds, "command": command, "columns": COLUMNS,
                   "tie_rule": "|mean_a - mean_b| <= std_a + std_b", "rows": rows, "curves": curve}, f, indent=1)
    with open(os.path.join(args.results_dir, f"{args.table}.md"), "w") as f:
        f.write(f"`{command}`\n\n" + text)
    if curve:  # the learning curves of the table's trained rows, beside it
        curves_picture(rows, curve, os.path.join(args.results_dir, f"{args.table}-learning.png"))
    print("\n" + text + f"wrote {path}, {args.table}.md" + (f" and {args.table}-learning.png" if curve else ""))
    return rows


if __name__ == "__main__":
    main()
