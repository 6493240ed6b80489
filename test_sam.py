"""The test suite: `python -m pytest -q` (CPU, a few minutes).

sam.py is checked against references written straight from the formulas (float64, tiny tensors,
plain per-tensor torch), in the style of micrograd (an independent oracle) and schedule_free
(synthetic gradients, equivalence checks after every step); toy.py, plots.py and train.py are run
end to end on small generated data (and on ../shared/data's CIFAR-10 when it is there).

Notation (../shared/spec/origin.md section 0): g = gradient at w, g' = gradient at w + e,
r = g' / (g + 1e-8) with the eps added (not sign-aware); checkpoints with strict inequalities
B1: r > 1, B2: 0 < r < 1, B3: r < -1, B4: -1 < r < 0, B0 the rest. The base optimizer sees d
at the unperturbed w; its weight decay and momentum act after d and are never scaled.
"""
import copy
import csv
import io
import itertools
import json
import math
import os
import pickle
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import plots
import sam
import toy
import train
from sam import SAM, VARIANTS, disable_running_stats, enable_running_stats

DT = torch.float64
SHAPES = [(3, 4), (6,), (2, 2, 2, 2)]        # 34 coordinates, a conv-shaped kernel among them
N_COORD = 34
LR, MOM, WD, RHO = 0.1, 0.9, 0.01, 0.1
RATIO_EPS, NORM_EPS = 1e-8, 1e-12
# where sam.py runs in the preset and statistics tests; their references stay on the CPU (SAM_TEST_DEVICE=cuda)
DEVICE = torch.device(os.environ.get("SAM_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.exit("SAM_TEST_DEVICE=cuda: torch finds no CUDA device here")
# SGDHESS's documented protocol is backward(create_graph=True); torch warns about the grad cycle
pytestmark = pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True:UserWarning")
# g' = q g: each q lands in one checkpoint (B1 through every fine r > 1 bin, B2, B3, B4; q = 0 is B0)
Q_CYCLE = (3.0, 0.5, -3.0, -0.5, 0.0, 1.1, 1.3, 1.7, 6.0, 12.0, 20.0)
# near-zero g: the added ratio eps, not the sign of g, decides the sign of r
TINY_G = ((0.0, 0.5), (1e-12, -0.2), (-3e-8, 0.4), (-5e-9, 0.4), (-5e-9, -0.4))
TINY_AT = (2, 9, 15, 22, 30)
# a leftover with g' != 0: r = g'/(g + eps) exactly 1 (B0), so each preset's rule on B0 shows in d, not only g' = 0
LEFTOVER_G, LEFTOVER_AT = (-0.25, -0.25 + RATIO_EPS), 5


# ------------------------------------------------------------------ reference math (float64, per tensor)
def split(flat, shapes=SHAPES):
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[i:i + n].reshape(s).clone())
        i += n
    return out


def norm(ts, q=2.0):
    return sum((t.abs() ** q).sum() for t in ts) ** (1.0 / q)


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def checkpoints(g, gp, eps=RATIO_EPS):
    """B0..B4 of one tensor, strict inequalities, r = g'/(g + eps)."""
    r = gp / (g + eps)
    b1, b2, b3, b4 = r > 1, (r > 0) & (r < 1), r < -1, (r > -1) & (r < 0)
    return [~(b1 | b2 | b3 | b4), b1, b2, b3, b4]


def synthetic_pair(step, shapes=SHAPES, seed=1):
    """(g, g') lists with every checkpoint, B0 (g' = 0, and r exactly 1 with g' != 0) and near-zero g present."""
    n = sum(math.prod(s) for s in shapes)
    gen = torch.Generator().manual_seed(seed + 100 * step)
    sign = torch.randint(0, 2, (n,), generator=gen).to(DT) * 2 - 1
    g = (torch.rand(n, generator=gen, dtype=DT) + 0.2) * sign
    q = torch.tensor([Q_CYCLE[(i + 3 * step) % len(Q_CYCLE)] for i in range(n)], dtype=DT)
    gp = q * g
    for (a, b), at in zip(TINY_G + (LEFTOVER_G,), TINY_AT + (LEFTOVER_AT,)):
        g[(at + step) % n], gp[(at + step) % n] = a, b
    return split(g, shapes), split(gp, shapes)


def synthetic(t, point, which):
    g, gp = synthetic_pair(t)
    return g if which == "g" else gp


def make_params(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=DT) + 0.1).requires_grad_() for s in shapes]


def top_k_mask(score_list, k):
    flat = torch.cat([s.flatten() for s in score_list])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True)[:k]] = True
    return split(keep, [tuple(s.shape) for s in score_list])


def where_bins(B, ks, a, b):
    m = torch.zeros_like(B[0])
    for k in ks:
        m = m | B[k]
    return torch.where(m, a, b)


# d from (g, g', checkpoints, c) for each preset, per tensor, as the issue and origin sections 1.5-1.7 write it
def _scaled(**scale):
    def d(g, gp, B, c):
        out = gp.clone()
        for k, s in scale.items():
            out = torch.where(B[int(k[1])], (c if s == "c" else 1 / c if s == "1/c" else s) * gp, out)
        return out
    return d


DIRECTIONS = {
    "samme1": _scaled(b1="c"), "samme2": _scaled(b2="c"), "samme3": _scaled(b3="c"), "samme4": _scaled(b4="c"),
    "samme12": _scaled(b1="c", b2="c"), "samme13": _scaled(b1="c", b3="c"),
    # two-sided (origin 1.6): g'/c on B2 and c g' everywhere else, leftovers included
    "samme134": lambda g, gp, B, c: torch.where(B[2], gp / c, c * gp),
    "samme234": _scaled(b2="c", b3="c", b4="c"),
    "saner": _scaled(b2="c"),
    # CustomSAME v1: x c on B1, x 1 on B2, / c on B3, x c on B4, 0 on leftovers
    "customsame": lambda g, gp, B, c: gp * sum(s * b.to(DT) for s, b in zip((0.0, c, 1.0, 1 / c, c), B)),
    "customsame-pos": lambda g, gp, B, c: gp * (gp / (g + RATIO_EPS) > 0),
    "customsame-no3": lambda g, gp, B, c: gp * ~B[3],
    **{f"samckpt{b}": (lambda ks: lambda g, gp, B, c: where_bins(B, ks, gp, g))([int(k) for k in b])
       for b in ("1", "2", "3", "4", "12", "13", "14", "23", "34", "123", "124", "134", "234")},
    "sammagnitude": lambda g, gp, B, c: gp.abs() * g.sign(),
    "samdirection": lambda g, gp, B, c: gp.sign() * g.abs(),
}
CONDITION = {"saner": 0.5}          # the notes' c = 2 ("g' + g' mask"); SANER's alpha = 0.5
# presets whose ascent is not rho g/||g|| or whose passes differ, with the documented hyper-parameters
SPECIAL = {"sgd", "usam", "asam", "linf-sign", "linf-norm", "sgdhess", "sgdhess-exact", "ssamf", "ssamd", "friendlysam", "imbsam", "fishersam",
           "gsam", "looksam", "sam"}


def ascent(kind, w, h, rho, p=2.0, eta=0.0, fisher_eta=0.0, norm_eps=NORM_EPS, g=None):
    """e from the formula. kind: sam | usam | lp | lp_norm | asam | asam_usam | fisher (f from g, h by default)."""
    if kind == "sam":
        n = norm(h)
        return [rho * x / (n + norm_eps) for x in h]
    if kind == "usam":
        return [rho * x for x in h]
    if kind == "lp":   # Hoelder dual, 1/p + 1/q = 1: rho sign(g)|g|^(q-1)/||g||_q^(q-1); p = inf: rho sign(g)
        if math.isinf(p):
            return [rho * x.sign() for x in h]
        q = p / (p - 1)
        n = norm(h, q)
        return [rho * x.sign() * x.abs() ** (q - 1) / (n ** (q - 1) + norm_eps) for x in h]
    if kind == "lp_norm":   # the norm changes, the direction stays g: rho g/||g||_p
        n = max(x.abs().max() for x in h) if math.isinf(p) else norm(h, p)
        return [rho * x / (n + norm_eps) for x in h]
    if kind == "asam":   # T = |w| + eta: rho T^2 g/||T g||; p = inf: rho T sign(g)
        T = [x.abs() + eta for x in w]
        if math.isinf(p):
            return [rho * t * x.sign() for t, x in zip(T, h)]
        n = norm([t * x for t, x in zip(T, h)])
        return [rho * t * t * x / (n + norm_eps) for t, x in zip(T, h)]
    if kind == "asam_usam":
        return [rho * x.abs() ** 2 * y for x, y in zip(w, h)]
    if kind == "fisher":   # f = 1 + eta g^2: rho (g/f)/sqrt(g.(g/f))
        f = [1 + fisher_eta * x * x for x in (g or h)]
        n = sum((x * x / fi).sum() for x, fi in zip(h, f)).sqrt()
        return [rho * x / fi / (n + norm_eps) for x, fi in zip(h, f)]
    raise AssertionError(kind)


class SGDRef:
    """torch.optim.SGD written out: d + wd w at the unperturbed w, then heavy ball (no dampening)."""

    def __init__(self, lr=LR, momentum=MOM, weight_decay=WD, nesterov=False):
        self.lr, self.mom, self.wd, self.nesterov, self.buf = lr, momentum, weight_decay, nesterov, None

    def step(self, w, d):
        d = [x + self.wd * y for x, y in zip(d, w)]
        self.buf = d if self.buf is None else [self.mom * b + x for b, x in zip(self.buf, d)]
        upd = [x + self.mom * b for x, b in zip(d, self.buf)] if self.nesterov else self.buf
        return [y - self.lr * u for y, u in zip(w, upd)]


def reference_run(name, w0, grad_fn, steps, rho=RHO, base=None, masks=None, looksam_k=10, **kw):
    """Points w + e (None on one-pass steps) and weights after each step of preset `name`."""
    base = base or SGDRef()
    w = [x.detach().clone() for x in w0]
    c_target = kw.get("condition", CONDITION.get(name, 2.0))
    warmup = kw.get("condition_warmup", 0)
    m = gv = None
    points, weights = [], []
    for t in range(steps):
        g = grad_fn(t, w, "g")
        single = name == "sgd" or (name == "looksam" and t % looksam_k != 0)
        if single:
            if name == "sgd":
                d = g
            else:   # LookSAM cheap step: g + alpha ||g||/||g_v|| g_v
                d = [x + kw.get("looksam_alpha", 0.7) * norm(g) / norm(gv) * v for x, v in zip(g, gv)]
            points.append(None)
        else:
            if name == "usam":
                e = ascent("usam", w, g, rho)
            elif name == "asam":
                e = ascent("asam", w, g, rho, eta=0.0)
            elif name == "linf-sign":
                e = ascent("lp", w, g, rho, p=math.inf)
            elif name == "linf-norm":
                e = ascent("lp_norm", w, g, rho, p=math.inf)
            elif name == "fishersam":
                e = ascent("fisher", w, g, rho, fisher_eta=1.0)
            elif name == "friendlysam":   # official order: d_0 = g_0, m_0 = g_0; d_t = g_t - sigma m_{t-1}
                sigma, lam = kw.get("friendly_sigma", 1.0), kw.get("friendly_lambda", 0.9)
                h = g if m is None else [x - sigma * y for x, y in zip(g, m)]
                m = g if m is None else [lam * y + (1 - lam) * x for x, y in zip(g, m)]
                kind = "fisher" if kw.get("fisher_eta") else "asam" if kw.get("adaptive") else "sam"
                e = ascent(kind, w, h, rho, fisher_eta=kw.get("fisher_eta"), g=g)   # Fisher's f is of g, not h
            elif name in ("ssamf", "ssamd"):   # masked e, normalised by the FULL ||g||
                e = [x * mk for x, mk in zip(ascent("sam", w, g, rho), masks)]
            elif name in DIRECTIONS or name in ("sam", "imbsam", "gsam", "looksam"):
                e = ascent("sam", w, g, rho)
            else:   # a SPECIAL preset without its branch here would be checked against plain SAM's ascent
                raise AssertionError(f"reference_run has no ascent for {name!r}: add its branch")
            point = [x + y for x, y in zip(w, e)]
            points.append(point)
            gp = grad_fn(t, point, "gp")
            c = 1 + (c_target - 1) * min(1.0, t / warmup) if warmup else c_target
            if name in DIRECTIONS:
                d = [DIRECTIONS[name](x, y, checkpoints(x, y), c) for x, y in zip(g, gp)]
            elif name == "gsam":   # g' - alpha g_perp, g_perp = g - (<g,g'>/||g'||^2) g'
                coef = dot(g, gp) / dot(gp, gp)
                d = [y - kw.get("gsam_alpha", 0.4) * (x - coef * y) for x, y in zip(g, gp)]
            else:
                d = gp
            if name == "looksam":   # g_v = g' - (<g,g'>/||g||^2) g, the part of g' orthogonal to g
                coef = dot(g, gp) / dot(g, g)
                gv = [y - coef * x for x, y in zip(g, gp)]
        w = base.step(w, d)
        weights.append(w)
    return points, weights


# ------------------------------------------------------------------ driving sam.py with given gradients
def snap(params):
    return [p.detach().to("cpu", copy=True) for p in params]


def set_grads(params, grads):
    for p, x in zip(params, grads):
        p.grad = None if x is None else x.detach().to(p.device, copy=True)


def on_device(params):
    return [p.detach().to(DEVICE).requires_grad_() for p in params]


def drive(opt, params, grad_fn, steps, before_first=None):
    """Two-step protocol with gradients from grad_fn(t, point, "g"|"gp"); one pass when single_pass."""
    points, weights = [], []
    for t in range(steps):
        set_grads(params, grad_fn(t, snap(params), "g"))
        single = opt.single_pass
        opt.first_step(zero_grad=True)
        if before_first is not None:
            before_first(t)
        if single:
            assert not opt.perturbed
            points.append(None)
        else:
            assert opt.perturbed
            points.append(snap(params))
            set_grads(params, grad_fn(t, snap(params), "gp"))
            opt.second_step(zero_grad=True)
        weights.append(snap(params))
    return points, weights


def assert_lists_close(actual, expected, rtol=1e-10, atol=1e-12):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert (a is None) == (b is None)
        if a is not None:
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


# ------------------------------------------------------------------ one step of every preset
def test_synthetic_gradients_exercise_every_checkpoint_and_the_leftover_bin():
    for t in range(3):
        g, gp = synthetic_pair(t)
        B = [torch.cat([checkpoints(x, y)[k].flatten() for x, y in zip(g, gp)]) for k in range(5)]
        assert all(b.sum() >= 2 for b in B)
        assert (torch.stack(B).sum(0) == 1).all()
        assert any((x == 0).any() and (y == 0).any() for x, y in zip(g, gp))
        r = torch.cat([(y / (x + RATIO_EPS)).flatten() for x, y in zip(g, gp)])
        assert (r == 1).sum() == 1   # the leftover with g' != 0


def test_every_preset_has_a_reference():
    missing = set(VARIANTS) - set(DIRECTIONS) - SPECIAL
    assert not missing, (f"no float64 reference for {sorted(missing)}: a new d with SAM's ascent is a line in "
                         "DIRECTIONS (d from g, g', their checkpoints B and c); another ascent, pass count or state is "
                         "a name in SPECIAL and its branch in reference_run")


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - {"sgdhess", "sgdhess-exact"}))
def test_preset_steps_match_formula(name):
    params = on_device(make_params())
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    masks = None
    if name == "ssamf":   # Fisher diagonal from two "samples", then the top (1 - sparsity) N scores
        srcs = [make_params(seed=s) for s in (5, 6)]
        for src in srcs:
            set_grads(params, src)
            opt.accumulate_fisher()
        opt.update_mask()
        opt.zero_grad()
        masks = top_k_mask([a ** 2 + b ** 2 for a, b in zip(*srcs)], N_COORD // 2)
    got_points, got = drive(opt, params, synthetic, 3)
    if name == "ssamd":   # random mask: exactly (1 - sparsity) N live entries, bool
        masks = [opt.state[p]["mask"].cpu() for p in params]
        assert all(mk.dtype == torch.bool for mk in masks)
        assert sum(int(mk.sum()) for mk in masks) == N_COORD // 2
    points, weights = reference_run(name, make_params(), synthetic, 3, masks=masks)
    assert_lists_close(got_points, points)
    assert_lists_close(got, weights)


def test_looksam_refreshes_every_k_steps_and_takes_cheap_single_pass_steps_between():
    params = make_params()   # alpha 0.3, not the preset's 0.7 (that one is test_preset_steps_match_formula's)
    opt = SAM(params, torch.optim.SGD, variant="looksam", looksam_k=2, looksam_alpha=0.3, rho=RHO, lr=LR,
              momentum=MOM, weight_decay=WD)
    got_points, got = drive(opt, params, synthetic, 5)
    assert [p is None for p in got_points] == [False, True, False, True, False]
    points, weights = reference_run("looksam", make_params(), synthetic, 5, looksam_k=2, looksam_alpha=0.3)
    assert_lists_close(got_points, points)
    assert_lists_close(got, weights)


@pytest.mark.parametrize("sigma,lam,flags", [(0.5, 0.6, {}), (2.0, 0.95, {}), (0.5, 0.6, dict(fisher_eta=1.0)),
                                             (0.5, 0.6, dict(adaptive=True))])
def test_friendlysam_ascends_along_g_minus_sigma_times_the_previous_ema(sigma, lam, flags):
    # at sigma = 1 the m_{t-1} and m_t orders differ only by a scale that the normalisation removes; h = g - sigma m
    # in the other geometries: Fisher SAM's h/f over sqrt(h.(h/f)) with f = 1 + eta g^2 of g, ASAM's T^2 h/||T h||
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant="friendlysam", friendly_sigma=sigma, friendly_lambda=lam,
              rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, **flags)
    got_points, got = drive(opt, params, synthetic, 4)
    points, weights = reference_run("friendlysam", make_params(), synthetic, 4, friendly_sigma=sigma,
                                    friendly_lambda=lam, **flags)
    assert_lists_close(got_points, points)
    assert_lists_close(got, weights)


def test_condition_warmup_rises_linearly_from_one_for_saner():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant="saner", condition_warmup=2, rho=RHO, lr=LR,
              momentum=MOM, weight_decay=WD)
    _, got = drive(opt, params, synthetic, 4)
    _, weights = reference_run("saner", make_params(), synthetic, 4, condition_warmup=2)
    assert_lists_close(got, weights)
    # step 0 of the warm-up is plain SAM
    plain = make_params()
    _, sam_w = drive(SAM(plain, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD), plain,
                     synthetic, 1)
    assert_same(got[0], sam_w[0])


@pytest.mark.parametrize("name,c", [("samme1", 3.0), ("samme134", 0.3), ("customsame", 1.5), ("samme2", 0.5)])
def test_condition_flag_sets_c(name, c):
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant=name, condition=c, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    _, got = drive(opt, params, synthetic, 2)
    _, weights = reference_run(name, make_params(), synthetic, 2, condition=c)
    assert_lists_close(got, weights)


def one_step_direction(name, g, gp, **flags):
    """d handed to the base optimizer, read off a step with lr 1, no momentum, no weight decay."""
    params = [torch.zeros(len(g), dtype=DT, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=1.0, **flags)
    set_grads(params, [torch.tensor(g, dtype=DT)])
    opt.first_step(zero_grad=True)
    set_grads(params, [torch.tensor(gp, dtype=DT)])
    opt.second_step(zero_grad=True)
    return (-params[0].detach()).tolist()


def test_a_sam_wide_flag_set_in_the_param_groups_mid_run_takes_effect_and_is_saved():
    # a schedule of GSAM's alpha written into the param groups (as a scheduler writes lr) was ignored: opt.flags was
    # a copy made when built, while state_dict saved the groups, so a resumed run took the new alpha and the
    # uninterrupted one the old
    g, gp = torch.tensor([1.0, -2.0, 0.5], dtype=DT), torch.tensor([1.5, -1.0, -0.5], dtype=DT)
    params = [torch.zeros(3, dtype=DT, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, variant="gsam", rho=RHO, lr=1.0)
    for group in opt.param_groups:
        group["gsam_alpha"] = 0.1
    resumed = SAM([torch.zeros(3, dtype=DT, requires_grad=True)], torch.optim.SGD, variant="gsam", rho=RHO, lr=1.0)
    with pytest.warns(UserWarning, match="replace gsam_alpha"):
        resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    expected = gp - 0.1 * (g - (g @ gp) / (gp @ gp) * gp)   # g' - alpha (g - (<g,g'>/||g'||^2) g')
    for o in (opt, resumed):
        w = o.param_groups[0]["params"]
        set_grads(w, [g])
        o.first_step(zero_grad=True)
        set_grads(w, [gp])
        o.second_step(zero_grad=True)
        assert o.flags["gsam_alpha"] == 0.1
        assert torch.allclose(-w[0].detach(), expected, rtol=1e-12, atol=0)


def test_samckpt14_is_done_right_and_samckpt23_is_the_origins_inverted_rule():
    #    B1    B2    B3    B4    B0(g'=0)
    g = [1.0, 1.0, 1.0, 1.0, 1.0]
    gp = [3.0, 0.5, -3.0, -0.5, 0.0]
    assert one_step_direction("samckpt14", g, gp) == [3.0, 1.0, 1.0, -0.5, 1.0]
    assert one_step_direction("samckpt23", g, gp) == [1.0, 0.5, -3.0, 1.0, 1.0]
    assert one_step_direction("samckpt1", g, gp) == [3.0, 1.0, 1.0, 1.0, 1.0]


def test_sammagnitude_and_samdirection_have_the_reported_meanings():
    g = [0.5, -2.0, 1.0, 0.0]
    gp = [-3.0, -1.0, 0.0, 4.0]
    assert one_step_direction("sammagnitude", g, gp) == [3.0, -1.0, 0.0, 0.0]    # |g'| sign(g)
    assert one_step_direction("samdirection", g, gp) == [-0.5, -2.0, 0.0, 0.0]   # sign(g') |g|


def test_weight_decay_is_added_after_the_bin_rule_and_never_scaled():
    #    B1    B2    B3    B4    B0(g'=0)
    g = [1.0, 1.0, 1.0, 1.0, 1.0]
    gp = [3.0, 0.5, -3.0, -0.5, 0.0]
    params = [torch.ones(5, dtype=DT, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, variant="customsame", condition=2.0, rho=RHO, lr=1.0, weight_decay=0.1)
    set_grads(params, [torch.tensor(g, dtype=DT)])
    opt.first_step(zero_grad=True)
    set_grads(params, [torch.tensor(gp, dtype=DT)])
    opt.second_step(zero_grad=True)
    d = [6.0, 0.5, -1.5, -1.0, 0.0]    # x c, x 1, / c, x c, 0 on the leftovers; then + 0.1 w, unscaled
    assert (1 - params[0].detach()).tolist() == pytest.approx([x + 0.1 for x in d], rel=1e-12)


def test_samme134_is_two_sided_leftovers_included():
    # origin 1.6 and the issue: g'/c on B2, c g' on B1, B3, B4 AND the leftovers (here r exactly 1)
    g = [1.0, 1.0, 1.0, 1.0, 0.25]
    gp = [3.0, 0.5, -3.0, -0.5, 0.25 + RATIO_EPS]   # the last r is exactly 1: in no checkpoint
    assert gp[4] / (g[4] + RATIO_EPS) == 1.0
    got = one_step_direction("samme134", g, gp)
    assert got == pytest.approx([6.0, 0.25, -6.0, -1.0, 2 * gp[4]], rel=1e-12)


def test_gsam_projects_over_all_groups_and_after_a_bin_rule():
    params = make_params()
    opt = SAM([{"params": params[:1]}, {"params": params[1:]}], torch.optim.SGD, variant="gsam", rho=RHO, lr=LR,
              momentum=MOM, weight_decay=WD)
    _, got = drive(opt, params, synthetic, 2)
    _, weights = reference_run("gsam", make_params(), synthetic, 2)   # <g,g'> and ||g'|| of the whole vector
    assert_lists_close(got, weights)
    # the order bin rule, then GSAM: d = samme1's d - alpha (g - (<g,g'>/||g'||^2) g'), alpha not the preset's 0.4
    g, gp = torch.tensor([0.5, 1.0, -1.0, 2.0], dtype=DT), torch.tensor([2.0, 0.5, 1.5, -0.5], dtype=DT)
    d = DIRECTIONS["samme1"](g, gp, checkpoints(g, gp), 2.0) - 0.25 * (g - (g @ gp) / (gp @ gp) * gp)
    assert one_step_direction("samme1", g.tolist(), gp.tolist(), gsam_alpha=0.25) == pytest.approx(d.tolist(), rel=1e-12)


def test_checkpoint_edges_follow_the_strict_inequalities():
    # r exactly 1, -1, 0 and nan are in no checkpoint (B0); g = -1e-8 exactly gives r = +-inf, which
    # lands in the |r| > 1 checkpoints (origin section 0)
    a = 0.25 + RATIO_EPS
    g = [0.25, 0.25, 0.25, -RATIO_EPS, -RATIO_EPS, -RATIO_EPS, 1.0]
    gp = [a, -a, 0.0, 0.5, -0.5, 0.0, 3.0]
    r = torch.tensor(gp, dtype=DT) / (torch.tensor(g, dtype=DT) + RATIO_EPS)
    assert r[:3].tolist() == [1.0, -1.0, 0.0] and r[3:6].tolist()[:2] == [math.inf, -math.inf] and r[5].isnan()
    params = [torch.zeros(7, dtype=DT, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, lr=1.0, stats_every=1, persist_from=0)
    set_grads(params, [torch.tensor(g, dtype=DT)])
    opt.first_step(zero_grad=True)
    set_grads(params, [torch.tensor(gp, dtype=DT)])
    opt.second_step(zero_grad=True)
    s = opt.stats
    assert [s[f"ckpt{k}"] for k in range(5)] == pytest.approx([400 / 7, 200 / 7, 0.0, 100 / 7, 0.0])
    in_b1 = checkpoints(torch.tensor(g, dtype=DT), torch.tensor(gp, dtype=DT))[1]   # the tracked set is B1, r > 1
    assert s["persist_t0"] == s["persist_running"] == float(in_b1.sum()) == 2.0
    assert one_step_direction("samme1", g, gp) == pytest.approx([a, -a, 0.0, 1.0, -0.5, 0.0, 6.0], rel=1e-12)
    assert one_step_direction("samme3", g, gp) == pytest.approx([a, -a, 0.0, 0.5, -1.0, 0.0, 3.0], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_buckets_equal_torch_bucketize_at_and_beside_every_edge(dtype):
    # sam._bucketize counts edges <= r on the CPU instead of searching: the plain form is torch.bucketize
    edges = sam._edges(dtype, torch.device("cpu"))
    up, down = (torch.nextafter(edges, torch.full_like(edges, x)) for x in (math.inf, -math.inf))
    r = torch.cat([edges, up, down, torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30], dtype=dtype),
                   torch.randn(1000, dtype=dtype) * 5, torch.rand(1000, dtype=dtype) * 20 - 2])
    expected = torch.bucketize(r, edges, right=True, out_int32=True)
    got = sam._bucketize(r, edges)
    assert got.dtype == torch.int32 and torch.equal(got, expected)
    assert set(got.tolist()) == set(range(13))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_r_exactly_one_minus_one_and_zero_are_leftovers_in_low_precision_weights(dtype):
    # g + ratio_eps rounds to g in float32 for |g| >= 0.25: g' = +-g gives r exactly +-1 (B0), and the edges of
    # r's own dtype (nextafter in float32) put the r just above 1 in B1 and the one just below in B2
    half = torch.tensor(0.5, dtype=dtype)
    up, down = (float(torch.nextafter(half, torch.tensor(x, dtype=dtype))) for x in (1.0, 0.0))
    g = [0.25, 0.5, 1.0, 2.0, 0.5, 0.5, 0.5]
    gp = [0.25, 0.5, -1.0, -2.0, 0.0, up, down]
    params = [torch.zeros(7, dtype=dtype, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, variant="samme1", rho=RHO, lr=1.0, stats_every=1)
    set_grads(params, [torch.tensor(g, dtype=dtype)])
    opt.first_step(zero_grad=True)
    set_grads(params, [torch.tensor(gp, dtype=dtype)])
    opt.second_step(zero_grad=True)
    s = opt.stats
    assert [s[f"ckpt{k}"] for k in range(5)] == pytest.approx([500 / 7, 100 / 7, 100 / 7, 0.0, 0.0])
    assert (-params[0].detach()).tolist() == gp[:5] + [2 * up, down]    # samme1: c g' on B1 only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_ratio_of_16_bit_gradients_adds_ratio_eps_in_float32(dtype):
    # near-zero g, where the 1e-8 matters: in 16 bits g + 1e-8 rounds (to g', or to g in float16) and puts r at 1
    g = torch.tensor([6e-8, 2e-7, 1e-8, -5e-9, 3e-9], dtype=torch.float64).to(dtype).repeat(2)
    gp = torch.cat([g[:5], (g[:5].double() + RATIO_EPS).to(dtype)])
    params = [torch.zeros(10, dtype=dtype, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=1.0, stats_every=1)
    set_grads(params, [g])
    opt.first_step(zero_grad=True)
    set_grads(params, [gp])
    opt.second_step(zero_grad=True)
    ref, _ = reference_stats([torch.zeros(10, dtype=DT)], [g.double()], [gp.double()])
    assert [opt.stats[f"ckpt{k}"] for k in range(5)] == pytest.approx([ref[f"ckpt{k}"] for k in range(5)])
    assert ref["ckpt2"] > 0


def test_bench_plain_form_bucketize_steps_like_the_branch_free_buckets(monkeypatch):
    # bench.py times sam.SAM against BucketizeSAM (torch.bucketize on the CPU too): both must take the same steps
    import bench
    searches = []
    bucketize = torch.bucketize
    monkeypatch.setattr(torch, "bucketize", lambda *a, **k: searches.append(1) or bucketize(*a, **k))
    runs = []
    for cls in (SAM, bench.BucketizeSAM):
        params = make_params()
        opt = cls(params, torch.optim.SGD, variant="samme1", rho=RHO, lr=LR, momentum=MOM, stats_every=1)
        stats = [synthetic_step(opt, params, t)[3] for t in range(3)]
        runs.append((snap(params), [{k: None if math.isnan(v) else v for k, v in x.items()} for x in stats], len(searches)))
    assert (runs[0][2], runs[1][2] > 0) == (0, True)   # sam.SAM never searches on the CPU, the plain form does
    assert_same(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][1][-1]["ckpt1"] > 0
    assert sam._bucketize.__name__ == "_bucketize"   # the plain form was swapped in for its own steps only


def test_bench_times_the_configurations_in_turn_after_their_warmup_and_reports_medians():
    """interleaved_medians: every configuration's warm-up calls first, then one timed call of each in turn, repeats
    times (so that a load change hits all of them), and per configuration the median of its own times."""
    import bench
    times = {"a": [5.0, 1.0, 3.0, 2.0, 100.0], "b": [0.5, 0.7, 0.1, 0.9, 0.2], "c": [4.0, 4.0, 9.0, 4.0, 1.0]}
    calls = []
    configs = {name: (lambda name=name: calls.append(name)) for name in times}
    served = {name: iter(t) for name, t in times.items()}

    def measure(fn):   # the scripted time of this configuration's next timed call
        fn()
        return next(served[calls[-1]])
    medians = bench.interleaved_medians(configs, repeats=5, warmup=2, measure=measure)
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 5
    assert medians == {name: sorted(t)[len(t) // 2] for name, t in times.items()} == {"a": 3.0, "b": 0.5, "c": 4.0}
    served = iter([1.0, 10.0, 3.0, 30.0, 5.0, 50.0, 7.0, 70.0])   # a, b, a, b, ...
    even = bench.interleaved_medians({"a": lambda: None, "b": lambda: None}, 4, 0, lambda fn: next(served))
    assert even == {"a": (3 + 5) / 2, "b": (30 + 50) / 2}   # an even count: the mean of the middle two


def test_bench_cpu_timer_measures_the_call_in_seconds():
    import bench
    seconds = bench.timer(torch.device("cpu"))(lambda: time.sleep(0.05))
    assert 0.05 <= seconds < 1.0


def test_bench_loop_sam_is_davda54s_sam_step():
    """The loop the optimizer benchmark times sam.SAM against is SAM: first_step moves every tensor to
    w + rho g / ||g|| (one norm over all of them), second_step puts w back and takes the base step with g' there."""
    import bench
    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for shape in ((4, 3), (5,), (2,))]
    w = [p.detach().clone().double() for p in params]
    g, gp = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
    norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in g))
    rho, lr = 0.05, 0.1
    opt = bench.LoopSAM(params, torch.optim.SGD, rho=rho, lr=lr)
    for p, x in zip(params, g):
        p.grad = x.clone()
    opt.first_step(zero_grad=True)
    for p, w0, x in zip(params, w, g):
        assert torch.allclose(p.detach().double(), w0 + rho * x.double() / norm, atol=1e-6) and p.grad is None
    for p, x in zip(params, gp):
        p.grad = x.clone()
    opt.second_step()
    for p, w0, x in zip(params, w, gp):
        assert torch.allclose(p.detach().double(), w0 - lr * x.double(), atol=1e-6)


def test_bench_held_bytes_counts_each_buffer_once_and_leaves_out_the_parameters():
    """held_bytes: the storages an optimizer object keeps, in its attributes, dicts and lists, each storage once
    (views of one buffer too), without the parameters and gradients it is given, its base optimizer or param_groups."""
    import bench
    param, buffer = torch.zeros(7), torch.zeros(10)
    opt = types.SimpleNamespace(
        buffer=buffer, view=buffer[2:5], state={param: {"old_p": torch.zeros(3, dtype=torch.float64)}},
        parts=[param, [buffer.view(2, 5), torch.zeros(4, dtype=torch.int32)]],
        base_optimizer=types.SimpleNamespace(momentum=torch.zeros(100)), param_groups=[{"params": [torch.zeros(100)]}])
    assert bench.held_bytes(opt, exclude=[param]) == 10 * 4 + 3 * 8 + 4 * 4
    assert bench.held_bytes(opt, exclude=[]) == 10 * 4 + 3 * 8 + 4 * 4 + 7 * 4


def test_bench_prints_each_ratio_from_its_medians(monkeypatch, capsys):
    """Each benchmark's rows: milliseconds per configuration (1000 x its median seconds), images per second (images
    per epoch / seconds) and the ratios, each the one its label names; a SAM step is timed as first_step plus
    second_step; buffers held in parameter sizes (4 bytes each). The medians are given here, so the figures are
    checked against their definitions, not against a timing. Each configuration steps the optimizer its label names
    (the second step on g' = g + noise, cos(g, g') about 1/sqrt(2), not on g again)."""
    import bench
    seconds, step_calls, stepped, trained = {}, {}, {}, {}
    timed, trained_with = [], []   # (optimizer, grads) of each bound step timed; the optimizer of each train_step

    def medians(configs, repeats, warmup, measure):   # distinct seconds per configuration, in the order given
        given = {name: 0.001 * (i + 2) ** 1.5 for i, name in enumerate(configs)}
        if "davda54 loop" in configs:   # the optimizer benchmark: its configurations time themselves
            for name, fn in configs.items():
                step_calls[name] = fn()
                stepped[name] = timed[-1]   # the optimizer of its last timed call, the grads it stepped on
        if "SGD" in configs:   # the step benchmark: each SAM configuration's train_step (SGD's own step left out)
            for name, fn in configs.items():
                if name != "SGD":
                    fn()
                    trained[name] = trained_with[-1]
        seconds.update(given)
        return given

    def measure(fn):   # 0.25 s a timed call; a bound step (second_step, a base step) shows its optimizer
        if hasattr(fn, "__self__"):
            opt = fn.__self__
            timed.append((opt, [p.grad.clone() for group in opt.param_groups for p in group["params"]]))
        return fn() or 0.25
    monkeypatch.setattr(bench, "interleaved_medians", medians)
    monkeypatch.setattr(bench, "timer", lambda device: measure)
    monkeypatch.setattr(bench.train, "train_step", lambda model, opt, x, y, settings: trained_with.append(opt))
    held = lambda opt, exclude: 6 * sum(p.numel() for p in opt.param_groups[0]["params"])   # 6 bytes a parameter
    monkeypatch.setattr(bench, "held_bytes", held)
    bench.main(["--only", "optimizer", "data", "step", "--device", "cpu", "--optimizer-models", "cnn",
                "--data-images", "256"])
    shown, targets = {}, {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):
            label, value, *target = re.split(r"\s{2,}", line.strip())
            shown[label], targets[label] = float(value.replace(",", "")), " ".join(target)
    for name, s in seconds.items():
        if name in ("device loader", "DataLoader, PIL, 2 workers"):
            assert shown[f"{name} [img/s]"] == round(256 / s)
        else:
            assert shown[f"{name} [ms]"] == pytest.approx(1000 * s, abs=0.051)
    ratios = {"SAM / loop": ("sam.SAM", "davda54 loop"),
              "SAM stats every step / loop": ("sam.SAM, stats every step", "davda54 loop"),
              "samme1 / loop": ("sam.SAM samme1 (buckets r every step)", "davda54 loop"),
              "stats every step: branch-free buckets / torch.bucketize": (
                  "sam.SAM, stats every step", "sam.SAM, stats every step, torch.bucketize"),
              "device loader / DataLoader": ("DataLoader, PIL, 2 workers", "device loader"),   # a rate: the inverse
              "SAM / SGD": ("SAM, stats off", "SGD"),
              "SAM without the host read / SGD": ("SAM, stats off, no host read (skip_nonfinite=False)", "SGD"),
              "stats every step / off": ("SAM, stats every step", "SAM, stats off")}
    for label, (over, under) in ratios.items():
        assert shown[label] == pytest.approx(seconds[over] / seconds[under], abs=0.051), label
    # the targets; the cnn has no optimizer target, so none is shown (not a bare "<=")
    assert {label: t for label, t in targets.items() if t} == {
        "device loader / DataLoader": ">= 10", "SAM / SGD": "<= 2.10", "stats every step / off": "<= 1.05"}
    for name in ("sam.SAM", "sam.SAM, stats every step"):   # 6 bytes a parameter: 1.5 float32 parameters
        assert shown[f"{name}: buffers held between steps [x params]"] == 1.5
    # a SAM configuration times first_step and second_step (0.25 s each here), a base step alone once
    assert step_calls == {name: 0.25 if name.startswith("base SGD") else 0.5 for name in step_calls}
    assert len(step_calls) == 7
    opts = {name: opt for name, (opt, _) in stepped.items()}
    assert type(opts["davda54 loop"]) is bench.LoopSAM and type(opts["sam.SAM, stats every step, torch.bucketize"]) \
        is bench.BucketizeSAM and all(type(opts[name]) is SAM for name in ("sam.SAM", "sam.SAM, stats every step",
                                                                            "sam.SAM samme1 (buckets r every step)"))
    assert [(opts[name].variant, opts[name].flags["stats_every"]) for name in (
        "sam.SAM", "sam.SAM, stats every step", "sam.SAM samme1 (buckets r every step)",
        "sam.SAM, stats every step, torch.bucketize")] == [("sam", 0), ("sam", 1), ("samme1", 0), ("sam", 1)]
    assert [bool(opts[f"base SGD step alone, {kind}"].defaults["fused"]) for kind in ("torch's default", "fused")] == \
        [False, True]
    g = torch.cat([x.flatten() for x in stepped["base SGD step alone, torch's default"][1]])   # a base step: on g
    for name, (opt, grads) in stepped.items():
        if not name.startswith("base SGD"):
            gp = torch.cat([x.flatten() for x in grads])
            assert float(gp @ g / (gp.norm() * g.norm())) == pytest.approx(0.5 ** 0.5, abs=0.05), name
    assert {name: (opt.flags["stats_every"], opt.flags["skip_nonfinite"]) for name, opt in trained.items()} == {
        "SAM, stats off": (0, True), "SAM, stats every step": (1, True),
        "SAM, stats off, no host read (skip_nonfinite=False)": (0, False)}


def test_bench_cuda_timer_reads_the_events_around_the_call_in_seconds(monkeypatch):
    """On a GPU, timer() records an event before and after fn(), synchronizes, and gives start.elapsed_time(end), CUDA's
    milliseconds, in seconds. Fake events on a fake clock: fn() takes 250 ms of it."""
    import bench
    log, clock = [], [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.ms = None

        def record(self):
            log.append("record")
            self.ms = clock[0]

        def elapsed_time(self, end):   # CUDA: milliseconds from this event to end
            log.append("elapsed")
            return end.ms - self.ms

    def fn():
        log.append("fn")
        clock[0] += 250.0
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    assert bench.timer(torch.device("cuda"))(fn) == pytest.approx(0.25, rel=1e-12)
    assert log == ["record", "fn", "record", "sync", "elapsed"]


def test_bench_cli_checks_and_defaults(monkeypatch, capsys):
    """bench.py's arguments: every benchmark by default, in the docstring's order, on PyramidNet-110, ResNet-18 and
    WRN-16-8, 20 timed optimizer steps, 10,000 images and 3 epochs a data run, the step benchmark's batch and repeats
    left to the device; --threads sets torch's threads only when given; refused: --device cuda without CUDA, fewer
    than 256 images, 0 threads or repeats, an unknown benchmark."""
    import bench
    ran, threads = [], []
    monkeypatch.setattr(bench, "BENCHMARKS", {name: (lambda args, device, measure, name=name: ran.append(
        (name, args, device)) or ("t", [("a", "1", "")])) for name in ("optimizer", "data", "step")})
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench.main([])
    assert [name for name, _, _ in ran] == ["optimizer", "data", "step"] and threads == []
    args = ran[0][1]
    assert (args.repeats, args.optimizer_models, args.data_images, args.data_repeats, args.step_batch,
            args.step_repeats, args.device) == (20, ["pyramidnet110", "resnet18", "wrn16-8"], 10_000, 3, None, None, "auto")
    assert ran[0][2] == torch.device("cpu")
    ran.clear()
    bench.main(["--only", "step", "data", "--threads", "3", "--data-images", "256"])
    assert [name for name, _, _ in ran] == ["step", "data"] and threads == [3]
    capsys.readouterr()
    for argv, message in ((["--device", "cuda"], "--device cuda: torch finds no CUDA device"),
                          (["--data-images", "255"], "--data-images"), (["--threads", "0"], "--threads"),
                          (["--repeats", "0"], "--repeats"), (["--step-repeats", "0"], "--step-repeats"),
                          (["--only", "bogus"], "invalid choice")):
        with pytest.raises(SystemExit) as err:
            bench.main(argv)
        assert err.value.code == 2 and message in capsys.readouterr().err, argv
    assert len(ran) == 2


def test_bench_optimizer_shows_each_models_targets_and_times_only_the_optimizer_calls(monkeypatch):
    """The optimizer benchmark's targets: SAM / loop <= 0.6 on PyramidNet-110 (there also stats every step / loop
    <= 1.0), <= 1.0 on ResNet-18 and WRN-16-8. Its configurations are timed by their own measure() calls around
    first_step and second_step (grad copies left out): interleaved_medians gets a measure that returns what the
    configuration returns, not one that times it; args.repeats timed calls after 3 warm-up ones."""
    import bench
    monkeypatch.setitem(bench.train.MODELS, "pyramidnet110", bench.train.MODELS["cnn"])   # small stand-ins
    monkeypatch.setitem(bench.train.MODELS, "resnet18", bench.train.MODELS["cnn"])
    got = {}

    def medians(configs, repeats, warmup, measure):
        got.update(repeats=repeats, warmup=warmup, measure=measure)
        return {name: 0.001 * (i + 1) for i, name in enumerate(configs)}
    monkeypatch.setattr(bench, "interleaved_medians", medians)
    args = types.SimpleNamespace(repeats=7)
    fixed = lambda fn: 0.25   # noqa: E731  (a timer that does not call fn: only the configuration's own value counts)
    targets = {}
    for model in ("pyramidnet110", "resnet18"):
        title, rows = bench.bench_optimizer_on(model, args, torch.device("cpu"), fixed)
        targets[model] = {label: target for label, _, target in rows if "/" in label}
        assert (got["repeats"], got["warmup"], got["measure"](lambda: 3.5)) == (7, 3, 3.5), model
    assert targets == {
        "pyramidnet110": {"SAM / loop": "<= 0.6", "SAM stats every step / loop": "<= 1.0", "samme1 / loop": "",
                          "stats every step: branch-free buckets / torch.bucketize": ""},
        "resnet18": {"SAM / loop": "<= 1.0", "SAM stats every step / loop": "", "samme1 / loop": "",
                     "stats every step: branch-free buckets / torch.bucketize": ""}}


def test_bench_data_times_davda54s_pil_pipeline_against_the_device_loaders_cutout_epoch(monkeypatch):
    """The data benchmark: the device loader's epoch is every image once, in batches of 256 of a permutation, with
    cutout; the DataLoader is davda54/sam's: batch 256, shuffled, 2 workers, RandomCrop(32, padding 4), a horizontal
    flip, ToTensor, CIFAR-10's Normalize and a 16-pixel Cutout at p 0.5. data_repeats timed epochs after 1 warm-up."""
    import bench
    import inspect
    got, batches = {}, []

    def medians(configs, repeats, warmup, measure):
        got.update(configs=configs, repeats=repeats, warmup=warmup)
        return dict(zip(configs, (0.5, 2.0)))
    monkeypatch.setattr(bench, "interleaved_medians", medians)
    monkeypatch.setattr(bench.train.DeviceLoader, "train_batch",
                        lambda self, idx, generator, cutout, part=slice(None): batches.append((idx.clone(), cutout)))
    args = types.SimpleNamespace(data_images=600, data_repeats=4)
    title, rows = bench.bench_data(args, torch.device("cpu"), lambda fn: fn())
    assert (got["repeats"], got["warmup"]) == (4, 1) and "600 images per epoch, batch 256" in title
    assert list(got["configs"]) == ["device loader", "DataLoader, PIL, 2 workers"]
    assert rows == [("device loader [img/s]", "1,200", ""), ("DataLoader, PIL, 2 workers [img/s]", "300", ""),
                    ("device loader / DataLoader", "4.0", ">= 10")]   # 600 images in 0.5 s and in 2 s
    got["configs"]["device loader"]()
    assert [len(idx) for idx, _ in batches] == [256, 256, 88] and all(cutout for _, cutout in batches)
    assert sorted(torch.cat([idx for idx, _ in batches]).tolist()) == list(range(600))
    workers = inspect.getclosurevars(got["configs"]["DataLoader, PIL, 2 workers"]).nonlocals["workers"]
    assert (workers.batch_size, workers.num_workers, type(workers.sampler).__name__) == (256, 2, "RandomSampler")
    assert len(workers.dataset) == 600
    crop, flip, to_tensor, normalize, cutout = workers.dataset.transform.transforms
    assert (type(crop), crop.size, crop.padding) == (bench.T.RandomCrop, (32, 32), 4)
    assert (type(flip), flip.p, type(to_tensor)) == (bench.T.RandomHorizontalFlip, 0.5, bench.T.ToTensor)
    stats = bench.train.DATASETS["cifar10"]
    assert (type(normalize), tuple(normalize.mean), tuple(normalize.std)) == (bench.T.Normalize, stats["mean"], stats["std"])
    assert (type(cutout), cutout.size, cutout.p) == (bench.Cutout, 16, 0.5)


def test_bench_cutout_zeroes_a_16_pixel_square_centred_at_a_uniform_point_half_the_time():
    """davda54/sam's Cutout: with probability p, a size x size square of zeros, rows cy - 8 .. cy + 7 and columns
    cx - 8 .. cx + 7 cut at the border, centred at a uniform (cy, cx); else the image as it was."""
    import bench
    cut = 0
    for seed in range(60):
        torch.manual_seed(seed)
        u = torch.rand(1).item()
        cy, cx = torch.randint(0, 32, (1,)).item(), torch.randint(0, 32, (1,)).item()
        torch.manual_seed(seed)
        image = bench.Cutout()(torch.ones(3, 32, 32))
        rows, cols = torch.arange(32)[:, None], torch.arange(32)[None, :]
        square = (rows >= cy - 8) & (rows < cy + 8) & (cols >= cx - 8) & (cols < cx + 8)
        expected = torch.ones(3, 32, 32) if u > 0.5 else (~square).float().expand(3, 32, 32)
        assert torch.equal(image, expected), seed
        cut += u <= 0.5
    assert 15 < cut < 45


def test_bench_step_sgd_baseline_is_one_sgd_step_on_the_batch_loss(monkeypatch):
    """The step benchmark's baseline: one forward and backward of ResNet-18 on the batch and torch's SGD step (lr 0.01,
    momentum 0.9, weight decay 1e-3), gradients cleared after; on the CPU, batch 16 and 3 timed steps after 1 warm-up.
    Checked against a copy of the model stepped by hand: w - lr (grad + wd w) (the first momentum step); a small CNN
    stands in for ResNet-18."""
    import bench
    import inspect
    monkeypatch.setitem(bench.train.MODELS, "resnet18", bench.train.MODELS["cnn"])
    got = {}

    def medians(configs, repeats, warmup, measure):
        got.update(configs=configs, repeats=repeats, warmup=warmup)
        return {name: 1.0 for name in configs}
    monkeypatch.setattr(bench, "interleaved_medians", medians)
    title, _ = bench.bench_step(types.SimpleNamespace(step_batch=None, step_repeats=None), torch.device("cpu"), None)
    assert (got["repeats"], got["warmup"]) == (3, 1) and "batch 16, fp32" in title
    sgd = got["configs"]["SGD"]
    held = inspect.getclosurevars(sgd).nonlocals
    model, x, y = held["model"], held["x"], held["y"]
    assert x.shape == (16, 3, 32, 32)
    twin = copy.deepcopy(model)
    loss = torch.nn.functional.cross_entropy(twin(x), y)
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    expected = [w.detach() - 0.01 * (g + 1e-3 * w.detach()) for w, g in zip(twin.parameters(), grads)]
    sgd()
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), e, rtol=1e-5, atol=1e-6) and p.grad is None


# ------------------------------------------------------------------ ascent geometries
@pytest.mark.parametrize("flags,kind,kw", [
    (dict(), "sam", {}),
    (dict(normalize=False), "usam", {}),
    (dict(p=math.inf), "lp", dict(p=math.inf)),
    (dict(p=3.0), "lp", dict(p=3.0)),
    (dict(p=1.5), "lp", dict(p=1.5)),
    (dict(p=3.0, dual=False), "lp_norm", dict(p=3.0)),
    (dict(adaptive=True), "asam", dict(eta=0.0)),
    (dict(adaptive=True, asam_eta=0.01), "asam", dict(eta=0.01)),
    (dict(adaptive=True, asam_eta=0.01, p=math.inf), "asam", dict(eta=0.01, p=math.inf)),
    (dict(adaptive=True, normalize=False), "asam_usam", {}),
    (dict(fisher_eta=1.0), "fisher", dict(fisher_eta=1.0)),
    (dict(fisher_eta=0.3), "fisher", dict(fisher_eta=0.3)),
    (dict(norm_eps=0.5), "sam", dict(norm_eps=0.5)),   # e = rho g/(||g|| + norm_eps), a flag like any other
    (dict(p=3.0, norm_eps=0.5), "lp", dict(p=3.0, norm_eps=0.5)),
])
def test_ascent_point_matches_formula(flags, kind, kw):
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, **flags)
    g, _ = synthetic_pair(0)
    set_grads(params, g)
    opt.first_step(zero_grad=True)
    e = ascent(kind, w, g, RHO, **kw)
    assert_lists_close([snap(params)], [[x + y for x, y in zip(w, e)]])


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, math.inf])
def test_lp_ascent_has_p_norm_rho(p):
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, p=p)
    set_grads(params, make_params(seed=3))
    opt.first_step()
    e = [a - b for a, b in zip(snap(params), w)]
    size = max(x.abs().max() for x in e) if math.isinf(p) else norm(e, p)
    assert float(size) == pytest.approx(RHO, rel=1e-9)


def test_per_group_rho_uses_the_global_norm():
    params = make_params()
    w = snap(params)
    opt = SAM([{"params": params[:2], "rho": 0.05}, {"params": params[2:], "rho": 0.3}], torch.optim.SGD,
              lr=LR, momentum=MOM, weight_decay=WD)
    g, gp = synthetic_pair(0)
    set_grads(params, g)
    opt.first_step(zero_grad=True)
    n = norm(g)
    rhos = [0.05, 0.05, 0.3]
    assert_lists_close([snap(params)], [[x + r * y / n for x, y, r in zip(w, g, rhos)]])
    set_grads(params, gp)
    opt.second_step(zero_grad=True)
    assert_lists_close([snap(params)], [SGDRef().step(w, gp)])


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_per_group_condition_with_one_bin_rule(warmup):
    params = make_params()   # the warm-up rises from 1 to each group's own c
    opt = SAM([{"params": params[:1]}, {"params": params[1:], "condition": 3.0}], torch.optim.SGD,
              variant="samme1", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, condition_warmup=warmup)
    _, got = drive(opt, params, synthetic, 3)
    _, a = reference_run("samme1", make_params(), synthetic, 3, condition=2.0, condition_warmup=warmup)
    _, b = reference_run("samme1", make_params(), synthetic, 3, condition=3.0, condition_warmup=warmup)
    assert_lists_close([w[:1] for w in got], [w[:1] for w in a])
    assert_lists_close([w[1:] for w in got], [w[1:] for w in b])


@pytest.mark.parametrize("flags,name", [(dict(bin_scale=VARIANTS["samme134"]["bin_scale"]), "samme134"),
                                        (dict(sam_bins="14"), "samckpt14"), (dict(combine="magnitude"), "sammagnitude"),
                                        (dict(combine="direction"), "samdirection")])
def test_a_bin_rule_or_combine_of_one_group_acts_on_that_group_only(flags, name):
    # the first group (whose values opt.flags holds) is plain SAM; the ascent is the one global rho g/||g||
    # and synthetic g ignores w, so each tensor steps as its own group's preset reference
    params = make_params()
    opt = SAM([{"params": params[:1]}, {"params": params[1:], **flags}], torch.optim.SGD, rho=RHO, lr=LR,
              momentum=MOM, weight_decay=WD)
    _, got = drive(opt, params, synthetic, 2)
    _, plain = reference_run("sam", make_params(), synthetic, 2)
    _, rule = reference_run(name, make_params(), synthetic, 2)
    assert_lists_close([w[:1] for w in got], [w[:1] for w in plain])
    assert_lists_close([w[1:] for w in got], [w[1:] for w in rule])


@pytest.mark.parametrize("flags,groups", [
    (dict(), [dict(), dict(adaptive=True, asam_eta=0.01), dict(adaptive=True)]),
    (dict(normalize=False), [dict(rho=0.05), dict(rho=0.3), dict(rho=0.2, adaptive=True)]),
])
def test_per_group_rho_and_adaptive_climb_as_the_formula(flags, groups):
    # e = rho_i T_i^2 g/||T g|| (USAM: rho_i T_i^2 g), T_i = |w| + asam_eta_i in ASAM groups and 1 in the others,
    # the norm over all groups; the first group, whose values opt.flags holds, is plain
    params = make_params()
    w = snap(params)
    opt = SAM([{"params": [p], **grp} for p, grp in zip(params, groups)], torch.optim.SGD, rho=RHO, lr=LR, **flags)
    g, _ = synthetic_pair(0)
    set_grads(params, g)
    opt.first_step(zero_grad=True)
    T = [x.abs() + grp.get("asam_eta", 0.0) if grp.get("adaptive") else torch.ones_like(x) for x, grp in zip(w, groups)]
    scale = 1 / (norm([t * x for t, x in zip(T, g)]) + NORM_EPS) if flags.get("normalize", True) else 1.0
    e = [grp.get("rho", RHO) * scale * t * t * x for grp, t, x in zip(groups, T, g)]
    assert_lists_close([snap(params)], [[x + y for x, y in zip(w, e)]])


def test_sparse_sam_update_mask_keeps_the_live_count_and_the_largest_gradients():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant="ssamd", sparsity=0.5, drop_rate=0.5, lr=LR)
    set_grads(params, make_params(seed=4))
    opt.first_step()   # builds the initial random mask
    old = [opt.state[p]["mask"].clone() for p in params]
    opt.second_step(zero_grad=True)
    grads = make_params(seed=8)
    set_grads(params, grads)
    opt.update_mask(progress=0.0)   # death rate drop_rate (1 + cos 0)/2 = 0.5
    new = [opt.state[p]["mask"] for p in params]
    assert sum(int(m.sum()) for m in new) == N_COORD // 2
    alive = torch.cat([(x.abs() * mk - (~mk) * 1.0).flatten() for x, mk in zip(grads, old)])
    kept = torch.argsort(alive, descending=True)[:math.floor(N_COORD // 2 * 0.5)]
    assert torch.cat([m.flatten() for m in new])[kept].all()


@pytest.mark.parametrize("sparsity", [0.25, 0.75])
def test_sparse_masks_keep_one_minus_sparsity_of_the_coordinates(sparsity):
    live = round((1 - sparsity) * N_COORD)
    params = make_params()
    dynamic = SAM(params, torch.optim.SGD, variant="ssamd", sparsity=sparsity, lr=LR)
    assert sum(int(m.sum()) for m in dynamic._masks(params)) == live          # the random start
    set_grads(params, make_params(seed=8))
    dynamic.update_mask(progress=0.5)
    assert sum(int(dynamic.state[p]["mask"].sum()) for p in params) == live
    fisher = SAM(params, torch.optim.SGD, variant="ssamf", sparsity=sparsity, lr=LR)
    for seeds in ((5, 6), (7,)):              # each update_mask scores only the sums since the last one
        srcs = [make_params(seed=s) for s in seeds]
        for src in srcs:
            set_grads(params, src)
            fisher.accumulate_fisher()
        fisher.update_mask()
        expected = top_k_mask([sum(x[i] ** 2 for x in srcs) for i in range(len(params))], live)
        assert_same([fisher.state[p]["mask"] for p in params], expected)


def test_ssamf_scores_float16_weights_in_float32():
    # a float16 square underflows below 6e-8: per-sample gradients near 1e-4 all scored 0 and the mask was a tie
    params = [p.detach().half().requires_grad_() for p in make_params()]
    opt = SAM(params, torch.optim.SGD, variant="ssamf", lr=LR)
    srcs = [[(x * 1e-4).half() for x in make_params(seed=s)] for s in (5, 6, 7)]
    for src in srcs:
        set_grads(params, src)
        opt.accumulate_fisher()
    opt.update_mask()
    expected = top_k_mask([sum(x[i].double() ** 2 for x in srcs) for i in range(len(params))], N_COORD // 2)
    assert_same([opt.state[p]["mask"] for p in params], expected)

def test_ssamd_update_mask_without_gradients_is_refused_and_keeps_the_mask():
    # after second_step(zero_grad=True) every |g| is missing: the drop by smallest |g| was a tie, broken by the
    # tensors' order, silently
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant="ssamd", lr=LR)
    before = [m.clone() for m in opt._masks(params)]
    with pytest.raises(ValueError, match="after backward"):
        opt.update_mask(progress=0.0)
    assert_same([opt.state[p]["mask"] for p in params], before)


def test_state_dict_between_the_two_steps_warns_that_the_model_is_at_w_plus_e():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, lr=LR)
    for seed in (3, 5):
        set_grads(params, make_params(seed=seed))
        opt.first_step(zero_grad=True)
        if seed == 5:
            with pytest.warns(RuntimeWarning, match="the model is at w \\+ e"):
                opt.state_dict()
        set_grads(params, make_params(seed=seed + 1))
        opt.second_step(zero_grad=True)
        with warnings.catch_warnings():   # after a whole step (the first time round: before any warning)
            warnings.simplefilter("error")
            opt.state_dict()


@pytest.mark.parametrize("progress,death", [(-1.0, 0.5), (1.5, 0.0)])
def test_ssamd_death_rate_holds_progress_to_zero_one(progress, death):
    # death rate drop_rate (1 + cos(pi progress))/2 with progress clamped to [0, 1]: 0.5 before the start, 0 after the end
    n = 400
    param = torch.zeros(n, requires_grad=True)
    opt = SAM([param], torch.optim.SGD, variant="ssamd", sparsity=0.5, drop_rate=0.5, lr=0.1)
    param.grad = torch.randn(n)
    before = opt._masks([param])[0].clone()
    opt.update_mask(progress=progress)
    assert int((before & ~opt.state[param]["mask"]).sum()) == round(n // 2 * death)


@pytest.mark.parametrize("compiled", [False, True])
def test_imbsam_adds_the_clean_head_gradient_to_the_perturbed_tail_gradient(compiled):
    # compiled: dynamo dropped the stash (an attribute store on an Optimizer) after zeroing the head gradient
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, variant="imbsam", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    head, tail, tail_p = make_params(seed=11), make_params(seed=12), make_params(seed=13)
    set_grads(params, head)
    (torch.compile(opt.stash_clean_grad, backend="eager") if compiled else opt.stash_clean_grad)()
    assert all(p.grad is None or (p.grad == 0).all() for p in params)
    set_grads(params, tail)
    opt.first_step(zero_grad=True)
    e = ascent("sam", w, snap(tail), RHO)
    assert_lists_close([snap(params)], [[x + y for x, y in zip(w, e)]])
    set_grads(params, tail_p)
    opt.second_step(zero_grad=True)
    assert_lists_close([snap(params)], [SGDRef().step(w, [a.detach() + b.detach() for a, b in zip(tail_p, head)])])


# ------------------------------------------------------------------ SGDHESS on a quadratic with a full Hessian
def test_imbsam_stashes_add_up_and_last_for_one_step():
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, variant="imbsam", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    heads = [make_params(seed=s) for s in (11, 14)]   # two head-class micro-batches before one step
    for head in heads:
        set_grads(params, head)
        opt.stash_clean_grad()
    base = SGDRef()
    for t in range(2):
        g, gp = synthetic_pair(t)
        set_grads(params, g)
        opt.first_step(zero_grad=True)
        set_grads(params, gp)
        opt.second_step(zero_grad=True)
        clean = [a.detach() + b.detach() for a, b in zip(*heads)] if t == 0 else [torch.zeros_like(x) for x in gp]
        w = base.step(w, [x + y for x, y in zip(gp, clean)])
        assert_lists_close([snap(params)], [w])


def test_imbsam_over_a_param_group_of_two_dtypes_adds_each_head_gradient_to_its_own_tensor():
    # a group over float64 and float32 tensors is split by dtype for the math: the stash must line up with that split
    params = [p.detach().to(dt).requires_grad_() for p, dt in zip(make_params(), (DT, torch.float32, DT))]
    w = [x.double() for x in snap(params)]
    opt = SAM(params, torch.optim.SGD, variant="imbsam", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    head, tail, tail_p = ([x.detach().to(p.dtype).double() for x, p in zip(make_params(seed=s), params)]
                          for s in (11, 12, 13))
    for grads in (head, tail, tail_p):
        set_grads(params, [x.to(p.dtype) for x, p in zip(grads, params)])
        (opt.stash_clean_grad if grads is head else opt.first_step if grads is tail else opt.second_step)()
        opt.zero_grad()
        if grads is tail:
            e = ascent("sam", w, tail, RHO)
            assert_lists_close([[x.double() for x in snap(params)]], [[x + y for x, y in zip(w, e)]], 1e-6, 1e-7)
    expected = SGDRef().step(w, [a + b for a, b in zip(tail_p, head)])
    assert_lists_close([[x.double() for x in snap(params)]], [expected], 1e-6, 1e-7)


def test_imbsam_skips_a_parameter_that_neither_loss_reaches():
    params = make_params()
    unused = torch.ones(4, dtype=DT, requires_grad=True)
    w = snap(params)
    opt = SAM(params + [unused], torch.optim.SGD, variant="imbsam", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    head, tail, tail_p = make_params(seed=11), make_params(seed=12), make_params(seed=13)
    set_grads(params, head)
    opt.stash_clean_grad()
    set_grads(params, tail)
    opt.first_step(zero_grad=True)
    set_grads(params, tail_p)
    opt.second_step(zero_grad=True)
    assert_lists_close([snap(params)], [SGDRef().step(w, [a.detach() + b.detach() for a, b in zip(tail_p, head)])])
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(4, dtype=DT))


HESS_SHAPES = [(2, 3, 2, 2), (3, 4), (4,)]


def _hess_problem():
    n = sum(math.prod(s) for s in HESS_SHAPES)
    gen = torch.Generator().manual_seed(21)
    a = torch.randn(n, n, generator=gen, dtype=DT)
    return (a + a.T) / 4


@pytest.mark.parametrize("hessian_every", [1, 2])
def test_sgdhess_matches_one_plus_rho_abs_hz_times_g(hessian_every):
    A = _hess_problem()
    params = make_params(seed=2, shapes=HESS_SHAPES)
    opt = SAM(params, torch.optim.SGD, variant="sgdhess", rho=0.5, hessian_every=hessian_every,
              lr=LR, momentum=MOM, weight_decay=WD)
    assert opt.create_graph and opt.single_pass
    w = snap(params)
    base, D = SGDRef(), None
    for t in range(3):
        torch.manual_seed(100 + t)
        theta = torch.cat([p.flatten() for p in params])
        (0.5 * theta @ A @ theta).backward(create_graph=True)
        opt.first_step(zero_grad=True)
        opt.second_step(zero_grad=True)   # a no-op on one-pass steps
        # reference: g = A w, one Rademacher probe z per tensor (same seed), D = |A z|,
        # averaged over the spatial dims of conv kernels; d = (1 + rho D) g
        g = split(A @ torch.cat([x.flatten() for x in w]), HESS_SHAPES)
        if t % hessian_every == 0:
            torch.manual_seed(100 + t)
            z = [torch.randint_like(x, 2) * 2 - 1 for x in w]
            hz = split((A @ torch.cat([x.flatten() for x in z])).abs(), HESS_SHAPES)
            D = [h.mean(dim=(2, 3), keepdim=True).expand_as(h) if h.dim() == 4 else h for h in hz]
        w = base.step(w, [(1 + 0.5 * dd) * x for dd, x in zip(D, g)])
        assert_lists_close([snap(params)], [w])


def test_sgdhess_without_create_graph_raises():
    params = make_params(shapes=HESS_SHAPES)
    opt = SAM(params, torch.optim.SGD, variant="sgdhess", lr=LR)
    sum((p ** 3).sum() for p in params).backward()
    with pytest.raises(ValueError, match="create_graph"):
        opt.first_step()


@pytest.mark.parametrize("name", ["sgdhess", "sgdhess-exact"])
def test_sgdhess_with_a_parameter_of_constant_gradient_takes_its_zero_hessian_row(name):
    # a loss linear in one tensor (a WGAN critic's last bias): its g is constant, so it has no graph even after
    # backward(create_graph=True); its Hessian row and column are 0, not a reason to ask for create_graph
    A, c = _hess_problem()[:36, :36], torch.linspace(-1.0, 1.0, 4, dtype=DT)
    params = make_params(seed=2, shapes=HESS_SHAPES)
    opt = SAM(params, torch.optim.SGD, variant=name, rho=0.5, lr=LR)
    w = snap(params)
    torch.manual_seed(0)
    theta = torch.cat([p.flatten() for p in params[:2]])
    (0.5 * theta @ A @ theta + params[2] @ c).backward(create_graph=True)
    opt.first_step(zero_grad=True)
    theta = torch.cat([x.flatten() for x in w[:2]])
    g = split(A @ theta, HESS_SHAPES[:2]) + [c]
    if name == "sgdhess":   # z drawn for every tensor in order; H z is 0 on the linear tensor
        torch.manual_seed(0)
        z = torch.cat([(torch.randint_like(x, 2) * 2 - 1).flatten() for x in w])
        hz = split((A @ z[:36]).abs(), HESS_SHAPES[:2]) + [torch.zeros(4, dtype=DT)]
        D = [h.mean(dim=(2, 3), keepdim=True).expand_as(h) if h.dim() == 4 else h for h in hz]
        d = [(1 + 0.5 * dd) * x for dd, x in zip(D, g)]
    else:                   # d = g + rho H g, H g = 0 on the linear tensor
        d = [x + 0.5 * y for x, y in zip(g, split(A @ A @ theta, HESS_SHAPES[:2]) + [torch.zeros(4, dtype=DT)])]
    assert_lists_close([snap(params)], [SGDRef(momentum=0.0, weight_decay=0.0).step(w, d)])


@pytest.mark.parametrize("name", ["sgdhess", "sgdhess-exact"])
def test_sgdhess_over_two_groups_takes_the_whole_hessian_and_each_groups_rho(name):
    # H z and H g couple the groups: a product per group (per part) would drop the blocks between them
    A = _hess_problem()
    params = make_params(seed=2, shapes=HESS_SHAPES)
    opt = SAM([{"params": params[:2]}, {"params": params[2:], "rho": 0.1}], torch.optim.SGD, variant=name, rho=0.5,
              lr=LR)
    w = snap(params)
    torch.manual_seed(0)
    theta = torch.cat([p.flatten() for p in params])
    (0.5 * theta @ A @ theta).backward(create_graph=True)
    opt.first_step(zero_grad=True)
    theta = torch.cat([x.flatten() for x in w])
    g, rhos = split(A @ theta, HESS_SHAPES), (0.5, 0.5, 0.1)
    if name == "sgdhess":   # d = (1 + rho_i |H z|) g, z drawn in the order of the parameters
        torch.manual_seed(0)
        z = torch.cat([(torch.randint_like(x, 2) * 2 - 1).flatten() for x in w])
        hz = split((A @ z).abs(), HESS_SHAPES)
        D = [h.mean(dim=(2, 3), keepdim=True).expand_as(h) if h.dim() == 4 else h for h in hz]
        d = [(1 + r * dd) * x for r, dd, x in zip(rhos, D, g)]
    else:                   # d = g + rho_i H g
        d = [x + r * y for r, x, y in zip(rhos, g, split(A @ A @ theta, HESS_SHAPES))]
    assert_lists_close([snap(params)], [SGDRef(momentum=0.0, weight_decay=0.0).step(w, d)])


# ------------------------------------------------------------------ a tiny MLP with autograd at w + e
def mlp_loss(ws, x, y):
    w1, b1, w2, b2 = ws
    return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()


def mlp_data(step):
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(8, 3, generator=gen, dtype=DT), torch.randn(8, 2, generator=gen, dtype=DT)


def mlp_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=DT).requires_grad_() for s in [(4, 3), (4,), (2, 4), (2,)]]


def mlp_grad(t, point, which):
    pts = [x.detach().clone().requires_grad_() for x in point]
    return list(torch.autograd.grad(mlp_loss(pts, *mlp_data(t)), pts))


@pytest.mark.parametrize("name", ["sam", "usam", "asam", "fishersam", "friendlysam", "samme1", "samme134",
                                  "samckpt1", "sammagnitude", "gsam"])
def test_closure_step_on_an_mlp_matches_autograd_reference(name):
    params = mlp_params()
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    losses = []
    for t in range(3):
        x, y = mlp_data(t)
        w = snap(params)
        losses.append(float(opt.step(mlp_closure(opt, params, x, y)).detach()))
        assert losses[-1] == pytest.approx(float(mlp_loss(w, x, y)), rel=1e-12)   # the first (clean) loss
    _, weights = reference_run(name, mlp_params(), mlp_grad, 3)
    assert_lists_close([snap(params)], [weights[-1]])


# ------------------------------------------------------------------ equivalences
BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
]


def mlp_closure(opt, params, x, y):
    def closure():
        opt.zero_grad()
        loss = mlp_loss(params, x, y)
        loss.backward()
        return loss
    return closure


def run_mlp(opt_fn, steps, params):
    opt = opt_fn(params)
    for t in range(steps):
        opt.step(mlp_closure(opt, params, *mlp_data(t)))
    return opt


@pytest.mark.parametrize("base,kw", BASES)
@pytest.mark.parametrize("name", ["sam", "usam", "asam", "linf-sign", "linf-norm", "fishersam", "friendlysam", "ssamd", "imbsam"])
def test_rho_zero_equals_the_bare_base_optimizer(base, kw, name):
    a, b = mlp_params(), mlp_params()
    opt = run_mlp(lambda ps: SAM(ps, base, variant=name, rho=0.0, **kw), 4, a)
    kernel = {k: opt.base_optimizer.defaults[k] for k in ("fused", "foreach") if opt.base_optimizer.defaults.get(k)}
    run_mlp(lambda ps: base(ps, **kw, **kernel), 4, b)   # the same kernel SAM chose (fused where torch has it)
    assert_same(a, b)


@pytest.mark.parametrize("name,flags", [
    ("sam", dict(stats_every=0)), ("sam", dict(stats_every=3)), ("sam", dict(persist_from=0)),
    ("sam", dict(ratio_eps=1e-3)), ("sam", dict(condition_warmup=5)), ("sam", dict(asam_eta=0.3)),
    ("sam", dict(p=2.0, normalize=True, adaptive=False, fisher_eta=0.0, friendly_sigma=0.0, sparsity=0.0,
                 gsam_alpha=0.0, looksam_k=1, bin_scale=(1, 1, 1, 1, 1), sam_bins="01234", combine="",
                 descent="sam")),
    ("samme1", dict(condition=1.0)), ("samme134", dict(condition=1.0)), ("customsame", dict(condition=1.0)),
    ("saner", dict(condition=1.0)), ("samckpt1", dict(sam_bins="01234")), ("sammagnitude", dict(combine="")),
    ("gsam", dict(gsam_alpha=0.0)), ("looksam", dict(looksam_k=1)), ("friendlysam", dict(friendly_sigma=0.0)),
    ("fishersam", dict(fisher_eta=0.0)), ("ssamd", dict(sparsity=0.0)), ("ssamf", dict(sparsity=0.0)),
    ("asam", dict(adaptive=False)), ("linf-sign", dict(p=2.0)), ("linf-norm", dict(p=2.0)), ("usam", dict(normalize=True)),
    ("sgdhess", dict(descent="sam")), ("sgd", dict(descent="sam")),
])
def test_every_flag_at_its_neutral_value_is_plain_sam(name, flags):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    a, b = mlp_params(), mlp_params()
    run_mlp(lambda ps: SAM(ps, torch.optim.SGD, variant=name, **{"rho": RHO, **flags}, **kw), 3, a)
    run_mlp(lambda ps: SAM(ps, torch.optim.SGD, rho=RHO, **kw), 3, b)
    assert_same(a, b)


@pytest.mark.parametrize("name,flags", [
    ("sam", {}), ("samme134", {}), ("samckpt2", {}), ("gsam", {}), ("friendlysam", {}), ("asam", {}),
    ("looksam", dict(looksam_k=2)), ("sgd", {}), ("ssamd", {}), ("sgdhess", {}),
])
def test_closure_step_equals_the_two_step_form(name, flags):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    hess = name == "sgdhess"
    a, b = mlp_params(), mlp_params()
    opt_a = SAM(a, torch.optim.SGD, variant=name, **flags, **kw)
    opt_b = SAM(b, torch.optim.SGD, variant=name, **flags, **kw)
    for t in range(4):
        x, y = mlp_data(t)

        def closure():
            opt_a.zero_grad()
            loss = mlp_loss(a, x, y)
            loss.backward(create_graph=opt_a.create_graph)
            return loss
        torch.manual_seed(t)
        loss_a = opt_a.step(closure)
        torch.manual_seed(t)
        loss_b = mlp_loss(b, x, y)
        loss_b.backward(create_graph=hess)
        single = opt_b.single_pass
        opt_b.first_step(zero_grad=True)
        if not single:
            mlp_loss(b, x, y).backward()
            opt_b.second_step(zero_grad=True)
        assert torch.equal(loss_a.detach(), loss_b.detach())
        assert_same(a, b)


@pytest.mark.parametrize("name,flags,form", [("sam", {}, "two-step"), ("looksam", dict(looksam_k=2), "closure")])
def test_a_compiled_training_step_takes_the_steps_of_the_formula(name, flags, form):
    # dynamo drops attribute stores on an Optimizer: a compiled first_step left the weights at w + e unrecorded
    # (second_step refused) and a compiled step never counted (LookSAM refreshed every step)
    params = mlp_params()
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, **flags)

    def train_step(x, y):
        if form == "closure":
            return opt.step(mlp_closure(opt, params, x, y))
        mlp_loss(params, x, y).backward()
        single = opt.single_pass
        opt.first_step(zero_grad=True)
        if not single:
            mlp_loss(params, x, y).backward()
            opt.second_step(zero_grad=True)
    compiled = torch.compile(train_step, backend="eager")   # dynamo's tracing without inductor's compile time
    for t in range(3):
        compiled(*mlp_data(t))
    _, weights = reference_run(name, mlp_params(), mlp_grad, 3, **flags)
    assert_lists_close([snap(params)], [weights[-1]])


def test_an_error_in_the_second_pass_of_step_closure_leaves_the_weights_at_w():
    # a loop that skips a batch on an error (out of memory) went on from w + e, and every later step refused
    params = mlp_params()
    opt = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = mlp_data(0)
    calls = []

    def closure():
        opt.zero_grad()
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("the second pass")
        loss = mlp_loss(params, x, y)
        loss.backward()
        return loss
    w = snap(params)
    with pytest.raises(MemoryError):
        opt.step(closure)
    assert not opt.perturbed and all(torch.equal(p.detach(), x0) for p, x0 in zip(params, w))
    reference = SAM(mlp_params(), torch.optim.SGD, lr=0.1, momentum=0.9)   # the next step: as a first step from w
    ref_params = reference.param_groups[0]["params"]
    opt.step(closure)
    reference.step(mlp_closure(reference, ref_params, x, y))
    assert_same(params, ref_params)


@pytest.mark.parametrize("name,flags,calls", [
    ("sam", {}, [2, 2, 2, 2]), ("sgd", {}, [1, 1, 1, 1]), ("sgdhess", {}, [1, 1, 1, 1]),
    ("looksam", dict(looksam_k=3), [2, 1, 1, 2]),
])
def test_single_pass_variants_call_the_closure_once_per_step(name, flags, calls):
    params = mlp_params()
    opt = SAM(params, torch.optim.SGD, variant=name, lr=0.1, **flags)
    got = []
    for t in range(4):
        x, y = mlp_data(t)
        n = [0]

        def closure():
            n[0] += 1
            opt.zero_grad()
            loss = mlp_loss(params, x, y)
            loss.backward(create_graph=opt.create_graph)
            return loss
        opt.step(closure)
        got.append(n[0])
    assert got == calls


# ------------------------------------------------------------------ statistics against a reference count
FINE = ((1.0, 1.2), (1.2, 1.5), (1.5, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, 16.0), (16.0, math.inf))


def reference_stats(w, g, gp, eps=RATIO_EPS):
    gf, gpf = torch.cat([x.flatten() for x in g]), torch.cat([x.flatten() for x in gp])
    n = gf.numel()
    B = checkpoints(gf, gpf, eps)
    r = gpf / (gf + eps)
    out = {f"ckpt{k}": 100 * float(B[k].sum()) / n for k in range(5)}
    for (lo, hi), key in zip(FINE, sam.FINE_NAMES):
        out[key] = 100 * float(((r > lo) & (r < hi)).sum()) / n
    out["grad_norm"] = float(gf.norm())
    out["perturbed_grad_norm"] = float(gpf.norm())
    out["weight_norm"] = float(torch.cat([x.flatten() for x in w]).norm())
    out["cos"] = float(gf @ gpf / (gf.norm() * gpf.norm()))
    out["mag_up"] = 100 * float((gpf.abs() > gf.abs()).sum()) / n
    return out, B[1]


def test_stats_keys_are_all_present_as_floats_before_any_step():
    opt = SAM(make_params(), torch.optim.SGD, lr=LR)
    s = opt.stats
    keys = ["step", "ckpt0", "ckpt1", "ckpt2", "ckpt3", "ckpt4", *sam.FINE_NAMES, "grad_norm",
            "perturbed_grad_norm", "direction_norm", "weight_norm", "cos", "mag_up", "skipped", "persist_t0", "persist_overlap",
            "persist_running"]
    assert set(keys) <= set(s)
    assert all(isinstance(v, float) for v in s.values())
    assert s["skipped"] == 0


def synthetic_step(opt, params, t):
    """One two-step update with the synthetic pair of step t: (w before, g, g', opt.stats)."""
    w = snap(params)
    g, gp = synthetic_pair(t)
    set_grads(params, g)
    opt.first_step(zero_grad=True)
    set_grads(params, gp)
    opt.second_step(zero_grad=True)
    return w, g, gp, opt.stats


@pytest.mark.parametrize("name,eps", [("sam", RATIO_EPS), ("samme1", RATIO_EPS), ("samckpt2", RATIO_EPS),
                                      ("usam", RATIO_EPS), ("sam", 1e-12)])
def test_ratio_statistics_match_a_reference_count(name, eps):
    params = on_device(make_params())
    frozen = torch.ones(7, dtype=DT, device=DEVICE, requires_grad=True)   # no gradient: not counted
    opt = SAM([{"params": params[:2]}, {"params": [frozen] + params[2:]}], torch.optim.SGD, variant=name,
              rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, ratio_eps=eps, stats_every=1)
    for t in range(2):
        w, g, gp, s = synthetic_step(opt, params, t)
        ref, _ = reference_stats(w, g, gp, eps)
        direction = DIRECTIONS.get(name, lambda x, y, b, c: y)   # d = g' but for the bin rules
        ref["direction_norm"] = float(norm([direction(x, y, checkpoints(x, y, eps), 2.0) for x, y in zip(g, gp)]))
        assert s["step"] == t
        for key, value in ref.items():   # ||w|| too: float64 as the rest (a float32 norm is off by 1e-8)
            assert s[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        assert sum(s[f"ckpt{k}"] for k in range(5)) == pytest.approx(100.0)
        assert sum(s[k] for k in sam.FINE_NAMES) == pytest.approx(s["ckpt1"])
        assert s["ckpt0"] > 0 and all(s[f"ckpt{k}"] > 0 for k in range(1, 5))


@pytest.mark.parametrize("every,groups", [(1, 1), (2, 1), (1, 2)])
def test_persistence_counts_match_reference_sets(every, groups):
    # the running intersection is updated on every step from persist_from, whatever stats_every is; its counts
    # sum over the param groups
    params = make_params()
    opt = SAM([{"params": params[:1]}, {"params": params[1:]}] if groups == 2 else params, torch.optim.SGD,
              persist_from=1, rho=RHO, lr=LR, stats_every=every)
    at_t0 = running = None
    for t in range(5):
        w, g, gp, s = synthetic_step(opt, params, t)
        _, b1 = reference_stats(w, g, gp)
        if t >= 1:
            at_t0 = b1 if at_t0 is None else at_t0
            running = b1 if running is None else running & b1
        if t % every:
            continue
        if t < 1:
            assert all(math.isnan(s[k]) for k in ("persist_t0", "persist_overlap", "persist_running"))
            continue
        assert s["step"] == t
        assert s["persist_t0"] == float(at_t0.sum())
        assert s["persist_overlap"] == float((at_t0 & b1).sum())
        assert s["persist_running"] == float(running.sum())
    assert 0 < s["persist_running"] < s["persist_overlap"] < s["persist_t0"]


def test_persistence_sets_line_up_when_a_parameter_has_no_gradient_on_a_step():
    # a parameter without a gradient on a step is outside that step's B1 (as a zero gradient: r = 0); each param
    # group's set stays matched with its own t0 set (they were paired by position: a crash, or a wrong count)
    params = make_params()
    opt = SAM([{"params": params[:1]}, {"params": params[1:]}], torch.optim.SGD, persist_from=0, rho=RHO, lr=LR,
              stats_every=1)
    missing = {1: 0, 2: 2}   # step: the tensor without a gradient (the whole first group, then part of the second)
    at_t0 = running = None
    for t in range(3):
        g, gp = synthetic_pair(t)
        if t in missing:
            g[missing[t]] = gp[missing[t]] = None
        set_grads(params, g)
        opt.first_step(zero_grad=True)
        set_grads(params, gp)
        opt.second_step(zero_grad=True)
        b1 = torch.cat([checkpoints(x, y)[1].flatten() if x is not None else torch.zeros(p.numel(), dtype=torch.bool)
                        for p, x, y in zip(params, g, gp)])
        at_t0 = b1 if at_t0 is None else at_t0
        running = b1 if running is None else running & b1
        s = opt.stats
        assert s["persist_t0"] == float(at_t0.sum())
        assert s["persist_overlap"] == float((at_t0 & b1).sum())
        assert s["persist_running"] == float(running.sum())
    assert 0 < s["persist_overlap"] < s["persist_t0"]


@pytest.mark.parametrize("skipped", [1, 2])
def test_a_skipped_step_leaves_the_persistence_sets_as_they_were(skipped):
    # a step skipped for a NaN g' was not taken: the t0 set is the first taken step's B1 (t0 itself skipped: 1),
    # the running intersection ignores the skipped step (its NaN coordinates would leave it), its counts read NaN
    params = make_params()
    opt = SAM(params, torch.optim.SGD, persist_from=1, rho=RHO, lr=LR, stats_every=1)
    at_t0 = running = None
    for t in range(5):
        g, gp = synthetic_pair(t)
        if t == skipped:
            gp[1] = gp[1].clone()
            gp[1].view(-1)[0] = math.nan
        set_grads(params, g)
        opt.first_step(zero_grad=True)
        set_grads(params, gp)
        if t == skipped:
            with pytest.warns(RuntimeWarning, match=f"SAM skipped step {t}"):
                opt.second_step(zero_grad=True)
        else:
            opt.second_step(zero_grad=True)
        s = opt.stats
        assert opt.last_step_skipped == (t == skipped)
        if t == skipped or t < 1:
            assert all(math.isnan(s[k]) for k in ("persist_t0", "persist_overlap", "persist_running"))
            continue
        b1 = torch.cat([checkpoints(x, y)[1].flatten() for x, y in zip(g, gp)])
        at_t0 = b1 if at_t0 is None else at_t0
        running = b1 if running is None else running & b1
        assert s["persist_t0"] == float(at_t0.sum())
        assert s["persist_overlap"] == float((at_t0 & b1).sum())
        assert s["persist_running"] == float(running.sum())
    assert 0 < s["persist_running"] < s["persist_overlap"] < s["persist_t0"]


@pytest.mark.parametrize("every", [2, 3])
def test_stats_every_k_computes_only_every_k_steps(every):
    params = make_params()
    opt = SAM(params, torch.optim.SGD, stats_every=every, rho=RHO, lr=LR)
    refs = {}
    for t in range(7):
        w = snap(params)
        g, gp = synthetic_pair(t)
        refs[t] = reference_stats(w, g, gp)[0]
        set_grads(params, g)
        opt.first_step(zero_grad=True)
        set_grads(params, gp)
        opt.second_step(zero_grad=True)
        s = opt.stats
        last = t - t % every
        assert s["step"] == last
        assert s["ckpt1"] == pytest.approx(refs[last]["ckpt1"])
        assert s["grad_norm"] == pytest.approx(refs[last]["grad_norm"])


def test_stats_every_zero_never_computes_statistics():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, stats_every=0, rho=RHO, lr=LR)
    drive(opt, params, synthetic, 2)
    s = opt.stats
    assert math.isnan(s["ckpt1"]) and math.isnan(s["grad_norm"]) and s["skipped"] == 0


def test_fine_bins_of_r_above_one_match_a_reference_count_over_a_spread_of_ratios():
    # the synthetic pairs put r at a few fixed values; here r spreads over (0.5, 30) so every fine edge is tested
    gen = torch.Generator().manual_seed(4)
    g = [torch.randn(600, generator=gen, dtype=DT)]
    gp = [g[0] * torch.exp(torch.rand(600, generator=gen, dtype=DT) * math.log(60) - math.log(2))]
    params = [torch.zeros(600, dtype=DT, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, stats_every=1)
    set_grads(params, g)
    opt.first_step(zero_grad=True)
    set_grads(params, gp)
    opt.second_step(zero_grad=True)
    ref, _ = reference_stats([torch.zeros(600, dtype=DT)], g, gp)
    assert all(ref[k] > 2 for k in sam.FINE_NAMES)
    assert {k: opt.stats[k] for k in ref if k != "weight_norm"} == pytest.approx(
        {k: v for k, v in ref.items() if k != "weight_norm"}, rel=1e-12)


def test_statistics_of_a_one_pass_step_are_the_norms_of_g_d_and_w():
    # LookSAM between refreshes has no g': shares, fine bins and cos are NaN; ||g||, ||d|| and ||w|| are measured,
    # d = g + alpha ||g||/||g_v|| g_v with g_v from the last refresh; the B1 sets tracked stay those of the refresh
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant="looksam", looksam_k=2, rho=RHO, lr=LR, stats_every=1, persist_from=0)
    w0, g0, gp0, _ = synthetic_step(opt, params, 0)
    gv = [y - dot(g0, gp0) / dot(g0, g0) * x for x, y in zip(g0, gp0)]
    w, g = snap(params), synthetic(1, None, "g")
    set_grads(params, g)
    assert opt.single_pass
    opt.first_step(zero_grad=True)
    s = opt.stats
    d = [x + 0.7 * norm(g) / norm(gv) * v for x, v in zip(g, gv)]
    assert s["step"] == 1 and all(math.isnan(s[k]) for k in ("ckpt1", "r1_1.2", "perturbed_grad_norm", "cos", "mag_up"))
    assert [s["grad_norm"], s["direction_norm"], s["weight_norm"]] == pytest.approx(
        [float(norm(g)), float(norm(d)), float(norm(w))], rel=1e-12)
    b1 = float(reference_stats(w0, g0, gp0)[1].sum())
    assert [s["persist_t0"], s["persist_overlap"], s["persist_running"]] == [b1] * 3 and b1 > 0


def test_looksam_between_refreshes_before_any_g_v_takes_the_sgd_step():
    # the first refresh is skipped (a NaN g), so the next one-pass step has no g_v yet: d = g + 0, SGD's step
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant="looksam", looksam_k=2, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    w = snap(params)
    with pytest.warns(RuntimeWarning, match="skipped"):
        drive(opt, params, lambda t, point, kind: _poison(synthetic(t, point, kind), 0, math.nan), 1)
    assert_same(snap(params), w)
    g = synthetic(1, None, "g")
    set_grads(params, g)
    assert opt.single_pass
    opt.first_step(zero_grad=True)
    assert_lists_close([snap(params)], [SGDRef().step(w, g)])


@pytest.mark.parametrize("name,flags", [("friendlysam", dict(friendly_sigma=0.5, friendly_lambda=0.6)),
                                        ("looksam", dict(looksam_k=2)), ("sgdhess", dict(hessian_every=2))])
def test_a_parameter_whose_first_gradient_comes_later_starts_its_own_state(name, flags):
    # tensor 1 has no gradient at step 0 (a branch the first batch does not reach): it joins the step, and the
    # state kept between steps (FriendlySAM's m, LookSAM's g_v, SGDHESS's |H z|), when it first has a gradient
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR, **flags)
    m, gv, D = [None] * 3, [torch.zeros_like(x) for x in w], None
    sigma, lam = flags.get("friendly_sigma", 0.0), flags.get("friendly_lambda", 0.9)   # LookSAM: h = g
    for t in range(4):
        live = [0, 2] if t == 0 else [0, 1, 2]
        if name == "sgdhess":   # L = sum of theta^3 / 6 over the live tensors: g = theta^2 / 2, H = diag(theta)
            sum((params[i] ** 3).sum() / 6 for i in live).backward(create_graph=True)
            opt.first_step(zero_grad=True)
            g = [w[i] ** 2 / 2 for i in live]
            if t % 2 == 0 or t == 1:   # every 2 steps, and at step 1 for tensor 1; |H z| = |theta| for any z
                D = [w[i].abs().mean(dim=(2, 3), keepdim=True).expand_as(w[i]) if w[i].dim() == 4 else w[i].abs()
                     for i in live]
            d = [(1 + RHO * dd) * x for dd, x in zip(D, g)]
        else:
            g, gp = [[x[i] for i in live] for x in synthetic_pair(t)]
            set_grads(params, [g[live.index(i)] if i in live else None for i in range(3)])
            single = opt.single_pass
            opt.first_step(zero_grad=True)
            if single:   # LookSAM between refreshes: g + alpha ||g||/||g_v|| g_v, g_v = 0 where none was kept
                d = [x + 0.7 * norm(g) / norm([gv[i] for i in live]) * gv[i] for x, i in zip(g, live)]
            else:
                h = [x if m[i] is None else x - sigma * m[i] for x, i in zip(g, live)]
                e = ascent("sam", None, h, RHO)
                assert_lists_close([[snap(params)[i] for i in live]], [[w[i] + x for i, x in zip(live, e)]])
                set_grads(params, [gp[live.index(i)] if i in live else None for i in range(3)])
                opt.second_step(zero_grad=True)
                d = gp
                for x, y, i in zip(g, gp, live):   # m_0 = g_0 for each tensor; g_v = g' - (<g,g'>/||g||^2) g
                    m[i] = x if m[i] is None else lam * m[i] + (1 - lam) * x
                    gv[i] = y - dot(g, gp) / dot(g, g) * x
        for i, x in zip(live, d):
            w[i] = w[i] - LR * x
        assert_lists_close([snap(params)], [w])


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_a_tensor_unfrozen_later_starts_its_momentum_under_the_fused_sgd_base(nesterov, late):
    # torch's fused SGD (sam.py's default base) refuses a step where some momentum buffers exist and others not: a
    # tensor unfrozen after the first steps (late: reached at w + e only first) starts its buffer as torch's SGD does
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, nesterov=nesterov)
    assert opt.base_optimizer.defaults["fused"]
    bases = [SGDRef(nesterov=nesterov) for _ in params]
    for t in range(4):
        g, gp = synthetic_pair(t)
        live = [0, 2] if t < 2 else [0, 1, 2]
        set_grads(params, [g[i] if i in live else None for i in range(3)])
        opt.first_step(zero_grad=True)
        e = ascent("sam", None, [g[i] for i in live], RHO)
        assert_lists_close([[snap(params)[i] for i in live]], [[w[i] + x for i, x in zip(live, e)]])
        stepped = live + [1] if late and t == 1 else live   # g' without g: d = g', e = 0
        set_grads(params, [gp[i] if i in stepped else None for i in range(3)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.second_step(zero_grad=True)
        for i in stepped:
            w[i] = bases[i].step([w[i]], [gp[i]])[0]
        assert_lists_close([snap(params)], [w])


# ------------------------------------------------------------------ state_dict and schedulers
def walk_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from walk_keys(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk_keys(v)


@pytest.mark.parametrize("name,flags,base,kw,state_key", [
    ("sam", {}, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2), "momentum_buffer"),
    ("sam", {}, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), "exp_avg_sq"),
    ("friendlysam", {}, torch.optim.SGD, dict(lr=0.1, momentum=0.9), "friendly_m"),
    ("ssamd", {}, torch.optim.SGD, dict(lr=0.1, momentum=0.9), "mask"),
    ("looksam", dict(looksam_k=3), torch.optim.AdamW, dict(lr=1e-2), "looksam_gv"),
    ("samme1", dict(persist_from=1, stats_every=1), torch.optim.SGD, dict(lr=0.1, momentum=0.9), "persist"),
])
def test_state_dict_resume_continues_bit_identically(name, flags, base, kw, state_key):
    def make(params):
        return SAM(params, base, variant=name, rho=RHO, **flags, **kw)

    def steps(opt, params, ts):
        for t in ts:
            x, y = mlp_data(t)
            if name == "ssamd" and t == 5:
                torch.manual_seed(7)
                set_grads(params, mlp_grad(t, params, "g"))
                opt.update_mask(progress=0.3)
                opt.zero_grad()   # step(closure) computes its own g (and warns of grads left over)
            opt.step(mlp_closure(opt, params, x, y))

    torch.manual_seed(0)
    full = mlp_params()
    opt_full = make(full)
    steps(opt_full, full, range(8))

    torch.manual_seed(0)
    first = mlp_params()
    opt_first = make(first)
    steps(opt_first, first, range(4))
    buffer = io.BytesIO()
    torch.save({"model": snap(first), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert state_key in set(walk_keys(saved["opt"]))

    resumed = mlp_params(seed=99)
    with torch.no_grad():
        for p, v in zip(resumed, saved["model"]):
            p.copy_(v)
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(saved["opt"])
    steps(opt_resumed, resumed, range(4, 8))
    assert_same(resumed, full)
    a, b = opt_resumed.stats, opt_full.stats
    assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.parametrize("name", ["friendlysam", "looksam", "ssamd"])
def test_deepcopy_and_pickle_keep_the_base_optimizer_and_go_on_bit_for_bit(name):
    # torch's Optimizer.__getstate__ keeps defaults, state and param_groups only: a copy must keep the base optimizer
    # (its Adam moments), SAM's counters and state, and take the very steps of the original
    params = mlp_params()
    opt = SAM(params, torch.optim.Adam, variant=name, rho=RHO, looksam_k=2, lr=LR, weight_decay=WD)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)   # wraps opt.step; the copies are not tied to opt
    for t in range(3):
        opt.step(mlp_closure(opt, params, *mlp_data(t)))
    copies = [copy.deepcopy((params, opt)), pickle.loads(pickle.dumps((params, opt)))]
    for ps, o in copies:
        assert o.param_groups is o.base_optimizer.param_groups and o._step == 3
    rng = torch.get_rng_state()
    for ps, o in [(params, opt)] + copies:
        torch.set_rng_state(rng)
        for t in range(3, 6):
            o.step(mlp_closure(o, ps, *mlp_data(t)))
    for ps, o in copies:
        assert all(torch.equal(a, b) for a, b in zip(ps, params))


@pytest.mark.parametrize("resumed", [False, True])
def test_lr_scheduler_on_the_sam_object_drives_the_base_optimizer(resumed):
    # resumed: a wrapper built afresh and loaded after a step (load_state_dict binds the base's param groups again)
    params = make_params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=0.1)
    if resumed:
        drive(opt, params, synthetic, 1)
        params = [p.detach().clone().requires_grad_() for p in params]
        saved, opt = opt.state_dict(), SAM(params, torch.optim.SGD, rho=RHO, lr=0.1)
        opt.load_state_dict(saved)
    w = snap(params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "lr_scheduler.step() before optimizer.step()" warning
        for t in range(3):
            lr = 0.1 * 0.5 ** t
            assert opt.base_optimizer.param_groups[0]["lr"] == lr
            g, gp = synthetic_pair(t + resumed)
            set_grads(params, g)
            opt.first_step(zero_grad=True)
            set_grads(params, gp)
            opt.second_step(zero_grad=True)
            w = [x - lr * y for x, y in zip(w, gp)]
            assert_lists_close([snap(params)], [w])
            sched.step()
    assert opt.param_groups is opt.base_optimizer.param_groups


@pytest.mark.parametrize("form", ["two-step", "closure"])
def test_step_hooks_on_the_base_optimizer_run_once_a_step_at_w_with_d_in_the_grads(form):
    # the README's place for step hooks in either form (torch runs those on opt around step(closure) only)
    params = mlp_params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    seen = []
    opt.base_optimizer.register_step_pre_hook(lambda o, args, kwargs: seen.append((snap(params), snap(
        [p.grad for p in params]))))
    for t in range(3):
        if form == "closure":
            opt.step(mlp_closure(opt, params, *mlp_data(t)))
        else:
            mlp_loss(params, *mlp_data(t)).backward()
            opt.first_step(zero_grad=True)
            mlp_loss(params, *mlp_data(t)).backward()
            opt.second_step(zero_grad=True)
    points, weights = reference_run("sam", mlp_params(), mlp_grad, 3)
    assert len(seen) == 3
    for t, (w, d) in enumerate(seen):
        assert_lists_close([w, d], [weights[t - 1] if t else snap(mlp_params()), mlp_grad(t, points[t], "gp")])


# ------------------------------------------------------------------ bad inputs and edge cases
def test_unknown_variant_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        SAM(make_params(), torch.optim.SGD, variant="samme9", lr=0.1)
    assert "samme9" in str(err.value) and all(name in str(err.value) for name in VARIANTS)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rhoo=0.1), TypeError, "rhoo"),
    (dict(rho=-0.1), ValueError, "rho"),
    (dict(normalize=False, p=math.inf), ValueError, "normalize"),
    (dict(variant="fishersam", adaptive=True), ValueError, "adaptive"),
    (dict(variant="fishersam", p=3.0), ValueError, "fisher_eta"), (dict(variant="sgd", looksam_k=2), ValueError, "descent"),
    (dict(variant="samme1", combine="magnitude"), ValueError, "combine"),
    (dict(variant="looksam", gsam_alpha=0.4), ValueError, "LookSAM|looksam"),
    (dict(variant="looksam", sam_bins="1"), ValueError, "LookSAM|looksam"),
    (dict(variant="sgd", bin_scale=(1, "c", 1, 1, 1)), ValueError, "descent|sgd"),
    (dict(condition=0.0), ValueError, "condition"),
    (dict(p=1.0), ValueError, r"\bp\b"),
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(bin_scale=(1, 2)), ValueError, "bin_scale"),
    (dict(combine="both"), ValueError, "combine"),
    # every number finite and in range, and of the right kind
    (dict(rho=math.nan), ValueError, "rho"), (dict(rho=math.inf), ValueError, "rho"),
    (dict(rho=True), ValueError, "rho"), (dict(variant="saner", condition=math.nan), ValueError, "condition"),
    (dict(variant="samme1", condition="2"), ValueError, "condition"),
    (dict(bin_scale=(1, math.nan, 1, 1, 1)), ValueError, "bin_scale"),
    (dict(variant="friendlysam", friendly_lambda=5), ValueError, "friendly_lambda"),
    (dict(variant="ssamd", drop_rate=-3), ValueError, "drop_rate"), (dict(p=math.nan), ValueError, r"\bp\b"),
    (dict(stats_every=1.5), ValueError, "stats_every"), (dict(adaptive="yes"), ValueError, "adaptive"),
    (dict(gsam_alpha=math.inf), ValueError, "gsam_alpha"), (dict(persist_from=-1), ValueError, "persist_from"),
    (dict(variant="looksam", looksam_k=0), ValueError, "looksam_k"),
    (dict(variant="sgdhess", hessian_every=0), ValueError, "hessian_every"),
    (dict(bin_scale=(1, 1, 1, 1, 1, "c")), ValueError, "bin_scale"),
    (dict(variant="fishersam", normalize=False), ValueError, "fisher_eta"),
    (dict(variant="looksam", combine="magnitude"), ValueError, "LookSAM"),
    (dict(variant="sgd", gsam_alpha=0.4), ValueError, "descent"),
    (dict(variant="sgd", combine="magnitude"), ValueError, "descent"), (dict(sam_bins="15"), ValueError, "sam_bins"),
    (dict(variant="looksam", looksam_k=2, sam_bins="1"), ValueError, "LookSAM"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAM(make_params(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_per_group_values_raise():
    ps = make_params()
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": ps[:1], "rho": -1.0}, {"params": ps[1:]}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="'p'"):
        SAM([{"params": ps[:1], "p": 3.0}, {"params": ps[1:]}], torch.optim.SGD, lr=0.1)


def test_base_optimizer_must_be_a_class():
    ps = make_params()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1)


def test_a_base_optimizer_with_a_hyper_parameter_named_as_a_flag_is_refused():
    # the param groups are shared: Adadelta read SAM's rho (0.05) as its own averaging constant (0.9)
    with pytest.raises(ValueError, match="Adadelta has its own rho"):
        SAM(make_params(), torch.optim.Adadelta, lr=1.0)


def test_a_base_optimizer_whose_step_needs_a_closure_is_refused():
    # LBFGS was accepted, then failed at the first second_step with "missing 1 required positional argument"
    with pytest.raises(ValueError, match="LBFGS.step needs a closure"):
        SAM(make_params(), torch.optim.LBFGS, lr=1.0)
    assert SAM(make_params(), torch.optim.Rprop, lr=0.01).base_optimizer.__class__ is torch.optim.Rprop


def test_maximize_is_refused():
    # with the base's maximize=True SAM still perturbed towards a higher objective, the direction the base ascends
    with pytest.raises(ValueError, match="maximize=True"):
        SAM(make_params(), torch.optim.SGD, lr=LR, maximize=True)
    assert not SAM(make_params(), torch.optim.SGD, lr=LR, maximize=False).param_groups[0]["maximize"]


def test_add_param_group_joins_the_base_optimizer_with_the_flags_and_climbs_by_the_global_norm():
    # a group added after some steps (fine-tuning): SAM's flags and the base's defaults fill it in, its own rho, lr
    # and weight decay act, ||g|| spans every group, and its momentum starts at its first step
    params = make_params()
    opt = SAM(params[:2], torch.optim.SGD, variant="samme1", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    refs, w = [SGDRef(), SGDRef(lr=0.05, weight_decay=0.0)], snap(params)
    for t in range(3):
        if t == 1:
            opt.add_param_group({"params": params[2:], "lr": 0.05, "weight_decay": 0.0, "rho": 0.2})
            assert opt.base_optimizer.param_groups[1] is opt.param_groups[1]
            assert opt.param_groups[1]["bin_scale"] == VARIANTS["samme1"]["bin_scale"]
        g, gp = synthetic_pair(t)
        n = 3 if t else 2    # the tensors in the optimizer
        set_grads(params[:n], g[:n])
        opt.first_step(zero_grad=True)
        e = [rho * x / norm(g[:n]) for rho, x in zip((RHO, RHO, 0.2)[:n], g)]
        assert_lists_close([snap(params[:n])], [[x + y for x, y in zip(w, e)]])
        set_grads(params[:n], gp[:n])
        opt.second_step(zero_grad=True)
        d = [DIRECTIONS["samme1"](x, y, checkpoints(x, y), 2.0) for x, y in zip(g[:n], gp[:n])]
        w = refs[0].step(w[:2], d[:2]) + (refs[1].step(w[2:], d[2:]) if t else w[2:])
        assert_lists_close([snap(params)], [w])


def test_add_param_group_after_a_schedule_takes_the_sam_wide_flags_as_they_are_now():
    # a schedule wrote gsam_alpha and stats_every into every group (as the README allows); a group added later
    # (unfreezing) was filled with the constructor's values and refused: "'gsam_alpha' must be the same in every
    # param group", though the caller gave no such flag. It now joins with the flags as they are, and steps as GSAM
    # with alpha 0.2 over all tensors
    params = make_params()
    opt = SAM(params[:2], torch.optim.SGD, variant="gsam", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    for group in opt.param_groups:
        group["gsam_alpha"], group["stats_every"] = 0.2, 1
    opt.add_param_group({"params": params[2:]})
    assert opt.param_groups[1]["gsam_alpha"] == 0.2 and opt.param_groups[1]["stats_every"] == 1
    _, weights = drive(opt, params, synthetic, 2)
    _, expected = reference_run("gsam", make_params(), synthetic, 2, gsam_alpha=0.2)
    assert_lists_close(weights, expected)
    assert opt.stats["step"] == 1
    with pytest.raises(ValueError, match="'gsam_alpha' must be the same"):   # a value given explicitly still differs
        opt.add_param_group({"params": [torch.zeros(2, dtype=DT, requires_grad=True)], "gsam_alpha": 0.4})
    with pytest.raises(ValueError, match="'stats_every' must be the same"):   # the constructor's groups: as before
        SAM([{"params": make_params()[:2], "stats_every": 1}, {"params": make_params()[2:]}], torch.optim.SGD, lr=LR)


@pytest.mark.parametrize("flags,words", [(dict(rho=-1.0), "rho must be a finite number >= 0; got -1.0"),
                                         (dict(bin_scale=(1, 2)), "bin_scale must be 5 entries"),
                                         (dict(stats_every=3), "SAM flag 'stats_every' must be the same in every"),
                                         (dict(p=math.inf), "SAM flag 'p' must be the same in every")])
def test_a_param_group_with_bad_or_mixed_flags_is_refused_when_built_and_when_added(flags, words):
    # a group's own flags are checked as the constructor's are, and the flags outside GROUP_FLAGS are SAM-wide;
    # a refused add_param_group leaves SAM's groups and the base's as they were
    params = make_params()
    with pytest.raises(ValueError, match=re.escape(words)):
        SAM([{"params": params[:2]}, {"params": params[2:], **flags}], torch.optim.SGD, lr=LR)
    opt = SAM(params[:2], torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match=re.escape(words)):
        opt.add_param_group({"params": params[2:], **flags})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1
    assert opt.param_groups[0]["params"] == params[:2]


def test_step_without_closure_raises():
    opt = SAM(make_params(), torch.optim.SGD, lr=0.1)
    with pytest.raises((ValueError, TypeError), match="closure"):
        opt.step()


def test_update_mask_needs_a_sparse_variant():
    with pytest.raises(ValueError, match="sparse"):
        SAM(make_params(), torch.optim.SGD, lr=0.1).update_mask()


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.first_step()



@pytest.mark.parametrize("name", ["sam", "usam", "friendlysam", "gsam", "looksam"])
def test_a_complex_parameter_steps_as_its_real_and_imaginary_parts(name):
    # a Fourier layer's complex weights: e = rho g/||g|| over both parts, as SAM on the real pair (torch's convention)
    gen = torch.Generator().manual_seed(0)
    a, b, w0 = (torch.randn(*shape, dtype=torch.cdouble, generator=gen) for shape in ((5, 3), (5,), (3,)))

    def loss(w):
        return (a @ w - b).abs().square().mean() + w.real.sin().sum()

    def grad_fn(t, point, which):
        u, v = (x.clone().requires_grad_() for x in point)
        return list(torch.autograd.grad(loss(torch.complex(u, v)), (u, v)))
    k = 3 if name == "looksam" else 1
    _, weights = reference_run(name, [w0.real, w0.imag], grad_fn, 12, looksam_k=k)
    w = torch.nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, looksam_k=k)
    for t in range(12):
        loss(w).backward()
        opt.first_step(zero_grad=True)
        if opt.perturbed:
            loss(w).backward()
            opt.second_step(zero_grad=True)
    torch.testing.assert_close(w.detach(), torch.complex(*weights[-1]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,flags", [("samme1", {}), ("samckpt1", {}), ("sammagnitude", {}), ("asam", {}),
                                        ("linf-sign", {}), ("linf-norm", {}), ("fishersam", {}), ("ssamf", {}),
                                        ("sgdhess-exact", {}),
                                        ("sam", dict(stats_every=1)), ("sam", dict(persist_from=0))])
def test_a_complex_parameter_under_real_math_is_refused(name, flags):
    # ratios and signs of complex numbers crash; Fisher's f = 1 + g^2 (not |g|^2) and ASAM's |w| were silently wrong
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.cdouble))
    opt = SAM([w], torch.optim.SGD, variant=name, lr=LR, **flags)
    (w.abs().square().sum() + w.real.sum()).backward(create_graph=opt.create_graph)
    with pytest.raises(TypeError, match="complex parameters"):
        opt.first_step(zero_grad=True)
    assert not opt.perturbed

@pytest.mark.parametrize("name", ["sam", "samme1", "asam", "looksam"])
def test_parameters_without_gradient_are_skipped_and_unchanged(name):
    params = make_params()
    frozen = torch.randn(2, 3, dtype=DT, requires_grad=False)
    unused = torch.randn(4, dtype=DT, requires_grad=True)
    before = snap([frozen, unused])
    opt = SAM([{"params": params[:1] + [frozen]}, {"params": [unused] + params[1:]}], torch.optim.SGD,
              variant=name, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    _, got = drive(opt, params, synthetic, 2)
    assert_same(before, [frozen, unused])
    _, weights = reference_run(name, make_params(), synthetic, 2)
    assert_lists_close(got, weights)


@pytest.mark.parametrize("name,flags", [
    ("sam", {}), ("usam", {}), ("asam", {}), ("linf-sign", {}), ("linf-norm", {}), ("sam", dict(p=3.0)), ("fishersam", {}),
    ("friendlysam", {}), ("gsam", {}), ("samme1", {}), ("customsame", {}), ("sammagnitude", {}),
    ("samdirection", {}), ("looksam", dict(looksam_k=2)), ("sgd", {}), ("ssamd", {}),
])
def test_zero_gradient_gives_zero_perturbation_and_no_nan(name, flags):
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM, stats_every=1, **flags)
    for _ in range(3):
        set_grads(params, [torch.zeros_like(x) for x in w])
        single = opt.single_pass
        opt.first_step(zero_grad=True)
        if not single:
            assert_same(snap(params), w)
            set_grads(params, [torch.zeros_like(x) for x in w])
            opt.second_step(zero_grad=True)
        assert_same(snap(params), w)
    s = opt.stats
    assert s["skipped"] == 0
    if name not in ("sgd", "looksam"):
        assert s["ckpt0"] == 100.0 and s["cos"] == 0.0   # cos(0, 0): 0, as a zero gradient, not NaN


@pytest.mark.parametrize("name", ["sam", "usam", "asam", "linf-norm", "fishersam", "friendlysam", "gsam"])
def test_float16_weights_with_gradients_past_norm_256_step_as_the_float64_formula(name):
    """||g|| ~ 900 and ||g'|| in the thousands are finite in float16 (max 65504), their squares are not."""
    def grads16(t, point, kind):   # float16 gradients; the reference gets the same numbers in float64
        return [(200 * x).half().double() for x in synthetic(t, point, kind)]
    w0 = [p.detach().half().double() for p in make_params()]
    params = [x.half().requires_grad_() for x in w0]
    lr, rho = 1e-4, 0.5   # |w| stays near 1 and |e| is near 0.1 on each coordinate: float16 resolves both
    opt = SAM(params, torch.optim.SGD, variant=name, rho=rho, lr=lr, momentum=MOM, weight_decay=WD, stats_every=1)
    points, weights = drive(opt, params, lambda t, point, kind: [x.half() for x in grads16(t, point, kind)], 3)
    ref_points, ref_weights = reference_run(name, w0, grads16, 3, rho=rho, base=SGDRef(lr=lr))
    assert opt.stats["skipped"] == 0 and norm(grads16(2, None, "g")) > 256
    assert math.isclose(opt.stats["grad_norm"], norm(grads16(2, None, "g")), rel_tol=1e-3)
    assert math.isclose(opt.stats["perturbed_grad_norm"], norm(grads16(2, None, "gp")), rel_tol=1e-3)
    assert_lists_close([[x.double() for x in step] for step in points], ref_points, rtol=5e-3, atol=5e-3)
    assert_lists_close([[x.double() for x in step] for step in weights], ref_weights, rtol=5e-3, atol=5e-3)


def _poison(grads, where, value):
    grads = [x.clone() for x in grads]
    grads[where][(0,) * grads[where].dim()] = value
    return grads


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("which", ["g", "gp"])
@pytest.mark.parametrize("name,flags", [("sam", {}), ("samme1", {}), ("friendlysam", {}), ("asam", {}),
                                        ("gsam", {}), ("looksam", dict(looksam_k=2))])
def test_nonfinite_gradient_skips_the_step_and_leaves_weights_bit_identical(name, flags, which, value):
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, **flags)
    drive(opt, params, synthetic, 2)   # finite steps first, so momentum is non-trivial
    w, base_state = snap(params), copy.deepcopy(opt.base_optimizer.state_dict())
    own_state = copy.deepcopy(opt.state_dict()["sam"])   # FriendlySAM's m, LookSAM's g_v: kept on steps taken only

    def bad(t, point, kind):
        grads = synthetic(t, point, kind)
        return _poison(grads, 1, value) if kind == which else grads
    with pytest.warns(RuntimeWarning, match="skipped"):
        drive(opt, params, bad, 1)
    assert opt.last_step_skipped and opt.stats["skipped"] == 1
    assert_same(snap(params), w)
    assert_state_dicts_equal(opt.base_optimizer.state_dict(), base_state)   # momentum untouched
    assert_state_dicts_equal(opt.state_dict()["sam"], own_state)
    two_passes = not opt.single_pass      # LookSAM's cheap step has no g' to poison
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # warned once
        drive(opt, params, bad, 1)
    skipped = 2 if which == "g" or two_passes else 1
    assert opt.stats["skipped"] == skipped
    drive(opt, params, synthetic, 2)      # later finite steps work again
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in params)
    assert not all(torch.equal(a, b) for a, b in zip(w, snap(params)))
    assert opt.stats["skipped"] == skipped


@pytest.mark.parametrize("name", ["sgd", "sgdhess"])
def test_nonfinite_gradient_skips_single_pass_steps(name):
    params = make_params(shapes=HESS_SHAPES)
    opt = SAM(params, torch.optim.SGD, variant=name, lr=LR, momentum=MOM, weight_decay=WD)
    for t in range(3):
        w = snap(params)
        loss = sum((p ** 3).sum() for p in params) * (math.nan if t == 1 else 1.0)
        loss.backward(create_graph=opt.create_graph)
        base_state = copy.deepcopy(opt.base_optimizer.state_dict())
        if t == 1:
            with pytest.warns(RuntimeWarning, match="skipped"):
                opt.first_step(zero_grad=True)
            assert_same(snap(params), w)
            assert_state_dicts_equal(opt.base_optimizer.state_dict(), base_state)
        else:
            opt.first_step(zero_grad=True)
            assert all(torch.isfinite(p).all() for p in params)
    assert opt.stats["skipped"] == 1


def assert_state_dicts_equal(a, b):
    """Bit for bit: every tensor equal, every other value equal."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_dicts_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_dicts_equal(x, y)
    else:
        assert a == b or (a != a and b != b)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(momentum=MOM, weight_decay=WD)),
                                     (torch.optim.AdamW, dict(weight_decay=WD))])
def test_a_skipped_step_leaves_the_base_optimizer_untouched_and_no_flag_means_davda54(base, kw):
    params = make_params()
    opt = SAM(params, base, rho=RHO, lr=LR, **kw)
    drive(opt, params, synthetic, 2)
    before, state = snap(params), copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="skipped"):
        drive(opt, params, lambda t, point, kind: _poison(synthetic(t, point, kind), 0, math.nan), 1)
    assert_same(params, before)
    saved = opt.state_dict()
    assert_state_dicts_equal(saved["base"], state["base"])   # Adam's step count and moments too
    assert saved["counters"] == {"step": state["counters"]["step"] + 1, "skipped": 1}
    # skip_nonfinite=False is davda54's behaviour: no host read, the NaN reaches the weights
    loose = make_params()
    opt = SAM(loose, base, rho=RHO, lr=LR, skip_nonfinite=False, **kw)
    drive(opt, loose, lambda t, point, kind: _poison(synthetic(t, point, kind), 0, math.nan), 1)
    assert not torch.isfinite(loose[0]).all() and not opt.last_step_skipped


@pytest.mark.parametrize("where", [0, 2])
@pytest.mark.parametrize("which", ["g", "gp"])
def test_a_nonfinite_gradient_in_one_part_alone_skips_the_step(which, where):
    # three parts: group 0, and group 1 over float64 and float32; the NaN is in the first or the last part only
    params = make_params()
    params[2] = params[2].detach().float().requires_grad_()
    opt = SAM([{"params": params[:1]}, {"params": params[1:]}], torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)

    def grads(t, point, kind):
        return [x.to(p.dtype) for x, p in zip(synthetic(t, point, kind), params)]
    drive(opt, params, grads, 1)
    w = snap(params)
    with pytest.warns(RuntimeWarning, match="skipped"):
        drive(opt, params, lambda t, point, kind: _poison(grads(t, point, kind), where, math.nan) if kind == which
              else grads(t, point, kind), 1)
    assert opt.last_step_skipped and opt.stats["skipped"] == 1
    assert_same(snap(params), w)


@pytest.mark.parametrize("late_grad", [3.0, math.nan])
def test_a_parameter_reached_at_w_plus_e_only_takes_sams_step_and_the_finite_check(late_grad):
    """A branch reached at w + e only (a routed expert): its e was 0, so it steps with its g' as plain SAM, while
    the other parameter keeps samme1's d; a non-finite g' there skips the whole step (it stepped to NaN)."""
    a, b = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True), torch.tensor([0.5, 4.0], dtype=DT, requires_grad=True)
    w_a, w_b = a.detach().clone(), b.detach().clone()
    opt = SAM([a, b], torch.optim.SGD, variant="samme1", rho=RHO, lr=LR)
    (a ** 2).sum().backward()                         # g = 2a; b has no gradient at w
    opt.first_step(zero_grad=True)
    ((a ** 2).sum() + late_grad * b.sum()).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.second_step(zero_grad=True)
    messages = " | ".join(str(x.message) for x in caught)
    assert "without a gradient at w has one at w + e" in messages
    assert ("skipped step 0" in messages) == (not math.isfinite(late_grad))
    g = 2 * w_a
    gp = 2 * (w_a + RHO * g / g.norm())               # r = g'/g > 1 everywhere: B1, d = c g' with c = 2
    if math.isfinite(late_grad):
        torch.testing.assert_close(a.detach(), w_a - LR * 2 * gp, rtol=1e-14, atol=0)
        torch.testing.assert_close(b.detach(), w_b - LR * late_grad, rtol=1e-14, atol=0)
    else:
        assert opt.last_step_skipped and opt.stats["skipped"] == 1
        assert_same([a, b], [w_a, w_b])


def test_skip_nonfinite_false_steps_and_measures_as_the_default_on_finite_gradients():
    runs = []
    for skip in (True, False):
        params = make_params()
        opt = SAM(params, torch.optim.SGD, variant="samme1", rho=RHO, lr=LR, momentum=MOM, stats_every=1,
                  skip_nonfinite=skip)
        stats = [synthetic_step(opt, params, t)[3] for t in range(2)]
        runs.append((snap(params), [{k: None if math.isnan(v) else v for k, v in x.items()} for x in stats]))
    assert_same(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[1][1][-1]["direction_norm"] > 0


def test_grad_scaler_unscaled_and_updated_around_each_step_takes_the_unscaled_steps_and_skips_an_overflow():
    # the README's recipe: unscale_ before each of the two steps, update() after it (a second unscale_ needs one)
    plain, scaled = mlp_params(), mlp_params()
    opt, opt_scaled = (SAM(ps, torch.optim.SGD, variant="samme1", rho=RHO, lr=LR, momentum=MOM)
                       for ps in (plain, scaled))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)   # a power of two: unscaling is exact

    def scaled_step(x, y, blow_up=1.0):
        for step in (opt_scaled.first_step, opt_scaled.second_step):
            scaler.scale(mlp_loss(scaled, x, y) * blow_up).backward()
            scaler.unscale_(opt_scaled)
            step(zero_grad=True)
            scaler.update()
    for t in range(3):
        mlp_closure(opt, plain, *mlp_data(t))()
        opt.first_step(zero_grad=True)
        mlp_closure(opt, plain, *mlp_data(t))()
        opt.second_step(zero_grad=True)
        scaled_step(*mlp_data(t))
    assert_same(scaled, plain)
    before = snap(scaled)
    with pytest.warns(RuntimeWarning, match="skipped"):
        scaled_step(*mlp_data(3), blow_up=math.inf)   # the overflow at w makes w + e NaN: both passes back off
    assert opt_scaled.last_step_skipped and scaler.get_scale() == 2.0 ** 18
    assert_same(scaled, before)


# ------------------------------------------------------------------ a contributor's rule, the audit's fixes, davda54 users
@pytest.mark.parametrize("name", ["sam", "usam", "ssamd", "samme1", "gsam"])   # the last two keep a copy of g
def test_scaling_the_grads_in_place_equals_the_out_of_place_ascent(name):
    # first_step(zero_grad=True) builds e in the gradients it is about to drop (no allocation); without
    # zero_grad it must leave the caller's gradients alone, and both must climb to the same point bit for bit
    torch.manual_seed(3)
    a, b = make_params(), make_params()
    opt_a = SAM(a, torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM)
    opt_b = SAM(b, torch.optim.SGD, variant=name, rho=RHO, lr=LR, momentum=MOM)
    if opt_a.sparse:   # the same random SSAM-D mask for both
        for opt, params in ((opt_a, a), (opt_b, b)):
            torch.manual_seed(5)
            opt._masks(params)
    for t in range(3):
        g = synthetic(t, None, "g")
        set_grads(a, g)
        set_grads(b, g)
        opt_a.first_step(zero_grad=True)
        opt_b.first_step(zero_grad=False)
        assert_same([p.grad for p in b], g)
        assert_same(snap(a), snap(b))
        set_grads(a, synthetic(t, None, "gp"))
        set_grads(b, synthetic(t, None, "gp"))
        opt_a.second_step(zero_grad=True)
        opt_b.second_step(zero_grad=True)
        assert_same(snap(a), snap(b))


@pytest.mark.parametrize("stats_every", [0, 1])
def test_a_new_direction_rule_that_reads_g_after_the_ratio_gets_g(stats_every):
    # the old code let r overwrite the kept g: a rule d = g then handed g'/g to the base optimizer
    class DirectionIsG(SAM):
        def _direction(self, part, gp, dots):
            super()._direction(part, gp, dots)        # the bin rule computes r and its buckets
            return sam._views(part.g, part.params)
    params = [torch.zeros(3, dtype=DT, requires_grad=True)]
    opt = DirectionIsG(params, torch.optim.SGD, variant="samme1", lr=1.0, stats_every=stats_every)
    set_grads(params, [torch.tensor([0.5, 0.5, -1.0], dtype=DT)])
    opt.first_step(zero_grad=True)
    set_grads(params, [torch.tensor([1.5, 0.25, -4.0], dtype=DT)])
    opt.second_step(zero_grad=True)
    assert (-params[0].detach()).tolist() == [0.5, 0.5, -1.0]


@pytest.mark.parametrize("stats_every", [0, 1, 2])
def test_a_new_flags_direction_rule_gets_g_on_every_step(monkeypatch, stats_every):
    # README's "Adding a rule": a flag in FLAGS and a few lines in _direction. g was kept only for the flags named in
    # _uses_g, and on statistics steps: a new flag left out of it ran its rule on statistics steps only, plain SAM
    # between them
    monkeypatch.setitem(sam.FLAGS, "agree", False)

    class Agree(SAM):   # samagree: d = g' where sign(g') == sign(g), else g
        def _direction(self, part, gp, dots):
            if gp is None or not self.flags["agree"]:
                return super()._direction(part, gp, dots)
            return sam._views(torch.where(gp.sign() == part.g.sign(), gp, part.g), part.params)
    params = [torch.zeros(3, dtype=DT, requires_grad=True)]
    opt = Agree(params, torch.optim.SGD, agree=True, lr=1.0, stats_every=stats_every)
    g, gp = [0.5, 0.5, -1.0], [1.5, -0.25, -4.0]
    w = [0.0, 0.0, 0.0]
    for _ in range(3):
        set_grads(params, [torch.tensor(g, dtype=DT)])
        opt.first_step(zero_grad=True)
        set_grads(params, [torch.tensor(gp, dtype=DT)])
        opt.second_step(zero_grad=True)
        w = [x - (b if a * b > 0 else a) for x, a, b in zip(w, g, gp)]
    assert params[0].detach().tolist() == w


# the presets whose d (or a later step) reads g, by the module docstring's table: the bin rules, combine, GSAM, and
# FriendlySAM's EMA and LookSAM's g_v
READS_G = {v for v in VARIANTS if v.startswith(("samme", "saner", "customsame", "samckpt"))} | {
    "sammagnitude", "samdirection", "gsam", "friendlysam", "looksam"}


@pytest.mark.parametrize("name, flags", [(v, {}) for v in sorted(set(VARIANTS) - {"sgd", "sgdhess", "sgdhess-exact"})]
                         + [("sam", dict(bin_scale=[1, 1, 1, 1, 1])), ("sam", dict(bin_scale=[1, "c", 1, 1, 1]))])
def test_g_is_kept_through_the_ascent_only_where_d_reads_it(name, flags):
    # a copy of every gradient a step: plain SAM's d = g' needs none. bin_scale as a list (a config file's) equal to
    # the neutral tuple kept it
    params = make_params()
    opt = SAM(params, torch.optim.SGD, variant=name, lr=LR, **flags)
    set_grads(params, synthetic(0, None, "g"))
    opt.first_step(zero_grad=True)
    reads_g = name in READS_G or tuple(flags.get("bin_scale", (1,) * 5)) != (1,) * 5
    assert [part.g is not None for part in opt._parts] == [reads_g] * len(opt._parts)


def test_davda54_positional_signature_and_its_example_loop():
    params, ref = make_params(), make_params()
    opt = SAM(params, torch.optim.SGD, 0.05, True, lr=LR, momentum=MOM)    # SAM(params, base, rho, adaptive)
    assert opt.flags["rho"] == 0.05 and opt.flags["adaptive"] and opt.variant == "sam"
    assert SAM(make_params(), torch.optim.SGD, None, variant="asam", lr=LR).flags["rho"] == 2.0   # None: preset's
    with pytest.raises(TypeError, match="variant='samme1'"):
        SAM(make_params(), torch.optim.SGD, "samme1", lr=LR)
    with pytest.raises(TypeError, match="a number; got '0.05'$"):   # a config's string: no "pass variant='0.05'"
        SAM(make_params(), torch.optim.SGD, rho="0.05", lr=LR)
    _, got = drive(opt, params, synthetic, 2)
    base = SGDRef(weight_decay=0.0)
    w = [x.detach().clone() for x in ref]
    for t in range(2):   # davda54: e = rho w^2 g/||w g|| (adaptive, eta 0)
        point = [x + y for x, y in zip(w, ascent("asam", w, synthetic(t, w, "g"), 0.05))]
        w = base.step(w, synthetic(t, point, "gp"))
    assert_lists_close([got[-1]], [w])


@pytest.mark.parametrize("base, kw", [(torch.optim.SGD, dict(lr=LR, momentum=MOM, weight_decay=WD, nesterov=True)),
                                      (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))])
def test_base_optimizer_is_fused_and_steps_as_torchs_default_one(base, kw):
    """SAM builds the base fused (one kernel for all tensors; bench.py): the same SAM steps as with torch's
    per-tensor default, to rounding. An explicit foreach/fused choice, or a base without fused, is left alone."""
    params, ref = make_params(), make_params()
    opt = SAM(params, base, rho=0.05, **kw)
    assert opt.base_optimizer.defaults["fused"] is True
    plain = SAM(ref, base, rho=0.05, foreach=False, **kw)
    assert plain.base_optimizer.defaults["fused"] in (None, False) and plain.base_optimizer.defaults["foreach"] is False
    _, got = drive(opt, params, synthetic, 4)
    _, want = drive(plain, ref, synthetic, 4)
    assert_lists_close(got, want, rtol=1e-13, atol=1e-15)
    assert SAM(make_params(), torch.optim.RMSprop, lr=LR).base_optimizer.defaults["foreach"] is True

    class Averaged(torch.optim.SGD):   # a subclass as train.py's rank-averaging base: fused too
        pass

    class Fixed(torch.optim.SGD):      # a subclass whose constructor takes no fused: left to its own default
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
    assert SAM(make_params(), Averaged, lr=LR).base_optimizer.defaults["fused"] is True
    assert not SAM(make_params(), Fixed, lr=LR).base_optimizer.defaults["fused"]


def test_load_state_dict_takes_davda54_layout_with_a_warning():
    params = make_params()
    theirs = torch.optim.Optimizer([{"params": params[:1]}, {"params": params[1:], "rho": 0.4, "lr": 0.6}],
                                   dict(rho=0.2, adaptive=False, lr=0.3, momentum=0.5))
    theirs.state[params[0]]["old_p"] = params[0].detach().clone()
    mine = make_params()
    opt = SAM([{"params": mine[:1]}, {"params": mine[1:]}], torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="davda54"):
        opt.load_state_dict(theirs.state_dict())
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[0]["lr"] == 0.3
    assert opt.param_groups[0]["momentum"] == 0.5 and not opt.base_optimizer.state
    points, got = drive(opt, mine, synthetic, 2)   # each group steps with its own loaded rho, lr and momentum
    for part, rho, lr in ((slice(0, 1), 0.2, 0.3), (slice(1, 3), 0.4, 0.6)):
        ref_points, ref = reference_run("sam", make_params(), synthetic, 2, rho=rho,
                                        base=SGDRef(lr=lr, momentum=0.5, weight_decay=0.0))
        assert_lists_close([x[part] for x in points], [x[part] for x in ref_points])
        assert_lists_close([x[part] for x in got], [x[part] for x in ref])


def test_state_dict_keeps_the_skipped_count():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    drive(opt, params, synthetic, 1)
    with pytest.warns(RuntimeWarning, match="skipped"):
        drive(opt, params, lambda t, point, kind: _poison(synthetic(t, point, kind), 0, math.nan), 1)
    resumed = SAM(make_params(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state_dict()["counters"] == {"step": 2, "skipped": 1} and resumed.stats["skipped"] == 1


def test_load_state_dict_takes_the_saved_flags_with_a_warning():
    saved = SAM(make_params(), torch.optim.SGD, rho=RHO, lr=LR, p=3.0).state_dict()
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR)
    with pytest.warns(UserWarning, match="replace p"):
        opt.load_state_dict(saved)
    g, _ = synthetic_pair(0)
    set_grads(params, g)
    opt.first_step(zero_grad=True)            # the L_3 ascent of the saved run, not the L_2 one
    assert_lists_close([snap(params)], [[x + y for x, y in zip(w, ascent("lp", w, g, RHO, p=3.0))]])


def test_a_load_state_dict_post_hook_sees_the_base_state_and_the_group_values_it_sets_stay():
    # the hook ran before the base optimizer's state was loaded, whose param groups then replaced the ones it had set
    params = make_params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    drive(opt, params, synthetic, 1)
    resumed, seen = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM), []

    def hook(o):
        seen.append(len(o.base_optimizer.state))
        for group in o.param_groups:
            group["lr"] = LR / 2
    resumed.register_load_state_dict_post_hook(hook)
    resumed.load_state_dict(opt.state_dict())
    assert seen == [len(params)] and resumed.param_groups is resumed.base_optimizer.param_groups
    drive(resumed, params, lambda t, point, which: synthetic(t + 1, point, which), 1)
    ref = SGDRef(momentum=MOM, weight_decay=0.0)   # the saved momentum, the hook's lr
    w = ref.step(snap(make_params()), synthetic_pair(0)[1])
    ref.lr = LR / 2
    assert_lists_close([snap(params)], [ref.step(w, synthetic_pair(1)[1])])


def test_load_state_dict_of_another_variant_is_refused_naming_both():
    saved = SAM(make_params(), torch.optim.SGD, variant="samme1", lr=0.1).state_dict()
    opt = SAM(make_params(), torch.optim.SGD, variant="sam", lr=0.1)
    with pytest.raises(ValueError, match="'samme1'.*'sam'"):
        opt.load_state_dict(saved)
    assert opt.flags["bin_scale"] == (1, 1, 1, 1, 1)


def test_a_param_group_over_two_dtypes_matches_each_dtype_alone():
    # model parallel stand-in: one param group spread over (device, dtype) pairs keeps a flat vector per pair
    mixed = [p.detach().to(dt).requires_grad_() for p, dt in zip(make_params(), (torch.float64, torch.float32, torch.float64))]
    opt = SAM(mixed, torch.optim.SGD, variant="samme1", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD, stats_every=1)
    grads = lambda t, point, kind: [x.to(p.dtype) for x, p in zip(synthetic(t, point, kind), mixed)]
    _, got = drive(opt, mixed, grads, 2)
    _, weights = reference_run("samme1", make_params(), synthetic, 2)
    assert_lists_close([[x.double() for x in got[-1]]], [weights[-1]], rtol=1e-5, atol=1e-6)
    assert math.isfinite(opt.stats["ckpt1"]) and math.isfinite(opt.stats["cos"])


def test_second_step_error_puts_the_weights_back_to_w_first():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR)
    w = snap(params)
    set_grads(params, synthetic(0, w, "g"))
    opt.first_step(zero_grad=True)
    set_grads(params, [None] * len(params))   # no backward at w + e
    with pytest.raises(ValueError, match="none at w"):
        opt.second_step()
    assert_same(snap(params), w)
    assert not opt.perturbed


def test_a_parameter_left_unreached_at_w_plus_e_takes_g_prime_zero():
    # top-1 routing: the ascent moves a past the gate, so b (an expert used at w) gets no gradient at w + e;
    # L(w + e) does not depend on b, g'_b = 0 (as the reverse case, a branch reached at w + e only, is handled)
    a, b = torch.tensor([0.3, 0.4], dtype=DT, requires_grad=True), torch.tensor([0.1], dtype=DT, requires_grad=True)
    loss = lambda: (a ** 2).sum() + ((b ** 2).sum() if float(a.detach().sum()) < 0.75 else 0.0)
    opt = SAM([a, b], torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    w = snap([a, b])
    loss().backward()
    opt.first_step(zero_grad=True)
    loss().backward()
    assert b.grad is None
    with pytest.warns(RuntimeWarning, match="none at w \\+ e; its g' is 0"):
        opt.second_step(zero_grad=True)
    g = torch.cat([2 * w[0], 2 * w[1]])
    e_a = RHO * g[:2] / g.norm()
    d = [2 * (w[0] + e_a), torch.zeros(1, dtype=DT)]   # g' at w + e
    assert_lists_close([snap([a, b])], [[x - LR * (y + WD * x) for x, y in zip(w, d)]])
    # frozen between the passes is still refused, at w
    loss().backward()
    opt.first_step(zero_grad=True)
    b.requires_grad_(False)
    loss().backward()
    with pytest.raises(ValueError, match="none at w"):
        opt.second_step()
    assert not opt.perturbed


def test_the_two_step_protocol_refuses_steps_out_of_order():
    params = make_params()
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    set_grads(params, synthetic(0, None, "g"))
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    one_pass = SAM(make_params(), torch.optim.SGD, variant="sgd", lr=LR)
    set_grads(one_pass.param_groups[0]["params"], synthetic(0, None, "g"))
    one_pass.first_step()
    one_pass.second_step()                # the step was taken in first_step: a no-op, once
    with pytest.raises(RuntimeError, match="without first_step"):
        one_pass.second_step()


def test_an_empty_first_param_group_resumes_from_a_state_dict():
    # a group filtered to nothing (no-decay for BN and biases, in a model without them) is legal in torch; SAM
    # stepped with it, and load_state_dict failed with IndexError reading the first group's first tensor's device
    def build(params):
        return SAM([{"params": [], "weight_decay": 0.0}, {"params": params}], torch.optim.SGD, rho=RHO, lr=LR,
                   momentum=MOM, weight_decay=WD)
    params = make_params()
    opt = build(params)
    drive(opt, params, synthetic, 2)
    saved, w = copy.deepcopy(opt.state_dict()), snap(params)
    resumed = [x.clone().requires_grad_() for x in w]
    opt = build(resumed)
    opt.load_state_dict(saved)
    _, weights = drive(opt, resumed, lambda t, point, which: synthetic(t + 2, point, which), 2)
    _, expected = reference_run("sam", make_params(), synthetic, 4)
    assert_lists_close(weights, expected[2:])


def test_first_step_without_gradients_says_so_at_first_step():
    # a forgotten backward (or a closure under no_grad): the error names the missing gradients where they are
    # missing, not "second_step() without first_step()" one call later; w, the step count and the state stay
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.first_step(zero_grad=True)
    assert not opt.perturbed and opt._step == 0 and not opt.base_optimizer.state
    assert_same(snap(params), w)
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step(lambda: torch.zeros(()))
    set_grads(params, synthetic(0, w, "g"))   # the protocol goes on as usual afterwards
    opt.first_step(zero_grad=True)
    set_grads(params, synthetic(0, w, "gp"))
    opt.second_step(zero_grad=True)
    _, weights = reference_run("sam", make_params(), synthetic, 1)
    assert_lists_close([snap(params)], [weights[-1]], rtol=1e-10, atol=1e-12)


def test_sam_built_on_meta_parameters_before_to_empty_says_so_at_first_step():
    # to_empty() gives the model new parameters: an optimizer built before holds the meta ones (torch's SGD then steps
    # nothing, without a word), and SAM's error asked for the loss.backward() the user had called
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2, dtype=DT)
    early = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p, w0 in zip(model.parameters(), make_params(shapes=[(2, 3), (2,)])):
            p.copy_(w0)
    w = snap(model.parameters())
    inputs, targets = mlp_data(0)
    ((model(inputs) - targets) ** 2).mean().backward()
    with pytest.raises(ValueError, match="after model.to_empty"):
        early.first_step()
    g = [p.grad.clone() for p in model.parameters()]
    SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR).first_step()   # built after: the model's own tensors
    assert_lists_close([snap(model.parameters())], [[x + y for x, y in zip(w, ascent("sam", w, g, RHO))]])


def test_imbsam_refuses_a_clean_gradient_over_other_parameters():
    # d = g'_tail + g_head needs both on the same parameters; the step is not taken and w is back
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, variant="imbsam", rho=RHO, lr=LR)
    set_grads(params, make_params(seed=11)[:2] + [None])
    opt.stash_clean_grad()
    set_grads(params, synthetic(0, None, "g"))
    opt.first_step(zero_grad=True)
    set_grads(params, synthetic(0, None, "gp"))
    with pytest.raises(ValueError, match="same parameters"):
        opt.second_step()
    assert_same(snap(params), w)


def test_step_closure_warns_once_when_gradients_are_already_there():
    params = mlp_params()
    unused = torch.zeros(3, dtype=DT, requires_grad=True)   # never gets a gradient: any gradient present warns
    opt = SAM(params + [unused], torch.optim.SGD, rho=RHO, lr=LR)
    x, y = mlp_data(0)
    mlp_loss(params, x, y).backward()      # davda54's README pattern: backward, then step(closure)
    with pytest.warns(RuntimeWarning, match="already present"):
        opt.step(mlp_closure(opt, params, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlp_loss(params, x, y).backward()
        opt.step(mlp_closure(opt, params, x, y))


def _ssamd_update(n, sparsity, drop_rate):
    """One SSAM-D mask update at progress 0 (death rate drop_rate) on a vector of n: (|g|, the mask before, after)."""
    param = torch.zeros(n, requires_grad=True)
    opt = SAM([param], torch.optim.SGD, variant="ssamd", sparsity=sparsity, drop_rate=drop_rate, lr=0.1)
    param.grad = torch.randn(n)
    before = opt._masks([param])[0].clone()
    opt.update_mask(progress=0.0)
    return param.grad.abs(), before, opt.state[param]["mask"]


def test_ssamd_turnover_equals_its_death_rate():
    # Mi et al.'s SSAM-D grows among the entries dead before the update: no dropped entry comes back
    n = 2000
    grad, before, after = _ssamd_update(n, sparsity=0.5, drop_rate=0.5)   # death rate 0.5 (1 + cos 0) / 2 = 0.5
    assert int(before.sum()) == int(after.sum()) == n // 2
    dropped, grown = before & ~after, after & ~before
    assert int(dropped.sum()) == int(grown.sum()) == n // 4        # turnover 0.5 of the live entries
    kept = before & after                                          # the live entries with the largest |g|
    assert grad[kept].min() >= grad[dropped].max()


def test_ssamd_grows_among_the_just_dropped_only_when_too_few_were_dead():
    # sparsity 0.25: 300 of 400 live, death 0.5 keeps the 150 live entries with the largest |g| and grows 150;
    # only 100 were dead, so all of them come back to life and 50 more are drawn among the 150 just dropped
    n = 400
    grad, before, after = _ssamd_update(n, sparsity=0.25, drop_rate=0.5)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.argsort(torch.where(before, grad, -1.0), descending=True)[:150]] = True
    assert int(before.sum()) == int(after.sum()) == 300
    assert after[kept].all() and after[~before].all()
    assert int((after & before & ~kept).sum()) == 50


def test_ssamd_at_drop_rate_one_regrows_every_live_entry_among_the_dead():
    # death rate drop_rate (1 + cos 0)/2 = 1: every live entry is dropped and as many grow among the dead ones,
    # which at sparsity 0.5 are exactly the other half
    _, before, after = _ssamd_update(400, sparsity=0.5, drop_rate=1.0)
    assert torch.equal(after, ~before)


def test_sparse_masks_cover_the_trainable_parameters_only():
    # a frozen parameter in the optimizer gets no mask and takes no share of the (1 - sparsity) N live entries
    params = make_params()
    frozen = torch.ones(8, dtype=DT)
    opt = SAM(params + [frozen], torch.optim.SGD, variant="ssamd", sparsity=0.5, drop_rate=0.5, lr=LR)
    set_grads(params, make_params(seed=4))
    opt.first_step()
    old = [opt.state[p]["mask"].clone() for p in params]
    assert sum(int(m.sum()) for m in old) == N_COORD // 2 and "mask" not in opt.state[frozen]
    opt.second_step(zero_grad=True)
    grads = make_params(seed=8)
    set_grads(params, grads)
    opt.update_mask(progress=0.0)      # keeps the floor(17 / 2) live entries with the largest |g|, regrows 9
    new = torch.cat([opt.state[p]["mask"].flatten() for p in params])
    alive = torch.cat([torch.where(mk, x.abs(), -1.0).flatten() for x, mk in zip(grads, old)])
    assert int(new.sum()) == N_COORD // 2 and "mask" not in opt.state[frozen]
    assert new[torch.argsort(alive, descending=True)[:8]].all()


@pytest.mark.parametrize("name", ["ssamf", "ssamd"])
def test_a_parameter_added_later_gets_its_own_mask_and_the_others_keep_theirs(name):
    # add_param_group (or unfreezing) after the masks exist: every mask was redrawn, SSAM-F's emptied (no ascent
    # at all until the next update_mask) and SSAM-D's drawn again at random
    params, extra = make_params(), torch.ones(5, dtype=DT, requires_grad=True)
    opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR)
    set_grads(params, make_params(seed=4))
    opt.accumulate_fisher()
    opt.update_mask(progress=0.5)
    opt.zero_grad()
    masks = [opt.state[p]["mask"].clone() for p in params]
    opt.add_param_group({"params": [extra]})
    for t in range(2):   # the new mask is built in the first step; the others were redrawn then, lost for the second
        g, gp = (x + [torch.full((5,), 0.5 + t, dtype=DT)] for x in synthetic_pair(t))
        w = snap(params + [extra])
        set_grads(params + [extra], g)
        opt.first_step(zero_grad=True)
        new = opt.state[extra]["mask"]
        assert int(new.sum()) == (0 if name == "ssamf" else 2)   # SSAM-F: empty until its next Fisher mask
        e = [x * mk * RHO / norm(g) for mk, x in zip(masks + [new], g)]   # masked e, normalised by the full ||g||
        assert_lists_close([snap(params + [extra])], [[x + y for x, y in zip(w, e)]])
        set_grads(params + [extra], gp)
        opt.second_step(zero_grad=True)


def test_ssamf_perturbs_nothing_before_its_first_fisher_mask():
    # SSAM-F's mask is empty until update_mask() scores the Fisher diagonal: e = 0, d = g' = g, an SGD step
    params = make_params()
    w = snap(params)
    opt = SAM(params, torch.optim.SGD, variant="ssamf", rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    g, _ = synthetic_pair(0)
    set_grads(params, g)
    opt.first_step(zero_grad=True)
    assert_same(snap(params), w)
    set_grads(params, g)
    opt.second_step(zero_grad=True)
    assert_lists_close([snap(params)], [SGDRef().step(w, g)])


def test_sgdhess_exact_is_g_plus_rho_times_the_full_hessian_times_g():
    A = _hess_problem()
    params = make_params(seed=2, shapes=HESS_SHAPES)
    opt = SAM(params, torch.optim.SGD, variant="sgdhess-exact", rho=0.5, lr=LR, momentum=MOM, weight_decay=WD)
    assert opt.create_graph and opt.single_pass
    w, base = snap(params), SGDRef()
    for t in range(3):
        theta = torch.cat([p.flatten() for p in params])
        (0.5 * theta @ A @ theta + (theta ** 3).sum() / 6).backward(create_graph=True)   # H = A + diag(theta)
        opt.first_step(zero_grad=True)
        theta_ref = torch.cat([x.flatten() for x in w])
        g, H = A @ theta_ref + theta_ref ** 2 / 2, A + torch.diag(theta_ref)
        w = base.step(w, split(g + 0.5 * H @ g, HESS_SHAPES))
        assert_lists_close([snap(params)], [w])


def test_linf_presets_are_the_two_documented_forms():
    g = [torch.tensor([0.5, -2.0, 1.0], dtype=DT)]
    for name, expected in (("linf-sign", [RHO, -RHO, RHO]), ("linf-norm", [RHO / 4, -RHO, RHO / 2])):
        params = [torch.zeros(3, dtype=DT, requires_grad=True)]
        opt = SAM(params, torch.optim.SGD, variant=name, rho=RHO, lr=LR)
        set_grads(params, g)
        opt.first_step(zero_grad=True)
        assert params[0].detach().tolist() == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------ BatchNorm helpers and autocast
def test_batchnorm_buffers_stay_bit_identical_through_a_skipped_step_at_nan_weights():
    # issue: a non-finite g put w + e at NaN and the second pass (momentum 0) multiplied the running
    # statistics by NaN; now the second pass leaves every BN buffer alone and the step is skipped
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=0.0), torch.nn.Linear(4, 2))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x = torch.randn(8, 3)
    model(x).pow(2).mean().backward()
    for p in model.parameters():
        p.grad[...] = math.nan
    buffers, weights = snap(model.buffers()), snap(model.parameters())
    opt.first_step(zero_grad=True)
    disable_running_stats(model)
    model(x).pow(2).mean().backward()   # at w + e = NaN
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.second_step(zero_grad=True)
    enable_running_stats(model)
    assert_same(snap(model.buffers()), buffers)
    assert_same(snap(model.parameters()), weights)
    assert opt.last_step_skipped and not opt.base_optimizer.state


def test_disable_running_stats_keeps_batchnorm_statistics_in_later_passes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4, momentum=None))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x = torch.randn(8, 3)
    bns = [model[1], model[3]]
    model(x).pow(2).mean().backward()   # first pass updates the running statistics
    opt.first_step(zero_grad=True)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    counts = [m.num_batches_tracked.clone() for m in bns]
    disable_running_stats(model)
    disable_running_stats(model)        # idempotent: the saved setting is not overwritten
    model(x + 1).pow(2).mean().backward()
    opt.second_step(zero_grad=True)
    for m, (mean, var), count in zip(bns, stats, counts):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, count)
    enable_running_stats(model)
    assert all(m.track_running_stats for m in bns) and bns[0].momentum == 0.1 and bns[1].momentum is None
    model(x + 2)
    assert not torch.equal(bns[0].running_mean, stats[0][0])


@pytest.mark.parametrize("variant", ["sam", "sgd"])
def test_closure_recipe_keeps_batchnorm_statistics_of_the_first_pass(variant):
    # the README's closure: disable_running_stats on the second pass (opt.perturbed), enable it otherwise
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, variant=variant, rho=0.5, lr=0.1)
    x = torch.randn(8, 3)

    def closure():
        (disable_running_stats if opt.perturbed else enable_running_stats)(model)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss
    for _ in range(2):
        with torch.no_grad():
            reference.load_state_dict(model.state_dict())
            reference(x)                     # one training-mode forward at w: the statistics to expect
        opt.step(closure)
        enable_running_stats(model)
        assert_same(snap(model[1].buffers()), snap(reference[1].buffers()))


def test_enable_running_stats_restores_a_batchnorm_the_user_froze():
    # fine-tuning with frozen BN statistics (track_running_stats set False, buffers kept): a SAM step with
    # disable/enable_running_stats leaves that choice as it was, so later forwards still leave the buffers alone
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model(torch.randn(8, 3))
    model[1].track_running_stats = False
    buffers = snap(model[1].buffers())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x = torch.randn(8, 3)
    enable_running_stats(model)
    model(x).pow(2).mean().backward()
    opt.first_step(zero_grad=True)
    disable_running_stats(model)
    model(x).pow(2).mean().backward()
    opt.second_step(zero_grad=True)
    enable_running_stats(model)
    model(x + 1)
    assert model[1].track_running_stats is False
    assert_same(snap(model[1].buffers()), buffers)


@pytest.mark.parametrize("name", ["sam", "samme1", "asam", "gsam"])
def test_bf16_autocast_on_cpu_runs_and_stays_finite(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = snap(model.parameters())
    opt = SAM(model.parameters(), torch.optim.SGD, variant=name, lr=0.1, momentum=0.9, stats_every=1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(2):
        loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    s = opt.stats
    assert math.isfinite(s["ckpt1"]) and math.isfinite(s["grad_norm"]) and s["skipped"] == 0


# ==================================================================== toy.py and plots.py
# ----------------------------------------------------------------------------- toy.py
def test_sensing_small_usam_diverges_where_sam_converges():
    prob = toy.Sensing(d=20, r=3)
    U0 = prob.init()
    usam = toy.run_sensing(prob, U0, "usam", rho=0.3, steps=30)[0]
    sam = toy.run_sensing(prob, U0, "sam", rho=0.3, steps=30)[0]
    assert usam[3] > 1e30   # within three steps
    assert all(map(math.isfinite, sam)) and sam[-1] < 0.1 * sam[0]


def test_sensing_matches_full_gaussian_measurements():
    # the upper-triangle storage gives <A_i, X> of a full Gaussian A_i: check E<A, X>^2 = ||X||_F^2
    prob = toy.Sensing(d=8, r=2)
    X = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=toy.DTYPE)
    X = X + X.T
    values = prob.A @ X[prob.rows, prob.cols]
    assert values.square().mean().item() == pytest.approx(X.square().sum().item(), rel=0.2)


def test_trajectories_are_sam_steps():
    # sgd, sam and usam against their formulas; every plain variant against sam.py's closure form
    land = toy.landscapes()[1]
    f = toy.hyperbola
    w = torch.tensor(land.start, dtype=toy.DTYPE)
    for variant, ascent in (("sgd", lambda g: 0 * g), ("sam", lambda g: land.rho * g / g.norm()),
                            ("usam", lambda g: land.rho * g)):
        path = toy.trajectory(land, variant, steps=2)
        v = w.clone()
        for t in range(2):
            g = torch.func.grad(f)(v)
            v = v - land.lr * torch.func.grad(f)(v + ascent(g))
            assert torch.allclose(path[t + 1], v, atol=1e-12), variant
    for variant in ("asam", "linf-sign", "linf-norm", "friendlysam", "fishersam", "samme1", "samme3", "sammagnitude", "samdirection"):
        v = torch.tensor(land.start, dtype=toy.DTYPE, requires_grad=True)
        opt = SAM([v], torch.optim.SGD, variant=variant, rho=land.rho, lr=land.lr, stats_every=0)

        def closure():
            opt.zero_grad()
            loss = f(v)
            loss.backward()
            return loss
        for _ in range(2):
            opt.step(closure)
        assert torch.allclose(toy.trajectory(land, variant, steps=2)[-1], v.detach(), atol=1e-12), variant


def test_imbsam_trajectory_perturbs_only_the_tail_loss():
    land = toy.landscapes()[2]
    w = torch.tensor(land.start, dtype=toy.DTYPE)
    head_grad = torch.func.grad(lambda v: land.split(v)[0])(w)
    tail = lambda v: land.split(v)[1]   # noqa: E731
    g = torch.func.grad(tail)(w)
    expected = w - land.lr * (head_grad + torch.func.grad(tail)(w + land.rho * g / g.norm()))
    assert torch.allclose(toy.trajectory(land, "imbsam", steps=1)[-1], expected, atol=1e-12)


def _sensing_reference(prob, U, variant, rho, lr, steps):
    """Iterates of full-batch GD, SAM (e = rho g / (||g|| + norm_eps)) or USAM (e = rho g): U - lr grad f(U + e)."""
    grad = torch.func.grad(prob.loss)
    path = [U]
    for _ in range(steps):
        g = grad(U)
        e = {"sgd": 0 * g, "sam": rho * g / (g.norm() + sam.FLAGS["norm_eps"]), "usam": rho * g}[variant]
        U = U - lr * grad(U + e)
        path.append(U)
    return path


def test_sensing_csvs_hold_the_loss_and_sharpness_of_each_recorded_step(tmp_path, monkeypatch):
    """sensing_rho.csv: rho, step, sam, usam = f after `step` SAM and USAM steps at lr 0.5 and that rho from
    U0 = prob.init(), for every rho of RHOS and step 0..steps (plots.py reads these names). sensing_long.csv:
    variant, step, loss, lambda_max every 10th step of the long run: GD (lr 0.5, long_steps steps) to a minimum of
    a fresh small problem, from there each variant at lr 0.1, rho 0.1; lambda_max, at multiples of long_steps // 4,
    the mean of the exact top Hessian eigenvalue at that iterate and the next three, else nan. Recomputed by hand."""
    monkeypatch.setattr(toy, "_plot_sensing", lambda *args: None)   # the figure is not what this checks
    d, r, steps, long_d, long_r, long_steps = 8, 2, 4, 5, 2, 60
    toy.sensing(str(tmp_path), d=d, r=r, steps=steps, long_d=long_d, long_r=long_r, long_steps=long_steps)
    with open(tmp_path / "sensing_rho.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["rho", "step", "sam", "usam"]
    prob = toy.Sensing(d, r)
    U0 = prob.init()
    expected = []
    for rho in (0.001, 0.005, 0.01, 0.1):
        paths = {v: _sensing_reference(prob, U0, v, rho, 0.5, steps) for v in ("sam", "usam")}
        expected += [(rho, t, prob.loss(paths["sam"][t]).item(), prob.loss(paths["usam"][t]).item()) for t in range(steps + 1)]
    assert [(float(row["rho"]), int(row["step"])) for row in rows] == [(rho, t) for rho, t, _, _ in expected]
    for row, (rho, t, sam_loss, usam_loss) in zip(rows, expected):
        assert float(row["sam"]) == pytest.approx(sam_loss, rel=1e-9), (rho, t)
        assert float(row["usam"]) == pytest.approx(usam_loss, rel=1e-9), (rho, t)
    assert float(rows[0]["sam"]) == float(rows[0]["usam"]) != float(rows[1]["sam"]) != float(rows[1]["usam"])

    with open(tmp_path / "sensing_long.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["variant", "step", "loss", "lambda_max"]
    small = toy.Sensing(long_d, long_r)
    U_min = _sensing_reference(small, small.init(), "sgd", 0.0, 0.5, long_steps)[-1]

    def top_eigenvalue(U):
        return torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda v: small.loss(v.view_as(U)), U.flatten()))[-1].item()
    every = long_steps // 4   # 15: lambda_max at steps 0, 30 and 60 of the rows kept (every 10th)
    recorded = []
    for variant in ("sgd", "sam", "usam"):
        path = _sensing_reference(small, U_min, variant, 0.1, 0.1, long_steps + 3)
        for t in range(0, long_steps + 1, 10):
            lam = sum(top_eigenvalue(U) for U in path[t:t + 4]) / 4 if t % every == 0 else math.nan
            recorded.append((variant, t, small.loss(path[t]).item(), lam))
    assert [(row["variant"], int(row["step"])) for row in rows] == [(v, t) for v, t, _, _ in recorded]
    for row, (variant, t, loss, lam) in zip(rows, recorded):
        assert float(row["loss"]) == pytest.approx(loss, rel=1e-6), (variant, t)
        assert float(row["lambda_max"]) == pytest.approx(lam, rel=1e-9, nan_ok=True), (variant, t)
    assert sum(math.isfinite(float(row["lambda_max"])) for row in rows) == 9


def test_logistic_toy_draws_the_blobs_flips_int_flip_n_labels_and_splits_head_label_0():
    """Origin 4.6: n // 2 points N((1, 1), [[1, 0.25], [0.25, 1]]) labelled 1, the rest N((-1, -1), [[1, -0.25],
    [-0.25, 1]]) labelled 0, then exactly int(flip n) labels flipped (the first of a permutation); the loss is the mean
    BCE of w . x (no bias), split = (head: the label-0 examples' share, tail: the label-1 examples'), both over n.
    Redrawn by hand from the same generator, then every closure against it."""
    import inspect
    for seed, n, flip in ((0, 100, 0.25), (3, 41, 0.3), (5, 10, 0.29)):
        loss, samples, split, where = toy.logistic_toy(seed=seed, n=n, flip=flip)
        gen = torch.Generator().manual_seed(seed)
        half = n // 2
        x = []
        for count, mean, c in ((half, 1.0, 0.25), (n - half, -1.0, -0.25)):   # chol [[1, c], [c, 1]] = [[1, 0], [c, sqrt(1 - c^2)]]
            z = torch.randn(count, 2, generator=gen, dtype=torch.float64)
            x.append(torch.stack([z[:, 0] + mean, c * z[:, 0] + math.sqrt(1 - c * c) * z[:, 1] + mean], 1))
        x = torch.cat(x)
        clean = torch.tensor([1.0] * half + [0.0] * (n - half), dtype=torch.float64)
        flips = int(flip * n)   # 25, 12 and 2 (0.29 * 10 is 2.9...)
        y = clean.clone()
        chosen = torch.randperm(n, generator=gen)[:flips]
        y[chosen] = 1 - y[chosen]
        held = inspect.getclosurevars(samples).nonlocals
        assert torch.allclose(held["x"], x, rtol=0, atol=1e-14) and torch.equal(held["y"], y), seed
        assert int((held["y"] != clean).sum()) == flips == {0: 25, 3: 12, 5: 2}[seed]
        assert torch.equal(inspect.getclosurevars(where).nonlocals["clean"], clean)
        for w in ([0.0, 0.0], [1.0, -5.0], [0.3, 0.7], [-2.0, 1.5]):
            w = torch.tensor(w, dtype=torch.float64)
            z = x @ w
            per = torch.log1p(torch.exp(-z.abs())) + z.clamp(min=0) - y * z   # BCE with logits: softplus(z) - y z
            assert torch.allclose(samples(w), per, rtol=1e-12, atol=1e-15)
            assert loss(w).item() == pytest.approx(per.mean().item(), rel=1e-12)
            head, tail = split(w)
            assert head.item() == pytest.approx(per[y == 0].sum().item() / n, rel=1e-12, abs=1e-15)
            assert tail.item() == pytest.approx(per[y == 1].sum().item() / n, rel=1e-12, abs=1e-15)
            assert where(w) == f"clean acc {100 * ((z > 0).double() == clean).double().mean().item():.0f}%"
    # many points: the blobs' means and covariances are the docstring's
    _, samples, _, _ = toy.logistic_toy(seed=1, n=40000, flip=0.0)
    x = inspect.getclosurevars(samples).nonlocals["x"]
    for part, mean, c in ((x[:20000], 1.0, 0.25), (x[20000:], -1.0, -0.25)):
        assert torch.allclose(part.mean(0), torch.tensor([mean, mean], dtype=torch.float64), atol=0.03)
        assert torch.allclose(torch.cov(part.T), torch.tensor([[1, c], [c, 1]], dtype=torch.float64), atol=0.04)


def test_sparse_variants_run_and_end_in_the_flat_basin():
    land = toy.landscapes()[0]
    for variant in ("ssamf", "ssamd"):
        path = toy.trajectory(land, variant)
        assert torch.isfinite(path).all() and land.where(path[-1]) == "flat"
    assert land.where(toy.trajectory(land, "sgd")[-1]) == "sharp"


def test_checkpoint_points_fall_in_their_bins_by_sam_stats():
    for k, w0, _ in toy.CHECKPOINTS:
        w = torch.tensor([w0], dtype=toy.DTYPE, requires_grad=True)
        opt = SAM([w], torch.optim.SGD, variant="sam", rho=toy.CKPT_RHO, lr=0.1, stats_every=1)
        toy.double_well(w).sum().backward()
        opt.first_step(zero_grad=True)
        toy.double_well(w).sum().backward()
        opt.second_step(zero_grad=True)
        assert opt.stats[f"ckpt{k}"] == 100.0, k


def test_toy_landscapes_and_curvatures_match_their_formulas():
    # hyperbola f = (xy - 1)^2 / 2, Hessian [[y^2, 2xy - 1], [2xy - 1, x^2]] (on xy = 1: eigenvalues 0 and x^2 + y^2)
    for x, y in ((1.0, 1.0), (2.0, 0.5), (1.5, 1.2), (-0.3, 2.0)):
        w = torch.tensor([x, y], dtype=toy.DTYPE)
        a, b, c = y * y, 2 * x * y - 1, x * x
        assert toy.hyperbola(w).item() == pytest.approx((x * y - 1) ** 2 / 2, rel=1e-12)
        assert toy.top_eigenvalue(toy.hyperbola, w) == pytest.approx((a + c) / 2 + math.hypot((a - c) / 2, b), rel=1e-10)
    # two basins: curvature 8 at the sharp bowl's bottom (-1, 0.5), depth -0.3; 0.4 at the flat one's (1.5, -0.5), depth 0
    for at, curvature, depth in (((-1.0, 0.5), 8.0, -0.3), ((1.5, -0.5), 0.4, 0.0)):
        w = torch.tensor(at, dtype=toy.DTYPE)
        assert toy.two_basins(w).item() == pytest.approx(depth, abs=1e-12)
        assert toy.top_eigenvalue(toy.two_basins, w) == pytest.approx(curvature, rel=1e-10)
    # the largest eigenvalue, not the largest in size: a saddle with curvatures 1 and -3
    saddle = lambda w: 0.5 * (w[0] ** 2 - 3 * w[1] ** 2)   # noqa: E731
    assert toy.top_eigenvalue(saddle, torch.tensor([0.2, -0.1], dtype=toy.DTYPE)) == pytest.approx(1.0, rel=1e-12)
    # power iteration against a quadratic whose top two eigenvalues are close (1 and 0.9: slow to converge)
    scales = torch.tensor([1.0, 0.9, 0.5, 0.1], dtype=toy.DTYPE)
    assert toy._power_eigenvalue(lambda w: 0.5 * (scales * w * w).sum(), torch.ones(4, dtype=toy.DTYPE)) == \
        pytest.approx(1.0, abs=1e-3)


def test_toy_panels_name_presets_of_sam_py():
    assert {v for names in toy.PANELS.values() for v in names} <= set(VARIANTS)


def test_toy_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        toy.main(["bogus"])
    assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as err:
        toy.main(["checkpoints", "--out", str(blocker / "sub")])
    assert err.value.code == 2 and "cannot use --out" in capsys.readouterr().err
    # a folder that exists but takes no file: refused before any part runs, not a traceback at its first write
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    readonly = str(locked) if os.geteuid() != 0 else "/sys" if os.path.isdir("/sys/kernel") else None   # root: sysfs
    if readonly:
        with pytest.raises(SystemExit) as err:
            toy.main(["checkpoints", "--out", readonly])
        assert err.value.code == 2 and "cannot use --out" in capsys.readouterr().err
    locked.chmod(0o700)


def test_toy_checkpoints_writes_figure_and_csv(tmp_path, monkeypatch):
    """`toy.py checkpoints` writes checkpoints.png and checkpoints.csv, and runs no other part. Each panel draws w and
    w + e (e = 0.5 sign(g)) on f = w^4/4 - w^2/2, each with an arrow from it along its -gradient, the longer of the two
    0.6 long and their lengths in the ratio |g'/g|; the title gives r = g'/g. Recomputed from f' = w^3 - w."""
    close = toy.plt.close
    kept = []
    monkeypatch.setattr(toy.plt, "close", kept.append)
    toy.main(["checkpoints", "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["checkpoints.csv", "checkpoints.png"]
    assert (tmp_path / "checkpoints.png").stat().st_size > 10_000
    (fig,) = kept
    assert len(fig.axes) == 4
    for ax, (k, w) in zip(fig.axes, ((1, 1.2), (2, 0.6), (3, -0.1), (4, -0.3))):
        g = w ** 3 - w
        we = w + 0.5 * (1 if g > 0 else -1)
        gp = we ** 3 - we
        assert ax.get_title().startswith(f"checkpoint {k}: r = g'/g = {gp / g:+.2f}\n"), k
        scale = 0.6 / max(abs(g), abs(gp))
        assert len(ax.lines) == 3 and len(ax.texts) == 2, k   # the curve, then each point and its arrow
        for point, arrow, x, grad in zip(ax.lines[1:], ax.texts, (w, we), (g, gp)):
            fx = x ** 4 / 4 - x ** 2 / 2
            assert (point.get_xdata()[0], point.get_ydata()[0]) == pytest.approx((x, fx), abs=1e-6), k
            assert arrow.xyann == pytest.approx((x, fx), abs=1e-6), k                  # from the point
            assert arrow.xy == pytest.approx((x - scale * grad, fx), abs=1e-6), k      # along -gradient
    close(fig)


def test_toy_interrupted_writes_leave_the_old_figure_and_csv_whole(tmp_path, monkeypatch):
    """Ctrl-C while a figure or a CSV is being written (a re-run over committed outputs) leaves the file of the run
    before, byte for byte, and nothing beside it."""
    toy.main(["checkpoints", "--out", str(tmp_path)])
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    save = toy.plt.Figure.savefig

    def cut_savefig(fig, fname, **kwargs):   # the PNG's first part is on disk when the interrupt lands
        save(fig, fname, **kwargs)
        with open(fname, "r+b") as f:
            f.truncate(1000)
        raise KeyboardInterrupt
    monkeypatch.setattr(toy.plt.Figure, "savefig", cut_savefig)
    with pytest.raises(KeyboardInterrupt):
        toy.checkpoints(str(tmp_path))

    class Interrupt:   # the csv module writes a row's fields as str(field): the interrupt lands after some rows
        def __str__(self):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        toy.write_csv(str(tmp_path / "checkpoints.csv"), [dict(checkpoint=k, ratio=1.0) for k in range(500)]
                      + [dict(checkpoint=500, ratio=Interrupt())])
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_sensing_toy_redraws_u_star_measurements_loss_and_init_from_its_generator():
    """Sensing(d, r, seed) draws from one generator, in this order: U* (d x r standard Gaussian, columns scaled to unit
    norm), m = 5dr full Gaussian A_i (kept as the coefficients of X's upper triangle: N(0, 1) on the diagonal, N(0, 2) off
    it), then init() = 0.7 G / sqrt(d); f(U) = 1/(4m) sum_i (<A_i, U U^T> - <A_i, U* U*^T>)^2. Redrawn by hand, with
    each symmetric (A_i + A_i^T) / 2 built in full."""
    for d, r, seed in ((6, 2, 0), (5, 1, 3)):
        prob = toy.Sensing(d, r, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        u = torch.randn(d, r, generator=gen, dtype=torch.float64)
        u = u / u.square().sum(0).sqrt()
        m = 5 * d * r
        z = torch.randn(m, d * (d + 1) // 2, generator=gen, dtype=torch.float64)
        sym = torch.zeros(m, d, d, dtype=torch.float64)
        k = 0
        for j in range(d):
            for l in range(j, d):   # (A_jl + A_lj) / 2 ~ N(0, 2) / 2 off the diagonal
                sym[:, j, l] = sym[:, l, j] = z[:, k] if j == l else z[:, k] * math.sqrt(2) / 2
                k += 1
        U0 = 0.7 * torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        assert torch.allclose(prob.init(), U0, rtol=0, atol=1e-15)
        assert torch.allclose(prob.x_star, u @ u.T, rtol=0, atol=1e-14)
        b = (sym * (u @ u.T)).sum((1, 2))
        other = torch.randn(d, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        for U in (U0, other, torch.cat([u, torch.zeros(d, d - r, dtype=torch.float64)], 1)):
            expected = ((sym * (U @ U.T)).sum((1, 2)) - b).square().sum() / (4 * m)
            assert prob.loss(U).item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-24), (d, U)


def test_sensing_toy_figure_draws_the_4_iterate_means_and_usam_clipped_at_1e6(tmp_path, monkeypatch):
    """sensing.png: left, each rho's SAM and USAM loss per step (USAM above 1e6 or not finite drawn at 1e6), then GD;
    middle, the long run's loss averaged over iterates t..t+3 at x = t; right, lambda_max where it is finite."""
    close = toy.plt.close
    kept = []
    monkeypatch.setattr(toy.plt, "close", kept.append)
    steps = 3
    rows = [dict(rho=rho, step=t, sam=1.0 / (t + 1) + rho,   # USAM's last loss inf, or nan: not finite either way
                 usam=[2.0, 5e5, 3e6, (math.inf, math.nan)[i % 2]][t] * (1 + rho))
            for i, rho in enumerate(toy.RHOS) for t in range(steps + 1)]
    gd = [1.5, 0.7, 0.3, 0.2]
    long_rows, losses = [], {}
    for i, variant in enumerate(("sgd", "sam", "usam")):
        losses[variant] = [(i + 1) * 2.0 ** -t * (3 if t % 2 else 1) for t in range(9)]
        long_rows += [dict(variant=variant, step=t, loss=loss, lambda_max=t + i if t % 4 == 0 else math.nan)
                      for t, loss in enumerate(losses[variant])]
    toy._plot_sensing(str(tmp_path / "sensing.png"), rows, gd, long_rows, steps, 30, 7)
    (fig,) = kept
    ax1, ax2, ax3 = fig.axes
    assert ax1.get_title().startswith("Matrix sensing d=30, lr 0.5") and ax2.get_title().startswith("Long run d=7 ")
    for i, rho in enumerate(toy.RHOS):
        sam_line, usam_line = ax1.lines[2 * i], ax1.lines[2 * i + 1]
        assert list(sam_line.get_ydata()) == pytest.approx([1.0 / (t + 1) + rho for t in range(4)])
        assert list(usam_line.get_ydata()) == pytest.approx([2.0 * (1 + rho), 5e5 * (1 + rho), 1e6, 1e6])
    assert list(ax1.lines[8].get_ydata()) == gd
    assert [line.get_label() for line in ax1.lines] == [f"{v} rho={rho}" for rho in toy.RHOS for v in ("SAM", "USAM")] + ["GD"]
    assert all(list(line.get_xdata()) == list(range(steps + 1)) for line in ax1.lines)   # GD too: x = steps taken
    assert [line.get_label() for line in ax2.lines] == [line.get_label() for line in ax3.lines] == \
        ["GD (under USAM)", "SAM", "USAM"]
    for i, variant in enumerate(("sgd", "sam", "usam")):
        x = losses[variant]
        assert list(ax2.lines[i].get_xdata()) == list(range(6))
        assert list(ax2.lines[i].get_ydata()) == pytest.approx([sum(x[t:t + 4]) / 4 for t in range(6)], rel=1e-12)
        assert list(ax3.lines[i].get_xdata()) == [0, 4, 8]
        assert list(ax3.lines[i].get_ydata()) == [i, 4 + i, 8 + i]
    close(fig)


def _sparse_reference(land, variant, steps):
    """SSAM-F or SSAM-D on a landscape through sam.py's mask API: at steps 0, 10, 20, ... the mask is rebuilt at
    progress t / steps, SSAM-F's from the Fisher of the first 16 per-example losses (of the full loss where the
    landscape has no examples), SSAM-D's from the full gradient; torch's global generator seeded 0 first."""
    torch.manual_seed(0)
    w = torch.tensor(land.start, dtype=torch.float64, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, variant=variant, rho=land.rho, lr=land.lr, stats_every=0)
    path = [w.detach().clone()]
    for t in range(steps):
        if t % 10 == 0:
            if variant == "ssamf":
                losses = [land.samples(w)[i] for i in range(16)] if land.samples is not None else [land.loss(w)]
                for loss in losses:
                    opt.zero_grad()
                    loss.backward()
                    opt.accumulate_fisher()
            else:
                opt.zero_grad()
                land.loss(w).backward()
            opt.update_mask(t / steps)
            opt.zero_grad()
        land.loss(w).backward()
        opt.first_step(zero_grad=True)
        land.loss(w).backward()
        opt.second_step(zero_grad=True)
        path.append(w.detach().clone())
    return torch.stack(path)


def test_toy_sparse_trajectories_rebuild_the_mask_every_10_steps_from_16_examples():
    two_basins, _, logistic = toy.landscapes()
    # two quadratics whose larger-gradient coordinate changes as they descend, so that the mask does too:
    # y's gradient leads at the start and x's from step 3 on; its examples' Fisher picks y from the first 16
    # examples (x from the first 8 or from all 20)
    switch = toy.Landscape("switch", lambda w: (0.5 * w[0] ** 2 + 2 * w[1] ** 2) / 2, (1.0, 1.0), lr=0.2, rho=0.05,
                           steps=31, box=None, where=None)
    weights = torch.tensor([[1.0, 0.0]] * 8 + [[0.0, 9.0]] * 8 + [[100.0, 0.0]] * 4, dtype=torch.float64)
    examples = toy.Landscape("examples", lambda w: (weights * w * w).sum(-1).mean() / 2, (1.0, 1.0), lr=0.02,
                             rho=0.05, steps=31, box=None, where=None, samples=lambda w: (weights * w * w).sum(-1) / 2)
    # 16 examples, not 15 or 17: the first 15 favour x a little, the 16th y (30^2 > 15), the 17th on x again (1000^2)
    weights16 = torch.tensor([[1.0, 0.0]] * 15 + [[0.0, 30.0]] + [[1000.0, 0.0]] * 4, dtype=torch.float64)
    sixteenth = toy.Landscape("sixteenth", lambda w: (weights16 * w * w).sum(-1).mean() / 2, (1.0, 1.0), lr=0.002,
                              rho=0.05, steps=12, box=None, where=None,
                              samples=lambda w: (weights16 * w * w).sum(-1) / 2)
    for land, variant, steps in ((logistic, "ssamf", 31), (two_basins, "ssamf", 31), (two_basins, "ssamd", 31),
                                 (logistic, "ssamd", 31), (switch, "ssamf", 31), (switch, "ssamd", 31),
                                 (examples, "ssamf", 12), (sixteenth, "ssamf", 12)):
        expected = _sparse_reference(land, variant, steps)
        torch.manual_seed(1)   # another state of the global generator (SSAM-D's first growth picks the other side here)
        assert torch.allclose(toy.trajectory(land, variant, steps=steps), expected, rtol=0, atol=1e-12), \
            (land.name, variant)


def test_toy_endpoint_reports_the_last_iterate_its_basin_loss_and_curvature():
    two_basins, hyperbola, _ = toy.landscapes()
    sharp_bottom, flat_bottom = [-1.0, 0.5], [1.5, -0.5]
    for path, basin, loss, curvature in (([sharp_bottom, [0.2, 0.1], flat_bottom], "flat", 0.0, 0.4),
                                         ([flat_bottom, [0.2, 0.1], sharp_bottom], "sharp", -0.3, 8.0)):
        end = toy.endpoint(two_basins, torch.tensor(path, dtype=torch.float64))
        assert end == dict(landscape="two_basins", x=path[-1][0], y=path[-1][1], loss=pytest.approx(loss, abs=1e-12),
                           basin=basin, lambda_max=pytest.approx(curvature, rel=1e-10))
    # basin: the lower of 8/2 |w - (-1, 0.5)|^2 - 0.3 and 0.4/2 |w - (1.5, -0.5)|^2, also near where they meet
    for x in torch.linspace(-2.0, 1.0, 61, dtype=torch.float64).tolist():
        for y in (-0.5, 0.0, 0.5, 1.5):
            sharp = 4 * ((x + 1) ** 2 + (y - 0.5) ** 2) - 0.3
            flat = 0.2 * ((x - 1.5) ** 2 + (y + 0.5) ** 2)
            if abs(sharp - flat) > 1e-9:
                w = torch.tensor([x, y], dtype=torch.float64)
                assert two_basins.where(w) == ("sharp" if sharp < flat else "flat"), (x, y)
                assert toy.two_basins(w).item() == pytest.approx(min(sharp, flat), rel=1e-12, abs=1e-12)
    # hyperbola: at (2, 0.5), on xy = 1, lambda_max = x^2 + y^2 = 4.25; x and y rounded to 4 places
    end = toy.endpoint(hyperbola, torch.tensor([[1.0, 1.0], [2.000012, 0.5]], dtype=torch.float64))
    assert (end["x"], end["y"], end["basin"]) == (2.0, 0.5, "xy=1 at x=2.00")
    assert end["lambda_max"] == pytest.approx(4.25, rel=1e-4)


def test_toy_checkpoints_csv_follows_the_formulas_and_the_readme_ratios(tmp_path):
    """checkpoints.csv: g = f'(w) = w^3 - w, w + e with e = 0.5 sign(g), g' = f'(w + e), ratio g'/g; the README
    quotes r = +6.1, +0.26, -3.4 and -0.70 for checkpoints 1 to 4."""
    toy.checkpoints(str(tmp_path))
    toy.plt.close("all")
    with open(tmp_path / "checkpoints.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["checkpoint", "w", "w_plus_e", "g", "g_perturbed", "ratio"]
    assert [int(row["checkpoint"]) for row in rows] == [1, 2, 3, 4]
    for row, quoted in zip(rows, ("+6.1", "+0.26", "-3.4", "-0.70")):
        w = float(row["w"])
        g = w ** 3 - w
        we = w + 0.5 * (1 if g > 0 else -1)
        gp = we ** 3 - we
        for name, value in (("w_plus_e", we), ("g", g), ("g_perturbed", gp), ("ratio", gp / g)):
            assert float(row[name]) == pytest.approx(value, rel=1e-12, abs=1e-15), (row["checkpoint"], name)
        assert f"{gp / g:+.{len(quoted) - 3}f}" == quoted
        assert toy.grad_at(w) == pytest.approx(g, rel=1e-12)


def test_sensing_toy_figure_gets_gd_at_lr_half_and_every_step_of_the_long_run(tmp_path, monkeypatch):
    """sensing() hands _plot_sensing GD's loss at every step of Table III's run (lr 0.5 from the same U0) and the
    long run's rows at every step (the CSV keeps every 10th): checked against the GD formula U - 0.5 grad f(U)."""
    seen = []
    monkeypatch.setattr(toy, "_plot_sensing", lambda *args: seen.append(args))
    d, r, steps, long_d, long_r, long_steps = 6, 2, 3, 4, 1, 12
    toy.sensing(str(tmp_path), d=d, r=r, steps=steps, long_d=long_d, long_r=long_r, long_steps=long_steps)
    (_, rows, gd, long_rows, got_steps, got_d, got_long_d), = seen
    assert (got_d, got_long_d) == (d, long_d)   # the titles name them
    prob = toy.Sensing(d, r)
    path = _sensing_reference(prob, prob.init(), "sgd", 0.0, 0.5, steps)
    assert got_steps == steps and len(rows) == 4 * (steps + 1)
    assert gd == pytest.approx([prob.loss(U).item() for U in path], rel=1e-9)
    assert [(row["variant"], row["step"]) for row in long_rows] == \
        [(v, t) for v in ("sgd", "sam", "usam") for t in range(long_steps + 1)]


def test_toy_landscape_csv_holds_where_each_trajectory_ends(tmp_path, monkeypatch):
    """landscape_ends.csv: one row per variant of PANELS (imbsam only where the loss splits), at the end of its
    trajectory: x, y rounded to 4 places, the loss there, its basin and lambda_max. Two GD, SAM and USAM steps on
    the hyperbola recomputed from their formulas, with f = (xy - 1)^2 / 2 and its Hessian's top eigenvalue; one ImbSAM
    step on the logistic toy (its loss splits): w - lr (grad head(w) + grad tail(w + rho g/||g||)), g = grad tail(w)."""
    _, hyperbola, logistic = toy.landscapes()
    hyperbola.steps, logistic.steps = 2, 1
    monkeypatch.setattr(toy, "landscapes", lambda: [hyperbola, logistic])
    monkeypatch.setattr(toy, "_plot_landscape", lambda *args: None)
    toy.landscape(str(tmp_path))
    with open(tmp_path / "landscape_ends.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["variant", "landscape", "x", "y", "loss", "basin", "lambda_max"]
    variants = list(dict.fromkeys(v for vs in toy.PANELS.values() for v in vs))
    assert "imbsam" in variants and [(row["landscape"], row["variant"]) for row in rows] == \
        [("hyperbola", v) for v in variants if v != "imbsam"] + [("logistic", v) for v in variants]
    w = torch.tensor([1.0, -5.0], dtype=torch.float64)   # the logistic toy's start, lr 0.1, rho 2
    head, tail = (lambda v, i=i: logistic.split(v)[i] for i in (0, 1))
    g = torch.func.grad(tail)(w)
    x, y = (w - 0.1 * (torch.func.grad(head)(w) + torch.func.grad(tail)(w + 2.0 * g / g.norm()))).tolist()
    imbsam = next(row for row in rows if (row["landscape"], row["variant"]) == ("logistic", "imbsam"))
    assert (float(imbsam["x"]), float(imbsam["y"])) == (round(x, 4), round(y, 4))
    ends = {row["variant"]: row for row in rows if row["landscape"] == "hyperbola"}
    grad = torch.func.grad(toy.hyperbola)
    ascents = (("sgd", lambda g: 0 * g), ("sam", lambda g: 0.2 * g / g.norm()), ("usam", lambda g: 0.2 * g))
    for variant, ascent in ascents:
        v = torch.tensor([0.4, 2.6], dtype=torch.float64)
        for _ in range(2):
            v = v - 0.05 * grad(v + ascent(grad(v)))
        x, y = v.tolist()
        a, b, c = y * y, 2 * x * y - 1, x * x
        row = ends[variant]
        assert (row["landscape"], float(row["x"]), float(row["y"])) == ("hyperbola", round(x, 4), round(y, 4))
        assert float(row["loss"]) == pytest.approx((x * y - 1) ** 2 / 2, rel=1e-12)
        assert row["basin"] == f"xy=1 at x={x:.2f}"
        assert float(row["lambda_max"]) == pytest.approx((a + c) / 2 + math.hypot((a - c) / 2, b), rel=1e-10)


def test_toy_landscape_figure_draws_each_panels_trajectories_their_ends_and_the_start(tmp_path, monkeypatch):
    """landscape_<name>.png: one contour panel per PANELS entry, titled by it; in each, the trajectory of every variant
    of that panel that was run (in the panel's order, labelled by the variant), a dot at its last iterate, and the
    start as a star; the axes span the landscape's box. Drawn from hand-made paths."""
    close = toy.plt.close
    kept = []
    monkeypatch.setattr(toy.plt, "close", kept.append)
    land = toy.landscapes()[1]
    ran = ("samme1", "sam", "ssamf", "sgd")   # sam is in three panels; usam, imbsam and the rest were not run
    paths = {v: torch.tensor([list(land.start)] + [[0.5 + i, 1.0 + t / 4] for t in range(3)], dtype=torch.float64)
             for i, v in enumerate(ran)}
    toy._plot_landscape(str(tmp_path / "landscape_hyperbola.png"), land, paths)
    assert (tmp_path / "landscape_hyperbola.png").stat().st_size > 10_000
    (fig,) = kept
    assert [ax.get_title() for ax in fig.axes] == ["ascent: ball and scale", "peers: sparse, Fisher, friendly, imb",
                                                   "SAME: c g' on one checkpoint", "magnitude vs direction"]
    panels = (("sgd", "sam"), ("sam", "ssamf"), ("sam", "samme1"), ("sgd", "sam"))
    for ax, shown in zip(fig.axes, panels):
        assert len(ax.lines) == 2 * len(shown) + 1, shown   # per variant its trajectory and its end dot, then the start
        for j, v in enumerate(shown):
            line, dot = ax.lines[2 * j], ax.lines[2 * j + 1]
            assert (line.get_label(), line.get_xydata().tolist()) == (v, paths[v].tolist()), v
            assert (dot.get_marker(), dot.get_xydata().tolist(), dot.get_color()) == \
                ("o", [paths[v][-1].tolist()], line.get_color()), v
        start = ax.lines[-1]
        assert (start.get_label(), start.get_marker(), start.get_xydata().tolist()) == ("start", "*", [list(land.start)])
        assert (ax.get_xlim(), ax.get_ylim()) == ((0, 2.8), (0, 2.8))
    close(fig)


def test_toy_landscape_figure_contours_the_loss_over_its_box_and_titles_lr_rho_and_steps(tmp_path, monkeypatch):
    """landscape_<name>.png on a landscape whose box is not square (two basins: x in [-2.5, 3.5], y in [-2.5, 2.5]):
    each panel fills contours of the loss itself on a grid spanning the box, x along w1 and y along w2, with levels
    from its least to its largest value, and shows the box; the title gives the landscape's lr, rho and steps."""
    import matplotlib.axes
    close = toy.plt.close
    kept, filled = [], []
    contourf = matplotlib.axes.Axes.contourf
    monkeypatch.setattr(toy.plt, "close", kept.append)
    monkeypatch.setattr(matplotlib.axes.Axes, "contourf", lambda ax, *a, **k: filled.append((a, k)) or contourf(ax, *a, **k))
    land = toy.landscapes()[0]
    toy._plot_landscape(str(tmp_path / "landscape_two_basins.png"), land,
                        {"sgd": torch.tensor([list(land.start), [-1.0, 0.4]], dtype=torch.float64)})
    (fig,) = kept
    assert fig._suptitle.get_text() == "two_basins: lr 0.22, rho 0.1, 150 full-batch steps (dots: end points)"
    assert len(filled) == 4
    for ax, ((X, Y, Z), kwargs) in zip(fig.axes, filled):
        assert (ax.get_xlim(), ax.get_ylim()) == ((-2.5, 3.5), (-2.5, 2.5))
        X, Y, Z = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (X, Y, Z))
        assert (X.min().item(), X.max().item(), Y.min().item(), Y.max().item()) == pytest.approx((-2.5, 3.5, -2.5, 2.5))
        sharp = 4 * ((X + 1) ** 2 + (Y - 0.5) ** 2) - 0.3
        flat = 0.2 * ((X - 1.5) ** 2 + (Y + 0.5) ** 2)
        assert torch.allclose(Z, torch.minimum(sharp, flat), rtol=1e-12, atol=1e-12)
        levels = np.asarray(kwargs["levels"])
        assert (levels[0], levels[-1]) == pytest.approx((Z.min().item(), Z.max().item())) and (np.diff(levels) > 0).all()
    close(fig)


def test_toy_main_runs_the_part_named_or_all_three_in_order_into_figures_by_default(tmp_path, monkeypatch):
    """`python toy.py` runs sensing, landscape and checkpoints in that order, writing to figures/ (README: toy.py
    writes its figures and CSVs to figures/); `python toy.py landscape --out DIR` runs that part alone, into DIR."""
    ran = []
    monkeypatch.setattr(toy, "PARTS", {name: (lambda out, name=name: ran.append((name, out)))
                                       for name in ("sensing", "landscape", "checkpoints")})
    monkeypatch.setattr(toy.torch, "set_num_threads", lambda n: None)
    monkeypatch.chdir(tmp_path)
    toy.main([])
    assert ran == [("sensing", "figures"), ("landscape", "figures"), ("checkpoints", "figures")]
    assert os.listdir(tmp_path) == ["figures"] and os.listdir(tmp_path / "figures") == []
    ran.clear()
    toy.main(["landscape", "--out", str(tmp_path / "other")])
    assert ran == [("landscape", str(tmp_path / "other"))]


def test_sensing_toy_prints_table_iii_at_rho_01_the_seeds_numbers_and_gds_stable_lr(tmp_path, monkeypatch, capsys):
    """sensing()'s printout: for steps 1..steps, the loss after that many SAM, USAM (rho 0.1) and GD steps, then the
    seed's Table III numbers for steps 1 to 4 (SAM 4.714, 2.81, 1.748, 1.199; USAM 4.872, 22.873, 70595465, 1.545e65);
    the loss after `steps` steps of SAM / USAM at every rho; GD's lambda_max after 150 steps and 2 / lambda_max.
    Recomputed from the update formulas and the exact Hessian."""
    monkeypatch.setattr(toy, "_plot_sensing", lambda *args: None)
    d, r, steps = 6, 2, 5
    toy.sensing(str(tmp_path), d=d, r=r, steps=steps, long_d=4, long_r=1, long_steps=12)
    lines = capsys.readouterr().out.splitlines()
    prob = toy.Sensing(d, r)
    U0 = prob.init()
    paths = {(v, rho): _sensing_reference(prob, U0, v, rho, 0.5, steps) for v in ("sam", "usam") for rho in toy.RHOS}
    gd = _sensing_reference(prob, U0, "sgd", 0.0, 0.5, steps)
    seed = {"sam": (4.714, 2.81, 1.748, 1.199), "usam": (4.872, 22.873, 70595465.0, 1.545e65)}
    head = next(i for i, line in enumerate(lines) if line.split()[:4] == ["step", "SAM", "USAM", "GD"])
    for t in range(1, steps + 1):
        left, right = lines[head + t].split("|")
        values = [float(v) for v in left.split()]
        assert values == pytest.approx([t, prob.loss(paths["sam", 0.1][t]).item(), prob.loss(paths["usam", 0.1][t]).item(),
                                        prob.loss(gd[t]).item()], rel=1e-3), t
        quoted = [float(v) for v in right.split()]
        assert quoted == (pytest.approx([seed["sam"][t - 1], seed["usam"][t - 1]], rel=1e-3) if t <= 4 else []), t
    last = next(line for line in lines if line.startswith(f"loss after {steps} steps (SAM / USAM):"))
    for rho in toy.RHOS:
        shown = re.search(rf"rho={rho}: (\S+) / (\S+?)(,|$)", last)
        assert (float(shown[1]), float(shown[2])) == pytest.approx(
            (prob.loss(paths["sam", rho][steps]).item(), prob.loss(paths["usam", rho][steps]).item()), rel=5e-3), rho
    U = _sensing_reference(prob, U0, "sgd", 0.0, 0.5, 150)[-1]
    lam = torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda v: prob.loss(v.view_as(U)), U.flatten()))[-1].item()
    shown = re.search(r"GD lr 0.5, 150 steps: .* lambda_max (\S+), so GD is stable there for lr < (\S+)$",
                      next(line for line in lines if line.startswith("GD lr")))
    assert float(shown[1]) == pytest.approx(lam, rel=2e-3) and float(shown[2]) == pytest.approx(2 / lam, rel=2e-3)


# ----------------------------------------------------------------------------- plots.py
STEP_COLS = ("step epoch lr rho loss acc ckpt0 ckpt1 ckpt2 ckpt3 ckpt4 r1_1.2 r1.2_1.5 r1.5_2 r2_4 r4_8 r8_16 "
             "r16_inf grad_norm perturbed_grad_norm direction_norm weight_norm cos mag_up skipped persist_t0 persist_overlap "
             "persist_running").split()
EPOCH_COLS = ("epoch train_loss train_acc val_loss val_acc test_loss test_acc clean_train_acc noisy_train_acc "
              "seconds images_per_sec").split()


def make_run(root, name, variant, seed, final=True, cut=False):
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir()
    config = dict(dataset="cifar10", model="resnet18", variant=variant, rho=0.1, condition=2.0, seed=seed, epochs=3)
    (folder / "config.json").write_text(json.dumps(config))
    steps = [[s, s // 10, 0.1, 0.1, 2 - s / 30, 50 + s, 5, 60, 25, 6, 4] + list(rng.uniform(1, 10, 7))
             + [1, 1.1, 1.5, 30, 0.9, 55, 0, 1000, 800 - s, 1000 // (s + 1)] for s in range(0, 30, 5)]
    with open(folder / "steps.csv", "w") as f:
        f.write(",".join(STEP_COLS) + "\n" + "\n".join(",".join(map(str, r)) for r in steps) + "\n")
        if cut:
            f.write("35,3,0.1")   # a line being written when the run was read
    epochs = [[e, 1 / (e + 1), 60 + e, 1, 55, 1.2 - e / 10, 50 + e + seed, "", "", 10, 500] for e in range(3)]
    with open(folder / "epochs.csv", "w") as f:
        f.write(",".join(EPOCH_COLS) + "\n" + "\n".join(",".join(map(str, r)) for r in epochs) + "\n")
    result = dict(best_epoch=2, best_val_acc=57.0, test_acc_best=70 + seed + (variant == "sam"),
                  test_loss_best=0.9, test_acc_last=69.5 + seed, test_loss_last=1.0 + seed / 10,
                  sharpness=dict(lambda_max=10.0 + seed, trace=100.0, top5_pos_mean=5.0))
    if final:
        (folder / "final.json").write_text(json.dumps(result))
    return result


def update_json(path, **changes):
    """Rewrite a made run's config.json or final.json with some fields changed."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def make_row(root, row, finals):
    """A claims row 'group/label' as reproduce.py lays it out (root/group/label-sSEED), one run per entry of finals
    (final.json's fields to change); subset names the row, so that load_runs counts each row's runs apart."""
    group, label = row.rsplit("/", 1)
    (root / group).mkdir(parents=True, exist_ok=True)
    for seed, changes in enumerate(finals):
        make_run(root / group, f"{label}-s{seed}", "sam", seed)
        update_json(root / group / f"{label}-s{seed}" / "config.json", subset=row)
        update_json(root / group / f"{label}-s{seed}" / "final.json", **changes)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def rewrite_column(folder, table, name, values):
    """Set one column of a made run's steps.csv or epochs.csv, row by row (values: one per row, None: empty)."""
    lines = (folder / f"{table}.csv").read_text().splitlines()
    at = lines[0].split(",").index(name)
    rows = [line.split(",") for line in lines[1:]]
    for row, value in zip(rows, values):
        row[at] = "" if value is None else str(value)
    (folder / f"{table}.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")


def kept_figures(monkeypatch):
    """The figures plots.py draws, by name, kept open instead of saved, so that a test can read what they plot
    (close them with plots.plt.close)."""
    figures = {}

    def keep(fig, out, name):
        figures[name] = fig
        return os.path.join(out, f"{name}.png")
    monkeypatch.setattr(plots, "_save", keep)
    return figures


def band_edges(ax, i):
    """{x: (lower, upper)} of the i-th band (fill_between) drawn in ax."""
    xy = ax.collections[i].get_paths()[0].vertices
    return {x: (xy[xy[:, 0] == x, 1].min(), xy[xy[:, 0] == x, 1].max()) for x in np.unique(xy[:, 0])}


def epochs_column(folder, col):
    """{epoch: value} of one column of a made run's epochs.csv, read with the csv module."""
    return {float(row["epoch"]): float(row[col]) for row in _rows(folder / "epochs.csv")}


def test_plots_writes_every_figure_and_correct_tables(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    finals = {v: [make_run(runs, f"{v}_s{s}", v, s) for s in (0, 1, 3)] for v in ("sam", "sgd")}
    make_run(runs, "sam_s9_running", "sam", 9, final=False, cut=True)
    (runs / "broken").mkdir()
    (runs / "broken" / "steps.csv").write_text("step\n1\n")
    (runs / "badjson").mkdir()
    (runs / "badjson" / "config.json").write_text("{not json")
    out = tmp_path / "figs"
    assert plots.main([str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "broken: no config.json" in printed and "badjson: unreadable config.json" in printed
    assert "unfinished (plotted, not in the table): sam_s9_running" in printed
    for name, (w, h) in plots.FIGURES.items():
        path = out / f"{name}.png"
        assert path.stat().st_size > 5_000, name
        assert png_size(path) == (round(w * plots.DPI), round(h * plots.DPI)), name
    table = (out / "tables.md").read_text()
    for variant, results in finals.items():
        acc = [r["test_acc_best"] for r in results]
        lam = [r["sharpness"]["lambda_max"] for r in results]
        expected_acc = f"{np.mean(acc):.4g} ± {np.std(acc, ddof=1):.2g}"
        expected_lam = f"{np.mean(lam):.4g} ± {np.std(lam, ddof=1):.2g}"
        row = next(line for line in table.splitlines() if f"| {variant} |" in line)
        assert f"| 3 | {expected_acc} |" in row and expected_lam in row, row


def test_plots_skips_a_statistics_figure_no_run_logged_and_says_why(tmp_path, capsys, monkeypatch):
    """Runs without the ratio statistics (sgd, --stats-every 0) get the curves and tables.md, not four empty figures;
    runs with statistics but no --persist-from lack only the persistence figure. Each skip names the flag."""
    stats = [c for c in STEP_COLS if c.startswith(("ckpt", "r1", "r2", "r4", "r8", "r16", "mag_up", "persist"))]
    figures = kept_figures(monkeypatch)
    for name, blank in (("plain", stats), ("no_persist", [c for c in stats if c.startswith("persist")])):
        (tmp_path / name).mkdir()
        make_run(tmp_path / name, "run", "sgd", 0)
        for column in blank:
            rewrite_column(tmp_path / name / "run", "steps", column, [None] * 6)
        figures.clear()
        assert plots.main([str(tmp_path / name), "--out", str(tmp_path / f"out_{name}")]) == 0
        printed = capsys.readouterr().out.splitlines()
        expected = {"curves"} | ({"ckpt_shares", "ckpt1_bins", "mag_up"} if name == "no_persist" else set())
        assert set(figures) == expected, name
        for figure in set(plots.FIGURES) - expected:
            line = next(line for line in printed if line.startswith(f"skipped {figure}.png: no run logged"))
            assert "--stats-every" in line and ("--persist-from" in line) == (figure == "persistence"), line
        for fig in figures.values():
            plots.plt.close(fig)


def test_plots_results_table_gives_every_column_over_the_finished_seeds(tmp_path):
    """tables.md's row of a group: each of its five columns is the mean ± sample std over the finished seeds of its
    own final.json field (a run still going is left out), computed here with statistics."""
    import statistics
    finals = []
    for seed in (0, 1, 2):
        final = make_run(tmp_path, f"sam_s{seed}", "sam", seed)
        final.update(test_acc_last=60.0 + 3 * seed ** 2, sharpness=dict(final["sharpness"], trace=100.0 + 7 * seed))
        update_json(tmp_path / f"sam_s{seed}" / "final.json", **final)
        finals.append(final)
    make_run(tmp_path, "sam_s5", "sam", 5, final=False)
    table = plots.results_table(plots.group_runs(plots.load_runs(str(tmp_path))[0]))
    header, _, row = ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines())
    fields = {"test acc (best val)": lambda f: f["test_acc_best"], "test acc (last)": lambda f: f["test_acc_last"],
              "test loss (last)": lambda f: f["test_loss_last"], "lambda_max": lambda f: f["sharpness"]["lambda_max"],
              "trace": lambda f: f["sharpness"]["trace"]}
    assert row[header.index("seeds")] == "3"
    for column, field in fields.items():
        xs = [field(f) for f in finals]
        assert row[header.index(column)] == f"{statistics.mean(xs):.4g} ± {statistics.stdev(xs):.2g}", column
    assert len({row[header.index(column)] for column in fields}) == len(fields)   # five different columns


def test_plots_results_table_says_over_how_many_seeds_a_sharpness_cell_is(tmp_path):
    """A group whose seeds did not all run --sharpness: its lambda_max and trace cells are over the seeds that measured
    them and say how many, beside the seeds column that counts them all."""
    import statistics
    finals = [make_run(tmp_path, f"sam_s{seed}", "sam", seed) for seed in (0, 1, 2)]
    update_json(tmp_path / "sam_s1" / "final.json", sharpness=None)
    table = plots.results_table(plots.group_runs(plots.load_runs(str(tmp_path))[0]))
    header, _, row = ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines())
    assert row[header.index("seeds")] == "3"
    acc = [f["test_acc_best"] for f in finals]
    assert row[header.index("test acc (best val)")] == f"{statistics.mean(acc):.4g} ± {statistics.stdev(acc):.2g}"
    for column in ("lambda_max", "trace"):
        xs = [finals[i]["sharpness"][column] for i in (0, 2)]
        assert row[header.index(column)] == f"{statistics.mean(xs):.4g} ± {statistics.stdev(xs):.2g} (n 2)", column


def test_plots_mean_std_over_the_finite_values():
    """A cell of the tables: mean ± sample std of the finite values (a NaN or a missing value is no seed), one
    value alone without a spread, none at all a dash."""
    import statistics
    finite = [61.5, 63.0, 58.25]
    assert plots.mean_std([61.5, math.nan, None, 63.0, math.inf, 58.25]) == \
        f"{statistics.mean(finite):.4g} ± {statistics.stdev(finite):.2g}"
    assert plots.mean_std([math.nan, 58.25, None]) == "58.25"
    assert plots.mean_std([None, math.nan]) == "–" and plots.mean_std([]) == "–"


def test_plots_averages_only_seeds_of_the_same_settings(tmp_path):
    # same variant and rho but another --subset/--epochs is another result; a config.json from before a setting
    # existed ran with its default and groups with the runs that give it
    for name, seed, changes in (("a0", 0, dict(subset=1000, epochs=1)), ("a1", 1, dict(subset=1000, epochs=1)),
                                ("b0", 0, dict(subset=2000, epochs=3)), ("c0", 0, dict(width=plots.TRAIN_SETTINGS["width"])),
                                ("c1", 1, {})):                      # c1's config.json has no width
        make_run(tmp_path, name, "sam", seed)
        update_json(tmp_path / name / "config.json", **changes)
    groups = plots.group_runs(plots.load_runs(str(tmp_path))[0])
    assert sorted(sorted(run["name"] for run in runs) for runs in groups.values()) == [["a0", "a1"], ["b0"], ["c0", "c1"]]
    default = plots.TRAIN_SETTINGS["subset"]
    labels = {plots.label(key, groups) for key in groups}
    assert labels == {"epochs=1 subset=1000", "epochs=3 subset=2000", f"epochs=3 subset={default}"}
    table = plots.results_table(groups)
    assert "| other settings | seeds |" in table and "| epochs=1 subset=1000 | 2 |" in table


def test_plots_takes_the_presets_rho_only_where_none_was_given(tmp_path):
    for name, rho in (("given", 0.2), ("preset", None)):   # train.py writes rho None when --rho was not given
        make_run(tmp_path, name, "asam", 0)
        update_json(tmp_path / name / "config.json", rho=rho, sam_flags={"rho": 2.0, "condition": 2.0})
    assert [plots.load_run(str(tmp_path / name))["config"]["rho"] for name in ("given", "preset")] == [0.2, 2.0]


def test_plots_reads_cut_csv_and_averages_seeds(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"r{seed}", "sam", seed, cut=True)
    runs, skipped = plots.load_runs(str(tmp_path))
    assert not skipped and len(runs[0]["steps"]["step"]) == 6   # the cut-off line is dropped
    xs, means, stds = plots.seed_mean(runs, "epochs", "epoch", "test_acc")
    assert list(xs) == [0, 1, 2] and np.allclose(means, [50.5, 51.5, 52.5]) and np.allclose(stds, np.std([0, 1], ddof=1))
    # a seed that left an epoch's test out (train.py --test-every) takes that epoch out of the mean
    runs[1]["epochs"]["test_acc"][1] = math.nan
    xs, means, _ = plots.seed_mean(runs, "epochs", "epoch", "test_acc")
    assert list(xs) == [0, 2] and np.allclose(means, [50.5, 52.5])


def test_plots_drops_a_last_line_cut_inside_its_last_cell(tmp_path):
    """A line being written can be cut inside its last cell and still have every field: without its newline it is
    not whole (as train.py's CsvLog counts it on --resume), so it is dropped, not read with its number cut short."""
    make_run(tmp_path, "run", "sam", 0, final=False)
    path = tmp_path / "run" / "steps.csv"
    whole = path.read_text()
    row = whole.splitlines()[-1].split(",")
    row[STEP_COLS.index("step")], row[STEP_COLS.index("persist_running")] = "30", "166"
    assert len(",".join(row)[:-2].split(",")) == len(STEP_COLS)   # the next step's row, cut after the 1 of 166
    with io.StringIO(whole) as f:
        written = list(csv.DictReader(f))
    for tail in (",".join(row)[:-2], "35,3,0.1\n", ",".join(row[:-1]) + "\n"):   # then lines short of fields
        path.write_text(whole + tail)
        steps = plots.load_run(str(tmp_path / "run"))["steps"]
        for name in ("step", "persist_running"):
            assert list(steps[name]) == [float(r[name]) for r in written], (name, tail)


def test_plots_reads_an_empty_csv_cell_as_a_missing_value(tmp_path):
    """train.py writes an empty cell where it measured nothing (test accuracy between --test-every epochs,
    clean_train_acc without label noise): a missing value, so that epoch leaves the seed mean, not a 0 in it."""
    import statistics
    for seed in (0, 1):
        make_run(tmp_path, f"r{seed}", "sam", seed)
    accs = epochs_column(tmp_path / "r1", "test_acc")
    rewrite_column(tmp_path / "r1", "epochs", "test_acc", [accs[0], None, accs[2]])   # not tested at epoch 1
    per_epoch = {}
    for seed in (0, 1):
        for row in _rows(tmp_path / f"r{seed}" / "epochs.csv"):
            per_epoch.setdefault(float(row["epoch"]), []).append(row["test_acc"])
    tested = sorted(e for e, accs in per_epoch.items() if "" not in accs)
    runs, _ = plots.load_runs(str(tmp_path))
    xs, means, _ = plots.seed_mean(runs, "epochs", "epoch", "test_acc")
    assert list(xs) == tested == [0, 2]
    assert np.allclose(means, [statistics.mean(float(a) for a in per_epoch[e]) for e in tested])
    assert plots.values(runs, "clean_train_acc") == [] and plots.cell(runs, "clean_train_acc") == "–"


def test_plots_curves_draw_the_mean_over_seeds_with_a_band_of_one_sample_std(tmp_path, monkeypatch):
    """Each curve is the mean over seeds at each epoch, its band +- one sample std (ddof=1), checked against
    statistics on the epochs.csv rows of three seeds whose mean and median differ; with loss_scale "log" only the
    loss panels are on a log scale."""
    import statistics
    for seed in (0, 1, 3):
        make_run(tmp_path, f"sam_s{seed}", "sam", seed)
    groups = plots.group_runs(plots.load_runs(str(tmp_path))[0])
    figures = kept_figures(monkeypatch)
    plots.plot_curves(groups, str(tmp_path))
    plots.plot_curves(groups, str(tmp_path), "fits", "fits", "log")
    panels = ("train_acc", "test_acc", "train_loss", "test_loss")
    for ax, col in zip(figures["curves"].axes, panels):
        per_epoch = {}
        for seed in (0, 1, 3):
            for epoch, value in epochs_column(tmp_path / f"sam_s{seed}", col).items():
                per_epoch.setdefault(epoch, []).append(value)
        epochs = sorted(per_epoch)
        line, edges = ax.lines[0], band_edges(ax, 0)
        assert line.get_label() == "sam"   # one group: named by its variant
        assert list(line.get_xdata()) == epochs
        assert np.allclose(line.get_ydata(), [statistics.mean(per_epoch[e]) for e in epochs]), col
        for e in epochs:
            mean, std = statistics.mean(per_epoch[e]), statistics.stdev(per_epoch[e])
            assert edges[e] == pytest.approx((mean - std, mean + std)), col
    first = [epochs_column(tmp_path / f"sam_s{seed}", "test_acc")[0] for seed in (0, 1, 3)]
    assert statistics.mean(first) != statistics.median(first)   # a median over seeds would not pass
    assert [ax.get_yscale() for ax in figures["fits"].axes] == ["linear", "linear", "log", "log"]
    for fig in figures.values():
        plots.plt.close(fig)


def test_plots_bad_paths(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        plots.main([str(tmp_path / "missing")])
    assert err.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert plots.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no usable run folders" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:   # a --toy folder without toy.py's CSVs would add nothing, silently
        plots.main([str(tmp_path), "--toy", str(tmp_path)])
    assert err.value.code == 2 and "neither sensing_rho.csv nor landscape_ends.csv" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    for argv, words in (([str(tmp_path / "a_file")], "is not a folder"),
                        ([str(tmp_path), "--toy", str(tmp_path / "missing")], "--toy folder"),
                        ([str(tmp_path), "--out", str(tmp_path / "a_file" / "out")], "cannot create --out")):
        with pytest.raises(SystemExit) as err:
            plots.main(argv)
        assert err.value.code == 2 and words in capsys.readouterr().err, argv


def test_plots_toy_tables_from_toys_csvs(tmp_path, monkeypatch):
    """--toy: tables.md adds toy.py's matrix sensing losses after steps 1 to 4 of each rho (Table III of seed 004)
    and where each variant ends on each landscape, every number from its own column of the CSVs."""
    (tmp_path / "runs").mkdir()
    make_run(tmp_path / "runs", "sam_s0", "sam", 0)
    toy_dir = tmp_path / "toy"
    toy_dir.mkdir()
    sensing = [(rho, step, 10.0 / (step + 1) + rho, 10.5 / (step + 1) + 2 * rho) for rho in (0.01, 0.5)
               for step in range(7)]
    with open(toy_dir / "sensing_rho.csv", "w", newline="") as f:
        csv.writer(f).writerows([("rho", "step", "sam", "usam")] + sensing)
    ends = [dict(variant="sgd", landscape="two_basins", x=-1.0, y=0.5, loss=-0.3, basin="sharp", lambda_max=8.0),
            dict(variant="sam", landscape="two_basins", x=1.4962, y=-0.4974, loss=4.2e-6, basin="flat", lambda_max=0.4)]
    with open(toy_dir / "landscape_ends.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "landscape", "x", "y", "loss", "basin", "lambda_max"])
        writer.writeheader()
        writer.writerows(ends)
    figures = kept_figures(monkeypatch)   # drawn, not saved: this test reads tables.md only
    assert plots.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--toy", str(toy_dir)]) == 0
    for fig in figures.values():
        plots.plt.close(fig)
    text = (tmp_path / "out" / "tables.md").read_text()
    rows = [line for line in text.splitlines() if line.count("|") == 5 and line[2].isdigit()]
    assert rows == [f"| {rho:g} | {step} | {sam_loss:.4g} | {usam_loss:.4g} |"
                    for rho, step, sam_loss, usam_loss in sensing if 1 <= step <= 4]
    for end in ends:
        assert f"| {end['landscape']} | {end['variant']} | ({end['x']:.2f}, {end['y']:.2f}) | {end['basin']} " \
               f"| {end['loss']:.4f} | {end['lambda_max']:.3f} |" in text


def test_plots_counts_a_copied_run_folder_once(tmp_path, capsys):
    import shutil
    make_run(tmp_path, "sam_s0", "sam", 0)
    make_run(tmp_path, "sam_s1", "sam", 1)
    shutil.copytree(tmp_path / "sam_s0", tmp_path / "sam_s0_copy")
    make_run(tmp_path, "sam_s2", "sam", 2, final=False)   # copies both still going: the first found is kept
    shutil.copytree(tmp_path / "sam_s2", tmp_path / "sam_s2_copy")
    runs, skipped = plots.load_runs(str(tmp_path))
    assert sorted(r["name"] for r in runs) == ["sam_s0", "sam_s1", "sam_s2"]
    assert "sam_s0_copy holds the same run as" in capsys.readouterr().out


def test_plots_counts_a_seed_rerun_to_measure_its_sharpness_once(tmp_path, capsys):
    """A seed run again with --sharpness into another folder trains as the first run did: tables.md counts it once,
    with the sharpness it measured, and warns; the other seeds' numbers are their own."""
    import statistics
    finals = {name: make_run(tmp_path, name, "sam", seed) for name, seed in (("sam_s0", 0), ("sam_s0_sharp", 0), ("sam_s1", 1))}
    update_json(tmp_path / "sam_s0" / "final.json", sharpness=None)
    for name, measured in (("sam_s0", False), ("sam_s0_sharp", True), ("sam_s1", True)):
        update_json(tmp_path / name / "config.json", sharpness=measured)
    table = plots.results_table(plots.group_runs(plots.load_runs(str(tmp_path))[0]))
    header, _, row = ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines())
    seeds = [finals["sam_s0_sharp"], finals["sam_s1"]]
    assert row[header.index("seeds")] == "2"
    for column, field in (("test loss (last)", lambda f: f["test_loss_last"]),
                          ("lambda_max", lambda f: f["sharpness"]["lambda_max"])):
        xs = [field(f) for f in seeds]
        assert row[header.index(column)] == f"{statistics.mean(xs):.4g} ± {statistics.stdev(xs):.2g}", column
    printed = capsys.readouterr().out
    assert f"warning: {tmp_path / 'sam_s0'} trains as {tmp_path / 'sam_s0_sharp'} (same settings, seed," in printed


def test_plots_keeps_a_seed_run_on_other_data_beside_one_that_measured_its_sharpness(tmp_path, capsys):
    """Only what the end measures may differ for a run to count as a rerun: the same settings and seed on other images
    (another data_fingerprint, as load_runs' identity tells copies apart) is a run of its own, not dropped as one."""
    make_run(tmp_path, "sam_s0", "sam", 0)
    make_run(tmp_path, "sam_s0_jpeg", "sam", 0)
    update_json(tmp_path / "sam_s0" / "final.json", sharpness=None)
    for name, fingerprint in (("sam_s0", "a" * 16), ("sam_s0_jpeg", "b" * 16)):
        update_json(tmp_path / name / "config.json", data_fingerprint=fingerprint)
    runs = plots.load_runs(str(tmp_path))[0]
    assert len(runs) == 2
    assert sorted(r["name"] for seeds in plots.group_runs(runs).values() for r in seeds) == ["sam_s0", "sam_s0_jpeg"]
    assert "trains as" not in capsys.readouterr().out


def test_plots_counts_the_same_settings_on_another_device_as_another_run(tmp_path):
    """A device control reruns a row's exact settings elsewhere: a second measurement, not a copy."""
    make_run(tmp_path, "sam_s0", "sam", 0)
    update_json(tmp_path / "sam_s0" / "config.json", device="cpu")
    shutil.copytree(tmp_path / "sam_s0", tmp_path / "sam_s0_copy")
    shutil.copytree(tmp_path / "sam_s0", tmp_path / "sam_s0_gpu")
    update_json(tmp_path / "sam_s0_gpu" / "config.json", device="NVIDIA H100 80GB HBM3")
    runs, skipped = plots.load_runs(str(tmp_path))
    assert sorted(r["name"] for r in runs) == ["sam_s0", "sam_s0_gpu"]
    assert [(os.path.basename(folder), why.split(os.sep)[-1]) for folder, why in skipped] == [("sam_s0_copy", "sam_s0")]


def test_plots_verdicts_and_derived_metrics_by_hand():
    v = plots.verdict   # against values: the difference of means beyond sqrt(s_a^2 + s_b^2); a number: beyond s_a
    assert v([3.0, 5.0], ">", [1.0, 1.0]) == "holds" and v([3.0, 5.0], "<", [1.0, 1.0]) == "does not hold"   # 3 > 1.41
    assert v([1.0, 3.0], ">", [1.0, 1.0]) == "can't tell"                                                   # 1 < 1.41
    assert v([1.0, 1.0], ">", 1.0) == "can't tell" and v([1.0, 1.0], "<", 1.0) == "can't tell"             # 0, not > 0
    assert v([50.0, 58.0], ">", 50.0) == "can't tell" and v([50.0, 58.0], ">", 40.0) == "holds"            # s = 5.66
    assert v([50.0, 58.0], ">", 49.0) == "can't tell"      # 5 < s: the std of the seeds, not their standard error (4)
    assert v([49.0, 49.2], "~", 40.0) == "holds"            # 9.1 from it: within 25% of 40, far outside s = 0.14
    assert v([49.0, 49.2], "~", 30.0) == "does not hold"    # 19.1 > 7.5
    assert v([42.0, 50.0], "~", [40.0, 40.0]) == "does not hold" and v([40.0, 48.0], "~", [40.0, 40.0]) == "holds"   # 6, 4 vs 5.66
    # fewer than 2 seeds on either side: no spread to judge by, whichever the operator (results.md tells this apart)
    for ours, op, reference in (([1.0], ">", 0.0), ([1.0], "~", 1.0), ([1.0, 2.0], ">", [0.0]), ([1.0, 2.0], "~", [1.5])):
        assert v(ours, op, reference) == "can't tell (n < 2)", (ours, op, reference)

    def run(train_acc, dataset="cifar10", steps=None):
        return dict(final={"test_acc_best": 0.0}, epochs={"train_acc": np.array([5.0, train_acc])},
                    config={"dataset": dataset}, steps=steps or {})
    assert plots.at_chance([run(10.0), run(25.0)])            # mean 17.5 < 2 x 10%
    assert not plots.at_chance([run(15.0, "cifar100")])       # 15 > 2 x 1%
    assert not plots.at_chance([run(21.0), run(25.0)])
    assert not plots.at_chance([run(18.0), run(22.0)])        # mean 20: at twice chance, not under it
    # a seed whose value is not finite (a NaN or an infinite lambda_max) is no seed of the row
    assert plots.values([run(50.0), run(math.inf), run(math.nan), run(-math.inf), run(30.0)], "train_acc") == [50.0, 30.0]

    n = 25
    step = np.arange(n, dtype=float)
    ckpt1 = np.r_[1.0, 2.0, np.linspace(70, 50, n - 2)]
    ckpt2 = np.r_[np.nan, np.arange(1, n, dtype=float)]       # a cell left empty: 24 values, tenths of 2
    t0 = np.r_[[np.nan] * 3, [100.0] * (n - 3)]                # persistence tracked from step 3
    running = np.r_[[np.nan] * 3, [100, 60, 40, 30, 25, 20, 10], [5] * (n - 10)]
    overlap = np.r_[[np.nan] * 3, np.linspace(100, 41, n - 3)]
    fine = {name: step * k for k, name in enumerate(sam.FINE_NAMES)}   # bin k rises by k a step
    cols = dict(step=step, ckpt1=ckpt1, ckpt2=ckpt2, persist_t0=t0, persist_running=running, persist_overlap=overlap,
                **fine)
    r = run(50.0, steps=cols)
    metric = {name: plots.METRICS[name][1](r) for name in ("ckpt1_min", "ckpt2_early", "ckpt2_late", "fine_up",
                                                          "running_5", "overlap_late")}
    assert metric["ckpt1_min"] == 50.0                        # the first tenth (1, 2) left out
    assert metric["ckpt2_early"] == 1.5 and metric["ckpt2_late"] == 23.5
    assert metric["fine_up"] == pytest.approx(sum(k * (23.5 - 0.5) for k in range(3, 7)))   # r > 2: bins 3-6
    assert metric["running_5"] == 20.0                        # 5 steps after t0 (step 8)
    assert metric["overlap_late"] == pytest.approx(41.0)


def test_plots_verdict_within_the_spread_either_way_cant_tell():
    """The stated rule at its edges: a difference inside the combined std reads "can't tell" whichever its sign
    (only beyond the std on the wrong side "does not hold"), and '~' holds up to the spread or 25% inclusive."""
    import statistics

    def rule(ours, op, reference):   # RULE, written out with statistics
        if isinstance(reference, (int, float)):
            diff, spread = statistics.mean(ours) - reference, statistics.stdev(ours)
            tolerance = 0.25 * abs(reference)
        else:
            diff, tolerance = statistics.mean(ours) - statistics.mean(reference), 0.0
            spread = math.hypot(statistics.stdev(ours), statistics.stdev(reference))
        if op == "~":
            return "holds" if abs(diff) <= max(spread, tolerance) else "does not hold"
        diff = diff if op == ">" else -diff
        return "holds" if diff > spread else "does not hold" if diff < -spread else "can't tell"
    cases = [([1.0, 3.0], "<", [1.0, 1.0]), ([1.0, 3.0], ">", [2.5, 2.5]), ([50.0, 58.0], "<", 51.0),
             ([50.0, 58.0], ">", 57.0), ([50.0, 58.0], ">", 62.0), ([1.0, 3.0], "<", [-1.0, -1.0]),
             ([40.0, 50.0], "~", 36.0), ([39.0, 41.0, 43.0], "~", [39.0, 39.0, 39.0]), ([40.0, 50.0], "~", 35.0)]
    got = [plots.verdict(*case) for case in cases]
    assert got == [rule(*case) for case in cases]
    assert got == ["can't tell", "can't tell", "can't tell", "can't tell", "does not hold", "does not hold",
                   "holds", "holds", "does not hold"]   # 0.25 * 36 = 9 = 45 - 36; hypot(2, 0) = 2 = 41 - 39


def test_plots_ckpt1_min_takes_every_step_after_the_first_tenth():
    """Claim 1's "B1 above 60% throughout": the lowest B1 share once the first tenth of the logged steps (the ramp
    from step 0) is over, the dip on the first step after it included."""
    n = 30   # its first tenth: steps 0, 1 and 2
    for dip_at, lowest in ((2, 70.0), (3, 40.0), (29, 40.0)):
        ckpt1 = np.full(n, 70.0)
        ckpt1[0], ckpt1[dip_at] = 20.0, 40.0
        run = dict(final={}, steps=dict(step=np.arange(n, dtype=float), ckpt1=ckpt1))
        assert plots.METRICS["ckpt1_min"][1](run) == min(ckpt1[n // 10:]) == lowest, dip_at
    # rows without statistics (NaN) are not steps of the tenth: 10 empty rows, 20 logged, their first tenth 2 rows
    ckpt1 = np.r_[[np.nan] * 10, 20.0, 30.0, [70.0] * 18]
    run = dict(final={}, steps=dict(step=np.arange(n, dtype=float), ckpt1=ckpt1))
    assert plots.METRICS["ckpt1_min"][1](run) == min(ckpt1[12:]) == 70.0
    run["steps"]["ckpt1"] = np.full(n, np.nan)
    assert math.isnan(plots.METRICS["ckpt1_min"][1](run))
    # the first tenth the early shares average is the one ckpt1_min leaves out (a dip there is not seen), and the
    # last tenth as long: of 19 steps one each, of 25 two
    for n, tenth in ((19, 1), (25, 2)):
        def lowest(dip_at):
            ckpt1 = np.where(np.arange(n) == dip_at, 20.0, 70.0)
            return plots.METRICS["ckpt1_min"][1](dict(final={}, steps=dict(step=np.arange(n, dtype=float), ckpt1=ckpt1)))
        assert [lowest(step) for step in range(n)] == [70.0] * tenth + [20.0] * (n - tenth), n
        squares = [float(step * step) for step in range(n)]
        run = dict(final={}, steps=dict(step=np.arange(n, dtype=float), ckpt2=np.array(squares)))
        assert plots.METRICS["ckpt2_early"][1](run) == pytest.approx(sum(squares[:tenth]) / tenth), n
        assert plots.METRICS["ckpt2_late"][1](run) == pytest.approx(sum(squares[-tenth:]) / tenth), n


def test_plots_results_md_mean_std_and_verdicts(tmp_path):
    """reproduce.py's folder layout -> results.md: mean ± std over seeds per row, the verdict by the stated rule."""
    import reproduce
    (tmp_path / "core").mkdir()
    finals = {}
    for variant in ("sgd", "sam"):
        for seed in (0, 1, 2):
            finals.setdefault(variant, []).append(make_run(tmp_path / "core", f"{variant}-s{seed}", variant, seed))
            command = f"python train.py --variant {variant} --seed {seed} --out results/core/{variant}-s{seed}" \
                + " --overwrite" * (seed == 0)   # as reproduce.py relaunches a folder: not part of the row's setting
            update_json(tmp_path / "core" / f"{variant}-s{seed}" / "config.json", command=command,
                        device="cpu" if variant == "sam" else "NVIDIA H100 80GB HBM3")
    (tmp_path / "device").mkdir()   # a run still going: where it runs shows once it ends (a clean clone has no folder)
    make_run(tmp_path / "device", "sam-rho0.1-cpu-s0", "sam", 0, final=False)
    update_json(tmp_path / "device" / "sam-rho0.1-cpu-s0" / "config.json", device="cpu",
                command="python train.py --variant sam --device cpu --seed 0", epochs=30)
    runs, _ = plots.load_runs(str(tmp_path))
    text = plots.results_md(str(tmp_path), runs)
    going = next(line for line in text.splitlines() if line.startswith("| sam-rho0.1-cpu | 0 |"))
    assert "| – | `python train.py --variant sam --device cpu --seed $SEED` |" in going
    sam_acc, sgd_acc = ([f["test_acc_best"] for f in finals[v]] for v in ("sam", "sgd"))
    row = next(line for line in text.splitlines() if line.startswith("| sam | 3 |"))
    assert f"| {np.mean(sam_acc):.4g} ± {np.std(sam_acc, ddof=1):.2g} |" in row
    assert "| cpu | `python train.py --variant sam --seed $SEED --out results/core/sam-s$SEED`" in row
    # sharpness measured after training (train.py --resume --sharpness): the one command that gives both
    for seed in (0, 1, 2):
        update_json(tmp_path / "core" / f"sgd-s{seed}" / "config.json", end_settings_command="python train.py "
                    f"--variant sgd --seed {seed} --out results/core/sgd-s{seed} --sharpness --sharpness-iters 20 --resume")
    text = plots.results_md(str(tmp_path), plots.load_runs(str(tmp_path))[0])
    row = next(line for line in text.splitlines() if line.startswith("| sgd | 3 |"))
    assert row.endswith("| `python train.py --variant sgd --seed $SEED --out results/core/sgd-s$SEED --sharpness "
                        "--sharpness-iters 20` |")
    # a row with no folder yet shows the command reproduce.py would run, from its own row definition
    planned = next(line for line in text.splitlines() if line.startswith("| sam-rho0.05-cpu | 0 |"))
    assert planned.endswith(" --variant sam --rho 0.05 --device cpu --seed $SEED --data-dir "
                            f"{reproduce.DATA_DIR} --out results/device/sam-rho0.05-cpu-s$SEED` |")
    # without results/setting.json: in the first candidate's setting, on reproduce.py's default device
    planned = next(line for line in text.splitlines() if line.endswith("results/samckpt/samckpt1-s$SEED` |"))
    setting = reproduce.COMMON + next(iter(reproduce.CANDIDATES.values()))
    assert f" | – | `python train.py {shlex.join(setting)} --variant samckpt1 " in planned   # ran on: nowhere yet
    assert planned.startswith("| samckpt1 | 0 |") and planned.endswith(
        f" --seed $SEED --data-dir {reproduce.DATA_DIR} --device auto --out results/samckpt/samckpt1-s$SEED` |")
    assert "`–`" not in text
    # SAM is 1 point above SGD, each with std 1 over seeds: the difference is within sqrt(1 + 1)
    spread = math.hypot(np.std(sam_acc, ddof=1), np.std(sgd_acc, ddof=1))
    expected = "holds" if np.mean(sam_acc) - np.mean(sgd_acc) > spread else "can't tell"
    check = next(line for line in text.splitlines() if line.startswith("| sam | test acc at best val (%) >"))
    # and since SAM does not beat SGD here, every accuracy verdict is marked as untestable in this setting
    assert check.endswith(f"| can't tell here ({expected}) |") and expected == "can't tell"
    # a comparison across devices says so: the device alone moves a row by about a seed's spread
    assert f"core/sgd: {np.mean(sgd_acc):.4g} ± {np.std(sgd_acc, ddof=1):.2g} (on H100 80GB HBM3; this row on cpu) |" \
        in check
    fits = next(line for line in text.splitlines() if line.startswith("| sgd | final train acc (%) >"))
    assert "this row on" not in fits   # a number from the notes ran nowhere
    assert "SAM above SGD in this setting (test accuracy): **can't tell**" in text
    assert plots.verdict([3.0, 3.2], ">", [1.0, 1.2]) == "holds"
    assert plots.verdict([1.0, 1.2], ">", [3.0, 3.2]) == "does not hold"
    assert plots.verdict([40.0, 44.0], "~", 40.0) == "holds" and plots.verdict([5.0], ">", 1.0) == "can't tell (n < 2)"


def test_plots_results_md_counts_diverged_seeds_and_leaves_running_ones_out(tmp_path):
    """A row's n counts its finished seeds and names the diverged ones (reproduce.py's diverged.txt, kept even
    with no CSV rows), "ran on" names where both ran; a seed still going is in neither. The final train accuracy
    is each finished seed's last epoch (not its best), averaged over those seeds."""
    import statistics
    train_acc = {("sgd", 0): [60.0, 85.0, 80.0], ("sgd", 1): [62.0, 90.0, 84.5], ("sam", 0): [50.0, 70.0, 66.0],
                 ("sam", 1): [52.0, 75.0, 71.0], ("sam", 2): [10.0, 20.0, 30.0]}
    for (variant, seed), accs in train_acc.items():
        running = (variant, seed) == ("sam", 2)
        folder = tmp_path / "core" / f"{variant}-s{seed}"
        folder.parent.mkdir(exist_ok=True)
        make_run(folder.parent, folder.name, variant, seed, final=not running)
        update_json(folder / "config.json", device="NVIDIA H100 80GB HBM3" if running else "cpu")
        rewrite_column(folder, "epochs", "train_acc", accs)
    make_run(tmp_path / "core", "sgd-s2", "sgd", 2, final=False)   # diverged before its first logged row
    update_json(tmp_path / "core" / "sgd-s2" / "config.json", device="NVIDIA A100-SXM4-80GB")
    for table in ("steps", "epochs"):
        path = tmp_path / "core" / "sgd-s2" / f"{table}.csv"
        path.write_text(path.read_text().splitlines()[0] + "\n")
    (tmp_path / "core" / "sgd-s2" / "diverged.txt").write_text("loss is nan at step 3\n")
    runs, skipped = plots.load_runs(str(tmp_path))
    assert not skipped
    core = plots.results_md(str(tmp_path), runs).split("\n## 0. ")[1].split("\n## ")[0]   # the core group's table
    lines = core.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| row | n |")).strip("|").split("|")]
    sgd, sam = ([c.strip() for c in next(line for line in lines if line.startswith(f"| {v} |")).strip("|").split("|")]
                for v in ("sgd", "sam"))
    assert sgd[header.index("n")] == "2 (+1 diverged)" and sam[header.index("n")] == "2"
    assert sgd[header.index("ran on")] == "A100-SXM4-80GB, cpu" and sam[header.index("ran on")] == "cpu"
    column = header.index("final train acc (%)")
    for variant, row in (("sgd", sgd), ("sam", sam)):
        last = [train_acc[variant, seed][-1] for seed in (0, 1)]
        assert row[column] == f"{statistics.mean(last):.4g} ± {statistics.stdev(last):.2g}", variant


def test_plots_results_md_gates_a_row_by_the_setting_of_its_reference(tmp_path):
    """A row that ran in a selection candidate's setting has its accuracy checks gated by that candidate's SAM against
    SGD, not the claims setting's, also against another row of that setting: where SAM beats SGD the verdict stands,
    where it does not it reads "can't tell here"."""
    import reproduce
    import statistics
    cand = reproduce.FITS_NAME
    test_acc = {"core/sgd": [75.0, 76.0, 75.5], "core/sam": [70.0, 70.5, 71.0],   # the claims setting: SAM below SGD
                f"select/{cand}/sgd": [50.0, 51.0, 50.5], f"select/{cand}/sam": [60.0, 60.5, 61.0],
                "same/samme1-c2-n2500": [65.0, 65.5, 66.0], "same/customsame": [72.0, 72.5, 73.0],
                "direction/sammagnitude-n2500": [62.0, 62.5, 63.0], "direction/samdirection-n2500": [55.0, 55.5, 56.0],
                "noise/sgd-n2500": [40.0, 40.5, 41.0], "noise/sam-n2500": [44.0, 44.5, 45.0], "same/samme2-c2": [74.0]}
    for row, accs in test_acc.items():
        make_row(tmp_path, row, [dict(test_acc_best=acc) for acc in accs])
    # ImbSAM on long-tailed data in the claims setting: per seed, the head classes' and the tail classes' accuracy
    head_tail = {"peers/lt-sam": [(80.0, 30.0), (80.5, 31.0), (81.0, 32.0)],
                 "peers/lt-imbsam": [(80.2, 40.0), (80.4, 41.0), (81.1, 42.0)]}
    for row, seeds in head_tail.items():
        make_row(tmp_path, row, [dict(test_acc_per_class_best=[head] * 3 + [tail] * 2, tail_classes=[3, 4])
                                 for head, tail in seeds])
    runs, _ = plots.load_runs(str(tmp_path))
    lines = plots.results_md(str(tmp_path), runs).splitlines()

    def imbsam(metric, op):   # lt-imbsam's check of the head or tail classes, and its verdict by the stated rule
        k = ("head_acc", "tail_acc").index(metric)
        ours, ref = ([seed[k] for seed in head_tail[f"peers/{row}"]] for row in ("lt-imbsam", "lt-sam"))
        diff, spread = statistics.mean(ours) - statistics.mean(ref), math.hypot(statistics.stdev(ours), statistics.stdev(ref))
        rule = "holds" if (abs(diff) <= spread if op == "~" else diff > spread) else "does not hold or can't tell"
        line = next(line for line in lines if line.startswith(f"| lt-imbsam | {plots.METRICS[metric][0]} {op} |"))
        return line, rule

    def check(label):
        return next(line for line in lines if line.startswith(f"| {label} | test acc at best val (%) >"))

    def checks(label):
        return [line for line in lines if line.startswith(f"| {label} | test acc at best val (%) <")]
    assert plots.verdict(test_acc[f"select/{cand}/sam"], ">", test_acc[f"select/{cand}/sgd"]) == "holds"
    assert plots.verdict(test_acc["same/samme1-c2-n2500"], ">", test_acc[f"select/{cand}/sam"]) == "holds"
    assert check("samme1-c2-n2500").endswith(f"| select/{cand}/sam: 60.5 ± 0.5 | higher late val acc | holds |")
    assert check("customsame").endswith("| can't tell here (holds) |")   # against core/sam, gated by core
    assert check("samme2-c2").endswith("| can't tell (n < 2) |")   # one seed: nothing to gate
    assert checks("samdirection-n2500")[1].endswith(
        "| direction/sammagnitude-n2500: 62.5 ± 0.5 | below sammagnitude | holds |")   # a row of the same setting
    # judged against no candidate's run, but run in its setting (its arguments end the row's flags): gated there
    assert check("sam-n2500").endswith("| noise/sgd-n2500: 40.5 ± 0.5 | SAM more robust to label noise | holds |")
    for metric, op in (("tail_acc", ">"), ("head_acc", "~")):   # like the test accuracy, gated by SAM against SGD
        line, rule = imbsam(metric, op)
        assert line.endswith(f"| can't tell here ({rule}) |") and rule == "holds", metric
    # the claims setting's SAM is below its SGD beyond the combined std: its gate does not hold, and says so
    gap = statistics.mean(test_acc["core/sam"]) - statistics.mean(test_acc["core/sgd"])
    assert gap < -math.hypot(statistics.stdev(test_acc["core/sam"]), statistics.stdev(test_acc["core/sgd"]))
    assert "SAM above SGD in this setting (test accuracy): **does not hold**; so every accuracy verdict below reads " \
           "\"can't tell here\". A row" in "\n".join(lines)
    for seed in range(3):   # the candidate's SAM no longer beats its SGD: the row's verdict is gated too
        update_json(tmp_path / "select" / cand / f"sam-s{seed}" / "final.json", test_acc_best=50.0 + seed / 2)
    runs, _ = plots.load_runs(str(tmp_path))
    lines = plots.results_md(str(tmp_path), runs).splitlines()
    assert check("samme1-c2-n2500").endswith("| can't tell here (holds) |")
    assert checks("samdirection-n2500")[1].endswith("| can't tell here (holds) |")
    assert check("sam-n2500").endswith("| can't tell here (holds) |")
    # SAM beats SGD in the claims setting: no word of "can't tell here", and a row gated there keeps its verdict
    core_sam = [80.0, 80.5, 81.0]
    for seed, acc in enumerate(core_sam):
        update_json(tmp_path / "core" / f"sam-s{seed}" / "final.json", test_acc_best=acc)
    runs, _ = plots.load_runs(str(tmp_path))
    lines = plots.results_md(str(tmp_path), runs).splitlines()
    assert "SAM above SGD in this setting (test accuracy): **holds**. A row" in "\n".join(lines)
    ours = test_acc["same/customsame"]   # 72.5 ± 0.5 against 80.5 ± 0.5: below by more than the combined std
    assert statistics.mean(ours) - statistics.mean(core_sam) < -math.hypot(statistics.stdev(ours), statistics.stdev(core_sam))
    assert check("customsame").endswith("| does not hold |")
    for metric, op in (("tail_acc", ">"), ("head_acc", "~")):
        line, rule = imbsam(metric, op)
        assert line.endswith(f"| {rule} |") and rule == "holds", metric


def test_plots_selection_table_comes_from_the_run_folders_and_names_the_rules_pick(tmp_path, monkeypatch):
    """results.md's candidate table is read from results/select (a pilot shows before it is complete) with
    mean ± std per column, and says when the rule, counting complete candidates only, now picks another one."""
    import reproduce
    import statistics
    monkeypatch.setattr(reproduce, "CANDIDATES", {n: ["--subset", n] for n in ("fits", "best", "unrun")})
    # candidate -> per seed (SGD final train acc, SGD best val, SAM best val); SAM-s2 of "best" is still running
    made = {"fits": [(80.0, 60.0, 61.0), (81.0, 62.0, 62.5), (80.5, 61.0, 63.0)],
            "best": [(99.0, 50.0, 55.0), (99.5, 52.0, 58.0), (99.2, 51.0, None)]}
    for name, seeds in made.items():
        for seed, (train_acc, sgd_val, sam_val) in enumerate(seeds):
            for variant, val in (("sgd", sgd_val), ("sam", sam_val)):
                root = tmp_path / "select" / name
                root.mkdir(parents=True, exist_ok=True)
                make_run(root, f"{variant}-s{seed}", variant, seed, final=val is not None)
                update_json(root / f"{variant}-s{seed}" / "config.json", subset=name, device="cpu")
                if val is not None:
                    update_json(root / f"{variant}-s{seed}" / "final.json", best_val_acc=val)
                    epochs = (root / f"{variant}-s{seed}" / "epochs.csv").read_text().splitlines()
                    last = epochs[-1].split(",")
                    last[EPOCH_COLS.index("train_acc")] = str(train_acc if variant == "sgd" else train_acc - 30)   # SGD's fit
                    (root / f"{variant}-s{seed}" / "epochs.csv").write_text("\n".join(epochs[:-1] + [",".join(last)]) + "\n")

    def table():
        runs, _ = plots.load_runs(str(tmp_path))
        text = plots.selection_md(str(tmp_path), {os.path.relpath(r["folder"], tmp_path): r for r in runs}, "fits")
        return text, {line.split(" | ")[0].strip("| *").removesuffix("** (chosen)"): line for line in text.splitlines()}

    def expected(xs):
        return f"{np.mean(xs):.4g} ± {np.std(xs, ddof=1):.2g}"
    text, rows = table()
    sgd_val, sam_val = [60.0, 62.0, 61.0], [61.0, 62.5, 63.0]
    gain = f"{np.mean(sam_val) - np.mean(sgd_val):+.3g} ± {math.hypot(np.std(sgd_val, ddof=1), np.std(sam_val, ddof=1)):.2g}"
    assert rows["fits"] == (f"| **fits** (chosen) | 3 / 3 | cpu | {expected([80.0, 81.0, 80.5])} | {expected(sgd_val)} | "
                            f"{expected(sam_val)} | {gain} | {expected([70.0, 71.0, 72.0])} | {expected([71.0, 72.0, 73.0])} |")
    assert rows["best"].startswith("| best | 3 / 2 | cpu | ") and rows["unrun"] == "| unrun | 0 / 0 | not run | | | | | | |"
    assert "now point to" not in text   # "best" fits better and gains more, but SAM has 2 of its 3 seeds
    update_json(tmp_path / "select" / "best" / "sam-s2" / "config.json", device="cpu")
    (tmp_path / "select" / "best" / "sam-s2" / "final.json").write_text(json.dumps(
        {**json.loads((tmp_path / "select" / "best" / "sam-s1" / "final.json").read_text()), "best_val_acc": 56.0}))
    text, rows = table()
    assert rows["best"].startswith("| best | 3 / 3 | cpu | ")
    assert "The finished selection runs now point to **best** by the rule; the claims below ran in fits." in text
    # a candidate given more seeds (reproduce.SELECT_SEEDS) shows and is judged on every seed it has finished,
    # and one whose extra seeds have not run stays eligible on its first three
    monkeypatch.setattr(reproduce, "SELECT_SEEDS", {"fits": (0, 1, 2, 3), "best": (0, 1, 2, 3)})
    for variant, val in (("sgd", 59.0), ("sam", 65.0)):
        make_run(tmp_path / "select" / "fits", f"{variant}-s3", variant, 3)
        update_json(tmp_path / "select" / "fits" / f"{variant}-s3" / "config.json", subset="fits", device="cpu")
        update_json(tmp_path / "select" / "fits" / f"{variant}-s3" / "final.json", best_val_acc=val)
    text, rows = table()
    sgd_val, sam_val = [60.0, 62.0, 61.0, 59.0], [61.0, 62.5, 63.0, 65.0]
    assert rows["fits"].startswith(f"| **fits** (chosen) | 4 / 4 | cpu | {expected([80.0, 81.0, 80.5, 62.0])} | "
                                   f"{expected(sgd_val)} | {expected(sam_val)} | ")
    assert reproduce.candidate_table(tmp_path)["fits"]["gain"] == pytest.approx(np.mean(sam_val) - np.mean(sgd_val))
    assert rows["best"].startswith("| best | 3 / 3 | cpu | ") and "now point to **best**" in text
    # a candidate where SAM falls below SGD shows its loss with its sign; one whose only SGD run diverged (on a GPU)
    # shows its finished SAM run, and where both ran
    monkeypatch.setattr(reproduce, "CANDIDATES", {**reproduce.CANDIDATES, "worse": ["--subset", "worse"],
                                                  "pilot": ["--subset", "pilot"]})
    vals = {("worse", "sgd"): [70.0, 72.5], ("worse", "sam"): [60.0, 61.0], ("pilot", "sam"): [64.0]}
    for (name, variant), accs in vals.items():
        for seed, val in enumerate(accs):
            (tmp_path / "select" / name).mkdir(parents=True, exist_ok=True)
            make_run(tmp_path / "select" / name, f"{variant}-s{seed}", variant, seed)
            update_json(tmp_path / "select" / name / f"{variant}-s{seed}" / "config.json", subset=name, device="cpu")
            update_json(tmp_path / "select" / name / f"{variant}-s{seed}" / "final.json", best_val_acc=val)
    make_run(tmp_path / "select" / "pilot", "sgd-s0", "sgd", 0, final=False)
    update_json(tmp_path / "select" / "pilot" / "sgd-s0" / "config.json", subset="pilot", device="NVIDIA H100 80GB HBM3")
    (tmp_path / "select" / "pilot" / "sgd-s0" / "diverged.txt").write_text("loss is nan at step 3\n")
    text, rows = table()
    sgd_val, sam_val = vals["worse", "sgd"], vals["worse", "sam"]
    gain = statistics.mean(sam_val) - statistics.mean(sgd_val)
    assert gain < 0 and rows["worse"].split(" | ")[6] == \
        f"{gain:+.3g} ± {math.hypot(statistics.stdev(sgd_val), statistics.stdev(sam_val)):.2g}"
    pilot = vals["pilot", "sam"][0]
    assert rows["pilot"].startswith(f"| pilot | 0 / 1 | H100 80GB HBM3, cpu | – | – | {pilot:.4g} | – | ")


def test_plots_claims_1_and_3_in_every_candidate_setting(tmp_path, monkeypatch):
    """The selection's SAM runs answer claims 1 and 3 per candidate: results.md tabulates the geometry row's checks
    (mean ± std over seeds, ✓/✗/? by the verdict rule) and figures/results/ gets the shares against training done."""
    import reproduce
    monkeypatch.setattr(reproduce, "CANDIDATES", {n: ["--subset", n, "--epochs", "3"] for n in ("short", "long", "unrun")})
    (tmp_path / "setting.json").write_text(json.dumps(dict(name="short", args=reproduce.CANDIDATES["short"], rule="r")))
    mag_up = {"short": [[55, 56, 57, 58, 59, 90], [52, 56, 57, 58, 59, 80]],   # per seed, one value per logged step
              "long": [[40, 56, 57, 58, 59, 60], [45, 56, 57, 58, 59, 61], [44, 1, 2, 3, 4, 62]]}
    for name, seeds in mag_up.items():
        for seed, column in enumerate(seeds):
            root = tmp_path / "select" / name
            root.mkdir(parents=True, exist_ok=True)
            make_run(root, f"sam-s{seed}", "sam", seed)
            update_json(root / f"sam-s{seed}" / "config.json", subset=name)
            lines = (root / f"sam-s{seed}" / "steps.csv").read_text().splitlines()
            at = STEP_COLS.index("mag_up")
            rows = [line.split(",") for line in lines[1:]]
            for row, v in zip(rows, column):
                row[at] = str(v)
            (root / f"sam-s{seed}" / "steps.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    (tmp_path / "core").mkdir()   # results.md is written once a claims row has run
    make_run(tmp_path / "core", "sgd-s0", "sgd", 0)
    runs, _ = plots.load_runs(str(tmp_path))
    text = plots.results_md(str(tmp_path), runs)
    table = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith(("| short", "| long"))}
    header = next(line for line in text.splitlines() if line.startswith("| candidate | n | SAM final train acc"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    early, late = columns.index("mag_up, first tenth (%) > 50"), columns.index("mag_up, last tenth (%) ~ 85")
    # statistics every 5 steps: the chance levels of persistence need every step, so no candidate has a value of the
    # "above chance" checks and they get no column; the overlap at the end is measured and has one
    assert not [c for c in columns if "above chance" in c] and any(c.startswith("overlap with the t0 set") for c in columns)
    for name, seeds in mag_up.items():   # 6 logged steps: the first and last tenth are one step each
        cells = [c.strip() for c in table[name].strip("|").split("|")]
        assert cells[1] == str(len(seeds))
        firsts, lasts = [s[0] for s in seeds], [s[-1] for s in seeds]
        assert cells[early].startswith(f"{np.mean(firsts):.4g} ± {np.std(firsts, ddof=1):.2g} ")
        assert cells[late].startswith(f"{np.mean(lasts):.4g} ± {np.std(lasts, ddof=1):.2g} ")
    # short: 53.5 ± 2.1 above 50 beyond its std (holds), 85 ± 7.1 about 85; long: 43 ± 2.6 below 50 (does not
    # hold), 61 ± 1 is 24 from 85, beyond both its std and 25% of 85 (does not hold)
    for name, marks in (("short", ["✓", "✓"]), ("long", ["✗", "✗"])):
        cells = [c.strip() for c in table[name].strip("|").split("|")]
        assert [cells[early][-1], cells[late][-1]] == marks
    section = text.split(header)[1].split("\n\n")[0]
    assert "| unrun |" not in section
    paths = plots.results_figures(str(tmp_path), runs, str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == ["shares_by_setting.png"]
    assert png_size(paths[0]) == tuple(round(x * plots.DPI) for x in plots.SHARES_BY_SETTING)


def test_plots_shares_by_setting_against_training_done_over_finished_seeds(tmp_path, monkeypatch):
    """The selection's SAM runs per candidate against the share of training done (100 * step / the last step,
    so candidates of different lengths line up), each line the mean over the finished seeds; a seed still going
    is in neither the figure nor the n of results.md's table."""
    import reproduce
    import statistics
    monkeypatch.setattr(reproduce, "CANDIDATES", {n: ["--subset", n, "--epochs", "3"] for n in ("short", "long")})
    (tmp_path / "setting.json").write_text(json.dumps(dict(name="short", args=reproduce.CANDIDATES["short"], rule="r")))
    mag_up = {"short": [[55, 60, 62, 70, 80, 90], [51, 58, 61, 73, 81, 86], [5, 5, 5, 5, 5, 5]],   # seed 2: going
              "long": [[40, 45, 50, 52, 58, 61], [45, 46, 47, 58, 59, 62], [30, 5, 5, 5, 5, 5]]}
    stretch = {"short": 1, "long": 4}   # steps 0..25 and 0..100
    for name, seeds in mag_up.items():
        root = tmp_path / "select" / name
        root.mkdir(parents=True)
        for seed, column in enumerate(seeds):
            make_run(root, f"sam-s{seed}", "sam", seed, final=seed < 2)
            update_json(root / f"sam-s{seed}" / "config.json", subset=name)
            rewrite_column(root / f"sam-s{seed}", "steps", "mag_up", column)
            rewrite_column(root / f"sam-s{seed}", "steps", "step", [5 * k * stretch[name] for k in range(6)])
    (tmp_path / "core").mkdir()   # results.md is written once a claims row has run
    make_run(tmp_path / "core", "sgd-s0", "sgd", 0)
    runs, _ = plots.load_runs(str(tmp_path))
    text = plots.results_md(str(tmp_path), runs)
    assert "| short | 2 |" in text and "| long | 2 |" in text
    figures = kept_figures(monkeypatch)
    plots.results_figures(str(tmp_path), runs, str(tmp_path / "figs"))
    ax = figures["shares_by_setting"].axes[4]   # mag_up
    assert [line.get_label() for line in ax.lines] == ["short", "long"]
    for line, (name, seeds) in zip(ax.lines, mag_up.items()):
        assert list(line.get_xdata()) == [0, 20, 40, 60, 80, 100]
        assert np.allclose(line.get_ydata(), [statistics.mean(s[k] for s in seeds[:2]) for k in range(6)]), name
    for fig in figures.values():
        plots.plt.close(fig)


def test_plots_persistence_above_chance_matches_the_definition(tmp_path):
    """If B1 were drawn afresh each step with its share, the t0 set's overlap with step t's B1 would be that share and
    the running intersection k steps on the product of the k shares since t0: results.md's two "above chance"
    measures, in points of the t0 set, checked against a loop over a hand-made steps.csv (t0 = step 3)."""
    make_run(tmp_path, "run", "sam", 0)
    share = [55.0, 60.0, 58.0, 62.0, 50.0, 64.0, 61.0, 59.0, 63.0, 57.0]   # B1 share (%) at steps 0..9
    t0_size, overlap, running = 1000, [None, None, None, 1000, 540, 650, 600, 610, 640, 580], \
        [None, None, None, 1000, 540, 300, 200, 130, 90, 60]
    lines = (tmp_path / "run" / "steps.csv").read_text().splitlines()
    rows = []
    for step in range(10):
        row = lines[1].split(",")
        values = dict(step=step, ckpt1=share[step], persist_t0=t0_size if overlap[step] else "nan",
                      persist_overlap=overlap[step] or "nan", persist_running=running[step] or "nan")
        for name, value in values.items():
            row[STEP_COLS.index(name)] = str(value)
        rows.append(",".join(row))
    (tmp_path / "run" / "steps.csv").write_text("\n".join([lines[0]] + rows) + "\n")
    run = plots.load_run(str(tmp_path / "run"))
    excess, product = [], 1.0
    for step in range(4, 10):
        excess.append(100 * overlap[step] / t0_size - share[step])
    for step in range(4, 9):   # 5 steps after t0
        product *= share[step] / 100
    assert plots.METRICS["overlap_over_chance"][1](run) == pytest.approx(sum(excess) / len(excess))
    assert plots.METRICS["running_5_over_chance"][1](run) == pytest.approx(100 * running[8] / t0_size - 100 * product)
    cols = run["steps"]   # statistics every other step: no chance level from consecutive steps
    for name in cols:
        cols[name] = cols[name][::2]
    assert math.isnan(plots.METRICS["overlap_over_chance"][1](run))


def test_plots_persistence_running_chance_only_over_consecutive_steps(tmp_path):
    """The running intersection's chance level is the product of the B1 shares of every step since t0: past a step
    that was not logged (or logged without statistics, NaN) it cannot be formed and is left out (NaN), not drawn as
    the product of the logged shares only. Checked against a loop over the steps, t0 = step 2, step 5 missing."""
    make_run(tmp_path, "run", "sam", 0)
    share = {0: 50.0, 1: 52.0, 2: 60.0, 3: 70.0, 4: 80.0, 5: 65.0, 6: 75.0}
    lines = (tmp_path / "run" / "steps.csv").read_text().splitlines()
    rows = []
    for step in (0, 1, 2, 3, 4, 5, 6):
        row = lines[1].split(",")
        values = dict(step=step, ckpt1=share[step], persist_t0=1000 if step >= 2 else "nan",
                      persist_overlap=600 if step >= 2 else "nan", persist_running=500 if step >= 2 else "nan")
        if step == 5:   # a step logged without statistics (--stats-every that does not divide --log-every)
            values.update({k: "nan" for k in ("ckpt1", "persist_t0", "persist_overlap", "persist_running")})
        for name, value in values.items():
            row[STEP_COLS.index(name)] = str(value)
        rows.append(",".join(row))
    (tmp_path / "run" / "steps.csv").write_text("\n".join([lines[0]] + rows) + "\n")
    rows, pct = plots._persistence(plots.load_run(str(tmp_path / "run"))["steps"])
    expected, product = [], 1.0
    for step in (2, 3, 4):
        product *= share[step] / 100 if step > 2 else 1.0
        expected.append(100 * product)
    assert np.allclose(pct["running_chance"][:3], expected)
    assert np.isnan(pct["running_chance"][3])   # step 6: step 5's share is unknown
    assert np.allclose(pct["overlap_chance"], [share[s] for s in (2, 3, 4, 6)])


def test_plots_a_copied_run_folder_leaves_the_finished_run_and_its_row_in_place(tmp_path, capsys):
    """A copy of a run folder (same settings and seed) is counted once: a copy cut before its end, sorting first,
    does not push the finished run out of tables.md, and under reproduce.py's layout a finished copy sorting first
    (core/backup-sam-s0) leaves the row core/sam its seed 0."""
    runs = tmp_path / "runs"
    runs.mkdir()
    finals = [make_run(runs, f"sam_s{s}", "sam", s) for s in (0, 1)]
    make_run(runs, "a_copy_s1", "sam", 1, final=False)
    assert plots.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    assert "skipped " + str(runs / "a_copy_s1") + ": duplicate of " + str(runs / "sam_s1") in capsys.readouterr().out
    acc = [f["test_acc_best"] for f in finals]
    row = next(line for line in (tmp_path / "out" / "tables.md").read_text().splitlines() if "| sam |" in line)
    assert f"| 2 | {np.mean(acc):.4g} ± {np.std(acc, ddof=1):.2g} |" in row, row
    root = tmp_path / "results"
    (root / "core").mkdir(parents=True)
    for s in (0, 1):
        make_run(root / "core", f"sam-s{s}", "sam", s)
    shutil.copytree(root / "core" / "sam-s0", root / "core" / "backup-sam-s0")
    shutil.copytree(root / "core" / "sam-s0", root / "core" / "sam-s0-old")   # a second copy: every copy is known
    rows = plots.claim_rows(str(root), plots.load_runs(str(root))[0])[3]
    assert sorted(os.path.basename(r["folder"]) for r in rows["core/sam"]) == ["sam-s0", "sam-s1"]


def test_plots_a_seeds_folder_copied_under_another_seeds_name_is_not_a_second_seed(tmp_path, capsys):
    """core/sam-s0 copied over core/sam-s2: plots.py warns that it counts the run once, so the row core/sam holds
    seeds 0 and 1 (n 2, their mean), not seed 0 twice."""
    root = tmp_path / "results"
    (root / "core").mkdir(parents=True)
    finals = [make_run(root / "core", f"sam-s{s}", "sam", s) for s in (0, 1)]
    shutil.copytree(root / "core" / "sam-s0", root / "core" / "sam-s2")
    runs = plots.load_runs(str(root))[0]
    assert "counted once" in capsys.readouterr().out
    rows = plots.claim_rows(str(root), runs)[3]
    assert sorted(r["config"]["seed"] for r in rows["core/sam"]) == [0, 1]
    acc = [f["test_acc_best"] for f in finals]   # 71 and 72: seed 0 twice would give 71.33
    [row] = [line for line in plots.results_md(str(root), runs).splitlines()
             if line.startswith("| sam | ") and line.split(" | ")[1].isdigit() and line.split(" | ")[1] != "0"]
    assert row.startswith("| sam | 2 | ") and f"| {np.mean(acc):.4g} ± {np.std(acc, ddof=1):.2g} |" in row, row


def test_plots_skips_a_run_with_bytes_that_are_not_utf8_and_names_it(tmp_path, capsys):
    """A CSV or JSON file with bytes that are not UTF-8 is a run that cannot be read: skipped with the reason,
    the other runs tabulated, not a traceback that writes nothing."""
    runs = tmp_path / "runs"
    runs.mkdir()
    finals = [make_run(runs, f"sam_s{s}", "sam", s) for s in range(4)]
    with open(runs / "sam_s1" / "epochs.csv", "ab") as f:
        f.write(b"\xff\xfe\x80,1\n")
    (runs / "sam_s2" / "final.json").write_bytes(b"\xff")
    (runs / "sam_s3" / "config.json").write_bytes(b"\xff")
    assert plots.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for name, file in (("sam_s1", "epochs.csv"), ("sam_s2", "final.json"), ("sam_s3", "config.json")):
        assert f"skipped {runs / name}: unreadable {file}" in out, out
    row = next(line for line in (tmp_path / "out" / "tables.md").read_text().splitlines() if "| sam |" in line)
    assert f"| 1 | {finals[0]['test_acc_best']:.4g} |" in row, row


def test_plots_toy_table_leaves_out_a_landscape_row_cut_while_written(tmp_path):
    """toy_tables reads landscape_ends.csv as read_csv reads a run's CSVs: a last line cut while written (too few
    fields, no newline) is left out, not a traceback, and the whole rows are tabulated."""
    header = "variant,landscape,x,y,loss,basin,lambda_max"
    whole = ["sgd,two_basins,-1.0,0.5,-0.3,sharp,8.0", "sam,two_basins,1.4962,-0.4974,4.2e-06,flat,0.4"]
    (tmp_path / "landscape_ends.csv").write_text("\n".join([header] + whole) + "\nusam,two_basins,1.49")
    part, = plots.toy_tables(str(tmp_path))
    lines = part.splitlines()[4:]
    assert lines == ["| two_basins | sgd | (-1.00, 0.50) | sharp | -0.3000 | 8.000 |",
                     "| two_basins | sam | (1.50, -0.50) | flat | 0.0000 | 0.400 |"]


def test_plots_geometry_figures_draw_one_line_per_row_in_reproduce_order(tmp_path):
    """Claims 1-3's figures draw each geometry row (the setting, and where SGD fits) as its own line, named by its
    images and epochs, in reproduce.py's row order; a folder that is no row's seed is left out."""
    import reproduce
    setting = reproduce.CANDIDATES["resnet18-w0.25-n10k-e30"]
    (tmp_path / "setting.json").write_text(json.dumps(dict(name="resnet18-w0.25-n10k-e30", args=setting, rule="r")))
    (tmp_path / "geometry").mkdir()
    made = {"sam-n2500-s1": 2500, "sam-s0": 10000, "sam-s1": 10000, "sam-n2500-s0": 2500, "sam-s7": 10000}
    for name, subset in made.items():
        make_run(tmp_path / "geometry", name, "sam", int(name[-1]))
        update_json(tmp_path / "geometry" / name / "config.json", subset=subset, epochs=30 if subset == 10000 else 100)
    runs, _ = plots.load_runs(str(tmp_path))
    rows = plots.geometry_rows(str(tmp_path), runs)
    assert list(rows) == ["10,000 images, 30 epochs", "2,500 images, 100 epochs"]   # the setting's row first
    assert [os.path.basename(r["folder"]) for r in rows["10,000 images, 30 epochs"]] == ["sam-s0", "sam-s1"]
    assert [os.path.basename(r["folder"]) for r in rows["2,500 images, 100 epochs"]] == ["sam-n2500-s0", "sam-n2500-s1"]
    assert plots.label("2,500 images, 100 epochs", rows) == "2,500 images, 100 epochs"
    paths = plots.results_figures(str(tmp_path), runs, str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == ["ckpt_shares.png", "ckpt1_bins.png", "persistence.png", "mag_up.png"]
    # results.md's table of the group: every row's test accuracy first, though no check of the group names it, then
    # each measure its checks name, once, in their order; no Hessian trace where no check measures sharpness
    import statistics
    geometry = next(g for g in reproduce.claims(setting) if g.name == "geometry")
    named = list(dict.fromkeys(m for row in geometry.rows for m, *_ in row.expect))
    assert "test_acc" not in named and not set(named) & {"lambda_max", "top5_pos_mean"}
    section = plots.results_md(str(tmp_path), runs).split(f"## {geometry.claim}\n")[1].split("\n## ")[0].splitlines()
    header = [c.strip() for c in section[1].strip("|").split("|")]
    assert header == ["row", "n", plots.METRICS["test_acc"][0]] + [plots.METRICS[m][0] for m in named] + ["ran on", "command"]
    row = [c.strip() for c in next(line for line in section if line.startswith("| sam | 2 |")).strip("|").split("|")]
    acc = [json.loads((tmp_path / "geometry" / f"sam-s{s}" / "final.json").read_text())["test_acc_best"] for s in (0, 1)]
    assert row[2] == f"{statistics.mean(acc):.4g} ± {statistics.stdev(acc):.2g}"


def test_plots_persistence_and_bins_figures_plot_what_they_name(tmp_path, monkeypatch):
    """Persistence: the overlap in % of each run's own t0 set, averaged over seeds (t0 sets differ in size), at the
    steps every seed tracks; the running-intersection panel opens 2 steps before the earliest t0 and shows 60
    steps. Fine bins: one panel per group for the first three groups, one line per r > 1 bin."""
    import statistics
    tracked = {0: (10, 1000, [None, None, 700, 650, 600, 640]), 1: (5, 500, [None, 500, 400, 420, 300, 310])}
    share = {0: [50.0, 52.0, 54.5, 56.0, 58.0, 61.0], 1: [40.0, 43.0, 47.0, 44.0, 49.0, 45.5]}   # B1 (%)
    for seed, (t0, size, overlap) in tracked.items():
        make_run(tmp_path, f"sam_s{seed}", "sam", seed)
        rewrite_column(tmp_path / f"sam_s{seed}", "steps", "ckpt1", share[seed])
        steps = [5 * k for k in range(6)]
        rewrite_column(tmp_path / f"sam_s{seed}", "steps", "persist_t0", [size if s >= t0 else None for s in steps])
        rewrite_column(tmp_path / f"sam_s{seed}", "steps", "persist_overlap", overlap)
    for variant in ("asam", "usam", "sgd"):
        make_run(tmp_path, f"{variant}_s0", variant, 0)
    groups = plots.group_runs(plots.load_runs(str(tmp_path))[0])
    figures = kept_figures(monkeypatch)
    sam_only = {key: runs for key, runs in groups.items() if key[2] == "sam"}
    plots.plot_persistence(sam_only, str(tmp_path))
    axes = figures["persistence"].axes
    both = [s for s in range(0, 30, 5) if all(s >= t0 for t0, _, _ in tracked.values())]
    line = axes[0].lines[0]
    assert list(line.get_xdata()) == both == [10, 15, 20, 25]
    assert np.allclose(line.get_ydata(), [statistics.mean(100 * overlap[s // 5] / size for _, size, overlap
                                                          in tracked.values()) for s in both])
    chance = axes[0].lines[1]   # overlap's chance level: the B1 share, dotted, no band
    assert chance.get_linestyle() == ":" and [len(ax.collections) for ax in axes] == [1, 1]
    assert list(chance.get_xdata()) == both
    assert np.allclose(chance.get_ydata(), [statistics.mean(share[seed][s // 5] for seed in tracked) for s in both])
    assert axes[0].get_title().startswith("overlap") and axes[1].get_title().startswith("running")
    earliest = min(t0 for t0, _, _ in tracked.values())
    assert axes[1].get_xlim() == (earliest - 2, earliest + 60)
    plots.plot_ckpt1_bins(groups, str(tmp_path))
    axes = figures["ckpt1_bins"].axes
    first = list(groups)[:3]
    assert [ax.get_title() for ax in axes] == [plots.label(key, groups) for key in first] == ["asam", "sam", "sgd"]
    assert [len(ax.lines) for ax in axes] == [len(sam.FINE_NAMES)] * 3
    for fig in figures.values():
        plots.plt.close(fig)


def test_plots_main_draws_each_checkpoint_share_and_mag_up_per_setting_over_every_seed(tmp_path, monkeypatch):
    """Outside results/, main draws ckpt_shares (one panel per checkpoint, titled with the r range sam.py buckets into
    it) and mag_up from every run, an unfinished seed too (plotted, not tabulated): one line per setting, in the order
    of the settings and not of the folders, each the mean over seeds at each step with a band of +- one sample std,
    checked against statistics on the steps.csv columns this test writes."""
    import statistics
    root = tmp_path / "runs"
    root.mkdir()
    made = {"a_sgd_s0": ("sgd", 0, True), "a_sgd_s1": ("sgd", 1, True),   # sgd's folders sort first, its setting second
            "b_sam_s0": ("sam", 0, True), "b_sam_s1": ("sam", 1, False), "b_sam_s2": ("sam", 2, True)}
    cols = ("ckpt1", "ckpt2", "ckpt3", "ckpt4", "mag_up")
    data = {}
    for k, (name, (variant, seed, final)) in enumerate(made.items()):
        make_run(root, name, variant, seed, final=final)
        rng = np.random.default_rng(100 + k)
        data[name] = {c: [round(float(v), 3) for v in rng.uniform(0, 100, 6)] for c in cols}
        for c, values in data[name].items():
            rewrite_column(root / name, "steps", c, values)
    figures = kept_figures(monkeypatch)
    assert plots.main([str(root), "--out", str(tmp_path / "out")]) == 0
    steps = [float(r["step"]) for r in _rows(root / "a_sgd_s0" / "steps.csv")]
    seeds = {v: [n for n, (variant, _, _) in made.items() if variant == v] for v in ("sam", "sgd")}

    def check(ax, col):
        assert [line.get_label() for line in ax.lines] == list(seeds), col
        for i, (line, names) in enumerate(zip(ax.lines, seeds.values())):
            per_step = [[data[n][col][k] for n in names] for k in range(len(steps))]
            assert list(line.get_xdata()) == steps, col
            assert np.allclose(line.get_ydata(), [statistics.mean(v) for v in per_step]), col
            edges = band_edges(ax, i)
            for step, v in zip(steps, per_step):
                mean, std = statistics.mean(v), statistics.stdev(v)
                assert edges[step] == pytest.approx((mean - std, mean + std)), (col, step)
    shares = figures["ckpt_shares"].axes
    # sam.py's CHECKPOINT_OF_BUCKET: r > 1 -> 1, (0, 1) -> 2, r < -1 -> 3, (-1, 0) -> 4
    assert [ax.get_title() for ax in shares] == ["checkpoint 1: r > 1", "checkpoint 2: 0 < r < 1",
                                                 "checkpoint 3: r < -1", "checkpoint 4: -1 < r < 0"]
    for ax, col in zip(shares, cols[:4]):
        check(ax, col)
    check(figures["mag_up"].axes[0], "mag_up")
    assert set(figures) == set(plots.FIGURES)
    for fig in figures.values():
        plots.plt.close(fig)


def test_plots_ckpt1_bins_draw_each_fine_bins_seed_mean_for_the_first_groups_that_log_them(tmp_path, monkeypatch):
    """ckpt1_bins: a panel per group that logged the r > 1 bins (a run from before they existed is left out, its
    panel not taken), a line per bin without a band (crowded), each the mean over seeds; the panels left over say
    so."""
    import statistics
    for name, variant, seed in (("asam_s0", "asam", 0), ("sam_s0", "sam", 0), ("sam_s1", "sam", 1), ("sgd_s0", "sgd", 0)):
        make_run(tmp_path, name, variant, seed)
    path = tmp_path / "sgd_s0" / "steps.csv"   # sgd's run has no fine bins
    keep = [i for i, c in enumerate(STEP_COLS) if c not in sam.FINE_NAMES]
    path.write_text("".join(",".join(line.split(",")[i] for i in keep) + "\n" for line in path.read_text().splitlines()))
    groups = plots.group_runs(plots.load_runs(str(tmp_path))[0])
    figures = kept_figures(monkeypatch)
    plots.plot_ckpt1_bins(groups, str(tmp_path))
    axes = figures["ckpt1_bins"].axes
    assert [ax.get_title() for ax in axes[:2]] == ["asam", "sam"]
    for ax, names in zip(axes, (["asam_s0"], ["sam_s0", "sam_s1"])):
        assert len(ax.collections) == 0 and not ax.texts
        assert [line.get_label() for line in ax.lines] == [f"r in {b[1:].replace('_', '..')}" for b in sam.FINE_NAMES]
        for line, b in zip(ax.lines, sam.FINE_NAMES):
            per_step = {}
            for n in names:
                for row in _rows(tmp_path / n / "steps.csv"):
                    per_step.setdefault(float(row["step"]), []).append(float(row[b]))
            assert list(line.get_xdata()) == sorted(per_step)
            assert np.allclose(line.get_ydata(), [statistics.mean(per_step[s]) for s in sorted(per_step)]), b
    assert not axes[2].lines and [t.get_text() for t in axes[2].texts] == ["no further group"]
    plots.plt.close(figures["ckpt1_bins"])


def test_plots_curves_past_eight_rows_put_the_legend_beside_and_past_ten_change_the_line_style(tmp_path, monkeypatch):
    """plot_curves: up to 8 groups the legend sits in the first panel, past 8 beside the panels; colours repeat past
    ten groups, so the 11th group's lines are dashed and the first ten's solid."""
    for k in range(11):
        make_run(tmp_path, f"sam_rho{k}", "sam", 0)
        update_json(tmp_path / f"sam_rho{k}" / "config.json", rho=0.01 * (k + 1))
    groups = plots.group_runs(plots.load_runs(str(tmp_path))[0])
    assert len(groups) == 11
    figures = kept_figures(monkeypatch)
    for n in (8, 9, 11):
        plots.plot_curves(dict(list(groups.items())[:n]), str(tmp_path), f"curves{n}")
        fig = figures[f"curves{n}"]
        beside = n > 8
        assert (len(fig.legends), fig.axes[0].get_legend() is None) == (int(beside), beside), n
        for ax in fig.axes:
            assert [line.get_linestyle() for line in ax.lines] == ["-"] * min(n, 10) + ["--"] * (n - 10), n
            assert [line.get_color() for line in ax.lines] == [f"C{i % 10}" for i in range(n)], n
        plots.plt.close(fig)


def test_plots_shares_by_setting_rounds_training_done_to_a_tenth_of_a_percent(tmp_path, monkeypatch):
    """shares_by_setting's x: 100 * step / the run's last step, to 0.1 %, so seeds whose steps differ a little share
    points; each checkpoint's line is the mean of the seeds at each point."""
    import statistics
    for seed, last in ((0, 60), (1, 600)):
        make_run(tmp_path, f"sam_s{seed}", "sam", seed)
        rewrite_column(tmp_path / f"sam_s{seed}", "steps", "step", [0, 1, 2, 3, 4, 6] if last == 60 else
                       [0, 10, 20, 30, 40, 60])
        rewrite_column(tmp_path / f"sam_s{seed}", "steps", "ckpt3", [seed + k * 1.5 for k in range(6)])
    runs, _ = plots.load_runs(str(tmp_path))
    figures = kept_figures(monkeypatch)
    plots.plot_shares_by_setting({"one": runs}, str(tmp_path))
    ax = figures["shares_by_setting"].axes[2]   # checkpoint 3
    assert ax.get_title() == "checkpoint 3"
    line, = ax.lines
    assert np.allclose(line.get_xdata(), [0, 16.7, 33.3, 50, 66.7, 100])
    assert np.allclose(line.get_ydata(), [statistics.mean([0 + k * 1.5, 1 + k * 1.5]) for k in range(6)])
    plots.plt.close(figures["shares_by_setting"])


def test_plots_main_under_results_writes_results_md_and_the_claims_figures_into_results(tmp_path, monkeypatch, capsys):
    """Under reproduce.py's layout main writes results.md (no tables.md) into --out and the claims' figures into
    <out>/results, each from the geometry row's seeds."""
    (tmp_path / "geometry").mkdir()
    for seed in (0, 1):
        make_run(tmp_path / "geometry", f"sam-s{seed}", "sam", seed)
        update_json(tmp_path / "geometry" / f"sam-s{seed}" / "config.json", subset=10000, epochs=20)
    figures = kept_figures(monkeypatch)
    out = tmp_path / "out"
    assert plots.main([str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "results.md").exists() and not (out / "tables.md").exists()
    for name in ("ckpt_shares", "ckpt1_bins", "persistence", "mag_up"):
        assert f"wrote {out / 'results' / name}.png" in printed, name
    assert set(figures) == {"ckpt_shares", "ckpt1_bins", "persistence", "mag_up"}
    for fig in figures.values():
        plots.plt.close(fig)


def test_plots_fitting_figure_draws_the_rows_judged_against_a_candidate_with_its_sgd_and_sam(tmp_path, monkeypatch):
    """The rows judged against a selection candidate's runs get one figure of curves per epoch in that candidate's
    setting, after the candidate's SGD and SAM (the references); rows judged otherwise, rows run for other epochs
    (LookSAM at SAM's wall time, judged against the candidate's SAM) and rows not run are left out."""
    import reproduce
    cand = reproduce.FITS_NAME
    made = {f"select/{cand}/sgd": 2, f"select/{cand}/sam": 3, "same/samme1-c2-n2500": 2, "same/samme1-c2": 2,
            "peers/looksam-walltime-n2500": 2}
    for row, seeds in made.items():
        make_row(tmp_path, row, [{}] * seeds)
    runs, _ = plots.load_runs(str(tmp_path))
    fitting = plots.fitting_rows(str(tmp_path), runs)
    assert list(fitting) == [cand]
    assert {k: len(v) for k, v in fitting[cand].items()} == {"sgd (selection)": 2, "sam (selection)": 3,
                                                             "samme1-c2-n2500": 2}   # samckpt1-n2500 has not run
    assert all(r["config"]["subset"] == f"same/{label}" for label in ["samme1-c2-n2500"] for r in fitting[cand][label])
    scales, save = {}, plots._save   # each figure's y scales, read as it is saved
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: scales.setdefault(name, [
        ax.get_yscale() for ax in fig.axes]) and save(fig, out, name))
    paths = plots.results_figures(str(tmp_path), runs, str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == ["shares_by_setting.png", f"fits-{cand}.png"]
    assert scales[f"fits-{cand}"] == ["linear", "linear", "log", "log"]   # losses on a log scale: an early spike
    assert png_size(paths[1]) == tuple(round(x * plots.DPI) for x in plots.FIGURES["curves"])


def test_plots_results_md_gives_the_trace_with_its_uncertainty(tmp_path):
    """Where a group measures sharpness, results.md adds the Hutchinson trace: mean ± std over seeds, and for a row
    of one seed that run's trace ± the standard error of its probes (final.json's trace_se)."""
    traces = {"sgd": [(100.0, 4.0), (110.0, 5.0), (120.0, 6.0)], "sam": [(150.0, 7.5)]}
    (tmp_path / "core").mkdir()
    for variant, runs in traces.items():
        for seed, (trace, se) in enumerate(runs):
            make_run(tmp_path / "core", f"{variant}-s{seed}", variant, seed)
            final = tmp_path / "core" / f"{variant}-s{seed}" / "final.json"
            update_json(final, sharpness={**json.loads(final.read_text())["sharpness"], "trace": trace, "trace_se": se})
    runs, _ = plots.load_runs(str(tmp_path))
    lines = plots.results_md(str(tmp_path), runs).splitlines()
    header = next(line for line in lines if line.startswith("| row | n | final train acc"))
    column = header.split(" | ").index("Hessian trace (Hutchinson; ± std over seeds, one seed ± its SE)")
    sgd = next(line for line in lines if line.startswith("| sgd | 3 |")).split(" | ")
    sam = next(line for line in lines if line.startswith("| sam | 1 |")).split(" | ")
    assert sgd[column] == f"{np.mean([100, 110, 120]):.4g} ± {np.std([100, 110, 120], ddof=1):.2g}" == "110 ± 10"
    assert sam[column] == "150 ± 7.5 (SE)"


def test_plots_results_md_judges_a_row_against_the_device_control_on_its_own_device(tmp_path):
    """A peer that ran on the CPU, whose reference ran on a GPU: judged against the device control (the reference
    row rerun on the CPU) when that has run, with the GPU row still named; the control itself against the GPU row."""
    def put(name, variant, seed, acc, device):
        group, label = name.split("/")
        (tmp_path / group).mkdir(exist_ok=True)
        make_run(tmp_path / group, f"{label}-s{seed}", variant, seed)
        folder = tmp_path / group / f"{label}-s{seed}"
        update_json(folder / "final.json", test_acc_best=acc)
        rho = 0.05 if "0.05" in name else 0.1
        update_json(folder / "config.json", device=device, rho=rho, channels_last=device != "cpu")
    gpu = "NVIDIA H100 80GB HBM3"
    accs = {("core/sgd", gpu): [70.0, 70.5, 71.0], ("core/sam", gpu): [80.0, 80.5, 81.0],
            ("seed004/sam-rho0.05", gpu): [71.9, 72.1], ("device/sam-rho0.05-cpu", "cpu"): [75.5, 75.8, 75.2],
            ("peers/friendlysam", "cpu"): [74.0, 74.3, 73.8]}
    for (name, device), values in accs.items():
        for seed, acc in enumerate(values):
            put(name, name.split("/")[1].split("-")[0], seed, acc, device)
    runs, _ = plots.load_runs(str(tmp_path))
    text = plots.results_md(str(tmp_path), runs)

    def expected(ours, reference):   # the stated rule, written out: the difference against the hypot of the stds
        diff = np.mean(ours) - np.mean(reference)
        spread = math.hypot(np.std(ours, ddof=1), np.std(reference, ddof=1))
        return "holds" if diff > spread else "does not hold" if diff < -spread else "can't tell"
    peer, control, gpu_sam = (accs[k] for k in (("peers/friendlysam", "cpu"), ("device/sam-rho0.05-cpu", "cpu"),
                                                ("seed004/sam-rho0.05", gpu)))
    assert (expected(peer, control), expected(peer, gpu_sam)) == ("does not hold", "holds")   # the device decides
    check = next(line for line in text.splitlines() if line.startswith("| friendlysam | test acc at best val (%) >"))
    assert f"| device/sam-rho0.05-cpu: {np.mean(control):.4g} ± {np.std(control, ddof=1):.2g} (the same row run on " \
           f"cpu; seed004/sam-rho0.05: {np.mean(gpu_sam):.4g} ± {np.std(gpu_sam, ddof=1):.2g} on H100 80GB HBM3) |" in check
    assert check.endswith(f"| {expected(peer, control)} |")
    own = next(line for line in text.splitlines() if line.startswith("| sam-rho0.05-cpu | test acc at best val (%) ~"))
    assert "| seed004/sam-rho0.05: 72 ± 0.14 (on H100 80GB HBM3; this row on cpu) |" in own
    # a peer on the GPU beside a GPU reference keeps its reference
    ssamf = next(line for line in text.splitlines() if line.startswith("| ssamf | test acc at best val (%) >"))
    assert "| seed004/sam-rho0.05: 72 ± 0.14 |" in ssamf


def test_plots_results_md_does_not_call_a_model_at_chance_flat(tmp_path):
    """A row that never left chance (sgdhess-exact at a large rho_H) has a tiny lambda_max: no verdict on flatness,
    for that row and for a row judged against it, while a row that learned keeps the stated rule."""
    def put(label, seed, lam, train_acc):
        (tmp_path / "direction").mkdir(exist_ok=True)
        made = make_run(tmp_path / "direction", f"{label}-s{seed}", "sgdhess-exact", seed)
        folder = tmp_path / "direction" / f"{label}-s{seed}"
        update_json(folder / "config.json", rho=float(label.split("rhoH")[1]))   # its own settings, else plots.py skips it as a copy
        update_json(folder / "final.json", sharpness=dict(made["sharpness"], lambda_max=lam))
        lines = (folder / "epochs.csv").read_text().splitlines()
        cells = lines[-1].split(",")
        cells[EPOCH_COLS.index("train_acc")] = str(train_acc)
        (folder / "epochs.csv").write_text("\n".join(lines[:-1] + [",".join(cells)]) + "\n")
    lams = {"sgdhess-exact-rhoH0.05": [300.0, 320.0], "sgdhess-exact-rhoH1": [0.5, 0.4], "sgdhess-exact-rhoH2": [30.0, 31.0]}
    trains = {"sgdhess-exact-rhoH0.05": [80.0, 82.0], "sgdhess-exact-rhoH1": [10.3, 14.5], "sgdhess-exact-rhoH2": [10.3, 60.0]}
    for label in lams:
        for seed in (0, 1):
            put(label, seed, lams[label][seed], trains[label][seed])
    # the same for the top-5 eigenvalues: SAM's direction at chance (train acc 11-12%) looks far sharper than SAM
    make_row(tmp_path, "core/sam", [{}, {}])
    make_row(tmp_path, "direction/samdirection", [dict(sharpness=dict(lambda_max=1e3, trace=1.0, top5_pos_mean=top5))
                                                  for top5 in (900.0, 950.0)])
    for seed, last in enumerate((11.0, 12.0)):
        rewrite_column(tmp_path / "direction" / f"samdirection-s{seed}", "epochs", "train_acc", [5.0, 8.0, last])
    runs, _ = plots.load_runs(str(tmp_path))
    text = plots.results_md(str(tmp_path), runs)
    assert next(line for line in text.splitlines() if line.startswith("| samdirection | top-5 eigenvalue mean >")).endswith(
        "| can't tell (a row at chance train accuracy) |")

    def check(label, metric):
        return next(line for line in text.splitlines() if line.startswith(f"| {label} | {metric} <"))
    # the stated rule alone would call rho_H 1 flatter than rho_H 0.05 (its mean is 310 lower, the spread about 14)
    assert np.mean(lams["sgdhess-exact-rhoH0.05"]) - np.mean(lams["sgdhess-exact-rhoH1"]) > math.hypot(
        np.std(lams["sgdhess-exact-rhoH0.05"], ddof=1), np.std(lams["sgdhess-exact-rhoH1"], ddof=1))
    assert check("sgdhess-exact-rhoH1", "lambda_max").endswith("| can't tell (a row at chance train accuracy) |")
    # rho_H 2 averages 35% train accuracy (not at chance) but is judged against rho_H 1, which is
    assert check("sgdhess-exact-rhoH2", "lambda_max").endswith("| can't tell (a row at chance train accuracy) |")
    # accuracy verdicts are untouched: less accurate at chance is a finding
    assert "at chance" not in check("sgdhess-exact-rhoH1", "test acc at best val (%)")
    def row(label):
        return [r for r in runs if os.path.basename(r["folder"]).startswith(f"{label}-s")]
    assert [plots.at_chance(row(label)) for label in lams] == [False, True, False]   # mean train acc 81, 12.4, 35


def test_plots_head_and_tail_accuracy_from_the_per_class_accuracies(tmp_path):
    """ImbSAM's claim: the tail classes (final.json's tail_classes) against the head, each a mean of per-class
    test accuracies at best val; no tail classes (a balanced run) gives no value."""
    run = {"final": dict(make_run(tmp_path, "lt", "imbsam", 0), test_acc_per_class_best=[90.0, 80.0, 70.0, 30.0, 10.0],
                         tail_classes=[3, 4])}
    assert plots.METRICS["head_acc"][1](run) == pytest.approx((90 + 80 + 70) / 3)
    assert plots.METRICS["tail_acc"][1](run) == pytest.approx((30 + 10) / 2)
    run["final"]["tail_classes"] = []
    assert math.isnan(plots.METRICS["tail_acc"][1](run)) and math.isnan(plots.METRICS["head_acc"][1](run))
    assert train.tail_mask(torch.tensor([0, 0, 0, 2, 2, 0]), 3, 4).tolist() == [False, True, True, True]   # 4, 0, 2, 0


def test_plots_results_md_takes_the_first_device_control_that_measured_the_metric(tmp_path):
    """Two CPU reruns of SAM at rho 0.1, one without sharpness: a CPU row's accuracy is judged against the first,
    its lambda_max against the one that measured it, never against the GPU row when a CPU control has the metric."""
    def put(name, variant, seed, acc, lam, device):
        group, label = name.split("/")
        (tmp_path / group).mkdir(exist_ok=True)
        make_run(tmp_path / group, f"{label}-s{seed}", variant, seed)
        folder = tmp_path / group / f"{label}-s{seed}"
        update_json(folder / "final.json", test_acc_best=acc,
                    sharpness=None if lam is None else dict(lambda_max=lam, trace=1.0, top5_pos_mean=lam / 2))
        update_json(folder / "config.json", device=device, sharpness=lam is not None)   # another run, not a copy
    gpu = "NVIDIA H100 80GB HBM3"
    rows = {("core/sam", gpu): ([70.0, 70.4, 70.2], [200.0, 210.0, 205.0]),
            ("device/sam-rho0.1-cpu", "cpu"): ([71.0, 71.3, 71.1], [None] * 3),
            ("device/sam-rho0.1-sharp-cpu", "cpu"): ([72.0, 72.6], [300.0, 310.0]),
            ("samckpt/samckpt1", "cpu"): ([71.2, 71.0, 71.4], [305.0, 303.0, 309.0])}
    for (name, device), (accs, lams) in rows.items():
        for seed, (acc, lam) in enumerate(zip(accs, lams)):
            put(name, name.split("/")[1].split("-")[0], seed, acc, lam, device)
    runs, _ = plots.load_runs(str(tmp_path))
    text = plots.results_md(str(tmp_path), runs)

    def shown(values):
        return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"
    acc = next(line for line in text.splitlines() if line.startswith("| samckpt1 | test acc at best val (%) ~"))
    lam = next(line for line in text.splitlines() if line.startswith("| samckpt1 | lambda_max ~"))
    assert f"| device/sam-rho0.1-cpu: {shown(rows['device/sam-rho0.1-cpu', 'cpu'][0])} (the same row run on cpu; " \
           f"core/sam: {shown(rows['core/sam', gpu][0])} on H100 80GB HBM3) |" in acc
    assert f"| device/sam-rho0.1-sharp-cpu: {shown([300.0, 310.0])} (the same row run on cpu; " \
           f"core/sam: {shown([200.0, 210.0, 205.0])} on H100 80GB HBM3) |" in lam
    # 306 against 305 +- 7: as flat as SAM on the CPU; against the GPU's 205 it would read "does not hold"
    assert lam.endswith("| holds |")


def test_reproduce_compares_each_row_with_a_real_row_at_the_same_radius():
    """Every 'group/label' reference names a row of the claims, and an accuracy comparison of two SAM-like rows is
    made at one radius (the rho each command gives, else its preset's): a peer run at its preset rho 0.05 is not
    judged against SAM at 0.1, which is less accurate in this setting (SAM against SAM at another radius is a sweep,
    and the radius is its claim)"""
    import reproduce

    def radius(row):
        given = reproduce.value(row.flags, "--rho")
        return float(given) if given is not None else sam.VARIANTS[row.variant].get("rho", sam.FLAGS["rho"])
    setting = reproduce.CANDIDATES["resnet18-w0.25-n10k-e30"]
    rows = {f"{group.name}/{row.label}": row for group in reproduce.claims(setting) for row in group.rows}
    peers = 0
    selection = {f"select/{g.name.split('/')[1]}/{r.label}": r for g in reproduce.select_groups() for r in g.rows}
    for name, row in rows.items():
        for metric, op, reference, words in row.expect:
            if str(reference).startswith("select/"):   # a selection candidate's runs: in its setting, at its radius
                candidate = reference.split("/")[1]
                assert reference in selection, name
                sweep = row.variant == selection[reference].variant == "sam"
                assert (radius(row) != radius(selection[reference])) if sweep else \
                    (radius(row) == radius(selection[reference])), name
                in_setting = reproduce.CANDIDATES[candidate]
                flags = row.flags
                if name.endswith("-walltime-n2500"):   # LookSAM at SAM's wall time: the setting, then 2/1.1 x its epochs
                    flags, epochs = row.flags[:-2], int(reproduce.value(row.flags, "--epochs"))
                    assert epochs == round(int(reproduce.value(in_setting, "--epochs")) * 2 / 1.1) == 182, name
                assert flags[-len(in_setting):] == in_setting, name
            elif isinstance(reference, str):
                assert reference in rows, f"{name}: no row {reference}"
                if name.startswith("peers/") and not name.startswith("peers/lt-") and metric == "test_acc":
                    assert rows[reference].variant == "sam" and radius(rows[reference]) == radius(row), name
                    peers += 1
    assert peers == 11 and radius(rows["peers/friendlysam"]) == 0.05 and radius(rows["peers/fishersam"]) == 0.1


def test_reproduce_device_control_rows_run_on_the_cpu_wherever_launched():
    """The control rows pin --device cpu: launched with --device cuda they still train on the CPU, with the variant and
    radius (and c) of the GPU row they are compared with (but claim 5's step-length control, compared with CPU rows
    only); every other row takes the runner's device."""
    import reproduce
    import train
    setting = reproduce.CANDIDATES["resnet18-w0.25-n10k-e30"]
    groups = reproduce.claims(setting)
    rows = {f"{g.name}/{row.label}": row for g in groups for row in g.rows}
    runs = reproduce.runs_of(groups, setting, "data", "cuda")
    device = {f"{run.group}/{run.label}": train.parse_settings(run.args).device for run in runs}
    control = {name for name in device if name.startswith("device/")}
    assert control == {"device/sam-rho0.01-cpu", "device/sam-rho0.05-cpu", "device/sam-rho0.1-cpu", "device/sam-rho0.5-cpu",
                       "device/linf-norm-rho0.05-cpu", "device/sam-rho0.1-sharp-cpu", "device/sammagnitude-cpu",
                       "device/samdirection-cpu", "device/samme1-c2-cpu", "device/customsame-cpu", "device/sgd-cpu",
                       "device/sam-step1.8-cpu"}
    assert all(device[name] == "cpu" for name in control)
    assert {d for name, d in device.items() if name not in control} == {"cuda"}
    of_a_gpu_row = {name for name in control if not rows[name].expect[0][2].startswith("device/")}
    assert control - of_a_gpu_row == {"device/sam-step1.8-cpu"}   # claim 5's step-length control: CPU rows only
    for name in of_a_gpu_row:
        reference = rows[rows[name].expect[0][2]]
        assert reference.variant == rows[name].variant
        for flag, default in (("--rho", sam.FLAGS["rho"]), ("--condition", sam.FLAGS["condition"])):
            assert reproduce.value(reference.flags, flag, default) == reproduce.value(rows[name].flags, flag, default)


def test_reproduce_runs_name_each_option_once_with_the_value_train_py_reads():
    """A row's flags after the setting's (a subset, a model, a log interval) reach train.py once, at the value
    argparse gives the repeated command: every run of the claims parses as its unreduced command does."""
    import reproduce
    import train
    setting = reproduce.CANDIDATES["resnet18-w0.25-n10k-e30"]
    groups = reproduce.claims(setting)
    runs = {f"{run.group}/{run.label}": run for run in reproduce.runs_of(groups, setting, "data", "cpu", seeds=[0])}
    repeated = 0
    for group in groups:
        for row in group.rows:
            run = runs[f"{group.name}/{row.label}"]
            options = [a[2:].removeprefix("no-") for a in run.args if a.startswith("--")]
            assert len(options) == len(set(options)), run.label
            unreduced = [*reproduce.COMMON, *setting, "--variant", row.variant, *row.flags, "--seed", "0",
                         "--data-dir", "data", "--device", "cpu", "--out", str(run.out.relative_to(reproduce.ROOT))]
            assert vars(train.parse_settings(run.args)) == vars(train.parse_settings(unreduced)), run.label
            repeated += len(unreduced) - len(run.args) > 0
    assert repeated >= 10   # the n2500 rows, the ResNet-18 and CNN rows, the long-tailed rows, claims 1-3
    # --override wins over every row's own flags; --seeds keeps, of each row's seeds, those asked for
    over = reproduce.runs_of(groups, setting, "data", "cuda", seeds=[2, 4],
                             override=["--epochs", "1", "--lr", "0.3", "--device", "cpu"])
    assert {(run.group, run.label, run.seed) for run in over} == {
        (g.name, row.label, s) for g in groups for row in g.rows for s in row.seeds if s in (2, 4)} != set()
    assert all((x.epochs, x.lr, x.device) == (1, 0.3, "cpu") for x in map(train.parse_settings, (run.args for run in over)))
    assert reproduce.last_wins(["python", "train.py", "--no-cutout", "--bin-scale", *"ccccc", "--subset", "9",
                                "--cutout", "--bin-scale", "1", "1", "c", "1", "1", "--rho", "-1"]) == \
        ["python", "train.py", "--cutout", "--bin-scale", "1", "1", "c", "1", "1", "--subset", "9", "--rho", "-1"]


def test_reproduce_rows_runs_only_the_named_rows_and_rejects_unknown_ones(tmp_path, monkeypatch, capsys):
    import reproduce
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")   # every run is to start, whatever results/ holds
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    reproduce.main(["claims", "--dry-run", "--rows", "lt-imbsam,sam-rho0.05-cpu", "--seeds", "0"])
    printed = capsys.readouterr().out.splitlines()
    outs = [line.split("--out ")[1].split()[0] for line in printed if "--out " in line]
    assert outs == ["results/peers/lt-imbsam-s0", "results/device/sam-rho0.05-cpu-s0"]
    # a group left without a row is not listed
    assert [line.split(":")[0] for line in printed if re.fullmatch(r"[\w/]+: \d+ runs, .*", line)] == ["peers", "device", "all"]
    # --groups keeps the claims' priority order, whatever the order asked; with no setting.json, the dry run shows
    # the first candidate's setting
    reproduce.main(["claims", "--dry-run", "--groups", "device,core", "--seeds", "1"])
    printed = capsys.readouterr().out
    first = next(iter(reproduce.CANDIDATES.values()))
    assert "showing the first candidate's setting" in printed
    commands = {line.split("--out ")[1].split()[0]: shlex.split(line.split(" train.py ", 1)[1])
                for line in printed.splitlines() if "--out " in line}
    assert list(commands) == [f"results/{g.name}/{row.label}-s1" for g in reproduce.claims(first)
                              if g.name in ("core", "device") for row in g.rows if 1 in row.seeds]
    assert [reproduce.value(commands["results/core/sgd-s1"], flag) for flag in ("--model", "--subset", "--epochs")] == \
        [reproduce.value(first, flag) for flag in ("--model", "--subset", "--epochs")]
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["claims", "--dry-run", "--groups", "core", "--rows", "lt-imbsam"])
    assert stop.value.code == 2 and "unknown rows ['lt-imbsam']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["claims", "--dry-run", "--groups", "core,nosuch"])
    assert stop.value.code == 2 and "unknown groups ['nosuch']" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--jobs", "0"], ["--threads", "0"], ["--deadline", "nan"], ["--deadline", "-5"],
                                  ["--grace", "-1"], ["--grace", "nan"]])
def test_reproduce_bad_runner_settings_exit_with_a_message(argv, capsys):
    import reproduce
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["claims", "--dry-run", *argv])
    assert stop.value.code == 2 and "--jobs and --threads must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--deadline", "30"], ["--deadline", "20", "--grace", "25"]])
def test_reproduce_refuses_a_deadline_within_the_grace(argv, capsys):
    # the jobs get SIGINT at deadline - grace: such a call would start nothing and count every run incomplete
    import reproduce
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["claims", "--dry-run", *argv])
    assert stop.value.code == 2 and "leaves no time to run" in capsys.readouterr().err


def test_reproduce_decisions_pack_and_deadline(tmp_path, monkeypatch):
    import tarfile
    import reproduce
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    folders = {name: tmp_path / "results" / "g" / name for name in ("done", "cut", "crashed", "new", "blown")}
    for name, files in (("done", ["config.json", "final.json", "last.pt", "train.py", "steps.csv", "train.log"]),
                        ("cut", ["config.json", "last.pt"]), ("crashed", ["config.json"]),
                        ("blown", ["config.json", "last.pt", "diverged.txt", "curve.png"])):
        folders[name].mkdir(parents=True)
        for file in files:
            (folders[name] / file).write_text("{}")
    assert [reproduce.decision(folders[n]) for n in ("done", "cut", "crashed", "new", "blown")] == \
        ["skip", "resume", "overwrite", "start", "diverged"]
    # pack keeps the .json, .csv, .log and .txt files (a run's log and its divergence are results too), no checkpoint,
    # copied code or figure; it returns 1 (a warning) once the archive is larger than the limit
    assert reproduce.pack(str(tmp_path / "r.tar.gz")) == 0
    with tarfile.open(tmp_path / "r.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == ["results/g/blown/config.json", "results/g/blown/diverged.txt", "results/g/crashed/config.json",
                     "results/g/cut/config.json", "results/g/done/config.json", "results/g/done/final.json",
                     "results/g/done/steps.csv", "results/g/done/train.log"]
    size = os.path.getsize(tmp_path / "r.tar.gz")
    assert [reproduce.pack(str(tmp_path / "r.tar.gz"), limit=size + d) for d in (-1, 0)] == [1, 0]
    # a real train.py job longer than the deadline: asked to stop (SIGINT) it checkpoints, and is resumed next time
    monkeypatch.setattr(reproduce, "ROOT", REPO)
    out = tmp_path / "results" / "g" / "long-s0"
    run = reproduce.Run("g", "long", 0, "sgd", _tiny_run(tmp_path, "--epochs", "1000", "--out", str(out)), out)
    counts = reproduce.execute([run], jobs=1, deadline=20, grace=8)
    assert counts["incomplete"] == 1 and counts["failed"] == 0
    assert reproduce.decision(out) == "resume" and "stopped at step" in (out / "train.log").read_text()


def test_reproduce_measures_the_sharpness_a_row_adds_to_its_finished_runs(tmp_path, monkeypatch):
    """A row that now asks for sharpness: its finished runs without it are resumed to measure it (not stale,
    not re-trained); a run measured with other sharpness settings is stale; a row that no longer asks for it keeps
    the measured run as its result (skipped, not stale)."""
    import reproduce
    monkeypatch.setattr(reproduce, "ROOT", REPO)
    out = tmp_path / "results" / "g" / "sgd-s0"
    plain = _tiny_run(tmp_path, "--variant", "sgd", "--out", str(out))
    sharp = ["--sharpness", "--sharpness-batches", "2", "--sharpness-batch-size", "6", "--sharpness-iters", "5"]
    train.main(plain)
    epochs = (out / "epochs.csv").read_bytes()
    run = reproduce.Run("g", "sgd", 0, "sgd", plain + sharp, out)
    assert reproduce.decision(out) == "skip" and reproduce.decision(out, sharpness_wanted=True) == "measure"
    assert reproduce.stale(run) and not reproduce.stale(run, end_open=True)
    counts = reproduce.execute([run], jobs=1, deadline=None, grace=8)
    assert counts["done"] == 1 and counts["stale"] == 0
    final = json.loads((out / "final.json").read_text())
    assert final["sharpness"]["lambda_max"] > 0 and (out / "epochs.csv").read_bytes() == epochs
    assert reproduce.decision(out, sharpness_wanted=True) == "skip" and not reproduce.stale(run)
    other = reproduce.Run("g", "sgd", 0, "sgd", plain + sharp[:-1] + ["9"], out)
    assert reproduce.execute([other], jobs=1, deadline=None, grace=8)["stale"] == 1
    assert json.loads((out / "final.json").read_text()) == final
    without = reproduce.Run("g", "sgd", 0, "sgd", plain, out)
    assert not reproduce.stale(without) and reproduce.decision(out, reproduce.wants_sharpness(without)) == "skip"
    assert reproduce.execute([without], jobs=1, deadline=None, grace=8) == \
        dict(done=0, diverged=0, incomplete=0, failed=0, skipped=1, stale=0)
    assert json.loads((out / "final.json").read_text()) == final


@pytest.mark.parametrize("jobs,n_runs,asked,threads", [(1, 2, None, 16), (4, 8, None, 4), (5, 8, None, 3),
                                                      (32, 40, None, 1), (12, 2, None, 8), (1, 2, 1, 1), (2, 2, 3, 3)])
def test_reproduce_splits_the_cpu_cores_among_its_jobs(tmp_path, monkeypatch, capsys, jobs, n_runs, asked, threads):
    """One job on a CPU gets every core (one thread ran it at half speed on 2 cores); the jobs that run at once
    share them (2 runs left for 12 jobs: 8 threads each); the cores are those this process may use (16 of the
    machine's 64 here); --threads sets the count where other runs share the machine. Each job's line gives its own
    time, then the runner's."""
    import reproduce
    seen = []

    class Finished:   # a train.py job that has already ended
        def __init__(self, command, env, **kwargs):
            seen.append(env["OMP_NUM_THREADS"])
            self.pid, self.returncode = 0, 0

        def poll(self):
            return 0
    monkeypatch.setattr(reproduce.subprocess, "Popen", Finished)
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(reproduce.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    runs = [reproduce.Run("g", f"r{i}", 0, "sgd", [], tmp_path / "results" / "g" / f"r{i}-s0") for i in range(n_runs)]
    reproduce.execute(runs, jobs=jobs, deadline=None, grace=1, threads=asked, start=time.monotonic() - 500)
    assert seen == [str(threads)] * n_runs
    finished = [line for line in capsys.readouterr().out.splitlines() if line.endswith("since this runner started)")]
    assert [line.split(" (")[0] for line in finished] == [f"incomplete: g/r{i}-s0" for i in range(n_runs)]   # no final.json
    for line in finished:
        own, since_start = (float(x) for x in re.fullmatch(r".*\((\d+) s; (\d+) s since this runner started\)", line).groups())
        assert own < 5 and 500 <= since_start < 505


def test_reproduce_chooses_the_setting_by_its_rule(tmp_path, monkeypatch, capsys):
    """Among the candidates with all 3 seeds finished whose SGD train accuracy is within 2 points of the best, the
    largest SAM - SGD validation gain (seed means); a candidate with fewer seeds is listed, not chosen; a changed
    choice says the old claims folders are stale, and at the end of `select` (switch=False) or with --dry-run leaves
    the setting as it is."""
    import reproduce
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path)
    monkeypatch.setattr(reproduce, "CANDIDATES", {n: ["--subset", n] for n in ("a", "b", "c", "partial", "unrun")})
    # candidate: (SGD final train acc, SGD best val acc, SAM best val acc) per seed
    made = {"a": [(90, 70, 75)] * 3, "b": [(97, 60, 62), (98, 61, 61), (97.5, 62, 63)],
            "c": [(99, 70, 69), (99, 72, 70), (99, 71, 71)],
            "partial": [(100, 50, 60), (100, 52, 61)]}   # fits best and gains most, but 2 of 3 seeds
    for name, seeds in made.items():
        for seed, (train_acc, sgd_val, sam_val) in enumerate(seeds):
            for variant, val in (("sgd", sgd_val), ("sam", sam_val)):
                out = tmp_path / "select" / name / f"{variant}-s{seed}"
                out.mkdir(parents=True)
                (out / "final.json").write_text(json.dumps({"best_val_acc": val}))
                fit = train_acc if variant == "sgd" else 100 - train_acc   # the rule reads SGD's fit, never SAM's
                (out / "epochs.csv").write_text(f"epoch,train_acc\n1,10\n2,{fit}\n")
    (tmp_path / "setting.json").write_text(json.dumps({"name": "c", "args": ["--subset", "c"]}))
    # the end of `select` keeps the setting the claims ran in and says what the rule picks now (its runs are finished
    # here: execute stands in for them)
    for name, stub in (("decode_once", lambda data_dir: None), ("stop_on_signals", lambda: None),
                       ("cost", lambda run: 0.0), ("execute", lambda *args: dict(failed=0, stale=0))):
        monkeypatch.setattr(reproduce, name, stub)
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    assert reproduce.main(["select"]) == 0
    assert json.loads((tmp_path / "setting.json").read_text()) == {"name": "c", "args": ["--subset", "c"]}
    assert "the rule now picks b; the setting stays c" in capsys.readouterr().out
    assert reproduce.main(["choose", "--dry-run"]) == 0   # says what `choose` would do, writes nothing
    assert json.loads((tmp_path / "setting.json").read_text()) == {"name": "c", "args": ["--subset", "c"]}
    assert "stays c; `reproduce.py choose` would switch it to b" in capsys.readouterr().out
    setting = reproduce.choose()
    # a has the largest gain (+5) but SGD fits only 90% there; b (+1, train 97.5) beats c (-1, train 99)
    assert setting["name"] == "b" and setting["args"] == ["--subset", "b"] and set(setting["candidates"]) == set(made)
    assert setting["candidates"]["b"]["gain"] == pytest.approx(1.0) and setting["candidates"]["b"]["seeds"] == 3
    assert setting["candidates"]["partial"]["gain"] == pytest.approx(9.5) and setting["candidates"]["partial"]["seeds"] == 2
    assert json.loads((tmp_path / "setting.json").read_text())["name"] == "b"
    out = capsys.readouterr().out
    assert "the setting changes from c to b" in out and "2 seeds (of 3: not yet eligible)" in out
    for name in ("a", "b", "c"):   # with no candidate complete, nothing is chosen and setting.json stays
        shutil.rmtree(tmp_path / "select" / name / "sam-s2")
    with pytest.raises(SystemExit, match="no candidate has all 3 seeds"):
        reproduce.choose()
    assert json.loads((tmp_path / "setting.json").read_text())["name"] == "b"


def test_reproduce_rule_takes_a_candidate_exactly_at_the_fit_margin():
    import reproduce
    table = {name: dict(sgd_train_acc=fit, gain=gain, seeds=3) for name, fit, gain in
             (("best", 99.0, 0.0), ("edge", 99.0 - reproduce.FIT_MARGIN, 1.0), ("beyond", 98.9 - reproduce.FIT_MARGIN, 5.0))}
    assert reproduce.FIT_MARGIN == 2.0 and reproduce.rule_choice(table) == "edge"


def test_reproduce_rule_reads_every_finished_seed_and_counts_the_fewer_optimizer(tmp_path, monkeypatch):
    """A candidate with more seeds (SELECT_SEEDS) is read over every one finished, for both optimizers; its seed count
    is the fewer of SGD's and SAM's finished runs, so three SGD seeds beside two of SAM's are not yet eligible, however
    large their gain."""
    import reproduce
    monkeypatch.setattr(reproduce, "CANDIDATES", {n: ["--subset", n] for n in ("five", "lopsided")})
    monkeypatch.setattr(reproduce, "SELECT_SEEDS", {"five": (0, 1, 2, 3, 4)})
    # candidate: optimizer: (final train acc, best val acc) per seed
    made = {"five": {"sgd": [(95, 60), (96, 61), (97, 62), (98, 70), (99, 71)],
                     "sam": [(50, 63), (50, 64), (50, 65), (50, 66), (50, 80)]},
            "lopsided": {"sgd": [(99, 50)] * 3, "sam": [(50, 70)] * 2}}
    for name, optimizers in made.items():
        for variant, seeds in optimizers.items():
            for seed, (train_acc, val) in enumerate(seeds):
                out = tmp_path / "select" / name / f"{variant}-s{seed}"
                out.mkdir(parents=True)
                (out / "final.json").write_text(json.dumps({"best_val_acc": val}))
                (out / "epochs.csv").write_text(f"epoch,train_acc\n1,10\n2,{train_acc}\n")
    table = reproduce.candidate_table(tmp_path)
    five = made["five"]
    sgd_val, sam_val = (np.mean([v for _, v in five[o]]) for o in ("sgd", "sam"))   # 64.8 and 67.6: every seed
    assert table["five"]["seeds"] == 5 and table["five"]["sgd_train_acc"] == pytest.approx(97.0)
    assert (table["five"]["sgd_val_acc"], table["five"]["sam_val_acc"]) == pytest.approx((sgd_val, sam_val))
    assert table["five"]["gain"] == pytest.approx(sam_val - sgd_val) and sam_val - sgd_val == pytest.approx(2.8)
    assert table["lopsided"]["seeds"] == 2 and table["lopsided"]["gain"] == pytest.approx(20.0)
    assert reproduce.rule_choice(table) == "five"   # lopsided fits best and gains most, on 2 SAM seeds


def test_reproduce_leaves_a_folder_made_with_other_settings_alone(tmp_path, monkeypatch, capsys):
    """A finished folder counts as its row's result only if it was run with what the row's command gives now:
    a new setting (another --lr) or a changed preset (sam_flags) makes it stale: reported, not run, not touched."""
    import reproduce
    monkeypatch.setattr(reproduce, "launch", None)   # nothing may be launched
    out = tmp_path / "results" / "g" / "r-s0"
    out.mkdir(parents=True)
    args = _tiny_run(tmp_path, "--variant", "sam", "--lr", "0.1", "--out", str(out))
    config = train.run_config(train.parse_settings(args), args, torch.device("cpu"), 1, None)
    (out / "config.json").write_text(json.dumps(config))
    (out / "final.json").write_text("{}")
    run = lambda *extra: reproduce.Run("g", "r", 0, "sam", args + list(extra), out)
    assert reproduce.execute([run()], jobs=1, deadline=None, grace=1)["skipped"] == 1
    # what it records of the machine and the launch is not the experiment: run at another commit, with another torch,
    # on 2 GPUs (channels_last), from another copy of the data, it is still the row's result
    launched_elsewhere = dict(config, torch="0.0.1", git_commit="0" * 40, world_size=2, channels_last=True,
                              data_fingerprint="another copy", command="torchrun --nproc_per_node 2 train.py",
                              device="NVIDIA H100 80GB HBM3")
    assert all(launched_elsewhere[k] != config[k] for k in ("torch", "git_commit", "world_size", "channels_last"))
    (out / "config.json").write_text(json.dumps(launched_elsewhere))
    assert reproduce.execute([run()], jobs=1, deadline=None, grace=1) == \
        dict(done=0, diverged=0, incomplete=0, failed=0, skipped=1, stale=0)
    (out / "config.json").write_text(json.dumps(config))

    counts = reproduce.execute([run("--lr", "0.05")], jobs=1, deadline=None, grace=1)
    assert counts["stale"] == 1 and counts["skipped"] == 0
    assert "g/r-s0 was run with other settings (lr 0.1 -> 0.05)" in capsys.readouterr().out

    config["sam_flags"]["rho"] = 0.5   # the preset's radius when the folder was made, 0.05 now
    (out / "config.json").write_text(json.dumps(config))
    assert reproduce.execute([run()], jobs=1, deadline=None, grace=1)["stale"] == 1
    assert "rho': 0.5" in capsys.readouterr().out and sorted(p.name for p in out.iterdir()) == ["config.json", "final.json"]


def test_reproduce_stopped_by_sigterm_stops_its_jobs_with_a_checkpoint(tmp_path, monkeypatch):
    """The jobs run in their own sessions: a runner ended by its session (SIGTERM) or Ctrl-C must stop them
    itself, or they run on as orphans with their logs outside their folders."""
    import threading
    import reproduce
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    out = tmp_path / "results" / "g" / "long-s0"
    run = reproduce.Run("g", "long", 0, "sgd", _tiny_run(tmp_path, "--epochs", "1000", "--out", str(out)), out)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    reproduce.stop_on_signals()   # as reproduce.main does
    timer = threading.Timer(12, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            reproduce.execute([run], jobs=1, deadline=None, grace=8)
    finally:
        timer.cancel()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert [pid for pid in _pids() if str(out).encode() in _cmdline(pid)] == []
    assert reproduce.decision(out) == "resume" and "stopped at step" in (out / "train.log").read_text()
    assert not (out.parent / "long-s0.log").exists()


def test_reproduce_stops_on_sigint_also_when_started_in_the_background():
    """A runner started with `nohup ... &` inherits SIGINT ignored; `kill -INT` must still stop it like Ctrl-C."""
    import reproduce
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        reproduce.stop_on_signals()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
                pytest.fail(f"signal {signum} was ignored")   # the handler raises before this line runs
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_reproduce_cost_is_sgd_equivalent_images_and_the_dry_run_prints_it(tmp_path, monkeypatch, capsys):
    """cost(run): per epoch, 90% of the pool (the rest is the 10% validation share) times the variant's passes
    per image (SGD 1, SGDHESS 3, LookSAM 1.1, ImbSAM 2.5, any other SAM 2), plus the validation images and the 10,000
    test images at a third of a training image each; the pool is --subset, else 50,000, and at most 20,400 (the
    long-tailed CIFAR-10) with --imbalance. Worked by hand, then the dry run's per-group and total figures."""
    import reproduce

    def run(variant, *args):
        return reproduce.Run("g", variant, 0, variant, list(args), tmp_path)
    by_hand = [   # (run, per epoch: training images x passes + (val + test) / 3, epochs)
        (run("sam", "--subset", "10000", "--epochs", "20"), 9000 * 2 + (1000 + 10000) / 3, 20),            # 433,333.3
        (run("sgd", "--imbalance", "10", "--epochs", "3"), 18360 * 1 + (2040 + 10000) / 3, 3),             # 67,120
        (run("imbsam", "--imbalance", "10", "--subset", "2500", "--epochs", "100"), 2250 * 2.5 + (250 + 10000) / 3, 100),
        (run("sgdhess", "--epochs", "2"), 45000 * 3 + (5000 + 10000) / 3, 2),                               # 280,000
        (run("looksam", "--subset", "30000", "--imbalance", "10", "--epochs", "1"), 18360 * 1.1 + (2040 + 10000) / 3, 1),
        (run("sgdhess-exact", "--subset", "9", "--epochs", "7", "--subset", "600"), 540 * 3 + (60 + 10000) / 3, 7),
    ]
    for r, per_epoch, epochs in by_hand:
        assert reproduce.cost(r) == pytest.approx(per_epoch * epochs, rel=1e-12), r.args
    assert [round(reproduce.cost(r)) for r, _, _ in by_hand[:4]] == [433333, 67120, 904167, 280000]

    # the dry run prints each group's sum and the total, in millions
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "setting.json").write_text(json.dumps({"name": "x", "args": ["--model", "cnn", "--epochs", "300"]}))
    monkeypatch.setattr(reproduce, "claims", lambda setting: [
        reproduce.Group("g1", "c", [reproduce.Row("sam", "sam", ["--subset", "10000"], (0, 1))]),
        reproduce.Group("g2", "c", [reproduce.Row("sgd", "sgd", ["--imbalance", "10"], (0,)),
                                    reproduce.Row("imbsam", "imbsam", ["--imbalance", "10", "--subset", "2500"], (0,))])])
    assert reproduce.main(["claims", "--dry-run"]) == 0
    g1 = 2 * (9000 * 2 + (1000 + 10000) / 3) * 300                                        # 13,000,000
    g2 = (18360 + (2040 + 10000) / 3) * 300 + (2250 * 2.5 + (250 + 10000) / 3) * 300      # 6,712,000 + 2,712,500
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["g1: 2 runs, 13.0 M SGD-equivalent images", "g2: 2 runs, 9.4 M SGD-equivalent images",
                         "all: 4 runs, 22.4 M SGD-equivalent images"]
    assert (f"{g1 / 1e6:.1f}", f"{g2 / 1e6:.1f}", f"{(g1 + g2) / 1e6:.1f}") == ("13.0", "9.4", "22.4")
    assert "to run: 4 runs, at most 22.4 M SGD-equivalent images (a resumed or measured run counted whole)" in lines
    # what is left to run leaves out a finished run: g1's seed 0, made with its row's command
    args = shlex.split(next(line for line in lines if "results/g1/sam-s0" in line).split(" train.py ", 1)[1])
    done = tmp_path / "results" / "g1" / "sam-s0"
    done.mkdir(parents=True)
    (done / "config.json").write_text(json.dumps(train.run_config(train.parse_settings(args), args,
                                                                  torch.device("cpu"), 1, None)))
    (done / "final.json").write_text(json.dumps({"sharpness": None}))
    assert reproduce.main(["claims", "--dry-run"]) == 0
    left = (g1 / 2 + g2) / 1e6                                                             # 15.9
    assert f"to run: 3 runs, at most {left:.1f} M SGD-equivalent images (a resumed or measured run counted whole)" \
        in capsys.readouterr().out.splitlines() and f"{left:.1f}" == "15.9"


def _fake_launch(launched):
    """reproduce.launch that records (folder, action) and runs nothing: a job that has already ended with 0."""
    class Ended:
        pid, returncode = 0, 0

        def poll(self):
            return 0

    def launch(run, action, threads):
        launched.append((run.out.name, action))
        return Ended(), open(run.out.parent / f"{run.out.name}.log", "a")   # finish() files the log, as after a job
    return launch


def _one_row_claims(tmp_path, monkeypatch):
    """reproduce.main's claims in tmp_path: one group g of one row r (seed 0), no decoding, pytest's signal handlers."""
    import reproduce
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "decode_once", lambda data_dir: None)
    monkeypatch.setattr(reproduce, "stop_on_signals", lambda: None)   # leave pytest's signal handlers alone
    (tmp_path / "results" / "g").mkdir(parents=True)
    setting = {"name": "x", "args": ["--model", "cnn", "--epochs", "3"]}
    (tmp_path / "results" / "setting.json").write_text(json.dumps(setting))
    groups = [reproduce.Group("g", "c", [reproduce.Row("r", "sgd", [], (0,))])]
    monkeypatch.setattr(reproduce, "claims", lambda setting: groups)
    return reproduce


def test_reproduce_refuses_seeds_that_are_not_integers_or_no_row_has(tmp_path, monkeypatch, capsys):
    """--seeds a, --seeds 0,,1 and --seeds 9 (no chosen row has seed 9) get a usage error naming the value (exit 2),
    not a traceback nor a run of nothing that exits 0; --seeds 0 picks the row's seed 0."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)
    for seeds, words in (("a", "--seeds 'a'"), ("0,,1", "--seeds '0,,1'"), ("9", "no row chosen has seeds [9]")):
        with pytest.raises(SystemExit) as exit:
            reproduce.main(["claims", "--dry-run", "--seeds", seeds])
        assert exit.value.code == 2 and words in capsys.readouterr().err, seeds
    assert reproduce.main(["claims", "--dry-run", "--seeds", "0"]) == 0
    assert "to run: 1 runs" in capsys.readouterr().out
    assert reproduce.main(["claims", "--dry-run", "--seeds", "9,0"]) == 0   # seeds a chosen row has, beside others
    assert "to run: 1 runs" in capsys.readouterr().out


def test_reproduce_leaves_a_folder_with_an_unreadable_final_json_alone(tmp_path, monkeypatch, capsys):
    """A run folder whose final.json cannot be read (cut, or not an object) is reported and left byte for byte as it
    is, the runner exits non-zero: not a traceback that stops every other run."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)
    launched = []
    monkeypatch.setattr(reproduce, "launch", _fake_launch(launched))
    folder = tmp_path / "results" / "g" / "r-s0"
    folder.mkdir()
    run, = reproduce.runs_of(reproduce.claims(None), ["--model", "cnn", "--epochs", "3"], reproduce.DATA_DIR, "auto")
    config = json.dumps(train.run_config(train.parse_settings(run.args), run.args, torch.device("cpu"), 1, None))
    for files in (["final.json"], ["config.json", "final.json"]):   # also beside the config.json its command gives
        if "config.json" in files:
            (folder / "config.json").write_text(config)
        for text in ('{"best_val_acc": 5', "[1]"):
            (folder / "final.json").write_text(text)
            assert reproduce.main(["claims"]) == 1
            printed = capsys.readouterr().out
            assert "g/r-s0 was run with other settings (final.json unreadable)" in printed and "stale 1" in printed and not launched
            assert (folder / "final.json").read_text() == text and sorted(os.listdir(folder)) == files


def test_reproduce_reports_an_unfinished_folder_made_with_other_settings_as_stale(tmp_path, monkeypatch, capsys):
    """A cut folder (config.json and last.pt: the runner would resume it) whose config.json holds another setting
    than its row's command is stale like a finished one: reported, not resumed, left byte for byte as it is, and the
    runner exits non-zero. The same folder made with the command's settings is resumed."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)
    launched = []
    monkeypatch.setattr(reproduce, "launch", _fake_launch(launched))
    run, = reproduce.runs_of(reproduce.claims(None), ["--model", "cnn", "--epochs", "3"], reproduce.DATA_DIR, "auto")
    assert reproduce.value(run.args, "--lr") == "0.1"

    def config(args):
        return json.dumps(train.run_config(train.parse_settings(args), args, torch.device("cpu"), 1, None))
    out = run.out
    out.mkdir(parents=True)
    other = reproduce.last_wins(run.args + ["--lr", "0.05"])   # the command with another --lr
    files = {"config.json": config(other).encode(), "last.pt": bytes(range(256)) * 4,
             "steps.csv": b"step,loss\n0,2.3\n1,2.2\n"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    assert reproduce.decision(out) == "resume" and reproduce.value(other, "--lr") == "0.05"
    assert reproduce.main(["claims"]) == 1
    printed = capsys.readouterr().out
    assert "stale: g/r-s0 was run with other settings (lr 0.05 -> 0.1)" in printed and "stale 1" in printed
    assert launched == [] and {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert sorted(p.name for p in out.parent.iterdir()) == ["r-s0"]   # no log beside it either

    # control: the folder made with the command's settings is resumed (so the refusal above is the setting's)
    (out / "config.json").write_text(config(run.args))
    assert reproduce.main(["claims"]) == 0
    assert launched == [("r-s0", "resume")] and "stale 0" in capsys.readouterr().out
    # an --override the sgd row never reads (--rho) makes the folder stale; only its run, launched, would warn of it
    assert reproduce.main(["claims", "--override", "--rho 0.1"]) == 1
    printed, err = capsys.readouterr()
    assert "stale: g/r-s0 was run with other settings (rho None -> 0.1" in printed and "does nothing here" not in err


def test_reproduce_counts_a_diverged_folder_with_other_sharpness_settings_as_diverged(tmp_path, monkeypatch, capsys):
    """A diverged run measured no sharpness, so its sharpness settings may differ from its row's (a row edited to
    measure on more batches) as an unfinished run's may: counted diverged, exit 0. Another training setting (--lr)
    makes the same folder stale, exit 1. Nothing is launched and the folder is left as it is."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)
    row = reproduce.Row("r", "sgd", ["--sharpness", "--sharpness-batches", "4"], (0,))
    monkeypatch.setattr(reproduce, "claims", lambda setting: [reproduce.Group("g", "c", [row])])
    launched = []
    monkeypatch.setattr(reproduce, "launch", _fake_launch(launched))
    run, = reproduce.runs_of(reproduce.claims(None), ["--model", "cnn", "--epochs", "3"], reproduce.DATA_DIR, "auto")
    assert train.parse_settings(run.args).sharpness_batches == 4
    run.out.mkdir(parents=True)
    (run.out / "diverged.txt").write_text("train.py: the training loss is nan at step 7; stopping\n")
    for other, code, verdict in ((["--sharpness-batches", "2"], 0, "diverged 1"), (["--lr", "0.05"], 1, "stale 1")):
        args = reproduce.last_wins(run.args + other)
        config = json.dumps(train.run_config(train.parse_settings(args), args, torch.device("cpu"), 1, None))
        (run.out / "config.json").write_text(config)
        assert reproduce.main(["claims"]) == code, other
        assert verdict in capsys.readouterr().out and launched == []
        assert sorted(os.listdir(run.out)) == ["config.json", "diverged.txt"]


def test_a_cut_setting_json_is_named_not_a_traceback(tmp_path, monkeypatch, capsys):
    """results/setting.json cut by a crash or an editor (or holding no setting): claims, choose and plots.py stop with
    a message naming the file and the way back, not a JSONDecodeError or KeyError traceback; the file is left as is."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)
    path = tmp_path / "results" / "setting.json"
    for text in ('{"name": "x", "ar', '{"name": "x"}', "[]"):
        path.write_text(text)
        for call in (lambda: reproduce.main(["claims", "--dry-run"]), lambda: plots.claim_rows(str(path.parent), [])):
            with pytest.raises(SystemExit) as exit:
                call()
            assert str(path) in str(exit.value.code) and "reproduce.py choose" in str(exit.value.code), text
        assert path.read_text() == text


def test_reproduce_exits_non_zero_when_a_job_fails(tmp_path, monkeypatch, capsys):
    """A job that ends with an error (not a signal, not a divergence) is failed, and the runner exits with 1; one that
    ends with 0 before its final.json (cut) is incomplete, to resume, and the runner exits with 0. A runner interrupted
    (Ctrl-C, or SIGTERM through stop_on_signals) exits with 130, as train.py does."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)
    launched, code = [], {}
    ended = _fake_launch(launched)

    def launch(run, action, threads):
        proc, log = ended(run, action, threads)
        proc.returncode = code["rc"]
        return proc, log
    monkeypatch.setattr(reproduce, "launch", launch)
    for rc, outcome, exit_code in ((1, "failed", 1), (0, "incomplete", 0)):
        code["rc"] = rc
        assert reproduce.main(["claims"]) == exit_code
        printed = capsys.readouterr().out
        assert f"{outcome}: g/r-s0 (" in printed and f"{outcome} 1" in printed.splitlines()[-1]
    assert launched == [("r-s0", "start")] * 2

    def interrupted(run, action, threads):
        raise KeyboardInterrupt
    monkeypatch.setattr(reproduce, "launch", interrupted)
    assert reproduce.main(["claims"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_reproduce_deadline_counts_the_decoding_before_the_jobs(tmp_path, monkeypatch, capsys):
    """--deadline counts from the runner's start, the decoding of the images included: a decoding that ends after
    deadline - grace leaves every job unstarted (incomplete); the same call with a quick decoding launches it."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)
    launched = []
    monkeypatch.setattr(reproduce, "launch", _fake_launch(launched))
    deadline, grace = 2.0, 1.0
    for decoding, started in ((deadline - grace + 0.3, []), (0.0, [("r-s0", "start")])):
        monkeypatch.setattr(reproduce, "decode_once", lambda data_dir: time.sleep(decoding))
        assert reproduce.main(["claims", "--deadline", str(deadline), "--grace", str(grace)]) == 0
        assert launched == started and "incomplete 1" in capsys.readouterr().out.splitlines()[-1]


FAKE_TRAIN_RECORDS = r'''
import os, sys
from pathlib import Path
with open(Path(__file__).parent / "launched.txt", "a") as f:   # a job that ends at once, its folder as it was
    f.write(os.environ["OMP_NUM_THREADS"] + " " + " ".join(sys.argv[1:]) + "\n")
'''


def test_reproduce_launches_each_folder_with_the_flags_of_its_state(tmp_path, monkeypatch, capsys):
    """Each folder state gets its train.py flags: none for a new run, --overwrite for a start that left only config.json
    (even one made with other settings: it holds no result), --resume for a cut run (one made before its row asked for
    the sharpness too) and for a finished run without the sharpness its row asks for; a finished, measured run is
    skipped. The dry run prints each command with its action, and launches nothing. A job that ends without finishing
    what it was launched for (no final.json, or still no sharpness) is incomplete, not done. A variant this sam.py
    lacks is left out with a note."""
    import reproduce
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)   # launch runs ROOT/train.py: the fake above
    (tmp_path / "train.py").write_text(FAKE_TRAIN_RECORDS)
    sharp = ["--sharpness", "--sharpness-batches", "2", "--sharpness-iters", "5"]

    def args(out, *extra):
        return ["--variant", "sgd", "--model", "cnn", "--epochs", "3", "--data-dir", "nowhere", "--device", "cpu",
                *extra, "--out", str(out)]

    def config(argv):
        return json.dumps(train.run_config(train.parse_settings(argv), argv, torch.device("cpu"), 1, None))
    names = ("new", "crashed", "cut", "unmeasured", "measured")
    outs = {name: tmp_path / "results" / "g" / f"{name}-s0" for name in names}
    saved = {"crashed": (args(outs["crashed"], "--lr", "0.05"), []), "cut": (args(outs["cut"]), ["last.pt"]),
             "unmeasured": (args(outs["unmeasured"]), ["final.json"]), "measured": (args(outs["measured"], *sharp),
                                                                                    ["final.json"])}
    for name, (argv, files) in saved.items():   # config.json as train.py wrote it, for the command given here
        outs[name].mkdir(parents=True)
        (outs[name] / "config.json").write_text(config(argv))
        for file in files:
            (outs[name] / file).write_text(json.dumps({"best_val_acc": 50.0, "sharpness": (
                dict(lambda_max=1.0) if name == "measured" else None)}))
    runs = [reproduce.Run("g", name, 0, "sgd", args(out, *sharp), out) for name, out in outs.items()]
    runs.append(reproduce.Run("g", "odd", 0, "no-such-preset", ["--variant", "no-such-preset"], tmp_path / "odd-s0"))
    before = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    wanted = {"new": "start", "crashed": "overwrite", "cut": "resume", "unmeasured": "measure"}
    flags = {"start": [], "overwrite": ["--overwrite"], "resume": ["--resume"], "measure": ["--resume"]}

    counts = reproduce.execute(runs, jobs=2, deadline=None, grace=1, dry_run=True)
    assert counts == dict(done=0, diverged=0, incomplete=0, failed=0, skipped=1, stale=0)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "note: variant 'no-such-preset' is not in this sam.py; left out: g/odd-s0"
    commands = [re.fullmatch(r"\[(\w+)\] python train\.py (.*)", line).groups() for line in printed[1:-1]]
    assert printed[-1].startswith(f"to run: {len(wanted)} runs, at most ")
    assert [(action, shlex.split(command)) for action, command in commands] == \
        [(wanted[run.label], run.args) for run in runs if run.label in wanted]
    assert not (tmp_path / "launched.txt").exists()

    counts = reproduce.execute(runs, jobs=2, deadline=None, grace=1, threads=3)
    assert counts == dict(done=0, diverged=0, incomplete=4, failed=0, skipped=1, stale=0)
    launched = sorted(line.split() for line in (tmp_path / "launched.txt").read_text().splitlines())
    assert launched == sorted(["3", *run.args, *flags[wanted[run.label]]] for run in runs if run.label in wanted)
    assert {p: p.read_bytes() for p in before} == before   # the fake job changed nothing


FAKE_TRAIN_DIVERGES = r'''
import shutil, sys
from pathlib import Path
here = Path(__file__).parent
with open(here / "launched.txt", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
out = Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
shutil.copy(here / "config.json", out / "config.json")
(out / "last.pt").write_bytes(b"a checkpoint before the blow-up")
print("epoch 1 ...", flush=True)
sys.exit(f"train.py: the training loss is nan at step 7; stopping ({out / 'last.pt'} holds the last good state; "
         "lower --lr or --rho?)")
'''


def test_reproduce_never_reruns_a_diverged_run(tmp_path, monkeypatch):
    """A job that stops with train.py's divergence message is a result: counted as diverged, its last line kept in
    diverged.txt. The next call leaves that folder alone (it holds last.pt, so it would otherwise be resumed, and
    diverge again): nothing launched, the folder byte for byte as it was, counted as diverged in every call."""
    import reproduce
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)   # launch runs ROOT/train.py: the fake above
    (tmp_path / "train.py").write_text(FAKE_TRAIN_DIVERGES)
    out = tmp_path / "results" / "g" / "r-s0"
    args = ["--model", "cnn", "--epochs", "3", "--lr", "1e30", "--data-dir", "nowhere", "--device", "cpu", "--out", str(out)]
    (tmp_path / "config.json").write_text(json.dumps(train.run_config(train.parse_settings(args), args, torch.device("cpu"), 1, None)))
    run = reproduce.Run("g", "r", 0, "sgd", args, out)

    counts = reproduce.execute([run], jobs=1, deadline=None, grace=1)
    assert counts == dict(done=0, diverged=1, incomplete=0, failed=0, skipped=0, stale=0)
    assert (out / "diverged.txt").read_text() == \
        f"train.py: the training loss is nan at step 7; stopping ({out / 'last.pt'} holds the last good state; lower --lr or --rho?)\n"
    assert "epoch 1 ..." in (out / "train.log").read_text()
    assert len((tmp_path / "launched.txt").read_text().splitlines()) == 1
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"config.json", "last.pt", "diverged.txt", "train.log"}
    assert not reproduce.stale(run, end_open=True)   # not stale: only diverged.txt keeps it from being resumed

    assert reproduce.decision(out) == "diverged"
    for _ in range(2):
        counts = reproduce.execute([run], jobs=1, deadline=None, grace=1)
        assert counts == dict(done=0, diverged=1, incomplete=0, failed=0, skipped=0, stale=0)
    assert len((tmp_path / "launched.txt").read_text().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


FAKE_TRAIN_STOPS = r'''
import os, signal, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
log = open(os.path.join(out, "events.txt"), "a", buffering=1)
asked = []
def on_sigint(signum, frame):
    asked.append(time.time())
    log.write(f"sigint {time.time()!r}\n")
signal.signal(signal.SIGINT, on_sigint)
log.write(f"ready {time.time()!r}\n")
end = time.time() + 20   # never outlives a failed test by long
while time.time() < end:
    time.sleep(0.05)
    if asked:
        log.write(f"alive {time.time()!r}\n")
        if "patient" in out and time.time() > asked[0] + 0.3:   # train.py: checkpoint, then exit
            log.write("checkpointed\n")
            sys.exit(0)
'''


def test_reproduce_deadline_asks_jobs_to_stop_grace_seconds_early_then_kills(tmp_path, monkeypatch):
    """--deadline D --grace G: at D - G every job gets SIGINT (train.py checkpoints and exits), and what still runs
    G seconds later gets SIGKILL, so that the runner ends by D; jobs not started count as incomplete."""
    import reproduce
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    (tmp_path / "train.py").write_text(FAKE_TRAIN_STOPS)
    runs = [reproduce.Run("g", name, 0, "sgd", ["--epochs", "1", "--out", str(tmp_path / "results" / "g" / f"{name}-s0")],
                          tmp_path / "results" / "g" / f"{name}-s0") for name in ("patient", "stubborn", "queued")]
    deadline, grace = 3.0, 1.5
    began = time.time()
    counts = reproduce.execute(runs, jobs=2, deadline=deadline, grace=grace, start=time.monotonic())
    ended = time.time() - began
    assert counts == dict(done=0, diverged=0, incomplete=3, failed=0, skipped=0, stale=0)
    assert not runs[2].out.exists()
    events = {}
    for run in runs[:2]:
        for line in (run.out / "events.txt").read_text().splitlines():
            word, *at = line.split()
            events.setdefault((run.label, word), []).extend(float(t) - began for t in at)
    for label in ("patient", "stubborn"):
        sigint, = events.get((label, "sigint"), ["none: killed at once?"])   # one, at deadline - grace (looked at every 0.2 s)
        assert deadline - grace <= sigint < deadline - grace + 1.0, (label, sigint)
    assert ("patient", "checkpointed") in events   # given the time to checkpoint, not killed at once
    stubborn_sigint, = events["stubborn", "sigint"]
    # SIGKILL only after the grace: the stubborn job was still running grace seconds after its SIGINT, not later
    assert max(events["stubborn", "alive"]) >= stubborn_sigint + grace - 0.25
    assert ("stubborn", "checkpointed") not in events and deadline - 0.2 <= ended < deadline + 1.5   # killed by then
    assert [pid for pid in _pids() if str(tmp_path).encode() in _cmdline(pid)] == []   # both ended


def test_reproduce_a_second_ctrl_c_kills_the_jobs_the_runner_waits_for(tmp_path, monkeypatch):
    """Stopping (a Ctrl-C, the deadline), the runner gives its jobs grace seconds to checkpoint after their SIGINT; a
    second Ctrl-C meanwhile SIGKILLs them at once, and it returns only once they have ended."""
    import threading
    import reproduce
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    (tmp_path / "train.py").write_text(FAKE_TRAIN_STOPS)   # "stubborn": never ends on a SIGINT (for 20 s)
    out = tmp_path / "results" / "g" / "stubborn-s0"
    run = reproduce.Run("g", "stubborn", 0, "sgd", ["--out", str(out)], out)
    proc, log = reproduce.launch(run, "start", 1)
    end = time.monotonic() + 10
    while not ((out / "events.txt").exists() and "ready" in (out / "events.txt").read_text()) and time.monotonic() < end:
        time.sleep(0.05)   # its SIGINT handler is set
    previous = signal.signal(signal.SIGINT, reproduce._interrupt)   # as stop_on_signals sets it
    second = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    began = time.monotonic()
    second.start()
    try:
        reproduce.stop_jobs([(run, proc, log)], grace=30)
        stopped = time.monotonic() - began
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C left stop_jobs before its job ended")
    finally:
        second.cancel()
        signal.signal(signal.SIGINT, previous)
        log.close()
        reproduce.signal_job(proc, signal.SIGKILL)
        proc.wait()
    assert "sigint" in (out / "events.txt").read_text()   # asked first
    assert proc.returncode == -signal.SIGKILL and 1.0 <= stopped < 5.0   # killed at the second Ctrl-C, not at 30 s


def test_reproduce_counts_a_job_the_deadline_stops_before_train_py_handles_sigint_as_incomplete(tmp_path, monkeypatch):
    """A job that the deadline's SIGINT reaches before train.py catches it (a job still importing) ends by the signal,
    returncode -SIGINT: stopped, to start again (incomplete), not failed."""
    import reproduce
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    (tmp_path / "train.py").write_text("import time\ntime.sleep(20)\n")   # Python's own SIGINT handling: it ends
    out = tmp_path / "results" / "g" / "r-s0"
    run = reproduce.Run("g", "r", 0, "sgd", ["--out", str(out)], out)
    counts = reproduce.execute([run], jobs=1, deadline=1.0, grace=0.5)
    assert counts == dict(done=0, diverged=0, incomplete=1, failed=0, skipped=0, stale=0)


def test_reproduce_counts_each_run_the_deadline_leaves_unstarted_as_incomplete(tmp_path, monkeypatch, capsys):
    """Past deadline - grace before a job is launched, the runner starts none and counts each queued run incomplete
    (to start next call), not one for the whole queue; with 5 s left it launches them all, in order."""
    import reproduce
    launched = []
    monkeypatch.setattr(reproduce, "launch", _fake_launch(launched))
    runs = [reproduce.Run("g", f"r{i}", 0, "sgd", [], tmp_path / "results" / "g" / f"r{i}-s0") for i in range(3)]
    runs[0].out.parent.mkdir(parents=True)
    deadline, grace = 10.0, 1.0
    counts = reproduce.execute(runs, jobs=1, deadline=deadline, grace=grace, start=time.monotonic() - (deadline - grace + 0.5))
    assert launched == [] and counts == dict(done=0, diverged=0, incomplete=len(runs), failed=0, skipped=0, stale=0)
    assert f"deadline: stopping 0 jobs, {len(runs)} not started" in capsys.readouterr().out
    counts = reproduce.execute(runs, jobs=1, deadline=deadline, grace=grace, start=time.monotonic() - (deadline - grace - 5))
    assert launched == [(run.out.name, "start") for run in runs] and counts["incomplete"] == len(runs)   # ended, no final.json


def test_reproduce_stopping_gives_every_job_one_grace_together(tmp_path, monkeypatch):
    """stop_jobs' grace is one span for all its jobs, not one each in turn: two jobs that ignore their SIGINT are both
    killed grace seconds after it, so that the runner ends by its deadline however many jobs it stops."""
    import reproduce
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    (tmp_path / "train.py").write_text(FAKE_TRAIN_STOPS)   # "stubborn": never ends on a SIGINT (for 20 s)
    jobs = []
    for name in ("stubborn", "stubborn2"):
        out = tmp_path / "results" / "g" / f"{name}-s0"
        run = reproduce.Run("g", name, 0, "sgd", ["--out", str(out)], out)
        jobs.append((run, *reproduce.launch(run, "start", 1)))
    end = time.monotonic() + 10
    while time.monotonic() < end and not all(
            (run.out / "events.txt").exists() and "ready" in (run.out / "events.txt").read_text() for run, _, _ in jobs):
        time.sleep(0.05)   # their SIGINT handlers are set
    grace = 1.5
    began = time.monotonic()
    try:
        reproduce.stop_jobs(jobs, grace)
        stopped = time.monotonic() - began
    finally:
        for run, proc, log in jobs:
            log.close()
            reproduce.signal_job(proc, signal.SIGKILL)
            proc.wait()
    assert all("sigint" in (run.out / "events.txt").read_text() for run, _, _ in jobs)
    assert [proc.returncode for _, proc, _ in jobs] == [-signal.SIGKILL] * 2
    assert grace <= stopped < 1.8 * grace, stopped   # one grace for both; one each in turn is 2 x 1.5 s


def test_reproduce_pack_into_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    """`pack DIR/x.tar.gz` with no DIR: the reason and exit 2, not a traceback."""
    import reproduce
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["pack", str(tmp_path / "missing" / "x.tar.gz")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("override, message", [("--epochs x", "argument --epochs: invalid int value: 'x'"),
                                               ("--data-dir 'my data", "No closing quotation"),
                                               ("--gamma 0.5", "the schedule is cosine)\nreproduce.py: the --override "
                                                "above is refused in row select/a/sgd"),
                                               ("--sync-ascent --epochs 1", "--sync-ascent does nothing here: one process")])
def test_reproduce_a_bad_override_is_a_usage_error_not_a_traceback(tmp_path, monkeypatch, capsys, override, message):
    """An --override train.py would refuse, or one no shell could split, ends the call with the reason (exit 2)
    before a cost is estimated or a folder read; it is judged in every row (multistep reads --gamma, the next row's
    cosine does not), each run as launched, on one process."""
    import reproduce
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "CANDIDATES", {"m": ["--model", "cnn", "--schedule", "multistep"],
                                                  "a": ["--model", "cnn", "--epochs", "3"]})
    monkeypatch.setattr(reproduce, "SELECT_SEEDS", {})
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["select", "--dry-run", "--override", override])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_reproduce_reads_a_rows_settings_without_repeating_trains_warning(tmp_path, capsys):
    """A flag idle in a row (an --override --rho reaching the sgd baseline) is warned of by its run as it trains; the
    runner, which reads each run's settings again for each decision, repeated the warning every time."""
    import reproduce
    import train
    args = ["--variant", "sgd", "--rho", "0.1", "--out", str(tmp_path / "r")]
    train.parse_settings(args)
    assert "--rho does nothing here" in capsys.readouterr().err   # the warning the run itself gives
    assert reproduce.wants_sharpness(reproduce.Run("g", "sgd", 0, "sgd", args, tmp_path / "r")) is False
    assert capsys.readouterr().err == ""


def test_reproduce_select_dry_run_prints_the_commands_and_runs_decodes_and_chooses_nothing(tmp_path, monkeypatch, capsys):
    """`select --dry-run` prints each candidate's SGD and SAM commands, --override split as a shell splits it, and exits
    0: it decodes no images, neither chooses nor writes setting.json (a fresh results/ has nothing to choose from).
    An override idle in some rows (--rho in the sgd baseline's) is not warned of here: each such run says it."""
    import reproduce
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "CANDIDATES", {"a": ["--model", "cnn", "--epochs", "3"]})
    monkeypatch.setattr(reproduce, "SELECT_SEEDS", {})
    monkeypatch.setattr(reproduce, "decode_once", lambda data_dir: pytest.fail("a dry run decoded the images"))
    assert reproduce.main(["select", "--dry-run", "--override", "--epochs 1 --data-dir 'my data' --rho 0.1"]) == 0
    printed, err = capsys.readouterr()
    assert "does nothing here" not in err
    commands = [shlex.split(line.split(" train.py ", 1)[1]) for line in printed.splitlines() if line.startswith("[start] ")]
    assert len(commands) == 2 * len(reproduce.SEEDS) and f"to run: {len(commands)} runs" in printed
    assert {(reproduce.value(c, "--epochs"), reproduce.value(c, "--data-dir")) for c in commands} == {("1", "my data")}
    assert "the rule" not in printed and not (tmp_path / "results" / "setting.json").exists()


def test_reproduce_keeps_the_output_of_every_launch_of_a_run(tmp_path, monkeypatch, capsys):
    """Each launch appends to the run's log: beside a folder its job did not make (a job that failed first) the log
    gathers every launch; once the folder exists, the log goes into its train.log after the output of the launches
    before. --override runs also without a setting.json, in the first candidate's setting."""
    reproduce = _one_row_claims(tmp_path, monkeypatch)   # ROOT is tmp_path: launch runs the fake train.py
    (tmp_path / "train.py").write_text(FAKE_TRAIN_RECORDS)   # ends with 0 at once, makes no folder
    (tmp_path / "results" / "setting.json").unlink()
    out, beside = tmp_path / "results" / "g" / "r-s0", tmp_path / "results" / "g" / "r-s0.log"
    for launches in (1, 2):
        assert reproduce.main(["claims", "--override", "--epochs 1"]) == 0
        assert [line.startswith("$ ") for line in beside.read_text().splitlines()] == [True] * launches
    assert "showing the first candidate's setting" in capsys.readouterr().out
    out.mkdir()
    for launches in (3, 4):
        assert reproduce.main(["claims", "--override", "--epochs 1"]) == 0
        assert [line.startswith("$ ") for line in (out / "train.log").read_text().splitlines()] == [True] * launches
        assert not beside.exists()


def _pids():
    return [pid for pid in os.listdir("/proc") if pid.isdigit()] if os.path.isdir("/proc") else []


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:   # gone meanwhile
        return b""


# ==================================================================== train.py
REPO = Path(__file__).resolve().parent
CIFAR10_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# CIFAR-10's published per-channel mean and std (written out: the reference for train.py's normalisation)
CIFAR10_MEAN, CIFAR10_STD = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))


def _image_folder(root, per_class=(24, 6), classes=3):
    """train/<class>/*.png and test/<class>/*.png: noisy images of one colour per class."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            colour = np.roll([160, 60, 60], c)
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _tiny_run(tmp_path, *extra):
    """Settings of a run on a generated folder that takes a second or two on a CPU."""
    data = tmp_path / "images"
    if not data.exists():
        _image_folder(data)
    return ["--model", "cnn", "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"), "--epochs", "3",
            "--batch-size", "12", "--log-every", "1", "--device", "cpu", *extra]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_tiny_image_folder_writes_the_contract_files(tmp_path):
    out = tmp_path / "run"
    final = train.main(_tiny_run(tmp_path, "--variant", "samme1", "--out", str(out), "--sharpness",
                                 "--sharpness-batches", "2", "--sharpness-batch-size", "6",
                                 "--sharpness-iters", "10"))
    # run.lock stays: a process that opened it before an unlink and one that made a new one would both hold "the" lock
    assert {"config.json", "steps.csv", "epochs.csv", "final.json", "last.pt", "best.pt", "run.lock"} <= \
        {p.name for p in out.iterdir()}
    steps = _rows(out / "steps.csv")
    assert list(steps[0]) == ["step", "epoch", "lr", "rho", "loss", "acc"] + [k for k in sam.STAT_KEYS if k != "step"]
    assert [int(r["step"]) for r in steps] == list(range(len(steps)))
    for row in steps:
        assert sum(float(row[f"ckpt{k}"]) for k in range(5)) == pytest.approx(100, abs=1e-3)
        assert "" not in row.values()   # every statistic written (NaN where undefined), none left out
    total = 3 * (66 // 12)   # 66 training images, batch 12: full batches only, 5 a epoch
    assert len(steps) == total and [float(r["lr"]) for r in steps] == pytest.approx(
        [0.1 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)], rel=1e-7)   # cosine per step
    epochs = _rows(out / "epochs.csv")
    assert list(epochs[0]) == train.EPOCH_COLUMNS and len(epochs) == 3
    assert epochs[0]["clean_train_acc"] == "" and epochs[0]["noisy_train_acc"] == ""
    assert json.loads((out / "final.json").read_text()) == final
    assert set(final["sharpness"]) == {"lambda_max", "trace", "trace_se", "top5_pos_mean"}
    assert final["sharpness"]["lambda_max"] > 0
    for when in ("best", "last"):   # 3 test classes of 6 images: each share is k/6, their mean the accuracy
        per_class = final[f"test_acc_per_class_{when}"]
        assert len(per_class) == 3 and all(round(a * 6 / 100, 9).is_integer() for a in per_class)
        assert sum(per_class) / 3 == pytest.approx(final[f"test_acc_{when}"])
    assert final["tail_classes"] == []   # the tiny run's classes all have --tail-threshold 20 images or more
    config = json.loads((out / "config.json").read_text())
    assert {"dataset", "model", "variant", "rho", "condition", "seed", "epochs", "command", "torch", "device",
            "git_commit"} <= set(config)


def test_train_final_json_is_strict_json_with_null_for_undefined_numbers(tmp_path):
    """A class without test images has no accuracy and one Hutchinson probe no standard error: final.json holds
    null for them, not NaN and Infinity, which strict parsers (JavaScript, jq's Infinity as 1.8e308) refuse."""
    shutil.rmtree(_image_folder(tmp_path / "images") / "test" / "class2")
    out = tmp_path / "run"
    final = train.main(_tiny_run(tmp_path, "--epochs", "1", "--out", str(out), "--sharpness", "--sharpness-iters",
                                 "1", "--sharpness-batches", "1", "--sharpness-batch-size", "6"))

    def refuse(constant):
        raise ValueError(f"{constant} in final.json")
    assert json.loads((out / "final.json").read_text(), parse_constant=refuse) == final
    for when in ("best", "last"):   # 2 test classes of 6 images: their mean is the accuracy
        per_class = final[f"test_acc_per_class_{when}"]
        assert len(per_class) == 3 and per_class[2] is None and sum(per_class[:2]) / 2 == pytest.approx(
            final[f"test_acc_{when}"])
    assert final["sharpness"]["trace_se"] is None and math.isfinite(final["sharpness"]["trace"])
    run = plots.load_run(str(out))   # plots.py leaves the undefined numbers out, as it did NaN
    assert plots.values([run], "trace_se") == [] and plots.values([run], "trace") == [final["sharpness"]["trace"]]


def test_train_test_every_leaves_out_only_tests_no_result_reads(tmp_path):
    """--test-every 3 tests at epochs 3, 6, the last and each new best validation accuracy; the other epochs log no
    test, and everything else, final.json included, is the run's that tested every epoch."""
    runs = {n: _tiny_run(tmp_path, "--epochs", "7", "--test-every", str(n), "--out", str(tmp_path / f"every{n}"))
            for n in (1, 3)}
    finals = {n: train.main(args) for n, args in runs.items()}
    assert finals[3] == finals[1]
    full, sparse = (_rows(tmp_path / f"every{n}" / "epochs.csv") for n in (1, 3))
    best, tested = -math.inf, []
    for row in full:   # the reference: which epochs a run testing every 3rd one must test
        epoch, val_acc = int(row["epoch"]), float(row["val_acc"])
        tested.append(val_acc > best or epoch % 3 == 0 or epoch == 7)
        best = max(best, val_acc)
    assert 0 < sum(tested) < 7   # the run has epochs to leave out
    test_columns, timing = ("test_loss", "test_acc"), ("seconds", "images_per_sec")
    for every_epoch, every_third, was_tested in zip(full, sparse, tested):
        assert ({k: v for k, v in every_third.items() if k not in test_columns + timing} ==
                {k: v for k, v in every_epoch.items() if k not in test_columns + timing})
        assert [every_third[k] for k in test_columns] == ([every_epoch[k] for k in test_columns] if was_tested
                                                          else ["", ""])
    # it is a session's setting: a run cut while testing every 3rd epoch resumes testing every epoch, same final.json
    cut = _tiny_run(tmp_path, "--epochs", "7", "--out", str(tmp_path / "cut"))
    assert train.main(cut + ["--test-every", "3", "--max-steps", "10"]) is None
    assert train.main(cut + ["--resume"]) == finals[1]


def test_train_resume_measures_a_finished_runs_sharpness_as_the_run_would_have(tmp_path, capsys, monkeypatch):
    """A finished run without sharpness, resumed with --sharpness: its best-val checkpoint is measured and
    final.json is what the same run with --sharpness from the start wrote; its training logs are untouched."""
    sharp = ["--sharpness", "--sharpness-batches", "2", "--sharpness-batch-size", "6", "--sharpness-iters", "10"]
    measured = train.main(_tiny_run(tmp_path, "--variant", "sam", "--out", str(tmp_path / "measured"), *sharp))
    out = tmp_path / "later"
    plain = _tiny_run(tmp_path, "--variant", "sam", "--out", str(out))
    unmeasured = train.main(plain)
    assert unmeasured["sharpness"] is None and measured["sharpness"]["lambda_max"] > 0
    logs = {name: (out / name).read_bytes() for name in ("steps.csv", "epochs.csv", "best.pt", "last.pt")}
    # a crash while the measured final.json replaces the finished run's leaves the old one whole
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full"))
                        if str(dst).endswith("final.json") else replace(src, dst))
    with pytest.raises(OSError, match="disk full"):
        train.main(plain + sharp + ["--resume"])
    monkeypatch.undo()
    assert json.loads((out / "final.json").read_text()) == unmeasured and not list(out.glob("*tmp"))
    assert train.main(plain + sharp + ["--resume"]) == measured == json.loads((out / "final.json").read_text())
    assert logs == {name: (out / name).read_bytes() for name in logs}
    config, first = (json.loads((folder / "config.json").read_text()) for folder in (out, tmp_path / "measured"))
    assert {k: config[k] for k in train.END_SETTINGS} == {k: first[k] for k in train.END_SETTINGS}
    assert config["command"].endswith(str(out)) and config["end_settings_command"].endswith("--resume")
    # the commit read here by another git command (None outside a clone), not by train.git_commit itself
    logged = subprocess.run(["git", "log", "-1", "--format=%H"], cwd=REPO, capture_output=True, text=True) \
        if shutil.which("git") else None
    commit = (logged.stdout.strip() or None) if logged else None
    assert config["end_settings_commit"] == config["git_commit"] == commit
    # measured now: the same command finds nothing to do; other sharpness settings are another run's
    assert train.main(plain + sharp + ["--resume"]) == measured
    with pytest.raises(SystemExit) as stop:
        train.main(plain + sharp + ["--sharpness-iters", "20", "--resume"])
    assert "--sharpness-iters 20 (run: 10)" in str(stop.value)
    assert json.loads((out / "final.json").read_text()) == measured
    # while a run trains its sharpness settings may change too: the end measures with the last ones
    cut = tmp_path / "cut"
    train.main(_tiny_run(tmp_path, "--variant", "sam", "--out", str(cut), "--max-steps", "3"))
    assert train.main(_tiny_run(tmp_path, "--variant", "sam", "--out", str(cut), "--resume", *sharp)) == measured


def test_train_real_cifar10_learns(tmp_path):
    if not CIFAR10_ARCHIVE.exists():
        pytest.skip("the CIFAR-10 archive in ../shared/data is not here")
    final = train.main(["--model", "cnn", "--data-dir", str(CIFAR10_ARCHIVE), "--cache-dir", str(tmp_path),
                        "--subset", "3000", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
                        "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert final["test_acc_last"] > 25   # chance is 10%


def test_train_resume_with_rho_min_continues_the_schedule_without_a_changed_flag_warning(tmp_path):
    """--rho-min moves rho with the lr each step: the checkpoint's rho is the schedule's at its last step, not a flag
    the user changed, so resuming says nothing about replaced flags (it did on every resume) and goes on as a run
    that was never stopped, each step's rho rho-min + (rho - rho-min) x the lr's cosine factor."""
    settings = _tiny_run(tmp_path, "--variant", "sam", "--rho", "0.2", "--rho-min", "0.05", "--epochs", "2")
    train.main(settings + ["--out", str(tmp_path / "whole")])
    resumed = settings + ["--out", str(tmp_path / "cut")]
    assert train.main(resumed + ["--max-steps", "3"]) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(resumed + ["--resume"])
    assert not [str(w.message) for w in caught if "saved flags replace" in str(w.message)]
    rows = _rows(tmp_path / "cut" / "steps.csv")
    total = len(rows)
    assert total == 2 * (66 // 12) and [float(r["rho"]) for r in rows] == pytest.approx(
        [0.05 + 0.15 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)], rel=1e-7)
    assert (tmp_path / "cut" / "steps.csv").read_bytes() == (tmp_path / "whole" / "steps.csv").read_bytes()


def test_train_resume_after_max_steps_and_ctrl_c_is_bitwise(tmp_path, monkeypatch, capsys):
    settings = _tiny_run(tmp_path, "--variant", "samckpt1", "--label-noise", "0.2", "--out", str(tmp_path / "b"))
    train.main(_tiny_run(tmp_path, "--variant", "samckpt1", "--label-noise", "0.2", "--out", str(tmp_path / "a")))

    assert train.main(settings + ["--max-steps", "4"]) is None   # stops mid-epoch 1, checkpointed
    assert "stopped at step 4 (--max-steps 4); continue with the same command and --resume\n" in capsys.readouterr().out

    calls = {"n": 0}
    step = train.train_step

    def ctrl_c_on_third_step(*args):   # as if Ctrl-C came during step 6: the run stops after it
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args)
    monkeypatch.setattr(train, "train_step", ctrl_c_on_third_step)
    with pytest.raises(SystemExit) as stop:   # checkpointed, and a stopped run exits 130
        train.main(settings + ["--resume"])
    assert stop.value.code == 130
    assert f"stopped at step {4 + 3} (Ctrl-C);" in capsys.readouterr().out   # after the session's third step
    monkeypatch.setattr(train, "train_step", step)
    train.main(settings + ["--resume"])

    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "steps.csv").read_bytes() == (b / "steps.csv").read_bytes()
    timing = ("seconds", "images_per_sec")
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(a / "epochs.csv")] == \
        [{k: v for k, v in r.items() if k not in timing} for r in _rows(b / "epochs.csv")]
    assert _rows(a / "epochs.csv")[0]["noisy_train_acc"] != ""
    assert (a / "final.json").read_text() == (b / "final.json").read_text()


def test_train_keeping_freed_memory_changes_no_number(tmp_path, monkeypatch):
    # mallopt is process-wide and cannot be undone, so the run without it is a fresh process; each run is watched
    # for the call, so the two runs do differ in it (the kept one sets it, the plain one never does)
    settings, kept, keep = _tiny_run(tmp_path, "--variant", "samme1"), [], train.keep_freed_memory
    monkeypatch.setattr(train, "keep_freed_memory", lambda: (kept.append(1), keep())[1])
    train.main(settings + ["--out", str(tmp_path / "kept")])
    assert kept == [1]
    never = "import sys, train; train.keep_freed_memory = lambda: sys.exit('kept'); train.main(sys.argv[1:])"
    subprocess.run([sys.executable, "-c", never, *settings, "--out", str(tmp_path / "plain"), "--no-keep-freed-memory"],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                    str(torch.get_num_threads())})
    assert (tmp_path / "kept" / "steps.csv").read_bytes() == (tmp_path / "plain" / "steps.csv").read_bytes()
    if platform.libc_ver()[0] == "glibc":   # glibc takes both settings
        assert train.keep_freed_memory()


def test_train_bn_running_stats_come_from_the_first_pass_only():
    torch.manual_seed(0)
    model = train.MODELS["cnn"](3, 1.0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    reference = train.MODELS["cnn"](3, 1.0)
    reference.load_state_dict(model.state_dict())
    reference(x)   # one forward in train mode: what the running statistics should become
    opt = sam.SAM(model.parameters(), torch.optim.SGD, variant="sam", lr=0.1, momentum=0.9)
    train.train_step(model, opt, x, y, train.StepSettings())
    sam.enable_running_stats(model)   # as the next step begins: num_batches_tracked forgets the second pass
    for name, buffer in reference.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name


def test_train_bn_running_stats_count_the_first_pass_of_every_step():
    # each step's first pass updates BN's running statistics (train_step turns them back on after the last step's
    # second pass turned them off): after two steps they are those of one forward pass on x1 at w0, then x2 at w1
    torch.manual_seed(0)
    model = train.MODELS["cnn"](3, 1.0)
    reference = train.MODELS["cnn"](3, 1.0)
    reference.load_state_dict(model.state_dict())
    opt = sam.SAM(model.parameters(), torch.optim.SGD, variant="sam", lr=0.1, momentum=0.9)
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
        with torch.no_grad():
            for name, p in model.named_parameters():   # the reference at this step's weights
                reference.get_parameter(name).copy_(p)
            reference(x)
        train.train_step(model, opt, x, y, train.StepSettings())
    for name, buffer in reference.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name
    assert {int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")} == {2}


@pytest.mark.parametrize("name,flags,passes", [
    ("sam", {}, [2] * 6), ("sgd", {}, [1] * 6), ("looksam", dict(looksam_k=3), [2, 1, 1, 2, 1, 1])])
def test_train_step_runs_one_forward_pass_per_gradient_the_step_needs(name, flags, passes):
    """LookSAM's step before a refresh takes one pass: its first_step moves the step count onto the refresh, so
    train_step asks whether the weights were perturbed, not whether the next step needs two passes."""
    torch.manual_seed(0)
    model = train.MODELS["cnn"](3, 1.0)
    opt = sam.SAM(model.parameters(), torch.optim.SGD, variant=name, lr=0.1, momentum=0.9, **flags)
    calls = [0]
    model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    got = []
    for t in range(6):
        before = calls[0]
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
        train.train_step(model, opt, x, y, train.StepSettings())
        got.append(calls[0] - before)
    assert got == passes


@pytest.mark.parametrize("variant", ["imbsam", "ssamf", "ssamd", "sgdhess", "looksam", "gsam"])
def test_train_variants_with_their_own_loop_paths_run(tmp_path, monkeypatch, variant):
    """Each variant's own path through the run, watched from outside, step by step: the training forward passes
    (1 for sgdhess, 2 every --looksam-k steps and 1 between for LookSAM, else 2), backward(create_graph) for
    sgdhess alone; imbsam's tail (the classes under --tail-threshold training images) and --tail-weight reach
    the step, whose head-loss backward is stashed once, before the tail loss's; SSAM refreshes its mask at the
    first step of every --mask-every-epochs-th epoch, after the gradient and before the perturbed pass, with
    progress = step / total steps, keeping (1 - sparsity) of the entries live, and SSAM-F first runs
    --fisher-samples batch-1 passes, each accumulated into the Fisher score. Every forward starts without a
    gradient left over, and nothing between two steps (Fisher passes, evaluation) moves BN's running
    statistics; with --rho-min the rho column follows the lr from rho down to rho-min."""
    sparse, k, samples = variant in ("ssamf", "ssamd"), 3, 4
    epochs = 3 if sparse else 1
    extra = {"imbsam": ["--imbalance", "4", "--tail-threshold", "12", "--tail-weight", "3"],
             "looksam": ["--looksam-k", str(k)], "ssamf": ["--mask-every-epochs", "2", "--fisher-samples", str(samples)],
             "ssamd": ["--mask-every-epochs", "2"]}.get(variant, [])
    events, models, loaders, shares, buffers = [], [], [], [], []

    def no_grad_left(model):
        return all(p.grad is None or not p.grad.any() for p in model.parameters())
    build = train.MODELS["cnn"]

    def watched_model(c, w):
        model = build(c, w)
        model.register_forward_pre_hook(lambda m, inputs: events.append(("forward", len(inputs[0]), no_grad_left(m)))
                                        if m.training else None)
        models.append(model)
        buffers.append([b.clone() for b in model.buffers()])   # as built: the run's initial statistics
        return model
    monkeypatch.setitem(train.MODELS, "cnn", watched_model)
    loader_init = train.DeviceLoader.__init__
    monkeypatch.setattr(train.DeviceLoader, "__init__",
                        lambda self, *args: (loaders.append(self), loader_init(self, *args))[1])
    step = train.train_step

    def watched_step(model, opt, x, y, settings, *rest):
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers[-1]))   # unmoved since the last step
        events.append(("step", settings))
        counts = step(model, opt, x, y, settings, *rest)
        events.append(("end",))
        buffers.append([b.clone() for b in model.buffers()])
        return counts
    monkeypatch.setattr(train, "train_step", watched_step)

    def watch(name, record):
        method = getattr(sam.SAM, name)

        def watched(self, *args, **kwargs):
            events.append(record(*args, **kwargs))
            return method(self, *args, **kwargs)
        monkeypatch.setattr(sam.SAM, name, watched)
    watch("stash_clean_grad", lambda: ("stash",))
    watch("accumulate_fisher", lambda: ("fisher",))
    watch("update_mask", lambda progress=0.0: ("mask", progress))
    mask_update = sam.SAM.update_mask

    def live_share(self, *args, **kwargs):
        mask_update(self, *args, **kwargs)
        masks = [self.state[p]["mask"] for g in self.param_groups for p in g["params"]]
        shares.append((sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)))
    monkeypatch.setattr(sam.SAM, "update_mask", live_share)
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *args, create_graph=False, **kwargs: (
        events.append(("backward", create_graph)), backward(self, *args, create_graph=create_graph, **kwargs))[1])

    out = tmp_path / variant
    final = train.main(_tiny_run(tmp_path, "--variant", variant, "--epochs", str(epochs), "--rho-min", "0.01",
                                 "--out", str(out), *extra))
    assert np.isfinite(final["test_loss_last"])

    per_epoch = len(loaders[0]) // 12   # loaders: train, val, test; full batches of 12
    total = epochs * per_epoch
    refreshes = [t for t in range(0, total, 2 * per_epoch) if sparse]   # epochs 1, 3, ...
    starts = [i for i, e in enumerate(events) if e[0] == "step"]
    assert len(starts) == total and len(models) == 1
    tail = torch.bincount(loaders[0].labels, minlength=3) < 12
    last = -1
    for t, start in enumerate(starts):
        between, settings = events[last + 1:start], events[start][1]
        last = events.index(("end",), start)
        inside = events[start + 1:last]
        # SSAM-F's Fisher passes: one image each, its gradient accumulated, none left over
        assert between == ([("forward", 1, True), ("backward", False), ("fisher",)] * samples
                           if variant == "ssamf" and t in refreshes else []), t
        two = variant != "sgdhess" and (variant != "looksam" or t % k == 0)
        expected = [("forward", 12, True)]
        if variant == "imbsam":
            expected += [("backward", False), ("stash",)]
        expected += [("backward", variant == "sgdhess")]
        if t in refreshes:
            expected += [("mask", pytest.approx(t / total, abs=1e-12))]
        if two:
            expected += [("forward", 12, True), ("backward", False)]
        assert inside == expected, t
        if variant == "imbsam":
            assert torch.equal(settings.tail, tail) and settings.tail_weight == 3.0
        else:
            assert settings.tail is None
    if variant == "imbsam":
        assert tail.tolist() == [False, True, True]   # a head and a tail
    if sparse:   # sparsity 0.5 of the 24k entries: half of them live (rounded)
        assert [live for live, _ in shares] == [round(0.5 * n) for _, n in shares] and len(shares) == len(refreshes)
    rho = sam.VARIANTS[variant].get("rho", sam.FLAGS["rho"])
    assert [float(r["rho"]) for r in _rows(out / "steps.csv")] == pytest.approx(
        [0.01 + (rho - 0.01) * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)], rel=1e-6)


def test_train_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train.py"), *_tiny_run(tmp_path, "--variant", "samme1", "--epochs", "2", "--out", str(out))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert len(_rows(out / "epochs.csv")) == 2 and len(_rows(out / "steps.csv")) == 2 * 5   # 60 images, batch 12


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ranks_that_disagree(rank, port, out):
    """One rank of a two-process gloo group: rank 0's gradient at step 1 is NaN, rank 1's is finite; a Ctrl-C
    reached rank 1 only."""
    import threading
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop_requested = threading.Event()
    if rank == 1:
        stop_requested.set()
    r = types.SimpleNamespace(state={"step": 3}, args=types.SimpleNamespace(max_steps=None), world=2,
                              device=torch.device("cpu"))
    stops = [train.should_stop(r, stop_requested, logged) for logged in (False, True)]
    params = make_params()
    opt = train.SAMOverRanks(params, train.averaging_over_ranks(torch.optim.SGD), rho=RHO, lr=LR, momentum=MOM)
    skipped = []
    for t in range(3):
        poisoned = lambda step, point, kind: _poison(synthetic(step, point, kind), 0, math.nan if rank == 0 else 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            drive(opt, params, poisoned if t == 1 else synthetic, 1)
        skipped.append(opt.last_step_skipped)
    torch.save({"skipped": skipped, "weights": snap(params), "stops": stops,
                "stopped_by_ctrl_c": stop_requested.is_set()}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_ranks_skip_a_non_finite_step_and_stop_on_a_ctrl_c_together(tmp_path):
    # d is averaged in the base step, after the finite check: a rank that skipped alone would leave the
    # other waiting in that all-reduce, or pair it with the next step's
    import torch.multiprocessing as mp
    mp.spawn(_ranks_that_disagree, args=(_free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [False, True, False]
    assert_same(ranks[0]["weights"], ranks[1]["weights"])
    # a Ctrl-C is agreed on logged steps only; then every rank stops as stopped by it (exit 130), none as by --max-steps
    assert [(x["stops"], x["stopped_by_ctrl_c"]) for x in ranks] == [([False, True], True)] * 2


# Two gloo ranks against the single-process formula. m-sharpness: rank r ascends along its own shard's g_r,
# e_r = rho g_r / ||g_r||, and takes d_r = g'_r = grad L_r(w + e_r); the base step uses mean_r d_r. --sync-ascent:
# every rank ascends along mean_r g_r. BN: each rank's running statistics follow its own shard, and the mean
# over ranks is what the run keeps. Rank r's batch is the r-th contiguous share of the single-process batch.
DDP_RUN = ("--variant", "sam", "--epochs", "1", "--batch-size", "24", "--schedule", "constant", "--lr", "0.1",
           "--momentum", "0.9", "--weight-decay", "1e-3", "--rho", "0.5")   # 66 training images: 2 steps of 12 + 12


def _rank_quadratic(rank):
    """Rank r's loss sum(h_r w^2 / 2 + b_r w): g = h_r w + b_r depends on the point, so the ascent shows in g'."""
    gen = torch.Generator().manual_seed(10 + rank)
    h = [torch.rand(s, generator=gen, dtype=DT) * 4 + 0.5 for s in SHAPES]
    b = [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]
    return lambda t, point, which: [hh * p + bb for hh, p, bb in zip(h, point, b)]


def _ddp_cnn_batch():
    """A fixed batch of 8 images of 3 classes for the small CNN, and its weights (build_model's, seed 0)."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 3, (8,), generator=gen), train.MODELS["cnn"](3, 1.0)


def _ddp_eval_splits():
    """Splits of 1 image (fewer than the ranks: rank 1's share is empty) and of 5 (shares of 3 and 2), 3 classes."""
    gen = torch.Generator().manual_seed(4)
    return [(torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=gen))
            for n in (1, 5)]


def _ddp_worker(rank, port, runs, out):
    """One of two gloo ranks: SAMOverRanks on its own quadratic, SSAM-D's mask refresh in a --sync-ascent step and
    evaluate on small splits, then train.py's runs, recording its batches."""
    torch.set_num_threads(1)   # two ranks on a shared CPU
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    params = make_params()
    opt = train.SAMOverRanks(params, train.averaging_over_ranks(torch.optim.SGD), rho=RHO, lr=LR, momentum=MOM,
                             weight_decay=WD)
    points, weights = drive(opt, params, _rank_quadratic(rank), 3)
    x, y, model = _ddp_cnn_batch()
    ssamd = train.SAMOverRanks(model.parameters(), train.averaging_over_ranks(torch.optim.SGD), variant="ssamd", lr=LR)
    alive = [m.clone() for m in ssamd._masks(list(model.parameters()))]   # the random mask drawn at first use
    train.train_step(model, ssamd, x.chunk(2)[rank], y.chunk(2)[rank], train.StepSettings(sync_ascent=True),
                     mask_progress=0.0)
    masks = {"alive": alive, "refreshed": [ssamd.state[p]["mask"].clone() for p in model.parameters()]}
    model = _ddp_cnn_batch()[2]   # fresh weights and BN statistics, alike on both ranks
    evaluated = [train.evaluate(model, train.DeviceLoader(*split, None, "cifar10", torch.device("cpu"), False),
                                train.StepSettings(), rank, 2) for split in _ddp_eval_splits()]
    batches, next_batch = {}, train.next_batch

    def recording(r, i):
        x, y, flipped, mask_progress = next_batch(r, i)
        batches.setdefault(r.folder.path.name, []).append((x.clone(), y.clone()))
        return x, y, flipped, mask_progress
    train.next_batch = recording
    sam_state, finish = {}, train.finish

    def recording_finish(r):   # this rank's own SAM state (FriendlySAM's EMA) at the end of each run
        sam_state[r.folder.path.name] = copy.deepcopy(r.opt.state_dict()["sam"]["state"])
        return finish(r)
    train.finish = recording_finish
    for k, argv in enumerate(runs):
        args = train.parse_settings(argv)
        train.train(args, argv, rank, 2, torch.device("cpu"))
        if rank == 0:   # its last.pt as this run left it (a resumed run writes over it)
            shutil.copy(Path(args.out) / "last.pt", out / f"run{k}.pt")
    torch.save({"points": points, "weights": weights, "batches": batches, "sam_state": sam_state, "masks": masks,
                "evaluated": evaluated}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _ddp_reference(model, batches, sync, args):
    """float64, from the formula: (weights, each rank's BN buffers) after each step on the global batches."""
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().double() for p in model.parameters()]
    own = [copy.deepcopy(model).double() for _ in range(2)]   # rank r's module: its BN running statistics
    base, after = SGDRef(args.lr, args.momentum, args.weight_decay), []

    def grad(module, ws, x, y):   # the train-mode forward updates module's running statistics
        ws = [v.detach().requires_grad_() for v in ws]
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(module, dict(zip(names, ws)), (x,)), y)
        return torch.autograd.grad(loss, ws)
    for x, y in batches:
        shards = list(zip(x.double().chunk(2), y.chunk(2)))   # rank r: the r-th contiguous half
        g = [grad(own[r], w, *shards[r]) for r in range(2)]
        if sync:
            g = [[(a + b) / 2 for a, b in zip(*g)]] * 2
        gp = []
        for r in range(2):   # pass 2 on a throwaway copy: it leaves the running statistics alone
            e = [args.rho * v / norm(g[r]) for v in g[r]]
            gp.append(grad(copy.deepcopy(own[r]), [v + u for v, u in zip(w, e)], *shards[r]))
        w = base.step(w, [(a + b) / 2 for a, b in zip(*gp)])
        after.append((w, [{k: v.clone() for k, v in m.named_buffers()} for m in own]))
    return after


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two gloo processes (one spawn): the quadratic, then train.py with m-sharpness, with --sync-ascent, and the
    m-sharpness run stopped by --max-steps 1 and resumed; then FriendlySAM over 2 epochs with the ratio statistics
    and persistence every step, uninterrupted and stopped at the end of epoch 1's steps (--max-steps 2, with
    step 1 in the open steps.csv interval) and resumed."""
    root = tmp_path_factory.mktemp("ddp")
    friendly = ["--variant", "friendlysam", "--epochs", "2", "--log-every", "2", "--stats-every", "1", "--persist-from", "0"]
    runs = {name: _tiny_run(root, *DDP_RUN, "--out", str(root / name), *extra) for name, extra in (
        ("msharp", []), ("sync", ["--sync-ascent"]), ("stopped", ["--max-steps", "1"]), ("friendly", friendly),
        ("friendly-stopped", [*friendly, "--max-steps", "2"]))}
    args = train.parse_settings(runs["msharp"])
    data = train.load_images(args)   # decoded and cached here, once: the ranks read the cache
    import torch.multiprocessing as mp
    order = [runs["msharp"], runs["sync"], runs["stopped"], runs["stopped"][:-2] + ["--resume"], runs["friendly"],
             runs["friendly-stopped"], runs["friendly-stopped"][:-2] + ["--resume"]]
    mp.spawn(_ddp_worker, args=(_free_port(), order, root), nprocs=2, join=True)
    # the global batches of the single-process run: its permutation, then train_batch on all of idx
    loader = train.DeviceLoader(*train.make_splits(args, data)[0], args.dataset, torch.device("cpu"), False)
    generator = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(loader), generator=generator)
    steps = len(loader) // args.batch_size
    batches = [loader.train_batch(perm[i * args.batch_size:(i + 1) * args.batch_size], generator, args.cutout)[:2]
               for i in range(steps)]
    torch.manual_seed(args.seed)   # build_model's weights, which rank 0 broadcasts
    model = train.MODELS["cnn"](len(data["classes"]), 1.0)
    return types.SimpleNamespace(root=root, batches=batches, model=model, splits=train.make_splits(args, data),
                                 ranks=[torch.load(root / f"rank{r}.pt") for r in (0, 1)],
                                 reference={sync: _ddp_reference(model, batches, sync, args) for sync in (False, True)})


def _relative_error(actual, expected):
    return float(norm([a - b for a, b in zip(actual, expected)]) / norm(expected))


def _assert_run_is_reference(checkpoint, model, weights, buffers):
    """A last.pt against the reference: the weight update (in norm: float32 against float64 can move a ReLU or
    max-pool kink at w + e, a 4e-4 change; the wrong ascent is 0.16 away, a wrong average further), and each BN
    buffer's update, the mean of the ranks' own."""
    saved, start = torch.load(checkpoint, weights_only=False)["model"], model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    update = lambda state, name: state[name].double() - start[name].double()
    expected = [w - start[n].double() for n, w in zip(names, weights)]
    assert _relative_error([update(saved, n) for n in names], expected) < 1e-2
    for name in buffers[0]:
        if buffers[0][name].is_floating_point():   # rank 0's own statistics are 0.9 % to 16 % away
            mean = {name: (buffers[0][name] + buffers[1][name]) / 2}
            assert _relative_error([update(saved, name)], [update(mean, name)]) < 1e-3, name
        else:   # num_batches_tracked: one first pass per step on every rank
            assert saved[name] == buffers[0][name] == buffers[1][name], name


def test_ddp_base_step_averages_each_ranks_own_sam_direction(ddp_runs):
    # rank r: e_r = rho g_r/||g_r|| at its own g_r, d_r = g'_r; SGD (momentum, weight decay) steps along mean_r d_r
    w, base, grads = [p.detach() for p in make_params()], SGDRef(), [_rank_quadratic(r) for r in (0, 1)]
    points, weights = [[], []], []
    for t in range(3):
        gp = []
        for r in range(2):
            g = grads[r](t, w, "g")
            points[r].append([x + RHO * v / norm(g) for x, v in zip(w, g)])
            gp.append(grads[r](t, points[r][-1], "gp"))
        w = base.step(w, [(a + b) / 2 for a, b in zip(*gp)])
        weights.append(w)
    for r, rank in enumerate(ddp_runs.ranks):
        assert_lists_close(rank["points"], points[r])
        assert_lists_close(rank["weights"], weights)


def test_ddp_rank_batches_are_contiguous_shares_of_the_single_process_batch(ddp_runs):
    for run in ("msharp", "sync"):
        for r, rank in enumerate(ddp_runs.ranks):
            assert len(rank["batches"][run]) == len(ddp_runs.batches)
            for (x, y), (gx, gy) in zip(rank["batches"][run], ddp_runs.batches):
                half = len(gy) // 2
                assert_same([x, y], [gx[half * r:half * (r + 1)], gy[half * r:half * (r + 1)]])


@pytest.mark.parametrize("run,sync", [("msharp", False), ("sync", True)])
def test_ddp_run_steps_and_averages_bn_statistics_as_the_formula(ddp_runs, run, sync):
    # an epoch of 2 steps on 2 ranks; the end of the epoch averages the BN running statistics over the ranks
    w, buffers = ddp_runs.reference[sync][-1]
    _assert_run_is_reference(ddp_runs.root / run / "last.pt", ddp_runs.model, w, buffers)
    other = ddp_runs.reference[not sync][-1][0]   # the two ascents end far apart: the test tells them apart
    start = [p.detach().double() for p in ddp_runs.model.parameters()]
    assert _relative_error([a - s for a, s in zip(other, start)], [a - s for a, s in zip(w, start)]) > 0.1


def test_ddp_sync_ascent_refreshes_ssamds_mask_from_the_averaged_gradient(ddp_runs):
    # --sync-ascent: every rank ascends along mean_r g_r, so SSAM-D's refresh ranks |mean_r g_r|, as one process on the
    # whole batch would: it keeps the n_keep live entries with the largest of it (death rate drop_rate at progress 0),
    # then grows n_live - n_keep among the dead. Ranking each rank's own |g_r| instead leaves 60 % of the kept set off.
    x, y, model = _ddp_cnn_batch()
    model, names = model.double(), [n for n, _ in model.named_parameters()]

    def grad(xs, ys):   # the train-mode forward of pass 1 on one rank's half
        ws = [p.detach().clone().requires_grad_() for p in model.parameters()]
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, ws)), (xs.double(),)), ys)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, ws)])
    g = sum(grad(xs, ys) for xs, ys in zip(x.chunk(2), y.chunk(2))) / 2
    alive = sam._flat(ddp_runs.ranks[0]["masks"]["alive"])
    n_live = round((1 - VARIANTS["ssamd"]["sparsity"]) * len(alive))
    n_keep = round(n_live * (1 - sam.FLAGS["drop_rate"]))
    expected = torch.zeros_like(alive)
    expected[g.abs().masked_fill(~alive, -1.0).topk(n_keep).indices] = True
    for rank in ddp_runs.ranks:
        assert torch.equal(sam._flat(rank["masks"]["alive"]), alive)
        mask = sam._flat(rank["masks"]["refreshed"])
        assert int((mask & ~alive).sum()) == n_live - n_keep
        assert int(((mask & alive) ^ expected).sum()) <= 0.001 * n_keep   # float32 against float64 at the threshold


def test_ddp_logs_and_evaluation_count_every_ranks_images_once(ddp_runs):
    # steps.csv: each step's loss and accuracy over both ranks' 12 images at that step's w (pass 1, BN with each half's
    # batch statistics); epochs.csv: train loss and accuracy over all 48; val and test (and final.json's per-class
    # accuracy): one process's evaluate of last.pt's model, which the ranks scored in contiguous shares
    model = copy.deepcopy(ddp_runs.model).double()
    names = [n for n, _ in model.named_parameters()]
    steps = [[p.detach().double() for p in model.parameters()]] + [w for w, _ in ddp_runs.reference[False][:-1]]
    sums = []   # (loss sum, correct) of each step's two halves
    for w, (x, y) in zip(steps, ddp_runs.batches):
        logits = [torch.func.functional_call(model, dict(zip(names, w)), (xs.double(),)) for xs in x.chunk(2)]
        sums.append([sum(float(torch.nn.functional.cross_entropy(z, ys, reduction="sum")) for z, ys in zip(logits, y.chunk(2))),
                     sum(int((z.argmax(1) == ys).sum()) for z, ys in zip(logits, y.chunk(2)))])
    run = ddp_runs.root / "msharp"
    rows, (epoch,) = _rows(run / "steps.csv"), _rows(run / "epochs.csv")
    assert [(float(r["loss"]), float(r["acc"])) for r in rows] == [
        (pytest.approx(loss / 24, rel=1e-4), pytest.approx(100 * hit / 24)) for loss, hit in sums]
    assert float(epoch["train_loss"]) == pytest.approx(sum(loss for loss, _ in sums) / 48, rel=1e-4)
    assert float(epoch["train_acc"]) == pytest.approx(100 * sum(hit for _, hit in sums) / 48)
    trained = copy.deepcopy(ddp_runs.model)
    trained.load_state_dict(torch.load(run / "last.pt", weights_only=False)["model"])
    val, test = (train.evaluate(trained, train.DeviceLoader(*split, "cifar10", torch.device("cpu"), False),
                                train.StepSettings()) for split in ddp_runs.splits[1:])
    final = json.loads((run / "final.json").read_text())
    assert [float(epoch[k]) for k in ("val_loss", "val_acc", "test_loss", "test_acc")] == pytest.approx(
        [*val[:2], *test[:2]], rel=1e-6)
    assert final["test_acc_per_class_last"] == test[2]
    for split, *scored in zip(_ddp_eval_splits(), *(rank["evaluated"] for rank in ddp_runs.ranks)):
        loss, acc, per_class = train.evaluate(_ddp_cnn_batch()[2], train.DeviceLoader(*split, None, "cifar10",
                                              torch.device("cpu"), False), train.StepSettings())
        for got in scored:   # 1 image: rank 1's share is empty, and its collective still matches rank 0's
            np.testing.assert_allclose([got[0], got[1], *got[2]], [loss, acc, *per_class], rtol=1e-6)


def test_ddp_a_mid_epoch_checkpoint_holds_the_ranks_mean_bn_statistics(ddp_runs):
    # --max-steps 1 checkpoints after step 1: rank 0 writes it, and its model holds the mean of the ranks' running
    # statistics, as the end of an epoch does (each rank resumes its own); the resumed run ends as the uninterrupted one
    w, buffers = ddp_runs.reference[False][0]
    _assert_run_is_reference(ddp_runs.root / "run2.pt", ddp_runs.model, w, buffers)
    w, buffers = ddp_runs.reference[False][-1]
    _assert_run_is_reference(ddp_runs.root / "run3.pt", ddp_runs.model, w, buffers)


@pytest.mark.parametrize("whole, resumed", [("msharp", "stopped"), ("friendly", "friendly-stopped")])
def test_ddp_resume_continues_each_ranks_own_state(ddp_runs, whole, resumed):
    # rank 0 writes the checkpoint, but each rank resumes its own: its Counts sums (epochs.csv's train loss and
    # accuracy, the steps.csv interval the stop cut), its BN running statistics, its SAM state (FriendlySAM's EMA
    # of its own g) and its ratio statistics (persistence of its own B1 set). On one machine the resumed run is
    # the uninterrupted one bit for bit: the same sums, added in the same order, on the same numbers.
    a, b = ddp_runs.root / whole, ddp_runs.root / resumed
    assert (a / "steps.csv").read_bytes() == (b / "steps.csv").read_bytes()
    timing = ("seconds", "images_per_sec")
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(a / "epochs.csv")] == \
        [{k: v for k, v in r.items() if k not in timing} for r in _rows(b / "epochs.csv")]
    assert (a / "final.json").read_text() == (b / "final.json").read_text()
    assert_state_dicts_equal(*(torch.load(run / "last.pt", weights_only=False)["model"] for run in (a, b)))
    for rank in ddp_runs.ranks:   # each rank's own SAM state at the end
        assert_state_dicts_equal(rank["sam_state"][whole], rank["sam_state"][resumed])
    if whole == "friendly":   # the ranks' EMAs differ (each of its own g): rank 0's in rank 1's place would show
        m = [[s["friendly_m"] for s in rank["sam_state"][whole].values()] for rank in ddp_runs.ranks]
        assert len(m[0]) == len(list(ddp_runs.model.parameters())) and _relative_error(m[1], m[0]) > 0.01
        stop = torch.load(ddp_runs.root / "run5.pt", weights_only=False)["state"]
        assert stop["step"] == 2 and stop["interval"].any()   # the stop left step 1 in the interval


def test_ddp_resume_on_another_number_of_ranks_is_refused(ddp_runs, tmp_path):
    # each rank's share of the batch is its own sharpness sample and its state is its own: a run trained on two
    # ranks continues on two; a finished one may still measure its sharpness on one
    run = tmp_path / "run"
    shutil.copytree(ddp_runs.root / "friendly-stopped", run)
    shutil.copy(ddp_runs.root / "run5.pt", run / "last.pt")   # as --max-steps 2 left it
    (run / "final.json").unlink()
    argv = _tiny_run(ddp_runs.root, *DDP_RUN, "--out", str(run), "--variant", "friendlysam", "--epochs", "2",
                     "--log-every", "2", "--stats-every", "1", "--persist-from", "0", "--resume")
    _fails(argv, r"--resume with 1 process, but the run trains on 2: .*torchrun --nproc_per_node 2 train.py")


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet7"], "invalid choice: 'resnet7'"),
    (["--variant", "nosuch"], "invalid choice: 'nosuch'"),
    (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["--rho", "-0.1"], "rho must be"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--subset", "0"], "--subset: must be >= 1"),
    (["--rho", "0.05", "--rho-min", "0.1"], "--rho-min must not exceed --rho"),
    (["--data-dir", "missing.tar.gz"], "could not load cifar10 from --data-dir missing.tar.gz ("),   # not the help's
])
def test_train_bad_inputs_exit_with_a_clear_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "run"), "--device", "cpu", *argv])
    assert stop.value.code != 0
    assert message in str(stop.value.code) + capsys.readouterr().err



def test_train_base_optimizer_settings_are_judged_before_anything_is_written(tmp_path, capsys):
    # torch's SGD refuses Nesterov without momentum; train.py built it only after the data and config.json (a
    # traceback, and a half-made run that the corrected command found in its way)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(_tiny_run(tmp_path, "--nesterov", "--momentum", "0", "--out", str(out)))
    assert stop.value.code == 2 and "Nesterov momentum requires a momentum" in capsys.readouterr().err
    assert not out.exists()
    assert train.main(_tiny_run(tmp_path, "--nesterov", "--epochs", "1", "--out", str(out)))["best_epoch"] == 1

def test_train_refuses_what_the_data_or_machine_cannot_give(tmp_path, monkeypatch):
    # a subset too small for every split, CIFAR-10's class count under --dataset cifar100, CUDA where there is none
    _fails(_tiny_run(tmp_path, "--subset", "4", "--out", str(tmp_path / "small")),
           r"--subset 4 with --val-fraction 0.1 leaves 3 training and 0 validation images of 3 classes")
    ten = _image_folder(tmp_path / "ten", per_class=(2, 1), classes=10)
    _fails(["--dataset", "cifar100", "--data-dir", str(ten), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--out", str(tmp_path / "c100")], "--dataset cifar100 has 100 classes, but .* holds 10, as cifar10 does")
    assert not (tmp_path / "small").exists() and not (tmp_path / "c100").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        train.main(["--device", "cuda", "--out", str(tmp_path / "gpu")])
    assert "--device cuda: torch finds no CUDA device here" in stop.value.code and not (tmp_path / "gpu").exists()


def test_train_bad_data_dir_leaves_runs_as_they_were(tmp_path):
    fresh, finished = tmp_path / "fresh", tmp_path / "done"
    with pytest.raises(SystemExit):
        train.main(["--data-dir", str(tmp_path / "missing.tar.gz"), "--out", str(fresh), "--device", "cpu"])
    assert not fresh.exists()   # the corrected command is not blocked by a half-made run
    train.main(_tiny_run(tmp_path, "--epochs", "1", "--out", str(finished)))
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    with pytest.raises(SystemExit):   # --overwrite deletes the old run only once the new data has loaded
        train.main(["--data-dir", str(tmp_path / "missing.tar.gz"), "--out", str(finished), "--overwrite",
                    "--device", "cpu"])
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before


def test_train_never_overwrites_a_run_silently(tmp_path):
    settings = _tiny_run(tmp_path, "--epochs", "1", "--out", str(tmp_path / "run"))
    train.main(settings)
    with pytest.raises(SystemExit, match="--resume .* --overwrite"):
        train.main(settings)
    with pytest.raises(SystemExit, match="different settings: --lr"):
        train.main(settings + ["--resume", "--lr", "0.5"])
    assert train.main(settings + ["--overwrite"])["best_epoch"] == 1


def test_train_splits_noise_and_long_tail():
    labels = torch.arange(10).repeat_interleave(100)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rng = torch.Generator().manual_seed(0)
    val, rest = train.stratified_split(torch.arange(1000), labels, 0.1, rng)
    assert torch.equal(torch.bincount(labels[val]), torch.full((10,), 10))
    noisy, flipped = train.add_label_noise(labels, 0.3, "sym", classes, rng)
    assert int(flipped.sum()) == 300 and torch.equal(flipped, noisy != labels)
    # a flipped label goes to a uniformly drawn other class: each offset 1..9 takes about 300 / 9 = 33 of them (sd 5.4),
    # and the flips fall on every class alike, about 30 of its 100 (sd 4.3)
    offsets = torch.bincount((noisy - labels)[flipped] % 10, minlength=10)
    assert offsets[0] == 0 and 15 < offsets[1:].min() and offsets[1:].max() < 55, offsets
    hit = torch.bincount(labels[flipped], minlength=10)
    assert 10 < hit.min() and hit.max() < 50, hit
    noisy, flipped = train.add_label_noise(labels, 1 - 1e-9, "asym", classes, rng)
    assert set(zip(labels[flipped].tolist(), noisy[flipped].tolist())) == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}
    counts = torch.bincount(labels[train.long_tailed(torch.arange(1000), labels, 10.0, rng)])
    assert counts.tolist() == [int(100 * 10.0 ** (-c / 9)) for c in range(10)]   # n_max * factor^(-c/(C-1))


@pytest.mark.parametrize("case", ["plain", "smoothing", "imbsam", "bn-both-passes"])
def test_train_step_is_sam_on_the_written_out_loss(case):
    # SAM with SGD (lr 0.1, no momentum) on the loss written out here: d = grad L(w + e), e = rho g/||g||; label
    # smoothing eps: (1 - eps) CE + eps mean_k(-log p_k); ImbSAM: SAM on 2 x the tail classes' loss sum / n, plus the
    # head loss's plain gradient; BN's running statistics count the first pass only unless freeze_bn is off
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(12, 4, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 0, 2, 0, 1, 0, 0, 1])
    eps = 0.1 if case == "smoothing" else 0.0
    tail = train.tail_mask(y, 3, 3) if case == "imbsam" else None   # counts (6, 4, 2): class 2 alone is under 3
    assert train.tail_mask(y, 4, 3).tolist() == [False, False, True] and train.tail_mask(y, 5, 3).tolist() == [False, True, True]
    settings = train.StepSettings(freeze_bn=case != "bn-both-passes", label_smoothing=eps, tail=tail, tail_weight=2.0)
    opt = SAM(model.parameters(), torch.optim.SGD, variant="imbsam" if tail is not None else "sam", rho=0.5, lr=0.1)
    with torch.no_grad():
        hit = copy.deepcopy(model)(x).argmax(1) == y   # the first pass's predictions (BN on this batch)
    flipped = torch.arange(12) % 3 == 0
    counts = train.train_step(model, opt, x, y, settings, flipped=flipped)
    assert [float(c) for c in counts[1:]] == [hit.sum(), 12, (hit & ~flipped).sum(), 8, (hit & flipped).sum(), 4]

    names = [n for n, _ in reference.named_parameters()]
    w = [p.detach().clone().requires_grad_() for p in reference.parameters()]

    def losses(ws):   # per-image loss, written out; the forward updates reference's BN statistics
        logp = torch.log_softmax(torch.func.functional_call(reference, dict(zip(names, ws)), (x,)), 1)
        return -(1 - eps) * logp.gather(1, y[:, None]).squeeze(1) - eps * logp.mean(1)
    is_tail = torch.tensor([k == 2 for k in y.tolist()]) if case == "imbsam" else torch.ones(len(y), dtype=torch.bool)
    per = losses(w)
    assert float(counts.loss_sum) == pytest.approx(float(per.detach().sum()), rel=1e-5)   # a sum over the batch, not its mean
    climbed = 2.0 * per[is_tail].sum() / len(y) if case == "imbsam" else per.mean()
    g = torch.autograd.grad(climbed, w, retain_graph=True)
    head = torch.autograd.grad(per[~is_tail].sum() / len(y), w) if case == "imbsam" else [torch.zeros_like(v) for v in w]
    n = torch.sqrt(sum((v * v).sum() for v in g))
    at = [(v + 0.5 * gv / n).detach().requires_grad_() for v, gv in zip(w, g)]
    if case != "bn-both-passes":
        disable_running_stats(reference)
    per = losses(at)
    gp = torch.autograd.grad(2.0 * per[is_tail].sum() / len(y) if case == "imbsam" else per.mean(), at)
    enable_running_stats(reference)
    expected = [v - 0.1 * (a + b) for v, a, b in zip(w, gp, head)]
    # train_step takes the loss of float32 logits (bf16 autocast safe): float32 rounding, not float64
    assert_lists_close([snap(model.parameters())], [[v.detach() for v in expected]], rtol=1e-5, atol=1e-7)
    assert_lists_close([snap(model[1].buffers())], [snap(reference[1].buffers())], rtol=1e-5, atol=1e-7)


def test_train_passes_label_smoothing_and_freeze_bn_stats_to_its_steps(tmp_path):
    # one step from the same weights and batch: the smoothed loss (1 - eps) CE + eps U is linear in eps, and BN's
    # num_batches_tracked counts the passes that update its running statistics (1 frozen, 2 not)
    first = {}
    for name, extra in (("e0", []), ("e3", ["--label-smoothing", "0.3"]), ("e6", ["--label-smoothing", "0.6"]),
                        ("both", ["--no-freeze-bn-stats"])):
        train.main(_tiny_run(tmp_path, "--out", str(tmp_path / name), "--max-steps", "1", *extra))
        first[name] = float(_rows(tmp_path / name / "steps.csv")[0]["loss"])
    assert first["e6"] - first["e0"] == pytest.approx(2 * (first["e3"] - first["e0"]), abs=1e-5)
    assert abs(first["e3"] - first["e0"]) > 1e-3
    counts = {name: {int(v) for k, v in torch.load(tmp_path / name / "last.pt", weights_only=False)["model"].items()
                     if k.endswith("num_batches_tracked")} for name in ("e0", "both")}
    assert counts == {"e0": {1}, "both": {2}}


def test_train_autocasts_to_bf16_only_where_asked(tmp_path, monkeypatch):
    # --dtype auto on a CPU and --dtype fp32 train in full precision, --dtype bf16 under bf16 autocast: the dtype of
    # the logits of both of the step's forward passes (a linear head under CPU autocast gives bf16), not just the
    # settings the step is handed
    step, seen = train.train_step, []

    def watched(model, opt, x, y, settings, *rest):
        logits = []
        hook = model.register_forward_hook(lambda m, inputs, output: logits.append(output.dtype))
        try:
            return step(model, opt, x, y, settings, *rest)
        finally:
            hook.remove()
            seen.append((settings.autocast_dtype, settings.device_type, logits))
    monkeypatch.setattr(train, "train_step", watched)
    for name in ("auto", "bf16", "fp32"):
        train.main(_tiny_run(tmp_path, "--dtype", name, "--max-steps", "1", "--out", str(tmp_path / name)))
    full, half = [torch.float32] * 2, [torch.bfloat16] * 2
    assert seen == [(None, "cpu", full), (torch.bfloat16, "cpu", half), (None, "cpu", full)]


def test_train_builds_the_optimizer_the_command_line_asks_for():
    model = torch.nn.Linear(3, 2)
    args = train.parse_settings(["--data-dir", "x", "--variant", "saner", "--lr", "0.3", "--momentum", "0.8", "--nesterov",
                                 "--weight-decay", "5e-4", "--condition-warmup-epochs", "2.5"])
    opt = train.build_optimizer(args, model, steps_per_epoch=10, world=1)
    group = opt.base_optimizer.param_groups[0]
    assert type(opt.base_optimizer) is torch.optim.SGD and opt.variant == "saner"
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.3, 0.8, True, 5e-4)
    assert opt.flags["condition_warmup"] == 25   # epochs times steps per epoch
    args.condition_warmup_epochs = 2.57   # 25.7 steps: the nearest whole step
    assert train.build_optimizer(args, model, steps_per_epoch=10, world=1).flags["condition_warmup"] == 26
    args = train.parse_settings(["--data-dir", "x", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05"])
    opt = train.build_optimizer(args, model, steps_per_epoch=10, world=1)
    assert type(opt.base_optimizer) is torch.optim.AdamW and opt.base_optimizer.param_groups[0]["weight_decay"] == 0.05


def _conv(cin, cout, k):
    return cin * cout * k * k


def _pooled_shape(model):
    """The shape of the feature map a model's global average pooling gets from one 32x32 image."""
    shapes = []
    pool = next(m for m in model.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d))
    pool.register_forward_hook(lambda m, inputs, output: shapes.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    return shapes[0]


def test_train_models_have_their_papers_widths_strides_and_shortcuts():
    """Parameter counts written out from each architecture's definition (3x3 stem, no max-pool, BN with a weight
    and a bias, one linear head) and the feature map each pools: ResNet-18 (kuangliu's 11.17M: 64-128-256-512, 1x1
    conv + BN projections where the shape changes, 4x4 at the end), WRN-28-10 (Zagoruyko & Komodakis' 36.5M:
    pre-activation, 160-320-640, 1x1 conv projections, 8x8), PyramidNet-110 alpha 48 (Han et al.'s 1.7M: block k of
    54 has round(16 + 48 k / 54) channels, weightless shortcuts, 8x8) and the 24k CNN."""
    resnet, cin = _conv(3, 64, 3) + 2 * 64, 64
    for p in (64, 128, 256, 512):
        for _ in range(2):
            resnet += _conv(cin, p, 3) + _conv(p, p, 3) + 4 * p + (_conv(cin, p, 1) + 2 * p if cin != p else 0)
            cin = p
    wrn, cin = _conv(3, 16, 3), 16
    for cout in (160, 320, 640):
        for _ in range(4):
            wrn += 2 * cin + _conv(cin, cout, 3) + 2 * cout + _conv(cout, cout, 3)
            wrn += _conv(cin, cout, 1) if cin != cout else 0
            cin = cout
    pyramid, cin = _conv(3, 16, 3) + 2 * 16, 16
    for k in range(1, 55):
        d = round(16 + 48 * k / 54)
        pyramid += 2 * cin + _conv(cin, d, 3) + 2 * d + _conv(d, d, 3) + 2 * d
        cin = d
    expected = {"resnet18": (resnet + 512 * 10 + 10, (1, 512, 4, 4)),
                "wrn28-10": (wrn + 2 * 640 + 640 * 10 + 10, (1, 640, 8, 8)),
                "pyramidnet110": (pyramid + 2 * 64 + 64 * 10 + 10, (1, 64, 8, 8)),
                "cnn": (_conv(3, 16, 3) + _conv(16, 32, 3) + _conv(32, 64, 3) + 2 * (16 + 32 + 64) + 650,
                        (1, 64, 8, 8))}
    for name, (count, shape) in expected.items():
        model = train.MODELS[name](10, 1.0)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert _pooled_shape(model) == shape, name
    # ResNet-50: bottlenecks of 4x expansion, a projection already at the first block; --width scales every stage
    assert _pooled_shape(train.MODELS["resnet50"](10, 1.0)) == (1, 2048, 4, 4)
    assert _pooled_shape(train.MODELS["resnet18"](10, 0.5)) == (1, 256, 4, 4)
    assert _pooled_shape(train.MODELS["wrn16-8"](10, 1.0)) == (1, 512, 8, 8)
    assert train.MODELS["pyramidnet272"](10, 1.0)[-1].in_features == 4 * (16 + 200)   # bottleneck, alpha 200



def test_train_wide_resnet_of_a_tiny_width_keeps_one_channel_where_the_others_do():
    # --width 0.003 makes WRN-16-8's k 0.024: 16 k = 0.384, 0.768, 1.536 per stage round to 0, 1, 2 channels; a
    # zero-channel conv crashed the run after config.json (ResNet, VGG and the CNN already keep at least one)
    model = train.MODELS["wrn16-8"](10, 0.003)
    widths = sorted({m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)} - {16})
    assert widths == [1, 2] and _pooled_shape(model) == (1, 2, 8, 8)


def test_train_pyramidnet_and_vgg16_halve_the_map_where_their_papers_do():
    """PyramidNet-110: 3 stages of 18 blocks on 32x32, 16x16 and 8x8 maps, the first block of stages 2 and 3 striding.
    VGG-16 (config D): 13 conv3x3 (with a bias) + BN + ReLU layers, 5 max-pools down to 1x1, then the linear head."""
    model, sizes = train.MODELS["pyramidnet110"](10, 1.0), []
    for block in (m for m in model.modules() if isinstance(m, train.PyramidBlock)):
        block.register_forward_hook(lambda m, inputs, output: sizes.append(output.shape[-1]))
    _pooled_shape(model)
    assert sizes == [32] * 18 + [16] * 18 + [8] * 18
    widths = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    count, cin = 0, 3
    for v in widths:
        if v != "M":
            count, cin = count + _conv(cin, v, 3) + v + 2 * v, v
    vgg = train.MODELS["vgg16"](10, 1.0)
    assert sum(p.numel() for p in vgg.parameters()) == count + 512 * 10 + 10
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules()) == 13
    assert _pooled_shape(vgg) == (1, 512, 1, 1)


def _bn_by_hand(t, bn):
    """Eval-mode BatchNorm2d written out."""
    shape = (1, -1, 1, 1)
    return (t - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(shape) \
        + bn.bias.view(shape)


def test_train_wide_and_pyramid_blocks_add_their_shortcuts_as_the_papers_do():
    """WRN's pre-activation block: o = relu(bn1(x)), conv2(relu(bn2(conv1(o)))) plus a 1x1 conv of o where the shape
    changes, else x itself. PyramidNet's: bn-conv-bn-relu-conv-bn with no ReLU after the last BN, plus the input
    average-pooled 2x2 on a stride and zero-padded with the new channels after its own."""
    torch.manual_seed(0)
    conv = torch.nn.functional.conv2d
    x = torch.randn(2, 4, 6, 6)
    for cout, stride in ((6, 2), (4, 1)):
        block = train.WideBlock(4, cout, stride).eval()
        with torch.no_grad():
            for bn in (block.bn1, block.bn2):
                bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.normal_(), bn.bias.normal_()
        o = torch.relu(_bn_by_hand(x, block.bn1))
        y = conv(torch.relu(_bn_by_hand(conv(o, block.conv1.weight, stride=stride, padding=1), block.bn2)),
                 block.conv2.weight, padding=1)
        shortcut = conv(o, block.shortcut.weight, stride=stride) if cout != 4 else x
        assert torch.allclose(block(x), y + shortcut, atol=1e-5), (cout, stride)
    for stride in (2, 1):
        block = train.PyramidBlock(4, 6, stride, bottleneck=False).eval()
        exit_bn = block.body[-1]
        with torch.no_grad():   # the body's output is then exit_bn's bias alone, some of it negative
            exit_bn.weight.zero_(), exit_bn.bias.copy_(torch.tensor([-1.0, 2.0, -0.5, 0.3, -2.0, 1.0]))
        pooled = x.view(2, 4, 3, 2, 3, 2).mean((3, 5)) if stride == 2 else x
        shortcut = torch.cat([pooled, torch.zeros(2, 2, *pooled.shape[2:])], 1)
        assert torch.allclose(block(x), exit_bn.bias.view(1, -1, 1, 1) + shortcut, atol=1e-6), stride


def test_train_evaluation_and_hutchinson_by_hand():
    # evaluate leaves the model training; the trace estimate is the mean of z.Hz over Rademacher z, its SE std/sqrt(n)
    model = torch.nn.Sequential(torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    loader = train.DeviceLoader(torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8), torch.arange(10) % 3, None,
                                "cifar10", torch.device("cpu"), channels_last=False)
    train.evaluate(torch.nn.Sequential(torch.nn.Flatten(), model), loader, train.StepSettings())
    assert model.training
    matrix = torch.diag(torch.arange(1.0, 9.0, dtype=DT)) + 0.5
    mean, se = train.hutchinson_trace(lambda z: matrix @ z, torch.zeros(8, dtype=DT), torch.Generator().manual_seed(0),
                                      max_probes=12, rel_se=0.0)   # rel_se 0: all 12 probes
    rng = torch.Generator().manual_seed(0)
    samples = [float(z @ matrix @ z) for z in (torch.randint(0, 2, (8,), generator=rng).to(DT) * 2 - 1 for _ in range(12))]
    assert mean == pytest.approx(np.mean(samples)) and se == pytest.approx(np.std(samples, ddof=1) / math.sqrt(12))


def test_train_evaluation_gives_nan_for_a_class_without_images():
    # accuracy per class is hits / images of that class: a class the split lacks (a long tail's val split) has no
    # accuracy, NaN, not 0% (which would read as a class never predicted and pull a head or tail mean down)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images, labels = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8), torch.arange(10) % 2   # no class 2
    loader = train.DeviceLoader(images, labels, None, "cifar10", torch.device("cpu"), channels_last=False)
    loss, acc, per_class = train.evaluate(model, loader, train.StepSettings(), batch_size=4)
    with torch.no_grad():
        logits = model((images / 255 - CIFAR10_MEAN) / CIFAR10_STD)
    hit = logits.argmax(1) == labels
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert acc == pytest.approx(100 * float(hit.double().mean()))
    assert per_class[:2] == pytest.approx([100 * float(hit[labels == k].double().mean()) for k in range(2)])
    assert len(per_class) == 3 and math.isnan(per_class[2])


def test_train_schedules_match_their_formulas():
    total, per_epoch = 100, 10

    def factors(*argv):
        args = train.parse_settings(["--data-dir", "x", *argv])
        return [train.lr_factor(args, step, total, per_epoch) for step in range(total)]
    cosine = [0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    assert factors("--schedule", "cosine") == pytest.approx(cosine, abs=1e-15)
    warm = factors("--schedule", "cosine", "--warmup-epochs", "2")   # 20 linear steps up to 1, then cosine over 80
    assert warm == pytest.approx([(s + 1) / 20 for s in range(20)] + [0.5 * (1 + math.cos(math.pi * s / 80)) for s in range(80)])
    assert factors("--schedule", "step") == [0.2 ** ((s >= 30) + (s >= 60) + (s >= 80)) for s in range(total)]
    assert factors("--schedule", "multistep", "--milestones", "0.25", "0.5", "--gamma", "0.5") == \
        [0.5 ** ((s >= 25) + (s >= 50)) for s in range(total)]
    assert factors("--schedule", "constant") == [1.0] * total
    args = train.parse_settings(["--data-dir", "x", "--rho", "0.2", "--rho-min", "0.05", "--lr", "0.4"])
    group = {"lr": None, "rho": 0.2}
    train.set_schedule(types.SimpleNamespace(param_groups=[group]), args, 0.2, 50, total, per_epoch)
    assert group == pytest.approx({"lr": 0.4 * cosine[50], "rho": 0.05 + 0.15 * cosine[50]})   # GSAM: rho follows lr


def test_train_warm_up_of_a_fractional_number_of_steps_never_passes_the_peak_lr():
    # --warmup-epochs 0.5 of 5 steps: a linear ramp (s + 1) / 2.5 that stops at the peak 1 (step 2's was 1.2, an lr
    # 20% above --lr), then the cosine over the 97.5 steps after the warm-up
    args = train.parse_settings(["--data-dir", "x", "--warmup-epochs", "0.5"])
    got = [train.lr_factor(args, step, 100, 5) for step in range(100)]
    cosine = [0.5 * (1 + math.cos(math.pi * (s - 2.5) / 97.5)) for s in range(3, 100)]
    assert got == pytest.approx([0.4, 0.8, 1.0] + cosine)


def test_train_splits_come_from_the_training_images_at_random_per_class():
    per_class, n_classes = 100, 10
    labels = torch.arange(n_classes).repeat(per_class)   # interleaved: index order says nothing about class
    images = torch.arange(len(labels)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.int64)   # pixel = index
    test = (-1 - torch.arange(50)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2), torch.arange(50) % n_classes
    data = dict(train=(images, labels), test=test, classes=[f"c{k}" for k in range(n_classes)])
    args = train.parse_settings(["--data-dir", "x", "--subset", "500", "--label-noise", "0.2555", "--seed", "3"])
    (x_train, y_train, flipped), (x_val, y_val, _), (x_test, y_test, _) = train.make_splits(args, data)
    train_idx, val_idx = x_train[:, 0, 0, 0], x_val[:, 0, 0, 0]
    assert torch.equal(x_test, test[0]) and torch.equal(y_test, test[1])
    assert (train_idx >= 0).all() and (val_idx >= 0).all() and not set(train_idx.tolist()) & set(val_idx.tolist())
    assert torch.equal(y_val, labels[val_idx]) and torch.equal(y_train[~flipped], labels[train_idx][~flipped])
    assert torch.bincount(labels[val_idx]).tolist() == [5] * n_classes        # 10% of the 50 per class of the subset
    assert torch.bincount(labels[train_idx]).tolist() == [45] * n_classes
    pool = torch.cat([train_idx, val_idx]).sort().values   # drawn at random in each class, not the first ones
    assert not torch.equal(pool[labels[pool] == 0], torch.nonzero(labels == 0).flatten()[:50])
    assert not all(torch.equal(val_idx[labels[val_idx] == c].sort().values, pool[labels[pool] == c][:5]) for c in range(n_classes))
    assert int(flipped.sum()) == math.floor(0.2555 * 450) == 114                 # floor(rate N) labels flipped


def test_train_augmentation_is_a_padded_crop_a_mirror_and_a_cutout():
    # origin 4.1: a 32x32 window of the image zero-padded by 4 pixels, mirrored with p = 0.5, then normalised;
    # --cutout sets a 16x16 square (clipped at the border, centre anywhere) to 0 in half the images
    n = 256
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % 10
    loader = train.DeviceLoader(images, labels, None, "cifar10", torch.device("cpu"), channels_last=False)
    idx = torch.randperm(n, generator=gen)
    plain, got_labels, _ = loader.train_batch(idx, torch.Generator().manual_seed(1), cutout=False)
    cut, _, _ = loader.train_batch(idx, torch.Generator().manual_seed(1), cutout=True)   # the same crops and mirrors
    assert torch.equal(got_labels, labels[idx])
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    pixels = ((plain * std + mean) * 255).round()   # normalisation undone: the pixel values, padding 0
    assert (pixels - (plain * std + mean) * 255).abs().max() < 1e-3
    padded = torch.nn.functional.pad(images[idx].float(), (4, 4, 4, 4))
    found = torch.zeros(n, dtype=torch.long)
    rows, columns, mirrored = set(), set(), 0
    for dy, dx, mirror in itertools.product(range(9), range(9), (False, True)):
        window = padded[:, :, dy:dy + 32, dx:dx + 32]
        match = (pixels == (window.flip(-1) if mirror else window)).flatten(1).all(1)
        found += match
        rows, columns = (rows | {dy}, columns | {dx}) if match.any() else (rows, columns)
        mirrored += int(match.sum()) if mirror else 0
    assert (found == 1).all() and rows == columns == set(range(9)) and 0.35 < mirrored / n < 0.65
    holes = cut == 0
    assert torch.equal(cut.masked_fill(holes, 0), plain.masked_fill(holes, 0)) and not (plain == 0).any()
    assert (holes == holes[:, :1]).all()   # the same square in every channel
    sizes = []
    for hole in holes[:, 0]:
        if hole.any():
            rows, columns = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
            assert hole.sum() == len(rows) * len(columns)   # a rectangle
            for at in (rows, columns):   # contiguous, 16 long unless the border clips it (then 8 to 16)
                assert at[-1] - at[0] + 1 == len(at) and 8 <= len(at) <= 16
                assert len(at) == 16 or at[0] == 0 or at[-1] == 31
            sizes.append(len(rows))
    assert 0.35 < len(sizes) / n < 0.65 and sizes.count(16) > len(sizes) / 3


def test_train_augmentation_crops_images_that_are_not_square():
    # a 5x9 image (any size decode accepts): each crop is a 5x9 window of the image zero-padded by 4, maybe mirrored
    n, gen = 64, torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (n, 3, 5, 9), dtype=torch.uint8, generator=gen)
    loader = train.DeviceLoader(images, torch.zeros(n, dtype=torch.long), None, "cifar10", torch.device("cpu"),
                                channels_last=False)
    x, _, _ = loader.train_batch(torch.arange(n), torch.Generator().manual_seed(1), cutout=False)
    pixels = ((x * CIFAR10_STD + CIFAR10_MEAN) * 255).round()
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4))
    found = torch.zeros(n, dtype=torch.long)
    for dy, dx, mirror in itertools.product(range(9), range(9), (False, True)):
        window = padded[:, :, dy:dy + 5, dx:dx + 9]
        found += (pixels == (window.flip(-1) if mirror else window)).flatten(1).all(1)
    assert x.shape == (n, 3, 5, 9) and (found == 1).all()


def test_train_cutout_centres_are_any_pixel_row_and_column_drawn_apart():
    # DeVries & Taylor's cutout: the square's centre is any pixel of the image, its row and column drawn on their own
    # for every image (the square clipped at the border); read back from each hole: 8 rows above its first one, or
    # 7 below its last where the top border clipped it
    n = 2048
    loader = train.DeviceLoader(torch.full((n, 3, 32, 32), 128, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                                None, "cifar10", torch.device("cpu"), channels_last=False)
    x, _, _ = loader.train_batch(torch.arange(n), torch.Generator().manual_seed(0), cutout=True)
    holes = x[:, 0] == 0   # the grey image and the padding normalise to nonzero values
    holes = holes[holes.flatten(1).any(1)]
    centres = []
    for axis in (2, 1):   # rows, then columns
        lines = holes.any(axis)
        first, last = lines.float().argmax(1), 31 - lines.flip(1).float().argmax(1)
        centres.append(torch.where(first > 0, first + 8, last - 7))
    cy, cx = centres
    assert 0.45 < len(holes) / n < 0.55
    for c in (cy, cx):
        counts = torch.bincount(c, minlength=32)
        assert len(counts) == 32 and counts.min() > 0.5 * len(c) / 32 and counts.max() < 1.5 * len(c) / 32
    assert float((cy == cx).double().mean()) < 2 / 32   # independent: about 1 in 32 on the diagonal


def test_train_normalises_each_dataset_with_its_published_mean_and_std():
    # (pixel / 255 - mean) / std per channel, evaluation batches as training ones; CIFAR-100's published constants
    cifar100 = [torch.tensor(v).view(1, 3, 1, 1) for v in ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))]
    images = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for dataset, (mean, std) in (("cifar10", (CIFAR10_MEAN, CIFAR10_STD)), ("cifar100", cifar100)):
        loader = train.DeviceLoader(images, torch.zeros(5, dtype=torch.long), None, dataset, torch.device("cpu"), False)
        (x, _), = loader.batches(5)
        assert torch.allclose(x, (images / 255 - mean) / std, atol=1e-5), dataset


# ------------------------------------------------------------------ train.py: reliability (issue 8)
STEPS = 5   # a _tiny_run epoch: 66 training images, batch 12


@pytest.fixture(scope="module")
def finished_and_stopped(tmp_path_factory):
    """An uninterrupted tiny run, and the same run stopped by --max-steps 4 (copied by each test)."""
    root = tmp_path_factory.mktemp("runs")
    train.main(_tiny_run(root, "--out", str(root / "done")))
    train.main(_tiny_run(root, "--out", str(root / "stopped"), "--max-steps", "4"))
    return root


def _copy_stopped(root, tmp_path):
    shutil.copytree(root / "stopped", tmp_path / "run")
    return _tiny_run(root, "--out", str(tmp_path / "run"))


def _same_logs(a, b):
    """steps.csv and sharpness.csv byte for byte; epochs.csv but its timing columns; final.json."""
    for name in ("steps.csv", "sharpness.csv", "final.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    timing = ("seconds", "images_per_sec")
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in _rows(run / "epochs.csv")] for run in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == 3


def _fails(argv, match):
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code not in (0, None) and re.search(match, str(stop.value.code)), stop.value.code


def test_train_resume_of_a_finished_run_returns_its_final_json_and_says_so_once_over_ranks(tmp_path, capsys,
                                                                                        finished_and_stopped):
    run = tmp_path / "run"
    shutil.copytree(finished_and_stopped / "done", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = _tiny_run(finished_and_stopped, "--out", str(run), "--resume")
    capsys.readouterr()
    for rank in (0, 1):   # as each of two torchrun ranks: the folder is rank 0's to report
        final = train.train(train.parse_settings(argv), argv, rank, 2, torch.device("cpu"))
        assert final == json.loads((run / "final.json").read_text())
    assert capsys.readouterr().out == f"{run} is finished; nothing to resume\n"
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_train_never_deletes_a_folder_it_did_not_write(tmp_path, finished_and_stopped):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep").write_text("a week of results")
    for again in ([], ["--overwrite"]):
        _fails(_tiny_run(tmp_path, "--out", str(other), *again), "not a run folder")
    assert [p.name for p in other.iterdir()] == ["keep"]
    run = tmp_path / "run"
    shutil.copytree(finished_and_stopped / "done", run)
    (run / "notes.txt").write_text("mine")
    train.main(_tiny_run(tmp_path, "--out", str(run), "--epochs", "1", "--overwrite"))
    assert (run / "notes.txt").read_text() == "mine" and len(_rows(run / "epochs.csv")) == 1


def test_train_second_run_on_the_same_folder_is_refused(tmp_path):
    holder = train.RunFolder(tmp_path / "run", writer=True)
    holder.claim()   # as a run in another process holds it: flock conflicts between open files
    _fails(_tiny_run(tmp_path, "--out", str(tmp_path / "run")), "another train.py is writing")
    holder.release(unmake=True)
    assert not (tmp_path / "run").exists()   # neither left anything behind


def _archive(tmp_path):
    images = _image_folder(tmp_path / "images")
    path = tmp_path / "images.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(images, arcname="images")
    return path


@pytest.mark.parametrize("damage", ["truncate", "cut in the header", "overwrite"])
def test_train_damaged_archive_fails_naming_it_and_caches_nothing(tmp_path, damage):
    # a .tar.gz cut before its first member (a download stopped early) is damaged too, not "no tar archive"
    path = _archive(tmp_path)
    data = bytearray(path.read_bytes())
    if damage != "overwrite":
        data = data[:len(data) * 2 // 3 if damage == "truncate" else 100]
    else:
        data[len(data) // 3:len(data) // 3 + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    argv = ["--model", "cnn", "--data-dir", str(path), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--out", str(tmp_path / "run")]
    _fails(argv, re.escape(str(path)) + " is damaged or truncated")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("cache/*"))


def test_train_a_data_file_that_is_no_archive_is_named_so_and_an_archive_of_any_name_loads(tmp_path):
    # an image or a text file is no archive: "damaged, download it again" would send the user after a good file
    renamed = _archive(tmp_path).rename(tmp_path / "images.data")
    png = tmp_path / "images" / "train" / "class0" / "0.png"
    (tmp_path / "notes.txt").write_text("CIFAR-100\n")
    for path in (png, tmp_path / "notes.txt"):
        _fails(["--data-dir", str(path), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
                "--out", str(tmp_path / "run")], re.escape(str(path)) + " is a file, but no tar archive")
    from_archive = train.load_images(train.parse_settings(_tiny_run(tmp_path, "--data-dir", str(renamed))))
    assert from_archive["fingerprint"] == train.load_images(train.parse_settings(_tiny_run(tmp_path)))["fingerprint"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("freeze", ["--freeze-bn-stats", "--no-freeze-bn-stats"])
def test_train_skipped_steps_leave_weights_and_bn_buffers(tmp_path, freeze):
    # rho 1e30 puts w + e where the activations overflow: every g' is non-finite, every step is skipped
    train.main(_tiny_run(tmp_path, "--rho", "1e30", freeze, "--max-steps", "3", "--out", str(tmp_path / "run")))
    torch.manual_seed(42)   # the run's --seed: its initial model
    initial = train.MODELS["cnn"](3, 1.0).state_dict()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    for name, tensor in initial.items():
        assert torch.equal(saved["model"][name], tensor), name


def test_train_cache_follows_the_files_and_decoding_shows_progress(tmp_path, capsys):
    args = train.parse_settings(_tiny_run(tmp_path))
    first = train.load_images(args)
    assert "decoding images: 90/90 images" in capsys.readouterr().err
    for f in sorted((tmp_path / "images" / "train" / "class1").iterdir())[:5]:
        f.unlink()   # the top folder's modification time stays as it was
    second = train.load_images(args)
    assert len(second["train"][1]) == len(first["train"][1]) - 5
    assert second["fingerprint"] != first["fingerprint"] and "decoding images: 85/85" in capsys.readouterr().err
    again = train.load_images(args)   # now from the rebuilt cache
    assert again["fingerprint"] == second["fingerprint"] and "decoding" not in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [
    ("--width", "nan"), ("--width", "inf"), ("--imbalance", "nan"), ("--imbalance", "inf"), ("--label-noise", "nan"),
    ("--seed", "12345678901234567890123"), ("--seed", "-1"), ("--lr", "inf"), ("--momentum", "nan"),
    ("--val-fraction", "1"), ("--gamma", "0"), ("--tail-weight", "nan"), ("--warmup-epochs", "inf"),
    ("--label-smoothing", "nan"), ("--rho-min", "nan"), ("--condition-warmup-epochs", "-1"),
])
def test_train_numeric_flags_have_a_finite_range(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        train.main(_tiny_run(tmp_path, "--out", str(tmp_path / "run"), flag, value))
    assert stop.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_resume_refuses_other_data(tmp_path, finished_and_stopped):
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    other = _image_folder(tmp_path / "other", per_class=(23, 6))
    argv[argv.index("--data-dir") + 1] = str(other)
    _fails(argv + ["--resume"], "holds other data than this run trained on")


@pytest.mark.parametrize("damage,lost,holds", [("tail", [], None), ("cut", [2, 3], "whole rows up to step 1"),
                                               ("middle", [1, 2, 3], "whole rows up to step 0"),
                                               ("not-utf8", [2, 3], "whole rows up to step 1"),
                                               ("deleted", [0, 1, 2, 3], "no whole row"),
                                               ("header-cut", [0, 1, 2, 3], "no whole row")])
def test_train_resume_cuts_partial_rows_and_nul_bytes(tmp_path, finished_and_stopped, capsys, damage, lost, holds):
    """A row cut by a crash and the zeros a file system leaves after a power cut go. Rows the checkpoint (at step 4)
    logged that are gone (a power cut can keep the checkpoint and lose the rows flushed before it), deleted, or
    behind a damaged row leave a gap in the log, and a warning says which."""
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    run = tmp_path / "run"
    steps = run / "steps.csv"
    lines = steps.read_bytes().split(b"\n")   # the header, steps 0 to 3, ""
    if damage == "tail":
        steps.write_bytes(steps.read_bytes() + b"4,0.9,0.05")   # a row cut off by a crash
    elif damage == "cut":
        steps.write_bytes(b"\n".join(lines[:3]) + b"\n2,0.4")
    elif damage == "middle":
        steps.write_bytes(b"\n".join(lines[:2] + [bytes(len(lines[2]))] + lines[3:]))
    elif damage == "not-utf8":   # a flipped bit in a field other than the step: no UTF-8, the field count intact
        steps.write_bytes(b"\n".join(lines[:3] + [lines[3].replace(b".", b"\xff", 1)] + lines[4:]))
    elif damage == "header-cut":   # not another train.py's columns: a header cut off, no row after it
        steps.write_bytes(lines[0][:20])
    else:
        steps.unlink()
    with open(run / "epochs.csv", "ab") as f:
        f.write(bytes(300))     # the zeros a file system leaves after a power cut
    capsys.readouterr()
    train.main(argv + ["--resume"])
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned == ([f"warning: {steps} holds {holds}, but the checkpoint logged up to step 3: the rows between "
                       "are lost, and the log goes on after a gap"] if lost else [])
    done = finished_and_stopped / "done"
    if not lost:
        return _same_logs(done, run)
    whole = (done / "steps.csv").read_text().splitlines(keepends=True)
    assert steps.read_text() == "".join(whole[:1] + [row for row in whole[1:] if int(row.split(",")[0]) not in lost])
    assert (run / "final.json").read_bytes() == (done / "final.json").read_bytes()


def test_train_resume_with_other_columns_is_refused_and_keeps_every_row(tmp_path, finished_and_stopped):
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    steps = tmp_path / "run" / "steps.csv"
    rows = [line.split(",") for line in steps.read_text().splitlines()]
    gone = rows[0].index("mag_up")
    older = "".join(",".join(row[:gone] + row[gone + 1:]) + "\n" for row in rows)
    steps.write_text(older)   # the columns an older train.py wrote: one statistic fewer
    _fails(argv + ["--resume"], "has another train.py's columns")
    assert steps.read_text() == older


def test_train_max_steps_below_the_current_step_is_refused(tmp_path, finished_and_stopped):
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    for steps in ("2", "4"):
        _fails(argv + ["--resume", "--max-steps", steps], "already at step 4")


def test_train_max_steps_at_the_runs_last_step_finishes_the_run(tmp_path, finished_and_stopped):
    """--max-steps that reaches the run's end (3 epochs of STEPS steps) leaves nothing to stop: the run finishes,
    last epoch evaluated and final.json written, as the uninterrupted run; from the start, and resuming a stopped run."""
    done = finished_and_stopped / "done"
    fresh = _tiny_run(finished_and_stopped, "--out", str(tmp_path / "fresh"), "--max-steps", str(3 * STEPS))
    resumed = _copy_stopped(finished_and_stopped, tmp_path) + ["--resume", "--max-steps", str(3 * STEPS)]
    for argv, out in ((fresh, tmp_path / "fresh"), (resumed, tmp_path / "run")):
        assert train.main(argv) == json.loads((done / "final.json").read_text())
        _same_logs(out, done)
    # one step short of the end, in the last epoch, it stops there as anywhere else
    assert train.main(_tiny_run(finished_and_stopped, "--out", str(tmp_path / "short"), "--max-steps",
                                str(3 * STEPS - 1))) is None
    assert len(_rows(tmp_path / "short" / "steps.csv")) == 3 * STEPS - 1 and not (tmp_path / "short" / "final.json").exists()


def test_train_bad_paths_and_checkpoints_get_messages(tmp_path, finished_and_stopped):
    (tmp_path / "file").write_text("x")
    _fails(_tiny_run(tmp_path, "--out", str(tmp_path / "file")), "is a file, not a folder")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    _fails(_tiny_run(tmp_path, "--out", str(tmp_path / "link")), "is a symbolic link")
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    last = tmp_path / "run" / "last.pt"
    whole = last.read_bytes()
    for damaged in (b"", whole[:len(whole) // 2]):
        last.write_bytes(damaged)
        _fails(argv + ["--resume"], "cannot read .*last.pt")
    # a folder that cannot be made even by root (the checks below this one are skipped there): under a file
    _fails(_tiny_run(tmp_path, "--out", str(tmp_path / "file" / "run")),
           "cannot write to --out " + re.escape(str(tmp_path / "file" / "run")) + ": Not a directory")
    assert (tmp_path / "file").read_text() == "x"
    if os.geteuid() != 0:   # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails(_tiny_run(tmp_path, "--out", str(locked / "run")), "cannot write to --out")
        locked.chmod(0o700)


SHARP = ["--sharpness", "--sharpness-batches", "2", "--sharpness-batch-size", "6", "--sharpness-iters", "10"]


@pytest.mark.parametrize("name,damage,extra", [("best.pt", "missing", SHARP), ("best.pt", "cut", SHARP),
                                               ("best.pt", "empty", SHARP), ("final.json", "cut", []),
                                               ("config.json", "cut", SHARP)])
def test_train_resume_with_a_damaged_run_file_fails_naming_it_and_writes_nothing(tmp_path, finished_and_stopped,
                                                                                 name, damage, extra):
    """A best.pt the end's --sharpness measures, a final.json or a config.json gone or damaged since train.py wrote
    it (whole) is named in a message, before anything is written; without best.pt the run finishes without
    sharpness, and a deleted final.json is written again from last.pt as it was."""
    run = tmp_path / "run"
    shutil.copytree(finished_and_stopped / "done", run)
    argv = _tiny_run(finished_and_stopped, "--out", str(run), "--resume")
    whole = (run / name).read_bytes()
    if damage == "missing":
        (run / name).unlink()
    else:
        (run / name).write_bytes(whole[:len(whole) // 2] if damage == "cut" else b"")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _fails(argv + extra, f"cannot read {re.escape(str(run / name))} ")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    done = json.loads((finished_and_stopped / "done" / "final.json").read_text())
    if name == "best.pt":
        assert train.main(argv) == done
    if name == "final.json":
        (run / name).unlink()
        assert train.main(argv) == done and (run / name).read_bytes() == whole


@pytest.mark.parametrize("which,error", [("best.pt", "full disk"), ("last.pt", "full disk"), ("last.pt", "Ctrl-C")])
def test_train_a_full_disk_during_a_checkpoint_keeps_the_old_one_and_no_partial_copy(tmp_path, monkeypatch,
                                                                                    finished_and_stopped, which, error):
    """torch.save fails half-way (ENOSPC, or a second Ctrl-C: a KeyboardInterrupt, no Exception) at an epoch's end:
    the error stops the run, the checkpoint before it is untouched, no half-written temporary file is left to fill
    the disk further, and --resume gives the logs of a run never stopped."""
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    run = tmp_path / "run"
    before = (run / "last.pt").read_bytes()
    save = torch.save

    def disk_full(obj, f):
        if Path(f).name.startswith(which + "."):
            buffer = io.BytesIO()
            save(obj, buffer)
            Path(f).write_bytes(buffer.getvalue()[:1000])
            raise OSError(28, "No space left on device") if error == "full disk" else KeyboardInterrupt
        return save(obj, f)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError if error == "full disk" else SystemExit, match="No space left|^130$"):   # Ctrl-C: 130
        train.main(argv + ["--resume"])
    monkeypatch.undo()
    assert (run / "last.pt").read_bytes() == before and not list(run.glob("*tmp"))
    train.main(argv + ["--resume"])
    _same_logs(finished_and_stopped / "done", run)


def _test_split(images):
    """(x, y): the test split read straight from the image folder and normalised here."""
    classes = sorted(p.name for p in (images / "test").iterdir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((images / "test" / c).iterdir())]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f, _ in files])
    return (x.float() / 255 - CIFAR10_MEAN) / CIFAR10_STD, torch.tensor([k for _, k in files])


def _checkpoint_logits(run, checkpoint, x, n_classes):
    """(the checkpoint's dict, its model's eval-mode logits on x)."""
    config = json.loads((run / "config.json").read_text())
    saved = torch.load(run / checkpoint, weights_only=False)
    model = train.MODELS[config["model"]](n_classes, config["width"])
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        return saved, model.eval()(x)


def test_train_final_json_is_what_best_pt_and_last_pt_score_on_the_test_images(finished_and_stopped):
    # the test split read straight from the folder and normalised here: best.pt (the best validation epoch) and
    # last.pt give final.json's test numbers, and epochs.csv's validation accuracy picks the best epoch
    run, images = finished_and_stopped / "done", finished_and_stopped / "images"
    final = json.loads((run / "final.json").read_text())
    val_acc = [float(row["val_acc"]) for row in _rows(run / "epochs.csv")]
    assert final["best_epoch"] == 1 + val_acc.index(max(val_acc)) and final["best_val_acc"] == max(val_acc)
    x, y = _test_split(images)
    for checkpoint, when in (("best.pt", "best"), ("last.pt", "last")):
        saved, logits = _checkpoint_logits(run, checkpoint, x, int(y.max()) + 1)
        assert final[f"test_acc_{when}"] == pytest.approx(100 * float((logits.argmax(1) == y).double().mean()), abs=1e-9)
        assert final[f"test_loss_{when}"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
        if when == "best":
            assert saved["epoch"] == final["best_epoch"]


def test_train_test_acc_best_is_the_best_validation_epochs_even_when_it_is_not_the_last(tmp_path):
    """final.json's *_best test numbers are best.pt's on the test images, best.pt the first epoch of the best
    validation accuracy, also when the model moved on after it: at --lr 0.005 the tiny run's validation accuracy
    is 100% from epoch 1 (a later tie replaces nothing) while its test accuracy is not yet."""
    out = tmp_path / "run"
    final = train.main(_tiny_run(tmp_path, "--lr", "0.005", "--out", str(out)))
    epochs = _rows(out / "epochs.csv")
    val_acc = [float(row["val_acc"]) for row in epochs]
    assert final["best_epoch"] == 1 + val_acc.index(max(val_acc)) == 1 and final["best_val_acc"] == max(val_acc)
    x, y = _test_split(tmp_path / "images")
    for checkpoint, when in (("best.pt", "best"), ("last.pt", "last")):
        saved, logits = _checkpoint_logits(out, checkpoint, x, 3)
        hit = logits.argmax(1) == y
        assert final[f"test_acc_{when}"] == pytest.approx(100 * float(hit.double().mean()), abs=1e-9)
        assert final[f"test_loss_{when}"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
        assert final[f"test_acc_per_class_{when}"] == pytest.approx([100 * float(hit[y == k].double().mean())
                                                                     for k in range(3)], abs=1e-9)
    # the case tells the two apart: last.pt is epoch 3's, and it scores otherwise than best.pt
    assert saved["state"]["epoch"] == 3 and final["test_acc_best"] != final["test_acc_last"]
    assert float(epochs[0]["test_acc"]) == pytest.approx(final["test_acc_best"])


def test_train_messages_name_the_right_thing(tmp_path, finished_and_stopped, capsys):
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    (tmp_path / "run" / "last.pt").unlink()   # as if killed before its first checkpoint
    for again in ([], ["--resume"]):   # both say the same: start it again with --overwrite
        _fails(argv + again, "stopped before its first checkpoint.*--overwrite")
    _fails(_tiny_run(tmp_path, "--out", str(tmp_path / "diverged"), "--lr", "1e30"),
           "training loss is .*no checkpoint was written")
    assert not (tmp_path / "diverged" / "last.pt").exists()
    images = tmp_path / "images"
    (images / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (32, 32)).save(images / "train" / ".ipynb_checkpoints" / "0.png")
    assert len(train.load_images(train.parse_settings(_tiny_run(tmp_path)))["classes"]) == 3
    (images / "train" / "class2" / "bad.png").write_bytes(b"not an image")
    _fails(_tiny_run(tmp_path, "--out", str(tmp_path / "bad")), r"train/class2/bad\.png is not a readable image")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_train_an_infinite_loss_is_divergence_as_a_nan_one_is(tmp_path, monkeypatch, bad):
    """The divergence check reads the loss sum: NaN and +inf alike stop the run with the same message and exit,
    at the step they come, without a checkpoint of that state: none before the first epoch ends, else last.pt
    stays the last good epoch's; no final.json, and steps.csv ends before the bad step."""
    step = train.train_step
    for at, kept in ((0, "no checkpoint was written"), (6, re.escape(str(tmp_path / "late" / "last.pt")) +
                                                         " holds the last good state")):
        calls = [0]

        def poisoned(*args):   # pass `at`'s loss sum turns `bad`; the step itself runs as it would
            counts = step(*args)
            calls[0] += 1
            return counts._replace(loss_sum=torch.tensor(bad, dtype=DT)) if calls[0] == at + 1 else counts
        monkeypatch.setattr(train, "train_step", poisoned)
        out = tmp_path / ("early" if at == 0 else "late")
        _fails(_tiny_run(tmp_path, "--out", str(out)), rf"^train.py: the training loss is {bad} at step {at}; "
               rf"stopping \({kept}; lower --lr or --rho\?\)$")
        assert not (out / "final.json").exists()
        assert [int(r["step"]) for r in _rows(out / "steps.csv")] == list(range(at))
        if at == 0:
            assert not (out / "last.pt").exists()
        else:   # epoch 1 (steps 0-4) checkpointed, epoch 2's bad state not
            saved = torch.load(out / "last.pt", weights_only=False)
            assert (saved["state"]["epoch"], saved["state"]["step"]) == (1, 5)


def _hessian_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_at(w):   # the same loss as a function of the flat weights, for the exact Hessian
        chunks = torch.split(w, [p.numel() for p in params])
        h = torch.tanh(x @ chunks[0].view(5, 4).T + chunks[1])
        return torch.nn.functional.cross_entropy(h @ chunks[2].view(3, 5).T + chunks[3], y)
    exact = torch.autograd.functional.hessian(loss_at, flat)
    return model, [(x, y)], params, flat, exact


def test_train_hessian_of_unequal_batches_and_its_top_eigenvalues_match_the_exact_ones():
    model, batches, params, flat, exact = _hessian_problem()
    (x, y), = batches
    split = [(x[:5], y[:5]), (x[5:], y[5:])]   # the mean loss over all 16 images, whatever the batch sizes
    v = torch.randn(flat.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert torch.allclose(train.hessian_vector_product(model, split, params, v), exact @ v, atol=1e-12)
    # the 4 of largest magnitude, signs kept, each after deflating the ones before
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(2), dtype=DT))
    spectrum = torch.tensor([10.0, -6.0, 3.0, 1.5] + [0.3 / k for k in range(1, 9)], dtype=DT)
    matrix = q @ torch.diag(spectrum) @ q.T
    got = train.top_eigenvalues(lambda u: matrix @ u, torch.zeros(12, dtype=DT), 4, torch.Generator().manual_seed(3), 200, tol=1e-9)
    assert got == pytest.approx([10.0, -6.0, 3.0, 1.5], rel=1e-4)


def test_train_hutchinson_trace_holds_the_exact_trace_within_its_standard_error():
    model, batches, params, flat, exact = _hessian_problem()
    hvp = lambda v: train.hessian_vector_product(model, batches, params, v)
    assert torch.allclose(hvp(flat), exact @ flat, atol=1e-12)
    true = float(exact.trace())
    for seed in range(5):
        mean, se = train.hutchinson_trace(hvp, flat, torch.Generator().manual_seed(seed), 300)
        assert 0 < se and abs(mean - true) < 4 * se, (seed, mean, se, true)


def test_train_hutchinson_takes_min_probes_before_trusting_its_spread():
    # z.Hz is 2 x 6 for every Rademacher z when H = 2 I: no spread after 2 probes, yet it takes min_probes = 10
    calls = []
    mean, se = train.hutchinson_trace(lambda z: (calls.append(1), 2 * z)[1], torch.zeros(6, dtype=DT),
                                      torch.Generator().manual_seed(0), max_probes=100)
    assert len(calls) == 10 and (mean, se) == (12.0, 0.0)


@pytest.mark.parametrize("training", [True, False])
def test_train_sharpness_is_of_the_mean_loss_over_its_batches_with_eval_mode_bn(training):
    """sharpness(): lambda_max (the eigenvalue of largest magnitude) and the Hutchinson trace of the Hessian of
    the MEAN loss over all --sharpness-batches batches, BN normalising with its running statistics (eval mode);
    the model's mode, buffers and weights and the global RNG are left as they were. The reference: the loss
    written out by hand on the same augmented batches (drawn as sharpness() draws them: its own generator seeded
    with --seed, a permutation, then the crops in order), its exact Hessian in float64, that matrix's eigenvalues
    and trace."""
    n, side, batches_n, size = 24, 4, 3, 8
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    loader = train.DeviceLoader(images, torch.arange(n) % 3, None, "cifar10", torch.device("cpu"), channels_last=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 3))
    bn = model[2]
    with torch.no_grad():   # running statistics far from any batch's: train-mode BN gives another Hessian
        bn.weight.uniform_(0.5, 2.0), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.3, 3.0)
        bn.num_batches_tracked.fill_(7)
    model.train(training)
    before = copy.deepcopy(model.state_dict())
    rng_state = torch.get_rng_state()
    args = types.SimpleNamespace(seed=3, sharpness_batches=batches_n, sharpness_batch_size=size, sharpness_iters=50,
                                 cutout=False)
    got = train.sharpness(model, loader, args)
    assert model.training == training and torch.equal(torch.get_rng_state(), rng_state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name

    rng = torch.Generator().manual_seed(3)
    idx = torch.randperm(n, generator=rng)[:batches_n * size]
    batches = [loader.train_batch(i, rng, False)[:2] for i in idx.split(size)]
    params = [p.detach().double() for p in model.parameters()]
    flat = torch.cat([p.flatten() for p in params])
    mean, var = bn.running_mean.double(), bn.running_var.double()

    def loss_at(w, some):   # mean cross-entropy over the images of `some`, BN with the running statistics
        chunks = torch.split(w, [p.numel() for p in params])
        w1, b1, gamma, beta, w2, b2 = (c.view_as(p) for c, p in zip(chunks, params))
        total = sum(len(y) for _, y in some)
        summed = 0
        for x, y in some:
            h = (x.double().flatten(1) @ w1.T + b1 - mean) / torch.sqrt(var + bn.eps) * gamma + beta
            summed = summed + torch.nn.functional.cross_entropy(torch.tanh(h) @ w2.T + b2, y, reduction="sum")
        return summed / total

    exact = torch.autograd.functional.hessian(lambda w: loss_at(w, batches), flat)
    spectrum = torch.linalg.eigvalsh(exact)
    by_size = spectrum[spectrum.abs().argsort(descending=True)]
    assert abs(by_size[1]) < 0.8 * abs(by_size[0])   # a gap power iteration resolves
    assert got["lambda_max"] == pytest.approx(float(by_size[0]), rel=1e-2)
    assert 0 < got["trace_se"] and abs(got["trace"] - float(exact.trace())) < 4 * got["trace_se"]


def test_train_sharpness_top5_pos_mean_is_the_mean_of_the_positive_top_5_of_each_batch(monkeypatch):
    # origin 3: the 5 eigenvalues of largest magnitude of each batch's Hessian, the mean of the positive ones among
    # them all; lambda_max: one eigenvalue of the mean loss over all batches (known values stand in for them here)
    asked = []

    def known(hvp, like, k, rng, max_iter, tol=1e-3):
        asked.append(k)
        return [7.0] if k == 1 else [2.0 * len(asked), -3.0, 1.0, -0.5, 0.25, 9.0][:k]
    monkeypatch.setattr(train, "top_eigenvalues", known)
    loader = train.DeviceLoader(torch.randint(0, 256, (12, 3, 2, 2), dtype=torch.uint8), torch.arange(12) % 3, None,
                                "cifar10", torch.device("cpu"), channels_last=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    args = types.SimpleNamespace(seed=0, sharpness_batches=3, sharpness_batch_size=4, sharpness_iters=3, cutout=False)
    got = train.sharpness(model, loader, args)
    assert asked == [5, 5, 5, 1] and got["lambda_max"] == 7.0
    assert got["top5_pos_mean"] == pytest.approx((2 + 4 + 6 + 3 * (1 + 0.25)) / 9)


def test_train_sharpness_batches_are_augmented_as_training_is_cutout_included(monkeypatch):
    # the Hessians are of --sharpness-batches batches of the training split augmented as training is (crop, mirror
    # and --cutout), drawn by a generator of their own seeded with --seed: a permutation, then the batches in order;
    # top-5 takes each batch's own Hessian in turn, lambda_max and the trace the one of them all
    seen, hvp = [], train.hessian_vector_product
    monkeypatch.setattr(train, "hessian_vector_product",
                        lambda model, batches, params, v: (seen.append(batches), hvp(model, batches, params, v))[1])
    images = torch.randint(1, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = train.DeviceLoader(images, torch.arange(12) % 3, None, "cifar10", torch.device("cpu"), channels_last=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    args = types.SimpleNamespace(seed=4, sharpness_batches=2, sharpness_batch_size=6, sharpness_iters=2, cutout=True)
    train.sharpness(model, loader, args)
    rng = torch.Generator().manual_seed(4)
    expected = [loader.train_batch(i, rng, True)[:2] for i in torch.randperm(12, generator=rng).split(6)]
    assert any((x == 0).any() for x, _ in expected)   # a cutout hole: the only zeros after normalisation

    def which(batches):   # the positions in `expected` of the batches one Hessian-vector product was of (-1: none)
        return tuple(next((k for k, want in enumerate(expected) if torch.equal(x, want[0]) and torch.equal(y, want[1])),
                          -1) for x, y in batches)
    assert [k for k, _ in itertools.groupby(which(batches) for batches in seen)] == [(0,), (1,), (0, 1)]


def test_train_final_sharpness_is_best_pts_on_the_augmented_training_split(tmp_path):
    # final.json's sharpness: best.pt's model (epoch 1 at --lr 0.005, not the last) on the training split's batches
    out = tmp_path / "run"
    argv = _tiny_run(tmp_path, "--lr", "0.005", "--sharpness", "--sharpness-batches", "2", "--sharpness-batch-size",
                     "6", "--sharpness-iters", "5", "--out", str(out))
    final = train.main(argv)
    args = train.parse_settings(argv)
    loader = train.DeviceLoader(*train.make_splits(args, train.load_images(args))[0], "cifar10", torch.device("cpu"),
                                False)
    model = train.MODELS["cnn"](3, 1.0)
    saved = torch.load(out / "best.pt", weights_only=False)
    model.load_state_dict(saved["model"])
    assert saved["epoch"] == final["best_epoch"] == 1
    assert final["sharpness"] == pytest.approx(train.sharpness(model, loader, args), rel=1e-6)


FAULT_POINTS = {   # where a SIGKILL lands, and at which call of the patched function
    "mid-epoch": ("train_step", 7),                # epoch 2, step 7
    "checkpoint write": ("save_atomic", 1),        # last.pt of epoch 2 half on disk
    "csv write": ("CsvLog.write", 3),               # steps.csv row 7 half written
}


KILLED_RUN = """
import os, signal, sys
import torch
import train
name, when = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))   # as the test process: CPU kernels sum in the same order
calls = [0]
def die_now():
    calls[0] += 1
    if calls[0] == when:
        os.kill(os.getpid(), signal.SIGKILL)
if name == "train_step":
    step = train.train_step
    def train_step(*args):
        die_now()
        return step(*args)
    train.train_step = train_step
elif name == "save_atomic":   # last.pt's temporary file half written, then the kill
    atomic = train.save_atomic
    def save_atomic(obj, path):
        if path.name == "last.pt":
            torch.save(obj, f"{path}.{os.getpid()}.tmp")
            os.truncate(f"{path}.{os.getpid()}.tmp", 1000)
            die_now()
        atomic(obj, path)
    train.save_atomic = save_atomic
else:   # half a steps.csv row on disk, then the kill
    write = train.CsvLog.write
    def csv_write(self, row):
        if self.path.name == "steps.csv":
            line = ",".join(train.format_value(row.get(c)) for c in self.columns)
            self.file.write(line[:len(line) // 2])
            self.file.flush()
            die_now()
        write(self, row)
    train.CsvLog.write = csv_write
train.main(sys.argv[4:])
"""


def _killed(argv, point):
    """train.py in a child process that SIGKILLs itself at the point."""
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, *map(str, FAULT_POINTS[point]), str(torch.get_num_threads()), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, (point, done.stderr[-2000:])


def test_train_sigkill_anywhere_then_resume_gives_the_same_csvs(tmp_path, finished_and_stopped):
    run = tmp_path / "run"
    argv = _tiny_run(finished_and_stopped, "--out", str(run))
    _killed(argv, "mid-epoch")
    for point in ("checkpoint write", "csv write"):
        _killed(argv + ["--resume"], point)
    assert train.main(argv + ["--resume"]) is not None
    _same_logs(finished_and_stopped / "done", run)
    rows = [int(r["step"]) for r in _rows(run / "steps.csv")]
    assert rows == list(range(3 * STEPS))   # none lost, none twice


def test_readme_line_counts_match_the_files():
    """The README's file list says how long each script is; a reader sizing up sam.py before copying it trusts it."""
    readme = (REPO / "README.md").read_text()
    claimed = dict(re.findall(r"`(\w+\.py)` \((\d+) lines", readme))
    assert {"sam.py", "train.py", "toy.py", "plots.py", "reproduce.py"} <= set(claimed)
    for name, lines in claimed.items():
        assert len((REPO / name).read_text().splitlines()) == int(lines), name


def _readme_section(heading):
    """The README's text under a heading, up to the next heading of any level."""
    return re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#)", (REPO / "README.md").read_text(), re.S | re.M).group(1)


def _readme_table_names(heading):
    """The backquoted names in the first column of the README's table under a heading, `x1`..`x4` spelled out."""
    names = set()
    for cell in re.findall(r"^\| (`.*?) \|", _readme_section(heading).split("|---|")[-1], re.M):
        for stem, first, last in re.findall(r"`([a-z-]+)(\d)`\.\.`\1(\d)`", cell):
            names |= {stem + str(k) for k in range(int(first), int(last) + 1)}
        names |= set(re.findall(r"`([\w.-]+)`", re.sub(r"`[a-z-]+\d`\.\.`[a-z-]+\d`", "", cell)))
    return names


def test_readme_variants_table_names_every_preset_and_counts_them():
    """The preset count in the README's first line, and the Variants table's first column (`samme1`..`samme4`;
    `samckpt12`, `13`, ... for the samckpt family) names exactly sam.VARIANTS."""
    assert re.search(r"\((\d+) presets in `sam.VARIANTS`", (REPO / "README.md").read_text()).group(1) == str(len(VARIANTS))
    named = {f"samckpt{n}" if n.isdigit() else n for n in _readme_table_names("### Variants")}
    assert named == set(VARIANTS)


def test_readme_statistics_table_names_every_stats_key():
    """The Statistics table's keys are opt.stats' keys (the step aside), no more, no less."""
    assert _readme_table_names("### Statistics") == set(sam.STAT_KEYS) - {"step"}


def test_readme_train_commands_parse_and_name_their_run_folder():
    """Every command of the README's train.py block parses (torchrun's launcher options aside), and the default
    --out the Output item gives as its example is the one train.py makes from those flags."""
    block = re.search(r"```\n(.*?)```", _readme_section("## train.py"), re.S).group(1)
    commands = [shlex.split(line.split("#")[0].split("train.py", 1)[1]) for line in block.splitlines() if line.strip()]
    assert len(commands) == 4
    for argv in commands:
        train.parse_settings(argv)
    example = re.search(r"e\.g\. `(runs/[^`]+)`", _readme_section("## train.py")).group(1)
    assert train.parse_settings(["--variant", "samme1", "--rho", "0.1"]).out == example


# ------------------------------------------------------------------ train.py: data, splits, logs and settings
def test_train_cache_is_rebuilt_when_an_image_changes_in_place_and_when_it_is_damaged(tmp_path, capsys):
    """The cache is keyed on each file's size and modification time: an image rewritten with the same size (at a
    new time) or with another size (its old time put back) is decoded afresh, never read from the stale cache; an
    unreadable cache is rebuilt."""
    args = train.parse_settings(_tiny_run(tmp_path))
    train.load_images(args)
    image = tmp_path / "images" / "train" / "class0" / "0.png"

    def loaded(pixels):   # the image is among the training images train.py loads now
        images = train.load_images(args)["train"][0]
        return bool((images == torch.from_numpy(pixels).permute(2, 0, 1)).flatten(1).all(1).any())

    def rewrite(pixels, kind, mtime_ns):
        Image.fromarray(pixels).save(image, format=kind)
        os.utime(image, ns=(mtime_ns, mtime_ns))
        return image.stat().st_size

    rng, then = np.random.default_rng(1), image.stat().st_mtime_ns
    a, b, c = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3))
    size = rewrite(a, "BMP", then + 10**9)   # uncompressed: a and b take the same number of bytes
    assert loaded(a)
    assert rewrite(b, "BMP", then + 2 * 10**9) == size and loaded(b)      # same size, a new time
    assert rewrite(c, "PNG", then + 2 * 10**9) != size and loaded(c)      # another size, the same time
    cache = tmp_path / "cache" / "images.uint8.pt"
    cache.write_bytes(cache.read_bytes()[:1000])   # cut short
    capsys.readouterr()
    assert loaded(c) and "rebuilding the unreadable cache" in capsys.readouterr().err


def test_train_an_archive_and_its_folder_load_alike_whatever_the_member_order(tmp_path):
    """Classes are numbered by sorted name (as ImageFolder) and images come in sorted path order, so a .tar.gz with
    its members in any order loads as the folder it unpacks to, fingerprint included: a run resumes from either."""
    names = ["zebra", "ant", "moth", "bee", "yak", "crab", "eel", "gnu"]   # made in this order, not sorted
    root, rng = tmp_path / "images", np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    files = sorted(root.rglob("*.png"))
    archive = tmp_path / "shuffled.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in np.random.default_rng(1).permutation(len(files)):
            tar.add(files[i], arcname=str(files[i].relative_to(tmp_path)))
    folder, packed = (train.load_images(train.parse_settings(["--data-dir", str(d), "--cache-dir", str(tmp_path / "cache")]))
                      for d in (root, archive))
    assert folder["classes"] == packed["classes"] == sorted(names)
    for split in ("train", "test"):   # the reference: read here in path order, labelled by the sorted names
        ref = [f for f in files if f.relative_to(root).parts[0] == split]
        x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in ref])
        y = torch.tensor([sorted(names).index(f.parent.name) for f in ref])
        for data in (folder, packed):
            assert torch.equal(data[split][0], x) and torch.equal(data[split][1], y)
    assert folder["fingerprint"] == packed["fingerprint"]


def test_train_a_tar_cut_at_a_member_header_is_damaged_not_shorter(tmp_path):
    """tarfile stops quietly at a zeroed header: read_archive must see the members after it and refuse the archive,
    never train on the images before it."""
    images = _image_folder(tmp_path / "images")
    path = tmp_path / "images.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(images, arcname="images")
    with tarfile.open(path) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2].offset
    data = bytearray(path.read_bytes())
    data[middle:middle + 512] = bytes(512)
    path.write_bytes(bytes(data))
    argv = ["--model", "cnn", "--data-dir", str(path), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--out", str(tmp_path / "run")]
    _fails(argv, re.escape(str(path)) + " is damaged or truncated")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("cache/*"))


def test_train_fingerprint_changes_with_any_pixel_label_or_class_name():
    gen = torch.Generator().manual_seed(0)
    data = {split: (torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=gen), torch.arange(n) % 2)
            for split, n in (("train", 6), ("test", 4))}
    data["classes"] = ["cat", "dog"]
    fingerprint = train.with_fingerprint(data)["fingerprint"]
    assert train.with_fingerprint(copy.deepcopy(data))["fingerprint"] == fingerprint
    others = [{**data, "classes": ["dog", "cat"]}]
    for split in ("train", "test"):
        for part in (0, 1):   # a pixel, a label
            other = copy.deepcopy(data)
            other[split][part].view(-1)[-1] += 1
            others.append(other)
    assert all(train.with_fingerprint(other)["fingerprint"] != fingerprint for other in others)


def test_train_split_is_the_same_for_every_seed_and_subset_counts_after_the_long_tail():
    """The val split, --subset and --imbalance draw with SPLIT_SEED (every seed trains on the same images), the
    label noise with --seed; --subset N takes about N images of the long-tailed pool, a share of each class."""
    labels = torch.arange(10).repeat(100)
    images = torch.arange(1000).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)   # pixel = index
    data = dict(train=(images, labels), test=(images[:10], labels[:10]), classes=[f"c{k}" for k in range(10)])

    def split(*argv):
        (x_train, _, flipped), (x_val, _, _), _ = train.make_splits(train.parse_settings(["--data-dir", "x", *argv]), data)
        return x_train[:, 0, 0, 0], x_val[:, 0, 0, 0], flipped
    one, two = (split("--label-noise", "0.2", "--seed", seed) for seed in ("1", "2"))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and not torch.equal(one[2], two[2])
    assert torch.equal(one[2], split("--label-noise", "0.2", "--seed", "1")[2])
    kept = [int(100 * 10 ** (-c / 9)) for c in range(10)]   # --imbalance 10: n_max * factor^(-c/(C-1))
    train_idx, val_idx, _ = split("--imbalance", "10", "--subset", "200")
    assert torch.bincount(labels[torch.cat([train_idx, val_idx])], minlength=10).tolist() == \
        [round(200 / sum(kept) * k) for k in kept]


def test_train_long_tail_keeps_a_random_share_of_each_class():
    # CIFAR-LT (Cao et al.): each class's kept images drawn at random from it, not its first ones
    labels = torch.arange(10).repeat(100)
    kept = train.long_tailed(torch.arange(1000), labels, 10.0, torch.Generator().manual_seed(0))
    for c in range(1, 10):
        mine = kept[labels[kept] == c]
        assert not torch.equal(mine, torch.nonzero(labels == c).flatten()[:len(mine)]), c


def test_train_long_tail_counts_from_the_largest_class_when_the_classes_differ_in_size():
    # n_max is the largest class's count, whatever the class order: classes of 60, 100 and 100 images under
    # --imbalance 4 keep min(60, 100), int(100 / 2) and int(100 / 4) (a profile from the smallest class, 60, would
    # keep 60, 30 and 15)
    labels = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(100, dtype=torch.long), torch.full((100,), 2)])
    kept = train.long_tailed(torch.arange(260), labels, 4.0, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[kept], minlength=3).tolist() == [60, int(100 * 4.0 ** -0.5), int(100 * 4.0 ** -1)]


def test_train_a_subset_as_large_as_the_pool_is_no_subset():
    # --subset N of a pool of N or fewer images takes them all: the same val and training images as without --subset
    labels = torch.arange(10).repeat(20)
    images = torch.arange(200).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)   # pixel = index
    data = dict(train=(images, labels), test=(images[:10], labels[:10]), classes=[f"c{k}" for k in range(10)])

    def split(*argv):
        (x_train, _, _), (x_val, _, _), _ = train.make_splits(train.parse_settings(["--data-dir", "x", *argv]), data)
        return x_train[:, 0, 0, 0].tolist(), x_val[:, 0, 0, 0].tolist()
    whole = split()
    assert split("--subset", "200") == whole and split("--subset", "500") == whole
    assert split("--subset", "199") != whole


def test_train_images_of_two_sizes_are_refused_naming_the_split(tmp_path):
    # decode stacks each split's images: one of another size is a DataError that says so, not numpy's stack error
    images = _image_folder(tmp_path / "images", per_class=(3, 1))
    Image.new("RGB", (16, 16)).save(images / "train" / "class1" / "0.png")
    with pytest.raises(train.DataError, match="the train images differ in size"):
        train.load_images(train.parse_settings(_tiny_run(tmp_path)))


@pytest.mark.parametrize("width, height", [(24, 24), (32, 24)])
def test_train_test_images_of_another_size_than_the_train_images_are_refused(tmp_path, width, height):
    # each split alike in itself, but the model would test at a size it never trained on (or fail there)
    images = _image_folder(tmp_path / "images", per_class=(3, 1))
    for path in (images / "test").glob("*/*.png"):
        Image.new("RGB", (width, height)).save(path)
    with pytest.raises(train.DataError, match=f"the train images are 32x32 pixels, the test images {height}x{width}"):
        train.load_images(train.parse_settings(_tiny_run(tmp_path)))


@pytest.mark.parametrize("fault", ["renamed", "empty train folder", "all renamed and one more", "no train image"])
def test_train_a_test_class_without_training_images_is_refused_naming_it(tmp_path, fault):
    # its test images would all count as errors (a class no training image shows is never predicted); with no
    # training image at all, that is what is said
    images = _image_folder(tmp_path / "images", per_class=(3, 1))
    if fault == "renamed":
        (images / "test" / "class2").rename(images / "test" / "Class2")
    elif fault in ("empty train folder", "no train image"):
        for path in (images / "train").glob("class1/*" if fault == "empty train folder" else "*/*"):
            path.unlink()
    else:   # four: the first three named
        for c in range(3):
            (images / "test" / f"class{c}").rename(images / "test" / f"Class{c}")
        shutil.copytree(images / "test" / "Class0", images / "test" / "Class3")
    message = {"renamed": "test/ holds 1 class(es) without training images (Class2)",
               "empty train folder": "test/ holds 1 class(es) without training images (class1)",
               "no train image": f"no images under {images}/train/<class>/"}.get(
        fault, "test/ holds 4 class(es) without training images (Class0, Class1, Class2, ...)")
    with pytest.raises(train.DataError, match=re.escape(message)):
        train.load_images(train.parse_settings(_tiny_run(tmp_path)))


def test_train_a_model_whose_max_pools_leave_nothing_of_the_images_is_refused_before_writing(tmp_path):
    # VGG-16 halves the side 5 times (32 -> 1): a 16x16 image reaches 0x0, the small CNN's 2 pools leave it 4x4;
    # 4x4 is the least they take (4 -> 2 -> 1), and an image 8 wide but 3 high loses its rows (3 -> 1 -> 0)
    def argv(width, height):
        small = tmp_path / f"small{width}x{height}"
        for split, n in (("train", 8), ("test", 2)):
            for c in range(3):
                (small / split / f"class{c}").mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.new("RGB", (width, height), (80 * c, 40, 20 * i)).save(small / split / f"class{c}" / f"{i}.png")
        return ["--data-dir", str(small), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--epochs", "1",
                "--batch-size", "6"]
    _fails([*argv(16, 16), "--model", "vgg16", "--width", "0.1", "--out", str(tmp_path / "vgg")],
           r"--model vgg16 needs images of at least 32x32 pixels .* holds 16x16")
    assert not (tmp_path / "vgg").exists()
    _fails([*argv(8, 3), "--model", "cnn", "--out", str(tmp_path / "flat")],
           r"--model cnn needs images of at least 4x4 pixels \(its 2 max-pools .* holds 3x8")
    assert not (tmp_path / "flat").exists()
    for size in (16, 4):
        assert train.main([*argv(size, size), "--model", "cnn", "--out", str(tmp_path / f"cnn{size}")])["best_epoch"] == 1


def test_train_csv_resume_keeps_whole_rows_up_to_the_checkpoint_and_none_after_a_bad_one(tmp_path):
    columns, good = ["step", "loss"], [f"{k},0.{k}" for k in range(6)]
    cases = {   # the rows on disk -> the rows kept with the checkpoint's step 4
        "whole": (good, good[:5]),
        "NUL bytes": (good[:2] + ["2,\0\0\0"] + good[2:], good[:2]),   # a crash's zeros, whole rows after them
        "too few fields": (good[:3] + ["3"] + good[3:], good[:3]),
        "too many fields": (good[:3] + ["3,0.3,0.3"] + good[3:], good[:3]),
        "no number": (good[:1] + ["x,0.1", ",0.1"] + good[1:], good[:1]),
        "nan": (good[:2] + ["nan,0.2"] + good[2:], good[:2]),
        "only the cut row after the kept ones": (good[:3], good[:3]),   # "3,0." has 2 fields and a step: still cut
    }
    path = tmp_path / "steps.csv"
    for case, (rows, kept) in cases.items():
        path.write_text("".join(line + "\n" for line in ["step,loss"] + rows) + "3,0.")   # the last row cut
        log = train.CsvLog(path, columns, "step", last=4)
        log.write({"step": 5, "loss": 0.5})
        log.file.close()
        assert path.read_text() == "".join(line + "\n" for line in ["step,loss"] + kept + ["5,0.5"]), case
    path.write_text("".join(line + "\n" for line in ["step,loss"] + good))
    train.CsvLog(path, columns, "step", last=0).file.close()   # stopped after step 0 (--max-steps 1): row 0 stays
    assert path.read_text() == "step,loss\n0,0.0\n"
    train.CsvLog(path, columns, "step").file.close()   # a fresh run
    assert path.read_text() == "step,loss\n"
    assert [train.format_value(v) for v in (None, 7, 10**9, 0.1 + 0.2, 1 / 3, -2.5e-12, math.nan)] == \
        ["", "7", "1000000000", "0.3", "0.33333333", "-2.5e-12", "nan"]


def test_train_resume_warns_of_a_lost_first_row_of_a_log(tmp_path, capsys):
    """A checkpoint at step 5 and epoch 1 with --log-every 5 logged step 0's row and epoch 1's, and (every 2 epochs)
    no sharpness row: the logs that lost their only row warn, and sharpness.csv, which had none to lose, does not."""
    for name, (columns, _) in train.LOGS.items():
        (tmp_path / f"{name}.csv").write_text(",".join(columns) + "\n")
    train.warn_of_lost_rows(tmp_path, types.SimpleNamespace(log_every=5, sharpness_every=2), {"step": 5, "epoch": 1})
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path / name}.csv holds no whole row, but the checkpoint logged up to {key} {last}: the rows "
        "between are lost, and the log goes on after a gap" for name, key, last in (("steps", "step", 0),
                                                                                    ("epochs", "epoch", 1))]


def test_train_changed_settings_are_the_keys_both_configs_hold_with_other_values():
    saved = {"lr": 0.1, "seed": 1, "out": "a", "gone": 3}   # "gone": an older train.py's, "new": a newer one's
    assert train.changed_settings(saved, {"lr": 0.2, "seed": 1, "out": "b", "new": 5}) == ["lr"]
    assert train.changed_settings(saved, {"lr": 0.2, "seed": 2}, ignore={"lr"}) == ["seed"]


def test_train_resume_refuses_another_seed_length_or_split(tmp_path, finished_and_stopped):
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    before = (tmp_path / "run" / "steps.csv").read_bytes()
    preset_rho = sam.VARIANTS["sam"].get("rho", sam.FLAGS["rho"])   # a SAM flag left to the preset: its value
    for flag, value, was in (("--seed", "7", "42"), ("--epochs", "4", "3"), ("--val-fraction", "0.2", "0.1"),
                             ("--subset", "60", "None"), ("--rho", "0.2", preset_rho)):
        _fails(argv + ["--resume", flag, value], rf"different settings: {flag} {value} \(run: {was}\)")
    assert (tmp_path / "run" / "steps.csv").read_bytes() == before


def test_train_resume_takes_a_sam_flag_given_at_the_value_the_run_had(tmp_path, finished_and_stopped):
    """--rho and --stats-every given at the values the run took from the preset and from --log-every are no change:
    the run goes on as if uninterrupted."""
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    log_every = argv[argv.index("--log-every") + 1]
    config = (tmp_path / "run" / "config.json").read_bytes()
    train.main(argv + ["--resume", "--rho", str(sam.VARIANTS["sam"].get("rho", sam.FLAGS["rho"])),
                       "--stats-every", log_every])
    _same_logs(finished_and_stopped / "done", tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_bytes() == config   # no END setting changed: nothing recorded


def test_train_default_folder_names_tell_the_runs_apart():
    variants = [[], ["--seed", "1"], ["--subset", "500"], ["--label-noise", "0.2"], ["--imbalance", "10"],
                ["--epochs", "7"], ["--variant", "usam"], ["--rho", "0.2"], ["--dataset", "cifar100"], ["--model", "cnn"]]
    names = [train.parse_settings(["--data-dir", "x", *v]).out for v in variants]
    assert len(set(names)) == len(names) and all(n.startswith("runs/") for n in names)
    assert train.parse_settings(["--out", "mine"]).out == "mine"
    defaults = train.parse_settings([])   # --imbalance 1 (the default), --label-noise 0: no long tail, no noise
    assert names[0] == train.parse_settings(["--imbalance", "1", "--label-noise", "0"]).out == \
        f"runs/{defaults.dataset}-{defaults.model}-{defaults.variant}-e{defaults.epochs}-s{defaults.seed}"



def test_train_default_folder_name_is_one_folder_whatever_the_bin_scale():
    # "1/c" in --bin-scale put a "/" into the name: the run went into a sub-folder of a folder named after half of it
    names = [train.parse_settings(["--bin-scale", "0", "c", "1", scale, "c"]).out for scale in ("1/c", "c")]
    assert [Path(n).parent for n in names] == [Path("runs"), Path("runs")] and names[0] != names[1]

def test_train_epoch_rows_divide_the_epochs_summed_counts(tmp_path, monkeypatch):
    """epochs.csv's training columns divide the epoch's summed Counts: the loss and accuracy by the images seen, the
    clean accuracy by the clean images, the memorised noise by the flipped ones; steps.csv's each step's own."""
    step, calls = train.train_step, []

    def known(*args):   # the run trains as it would; its counts are replaced by known ones
        step(*args)
        k = len(calls)
        calls.append((1.5 + k, 5 + k % 3, 12, 4 + k % 2, 9, k % 3, 3))   # Counts' fields in order
        return train.Counts(*(torch.tensor(float(v), dtype=DT) for v in calls[-1]))
    monkeypatch.setattr(train, "train_step", known)
    out = tmp_path / "run"
    train.main(_tiny_run(tmp_path, "--label-noise", "0.2", "--out", str(out)))
    steps, epochs = _rows(out / "steps.csv"), _rows(out / "epochs.csv")
    assert len(calls) == len(steps) == 3 * STEPS and len(epochs) == 3
    for row, (loss, correct, seen, *_) in zip(steps, calls):
        assert [float(row["loss"]), float(row["acc"])] == pytest.approx([loss / seen, 100 * correct / seen], rel=1e-7)
    for e, row in enumerate(epochs):
        loss, correct, seen, clean_correct, clean_seen, noisy_fit, noisy_seen = map(sum, zip(*calls[e * STEPS:(e + 1) * STEPS]))
        assert [float(row[k]) for k in ("train_loss", "train_acc", "clean_train_acc", "noisy_train_acc")] == pytest.approx(
            [loss / seen, 100 * correct / seen, 100 * clean_correct / clean_seen, 100 * noisy_fit / noisy_seen], rel=1e-7)
        assert float(row["images_per_sec"]) * float(row["seconds"]) == pytest.approx(seen, rel=1e-6)


def test_train_steps_rows_sum_the_counts_of_their_log_every_steps(tmp_path, monkeypatch):
    """--log-every 2: a steps.csv row at steps 0, 2, 4, ...; its loss and accuracy divide the Counts summed over the
    steps since the row before, its epoch is the epochs done with that step ((step + 1) / 5 steps), its lr the
    cosine of its step."""
    step, calls = train.train_step, []

    def known(*args):   # the run trains as it would; its counts are replaced by known ones
        step(*args)
        k = len(calls)
        calls.append((1.5 + k, 5 + k % 3, 12, 12, 12, 0, 0))
        return train.Counts(*(torch.tensor(float(v), dtype=DT) for v in calls[-1]))
    monkeypatch.setattr(train, "train_step", known)
    out = tmp_path / "run"
    train.main(_tiny_run(tmp_path, "--log-every", "2", "--out", str(out)))
    rows, total = _rows(out / "steps.csv"), 3 * STEPS
    assert [int(r["step"]) for r in rows] == list(range(0, total, 2))
    for before, row in zip([-1] + [int(r["step"]) for r in rows], rows):
        s = int(row["step"])
        loss, correct, seen = (sum(c[j] for c in calls[before + 1:s + 1]) for j in range(3))
        assert [float(row[k]) for k in ("loss", "acc", "epoch", "lr")] == pytest.approx(
            [loss / seen, 100 * correct / seen, (s + 1) / STEPS, 0.1 * 0.5 * (1 + math.cos(math.pi * s / total))],
            rel=1e-7), s


def test_train_steps_rows_hold_the_statistics_of_their_own_step(tmp_path, monkeypatch):
    """A steps.csv row's statistics columns are opt.stats (sam.py's, by name) of the row's own step: with
    --log-every 2 sam.py measures them every 2nd step (stats_every), the steps the loop logs."""
    read, got = train.mean_stats, []
    monkeypatch.setattr(train, "mean_stats", lambda opt: (got.append(opt.stats), read(opt))[1])
    out = tmp_path / "run"
    train.main(_tiny_run(tmp_path, "--log-every", "2", "--out", str(out)))
    rows, columns = _rows(out / "steps.csv"), train.STEP_COLUMNS[6:]
    assert [int(s["step"]) for s in got] == [int(r["step"]) for r in rows] == list(range(0, 3 * STEPS, 2))
    for stats, row in zip(got, rows):
        assert [float(row[k]) for k in columns] == pytest.approx([stats[k] for k in columns], rel=1e-6, nan_ok=True)



def test_train_steps_rows_of_steps_without_statistics_hold_none_of_another_step(tmp_path, monkeypatch):
    """--stats-every 3 --log-every 1: sam.py measures steps 0, 3, 6, ...; the rows of the other steps held the
    statistics of the last measured step as their own. Now they hold NaN there (the skipped count stays)."""
    read, got = train.mean_stats, []
    monkeypatch.setattr(train, "mean_stats", lambda opt: (got.append(opt.stats), read(opt))[1])
    out = tmp_path / "run"
    train.main(_tiny_run(tmp_path, "--stats-every", "3", "--persist-from", "1", "--out", str(out)))
    rows, columns = _rows(out / "steps.csv"), [k for k in train.STEP_COLUMNS[6:] if k != "skipped"]
    assert [int(r["step"]) for r in rows] == list(range(3 * STEPS)) and len(got) == len(rows)
    for stats, row in zip(got, rows):
        step = int(row["step"])
        values = [float(row[k]) for k in columns]
        if step % 3 == 0:
            assert stats["step"] == step and values == pytest.approx([stats[k] for k in columns], rel=1e-6, nan_ok=True)
        else:
            assert stats["step"] == step - step % 3 and all(math.isnan(v) for v in values), step
        assert float(row["skipped"]) == 0

def test_train_sharpness_every_n_epochs_measures_those_epochs_models(tmp_path):
    out = tmp_path / "run"
    argv = _tiny_run(tmp_path, "--epochs", "4", "--sharpness-every", "2", "--sharpness-batches", "2",
                     "--sharpness-batch-size", "6", "--sharpness-iters", "5", "--out", str(out))
    train.main(argv)
    rows = _rows(out / "sharpness.csv")
    assert [int(r["epoch"]) for r in rows] == [2, 4]
    args = train.parse_settings(argv)   # epoch 4's row: the sharpness of last.pt's model, measured again here
    loader = train.DeviceLoader(*train.make_splits(args, train.load_images(args))[0], "cifar10", torch.device("cpu"), False)
    model = train.MODELS["cnn"](3, 1.0)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=False)["model"])
    again = train.sharpness(model, loader, args)
    assert {k: float(rows[1][k]) for k in again} == pytest.approx(again, rel=1e-6)


def test_train_overwrite_deletes_the_temporary_files_of_a_killed_write(tmp_path, finished_and_stopped):
    run = tmp_path / "run"
    shutil.copytree(finished_and_stopped / "stopped", run)
    (run / "last.pt.12345.tmp").write_bytes(b"half a checkpoint")   # a checkpoint's write cut by a kill
    (run / "notes.tmp").write_text("mine")
    train.main(_tiny_run(tmp_path, "--epochs", "1", "--out", str(run), "--overwrite"))
    assert not (run / "last.pt.12345.tmp").exists() and (run / "notes.tmp").read_text() == "mine"


def test_train_config_records_the_flags_the_optimizer_runs_with():
    """config.json's sam_flags (what plots.py and reproduce.py read) are the optimizer's: the command line's over the
    preset's (asam's rho 2.0 here) over sam.FLAGS."""
    argv = ["--variant", "asam", "--rho", "0.5", "--looksam-k", "3", "--data-dir", "x"]
    args = train.parse_settings(argv)
    opt = train.build_optimizer(args, torch.nn.Linear(2, 2), 10, 1)
    config = train.run_config(args, argv, torch.device("cpu"), 1, None)
    assert config["sam_flags"] == {k: opt.flags[k] for k in config["sam_flags"]} and set(config["sam_flags"]) == set(sam.FLAGS)
    assert (config["sam_flags"]["rho"], config["sam_flags"]["adaptive"], config["sam_flags"]["looksam_k"]) == (0.5, True, 3)


def test_train_resume_of_a_folder_without_a_run_is_refused_not_started_afresh(tmp_path):
    for out in (tmp_path / "typo", tmp_path / "empty"):   # a mistyped --out, an empty folder
        if out.name == "empty":
            out.mkdir()
        _fails(_tiny_run(tmp_path, "--out", str(out), "--resume"), "--resume: .* holds no run; drop --resume")
    assert not (tmp_path / "typo").exists() and list((tmp_path / "empty").iterdir()) == []


def test_train_resume_with_a_log_missing_its_last_column_is_refused(tmp_path, finished_and_stopped):
    """A log of a train.py that had not yet added the last column (a prefix of today's header) is another train.py's:
    refused with every row kept, never cut to nothing for its rows' field count."""
    argv = _copy_stopped(finished_and_stopped, tmp_path)
    epochs = tmp_path / "run" / "epochs.csv"
    older = "".join(line.rsplit(",", 1)[0] + "\n" for line in epochs.read_text().splitlines())
    epochs.write_text(older)
    _fails(argv + ["--resume"], "epochs.csv has another train.py's columns")
    assert epochs.read_text() == older


# ------------------------------------------------------------------ train.py: loop and bookkeeping (mutation round)
def test_train_a_step_skipped_mid_epoch_leaves_the_bn_buffers_and_weights_of_the_step_before(tmp_path, monkeypatch):
    """A skipped step (here steps 2 and 7 at rho 1e30: g' overflows after the first pass has moved BN's running
    statistics) leaves the weights and BN buffers exactly as the step before it left them, not as an older step did:
    the next step starts from them. The steps around it move both (the check can tell)."""
    step, seen, skip = train.train_step, [], (2, 7)

    def snapshot(model):
        return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]

    def sometimes_skipped(model, opt, *args):
        seen.append(snapshot(model))
        rho = opt.param_groups[0]["rho"]
        if len(seen) - 1 in skip:
            opt.param_groups[0]["rho"] = 1e30
        try:
            return step(model, opt, *args)
        finally:
            opt.param_groups[0]["rho"] = rho
    monkeypatch.setattr(train, "train_step", sometimes_skipped)
    with pytest.warns(RuntimeWarning, match="SAM skipped step 2"):   # the first skip warns, once
        train.main(_tiny_run(tmp_path, "--epochs", "2", "--out", str(tmp_path / "run")))
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert len(seen) == 2 * STEPS and saved["optimizer"]["counters"]["skipped"] == len(skip)
    for k in range(len(seen) - 1):
        same = [torch.equal(a, b) for a, b in zip(seen[k], seen[k + 1])]
        assert all(same) if k in skip else not any(same), k


def test_train_epoch_seconds_count_every_session_of_an_epoch(tmp_path, monkeypatch):
    """epochs.csv's seconds (the README times epochs by it) and images_per_sec are an epoch's training time over all
    the sessions it ran in: with a clock that moves 1 s per training step, each epoch (5 steps, 60 of the 66 training
    images in full batches) takes 5 s at 12 images/s, also epoch 1 stopped by --max-steps 3 and resumed, and epoch 2
    stopped by Ctrl-C and resumed."""
    argv = _tiny_run(tmp_path, "--out", str(tmp_path / "run"))
    train.load_images(train.parse_settings(argv))   # decoded and cached now: decoding times itself
    clock, calls, step = [0.0], [0], train.train_step
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], strftime=time.strftime,
                                                             gmtime=time.gmtime))

    def ticking(*args):
        clock[0] += 1.0
        calls[0] += 1
        if calls[0] == 8:   # step 7 (epoch 2, 3 + 5 calls in): Ctrl-C, the run stops after it
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args)
    monkeypatch.setattr(train, "train_step", ticking)
    assert train.main(argv + ["--max-steps", "3"]) is None
    clock[0] += 100.0   # time between sessions is no epoch's
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--resume"])
    assert stop.value.code == 130
    train.main(argv + ["--resume"])
    rows = _rows(tmp_path / "run" / "epochs.csv")
    assert [(float(r["seconds"]), float(r["images_per_sec"])) for r in rows] == [(5.0, 12.0)] * 3


def test_train_divergence_between_logged_steps_is_caught_before_a_checkpoint(tmp_path, monkeypatch):
    """With --log-every 50 the loss is read at a stop and at an epoch's end too: a NaN loss at step 1 stops the run
    at --max-steps 3 without checkpointing it, one at step 6 at the end of epoch 2, named so, last.pt epoch 1's."""
    step = train.train_step
    for bad_step, extra, where, kept in ((1, ["--max-steps", "3"], "at step 2", "no checkpoint was written"),
                                         (6, [], "in epoch 2", "holds the last good state")):
        calls = [0]

        def poisoned(*args):
            counts = step(*args)
            calls[0] += 1
            return counts._replace(loss_sum=torch.tensor(math.nan, dtype=DT)) if calls[0] == bad_step + 1 else counts
        monkeypatch.setattr(train, "train_step", poisoned)
        out = tmp_path / f"at{bad_step}"
        _fails(_tiny_run(tmp_path, "--log-every", "50", "--out", str(out), *extra),
               rf"^train.py: the training loss is nan {where}; stopping \(.*{kept}")
        assert [int(r["step"]) for r in _rows(out / "steps.csv")] == [0] and not (out / "final.json").exists()
        if bad_step == 1:
            assert not (out / "last.pt").exists()
        else:
            saved = torch.load(out / "last.pt", weights_only=False)
            assert (saved["state"]["epoch"], saved["state"]["step"]) == (1, STEPS)


@pytest.mark.parametrize("variant", ["sgdhess", "ssamd"])
def test_train_resume_is_bitwise_for_variants_drawing_from_the_global_rng(tmp_path, variant):
    """SGDHESS's Rademacher probes (each step) and SSAM-D's mask regrowth (each refresh) draw from torch's global RNG,
    which last.pt holds: stopped by --max-steps mid-epoch and resumed, the run writes the uninterrupted run's
    steps.csv byte for byte and the same final.json."""
    extra = ["--variant", variant, "--epochs", "2", *(["--mask-every-epochs", "1"] if variant == "ssamd" else [])]
    whole = train.main(_tiny_run(tmp_path, *extra, "--out", str(tmp_path / "whole")))
    argv = _tiny_run(tmp_path, *extra, "--out", str(tmp_path / "cut"))
    assert train.main(argv + ["--max-steps", "4"]) is None
    assert train.main(argv + ["--resume"]) == whole
    assert (tmp_path / "whole" / "steps.csv").read_bytes() == (tmp_path / "cut" / "steps.csv").read_bytes()


def test_train_a_second_ctrl_c_stops_at_once_and_the_handler_is_given_back(tmp_path, monkeypatch, capsys):
    """Ctrl-C twice within a step (epoch 2's step 6) stops at once: exit 130, no checkpoint of that point (last.pt
    stays epoch 1's, so says the message), and SIGINT's handler is the one before the run."""
    step, calls, before = train.train_step, [0], signal.getsignal(signal.SIGINT)

    def twice(*args):
        calls[0] += 1
        if calls[0] == STEPS + 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args)
    monkeypatch.setattr(train, "train_step", twice)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(_tiny_run(tmp_path, "--out", str(run)))
    assert stop.value.code == 130 and signal.getsignal(signal.SIGINT) is before
    assert f"interrupted at once; {run / 'last.pt'} holds the last checkpoint" in capsys.readouterr().err
    saved = torch.load(run / "last.pt", weights_only=False)
    assert (saved["state"]["epoch"], saved["state"]["step"]) == (1, STEPS)


def test_train_command_line_refuses_sgdhess_compile_sync_ascent_and_an_oversized_batch(tmp_path, capsys):
    """SGDHESS's double backward has no torch.compile and its one pass no ascent to synchronise: both are refused
    with a message (exit 2) before a file is touched, a finished run given as --out left byte for byte; a batch larger
    than the training split is refused by name; --rho-min equal to --rho (a constant rho) is taken."""
    run = tmp_path / "run"
    train.main(_tiny_run(tmp_path, "--epochs", "1", "--out", str(run)))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for flag, message in (("--compile", "--compile cannot run sgdhess"), ("--sync-ascent", "--sync-ascent: sgdhess")):
        with pytest.raises(SystemExit) as stop:
            train.main(_tiny_run(tmp_path, "--epochs", "1", "--out", str(run), "--variant", "sgdhess", flag,
                                 "--overwrite"))
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    args = train.parse_settings(["--data-dir", "x", "--rho", "0.07", "--rho-min", "0.07"])
    assert args.rho_min == 0.07
    # a batch larger than the 66 training images (72 less the 6 validation ones) is refused, no folder left behind
    _fails(_tiny_run(tmp_path, "--batch-size", "67", "--out", str(tmp_path / "big")),
           r"--batch-size 67 must be a multiple of the 1 rank\(s\) and at most the 66 training images")
    assert not (tmp_path / "big").exists()


# A flag given where it does nothing: (the command, what train.py says, the same flag in a setting where it acts)
DEAD_FLAG_CASES = [
    (["--optimizer", "adamw", "--nesterov"], "--nesterov does nothing here: --optimizer adamw has none", ["--nesterov"]),
    (["--optimizer", "adamw", "--no-nesterov"], "--nesterov does nothing here", ["--no-nesterov"]),
    (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum does nothing here: --optimizer adamw", ["--momentum", "0.5"]),
    (["--milestones", "0.3"], "--milestones does nothing here: only --schedule multistep reads it (the schedule is cosine)",
     ["--schedule", "multistep", "--milestones", "0.3"]),
    (["--schedule", "step", "--gamma", "0.5"], "--gamma does nothing here: only --schedule multistep reads it (the "
     "schedule is step)", ["--schedule", "multistep", "--gamma", "0.5"]),
    (["--noise-type", "asym"], "--noise-type does nothing here: no label is flipped",
     ["--label-noise", "0.2", "--noise-type", "asym"]),
    (["--sharpness-batches", "4"], "--sharpness-batches does nothing here: no sharpness is measured",
     ["--sharpness-every", "5", "--sharpness-batches", "4"]),
    (["--sharpness-batch-size", "64"], "--sharpness-batch-size does nothing here: no sharpness is measured",
     ["--sharpness", "--sharpness-batch-size", "64"]),
    (["--sharpness-iters", "5"], "--sharpness-iters does nothing here: no sharpness is measured",
     ["--sharpness-every", "5", "--sharpness-iters", "5"]),
    (["--schedule", "constant", "--rho-min", "0.01"], "--rho-min does nothing here: rho follows the lr schedule, constant",
     ["--schedule", "constant", "--warmup-epochs", "1", "--rho-min", "0.01"]),
    (["--schedule", "constant", "--warmup-epochs", "0", "--rho-min", "0.02"], "--rho-min does nothing here: rho follows",
     ["--rho-min", "0.02"]),   # cosine: rho falls with the lr
]
IDLE_SAM_FLAG_CASES = [
    (["--variant", "sam", "--looksam-alpha", "0.5"], "--looksam-alpha does nothing here: looksam_k is 1",
     ["--variant", "looksam", "--looksam-alpha", "0.5"]),
    (["--tail-weight", "3"], "--tail-weight does nothing here: only --variant imbsam", ["--variant", "imbsam", "--tail-weight", "3"]),
    (["--variant", "sam", "--condition", "3"], "--condition does nothing here: the bin scale (1, 1, 1, 1, 1) has no 'c'",
     ["--variant", "sam", "--bin-scale", *"cc1cc", "--condition", "3"]),
    (["--variant", "samme1", "--bin-scale", *"11111", "--condition", "3"], "--condition does nothing here: the bin "
     "scale (1.0, 1.0, 1.0, 1.0, 1.0) has no 'c'", ["--bin-scale", "1/c", *"1111", "--condition", "3"]),
    (["--variant", "samckpt1", "--condition-warmup-epochs", "2"], "--condition-warmup-epochs does nothing here: the bin "
     "scale", ["--variant", "saner", "--condition-warmup-epochs", "2"]),
    (["--variant", "customsame-pos", "--condition", "3"], "--condition does nothing here", ["--variant", "customsame", "--condition", "3"]),
    (["--variant", "sgd", "--rho", "0.1"], "--rho does nothing here: descent 'sgd' steps along g, with no radius",
     ["--variant", "sgdhess", "--rho", "0.1"]),
    (["--variant", "sgd", "--adaptive"], "--adaptive does nothing here: descent 'sgd' takes one pass a step",
     ["--variant", "sam", "--adaptive"]),
    (["--variant", "sgd", "--rho-min", "0.01"], "--rho-min does nothing here: descent 'sgd' steps along g",
     ["--variant", "gsam", "--rho-min", "0.01"]),
    (["--variant", "sgd", "--p", "3"], "--p does nothing here: descent 'sgd' takes one pass", ["--p", "3"]),
    (["--variant", "sgd", "--gsam-alpha", "0"], "--gsam-alpha does nothing here: descent 'sgd' takes one pass",
     ["--variant", "gsam", "--gsam-alpha", "0.1"]),
    # of two rules the first one's reason: sgd never ascends, whether adaptive or not
    (["--variant", "sgd", "--asam-eta", "0.01"], "--asam-eta does nothing here: descent 'sgd' takes one pass",
     ["--variant", "asam", "--asam-eta", "0.01"]),
    (["--variant", "sgdhess", "--no-freeze-bn-stats"], "--freeze-bn-stats does nothing here: descent 'hessian' takes one "
     "pass a step: no ascent, no second pass, no g'", ["--variant", "looksam", "--no-freeze-bn-stats"]),
    (["--variant", "sgdhess-exact", "--persist-from", "0"], "--persist-from does nothing here: descent 'hessian-exact'",
     ["--variant", "samme1", "--persist-from", "0"]),
    (["--variant", "sam", "--hessian-every", "2"], "--hessian-every does nothing here: only descent 'hessian' (sgdhess)",
     ["--variant", "sgdhess", "--hessian-every", "2"]),
    (["--variant", "sgdhess-exact", "--hessian-every", "2"], "--hessian-every does nothing here: only descent 'hessian'",
     ["--variant", "sgdhess", "--hessian-every", "3"]),
    (["--asam-eta", "0.01"], "--asam-eta does nothing here: only adaptive", ["--variant", "asam", "--asam-eta", "0.01"]),
    (["--friendly-lambda", "0.5"], "--friendly-lambda does nothing here: friendly_sigma is 0",
     ["--variant", "friendlysam", "--friendly-lambda", "0.5"]),
    (["--mask-every-epochs", "2"], "--mask-every-epochs does nothing here: sparsity is 0",
     ["--variant", "ssamd", "--mask-every-epochs", "2"]),
    (["--mask-mode", "fisher"], "--mask-mode does nothing here: sparsity is 0", ["--sparsity", "0.5", "--mask-mode", "fisher"]),
    (["--fisher-samples", "8"], "--fisher-samples does nothing here: sparsity is 0",
     ["--variant", "ssamf", "--fisher-samples", "8"]),
    (["--variant", "ssamd", "--fisher-samples", "8"], "--fisher-samples does nothing here: only the Fisher mask (ssamf)",
     ["--variant", "ssamf", "--fisher-samples", "8"]),
    (["--variant", "ssamf", "--drop-rate", "0.3"], "--drop-rate does nothing here: only the dynamic mask (ssamd)",
     ["--sparsity", "0.3", "--drop-rate", "0.3"]),
    (["--dual"], "--dual does nothing here: at p 2", ["--p", "3", "--dual"]),
    (["--p", "2", "--dual"], "--dual does nothing here: at p 2", ["--p", "inf", "--dual"]),
]


@pytest.mark.parametrize("argv, message, acting", DEAD_FLAG_CASES, ids=[" ".join(c[0]) for c in DEAD_FLAG_CASES])
def test_train_refuses_a_flag_given_where_it_does_nothing(tmp_path, capsys, monkeypatch, argv, message, acting):
    """A flag given on the command line that these training settings never read is a usage error naming it and why
    (exit 2, no folder made), not a run of another experiment than the one asked for; where they read it, it is taken."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "run"), "--device", "cpu", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    train.parse_settings(["--data-dir", "x", *acting], world=1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, message, acting", IDLE_SAM_FLAG_CASES, ids=[" ".join(c[0]) for c in IDLE_SAM_FLAG_CASES])
def test_train_warns_of_a_sam_flag_its_variant_never_reads(capsys, argv, message, acting):
    """A SAM flag the variant never reads is warned of with the reason, not refused: a sweep passes the same flags to
    every variant (--rho to its sgd baseline). Where the variant reads it, nothing is said."""
    args = train.parse_settings(["--data-dir", "x", *argv], world=1)
    err = capsys.readouterr().err
    assert err.startswith("train.py: warning: ") and message in err and f"(--variant {args.variant})" in err
    train.parse_settings(["--data-dir", "x", *acting], world=1)
    assert capsys.readouterr().err == ""


def test_train_warns_of_a_new_sam_flag_given_to_a_one_pass_variant():
    """A flag added to sam.FLAGS gets its --option from train.py unlisted; the one-pass variants (sgd, sgdhess) never
    read it, and train.py said nothing where it named the flags they ignore one by one."""
    new_flag = ("import sys, sam; sam.FLAGS['agree'] = False; import train; "
                "train.parse_settings(['--data-dir', 'x', *sys.argv[1:]], world=1)")
    for argv, said in ((["--variant", "sgd", "--agree"], "--agree does nothing here: descent 'sgd' takes one pass"),
                       (["--variant", "sam", "--agree"], "")):
        done = subprocess.run([sys.executable, "-c", new_flag, *argv], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0 and said in done.stderr and bool(said) == ("warning" in done.stderr), done.stderr


def test_train_idle_flags_are_judged_on_the_command_line_given_not_on_defaults(tmp_path, capsys, monkeypatch):
    """Only flags given are judged: adamw with every default of SGD's momentum is taken; several dead flags are named
    in one message; --sync-ascent is refused on one process only (torchrun's WORLD_SIZE), and a resumed run is not
    judged again: it keeps its config.json's settings (a finished two-rank --sync-ascent run measures its sharpness on
    one process with its own command)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.parse_settings(["--data-dir", "x", "--optimizer", "adamw"], world=1).nesterov is False
    assert capsys.readouterr().err == ""
    dead = ["--optimizer", "adamw", "--nesterov", "--milestones", "0.5", "--tail-weight", "1", "--sync-ascent"]
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "run"), "--device", "cpu", *dead])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and all(f"{flag} does nothing here" in err for flag in (
        "--nesterov", "--milestones", "--sync-ascent"))
    assert train.parse_settings(["--data-dir", "x", "--sync-ascent"], world=2).sync_ascent
    assert train.parse_settings(["--data-dir", "x", "--sync-ascent"]).sync_ascent   # world not known yet
    train.parse_settings(["--data-dir", "x", "--variant", "sgd", "--sync-ascent"], world=2)   # no ascent to average
    assert "--sync-ascent does nothing here: descent 'sgd' takes one pass" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")   # torchrun --nproc_per_node 1
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "run"), "--device", "cpu", "--sync-ascent"])
    assert stop.value.code == 2 and "--sync-ascent does nothing here: one process" in capsys.readouterr().err
    assert train.parse_settings(["--data-dir", "x", *dead, "--resume"], world=1).tail_weight == 1
    idle = ["--variant", "sgd", "--rho", "0.1", "--persist-from", "5", "--tail-weight", "2"]
    train.parse_settings(["--data-dir", "x", *idle], world=1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(f"{flag} does nothing here" in err for flag in (
        "--rho", "--persist-from", "--tail-weight"))


def _documented_train_commands():
    """Every train.py command the repository states: each run reproduce.py launches (the claims in results/setting.json's
    setting and the selection), the command (and end_settings_command) of each results/ run, figures/results.md's rows
    and README.md's (its $V sweep for each of four variants)."""
    import reproduce
    root = Path(__file__).parent
    setting = json.loads((root / "results" / "setting.json").read_text())["args"]
    runs = reproduce.runs_of([*reproduce.claims(setting), *reproduce.select_groups()], setting, "data", "cpu")
    commands = {f"reproduce {run.group}/{run.label}-s{run.seed}": run.args for run in runs}
    for path in sorted((root / "results").glob("**/config.json")):
        config = json.loads(path.read_text())
        for key in ("command", "end_settings_command"):
            if key in config:
                commands[f"{path} {key}"] = shlex.split(config[key])
    for name in ("figures/results.md", "README.md"):
        text = (root / name).read_text().replace("\\\n", " ")
        inline = re.findall(r"`((?:python|torchrun [^`]*?) train\.py[^`]*)`", text)
        block = re.findall(r"^((?:python|torchrun .*?) train\.py[^#\n]*)", text, flags=re.M)
        for i, line in enumerate(inline + block):
            line = " ".join(line.split()).replace("$SEED", "0")
            for v in ("sgd", "sam", "samme1", "samckpt1") if "$V" in line else ("",):
                commands[f"{name} {i} {v}"] = shlex.split(line.replace("$V", v))
    return {k: v[v.index("train.py") + 1:] if "train.py" in v else v for k, v in commands.items()}


def test_every_documented_train_command_passes_the_idle_flag_check(capsys):
    """No command that reproduce.py launches, that a results/ run recorded, or that the README or figures/results.md
    gives is refused as giving a flag that does nothing; only the README's sweep warns, for its sgd baseline."""
    commands = _documented_train_commands()
    assert len(commands) > 800 and any(k.startswith("README.md") for k in commands) and any(
        k.startswith("figures/results.md") for k in commands)
    warned = set()
    for where, argv in commands.items():
        try:
            train.parse_settings(argv, world=1)
        except SystemExit:
            pytest.fail(f"{where}: {shlex.join(argv)}")
        if capsys.readouterr().err:
            warned.add(where)
    assert len(warned) == 1 and next(iter(warned)).startswith("README.md") and next(iter(warned)).endswith(" sgd")


def test_train_overwrite_starts_again_a_run_killed_before_its_first_checkpoint_with_its_code(tmp_path):
    """A run with config.json but no last.pt (killed before its first checkpoint) is refused with the advice to pass
    --overwrite, and --overwrite then starts it again; a run's folder holds the train.py and sam.py it ran with (the
    copy the message on other columns points to)."""
    run = tmp_path / "run"
    argv = _tiny_run(tmp_path, "--epochs", "1", "--out", str(run))
    assert train.main(argv + ["--max-steps", "1"]) is None
    (run / "last.pt").unlink()
    _fails(argv, "stopped before its first checkpoint.*pass --overwrite")
    assert train.main(argv + ["--overwrite"])["best_epoch"] == 1
    assert len(_rows(run / "steps.csv")) == STEPS and len(_rows(run / "epochs.csv")) == 1
    for name in ("train.py", "sam.py"):
        assert (run / name).read_bytes() == (REPO / name).read_bytes(), name


def test_train_resume_of_a_run_that_measured_its_sharpness_measures_nothing_again(tmp_path, monkeypatch, capsys):
    """--resume --sharpness on a finished run whose final.json holds its sharpness returns that final.json, says the
    run is finished and measures nothing (a GPU's minutes of Hessian-vector products)."""
    argv = _tiny_run(tmp_path, "--epochs", "1", "--out", str(tmp_path / "run"), "--sharpness", "--sharpness-batches",
                     "2", "--sharpness-batch-size", "6", "--sharpness-iters", "5")
    final = train.main(argv)
    assert final["sharpness"]["lambda_max"] > 0
    monkeypatch.setattr(train, "sharpness", lambda *args: pytest.fail("measured again"))
    capsys.readouterr()
    assert train.main(argv + ["--resume"]) == final
    assert capsys.readouterr().out == f"{tmp_path / 'run'} is finished; nothing to resume\n"
    (tmp_path / "run" / "best.pt").unlink()   # measured: best.pt is read no more, so one gone since is no error
    assert train.main(argv + ["--resume"]) == final


def test_train_ssamf_draws_new_fisher_images_at_each_refresh_from_the_runs_seed(tmp_path, monkeypatch):
    """SSAM-F's Fisher estimate at each mask refresh takes --fisher-samples images drawn anew from the run's data-order
    generator: the refreshes of a run (epochs 1 and 2 with --mask-every-epochs 1) and runs of two seeds take other
    images, each image once per refresh."""
    drawn, batch = [], train.DeviceLoader.train_batch

    def watched(self, idx, *args, **kwargs):
        if len(idx) == 1:   # a Fisher pass's batch-1 draw
            drawn[-1].append(int(idx))
        return batch(self, idx, *args, **kwargs)
    monkeypatch.setattr(train.DeviceLoader, "train_batch", watched)
    samples = {}
    for seed in ("1", "2"):
        drawn.clear()
        drawn.append([])
        train.main(_tiny_run(tmp_path, "--variant", "ssamf", "--fisher-samples", "8", "--mask-every-epochs", "1",
                             "--epochs", "2", "--seed", seed, "--out", str(tmp_path / seed)))
        samples[seed] = [drawn[0][:8], drawn[0][8:]]
        assert len(drawn[0]) == 16 and all(len(set(s)) == 8 for s in samples[seed])
        assert set(samples[seed][0]) != set(samples[seed][1])
    assert samples["1"] != samples["2"]


def test_train_fisher_images_are_augmented_as_training_is_cutout_included():
    # SSAM-F's Fisher passes: n_samples images drawn by a permutation of the split, one at a time, each cropped,
    # mirrored and (with --cutout) cut out by the same generator, as a training batch of it would be
    images = torch.randint(1, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = train.DeviceLoader(images, torch.arange(12) % 3, None, "cifar10", torch.device("cpu"), channels_last=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    seen = []
    model[0].register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].clone()))
    opt = SAM(model.parameters(), torch.optim.SGD, variant="ssamf", lr=0.1)
    for cutout in (True, False):
        seen.clear()
        train.fisher_pass(model, opt, loader, torch.Generator().manual_seed(3), 8, train.StepSettings(), cutout)
        rng = torch.Generator().manual_seed(3)
        expected = [loader.train_batch(i, rng, cutout)[0] for i in torch.randperm(12, generator=rng)[:8].split(1)]
        assert len(seen) == 8 and all(torch.equal(x, want) for x, want in zip(seen, expected))
        assert any((x == 0).any() for x in seen) == cutout   # a cutout hole: the only zeros after normalisation


def test_train_label_noise_that_flips_no_image_logs_no_noisy_accuracy(tmp_path):
    """--label-noise 0.01 flips floor(0.01 x 66) = 0 of the tiny run's training labels: every image is clean, so
    clean_train_acc is train_acc and noisy_train_acc (memorised noise over flipped images) is left empty."""
    out = tmp_path / "run"
    train.main(_tiny_run(tmp_path, "--label-noise", "0.01", "--epochs", "2", "--out", str(out)))
    for row in _rows(out / "epochs.csv"):
        assert row["noisy_train_acc"] == "" and float(row["clean_train_acc"]) == float(row["train_acc"])


def test_train_ssamf_fisher_passes_leave_bn_statistics_with_no_freeze_bn_stats_too(tmp_path, monkeypatch):
    """--no-freeze-bn-stats counts both passes of every step in BN's running statistics, but SSAM-F's batch-1 Fisher
    passes are no step's (fisher_pass: "BN running stats untouched"): each refresh leaves every buffer as it was, and
    after 2 epochs of 5 two-pass steps every BN layer has tracked 20 batches, not 20 + the 2 x 4 Fisher images."""
    fisher, moved = train.fisher_pass, []

    def watched(model, *args):
        before = [b.clone() for b in model.buffers()]
        fisher(model, *args)
        moved.append(not all(torch.equal(a, b) for a, b in zip(before, model.buffers())))
    monkeypatch.setattr(train, "fisher_pass", watched)
    out = tmp_path / "run"
    train.main(_tiny_run(tmp_path, "--variant", "ssamf", "--no-freeze-bn-stats", "--fisher-samples", "4",
                         "--mask-every-epochs", "1", "--epochs", "2", "--out", str(out)))
    saved = torch.load(out / "last.pt", weights_only=False)["model"]
    assert moved == [False, False]
    assert {int(v) for k, v in saved.items() if k.endswith("num_batches_tracked")} == {2 * 2 * STEPS}
