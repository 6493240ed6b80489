"""Re-run every row of the README's Results (issue 9): choose the setting, then test each claim of the notes.

    python reproduce.py select --jobs 12 --device cuda --data-dir PATH   # candidates x {sgd, sam} x 3-5 seeds, then choose (once)
    python reproduce.py claims --jobs 12 --device cuda --data-dir PATH --deadline 500
    python reproduce.py claims --dry-run                                   # every command, nothing run
    python reproduce.py pack results.tar.gz                                # the small files of results/, to commit
    python plots.py results/ --out figures/                                # the tables and figures

Each run is results/<group>/<label>-s<seed>/, a train.py run folder. Runs whose final.json exists are
skipped (or resumed to measure the sharpness their row now asks for, on their best-val checkpoint), runs
that diverged (diverged.txt) are counted as diverged and never run again, runs with a last.pt are resumed,
runs with a config.json but no last.pt are started again, so the same command continues where a stopped call
left off. A finished or cut folder made with other settings than its row's command (a new setting, an edited
row) is reported as stale and left alone. Groups run in priority order.
"""
import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SEEDS = (0, 1, 2)
DATA_DIR = "../shared/data/cifar10-jpeg.tar.gz"   # the real CIFAR-10 beside the repo (--data-dir)
RHO = "0.1"            # SAM's radius in every comparison unless a row says otherwise (seed 002, the README's CPU runs)
RESNET18_EPOCHS = 8   # what one ~10-minute call on an H100 holds next to the other jobs
PERSIST_FROM = 100     # the early step whose checkpoint-1 set claim 2 follows (seed 000 used step 172)
# the notes' hyper-parameters (origin 4.1, issue 9); no cutout, so that SGD can fit its training set in the budget
COMMON = ["--batch-size", "256", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-3",
          "--schedule", "cosine", "--no-cutout", "--log-every", "25"]
CANDIDATES = {   # model, subset, epochs: 0.2-0.3 M training images per pass each
    "resnet18-w0.5-n10k-e20": ["--model", "resnet18", "--width", "0.5", "--subset", "10000", "--epochs", "20"],
    "resnet18-w0.5-n20k-e15": ["--model", "resnet18", "--width", "0.5", "--subset", "20000", "--epochs", "15"],
    "resnet18-w0.25-n10k-e30": ["--model", "resnet18", "--width", "0.25", "--subset", "10000", "--epochs", "30"],
    "cnn-w4-n20k-e15": ["--model", "cnn", "--width", "4", "--subset", "20000", "--epochs", "15"],
    # fewer images, more epochs: none of the four above lets SGD fit its training set (78-86%), the regime of
    # the notes' gains; added after the first selection (n2500 finished on the CPU after the claims ran, n5k not run)
    "resnet18-w0.25-n2500-e100": ["--model", "resnet18", "--width", "0.25", "--subset", "2500", "--epochs", "100"],
    "resnet18-w0.5-n5k-e50": ["--model", "resnet18", "--width", "0.5", "--subset", "5000", "--epochs", "50"],
}
FITS_NAME = "resnet18-w0.25-n2500-e100"   # the candidate where SGD fits its training set (99.7%)
FITS = CANDIDATES[FITS_NAME]
# more seeds where the rule's choice left SAM's lead over SGD within the spread of three; the rule reads a
# candidate once its SEEDS are finished, then every seed it has
SELECT_SEEDS = {FITS_NAME: SEEDS + (3, 4)}
RULE = ("among candidates whose SGD final train accuracy is within 2 points of the best candidate's, the one with "
        "the largest mean SAM - SGD validation accuracy (best epoch, over every finished seed, 3 at least)")
FIT_MARGIN = 2.0
SHARP = ["--sharpness", "--sharpness-batches", "4", "--sharpness-iters", "20"]   # cheap: only for sharpness claims
# the cost of one training image relative to SGD's (for the estimate the dry run prints)
PASSES = {"sgd": 1, "sgdhess": 3, "sgdhess-exact": 3, "looksam": 1.1, "imbsam": 2.5}
# what a run folder's config.json records of the machine and the launch, not of the experiment
MACHINE_SETTINGS = {"channels_last", "command", "torch", "world_size", "git_commit", "data_fingerprint"}

GEOMETRY_CHECKS = (   # claims 1-3 against the notes' numbers (seeds 000, 002)
    ("ckpt1_min", ">", 60.0, "B1 above 60% throughout"),
    ("ckpt2_early", "~", 40.0, "B2 about 40% early"), ("ckpt2_late", "~", 20.0, "B2 about 20% late"),
    ("ckpt3_early", "~", 3.0, "B3 about 3% early"), ("ckpt3_late", "~", 10.0, "B3 about 10% late"),
    ("ckpt4_early", "~", 3.0, "B4 about 3% early"), ("ckpt4_late", "~", 6.0, "B4 about 6% late"),
    ("fine_up", ">", 0.0, "fine r > 2 bins move up late"),
    ("overlap_late", "~", 67.0, "overlap stays near 4e6 of 6e6 (~67%)"),
    ("running_5", "<", 2.0, "running intersection 1e5 of 6e6 (<2%) after 5 steps"),
    # not in the notes: what persistence means needs its chance level, B1 drawn afresh each step with its share
    ("overlap_over_chance", ">", 0.0, "(implied) the t0 set persists beyond chance"),
    ("running_5_over_chance", ">", 0.0, "(implied) the running intersection outlasts chance"),
    ("mag_up_early", ">", 50.0, "mag_up above 50% early"), ("mag_up_late", "~", 85.0, "rising to about 85%"))

Row = namedtuple("Row", "label variant flags seeds expect", defaults=((), SEEDS, ()))
# expect: (metric, op, reference, the notes' words); op '>' '<' '~'; reference a number or 'group/label'
Group = namedtuple("Group", "name claim rows")


def value(args, flag, default=None):
    """The value train.py sees for flag in a list of arguments (the last one wins)."""
    where = [i for i, a in enumerate(args) if a == flag]
    return args[where[-1] + 1] if where else default


def last_wins(args):
    """args with each option once, at its first place, holding its last value, as train.py's argparse reads them:
    the setting's --subset 10000 and a row's --subset 2500 read --subset 2500; --cutout and --no-cutout are one option."""
    options, current = {}, None   # option name (no dashes, no "no-") or a leading word's position -> its tokens
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            current = arg[2:].removeprefix("no-")
            options[current] = [arg]   # a repeat keeps the first place and takes the new value
        elif current is None:
            options[i] = [arg]         # "python train.py"
        else:
            options[current].append(arg)
    return [token for tokens in options.values() for token in tokens]


SAMCKPT_CLAIMS = {   # claim 4, the notes' words: accuracy, then flatness, against SAM
    "samckpt1": ("~", "keeps SAM's accuracy", "~", "keeps SAM's flatness"),
    "samckpt2": ("<", "below SAM", ">", "sharper than SAM"),
    "samckpt3": ("<", "below SAM", ">", "sharper than SAM"),
    "samckpt4": ("<", "below SAM", ">", "sharper than SAM"),
    "samckpt12": (">", "at or above SAM", "~", "as flat as SAM"),
    "samckpt13": (">", "at or above SAM", "~", "as flat as SAM"),
    "samckpt123": (">", "at or above SAM", "~", "as flat as SAM"),
}


def claims(setting):
    """The groups of issue 9, in priority order, for the chosen setting (a list of train.py arguments)."""
    import sam   # the peers' preset radii
    epochs = int(value(setting, "--epochs"))
    rho = ["--rho", RHO]
    sam_ref = "core/sam"
    fits_sam = f"select/{FITS_NAME}/sam"   # the selection's SAM runs where SGD fits (plots.py reads them as a row)
    fits_sharp = "geometry/sam-n2500"   # those five seeds, trained again to the same weights, with their sharpness
    sam_at = {"0.01": "seed004/sam-rho0.01", "0.05": "seed004/sam-rho0.05", RHO: sam_ref,   # SAM's rows, by radius
              "0.5": "seed004/sam-rho0.5"}
    fits_sam_at = {"0.05": "seed004/sam-rho0.05-n2500", RHO: fits_sam,   # the same where SGD fits
                   "0.5": "seed004/sam-rho0.5-n2500"}

    def preset_rho(variant):
        return str(sam.VARIANTS[variant].get("rho", sam.FLAGS["rho"]))
    acc = "test_acc"

    def samckpt_expect(variant, acc_ref, sharp_ref):
        acc_op, acc_words, sharp_op, sharp_words = SAMCKPT_CLAIMS[variant]
        return (acc, acc_op, acc_ref, acc_words), ("lambda_max", sharp_op, sharp_ref, sharp_words)

    def samme1_expect(ref, sharp_ref=None):   # claim 5: c > 1 on B1 flatter than SAM, with higher late accuracy
        flatter = (("lambda_max", "<", sharp_ref, "flatter than SAM"),) if sharp_ref else ()
        return flatter + (("train_acc", ">", ref, "higher late train acc"), (acc, ">", ref, "higher late val acc"))

    def sgdhess_expect(ref, words):   # claim 6: (1 + rho_H|Hz|) g less accurate and flatter than its reference
        return (acc, "<", ref, f"less accurate {words}"), ("lambda_max", "<", ref, f"flatter {words}")

    def rho1_rows(suffix, extra, ref):   # claim 4 at a large radius: SAM collapses, the masked rows beat it
        return [Row(f"sam-rho1{suffix}", "sam", ["--rho", "1.0"] + extra,
                    expect=((acc, "<", ref, "SAM collapses at a large rho"),)),
                *[Row(f"{v}-rho1{suffix}", v, ["--rho", "1.0"] + extra,
                      expect=((acc, ">", f"samckpt/sam-rho1{suffix}", "beats SAM at rho 1"),))
                  for v in ("samckpt1", "samckpt12", "samckpt123")]]

    def samme2_rows(suffix, extra, ref, fourth_seed=()):   # claim 5: c < 1 on B2 gave a best row, c 2 ended above SAM
        return [Row(f"samme2-c{c}{suffix}", "samme2", rho + ["--condition", c] + extra,
                    seeds=SEEDS + (3,) if c in fourth_seed else SEEDS,
                    expect=((acc, ">", ref, "c 0.3-0.5: a best row" if c != "2" else "above SAM late"),))
                for c in ("0.3", "0.5", "2")]

    def looksam_walltime_row(suffix, extra, sam_epochs, sam_by_rho):   # claim 9: LookSAM in SAM's gradient passes,
        # 2 an image for SAM against ~1.1, so 2/1.1 x SAM's epochs, judged against SAM at LookSAM's radius
        return Row(f"looksam-walltime{suffix}", "looksam",
                   extra + ["--epochs", str(round(int(sam_epochs) * 2 / PASSES["looksam"]))],
                   expect=((acc, ">", sam_by_rho[preset_rho("looksam")], "at SAM's wall time (~2/1.1 x the epochs)"),))

    def long_tailed_rows(suffix, extra):   # claim 9: SGD, SAM and ImbSAM on long-tailed CIFAR-10
        sam_row, imbsam_row = f"peers/lt-sam{suffix}", f"peers/lt-imbsam{suffix}"
        return [Row(f"lt-sgd{suffix}", "sgd", extra),
                Row(f"lt-sam{suffix}", "sam", rho + extra),
                Row(f"lt-imbsam{suffix}", "imbsam", rho + extra, expect=(
                    ("tail_acc", ">", sam_row, "ImbSAM: the tail classes above SAM"),
                    ("head_acc", "~", sam_row, "the head classes about as SAM"))),
                # ImbSAM at rho 0 is its loss alone (head + 2 x tail, at w): what the tail owes to the weight, not to e
                Row(f"lt-imbsam-rho0{suffix}", "imbsam", ["--rho", "0"] + extra, expect=(
                    ("tail_acc", "<", imbsam_row, "the perturbation, not the 2x tail weight, lifts the tail"),
                    ("head_acc", "~", imbsam_row, "the perturbation leaves the head classes as they are")))]

    def samme3_rows(suffix, extra):   # claim 5: c 0.1 on B3 at a larger rho, against SAM at that rho; four seeds each,
        # as with three in the chosen setting the gap equalled the combined std (2.53 and 2.53)
        return [Row(f"sam-rho0.2{suffix}", "sam", ["--rho", "0.2"] + extra, seeds=SEEDS + (3,)),
                Row(f"samme3-c0.1-rho0.2{suffix}", "samme3", ["--rho", "0.2", "--condition", "0.1"] + extra,
                    seeds=SEEDS + (3,), expect=((acc, ">", f"same/sam-rho0.2{suffix}", "a best row (c 0.1 at a larger rho)"),))]
    cpu, same_result = ["--device", "cpu"], "the device does not change the result"
    every_step = rho + ["--persist-from", str(PERSIST_FROM), "--log-every", "1"]   # claims 1-3: statistics every step
    # where SGD fits, testing at every 10th epoch and each new best only: the same final.json in less CPU time
    fits_every10 = ["--test-every", "10"] + FITS
    resnet18 = ["--model", "resnet18", "--width", "1", "--subset", "100000", "--epochs", str(RESNET18_EPOCHS)] + SHARP
    # imbalance 10 on the whole training set (~18k images, 4500 down to 450 per class); classes 5-9 are tail
    long_tailed = ["--imbalance", "10", "--subset", "100000", "--tail-threshold", "1500"]
    cnn = ["--model", "cnn", "--width", "4"]   # claim 7's second architecture
    return [
        Group("resnet18", f"GPU: ResNet-18 on all of CIFAR-10 at the notes' hyper-parameters, {RESNET18_EPOCHS} epochs", [
            Row(v, v, resnet18 + (rho if v != "sgd" else []), seeds=(0,)) for v in ("sgd", "sam", "samckpt1", "samme1")]),
        Group("core", "0. The setting: SAM against SGD (the notes: SAM gains 1-2 points where the model fits)", [
            Row("sgd", "sgd", SHARP, expect=(("train_acc", ">", 99.0, "fits its training set"),)),
            Row("sam", "sam", rho + SHARP, expect=((acc, ">", "core/sgd", "SAM above SGD by 1-2 points"),
                                                   ("lambda_max", "<", "core/sgd", "flatter than SGD"))),
            # SGD's sharpness where it fits its training set (the selection's SGD runs measured none), run after the claims;
            # the selection's five seeds, as SGD's lambda_max spread (147 +- 62 over three) left "sharper than SAM" open
            Row("sgd-n2500", "sgd", SHARP + FITS, seeds=SELECT_SEEDS[FITS_NAME],
                expect=(("train_acc", ">", 99.0, "fits its training set"), ("lambda_max", ">", fits_sharp, "sharper than SAM"))),
        ]),
        Group("geometry", "1-3. Checkpoint shares, persistence and mag_up under SAM (seeds 000, 002)", [
            Row("sam", "sam", every_step, expect=GEOMETRY_CHECKS),
            # the same checks where SGD fits its training set (the selection's candidate with 99.7% SGD train accuracy),
            # run after the claims; the same command as the row above when that candidate is the setting; the
            # selection's five seeds, as SGD's sharpness has (seeds 3 and 4 run last)
            Row("sam-n2500", "sam", every_step + SHARP + FITS, seeds=SELECT_SEEDS[FITS_NAME], expect=GEOMETRY_CHECKS),
        ]),
        Group("samckpt", "4. SAMCKPT: SAM's gradient on some checkpoints only (seed 000, Exp. 1)", [
            *[Row(v, v, rho + SHARP, expect=samckpt_expect(v, sam_ref, sam_ref)) for v in SAMCKPT_CLAIMS],
            # where SGD fits its training set (run on the CPU after the claims, samckpt1's sharpness measured later from
            # best.pt): accuracy against the selection's SAM runs there (5 seeds, no sharpness), which plots.py reads
            # as the row select/<candidate>/sam; sharpness against geometry/sam-n2500
            Row("samckpt1-n2500", "samckpt1", rho + SHARP + FITS, expect=samckpt_expect("samckpt1", fits_sam, fits_sharp)),
            *[Row(f"{v}-n2500", v, rho + SHARP + fits_every10, expect=samckpt_expect(v, fits_sam, fits_sharp))
              for v in ("samckpt2", "samckpt3", "samckpt4", "samckpt12", "samckpt13", "samckpt123")],
            *rho1_rows("", SHARP, sam_ref),
            *rho1_rows("-n2500", fits_every10, fits_sam),   # the same where SGD fits (run after the claims, accuracy only)
        ]),
        Group("same", "5. SAME: one checkpoint's gradient scaled by c (seed 001)", [
            *[Row(f"samme1-c{c}", "samme1", rho + ["--condition", c] + SHARP, expect=samme1_expect(sam_ref, sam_ref))
              for c in ("1.5", "2", "3")],
            *samme2_rows("", SHARP, sam_ref),
            *samme3_rows("", SHARP),
            Row("customsame", "customsame", rho + SHARP, expect=((acc, ">", sam_ref, "built to beat SAM"),)),
            Row("samme1-c2-n2500", "samme1", rho + ["--condition", "2"] + SHARP + FITS,   # see samckpt1-n2500
                expect=samme1_expect(fits_sam, fits_sharp)),
            *[Row(f"samme1-c{c}-n2500", "samme1", rho + ["--condition", c] + fits_every10,   # the c sweep, accuracy only
                  expect=samme1_expect(fits_sam)) for c in ("1.5", "3")],
            # c 0.5 a fourth seed, as three left its gap to SAM level with the combined std (2.73 and 2.70)
            *samme2_rows("-n2500", fits_every10, fits_sam, fourth_seed=("0.5",)),
            *samme3_rows("-n2500", fits_every10),   # the same where SGD fits (run after the claims)
            Row("customsame-n2500", "customsame", rho + fits_every10, expect=((acc, ">", fits_sam, "built to beat SAM"),)),
        ]),
        Group("direction", "6. Magnitude vs direction, SGDHESS (seed 002)", [
            Row("sammagnitude", "sammagnitude", rho + SHARP, expect=((acc, "~", sam_ref, "about equal to SAM"),)),
            Row("samdirection", "samdirection", rho + SHARP, expect=(
                (acc, "<", sam_ref, "below SAM and sammagnitude"),
                ("top5_pos_mean", ">", sam_ref, "far sharper: top-5 mean 259 vs SAM's 71"))),
            # where SGD fits its training set (see samckpt1-n2500)
            Row("sammagnitude-n2500", "sammagnitude", rho + SHARP + FITS, expect=((acc, "~", fits_sam, "about equal to SAM"),)),
            Row("samdirection-n2500", "samdirection", rho + SHARP + FITS, expect=(
                (acc, "<", fits_sam, "below SAM"), (acc, "<", "direction/sammagnitude-n2500", "below sammagnitude"),
                ("top5_pos_mean", ">", fits_sharp, "far sharper: top-5 mean 259 vs SAM's 71"))),
            *[Row(f"{v}-rhoH{r}", v, ["--rho", r] + SHARP, expect=sgdhess_expect(ref, "as rho_H grows"))
              for v in ("sgdhess", "sgdhess-exact")
              for r, ref in (("0.05", "core/sgd"), ("1", f"direction/{v}-rhoH0.05"), ("2", f"direction/{v}-rhoH1"))],
            # where SGD fits (run after the claims, on the CPU, rho_H 1 first, where the chosen setting first lost
            # accuracy): rho_H 0.05 and 1 against SGD (rho_H 0), rho_H 2 against rho_H 1; the exact form at rho_H 1,
            # where it fell to ~14% in the chosen setting (the setting or the form?), then at rho_H 0.05
            *[Row(f"{v}-rhoH{r}-n2500", v, ["--rho", r] + SHARP + fits_every10, expect=sgdhess_expect(ref, words),
                  seeds=SEEDS + (3,) if (v, r) == ("sgdhess-exact", "0.05") else SEEDS)   # 3 seeds left it at the edge
              for v, r, ref, words in (("sgdhess", "0.05", "core/sgd-n2500", "than SGD"),
                                       ("sgdhess", "1", "core/sgd-n2500", "than SGD"),
                                       ("sgdhess", "2", "direction/sgdhess-rhoH1-n2500", "than rho_H 1"),
                                       ("sgdhess-exact", "1", "core/sgd-n2500", "than SGD"),
                                       ("sgdhess-exact", "0.05", "core/sgd-n2500", "than SGD"),
                                       ("sgdhess-exact", "2", "direction/sgdhess-exact-rhoH1-n2500", "than rho_H 1"))],
        ]),
        Group("seed004", "7. Seed 004: rho sweep, L2 vs L-inf, ASAM on two architectures, USAM", [
            *[Row(f"sam-rho{r}", "sam", ["--rho", r], expect=((acc, "~" if r != "0.5" else "<", sam_ref,
                                                               "alike at small rho" if r != "0.5" else "slower or diverging"),))
              for r in ("0.01", "0.05", "0.5")],
            *[Row(f"{v}-rho0.05", v, ["--rho", "0.05"], expect=((acc, "<", "seed004/sam-rho0.05", "L-inf worse than L2"),))
              for v in ("linf-norm", "linf-sign")],
            Row("asam", "asam", ["--rho", "2.0"], expect=((acc, ">", "seed004/sam-rho0.05", "ASAM above SAM (ResNet, WRN)"),)),
            Row("cnn-sgd", "sgd", cnn),
            Row("cnn-sam-rho0.05", "sam", cnn + ["--rho", "0.05"], expect=((acc, ">", "seed004/cnn-sgd", "SAM above SGD"),)),
            Row("cnn-asam", "asam", cnn + ["--rho", "2.0"],
                expect=((acc, ">", "seed004/cnn-sam-rho0.05", "ASAM above SAM (may vary by architecture)"),)),
            # the cnn on the 2,500 images, 100 epochs where ResNet-18's SGD fits (run after the claims, SGD and SAM
            # first: does the cnn fit there, and does SAM gain on it)
            Row("cnn-sgd-n2500", "sgd", fits_every10 + cnn),
            Row("cnn-sam-rho0.05-n2500", "sam", fits_every10 + cnn + ["--rho", "0.05"],
                expect=((acc, ">", "seed004/cnn-sgd-n2500", "SAM above SGD"),)),
            Row("cnn-asam-n2500", "asam", fits_every10 + cnn + ["--rho", "2.0"],
                expect=((acc, ">", "seed004/cnn-sam-rho0.05-n2500", "ASAM above SAM (may vary by architecture)"),)),
            *[Row(f"usam-rho{r}", "usam", ["--rho", r], expect=((acc, "<", sam_at[r], "USAM unstable at large rho"),))
              for r in (RHO, "0.5")],
            # where SGD fits its training set (run after the claims), against SAM at the same rho there; at rho 0.1
            # a fourth seed, as three left USAM's gap to SAM level with the combined std (1.82 and 1.77)
            *[Row(f"usam-rho{r}-n2500", "usam", ["--rho", r] + fits_every10, seeds=SEEDS + (3,) if r == RHO else SEEDS,
                  expect=((acc, "<", fits_sam_at[r], "USAM unstable at large rho"),)) for r in (RHO, "0.5")],
            # SAM at rho 0.05 there: the reference of ASAM, L-inf and the rho sweep (run after the claims)
            Row("sam-rho0.05-n2500", "sam", ["--rho", "0.05"] + fits_every10),
            *[Row(f"sam-rho{r}-n2500", "sam", ["--rho", r] + fits_every10, expect=((acc, op, fits_sam_at["0.05"], words),))
              for r, op, words in (("0.01", "~", "alike at small rho"), ("0.5", "<", "slower or diverging"))],
            Row("asam-n2500", "asam", ["--rho", "2.0"] + fits_every10,
                expect=((acc, ">", fits_sam_at["0.05"], "ASAM above SAM (ResNet, WRN)"),)),
            *[Row(f"{v}-rho0.05-n2500", v, ["--rho", "0.05"] + fits_every10,
                  expect=((acc, "<", fits_sam_at["0.05"], "L-inf worse than L2"),)) for v in ("linf-norm", "linf-sign")],
        ]),
        Group("noise", "8. 25% symmetric label noise: clean-label accuracy, train accuracy on clean and flipped labels", [
            Row("sgd", "sgd", ["--label-noise", "0.25"]),
            Row("sam", "sam", rho + ["--label-noise", "0.25"], expect=(
                (acc, ">", "noise/sgd", "SAM more robust to label noise"),
                ("noisy_train_acc", "<", "noise/sgd", "SAM fits the flipped labels less"))),
            Row("saner", "saner", rho + ["--label-noise", "0.25"], expect=((acc, ">", "noise/sam", "SAN-ER above SAM"),)),
            # where SGD fits its training set, and so the flipped labels too (run after the claims; SAM's seed 0 tested
            # every epoch, its seeds 1 and 2 and SANER's three as fits_every10)
            Row("sgd-n2500", "sgd", ["--label-noise", "0.25"] + FITS),
            Row("sam-n2500", "sam", rho + ["--label-noise", "0.25"] + fits_every10, expect=(
                (acc, ">", "noise/sgd-n2500", "SAM more robust to label noise"),
                ("noisy_train_acc", "<", "noise/sgd-n2500", "SAM fits the flipped labels less"))),
            Row("saner-n2500", "saner", rho + ["--label-noise", "0.25"] + fits_every10,
                expect=((acc, ">", "noise/sam-n2500", "SAN-ER above SAM"),)),
        ]),
        Group("peers", "9. The peers at equal epochs against SAM at the same radius; ImbSAM on long-tailed CIFAR-10", [
            # each peer at its preset radius (sam.VARIANTS), judged against SAM at that radius: SAM's accuracy
            # falls as rho grows here, so SAM at 0.1 would flatter the peers run at 0.05
            *[Row(v, v, [], expect=((acc, ">", sam_at[preset_rho(v)], f"published above SAM (both at rho {preset_rho(v)})"),))
              for v in ("friendlysam", "ssamf", "ssamd", "fishersam", "gsam", "looksam")],
            looksam_walltime_row("", [], epochs, sam_at),
            # where SGD fits its training set (run after the claims, LookSAM first: does its collapse hold there too)
            *[Row(f"{v}-n2500", v, fits_every10, expect=((acc, ">", fits_sam_at[preset_rho(v)],
                                                          f"published above SAM (both at rho {preset_rho(v)})"),))
              for v in ("looksam", "friendlysam", "gsam", "fishersam", "ssamf", "ssamd")],
            looksam_walltime_row("-n2500", fits_every10, value(FITS, "--epochs"), fits_sam_at),
            *long_tailed_rows("", long_tailed),
            # where SGD fits: that profile drawn down to FITS's 2,500 images (551 down to 55 training images a
            # class; classes 5-9, below 175, are the tail), run after the claims
            *long_tailed_rows("-n2500", ["--imbalance", "10", "--tail-threshold", "175"] + fits_every10),
        ]),
        Group("device", "Control: SAM and SGD on a CPU in fp32 against the same rows on the GPU (bf16), for the rows "
              "that ran on the CPU; the rho sweep and L-inf on the CPU too, each claim with seeds on one device", [
            # the row's --device wins over the runner's: these run on a CPU wherever launched
            *[Row(f"sam-rho{r}-cpu", "sam", ["--rho", r] + cpu, expect=((acc, "~", sam_at[r], same_result),) + sweep)
              for r, sweep in (("0.01", ((acc, "~", "device/sam-rho0.05-cpu", "alike at small rho (both on the CPU)"),
                                         (acc, "~", "device/sam-rho0.1-cpu", "alike at small rho (both on the CPU)"))),
                               ("0.05", ((acc, "~", "device/sam-rho0.1-cpu", "alike at small rho (both on the CPU)"),)),
                               (RHO, ()),
                               ("0.5", ((acc, "<", "device/sam-rho0.1-cpu", "slower or diverging (both on the CPU)"),)))],
            Row("linf-norm-rho0.05-cpu", "linf-norm", ["--rho", "0.05"] + cpu, expect=(
                (acc, "~", "seed004/linf-norm-rho0.05", same_result),
                (acc, "<", "device/sam-rho0.05-cpu", "L-inf worse than L2 (both on the CPU)"))),
            # claim 6 with seeds on one device: sammagnitude and samdirection against SAM's accuracy (sam-rho0.1-cpu)
            # and its sharpness, which that row did not measure (SAM at rho 0.1 again, with --sharpness)
            Row("sam-rho0.1-sharp-cpu", "sam", rho + SHARP + cpu, expect=(
                ("lambda_max", "~", sam_ref, "the device does not change the sharpness"), (acc, "~", sam_ref, same_result))),
            Row("sammagnitude-cpu", "sammagnitude", rho + SHARP + cpu, expect=(
                (acc, "~", "direction/sammagnitude", same_result),
                (acc, "~", "device/sam-rho0.1-cpu", "about equal to SAM (both on the CPU)"))),
            Row("samdirection-cpu", "samdirection", rho + SHARP + cpu, expect=(
                (acc, "~", "direction/samdirection", same_result),
                (acc, "<", "device/sam-rho0.1-cpu", "below SAM (both on the CPU)"),
                (acc, "<", "device/sammagnitude-cpu", "below sammagnitude (both on the CPU)"),
                ("top5_pos_mean", ">", "device/sam-rho0.1-sharp-cpu", "far sharper: top-5 mean 259 vs SAM's 71 (CPU)"))),
            # claim 5's main rows with seeds on one device, against SAM's sharp rerun there
            Row("samme1-c2-cpu", "samme1", rho + ["--condition", "2"] + SHARP + cpu, expect=(
                (acc, "~", "same/samme1-c2", same_result),
                ("lambda_max", "<", "device/sam-rho0.1-sharp-cpu", "flatter than SAM (both on the CPU)"),
                ("train_acc", ">", "device/sam-rho0.1-cpu", "higher late train acc (both on the CPU)"),
                (acc, ">", "device/sam-rho0.1-cpu", "higher late val acc (both on the CPU)"))),
            Row("customsame-cpu", "customsame", rho + SHARP + cpu, expect=(
                (acc, "~", "same/customsame", same_result),
                (acc, ">", "device/sam-rho0.1-cpu", "built to beat SAM (both on the CPU)"))),
            # not in the notes: samme1 (c 2) makes d 1.70x g' long at initialisation, 1.88x at the best checkpoint; SAM with
            # d = 1.8 g' everywhere asks whether its flatness comes from picking B1 or from the longer step
            Row("sam-step1.8-cpu", "sam", rho + ["--bin-scale", *"ccccc", "--condition", "1.8"] + SHARP + cpu, expect=(
                ("lambda_max", "~", "device/samme1-c2-cpu", "control: the longer step alone is as flat as samme1"),
                ("lambda_max", "<", "device/sam-rho0.1-sharp-cpu", "control: the longer step alone is flatter than SAM"))),
            # the reference of the sgdhess rows, which ran on the CPU
            Row("sgd-cpu", "sgd", SHARP + cpu, expect=(
                (acc, "~", "core/sgd", same_result),
                ("lambda_max", "~", "core/sgd", "nor the sharpness"))),
        ]),
    ]


# ------------------------------------------------------------------------------------------- runs
Run = namedtuple("Run", "group label seed variant args out")


def runs_of(groups, setting, data_dir, device, seeds=None, override=()):
    """Every run, in priority order: the setting, then the row's variant and flags, then any override (later
    flags win). The runner's --device applies to every row that does not name its own (the device control)."""
    runs = []
    for group in groups:
        for row in group.rows:
            for seed in row.seeds if seeds is None else [s for s in row.seeds if s in seeds]:
                out = RESULTS / group.name / f"{row.label}-s{seed}"
                device_args = [] if "--device" in row.flags else ["--device", device]
                args = last_wins([*COMMON, *setting, "--variant", row.variant, *row.flags, "--seed", str(seed),
                                  "--data-dir", data_dir, *device_args, "--out", str(out.relative_to(ROOT)), *override])
                runs.append(Run(group.name, row.label, seed, row.variant, args, out))
    return runs


def read_setting(path):
    """results/setting.json as a dict; exit with a message naming the file when it is cut or not a setting."""
    try:
        setting = json.loads(Path(path).read_text())
        setting["name"], setting["args"]
        return setting
    except (OSError, ValueError, KeyError, TypeError) as err:
        sys.exit(f"{path} is no setting ({type(err).__name__}: {err}); restore it (git checkout results/setting.json) "
                 "or write it again with `python reproduce.py choose`")


def decision(out, sharpness_wanted=False):
    """What the runner does with a run folder: skip, diverged (a result: never run again), measure (a finished run
    without the sharpness its row asks for: train.py --resume measures its best-val checkpoint), resume, overwrite
    (a start that left no checkpoint), start, or unreadable (a damaged final.json: left alone)."""
    if (out / "diverged.txt").exists():
        return "diverged"
    if (out / "final.json").exists():
        try:
            unmeasured = json.loads((out / "final.json").read_text()).get("sharpness") is None
        except (OSError, ValueError, AttributeError):
            return "unreadable"   # left alone, as a stale folder is
        return "measure" if sharpness_wanted and unmeasured else "skip"
    if (out / "last.pt").exists():
        return "resume"
    if (out / "config.json").exists():
        return "overwrite"
    return "start"


def stale(run, end_open=False):
    """What a run folder was made with that its row's command no longer gives (a new setting, an edited row, a
    changed preset), as 'setting folder -> command' strings; empty when they agree. Such a folder is not this
    row's result, so the runner neither skips nor resumes it. While the run's end is open (it trains, or it
    finished without sharpness) the sharpness settings may differ: train.py takes them on --resume; a diverged
    run (end_open too) measured none. A row that asks for no sharpness ignores them: a measurement it did not ask
    for leaves the training its own."""
    import torch
    import train
    try:
        saved = json.loads((run.out / "config.json").read_text())
    except (OSError, ValueError) as err:
        return [f"config.json unreadable ({type(err).__name__})"]
    args = settings(run)
    wanted = json.loads(json.dumps(train.run_config(args, run.args, torch.device("cpu"), 1, None)))
    may_differ = train.END_SETTINGS if end_open or not args.sharpness else set()
    ignore = train.SESSION_SETTINGS | MACHINE_SETTINGS | may_differ
    return [f"{k} {saved[k]!r} -> {wanted[k]!r}" for k in train.changed_settings(saved, wanted, ignore)]


def wants_sharpness(run):
    return settings(run).sharpness


def settings(run):
    """train.py's settings of a run, launched as one process. A warning of a flag idle in its row (an --override's
    --rho in an sgd row) is its run's to say, not this listing's for each seed; a refusal is said here."""
    import train
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return train.parse_settings(run.args, world=1)
    except SystemExit:
        sys.stderr.write(said.getvalue())
        raise


def cost(run):
    """SGD-equivalent images of a run (the estimate the dry run prints): training passes, and the val and test
    evaluation every epoch at a third of a training image each; sharpness not counted."""
    pool = min(float(value(run.args, "--subset", 50000)), 20400 if "--imbalance" in run.args else 50000)
    per_epoch = 0.9 * pool * PASSES.get(run.variant, 2) + (0.1 * pool + 10000) / 3
    return per_epoch * float(value(run.args, "--epochs"))


def decode_once(data_dir):
    """Decode the images into train.py's cache before parallel jobs start (concurrent first decodes race)."""
    import train
    args = train.parse_settings(["--data-dir", data_dir, "--device", "cpu"])
    train.load_images(args)


def launch(run, action, threads):
    log_path = run.out.parent / f"{run.out.name}.log"   # beside the folder: train.py recreates the folder on a start
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")
    extra = {"resume": ["--resume"], "measure": ["--resume"], "overwrite": ["--overwrite"], "start": []}[action]
    command = [sys.executable, "train.py", *run.args, *extra]
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}   # the jobs share the CPU cores without oversubscribing
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env), log


def finish(run, proc, log):
    """Move the job's log into its run folder (train.log) and classify the job."""
    log.close()
    log_path = run.out.parent / f"{run.out.name}.log"
    text = log_path.read_text()
    if run.out.is_dir():
        with open(run.out / "train.log", "a") as f:
            f.write(text)
        log_path.unlink()
    if (run.out / "final.json").exists() and decision(run.out, wants_sharpness(run)) == "skip":
        return "done"
    if proc.returncode != 0 and "train.py: the training loss is" in text:   # a divergence is a result, not a failure
        (run.out / "diverged.txt").write_text(text.strip().splitlines()[-1] + "\n")
        return "diverged"
    return "incomplete" if proc.returncode in (0, 130, -signal.SIGINT, -signal.SIGKILL) else "failed"


def usable_cores():
    """The cores this process may run on (a container's or a batch job's share), else all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def signal_job(proc, signum):
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:   # already gone
        pass


def stop_jobs(running, grace):
    """SIGINT every job (train.py checkpoints and exits), SIGKILL what is left after `grace` seconds or at a
    second Ctrl-C; returns when all have ended. The jobs run in their own sessions, so nothing else stops them
    when this runner ends: the deadline and an interrupt both come here."""
    for run, proc, log in running:
        signal_job(proc, signal.SIGINT)
    end = time.monotonic() + grace
    try:
        for run, proc, log in running:
            try:
                proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_job(proc, signal.SIGKILL)
    except KeyboardInterrupt:
        for run, proc, log in running:
            signal_job(proc, signal.SIGKILL)
    for run, proc, log in running:
        proc.wait()


def execute(runs, jobs, deadline, grace, dry_run=False, start=None, threads=None):
    """Run train.py jobs `jobs` at a time, each on `threads` threads (default: the usable cores over the jobs that run
    at once); at deadline - grace stop them (stop_jobs). Returns the count of each outcome. Interrupted (Ctrl-C,
    or SIGTERM through main), it stops the jobs the same way, files their logs and raises KeyboardInterrupt."""
    import sam
    counts = dict(done=0, diverged=0, incomplete=0, failed=0, skipped=0, stale=0)
    todo, missing = [], {}
    for run in runs:
        if run.variant not in sam.VARIANTS:   # a preset of a newer sam.py
            missing.setdefault(run.variant, []).append(f"{run.group}/{run.out.name}")
            continue
        action = decision(run.out, wants_sharpness(run))
        if action == "unreadable":
            changed = ["final.json unreadable"]
        elif action in ("overwrite", "start"):
            changed = []
        else:
            changed = stale(run, end_open=action != "skip")   # a diverged run measured nothing either
        if changed:   # left as it is: it holds another experiment's results, which nothing here may delete
            counts["stale"] += 1
            print(f"stale: {run.group}/{run.out.name} was run with other settings ({'; '.join(changed)}); "
                  "move it out of results/ and run again to redo it", flush=True)
        elif action in ("skip", "diverged"):   # a diverged run counts as diverged in every call, not only its own
            counts["skipped" if action == "skip" else "diverged"] += 1
        else:
            todo.append((run, action))
    for variant, names in missing.items():
        print(f"note: variant {variant!r} is not in this sam.py; left out: {' '.join(names)}")
    if dry_run:
        for run, action in todo:
            print(f"[{action}] python train.py {shlex.join(run.args)}")
        left = sum(cost(run) for run, _ in todo)
        print(f"to run: {len(todo)} runs, at most {left / 1e6:.1f} M SGD-equivalent images "
              "(a resumed or measured run counted whole)")
        return counts
    start, running, began = start or time.monotonic(), [], {}
    threads = threads or max(1, usable_cores() // max(1, min(jobs, len(todo))))   # 2 runs, 12 jobs: half the cores each
    try:
        while todo or running:
            if deadline and time.monotonic() - start > deadline - grace:
                print(f"deadline: stopping {len(running)} jobs, {len(todo)} not started", flush=True)
                counts["incomplete"] += len(todo)
                todo = []
                stop_jobs(running, grace)   # they end by the deadline; the loop below files them
            while todo and len(running) < jobs:
                run, action = todo.pop(0)
                print(f"[{action}] {run.group}/{run.out.name}", flush=True)
                began[run.out] = time.monotonic()
                running.append((run, *launch(run, action, threads)))
            for item in list(running):
                run, proc, log = item
                if proc.poll() is not None:
                    running.remove(item)
                    outcome = finish(run, proc, log)
                    counts[outcome] += 1
                    now = time.monotonic()
                    print(f"{outcome}: {run.group}/{run.out.name} ({now - began[run.out]:.0f} s; "
                          f"{now - start:.0f} s since this runner started)", flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(f"interrupted: stopping {len(running)} jobs (they checkpoint), {len(todo)} not started", flush=True)
        stop_jobs(running, grace)
        for run, proc, log in running:
            print(f"{finish(run, proc, log)}: {run.group}/{run.out.name}", flush=True)
        raise
    return counts


# ------------------------------------------------------------------------------------------- stages
def read_final(out):
    """best val acc and last-epoch train acc of a finished run, or None."""
    try:
        final = json.loads((out / "final.json").read_text())
        last = (out / "epochs.csv").read_text().splitlines()
        header, row = last[0].split(","), last[-1].split(",")
        return final["best_val_acc"], float(row[header.index("train_acc")])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def candidate_table(results=None):
    """Per candidate with finished SGD and SAM runs: the means the rule reads (SGD's final train accuracy, both
    best validation accuracies, the gain) and the seeds finished, the fewer of the two optimizers'."""
    table = {}
    for name in CANDIDATES:
        cells = {v: [r for s in select_seeds(name) if (r := read_final((results or RESULTS) / "select" / name / f"{v}-s{s}"))]
                 for v in ("sgd", "sam")}
        if all(cells.values()):
            mean = lambda xs: sum(xs) / len(xs)
            table[name] = dict(sgd_train_acc=mean([t for _, t in cells["sgd"]]),
                               sgd_val_acc=mean([v for v, _ in cells["sgd"]]), sam_val_acc=mean([v for v, _ in cells["sam"]]),
                               seeds=min(len(c) for c in cells.values()))
            table[name]["gain"] = table[name]["sam_val_acc"] - table[name]["sgd_val_acc"]
    return table


def rule_choice(table):
    """The candidate RULE picks among those with SEEDS finished (a partial one, a call cut by its deadline or
    a pilot, would otherwise switch the setting, and make every claim stale, on fewer seeds); None if there is none."""
    complete = {n: t for n, t in table.items() if t["seeds"] >= len(SEEDS)}
    if not complete:
        return None
    best_fit = max(t["sgd_train_acc"] for t in complete.values())
    eligible = [n for n, t in complete.items() if t["sgd_train_acc"] >= best_fit - FIT_MARGIN]
    return max(eligible, key=lambda n: complete[n]["gain"])


def choose(switch=True, dry_run=False):
    """Write results/setting.json from the finished selection runs by RULE; returns the setting in force.
    switch=False (the end of `select`) keeps a setting already chosen when the rule now picks another one:
    switching makes every claims folder stale, so it takes `reproduce.py choose`. dry_run: print, write nothing."""
    table = candidate_table()
    chosen = rule_choice(table)
    if chosen is None:
        sys.exit(f"reproduce.py: no candidate has all {len(SEEDS)} seeds of SGD and SAM finished yet; "
                 "run `reproduce.py select`")
    for name, t in table.items():
        partial = "" if t["seeds"] >= len(SEEDS) else f" (of {len(SEEDS)}: not yet eligible)"
        print(f"{name}: SGD train {t['sgd_train_acc']:.2f}%, val SGD {t['sgd_val_acc']:.2f}% SAM {t['sam_val_acc']:.2f}% "
              f"(gain {t['gain']:+.2f}, {t['seeds']} seeds{partial}){'  <- the rule picks this' if name == chosen else ''}")
    setting = dict(name=chosen, args=CANDIDATES[chosen], rule=RULE, candidates=table)
    path = RESULTS / "setting.json"
    in_force = read_setting(path) if path.exists() else setting
    previous = in_force["name"]
    if previous != chosen and not switch:
        print(f"note: the rule now picks {chosen}; the setting stays {previous}, the one the claims folders in "
              "results/ ran in. `reproduce.py choose` switches it (and makes those folders stale)")
        return in_force
    if dry_run:
        print(f"dry run: setting.json stays {previous}" + ("" if previous == chosen else
              f"; `reproduce.py choose` would switch it to {chosen} and make the claims folders stale"))
        return setting
    if previous != chosen:
        print(f"note: the setting changes from {previous} to {chosen}: the claims "
              "folders already in results/ belong to the old one (`claims` reports them as stale); move them away")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(setting, indent=1) + "\n")
    return setting


def select_groups():
    return [Group(f"select/{name}", "selection", [Row("sgd", "sgd", args, select_seeds(name)),
                                                  Row("sam", "sam", ["--rho", RHO] + args, select_seeds(name))])
            for name, args in CANDIDATES.items()]


def select_seeds(name):
    return SELECT_SEEDS.get(name, SEEDS)


def pack(outfile, limit=16 << 20):
    """A .tar.gz of results/ with only the small files (never checkpoints or the copied code)."""
    keep = (".json", ".csv", ".log", ".txt")
    with tarfile.open(outfile, "w:gz") as tar:
        for path in sorted(RESULTS.rglob("*")):
            if path.is_file() and path.suffix in keep:
                tar.add(path, arcname=str(path.relative_to(ROOT)))
    size = os.path.getsize(outfile)
    print(f"wrote {outfile}: {size / 2**20:.2f} MiB")
    if size > limit:
        print(f"warning: larger than {limit / 2**20:.0f} MiB", file=sys.stderr)
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_signals():
    """SIGTERM (a session or a scheduler ending the runner) and SIGINT stop its jobs as Ctrl-C does. SIGINT is
    set too: a runner started in the background (`nohup ... &`) inherits it ignored, and `kill -INT` did nothing."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("select", "choose", "claims", "pack"))
    parser.add_argument("outfile", nargs="?", help="pack: the .tar.gz to write")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train.py processes at a time; they split the CPU cores (OMP_NUM_THREADS)")
    parser.add_argument("--threads", type=int, help="threads per job (default: cores / jobs run at once); set it "
                        "when other runs share the machine: on 2 cores a job on 2 threads beside another run took "
                        "3.5x as long as on 1")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--deadline", type=float, help="seconds: stop launching, checkpoint and end by then")
    parser.add_argument("--grace", type=float, default=30, help="seconds between SIGINT and SIGKILL at the deadline")
    parser.add_argument("--groups", help="comma-separated group names (default: all, in priority order)")
    parser.add_argument("--rows", help="comma-separated row labels, e.g. lt-sam,lt-imbsam (default: every row)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: each row's)")
    parser.add_argument("--override", default="", help="train.py arguments appended to every command, overriding (smoke tests)")
    parser.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1) or (
            args.deadline is not None and not args.deadline > 0) or not args.grace >= 0:
        parser.error("--jobs and --threads must be >= 1, --deadline > 0 and --grace >= 0")
    if args.deadline is not None and args.deadline <= args.grace:
        parser.error(f"--deadline {args.deadline:g} leaves no time to run: the jobs are stopped at --deadline minus "
                     f"--grace ({args.grace:g} s); give a longer deadline or a shorter --grace")
    if args.stage == "pack":
        if not args.outfile:
            parser.error("pack needs OUTFILE")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.outfile))):
            parser.error(f"pack: the folder of {args.outfile!r} does not exist")
        return pack(args.outfile)
    if args.stage == "choose":
        choose(dry_run=args.dry_run)
        return 0
    start = time.monotonic()   # the deadline counts the decoding too
    if args.stage == "select":
        groups, setting = select_groups(), []
    else:
        path = RESULTS / "setting.json"
        if path.exists():
            setting = read_setting(path)["args"]
        elif args.dry_run or args.override:
            setting = next(iter(CANDIDATES.values()))
            print(f"note: no {path.relative_to(ROOT)} yet; showing the first candidate's setting")
        else:
            parser.error(f"{path} does not exist: run `reproduce.py select` first")
        groups = claims(setting)
    if args.groups:
        wanted = args.groups.split(",")
        unknown = set(wanted) - {g.name for g in groups}
        if unknown:
            parser.error(f"unknown groups {sorted(unknown)}; known: {[g.name for g in groups]}")
        groups = [g for g in groups if g.name in wanted]
    if args.rows:
        wanted = args.rows.split(",")
        unknown = set(wanted) - {row.label for g in groups for row in g.rows}
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)} in groups {[g.name for g in groups]}; "
                         "`claims --dry-run` lists every row's folder")
        groups = [g._replace(rows=[row for row in g.rows if row.label in wanted]) for g in groups]
        groups = [g for g in groups if g.rows]
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if seeds and not set(seeds) & {s for g in groups for row in g.rows for s in row.seeds}:
        parser.error(f"no row chosen has seeds {seeds}; `claims --dry-run` lists every row's folder")
    try:
        override = shlex.split(args.override)
    except ValueError as err:   # an unclosed quote
        parser.error(f"--override {args.override!r}: {err}")
    runs = runs_of(groups, setting, args.data_dir, args.device, seeds, override)
    if override:   # train.py judges the override (--epochs x, a flag doing nothing in some row) before any cost or
        for run in runs:   # folder is read from it
            try:
                settings(run)
            except SystemExit:
                print(f"reproduce.py: the --override above is refused in row {run.group}/{run.label}", file=sys.stderr)
                raise
    for group in groups:
        mine = [r for r in runs if r.group == group.name]
        print(f"{group.name}: {len(mine)} runs, {sum(map(cost, mine)) / 1e6:.1f} M SGD-equivalent images")
    print(f"all: {len(runs)} runs, {sum(map(cost, runs)) / 1e6:.1f} M SGD-equivalent images")
    if not args.dry_run:
        decode_once(args.data_dir)
    stop_on_signals()
    try:
        counts = execute(runs, args.jobs, args.deadline, args.grace, args.dry_run, start, args.threads)
    except KeyboardInterrupt:
        print("reproduce.py: interrupted; the same command resumes the stopped runs", file=sys.stderr)
        return 130
    print("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    if args.stage == "select" and not args.dry_run:
        choose(switch=False)
    return 1 if counts["failed"] or counts["stale"] else 0


if __name__ == "__main__":
    sys.exit(main())
