"""Toy experiments that show what SAM does, in seconds on a CPU. Every optimizer is sam.SAM.

    python toy.py                # all three parts; figures and CSVs go to figures/
    python toy.py sensing        # matrix sensing: SAM vs USAM vs GD (Dai, Ahn, Sra 2023; seed 004 App. B)
    python toy.py landscape      # 2D landscapes: the variants' trajectories and where they end
    python toy.py checkpoints    # the notes' four checkpoints drawn on a 1D loss (seed 000)
"""
import argparse
import csv
import math
import os
import tempfile
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sam import SAM

DTYPE = torch.float64   # USAM's loss at rho 0.1 reaches 1.2e39 at step 3: float32 would print inf there


def replace_whole(path, write):
    """write(part) to a file beside path, then rename it to path: a run stopped while it writes (Ctrl-C) leaves
    the file of the run before, whole, not a cut one."""
    part = path + ".part"
    try:
        write(part)
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def write_csv(path, rows):
    def write(part):
        with open(part, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    replace_whole(path, write)


def save_png(fig, path, dpi):
    replace_whole(path, lambda part: fig.savefig(part, format="png", dpi=dpi))


def top_eigenvalue(loss_fn, w):
    """Exact largest Hessian eigenvalue at w (small problems only: builds the full Hessian)."""
    hess = torch.autograd.functional.hessian(lambda v: loss_fn(v.view_as(w)), w.detach().flatten())
    return torch.linalg.eigvalsh(hess)[-1].item()


# ----------------------------------------------------------------------------- 1. matrix sensing
# Seed 004, Appendix B (after Dai, Ahn, Sra 2023): U* in R^{d x r} Gaussian with unit-norm columns,
# X* = U* U*^T, m = 5dr Gaussian sensing matrices A_i, b_i = <A_i, X*>, learning rate 0.5.
# Our choices (the seed states none of them):
#   f(U) = 1/(4m) sum_i (<A_i, U U^T> - b_i)^2 with U in R^{d x d} (full over-parameterisation);
#   U_0 = INIT_SCALE * G / sqrt(d), G standard Gaussian.
# With 1/(4m), lr 0.5 is the largest of {0.25, 0.5, 0.75, 1} at which GD converges (sensing() checks it
# through 2/lambda_max at GD's solution); with 1/(2m) already lr 0.5 does not.
RHOS = (0.001, 0.005, 0.01, 0.1)
LR = 0.5
INIT_SCALE = 0.7
SEED_TABLE = {"sam": (4.714, 2.81, 1.748, 1.199), "usam": (4.872, 22.873, 70595465.0, 1.545e65)}


class Sensing:
    """f(U) = 1/(4m) sum_i (<A_i, U U^T> - b_i)^2 for the seed's ground truth and measurements."""

    def __init__(self, d=100, r=5, seed=0):
        gen = torch.Generator().manual_seed(seed)
        u_star = torch.randn(d, r, generator=gen, dtype=DTYPE)
        u_star /= u_star.norm(dim=0)
        self.x_star = u_star @ u_star.T
        # Only <A_i, X> with X symmetric is ever needed: sum_j A_jj X_jj + sum_{j<k} (A_jk + A_kj) X_jk. So
        # each A_i is stored as those coefficients of X's upper triangle: A_jj ~ N(0, 1) on the diagonal,
        # A_jk + A_kj ~ N(0, 2) off it. Same measurements in an (m, d(d+1)/2) matrix, not (m, d, d).
        self.rows, self.cols = torch.triu_indices(d, d)
        self.A = torch.randn(5 * d * r, len(self.rows), generator=gen, dtype=DTYPE)
        self.A[:, self.rows != self.cols] *= math.sqrt(2)
        self.b = self.A @ self.x_star[self.rows, self.cols]
        self.d, self.gen = d, gen

    def loss(self, U):
        X = U @ U.T
        return (self.A @ X[self.rows, self.cols] - self.b).square().mean() / 4

    def init(self, scale=INIT_SCALE):
        return scale * torch.randn(self.d, self.d, generator=self.gen, dtype=DTYPE) / math.sqrt(self.d)


def run_sensing(prob, U0, variant, rho=0.0, lr=LR, steps=10, eig_every=0):
    """Full-batch GD (variant 'sgd'), SAM or USAM from U0. Returns the loss at every iterate, computed
    here (so USAM's blow-up shows even where sam.py skips a non-finite update), the final U and,
    every eig_every steps, (step, lambda_max averaged over that step and the next three): SAM
    hops across the valley in a 2- to 4-cycle, and one iterate's lambda_max zigzags with the hop."""
    U = U0.clone().requires_grad_()
    opt = SAM([U], torch.optim.SGD, variant=variant, rho=rho, lr=lr, stats_every=0)

    def closure():
        opt.zero_grad()
        loss = prob.loss(U)
        loss.backward()
        return loss

    losses, eigs = [], {}
    for t in range(steps + 1):
        with torch.no_grad():
            losses.append(prob.loss(U).item())
        if eig_every and t % eig_every < 4 and t - t % eig_every + 3 <= steps:
            eigs.setdefault(t - t % eig_every, []).append(top_eigenvalue(prob.loss, U))
        if t < steps:
            opt.step(closure)
    return losses, U.detach(), [(t, sum(lams) / len(lams)) for t, lams in eigs.items()]


def sensing(out, d=100, r=5, steps=10, long_d=20, long_r=2, long_steps=2000):
    """Table III of seed 004 (SAM and USAM for each rho), and the long run on a smaller problem."""
    prob = Sensing(d, r)
    U0 = prob.init()
    rows = []
    for rho in RHOS:
        runs = {v: run_sensing(prob, U0, v, rho, steps=steps)[0] for v in ("sam", "usam")}
        rows += [dict(rho=rho, step=t, sam=runs["sam"][t], usam=runs["usam"][t]) for t in range(steps + 1)]
    gd = run_sensing(prob, U0, "sgd", steps=steps)[0]
    write_csv(os.path.join(out, "sensing_rho.csv"), rows)

    print(f"matrix sensing d={d} r={r} m={5 * d * r}, lr {LR}, f = 1/(4m) sum (<A_i,UU^T> - b_i)^2, "
          f"U0 = {INIT_SCALE} G/sqrt(d); loss at step 0: {gd[0]:.4g}")
    print("rho=0.1 (seed 004 Table III: its 'Step k' read as the loss after k updates)")
    print(f"{'step':>4} {'SAM':>11} {'USAM':>11} {'GD':>11} | {'seed SAM':>9} {'seed USAM':>10}")
    big = [row for row in rows if row["rho"] == 0.1]
    for t in range(1, steps + 1):
        seed = [f"{SEED_TABLE[v][t - 1]:.4g}" if t <= 4 else "" for v in ("sam", "usam")]
        print(f"{t:>4} {big[t]['sam']:>11.4g} {big[t]['usam']:>11.4g} {gd[t]:>11.4g} | {seed[0]:>9} {seed[1]:>10}")
    last = [row for row in rows if row["step"] == steps]
    print(f"loss after {steps} steps (SAM / USAM):", ", ".join(
        f"rho={row['rho']}: {row['sam']:.3g} / {row['usam']:.3g}" for row in last))

    # Which learning rates let GD converge: lr < 2 / lambda_max at the minimum it reaches.
    _, U_gd, _ = run_sensing(prob, U0, "sgd", steps=150)
    lam = _power_eigenvalue(prob.loss, U_gd)
    print(f"GD lr {LR}, 150 steps: loss {prob.loss(U_gd).item():.2e}, lambda_max {lam:.3f}, "
          f"so GD is stable there for lr < {2 / lam:.3f}")

    # Long run (Dai, Ahn, Sra's second claim): from a minimum, SAM keeps drifting along the
    # minima towards a flatter one while GD and USAM stop, because SAM's step rho g/||g|| keeps
    # its length as g -> 0 and USAM's rho g does not. A d=20 problem keeps the exact Hessian cheap.
    # Phase 1: GD at lr 0.5 to a minimum. Phase 2: GD, SAM and USAM at lr 0.1, rho 0.1; at lr 0.5 SAM
    # hops across the valley along the top eigenvector, and lambda_max measured at its iterate mostly
    # shows that hop, not where along the valley it is.
    small = Sensing(long_d, long_r)
    _, U_min, _ = run_sensing(small, small.init(), "sgd", steps=long_steps)
    long_rows = []
    for variant in ("sgd", "sam", "usam"):
        losses, _, eigs = run_sensing(small, U_min, variant, rho=0.1, lr=0.1, steps=long_steps + 3,
                                      eig_every=long_steps // 4)
        lams = dict(eigs)
        long_rows += [dict(variant=variant, step=t, loss=loss, lambda_max=lams.get(t, math.nan))
                      for t, loss in enumerate(losses[: long_steps + 1])]
    write_csv(os.path.join(out, "sensing_long.csv"), [row for row in long_rows if row["step"] % 10 == 0])
    print(f"long run, d={long_d} r={long_r}, from GD's minimum, lr 0.1, rho 0.1: lambda_max (loss) at step "
          f"0 -> {long_steps}:")
    for variant in ("sgd", "sam", "usam"):
        first, *_, last = [row for row in long_rows if row["variant"] == variant and math.isfinite(row["lambda_max"])]
        print(f"  {variant:>4}: {first['lambda_max']:.4f} ({first['loss']:.1e}) -> "
              f"{last['lambda_max']:.4f} ({last['loss']:.1e})")
    _plot_sensing(os.path.join(out, "sensing.png"), rows, gd, long_rows, steps, d, long_d)


def _power_eigenvalue(loss_fn, w, iters=50):
    """Largest Hessian eigenvalue by power iteration on Hessian-vector products (big problems)."""
    w = w.detach().requires_grad_()
    grad, = torch.autograd.grad(loss_fn(w), w, create_graph=True)
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    for _ in range(iters):
        v = v / v.norm()
        hv, = torch.autograd.grad(grad, w, v, retain_graph=True)
        lam, v = (hv * v).sum().item(), hv
    return lam


def _plot_sensing(path, rows, gd, long_rows, steps, d, long_d):
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.cm.viridis([0.0, 0.35, 0.65, 0.9])
    cap = 1e6   # USAM at rho = 0.1 leaves any sensible axis: draw it up to here, then mark it
    for rho, color in zip(RHOS, colors):
        run = [row for row in rows if row["rho"] == rho]
        ax1.plot([r["step"] for r in run], [r["sam"] for r in run], "-o", ms=3, color=color, label=f"SAM rho={rho}")
        usam = [min(r["usam"], cap) if math.isfinite(r["usam"]) else cap for r in run]
        ax1.plot([r["step"] for r in run], usam, "--x", ms=4, color=color, label=f"USAM rho={rho}")
    ax1.plot(range(steps + 1), gd, ":", color="gray", label="GD")
    ax1.set(yscale="log", ylim=(None, cap * 2), xlabel="step", ylabel="training loss f(U)",
            title=f"Matrix sensing d={d}, lr {LR} (USAM clipped at 1e6)")
    ax1.legend(fontsize=7, ncol=2)
    styles = {"sgd": ("GD (under USAM)", "k", ":"), "sam": ("SAM", "C0", "-"), "usam": ("USAM", "C3", "-")}
    for variant, (label, color, ls) in styles.items():
        run = [row for row in long_rows if row["variant"] == variant]
        loss = torch.tensor([r["loss"] for r in run]).unfold(0, 4, 1).mean(1)   # mean over SAM's cycle
        ax2.plot(range(len(loss)), loss, ls, color=color, label=label, zorder=3 if ls == ":" else 2)
        run = [row for row in run if math.isfinite(row["lambda_max"])]
        ax3.plot([r["step"] for r in run], [r["lambda_max"] for r in run], ls, marker="o", ms=3, color=color,
                 label=label, zorder=3 if ls == ":" else 2)
    ax2.set(yscale="log", xlabel="step after reaching a minimum", ylabel="training loss (mean of 4 iterates)",
            title=f"Long run d={long_d} from GD's minimum, lr 0.1, rho 0.1")
    ax3.set(xlabel="step after reaching a minimum", ylabel="top Hessian eigenvalue (mean of 4 iterates)",
            title="Sharpness: only SAM keeps moving")
    for ax in (ax2, ax3):
        ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- 2. 2D landscapes
class Landscape:
    """A 2D loss with its start point, lr, rho and steps; where(w) names the basin an end point is in.
    samples(w) gives per-example losses where the loss is a mean over examples (SSAM-F's Fisher),
    split(w) a (head, tail) pair of losses summing to the loss (ImbSAM)."""

    def __init__(self, name, loss, start, lr, rho, steps, box, where, samples=None, split=None):
        self.name, self.loss, self.start, self.lr, self.rho, self.steps = name, loss, start, lr, rho, steps
        self.box, self.where, self.samples, self.split = box, where, samples, split


def _bowls(w):
    x, y = w[..., 0], w[..., 1]
    sharp = 8 / 2 * ((x + 1) ** 2 + (y - 0.5) ** 2) - 0.3   # curvature 8, depth -0.3
    flat = 0.4 / 2 * ((x - 1.5) ** 2 + (y + 0.5) ** 2)      # curvature 0.4, depth 0
    return sharp, flat


def two_basins(w):
    """The lower of two quadratic bowls: a sharp deeper one at (-1, 0.5), a flat one at (1.5, -0.5).
    With lr 0.22, GD is stable in the sharp bowl (lr * 8 = 1.76 < 2), but SAM's step keeps a part
    lr * 8 * rho that does not shrink as g -> 0, and it bounces out (amplitude ~ 1.76 rho / 0.24)."""
    return torch.minimum(*_bowls(w))


def hyperbola(w):
    """f = (xy - 1)^2 / 2: a continuum of minima xy = 1 whose sharpness x^2 + y^2 is least at (1, 1)
    (the example behind Dai, Ahn, Sra's "SAM drifts along the manifold")."""
    return (w[..., 0] * w[..., 1] - 1) ** 2 / 2


def logistic_toy(seed=0, n=100, flip=0.25):
    """Origin 4.6: blobs at (1,1) and (-1,-1), covariances [[1, +-0.25], [+-0.25, 1]], 25% labels flipped,
    linear logistic model without bias. Returns (loss, per-example losses, head/tail split, where)."""
    gen = torch.Generator().manual_seed(seed)
    half = n // 2
    x = torch.cat([_blob(gen, half, (1.0, 1.0), 0.25), _blob(gen, n - half, (-1.0, -1.0), -0.25)])
    clean = torch.cat([torch.ones(half, dtype=DTYPE), torch.zeros(n - half, dtype=DTYPE)])
    y = clean.clone()
    flipped = torch.randperm(n, generator=gen)[: int(flip * n)]
    y[flipped] = 1 - y[flipped]

    def samples(w):   # per-example BCE; w may carry leading grid dims (..., 2)
        logits = (w[..., None, :] * x).sum(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")

    def split(w):     # ImbSAM's class split: label 0 is the "head", label 1 the "tail" class
        per = samples(w)
        return (per * (y == 0)).sum(-1) / n, (per * (y == 1)).sum(-1) / n

    def where(w):     # one convex basin: report how well w separates the clean labels
        return f"clean acc {100 * ((x @ w > 0).double() == clean).double().mean().item():.0f}%"

    return (lambda w: samples(w).mean(-1)), samples, split, where


def _blob(gen, n, mean, cov):
    chol = torch.linalg.cholesky(torch.tensor([[1.0, cov], [cov, 1.0]], dtype=DTYPE))
    return torch.randn(n, 2, generator=gen, dtype=DTYPE) @ chol.T + torch.tensor(mean, dtype=DTYPE)


def landscapes():
    loss, samples, split, where = logistic_toy()
    return [
        Landscape("two_basins", two_basins, (-0.6, 0.9), lr=0.22, rho=0.1, steps=150, box=(-2.5, 3.5, -2.5, 2.5),
                  where=lambda w: "sharp" if _bowls(w)[0] < _bowls(w)[1] else "flat"),
        Landscape("hyperbola", hyperbola, (0.4, 2.6), lr=0.05, rho=0.2, steps=200, box=(0, 2.8, 0, 2.8),
                  where=lambda w: f"xy=1 at x={w[0].item():.2f}"),   # sharpness there: x^2 + y^2
        Landscape("logistic", loss, (1.0, -5.0), lr=0.1, rho=2.0, steps=100, box=(-6, 6, -6, 6),
                  where=where, samples=samples, split=split),
    ]


# Panels of the landscape figures: which variants share a contour plot.
PANELS = {
    "ascent: ball and scale": ("sgd", "sam", "usam", "asam", "linf-sign", "linf-norm"),
    "peers: sparse, Fisher, friendly, imb": ("sam", "friendlysam", "ssamf", "ssamd", "fishersam", "imbsam"),
    "SAME: c g' on one checkpoint": ("sam", "samme1", "samme2", "samme3", "samme4"),
    "magnitude vs direction": ("sgd", "sam", "sammagnitude", "samdirection"),
}
MASK_EVERY = 10   # sparse SAM: steps between mask updates (the peers' update_freq, in steps here)


def trajectory(land, variant, steps=None):
    """Iterates of SAM(variant) on a landscape, every step through sam.py's two-step API."""
    steps = land.steps if steps is None else steps
    torch.manual_seed(0)   # SSAM-D grows its mask at random from torch's global generator
    w = torch.tensor(land.start, dtype=DTYPE, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, variant=variant, rho=land.rho, lr=land.lr, stats_every=0)
    path = [w.detach().clone()]
    for t in range(steps):
        if opt.sparse and t % MASK_EVERY == 0:
            _refresh_mask(opt, land, w, t / steps)
        if variant == "imbsam":   # head loss clean, tail loss perturbed (peers 8)
            head, tail = land.split(w)
            head.backward(retain_graph=True)
            opt.stash_clean_grad()
            tail.backward()
            opt.first_step(zero_grad=True)
            land.split(w)[1].backward()
        else:
            land.loss(w).backward()
            opt.first_step(zero_grad=True)
            if opt.perturbed:     # one-pass variants (sgd) finished the step in first_step
                land.loss(w).backward()
        opt.second_step(zero_grad=True)
        path.append(w.detach().clone())
    return torch.stack(path)


def _refresh_mask(opt, land, w, progress):
    """SSAM-F scores coordinates by the empirical Fisher (squared per-example gradients, or the
    squared full gradient where there are no examples); SSAM-D drops by |g| of the current batch."""
    if opt.flags["mask_mode"] == "fisher" and land.samples is not None:
        for per_example in land.samples(w)[:16]:   # 16 examples, as the Sparse SAM README's num_samples
            opt.zero_grad()
            per_example.backward(retain_graph=True)
            opt.accumulate_fisher()
    else:
        opt.zero_grad()
        land.loss(w).backward()
        if opt.flags["mask_mode"] == "fisher":
            opt.accumulate_fisher()
    opt.update_mask(progress)
    opt.zero_grad()


def endpoint(land, path):
    """Where a trajectory ends: its basin, the loss and the curvature there."""
    end = path[-1]
    return dict(landscape=land.name, x=round(end[0].item(), 4), y=round(end[1].item(), 4),
                loss=land.loss(end).item(), basin=land.where(end), lambda_max=top_eigenvalue(land.loss, end))


def landscape(out):
    variants = list(dict.fromkeys(v for vs in PANELS.values() for v in vs))
    rows = []
    for land in landscapes():
        paths = {v: trajectory(land, v) for v in variants if v != "imbsam" or land.split is not None}
        rows += [dict(variant=v, **endpoint(land, p)) for v, p in paths.items()]
        _plot_landscape(os.path.join(out, f"landscape_{land.name}.png"), land, paths)
    write_csv(os.path.join(out, "landscape_ends.csv"), rows)
    print("| landscape | variant | end (x, y) | loss | basin | lambda_max |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['landscape']} | {r['variant']} | ({r['x']:.2f}, {r['y']:.2f}) | {r['loss']:.4f} | "
              f"{r['basin']} | {r['lambda_max']:.3f} |")


def _plot_landscape(path, land, paths):
    x0, x1, y0, y1 = land.box
    gx, gy = torch.meshgrid(torch.linspace(x0, x1, 80, dtype=DTYPE), torch.linspace(y0, y1, 80, dtype=DTYPE),
                            indexing="xy")
    with torch.no_grad():
        z = land.loss(torch.stack([gx, gy], -1))
    levels = torch.quantile(z.flatten(), torch.linspace(0, 1, 25, dtype=DTYPE)).unique()   # spread over the valleys too
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 4.2))
    for ax, (title, variants) in zip(axes, PANELS.items()):
        ax.contourf(gx, gy, z, levels=levels, cmap="Greys_r", alpha=0.55)
        ax.contour(gx, gy, z, levels=levels, colors="k", linewidths=0.3, alpha=0.4)
        for i, v in enumerate(v for v in variants if v in paths):
            p = paths[v]
            ax.plot(p[:, 0], p[:, 1], "-", lw=0.8, alpha=0.8, color=f"C{i}", label=v)
            ax.plot(p[-1, 0], p[-1, 1], "o", ms=6, mec="k", color=f"C{i}")
        ax.plot(*land.start, "k*", ms=10, label="start")
        ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="w1", ylabel="w2", title=title)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{land.name}: lr {land.lr}, rho {land.rho}, {land.steps} full-batch steps (dots: end points)")
    fig.tight_layout()
    save_png(fig, path, dpi=70)
    plt.close(fig)


# ----------------------------------------------------------------------------- 3. the four checkpoints
def double_well(x):
    """f = x^4/4 - x^2/2: minima at +-1, a ridge top at 0, so every checkpoint occurs on it."""
    return x ** 4 / 4 - x ** 2 / 2


# (checkpoint, w, what the ascent did); rho = 0.5 for all, e = rho sign(g) (SAM in 1D)
CHECKPOINTS = ((1, 1.2, "climbs a wall: g' larger, same sign"),
               (2, 0.6, "nears the ridge top: g' smaller, same sign"),
               (3, -0.1, "crosses the ridge: g' flips, larger"),
               (4, -0.3, "crosses the ridge: g' flips, smaller"))
CKPT_RHO = 0.5


def grad_at(x):
    x = torch.tensor(float(x), dtype=DTYPE, requires_grad=True)
    double_well(x).backward()
    return x.grad.item()


def checkpoints(out):
    xs = torch.linspace(-1.8, 1.8, 200)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    rows = []
    for ax, (k, w, what) in zip(axes, CHECKPOINTS):
        g = grad_at(w)
        we = w + CKPT_RHO * math.copysign(1, g)
        gp = grad_at(we)
        rows.append(dict(checkpoint=k, w=w, w_plus_e=we, g=g, g_perturbed=gp, ratio=gp / g))
        ax.plot(xs, double_well(xs), color="gray")
        scale = 0.6 / max(abs(g), abs(gp))   # arrow lengths: the larger gradient gets 0.6, ratios kept
        for x, grad, color, name in ((w, g, "C0", "w, g"), (we, gp, "C3", "w+e, g'")):
            fx = double_well(torch.tensor(x)).item()
            ax.plot(x, fx, "o", color=color, label=f"{name} = {grad:+.3f}")
            ax.annotate("", xy=(x - scale * grad, fx), xytext=(x, fx),   # the descent direction -grad
                        arrowprops=dict(arrowstyle="->", color=color, lw=2))
        ax.set(xlabel="w", ylabel="loss f(w) = w^4/4 - w^2/2", ylim=(-0.45, 1.2),
               title=f"checkpoint {k}: r = g'/g = {gp / g:+.2f}\n{what}")
        ax.legend(fontsize=8, loc="upper center")
    fig.suptitle(f"The four checkpoints of r = g(w+e)/g(w), e = rho sign(g), rho = {CKPT_RHO}; arrows: -gradient")
    fig.tight_layout()
    save_png(fig, os.path.join(out, "checkpoints.png"), dpi=70)
    plt.close(fig)
    write_csv(os.path.join(out, "checkpoints.csv"), rows)
    for r in rows:
        print(f"checkpoint {r['checkpoint']}: w={r['w']:+.2f} w+e={r['w_plus_e']:+.2f} g={r['g']:+.3f} "
              f"g'={r['g_perturbed']:+.3f} r={r['ratio']:+.2f}")


# ----------------------------------------------------------------------------- main
PARTS = {"sensing": sensing, "landscape": landscape, "checkpoints": checkpoints}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="all", choices=[*PARTS, "all"], help="which part to run")
    parser.add_argument("--out", default="figures", help="folder for the PNG figures and CSVs")
    args = parser.parse_args(argv)
    # These problems are small: with two threads, hand-offs cost more than the math (10x slower
    # on a busy 2-core machine), so one thread is faster and leaves the other core free.
    torch.set_num_threads(1)
    try:
        os.makedirs(args.out, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=args.out).close()   # a read-only folder: refused now, not at the first write
    except OSError as err:
        parser.error(f"cannot use --out {args.out!r}: {err.strerror}")
    for name, part in PARTS.items():
        if args.part in (name, "all"):
            start = time.time()
            print(f"== {name}")
            part(args.out)
            print(f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
