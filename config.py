"""
The one shared configuration of train.py and evaluate.py, and the machinery around a run.

    parser      get_args_parser / parse_args / check_args: every flag, the presets, every check at
                parse time (bad values fail here, before anything is read, built or written)
    resume      check_resume_config: which flags a resumed run may change
    checkpoints save_checkpoint / load_checkpoint / restore: atomic files (plumbing.write_atomic), numbered
                copies (--keep-every), per-rank random streams
    run         pick_device, make_autocast, fit_threads, Preemption + agree_to_stop (all ranks stop at the
                same step); processes (torchrun, srun), the folder's lock and failed writes are plumbing.py's

train.py reads these; evaluate.py reads the parser, checkpoints and devices. This file imports only
the bottom layer (data.py for the datasets, model.py for the model sizes) and plumbing.py, never train
or evaluate.
"""

import argparse
import math
import os
import random
import signal
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import data
import model as vit
import plumbing
import saliency
from plumbing import dist_info, fail  # config.fail: the one-line error of every script

# ----------------------------------------------------------------------------------------------
# Configuration: one parser for train.py and evaluate.py. Presets set many defaults at once; any
# flag given on the command line still wins.

PRESETS = {
    # A few minutes on a 2-core CPU, every part of the method (docs/learning.md, results/shapes/sweep7.json):
    # "noisy_shapes" (the class is the shape of grey objects under per-pixel grain, which no part of
    # an image predicts about another), 64 px / patch 8 (an 8 x 8 grid whose tokens see an outline),
    # targets standardised over the batch (else they collapse to position), the paper's EMA.
    # alpha 0.1, not 0.15: a region needs >= 7 of the 64 patches, not 10 (two regions in ~79 % of the
    # `synthetic` set's images, not ~58 %; docs/evaluation.md). The paper's saliency rule otherwise:
    # --saliency-polarity minority with alpha 0.05 ties it (docs/learning.md "DSeq-JEPA's regions").
    "demo": dict(dataset="noisy_shapes", img_size=64, patch_size=8, model="micro", pred_dim=64,
                 pred_depth=3, epochs=6, batch_size=64, warmup_epochs=1, lr=2e-3, target_norm="batch",
                 num_train=6000, num_val=1000, knn_every=2, ckpt_every=200, alpha=0.1),
    # Small-compute research settings: 8 x 8 patches of 4 px on 32 px images.
    "cifar10-tiny": dict(dataset="cifar10", img_size=32, patch_size=4, model="tiny", pred_dim=192,
                         pred_depth=6, epochs=100, batch_size=256, warmup_epochs=10, lr=1e-3),
    "fashion-mnist-tiny": dict(dataset="fashion_mnist", img_size=32, patch_size=4, model="tiny", pred_dim=192,
                               pred_depth=6, epochs=100, batch_size=256, warmup_epochs=10, lr=1e-3),
    # The official small setting: ViT-T/16 on a 10 % ImageNet-1K subset, 256 images per GPU.
    "in1k-vit-tiny-10pct": dict(dataset="imagefolder", img_size=224, patch_size=16, model="tiny", pred_dim=192,
                                pred_depth=6, epochs=100, batch_size=2048, warmup_epochs=15, lr=1e-3),
    # Paper settings (batch 2048 global).
    "in1k-vit-base": dict(dataset="imagefolder", img_size=224, patch_size=16, model="base",
                          pred_dim=384, pred_depth=6, epochs=600, batch_size=2048, warmup_epochs=15),
    "in1k-vit-huge448": dict(dataset="imagefolder", img_size=448, patch_size=16, model="huge",
                             pred_dim=384, pred_depth=12, epochs=300, batch_size=2048, warmup_epochs=15),
}

# What a resumed run may change. A checkpoint's step only means something with the flags that
# produced it: a resume with any OTHER flag changed (method, model, data, batch size, crops,
# schedules, seed, ...) would mix two runs, so it stops with an error naming the flag.
# Free to change: how and where the run executes and what it logs; none alters the trained weights'
# meaning (accum_steps keeps the same batch; data_path may move; num_val only sizes the kNN monitor).
RESUME_FREE = ("preset", "device", "amp", "compile", "pack_splits", "pack_rows", "num_workers", "device_data", "accum_steps", "data_path",
               "num_val", "out_dir", "resume", "no_auto_resume", "resume_override", "ckpt_every", "log_every",
               "knn_every", "stop_at_step", "picture", "keep_every", "keep_last")
# Changeable with --resume-override FLAG: legitimate continuations (train longer, a new lr tail, clipping
# after a spike) whose schedules then continue from the resumed step with the new values.
RESUME_OVERRIDABLE = ("epochs", "lr", "start_lr", "final_lr", "warmup_epochs", "weight_decay",
                      "final_weight_decay", "ema", "clip_grad")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except where the default is None (the help text says what None means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Every command-line mistake is ONE line on stderr and exit code 2 (argparse's own code), no
    usage block and no traceback; prefix matching is off, so a typo such as --lambda 2.0 is an error
    instead of a silent --lambda-coin."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kw)

    def error(self, message):
        fail(message, self.prog)


def data_error_line(e):
    """A DataError's message; one raised in a DataLoader worker arrives wrapped in the worker's
    traceback, whose last line is the original `data.DataError: MESSAGE`."""
    last = str(e).strip().splitlines()[-1]
    return last.split("DataError: ", 1)[1] if "DataError: " in last else last


def get_args_parser():
    p = ArgumentParser(description="DSeq-JEPA pretraining (presets set the defaults shown; see --preset)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="sets many defaults at once (flags given explicitly still win)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=data.DATASETS, help="which data (synthetic, shapes and noisy_shapes are built in; the others need --data-path)")
    g.add_argument("--data-path", default=None, help="dataset root folder (not needed for synthetic)")
    g.add_argument("--subset-file", default=None, help="imagefolder only: list of relative image paths to use (official 10%% ImageNet subset)")
    g.add_argument("--img-size", type=int, default=224, help="input resolution (paper: 224; 448 for ViT-H)")
    g.add_argument("--patch-size", type=int, default=16, help="ViT patch size (paper: 16)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.3, 1.0), help="RandomResizedCrop scale range (paper: 0.3 1.0)")
    g.add_argument("--num-train", type=int, default=10000, help="synthetic only: number of training images")
    g.add_argument("--num-val", type=int, default=2000, help="synthetic only: number of held-out images")
    g.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per process (default: from the CPUs this process may use; "
                        "CUDA: all but one, at most 16; CPU: none up to 4 CPUs). torch's CPU threads are "
                        "then the CPUs left over, unless OMP_NUM_THREADS is set")
    g.add_argument("--device-data", choices=["auto", "on", "off"], default="auto", help="in-memory sets (synthetic, CIFAR, MNIST): "
                   "crop whole batches on the device (auto: on for them, on a CPU too; off: per-image PIL crops in the DataLoader)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="base", choices=list(vit.SIZES), help="encoder size (paper: base; huge)")
    g.add_argument("--patch-init-std", type=float, default=0.02,
                   help="std of the patch embedding's init (paper and every preset: 0.02; the 32 px demo of docs/learning.md used 0.2)")
    g.add_argument("--pred-dim", type=int, default=384, help="predictor width (I-JEPA: 384; official DSeq config: 192)")
    g.add_argument("--pred-depth", type=int, default=6, help="predictor depth (paper: 6 for ViT-B, 12 for ViT-H)")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["dseq", "ijepa"], default="dseq", help="ijepa = lambda fixed at 0 (random multi-block plans only)")
    g.add_argument("--dseq-pass", choices=["causal", "replicate"], default="causal",
                   help="causal: one block-causal pass for all of Eq. 5 (ours); replicate: one row per step (official structure, correct contexts)")
    g.add_argument("--regions", type=int, default=5, help="N, number of regions incl. background (paper: 5)")
    g.add_argument("--alpha", type=float, default=0.15, help="drop components smaller than alpha*h*w patches (paper: 0.15; the demo preset: 0.1)")
    g.add_argument("--saliency-polarity", choices=saliency.POLARITIES, default="paper", help="paper: the patches most "
                   "aligned with the CLS parameter are the foreground; minority: the smaller side of Otsu's split (paper and every preset: paper)")
    g.add_argument("--saliency-layer", type=int, default=-2, help="target-encoder block for saliency (paper: -2, block 10 of 12)")
    g.add_argument("--region-order", choices=["saliency", "random", "reverse", "raster"], default="saliency",
                   help="prediction order of the ranked regions R_1..R_{N-1} (ablation; paper: saliency). reverse = the paper's "
                        "'inverse' (least salient ranked region first); in every order the background R_N stays the last target")
    g.add_argument("--prediction", choices=["sequential", "flat"], default="sequential",
                   help="sequential (Eq. 5) or flat: every region predicted from R_1 alone (ablation)")
    g.add_argument("--region-source", choices=["saliency", "blocks"], default="saliency",
                   help="regions from saliency (paper) or random I-JEPA blocks predicted sequentially (ablation)")
    g.add_argument("--lambda-coin", choices=["sample", "batch"], default="sample",
                   help="draw the DSeq-vs-I-JEPA choice per sample, or once per batch (official code)")
    g.add_argument("--target-norm", choices=["layer", "batch"], default="layer",
                   help="layer: layer norm of each target token (I-JEPA, paper); batch: then also each position and "
                        "channel standardised over the images of the batch (takes the position part out; docs/learning.md)")
    g.add_argument("--num-targets", type=int, default=4, help="I-JEPA target blocks per image (paper: 4)")
    g.add_argument("--target-scale", type=float, nargs=2, default=(0.15, 0.2), help="I-JEPA target block scale (paper: 0.15 0.2)")
    g.add_argument("--context-scale", type=float, nargs=2, default=(0.85, 1.0), help="I-JEPA context block scale (paper: 0.85 1.0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=600, help="pretraining epochs (paper: 600 ViT-B, 300 ViT-H)")
    g.add_argument("--batch-size", type=int, default=2048, help="GLOBAL batch size over all processes (paper: 2048)")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper: 1e-3)")
    g.add_argument("--start-lr", type=float, default=1e-4, help="learning rate at step 0 of warmup (paper: 1e-4)")
    g.add_argument("--final-lr", type=float, default=1e-6, help="learning rate at the end of the cosine (paper: 1e-6)")
    g.add_argument("--warmup-epochs", type=float, default=15, help="linear warmup epochs (paper: 15)")
    g.add_argument("--weight-decay", type=float, default=0.04, help="weight decay at step 0 (paper: 0.04)")
    g.add_argument("--final-weight-decay", type=float, default=0.4, help="weight decay at the end, cosine ramp (paper: 0.4)")
    g.add_argument("--ema", type=float, nargs=2, default=(0.996, 1.0), help="EMA momentum start and end, linear (paper: 0.996 1.0)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="clip the global grad norm (0 = off; paper: off)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast dtype: auto = bf16 on CUDA, none on CPU; fp16 uses a GradScaler")
    g.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile encoder, predictor and target features, static shapes: plans and sub-batches "
                        "padded to a few sizes (masking.pad_width, split_plan), one graph each; a compiler error falls "
                        "back to eager. auto: on for CUDA, off on the CPU (a C++ build per shape); --compile = on")
    g.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    g.add_argument("--pack-splits", default="auto",
                   help="K: both networks run on ~K sub-batches of similar-length rows, each padded to its own width (same "
                        "loss); 1 = one padded batch; auto: up to 8 where the padding saved pays for the pass (masking.pack_settings)")
    g.add_argument("--pack-rows", type=int, default=None, help="most rows per sub-batch (default: K: max(rows / K, 8); auto: by activations on a CPU, none on a GPU); 0 = none")
    g.add_argument("--seed", type=int, default=0, help="random seed: the networks from it on every rank; plans from seed + rank")
    g.add_argument("--out-dir", default=None, help="checkpoints, metrics.jsonl, config.json and pictures go here "
                   "(default: out/PRESET, plus -ijepa / -replicate for those variants: each command its own folder)")
    g.add_argument("--resume", default=None, help="checkpoint to resume from (default: OUT_DIR/checkpoint.pt if present)")
    g.add_argument("--no-auto-resume", action="store_true", help="start fresh even if OUT_DIR holds a checkpoint (it is overwritten)")
    g.add_argument("--resume-override", nargs="+", default=[], metavar="FLAG",
                   help="on resume, accept these changed flags instead of stopping, e.g. --resume-override epochs "
                        f"(allowed: {', '.join(RESUME_OVERRIDABLE)}; the schedules then follow the new values "
                        "from the resumed step on)")
    g.add_argument("--ckpt-every", type=int, default=1000, help="write a checkpoint every this many steps (and at the end)")
    g.add_argument("--keep-every", type=int, default=0, help="also keep the checkpoint of every this many epochs "
                   "as checkpoint-epNNNN.pt beside checkpoint.pt (0 = off; official I-JEPA: every 50 epochs)")
    g.add_argument("--keep-last", type=int, default=0, help="--keep-every: keep only the last K numbered checkpoints (0 = all)")
    g.add_argument("--log-every", type=int, default=10, help="append to metrics.jsonl every this many steps")
    g.add_argument("--knn-every", type=int, default=10, help="kNN monitor on the held-out split every this many epochs (0 = only at the end)")
    g.add_argument("--stop-at-step", type=int, default=0, help="stop with a checkpoint at this global step without changing the schedules (0 = run to the end)")
    g.add_argument("--picture", action=argparse.BooleanOptionalAction, default=True,
                   help="write a picture of saliency regions and plans at the end")
    return p


def parse_args(argv=None, parser=None):
    """Parse with presets: the preset's values become defaults, explicit flags override them.
    The preset is read first, so --help shows the defaults this command will really use."""
    parser = parser or get_args_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="demo")
    preset = pre.parse_known_args(argv)[0].preset
    if preset in PRESETS:  # an unknown one is reported by the full parse below
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def check_args(args, parser):
    """Bad values and flag combinations fail here, at parse time, with the fix in the message:
    nothing has been read, built or written yet."""
    if args.out_dir is None:  # out/PRESET, plus -ijepa / -replicate: the README's commands never share a folder
        args.out_dir = os.path.join("out", args.preset + ("-ijepa" if args.method == "ijepa" else "")
                                    + ("-replicate" if args.dseq_pass == "replicate" else ""))
    try:
        data.check_img_size(args.img_size, args.patch_size)
    except data.DataError as e:
        parser.error(f"--img-size / --patch-size: {e}")
    if args.dataset in data.BUILT_IN and args.img_size < 16:
        parser.error(f"--img-size {args.img_size}: the synthetic shapes need at least 16 px (demo: 32)")
    _, depth, heads = vit.SIZES[args.model]
    if args.regions < 2:
        parser.error(f"--regions {args.regions}: need at least 2 (one ranked region and the background)")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha {args.alpha} must be in (0, 1) (paper: 0.15)")
    # every ranked region covers at least alpha of the grid, so at most 1 / alpha of them can exist
    if (args.regions - 1) * args.alpha > 1 + 1e-9:
        parser.error(f"--regions {args.regions} with --alpha {args.alpha}: each ranked region needs {args.alpha:g} "
                     f"of the image, so at most {int(1 / args.alpha + 1e-9) + 1} regions can exist; lower --regions "
                     "or --alpha (paper: 5 and 0.15)")
    if not -depth <= args.saliency_layer < depth:
        parser.error(f"--saliency-layer {args.saliency_layer}: --model {args.model} has blocks 0..{depth - 1} "
                     f"(or -1..-{depth} from the end; paper: -2)")
    if args.pack_splits != "auto" and not (str(args.pack_splits).isdigit() and int(args.pack_splits) >= 1):
        parser.error(f"--pack-splits {args.pack_splits}: need at least 1 (1 = one padded batch, no split) or auto")
    args.pack_splits = args.pack_splits if args.pack_splits == "auto" else int(args.pack_splits)
    if (args.pack_rows or 0) < 0:
        parser.error(f"--pack-rows {args.pack_rows}: need 0 (no limit) or more rows per sub-batch")
    if args.pred_depth < 1 or args.pred_dim < 1:
        parser.error("--pred-depth and --pred-dim must be positive")
    if args.pred_dim % heads and not hasattr(args, "eval"):  # evaluate.py builds no predictor
        parser.error(f"--pred-dim {args.pred_dim} is not divisible by the {heads} heads of --model {args.model}; "
                     f"pick a multiple of {heads} (e.g. {heads * 64})")
    if args.method == "ijepa" and (args.dseq_pass != "causal" or args.region_order != "saliency"
                                   or args.prediction != "sequential" or args.region_source != "saliency"):
        parser.error("DSeq flags (--dseq-pass/--region-order/--prediction/--region-source) have no effect with --method ijepa; drop them")
    if args.num_targets < 1:
        parser.error(f"--num-targets {args.num_targets}: I-JEPA needs at least 1 target block (paper: 4)")
    for flag, (lo, hi) in (("--crop-scale", args.crop_scale), ("--target-scale", args.target_scale),
                           ("--context-scale", args.context_scale)):
        if not 0 < lo <= hi <= 1:
            parser.error(f"{flag} {lo:g} {hi:g}: need 0 < MIN <= MAX <= 1 (fractions of the image)")
    if not 0 <= args.ema[0] <= args.ema[1] <= 1:
        parser.error(f"--ema {args.ema[0]:g} {args.ema[1]:g}: need 0 <= START <= END <= 1 (paper: 0.996 1.0)")
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.amp == "fp16" and not cuda:
        parser.error("--amp fp16 needs CUDA; use --amp none (or bf16) on the CPU")
    args.compile = args.compile == "on" or (args.compile == "auto" and cuda)  # a bool from here on
    if args.dataset not in data.BUILT_IN and args.data_path is None:
        parser.error(f"--dataset {args.dataset} needs --data-path (the folder holding it)")
    if args.accum_steps < 1 or args.batch_size < 1:
        parser.error("--batch-size and --accum-steps must be positive")
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs} must be at least 1")
    if args.lr <= 0 or min(args.start_lr, args.final_lr, args.weight_decay, args.final_weight_decay,
                           args.warmup_epochs, args.clip_grad) < 0:
        parser.error("--lr must be positive; --start-lr, --final-lr, --weight-decay, --final-weight-decay, "
                     "--warmup-epochs and --clip-grad must be >= 0")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed {args.seed} must be in 0..2**32-1 (it seeds numpy too)")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num-workers {args.num_workers} must be >= 0 (0 = load in the main process)")
    if args.dataset in data.BUILT_IN and args.num_train < args.batch_size:
        parser.error(f"--num-train {args.num_train} is smaller than one batch (--batch-size {args.batch_size})")
    if args.num_val < 1:
        parser.error(f"--num-val {args.num_val} must be at least 1 (the kNN monitor queries it)")
    for flag in ("log_every", "ckpt_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1 (steps)")
    if args.knn_every < 0 or args.stop_at_step < 0:
        parser.error("--knn-every and --stop-at-step must be >= 0 (0 = only at the end / run to the end)")
    if args.keep_every < 0 or args.keep_last < 0:
        parser.error("--keep-every and --keep-last must be >= 0 (0 = no numbered checkpoints / keep them all)")
    bad = [f for f in args.resume_override if f.replace("-", "_").lstrip("_") not in RESUME_OVERRIDABLE]
    if bad:
        parser.error(f"--resume-override {' '.join(bad)}: only {', '.join(RESUME_OVERRIDABLE)} may change "
                     "on resume; for anything else use another --out-dir")


BEFORE_FLAG = {"saliency_polarity": "paper"}  # what a config saved before the flag existed meant by it


def flag_differences(saved, args, allowed=RESUME_FREE):
    """Keys of args whose value differs from a run's saved config (a dict), except those in `allowed` and those
    an older config lacks (but BEFORE_FLAG's). nargs=2 flags compare as lists (tuple default, list from JSON)."""
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v
    saved = {**BEFORE_FLAG, **saved}
    return [k for k, v in vars(args).items() if k not in allowed and k in saved and norm(saved[k]) != norm(v)]


def check_resume_config(saved, args, path):
    """Stop (one line, exit 2) if a run-defining flag differs from the checkpoint's saved config.
    Flags in RESUME_FREE may always differ; RESUME_OVERRIDABLE ones when named in --resume-override.
    Keys an older checkpoint lacks are not compared (but BEFORE_FLAG's)."""
    saved, allowed = {**BEFORE_FLAG, **saved}, set(RESUME_FREE) | {f.replace("-", "_").lstrip("_") for f in args.resume_override}
    for key in flag_differences(saved, args, allowed):
        value = getattr(args, key)
        flag = "--" + key.replace("_", "-")
        show = lambda v: " ".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        way = (f"or add --resume-override {key.replace('_', '-')} to continue it with the new value"
               if key in RESUME_OVERRIDABLE else f"or pass {flag} {show(saved[key])} to continue it")
        fail(f"{flag} {show(value)} differs from the checkpoint {path} being resumed ({flag} {show(saved[key])}); "
             f"use another --out-dir for a new run (or --no-auto-resume to overwrite this one), {way}")


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, self-describing, never overwritten by a failing run.

CKPT_KEYS = ("encoder", "predictor", "target_encoder", "optimizer", "step", "config")

# Sanity bound on checkpointed weights. ViT weights are O(1) (init std 0.02, LayerNorm gains ~1) and
# weight decay keeps them there; a healthy run stays far below 1e3. One AdamW step moves a weight by
# about lr, so only a divergence (e.g. --lr 1e6: ~1e6 after step 1) crosses 1e4, while the loss can
# still look finite. Such weights are never written as "the last good checkpoint".
MAX_ABS_WEIGHT = 1e4


def rng_state(generator):
    """This process's random streams: torch / numpy / python / CUDA and the plan generator."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "plan": generator.get_state()}


def save_checkpoint(path, models, optimizer, scaler, step, args, generator, keep=0):
    """Every process calls this (each rank's random streams are gathered); rank 0 writes the file, and
    with keep > 0 keeps it as checkpoint-ep{keep}.pt too. A failed write stops every rank (one line).
    "rng" is a list indexed by rank: every rank draws its own plans and resumes its own stream.
    Only finite weights below MAX_ABS_WEIGHT (after a finite loss, agreed by the loop) become "the last
    good checkpoint"; DDP keeps the weights identical on every rank, so every rank stops here alike."""
    for name, m in zip(("encoder", "predictor", "target_encoder"), models):
        top = torch.stack([p.detach().abs().amax() for p in m.parameters()]).amax().item()  # one read per network
        if not math.isfinite(top) or top > MAX_ABS_WEIGHT:  # amax propagates NaN
            fail(f"step {step}: {name} holds a weight of magnitude {top:.3g} (bound {MAX_ABS_WEIGHT:g}); the run "
                 f"diverged, so no checkpoint is written (the last good one in {args.out_dir} is "
                 "intact). Try a lower --lr or --clip-grad 1.0.")
    rank, world = dist_info()
    rngs = [rng_state(generator)]
    if world > 1:
        rngs = [None] * world if rank == 0 else None
        dist.gather_object(rng_state(generator), rngs, dst=0)
    if rank != 0:
        return plumbing.check_writes()  # rank 0's write failed: stop with it, not in the next all-reduce
    encoder, predictor, target_encoder = models
    state = {
        "encoder": encoder.state_dict(), "predictor": predictor.state_dict(),
        "target_encoder": target_encoder.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step, "config": vars(args), "rng": rngs,
    }
    # atomic: a crash or a full disk mid-write leaves the previous checkpoint intact
    if plumbing.write_atomic(path, lambda f: torch.save(state, f), size=plumbing.nbytes(state)) and keep:
        plumbing.keep_checkpoint(path, keep, args.keep_last)
    plumbing.check_writes()


def load_checkpoint(path, fix="pass --resume with another file, or --no-auto-resume to start fresh"):
    """Read a checkpoint written by save_checkpoint; a one-line error (no traceback) if it is not one.
    fix: what the calling script's user should do instead (evaluate.py names its own flag)."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, wrong format, ...
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
             f"It is corrupt or not a dseq-jepa checkpoint; {fix}")
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        fail(f"{path} is not a dseq-jepa training checkpoint (missing {missing}); {fix}")
    return ckpt


def restore(ckpt, path, models, optimizer, scaler, generator):
    for name, m in zip(("encoder", "predictor", "target_encoder"), models):
        try:
            m.load_state_dict(ckpt[name])
        except RuntimeError as e:
            sys.exit(f"error: checkpoint {path} does not fit this model ({name}): {str(e).splitlines()[0]} ... "
                     f"It was written with --model {ckpt['config'].get('model')} --img-size {ckpt['config'].get('img_size')} "
                     f"--patch-size {ckpt['config'].get('patch_size')} --pred-dim {ckpt['config'].get('pred_dim')}; "
                     f"use the same flags, or another --out-dir.")
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], generator, ckpt["step"], ckpt["config"].get("seed", 0))
    return ckpt["step"]


def restore_rng(rngs, generator, step, seed):
    """Each rank takes back its own random streams from a checkpoint's "rng" (a list indexed by rank;
    checkpoints from before per-rank states hold one dict, rank 0's).

    Resumed on another number of processes, the old streams cannot continue (the data shards change
    too, so the run is no longer the uninterrupted one): every rank then starts fresh streams from
    (seed, step, rank), so ranks still draw different plans and none repeats the plans of step 0."""
    rank, world = dist_info()
    states = rngs if isinstance(rngs, list) else [rngs]
    if len(states) != world:
        if rank == 0:
            print(f"warning: the checkpoint holds the random state of {len(states)} process(es), this run has "
                  f"{world}; every process starts a fresh stream from (seed, step, rank). Training continues "
                  f"correctly but does not repeat what an uninterrupted run would have drawn.")
        fresh = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
        torch.manual_seed(fresh), np.random.seed(fresh), random.seed(fresh)
        generator.manual_seed(fresh)
        return
    rng = states[rank]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["plan"])


# ----------------------------------------------------------------------------------------------
# The run: device, precision, threads, processes, preemption


def pick_device(args, local_rank):
    """--device. auto and a bare "cuda" mean this process's GPU, chosen by LOCAL_RANK (plumbing.cuda_index)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", plumbing.cuda_index(local_rank))
    return device


def make_autocast(args, device):
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp == "none":
        return nullcontext(), None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    # bf16 has fp32's exponent range: no loss scaling needed. fp16 does need a GradScaler.
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fit_threads(args, device):
    """Workers + torch threads that fit the CPUs this process may use (data.usable_cpus), so that
    neither oversubscribes the machine; never more threads than torch's own default (the physical
    cores: hyper-threads slow matrix code down). OMP_NUM_THREADS, when set, wins for the threads."""
    workers = args.num_workers if args.num_workers is not None else data.default_num_workers(device)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), data.default_num_threads(workers)))
    return workers


class Preemption:
    """SIGTERM / SIGUSR1 (cluster preemption) set a flag; all ranks agree on it after a step (agree_to_stop;
    torchrun on CUDA: the next log / checkpoint step), checkpoint and exit cleanly. Workers ignore them."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def agree_to_stop(stop, diverged, device):
    """Combine every rank's "a stop signal arrived" and "my loss is not finite" (and rank 0's "a write failed",
    plumbing.report) with one small all-reduce (MAX), so that all ranks stop at the same step. A rank that
    left on its own would leave the others waiting forever in the next gradient all-reduce, and no checkpoint
    would be written. Returns (stop, diverged) as seen by all ranks; one process: no communication. Called at
    steps all ranks know (train.py)."""
    _, world = dist_info()
    if world == 1:
        return stop, diverged
    flags = torch.tensor([float(stop), float(diverged), float(plumbing.write_pending())],  # (3,), NCCL reduces
                         device=device if dist.get_backend() == "nccl" else "cpu")  # CUDA tensors, gloo CPU ones
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop, diverged, failed = flags.tolist()
    if failed:
        plumbing.check_writes()  # every rank stops with rank 0's line
    return stop > 0, diverged > 0
