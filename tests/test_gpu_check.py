"""scripts/gpu_check.py in its dry mode: every stage of the one-command GPU check runs on the CPU
(tiny model, few steps) and writes its JSON and the summary table, so the GPU check cannot rot."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_stage(tmp_path):
    records = gpu_check.main(["--dry", "--out", str(tmp_path)])
    assert [r["stage"] for r in records] == ["tests-cuda", "bench", "pack", "pretrain-dseq", "pretrain-ijepa"]
    assert all(r["ok"] for r in records), [(r["stage"], r["tail"][-500:]) for r in records if not r["ok"]]
    for r in records:
        assert json.loads((tmp_path / f"{r['stage']}.json").read_text())["ok"]
    bench = json.loads((tmp_path / "bench_raw.json").read_text())
    assert {"ijepa", "causal+blobs", "replicate+blobs"} <= set(bench["rows"])
    assert all(r["knn_top1"] is not None for r in records if r["stage"].startswith("pretrain"))
    pack = json.loads((tmp_path / "pack_bench.json").read_text())  # flex packing == padded SDPA, token for token
    assert {(r["plan"], r["net"]) for r in pack["rows"]} >= {("dseq", "encoder"), ("mix", "predictor")}
    assert all(r["flex"]["max_abs_err_vs_pad"] < 1e-4 for r in pack["rows"])
    table = (tmp_path / "summary.md").read_text()
    assert "| 4 | dseq | predictor |" in table
    assert "| replicate+blobs |" in table and "| dseq |" in table and "| ijepa |" in table


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="--dry"):
        gpu_check.main(["--out", str(tmp_path)])
