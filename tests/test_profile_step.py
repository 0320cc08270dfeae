"""scripts/profile_step.py (issue #23) runs at toy size and counts what it claims to count."""

import os
import sys

import torch

import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import profile_step  # noqa: E402

TOY = ["--", "--img-size", "16", "--patch-size", "4", "--model", "micro", "--pred-dim", "32", "--pred-depth", "1",
       "--batch-size", "8", "--num-train", "16", "--num-workers", "0", "--device", "cpu", "--alpha", "0.1"]


def test_profile_step_counts_every_part_and_leaves_the_modules_as_they_were(tmp_path):
    real = train.make_targets
    threads = torch.get_num_threads()
    try:
        out = profile_step.main(["--methods", "dseq", "ijepa", "--steps", "1", "--json", str(tmp_path / "p.json")] + TOY)
    finally:
        torch.set_num_threads(threads)
    dseq, ijepa = out["methods"]["dseq"], out["methods"]["ijepa"]
    for r in (dseq, ijepa):
        parts = r["per_part"]
        assert {"0 data", "1 targets", "2 plan", "3-5 networks + loss", "6 backward", "6 AdamW", "7 EMA"} <= set(parts)
        assert sum(p["aten_ops"] for p in parts.values()) == r["aten_ops_per_step"]  # every op in exactly one part
        assert 0 < r["top_ops_per_step"] < r["aten_ops_per_step"] and r["plain_step_aten_ops"] > 0
    assert "1 saliency" in dseq["per_part"] and "1 saliency" not in ijepa["per_part"]  # I-JEPA: no saliency
    assert train.make_targets is real
    assert (tmp_path / "p.json").exists()
