"""Datasets, transforms and loaders for DSeq-JEPA, written with PIL / numpy / torch only.

This file knows nothing about JEPA: it turns a dataset name and a folder into batches of
normalised images `imgs: (B, 3, S, S)` float and `labels: (B,)` int64.

Public API
    build_dataset(name, root, split, img_size, ...) -> (dataset, num_classes)
        name in DATASETS, split "train" or "val" (CIFAR / MNIST "val" = the official test set).
        Items are raw `(image, label)`: a PIL RGB image (imagefolder) or a uint8 tensor (3, H, W).
    build_loader(dataset, img_size, batch_size, train, ...) -> loader of (imgs, labels)
        with len() and set_epoch(epoch, start_batch=0) (call it every epoch; start_batch > 0 resumes
        mid-epoch without loading the earlier batches). train=True: shuffled, drop_last,
        RandomResizedCrop (+ optional flip); else fixed order, resize + center crop. on_device=True:
        an in-memory set cropped in whole batches on the device (DeviceLoader); else a DataLoader.
    build_train_loader(args, ...) (train.py), build_eval_loader(args, split, ...) (evaluate.py):
        the same from the shared argparse config, with .num_classes and .source (the raw dataset).
    check_img_size, DataError (every mistake a user can make; the message names the fix),
    SyntheticShapes.object_mask(i), ImageFolder.class_to_idx / n_bad, unreadable_images().

Determinism: a sample's augmentation is drawn from a numpy Generator seeded by (seed, epoch, index),
so batches do not depend on num_workers, on which worker loads a sample, or on resuming mid-run.
Shuffling and DDP sharding come from DistributedSampler(seed, epoch) in both loader kinds.
"""
import atexit
import gzip
import itertools
import functools
import math
import multiprocessing
import os
import pickle
import signal
import struct
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

BUILT_IN = ("synthetic", "shapes", "noisy_shapes")  # drawn in memory, no --data-path
DATASETS = ("synthetic", "shapes", "noisy_shapes", "cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every dataset is normalised like ImageNet, as I-JEPA does
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.3, 1.0)  # paper: RandomResizedCrop scale for pretraining
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# What each name expects under `root`, quoted in error messages.
LAYOUT = {
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch} (CIFAR-10 python version)",
    "cifar100": "ROOT/cifar-100-python/{train, test} (CIFAR-100 python version)",
    "mnist": "ROOT/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (the four IDX files)",
    "imagefolder": "ROOT/{train,val}/CLASS/IMAGE.JPEG (one folder per class)",
}
LAYOUT["fashion_mnist"] = LAYOUT["mnist"]


class DataError(ValueError):
    """A problem with the data or its settings that the user can fix; the message says how."""


def check_img_size(img_size, patch_size):
    """Return the patch grid side img_size // patch_size, or raise DataError if it does not divide."""
    if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
        p = max(patch_size, 1)
        lo = max(p, img_size // p * p)
        raise DataError(f"img_size {img_size} is not a positive multiple of patch_size {patch_size}; "
                        f"use a multiple of {p}, e.g. img_size {lo} or {lo + p}")
    return img_size // patch_size


def _check_root(name, root):
    """Fail early, naming the folder, when a dataset's root is missing, not a folder or empty."""
    if not root:
        raise DataError(f"dataset '{name}' needs a data root: the folder holding {LAYOUT[name]}")
    if not os.path.isdir(root):
        raise DataError(f"data root '{root}' does not exist or is not a folder; "
                        f"for '{name}' it must hold {LAYOUT[name]}")
    if not os.listdir(root):
        raise DataError(f"data root '{root}' is empty; for '{name}' it must hold {LAYOUT[name]}")


# ---------------------------------------------------------------------------------------------
# Synthetic shapes: built in, so `python train.py` runs with no download (the demo: noisy_shapes)
# ---------------------------------------------------------------------------------------------

# Shapes on rotated coordinates (x, y) in units of the object radius; each -> bool (B, S, S).
_SHAPES = {
    "disc": lambda x, y: x * x + y * y <= 1,
    "square": lambda x, y: np.maximum(abs(x), abs(y)) <= 0.7,  # corners stay inside r
    "triangle": lambda x, y: (y <= 0.6) & (abs(x) <= (y + 1) * 0.55),  # apex up
    "cross": lambda x, y: (np.minimum(abs(x), abs(y)) <= 0.3) & (np.maximum(abs(x), abs(y)) <= 1),
    "ring": lambda x, y: (x * x + y * y <= 1) & (x * x + y * y >= 0.4),
}
_COLOURS = np.array([[225, 40, 40], [40, 80, 235], [30, 185, 60], [235, 205, 30]], np.float32)
# Distractor objects never take a class colour (every channel differs from each class colour by
# more than 80 at full contrast), so the class object is always the one in a class colour.
_DISTRACTOR_COLOURS = np.array([[150, 50, 190], [30, 170, 190], [235, 235, 235], [25, 25, 25]],
                               np.float32)  # purple, teal, white, black
_N_STROKES = 4  # distractor strokes per image: clutter with edges, but thin and dull
_N_OBJECTS = 4  # object slots: the class object, two large distractors, one optional small one
_CELLS = 8  # the layout grid: 8 x 8 cells = the demo's patch grid (64 px / patch 8)
_N_LAYOUT = 26  # uniforms _layout consumes per image
# noisy_shapes: the shapes set's objects on a flat grey field, under independent per-pixel grain.
# Why grain and not the smooth background: a JEPA learns what one part of an image predicts about
# another. The smooth noise field and the strokes are predictable from their neighbours, so a tiny
# run learns them (and kNN stays at the pixels' level, docs/learning.md); grain is predictable from
# nothing, so the only thing shared between parts of an image is the class shape. Grain still hides
# the shape from raw pixels and lowers a random encoder (the demo table, results/demo.md: pixel kNN
# 40.6, random init 56.6, I-JEPA 69.9).
GRAIN = 40.0  # std of the grain, in pixel levels
_GRAIN_FIELD = 100.0  # the flat field's level, darker than every object (178-255)
# Uniform numbers one image consumes: coarse noise 4x4x3, fine noise 8x8x3, strokes (x0, y0, x1,
# y1, r, g, b) each, the layout.
_PARAM_SPLITS = np.cumsum([48, 192, 7 * _N_STROKES])
_N_PARAMS = int(_PARAM_SPLITS[-1]) + _N_LAYOUT


def _layout(q, labels):
    """Where the objects go, on the 8 x 8 layout grid, for a batch. q: (B, _N_LAYOUT) uniforms,
    labels: (B,) -> (B, 4, 10) float32, one row per object slot: present, centre x, centre y,
    radius x, radius y (in cells), angle, shape, colour (R, G, B).

    One empty row of cells cuts the grid into a band of 4 rows and a band of 3; one empty column
    cuts the 4-row band into a 4 x 4 box (the class object A) and a 4 x 3 box (object B). The
    3-row band holds object C in a 3 x 4 box at any place along it; if 3 cells are left free on
    one side of C (1 empty cell + a 2-cell box), a small object D goes there with probability 0.7.
    Random flips and a transpose move the bands and boxes around. Boxes never touch, not even
    diagonally, so at the layout grid every object is its own 8-connected component: 3-4 objects
    per image, three of them large enough (each touches 6-16 cells, >= 15 % of the grid for
    most) to survive the paper's area filter alpha = 0.15 as separate regions."""
    B = len(labels)
    q = iter(q.T)  # each next(q) is one (B,) column of fresh uniforms
    out = np.zeros((B, _N_OBJECTS, 10), np.float32)
    left, top, transpose = next(q) < 0.5, next(q) < 0.5, next(q) < 0.5
    band = np.where(top, 0, 4)  # first row of the 4-row band (the 3-row band is rows 5-7 or 0-2)
    c_row = np.where(top, 5, 0)
    c_col = np.floor(next(q) * 5)  # C's box starts at column 0..4 (4 wide): every place
    # boxes (x0, y0, width, height) in cells: A, B, C
    boxes = ((np.where(left, 0, 4), band, 4, 4), (np.where(left, 5, 0), band, 3, 4), (c_col, c_row, 4, 3))
    for slot, (x0, y0, w, h) in enumerate(boxes):
        # objects fill 80-94 % of their box: the shapes' corners reach 1.06 x the radius, so they
        # never leave it (the empty lines of cells between boxes stay empty)
        jitter = 0.8 + 0.14 * next(q)
        out[:, slot, :5] = np.stack([np.ones(B), x0 + w / 2, y0 + h / 2, w / 2 * jitter, h / 2 * jitter], 1)
    # D: small, on the longer free side of C in its band, if 3 cells are free there
    before, after = c_col, _CELLS - c_col - 4
    small = (np.maximum(before, after) >= 3) & (next(q) < 0.7)
    cx = np.where(before >= after, before - 2, c_col + 4 + 2)  # centre of a 2-cell box, 1 cell away
    cy = c_row + 1.5 + (next(q) - 0.5)  # anywhere across the 3-row band
    r = 0.85  # 0.85 x 1.06 < 1 cell
    out[:, 3, :5] = np.stack([small, cx, cy, np.full(B, r), np.full(B, r)], 1) * small[:, None]
    out[:, :, 5] = (np.stack([next(q) for _ in range(_N_OBJECTS)], 1) - 0.5) * math.pi / 3  # +-30 deg
    shapes = np.floor(np.stack([next(q) for _ in range(_N_OBJECTS)], 1) * len(_SHAPES))  # (B, 4)
    shapes[:, 0] = labels % len(_SHAPES)  # the class object's shape is the class
    out[:, :, 6] = shapes
    # colours: A the class colour +-20 at full contrast; B, C, D distractor colours at decreasing
    # contrast (blended towards the background grey 130), so the objects differ in size AND contrast
    out[:, 0, 7:] = _COLOURS[labels // len(_SHAPES)] + 40 * (np.stack([next(q) for _ in range(3)], 1) - 0.5)
    contrast = np.stack([0.7 + 0.3 * next(q), 0.5 + 0.3 * next(q), 0.35 + 0.25 * next(q)], 1)  # (B, 3)
    pick = _DISTRACTOR_COLOURS[(np.stack([next(q) for _ in range(3)], 1) * 4).astype(int)]  # (B, 3, 3)
    out[:, 1:, 7:] = 130 + contrast[..., None] * (pick - 130)
    # transposed layouts: swap x and y of centres and radii
    out[transpose] = out[transpose][:, :, [0, 2, 1, 4, 3, 5, 6, 7, 8, 9]]
    return out


# Ten shapes that stay distinct under any rotation (no square next to a diamond): the class.
_SHAPES_ANY = {
    "disc": lambda x, y: x * x + y * y <= 1,
    "square": lambda x, y: np.maximum(abs(x), abs(y)) <= 0.7,  # corners stay inside r
    "triangle": lambda x, y: (y <= 0.6) & (abs(x) <= (y + 1) * 0.55),  # apex up
    "cross": lambda x, y: (np.minimum(abs(x), abs(y)) <= 0.3) & (np.maximum(abs(x), abs(y)) <= 1),
    "ring": lambda x, y: (x * x + y * y <= 1) & (x * x + y * y >= 0.4),
    "flower": lambda x, y: np.hypot(x, y) <= 0.6 + 0.4 * np.cos(5 * np.arctan2(y, x)),  # 5 petals
    "ell": lambda x, y: (np.maximum(abs(x), abs(y)) <= 0.7) & ((x <= -0.15) | (y >= 0.15)),
    "tee": lambda x, y: (abs(x) <= 0.7) & (abs(y) <= 0.7) & ((y <= -0.25) | (abs(x) <= 0.22)),
    "half": lambda x, y: (x * x + y * y <= 1) & (y >= -0.1),  # half disc
    "bar": lambda x, y: (abs(x) <= 0.95) & (abs(y) <= 0.3),
}


def _layout_shapes(q, labels):
    """_layout's boxes (same geometry, same uniforms for it) for the "shapes" set: EVERY object has
    the class shape (list(_SHAPES_ANY)[c]); size (80-94 % of its box's short side), rotation (any
    angle) and grey level are drawn per object, so neither brightness nor place tells the class.
    q: (B, _N_LAYOUT) uniforms (the last one unused), labels: (B,) -> (B, 4, 10) as _layout."""
    B = len(labels)
    q = iter(q.T)  # each next(q) is one (B,) column of fresh uniforms
    out = np.zeros((B, _N_OBJECTS, 10), np.float32)
    left, top, transpose = next(q) < 0.5, next(q) < 0.5, next(q) < 0.5
    band = np.where(top, 0, 4)  # first row of the 4-row band (the 3-row band is rows 5-7 or 0-2)
    c_row = np.where(top, 5, 0)
    c_col = np.floor(next(q) * 5)  # C's box starts at column 0..4 (4 wide): every place
    # boxes (x0, y0, width, height) in cells: A, B, C
    boxes = ((np.where(left, 0, 4), band, 4, 4), (np.where(left, 5, 0), band, 3, 4), (c_col, c_row, 4, 3))
    for slot, (x0, y0, w, h) in enumerate(boxes):
        # round objects: one radius, from the box's short side; the shapes' corners reach 1.06 x
        # the radius, so at <= 94 % they never leave the box (the empty lines between boxes stay empty)
        r = min(w, h) / 2 * (0.8 + 0.14 * next(q))
        out[:, slot, :5] = np.stack([np.ones(B), x0 + w / 2, y0 + h / 2, r, r], 1)
    # D: small, on the longer free side of C in its band, if 3 cells are free there
    before, after = c_col, _CELLS - c_col - 4
    small = (np.maximum(before, after) >= 3) & (next(q) < 0.7)
    cx = np.where(before >= after, before - 2, c_col + 4 + 2)  # centre of a 2-cell box, 1 cell away
    cy = c_row + 1.5 + (next(q) - 0.5)  # anywhere across the 3-row band
    r = 0.85  # 0.85 x 1.06 < 1 cell
    out[:, 3, :5] = np.stack([small, cx, cy, np.full(B, r), np.full(B, r)], 1) * small[:, None]
    out[:, :, 5] = np.stack([next(q) for _ in range(_N_OBJECTS)], 1) * 2 * math.pi  # any rotation
    out[:, :, 6] = (labels % len(_SHAPES_ANY))[:, None]  # every object has the class shape
    # colours: grey, a random light level per object (value 0.7-1, 178-255) against the darker,
    # desaturated background. No hue on purpose: a random hue per object is the largest pixel
    # variation there is, and a tiny run's encoder spends itself on it (docs/learning.md); grey
    # objects leave the shape as the thing to learn. Three uniforms per object are still drawn (hue,
    # saturation, value, of which only the value is used) so the layout stream is that of a coloured set.
    hsv = [np.stack([next(q) for _ in range(_N_OBJECTS)], 1) for _ in range(3)]  # 3 x (B, 4)
    out[:, :, 7:] = (255 * (0.7 + 0.3 * hsv[2]))[..., None]  # (B, 4, 3) grey
    # transposed layouts: swap x and y of centres and radii
    out[transpose] = out[transpose][:, :, [0, 2, 1, 4, 3, 5, 6, 7, 8, 9]]
    return out


def _field_and_strokes(coarse, fine, strokes, xs, ys):
    """Steps 2-3 of SyntheticShapes._render for the sets without grain. coarse (B, 48), fine (B, 192),
    strokes (B, 7 * _N_STROKES) uniforms; xs, ys (S, S) pixel centres -> background float (B, 3, S, S)."""
    B, S = len(coarse), xs.shape[0]
    # 2. background: two octaves of smooth colour noise, desaturated so the objects pop out
    up = lambda g, k: F.interpolate(torch.from_numpy(g).view(B, 3, k, k), (S, S), mode="bilinear")
    bg = (0.7 * up(coarse, 4) + 0.3 * up(fine, 8)).numpy()  # (B, 3, S, S) in [0, 1]
    grey = bg.mean(1, keepdims=True)  # (B, 1, S, S)
    img = 60 + 140 * (grey + 0.35 * (bg - grey))  # (B, 3, S, S) in [60, 200]
    # 3. distractor strokes: pixels within 0.6 px (at S = 32) of a random segment get a dull colour
    st = strokes.reshape(B, _N_STROKES, 7)
    ax, ay = st[..., 0, None, None] * S, st[..., 1, None, None] * S  # (B, K, 1, 1)
    bx, by = st[..., 2, None, None] * S - ax, st[..., 3, None, None] * S - ay
    t = np.clip(((xs - ax) * bx + (ys - ay) * by) / (bx * bx + by * by + 1e-6), 0, 1)  # (B, K, S, S)
    on = (xs - ax - t * bx) ** 2 + (ys - ay - t * by) ** 2 < (0.6 * S / 32) ** 2
    for k in range(_N_STROKES):
        img = np.where(on[:, k, None], 50 + 150 * st[:, k, 4:7, None, None], img)
    return img


class SyntheticShapes(Dataset):
    """3-4 separated objects on a cluttered, textured background; the class object decides the class.

    Several salient things per image, so that the saliency extractor finds several regions and
    DSeq-JEPA's sequence R_1 -> R_2 -> ... -> background has more than one step (layout: _layout):
      A (the class object): shape list(_SHAPES)[c % 5] in colour _COLOURS[c // 5] (10 classes: 5
        shapes x red/blue; up to 20), in the largest box, at full contrast;
      B, C: random shapes in distractor colours at 70-100 % and 50-80 % contrast;
      D (optional): small, low contrast (35-60 %).
    The class is learnable: it is the shape and colour of the only object painted in a class
    colour. Each object has a random place, size within its box and rotation (+-30 deg); the
    background is desaturated smooth noise in two octaves plus thin strokes. Image i is a pure
    function of (seed, split, i) (its own numpy Generator; train and val use different seed
    streams, so they never share an image). Labels are i % num_classes (balanced).
    Items: (uint8 (3, S, S), label). object_mask(i): (S, S) bool, exactly the CLASS object's pixels
    (the thing a discriminative R_1 should find; distractors are not in it).

    shape_only=True (the "shapes" dataset): the class is the shape alone, list(_SHAPES_ANY)[c] (10
    classes), and EVERY object has it, each in its own random grey level, size and rotation
    (any angle) (_layout_shapes): neither brightness nor place tells the class, so raw pixels and a
    random-init encoder are weak baselines (results/shapes/). object_mask(i) is then
    the pixels of all objects.

    grain > 0 (the "noisy_shapes" set, the demo's): the shapes set's objects on a flat grey field
    (no smooth noise, no strokes), then Gaussian grain of std `grain` on every pixel, drawn from the
    image's own generator after its layout numbers (the same objects as "shapes" at the same i).
    """

    def __init__(self, split="train", img_size=32, size=None, num_classes=10, seed=0, shape_only=False,
                 grain=0.0):
        if img_size < 16:
            raise DataError(f"synthetic img_size {img_size} is too small to draw shapes; use 32-96")
        most = len(_SHAPES_ANY) if shape_only else len(_SHAPES) * len(_COLOURS)
        if not 2 <= num_classes <= most:
            raise DataError(f"synthetic num_classes {num_classes} must be in 2..{most} "
                            f"({'one shape each' if shape_only else '5 shapes x 4 colours'})")
        self.shape_only, self.grain = shape_only, grain
        self.size = size if size is not None else (10_000 if split == "train" else 2_000)
        self.stream = 0 if split == "train" else 1  # disjoint seed streams -> disjoint images
        self.img_size, self.num_classes, self.seed = img_size, num_classes, seed
        self.labels = torch.arange(self.size) % num_classes  # (N,)
        self._images = None  # (N, 3, S, S) uint8, filled by tensors()

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        imgs, _ = self._render(np.array([i]))
        return torch.from_numpy(imgs[0]), int(self.labels[i])

    def object_mask(self, i):
        """(S, S) bool: the pixels painted with the class object (A) in image i."""
        masks = self._render(np.array([i]))[1][0]  # (4, S, S)
        return torch.from_numpy(masks.any(0) if self.shape_only else masks[0])

    def object_masks(self, i):
        """(4, S, S) bool: the pixels of each object slot A, B, C, D in image i (absent = empty)."""
        return torch.from_numpy(self._render(np.array([i]))[1][0])

    def tensors(self):
        """The whole set in memory: images (N, 3, S, S) uint8, labels (N,) int64 (cached)."""
        if self._images is None:
            chunk = max(16, 2 ** 19 // self.img_size ** 2)  # bounds the (B, K, S, S) temporaries
            parts = [self._render(np.arange(a, min(a + chunk, self.size)))[0]
                     for a in range(0, self.size, chunk)]
            self._images = torch.from_numpy(np.concatenate(parts))
        return self._images, self.labels

    def _render(self, idx):
        """Draw images idx: (B,) -> (imgs uint8 (B, 3, S, S), object masks bool (B, 4, S, S)); mask
        slot 0 is the class object."""
        S, B = self.img_size, len(idx)
        labels = self.labels[torch.as_tensor(idx)].numpy()  # (B,)
        # 1. all random numbers of image i from its own generator: pixels never depend on the batch
        gens = [np.random.default_rng([self.seed, self.stream, int(i)]) for i in idx]
        p = np.stack([g.random(_N_PARAMS, np.float32) for g in gens])  # (B, _N_PARAMS)
        coarse, fine, strokes, layout = np.split(p, _PARAM_SPLITS, axis=1)
        objs = (_layout_shapes if self.shape_only else _layout)(layout, labels)  # (B, 4, 10)
        ys, xs = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5  # pixel centres, (S, S) each
        if self.grain:  # noisy_shapes: a flat field, no strokes; the grain (step 5) is all its texture
            img = np.full((B, 3, S, S), _GRAIN_FIELD, np.float32)
        else:
            img = _field_and_strokes(coarse, fine, strokes, xs, ys)  # (B, 3, S, S)
        # 4. the objects, in slot order; boxes never overlap, so the order does not matter
        cell = S / _CELLS  # pixels per layout cell
        masks = np.zeros((B, _N_OBJECTS, S, S), bool)
        for k in range(_N_OBJECTS):
            o = objs[:, k]  # (B, 10)
            cx, cy, rx, ry = (np.maximum(o[:, j, None, None], 1e-3) * cell for j in range(1, 5))  # (B, 1, 1)
            c, s = np.cos(o[:, 5])[:, None, None], np.sin(o[:, 5])[:, None, None]
            u, v = (xs - cx) / rx, (ys - cy) / ry  # (B, S, S) offsets in box units
            # rotate in box units: norms are kept, so a shape inside the unit disc stays in its box
            dx, dy = c * u + s * v, -s * u + c * v  # (B, S, S) unit coordinates of the shape
            for j, fn in enumerate((_SHAPES_ANY if self.shape_only else _SHAPES).values()):
                sel = (o[:, 6] == j) & (o[:, 0] > 0)  # (B,) present objects of shape j
                if sel.any():
                    masks[sel, k] = fn(dx[sel], dy[sel])
            shade = 1 - 0.1 * dy[:, None]  # (B, 1, S, S) a little light from above: not a flat sticker
            img = np.where(masks[:, k, None], o[:, 7:, None, None] * shade, img)
        if self.grain:  # 5. per-pixel grain over everything, from each image's own generator
            img = img + self.grain * np.stack([g.standard_normal((3, S, S), np.float32) for g in gens])
        return np.clip(img, 0, 255).astype(np.uint8), masks


# ---------------------------------------------------------------------------------------------
# Files on disk: CIFAR pickles, MNIST-style IDX files, ImageFolder trees
# ---------------------------------------------------------------------------------------------

class ArrayDataset(Dataset):
    """A dataset held in memory. images: (N, 3, H, W) uint8, labels: (N,) int64."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def tensors(self):
        return self.images, self.labels


def load_cifar(root, split, num_classes):
    """CIFAR-10 / CIFAR-100 from the python-pickle files -> ArrayDataset (N, 3, 32, 32)."""
    name = f"cifar{num_classes}"
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    files = {(10, "train"): [f"data_batch_{k}" for k in range(1, 6)], (10, "val"): ["test_batch"],
             (100, "train"): ["train"], (100, "val"): ["test"]}[num_classes, split]
    # accept both ROOT (holding the folder) and the folder itself
    folder = root if os.path.isfile(os.path.join(root, files[0])) else os.path.join(root, sub)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{name}: '{folder}' lacks {missing}; expected {LAYOUT[name]}")
    key = b"labels" if num_classes == 10 else b"fine_labels"  # CIFAR-100: the 100 fine classes
    images, labels = [], []
    for f in files:
        path = os.path.join(folder, f)
        try:
            with open(path, "rb") as fh:  # python-2 pickles from the official archive: trust them
                d = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))  # rows are RGB planes
            labels.extend(d[key])
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"{name}: cannot read '{path}' ({e!r}); re-extract {LAYOUT[name]}") from e
    return ArrayDataset(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long))


def _read_idx(path):
    """One uint8 IDX file, raw or gzipped -> numpy array shaped by its header."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file '{path}' ({e}); download it again") from e
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 0x08:  # magic: 0, 0, type 0x08 = uint8, ndim
        raise DataError(f"'{path}' is not a uint8 IDX file (magic {raw[:4].hex()}, expected 000008xx); "
                        "use the original MNIST-format files")
    nd = raw[3]
    dims = struct.unpack(f">{nd}I", raw[4:4 + 4 * nd])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * nd)
    if data.size != math.prod(dims):
        raise DataError(f"IDX file '{path}' is truncated: header says {dims}, found {data.size} values; "
                        "download it again")
    return data.reshape(dims)


def load_idx(root, split):
    """MNIST / Fashion-MNIST IDX files in `root` -> ArrayDataset (N, 3, 28, 28), grey copied to RGB."""
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{prefix}-{kind}"
        path = next((p for p in (os.path.join(root, name), os.path.join(root, name + ".gz"))
                     if os.path.isfile(p)), None)
        if path is None:
            raise DataError(f"'{root}' has no {name} or {name}.gz; expected {LAYOUT['mnist']}")
        arrays.append(_read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"IDX files in '{root}' do not match: images {images.shape}, labels "
                        f"{labels.shape}; expected (N, H, W) images and N labels")
    x = torch.from_numpy(images.copy())[:, None].expand(-1, 3, -1, -1)  # (N, 3, H, W), a view
    return ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)))


_BAD_FLAGS = {}  # (folder, subset file, size) -> shared (N,) uint8 flags of unreadable images


def unreadable_images():
    """How many unreadable images the ImageFolders of this process (and their workers) skipped."""
    return sum(int(f.sum()) for f in _BAD_FLAGS.values())


class ImageFolder(Dataset):
    """ROOT/SPLIT/CLASS/*.jpg trees (ImageNet, CUB, Cars, iNat after the usual preparation).

    Classes are the sorted folder names, or `class_to_idx` (e.g. the train map saved with the run,
    so val labels line up). subset_file: one image per line, either CLASS/FILE relative to
    ROOT/SPLIT or a bare ImageNet name n01440764_10026.JPEG (class = text before '_'), as in the
    official 10 % subset. Items: (PIL RGB image, label). An unreadable image is replaced by the next
    one and warned about ONCE per path for the whole run: its flag lives in shared memory, common to
    the DataLoader workers, every epoch and every ImageFolder of the same folder in this process (the
    kNN bank re-reads the train split). n_bad counts them; unreadable_images() sums all folders.
    """

    def __init__(self, root, split="train", subset_file=None, class_to_idx=None):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise DataError(f"'{d}' does not exist; expected {LAYOUT['imagefolder']}")
        classes = sorted(e.name for e in os.scandir(d) if e.is_dir())
        if not classes:
            raise DataError(f"'{d}' has no class folders; expected {LAYOUT['imagefolder']}")
        self.class_to_idx = class_to_idx or {c: i for i, c in enumerate(classes)}
        unknown = [c for c in classes if c not in self.class_to_idx]
        if unknown:
            raise DataError(f"class folders {unknown[:5]} in '{d}' are not in the class map "
                            f"({len(self.class_to_idx)} classes); use the map saved with the run")
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        if subset_file:
            if not os.path.isfile(subset_file):
                raise DataError(f"subset file '{subset_file}' does not exist; give a text file with one image per line")
            with open(subset_file) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            rels = [os.path.join(*ln.split("/")) if "/" in ln else os.path.join(ln.split("_")[0], ln)
                    for ln in lines]
            missing = [r for r in rels if not os.path.isfile(os.path.join(d, r))]
            if missing:
                raise DataError(f"subset file '{subset_file}' names {len(missing)} images missing under '{d}', "
                                f"e.g. {missing[:5]}; check the file matches this data root and split")
        else:
            rels = [os.path.join(c, f) for c in classes for f in sorted(os.listdir(os.path.join(d, c)))
                    if f.lower().endswith(IMG_EXTENSIONS)]
        if not rels:
            raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) under '{d}/CLASS/'; "
                            f"expected {LAYOUT['imagefolder']}")
        self.samples = [(os.path.join(d, r), self.class_to_idx[r.split(os.sep)[0]]) for r in rels]
        # (len(samples),) uint8, 1 = unreadable: never retried nor re-warned (see the docstring)
        key = (d, subset_file, len(self.samples))
        if key not in _BAD_FLAGS:
            _BAD_FLAGS[key] = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self.bad_flags = _BAD_FLAGS[key]

    @property
    def n_bad(self):
        return int(self.bad_flags.sum())

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img, label, _, _ = self.load(i)
        return img, label

    def load(self, i, decode_size=None):
        """(PIL RGB image, label, full size, scale) of item i; the next readable file if i is broken.

        decode_size(W, H) -> (w, h), called with the file's full size before decoding: a JPEG is
        then decoded at the smallest DCT scale (1/2, 1/4, 1/8; PIL's Image.draft) whose image is
        still >= w x h pixels. Decoding 1/4 of the pixels is most of a small crop's cost.
        full size = (W, H) of the file; scale = (decoded / full width, decoded / full height) as PIL
        reports it (a decoded side is rounded up, so it is not always W * scale), (1.0, 1.0) if not reduced.
        """
        for k in range(50):  # a run of 50 unreadable files means a broken copy, not bad luck
            j = (i + k) % len(self.samples)
            if self.bad_flags[j]:
                continue
            path, label = self.samples[j]
            try:
                im = Image.open(path)
                W, H = im.size
                drafted = None
                if decode_size is not None and im.format == "JPEG":
                    drafted = im.draft("RGB", decode_size(W, H))  # (mode, box of the full image) or None
                im.load()  # decodes (and closes the file): truncation fails here
                scale = (1.0, 1.0)
                if im.size != (W, H):  # reduced: the full image spans box in decoded pixels
                    box = drafted[1] if isinstance(drafted, tuple) else (0, 0, im.size[0], im.size[1])
                    scale = (box[2] / W, box[3] / H)
                return (im if im.mode == "RGB" else im.convert("RGB")), label, (W, H), scale
            except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for broken files
                self.bad_flags[j] = 1  # seen by every worker from now on
                warnings.warn(f"unreadable image '{path}' ({e}); using the next one instead "
                              "(each bad file is named once; the count is printed at the end)", RuntimeWarning)
        raise DataError(f"50 unreadable images in a row from '{self.samples[i][0]}'; the data copy "
                        "looks broken, extract it again")


@functools.lru_cache(maxsize=4)
def _built_in(name, split, img_size, size, num_classes, seed):
    """One drawn set per arguments, kept: train.py's kNN monitor opens the same two splits at every
    check, and drawing them again cost seconds of each (7,000 images at 64 px on a 2-core CPU). Sets are
    never modified after drawing, so sharing one object is safe."""
    return SyntheticShapes(split, img_size, size, num_classes, seed, shape_only=name != "synthetic",
                           grain=GRAIN if name == "noisy_shapes" else 0.0)


def build_dataset(name, root=None, split="train", img_size=32, *, subset_file=None,
                  class_to_idx=None, synthetic_size=None, num_classes=10, seed=0):
    """The dataset `name` -> (dataset, num_classes). Items are raw (image, label); see build_loader.

    img_size, synthetic_size, num_classes and seed only shape the synthetic set; subset_file and
    class_to_idx only apply to imagefolder.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    if split not in ("train", "val"):
        raise DataError(f"unknown split '{split}'; use 'train' or 'val'")
    if name in BUILT_IN:
        ds = _built_in(name, split, img_size, synthetic_size, num_classes, seed)
        return ds, ds.num_classes
    _check_root(name, root)
    if name in ("cifar10", "cifar100"):
        n = int(name[5:])
        return load_cifar(root, split, n), n
    if name in ("mnist", "fashion_mnist"):
        return load_idx(root, split), 10
    ds = ImageFolder(root, split, subset_file, class_to_idx)
    return ds, len(ds.class_to_idx)


# ---------------------------------------------------------------------------------------------
# Transforms: one crop rule for both loader kinds
# ---------------------------------------------------------------------------------------------

def sample_crop_boxes(rng, n, H, W, scale=CROP_SCALE, ratio=CROP_RATIO, attempts=10):
    """RandomResizedCrop boxes for n images of H x W -> (n, 4) int64 (top, left, h, w).

    torchvision's rule: area fraction ~ U(scale), log aspect ~ U(log ratio); the first of
    `attempts` draws that fits wins; if none fits, the whole image clipped to the ratio range,
    centred. All attempts are drawn at once (same distribution, vectorised).
    """
    area = rng.uniform(scale[0], scale[1], (n, attempts)) * H * W
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # (n, attempts)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first, found = ok.argmax(1), ok.any(1)  # (n,)
    if W / H < ratio[0]:  # fallback for images outside the ratio range
        fw, fh = W, int(round(W / ratio[0]))
    elif W / H > ratio[1]:
        fw, fh = int(round(H * ratio[1])), H
    else:
        fw, fh = W, H
    rows = np.arange(n)
    w = np.where(found, w[rows, first], fw)
    h = np.where(found, h[rows, first], fh)
    top = np.where(found, rng.integers(0, H - h + 1), (H - h) // 2)
    left = np.where(found, rng.integers(0, W - w + 1), (W - w) // 2)
    return np.stack([top, left, h, w], 1)


def center_box(H, W, crop_frac):
    """Eval crop (top, left, h, w): resizing the shorter side to S / crop_frac and cutting the
    central S x S equals cutting the central square of side crop_frac * min(H, W), then resizing."""
    side = crop_frac * min(H, W)
    return ((H - side) / 2, (W - side) / 2, side, side)


def normalize(imgs):
    """imgs: (B, 3, S, S) uint8 or float in [0, 255] -> float (B, 3, S, S), ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1) * 255
    return imgs.to(torch.float32, copy=True).sub_(mean).div_(std)  # one new (B, 3, S, S) tensor, not three


class Transform:
    """One image (PIL or uint8 (3, H, W)) + numpy Generator -> float (3, S, S) normalised.

    augment: RandomResizedCrop(crop_scale) then optional horizontal flip; else center_box.
    Crop and resize are one PIL call (bilinear, antialiased when shrinking).
    """

    def __init__(self, img_size, augment, crop_scale=CROP_SCALE, flip=False, crop_frac=0.875):
        self.img_size, self.augment, self.crop_scale = img_size, augment, crop_scale
        self.flip, self.crop_frac = flip, crop_frac

    def box(self, W, H, rng):
        """The crop (top, left, h, w) in pixels of a W x H image, and the flip; draws from rng."""
        if self.augment:
            top, left, h, w = (float(v) for v in sample_crop_boxes(rng, 1, H, W, self.crop_scale)[0])
            return (top, left, h, w), self.flip and rng.random() < 0.5
        return center_box(H, W, self.crop_frac), False

    def decode_size(self, W, H, box):
        """Smallest decoded size (w, h) of a W x H image at which its crop `box` is still >= S x S
        (ImageFolder.load's JPEG draft): the crop is then only ever shrunk, as without draft."""
        top, left, h, w = box
        return math.ceil(W * self.img_size / w), math.ceil(H * self.img_size / h)

    def __call__(self, img, rng, crop=None, scale=(1.0, 1.0)):
        """crop: (box, flip) already drawn (from the full image's size), else drawn here from rng;
        scale: decoded / full size of a draft-decoded JPEG (ImageFolder.load), which maps the box
        in full-image pixels onto the decoded image, so the crop shows the same content."""
        if isinstance(img, torch.Tensor):
            img = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))  # (H, W, 3)
        (top, left, h, w), flip = crop or self.box(*img.size, rng)
        sx, sy = scale
        S = self.img_size
        img = img.resize((S, S), Image.Resampling.BILINEAR,
                         box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        return normalize(x[None])[0]


def to_device(array, device):
    """A numpy array as a tensor on `device`. To CUDA through pinned memory without blocking: a plain
    host-to-device copy waits for the device, a host sync per batch (train.py allows one per step)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def crop_resize(imgs, boxes, flips, size):
    """Cut one box per image and resize all to size x size with one affine_grid + grid_sample.

    imgs: (B, 3, H, W) uint8; boxes: (B, 4) (top, left, h, w) pixels; flips: (B,) bool
    -> float (B, 3, size, size) normalised. Bilinear without antialiasing (matches PIL when
    enlarging; aliases a little when a crop shrinks by more than 2x).
    """
    B, _, H, W = imgs.shape
    params = to_device(np.concatenate([np.asarray(boxes, np.float32), np.asarray(flips, np.float32)[:, None]], 1),
                       imgs.device)  # (B, 5)
    top, left, h, w, flip = params.unbind(1)
    sign = 1 - 2 * flip  # -1 mirrors
    theta = torch.zeros(B, 2, 3, device=imgs.device)  # output [-1, 1] -> input [-1, 1]
    theta[:, 0, 0], theta[:, 0, 2] = sign * w / W, (2 * left + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)  # (B, S, S, 2)
    out = F.grid_sample(imgs.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return normalize(out)  # (B, 3, S, S)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

class TransformedDataset(Dataset):
    """base + Transform. Key (index, epoch): the augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, epoch = key
        rng = lambda: np.random.default_rng([self.seed, epoch, i])  # noqa: E731, a fresh copy per use
        if not isinstance(self.base, ImageFolder):
            img, label = self.base[i]
            return self.transform(img, rng()), label
        # Files: draw the crop from the header's image size, then decode only what the crop needs.
        crops = {}  # (W, H) -> (box, flip), per file tried (an unreadable one is replaced by the next)

        def decode_size(W, H):
            crops[W, H] = self.transform.box(W, H, rng())
            return self.transform.decode_size(W, H, crops[W, H][0])

        img, label, full, scale = self.base.load(i, decode_size)
        crop = crops.get(full) or self.transform.box(*full, rng())  # not a JPEG: not drawn yet
        return self.transform(img, None, crop, scale), label


class _KeySampler(DistributedSampler):
    """DistributedSampler (seeded shuffle, rank shards) that also hands its epoch to the dataset.
    It yields this rank's shard from position `start` on: a run resumed mid-epoch skips by index,
    so the samples before it are never loaded (len() stays the full shard)."""

    start = 0

    def __iter__(self):
        return ((i, self.epoch) for i in itertools.islice(super().__iter__(), self.start, None))


def _worker_init(worker_id):
    """DataLoader workers leave SIGTERM / SIGINT / SIGUSR1 to the main process. Schedulers (timeout,
    SLURM) signal the whole process group; a worker killed by it would crash the main process before
    it writes its checkpoint. The main process ends its workers itself (and they exit if it dies)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_at_exit():
    """The other half of _worker_init. When the main process exits while a loader is still alive
    (an error mid-epoch keeps it referenced from the traceback), multiprocessing's own exit hook
    sends its daemonic children SIGTERM and joins them: workers that ignore SIGTERM would make that
    join wait forever. At exit nobody needs a worker any more, so SIGKILL them first."""
    if hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would report our own kill as a worker crash
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        if p.daemon:  # DataLoader workers are daemonic; this program starts no other daemons
            p.kill()
            p.join(5)


class Loader(DataLoader):
    """DataLoader with set_epoch(epoch, start_batch), the same call as DeviceLoader."""

    def set_epoch(self, epoch, start_batch=0):
        """The next pass is epoch `epoch`, from batch `start_batch` on (the ones before are not loaded)."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_batch * self.batch_size


class DeviceLoader:
    """Batches made on the device from an in-memory set: no worker processes to starve a GPU.

    images: (N, 3, H, W) uint8, labels: (N,) -> yields (float (B, 3, S, S) normalised, int64 (B,))
    on `device`. Order and DDP shards come from the same DistributedSampler as the DataLoader path
    (train: shuffled by seed + epoch, disjoint shards, drop_last; eval: fixed order, every index,
    and when N % world_size != 0 a few repeated so every rank gets as many batches).
    Crops follow sample_crop_boxes, drawn from a Generator seeded by (seed, epoch, rank).
    """

    def __init__(self, images, labels, batch_size, img_size, train, *, rank=0, world_size=1,
                 seed=0, device="cpu", crop_scale=CROP_SCALE, flip=False, crop_frac=1.0):
        self.images = images.to(device).contiguous()  # MNIST's expanded grey view becomes real RGB
        self.labels = labels.to(device)
        self.batch_size, self.img_size, self.train, self.seed = batch_size, img_size, train, seed
        self.crop_scale, self.flip, self.crop_frac = crop_scale, flip, crop_frac
        self.sampler = DistributedSampler(range(len(labels)), world_size, rank, shuffle=train,
                                          seed=seed, drop_last=train)
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        """The next pass is epoch `epoch`, from batch `start_batch` on (the ones before are not made)."""
        self.sampler.set_epoch(epoch)
        self.start_batch = start_batch

    def __len__(self):
        n, b = len(self.sampler), self.batch_size
        return n // b if self.train else -(-n // b)

    def __iter__(self):
        order = to_device(np.array(list(self.sampler), np.int64), self.images.device)  # (N,)
        rng = np.random.default_rng([self.seed, self.sampler.epoch, self.sampler.rank])
        H, W = self.images.shape[-2:]
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]  # (B,)
            n = len(idx)
            if self.train:
                boxes = sample_crop_boxes(rng, n, H, W, self.crop_scale)
                flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, bool)
            else:
                boxes, flips = np.tile(center_box(H, W, self.crop_frac), (n, 1)), np.zeros(n, bool)
            if b < self.start_batch:  # resumed mid-epoch: the crops were drawn (later ones stay the same)
                continue
            yield crop_resize(self.images[idx], boxes, flips, self.img_size), self.labels[idx]


def build_loader(dataset, img_size, batch_size, train, *, num_workers=0, rank=0, world_size=1,
                 seed=0, device="cpu", on_device=False, crop_scale=CROP_SCALE, flip=False,
                 crop_frac=None):
    """Batches (imgs float (B, 3, S, S) normalised, labels int64 (B,)) from a build_dataset set.

    train: shuffle + drop_last + RandomResizedCrop(crop_scale) (+ flip if `flip`); otherwise fixed
    order + center crop. crop_frac (eval): None -> 1.0 for in-memory sets (stored near img_size),
    0.875 for imagefolder (ImageNet's resize 256 / crop 224). rank / world_size shard the indices
    (DDP; see DeviceLoader for the eval padding). on_device: DeviceLoader for in-memory sets.
    Both loaders have set_epoch(epoch) and `.sampler` (a DistributedSampler).
    """
    in_memory = hasattr(dataset, "tensors")
    crop_frac = crop_frac if crop_frac is not None else (1.0 if in_memory else 0.875)
    per_rank = len(dataset) // world_size
    if train and per_rank < batch_size:
        raise DataError(f"batch_size {batch_size} exceeds the {per_rank} training images per rank "
                        f"({len(dataset)} images / {world_size} ranks); lower the batch size")
    if on_device:
        if not in_memory:
            raise DataError(f"on_device needs an in-memory dataset (synthetic, cifar10, cifar100, mnist, "
                            f"fashion_mnist), not {type(dataset).__name__}; use on_device=False "
                            "(--device-data off)")
        images, labels = dataset.tensors()
        return DeviceLoader(images, labels, batch_size, img_size, train, rank=rank,
                            world_size=world_size, seed=seed, device=device,
                            crop_scale=crop_scale, flip=flip, crop_frac=crop_frac)
    keyed = TransformedDataset(dataset, Transform(img_size, train, crop_scale, flip, crop_frac), seed)
    sampler = _KeySampler(keyed, world_size, rank, shuffle=train, seed=seed, drop_last=train)
    if num_workers > 0:  # registered after multiprocessing's own exit hook, so it runs before it
        atexit.unregister(_kill_workers_at_exit)
        atexit.register(_kill_workers_at_exit)
    return Loader(keyed, batch_size, sampler=sampler, num_workers=num_workers, drop_last=train,
                  pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0,
                  worker_init_fn=_worker_init,
                  # torch seeds random / numpy / torch in each worker from this generator, so
                  # any other randomness in user code is reproducible too
                  generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Entry points for train.py / evaluate.py (read the shared argparse config)
# ---------------------------------------------------------------------------------------------

def usable_cpus():
    """CPUs this process may run on: the affinity mask (taskset, SLURM, containers) where the OS
    has one, else the machine's count; divided among the processes torchrun starts on this node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def default_num_workers(device, cpus=None):
    """--num-workers when not given: loader processes that fit the CPUs of this process.

    CUDA: the GPU does the model, so every CPU but one (the main process) decodes images, at most
    16. CPU: the model needs the cores; small in-memory sets crop fast in the main process, so no
    workers up to 4 CPUs, then a quarter of them (at most 4). Never more than the CPUs: more workers
    than cores only time-slice (on 2 cores, 4 workers + 2 torch threads made the demo 8x slower)."""
    cpus = cpus or usable_cpus()
    if torch.device(device).type == "cuda":
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 4)


def default_num_threads(num_workers, cpus=None):
    """torch intra-op threads of the main process: the CPUs the loader workers leave free."""
    return max(1, (cpus or usable_cpus()) - num_workers)


def _from_args(args, split, batch_size, train, rank, world_size, device, **kw):
    """Dataset + loader from the config fields dataset, data_path, subset_file, img_size,
    crop_scale, num_train / num_val (synthetic), num_workers (None: default_num_workers),
    device_data (auto|on|off), seed."""
    ds, num_classes = build_dataset(args.dataset, args.data_path, split, args.img_size,
                                    subset_file=args.subset_file,
                                    synthetic_size=args.num_train if split == "train" else args.num_val,
                                    class_to_idx=kw.pop("class_to_idx", None))
    # auto: every in-memory set is cropped in whole batches where the model runs (one grid_sample
    # per batch); on a CPU the per-image PIL path cost ~92 ms of a ~480 ms demo step
    on_device = args.device_data == "on" or (args.device_data == "auto" and hasattr(ds, "tensors"))
    # args.seed, not seed + rank: every rank must draw the same shuffle for the shards to be disjoint
    workers = args.num_workers if args.num_workers is not None else default_num_workers(device)
    loader = build_loader(ds, args.img_size, batch_size, train, num_workers=workers,
                          rank=rank, world_size=world_size, seed=args.seed, device=device,
                          on_device=on_device, crop_scale=tuple(args.crop_scale), **kw)
    loader.source, loader.num_classes = ds, num_classes  # class_to_idx / n_bad / object_mask live here
    return loader


def build_train_loader(args, batch_size, rank=0, world_size=1, device="cpu", class_to_idx=None):
    """train.py: the training split with the paper's crops (no flip), batch_size per process.
    -> loader of (imgs (B, 3, S, S), labels (B,)); also .num_classes and .source (the raw set).
    class_to_idx: a resumed run's saved map (imagefolder), so the labels stay the run's."""
    return _from_args(args, "train", batch_size, True, rank, world_size, device, class_to_idx=class_to_idx)


def build_eval_loader(args, split, batch_size, rank=0, world_size=1, device="cpu", *, augment=False,
                      class_to_idx=None):
    """evaluate.py: `split` in fixed order with resize + center crop (kNN features, probe test),
    or augment=True for a linear-probe training loader (shuffled, crops + flip, drop_last).
    class_to_idx: the map saved with the run, so imagefolder labels match. Same extras as above."""
    return _from_args(args, split, batch_size, augment, rank, world_size, device,
                      flip=augment, class_to_idx=class_to_idx)
