"""
Pretrain a ViT with DSeq-JEPA (or I-JEPA, the same code with lambda = 0).

    python train.py                                   # demo: micro ViT, synthetic data, CPU minutes
    python train.py --preset fashion-mnist-tiny --data-path DIR
    torchrun --nproc_per_node=8 train.py --preset in1k-vit-base --data-path /data/imagenet

The step (train_step below) reads top to bottom as the paper:
  1. targets + saliency from the EMA target encoder (no grad)       saliency.py, Eq. 1-3
  2. the plan: which patches are context / targets at which level   masking.py, Eq. 5 + lambda
  3. context encoder on the context tokens                          model.py
  4. predictor on the plan's targets                                model.py
  5. smooth-L1 loss on layer-normed targets (fp32)
  6. backward + AdamW step (train loop)
  7. EMA update of the target encoder
Schedules (lr, wd, EMA momentum, lambda) are pure functions of the global step, so resuming needs
only the step. Only rank 0 logs and writes.
"""

import argparse
import copy
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import masking
import model as vit
import saliency

# ----------------------------------------------------------------------------------------------
# Configuration: one parser, shared with evaluate.py. Presets set many defaults at once; any
# flag given on the command line still wins.

PRESETS = {
    # A few minutes on a 2-core CPU: shows every part of the method end to end.
    # alpha 0.1 instead of the paper's 0.15: on the 8 x 8 grid 0.15 means >= 10 of 64 patches per
    # region, and Otsu's foreground (~40 % of the patches) then holds two such regions in only
    # ~58 % of the images; at 0.1 (>= 7 patches) ~79 % have two, so most plans have 2 steps
    # (`evaluate.py --eval regions` measures this histogram; README "Region statistics").
    "demo": dict(dataset="synthetic", img_size=32, patch_size=4, model="micro", pred_dim=64,
                 pred_depth=3, epochs=6, batch_size=64, warmup_epochs=1, lr=1e-3, num_train=6000,
                 num_val=1000, knn_every=0, ckpt_every=200, alpha=0.1),
    # Small-compute research settings: 8 x 8 patches of 4 px on 32 px images.
    "cifar10-tiny": dict(dataset="cifar10", img_size=32, patch_size=4, model="tiny", pred_dim=192,
                         pred_depth=6, epochs=100, batch_size=256, warmup_epochs=10, lr=1e-3),
    "fashion-mnist-tiny": dict(dataset="fashion_mnist", img_size=32, patch_size=4, model="tiny",
                               pred_dim=192, pred_depth=6, epochs=100, batch_size=256,
                               warmup_epochs=10, lr=1e-3),
    # The official small setting: ViT-T/16 on a 10 % ImageNet-1K subset, 256 images per GPU.
    "in1k-vit-tiny-10pct": dict(dataset="imagefolder", img_size=224, patch_size=16, model="tiny",
                                pred_dim=192, pred_depth=6, epochs=100, batch_size=2048,
                                warmup_epochs=15, lr=1e-3),
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
RESUME_FREE = ("preset", "device", "amp", "compile", "pack_splits", "num_workers", "device_data", "accum_steps", "data_path",
               "num_val", "out_dir", "resume", "no_auto_resume", "resume_override", "ckpt_every", "log_every",
               "knn_every", "stop_at_step", "picture")
# Changeable with --resume-override FLAG: legitimate continuations (train longer, a new lr tail, clipping
# after a spike) whose schedules then continue from the resumed step with the new values.
RESUME_OVERRIDABLE = ("epochs", "lr", "start_lr", "final_lr", "warmup_epochs", "weight_decay",
                      "final_weight_decay", "ema", "clip_grad")

# Sanity bound on checkpointed weights. ViT weights are O(1) (init std 0.02, LayerNorm gains ~1) and
# weight decay keeps them there; a healthy run stays far below 1e3. One AdamW step moves a weight by
# about lr, so only a divergence (e.g. --lr 1e6: ~1e6 after step 1) crosses 1e4, while the loss can
# still look finite. Such weights are never written as "the last good checkpoint".
MAX_ABS_WEIGHT = 1e4


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


def fail(message, prog=None):
    """One-line error for a mistake the user can fix: `PROG: error: MESSAGE`, exit code 2."""
    prog = prog or os.path.basename(sys.argv[0])
    tqdm.write(f"{prog}: error: {message}", file=sys.stderr)  # on its own line below a progress bar
    stop = SystemExit(message)  # str() is the message (for callers and tests) ...
    stop.code = 2  # ... while the process exits with argparse's code for usage errors, printing nothing more
    raise stop


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
    g.add_argument("--dataset", default="synthetic", choices=data.DATASETS, help="which data (synthetic is built in; the others need --data-path)")
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
    g.add_argument("--device-data", choices=["auto", "on", "off"], default="auto",
                   help="keep small datasets as uint8 on the device and crop batches there (auto: on for CUDA)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="base", choices=list(vit.SIZES), help="encoder size (paper: base; huge)")
    g.add_argument("--pred-dim", type=int, default=384, help="predictor width (I-JEPA: 384; official DSeq config: 192)")
    g.add_argument("--pred-depth", type=int, default=6, help="predictor depth (paper: 6 for ViT-B, 12 for ViT-H)")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["dseq", "ijepa"], default="dseq", help="ijepa = lambda fixed at 0 (random multi-block plans only)")
    g.add_argument("--dseq-pass", choices=["causal", "replicate"], default="causal",
                   help="causal: one block-causal pass for all of Eq. 5 (ours); replicate: one row per step (official structure, correct contexts)")
    g.add_argument("--regions", type=int, default=5, help="N, number of regions incl. background (paper: 5)")
    g.add_argument("--alpha", type=float, default=0.15, help="drop components smaller than alpha*h*w patches (paper: 0.15; the demo preset: 0.1)")
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
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile encoder and predictor; plans are then padded to 4 sizes per octave "
                        "(masking.pad_width) so a run compiles a handful of graphs. Off by default: on an H200 with "
                        "torch 2.11, Inductor crashed compiling the backward of these dynamic-shape graphs (README, "
                        "known limitations); eager bf16 is tested there")
    g.add_argument("--pack-splits", type=int, default=4,
                   help="K: run the context encoder and the predictor on up to K sub-batches of rows of similar "
                        "length, each padded to its own width (masking.split_plan; same loss and gradients); "
                        "1 = one batch padded to its longest row. 4 measured best on a CPU (bench.py: I-JEPA "
                        "waste 27 -> 8 %% of the encoder's tokens at batch 64)")
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


def default_out_dir(args):
    """out/PRESET, with -ijepa / -replicate for those variants: the README's commands never share a folder."""
    return os.path.join("out", args.preset + ("-ijepa" if args.method == "ijepa" else "")
                        + ("-replicate" if args.dseq_pass == "replicate" else ""))


def check_args(args, parser):
    """Bad values and flag combinations fail here, at parse time, with the fix in the message:
    nothing has been read, built or written yet."""
    if args.out_dir is None:
        args.out_dir = default_out_dir(args)
    try:
        data.check_img_size(args.img_size, args.patch_size)
    except data.DataError as e:
        parser.error(f"--img-size / --patch-size: {e}")
    if args.dataset == "synthetic" and args.img_size < 16:
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
    if args.pack_splits < 1:
        parser.error(f"--pack-splits {args.pack_splits}: need at least 1 (1 = one padded batch, no split)")
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
    if args.amp == "fp16" and (args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())):
        parser.error("--amp fp16 needs CUDA; use --amp none (or bf16) on the CPU")
    if args.dataset != "synthetic" and args.data_path is None:
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
    if args.dataset == "synthetic" and args.num_train < args.batch_size:
        parser.error(f"--num-train {args.num_train} is smaller than one batch (--batch-size {args.batch_size})")
    if args.num_val < 1:
        parser.error(f"--num-val {args.num_val} must be at least 1 (the kNN monitor queries it)")
    for flag in ("log_every", "ckpt_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1 (steps)")
    if args.knn_every < 0 or args.stop_at_step < 0:
        parser.error("--knn-every and --stop-at-step must be >= 0 (0 = only at the end / run to the end)")
    bad = [f for f in args.resume_override if f.replace("-", "_").lstrip("_") not in RESUME_OVERRIDABLE]
    if bad:
        parser.error(f"--resume-override {' '.join(bad)}: only {', '.join(RESUME_OVERRIDABLE)} may change "
                     "on resume; for anything else use another --out-dir")


def check_resume_config(saved, args, path):
    """Stop (one line, exit 2) if a run-defining flag differs from the checkpoint's saved config.
    Flags in RESUME_FREE may always differ; RESUME_OVERRIDABLE ones when named in --resume-override.
    Keys an older checkpoint lacks are not compared."""
    allowed = set(RESUME_FREE) | {f.replace("-", "_").lstrip("_") for f in args.resume_override}
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # nargs=2: tuple default, list typed
    for key, value in vars(args).items():
        if key in allowed or key not in saved or norm(saved[key]) == norm(value):
            continue
        flag = "--" + key.replace("_", "-")
        show = lambda v: " ".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        way = (f"or add --resume-override {key.replace('_', '-')} to continue it with the new value"
               if key in RESUME_OVERRIDABLE else f"or pass {flag} {show(saved[key])} to continue it")
        fail(f"{flag} {show(value)} differs from the checkpoint {path} being resumed ({flag} {show(saved[key])}); "
             f"use another --out-dir for a new run (or --no-auto-resume to overwrite this one), {way}")


# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step (resume = knowing the step).


def lr_at(step, args, total, warmup):
    if step < warmup:
        return args.start_lr + (args.lr - args.start_lr) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return args.final_lr + (args.lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * t))


def wd_at(step, args, total):  # cosine ramp UP from 0.04 to 0.4, as I-JEPA
    t = step / max(1, total)
    return args.final_weight_decay + (args.weight_decay - args.final_weight_decay) * 0.5 * (1 + math.cos(math.pi * t))


def ema_at(step, args, total):
    return args.ema[0] + (args.ema[1] - args.ema[0]) * step / max(1, total)


def lambda_at(step, args, total):  # curriculum: probability of a discriminative plan, 0 -> 1
    return 0.0 if args.method == "ijepa" else step / max(1, total)


# ----------------------------------------------------------------------------------------------
# Models and the step


def build_models(args):
    """Context encoder f, predictor g, and target encoder f_bar (a frozen copy, updated by EMA)."""
    encoder = vit.vit(args.model, img_size=args.img_size, patch_size=args.patch_size)
    predictor = vit.predictor_for(encoder, pred_dim=args.pred_dim, depth=args.pred_depth)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    return encoder, predictor, target_encoder


def make_optimizer(encoder, predictor, args):
    """AdamW; biases and 1-D (norm) weights get no weight decay, as I-JEPA."""
    params = [p for m in (encoder, predictor) for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0, "no_decay": True}],
                             lr=args.lr)


def make_targets(target_encoder, images, args):
    """Step 1: regression targets and discriminative regions, from the EMA target encoder.

    images: (B, 3, H, W) -> targets (B, P, D) fp32, regions (B, P) int64 or None, stats dict
    """
    z_sal, h = target_encoder.features(images, layers=(args.saliency_layer, -1))  # (B, P, D) x 2
    targets = F.layer_norm(h.float(), (h.shape[-1],))  # (B, P, D), the I-JEPA target
    # Collapse signal: spread of the pooled representation across images (-> 0 if collapsed).
    stats = {"target_std": h.float().mean(1).std(0).mean()}
    regions = None
    if args.method == "dseq" and args.region_source == "saliency":
        regions, _ = saliency.discriminative_regions(z_sal.float(), target_encoder.cls_token.float(),
                                                     grid=target_encoder.grid, n_regions=args.regions,
                                                     alpha=args.alpha)  # (B, P)
        ranked = (regions < args.regions).float()  # (B, P), patch lies in some R_1..R_{N-1}
        stats["ranked_regions"] = regions.masked_fill(regions >= args.regions, 0).amax(1).float().mean()
        stats["salient_share"] = ranked.mean()
    return targets, regions, stats


def make_plan(regions, lam, generator, grid, args, batch_size, device):
    """Step 2: the per-sample lambda mix of discriminative and multi-block plans (masking.py)."""
    return masking.make_plan(regions, lam, generator, grid, batch_size=batch_size, device=device,
                             mode=args.dseq_pass, order=args.region_order, prediction=args.prediction,
                             source=args.region_source, per_batch_coin=args.lambda_coin == "batch",
                             num_regions=args.regions, n_targets=args.num_targets,
                             geometric=bool(args.compile),  # few shapes -> few compiled graphs
                             target_scale=tuple(args.target_scale), context_scale=tuple(args.context_scale))


def jepa_loss(encoder, predictor, images, targets, plan):
    """Steps 3-5 for a given plan, or for the sub-plans of one plan (masking.split_plan).

    images: (B, 3, H, W); targets: (B, P, D) fp32; plan rows R (R = B except replicate mode)
    returns the smooth-L1 loss, mean over real target tokens and channels (fp32). A list of
    sub-plans gives the same mean: the sum of every sub-plan's per-token losses over the total
    number of real target tokens (not a mean of sub-plan means, which would weigh short rows up).
    """
    if isinstance(plan, list):
        sums, counts = zip(*(_loss_sum(encoder, predictor, images, targets, p) for p in plan))
        return torch.stack(sums).sum() / torch.stack(counts).sum()
    total, count = _loss_sum(encoder, predictor, images, targets, plan)
    return total / count


def _loss_sum(encoder, predictor, images, targets, plan):
    """Steps 3-5 of jepa_loss for one plan: (sum of per-token losses, number of real target tokens)."""
    # One row per image (R = B) means sample = arange(B): skip the copy. Replicate rows repeat images.
    x = images if plan.sample.shape[0] == images.shape[0] else images[plan.sample]  # (R, 3, H, W)
    # 3. context encoder: only the plan's context patches, block-causal over levels (no mask at
    # all when every row is one level without padding: the flash-attention fast path on a GPU)
    ctx = encoder(x, plan.ctx_idx, None if plan.ctx_full else plan.ctx_lvl)  # (R, Lc, D)
    # 4. predictor: one mask token per target position, sees what the level rule allows
    pred = predictor(ctx, plan.ctx_idx, plan.ctx_lvl, plan.tgt_idx, plan.tgt_lvl, plan.tgt_grp)  # (R, Lt, D)
    # 5. loss against the target encoder's features at the target positions
    tgt = targets[plan.sample]  # (R, P, D)
    tgt = tgt.gather(1, plan.tgt_idx[..., None].expand(-1, -1, tgt.shape[-1]))  # (R, Lt, D)
    per_token = F.smooth_l1_loss(pred.float(), tgt, reduction="none", beta=1.0).mean(-1)  # (R, Lt)
    real = (plan.tgt_lvl > 0).float()  # (R, Lt), padding is not scored
    return (per_token * real).sum(), real.sum()


@torch.no_grad()
def ema_update(target_encoder, encoder, momentum):
    """Step 7: f_bar <- m * f_bar + (1 - m) * f, in one foreach call (no per-parameter loop)."""
    tgt = list(target_encoder.parameters())
    src = [p.detach() for p in encoder.parameters()]
    torch._foreach_mul_(tgt, momentum)
    torch._foreach_add_(tgt, src, alpha=1.0 - momentum)


def train_step(models, images, lam, args, generator, autocast):
    """Steps 1-5 for one micro-batch with curriculum probability lam (lambda_at of the step).
    Returns (loss, plan, stats); backward / optimizer step / EMA are the loop's."""
    encoder, predictor, target_encoder = models
    with torch.no_grad(), autocast:
        targets, regions, stats = make_targets(target_encoder, images, args)  # 1.
    plan = make_plan(regions, lam, generator, target_encoder.grid, args, images.shape[0], images.device)  # 2.
    # Rows of similar length run together, each sub-batch padded to its own width (same loss).
    parts = masking.split_plan(plan, args.pack_splits, geometric=bool(args.compile))
    with autocast:
        loss = jepa_loss(encoder, predictor, images, targets, parts if len(parts) > 1 else plan)  # 3.-5.
    stats["dseq_share"] = plan.dseq.float().mean()
    stats["regions_per_image"] = plan.n_regions.float().mean()
    stats["context_tokens"] = (plan.ctx_lvl > 0).sum() / images.shape[0]
    stats["target_tokens"] = (plan.tgt_lvl > 0).sum() / images.shape[0]
    return loss, plan, stats


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, self-describing, never overwritten by a failing run.

CKPT_KEYS = ("encoder", "predictor", "target_encoder", "optimizer", "step", "config")


def rng_state(generator):
    """This process's random streams: torch / numpy / python / CUDA and the plan generator."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "plan": generator.get_state()}


def save_checkpoint(path, models, optimizer, scaler, step, args, generator):
    """Every process calls this (each rank's random streams are gathered); rank 0 writes the file.
    "rng" is a list indexed by rank: every rank draws its own plans and resumes its own stream."""
    rank, world = dist_info()
    rngs = [rng_state(generator)]
    if world > 1:
        rngs = [None] * world if rank == 0 else None
        dist.gather_object(rng_state(generator), rngs, dst=0)
    if rank != 0:
        return
    encoder, predictor, target_encoder = models
    state = {
        "encoder": encoder.state_dict(), "predictor": predictor.state_dict(),
        "target_encoder": target_encoder.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step, "config": vars(args), "rng": rngs,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact


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


def weights_are_sane(models):
    """(ok, why): every weight finite and below MAX_ABS_WEIGHT (see there), checked before a checkpoint."""
    for name, m in zip(("encoder", "predictor", "target_encoder"), models):
        top = torch.stack([p.detach().abs().amax() for p in m.parameters()]).amax().item()  # one read per network
        if not math.isfinite(top) or top > MAX_ABS_WEIGHT:  # amax propagates NaN
            return False, f"{name} holds a weight of magnitude {top:.3g} (bound {MAX_ABS_WEIGHT:g})"
    return True, ""


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
# Setup helpers


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return rank, world, local


def dist_info():
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(args, local_rank):
    if args.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is visible; use --device cpu")
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


def wrap_for_speed(models, args, world, device):
    """DDP and torch.compile around the modules the step calls. The raw modules stay the caller's,
    for EMA and checkpoints; the EMA target encoder is never wrapped in DDP (it gets no gradients).
    Returns (encoder, predictor, target_encoder) to pass to train_step."""
    encoder, predictor, target_encoder = models
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # No buffer broadcast in forward (our only buffers are the fixed sin-cos tables): it is a
        # collective, and with sub-batches (--pack-splits) ranks may run different numbers of forwards.
        encoder, predictor = (DDP(m, device_ids=ids, broadcast_buffers=False) for m in (encoder, predictor))
    if args.compile:
        # Plan widths change from step to step, so torch.compile soon recompiles with a dynamic
        # sequence length. On an H200 with torch 2.11 the backward of such a graph crashed in
        # Inductor's "mix-order reduction" (LayerNorm-backward partial sums: "shape '[1408, 384]' is
        # invalid for input of size 640"; results/gpu/, pytorch issue 186426). Turning that one fusion
        # off costs a little backward speed and keeps dynamic shapes, so the graph count stays small.
        import torch._inductor.config as inductor_config
        inductor_config.triton.mix_order_reduction = False
        encoder, predictor = torch.compile(encoder), torch.compile(predictor)
        target_encoder.features = torch.compile(target_encoder.features)  # data-dependent saliency stays eager
    return encoder, predictor, target_encoder


def fit_threads(args, device):
    """Workers + torch threads that fit the CPUs this process may use (data.usable_cpus), so that
    neither oversubscribes the machine; never more threads than torch's own default (the physical
    cores: hyper-threads slow matrix code down). OMP_NUM_THREADS, when set, wins for the threads."""
    workers = args.num_workers if args.num_workers is not None else data.default_num_workers(device)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), data.default_num_threads(workers)))
    return workers


class Preemption:
    """SIGTERM / SIGUSR1 (cluster preemption) set a flag; all ranks agree on it at the end of the step
    (agree_to_stop), write a checkpoint and exit cleanly. DataLoader workers ignore these (data.py)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def agree_to_stop(stop, diverged, device):
    """Combine every rank's "a stop signal arrived" and "my loss is not finite" with one small
    all-reduce (MAX), so that all ranks stop at the same step. A rank that left on its own would leave
    the others waiting forever in the next gradient all-reduce, and no checkpoint would be written.
    Returns (stop, diverged) as seen by all ranks; no communication in a single process."""
    _, world = dist_info()
    if world == 1:
        return stop, diverged
    flags = torch.tensor([float(stop), float(diverged)],  # (2,), NCCL reduces CUDA tensors, gloo CPU ones
                         device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop, diverged = flags.tolist()
    return stop > 0, diverged > 0


# ----------------------------------------------------------------------------------------------
# The training loop


def main(argv=None):
    args = parse_args(argv)
    rank, world, local_rank = setup_distributed()
    master = rank == 0
    device = pick_device(args, local_rank)
    fit_threads(args, device)
    autocast, scaler = make_autocast(args, device)
    per_step = args.batch_size // (world * args.accum_steps)  # images per process per micro-step
    if per_step * world * args.accum_steps != args.batch_size:
        fail(f"--batch-size {args.batch_size} is not divisible by processes x --accum-steps "
             f"({world} x {args.accum_steps}); pick a multiple of {world * args.accum_steps}")

    # --- resume: explicit --resume, else the checkpoint in --out-dir if there is one. Read and
    # compared with these flags before anything is built or written (check_resume_config).
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    resume = args.resume or (ckpt_path if os.path.exists(ckpt_path) and not args.no_auto_resume else None)
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        check_resume_config(ckpt["config"], args, resume)

    # --- data (data.py): the training split with the paper's crops, the held-out split for kNN.
    # ImageFolder labels follow the TRAIN class map, saved with the run (config + checkpoint) and
    # used for every later split, so a val folder missing or adding a class cannot shift labels.
    saved_map = ckpt["config"].get("class_to_idx") if ckpt is not None else None
    loader = data.build_train_loader(args, per_step, rank, world, device, class_to_idx=saved_map)
    args.class_to_idx = getattr(loader.source, "class_to_idx", None)
    if args.dataset == "imagefolder":  # a val class the map does not know: fail now, not after the run
        data.build_dataset("imagefolder", args.data_path, "val", class_to_idx=args.class_to_idx)
    steps_per_epoch = len(loader) // args.accum_steps
    if steps_per_epoch == 0:
        fail(f"the training set has fewer than one batch of {per_step * args.accum_steps} images per "
             f"process; lower --batch-size")
    total = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)

    # --- models, optimizer, plan generator. Every rank builds the same three networks from --seed:
    # DDP broadcasts the encoder and predictor from rank 0, but nothing broadcasts the EMA target encoder.
    torch.manual_seed(args.seed)
    models = build_models(args)
    for m in models:
        m.to(device)
    encoder, predictor, target_encoder = models
    optimizer = make_optimizer(encoder, predictor, args)
    # What must differ per process comes from seed + rank: the plans (and any numpy / python draws).
    # The data shards and crops differ by rank through the sampler, keyed by --seed (data.py).
    seed = args.seed + rank
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)  # drives masking.py only

    # --- resume (the checkpoint was read and checked above)
    os.makedirs(args.out_dir, exist_ok=True)
    step = 0
    if resume:
        step = restore(ckpt, resume, models, optimizer, scaler, generator)
        if master:
            print(f"resumed from {resume} at step {step}")

    if master:
        print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "class_to_idx"))
        print(f"processes {world} x micro-batch {per_step} x accum {args.accum_steps} = batch {args.batch_size}; "
              f"{steps_per_epoch} steps/epoch, {total} steps; peak lr {args.lr:g}; device {device}; "
              f"encoder {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M params")
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    step_models = wrap_for_speed(models, args, world, device)
    run_encoder, run_predictor = step_models[:2]

    preempt = Preemption()
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if master else None
    stop_at = min(total, args.stop_at_step or total)
    bar = tqdm(total=stop_at, initial=step, disable=not master, dynamic_ncols=True)
    epoch, skip = divmod(step, steps_per_epoch)
    t_last = time.perf_counter()
    stop = False  # agreed by all ranks every step (agree_to_stop), never a rank-local decision
    while step < stop_at and not stop:
        # resumed mid-epoch: the same order, the sampler starts after what was seen (nothing is re-read)
        loader.set_epoch(epoch, start_batch=skip * args.accum_steps)
        batches = iter(loader)
        skip = 0
        for _ in range(steps_per_epoch - step % steps_per_epoch):
            # --- 6. schedules for this step, then accumulate gradients over micro-batches
            sched = {"lr": lr_at(step, args, total, warmup), "wd": wd_at(step, args, total),
                     "ema": ema_at(step, args, total), "lambda": lambda_at(step, args, total)}
            for group in optimizer.param_groups:
                group["lr"] = sched["lr"]
                if not group.get("no_decay"):
                    group["weight_decay"] = sched["wd"]
            loss_sum = 0.0
            for micro in range(args.accum_steps):
                images, _ = next(batches)
                images = images.to(device, non_blocking=True)
                # DDP all-reduces gradients only after the last micro-step of the accumulation
                defer = world > 1 and micro < args.accum_steps - 1
                with (run_encoder.no_sync() if defer else nullcontext()), \
                        (run_predictor.no_sync() if defer else nullcontext()):
                    loss, plan, stats = train_step(step_models, images, sched["lambda"], args, generator, autocast)
                    loss = loss / args.accum_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.item()  # one host sync per micro-step (the plan already needs one)
            if scaler:
                scaler.unscale_(optimizer)
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # --- 7. EMA update of the target encoder
            ema_update(target_encoder, encoder, sched["ema"])
            # --- every rank agrees to go on, stop (signal), or give up (non-finite loss anywhere; a
            # NaN on one rank reached every rank's weights through the gradient all-reduce anyway)
            stop, diverged = agree_to_stop(preempt.requested, not math.isfinite(loss_sum), device)
            if diverged:
                what = loss_sum if not math.isfinite(loss_sum) else "not finite on another process"
                fail(f"loss is {what} at step {step}; stopping without writing a checkpoint "
                         f"(the last good one in {args.out_dir} is intact). Try a lower --lr or --clip-grad 1.0.")
            step += 1

            # --- logging, checkpoints, preemption
            if master:
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{sched['lr']:.2e}", lam=f"{sched['lambda']:.2f}",
                                img_s=f"{args.batch_size / dt:.0f}")
                if step % args.log_every == 0 or step == stop_at:
                    row = {"step": step, "epoch": epoch, "loss": loss_sum, **sched, "step_time": dt,
                           "img_per_s": args.batch_size / dt, "peak_mem_mb": peak_memory_mb(device)}
                    row.update({k: float(v) for k, v in stats.items()})
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            if step % args.ckpt_every == 0 or step == stop_at or stop:  # every rank: gathers the RNG states
                # only finite, bounded weights after a finite loss (agreed above) become "good"; DDP keeps
                # the weights identical on every rank, so every rank reaches the same verdict and exits
                ok, why = weights_are_sane(models)
                if not ok:
                    fail(f"step {step}: {why}; the run diverged, so no checkpoint is written (the last good "
                         f"one in {args.out_dir} is intact). Try a lower --lr or --clip-grad 1.0.")
                save_checkpoint(ckpt_path, models, optimizer, scaler, step, args, generator)
            if step >= stop_at or stop:
                break
        if step % steps_per_epoch == 0:
            epoch += 1
            if args.knn_every and epoch % args.knn_every == 0 and step < total:
                knn_monitor(target_encoder, args, device, step, epoch, log, master)
    bar.close()
    if master and data.unreadable_images():  # each was named once when first met
        print(f"{data.unreadable_images()} unreadable images were skipped (replaced by their neighbours)")
    if stop:
        if master:
            print(f"preempted: checkpoint at step {step} in {ckpt_path}; rerun the same command to resume")
    elif step >= total:
        knn_monitor(target_encoder, args, device, step, epoch, log, master)  # always at the end
        if master and args.picture:
            import evaluate
            path = os.path.join(args.out_dir, "plans.png")
            pic = evaluate.plan_picture(target_encoder, args, path, device=device)
            overlap = {k: v for k, v in pic.items() if k.startswith(("top_region", "object_area", "ranked"))}
            print(f"wrote {path}; " + ", ".join(f"{k} {v}" for k, v in overlap.items() if v is not None))
            log.write(json.dumps({"step": step, **overlap}) + "\n")
    if log:
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return step


def knn_monitor(target_encoder, args, device, step, epoch, log, master):
    """Held-out kNN accuracy of the target encoder (evaluate.py): the progress signal JEPA lacks."""
    import evaluate
    result = evaluate.knn_monitor(target_encoder, args, device)  # every rank takes part under DDP
    if master:
        print(f"epoch {epoch} step {step}: kNN top-1 {result['top1']:.2f}% (k={result['k']}, {result['split']})")
        log.write(json.dumps({"step": step, "epoch": epoch, **{f"knn_{k}": v for k, v in result.items()}}) + "\n")
        log.flush()


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # the message names the data and the fix; a traceback adds nothing
        fail(data_error_line(e))
