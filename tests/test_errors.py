"""Runs that cannot silently go wrong: every mistake below is either a correct run or ONE line on
stderr with exit code 2 (no traceback), and no file of an earlier run changes.

Most cases fail at parse time and are checked in-process (fast); a handful run the scripts as a
user would, to show the exit code and the absence of a traceback end to end."""

import builtins
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import evaluate
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny and complete: synthetic data, micro ViT at 16 px / patch 4 (4 x 4 grid).
TINY = ["--img-size", "16", "--patch-size", "4", "--model", "micro", "--pred-dim", "32", "--pred-depth", "2",
        "--batch-size", "16", "--num-train", "160", "--num-val", "64", "--num-workers", "0", "--epochs", "2",
        "--warmup-epochs", "1", "--knn-every", "0", "--no-picture", "--device", "cpu", "--log-every", "1",
        "--alpha", "0.1"]


def one_line_exit_2(capsys, call):
    """Run call(), expect SystemExit with code 2 and exactly one non-empty stderr line: return it."""
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    bar = re.compile(r"^\s*\d+%\|")  # tqdm's progress bar, redrawn around the message
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not bar.match(l)]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def files(folder):
    """{name: bytes} of the run's checkpoint and config: must not change when a command fails."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in ("checkpoint.pt", "config.json")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny run stopped at step 2: the run every resume case tries to change."""
    out = str(tmp_path_factory.mktemp("errors") / "run")
    assert train.main(TINY + ["--out-dir", out, "--stop-at-step", "2"]) == 2
    return out


# ---------------------------------------------------------------------------------------------
# Values that were silently accepted, or crashed late: caught at parse time


@pytest.mark.parametrize("flags, message", [
    (["--saliency-layer", "99"], "--saliency-layer 99: --model micro has blocks 0..5"),
    (["--device", "cpu", "--amp", "fp16"], "--amp fp16 needs CUDA"),
    (["--ema", "2", "0"], "--ema 2 0: need 0 <= START <= END <= 1"),
    (["--crop-scale", "0", "0"], "--crop-scale 0 0: need 0 < MIN <= MAX <= 1"),
    (["--target-scale", "1.5", "2"], "--target-scale 1.5 2: need 0 < MIN <= MAX <= 1"),
    (["--context-scale", "0", "0"], "--context-scale 0 0"),
    (["--pred-depth", "0"], "--pred-depth and --pred-dim must be positive"),
    (["--regions", "100", "--alpha", "0.15"], "--regions 100 with --alpha 0.15: each ranked region needs 0.15"),
    (["--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--epochs", "-1"], "--epochs -1 must be at least 1"),
    (["--stop-at-step", "-5"], "--stop-at-step must be >= 0"),
    (["--dataset", "nonsense"], "argument --dataset: invalid choice: 'nonsense'"),
    (["--model", "tiny"], "--pred-dim 64 is not divisible by the 3 heads of --model tiny"),
    (["--seed", "-1"], "--seed -1 must be in 0..2**32-1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--num-workers", "-1"], "--num-workers -1 must be >= 0"),
    (["--num-train", "10"], "--num-train 10 is smaller than one batch (--batch-size 64)"),
    (["--img-size", "8"], "--img-size 8: the synthetic shapes need at least 16 px"),
    (["--log-every", "0"], "--log-every 0 must be at least 1"),
    (["--ckpt-every", "0"], "--ckpt-every 0 must be at least 1"),
    (["--num-targets", "0"], "--num-targets 0: I-JEPA needs at least 1 target block"),
    (["--pack-splits", "0"], "--pack-splits 0: need at least 1"),
    (["--pack-rows", "-1"], "--pack-rows -1: need 0 (no limit) or more rows per sub-batch"),
    (["--num-val", "0"], "--num-val 0 must be at least 1"),
    (["--lambda", "2.0"], "unrecognized arguments: --lambda 2.0"),  # no prefix match to --lambda-coin
    (["--resume-override", "model"], "--resume-override model: only epochs"),
])
def test_bad_value_is_one_line_at_parse_time(flags, message, capsys):
    line = one_line_exit_2(capsys, lambda: config.parse_args(flags))
    assert message in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto device is CUDA here: fp16 is valid")
def test_fp16_on_an_auto_cpu_device_is_caught(capsys):
    assert "--amp fp16 needs CUDA" in one_line_exit_2(capsys, lambda: config.parse_args(["--amp", "fp16"]))


def test_help_shows_the_demo_defaults_and_the_script_name():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert out.startswith("usage: train.py")
    text = " ".join(out.split())  # argparse wraps lines
    assert "(paper: 224; 448 for ViT-H) (default: 64)" in text  # the demo's 64 px, not the paper's 224
    assert "(default: None)" not in text and "per-image PIL crops in the DataLoader) (default: auto)" in text
    assert "(default: out/PRESET" in text


# ---------------------------------------------------------------------------------------------
# Resume: a changed run-defining flag is an error naming the flag, both values and the ways out


@pytest.mark.parametrize("flags, message", [
    (["--method", "ijepa"], "--method ijepa differs from the checkpoint"),
    (["--batch-size", "8"], "--batch-size 8 differs from the checkpoint"),
    (["--img-size", "32"], "--img-size 32 differs from the checkpoint"),
    (["--seed", "1"], "--seed 1 differs from the checkpoint"),
    (["--epochs", "3"], "--epochs 3 differs from the checkpoint"),
    (["--crop-scale", "0.5", "1"], "--crop-scale 0.5 1.0 differs from the checkpoint"),
])
def test_resume_with_a_changed_flag_stops_and_keeps_the_run(run_dir, flags, message, capsys):
    before = files(run_dir)
    line = one_line_exit_2(capsys, lambda: train.main(TINY + ["--out-dir", run_dir] + flags))
    assert message in line and "another --out-dir" in line, line
    flag = flags[0]
    saved = json.load(open(os.path.join(run_dir, "config.json")))[flag[2:].replace("-", "_")]
    assert f"({flag} {' '.join(map(str, saved)) if isinstance(saved, list) else saved})" in line, line
    assert ("--resume-override epochs" in line) == (flag == "--epochs")
    assert files(run_dir) == before


def test_resume_override_and_free_flags_continue_the_run(run_dir, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(run_dir, out)
    # more epochs, by name; logging / checkpoint cadence and workers are always free
    step = train.main(TINY + ["--out-dir", out, "--epochs", "3", "--resume-override", "epochs", "--stop-at-step", "3",
                              "--log-every", "2", "--ckpt-every", "50", "--pack-rows", "0"])
    assert step == 3
    assert json.load(open(os.path.join(out, "config.json")))["epochs"] == 3


def test_a_config_older_than_the_polarity_flag_reads_as_the_paper_polarity(capsys):
    """A checkpoint saved before --saliency-polarity existed was trained with the paper's; resuming it
    with "minority" must then be a mismatch (and evaluate.py reads "paper")."""
    args = config.parse_args(["--saliency-polarity", "minority"])
    old = {k: v for k, v in vars(args).items() if k != "saliency_polarity"}
    assert config.flag_differences(old, args) == ["saliency_polarity"]
    assert config.flag_differences({**old, "saliency_polarity": "minority"}, args) == []
    line = one_line_exit_2(capsys, lambda: config.check_resume_config(old, args, "ckpt.pt"))
    assert "--saliency-polarity minority differs from the checkpoint ckpt.pt being resumed (--saliency-polarity paper)" in line
    for preset in config.PRESETS:  # the paper's rule is every preset's
        assert config.parse_args(["--preset", preset, "--data-path", "x"]).saliency_polarity == "paper"


def test_evaluate_reads_an_older_checkpoint_with_the_paper_polarity_whatever_the_preset(run_dir, tmp_path, monkeypatch):
    """Were a preset to turn "minority" on, a run saved before the flag must still read as the paper's."""
    monkeypatch.setitem(config.PRESETS["demo"], "saliency_polarity", "minority")
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)
    assert ckpt["config"].pop("saliency_polarity") == "paper"
    older, newer = str(tmp_path / "older.pt"), str(tmp_path / "newer.pt")
    torch.save(ckpt, older)
    torch.save({**ckpt, "config": {**ckpt["config"], "saliency_polarity": "minority"}}, newer)
    assert evaluate.resolve_config(["--checkpoint", older])[0].saliency_polarity == "paper"
    assert evaluate.resolve_config(["--checkpoint", newer])[0].saliency_polarity == "minority"


def test_default_out_dirs_differ_per_readme_command():
    demo, ijepa = config.parse_args([]), config.parse_args(["--method", "ijepa"])
    replicate = config.parse_args(["--dseq-pass", "replicate"])
    cifar = config.parse_args(["--preset", "cifar10-tiny", "--data-path", "x"])
    dirs = [a.out_dir for a in (demo, ijepa, replicate, cifar)]
    assert len(set(dirs)) == 4 and dirs[0] == os.path.join("out", "demo")
    random_init, _ = evaluate.resolve_config(["--init", "random"])
    pixels, _ = evaluate.resolve_config(["--pixels"])
    assert len({random_init.out_dir, pixels.out_dir, *dirs}) == 6  # baselines never write into a run


# ---------------------------------------------------------------------------------------------
# A diverged step never becomes "the last good checkpoint"


def test_diverged_weights_are_never_checkpointed(run_dir, tmp_path, capsys):
    out = str(tmp_path / "diverge")
    shutil.copytree(run_dir, out)
    before = files(out)
    # one AdamW step moves each weight by ~lr: 1e6 -> weights ~1e6 while the step-3 loss is still finite
    line = one_line_exit_2(capsys, lambda: train.main(
        TINY + ["--out-dir", out, "--lr", "1e6", "--warmup-epochs", "0", "--resume-override", "lr", "warmup_epochs",
                "--ckpt-every", "1"]))
    assert "step 3:" in line and "no checkpoint is written" in line and "(bound 10000)" in line, line
    assert files(out)["checkpoint.pt"] == before["checkpoint.pt"]


# ---------------------------------------------------------------------------------------------
# A write that fails (disk full, read-only, no permission, quota) while saving a checkpoint, the
# config or the log: one line naming the path, the cause and the size; the earlier files intact and
# no partial file left. (main: a 20-line traceback from torch's serializer, "unexpected pos", with no
# word of the disk. The same under torchrun, every rank exiting: tests/test_train.py.)


class FillingDisk:
    """A file on a disk with `room` bytes left: a write past it writes what fits, then raises
    OSError(code), as write(2) does when the disk fills up mid-file."""

    def __init__(self, f, room, code):
        self.f, self.room, self.code = f, room, code

    def write(self, b):
        fits, self.room = max(0, self.room), self.room - len(b)
        if self.room < 0:
            self.f.write(b[:fits])
            raise OSError(self.code, os.strerror(self.code))
        return self.f.write(b)

    def __getattr__(self, name):  # tell, flush, fileno, close: the real file's
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def disk_fills(monkeypatch, name, code, room):
    """Every file whose name starts with `name`, opened for writing, fails after `room` bytes."""
    real_open = builtins.open

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        hit = os.path.basename(str(file)).startswith(name) and any(c in mode for c in "wax")
        return FillingDisk(f, room, code) if hit else f
    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("name, code, room, cause", [
    ("checkpoint.pt", errno.ENOSPC, 100_000, "No space left on device (ENOSPC)"),  # a full disk, mid-checkpoint
    ("checkpoint.pt", errno.EDQUOT, 0, "(EDQUOT)"),  # the quota, at the first byte
    ("config.json", errno.EROFS, 0, "Read-only file system (EROFS)"),
    ("metrics.jsonl", errno.EACCES, 1000, "Permission denied (EACCES)"),  # a few rows fit, then one is cut
])
def test_a_failed_write_is_one_line_and_leaves_the_files_intact(run_dir, tmp_path, monkeypatch, capsys,
                                                                 name, code, room, cause):
    out = str(tmp_path / "full")
    shutil.copytree(run_dir, out)
    before = files(out)
    log = open(os.path.join(out, "metrics.jsonl")).read()
    disk_fills(monkeypatch, name, code, room)
    line = one_line_exit_2(capsys, lambda: train.main(TINY + ["--out-dir", out, "--stop-at-step", "6"]))
    assert f"error: cannot write {os.path.join(out, name)}: " in line and cause in line, line
    assert "it needs about" in line and "free there" in line and "The files already in the folder are intact" in line
    after = files(out)
    assert after["checkpoint.pt"] == before["checkpoint.pt"]  # the previous checkpoint, step 2
    assert after["config.json"] == before["config.json"] or name != "config.json"  # whole, old or new
    json.loads(after["config.json"])
    assert not [f for f in os.listdir(out) if ".tmp" in f], os.listdir(out)  # no partial file left
    rows = open(os.path.join(out, "metrics.jsonl")).read()
    assert rows.startswith(log) and all(json.loads(r) for r in rows.splitlines())  # the cut row is gone
    monkeypatch.undo()  # room again: the same command resumes from the intact checkpoint
    assert train.main(TINY + ["--out-dir", out, "--stop-at-step", "3"]) == 3

# ---------------------------------------------------------------------------------------------
# ImageFolder: labels follow the TRAIN class map, saved with the run


def image_tree(root, split, classes, n=4):
    rs = np.random.RandomState(len(classes))
    for c in classes:
        os.makedirs(root / split / c, exist_ok=True)
        for j in range(n):
            Image.fromarray(rs.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{c}_{j}.png")
    return root


FOLDER = ["--dataset", "imagefolder", "--img-size", "16", "--patch-size", "4", "--model", "micro",
          "--pred-dim", "32", "--pred-depth", "2", "--num-workers", "0", "--device", "cpu"]


def test_val_labels_follow_the_train_class_map(tmp_path):
    root = image_tree(image_tree(tmp_path, "train", ["cat", "dog", "eel"]), "val", ["dog"])  # val lacks 2
    args, _ = evaluate.resolve_config(FOLDER + ["--data-path", str(root), "--init", "random"])
    loader = evaluate._eval_loader(args, "val", 8)
    _, labels = next(iter(loader))
    assert loader.num_classes == 3 and labels.tolist() == [1] * 4  # dog is class 1, as in train


def test_run_saves_its_class_map_and_evaluation_uses_it(tmp_path):
    root = image_tree(image_tree(tmp_path / "d", "train", ["cat", "dog"]), "val", ["dog"])
    out = str(tmp_path / "run")
    train.main(FOLDER + ["--data-path", str(root), "--out-dir", out, "--batch-size", "4", "--epochs", "1",
                         "--knn-every", "0", "--no-picture", "--alpha", "0.1"])
    ckpt = config.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["config"]["class_to_idx"] == {"cat": 0, "dog": 1}
    assert json.load(open(os.path.join(out, "config.json")))["class_to_idx"] == {"cat": 0, "dog": 1}
    # the train folder is renamed away later: evaluation still labels val by the saved map
    os.rename(root / "train" / "cat", root / "train" / "aardvark")
    args, _ = evaluate.resolve_config(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--num-workers", "0"])
    assert evaluate.train_class_map(args) == {"cat": 0, "dog": 1}
    _, labels = next(iter(evaluate._eval_loader(args, "val", 8)))
    assert labels.tolist() == [1] * 4


def test_a_val_class_the_map_does_not_know_fails_before_training(tmp_path):
    root = image_tree(image_tree(tmp_path / "d", "train", ["cat", "dog"]), "val", ["dog", "fox"])
    out = tmp_path / "run"
    with pytest.raises(data.DataError, match=r"\['fox'\] .* not in the class map"):
        train.main(FOLDER + ["--data-path", str(root), "--out-dir", str(out), "--batch-size", "4", "--epochs", "1"])
    assert not (out / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------
# End to end: exit code 2, one line, no traceback


def script(*argv, cwd):
    """Run a script of the repo as a user would (cwd: where out/ may be written)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=env)


def test_data_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = script(os.path.join(ROOT, "train.py"), "--dataset", "imagefolder", "--data-path", str(tmp_path / "empty"),
               cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"train.py: error: data root '{tmp_path / 'empty'}' is empty; "
                                            f"for 'imagefolder' it must hold {data.LAYOUT['imagefolder']}"]


def test_resume_mismatch_end_to_end_keeps_the_files(run_dir, tmp_path):
    before = files(run_dir)
    r = script(os.path.join(ROOT, "train.py"), *TINY, "--out-dir", run_dir, "--method", "ijepa", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--method ijepa differs" in r.stderr
    assert files(run_dir) == before


def test_corrupt_checkpoint_in_evaluate_names_its_own_flag(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    r = script(os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(tmp_path / "checkpoint.pt"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "check --checkpoint" in r.stderr and "--resume" not in r.stderr and "--no-auto-resume" not in r.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"


# ---------------------------------------------------------------------------------------------
# An unreadable image is named once per run, not once per worker / epoch / kNN pass


def test_bad_image_is_warned_once_across_workers_epochs_and_instances(tmp_path, recwarn):
    root = image_tree(tmp_path, "train", ["cat", "dog"])
    (root / "train" / "cat" / "cat_1.png").write_bytes(b"not a png")
    ds = data.ImageFolder(str(root), "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda items: items)
    assert sum(len(b) for b in loader) == 8  # the bad file was replaced, in a worker process
    assert ds.n_bad == 1  # ... and the main process knows: the flags are shared memory
    before = data.unreadable_images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second epoch and a second instance (the kNN bank) stay quiet
        assert len([ds[i] for i in range(len(ds))]) == 8
        again = data.ImageFolder(str(root), "train")
        assert len([again[i] for i in range(len(again))]) == 8 and again.n_bad == 1
    assert data.unreadable_images() == before >= 1


def test_data_error_raised_in_a_worker_is_one_line(tmp_path):
    root = image_tree(image_tree(tmp_path / "d", "train", ["cat", "dog"]), "val", ["cat"])
    for f in (root / "train").rglob("*.png"):
        f.write_bytes(b"broken copy")  # every train image unreadable: the worker gives up
    r = script(os.path.join(ROOT, "train.py"), *FOLDER, "--data-path", str(root), "--batch-size", "4",
               "--num-workers", "1", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: 50 unreadable images in a row"), r.stderr
