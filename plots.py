"""Regenerate the README's training figures and tables from saved train.py runs (and toy.py CSVs).

    python plots.py runs/ --out figures/              # every run folder under runs/
    python plots.py runs/ --out figures/ --toy figures/   # also tabulate toy.py's CSVs

Runs whose settings differ only in the seed are one group (named by dataset, model, variant, rho, condition
and any other setting that differs between groups); seeds are averaged (mean, and a band
of +- one sample standard deviation). A run folder whose settings and seed equal another's (a copy) is
counted once, with a warning, and so is a seed run again only to measure its end (--sharpness). Under
reproduce.py's results/ it writes instead results.md (one table per claim, mean ± std over seeds, the command of each
row, and whether the notes' claim holds) and the figures of claims 1-3 and the curves of the rows where SGD fits into
<out>/results/. Unfinished runs (no final.json, partial CSVs) are plotted but left out of the final-accuracy table;
runs that cannot be read are skipped with the reason, and so is a figure of the ratio statistics that no run logged.
"""
import argparse
import csv
import io
import json
import math
import os
import pathlib
import re
import shlex
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import reproduce
from sam import FINE_NAMES as FINE   # the r > 1 sub-bins, as steps.csv names them
from train import END_SETTINGS, SESSION_SETTINGS, build_parser

# config.json entries that say how a run was launched, not which run it is. The device stays: the same settings
# on another device are another measurement (CPU and GPU kernels differ), not a copied folder
NOT_IDENTITY = (SESSION_SETTINGS - {"device"}) | {"command", "git_commit", "torch", "world_size"}

GROUP_KEYS = ("dataset", "model", "variant", "rho", "condition")
# train.py's settings with their defaults (a config.json from before a setting existed ran with its default). Seeds of
# one result share all of them but the seed, how the run was launched and what its end measured
TRAIN_SETTINGS = {k: v for k, v in vars(build_parser().parse_args([])).items()
                  if k not in SESSION_SETTINGS | END_SETTINGS | {"seed"}}
CKPTS = ("ckpt1", "ckpt2", "ckpt3", "ckpt4")
DPI = 80
# every figure, its size in inches (tests check the PNG's pixels against size * DPI)
FIGURES = {"ckpt_shares": (16, 4), "ckpt1_bins": (15, 4.5), "persistence": (12, 4),
           "curves": (13, 8), "mag_up": (8, 4.5)}
# the figures of the ratio statistics: a column each needs in steps.csv, and the train.py flags that log it
STATISTICS = {name: (column, "train.py --stats-every N with a variant that takes g' at w + e"
                     + (" and --persist-from T" if name == "persistence" else ""))
              for name, column in (("ckpt_shares", "ckpt1"), ("ckpt1_bins", FINE[0]), ("persistence", "persist_t0"),
                                   ("mag_up", "mag_up"))}
SHARES_BY_SETTING = (20, 4)   # results/ only: the selection's SAM runs, one line per candidate


class Skip(Exception):
    """A run folder that cannot be used, with the reason."""


# ----------------------------------------------------------------------------- reading
def whole_lines(path):
    """A CSV file's text up to its last newline: past it is a line still being written (cut, maybe inside its last
    cell with every field there), never read as a row."""
    with open(path, newline="") as f:
        text = f.read()
    return io.StringIO(text[:text.rfind("\n") + 1])


def read_csv(path):
    """Columns of a CSV as float arrays (empty cells: NaN). A run still being written may end in a
    cut-off line: a last line without its newline (cut inside its last cell, it has every field) and rows whose
    field count differs from the header's are dropped."""
    rows = list(csv.reader(whole_lines(path)))
    if not rows:
        return {}
    header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    return {name: np.array([_float(r[i]) for r in body]) for i, name in enumerate(header)}


def _float(cell):
    try:
        return float(cell)
    except ValueError:
        return math.nan


def load_run(folder):
    """config, steps, epochs and final of one run folder; Skip if it cannot be used."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise Skip("no config.json") from None
    except (OSError, ValueError) as err:   # ValueError: not JSON, or not UTF-8
        raise Skip(f"unreadable config.json ({err})") from None
    for key, value in config.get("sam_flags", {}).items():   # train.py's effective flags: the preset's
        if config.get(key) is None:                            # rho or condition where none was given
            config[key] = value
    missing = [k for k in GROUP_KEYS if k not in config]
    if missing:
        raise Skip(f"config.json lacks {', '.join(missing)}")
    run = dict(name=os.path.basename(folder.rstrip("/")), folder=folder, config=config, final=None,
               diverged=os.path.exists(os.path.join(folder, "diverged.txt")))
    for table in ("steps", "epochs"):
        path = os.path.join(folder, f"{table}.csv")
        try:
            run[table] = read_csv(path) if os.path.exists(path) else {}
        except (OSError, UnicodeDecodeError) as err:
            raise Skip(f"unreadable {table}.csv ({err})") from None
    if not any(len(col) for table in ("steps", "epochs") for col in run[table].values()) and not run["diverged"]:
        raise Skip("no rows in steps.csv or epochs.csv yet")
    try:
        with open(os.path.join(folder, "final.json")) as f:
            run["final"] = json.load(f)
    except FileNotFoundError:
        pass   # still running: curves yes, final table no
    except (OSError, ValueError) as err:
        raise Skip(f"unreadable final.json ({err})") from None
    return run


def identity(config):
    """What makes a run this run: its settings, seed and the device it ran on, not how it was launched."""
    return json.dumps({k: v for k, v in config.items() if k not in NOT_IDENTITY}, sort_keys=True, default=str)


def finished_first(kept, copy):
    """Of two copies of one run, the one that counts: the copy that finished, not one cut before its end; of two
    that finished, one that measured its sharpness."""
    def rank(run):
        return bool(run["final"]), bool((run["final"] or {}).get("sharpness"))
    return copy if rank(copy) > rank(kept) else kept


def load_runs(root):
    """Every run folder under root (a folder holding config.json), and the skipped ones with reasons. A
    folder holding the same run on the same device as an earlier one (a copied folder is not a second seed)
    is skipped."""
    runs, skipped, seen = [], [], {}
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        if "config.json" not in files and not {"steps.csv", "epochs.csv", "final.json"} & set(files):
            continue
        try:
            run = load_run(folder)
        except Skip as why:
            skipped.append((folder, str(why)))
            continue
        key = identity(run["config"])
        if key in seen:
            kept = runs[seen[key]]
            if finished_first(kept, run) is run:
                runs[seen[key]], run, kept = run, kept, run
            kept["copies"] = kept.get("copies", []) + run.pop("copies", []) + [run]   # by_folder finds them
            print(f"warning: {run['folder']} holds the same run as {kept['folder']} (same settings and seed): "
                  "counted once")
            skipped.append((run["folder"], f"duplicate of {kept['folder']}"))
            continue
        seen[key] = len(runs)
        runs.append(run)
    return runs, skipped


def group_runs(runs):
    """{key: runs}: runs whose train.py settings (TRAIN_SETTINGS) are the same are seeds of one result (another --subset
    or --lr is another result). The key is GROUP_KEYS' values, then "name=value" for each other setting that differs between
    runs with the same GROUP_KEYS (a preset's own flags, which change with the variant, name nothing new)."""
    settings = [{k: _hashable(run["config"].get(k, default)) for k, default in TRAIN_SETTINGS.items()} for run in runs]
    named = [tuple(s[k] for k in GROUP_KEYS) for s in settings]
    others = sorted(set(TRAIN_SETTINGS) - set(GROUP_KEYS))
    differ = [k for k in others if any(len({s.get(k) for s, n in zip(settings, named) if n == name}) > 1 for name in set(named))]
    groups = {}
    for run, setting in zip(runs, settings):
        key = tuple(setting[k] for k in GROUP_KEYS) + tuple(f"{k}={setting.get(k)}" for k in differ)
        seeds = groups.setdefault(key, [])
        # a seed rerun to measure its end (--sharpness) trains as the first run did: one seed, not two
        i = next((i for i, r in enumerate(seeds) if _rerun_key(r) == _rerun_key(run)), None)
        if i is None:
            seeds.append(run)
            continue
        kept = finished_first(seeds[i], run)
        dropped, seeds[i] = (run if kept is seeds[i] else seeds[i]), kept
        print(f"warning: {dropped['folder']} trains as {kept['folder']} (same settings, seed, device and data; only "
              "what the end measures differs): counted once")
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])))


def _rerun_key(run):   # the data too: a run on other images (JPEG-decoded CIFAR) is no rerun, as in identity()
    return tuple(run["config"].get(k) for k in ("seed", "device", "data_fingerprint"))


def _hashable(value):
    return value if isinstance(value, (str, int, float, type(None))) else json.dumps(value)   # lists (--milestones)


def label(key, keys):
    """Only the settings that differ between groups, so legends stay short (a key that is a name: the name)."""
    if isinstance(key, str):
        return key
    varying = [i for i in range(len(key)) if len({kk[i] for kk in keys}) > 1] or [2]
    return " ".join(str(key[i]) if i >= len(GROUP_KEYS) or GROUP_KEYS[i] == "variant" else f"{GROUP_KEYS[i]}={key[i]}"
                    for i in varying)


def seed_mean(runs, table, x, y):
    """Mean and sample std over seeds of column y at each value of x present in any run, left out where a run
    that logged x has no y there (train.py --test-every): a mean over fewer seeds at some x would bend the curve."""
    per_x, gaps = {}, set()
    for run in runs:
        cols = run[table]
        if x in cols and y in cols:
            for xv, yv in zip(cols[x], cols[y]):
                if math.isfinite(yv):
                    per_x.setdefault(xv, []).append(yv)
                else:
                    gaps.add(xv)
    xs = np.array(sorted(set(per_x) - gaps))
    means = np.array([np.mean(per_x[v]) for v in xs])
    stds = np.array([np.std(per_x[v], ddof=1) if len(per_x[v]) > 1 else 0.0 for v in xs])
    return xs, means, stds


def mean_std(values):
    """'mean ± std' (sample std, ddof=1) of the finite values, or '–' if there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


# ----------------------------------------------------------------------------- figures
def _band(ax, runs, table, x, y, band=True, **style):
    """Seed mean of y against x, with a +-1 std band unless band=False (crowded panels)."""
    xs, means, stds = seed_mean(runs, table, x, y)
    if len(xs):
        line, = ax.plot(xs, means, **style)
        if band:
            ax.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.2, lw=0)


def _save(fig, out, name):
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_ckpt_shares(groups, out):
    """Seed 000's second figure: share of coordinates in each checkpoint over training."""
    fig, axes = plt.subplots(1, 4, figsize=FIGURES["ckpt_shares"], sharex=True)
    for ax, ckpt in zip(axes, CKPTS):
        for i, (key, runs) in enumerate(groups.items()):
            _band(ax, runs, "steps", "step", ckpt, color=f"C{i % 10}", label=label(key, groups))
        ax.set(xlabel="step", ylabel="share of coordinates (%)", title=f"checkpoint {ckpt[-1]}: " +
               {"ckpt1": "r > 1", "ckpt2": "0 < r < 1", "ckpt3": "r < -1", "ckpt4": "-1 < r < 0"}[ckpt])
    axes[0].legend(fontsize=7)
    fig.suptitle("Share of each checkpoint, r = g(w+e) / g(w) per coordinate (mean over seeds, band: ±1 std)")
    fig.tight_layout()
    return _save(fig, out, "ckpt_shares")


def plot_ckpt1_bins(groups, out):
    """Origin 4.3, project 2: how checkpoint 1 splits into r ranges; one panel per group (first 3)."""
    shown = [(k, r) for k, r in groups.items() if any(len(run["steps"].get(FINE[0], [])) for run in r)][:3]
    fig, axes = plt.subplots(1, 3, figsize=FIGURES["ckpt1_bins"], sharey=True)
    colors = plt.cm.plasma(np.linspace(0, 0.9, len(FINE)))
    for ax, (key, runs) in zip(axes, shown):
        for name, color in zip(FINE, colors):
            _band(ax, runs, "steps", "step", name, band=False, color=color,
                  label=name.replace("r", "r in ").replace("_", ".."))
        ax.set(xlabel="step", title=label(key, groups))
    for ax in axes[len(shown):]:
        ax.text(0.5, 0.5, "no further group", ha="center", transform=ax.transAxes, color="gray")
    axes[0].set_ylabel("share of all coordinates (%)")
    axes[0].legend(fontsize=7, title="r > 1 bins")
    fig.suptitle("Inside checkpoint 1: share of coordinates per ratio range (mean over seeds; the bins sum to checkpoint 1)")
    fig.tight_layout()
    return _save(fig, out, "ckpt1_bins")


def plot_persistence(groups, out):
    """Seed 000, Exp. 2-3: the checkpoint-1 set at step t0, its overlap with each later step's set, and
    the running intersection (its first 60 steps), both as a percentage of the t0 set, each beside its chance level."""
    fig, axes = plt.subplots(1, 2, figsize=FIGURES["persistence"])
    starts = []
    for i, (key, runs) in enumerate(groups.items()):
        for run in runs:   # per-run ratios first: t0 set sizes differ between seeds
            cols = run["steps"]
            rows, pct = _persistence(cols)
            starts += [cols["step"][rows[0]]] if len(rows) else []
            for name, values in pct.items():
                cols[name] = np.full(len(cols["step"]), np.nan)
                cols[name][rows] = values
        for ax, name in zip(axes, ("overlap", "running")):
            _band(ax, runs, "steps", "step", f"{name}_pct", color=f"C{i % 10}", label=label(key, groups))
            _band(ax, runs, "steps", "step", f"{name}_chance", band=False, color=f"C{i % 10}", ls=":",
                  label="chance: B1 drawn afresh each step" if i == len(groups) - 1 else None)
    axes[0].set(xlabel="step", ylabel="% of the checkpoint-1 set at t0", title="overlap with the set at t0 (Exp. 2)",
                ylim=(0, 100))
    axes[1].set_yscale("symlog", linthresh=0.01)
    axes[1].set(xlabel="step", title="running intersection since t0 (Exp. 3)", ylim=(0, 100),
                **({"xlim": (min(starts) - 2, min(starts) + 60)} if starts else {}))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "persistence")


def plot_curves(groups, out, name="curves", title="Accuracy and loss per epoch", loss_scale="linear"):
    """Accuracy and loss per epoch for each group, train and test (loss_scale "log": an early spike leaves the rest
    readable)."""
    fig, axes = plt.subplots(2, 2, figsize=FIGURES["curves"], sharex=True)
    panels = (("train_acc", "train accuracy (%)"), ("test_acc", "test accuracy (%)"),
              ("train_loss", "train loss"), ("test_loss", "test loss"))
    for ax, (col, ylabel) in zip(axes.flat, panels):
        for i, (key, runs) in enumerate(groups.items()):
            # past ten rows the colours repeat: a new line style keeps each row apart
            _band(ax, runs, "epochs", "epoch", col, color=f"C{i % 10}", ls=("-", "--", ":")[i // 10 % 3],
                  label=label(key, groups))
        ax.set(xlabel="epoch", ylabel=ylabel, yscale=loss_scale if "loss" in col else "linear")
    crowded = len(groups) > 8   # a legend this long inside a panel hides the curves it names: put it beside them
    if crowded:
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="center right", fontsize=7)
    else:
        axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title} (mean over seeds, band: ±1 std)")
    fig.tight_layout(rect=(0, 0, 0.86, 1) if crowded else None)
    return _save(fig, out, name)


def plot_mag_up(groups, out):
    """Seed 002, Exp. 3: share of coordinates where SAM's gradient is larger than SGD's, |g'| > |g|."""
    fig, ax = plt.subplots(figsize=FIGURES["mag_up"])
    for i, (key, runs) in enumerate(groups.items()):
        _band(ax, runs, "steps", "step", "mag_up", color=f"C{i % 10}", label=label(key, groups))
    ax.set(xlabel="step", ylabel="coordinates with |g'| > |g| (%)", title="Where the perturbed gradient is larger")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "mag_up")


def plot_shares_by_setting(settings, out):
    """Claims 1 and 3 in every candidate setting of the selection: checkpoint shares and mag_up under SAM against the
    share of training done, so settings of different lengths line up (seed mean; bands left out, 6 lines a panel)."""
    fig, axes = plt.subplots(1, 5, figsize=SHARES_BY_SETTING, sharex=True)
    for i, (name, runs) in enumerate(settings.items()):
        for run in runs:
            cols = run["steps"]
            cols["training_pct"] = np.round(100 * cols["step"] / max(cols["step"][-1], 1), 1)
        for ax, col in zip(axes, CKPTS + ("mag_up",)):
            _band(ax, runs, "steps", "training_pct", col, band=False, color=f"C{i % 10}", label=name)
    for ax, col in zip(axes, CKPTS + ("mag_up",)):
        ax.set(xlabel="training done (%)", title=f"checkpoint {col[-1]}" if col != "mag_up" else "mag_up: |g'| > |g|")
    axes[0].set_ylabel("share of coordinates (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("SAM (rho 0.1) in each candidate setting of the selection: checkpoint shares and mag_up (mean over seeds)")
    fig.tight_layout()
    return _save(fig, out, "shares_by_setting")


# ----------------------------------------------------------------------------- tables
def results_table(groups):
    """Markdown: final test accuracy, loss and sharpness per group, mean ± std over finished seeds."""
    others = any(len(key) > len(GROUP_KEYS) for key in groups)   # a column for the settings that tell groups apart
    lines = ["| dataset | model | variant | rho | condition | " + ("other settings | " if others else "") + "seeds "
             "| test acc (best val) | test acc (last) | test loss (last) | lambda_max | trace |", "|" + "---|" * (11 + others)]
    for key, runs in groups.items():
        done = [run["final"] for run in runs if run["final"]]
        if not done:
            continue
        sharp = [f.get("sharpness") or {} for f in done]
        cells = [mean_std([f.get("test_acc_best") for f in done]), mean_std([f.get("test_acc_last") for f in done]),
                 mean_std([f.get("test_loss_last") for f in done])]
        for name in ("lambda_max", "trace"):   # seeds run without --sharpness: the cell says over how many it is
            measured = [s[name] for s in sharp if s.get(name) is not None and math.isfinite(s[name])]
            cells.append(mean_std(measured) + (f" (n {len(measured)})" if 0 < len(measured) < len(done) else ""))
        names = [str(k) for k in key[:len(GROUP_KEYS)]] + ([" ".join(key[len(GROUP_KEYS):])] if others else [])
        lines.append("| " + " | ".join(names) + f" | {len(done)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def toy_tables(folder):
    """Markdown of toy.py's CSVs found in folder: Table III of seed 004 and the landscape end points."""
    parts = []
    sensing = os.path.join(folder, "sensing_rho.csv")
    if os.path.exists(sensing):
        cols = read_csv(sensing)
        lines = ["| rho | step | SAM loss | USAM loss |", "|---|---|---|---|"]
        lines += [f"| {r:g} | {s:.0f} | {a:.4g} | {b:.4g} |"
                  for r, s, a, b in zip(cols["rho"], cols["step"], cols["sam"], cols["usam"]) if 1 <= s <= 4]
        parts.append("Matrix sensing (toy.py sensing), loss after each step:\n\n" + "\n".join(lines))
    ends = os.path.join(folder, "landscape_ends.csv")
    if os.path.exists(ends):
        rows = [r for r in csv.DictReader(whole_lines(ends)) if None not in r.values()]   # as read_csv reads
        lines = ["| landscape | variant | end | basin | loss | lambda_max |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['landscape']} | {r['variant']} | ({float(r['x']):.2f}, {float(r['y']):.2f}) | {r['basin']} "
                  f"| {float(r['loss']):.4f} | {float(r['lambda_max']):.3f} |" for r in rows]
        parts.append("2D landscapes (toy.py landscape), where each variant ends:\n\n" + "\n".join(lines))
    return parts


# ----------------------------------------------------------------------------- results.md (reproduce.py)
ACCURACY = ("test_acc", "head_acc", "tail_acc")   # the metrics whose verdict needs SAM to beat SGD in the setting first
SHARPNESS = ("lambda_max", "top5_pos_mean")   # the curvature of a model still at chance says nothing about flatness
RULE = ("holds: the difference from the reference has the notes' sign and is larger than the combined sample "
        "std sqrt(s_a^2 + s_b^2) (against a number: larger than the row's std); does not hold: the opposite sign "
        "beyond that spread; '~' (about equal) holds within the spread, or within 25% of the notes' number; "
        "can't tell: in between, or fewer than 2 seeds, or a sharpness comparison with a row whose train accuracy "
        "ends under twice chance")


def _logged(cols, name):
    """A steps.csv column's values on the rows that have one (rows of steps without statistics hold NaN)."""
    values = cols.get(name, np.array([]))
    return values[np.isfinite(values)]


def _late(cols, name, early):
    """Mean of a steps.csv column over the first (early) or last tenth of the logged steps."""
    values = _logged(cols, name)
    if not len(values):
        return math.nan
    k = max(1, len(values) // 10)
    return float(np.mean(values[:k] if early else values[-k:]))


def _lowest_after_first_tenth(cols, name):
    """The lowest value once the first tenth of the logged steps (the ramp from step 0) is over."""
    values = _logged(cols, name)
    return float(np.min(values[len(values) // 10:])) if len(values) else math.nan


def _persist(cols, col, after):
    """100 * col / persist_t0 at `after` steps past the start of the persistence window (-1: the last row)."""
    if "persist_t0" not in cols:
        return math.nan
    rows = np.where(cols["persist_t0"] > 0)[0]
    if not len(rows):
        return math.nan
    i = rows[-1] if after < 0 else next((r for r in rows if cols["step"][r] >= cols["step"][rows[0]] + after), rows[-1])
    return float(100 * cols[col][i] / cols["persist_t0"][i])


def _persistence(cols):
    """The steps.csv rows from t0 on, and at each: the overlap with the t0 set and the running intersection in % of
    the t0 set, and their chance levels if B1 were drawn afresh each step with the share it has: the share, and
    the product of the shares since t0 (which needs every step logged)."""
    if "persist_t0" not in cols:
        return np.array([], dtype=int), {}
    rows = np.where(cols["persist_t0"] > 0)[0]
    t0, share = cols["persist_t0"][rows], cols["ckpt1"][rows] / 100
    running_chance = 100 * np.cumprod(np.r_[1.0, share[1:]])[:len(rows)]
    steps = cols["step"][rows]
    running_chance[np.cumsum(np.diff(steps, prepend=steps[:1] - 1) != 1) > 0] = np.nan   # past a step not logged
    return rows, dict(overlap_pct=100 * cols["persist_overlap"][rows] / t0,
                      running_pct=100 * cols["persist_running"][rows] / t0,
                      overlap_chance=100 * share, running_chance=running_chance)


def _over_chance(cols, name, after=None):
    """How far the overlap or the running intersection (name) lies above its chance level (_persistence), in points
    of the t0 set: the mean over the steps after t0, or at `after` steps past t0. NaN unless every step is logged."""
    rows, pct = _persistence(cols)
    if len(rows) < 2 or np.any(np.diff(cols["step"][rows]) != 1):
        return math.nan
    excess = (pct[f"{name}_pct"] - pct[f"{name}_chance"])[1:]
    return float(np.mean(excess) if after is None else excess[min(after, len(excess)) - 1])


def _class_mean(final, tail):
    """Mean test accuracy at best val over the tail classes (train.py's --tail-threshold) or over the others."""
    per_class, tail_classes = final["test_acc_per_class_best"], set(final["tail_classes"])
    chosen = [a for k, a in enumerate(per_class) if (k in tail_classes) == tail]
    return float(np.mean(chosen)) if chosen and tail_classes else math.nan


def _last_epoch(run, col):
    values = run["epochs"].get(col, np.array([]))
    return float(values[-1]) if len(values) else math.nan


METRICS = {   # name -> (what it is, value of one finished run)
    "test_acc": ("test acc at best val (%)", lambda r: r["final"]["test_acc_best"]),
    "train_acc": ("final train acc (%)", lambda r: _last_epoch(r, "train_acc")),
    "val_acc": ("best val acc (%)", lambda r: r["final"]["best_val_acc"]),
    "clean_train_acc": ("train acc, clean labels (%)", lambda r: _last_epoch(r, "clean_train_acc")),
    "noisy_train_acc": ("train acc on flipped samples, their noisy label (%)", lambda r: _last_epoch(r, "noisy_train_acc")),
    "head_acc": ("head classes' test acc (%)", lambda r: _class_mean(r["final"], tail=False)),
    "tail_acc": ("tail classes' test acc (%)", lambda r: _class_mean(r["final"], tail=True)),
    "lambda_max": ("lambda_max", lambda r: (r["final"].get("sharpness") or {}).get("lambda_max", math.nan)),
    "top5_pos_mean": ("top-5 eigenvalue mean", lambda r: (r["final"].get("sharpness") or {}).get("top5_pos_mean", math.nan)),
    "trace": ("Hessian trace (Hutchinson; ± std over seeds, one seed ± its SE)",
              lambda r: (r["final"].get("sharpness") or {}).get("trace", math.nan)),
    "trace_se": ("standard error of the Hutchinson trace", lambda r: (r["final"].get("sharpness") or {}).get("trace_se", math.nan)),
    "ckpt1_min": ("B1 lowest share after the first tenth (%)", lambda r: _lowest_after_first_tenth(r["steps"], "ckpt1")),
    **{f"ckpt{k}_{when}": (f"B{k} share, {when} tenth (%)", lambda r, k=k, when=when: _late(r["steps"], f"ckpt{k}", when == "early"))
       for k in (2, 3, 4) for when in ("early", "late")},
    "fine_up": ("r > 2 share (fine bins), late - early (points)", lambda r: sum(
        _late(r["steps"], b, False) - _late(r["steps"], b, True) for b in FINE[3:])),
    "overlap_late": ("overlap with the t0 set at the end (% of t0)", lambda r: _persist(r["steps"], "persist_overlap", -1)),
    "running_5": ("running intersection 5 steps after t0 (% of t0)", lambda r: _persist(r["steps"], "persist_running", 5)),
    "overlap_over_chance": ("overlap above chance, the B1 share (points, mean after t0)",
                            lambda r: _over_chance(r["steps"], "overlap")),
    "running_5_over_chance": ("running intersection above chance, the product of B1 shares, 5 steps after t0 (points)",
                              lambda r: _over_chance(r["steps"], "running", 5)),
    "mag_up_early": ("mag_up, first tenth (%)", lambda r: _late(r["steps"], "mag_up", True)),
    "mag_up_late": ("mag_up, last tenth (%)", lambda r: _late(r["steps"], "mag_up", False)),
}


def values(runs, metric):
    """The metric over the finished runs (seeds), finite values only."""
    out = []
    for run in runs:
        if run["final"]:
            try:
                v = float(METRICS[metric][1](run))
            except (KeyError, ValueError, IndexError, TypeError):
                continue
            if math.isfinite(v):
                out.append(v)
    return out


def difference(ours, reference):
    """mean(ours) - mean(reference) and the combined sample std sqrt(s_a^2 + s_b^2) (NaN with fewer than 2 of either)."""
    spread = math.hypot(np.std(ours, ddof=1), np.std(reference, ddof=1)) if min(len(ours), len(reference)) > 1 else math.nan
    return np.mean(ours) - np.mean(reference), spread


def verdict(ours, op, reference):
    """holds / does not hold / can't tell for 'ours op reference' (reference: a number or a list of values)."""
    if len(ours) < 2 or (not isinstance(reference, (int, float)) and len(reference) < 2):
        return "can't tell (n < 2)"
    mean, std = np.mean(ours), np.std(ours, ddof=1)
    if isinstance(reference, (int, float)):
        diff, spread, tolerance = mean - reference, std, 0.25 * abs(reference)
    else:
        (diff, spread), tolerance = difference(ours, reference), 0.0
    if op == "~":
        return "holds" if abs(diff) <= max(spread, tolerance) else "does not hold"
    sign = 1 if op == ">" else -1
    return "holds" if sign * diff > spread else "does not hold" if sign * diff < -spread else "can't tell"


def cell(runs, metric):
    """A table cell: mean ± std over the seeds; a single run's trace ± the standard error of its Hutchinson probes."""
    if metric == "trace" and len(values(runs, "trace")) == 1 and values(runs, "trace_se"):
        return f"{values(runs, 'trace')[0]:.4g} ± {values(runs, 'trace_se')[0]:.2g} (SE)"
    return mean_std(values(runs, metric))


def at_chance(runs):
    """A row whose finished runs end, on average, under twice chance train accuracy: a model that never learned."""
    acc = values(runs, "train_acc")
    classes = 100 if any(r["config"].get("dataset") == "cifar100" for r in runs) else 10
    return bool(acc) and np.mean(acc) < 2 * 100 / classes


def devices(runs):
    """Where the runs that ended ran, as config.json names it ('cpu', a GPU's name without its vendor), '–' for
    none. A run still going is left out, so that results.md is the same in a clean clone and beside a running job."""
    return ", ".join(sorted({str(r["config"].get("device", "?")).removeprefix("NVIDIA ")
                             for r in runs if r["final"] or r["diverged"]})) or "–"


def row_command(runs):
    """The train.py command of a row with its seed as $SEED (from config.json: what really ran), each option once
    (reproduce.last_wins), without the --overwrite or --resume that reproduce.py adds to relaunch a folder (how it
    was started, not the setting). A run whose sharpness was measured after it finished (end_settings_command)
    shows the one command that gives both, as train.py writes the same final.json either way."""
    config = next((r["config"] for r in runs if r["config"].get("command")), None)
    if config is None:
        return "–"
    later = shlex.split(config.get("end_settings_command", ""))
    tokens = shlex.split(config["command"]) + (later[later.index("train.py") + 1:] if later else [])
    command = re.sub(r" --(overwrite|resume)\b", "", shlex.join(reproduce.last_wins(tokens)))
    return seed_as_variable(command, runs[0]["config"]["seed"])


def planned_command(group, row, setting):
    """A row with no run folder yet: the train.py command reproduce.py would run (its default data dir and device)."""
    run = reproduce.runs_of([group._replace(rows=[row._replace(seeds=(0,))])], setting, reproduce.DATA_DIR, "auto")[0]
    return seed_as_variable("python train.py " + shlex.join(run.args), 0)


def seed_as_variable(command, seed):
    """One command line for all of a row's seeds: its --seed and its folder's -s<seed> become $SEED."""
    seed = str(seed)
    return re.sub(rf"(--seed {seed}\b|-s{seed}\b)", lambda m: m.group(0)[:-len(seed)] + "$SEED", command)


def by_folder(root, runs):
    """{folder relative to root: run}, how reproduce.py names a row's seeds (group/label-sSEED)."""
    return {os.path.relpath(r["folder"], root): r for run in runs for r in [run] + run.get("copies", [])}


def claim_rows(root, runs):
    """The setting in force (results/setting.json, None without one), its train.py arguments (the first candidate's
    without one), reproduce.py's claim groups for it and {'group/label': the runs of that row's seeds under root},
    with the selection candidates that rows are judged against as rows too ('select/<candidate>/sam' and '/sgd')."""
    setting_path = os.path.join(root, "setting.json")
    setting = None
    if os.path.exists(setting_path):
        setting = reproduce.read_setting(setting_path)
    setting_args = setting["args"] if setting else next(iter(reproduce.CANDIDATES.values()))
    groups = reproduce.claims(setting_args)
    by_path = by_folder(root, runs)
    rows = {f"{g.name}/{row.label}": distinct([by_path[p] for s in row.seeds
                                               if (p := f"{g.name}/{row.label}-s{s}") in by_path])
            for g in groups for row in g.rows}
    for name in {ran_in(row) for g in groups for row in g.rows} - {None}:   # with their SGD, for the gate
        rows.update({f"select/{name}/{variant}": candidate_runs(by_path, name, variant) for variant in ("sgd", "sam")})
    return setting, setting_args, groups, rows


def distinct(runs):
    """A row's runs with each run once: a copy of one seed's folder under another seed's name (same settings and seed)
    is not a second seed; of the two, finished_first counts, as in load_runs."""
    kept = {}
    for run in runs:
        key = identity(run["config"])
        kept[key] = finished_first(kept[key], run) if key in kept else run
    return list(kept.values())


def candidate(reference):
    """The selection candidate a reference 'select/<candidate>/<optimizer>' names, else None."""
    return reference.split("/")[1] if str(reference).startswith("select/") else None


def judged_by(row):
    """The selection candidate whose runs a row's checks are judged against, else None."""
    return next((name for *_, reference, _ in row.expect if (name := candidate(reference))), None)


def ran_in(row):
    """The selection candidate whose setting a row ran in (its arguments end the row's flags, as in reproduce.py's
    rows where SGD fits), else the one it is judged against, else None (the claims' setting)."""
    return next((name for name, args in reproduce.CANDIDATES.items() if row.flags[-len(args):] == args), judged_by(row))


def gate(rows, name=None):
    """SAM above SGD (test accuracy) in the setting a row ran in: selection candidate name's, else the claims'."""
    where = f"select/{name}" if name else "core"
    return verdict(values(rows[f"{where}/sam"], "test_acc"), ">", values(rows[f"{where}/sgd"], "test_acc"))


def results_md(root, runs):
    """Markdown of every claim group of reproduce.py found under root, or None when there is none."""
    by_path = by_folder(root, runs)
    setting, setting_args, groups, rows = claim_rows(root, runs)
    if not any(rows[f"{g.name}/{row.label}"] for g in groups for row in g.rows):
        return None
    stand_in = device_controls(groups, rows)
    parts = ["# Results (made by `python plots.py results/`)"]
    if setting:
        parts.append(f"Setting: `{' '.join(reproduce.COMMON + setting['args'])}` ({setting['name']}), chosen by the rule: "
                     f"{setting['rule']}.\n\n" + selection_md(root, by_path, setting["name"]))
        parts += selection_statistics_md(selection_sam_runs(root, runs), groups)
    claims_gate = gate(rows)
    parts.append(f"Verdicts: {RULE}. SAM above SGD in this setting (test accuracy): **{claims_gate}**"
                 + ("" if claims_gate == "holds" else "; so every accuracy verdict below reads \"can't tell here\"")
                 + ". A row that ran in a selection candidate's setting (its checks name `select/...`) takes that "
                 "candidate's SAM against SGD instead, in each of its accuracy checks.")
    for group in groups:
        metrics = list(dict.fromkeys(m for row in group.rows for m, *_ in row.expect)) or ["test_acc"]
        if "test_acc" not in metrics:
            metrics.insert(0, "test_acc")
        if set(metrics) & set(SHARPNESS):   # the trace is measured with them, and carries its own uncertainty
            metrics.append("trace")
        lines = [f"## {group.claim}", "", "| row | n | " + " | ".join(METRICS[m][0] for m in metrics)
                 + " | ran on | command |", "|---|---|" + "---|" * (len(metrics) + 2)]
        checks = ["", "| row | measure | ours | reference | the notes | verdict |", "|---|---|---|---|---|---|"]
        for row in group.rows:
            mine = rows[f"{group.name}/{row.label}"]
            finished = sum(1 for r in mine if r["final"])
            diverged = sum(1 for r in mine if r["diverged"])
            n = f"{finished}" + (f" (+{diverged} diverged)" if diverged else "")
            command = row_command(mine) if mine else planned_command(group, row, setting_args)
            lines.append(f"| {row.label} | {n} | " + " | ".join(cell(mine, m) for m in metrics)
                         + f" | {devices(mine)} | `{command}` |")
            for metric, op, reference, words in row.expect:
                ref_values = reference if isinstance(reference, (int, float)) else values(rows[reference], metric)
                shown = f"{reference:g}" if isinstance(reference, (int, float)) else f"{reference}: {mean_std(ref_values)}"
                ours_on, ref_on = devices(mine), devices(rows[reference]) if isinstance(reference, str) else None
                controls = stand_in.get((reference, ours_on), []) if "--device" not in row.flags else []
                control = next((c for c in controls if values(rows[c], metric)), None)
                if ref_values and values(mine, metric) and ref_on and ours_on != ref_on:   # the device alone moves a row
                    if control:
                        ref_values = values(rows[control], metric)
                        shown = f"{control}: {mean_std(ref_values)} (the same row run on {ours_on}; {shown} on {ref_on})"
                    else:
                        shown += f" (on {ref_on}; this row on {ours_on})"
                result = verdict(values(mine, metric), op, ref_values)
                if metric in ACCURACY and gate(rows, ran_in(row)) != "holds" and result != "can't tell (n < 2)":
                    result = f"can't tell here ({result})"
                if metric in SHARPNESS and result != "can't tell (n < 2)" and (
                        at_chance(mine) or isinstance(reference, str) and at_chance(rows[reference])):
                    result = "can't tell (a row at chance train accuracy)"
                checks.append(f"| {row.label} | {METRICS[metric][0]} {op} | {mean_std(values(mine, metric))} | {shown} "
                              f"| {words} | {result} |")
        parts.append("\n".join(lines + (checks if len(checks) > 3 else [])))
    return "\n\n".join(parts) + "\n"


def selection_md(root, by_path, chosen):
    """The selection table from the run folders of results/select (every candidate, finished or not) and what the
    rule picks from them now, which differs from the setting in force only until `reproduce.py choose` runs."""
    lines = ["| candidate | n (SGD / SAM) | ran on | SGD final train acc | SGD val acc | SAM val acc | SAM - SGD val "
             "| SGD test acc | SAM test acc |", "|---|---|---|---|---|---|---|---|---|"]
    for name in reproduce.CANDIDATES:
        sgd, sam = (candidate_runs(by_path, name, v) for v in ("sgd", "sam"))
        sgd_val, sam_val = values(sgd, "val_acc"), values(sam, "val_acc")
        if not sgd_val + sam_val:   # a run still going counts once it ends (as in a clean clone)
            lines.append(f"| {name} | 0 / 0 | not run | | | | | | |")
            continue
        gain, spread = difference(sam_val, sgd_val) if sgd_val and sam_val else (math.nan, math.nan)
        gain = "–" if math.isnan(gain) else f"{gain:+.3g}" + ("" if math.isnan(spread) else f" ± {spread:.2g}")
        lines.append(f"| {'**' + name + '** (chosen)' if name == chosen else name} | {len(sgd_val)} / {len(sam_val)} | "
                     f"{devices(sgd + sam)} | {mean_std(values(sgd, 'train_acc'))} | {mean_std(sgd_val)} | "
                     f"{mean_std(sam_val)} | {gain} | {mean_std(values(sgd, 'test_acc'))} | {mean_std(values(sam, 'test_acc'))} |")
    now = reproduce.rule_choice(reproduce.candidate_table(pathlib.Path(root)))
    if now is not None and now != chosen:
        lines.append(f"\nThe finished selection runs now point to **{now}** by the rule; the claims below ran in {chosen}. "
                     "`python reproduce.py choose` switches the setting, and `claims` then reports every claims folder "
                     "of the old one as stale.")
    return "\n".join(lines)


def selection_statistics_md(settings, groups):
    """Claims 1 and 3 in every candidate setting: the checks of the geometry row that the selection's SAM runs
    answer (statistics every 25 steps; persistence needs --persist-from), mean ± std over seeds and the verdict.
    A list of one markdown part, empty without selection runs or a geometry group."""
    row = next((row for g in groups if g.name == "geometry" for row in g.rows), None)
    if not settings or row is None:
        return []
    checks = [(m, op, ref) for m, op, ref, _ in row.expect if any(values(runs, m) for runs in settings.values())]
    mark = {"holds": "✓", "does not hold": "✗"}
    lines = ["| candidate | n | SAM final train acc (%) | " + " | ".join(f"{METRICS[m][0]} {op} {ref:g}" for m, op, ref in checks)
             + " |", "|---|---|---|" + "---|" * len(checks)]
    for name, runs in settings.items():
        cells = [f"{mean_std(values(runs, m))} {mark.get(verdict(values(runs, m), op, ref), '?')}" for m, op, ref in checks]
        lines.append(f"| {name} | {len(runs)} | {mean_std(values(runs, 'train_acc'))} | " + " | ".join(cells) + " |")
    return ["Claims 1 and 3 in each candidate setting (the selection's SAM runs, ρ 0.1, statistics every 25 steps, so "
            "the first tenth holds step 0; the geometry group below logs every step): ✓ holds, ✗ does not hold, ? can't "
            "tell, by the rule below.\n\n" + "\n".join(lines)]


def device_controls(groups, rows):
    """(reference row, device) -> the rows that pin --device (the device control, as reproduce.runs_of reads it) and
    rerun that reference there. A row that ran on that device is judged against the first of them that measured
    the metric (SAM's accuracy may come from one rerun and its sharpness from another)."""
    controls = {}
    for group in groups:
        for row in group.rows:
            if "--device" in row.flags:
                name = f"{group.name}/{row.label}"
                controls.setdefault((row.expect[0][2], devices(rows[name])), []).append(name)
    return controls


def results_figures(root, runs, out):
    """Claims 1-3 from the geometry group: checkpoint shares, fine bins, persistence, mag_up (band: seeds' std);
    claims 1 and 3 in every candidate setting from the selection's SAM runs; the curves of the rows run in a
    candidate's setting beside its SGD and SAM."""
    groups = geometry_rows(root, runs)
    settings = selection_sam_runs(root, runs)
    fitting = fitting_rows(root, runs)
    if not groups and not settings and not fitting:
        return []
    os.makedirs(out, exist_ok=True)
    return [plot(groups, out) for plot in (plot_ckpt_shares, plot_ckpt1_bins, plot_persistence, plot_mag_up)
            if groups] + ([plot_shares_by_setting(settings, out)] if settings else []) + [
        plot_curves(lines, out, f"fits-{name}", f"Claims rows in the setting of selection candidate {name}", "log")
        for name, lines in fitting.items()]


def fitting_rows(root, runs):
    """{candidate: {label: runs}} for the claims rows judged against a selection candidate's runs (where SGD fits
    its training set) that have run, after that candidate's SGD and SAM: one figure of curves per candidate."""
    *_, groups, rows = claim_rows(root, runs)
    found = {}
    for group in groups:
        for row in group.rows:
            name = judged_by(row)
            # a row run for more epochs (LookSAM at SAM's wall time) would squeeze the others on the shared epoch
            # axis: it stays in the tables only
            if name and rows[f"{group.name}/{row.label}"] and \
                    reproduce.value(row.flags, "--epochs") == reproduce.value(reproduce.CANDIDATES[name], "--epochs"):
                lines = found.setdefault(name, {f"{v} (selection)": rows[f"select/{name}/{v}"] for v in ("sgd", "sam")})
                lines[row.label] = rows[f"{group.name}/{row.label}"]
    return found


def geometry_rows(root, runs):
    """{'N images, E epochs': runs} for each row of the geometry group that has run, in reproduce.py's order: one
    line per row in the claim 1-3 figures (the setting, and where SGD fits its training set)."""
    *_, groups, rows = claim_rows(root, runs)
    found = {}
    for row in next((g.rows for g in groups if g.name == "geometry"), ()):
        for run in rows[f"geometry/{row.label}"]:
            config = run["config"]
            found.setdefault(f"{config['subset']:,} images, {config['epochs']} epochs", []).append(run)
    return found


def candidate_runs(by_path, name, variant):
    """A selection candidate's runs of one optimizer, finished or not, over the seeds reproduce.py gives it."""
    return distinct([by_path[p] for s in reproduce.select_seeds(name) if (p := f"select/{name}/{variant}-s{s}") in by_path])


def selection_sam_runs(root, runs):
    """{candidate: its finished SAM runs} from results/select, in reproduce.CANDIDATES order, candidates with none left out."""
    by_path = by_folder(root, runs)
    settings = {name: [run for run in candidate_runs(by_path, name, "sam") if run["final"]] for name in reproduce.CANDIDATES}
    return {name: found for name, found in settings.items() if found}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="folder holding train.py run folders (searched recursively)")
    parser.add_argument("--out", default="figures", help="folder for the PNGs and tables.md (results.md)")
    parser.add_argument("--toy", help="folder with toy.py's CSVs to tabulate too")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs):
        parser.error(f"runs folder {args.runs!r} does not exist or is not a folder")
    if args.toy and not os.path.isdir(args.toy):
        parser.error(f"--toy folder {args.toy!r} does not exist or is not a folder")
    if args.toy and not {"sensing_rho.csv", "landscape_ends.csv"} & set(os.listdir(args.toy)):
        parser.error(f"--toy folder {args.toy!r} holds neither sensing_rho.csv nor landscape_ends.csv (toy.py writes them)")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        parser.error(f"cannot create --out {args.out!r}: {err.strerror}")

    runs, skipped = load_runs(args.runs)
    for folder, why in skipped:
        print(f"skipped {folder}: {why}")
    if not runs:
        print(f"error: no usable run folders under {args.runs!r}", file=sys.stderr)
        return 1
    results = results_md(args.runs, runs)
    # reproduce.py's results/ has its own tables and figures, one per claim, its rows by folder
    groups = {} if results else group_runs(runs)
    counted = [run for seeds in groups.values() for run in seeds] if groups else runs
    unfinished = [run["name"] for run in counted if not run["final"]]
    if unfinished:
        print(f"unfinished (plotted, not in the table): {', '.join(unfinished)}")
    print(f"{len(counted)} runs" + (f" in {len(groups)} groups" if groups else ""))
    if not results:
        for plot in (plot_ckpt_shares, plot_ckpt1_bins, plot_persistence, plot_curves, plot_mag_up):
            name = plot.__name__.removeprefix("plot_")
            column, flag = STATISTICS.get(name, (None, None))
            if column and not any(np.any(run["steps"].get(column, np.array([])) > 0) for run in runs):
                print(f"skipped {name}.png: no run logged {column} in steps.csv ({flag})")
            else:
                print("wrote", plot(groups, args.out))
        tables = ["Final test accuracy (%), loss and sharpness: mean ± sample std (ddof=1) over finished seeds "
                  "(n k: over the k of them that measured it).\n\n"
                  + results_table(groups)] + (toy_tables(args.toy) if args.toy else [])
        text = "\n\n".join(tables) + "\n"
        print(text)
        with open(os.path.join(args.out, "tables.md"), "w") as f:
            f.write(text)
        print("wrote", os.path.join(args.out, "tables.md"))
    else:
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(results)
        print("wrote", os.path.join(args.out, "results.md"))
        for path in results_figures(args.runs, runs, os.path.join(args.out, "results")):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
