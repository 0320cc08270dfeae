"""data.py: datasets, transforms and loaders. Every fixture is written into tmp_path by the tests."""
import gzip
import math
import os
import pickle
import random
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError

MEAN = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)


# ------------------------------------------------------------------ fixtures written on the fly

def write_image_tree(root, split="train", size=(30, 20)):
    """root/split/{n01,n02}/n0k_j.{JPEG,png} plus a stray text file that must be ignored."""
    rs = np.random.RandomState(0)
    for c, ext in (("n02", "png"), ("n01", "JPEG")):  # written unsorted on purpose
        os.makedirs(root / split / c, exist_ok=True)
        for j in range(3):
            arr = rs.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / c / f"{c}_{j}.{ext}")
    (root / split / "n01" / "notes.txt").write_text("not an image")
    return root


def write_cifar(folder, names, key, n=4, seed=0):
    os.makedirs(folder, exist_ok=True)
    rs = np.random.RandomState(seed)
    for name in names:
        rows = rs.randint(0, 256, (n, 3072)).astype(np.uint8)
        rows[0] = 0
        rows[0, :1024] = 255  # image 0: pure red, tells whether rows are unpacked as RGB planes
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, key: list(rs.randint(0, 10, n))}, f)


def idx_bytes(arr):
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(root, n_train=6, n_test=4):
    """train files raw, t10k files gzipped: both forms must load."""
    os.makedirs(root, exist_ok=True)
    rs = np.random.RandomState(0)
    for prefix, n, opener, ext in (("train", n_train, open, ""), ("t10k", n_test, gzip.open, ".gz")):
        with opener(root / f"{prefix}-images-idx3-ubyte{ext}", "wb") as f:
            f.write(idx_bytes(rs.randint(0, 256, (n, 28, 28)).astype(np.uint8)))
        with opener(root / f"{prefix}-labels-idx1-ubyte{ext}", "wb") as f:
            f.write(idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    return root


def tiny_array_set(n=24, side=8):
    """Labels 0..n-1 name the sample, so a loader's labels tell which indices it served."""
    imgs = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return data.ArrayDataset(imgs, torch.arange(n))


# ------------------------------------------------------------------ synthetic set

def test_synthetic_is_deterministic_and_splits_differ():
    a, n = data.build_dataset("synthetic", split="train", img_size=32, synthetic_size=40)
    b, _ = data.build_dataset("synthetic", split="train", img_size=32, synthetic_size=40)
    v, _ = data.build_dataset("synthetic", split="val", img_size=32, synthetic_size=40)
    other, _ = data.build_dataset("synthetic", split="train", img_size=32, synthetic_size=40, seed=1)
    xa, ya = a.tensors()
    assert n == 10 and xa.shape == (40, 3, 32, 32) and xa.dtype == torch.uint8
    assert torch.equal(xa, b.tensors()[0])  # same seed -> same pixels
    assert torch.equal(ya, torch.arange(40) % 10)  # balanced labels in 0..9
    assert not torch.equal(xa, v.tensors()[0]) and not torch.equal(xa, other.tensors()[0])
    img, label = a[7]  # one image drawn alone equals the same image drawn in a batch
    assert torch.equal(img, xa[7]) and label == 7
    assert len(data.SyntheticShapes("train")) == 10_000 and len(data.SyntheticShapes("val")) == 2_000


@pytest.mark.parametrize("size", [32, 64, 96])
def test_synthetic_object_mask_is_where_the_object_colour_is(size):
    ds, _ = data.build_dataset("synthetic", img_size=size, synthetic_size=20)
    for i in range(20):
        img, label = ds[i]
        mask = ds.object_mask(i)
        assert mask.shape == (size, size) and mask.dtype == torch.bool
        assert 0.02 < mask.float().mean() < 0.5  # a salient object, not the whole frame
        colour = torch.tensor(data._COLOURS[label // 5]).view(3, 1)
        inside = img[:, mask].float()  # (3, n) object pixels: class colour +- jitter and shading
        assert (inside - colour).abs().max() <= 50
        outside = img[:, ~mask].float()
        near = ((outside - colour).abs().max(0).values <= 50).float().mean()
        assert near < 0.1  # background and strokes rarely look like the object


@pytest.mark.parametrize("size", [32, 64])
def test_synthetic_images_hold_3_or_4_separated_objects_of_different_sizes(size):
    """Several salient things per image, so DSeq-JEPA's sequence has more than one step: 3-4 objects,
    separate 8-connected components on the 8 x 8 grid (the demo's patch grid at 32 px / patch 4;
    a cell counts if any pixel of an object lies in it), of different sizes: the class object
    (slot 0) the largest on average, two more large ones, an optional small one. Checked with scipy's
    labelling, not ours."""
    ndimage = pytest.importorskip("scipy.ndimage")
    ds, _ = data.build_dataset("synthetic", img_size=size, synthetic_size=200)
    counts, areas = [], []
    for i in range(200):
        masks = ds.object_masks(i).numpy()  # (4, S, S)
        present = masks.any((1, 2))
        c = size // 8
        cells = masks.reshape(4, 8, c, 8, c).any((2, 4))  # (4, 8, 8) cells an object touches
        n_comp = ndimage.label(cells.any(0), structure=np.ones((3, 3)))[1]
        assert n_comp == present.sum() and not (cells.sum(0) > 1).any()  # no two objects touch
        touched = cells.sum((1, 2))  # (4,) cells of each object
        assert present[:3].all() and touched[:3].min() >= 6 and touched[3] <= 6
        assert torch.equal(ds.object_mask(i), torch.from_numpy(masks[0]))
        counts.append(present.sum())
        areas.append(np.where(present, masks.mean((1, 2)), np.nan))
    counts, area = np.array(counts), np.nanmean(np.array(areas), 0)  # (4,) mean area of each slot
    assert area[0] > max(area[1], area[2]) > min(area[1], area[2]) > 2 * area[3]  # A largest, D small
    assert counts.min() == 3 and counts.max() == 4 and 3.2 < counts.mean() < 3.8


def test_shapes_set_class_is_the_shape_not_the_grey_level():
    """The "shapes" set: 10 classes, one shape each, every object of an image drawn in that shape,
    grey (R = G = B), at its own random light level. Brightness tells nothing: each class's mean
    object level lies within 10 levels of the overall mean, while objects spread over ~22 levels
    (std); masks cover all objects; the default synthetic set is untouched by the variant (its own
    tests above)."""
    ds, n = data.build_dataset("shapes", img_size=32, synthetic_size=500)
    assert n == 10 and ds.shape_only
    x, y = ds.tensors()
    levels, classes = [], []
    for i in range(500):
        masks = ds.object_masks(i)  # (4, S, S)
        assert torch.equal(ds.object_mask(i), masks.any(0)) and masks[:3].flatten(1).any(1).all()
        for m in masks:
            if m.any():
                rgb = x[i][:, m].float()  # (3, pixels of this object)
                assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])  # grey
                levels.append(float(rgb[0].mean()))
                classes.append(int(y[i]))
    levels, classes = torch.tensor(levels), torch.tensor(classes)  # (objects,)
    per_class = torch.stack([levels[classes == c].mean() for c in range(10)])  # (10,)
    assert (per_class - levels.mean()).abs().max() < 10 < 15 < levels.std()  # (the light from above darkens a half disc by ~6)
    assert 170 < levels.min() and levels.max() < 256
    with pytest.raises(DataError, match="2..10"):
        data.build_dataset("shapes", num_classes=11)


def test_noisy_shapes_is_the_shapes_layout_on_a_flat_field_under_per_pixel_grain():
    """noisy_shapes (the demo's set): the same objects as "shapes" at the same index (masks equal), a
    flat field of one level elsewhere before the grain, and grain of std data.GRAIN that is
    independent between pixels (neighbours uncorrelated: nothing there for one part of the image to
    predict about another) and a pure function of the image index (item i == tensors()[i],
    whatever batch drew it)."""
    plain, _ = data.build_dataset("shapes", img_size=32, synthetic_size=60)
    noisy, n = data.build_dataset("noisy_shapes", img_size=32, synthetic_size=60)
    assert n == 10 and noisy.shape_only and noisy.grain == data.GRAIN > 0
    x, y = noisy.tensors()
    assert torch.equal(y, plain.tensors()[1])
    field, resid = [], []
    for i in range(60):
        masks = noisy.object_masks(i)
        assert torch.equal(masks, plain.object_masks(i))
        assert torch.equal(noisy[i][0], x[i])  # drawn alone == drawn in a batch
        bg = ~masks.any(0)  # (S, S)
        v = x[i].float()  # (3, S, S)
        field.append(v[:, bg].mean())
        inner = bg[1:, :] & bg[:-1, :]  # vertical neighbour pairs both on the field
        a, b = v[:, 1:, :][:, inner], v[:, :-1, :][:, inner]
        resid.append(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    field, resid = torch.stack(field), torch.stack(resid)
    assert (field - data._GRAIN_FIELD).abs().max() < 5  # flat: every image's field at one level
    assert resid.abs().mean() < 0.05  # grain: neighbouring field pixels uncorrelated
    bg = ~noisy.object_masks(0).any(0)
    assert abs(x[0].float()[:, bg].std() - data.GRAIN) < 6  # its std (a little clipped at 0)
    # the plain set's background is smooth: neighbours strongly correlated (the contrast drawn here)
    v, m = plain.tensors()[0][0].float(), ~plain.object_masks(0).any(0)
    inner = m[1:, :] & m[:-1, :]
    assert torch.corrcoef(torch.stack([v[:, 1:, :][:, inner].flatten(), v[:, :-1, :][:, inner].flatten()]))[0, 1] > 0.5


# ------------------------------------------------------------------ files on disk

def test_cifar10_and_cifar100(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"], b"labels")
    tr, n = data.build_dataset("cifar10", tmp_path, "train")
    va, _ = data.build_dataset("cifar10", tmp_path / "cifar-10-batches-py", "val")  # the folder itself works too
    assert n == 10 and len(tr) == 20 and len(va) == 4
    img, label = tr[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and 0 <= label < 10
    assert (img[0] == 255).all() and (img[1:] == 0).all()  # rows are R, G, B planes
    write_cifar(tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels")
    tr100, n100 = data.build_dataset("cifar100", tmp_path, "train")
    assert n100 == 100 and len(tr100) == 4


def test_idx_raw_and_gz_grey_to_rgb(tmp_path):
    root = write_idx(tmp_path / "fm")
    tr, n = data.build_dataset("fashion_mnist", root, "train")  # raw files
    va, _ = data.build_dataset("mnist", root, "val")  # gzipped files
    assert n == 10 and len(tr) == 6 and len(va) == 4
    img, label = va[3]
    assert img.shape == (3, 28, 28) and label == 3
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])


def test_imagefolder_classes_labels_and_subset(tmp_path):
    root = write_image_tree(tmp_path)
    ds, n = data.build_dataset("imagefolder", root, "train")
    assert n == 2 and ds.class_to_idx == {"n01": 0, "n02": 1} and len(ds) == 6  # notes.txt skipped
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (30, 20) and label == 0
    assert [lab for _, lab in ds.samples] == [0, 0, 0, 1, 1, 1]
    sub = tmp_path / "subset.txt"
    sub.write_text("n01_2.JPEG\nn02/n02_0.png\n\n")  # bare ImageNet name and CLASS/FILE
    ds, n = data.build_dataset("imagefolder", root, "train", subset_file=sub)
    assert n == 2 and [(os.path.basename(p), lab) for p, lab in ds.samples] == [("n01_2.JPEG", 0), ("n02_0.png", 1)]
    write_image_tree(tmp_path, "val")
    va, _ = data.build_dataset("imagefolder", root, "val", class_to_idx={"n02": 0, "n01": 1})  # the run's map wins
    assert va.samples[0][1] == 1


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path):
    root = write_image_tree(tmp_path)
    bad = root / "train" / "n01" / "n01_0.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    good = root / "train" / "n01" / "n01_1.JPEG"
    (root / "train" / "n01" / "n01_2.JPEG").write_bytes(good.read_bytes()[:200])  # truncated
    ds, _ = data.build_dataset("imagefolder", root, "train")
    with pytest.warns(RuntimeWarning, match="n01_0.JPEG"):
        img, label = ds[0]  # replaced by the next file
    assert img.size == (30, 20) and label == 0 and ds.n_bad == 1
    with pytest.warns(RuntimeWarning, match="n01_2.JPEG"):
        _, label = ds[2]  # truncated -> next index, which is the first n02 image
    assert label == 1 and ds.n_bad == 2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known-bad files are skipped silently, counted once
        ds[0], ds[2]
    assert ds.n_bad == 2
    loader = data.build_loader(ds, 16, 2, train=True)
    assert sum(len(y) for _, y in loader) == 6  # the run goes on


# ------------------------------------------------------------------ transforms

def reference_crop_fraction(H, W, scale, ratio, rnd):
    """torchvision's RandomResizedCrop rule, one image at a time (the oracle)."""
    for _ in range(10):
        target = H * W * rnd.uniform(*scale)
        ar = math.exp(rnd.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            return h * w / (H * W)
    if W / H < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif W / H > ratio[1]:
        w, h = int(round(H * ratio[1])), H
    else:
        w, h = W, H
    return h * w / (H * W)


@pytest.mark.parametrize("H,W", [(224, 224), (100, 300), (32, 32)])
def test_crop_boxes_follow_torchvision_statistics(H, W):
    n = 20_000
    boxes = data.sample_crop_boxes(np.random.default_rng(0), n, H, W)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    frac = h * w / (H * W)
    assert frac.min() >= 0.3 * 0.93 and frac.max() <= 1.0  # 0.3-1 up to pixel rounding
    ref = np.mean([reference_crop_fraction(H, W, data.CROP_SCALE, data.CROP_RATIO, random.Random(k)) for k in range(n)])
    assert abs(frac.mean() - ref) < 0.01
    if H == W == 224:
        assert 0.55 < frac.mean() < 0.65  # below 0.65: big non-square crops do not fit and are redrawn
        assert abs(np.log(w / h).mean()) < 0.01  # aspect symmetric in log space


def test_transform_shapes_ranges_and_eval_identity():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lo, hi = -MEAN / STD - 1e-5, (1 - MEAN) / STD + 1e-5
    for aug in (True, False):
        x = data.Transform(32, aug, flip=True)(img, np.random.default_rng(0))
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert (x >= lo).all() and (x <= hi).all()
    a = data.Transform(32, True)(img, np.random.default_rng(5))
    assert torch.equal(a, data.Transform(32, True)(img, np.random.default_rng(5)))
    square = img[:, :32, :32]  # eval at the stored size with crop_frac 1 is just normalisation
    x = data.Transform(32, False, crop_frac=1.0)(square, None)
    assert torch.allclose(x, (square / 255 - MEAN) / STD, atol=1e-5)


def test_device_crop_matches_pil():
    """The batched grid_sample crop equals PIL's crop + bilinear resize when enlarging."""
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    boxes = np.array([[3, 5, 12, 10], [0, 0, 24, 24], [10, 2, 14, 20]])
    flips = np.array([False, True, True])
    out = data.crop_resize(img[None].expand(3, -1, -1, -1), boxes, flips, 32)
    for k, (t, l, h, w) in enumerate(boxes):
        ref = pil.resize((32, 32), Image.Resampling.BILINEAR, box=(l, t, l + w, t + h))
        if flips[k]:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float()
        got = out[k] * STD * 255 + MEAN * 255
        assert (got - ref).abs().max() <= 2.0  # PIL rounds to uint8 between its two passes


# ------------------------------------------------------------------ loaders

def _crop_geometry(loader, n_batches):
    """Per sample of a loader over coordinate ramps (channel 0 = x, channel 1 = y): the crop's
    centre (x, y) and its width / height (4 x the ramp's std: 2 sqrt(3) for a uniform ramp, close)."""
    out = []
    for epoch in range(n_batches):
        loader.set_epoch(epoch)
        for x, _ in loader:
            px = x * STD.view(1, 3, 1, 1) * 255 + MEAN.view(1, 3, 1, 1) * 255  # (B, 3, S, S) pixels
            cx, cy = px[:, 0].mean((1, 2)), px[:, 1].mean((1, 2))
            wx, wy = px[:, 0].std((1, 2)) * 2 * math.sqrt(3), px[:, 1].std((1, 2)) * 2 * math.sqrt(3)
            out.append(torch.stack([cx, cy, wx, wy], 1))
    # (n, 4) in source pixels (the ramps step 8 per pixel), rounded to half pixels: boxes are whole
    # pixels, and PIL's uint8 rounding must not split one box size into two nearby values
    return np.round(torch.cat(out).numpy() / 8 * 2) / 2


def test_batched_crops_follow_the_per_image_crop_distribution():
    """--device-data on (one grid_sample per batch, crops drawn per batch) against the per-image PIL
    path (crops drawn per (seed, epoch, index)): different random streams, so not the same crops,
    but the same distribution of crop centres and sizes (two-sample KS tests, seeded, and quantiles
    within one source pixel)."""
    stats = pytest.importorskip("scipy.stats")
    H = 32
    ramp = torch.arange(H, dtype=torch.uint8) * 8  # 0..248: one source pixel = 8 levels
    img = torch.stack([ramp.view(1, H).expand(H, H), ramp.view(H, 1).expand(H, H),
                       torch.zeros(H, H, dtype=torch.uint8)])  # (3, H, W)
    ds = data.ArrayDataset(img[None].repeat(400, 1, 1, 1), torch.zeros(400, dtype=torch.long))
    pil = _crop_geometry(data.build_loader(ds, 32, 100, train=True, seed=0), 4)  # (1600, 4)
    dev = _crop_geometry(data.build_loader(ds, 32, 100, train=True, seed=0, on_device=True), 4)
    for j, name in enumerate(["centre x", "centre y", "width", "height"]):
        assert stats.ks_2samp(pil[:, j], dev[:, j]).pvalue > 1e-3, name
        q = np.quantile(pil[:, j], [0.1, 0.5, 0.9]) - np.quantile(dev[:, j], [0.1, 0.5, 0.9])
        assert np.abs(q).max() <= 1.0, (name, q)  # boxes are whole pixels: a quantile may step by one
    wide = _crop_geometry(data.build_loader(ds, 32, 100, train=True, seed=0, on_device=True,
                                            crop_scale=(0.6, 1.0)), 4)  # the test sees a changed rule
    assert stats.ks_2samp(pil[:, 2], wide[:, 2]).pvalue < 1e-6


def test_dataloader_batches_deterministic_and_worker_independent():
    ds, _ = data.build_dataset("synthetic", img_size=32, synthetic_size=16)
    def epoch(loader, e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]
    l0 = data.build_loader(ds, 32, 4, train=True, seed=3, flip=True)
    a, b = epoch(l0, 0), epoch(l0, 1)
    assert len(l0) == 4 and len(a) == 4
    x, y = a[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert not torch.equal(a[0][0], b[0][0])  # new epoch, new order and crops
    l2 = data.build_loader(ds, 32, 4, train=True, seed=3, flip=True, num_workers=2)
    c = epoch(l2, 1)
    del l2  # stops the persistent workers
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(b, c))
    # a sample's crop is keyed on (seed, epoch, index): same sample, new epoch -> new crop
    tiny = tiny_array_set(24)
    loader = data.build_loader(tiny, 8, 24, train=True)
    by_label = lambda: (lambda x, y: x[y.argsort()])(*next(iter(loader)))
    first, again = by_label(), by_label()
    loader.set_epoch(1)
    assert torch.equal(first, again) and not torch.equal(first, by_label())
    ev = data.build_loader(ds, 32, 5, train=False)
    assert len(ev) == 4 and [len(y) for _, y in ev] == [5, 5, 5, 1]  # eval keeps every image
    assert torch.equal(torch.cat([y for _, y in ev]), torch.arange(16) % 10)


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_see_disjoint_indices_covering_the_set(on_device, train):
    ds = tiny_array_set(24)
    seen = []
    for rank in (0, 1):
        loader = data.build_loader(ds, 8, 4, train=train, rank=rank, world_size=2, seed=0, on_device=on_device)
        loader.set_epoch(2)
        assert len(loader) == 3
        seen.append(torch.cat([y for _, y in loader]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


class CountingSet(torch.utils.data.Dataset):
    """An array set without tensors() (so the DataLoader path) that records every index it reads."""

    def __init__(self, base):
        self.base, self.read = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.read.append(i)
        return self.base[i]


@pytest.mark.parametrize("on_device", [False, True])
def test_mid_epoch_start_skips_by_index_without_reading_the_skipped(on_device):
    """A run resumed mid-epoch asks for set_epoch(e, start_batch=k): it gets exactly batches k.. of
    the full epoch (same samples, same crops), and the skipped samples are never read (no decoding)."""
    ds = tiny_array_set(48) if on_device else CountingSet(tiny_array_set(48))
    loader = data.build_loader(ds, 8, 4, train=True, rank=1, world_size=2, seed=5, on_device=on_device)
    loader.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in loader]  # 6 batches of this rank's 24-sample shard
    read_before = len(getattr(ds, "read", []))
    loader.set_epoch(3, start_batch=4)
    rest = [(x.clone(), y.clone()) for x, y in loader]
    assert len(full) == 6 and len(rest) == 2 and len(loader) == 6  # len() stays one whole epoch
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(full[4:], rest))
    if not on_device:  # labels name the samples: only the last two batches were read
        assert sorted(ds.read[read_before:]) == sorted(torch.cat([y for _, y in full[4:]]).tolist())
    loader.set_epoch(4)  # the next epoch starts from its first batch again
    assert len(list(loader)) == 6


def test_device_loader_batches_and_eval_equals_cpu_path():
    ds, _ = data.build_dataset("synthetic", img_size=32, synthetic_size=20)
    dl = data.build_loader(ds, 32, 8, train=True, on_device=True, flip=True, seed=1)
    assert isinstance(dl, data.DeviceLoader) and len(dl) == 2
    batches = [(x, y) for x, y in dl]
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,) and y.dtype == torch.int64
    again = [x for x, _ in dl]
    assert torch.equal(batches[0][0], again[0])  # same epoch -> same batch
    dl.set_epoch(1)
    assert not torch.equal(batches[0][0], next(iter(dl))[0])
    ev_dev = torch.cat([x for x, _ in data.build_loader(ds, 32, 8, train=False, on_device=True)])
    ev_cpu = torch.cat([x for x, _ in data.build_loader(ds, 32, 8, train=False)])
    assert ev_dev.shape == (20, 3, 32, 32) and torch.allclose(ev_dev, ev_cpu, atol=1e-3)


def test_loaders_for_files_on_disk(tmp_path):
    root = write_idx(tmp_path / "fm", n_train=8)
    ds, _ = data.build_dataset("fashion_mnist", root, "train")
    x, y = next(iter(data.build_loader(ds, 32, 4, train=True, on_device=True)))
    assert x.shape == (4, 3, 32, 32) and y.max() < 10
    write_image_tree(tmp_path / "in")
    ds, _ = data.build_dataset("imagefolder", tmp_path / "in", "train")
    x, y = next(iter(data.build_loader(ds, 16, 3, train=False)))  # 30x20 images, center crop
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 0]


def test_entry_points_read_the_shared_config(tmp_path):
    import argparse
    args = argparse.Namespace(dataset="synthetic", data_path=None, subset_file=None, img_size=32,
                              crop_scale=[0.3, 1.0], num_train=40, num_val=12, num_workers=0,
                              device_data="off", seed=0)
    tr = data.build_train_loader(args, 8, rank=1, world_size=2)
    assert isinstance(tr, data.Loader) and len(tr) == 2 and tr.num_classes == 10 and len(tr.source) == 40
    ev = data.build_eval_loader(args, "val", 5)
    assert [len(y) for _, y in ev] == [5, 5, 2]
    for on in ("on", "auto"):  # auto: in-memory sets are cropped in whole batches, on the CPU too
        args.device_data = on
        assert isinstance(data.build_train_loader(args, 8), data.DeviceLoader)
    write_image_tree(tmp_path / "in")
    args.dataset, args.data_path, args.img_size, args.device_data = "imagefolder", tmp_path / "in", 16, "auto"
    probe = data.build_eval_loader(args, "train", 2, augment=True, class_to_idx={"n01": 1, "n02": 0})
    assert probe.source.class_to_idx == {"n01": 1, "n02": 0} and len(probe) == 3


# ------------------------------------------------------------------ every error names the thing and the fix

def test_error_messages(tmp_path):
    def err(fn, *parts):
        with pytest.raises(DataError) as e:
            fn()
        for p in parts:
            assert str(p) in str(e.value), (p, str(e.value))
    err(lambda: data.build_dataset("imagenet22k", tmp_path), "'imagenet22k'", "synthetic", "cifar10", "imagefolder")
    err(lambda: data.build_dataset("synthetic", split="test"), "'test'", "'val'")
    err(lambda: data.build_dataset("cifar10", None), "needs a data root", "cifar-10-batches-py")
    err(lambda: data.build_dataset("cifar10", tmp_path / "nope"), str(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    err(lambda: data.build_dataset("mnist", tmp_path / "empty"), str(tmp_path / "empty"), "is empty")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "readme.txt").write_text("x")
    err(lambda: data.build_dataset("cifar100", tmp_path / "wrong"), "cifar-100-python", "'train'")
    err(lambda: data.build_dataset("mnist", tmp_path / "wrong"), "train-images-idx3-ubyte", str(tmp_path / "wrong"))
    err(lambda: data.build_dataset("imagefolder", tmp_path / "wrong"), str(tmp_path / "wrong" / "train"), "CLASS")
    (tmp_path / "wrong" / "train").mkdir()
    err(lambda: data.build_dataset("imagefolder", tmp_path / "wrong"), "no class folders")
    err(lambda: data.check_img_size(30, 16), "img_size 30", "patch_size 16", "32")
    assert data.check_img_size(224, 16) == 14

    idx = write_idx(tmp_path / "idx")
    (idx / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(20))  # float IDX
    err(lambda: data.build_dataset("mnist", idx), "not a uint8 IDX file", "train-images-idx3-ubyte")
    (idx / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((6, 28, 28), np.uint8))[:500])
    err(lambda: data.build_dataset("mnist", idx), "truncated", "train-images-idx3-ubyte")

    root = write_image_tree(tmp_path / "in")
    sub = tmp_path / "sub.txt"
    sub.write_text("n01_0.JPEG\n" + "".join(f"n01_{k}9.JPEG\n" for k in range(8)))
    err(lambda: data.build_dataset("imagefolder", root, subset_file=sub), "8 images missing", "n01_09.JPEG", str(sub))
    err(lambda: data.build_dataset("imagefolder", root, subset_file=tmp_path / "no.txt"), "no.txt", "does not exist")
    err(lambda: data.build_dataset("imagefolder", root, class_to_idx={"n01": 0}), "n02", "class map")
    ds, _ = data.build_dataset("imagefolder", root)
    err(lambda: data.build_loader(ds, 16, 2, train=True, on_device=True), "on_device", "ImageFolder")
    err(lambda: data.build_loader(ds, 16, 64, train=True), "batch_size 64", "lower the batch size")
