"""scripts/sweep.py: one train.py run per variant, its kNN curve and command in one JSON; a finished
run is reused on a rerun of the same command (its row, wall time included, stays as it was)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ("--img-size 16 --patch-size 4 --model micro --pred-dim 32 --pred-depth 2 --batch-size 16 "
        "--num-train 64 --num-val 32 --num-workers 0 --epochs 1 --warmup-epochs 0 --device cpu --alpha 0.1")


def test_sweep_records_each_variant_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "scripts/sweep.py", "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
           "--base", BASE, "--variant", "a=--lr 1e-3", "--variant", "b=--lr 2e-3 --method ijepa"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    first = json.loads(out.read_text())
    assert set(first["runs"]) == {"a", "b"}
    for name, row in first["runs"].items():
        metrics = [json.loads(l) for l in open(tmp_path / "runs" / name / "metrics.jsonl")]
        knn = {r["step"]: r["knn_top1"] for r in metrics if "knn_top1" in r}
        assert [s for s, _ in row["knn_curve"]] == sorted(knn) and sorted(knn)[0] == 0 and row["steps"] == 4
        assert row["gap"] == knn[4] - knn[0] and "--lr" in row["command"] and row["wall_s"] > 0
        train = [r for r in metrics if "loss" in r][-5:]  # the end statistics: means of the last 5 logged steps
        for key in ("ranked_regions", "dseq_share"):
            want = sum(r[key] for r in train) / len(train) if key in train[-1] else None
            assert row[f"{key}_end"] == (pytest.approx(want) if want is not None else None), (name, key)
    assert "--method ijepa" in first["runs"]["b"]["command"] and first["runs"]["b"]["ranked_regions_end"] is None
    assert first["runs"]["b"]["dseq_share_end"] == 0.0 and first["runs"]["a"]["ranked_regions_end"] is not None
    rerun = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    assert "train.py" not in rerun.stdout  # nothing trained again
    assert json.loads(out.read_text())["runs"] == first["runs"]
    # the same variants under another --base: the finished runs are not theirs, an error, not a reuse
    changed = [c if c != BASE else BASE + " --seed 1" for c in cmd]
    bad = subprocess.run(changed, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "was trained with --seed 0 but this table asks for 1" in bad.stderr, bad.stderr
    assert json.loads(out.read_text())["runs"] == first["runs"]


def test_supervised_bound_trains_the_pretraining_encoder_for_the_pretraining_steps(tmp_path):
    """scripts/supervised_bound.py: the run's encoder, batch and epochs (4 steps of 16 on 64 images), and its
    kNN from the same monitor train.py logs, at step 0 (the untrained encoder: the same number train.py
    logs at step 0 for these flags) and after training."""
    out, run_dir = tmp_path / "sup.json", tmp_path / "run"
    subprocess.run([sys.executable, "scripts/supervised_bound.py", "--json", str(out), *BASE.split()],
                   cwd=ROOT, check=True, capture_output=True)
    sup = json.loads(out.read_text())
    assert sup["steps"] == 4 and sup["epochs"] == 1 and sup["batch_size"] == 16
    assert 0 <= sup["train_top1_last_epoch"] <= 100 and "--img-size 16" in sup["command"]
    subprocess.run([sys.executable, "train.py", *BASE.split(), "--knn-every", "1", "--no-picture",
                    "--out-dir", str(run_dir)], cwd=ROOT, check=True, capture_output=True)
    step0 = [json.loads(l) for l in open(run_dir / "metrics.jsonl") if '"knn_top1"' in l][0]
    assert step0["step"] == 0 and sup["knn_top1_step0"] == step0["knn_top1"]
