"""bench.py runs end to end at toy size, so the benchmark cannot silently rot."""

import json

import pytest
import torch

import bench

TOY = ["--dataset", "synthetic", "--model", "micro", "--img-size", "32", "--patch-size", "4", "--pred-dim", "32", "--pred-depth", "2",
       "--batch-size", "4", "--alpha", "0.1", "--device", "cpu", "--steps", "2", "--warmup", "0",
       "--no-memory", "--sal-batch", "16", "--sal-repeats", "1", "--loader-images", "4", "--pack-batches", "8", "32",
       "--pack-time-batch", "8", "--pack-steps", "1"]


def test_bench_runs_and_reports_every_config(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(TOY + ["--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # bench pins 1 CPU thread; the rest of the suite keeps its own
    rows = result["rows"]
    assert set(rows) == set(bench.CONFIGS) and json.loads(out.read_text())["rows"].keys() == rows.keys()
    assert rows["ijepa"]["ratio_wall"] == 1.0 and rows["ijepa"]["dseq"] == 0.0
    assert list(result["modes"]) == ["eager"] and rows["ijepa"]["mfu"] is None  # the CPU: eager, no known peak
    # The synthetic blob maps give every sample N-1 = 4 ranked regions + background: all DSeq plans.
    assert rows["causal+blobs"]["dseq"] == 1.0 and rows["causal+blobs"]["regions"] == 5.0
    for r in rows.values():
        assert r["enc_real"] <= r["enc_pad"] and r["pred_real"] <= r["pred_pad"] and r["gflop_img"] > 0
    # replicate runs one row per Eq. 5 step: more encoder tokens per image than the one causal pass
    assert rows["replicate+blobs"]["enc_real"] > rows["causal+blobs"]["enc_real"]
    assert result["saliency"].get("identical", True)  # skipped without cv2, else asserted equal
    assert result["loader"]["pipeline_img_s_core"] > 0 and result["loader"]["images"] == 4
    # padding table: every plan kind at every batch, one padded batch (k1) and the default split (kK)
    K = f"k{result['config']['pack_splits']}"
    assert K != "k1"
    tokens = result["packing"]["tokens"]
    assert {k.split("@")[0] for k in tokens} == {name for name, _, _ in bench.PACK_PLANS}
    for r in tokens.values():
        assert r[K]["enc_computed"] <= r["k1"]["enc_computed"] and r[K]["pred_computed"] <= r["k1"]["pred_computed"]
        assert r["enc_real"] <= r[K]["enc_computed"] and 0 <= r[K]["enc_waste"] < 1
    assert tokens["mix@32"][K]["sub_batches"] > 1
    assert {"ijepa k1", f"ijepa {K}", "causal+blobs k1", f"causal+blobs {K}"} <= set(result["packing"]["time"])


def test_eager_and_compiled_side_by_side_with_mfu_memory_and_graphs(tmp_path, monkeypatch, capsys):
    """What bench.py reports on CUDA (eager and compiled, one after the other, then side by side),
    run on the CPU at toy size: for I-JEPA, DSeq causal on its own regions and on 4 regions, and
    replicate, the ms per step, img/s, MFU (from --peak-tflops here: a CPU has no entry in the
    peak table), peak memory (CPU: only with the fresh-process probes, off here) and the graphs
    compiled per config. Compiled through dynamo with aot_eager (no code generation: seconds). The
    two warm-up rounds compile every graph: the timed rounds repeat their plans, so none recompiles."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.backends.debugging import aot_eager

    for key in ("automatic_dynamic_shapes", "recompile_limit", "accumulated_recompile_limit"):
        monkeypatch.setattr(dynamo_config, key, getattr(dynamo_config, key))  # put back after the test
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": aot_eager}))
    configs = ["ijepa", "causal", "causal+blobs", "replicate+blobs"]
    out, threads = tmp_path / "bench.json", torch.get_num_threads()
    try:
        result = bench.main(TOY + ["--modes", "eager", "compiled", "--configs", *configs, "--peak-tflops", "1",
                                   "--steps", "2", "--warmup", "2", "--sal-batch", "0", "--loader-images", "0",
                                   "--pack-batches", "--pack-time-batch", "0", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    modes = result["modes"]
    assert list(modes) == ["eager", "compiled"] and result["rows"] == modes["eager"]
    for mode, rows in modes.items():
        assert list(rows) == configs
        for r in rows.values():
            assert r["wall_ms"] > 0 and r["img_s"] > 0 and r["mfu"] > 0 and "mem_mib" in r
            assert (r["graphs"] > 0) == (mode == "compiled")
    assert modes["compiled"]["causal+blobs"]["dseq"] == 1.0 and modes["compiled"]["causal+blobs"]["regions"] == 5.0
    graphs = result["graphs"]["compiled"]
    assert graphs["graphs_compiled"] == sum(r["graphs"] for r in modes["compiled"].values())
    assert graphs["recompiles_during_timing"] == 0
    assert "eager vs torch.compile" in capsys.readouterr().out
    assert json.loads(out.read_text())["modes"]["compiled"].keys() == modes["compiled"].keys()


def test_pack_time_only_times_the_split_against_one_padded_batch(tmp_path):
    out = tmp_path / "pack.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(TOY + ["--pack-time-only", "--pack-splits", "3", "--pack-time-batch", "24", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    t = result["time"]
    timed = {n for n in t if isinstance(t[n], dict)}
    assert timed == {f"{m} {k}" for m in ("ijepa", "causal+blobs") for k in ("k1", "k3", "k3 rows0")}
    for n in ("ijepa k1", "ijepa k3", "ijepa k3 rows0"):
        assert t[n]["x_ijepa"] == 1.0 and t[n]["excess"] == 0.0
    # The worst case's rows are all about as long: without a row limit it stays one sub-batch; with
    # the default limit (max(ceil(24 / 3), 8) = 8 rows) it is cut into 3, like any other batch.
    assert t["causal+blobs k3 rows0"]["sub_batches"] == 1 and t["causal+blobs k3"]["sub_batches"] == 3
    assert t["fastest_ijepa"] == min((n for n in timed if n.startswith("ijepa")), key=lambda n: t[n]["ms"])
    fastest = t[t["fastest_ijepa"]]
    for k in ("k1", "k3", "k3 rows0"):  # excess = (time ratio) / (real-token FLOP ratio) - 1, recomputed here
        blobs, base = t[f"causal+blobs {k}"], t[f"ijepa {k}"]
        assert blobs["excess"] == pytest.approx(blobs["x_ijepa"] / (blobs["gflop_img"] / base["gflop_img"]) - 1)
        assert blobs["excess_vs_fastest"] == pytest.approx(
            blobs["ms"] / fastest["ms"] / (blobs["gflop_img"] / fastest["gflop_img"]) - 1)
        assert blobs["excess_vs_fastest"] >= blobs["excess"] - 1e-12  # never kinder than the like-for-like one
    assert result["target_met"] == (t["causal+blobs k3"]["excess_vs_fastest"] <= 0.05)
    assert json.loads(out.read_text())["command"].startswith("python bench.py")


def test_official_cost_estimate_counts_full_length_rows():
    """The official structure: N - 1 full-length rows per image; dearer than the I-JEPA plan."""
    threads = torch.get_num_threads()
    try:
        r = bench.main(["--official-cost", "--model", "micro", "--img-size", "32", "--patch-size", "4",
                        "--pred-dim", "32", "--pred-depth", "2", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert r["official_dseq_gflop_img"] > r["ijepa_gflop_img"] > 0
    assert r["ijepa_enc_tokens"] < 64 and r["official_over_ijepa"] > 3  # 4 rows of 64 tokens vs ~40


def test_demo_time_runs_train_py_and_reports_time_and_memory():
    tiny = ["--img-size", "16", "--patch-size", "4", "--num-train", "64", "--num-val", "32", "--num-workers", "0",
            "--model", "micro", "--pred-dim", "32", "--pred-depth", "2", "--batch-size", "16", "--epochs", "1",
            "--no-picture", "--device", "cpu"]
    threads = torch.get_num_threads()
    try:
        r = bench.main(["--demo-time", *tiny])
    finally:
        torch.set_num_threads(threads)
    assert r["steps"] == 4 and r["wall_s"] > 0 and r["peak_rss_gb"] > 0 and 0 <= r["knn_top1"] <= 100


def test_step_overhead_pairs_each_plain_step_with_its_own_full_step(monkeypatch):
    """The ratio divides each full step by a plain step on THAT step's real token counts. Plans vary
    from step to step, so a plain step on another step's counts pairs unlike work (the alternating
    order did that on every second round). A spy records what each plain step got and checks it
    against the tokens the full step just before it reported."""
    tiny = ["--dataset", "synthetic", "--model", "micro", "--pred-dim", "32", "--pred-depth", "2", "--batch-size", "8",
            "--num-train", "32", "--alpha", "0.1", "--device", "cpu", "--num-workers", "0", "--compile", "off"]
    monkeypatch.setattr(bench, "OVERHEAD_SETTINGS", {"toy": tiny})
    full_tokens, plain_tokens = [], []
    real_step, real_plain = bench.train.train_step, bench.plain_step

    def spy_step(*a, **k):
        loss, plan, stats = real_step(*a, **k)
        full_tokens.append((round(stats["context_tokens"].item()), round(stats["target_tokens"].item())))
        return loss, plan, stats

    def spy_plain(models, optimizer, images, Lc, Lt, momentum):
        plain_tokens.append((Lc, Lt))
        return real_plain(models, optimizer, images, Lc, Lt, momentum)

    monkeypatch.setattr(bench.train, "train_step", spy_step)
    monkeypatch.setattr(bench, "plain_step", spy_plain)
    threads = torch.get_num_threads()
    try:
        out = bench.step_overhead(bench.get_parser().parse_args(["--steps", "5"]), [])
    finally:
        torch.set_num_threads(threads)
    assert plain_tokens == full_tokens  # warm-up pair + 5 rounds, each plain on its own full's tokens
    s = out["settings"]["toy"]
    assert len(s["ratio_per_round"]) == 5 and out["overhead_ratio"]["toy"] > 0 and s["ratio_of_medians"] > 0


def test_step_overhead_times_ijepa_at_lambda_zero(monkeypatch):
    """--step-overhead --method ijepa times I-JEPA's own step (lambda 0, no saliency); at the DSeq
    default's lambda 0.5 make_plan would need regions that an I-JEPA run never computes."""
    tiny = ["--dataset", "synthetic", "--model", "micro", "--pred-dim", "32", "--pred-depth", "2", "--batch-size", "8",
            "--num-train", "32", "--alpha", "0.1", "--device", "cpu", "--num-workers", "0", "--compile", "off"]
    monkeypatch.setattr(bench, "OVERHEAD_SETTINGS", {"toy": tiny})
    lams, real_step = [], bench.train.train_step

    def spy_step(models, images, lam, *a, **k):
        lams.append(lam)
        return real_step(models, images, lam, *a, **k)

    monkeypatch.setattr(bench.train, "train_step", spy_step)
    threads = torch.get_num_threads()
    try:
        out = bench.step_overhead(bench.get_parser().parse_args(["--steps", "2"]), ["--method", "ijepa"])
    finally:
        torch.set_num_threads(threads)
    assert lams == [0.0, 0.0, 0.0] and out["overhead_ratio"]["toy"] > 0  # warm-up + 2 rounds
