"""
One GPU check, one command: everything a single-GPU machine (no internet, a preinstalled PyTorch
>= 2.5, for FlexAttention) can tell us; each stage has its own time limit (about 11 minutes in all
at the defaults; --stages picks some).

    bash scripts/gpu_check.sh                 # on the GPU machine; writes results/gpu/
    python scripts/gpu_check.py --dry         # tiny CPU version of every stage (CI runs it)

Stages, each a subprocess with its own time limit (a slow stage is cut off, reported, and the
next one still runs):
  1. tests     the test suite on CUDA: first the `cuda`-marked tests (tests-cuda), then every test
               not marked slow (tests; the dry mode leaves this one out: CI runs the suite anyway)
  2. bench     bench.py, bf16, ViT-B/16 at 224 px: step time, img/s, MFU, peak memory for I-JEPA,
               DSeq causal and DSeq replicate (the "+blobs" rows: every image has N-1 = 4 ranked
               regions, the costliest DSeq plan); bench-compile: the same with torch.compile
               (graphs compiled; whether Inductor survives the run's dynamic shapes)
  3. pack      scripts/pack_bench.py: the blocks of ViT-B/16 and its predictor on real plans at batch
               64 and 256, padded vs 4 sub-batches vs all tokens packed in one FlexAttention row
  4. fmnist-table  only if the Fashion-MNIST IDX files are in data/fashion-mnist (--fmnist): the
               README's seeds.py table (DSeq causal / replicate / I-JEPA / random init / pixels),
               one process per configuration and seed at once
  (--dry runs a tiny CPU version of tests-cuda, bench and pack, plus two tiny pretrainings)
Writes OUT/<stage>.json (command, return code, seconds, output tail, parsed numbers) and
OUT/summary.md (the tables), OUT = results/gpu (results/gpu-dry with --dry).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PY = sys.executable


def stages(args):
    """name -> (command, time limit in seconds, output folder of a training run or None)."""
    out = {}
    if args.dry:  # tiny model, few steps, CPU: checks that every stage runs, not how fast (a shared
        # CPU can be slow, so the dry limits only catch hangs)
        out["tests-cuda"] = ([PY, "-m", "pytest", "-q", "-m", "cuda", "tests/test_gpu_ready.py"], 600, None)
        model = ["--model", "micro", "--img-size", "32", "--patch-size", "4", "--pred-dim", "32", "--pred-depth", "2",
                 "--alpha", "0.1", "--device", "cpu"]
        out["bench"] = ([PY, "bench.py", *model, "--batch-size", "4", "--steps", "1", "--warmup", "0", "--no-memory",
                         "--maps", "blobs", "--sal-batch", "8", "--sal-repeats", "1", "--loader-images", "2",
                         "--json", os.path.join(args.out, "bench_raw.json")], 600, None)
        out["pack"] = ([PY, "scripts/pack_bench.py", "--dry", "--json", os.path.join(args.out, "pack_bench.json")],
                       600, None)
        runs = [*model, "--batch-size", "16", "--epochs", "1", "--num-train", "32", "--num-val", "16",
                "--num-workers", "0", "--no-picture", "--knn-every", "0", "--warmup-epochs", "0"]
        for method in ("dseq", "ijepa"):  # a tiny pretraining each, ending with the held-out kNN
            run_dir = os.path.join(args.out, f"pretrain-{method}")
            out[f"pretrain-{method}"] = ([PY, "train.py", *runs, "--method", method, "--out-dir", run_dir,
                                          "--no-auto-resume"], 600, run_dir)
    else:
        out["tests-cuda"] = ([PY, "-m", "pytest", "-q", "-m", "cuda"], args.cuda_tests_limit, None)
        out["tests"] = ([PY, "-m", "pytest", "-q", "-m", "not slow and not cuda"], args.tests_limit, None)
        vitb = [PY, "bench.py", "--device", "cuda", "--model", "base", "--img-size", "224", "--patch-size", "16",
                "--pred-dim", "384", "--pred-depth", "6", "--batch-size", str(args.batch_size), "--amp", "bf16",
                "--maps", "blobs", "--steps", "5", "--warmup", "3"]
        # Eager bf16 (the default) gives the numbers; the compiled run checks that torch.compile survives
        # a run's dynamic shapes (on torch 2.11 it did not: README, known limitations).
        out["bench"] = ([*vitb, "--sal-batch", "256", "--loader-images", "64",
                         "--json", os.path.join(args.out, "bench_raw.json"), *args.bench_extra.split()],
                        args.bench_limit, None)
        out["bench-compile"] = ([*vitb, "--compile", "--pack-time-batch", "0", "--sal-batch", "8",
                                 "--json", os.path.join(args.out, "bench_compile.json"), *args.bench_extra.split()],
                                args.bench_limit, None)
        out["pack"] = ([PY, "scripts/pack_bench.py", "--json", os.path.join(args.out, "pack_bench.json")],
                       args.pack_limit, None)
        if os.path.isdir(os.path.join(ROOT, args.fmnist)):
            # The README's Fashion-MNIST table (seeds.py): one process per configuration and seed
            # at once (a micro ViT leaves an H200 mostly idle), then the same command over all
            # seeds, which finds every run finished and writes the table: what a user reruns, one
            # run after the other.
            table = (f"seeds.py --table fmnist --data-path {args.fmnist} --runs-dir {args.out}/runs-fmnist "
                     f"--results-dir {args.out} --train-extra=--no-compile")
            jobs = [f"--only {c} --seeds {s}" for s in args.fmnist_seeds for c in ("dseq-causal", "dseq-replicate", "ijepa")]
            jobs += [f"--only random-init pixels --seeds {s}" for s in args.fmnist_seeds]
            par = " & ".join(f"OMP_NUM_THREADS=1 {PY} {table} {j} > {args.out}/job{i}.log 2>&1" for i, j in enumerate(jobs))
            seeds = " ".join(map(str, args.fmnist_seeds))
            out["fmnist-table"] = (["bash", "-c", f"{par} & wait; {PY} {table} --seeds {seeds}"], args.table_limit, None)
    return out


def run_stage(name, cmd, limit, run_dir):
    """Run one stage under its time limit; returns its record (also written to OUT/name.json)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    shown = " ".join("python" if c == PY else c for c in cmd).replace(PY + " ", "python ")
    rec = {"stage": name, "command": shown, "limit_s": limit, "seconds": round(time.perf_counter() - t, 1),
           "returncode": rc, "ok": rc == 0, "tail": text[-4000:]}
    metrics = os.path.join(ROOT, run_dir or "", "metrics.jsonl")
    if run_dir and os.path.exists(metrics):
        rows = [json.loads(l) for l in open(metrics)]
        knn = [r for r in rows if "knn_top1" in r]
        steps = [r for r in rows if "step_time" in r]
        rec["knn_top1"] = knn[-1]["knn_top1"] if knn else None
        rec["final_loss"] = steps[-1]["loss"] if steps else None
        rec["median_img_per_s"] = sorted(r["img_per_s"] for r in steps)[len(steps) // 2] if steps else None
        rec["peak_mem_mb"] = max((r["peak_mem_mb"] for r in steps), default=None)
    return rec


def summary(records, out, commit=None):
    """Markdown tables of what the stages measured."""
    lines = [f"code: commit {commit}", ""] if commit else []
    lines += ["| stage | ok | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['ok']} ({r['returncode']}) | {r['seconds']} | {r['limit_s']} |" for r in records]
    raw = os.path.join(out, "bench_raw.json")
    if os.path.exists(raw):
        b = json.load(open(raw))
        m = b["machine"]
        lines += ["", f"bench: {m['gpu'] or m['cpu']}, torch {m['torch']}, amp {b['amp']}, compile "
                  f"{b['config']['compile']}, {b['config']['model']} {b['config']['img_size']} px / "
                  f"{b['config']['patch_size']}, batch {b['config']['batch_size']}, graphs compiled "
                  f"{b.get('graphs_compiled', '-')}, recompiles while timing {b.get('recompiles_during_timing', '-')}", "",
                  "| config | step ms | img/s | x I-JEPA | MFU | peak MiB | dseq | enc tok | pred tok |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in b["rows"].items():
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "-"
            mem = f"{r['mem_mib']:.0f}" if r.get("mem_mib") else "-"
            lines.append(f"| {name} | {r['wall_ms']:.1f} | {r['img_s']:.0f} | {r['ratio_wall']:.2f} | {mfu} | {mem} | "
                         f"{r['dseq']:.2f} | {r['enc_real']:.0f}/{r['enc_pad']:.0f} | {r['pred_real']:.0f}/{r['pred_pad']:.0f} |")
        if "pipeline_img_s_core" in b.get("loader", {}):
            lo = b["loader"]
            lines += ["", f"loader: {lo['pipeline_img_s_core']:.0f} img/s per core (500x375 JPEG -> 224 px); "
                      f"plain PIL loop {lo['pil_loop_img_s_core']:.0f}"]
    pack = os.path.join(out, "pack_bench.json")
    if os.path.exists(pack):
        pb = json.load(open(pack))
        lines += ["", f"padding vs 4 and 8 sub-batches vs FlexAttention packing ({pb['device']}, torch {pb['torch']}; "
                  "blocks forward + backward, ms; waste = share of computed tokens that are padding)", "",
                  "| batch | plan | network | pad ms | waste | split4 ms | waste | split8 ms | waste | flex ms | waste |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pb["rows"]:
            lines.append(f"| {r['batch']} | {r['plan']} | {r['net']} | " + " | ".join(
                f"{r[v]['ms']:.2f} | {100 * r[v]['waste']:.0f} %" for v in ("pad", "split4", "split8", "flex")) + " |")
    table = os.path.join(out, "fmnist.md")
    if os.path.exists(table):
        lines += ["", "Fashion-MNIST table (seeds.py):", "", open(table).read()]
    pre = [r for r in records if r["stage"].startswith("pretrain")]
    if pre:
        lines += ["", "| pretraining | kNN top-1 | final loss | img/s | peak MiB |", "|---|---|---|---|---|"]
        for r in pre:
            knn = f"{r['knn_top1']:.2f}" if r.get("knn_top1") is not None else "-"
            loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
            ips = f"{r['median_img_per_s']:.0f}" if r.get("median_img_per_s") else "-"
            mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") else "-"
            lines.append(f"| {r['stage'][9:]} | {knn} | {loss} | {ips} | {mem} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser("gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny CPU version of every stage (what CI runs)")
    p.add_argument("--out", default=None, help="results folder (default results/gpu, or results/gpu-dry with --dry)")
    p.add_argument("--fmnist", default=os.path.join("data", "fashion-mnist"),
                   help="Fashion-MNIST IDX files (relative to the repository); the table runs only if they exist")
    p.add_argument("--fmnist-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the Fashion-MNIST table")
    p.add_argument("--batch-size", type=int, default=128, help="bench batch size (ViT-B/16, 224 px)")
    p.add_argument("--cuda-tests-limit", type=int, default=45, help="seconds for the cuda-marked tests")
    p.add_argument("--tests-limit", type=int, default=90, help="seconds for the rest of the suite (not slow)")
    p.add_argument("--bench-limit", type=int, default=180, help="seconds for the benchmark stage")
    p.add_argument("--pack-limit", type=int, default=120, help="seconds for scripts/pack_bench.py")
    p.add_argument("--table-limit", type=int, default=240, help="seconds for the Fashion-MNIST seeds table")
    p.add_argument("--bench-extra", default="", help="flags appended to the bench command, e.g. \"--pack-time-batch 0\"")
    p.add_argument("--stages", default=None, help="comma list: run only these stages (e.g. tests-cuda,bench)")
    p.add_argument("--commit", default=None, help="the code's git commit, written into summary.md (the GPU "
                                                  "machine may get the files without .git)")
    args = p.parse_args(argv)
    # Relative to the repository (the stages run there), so no machine's path lands in a results file.
    out_abs = os.path.abspath(args.out or os.path.join(ROOT, "results", "gpu-dry" if args.dry else "gpu"))
    inside = not os.path.relpath(out_abs, ROOT).startswith("..")
    args.out = os.path.relpath(out_abs, ROOT) if inside else out_abs  # commands run in ROOT
    os.makedirs(out_abs, exist_ok=True)
    if not args.dry:
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device visible; run with --dry for the CPU version")
    records, todo = [], stages(args)
    if args.stages:
        unknown = set(args.stages.split(",")) - set(todo)
        if unknown:
            sys.exit(f"error: unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.stages.split(",")}
    for name, (cmd, limit, run_dir) in todo.items():
        print(f"[gpu_check] {name} (limit {limit} s): {' '.join(cmd)}", flush=True)
        rec = run_stage(name, cmd, limit, run_dir)
        print(f"[gpu_check] {name}: {'ok' if rec['ok'] else 'FAILED ' + str(rec['returncode'])} in {rec['seconds']} s",
              flush=True)
        if not rec["ok"]:
            print(rec["tail"][-1500:], flush=True)
        with open(os.path.join(out_abs, f"{name}.json"), "w") as f:
            json.dump(rec, f, indent=1)
        records.append(rec)
    print(summary(records, out_abs, args.commit))
    return records


if __name__ == "__main__":
    records = main()
    sys.exit(0 if all(r["ok"] for r in records) else 1)
