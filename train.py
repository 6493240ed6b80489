"""Train a CIFAR model with SAM or any variant in sam.py, logging the notes' ratio statistics.

    python train.py --variant samme1 --rho 0.1            # ResNet-18, CIFAR-10, 200 epochs (a GPU)
    python train.py --model cnn --subset 5000 --epochs 2 --data-dir ../shared/data/cifar10-jpeg.tar.gz
                                                          # the CPU setting: about a minute
    torchrun --standalone --nproc_per_node 2 train.py ... # data parallel (NCCL on GPUs, gloo on CPUs)

A run is one folder (--out, default runs/<settings>): config.json, steps.csv (every --log-every
steps: lr, rho, loss, accuracy and every key of opt.stats), epochs.csv, final.json, last.pt and
best.pt. Kill it at any point and run the same command with --resume: the CSVs come out as if it
had never stopped (bit for bit on a CPU). The file reads in the order a run happens: settings,
data, model, optimizer, distributed helpers, sharpness, run folder, training loop, main.
"""
import argparse
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from argparse import BooleanOptionalAction
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch._utils import _flatten_dense_tensors as flatten, _unflatten_dense_tensors as unflatten
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vgg import cfgs as VGG_CONFIGS, make_layers as vgg_layers

import sam
from sam import SAM, disable_running_stats, enable_running_stats

# ----------------------------------------------------------------------------------------------
# Settings

# Per-channel mean and std of the training images; normalisation happens after augmentation.
DATASETS = {
    "cifar10": dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), torchvision="CIFAR10"),
    "cifar100": dict(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), torchvision="CIFAR100"),
}
# sam.FLAGS that get a CLI flag of their own, named after them (--rho, --looksam-k, ...). condition_warmup
# counts steps, so the CLI takes --condition-warmup-epochs instead.
SAM_CLI_FLAGS = [name for name in sam.FLAGS if name != "condition_warmup"]
# Settings that may change when a run is resumed: where things are, and how this session stops.
SESSION_SETTINGS = {"resume", "overwrite", "max_steps", "data_dir", "cache_dir", "out", "device", "compile"}


def at_least(minimum, kind=int):
    """An argparse type that rejects values below `minimum` with an argparse-style message."""
    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in "invalid int value: 'x'"
    return parse


def bin_scale_entry(text):
    return text if text in ("c", "1/c") else float(text)


def build_parser():
    parser = argparse.ArgumentParser(description="Train a CIFAR model with SAM or one of its variants.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=list(DATASETS))
    data.add_argument("--data-dir", default="./data", help="torchvision root (downloads there), an ImageFolder "
                      "directory with train/<class>/* and test/<class>/*, or a .tar.gz of that layout")
    data.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "data"),
                      help="where a decoded folder/archive is cached as uint8 <name>.uint8.pt (never next to the "
                      "source, which may be shared or read-only)")
    data.add_argument("--subset", type=at_least(1), default=None, help="train on about N images (stratified), "
                      "before the val split")
    data.add_argument("--val-fraction", type=float, default=0.1, help="stratified validation share (45k/5k)")
    data.add_argument("--label-noise", type=float, default=0.0, help="share of training labels flipped")
    data.add_argument("--noise-type", default="sym", choices=["sym", "asym"],
                      help="sym: a random other class; asym: CIFAR-10 truck>automobile, bird>airplane, "
                      "deer>horse, cat<>dog")
    data.add_argument("--imbalance", type=float, default=1.0, help="long-tailed training set: largest / "
                      "smallest class count, exponential profile (100 for CIFAR-LT); 1 keeps it balanced")
    data.add_argument("--cutout", action=BooleanOptionalAction, default=True, help="16x16 cutout, p=0.5")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet18", choices=list(MODELS))
    model.add_argument("--width", type=float, default=1.0, help="channel multiplier (SAN-ER's ResNet-18 "
                       "width k; multiplies WRN's k and PyramidNet's alpha)")
    opt = parser.add_argument_group("optimisation (defaults: origin 4.1)")
    opt.add_argument("--variant", default="sam", choices=sorted(sam.VARIANTS), help="a preset of sam.VARIANTS")
    opt.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="base optimizer")
    opt.add_argument("--lr", type=at_least(0.0, float), default=0.1)
    opt.add_argument("--momentum", type=at_least(0.0, float), default=0.9)
    opt.add_argument("--nesterov", action=BooleanOptionalAction, default=False)
    opt.add_argument("--weight-decay", type=at_least(0.0, float), default=1e-3, help="on every parameter")
    opt.add_argument("--batch-size", type=at_least(1), default=256, help="global, split over DDP ranks")
    opt.add_argument("--epochs", type=at_least(1), default=200)
    opt.add_argument("--schedule", default="cosine", choices=["cosine", "step", "multistep", "constant"],
                     help="per step; step: x0.2 at 30/60/80%% (davda54); multistep: see --milestones")
    opt.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75], help="multistep: fractions "
                     "of training")
    opt.add_argument("--gamma", type=float, default=0.1, help="multistep factor")
    opt.add_argument("--warmup-epochs", type=at_least(0.0, float), default=0.0, help="linear lr warm-up")
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    opt.add_argument("--rho-min", type=at_least(0.0, float), default=None, help="GSAM: rho follows the lr "
                     "schedule from rho down to rho-min (default: constant rho)")
    opt.add_argument("--freeze-bn-stats", action=BooleanOptionalAction, default=True, help="BN running stats "
                     "only from each step's first pass (davda54; contested in its issues #17/#30)")
    flags = parser.add_argument_group("SAM flags (default: the variant's preset, else sam.FLAGS)")
    for name in SAM_CLI_FLAGS:
        add_sam_flag(flags, name, sam.FLAGS[name])
    flags.add_argument("--condition-warmup-epochs", type=at_least(0.0, float), default=None,
                       help="c rises linearly from 1 to --condition over these epochs (SANER: 50)")
    flags.add_argument("--tail-threshold", type=at_least(1), default=20, help="imbsam: a class with fewer "
                       "training images is a tail class")
    flags.add_argument("--tail-weight", type=float, default=2.0, help="imbsam: tail loss weight (the official "
                       "script's 2)")
    flags.add_argument("--mask-every-epochs", type=at_least(1), default=5, help="ssamf/ssamd: mask refresh")
    flags.add_argument("--fisher-samples", type=at_least(1), default=128, help="ssamf: batch-1 backward "
                       "passes per Fisher estimate")
    system = parser.add_argument_group("system")
    system.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    system.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast; auto: "
                        "bf16 on CUDA, fp32 on the CPU")
    system.add_argument("--channels-last", action=BooleanOptionalAction, default=None, help="default: on CUDA")
    system.add_argument("--compile", action=BooleanOptionalAction, default=False, help="torch.compile the model")
    system.add_argument("--seed", type=int, default=42)
    system.add_argument("--sync-ascent", action=BooleanOptionalAction, default=False, help="DDP: ascend along "
                        "the all-reduced gradient (default: each rank its own, m-sharpness)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>-<variant>...)")
    out.add_argument("--log-every", type=at_least(1), default=50, help="steps per steps.csv row (one host sync)")
    again = out.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    again.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    out.add_argument("--max-steps", type=at_least(1), default=None, help="stop after this many steps in all, "
                     "checkpointed as Ctrl-C does (resume with --resume)")
    out.add_argument("--sharpness", action=BooleanOptionalAction, default=False, help="Hessian sharpness of "
                     "the best-val checkpoint at the end")
    out.add_argument("--sharpness-every", type=at_least(1), default=None, help="also every N epochs "
                     "(sharpness.csv)")
    out.add_argument("--sharpness-batches", type=at_least(1), default=40, help="origin 3: top-5 eigenvalues on "
                     "each of these batches; lambda_max and trace on all of them")
    out.add_argument("--sharpness-batch-size", type=at_least(1), default=128)
    out.add_argument("--sharpness-iters", type=at_least(1), default=100, help="most HVPs per eigenvalue and "
                     "Hutchinson probes (PyHessian's 100; they stop earlier at a relative change of 1e-3)")
    return parser


def add_sam_flag(group, name, neutral):
    """--name for one sam.FLAGS entry, typed after its neutral value; None by default so presets apply."""
    option = "--" + name.replace("_", "-")
    text = f"neutral value {neutral!r}"
    if isinstance(neutral, bool):
        group.add_argument(option, action=BooleanOptionalAction, default=None, help=text)
    elif isinstance(neutral, tuple):
        group.add_argument(option, nargs=len(neutral), type=bin_scale_entry, default=None, metavar="S",
                           help=text + "; numbers, 'c' or '1/c'")
    else:
        group.add_argument(option, type=int if neutral is None else type(neutral), default=None, help=text)


def sam_flags(args):
    """The SAM flags given on the command line (the preset supplies the rest)."""
    flags = {name: getattr(args, name) for name in SAM_CLI_FLAGS if getattr(args, name) is not None}
    if "bin_scale" in flags:
        flags["bin_scale"] = tuple(flags["bin_scale"])
    if "stats_every" not in flags:   # compute the statistics only on logged steps; persistence needs all
        flags["stats_every"] = 1 if args.persist_from is not None else args.log_every
    return flags


def parse_settings(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = [(not 0 <= args.label_noise < 1, "--label-noise must be in [0, 1)"),
                (not 0 < args.val_fraction < 1, "--val-fraction must be in (0, 1)"),
                (args.imbalance < 1, "--imbalance must be >= 1 (largest / smallest class)"),
                (args.width <= 0, "--width must be > 0"),
                (not 0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)")]
    for bad, message in problems:
        if bad:
            parser.error(message)
    try:   # let sam.py judge the flags now rather than after the data is loaded
        probe = SAM([torch.zeros(1, requires_grad=True)], torch.optim.SGD, variant=args.variant, lr=args.lr,
                    **sam_flags(args))
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    if probe.create_graph and args.compile:
        parser.error("--compile cannot run sgdhess: torch.compile has no double backward for its Hessian term")
    if probe.create_graph and args.sync_ascent:
        parser.error("--sync-ascent: sgdhess takes one pass and has no ascent to synchronise")
    if args.rho_min is not None and args.rho_min > probe.param_groups[0]["rho"]:
        parser.error("--rho-min must not exceed --rho")
    return args


def fail(message):
    """Stop without a traceback: bad settings, missing data, a run folder in the way."""
    raise SystemExit(f"train.py: error: {message}")


# ----------------------------------------------------------------------------------------------
# Data: decoded once, held on the device as uint8, augmented there in batch

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
DATA_LAYOUTS = ("--data-dir accepts a torchvision root where CIFAR-10/100 is, or can be downloaded to "
                "(default ./data); an ImageFolder directory with train/<class>/* and test/<class>/*; "
                "or a .tar.gz of that layout, e.g. ../shared/data/cifar10-jpeg.tar.gz")
SPLIT_SEED = 42          # val split, --subset and --imbalance draws: the same for every --seed (origin)
PAD, CUTOUT = 4, 16      # random-crop padding and cutout side, in pixels (origin 4.1)
# CIFAR-10 asymmetric label noise (origin 4.5): each class to its confusable neighbour, by name.
ASYMMETRIC_NOISE = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}


class DataError(Exception):
    """Data that cannot be found or read; reported in one paragraph, never with a traceback."""


def load_images(args):
    """{"train": (images, labels), "test": (...), "classes": names}: uint8 (N, 3, H, W), int64, CPU."""
    source = Path(args.data_dir)
    try:
        if source.is_file() or source.name.endswith(ARCHIVE_SUFFIXES):
            return cached(source, args.cache_dir, read_archive)
        if (source / "train").is_dir():
            return cached(source, args.cache_dir, read_folder)
        return read_torchvision(args.dataset, source)
    except (OSError, RuntimeError, ValueError, tarfile.TarError) as err:
        raise DataError(f"could not load {args.dataset} from --data-dir {args.data_dir} ({err}). "
                        f"{DATA_LAYOUTS}.") from None


def read_torchvision(name, root):
    dataset = getattr(torchvision.datasets, DATASETS[name]["torchvision"])
    splits = {split: dataset(str(root), train=split == "train", download=True) for split in ("train", "test")}
    data = {split: (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
            for split, s in splits.items()}
    return {**data, "classes": splits["train"].classes}


def read_archive(path):
    files = {}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test"):
                files[parts[-3], parts[-2], parts[-1]] = tar.extractfile(member).read()
    return decode(files)


def read_folder(root):
    return decode({(split, f.parent.name, f.name): f.read_bytes()
                   for split in ("train", "test") for f in (root / split).glob("*/*") if f.is_file()})


def decode(files):
    """{(split, class, file): encoded image} -> uint8 tensors; classes sorted by name, as ImageFolder."""
    classes = sorted({c for _, c, _ in files})
    label = {c: i for i, c in enumerate(classes)}
    data = {"classes": classes}
    for split in ("train", "test"):
        keys = sorted(k for k in files if k[0] == split)
        if not keys:
            raise ValueError(f"no images under {split}/<class>/")
        images = np.stack([np.asarray(Image.open(io.BytesIO(files[k])).convert("RGB")) for k in keys])
        data[split] = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                       torch.tensor([label[k[1]] for k in keys]))
    return data


def cached(source, cache_dir, read):
    """Decode `source` once; later runs load <name>.uint8.pt, rebuilt when the source changes."""
    info = source.stat()
    stamp = [info.st_size, info.st_mtime_ns]
    name = next((source.name[:-len(s)] for s in ARCHIVE_SUFFIXES if source.name.endswith(s)), source.name)
    cache = Path(cache_dir) / f"{name}.uint8.pt"
    if cache.exists():
        data = torch.load(cache)
        if data["stamp"] == stamp:
            return data
    data = {**read(source), "stamp": stamp}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(data, cache)
    except OSError as err:   # a read-only data folder: work without the cache
        print(f"note: could not write the cache {cache} ({err})", file=sys.stderr)
    return data


def stratified_split(indices, labels, fraction, generator):
    """(picked, rest): a random `fraction` of every class, so both keep the class proportions."""
    picked, rest = [], []
    for c in labels[indices].unique():
        members = indices[labels[indices] == c]
        members = members[torch.randperm(len(members), generator=generator)]
        k = round(fraction * len(members))
        picked.append(members[:k])
        rest.append(members[k:])
    return torch.cat(picked).sort().values, torch.cat(rest).sort().values


def long_tailed(indices, labels, factor, generator):
    """Keep n_max * factor^(-c / (C - 1)) images of class c: the exponential profile of CIFAR-LT."""
    classes = labels[indices].unique()
    n_max = max(int((labels[indices] == c).sum()) for c in classes)
    keep = []
    for rank, c in enumerate(classes):
        members = indices[labels[indices] == c]
        n = int(n_max * factor ** (-rank / max(len(classes) - 1, 1)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(keep).sort().values


def add_label_noise(labels, rate, kind, classes, generator):
    """Flip exactly floor(rate N) labels (SANER): to a random other class, or by the CIFAR-10 map.
    Returns the noisy labels and which of them differ from the clean ones."""
    n_classes = len(classes)
    chosen = torch.randperm(len(labels), generator=generator)[: int(rate * len(labels))]
    noisy = labels.clone()
    if kind == "sym":
        noisy[chosen] = (labels[chosen] + torch.randint(1, n_classes, (len(chosen),), generator=generator)) % n_classes
    else:
        if not set(ASYMMETRIC_NOISE) <= set(classes):
            raise DataError(f"--noise-type asym needs the CIFAR-10 classes {sorted(ASYMMETRIC_NOISE)}; "
                            f"this data has {classes}")
        target = torch.arange(n_classes)
        for source, dest in ASYMMETRIC_NOISE.items():
            target[classes.index(source)] = classes.index(dest)
        noisy[chosen] = target[labels[chosen]]   # a class without a neighbour stays clean
    return noisy, noisy != labels


def make_splits(args, data):
    """(train, val, test) as (images, labels, flipped) with --imbalance, --subset and --label-noise applied."""
    split_rng = torch.Generator().manual_seed(SPLIT_SEED)
    images, labels = data["train"]
    pool = torch.arange(len(labels))
    if args.imbalance > 1:
        pool = long_tailed(pool, labels, args.imbalance, split_rng)
    if args.subset is not None and args.subset < len(pool):
        pool, _ = stratified_split(pool, labels, args.subset / len(pool), split_rng)
    val, train = stratified_split(pool, labels, args.val_fraction, split_rng)
    train_labels, flipped = labels[train], None
    if args.label_noise > 0:   # the noise pattern follows the run's seed, as in the origin
        noise_rng = torch.Generator().manual_seed(args.seed)
        train_labels, flipped = add_label_noise(train_labels, args.label_noise, args.noise_type,
                                                data["classes"], noise_rng)
    return ((images[train], train_labels, flipped), (images[val], labels[val], None),
            (*data["test"], None))


class DeviceLoader:
    """One split on the device as uint8 NCHW. Training batches are gathered, cropped, flipped, cut out
    and normalised there in a few batched kernels, with random numbers from a device generator."""

    def __init__(self, images, labels, flipped, dataset, device, channels_last):
        self.images, self.labels = images.to(device), labels.to(device)
        self.flipped = flipped.to(device) if flipped is not None else None
        mean, std = (torch.tensor(DATASETS[dataset][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        self.scale, self.shift = (1 / (255 * std)).to(device), (-mean / std).to(device)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.padded = None   # the zero-padded copy that random crops read from, made on first use

    def __len__(self):
        return len(self.labels)

    def normalise(self, images):
        return torch.addcmul(self.shift, images.float(), self.scale).contiguous(memory_format=self.format)

    def train_batch(self, idx, generator, cutout, part=slice(None)):
        """Augmented batch idx[part]. The random numbers are drawn for all of idx, so DDP ranks sharing a
        generator draw alike and each takes its own part."""
        n, (channels, height, width), device = len(idx), self.images.shape[1:], self.images.device
        if self.padded is None:
            self.padded = F.pad(self.images, (PAD,) * 4)
        shift = torch.randint(0, 2 * PAD + 1, (2, n), generator=generator, device=device)
        mirror = torch.rand(n, generator=generator, device=device) < 0.5
        if cutout:
            centre = torch.stack([torch.randint(0, size, (n,), generator=generator, device=device)
                                  for size in (height, width)])
            cut = torch.rand(n, generator=generator, device=device) < 0.5
        idx, shift, mirror = idx[part], shift[:, part], mirror[part]
        rows = shift[0, :, None] + torch.arange(height, device=device)
        columns = torch.arange(width, device=device)
        columns = shift[1, :, None] + torch.where(mirror[:, None], columns.flip(0), columns)   # flip = read backwards
        # one gather of the crop's pixels (as flat positions in the padded image), the same for every channel
        padded = self.padded[idx].flatten(2)
        pixels = (rows[:, :, None] * self.padded.shape[3] + columns[:, None, :]).view(len(idx), 1, -1)
        x = self.normalise(padded.gather(2, pixels.expand(-1, channels, -1)).view(len(idx), channels, height, width))
        if cutout:   # 16x16 zeros after normalisation, clipped at the border, with p=0.5 (origin 4.1)
            (cy, cx), cut = centre[:, part], cut[part]
            row, column = torch.arange(height, device=device), torch.arange(width, device=device)
            in_rows = (row >= cy[:, None] - CUTOUT // 2) & (row < cy[:, None] + CUTOUT // 2)
            in_columns = (column >= cx[:, None] - CUTOUT // 2) & (column < cx[:, None] + CUTOUT // 2)
            x.masked_fill_((in_rows[:, :, None] & in_columns[:, None, :] & cut[:, None, None])[:, None], 0.0)
        return x, self.labels[idx], self.flipped[idx] if self.flipped is not None else None

    def batches(self, batch_size, rank=0, world=1):
        """Plain batches of this rank's contiguous share of the split (evaluation)."""
        share = torch.arange(len(self), device=self.labels.device).tensor_split(world)[rank]
        for idx in share.split(batch_size):
            yield self.normalise(self.images[idx]), self.labels[idx]


# ----------------------------------------------------------------------------------------------
# Models: CIFAR stems (3x3, no max-pool), global average pooling, one linear head

def cifar_resnet(block, blocks, num_classes, width):
    """kuangliu/pytorch-cifar's ResNets with torchvision's BasicBlock/Bottleneck."""
    planes = [max(1, round(64 * width * m)) for m in (1, 2, 4, 8)]
    layers = [nn.Conv2d(3, planes[0], 3, padding=1, bias=False), nn.BatchNorm2d(planes[0]), nn.ReLU(inplace=True)]
    inplanes = planes[0]
    for stage, (p, n) in enumerate(zip(planes, blocks)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            downsample = None
            if stride != 1 or inplanes != p * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(inplanes, p * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(p * block.expansion))
            layers.append(block(inplanes, p, stride, downsample))
            inplanes = p * block.expansion
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes))


class WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3 twice, 1x1 conv shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


def wide_resnet(depth, k, num_classes):
    layers, cin = [nn.Conv2d(3, 16, 3, padding=1, bias=False)], 16
    for stage, cout in enumerate(round(16 * k * m) for m in (1, 2, 4)):
        for i in range((depth - 4) // 6):
            layers.append(WideBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(cin, num_classes))


class PyramidBlock(nn.Module):
    """PyramidNet block (Han et al. 2017): no ReLU at the entry, BN at the exit; the shortcut average-pools
    on a stride and pads the new channels with zeros, so it has no weights."""

    def __init__(self, cin, planes, stride, bottleneck):
        super().__init__()
        self.cout = planes * (4 if bottleneck else 1)
        if bottleneck:
            convs = [nn.Conv2d(cin, planes, 1, bias=False), nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                     nn.Conv2d(planes, self.cout, 1, bias=False)]
        else:
            convs = [nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.Conv2d(planes, planes, 3, 1, 1, bias=False)]
        layers = [nn.BatchNorm2d(cin)]
        for conv in convs:
            layers += [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers[:-1])
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x):
        y = self.body(x)
        shortcut = self.pool(x)
        return y + F.pad(shortcut, (0, 0, 0, 0, 0, y.shape[1] - shortcut.shape[1]))


def pyramidnet(depth, alpha, bottleneck, num_classes):
    """Widths grow by alpha / (number of blocks) per block, from 16 (additive PyramidNet)."""
    n = (depth - 2) // (9 if bottleneck else 6)
    layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)]
    cin = 16
    for block in range(3 * n):
        stride = 2 if block in (n, 2 * n) else 1
        layers.append(PyramidBlock(cin, round(16 + alpha * (block + 1) / (3 * n)), stride, bottleneck))
        cin = layers[-1].cout
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(cin, num_classes))


def vgg16(num_classes, width):
    config = [v if v == "M" else max(1, round(v * width)) for v in VGG_CONFIGS["D"]]
    return nn.Sequential(vgg_layers(config, batch_norm=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(config[-2], num_classes))


def small_cnn(num_classes, width):
    """Three conv-BN-ReLU stages, 24k parameters: CIFAR-10 in seconds on a CPU (tests, smoke runs)."""
    c = [max(1, round(w * width)) for w in (16, 32, 64)]
    layers, cin = [], 3
    for i, cout in enumerate(c):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(1)]
        cin = cout
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin, num_classes))


MODELS = {   # name -> (num_classes, width) -> nn.Module
    "resnet18": lambda c, w: cifar_resnet(BasicBlock, [2, 2, 2, 2], c, w),
    "resnet34": lambda c, w: cifar_resnet(BasicBlock, [3, 4, 6, 3], c, w),
    "resnet50": lambda c, w: cifar_resnet(Bottleneck, [3, 4, 6, 3], c, w),
    "wrn28-10": lambda c, w: wide_resnet(28, 10 * w, c),
    "wrn16-8": lambda c, w: wide_resnet(16, 8 * w, c),
    # PyramidNet-110 (alpha 48, 1.7M parameters, 440 tensors) and the SAM paper's PyramidNet-272 (alpha 200,
    # bottleneck, 26M), both without ShakeDrop
    "pyramidnet110": lambda c, w: pyramidnet(110, 48 * w, False, c),
    "pyramidnet272": lambda c, w: pyramidnet(272, 200 * w, True, c),
    "vgg16": lambda c, w: vgg16(c, w),
    "cnn": lambda c, w: small_cnn(c, w),
}


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

def build_optimizer(args, model, steps_per_epoch, world):
    """SAM around SGD or AdamW. With several ranks the base optimizer averages SAM's direction d over
    them: each rank forms d from its own g and g' (m-sharpness, as google-research/sam), one all-reduce."""
    if args.optimizer == "sgd":
        base, kwargs = torch.optim.SGD, dict(momentum=args.momentum, nesterov=args.nesterov)
    else:
        base, kwargs = torch.optim.AdamW, {}
    if world > 1:
        base = averaging_over_ranks(base)
    flags = sam_flags(args)
    if args.condition_warmup_epochs is not None:
        flags["condition_warmup"] = round(args.condition_warmup_epochs * steps_per_epoch)
    return SAM(model.parameters(), base, variant=args.variant, lr=args.lr, weight_decay=args.weight_decay,
               **kwargs, **flags)


def lr_factor(args, step, total_steps, steps_per_epoch):
    """The schedule as a factor of --lr at a step: warm-up, then cosine / step / multistep / constant."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total_steps - warmup, 1)   # fraction of training after warm-up
    if args.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if args.schedule == "step":
        return 0.2 ** sum(t >= m for m in (0.3, 0.6, 0.8))
    if args.schedule == "multistep":
        return args.gamma ** sum(t >= m for m in args.milestones)
    return 1.0


def set_schedule(opt, args, rho, step, total_steps, steps_per_epoch):
    """lr for this step; with --rho-min, rho follows the lr between rho-min and rho (GSAM)."""
    factor = lr_factor(args, step, total_steps, steps_per_epoch)
    for group in opt.param_groups:
        group["lr"] = args.lr * factor
        if args.rho_min is not None:
            group["rho"] = args.rho_min + (rho - args.rho_min) * factor


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): identical no-ops with one process

def init_distributed(args):
    """(rank, world size, device). torchrun sets WORLD_SIZE; NCCL on GPUs, gloo on CPUs."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, device


def all_reduce_(tensors, average=False):
    """Sum (or average) a list of tensors over ranks in one collective, in place."""
    if not tensors or not dist.is_initialized():
        return
    flat = flatten(tensors)
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    torch._foreach_copy_(tensors, unflatten(flat, tensors))


def averaging_over_ranks(base):
    class Averaged(base):
        def step(self, closure=None):
            all_reduce_([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], average=True)
            return super().step(closure)
    Averaged.__name__ = Averaged.__qualname__ = f"{base.__name__}AveragedOverRanks"
    return Averaged


def sync_buffers(model):
    """Average BN running statistics over ranks (each saw its own shard) and check that the weights agree."""
    if not dist.is_initialized():
        return
    all_reduce_([b for b in model.buffers() if b.is_floating_point()], average=True)
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, checksum) for g in gathered):
        raise RuntimeError("DDP ranks hold different weights: the step is not averaged the same on every rank")


# ----------------------------------------------------------------------------------------------
# Sharpness: Hessian-vector products on a fixed augmented training subset, fp32, eval-mode BN

def sharpness(model, loader, args):
    """{"lambda_max", "trace", "top5_pos_mean"}. lambda_max (power iteration) and trace (Hutchinson) of the
    mean loss over --sharpness-batches batches; top5_pos_mean: the mean of the positive ones among the top-5
    eigenvalues of each batch's Hessian (origin 3, the notes' "sharpness"). Tolerance 1e-3 as PyHessian."""
    device = loader.labels.device
    rng = torch.Generator(device).manual_seed(args.seed)   # own generator: training's RNG stays untouched
    idx = torch.randperm(len(loader), generator=rng, device=device)[: args.sharpness_batches * args.sharpness_batch_size]
    batches = [loader.train_batch(i, rng, args.cutout)[:2] for i in idx.split(args.sharpness_batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        def hvp_on(some):
            return lambda v: hessian_vector_product(model, some, params, v)
        like = flatten([p.detach() for p in params])
        iters = args.sharpness_iters
        top5 = [e for batch in batches for e in top_eigenvalues(hvp_on([batch]), like, 5, rng, iters)]
        positive = [e for e in top5 if e > 0]
        return {"lambda_max": top_eigenvalues(hvp_on(batches), like, 1, rng, iters)[0],
                "trace": hutchinson_trace(hvp_on(batches), like, rng, iters),
                "top5_pos_mean": sum(positive) / len(positive) if positive else math.nan}
    finally:
        model.train(was_training)


def hessian_vector_product(model, batches, params, v):
    """H v for the mean cross-entropy over `batches`, by double backward (v and H v flat)."""
    total = sum(len(y) for _, y in batches)
    vectors = unflatten(v, params)
    hv = torch.zeros_like(v)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) * (len(y) / total)
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
        hv += flatten(torch.autograd.grad(grads, params, grad_outputs=vectors, materialize_grads=True))
    return hv


def top_eigenvalues(hvp, like, k, rng, max_iter, tol=1e-3):
    """The k eigenvalues of largest magnitude, by power iteration with deflation (as PyHessian)."""
    values, vectors = [], []
    for _ in range(k):
        v, value = torch.randn(like.shape, generator=rng, device=like.device, dtype=like.dtype), None
        for _ in range(max_iter):
            for u in vectors:
                v = v - (v @ u) * u
            v = v / (v.norm() + 1e-12)
            hv = hvp(v)
            new = float(hv @ v)
            converged = value is not None and abs(new - value) <= tol * (abs(value) + 1e-6)
            v, value = hv, new
            if converged:
                break
        for u in vectors:
            v = v - (v @ u) * u
        values.append(value)
        vectors.append(v / (v.norm() + 1e-12))
    return values


def hutchinson_trace(hvp, like, rng, max_iter, tol=1e-3):
    """tr H ~ mean of z.Hz over Rademacher z, until the running mean changes by less than tol."""
    total, mean = 0.0, None
    for i in range(1, max_iter + 1):
        z = torch.randint(0, 2, like.shape, generator=rng, device=like.device).to(like.dtype) * 2 - 1
        total += float(hvp(z) @ z)
        converged = mean is not None and abs(total / i - mean) <= tol * (abs(mean) + 1e-6)
        mean = total / i
        if converged:
            break
    return mean


# ----------------------------------------------------------------------------------------------
# Run folder: config, CSV logs flushed row by row, atomic checkpoints. Only rank 0 writes.

STEP_COLUMNS = ["step", "epoch", "lr", "rho", "loss", "acc"] + [k for k in sam.STAT_KEYS if k != "step"]
EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                 "clean_train_acc", "noisy_train_acc", "seconds", "images_per_sec"]
SHARPNESS_COLUMNS = ["epoch", "lambda_max", "trace", "top5_pos_mean"]


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")   # DDP ranks may write the same data cache at once
    torch.save(obj, tmp)
    os.replace(tmp, path)


def default_run_name(args):
    given = {k: v for k, v in sam_flags(args).items() if getattr(args, k) is not None}
    parts = [args.dataset, args.model, args.variant] + [f"{k.replace('_', '-')}{v}" for k, v in given.items()]
    extras = dict(subset=args.subset, noise=args.label_noise or None, imbalance=args.imbalance if args.imbalance > 1 else None)
    parts += [f"{k}{v}" for k, v in extras.items() if v is not None] + [f"e{args.epochs}", f"s{args.seed}"]
    return "runs/" + "-".join(str(p).replace(" ", "") for p in parts)


class CsvLog:
    """A CSV file appended row by row and flushed, so a crash loses no row already written. On resume,
    rows past the checkpoint (key > last) are dropped first, so none is duplicated."""

    def __init__(self, path, columns, key, last=None):
        self.path, self.columns = path, columns
        rows = []
        if last is not None and path.exists():
            rows = [line for line in path.read_text().splitlines()[1:] if float(line.split(",")[columns.index(key)]) <= last]
        tmp = Path(f"{path}.tmp")
        tmp.write_text("\n".join([",".join(columns)] + rows) + "\n")
        os.replace(tmp, path)
        self.file = open(path, "a")

    def write(self, row):
        self.file.write(",".join(format_value(row.get(c)) for c in self.columns) + "\n")
        self.file.flush()


def format_value(value):
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.8g}"


class RunFolder:
    """What the run writes, and the checks that keep it from clobbering another run."""

    def __init__(self, args, writer):
        self.path, self.writer = Path(args.out), writer
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"

    def check(self, args, config):
        """Checks the folder, writing nothing; returns the checkpoint to resume from (None for a fresh run)."""
        exists = (self.path / "config.json").exists()
        finished = (self.path / "final.json").exists()
        if exists and not (args.resume or args.overwrite):
            fail(f"{self.path} already holds a{' finished' if finished else 'n unfinished'} run; pass --resume "
                 f"to continue it or --overwrite to delete it and start again (or choose another --out)")
        if args.resume:
            if not self.last.exists():
                fail(f"--resume: {self.last} does not exist; nothing to resume (drop --resume to start)")
            saved = json.loads((self.path / "config.json").read_text())
            changed = [k for k in config if k not in SESSION_SETTINGS and k in vars(args) and saved.get(k) != config[k]]
            if changed:
                fail("--resume with different settings: " + ", ".join(
                    f"--{k.replace('_', '-')} {config[k]!r} (run: {saved.get(k)!r})" for k in changed))
            return torch.load(self.last, map_location="cpu", weights_only=False)
        return None

    def create(self, config):
        """A fresh run folder (an --overwrite-n old run goes only now, once the data has loaded)."""
        barrier()   # every rank has looked at the folder before rank 0 changes it
        if self.writer:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
            for source in ("train.py", "sam.py"):   # the code of the run, next to its numbers (airbench)
                shutil.copy(Path(__file__).with_name(source), self.path / source)
        barrier()

    def open_logs(self, step=None, epoch=None):
        """Open the CSVs, keeping rows up to the checkpoint's step and epoch on resume."""
        if self.writer:
            self.steps = CsvLog(self.path / "steps.csv", STEP_COLUMNS, "step", step)
            self.epochs = CsvLog(self.path / "epochs.csv", EPOCH_COLUMNS, "epoch", epoch)
            self.sharpness = CsvLog(self.path / "sharpness.csv", SHARPNESS_COLUMNS, "epoch", epoch)

    def log(self, log, row):
        if self.writer:
            getattr(self, log).write(row)

    def save(self, path, obj):
        if self.writer:
            save_atomic(obj, path)

    def finish(self, final):
        if self.writer:
            (self.path / "final.json").write_text(json.dumps(final, indent=1) + "\n")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def run_config(args, argv, device, world):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    launcher = f"torchrun --nproc_per_node {world} " if world > 1 else "python "
    effective = {**sam.FLAGS, **sam.VARIANTS[args.variant], **sam_flags(args)}   # what the optimizer runs with
    return {**vars(args), "sam_flags": effective, "command": launcher + shlex.join(["train.py", *argv]),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": world, "git_commit": commit}


# ----------------------------------------------------------------------------------------------
# Training loop

class Diverged(Exception):
    """A non-finite loss: the run stops; last.pt keeps the last good state."""


def train_step(model, opt, x, y, run):
    """One SAM step on (x, y): pass 1 at w (its BN statistics count), the ascent, pass 2 at w + e.
    Returns [loss sum, correct, n, clean correct, clean n, noisy-label agreement, noisy n] of pass 1."""
    if run.freeze_bn:
        enable_running_stats(model)
    with run.autocast:
        logits = model(x)
    losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=run.label_smoothing)
    single_pass = opt.single_pass
    if run.tail is not None:   # ImbSAM: the head loss is added unperturbed, the tail loss is perturbed
        is_tail = run.tail[y]
        head = losses.masked_fill(is_tail, 0.0).sum() / len(y)
        head.backward(retain_graph=True)
        opt.stash_clean_grad()
        loss = run.tail_weight * losses.masked_fill(~is_tail, 0.0).sum() / len(y)
    else:
        loss = losses.mean()
    loss.backward(create_graph=opt.create_graph)
    if run.refresh_mask:
        opt.update_mask(run.progress)
    if run.sync_ascent and not single_pass:
        all_reduce_([p.grad for p in model.parameters() if p.grad is not None], average=True)
    opt.first_step(zero_grad=True)
    if not single_pass:
        if run.freeze_bn:   # BN normalises with this batch's statistics but leaves the running ones alone
            disable_running_stats(model)
        with run.autocast:
            losses2 = F.cross_entropy(model(x).float(), y, reduction="none", label_smoothing=run.label_smoothing)
        (run.tail_weight * losses2.masked_fill(~is_tail, 0.0).sum() / len(y) if run.tail is not None
         else losses2.mean()).backward()
        opt.second_step(zero_grad=True)
    correct = logits.detach().argmax(1) == y
    flipped = run.flipped if run.flipped is not None else torch.zeros_like(correct)
    parts = (correct, torch.ones_like(correct), correct & ~flipped, ~flipped, correct & flipped, flipped)
    return torch.stack([losses.detach().sum().double()] + [m.sum().double() for m in parts])


def fisher_pass(model, opt, loader, generator, n_samples, run):
    """SSAM-F's empirical Fisher: squared gradients of n single-image losses, BN running stats untouched."""
    if run.freeze_bn:
        disable_running_stats(model)
    idx = torch.randperm(len(loader), generator=generator, device=loader.labels.device)[:n_samples]
    for i in idx.split(1):
        x, y, _ = loader.train_batch(i, generator, run.cutout)
        with run.autocast:
            F.cross_entropy(model(x).float(), y).backward()
        opt.accumulate_fisher()
        opt.zero_grad()


@torch.no_grad()
def evaluate(model, loader, run, batch_size=1000):
    """(loss, accuracy %) over the split, each rank taking a share; NaN for an empty split."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=loader.labels.device)
    for x, y in loader.batches(batch_size, run.rank, run.world):
        with run.autocast:
            logits = model(x).float()
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                               (logits.argmax(1) == y).sum().double(), torch.tensor(len(y), dtype=torch.float64, device=totals.device)])
    model.train()
    all_reduce_([totals])
    loss, correct, n = totals.tolist()
    return (loss / n, 100 * correct / n) if n else (math.nan, math.nan)


def mean_stats(opt):
    """opt.stats (the host sync) averaged over ranks."""
    stats = opt.stats
    values = torch.tensor([stats[k] for k in sam.STAT_KEYS], dtype=torch.float64, device=opt.param_groups[0]["params"][0].device)
    all_reduce_([values], average=True)
    return dict(zip(sam.STAT_KEYS, values.tolist()))


ERASE_LINE = "\x1b[2K\r"   # the in-epoch progress line gives way to the epoch line


def format_seconds(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if math.isfinite(seconds) else "?"


def stop_on_ctrl_c():
    """Ctrl-C asks the loop to stop after the current step and checkpoint; a second Ctrl-C stops at once.
    Returns the flag and a function that restores the previous handler."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return requested, lambda: None

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print("\nCtrl-C: stopping after this step (again to stop at once, without a checkpoint)", flush=True)
    previous = signal.signal(signal.SIGINT, handler)
    return requested, lambda: signal.signal(signal.SIGINT, previous)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_settings(argv)
    rank, world, device = init_distributed(args)
    try:
        return train(args, argv, rank, world, device)
    except DataError as err:
        fail(str(err))
    except Diverged as err:
        raise SystemExit(f"train.py: {err}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, argv, rank, world, device):
    args.out = args.out or default_run_name(args)
    cuda = device.type == "cuda"
    if args.channels_last is None:
        args.channels_last = cuda
    say = print if rank == 0 else (lambda *a, **k: None)
    tty = sys.stdout.isatty()
    folder = RunFolder(args, writer=rank == 0)
    config = run_config(args, argv, device, world)
    checkpoint = folder.check(args, config)
    if checkpoint is not None and (folder.path / "final.json").exists():
        say(f"{folder.path} is finished; nothing to resume")
        return json.loads((folder.path / "final.json").read_text())

    # ---- data (before the run folder is made: a bad --data-dir leaves nothing behind)
    data = load_images(args)
    splits = make_splits(args, data)
    train_set, val_set, test_set = (DeviceLoader(*s, args.dataset, device, args.channels_last) for s in splits)
    per_rank, remainder = divmod(args.batch_size, world)
    steps_per_epoch = len(train_set) // args.batch_size   # drop_last: every step sees a full batch
    if remainder or steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} must be a multiple of the {world} rank(s) and at most the "
             f"{len(train_set)} training images")
    if checkpoint is None:
        folder.create(config)
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    total_steps = args.epochs * steps_per_epoch
    num_classes = len(data["classes"])

    # ---- model and optimizer
    torch.manual_seed(args.seed)
    model = MODELS[args.model](num_classes, args.width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:   # start every rank from rank 0's weights
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    net = torch.compile(model) if args.compile else model   # training and evaluation; HVPs use `model`
    opt = build_optimizer(args, model, steps_per_epoch, world)
    rho = opt.param_groups[0]["rho"]
    train_counts = torch.bincount(splits[0][1], minlength=num_classes)
    run = argparse.Namespace(
        rank=rank, world=world, freeze_bn=args.freeze_bn_stats, label_smoothing=args.label_smoothing,
        autocast=torch.autocast(device.type, torch.bfloat16) if (args.dtype == "bf16" or (args.dtype == "auto" and cuda))
        else nullcontext(), sync_ascent=args.sync_ascent and world > 1, cutout=args.cutout, tail_weight=args.tail_weight,
        tail=(train_counts < args.tail_threshold).to(device) if args.variant == "imbsam" else None,
        refresh_mask=False, progress=0.0, flipped=None)
    if run.tail is not None and not run.tail.any():
        say(f"note: no class has fewer than --tail-threshold {args.tail_threshold} training images; imbsam "
            "perturbs nothing", file=sys.stderr)
    generator = torch.Generator(device).manual_seed(args.seed)   # data order and augmentation, on every rank alike
    if cuda:
        torch.backends.cudnn.benchmark = True

    say(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {args.variant}, "
        f"{len(train_set)}/{len(val_set)}/{len(test_set)} train/val/test images, {steps_per_epoch} steps per epoch, "
        f"{device}{f' x {world}' if world > 1 else ''} -> {folder.path}")

    # ---- state, or where the checkpoint left it
    zeros = torch.zeros(7, dtype=torch.float64, device=device)
    state = dict(epoch=0, pos=0, step=0, perm=None, interval=zeros.clone(), totals=zeros.clone(), seconds=0.0,
                 best_val_acc=-math.inf, best_epoch=0, test_at_best=[math.nan, math.nan], test_last=[math.nan, math.nan])
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if cuda:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        generator.set_state(checkpoint["rng"]["loader"])
        state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in checkpoint["state"].items()}
        say(f"resuming {folder.path} at epoch {state['epoch'] + state['pos'] / steps_per_epoch:.2f}, step {state['step']}")
    folder.open_logs(state["step"] - 1 if checkpoint else None, state["epoch"] if checkpoint else None)

    def snapshot():
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None,
                        "loader": generator.get_state()}}

    stop_requested, restore_ctrl_c = stop_on_ctrl_c()
    session_start, session_steps = time.perf_counter(), 0
    try:
        for epoch in range(state["epoch"], args.epochs):
            if state["pos"] == 0:
                state.update(perm=torch.randperm(len(train_set), generator=generator, device=device), seconds=0.0)
                state["totals"].zero_()
            started = time.perf_counter()
            for i in range(state["pos"], steps_per_epoch):
                step = state["step"]
                set_schedule(opt, args, rho, step, total_steps, steps_per_epoch)
                x, y, run.flipped = train_set.train_batch(
                    state["perm"][i * args.batch_size:(i + 1) * args.batch_size], generator, args.cutout, part)
                run.refresh_mask = opt.sparse and i == 0 and epoch % args.mask_every_epochs == 0
                if run.refresh_mask:
                    run.progress = step / total_steps
                    if opt.flags["mask_mode"] == "fisher":
                        fisher_pass(model, opt, train_set, generator, args.fisher_samples, run)
                totals = train_step(net, opt, x, y, run)
                state["interval"] += totals
                state["totals"] += totals
                state.update(step=step + 1, pos=i + 1)
                session_steps += 1
                logged = step % args.log_every == 0
                if logged:   # the one host sync of the interval
                    interval = state["interval"].clone()
                    all_reduce_([interval])
                    loss_sum, correct, n = interval.tolist()[:3]
                    state["interval"].zero_()
                    if not math.isfinite(loss_sum):
                        raise Diverged(f"the training loss is {loss_sum / n} at step {step}; stopping. "
                                       f"{folder.last} holds the last good state (lower --lr or --rho?)")
                    stats = mean_stats(opt)
                    folder.log("steps", {"step": step, "epoch": round(epoch + (i + 1) / steps_per_epoch, 4),
                                         "lr": opt.param_groups[0]["lr"], "rho": opt.param_groups[0]["rho"],
                                         "loss": loss_sum / n, "acc": 100 * correct / n,
                                         **{k: stats[k] for k in STEP_COLUMNS[6:]}})
                    if tty:
                        elapsed = time.perf_counter() - session_start
                        rate = session_steps * args.batch_size / elapsed
                        eta = (total_steps - step - 1) * args.batch_size / rate
                        say(f"\repoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch}  loss {loss_sum / n:.4f}"
                            f"  {rate:.0f} img/s  ETA {format_seconds(eta)}   ", end="", flush=True)
                stop = state["step"] == args.max_steps
                if world == 1:
                    stop |= stop_requested.is_set()
                elif logged:   # ranks agree on a logged step, so every rank stops at the same one
                    flag = torch.tensor([float(stop_requested.is_set())], device=device)
                    all_reduce_([flag])
                    stop |= flag.item() > 0
                if stop:
                    state["seconds"] += time.perf_counter() - started
                    if not math.isfinite(state["totals"][0].item()):
                        raise Diverged(f"the training loss is not finite at step {step}; {folder.last} keeps the last good state")
                    folder.save(folder.last, snapshot())
                    say(f"{chr(10) if tty else ''}stopped at step {state['step']}; continue with the same command "
                        "and --resume")
                    return None

            # ---- end of epoch: metrics, evaluation, checkpoints
            totals = state["totals"].clone()
            all_reduce_([totals])
            loss_sum, correct, n, clean_correct, clean_n, noisy_agree, noisy_n = totals.tolist()
            state["seconds"] += time.perf_counter() - started
            if not math.isfinite(loss_sum):
                raise Diverged(f"the training loss is {loss_sum / n} in epoch {epoch + 1}; stopping. "
                               f"{folder.last} holds the last good state (lower --lr or --rho?)")
            sync_buffers(model)
            val_loss, val_acc = evaluate(net, val_set, run)
            test_loss, test_acc = evaluate(net, test_set, run)
            noisy = args.label_noise > 0
            folder.log("epochs", {"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": 100 * correct / n,
                                  "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                                  "clean_train_acc": 100 * clean_correct / clean_n if noisy else None,
                                  "noisy_train_acc": 100 * noisy_agree / noisy_n if noisy and noisy_n else None,
                                  "seconds": state["seconds"], "images_per_sec": n / state["seconds"]})
            state.update(epoch=epoch + 1, pos=0, perm=None, test_last=[test_loss, test_acc])
            if val_acc > state["best_val_acc"]:
                state.update(best_val_acc=val_acc, best_epoch=epoch + 1, test_at_best=[test_loss, test_acc])
                folder.save(folder.best, {"model": model.state_dict(), "epoch": epoch + 1, "val_acc": val_acc})
            folder.save(folder.last, snapshot())
            if args.sharpness_every and (epoch + 1) % args.sharpness_every == 0:
                folder.log("sharpness", {"epoch": epoch + 1, **sharpness(model, train_set, args)})
            say(f"{ERASE_LINE if tty else ''}epoch {epoch + 1}/{args.epochs}  train {loss_sum / n:.4f} {100 * correct / n:.2f}%"
                f"  val {val_loss:.4f} {val_acc:.2f}%  test {test_loss:.4f} {test_acc:.2f}%  "
                f"{state['seconds']:.1f}s {n / state['seconds']:.0f} img/s", flush=True)
    except KeyboardInterrupt:
        say(f"\ninterrupted; {folder.last} holds the state at the end of the last epoch or stop")
        raise SystemExit(130) from None
    finally:
        restore_ctrl_c()

    # ---- the end: sharpness of the best-val checkpoint (origin 3), final.json
    result = None
    if args.sharpness:
        barrier()   # rank 0 has written best.pt
        model.load_state_dict(torch.load(folder.best, map_location=device)["model"])
        result = sharpness(model, train_set, args)
    final = {"best_epoch": state["best_epoch"], "best_val_acc": state["best_val_acc"],
             "test_acc_best": state["test_at_best"][1], "test_loss_best": state["test_at_best"][0],
             "test_acc_last": state["test_last"][1], "test_loss_last": state["test_last"][0], "sharpness": result}
    folder.finish(final)
    say(json.dumps(final))
    return final


if __name__ == "__main__":
    main()
