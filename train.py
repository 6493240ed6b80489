"""Train a CIFAR model with SAM or any variant in sam.py, logging the notes' ratio statistics.

    python train.py --variant samme1 --rho 0.1            # ResNet-18, CIFAR-10, 200 epochs (a GPU)
    python train.py --model cnn --subset 5000 --epochs 2 --data-dir ../shared/data/cifar10-jpeg.tar.gz
                                                          # the CPU setting: about a minute
    torchrun --standalone --nproc_per_node 2 train.py ... # data parallel (NCCL on GPUs, gloo on CPUs)

A run is one folder (--out, default runs/<settings>): config.json, steps.csv (every --log-every steps: lr,
rho, loss, accuracy and every key of opt.stats), epochs.csv, sharpness.csv (--sharpness-every), final.json,
last.pt, best.pt and a copy of train.py and sam.py. Kill it at any point and run the same command with
--resume: the CSVs come out as if it had never stopped (bit for bit on a CPU). The file reads in the order a
run happens: settings, data, model, optimizer, distributed helpers, sharpness, run folder, one training step,
and the run itself: set up, one epoch, end of epoch, finish.
"""
import argparse
import ctypes
import fcntl
import glob
import hashlib
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
import warnings
import zlib
from argparse import BooleanOptionalAction
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

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
# Settings: parsed and checked once, never changed afterwards

# Per-channel mean and std of the training images; normalisation happens after augmentation.
DATASETS = {
    "cifar10": dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), torchvision="CIFAR10", classes=10),
    "cifar100": dict(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), torchvision="CIFAR100", classes=100),
}
# sam.FLAGS that get a CLI flag of their own, named after them (--rho, --looksam-k, ...). condition_warmup
# counts steps, so the CLI takes --condition-warmup-epochs instead.
SAM_CLI_FLAGS = [name for name in sam.FLAGS if name != "condition_warmup"]
# Settings that may change when a run is resumed: where things are, how this session stops, and how it runs where
# no number of final.json depends on it (how often it tests: --test-every).
SESSION_SETTINGS = {"resume", "overwrite", "max_steps", "data_dir", "cache_dir", "out", "device", "compile",
                    "keep_freed_memory", "test_every"}
# What the end measures of the best-val checkpoint, apart from training: these may change until a run has measured
# its sharpness, so a finished run that measured none gets it with --resume --sharpness (config.json says so).
END_SETTINGS = {"sharpness", "sharpness_batches", "sharpness_batch_size", "sharpness_iters"}


def checked(kind, low=-math.inf, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite `kind` in [low, high] (an end left out when open), else argparse's message.
    NaN fails every comparison, so it is refused with inf and the out-of-range values."""
    def parse(text):
        value = kind(text)   # "abc" -> argparse's "invalid float value: 'abc'"
        inside = (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
        if not inside or (kind is float and not math.isfinite(value)):
            if high == math.inf:
                raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low}, got {text}")
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low}, {high}"
                                             f"{')' if open_high else ']'}, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in "invalid int value: 'x'"
    return parse


def at_least(minimum, kind=int):
    return checked(kind, minimum)


def bin_scale_entry(text):
    return text if text in ("c", "1/c") else float(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, unless its help says it already (in words, not as None)."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(description="Train a CIFAR model with SAM or one of its variants.",
                                     formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=list(DATASETS))
    data.add_argument("--data-dir", default="./data", help="torchvision root (downloads there), an ImageFolder "
                      "directory with train/<class>/* and test/<class>/*, or a .tar.gz of that layout")
    data.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "data"),
                      help="where a decoded folder/archive is cached as uint8 <name>.uint8.pt (never next to the "
                      "source, which may be shared or read-only)")
    data.add_argument("--subset", type=at_least(1), default=None, help="train on about N images (stratified), "
                      "before the val split")
    data.add_argument("--val-fraction", type=checked(float, 0, 1, open_low=True, open_high=True), default=0.1, help="stratified validation share (45k/5k)")
    data.add_argument("--label-noise", type=checked(float, 0, 1, open_high=True), default=0.0, help="share of training labels flipped")
    data.add_argument("--noise-type", default="sym", choices=["sym", "asym"],
                      help="sym: a random other class; asym: CIFAR-10 truck>automobile, bird>airplane, "
                      "deer>horse, cat<>dog")
    data.add_argument("--imbalance", type=checked(float, 1), default=1.0, help="long-tailed training set: largest / "
                      "smallest class count, exponential profile (100 for CIFAR-LT); 1 keeps it balanced")
    data.add_argument("--cutout", action=BooleanOptionalAction, default=True, help="16x16 cutout, p=0.5")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet18", choices=list(MODELS))
    model.add_argument("--width", type=checked(float, 0, 64, open_low=True), default=1.0, help="channel multiplier (SAN-ER's ResNet-18 "
                       "width k; multiplies WRN's k and PyramidNet's alpha)")
    opt = parser.add_argument_group("optimisation (defaults: origin 4.1)")
    opt.add_argument("--variant", default="sam", choices=sorted(sam.VARIANTS), help="a preset of sam.VARIANTS")
    opt.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="base optimizer")
    opt.add_argument("--lr", type=at_least(0.0, float), default=0.1)
    opt.add_argument("--momentum", type=checked(float, 0, 1, open_high=True), default=0.9, help="sgd only")
    opt.add_argument("--nesterov", action=BooleanOptionalAction, default=False, help="sgd only")
    opt.add_argument("--weight-decay", type=at_least(0.0, float), default=1e-3, help="on every parameter")
    opt.add_argument("--batch-size", type=at_least(1), default=256, help="global, split over DDP ranks")
    opt.add_argument("--epochs", type=at_least(1), default=200)
    opt.add_argument("--schedule", default="cosine", choices=["cosine", "step", "multistep", "constant"],
                     help="per step; step: x0.2 at 30/60/80%% (davda54); multistep: see --milestones")
    opt.add_argument("--milestones", type=checked(float, 0, 1, open_low=True, open_high=True), nargs="+", default=[0.5, 0.75], help="multistep: fractions "
                     "of training")
    opt.add_argument("--gamma", type=checked(float, 0, open_low=True), default=0.1, help="multistep factor")
    opt.add_argument("--warmup-epochs", type=at_least(0.0, float), default=0.0, help="linear lr warm-up")
    opt.add_argument("--label-smoothing", type=checked(float, 0, 1, open_high=True), default=0.0)
    opt.add_argument("--rho-min", type=at_least(0.0, float), default=None, help="GSAM: rho follows the lr "
                     "schedule from rho down to rho-min (default: constant rho)")
    opt.add_argument("--freeze-bn-stats", action=BooleanOptionalAction, default=True, help="BN running stats "
                     "only from each step's first pass (davda54; contested in its issues #17/#30)")
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser):
    """The SAM flags, the system and the output groups of the command line."""
    flags = parser.add_argument_group("SAM flags (default: the variant's preset, else sam.FLAGS)")
    for name in SAM_CLI_FLAGS:
        add_sam_flag(flags, name, sam.FLAGS[name])
    flags.add_argument("--condition-warmup-epochs", type=at_least(0.0, float), default=None,
                       help="c rises linearly from 1 to --condition over these epochs (SANER: 50)")
    flags.add_argument("--tail-threshold", type=at_least(1), default=20, help="imbsam: a class with fewer "
                       "training images is a tail class")
    flags.add_argument("--tail-weight", type=at_least(0.0, float), default=2.0, help="imbsam: tail loss weight (the official "
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
    system.add_argument("--seed", type=checked(int, 0, 2**63 - 1), default=42)
    system.add_argument("--sync-ascent", action=BooleanOptionalAction, default=False, help="DDP: ascend along "
                        "the all-reduced gradient (default: each rank its own, m-sharpness)")
    system.add_argument("--keep-freed-memory", action=BooleanOptionalAction, default=True, help="glibc: keep "
                        "freed buffers in the process instead of page-faulting fresh ones every step (faster CPU runs, "
                        "same numbers)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>-<variant>...)")
    out.add_argument("--log-every", type=at_least(1), default=50, help="steps per steps.csv row (one host sync)")
    out.add_argument("--test-every", type=at_least(1), default=1, help="evaluate the test split every N epochs, "
                     "at each new best validation accuracy and at the last epoch: test_acc_best and test_acc_last come out "
                     "as with a test every epoch, the other epochs log no test (on a CPU the 10k test images can cost "
                     "more than a small subset's SGD epoch)")
    again = out.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    again.add_argument("--overwrite", action="store_true", help="delete the run in --out (the files it wrote, nothing else) and start again")
    out.add_argument("--max-steps", type=at_least(1), default=None, help="stop after this many steps in all, "
                     "checkpointed as Ctrl-C does (resume with --resume); one at the run's last step or past it ends "
                     "the run as without it")
    out.add_argument("--sharpness", action=BooleanOptionalAction, default=False, help="Hessian sharpness of "
                     "the best-val checkpoint at the end")
    out.add_argument("--sharpness-every", type=at_least(1), default=None, help="also every N epochs "
                     "(sharpness.csv)")
    out.add_argument("--sharpness-batches", type=at_least(1), default=40, help="origin 3: top-5 eigenvalues on "
                     "each of these batches; lambda_max and trace on all of them")
    out.add_argument("--sharpness-batch-size", type=at_least(1), default=128)
    out.add_argument("--sharpness-iters", type=at_least(1), default=100, help="most HVPs per eigenvalue and "
                     "Hutchinson probes (PyHessian's 100; power iteration stops at a relative change of 1e-3, Hutchinson at a "
                     "standard error of 1%% of the trace)")




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
    flags.setdefault("stats_every", args.log_every)   # statistics on logged steps (sam.py: off by default)
    return flags


def parse_settings(argv, world=None):
    """The checked settings. Everything is judged here, before a file is touched: a bad argument leaves
    nothing behind. The only defaults filled in are --out and --channels-last; nothing changes them later.
    world: the number of processes (None: not known yet, and --sync-ascent is not judged by it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base, kwargs = base_optimizer(args)
    try:   # let sam.py and the base optimizer judge the flags now (--nesterov --momentum 0), not after the data
        probe = SAM([torch.zeros(1, requires_grad=True)], base, variant=args.variant, lr=args.lr,
                    weight_decay=args.weight_decay, **kwargs, **sam_flags(args))
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    if probe.create_graph and args.compile:
        parser.error("--compile cannot run sgdhess: torch.compile has no double backward for its Hessian term")
    if probe.create_graph and args.sync_ascent:
        parser.error("--sync-ascent: sgdhess takes one pass and has no ascent to synchronise")
    if args.rho_min is not None and args.rho_min > probe.param_groups[0]["rho"]:
        parser.error("--rho-min must not exceed --rho")
    if not args.resume:   # a resumed run keeps its config.json's settings, judged as that run started
        judge_idle_flags(parser, argv, args, world)
    args.out = args.out or default_run_name(args)
    if args.channels_last is None:
        args.channels_last = uses_cuda(args)
    return args


# Flags that do nothing in some settings: (flags, when(args, SAM flags as run, world), why, formatted with a=args and
# f=those flags). world None: not known yet. A flag given on the command line where its training settings never read
# it is refused: a typo (--nesterov with adamw) would else run another experiment than the one asked for, unseen.
DEAD_FLAGS = [
    (("momentum", "nesterov"), lambda a, f, w: a.optimizer != "sgd", "--optimizer {a.optimizer} has none"),
    (("milestones", "gamma"), lambda a, f, w: a.schedule != "multistep",
     "only --schedule multistep reads it (the schedule is {a.schedule})"),
    (("noise_type",), lambda a, f, w: a.label_noise == 0, "no label is flipped (--label-noise 0)"),
    (("sharpness_batches", "sharpness_batch_size", "sharpness_iters"),
     lambda a, f, w: not a.sharpness and a.sharpness_every is None,
     "no sharpness is measured (neither --sharpness nor --sharpness-every)"),
    (("sync_ascent",), lambda a, f, w: w == 1, "one process has no other rank's gradient to average"),
    (("rho_min",), lambda a, f, w: a.schedule == "constant" and a.warmup_epochs == 0,
     "rho follows the lr schedule, constant here (--schedule constant, no --warmup-epochs)"),
]
# The SAM flags a one-pass descent (sgd, sgdhess) reads, or that a rule of their own judges: any other, a new one too,
# is idle there.
ONE_PASS_FLAGS = {"rho", "condition", "descent", "hessian_every", "skip_nonfinite", "stats_every"}
# SAM flags the variant never reads are warned of, not refused: a sweep passes the same flags to every variant (--rho
# to its sgd baseline, --condition to sam).
IDLE_SAM_FLAGS = [
    (("tail_weight",), lambda a, f, w: a.variant != "imbsam", "only --variant imbsam weights a tail loss"),
    (("rho", "rho_min"), lambda a, f, w: f["descent"] == "sgd", "descent 'sgd' steps along g, with no radius"),
    (tuple(name for name in SAM_CLI_FLAGS if name not in ONE_PASS_FLAGS) + ("freeze_bn_stats", "sync_ascent"),
     lambda a, f, w: f["descent"] != "sam",
     "descent {f[descent]!r} takes one pass a step: no ascent, no second pass, no g'"),
    (("hessian_every",), lambda a, f, w: f["descent"] != "hessian",
     "only descent 'hessian' (sgdhess) refreshes a Hessian diagonal"),
    (("condition", "condition_warmup_epochs"), lambda a, f, w: not {"c", "1/c"} & set(f["bin_scale"]),
     "the bin scale {f[bin_scale]} has no 'c' or '1/c' entry (--bin-scale, or a preset with one)"),
    (("asam_eta",), lambda a, f, w: not f["adaptive"], "only adaptive (ASAM: --adaptive, asam) reads it"),
    (("friendly_lambda",), lambda a, f, w: f["friendly_sigma"] == 0,
     "friendly_sigma is 0: no EMA enters the ascent (--friendly-sigma, friendlysam)"),
    (("mask_mode", "drop_rate", "mask_every_epochs", "fisher_samples"), lambda a, f, w: f["sparsity"] == 0,
     "sparsity is 0: there is no mask (--sparsity, ssamf, ssamd)"),
    (("drop_rate",), lambda a, f, w: f["mask_mode"] != "dynamic", "only the dynamic mask (ssamd) drops entries"),
    (("fisher_samples",), lambda a, f, w: f["mask_mode"] != "fisher", "only the Fisher mask (ssamf) takes Fisher passes"),
    (("dual",), lambda a, f, w: f["p"] == 2, "at p 2 the dual and the plain ascent are one"),
    (("looksam_alpha",), lambda a, f, w: f["looksam_k"] == 1,
     "looksam_k is 1: every step is a SAM step (--looksam-k, looksam)"),
]


def judge_idle_flags(parser, argv, args, world):
    """parser.error naming each flag given on the command line that does nothing in these training settings
    (DEAD_FLAGS); a warning on stderr for each that this variant never reads (IDLE_SAM_FLAGS). The first rule's reason."""
    unset, marked = object(), build_parser()   # every default a mark: what the command line sets loses it
    marked.set_defaults(**dict.fromkeys(vars(args), unset))
    given = {k for k, v in vars(marked.parse_args(argv)).items() if v is not unset}
    flags = effective_flags(args)
    said = []
    for rules in (DEAD_FLAGS, IDLE_SAM_FLAGS):
        idle = {}
        for names, when, why in rules:
            for name in names:
                if name in given and name not in idle and when(args, flags, world):
                    idle[name] = why.format(a=args, f=flags)
        said.append("; ".join(f"--{name.replace('_', '-')} does nothing here: {why}" for name, why in idle.items()))
    if said[0]:
        parser.error(said[0])
    if said[1]:
        print(f"train.py: warning: {said[1]} (--variant {args.variant})", file=sys.stderr)


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
    """{"train": (images, labels), "test": (...), "classes": names, "fingerprint": hash of all of it}:
    uint8 (N, 3, H, W), int64, CPU."""
    source = Path(args.data_dir)
    try:
        if source.is_file() and not source.name.endswith(ARCHIVE_SUFFIXES) and not tarfile.is_tarfile(source):
            raise DataError(f"--data-dir {source} is a file, but no tar archive. {DATA_LAYOUTS}.")   # not "damaged"
        if source.is_file() or source.name.endswith(ARCHIVE_SUFFIXES):
            return cached(source, args.cache_dir, read_archive, [source])
        if (source / "train").is_dir():
            return cached(source, args.cache_dir, read_folder, image_files(source))
        return with_fingerprint(read_torchvision(args.dataset, source))
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError, tarfile.TarError) as err:
        raise DataError(f"could not load {args.dataset} from --data-dir {args.data_dir} ({err}). "
                        f"{DATA_LAYOUTS}.") from None


def read_torchvision(name, root):
    dataset = getattr(torchvision.datasets, DATASETS[name]["torchvision"])
    splits = {split: dataset(str(root), train=split == "train", download=True) for split in ("train", "test")}
    data = {split: (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
            for split, s in splits.items()}
    return {**data, "classes": splits["train"].classes}


def wanted(parts):
    """(split, class, file) of an image under train/ or test/; hidden entries (.ipynb_checkpoints, ._x.png)
    are skipped, as torchvision's ImageFolder skips them."""
    return len(parts) >= 3 and parts[-3] in ("train", "test") and not any(p.startswith(".") for p in parts[-2:])


def read_archive(path):
    """Every image of the archive, or a DataError naming it: a damaged or truncated archive is never read
    in part (tarfile stops quietly at a bad header; gzip checks its CRC only at the end of the stream)."""
    files = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and wanted(parts):
                    files[tuple(parts[-3:])] = tar.extractfile(member).read()
            tar.fileobj.seek(tar.offset)   # where tarfile stopped: only the end-of-archive zeros may follow
            while chunk := tar.fileobj.read(1 << 20):
                if chunk.strip(b"\0"):
                    raise tarfile.ReadError(f"unreadable data at byte {tar.offset} of the tar stream")
    except (EOFError, zlib.error, OSError, tarfile.TarError) as err:
        raise DataError(f"{path} is damaged or truncated ({err}); nothing was used or cached. Copy or download "
                        "it again.") from None
    return decode(files, path)


def image_files(root):
    return sorted(f for split in ("train", "test") for f in (root / split).glob("*/*")
                  if f.is_file() and wanted(f.relative_to(root).parts))


def read_folder(root):
    return decode({f.relative_to(root).parts: f.read_bytes() for f in image_files(root)}, root)


def decode(files, source):
    """{(split, class, file): encoded image} -> uint8 tensors; classes sorted by name, as ImageFolder.
    Shows its progress: the first decode of CIFAR-10 takes tens of seconds."""
    classes = sorted({c for split, c, _ in files if split == "train"})
    unseen = sorted({c for split, c, _ in files if split == "test"} - set(classes))
    if classes and unseen:   # a class no training image shows is never predicted: each of its test images is an error
        raise DataError(f"{source}: test/ holds {len(unseen)} class(es) without training images "
                        f"({', '.join(unseen[:3])}{', ...' if len(unseen) > 3 else ''}); train/ and test/ must hold "
                        "class folders of the same names")
    label = {c: i for i, c in enumerate(classes)}
    data, done, started, shown = {"classes": classes}, 0, time.perf_counter(), 0.0
    for split in ("train", "test"):
        keys = sorted(k for k in files if k[0] == split)
        if not keys:
            raise DataError(f"no images under {source}/{split}/<class>/. {DATA_LAYOUTS}.")
        images = []
        for key in keys:
            try:
                images.append(np.asarray(Image.open(io.BytesIO(files[key])).convert("RGB")))
            except (OSError, ValueError) as err:   # PIL's UnidentifiedImageError is an OSError
                raise DataError(f"{source}: {'/'.join(key)} is not a readable image ({err})") from None
            done += 1
            seconds = time.perf_counter() - started
            if seconds - shown > 2 or done == len(files):
                shown = seconds
                print(f"decoding {source.name}: {done:,}/{len(files):,} images, {done / seconds:,.0f}/s",
                      file=sys.stderr, flush=True)
        if len({image.shape for image in images}) > 1:
            raise DataError(f"{source}: the {split} images differ in size; they must all be alike (32x32 for CIFAR)")
        data[split] = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                       torch.tensor([label[k[1]] for k in keys]))
    sizes = ["x".join(map(str, data[split][0].shape[2:])) for split in ("train", "test")]
    if sizes[0] != sizes[1]:   # the model would test at a size it never trained on
        raise DataError(f"{source}: the train images are {sizes[0]} pixels, the test images {sizes[1]}; they must "
                        "all be alike")
    return data


def with_fingerprint(data):
    """A hash of the decoded images, labels and class names: config.json records it, --resume compares it."""
    digest = hashlib.sha256(json.dumps(data["classes"]).encode())
    for split in ("train", "test"):
        for tensor in data[split]:
            digest.update(tensor.contiguous().numpy())
    return {**data, "fingerprint": digest.hexdigest()[:16]}


def cached(source, cache_dir, read, files):
    """Decode `source` once; later runs load <name>.uint8.pt. The cache is keyed on the path, size and
    modification time of every file read, so deleting, adding or replacing an image rebuilds it."""
    stamp = hashlib.sha256(repr([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                                 for f in files]).encode()).hexdigest()
    name = next((source.name[:-len(s)] for s in ARCHIVE_SUFFIXES if source.name.endswith(s)), source.name)
    cache = Path(cache_dir) / f"{name}.uint8.pt"
    if cache.exists():
        try:
            data = torch.load(cache)
            if data.get("stamp") == stamp:
                return data
        except Exception as err:   # a damaged cache is rebuilt, never trusted
            print(f"note: rebuilding the unreadable cache {cache} ({err})", file=sys.stderr)
    data = {**with_fingerprint(read(source)), "stamp": stamp}
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
    return tuple(torch.cat([indices[:0], *x]).sort().values for x in (picked, rest))   # an empty set splits into two


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
    """Flip floor(rate N) chosen labels (SANER): to a random other class, or by the CIFAR-10 map (a chosen label
    of a class without a neighbour stays). Returns the noisy labels and which of them differ from the clean ones."""
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
    if not (len(val) and len(train)):   # the split rounds per class: a tiny subset leaves a class, or all, out
        given = f"--subset {args.subset}" if args.subset is not None else f"the data's {len(labels)} training images"
        fail(f"{given} with --val-fraction {args.val_fraction} leaves {len(train)} training and {len(val)} "
             f"validation images of {len(data['classes'])} classes: take a larger --subset or other data")
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
    for stage, cout in enumerate(max(1, round(16 * k * m)) for m in (1, 2, 4)):   # a tiny --width keeps 1 channel
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
    # PyramidNet-110 (alpha 48, 1.7M parameters, 439 tensors) and the SAM paper's PyramidNet-272 (alpha 200,
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
    base, kwargs = base_optimizer(args)
    optimizer = SAM
    if world > 1:
        base, optimizer = averaging_over_ranks(base), SAMOverRanks
    flags = sam_flags(args)
    if args.condition_warmup_epochs is not None:
        flags["condition_warmup"] = round(args.condition_warmup_epochs * steps_per_epoch)
    opt = optimizer(model.parameters(), base, variant=args.variant, lr=args.lr, weight_decay=args.weight_decay,
                    **kwargs, **flags)
    if opt.create_graph:   # torch warns of a grad -> graph -> param cycle; SAM sets the grads to None each step
        warnings.filterwarnings("ignore", r"Using backward\(\) with create_graph=True", UserWarning)
    return opt


def base_optimizer(args):
    """(class, keyword arguments) of the base optimizer the command line asks for."""
    if args.optimizer == "sgd":
        return torch.optim.SGD, dict(momentum=args.momentum, nesterov=args.nesterov)
    return torch.optim.AdamW, {}


def lr_factor(args, step, total_steps, steps_per_epoch):
    """The schedule as a factor of --lr at a step: warm-up, then cosine / step / multistep / constant."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:   # a fractional warm-up's last step would pass the peak
        return min((step + 1) / warmup, 1.0)
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

def uses_cuda(args):
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def keep_freed_memory():
    """glibc hands freed buffers above a dynamic threshold back to the kernel, so the next step's tensors of the
    same size page-fault afresh; fixing the mmap threshold at its ceiling and never trimming keeps them (a 3-epoch
    CPU run: 40-42 s against 48-59 s, the same numbers; README, Benchmarks). Both or neither: setting either turns
    glibc's dynamic thresholds off and leaves the other at 128 KiB (the trim alone: 98 s). False without glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def init_distributed(args):
    """(rank, world size, device). torchrun sets WORLD_SIZE; NCCL on GPUs, gloo on CPUs."""
    use_cuda = uses_cuda(args)
    if use_cuda and not torch.cuda.is_available():
        fail("--device cuda: torch finds no CUDA device here; use --device cpu (or auto)")
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


class SAMOverRanks(SAM):
    """SAM whose non-finite skip is agreed over ranks: each rank's d may differ until the base step averages it,
    and a rank that skipped alone would leave the others waiting in that average."""

    def _all_finite(self, finite):
        flag = finite.float().view(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


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
    """{"lambda_max", "trace", "trace_se", "top5_pos_mean"}. lambda_max (power iteration, tolerance 1e-3 as
    PyHessian) and trace (Hutchinson, with its standard error) of the mean loss over --sharpness-batches
    batches; top5_pos_mean: the mean of the positive ones among the top-5 eigenvalues of each batch's Hessian
    (origin 3, the notes' "sharpness")."""
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
        lambda_max = top_eigenvalues(hvp_on(batches), like, 1, rng, iters)[0]
        trace, trace_se = hutchinson_trace(hvp_on(batches), like, rng, iters)
        return {"lambda_max": lambda_max, "trace": trace, "trace_se": trace_se,
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


def hutchinson_trace(hvp, like, rng, max_probes, rel_se=1e-2, min_probes=10):
    """(mean, standard error) of z.Hz over Rademacher z, an unbiased estimate of tr H. Stops once the standard
    error is below rel_se of the mean (after min_probes, so the spread itself is estimated), or at max_probes.
    Two consecutive running means agreeing (PyHessian's rule) says little: they move by 1/i of a sample."""
    samples = []
    for _ in range(max_probes):
        z = torch.randint(0, 2, like.shape, generator=rng, device=like.device).to(like.dtype) * 2 - 1
        samples.append(float(hvp(z) @ z))
        n = len(samples)
        mean = sum(samples) / n
        se = float(np.std(samples, ddof=1)) / n ** 0.5 if n > 1 else math.inf
        if n >= min_probes and se <= rel_se * abs(mean):
            break
    return mean, se


# ----------------------------------------------------------------------------------------------
# Run folder: claimed with a lock, config, CSV logs flushed row by row, atomic checkpoints. Only rank 0 writes.

STEP_COLUMNS = ["step", "epoch", "lr", "rho", "loss", "acc"] + [k for k in sam.STAT_KEYS if k != "step"]
EPOCH_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                 "clean_train_acc", "noisy_train_acc", "seconds", "images_per_sec"]
SHARPNESS_COLUMNS = ["epoch", "lambda_max", "trace", "top5_pos_mean", "trace_se"]
LOGS = {"steps": (STEP_COLUMNS, "step"), "epochs": (EPOCH_COLUMNS, "epoch"), "sharpness": (SHARPNESS_COLUMNS, "epoch")}
# Every file a run writes; --overwrite deletes these (and their temporary files) and nothing else.
RUN_FILES = ("config.json", "steps.csv", "epochs.csv", "sharpness.csv", "final.json", "last.pt", "best.pt",
             "train.py", "sam.py")
LOCK = "run.lock"   # held (flock) while a process writes the folder; the kernel lets go when it dies


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")   # DDP ranks may write the same data cache at once
    replace_with(tmp, lambda: torch.save(obj, tmp), path)


def write_json_atomic(obj, path, allow_nan=True):
    """JSON to a temporary file, then rename: a crash leaves the old file or the new one (a measured final.json
    replaces one that holds a finished run's results)."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    replace_with(tmp, lambda: tmp.write_text(json.dumps(obj, indent=1, allow_nan=allow_nan) + "\n"), path)


def null_if_not_finite(obj):
    """final.json's numbers as strict JSON: NaN and inf (a class without test images, the trace's standard error
    of one probe) become null, which jq, JavaScript and other strict parsers read (jq turns Infinity into 1.8e308).
    config.json keeps Infinity: --p inf is a setting, and null there means one left to the preset."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: null_if_not_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_if_not_finite(v) for v in obj]
    return obj


def replace_with(tmp, write, path):
    """write() fills tmp, which then replaces path. A failed write (a full disk, a second Ctrl-C) removes tmp, so no
    partial copy is left to fill the disk further; path stays as it was."""
    try:
        write()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def default_run_name(args):
    given = {k: v for k, v in sam_flags(args).items() if getattr(args, k) is not None}
    parts = [args.dataset, args.model, args.variant] + [f"{k.replace('_', '-')}{v}" for k, v in given.items()]
    extras = dict(subset=args.subset, noise=args.label_noise or None, imbalance=args.imbalance if args.imbalance > 1 else None)
    parts += [f"{k}{v}" for k, v in extras.items() if v is not None] + [f"e{args.epochs}", f"s{args.seed}"]
    return "runs/" + "-".join(str(p).replace(" ", "").replace("/", "over") for p in parts)   # 1/c: one folder


class CsvLog:
    """A CSV file appended row by row and flushed, so a crash loses no row already written. On resume it is
    cut back to the checkpoint: rows past it (key > last) go, and so does everything from the first row that
    is not whole (no newline at its end, a wrong field count, NUL bytes left by a crash), so no row is
    duplicated and none is half-written."""

    def __init__(self, path, columns, key, last=None):
        self.path, self.columns = path, columns
        kept = self.whole_rows(path, columns, key, last) if last is not None else []
        tmp = Path(f"{path}.tmp")
        tmp.write_text("\n".join([",".join(columns)] + kept) + "\n")
        os.replace(tmp, path)
        self.file = open(path, "a")

    def write(self, row):
        self.file.write(",".join(format_value(row.get(c)) for c in self.columns) + "\n")
        self.file.flush()

    @staticmethod
    def whole_rows(path, columns, key, last):
        """The lines a resume keeps: the rows up to key `last`, none from the first that is not whole."""
        kept = []
        for line in path.read_bytes().split(b"\n")[1:-1] if path.exists() else []:   # [-1]: never whole
            text = line.decode("utf-8", "replace")   # bytes that are no UTF-8 read as U+FFFD: not whole
            fields = text.split(",")
            if b"\0" in line or "\ufffd" in text or len(fields) != len(columns) \
                    or not is_number(fields[columns.index(key)]) or float(fields[columns.index(key)]) > last:
                break
            kept.append(text)
        return kept

    @staticmethod
    def header(path):
        """The columns a log was written with ([] for none, or a header cut off with no row after it): another
        train.py's would make every row look cut."""
        if not path.exists():
            return []
        with open(path, "rb") as f:   # text mode would decode the rows after it too
            line = f.readline()
        return line.decode("utf-8", "replace").rstrip("\n").split(",") if line.endswith(b"\n") else []


def is_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def format_value(value):
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.8g}"


class RunFolder:
    """What the run writes, and the checks that keep it from clobbering anything: it writes only into a
    new folder, an empty one or its own run, claims it with a lock, and deletes only files it wrote."""

    def __init__(self, path, writer):
        self.path, self.writer = Path(path), writer
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.made, self.lock, self.logs = [], None, {}

    def claim(self):
        """Rank 0 takes the folder (made if missing) by an exclusive lock: a second run on it is refused."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            fail(f"--out {self.path} is a {'symbolic link' if self.path.is_symlink() else 'file'}, not a folder; "
                 "choose another --out")
        self.made = [p for p in (self.path, *self.path.parents) if not p.exists()]
        made_lock = not (self.path / LOCK).exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / LOCK, "a")
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"another train.py is writing to {self.path} (it holds {LOCK}); wait for it, or choose another --out")
        except OSError as err:
            self.release(unmake=True)
            fail(f"cannot write to --out {self.path}: {err.strerror or err}")
        if made_lock:
            self.made.insert(0, self.path / LOCK)

    def release(self, unmake):
        """Close the logs, let go of the lock; with unmake (the run failed before config.json), remove what claim made."""
        for log in self.logs.values():
            log.file.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        for path in self.made if unmake else []:
            try:
                path.unlink() if path.name == LOCK else path.rmdir()
            except OSError:
                break   # not empty: something else is in it now

    def check(self, args, world):
        """Checks the folder, writing nothing; returns the checkpoint to resume from (None for a fresh run)."""
        run, finished, checkpointed = ((self.path / name).exists() for name in ("config.json", "final.json", "last.pt"))
        if not run:
            others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK) if self.path.is_dir() else []
            if others:
                fail(f"--out {self.path} is not a run folder (no config.json) and holds {len(others)} "
                     f"{'entry' if len(others) == 1 else 'entries'} "
                     f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); train.py writes only into a "
                     "new or empty folder and never deletes what it did not write: choose another --out")
            if args.resume:
                fail(f"--resume: {self.path} holds no run; drop --resume to start one")
            return None
        if args.overwrite:
            return None
        if not checkpointed:
            fail(f"{self.path} holds a run that stopped before its first checkpoint, so there is nothing to resume: "
                 "pass --overwrite (without --resume) to start it again")
        if not args.resume:
            fail(f"{self.path} already holds a{' finished' if finished else 'n unfinished'} run; pass --resume "
                 f"to continue it or --overwrite to delete it and start again (or choose another --out)")
        return self.checkpoint(args, world)

    def checkpoint(self, args, world):
        saved = self.read_json("config.json", "it holds the run's settings: restore it from a copy, or start again "
                               "with --overwrite")
        flags_now, flags_then = json.loads(json.dumps(effective_flags(args))), saved.get("sam_flags", {})
        now = {**vars(args), **{k: flags_now[k] for k in SAM_CLI_FLAGS}}   # a flag left to the preset: its value
        then = {**saved, **{k: flags_then[k] for k in SAM_CLI_FLAGS if k in flags_then}}
        changed = changed_settings(then, now, SESSION_SETTINGS | (END_SETTINGS if self.end_open() else set()))
        if changed:
            fail("--resume with different settings: " + ", ".join(
                f"--{k.replace('_', '-')} {now[k]!r} (run: {then[k]!r})" for k in changed))
        runs_on = saved.get("world_size", world)
        if runs_on != world and self.final() is None:   # a finished run measures its sharpness on any number
            launcher = f"torchrun --nproc_per_node {runs_on}" if runs_on > 1 else "python"
            fail(f"--resume with {world} process{'es' if world > 1 else ''}, but the run trains on {runs_on}: each rank "
                 f"ascends on its own share of the batch (m-sharpness) and resumes its own state, so it continues on "
                 f"{runs_on} only ({launcher} train.py ... --resume)")
        try:
            checkpoint = torch.load(self.last, map_location="cpu", weights_only=False)
            step = checkpoint["state"]["step"]
        except Exception as err:   # empty, truncated or not a checkpoint: train.py writes it atomically
            fail(f"--resume: cannot read {self.last} ({type(err).__name__}: {err}); it was not written whole by "
                 "train.py. Restore it from a copy, or start again with --overwrite")
        if args.sharpness and checkpoint["state"]["best_epoch"] and self.end_open():
            self.best_model("cpu")   # the end measures it: missing or damaged, say so now, before anything is written
        if args.max_steps is not None and args.max_steps <= step:
            fail(f"--max-steps {args.max_steps}: the run is already at step {step}; give a larger one or drop it")
        for name, (columns, _) in LOGS.items():
            if CsvLog.header(self.path / f"{name}.csv") not in ([], columns):
                fail(f"--resume: {self.path / name}.csv has another train.py's columns; resume it with the code it ran "
                     f"with, the copy in its folder: python {self.path / 'train.py'} ... --resume")
        if self.writer:
            warn_of_lost_rows(self.path, args, checkpoint["state"])
        return {**checkpoint, "data_fingerprint": saved.get("data_fingerprint")}

    def create(self, config):
        """A fresh run: config.json and the code. --overwrite deletes the old run's files only now, once the
        data has loaded, and only the files a run writes."""
        barrier()   # every rank has looked at the folder before rank 0 changes it
        if self.writer:
            for name in RUN_FILES:
                for path in (self.path / name, *self.path.glob(f"{glob.escape(name)}.*tmp")):
                    path.unlink(missing_ok=True)
            (self.path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
            for source in ("train.py", "sam.py"):   # the code of the run, next to its numbers (airbench)
                shutil.copy(Path(__file__).with_name(source), self.path / source)
            self.made = []   # the run is here now: nothing of it is removed on a later failure
        barrier()

    def open_logs(self, step=None, epoch=None):
        """Open the CSVs, cut back to the checkpoint's step and epoch on resume."""
        if self.writer:
            self.logs = {name: CsvLog(self.path / f"{name}.csv", columns, key, step if key == "step" else epoch)
                         for name, (columns, key) in LOGS.items()}

    def log(self, log, row):
        if self.writer:
            self.logs[log].write(row)

    def save(self, path, obj):
        if self.writer:
            save_atomic(obj, path)

    def finish(self, final):
        if self.writer:
            write_json_atomic(final, self.path / "final.json", allow_nan=False)

    def final(self):
        """final.json, or None while the run trains."""
        path = self.path / "final.json"
        return self.read_json("final.json", "delete it, and --resume writes it again from last.pt") \
            if path.exists() else None

    def read_json(self, name, remedy):
        """A JSON file of the run; one damaged since train.py wrote it (whole) is named, with the remedy."""
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
            fail(f"--resume: cannot read {path} ({type(err).__name__}: {err}); train.py wrote it whole, so it was "
                 f"damaged since: {remedy}")

    def best_model(self, device):
        """best.pt's weights, which the end's --sharpness measures."""
        try:
            return torch.load(self.best, map_location=device)["model"]
        except Exception as err:   # missing, empty, truncated or not a checkpoint
            fail(f"--sharpness: cannot read {self.best} ({type(err).__name__}: {err}); it holds the best validation "
                 "epoch's weights, which --sharpness measures: restore it from a copy, or resume without --sharpness")

    def end_open(self):
        """True while the end's sharpness may still be measured: the run trains, or finished without it."""
        final = self.final()
        return final is None or final.get("sharpness") is None

    def record_end_settings(self, args, argv, world):
        """A resume that changes END_SETTINGS writes them into config.json, with its command and commit."""
        saved = json.loads((self.path / "config.json").read_text())
        new = {k: getattr(args, k) for k in sorted(END_SETTINGS) if saved.get(k) != getattr(args, k)}
        if new and self.writer:
            write_json_atomic({**saved, **new, "end_settings_command": command_line(argv, world),
                               "end_settings_commit": git_commit()}, self.path / "config.json")


def warn_of_lost_rows(path, args, state):
    """On resume, a log whose whole rows stop before the checkpoint's last row (cut, deleted, or damaged in the
    middle: a power cut can keep a checkpoint and lose the rows flushed before it) goes on with a gap: say so."""
    every = {"steps": args.log_every, "epochs": 1, "sharpness": args.sharpness_every}
    done = {"steps": state["step"] - 1, "epochs": state["epoch"], "sharpness": state["epoch"]}
    for name, (columns, key) in LOGS.items():
        expected = done[name] // every[name] * every[name] if every[name] else -1   # the last row the run logged
        rows = CsvLog.whole_rows(path / f"{name}.csv", columns, key, done[name])
        kept = int(float(rows[-1].split(",")[columns.index(key)])) if rows else None
        if expected >= (1 if key == "epoch" else 0) and kept != expected:
            holds = f"whole rows up to {key} {kept}" if rows else "no whole row"
            print(f"warning: {path / name}.csv holds {holds}, but the checkpoint logged up to {key} {expected}: "
                  "the rows between are lost, and the log goes on after a gap", file=sys.stderr)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def changed_settings(saved, config, ignore=SESSION_SETTINGS):
    """The keys of config that a run's saved config.json holds with another value (--resume, reproduce.py)."""
    return [k for k in config if k not in ignore and k in saved and saved[k] != config[k]]


def command_line(argv, world):
    return (f"torchrun --nproc_per_node {world} " if world > 1 else "python ") + shlex.join(["train.py", *argv])


def git_commit():
    """The commit this train.py is checked out at, or None outside a git clone."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


def effective_flags(args):
    """Every SAM flag as the optimizer runs with it: the preset's, then those given."""
    return {**sam.FLAGS, **sam.VARIANTS[args.variant], **sam_flags(args)}


def run_config(args, argv, device, world, fingerprint):
    return {**vars(args), "sam_flags": effective_flags(args), "command": command_line(argv, world),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": world, "git_commit": git_commit(), "data_fingerprint": fingerprint}


# ----------------------------------------------------------------------------------------------
# One training step

class Diverged(Exception):
    """A non-finite training loss: the run stops; its last checkpoint, if any, keeps the last good state."""


@dataclass(frozen=True)
class StepSettings:
    """What a training step needs besides the model, the optimizer and the batch; fixed for the whole run."""
    freeze_bn: bool = True                       # BN running statistics from each step's first pass only
    autocast_dtype: Optional[torch.dtype] = None   # bf16 autocast, or None: full precision
    device_type: str = "cpu"
    label_smoothing: float = 0.0
    sync_ascent: bool = False                    # DDP: every rank ascends along the all-reduced g
    tail: Optional[torch.Tensor] = None          # ImbSAM: True for each tail class (on the device)
    tail_weight: float = 2.0

    def autocast(self):
        return torch.autocast(self.device_type, self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def perturbed_loss(self, losses, y):
        """The loss SAM climbs and descends on: the mean, or ImbSAM's weighted tail part."""
        if self.tail is None:
            return losses.mean()
        return self.tail_weight * losses.masked_fill(~self.tail[y], 0.0).sum() / len(y)


class Counts(NamedTuple):
    """Sums over first-pass batches. train_step returns float64 device tensors (no host read); the loop
    adds them up as one stacked tensor and reads them back by name with Counts._make(sums.tolist())."""
    loss_sum: Any
    correct: Any
    seen: Any
    clean_correct: Any   # on samples whose label --label-noise left alone
    clean_seen: Any
    noisy_fit: Any       # flipped samples predicted as their flipped label: memorised noise
    noisy_seen: Any


def train_step(model, opt, x, y, settings, flipped=None, mask_progress=None):
    """One SAM step on (x, y): pass 1 at w (its BN statistics count), the ascent, pass 2 at w + e. ImbSAM adds
    the head loss's gradient unperturbed; mask_progress refreshes SSAM's mask first. Returns pass 1's Counts."""
    s = settings
    if s.freeze_bn:
        enable_running_stats(model)
    with s.autocast():
        logits = model(x)
    losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=s.label_smoothing)
    if s.tail is not None:
        (losses.masked_fill(s.tail[y], 0.0).sum() / len(y)).backward(retain_graph=True)
        opt.stash_clean_grad()
    s.perturbed_loss(losses, y).backward(create_graph=opt.create_graph)
    if s.sync_ascent and not opt.single_pass:   # before the mask: SSAM-D's refresh ranks |g|, the all-reduced one
        all_reduce_([p.grad for p in model.parameters() if p.grad is not None], average=True)
    if mask_progress is not None:
        opt.update_mask(mask_progress)
    opt.first_step(zero_grad=True)
    if opt.perturbed:   # not single_pass: a one-pass step has moved the step count on, and with it single_pass
        if s.freeze_bn:   # BN normalises with this batch's statistics but leaves the running ones alone
            disable_running_stats(model)
        with s.autocast():
            perturbed = F.cross_entropy(model(x).float(), y, reduction="none", label_smoothing=s.label_smoothing)
        s.perturbed_loss(perturbed, y).backward()
        opt.second_step(zero_grad=True)
    correct = logits.detach().argmax(1) == y
    flipped = flipped if flipped is not None else torch.zeros_like(correct)
    masks = (correct, torch.ones_like(correct), correct & ~flipped, ~flipped, correct & flipped, flipped)
    return Counts(losses.detach().sum().double(), *(m.sum().double() for m in masks))


def fisher_pass(model, opt, loader, generator, n_samples, settings, cutout):
    """SSAM-F's empirical Fisher: squared gradients of n single-image losses, BN running stats untouched."""
    disable_running_stats(model)   # with --no-freeze-bn-stats too: these passes are no training step's
    idx = torch.randperm(len(loader), generator=generator, device=loader.labels.device)[:n_samples]
    for i in idx.split(1):
        x, y, _ = loader.train_batch(i, generator, cutout)
        with settings.autocast():
            F.cross_entropy(model(x).float(), y).backward()
        opt.accumulate_fisher()
        opt.zero_grad()
    enable_running_stats(model)


@torch.no_grad()
def evaluate(model, loader, settings, rank=0, world=1, batch_size=1000):
    """(loss, accuracy %, accuracy % per class) over the split, each rank taking a share; NaN for an empty split.
    The per-class accuracies give ImbSAM's head and tail classes."""
    model.eval()
    device = loader.labels.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    per_class = None
    for x, y in loader.batches(batch_size, rank, world):
        with settings.autocast():
            logits = model(x).float()
        hit = logits.argmax(1) == y
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit.sum().double(),
                               torch.tensor(len(y), dtype=torch.float64, device=device)])
        counts = torch.stack([torch.bincount(y[hit], minlength=logits.shape[1]),
                              torch.bincount(y, minlength=logits.shape[1])]).double()
        per_class = counts if per_class is None else per_class + counts
    model.train()
    all_reduce_([totals] + ([per_class] if per_class is not None else []))
    loss, correct, n = totals.tolist()
    if not n:
        return math.nan, math.nan, []
    class_acc = [100 * c / s if s else math.nan for c, s in zip(*per_class.tolist())]
    return loss / n, 100 * correct / n, class_acc


def mean_stats(opt):
    """opt.stats (the host sync) averaged over ranks."""
    stats = opt.stats
    values = torch.tensor([stats[k] for k in sam.STAT_KEYS], dtype=torch.float64, device=opt.param_groups[0]["params"][0].device)
    all_reduce_([values], average=True)
    return dict(zip(sam.STAT_KEYS, values.tolist()))


# ----------------------------------------------------------------------------------------------
# The run: set up, one epoch, end of epoch, finish

@dataclass
class Run:
    """What a run holds while it trains. Its settings (args, step) never change; its state does."""
    args: argparse.Namespace
    step_settings: StepSettings
    folder: RunFolder
    device: torch.device
    rank: int
    world: int
    model: nn.Module
    net: nn.Module          # the model, compiled with --compile; HVPs use `model`
    opt: SAM
    rho: float              # --rho or the preset's; with --rho-min the schedule moves the groups' rho below it
    train_set: "DeviceLoader"
    val_set: "DeviceLoader"
    test_set: "DeviceLoader"
    steps_per_epoch: int
    generator: torch.Generator   # data order and augmentation, alike on every rank
    state: dict = field(default_factory=dict)
    session_start: float = field(default_factory=time.perf_counter)
    session_steps: int = 0

    def say(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs)


def set_up(args, argv, folder, rank, world, device):
    """The run folder claimed and checked, the data on the device, the model and the optimizer, at the
    checkpoint's state with --resume. None when the run is finished already."""
    if folder.writer:
        folder.claim()
    barrier()   # rank 0 holds the folder before any rank reads it
    checkpoint = folder.check(args, world)
    if checkpoint is not None and folder.final() is not None and not (args.sharpness and folder.end_open()):
        return None   # finished, and nothing left to measure (a finished run without sharpness resumes to its end)
    data = load_images(args)
    other = {v["classes"]: k for k, v in DATASETS.items() if k != args.dataset}.get(len(data["classes"]))
    if other:   # an ImageFolder of any other class count is the user's own data, normalised as --dataset says
        fail(f"--dataset {args.dataset} has {DATASETS[args.dataset]['classes']} classes, but --data-dir "
             f"{args.data_dir} holds {len(data['classes'])}, as {other} does: pass --dataset {other}")
    splits = make_splits(args, data)
    loaders = [DeviceLoader(*split, args.dataset, device, args.channels_last) for split in splits]
    steps_per_epoch = len(loaders[0]) // args.batch_size   # drop_last: every step sees a full batch
    if args.batch_size % world or steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} must be a multiple of the {world} rank(s) and at most the "
             f"{len(loaders[0])} training images")
    model, net, opt = build_model(args, len(data["classes"]), steps_per_epoch, world, device)
    pools = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())   # each halves the side, rounding down
    if min(data["train"][0].shape[2:]) < 2 ** pools:
        fail(f"--model {args.model} needs images of at least {2 ** pools}x{2 ** pools} pixels (its {pools} max-pools "
             f"would leave nothing of them); --data-dir {args.data_dir} holds "
             f"{'x'.join(map(str, data['train'][0].shape[2:]))}: choose another --model")
    if checkpoint is None:
        folder.create(run_config(args, argv, device, world, data["fingerprint"]))
    elif checkpoint["data_fingerprint"] not in (None, data["fingerprint"]):
        fail(f"--resume: --data-dir {args.data_dir} holds other data than this run trained on (fingerprint "
             f"{data['fingerprint']}, run: {checkpoint['data_fingerprint']}); point --data-dir at the run's data")
    else:
        folder.record_end_settings(args, argv, world)
    cuda = device.type == "cuda"
    tail = tail_mask(loaders[0].labels, args.tail_threshold, len(data["classes"]))
    step_settings = StepSettings(
        freeze_bn=args.freeze_bn_stats, device_type=device.type, label_smoothing=args.label_smoothing,
        autocast_dtype=torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and cuda) else None,
        sync_ascent=args.sync_ascent and world > 1, tail=tail if args.variant == "imbsam" else None,
        tail_weight=args.tail_weight)
    r = Run(args, step_settings, folder, device, rank, world, model, net, opt, opt.param_groups[0]["rho"], *loaders,
            steps_per_epoch, torch.Generator(device).manual_seed(args.seed))
    if step_settings.tail is not None and not step_settings.tail.any():
        r.say(f"note: no class has fewer than --tail-threshold {args.tail_threshold} training images; imbsam "
              "perturbs nothing", file=sys.stderr)
    if cuda:
        torch.backends.cudnn.benchmark = True
    start_state(r, checkpoint)
    r.say(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {args.variant}, "
          f"{len(r.train_set)}/{len(r.val_set)}/{len(r.test_set)} train/val/test images, {steps_per_epoch} steps "
          f"per epoch, {device}{f' x {world}' if world > 1 else ''} -> {folder.path}")
    return r


def build_model(args, num_classes, steps_per_epoch, world, device):
    """(model, what trains and evaluates: the model or its compiled form, optimizer); rank 0's weights."""
    torch.manual_seed(args.seed)
    model = MODELS[args.model](num_classes, args.width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:   # start every rank from rank 0's weights
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    net = torch.compile(model) if args.compile else model
    return model, net, build_optimizer(args, model, steps_per_epoch, world)


def start_state(r, checkpoint):
    """The loop's state: fresh, or the checkpoint's (weights, optimizer, RNGs, counters); CSVs cut to it."""
    zeros = torch.zeros(len(Counts._fields), dtype=torch.float64, device=r.device)
    r.state = dict(epoch=0, pos=0, step=0, perm=None, interval=zeros.clone(), totals=zeros.clone(), seconds=0.0,
                   best_val_acc=-math.inf, best_epoch=0, test_at_best=[math.nan, math.nan, []],
                   test_last=[math.nan, math.nan, []])
    if checkpoint is not None:
        # each rank continues from its own part (rank_parts) over rank 0's; a checkpoint without one (one process,
        # an older train.py) or from another number of ranks (a finished run measured) gives every rank rank 0's
        ranks = checkpoint.get("ranks") or []
        own = ranks[r.rank] if len(ranks) == r.world else {}
        part = lambda key: {**checkpoint[key], **own[key]} if key in own else checkpoint[key]
        r.model.load_state_dict(part("model"))
        # the groups as the schedule left them at the last step taken: its rho (--rho-min) is no changed flag
        set_schedule(r.opt, r.args, r.rho, checkpoint["state"]["step"] - 1, r.args.epochs * r.steps_per_epoch,
                     r.steps_per_epoch)
        r.opt.load_state_dict(part("optimizer"))
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if r.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], r.device)
        r.generator.set_state(checkpoint["rng"]["loader"])
        r.state = {k: v.to(r.device) if torch.is_tensor(v) else v for k, v in part("state").items()}
        r.say(f"resuming {r.folder.path} at epoch {r.state['epoch'] + r.state['pos'] / r.steps_per_epoch:.2f}, "
              f"step {r.state['step']}")
    resumed = checkpoint is not None
    r.folder.open_logs(r.state["step"] - 1 if resumed else None, r.state["epoch"] if resumed else None)


def rank_parts(r):
    """Under torchrun, what each rank holds of its own, by rank, on rank 0 (None elsewhere and with one process).
    Each rank's g and g' are its own (m-sharpness), and so is what it keeps of them: SAM's per-parameter state
    (FriendlySAM's EMA, LookSAM's g_v, SSAM's mask, SGDHESS's diagonal), the ratio statistics, the Counts sums
    not yet summed over ranks, and the BN running statistics of its shard. Keyed as the checkpoint's parts they
    replace on resume; the rest (weights, momentum, counters, RNGs) is alike on every rank."""
    if r.world == 1:
        return None
    opt = r.opt.state_dict()
    own = {"model": {name: b for name, b in r.model.named_buffers() if b.is_floating_point()},
           "optimizer": {"sam": opt["sam"], "ratio_stats": opt["ratio_stats"]},
           "state": {"totals": r.state["totals"], "interval": r.state["interval"]}}
    gathered = [None] * r.world if r.rank == 0 else None
    dist.gather_object(sam._to_device(own, torch.device("cpu")), gathered, dst=0)   # pickled: rank 0 gets copies
    return gathered


def snapshot(r, ranks):
    """The checkpoint: rank 0's state, and with several ranks each rank's own part (rank_parts)."""
    checkpoint = {"model": r.model.state_dict(), "optimizer": r.opt.state_dict(), "state": r.state,
                  "rng": {"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state(r.device) if r.device.type == "cuda" else None,
                          "loader": r.generator.get_state()}}
    return checkpoint if ranks is None else {**checkpoint, "ranks": ranks}


def run_epoch(r, stop_requested):
    """The steps of the current epoch from where the state is. False when the run is to stop before its end."""
    args, state = r.args, r.state
    if state["pos"] == 0:
        state.update(perm=torch.randperm(len(r.train_set), generator=r.generator, device=r.device), seconds=0.0)
        state["totals"].zero_()
    bn_buffers = list(r.model.buffers())
    before = [b.clone() for b in bn_buffers]
    started = time.perf_counter()
    try:
        for i in range(state["pos"], r.steps_per_epoch):
            if bn_buffers:
                torch._foreach_copy_(before, bn_buffers)
            x, y, flipped, mask_progress = next_batch(r, i)
            counts = torch.stack(train_step(r.net, r.opt, x, y, r.step_settings, flipped, mask_progress))
            if bn_buffers and r.opt.last_step_skipped:
                torch._foreach_copy_(bn_buffers, before)   # a skipped step leaves BN's running statistics too
            state["interval"] += counts
            state["totals"] += counts
            step = state["step"]
            state.update(step=step + 1, pos=i + 1)
            r.session_steps += 1
            logged = step % args.log_every == 0
            if logged:
                log_interval(r, step, i)
            if should_stop(r, stop_requested, logged):
                return False
        return True
    finally:
        state["seconds"] += time.perf_counter() - started


def next_batch(r, i):
    """(x, y, flipped, mask_progress) of the epoch's i-th step on this rank; runs SSAM-F's Fisher
    pass when the mask is due."""
    args, opt, step = r.args, r.opt, r.state["step"]
    total_steps = args.epochs * r.steps_per_epoch
    set_schedule(opt, args, r.rho, step, total_steps, r.steps_per_epoch)
    per_rank = args.batch_size // r.world
    idx = r.state["perm"][i * args.batch_size:(i + 1) * args.batch_size]
    x, y, flipped = r.train_set.train_batch(idx, r.generator, args.cutout, slice(r.rank * per_rank, (r.rank + 1) * per_rank))
    mask_progress = None
    if opt.sparse and i == 0 and r.state["epoch"] % args.mask_every_epochs == 0:
        mask_progress = step / total_steps
        if opt.flags["mask_mode"] == "fisher":
            fisher_pass(r.model, opt, r.train_set, r.generator, args.fisher_samples, r.step_settings,
                        args.cutout)
    return x, y, flipped, mask_progress


def read_counts(r, sums, where):
    """Counts summed over ranks and read on the host: the run's one divergence check."""
    sums = sums.clone()
    all_reduce_([sums])
    counts = Counts._make(sums.tolist())
    if not math.isfinite(counts.loss_sum):
        kept = f"{r.folder.last} holds the last good state" if r.folder.last.exists() else "no checkpoint was written"
        raise Diverged(f"the training loss is {counts.loss_sum / counts.seen} {where}; stopping ({kept}; lower --lr "
                       "or --rho?)")
    return counts


def log_interval(r, step, i):
    """A steps.csv row: the interval's loss and accuracy, and the optimizer's statistics (one host sync)."""
    interval = read_counts(r, r.state["interval"], f"at step {step}")
    r.state["interval"].zero_()
    stats, epoch, loss = mean_stats(r.opt), r.state["epoch"], interval.loss_sum / interval.seen
    own = stats["step"] == step   # --stats-every that does not divide --log-every: no statistics of this step, NaN
    r.folder.log("steps", {"step": step, "epoch": round(epoch + (i + 1) / r.steps_per_epoch, 4),
                           "lr": r.opt.param_groups[0]["lr"], "rho": r.opt.param_groups[0]["rho"], "loss": loss,
                           "acc": 100 * interval.correct / interval.seen,
                           **{k: stats[k] if own or k == "skipped" else math.nan for k in STEP_COLUMNS[6:]}})
    if sys.stdout.isatty():
        rate = r.session_steps * r.args.batch_size / (time.perf_counter() - r.session_start)
        eta = (r.args.epochs * r.steps_per_epoch - step - 1) * r.args.batch_size / rate
        r.say(f"\repoch {epoch + 1}/{r.args.epochs} step {i + 1}/{r.steps_per_epoch}  loss {loss:.4f}  "
              f"{rate:.0f} img/s  ETA {format_seconds(eta)}   ", end="", flush=True)


def should_stop(r, stop_requested, logged):
    """--max-steps reached or Ctrl-C; with several ranks they agree on a logged step, so all stop together.
    --max-steps at the run's last step or past it stops nothing: the run ends as it would without it."""
    stop = r.state["step"] == r.args.max_steps and r.args.max_steps < r.args.epochs * r.steps_per_epoch
    if r.world == 1:
        return stop or stop_requested.is_set()
    if logged:
        flag = torch.tensor([float(stop_requested.is_set())], device=r.device)
        all_reduce_([flag])
        if flag.item() > 0:   # a Ctrl-C that reached some ranks only: every rank stops as stopped by it (exit 130)
            stop_requested.set()
        stop |= stop_requested.is_set()
    return stop


def stop_early(r, stop_requested):
    """Checkpoint where the loop stopped. --max-steps returns None; Ctrl-C exits 130 (a stopped run)."""
    read_counts(r, r.state["totals"], f"at step {r.state['step'] - 1}")   # never checkpoint a diverged state
    ranks = rank_parts(r)   # each rank's own BN statistics, resumed as they were, before the mean below
    sync_buffers(r.model)   # the checkpoint's model holds the ranks' mean BN statistics, as at an epoch's end
    r.folder.save(r.folder.last, snapshot(r, ranks))
    why = "Ctrl-C" if stop_requested.is_set() else f"--max-steps {r.args.max_steps}"
    r.say(f"{chr(10) if sys.stdout.isatty() else ''}stopped at step {r.state['step']} ({why}); continue with the "
          "same command and --resume")
    if stop_requested.is_set():
        raise SystemExit(130)
    return None


def end_epoch(r):
    """Evaluate and log the epoch (and its sharpness), then checkpoint, last.pt last of all: a kill anywhere
    here redoes the epoch's end from the previous checkpoint, and the logs come out the same."""
    args, state, epoch = r.args, r.state, r.state["epoch"]
    train = read_counts(r, state["totals"], f"in epoch {epoch + 1}")
    sync_buffers(r.model)
    val_loss, val_acc, _ = evaluate(r.net, r.val_set, r.step_settings, r.rank, r.world)
    best = val_acc > state["best_val_acc"]
    tested = best or (epoch + 1) % args.test_every == 0 or epoch + 1 == args.epochs
    test_loss, test_acc, test_per_class = (evaluate(r.net, r.test_set, r.step_settings, r.rank, r.world) if tested
                                           else (None, None, []))
    noisy = args.label_noise > 0
    r.folder.log("epochs", {
        "epoch": epoch + 1, "train_loss": train.loss_sum / train.seen, "train_acc": 100 * train.correct / train.seen,
        "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
        "clean_train_acc": 100 * train.clean_correct / train.clean_seen if noisy else None,
        "noisy_train_acc": 100 * train.noisy_fit / train.noisy_seen if noisy and train.noisy_seen else None,
        "seconds": state["seconds"], "images_per_sec": train.seen / state["seconds"]})
    if args.sharpness_every and (epoch + 1) % args.sharpness_every == 0:
        r.folder.log("sharpness", {"epoch": epoch + 1, **sharpness(r.model, r.train_set, args)})
    state.update(epoch=epoch + 1, pos=0, perm=None)
    if tested:
        state["test_last"] = [test_loss, test_acc, test_per_class]
    if best:
        state.update(best_val_acc=val_acc, best_epoch=epoch + 1, test_at_best=[test_loss, test_acc, test_per_class])
        r.folder.save(r.folder.best, {"model": r.model.state_dict(), "epoch": epoch + 1, "val_acc": val_acc})
    r.folder.save(r.folder.last, snapshot(r, rank_parts(r)))
    test_shown = f"test {test_loss:.4f} {test_acc:.2f}%" if tested else "test -"
    r.say(f"{ERASE_LINE if sys.stdout.isatty() else ''}epoch {epoch + 1}/{args.epochs}  train "
          f"{train.loss_sum / train.seen:.4f} {100 * train.correct / train.seen:.2f}%  val {val_loss:.4f} "
          f"{val_acc:.2f}%  {test_shown}  {state['seconds']:.1f}s {train.seen / state['seconds']:.0f} img/s", flush=True)


def tail_mask(labels, threshold, n_classes):
    """True for each class with fewer than --tail-threshold training images (ImbSAM's tail; the rest is the head)."""
    return torch.bincount(labels, minlength=n_classes) < threshold


def finish(r):
    """The end: sharpness of the best-val checkpoint (origin 3) and final.json."""
    result = None
    if r.args.sharpness:
        barrier()   # rank 0 has written best.pt
        r.say(f"sharpness of {r.folder.best} ({r.args.sharpness_batches} batches of {r.args.sharpness_batch_size})",
              flush=True)
        r.model.load_state_dict(r.folder.best_model(r.device))
        result = sharpness(r.model, r.train_set, r.args)
    state = r.state
    final = {"best_epoch": state["best_epoch"], "best_val_acc": state["best_val_acc"],
             "test_acc_best": state["test_at_best"][1], "test_loss_best": state["test_at_best"][0],
             "test_acc_last": state["test_last"][1], "test_loss_last": state["test_last"][0], "sharpness": result,
             "test_acc_per_class_best": state["test_at_best"][2], "test_acc_per_class_last": state["test_last"][2],
             "tail_classes": tail_mask(r.train_set.labels, r.args.tail_threshold,
                                       len(state["test_last"][2])).nonzero().flatten().tolist()}
    final = null_if_not_finite(final)   # returned as written: a resume of the finished run returns the file
    r.folder.finish(final)
    r.say(json.dumps(final))
    return final


ERASE_LINE = "\x1b[2K\r"   # the in-epoch progress line gives way to the epoch line


def format_seconds(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if math.isfinite(seconds) else "?"


@contextmanager
def ctrl_c_stops_the_run():
    """Ctrl-C asks the loop to stop after the current step and checkpoint; a second Ctrl-C stops at once.
    Yields the request flag; the previous handler is back afterwards."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print("\nCtrl-C: stopping after this step (again to stop at once, without a checkpoint)", flush=True)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_settings(argv, int(os.environ.get("WORLD_SIZE", "1")))   # torchrun's, as init_distributed reads it
    if args.keep_freed_memory:
        keep_freed_memory()
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
    """The run from start to end. A run that fails before its config.json is written leaves nothing behind."""
    folder = RunFolder(args.out, writer=rank == 0)
    try:
        r = set_up(args, argv, folder, rank, world, device)
        if r is None:
            if rank == 0:
                print(f"{folder.path} is finished; nothing to resume")
            return json.loads((folder.path / "final.json").read_text())
        with ctrl_c_stops_the_run() as stop_requested:
            while r.state["epoch"] < args.epochs:
                if not run_epoch(r, stop_requested):
                    return stop_early(r, stop_requested)
                end_epoch(r)
        return finish(r)
    except KeyboardInterrupt:
        kept = f"{folder.last} holds the last checkpoint" if folder.last.exists() else "no checkpoint was written"
        print(f"\ninterrupted at once; {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        folder.release(unmake=True)


if __name__ == "__main__":
    main()
