"""Regenerate the README's training figures and tables from saved train.py runs (and toy.py CSVs).

    python plots.py runs/ --out figures/              # every run folder under runs/
    python plots.py runs/ --out figures/ --toy figures/   # also tabulate toy.py's CSVs

Runs are grouped by (dataset, model, variant, rho, condition); seeds are averaged (mean, and a band
of +- one sample standard deviation). Unfinished runs (no final.json, partial CSVs) are plotted but
left out of the final-accuracy table; runs that cannot be read are skipped with the reason.
"""
import argparse
import csv
import json
import math
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sam import FINE_NAMES as FINE   # the r > 1 sub-bins, as steps.csv names them

GROUP_KEYS = ("dataset", "model", "variant", "rho", "condition")
CKPTS = ("ckpt1", "ckpt2", "ckpt3", "ckpt4")
DPI = 80
# every figure, its size in inches (tests check the PNG's pixels against size * DPI)
FIGURES = {"ckpt_shares": (16, 4), "ckpt1_bins": (15, 4.5), "persistence": (12, 4),
           "curves": (13, 8), "mag_up": (8, 4.5)}


class Skip(Exception):
    """A run folder that cannot be used, with the reason."""


# ----------------------------------------------------------------------------- reading
def read_csv(path):
    """Columns of a CSV as float arrays (empty cells: NaN). A run still being written may end in a
    cut-off line: rows whose field count differs from the header's are dropped."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
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
    except (OSError, json.JSONDecodeError) as err:
        raise Skip(f"unreadable config.json ({err})") from None
    for key, value in config.get("sam_flags", {}).items():   # train.py's effective flags: the preset's
        if config.get(key) is None:                            # rho or condition where none was given
            config[key] = value
    missing = [k for k in GROUP_KEYS if k not in config]
    if missing:
        raise Skip(f"config.json lacks {', '.join(missing)}")
    run = dict(name=os.path.basename(folder.rstrip("/")), config=config, final=None)
    for table in ("steps", "epochs"):
        path = os.path.join(folder, f"{table}.csv")
        run[table] = read_csv(path) if os.path.exists(path) else {}
    if not any(len(col) for table in ("steps", "epochs") for col in run[table].values()):
        raise Skip("no rows in steps.csv or epochs.csv yet")
    try:
        with open(os.path.join(folder, "final.json")) as f:
            run["final"] = json.load(f)
    except FileNotFoundError:
        pass   # still running: curves yes, final table no
    except (OSError, json.JSONDecodeError) as err:
        raise Skip(f"unreadable final.json ({err})") from None
    return run


def load_runs(root):
    """Every run folder under root (a folder holding config.json), and the skipped ones with reasons."""
    runs, skipped = [], []
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        if "config.json" not in files and not {"steps.csv", "epochs.csv", "final.json"} & set(files):
            continue
        try:
            runs.append(load_run(folder))
        except Skip as why:
            skipped.append((folder, str(why)))
    return runs, skipped


def group_runs(runs):
    groups = {}
    for run in runs:
        groups.setdefault(tuple(run["config"][k] for k in GROUP_KEYS), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])))


def label(key, keys):
    """Only the settings that differ between groups, so legends stay short."""
    varying = [i for i, k in enumerate(GROUP_KEYS) if len({kk[i] for kk in keys}) > 1] or [2]
    return " ".join(f"{GROUP_KEYS[i]}={key[i]}" if GROUP_KEYS[i] != "variant" else str(key[i]) for i in varying)


def seed_mean(runs, table, x, y):
    """Mean and sample std over seeds of column y at each value of x present in any run."""
    per_x = {}
    for run in runs:
        cols = run[table]
        if x in cols and y in cols:
            for xv, yv in zip(cols[x], cols[y]):
                if math.isfinite(yv):
                    per_x.setdefault(xv, []).append(yv)
    xs = np.array(sorted(per_x))
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
    the running intersection, both as a percentage of the t0 set."""
    fig, axes = plt.subplots(1, 2, figsize=FIGURES["persistence"], sharey=True)
    for i, (key, runs) in enumerate(groups.items()):
        for run in runs:   # per-run ratios first: t0 set sizes differ between seeds
            cols = run["steps"]
            if "persist_t0" in cols:
                t0 = np.where(cols["persist_t0"] > 0, cols["persist_t0"], np.nan)
                cols["overlap_pct"] = 100 * cols["persist_overlap"] / t0
                cols["running_pct"] = 100 * cols["persist_running"] / t0
        for ax, col in zip(axes, ("overlap_pct", "running_pct")):
            _band(ax, runs, "steps", "step", col, color=f"C{i % 10}", label=label(key, groups))
    axes[0].set(xlabel="step", ylabel="% of the checkpoint-1 set at t0", title="overlap with the set at t0 (Exp. 2)")
    axes[1].set(xlabel="step", title="running intersection since t0 (Exp. 3)", yscale="symlog")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "persistence")


def plot_curves(groups, out):
    """Accuracy and loss per epoch for each group, train and test."""
    fig, axes = plt.subplots(2, 2, figsize=FIGURES["curves"], sharex=True)
    panels = (("train_acc", "train accuracy (%)"), ("test_acc", "test accuracy (%)"),
              ("train_loss", "train loss"), ("test_loss", "test loss"))
    for ax, (col, name) in zip(axes.flat, panels):
        for i, (key, runs) in enumerate(groups.items()):
            _band(ax, runs, "epochs", "epoch", col, color=f"C{i % 10}", label=label(key, groups))
        ax.set(xlabel="epoch", ylabel=name)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Accuracy and loss per epoch (mean over seeds, band: ±1 std)")
    fig.tight_layout()
    return _save(fig, out, "curves")


def plot_mag_up(groups, out):
    """Seed 002, Exp. 3: share of coordinates where SAM's gradient is larger than SGD's, |g'| > |g|."""
    fig, ax = plt.subplots(figsize=FIGURES["mag_up"])
    for i, (key, runs) in enumerate(groups.items()):
        _band(ax, runs, "steps", "step", "mag_up", color=f"C{i % 10}", label=label(key, groups))
    ax.set(xlabel="step", ylabel="coordinates with |g'| > |g| (%)", title="Where the perturbed gradient is larger")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, "mag_up")


# ----------------------------------------------------------------------------- tables
def results_table(groups):
    """Markdown: final test accuracy, loss and sharpness per group, mean ± std over finished seeds."""
    lines = ["| dataset | model | variant | rho | condition | seeds | test acc (best val) | test acc (last) "
             "| test loss (last) | lambda_max | trace |", "|" + "---|" * 11]
    for key, runs in groups.items():
        done = [run["final"] for run in runs if run["final"]]
        if not done:
            continue
        sharp = [f.get("sharpness") or {} for f in done]
        cells = [mean_std([f.get("test_acc_best") for f in done]), mean_std([f.get("test_acc_last") for f in done]),
                 mean_std([f.get("test_loss_last") for f in done]), mean_std([s.get("lambda_max") for s in sharp]),
                 mean_std([s.get("trace") for s in sharp])]
        lines.append("| " + " | ".join(str(k) for k in key) + f" | {len(done)} | " + " | ".join(cells) + " |")
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
        with open(ends, newline="") as f:
            rows = list(csv.DictReader(f))
        lines = ["| landscape | variant | end | basin | loss | lambda_max |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['landscape']} | {r['variant']} | ({float(r['x']):.2f}, {float(r['y']):.2f}) | {r['basin']} "
                  f"| {float(r['loss']):.4f} | {float(r['lambda_max']):.3f} |" for r in rows]
        parts.append("2D landscapes (toy.py landscape), where each variant ends:\n\n" + "\n".join(lines))
    return parts


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="folder holding train.py run folders (searched recursively)")
    parser.add_argument("--out", default="figures", help="folder for the PNGs and tables.md")
    parser.add_argument("--toy", help="folder with toy.py's CSVs to tabulate too")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs):
        parser.error(f"runs folder {args.runs!r} does not exist or is not a folder")
    if args.toy and not os.path.isdir(args.toy):
        parser.error(f"--toy folder {args.toy!r} does not exist or is not a folder")
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
    unfinished = [run["name"] for run in runs if not run["final"]]
    if unfinished:
        print(f"unfinished (plotted, not in the table): {', '.join(unfinished)}")
    groups = group_runs(runs)
    print(f"{len(runs)} runs in {len(groups)} groups")
    for plot in (plot_ckpt_shares, plot_ckpt1_bins, plot_persistence, plot_curves, plot_mag_up):
        print("wrote", plot(groups, args.out))
    tables = ["Final test accuracy (%), loss and sharpness: mean ± sample std (ddof=1) over finished seeds.\n\n"
              + results_table(groups)] + (toy_tables(args.toy) if args.toy else [])
    text = "\n\n".join(tables) + "\n"
    print(text)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(text)
    print("wrote", os.path.join(args.out, "tables.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
