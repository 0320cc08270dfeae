"""seeds.py: several seeds per configuration, mean +- std, ties, and reuse of finished runs."""

import json
import os
import statistics

import pytest

import config
import evaluate
import seeds
import train

DATA = ["--img-size", "16", "--patch-size", "4", "--num-train", "160", "--num-val", "64",
        "--num-workers", "0", "--device", "cpu"]
TRAIN = DATA + ["--model", "micro", "--pred-dim", "32", "--pred-depth", "2", "--batch-size", "16",
                "--epochs", "1", "--knn-every", "0", "--alpha", "0.1", "--no-picture"]
EVAL = ["--eval", "knn,linear", "--features", "last", "--probe-epochs", "2", "--probe-lr", "0.1", "1",
        "--probe-wd", "0", "--device", "cpu"]



def test_two_seeds_end_to_end_aggregate_and_skip_finished_work(tmp_path, monkeypatch):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "tiny-dseq": {"train": TRAIN, "eval": EVAL},
        "pixels": {"train": None, "eval": ["--pixels", *DATA, *EVAL[:4]]},
    }))
    argv = ["--config", str(config), "--table", "tiny", "--seeds", "0", "1",
            "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    rows = seeds.main(argv)

    # every seed has its own pretraining and evaluation, with that seed
    for s in (0, 1):
        run = tmp_path / "runs" / "tiny-dseq" / f"seed{s}"
        assert seeds.pretraining_complete(str(run))
        assert json.load(open(run / "config.json"))["seed"] == s
        assert json.load(open(run / "eval_seeds.json"))["config"]["seed"] == s
    # the aggregation equals a plain computation from the per-seed evaluation files
    saved = json.load(open(tmp_path / "results" / "tiny.json"))
    for name, col, ev, feats in [("tiny-dseq", "kNN top-1", "knn", "last"),
                                 ("tiny-dseq", "linear top-1 (last)", "linear", "last"),
                                 ("tiny-dseq", "linear train top-1 (last)", "linear", "last"),
                                 ("pixels", "kNN top-1", "knn", "pixels")]:
        metric = "train_top1" if "train" in col else "val_top1"
        values = []
        for s in (0, 1):
            res = json.load(open(tmp_path / "runs" / name / f"seed{s}" / "eval_seeds.json"))["results"]
            values += [r["value"] for r in res if (r["eval"], r["features"], r["metric"]) == (ev, feats, metric)]
        assert len(values) == 2
        mean = sum(values) / 2
        std = (sum((v - mean) ** 2 for v in values) / (2 - 1)) ** 0.5  # sample std, n - 1
        stats = saved["rows"][name]["stats"][col]
        assert stats["n"] == 2 and stats["mean"] == pytest.approx(mean) and stats["std"] == pytest.approx(std)
        assert saved["rows"][name]["per_seed"][str(0)][col] == pytest.approx(values[0])
    md = open(tmp_path / "results" / "tiny.md").read()
    assert "| tiny-dseq |" in md and "| pixels |" in md and "+-" in md and "kNN top-1: best" in md

    # a second call reuses everything: no pretraining, no evaluation
    def boom(*a, **k):
        raise AssertionError("finished work was redone")
    monkeypatch.setattr(train, "main", boom)
    monkeypatch.setattr(evaluate, "main", boom)
    assert seeds.main(argv)["tiny-dseq"]["per_seed"] == rows["tiny-dseq"]["per_seed"]
    # a lost evaluation is redone from the finished checkpoint, without pretraining again
    os.remove(tmp_path / "runs" / "tiny-dseq" / "seed1" / "eval_seeds.json")
    calls = []
    monkeypatch.setattr(evaluate, "main", lambda a: calls.append(a))
    seeds.main(argv + ["--only", "tiny-dseq"])
    assert len(calls) == 1 and calls[0][:2] == ["--checkpoint", str(tmp_path / "runs" / "tiny-dseq" / "seed1" / "checkpoint.pt")]


def test_an_interrupted_pretraining_is_not_complete(tmp_path):
    out = tmp_path / "run"
    train.main(TRAIN + ["--out-dir", str(out), "--stop-at-step", "4"])  # preempted: checkpoint, no final kNN
    assert os.path.isfile(out / "checkpoint.pt") and not seeds.pretraining_complete(str(out))


def test_ties_are_differences_within_the_spread():
    stats = {"a": {"mean": 50.0, "std": 1.0}, "b": {"mean": 48.5, "std": 0.6},  # 1.5 <= 1.6: tie
             "c": {"mean": 47.0, "std": 0.5}}  # 3.0 > 1.5: below
    assert seeds.ties(stats) == ("a", ["b"], ["c"])
    per_seed = {0: {"kNN top-1": 1.0}, 1: {"kNN top-1": 2.0}, 2: {"kNN top-1": 6.0}}
    agg = seeds.aggregate(per_seed)["kNN top-1"]
    assert agg["mean"] == pytest.approx(3.0) and agg["std"] == pytest.approx(statistics.stdev([1, 2, 6]))


def test_ablation_table_changes_one_flag_each_of_the_default_demo_run():
    """The paper's cheap table-4/5 rows: every row is the default demo run plus ONE ablation flag."""
    table = seeds.TABLES["ablations"]
    assert table["dseq-causal"]["train"] == seeds.TABLES["demo"]["dseq-causal"]["train"]
    keys = ("method", "prediction", "region_order", "dseq_pass", "regions", "alpha", "epochs", "preset")
    parsed = {name: vars(config.parse_args(c["train"])) for name, c in table.items()}
    default = {k: parsed["dseq-causal"][k] for k in keys}
    assert default["method"] == "dseq" and default["preset"] == "demo"
    expected = {"flat": ("prediction", "flat"), "random-order": ("region_order", "random"),
                "reverse-order": ("region_order", "reverse"), "replicate": ("dseq_pass", "replicate")}
    assert set(table) == {"dseq-causal", *expected}
    for name, (key, value) in expected.items():
        assert {k: parsed[name][k] for k in keys} == {**default, key: value}
    for c in table.values():  # the demo table's probe, plus the ranked-region count
        assert c["eval"][:2] == ["--eval", "knn,linear,regions"] and "--probe-whiten" in c["eval"]


def test_a_run_older_than_the_polarity_flag_is_not_reused_for_minority(tmp_path):
    """Its config.json lacks saliency_polarity: it was trained with the paper's polarity."""
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 6}))
    seeds.check_pretraining(str(tmp_path), [])
    with pytest.raises(SystemExit, match="--saliency-polarity paper but this table asks for minority"):
        seeds.check_pretraining(str(tmp_path), ["--saliency-polarity", "minority"])
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 6, "saliency_polarity": "minority"}))
    seeds.check_pretraining(str(tmp_path), ["--saliency-polarity", "minority"])


def test_aggregate_runs_nothing_and_takes_knn_from_an_unevaluated_pretraining(tmp_path, monkeypatch):
    """--aggregate tabulates runs made elsewhere: nothing is trained or evaluated; a pretraining with
    no evaluation JSON still counts in the kNN column through its end-of-run kNN line."""
    def refuse(*a, **k):
        raise AssertionError("--aggregate must not train or evaluate")
    monkeypatch.setattr(train, "main", refuse)
    monkeypatch.setattr(evaluate, "main", refuse)
    config = tmp_path / "t.json"
    config.write_text(json.dumps({"m": {"train": TRAIN, "eval": EVAL}}))
    runs = tmp_path / "runs"
    for s, knn in ((0, 60.0), (1, 70.0)):
        d = runs / "m" / f"seed{s}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"epochs": 1}))  # TRAIN's; other keys absent (an older run)
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
            {"step": 5, "epoch": 0, "knn_top1": 1.0}, {"step": 9, "loss": 0.1, "target_std": knn / 100},
            {"step": 10, "epoch": 1, "knn_top1": knn}]))
    (runs / "m" / "seed1" / "eval_seeds.json").write_text(json.dumps({"results": [
        {"eval": "knn", "features": "last", "metric": "val_top1", "value": 72.0, "k": 20},
        {"eval": "linear", "features": "last", "metric": "val_top1", "value": 80.0}]}))
    rows = seeds.main(["--config", str(config), "--table", "t", "--seeds", "0", "1", "--aggregate",
                       "--runs-dir", str(runs), "--results-dir", str(tmp_path / "res")])
    knn, lin = rows["m"]["stats"]["kNN top-1"], rows["m"]["stats"]["linear top-1 (last)"]
    assert knn["n"] == 2 and knn["mean"] == pytest.approx((60.0 + 72.0) / 2)  # eval JSON wins where it exists
    assert lin["n"] == 1 and lin["mean"] == 80.0
    assert "(n = 1)" in (tmp_path / "res" / "t.md").read_text()
    # the learning curves over seeds (from metrics.jsonl, so the end-of-run kNN, not the eval JSON's 72)
    curve = json.loads((tmp_path / "res" / "t.json").read_text())["curves"]["m"]
    assert curve["knn"] == [[5, 1.0, 0.0, 2], [10, 65.0, pytest.approx(statistics.stdev([60.0, 70.0])), 2]]
    assert curve["target_std"] == [[9, pytest.approx(0.65), pytest.approx(statistics.stdev([0.6, 0.7])), 2]]
    assert (tmp_path / "res" / "t-learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pretraining_stopped_early_is_never_evaluated(tmp_path, monkeypatch):
    """train.main returns normally when SIGTERM stops it (checkpoint written, to resume later); the
    table must not then evaluate that half-trained checkpoint as if it were the finished run."""
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append("train") or 7)  # stops, writes no end-of-run line
    monkeypatch.setattr(evaluate, "main", lambda argv: calls.append("eval"))
    config = tmp_path / "t.json"
    config.write_text(json.dumps({"m": {"train": TRAIN, "eval": EVAL}}))
    with pytest.raises(SystemExit, match="stopped before its last epoch"):
        seeds.main(["--config", str(config), "--table", "t", "--seeds", "0",
                    "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")])
    assert calls == ["train"]


def _fake_run(out, argv, knn=None, evaluated=None):
    """A finished-looking run dir: config.json as train.py writes it (vars of the parsed argv),
    checkpoint.pt, the end-of-run kNN line, and optionally an evaluation JSON."""
    out.mkdir(parents=True)
    saved = vars(config.parse_args(argv + ["--out-dir", str(out)]))
    (out / "config.json").write_text(json.dumps(saved))
    (out / "checkpoint.pt").write_bytes(b"")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 10, "epoch": saved["epochs"], "knn_top1": knn or 50.0}))
    if evaluated is not None:
        (out / "eval_seeds.json").write_text(json.dumps({"results": [
            {"eval": "knn", "features": "last", "metric": "val_top1", "value": evaluated, "k": 20}]}))


def test_a_finished_run_of_other_flags_is_an_error_not_a_silent_reuse(tmp_path, monkeypatch):
    """The table asks for --alpha 0.1; a finished run in its folder was trained with 0.2 (e.g. made before a
    default changed): reusing it would put another method's number in the table. Flags that do not change
    what is trained (--pack-splits, --device, logging) may differ."""
    monkeypatch.setattr(train, "main", lambda a: (_ for _ in ()).throw(AssertionError("retrained")))
    monkeypatch.setattr(evaluate, "main", lambda a: (_ for _ in ()).throw(AssertionError("re-evaluated")))
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"m": {"train": TRAIN, "eval": EVAL}}))
    argv = ["--config", str(cfg), "--table", "t", "--seeds", "0", "--results-dir", str(tmp_path / "res")]
    other = [a if a != "0.1" else "0.2" for a in TRAIN]  # --alpha 0.2
    _fake_run(tmp_path / "bad" / "m" / "seed0", other + ["--seed", "0"], evaluated=60.0)
    for extra in ([], ["--aggregate"]):  # running the table, and only tabulating it
        with pytest.raises(SystemExit, match="--alpha 0.2 but this table asks for 0.1"):
            seeds.main(argv + extra + ["--runs-dir", str(tmp_path / "bad")])
    _fake_run(tmp_path / "wrong-seed" / "m" / "seed0", TRAIN + ["--seed", "1"], evaluated=60.0)
    with pytest.raises(SystemExit, match="--seed 1"):
        seeds.main(argv + ["--runs-dir", str(tmp_path / "wrong-seed")])
    _fake_run(tmp_path / "ok" / "m" / "seed0", TRAIN + ["--seed", "0", "--pack-splits", "3", "--log-every", "7"],
              evaluated=60.0)
    assert seeds.main(argv + ["--runs-dir", str(tmp_path / "ok")])["m"]["stats"]["kNN top-1"]["mean"] == 60.0


def test_several_runs_dirs_evaluated_run_first_new_work_in_the_first(tmp_path, monkeypatch):
    """--runs-dir A B: seed 0 is evaluated only in B (e.g. retrained on another machine) and wins over
    A's unevaluated pretraining; seed 1 is complete in A; seed 2 exists nowhere and is trained in A."""
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"m": {"train": TRAIN, "eval": EVAL}}))
    A, B = tmp_path / "A", tmp_path / "B"
    _fake_run(A / "m" / "seed0", TRAIN + ["--seed", "0"], knn=11.0)
    _fake_run(B / "m" / "seed0", TRAIN + ["--seed", "0"], evaluated=22.0)
    _fake_run(A / "m" / "seed1", TRAIN + ["--seed", "1"], evaluated=33.0)
    trained = []

    def fake_train(argv):
        out = tmp_path / argv[argv.index("--out-dir") + 1]
        trained.append(out)
        _fake_run(out, argv[:argv.index("--out-dir")], knn=44.0)
    monkeypatch.setattr(train, "main", fake_train)
    monkeypatch.setattr(evaluate, "main", lambda a: (tmp_path / a[a.index("--out-dir") + 1] / "eval_seeds.json")
                        .write_text(json.dumps({"results": [{"eval": "knn", "features": "last",
                                                              "metric": "val_top1", "value": 44.0, "k": 20}]})))
    rows = seeds.main(["--config", str(cfg), "--table", "t", "--seeds", "0", "1", "2", "--results-dir",
                       str(tmp_path / "res"), "--runs-dir", str(A), str(B)])
    assert trained == [A / "m" / "seed2"]
    assert rows["m"]["per_seed"] == {0: {"kNN top-1": 22.0}, 1: {"kNN top-1": 33.0}, 2: {"kNN top-1": 44.0}}
    assert rows["m"]["reports"][0] == str(B / "m" / "seed0" / "eval_seeds.json")


def test_checkpoint_evaluates_a_kept_checkpoint_under_its_own_name(tmp_path, monkeypatch):
    """--checkpoint checkpoint-ep0001.pt: every run's numbered checkpoint (train.py --keep-every) is
    evaluated as eval_seeds-ep0001.json, beside and never mixed with the finished run's eval_seeds.json;
    --aggregate does not stand the end-of-run kNN line (checkpoint.pt's) in for it."""
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"m": {"train": TRAIN, "eval": EVAL}}))
    runs = tmp_path / "runs"
    _fake_run(runs / "m" / "seed0", TRAIN + ["--seed", "0"], evaluated=60.0)  # checkpoint.pt's evaluation
    calls = []

    def fake_evaluate(argv):
        calls.append(argv)
        out = tmp_path / argv[argv.index("--out-dir") + 1]
        (out / f"eval_{argv[argv.index('--eval-name') + 1]}.json").write_text(json.dumps({"results": [
            {"eval": "knn", "features": "last", "metric": "val_top1", "value": 41.0, "k": 20}]}))
    monkeypatch.setattr(train, "main", lambda a: (_ for _ in ()).throw(AssertionError("retrained")))
    monkeypatch.setattr(evaluate, "main", fake_evaluate)
    argv = ["--config", str(cfg), "--table", "t", "--seeds", "0", "--runs-dir", str(runs),
            "--results-dir", str(tmp_path / "res")]
    with pytest.raises(SystemExit, match="no evaluation results"):
        seeds.main(argv + ["--aggregate", "--checkpoint", "checkpoint-ep0001.pt"])
    rows = seeds.main(argv + ["--checkpoint", "checkpoint-ep0001.pt"])
    assert len(calls) == 1 and calls[0][:2] == ["--checkpoint", str(runs / "m" / "seed0" / "checkpoint-ep0001.pt")]
    assert calls[0][calls[0].index("--eval-name") + 1] == "seeds-ep0001"
    assert rows["m"]["per_seed"] == {0: {"kNN top-1": 41.0}}
    assert seeds.main(argv)["m"]["per_seed"] == {0: {"kNN top-1": 60.0}} and len(calls) == 1  # the last one: as before
