"""
Why does the demo find ~1 ranked region per image at some seeds? Histograms and a diagnosis.

    python scripts/demo_saliency.py RUNS/dseq-causal/seed0/checkpoint.pt ... --json results/demo-regions/seeds.json

For every checkpoint (trained demo runs, any method):
  1. `evaluate.py --eval regions` at --alphas: the histogram of ranked regions per held-out image,
     the positional share of the saliency variance, and the share of plans each ablation flag changes;
  2. what the CLS saliency looks at (oriented by the run's --saliency-polarity), on the first
     --images held-out images:
     - r1_on_object: the share of R_1's patches that hold object pixels (any of the 3-4 objects),
       next to object_patches, the share of ALL patches that do (what a region placed at random gets);
       r1_of_objects / r1_of_ground: the share of object / of ground patches that lie in R_1;
     - the same ranked-region count and positional share with the background painted flat grey
       (objects unchanged): does cleaner, higher-contrast data change the regions?
     - the same with another query (NOT the paper's): each image's own CLS token output at block -2
       instead of the CLS parameter; does a query that depends on the image find the objects?
  3. how far training moved the saliency query q = the CLS parameter: cos(q, q at init), with the
     init rebuilt from the run's seed exactly as train.py builds it (patch embedding for scale).
Writes one JSON with the command. Runs on the CPU in a few minutes (9 demo checkpoints: ~3 min).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import data  # noqa: E402
import evaluate  # noqa: E402
import region_stats  # noqa: E402
import saliency  # noqa: E402
import train  # noqa: E402


def cos(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return (a @ b / (a.norm() * b.norm())).item()


@torch.no_grad()
def diagnose(path, alphas, n_images):
    with tempfile.TemporaryDirectory() as tmp:  # 1. the regions eval itself, as a user runs it
        report = evaluate.main(["--checkpoint", path, "--eval", "regions", "--region-alphas",
                                ",".join(map(str, alphas)), "--num-workers", "0", "--device", "cpu",
                                "--out-dir", tmp, "--eval-name", "regions"])
    args, ckpt = evaluate.resolve_config(["--checkpoint", path, "--device", "cpu"])
    if args.dataset not in data.BUILT_IN:
        sys.exit(f"error: {path} was not trained on a built-in shapes set (the diagnosis needs its object masks)")
    encoder = evaluate.load_target_encoder(ckpt, args, path)
    h, w = encoder.grid
    ds, _ = data.build_dataset(args.dataset, split="val", img_size=args.img_size, synthetic_size=args.num_val)
    images, masks = ds._render(np.arange(min(n_images, len(ds))))  # (n, 3, S, S) uint8, (n, 4, S, S) bool
    on_object = masks.any(1)  # (n, S, S) any object's pixels
    flat = np.where(on_object[:, None], images, 128).astype(np.uint8)  # background painted flat grey
    n, ph, pw = len(images), args.img_size // h, args.img_size // w
    object_patch = torch.from_numpy(on_object).view(n, h, ph, w, pw).any(4).any(2).flatten(1)  # (n, P)
    out = {"checkpoint": path, "regions": report["regions"], "object_patches": object_patch.float().mean().item()}
    def block_output(x):  # (n, 1 + P, D): block --saliency-layer after the final LayerNorm, CLS kept
        t = encoder.embed(data.normalize(torch.from_numpy(x)))  # (n, 1 + P, D)
        for block in encoder.blocks[: args.saliency_layer % encoder.depth + 1]:
            t = block(t)
        return encoder.norm(t)

    for name, x in (("as_is", images), ("flat_background", flat), ("cls_output_query", images)):
        t = block_output(x)  # (n, 1 + P, D)
        z = t[:, 1:]  # (n, P, D), what encoder.features returns
        if name == "cls_output_query":  # <cls_out, z_j> / sqrt(D): the query of each image
            A = (z @ t[:, 0, :, None])[..., 0] / z.shape[-1] ** 0.5  # (n, P)
        else:
            A = saliency.saliency_map(z, encoder.cls_token)  # (n, P) Eq. 1's A, as in training
        A = saliency.orient(A, args.saliency_polarity)  # the run's --saliency-polarity, as in training
        stats = region_stats.region_statistics(A, (h, w), [args.alpha], args.regions)[args.alpha]
        regions, _ = saliency.regions_from_saliency(A, (h, w), args.regions, args.alpha)  # (n, P)
        top = regions == 1  # (n, P) R_1
        out[name] = {"alpha": args.alpha, "ranked_mean": stats["ranked_mean"],
                     "positional_share": stats["positional_share"],
                     "r1_on_object": ((top & object_patch).sum() / top.sum().clamp_min(1)).item(),
                     "r1_of_objects": (top & object_patch).sum().item() / max(1, object_patch.sum().item()),
                     "r1_of_ground": (top & ~object_patch).sum().item() / max(1, (~object_patch).sum().item())}
    seed = json.load(open(os.path.join(os.path.dirname(path), "config.json")))["seed"]
    torch.manual_seed(seed)  # train.py: torch.manual_seed(args.seed); build_models(args)
    init, _, _ = train.build_models(args)
    trained = ckpt["target_encoder"]
    out.update(seed=seed, cls_cos_to_init=cos(trained["cls_token"], init.cls_token),
               cls_norm=trained["cls_token"].norm().item(), cls_norm_init=init.cls_token.norm().item(),
               patch_embed_cos_to_init=cos(trained["patch_embed.weight"], init.patch_embed.weight))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of runs on a built-in shapes set")
    p.add_argument("--alphas", default="0.03,0.05,0.075,0.1,0.15", help="area filters for the histograms")
    p.add_argument("--images", type=int, default=500, help="held-out images for the diagnosis (step 2)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    alphas = [float(a) for a in args.alphas.split(",")]
    rows = [diagnose(c, alphas, args.images) for c in args.checkpoints]
    print(f"\nmean ranked regions per held-out image (K) at each alpha; the rest at the run's alpha, {args.images} images")
    print(f"{'checkpoint':<44} " + " ".join(f"{'K@' + str(a):>7}" for a in alphas)
          + "  pos_share  R1-on-obj (chance)  P(R1|ground)  flat-bg K  cls-out K  cls-out R1-on-obj  cos(q,q0)")
    for r in rows:
        ks = [r["regions"][str(a)]["ranked_mean"] for a in alphas]
        print(f"{r['checkpoint'][-44:]:<44} " + " ".join(f"{k:>7.2f}" for k in ks)
              + f"  {r['as_is']['positional_share']:>9.3f}  {r['as_is']['r1_on_object']:.2f} ({r['object_patches']:.2f})"
              + f"        {r['as_is']['r1_of_ground']:>12.2f}  {r['flat_background']['ranked_mean']:>9.2f}      {r['cls_output_query']['ranked_mean']:>5.2f}"
              + f"              {r['cls_output_query']['r1_on_object']:.2f}      {r['cls_cos_to_init']:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": "python scripts/demo_saliency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "alphas": alphas, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
