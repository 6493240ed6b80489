"""Sharpness-Aware Minimization and its variants as flags of one optimizer wrapper. Torch only: copy this file.

SAM (Foret et al. 2021, arXiv 2010.01412) takes two gradients a step:
    g  = grad L(w)          first pass
    e  = rho g / ||g||      ascent: climb to w + e
    g' = grad L(w + e)      second pass
    d  = g'                 direction
    w  = base_step(w, d)    at w: the base optimizer's momentum and weight decay act after d
Every variant changes e, d or the number of passes. The notes sort coordinates by r = g'/(g + ratio_eps)
into checkpoints B1 r > 1, B2 0 < r < 1, B3 r < -1, B4 -1 < r < 0 (strict, as the origin code; B0 holds
r = 0, -1, 1 and 0/0). c is the flag `condition`, T = |w| + asam_eta.

preset           e (ascent)                          d (direction)                       source
sam              rho g/||g||                         g'                                  Foret et al. 2021
sgd              (one pass)                          g                                   -
usam             rho g                               g'                                  Dai, Ahn, Sra 2023; seed 004
asam             rho T^2 g/||T g||, rho = 2          g'                                  Kwon et al. 2021; seed 004
linf-sign        rho sign(g): the L-inf ball         g'                                  seed 004's formula line
linf-norm        rho g/||g||_inf                     g'                                  seed 004's runs (p = inf norm)
samme1..4        as SAM                              c g' on B1 (..B4), g' elsewhere     seed 001 (SAME)
samme12/13/234   as SAM                              c g' on the named bins              seed 001
samme134         as SAM                              g'/c on B2, c g' elsewhere (B0 too) origin 1.6
saner            as SAM, c = 0.5                     c g' on B2 (+ condition_warmup)     lhchau/saner
customsame       as SAM                              (0, c, 1, 1/c, c) g' on B0..B4      seed 001 (CustomSAME v1)
customsame-pos   as SAM                              g' on B0-B2, 0 on B3, B4            origin v2
customsame-no3   as SAM                              0 on B3, g' elsewhere               origin v3
samckptK..       as SAM                              g' on the bins K.., g elsewhere     seed 000 (SAMCKPT)
sammagnitude     as SAM                              |g'| sign(g)                        seed 002
samdirection     as SAM                              sign(g') |g|                        seed 002
sgdhess          (one pass)                          (1 + rho |H z|) g, z Rademacher     seed 002 (origin's diagonal)
sgdhess-exact    (one pass)                          g + rho H g                         seed 002's formula
ssamf / ssamd    mask * rho g/||g||, 50% sparse      g'                                  Mi et al. 2022 (Fisher / dynamic mask)
friendlysam      rho h/||h||, h = g - m_{t-1}        g'                                  Li et al. 2024; m EMA of g, lambda 0.9
imbsam           as SAM on the tail-class loss       g'_tail + g_head                    Zhou et al. 2023
fishersam        rho (g/f)/sqrt(g.(g/f)), rho 0.1    g'                                  Kim et al. 2022; f = 1 + g^2
gsam             as SAM                              g' - 0.4 (g - (<g,g'>/||g'||^2) g') Zhuang et al. 2022
looksam          as SAM every 10 steps, rho 0.1      between: g + 0.7 ||g||/||g_v|| g_v  Liu et al. 2022
Weight decay is the base optimizer's, never scaled by c. The FLAGS combine (`variant="samme1", adaptive=True`).
Statistics (opt.stats: checkpoint shares, finer r > 1 bins, norms of g, g', d and w, cos(g, g'), mag_up, persistence
of the B1 set) are off unless stats_every > 0; they stay on the device until read.
"""
import functools
import inspect
import math
import numbers
import warnings

import torch

FLAGS = dict(   # every flag with its neutral value: at these values SAM is plain SAM
    rho=0.05,               # ascent radius (rho_H for the sgdhess presets)
    p=2.0,                  # L_p geometry of the ascent (inf allowed)
    dual=True,              # p != 2: True, steepest ascent on the L_p ball; False, e = rho g/||g||_p
    normalize=True,         # False: USAM, e = rho g
    adaptive=False,         # ASAM: e = rho T^2 g/||T g||, T = |w| + asam_eta
    asam_eta=0.0,           # 0 as davda54/sam; 0.01 as the official ASAM code
    fisher_eta=0.0,         # Fisher SAM: e = rho (g/f)/sqrt(g.(g/f)), f = 1 + fisher_eta g^2
    friendly_sigma=0.0,     # FriendlySAM: ascend along g - sigma m_{t-1}
    friendly_lambda=0.9,    # FriendlySAM: m_t = lambda m_{t-1} + (1 - lambda) g_t, m_0 = g_0
    sparsity=0.0,           # sparse SAM: share of coordinates NOT perturbed
    mask_mode="dynamic",    # sparse SAM mask: "fisher" (SSAM-F) or "dynamic" (SSAM-D)
    drop_rate=0.5,          # SSAM-D death rate at the start of training, cosine-decayed
    condition=2.0,          # c, the multiplier the notes call "condition"
    condition_warmup=0,     # steps over which c rises linearly from 1 (SANER's alpha warm-up)
    bin_scale=(1, 1, 1, 1, 1),  # multiplier of d on B0..B4: numbers, "c" or "1/c"
    sam_bins="01234",       # bins whose d starts from g'; the others start from g (SAMCKPT)
    combine="",             # "magnitude": d = |g'| sign(g); "direction": d = sign(g') |g|
    gsam_alpha=0.0,         # GSAM: d = g' - alpha (g - (<g,g'>/||g'||^2) g')
    looksam_k=1,            # LookSAM: full SAM every k steps, one pass in between
    looksam_alpha=0.7,      # LookSAM: d = g + alpha ||g||/||g_v|| g_v between refreshes
    descent="sam",          # "sam" (two passes), "sgd" (d = g), "hessian" / "hessian-exact" (SGDHESS)
    hessian_every=1,        # SGDHESS diagonal: refresh |H z| every k steps
    ratio_eps=1e-8,         # r = g'/(g + ratio_eps): added, not sign-aware, as the origin code
    norm_eps=1e-12,         # e = rho g/(||g|| + norm_eps): a zero gradient gives a zero e
    skip_nonfinite=True,    # a non-finite g or d skips the step exactly (one host read a step); False: davda54
    stats_every=0,          # ratio statistics every k steps (0: never)
    persist_from=None,      # step t0 from which the B1 set is tracked, every step (seed 000, Exp. 2-3)
)
FUSED_BASES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)   # fused kernels on CPU and CUDA
GROUP_FLAGS = ("rho", "adaptive", "asam_eta", "condition", "bin_scale", "sam_bins", "combine")   # per param group
# flags that shape e, the passes or the bookkeeping, never d: any other flag off its neutral value keeps g for d
NO_G_FLAGS = {"rho", "p", "dual", "normalize", "adaptive", "asam_eta", "fisher_eta", "friendly_lambda", "sparsity",
              "mask_mode", "drop_rate", "condition", "condition_warmup", "looksam_alpha", "descent", "hessian_every",
              "ratio_eps", "norm_eps", "skip_nonfinite", "stats_every", "persist_from"}

VARIANTS = {
    "sam": {},
    "sgd": dict(descent="sgd"),
    "usam": dict(normalize=False),
    "asam": dict(adaptive=True, rho=2.0),
    "linf-sign": dict(p=math.inf),
    "linf-norm": dict(p=math.inf, dual=False),
    "samme1": dict(bin_scale=(1, "c", 1, 1, 1)),
    "samme2": dict(bin_scale=(1, 1, "c", 1, 1)),
    "samme3": dict(bin_scale=(1, 1, 1, "c", 1)),
    "samme4": dict(bin_scale=(1, 1, 1, 1, "c")),
    "samme12": dict(bin_scale=(1, "c", "c", 1, 1)),
    "samme13": dict(bin_scale=(1, "c", 1, "c", 1)),
    "samme134": dict(bin_scale=("c", "c", "1/c", "c", "c")),
    "samme234": dict(bin_scale=(1, 1, "c", "c", "c")),
    "saner": dict(bin_scale=(1, 1, "c", 1, 1), condition=0.5),
    "customsame": dict(bin_scale=(0, "c", 1, "1/c", "c")),
    "customsame-pos": dict(bin_scale=(1, 1, 1, 0, 0)),
    "customsame-no3": dict(bin_scale=(1, 1, 1, 0, 1)),
    **{f"samckpt{b}": dict(sam_bins=b) for b in
       ("1", "2", "3", "4", "12", "13", "14", "23", "34", "123", "124", "134", "234")},
    "sammagnitude": dict(combine="magnitude"),   # the origin's file names are swapped; these are the notes'
    "samdirection": dict(combine="direction"),
    "sgdhess": dict(descent="hessian"),
    "sgdhess-exact": dict(descent="hessian-exact"),
    "ssamf": dict(sparsity=0.5, mask_mode="fisher"),
    "ssamd": dict(sparsity=0.5, mask_mode="dynamic"),
    "friendlysam": dict(friendly_sigma=1.0, friendly_lambda=0.9),
    "imbsam": {},           # SAM mechanics; the head-class gradient comes through stash_clean_grad()
    "fishersam": dict(fisher_eta=1.0, rho=0.1),
    "gsam": dict(gsam_alpha=0.4),
    "looksam": dict(looksam_k=10, looksam_alpha=0.7, rho=0.1),
}

# torch.bucketize(r, edges, right=True) gives 13 buckets: r < -1 | -1 | (-1, 0) | 0 | (0, 1) | 1 | (1, 1.2) |
# [1.2, 1.5) | [1.5, 2) | [2, 4) | [4, 8) | [8, 16) | >= 16. The edges after -1, 0 and 1 are nextafter(x, inf).
FINE_EDGES = (1.2, 1.5, 2.0, 4.0, 8.0, 16.0)
FINE_NAMES = ("r1_1.2", "r1.2_1.5", "r1.5_2", "r2_4", "r4_8", "r8_16", "r16_inf")
CHECKPOINT_OF_BUCKET = (3, 0, 4, 0, 2, 0, 1, 1, 1, 1, 1, 1, 1)
STAT_KEYS = (("step",) + tuple(f"ckpt{k}" for k in range(5)) + FINE_NAMES +
             ("grad_norm", "perturbed_grad_norm", "direction_norm", "weight_norm", "cos", "mag_up", "skipped",
              "persist_t0", "persist_overlap", "persist_running"))


class SAM(torch.optim.Optimizer):
    """SAM(params, base_optimizer, rho=None, adaptive=None, *, variant="sam", **flags_and_base_kwargs).

    davda54/sam's signature (None: the preset's value); explicit flags override the preset `variant`, other
    kwargs build the base optimizer (a class). Two-step use:
        loss(w).backward();   opt.first_step(zero_grad=True)    # w -> w + e
        loss(w+e).backward(); opt.second_step(zero_grad=True)   # back to w, base step with d
    or opt.step(closure), the closure zeroing grads, running forward and backward, returning the loss.
    """

    def __init__(self, params, base_optimizer, rho=None, adaptive=None, *, variant="sam", **kwargs):
        if isinstance(rho, str):
            raise TypeError(f"SAM's third argument is rho (davda54/sam's signature), a number; got {rho!r}" + (
                f": pass variant={rho!r} by keyword" if rho in VARIANTS else ""))   # "0.05" from a config is no preset
        if variant not in VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}; valid: {', '.join(sorted(VARIANTS))}")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class, e.g. torch.optim.SGD")
        accepts = inspect.signature(base_optimizer).parameters
        clash = sorted(set(FLAGS) & set(accepts))
        if clash:   # the param groups are shared: the base would read SAM's value (Adadelta's rho 0.9 became 0.05)
            raise ValueError(f"{base_optimizer.__name__} has its own {', '.join(clash)}, which SAM's flag of that "
                             "name would replace in the shared param groups; use another base optimizer")
        closure = inspect.signature(base_optimizer.step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:   # LBFGS: its line search needs the loss
            raise ValueError(f"{base_optimizer.__name__}.step needs a closure to re-evaluate the loss; SAM's base step "
                             "takes a fixed direction d: use a base optimizer whose step needs no closure")
        if kwargs.get("maximize"):   # the ascent would climb the objective the base optimizer climbs too
            raise ValueError("maximize=True: SAM perturbs towards a higher loss; minimize the negated objective instead")
        given = dict(rho=rho, adaptive=adaptive, **{k: kwargs.pop(k) for k in list(kwargs) if k in FLAGS})
        flags = {**FLAGS, **VARIANTS[variant], **{k: v for k, v in given.items() if v is not None}}
        _check_flags(flags)
        super().__init__(params, flags)
        if not {"fused", "foreach", "differentiable"} & set(kwargs):   # torch's CPU default is a per-tensor loop
            fused = issubclass(base_optimizer, FUSED_BASES) and "fused" in accepts and all(
                p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in self._params())
            if fused or "foreach" in accepts:
                kwargs["fused" if fused else "foreach"] = True   # fused: one kernel for all tensors (bench.py)
        try:
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        except TypeError as err:
            raise TypeError(f"{err}; SAM flags are: {', '.join(FLAGS)}") from None
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.variant = variant
        self.ratio_stats = RatioStats()
        self.last_step_skipped = False
        self._step, self._skipped = 0, 0      # completed steps; skipped (non-finite) steps
        self._parts = None                    # between first_step and second_step: the _Part list
        self._took_one_pass = False           # first_step took the whole (one-pass) step
        self._clean = None                    # ImbSAM: the head-class gradient, added to d
        self._warned = set()

    @torch.compiler.disable   # dynamo drops attribute stores on an Optimizer (self._parts): w + e would be forgotten
    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Ascent: w -> w + e. On a one-pass step (sgd, sgdhess, LookSAM between refreshes) the whole update."""
        if self.perturbed:
            raise RuntimeError("first_step() called twice: call second_step() to return to w first")
        parts = self._gather()
        if self.single_pass:
            self._descend(parts, self._one_pass_direction(parts))
            self._took_one_pass = True
        elif not parts:   # else second_step() would say "without first_step()"
            meta = any(p.is_meta for p in self._params())   # model.to_empty() made new parameters, SAM holds the old
            raise ValueError("first_step(): no parameter has a gradient; " + ("SAM holds meta parameters: build it after "
                             "model.to_empty()" if meta else "call loss.backward() before first_step()"))
        else:
            keep_g = self._stats_step() or self._tracks_persistence() or self._uses_g()
            for part in parts:
                part.g = _flat(part.grads) if keep_g else None        # g, kept for d and the ratio
                part.g_sq = _sq_norm(part.grads)
            for part, e in zip(parts, self._ascent(parts, in_place=zero_grad)):
                part.w = [p.data for p in part.params]                # w is kept as the storage it is
                for p, w_plus_e in zip(part.params, torch._foreach_add(part.w, e)):
                    p.data = w_plus_e                                 # climb out of place
                part.grads = None
            self._parts = parts
        if zero_grad:
            self.zero_grad()

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Descent: back to w (storage swap, bit for bit), d from g and g', the base step at w."""
        parts, self._parts = self._parts, None
        if parts is None:
            if not self._took_one_pass:
                raise RuntimeError("second_step() without first_step(): nothing to descend from")
            self._took_one_pass = False                               # the step was taken in first_step
            return self.zero_grad() if zero_grad else None
        self._back_to_w(parts)
        if any(p.grad is None for part in parts for p in part.params):   # a branch not reached at w + e: g' = 0
            self._unreached(parts)
        for part in parts:
            part.grads = [p.grad for p in part.params]                # now g'
        late = self._late_grads(parts)                                # g' of parameters without a g: checked too
        gp = [_flat(part.grads) if part.g is not None else None for part in parts]
        dots = _dots(parts, gp) if gp[0] is not None else None
        d = [self._direction(part, gp_part, dots) for part, gp_part in zip(parts, gp)]
        if self._clean is not None:
            self._add_clean(parts, d)
        self._descend(parts, d, gp, dots, late)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """Torch convention: calls closure() for each pass the step needs; returns the first loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that zeroes grads, runs forward and backward, "
                             "and returns the loss; or call first_step() and second_step()")
        if any(p.grad is not None for p in self._params()):
            self._warn_once("closure", "step(closure) found gradients already present: a loss.backward() before "
                            "step(closure) is a wasted pass (BatchNorm counts it twice); call step(closure) alone")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        if self.perturbed:
            try:
                closure()
            except BaseException:   # a caller that skips the batch (out of memory) goes on from w, not w + e
                self._back_to_w(self._parts)
                self._parts = None
                raise
        self.second_step(zero_grad=True)
        return loss

    def add_param_group(self, param_group):
        """torch's, once the group's flags are checked: the constructor's groups and any added later (unfrozen layers)."""
        sam_wide = set(FLAGS) - set(GROUP_FLAGS)
        if hasattr(self, "base_optimizer"):   # added later: SAM-wide flags as a schedule set them, not as built
            for name in sam_wide:
                param_group.setdefault(name, self.param_groups[0][name])
        group = {**self.defaults, **param_group}
        _check_flags(group)
        for name in sam_wide:
            if self.param_groups and repr(group[name]) != repr(self.param_groups[0][name]):
                raise ValueError(f"SAM flag {name!r} must be the same in every param group")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ the variants' math
    def _ascent(self, parts, in_place):
        """e per part, one global norm over all groups (the table in the module docstring): h = g (g - sigma m for
        FriendlySAM), times T for ASAM; e = rho u/||.||, times T again for ASAM, where u is h itself (L2),
        sign(h)|h|^(q-1) over ||h||_q^(q-1) (L_p ball, 1/p + 1/q = 1), h/f over sqrt(h.h/f) (Fisher SAM)."""
        f, p = self.flags, self.flags["p"]
        h = []
        for part in parts:
            x = part.grads
            if f["friendly_sigma"] > 0 and any("friendly_m" in self.state[p] for p in part.params):
                m = [self.state[p]["friendly_m"] if "friendly_m" in self.state[p] else torch.zeros_like(p)
                     for p in part.params]   # a tensor whose first gradient comes later: m = 0 until then
                x = torch._foreach_add(x, m, alpha=-f["friendly_sigma"])
            if part.group["adaptive"]:
                x = torch._foreach_mul(x, self._asam_t(part))
            h.append(x)
        if f["fisher_eta"] > 0:
            fisher = [torch._foreach_add(torch._foreach_mul(torch._foreach_mul(x.grads, x.grads), f["fisher_eta"]), 1.0)
                      for x in parts]   # f = 1 + eta g^2, the diagonal Fisher from the same mini-batch
            u = [torch._foreach_div(x, y) for x, y in zip(h, fisher)]
            norm = _global_norm([torch._foreach_div(x, torch._foreach_sqrt(y)) for x, y in zip(h, fisher)], 2)
        elif p == 2 and all(x is part.grads for part, x in zip(parts, h)):   # ||g||, already known
            u, norm = h, sum(part.g_sq.to(parts[0].device) for part in parts).sqrt()
        elif p == 2 or not f["dual"]:
            u, norm = h, _global_norm(h, p)
        elif math.isinf(p):
            u, norm = [torch._foreach_sign(x) for x in h], None
        else:
            q = p / (p - 1)
            u = [torch._foreach_mul(torch._foreach_sign(x), torch._foreach_pow(torch._foreach_abs(x), q - 1)) for x in h]
            norm = _global_norm(h, q) ** (q - 1)
        e = []
        for part, x in zip(parts, u):
            if part.group["adaptive"]:
                x = torch._foreach_mul(x, self._asam_t(part))
            radius = part.group["rho"] if norm is None or not f["normalize"] else \
                part.group["rho"] / (norm.to(part.device) + f["norm_eps"])
            if x is part.grads and in_place:    # the grads are discarded after this: scale them where they are
                torch._foreach_mul_(x, radius)
            else:
                x = torch._foreach_mul(x, radius)
            if f["sparsity"] > 0:              # sparse SAM masks e but keeps the full norm: ||e|| <= rho
                torch._foreach_mul_(x, self._masks(part.params))
            e.append(x)
        return e

    def _direction(self, part, gp, dots):
        """d for one part from g and g' (flat), in the order: bin rule, combine, GSAM. Plain SAM: the grads as they are."""
        if gp is None:
            return part.grads
        g, group, f, d = part.g, part.group, self.flags, gp
        if _has_bin_rule(group):   # SAME, CustomSAME, SAMCKPT: d = s_k (g' or g) on checkpoint k of r
            scale, from_gp = self._bin_tables(group, g.dtype, g.device)
            bucket = self._buckets(part, gp)
            start = torch.where(from_gp.index_select(0, bucket), gp, g) if group["sam_bins"] != "01234" else gp
            d = start * scale.index_select(0, bucket)   # as scale[bucket], which is 5x slower on the CPU
        if group["combine"] == "magnitude":    # SAM's magnitude, SGD's sign
            d = gp.abs() * g.sign()
        elif group["combine"] == "direction":  # SAM's sign, SGD's magnitude
            d = gp.sign() * g.abs()
        if f["gsam_alpha"] > 0:                # d = g' - alpha (g - (<g,g'>/||g'||^2) g')
            d = d - f["gsam_alpha"] * (g - (dots["g_gp"] / (dots["gp_gp"] + f["norm_eps"])).to(g) * gp)
        return part.grads if d is gp else _views(d, part.params)

    def _one_pass_direction(self, parts):
        """sgd: d = g; sgdhess: (1 + rho |H z|) g; sgdhess-exact: g + rho H g; LookSAM: g + alpha ||g||/||g_v|| g_v."""
        f = self.flags
        if self.create_graph and not any(g.requires_grad for x in parts for g in x.grads):
            raise ValueError("sgdhess needs the first backward with create_graph=True (see opt.create_graph)")
        if f["descent"] == "hessian-exact":
            hg = self._hvp(parts, [[g.detach() for g in x.grads] for x in parts])
            return [torch._foreach_add(x.grads, h, alpha=x.group["rho"]) for x, h in zip(parts, hg)]
        if f["descent"] == "hessian":
            return [torch._foreach_addcmul(x.grads, h, x.grads, value=x.group["rho"])
                    for x, h in zip(parts, self._hessian_diagonal(parts))]
        if f["looksam_k"] > 1:
            gv = [[self.state[p].get("looksam_gv", torch.zeros_like(p)) for p in x.params] for x in parts]
            ratio = _global_norm([x.grads for x in parts], 2) / (_global_norm(gv, 2) + f["norm_eps"])
            return [torch._foreach_add(x.grads, torch._foreach_mul(v, f["looksam_alpha"] * ratio.to(x.device)))
                    for x, v in zip(parts, gv)]
        return [x.grads for x in parts]

    def _descend(self, parts, d, gp=None, dots=None, late=()):
        """Hand d to the base optimizer at w, or skip the step exactly when g or d (or a late g') is not finite."""
        self.last_step_skipped = False
        d_sq = [_sq_norm(x) for x in d] if parts and (self.flags["skip_nonfinite"] or self._stats_step()) else None
        if self.flags["skip_nonfinite"] and parts:   # the one host read of the step (as torch.amp.GradScaler)
            squares = d_sq + [x.g_sq for x in parts if x.g_sq is not None] + [_sq_norm([x]) for x in late]
            self.last_step_skipped = not self._all_finite(torch.isfinite(sum(s.to(parts[0].device) for s in squares)))
        tracks = gp is not None and self._tracks_persistence()
        if tracks or self._stats_step():      # the ratio instrument, at this step's w before the base step
            buckets = [self._buckets(part, x) for part, x in zip(parts, gp)] if gp is not None else None
            if tracks:   # a skipped step leaves the sets as they were (its r holds NaN)
                self.ratio_stats.track_persistence(None if self.last_step_skipped else self._b1_sets(parts, buckets))
            if self._stats_step():
                weights = [x.params for x in parts]
                self.ratio_stats.measure(self._step, buckets, dots or _dots(parts, None), weights, d_sq)
        if self.last_step_skipped:
            self._skipped += 1
            self._warn_once("skip", f"SAM skipped step {self._step}: a non-finite gradient; the weights and the "
                            "base optimizer's state are as they were (stats['skipped'] counts these steps)")
        else:
            for part, x in zip(parts, d):
                if x is not part.grads:
                    torch._foreach_copy_(part.grads, x)
            self._base_step()
            self._opt_called = True            # lets LR schedulers attached to this wrapper see the step
            self._remember(parts, gp, dots)
        self._clean = None
        self._step += 1

    def _base_step(self):
        """torch's fused SGD refuses a group where some momentum buffers exist and some not (a tensor unfrozen or first
        reached later): such a group steps unfused once, which starts the new buffers as torch's SGD does."""
        base, n = self.base_optimizer, sum(len(group["params"]) for group in self.param_groups)
        mixed = []
        if isinstance(base, torch.optim.SGD) and len(base.state) not in (0, n):   # some tensor has never stepped
            mixed = [group for group in self.param_groups if group.get("fused") and group["momentum"] != 0 and len(
                {"momentum_buffer" in base.state.get(p, ()) for p in group["params"] if p.grad is not None}) > 1]
        for group in mixed:
            group["fused"] = False
        try:
            base.step()
        finally:
            for group in mixed:
                group["fused"] = True

    def _remember(self, parts, gp, dots):
        """State carried to later steps, updated only on steps taken: FriendlySAM's EMA, LookSAM's g_v."""
        f = self.flags
        for i, part in enumerate(parts):
            if f["friendly_sigma"] > 0 and gp is not None:   # m_t = lambda m_{t-1} + (1 - lambda) g_t, m_0 = g_0
                g = _views(part.g, part.params)
                for p, x in zip(part.params, g):
                    if "friendly_m" not in self.state[p]:   # m_0 = g_0 at each tensor's first gradient: lerp(g, g) = g
                        self.state[p]["friendly_m"] = x.clone()
                torch._foreach_lerp_([self.state[p]["friendly_m"] for p in part.params], g, 1 - f["friendly_lambda"])
            if f["looksam_k"] > 1 and gp is not None:         # g_v = g' - (<g,g'>/||g||^2) g, orthogonal to g
                g_v = gp[i] - (dots["g_gp"] / (dots["g_g"] + f["norm_eps"])).to(part.g) * part.g
                self._set_state_list(part, "looksam_gv", _views(g_v, part.params))

    # ------------------------------------------------------------------ public helpers
    @property
    def single_pass(self):
        """True when this step needs one forward/backward (sgd, sgdhess, LookSAM between refreshes)."""
        f = self.flags
        return f["descent"] != "sam" or (f["looksam_k"] > 1 and self._step % f["looksam_k"] != 0)

    @property
    def create_graph(self):
        """True for SGDHESS: its backward must be backward(create_graph=True)."""
        return self.flags["descent"].startswith("hessian")

    @property
    def flags(self):
        """The flags now, read from the first param group (a schedule may set them there; the SAM-wide ones are set
        alike in every group): a dict holding every FLAGS key, the base optimizer's settings beside them."""
        return self.param_groups[0]

    @property
    def perturbed(self):
        """True between first_step() and second_step(): the weights are at w + e."""
        return self._parts is not None

    @property
    def sparse(self):
        return self.flags["sparsity"] > 0

    @property
    def stats(self):
        """The latest statistics step as Python floats (NaN before one); this read is the host sync."""
        latest = self.ratio_stats.state["latest"]
        values = latest.tolist() if latest is not None else [math.nan] * len(STAT_KEYS)
        return {**dict(zip(STAT_KEYS, values)), "skipped": float(self._skipped)}

    @torch.compiler.disable
    @torch.no_grad()
    def stash_clean_grad(self):
        """ImbSAM: keep the current grads (of the head-class loss) unperturbed; they are added to d."""
        params = [p for part in self._gather() for p in part.params]   # in the order of the parts, as d
        grads = [p.grad.clone() for p in params]
        if self._clean is not None and [id(p) for p in self._clean[0]] == [id(p) for p in params]:
            torch._foreach_add_(grads, self._clean[1])
        self._clean = (params, grads)
        self.zero_grad()

    @torch.no_grad()
    def accumulate_fisher(self):
        """SSAM-F: add the current squared gradients to the empirical Fisher diagonal, in float32 at least (a float16
        square underflows below 6e-8: per-sample gradients of 1e-4 would all score 0)."""
        for part in self._gather():
            grads = [_wide(g) for g in part.grads]
            fisher = [self.state[p].setdefault("fisher", torch.zeros_like(g)) for p, g in zip(part.params, grads)]
            torch._foreach_addcmul_(fisher, grads, grads)

    @torch.no_grad()
    def update_mask(self, progress=0.0):
        """Sparse SAM: rebuild the global perturbation mask; progress in [0, 1] of training.
        SSAM-F keeps the (1 - sparsity) share with the largest accumulated Fisher score. SSAM-D drops the
        live entries with the smallest |g| at the death rate drop_rate (1 + cos(pi progress))/2, then grows as
        many at random among the entries that were dead before this update (Mi et al. 2022)."""
        if not self.sparse:
            raise ValueError("update_mask() needs a sparse variant (sparsity > 0: ssamf, ssamd)")
        params = [p for p in self._params() if p.requires_grad]
        alive = torch.cat([m.flatten() for m in self._masks(params)])
        n_live = round((1 - self.flags["sparsity"]) * alive.numel())
        if self.flags["mask_mode"] == "fisher":
            score = torch.cat([self.state[p].pop("fisher", torch.zeros_like(p)).flatten() for p in params])
            new = _top_k_mask(score.float(), n_live)
        else:
            death = self.flags["drop_rate"] * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2
            n_keep = round(n_live * (1 - death))
            if all(p.grad is None for p in params):   # every |g| would tie: the drop would follow the tensor order
                raise ValueError("update_mask() (SSAM-D) drops the live entries of smallest |g|: call it after "
                                 "backward() and before first_step(), while the gradients are there")
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            new = _top_k_mask(grad.abs().float().masked_fill(~alive, -1.0), n_keep)
            # grow among the dead: first those dead before, then (only if too few) the ones just dropped
            chance = torch.rand(alive.shape, device=alive.device)
            new |= _top_k_mask(torch.where(alive, chance - 2, chance).masked_fill(new, -3.0), n_live - n_keep)
        for p, mask in zip(params, _views(new, params)):
            self.state[p]["mask"] = mask.clone()

    def state_dict(self):
        """SAM's own state (masks, EMAs), the base optimizer's (momentum, moments), counters and statistics."""
        if self.perturbed:
            self._warn_once("perturbed", "state_dict() between first_step() and second_step(): the model is at w + e, "
                            "and no state_dict holds the w SAM returns to; save after second_step()")
        return {"sam": super().state_dict(), "base": self.base_optimizer.state_dict(), "variant": self.variant,
                "counters": {"step": self._step, "skipped": self._skipped}, "ratio_stats": self.ratio_stats.state}

    def __getstate__(self):   # deepcopy, pickle: keep the base optimizer (torch's drops it), not a scheduler's step wrapper
        return {k: v for k, v in self.__dict__.items() if k != "step" and not k.startswith("_optimizer")}

    def load_state_dict(self, state_dict):
        if "sam" not in state_dict:   # davda54/sam's layout: SAM's param_groups only, no base state
            warnings.warn("loading a davda54/sam state_dict: it holds the hyper-parameters but no momentum or "
                          "Adam moments (davda54 does not save the base optimizer's state); those start from zero")
            for group, saved in zip(self.param_groups, state_dict["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params" and k in group})
            return
        if state_dict.get("variant", self.variant) != self.variant:
            raise ValueError(f"this state_dict is from a {state_dict['variant']!r} optimizer, not {self.variant!r}: "
                             "build SAM with the same variant to resume it")
        now = {k: repr(self.param_groups[0][k]) for k in FLAGS}   # as built, or as a schedule has set them since
        self.base_optimizer.load_state_dict(state_dict["base"])
        super().load_state_dict(state_dict["sam"])   # last: its post-hooks see the base's state, and their groups stay
        self.base_optimizer.param_groups = self.param_groups
        for state in self.state.values():  # torch casts saved tensors to the parameters' dtype
            if "mask" in state:
                state["mask"] = state["mask"].bool()
        changed = [k for k in FLAGS if repr(self.param_groups[0][k]) != now[k]]
        if changed:
            warnings.warn(f"load_state_dict: the saved flags replace {', '.join(changed)}")
        self._step, self._skipped = state_dict["counters"]["step"], state_dict["counters"]["skipped"]
        device = self._params()[0].device   # saved on CPU, run on CUDA
        self.ratio_stats.state = _to_device(state_dict["ratio_stats"], device)

    # ------------------------------------------------------------------ small helpers
    def _back_to_w(self, parts):
        """Each parameter back to the storage first_step kept: w bit for bit, no copy."""
        for part in parts:
            for p, w in zip(part.params, part.w):
                p.data = w

    def _gather(self, with_grad_only=True):
        """The parameters with a gradient (or all), one _Part per param group and (device, dtype)."""
        parts = []
        for group in self.param_groups:
            by_kind = {}
            for p in group["params"]:
                if p.grad is not None or not with_grad_only:
                    if p.grad is not None and p.grad.is_sparse:
                        raise TypeError("SAM does not support sparse gradients")
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            parts += [_Part(group, params) for params in by_kind.values()]
        if any(x.params[0].is_complex() for x in parts) and self._real_math():
            raise TypeError("complex parameters take plain SAM's math only (sam, usam, friendlysam, gsam, looksam, "
                            "ssamd, imbsam, sgd; no stats_every or persist_from): these flags order, sign or square "
                            "single coordinates")
        return parts

    def _unreached(self, parts):
        """g' of a trainable parameter with a g but none at w + e (a routed expert left idle there) is 0: L(w + e) does
        not depend on it. None at all (no backward), or on a parameter frozen in between, is refused."""
        params = [p for part in parts for p in part.params]
        unreached = [p for p in params if p.grad is None]
        if len(unreached) == len(params) or not all(p.requires_grad for p in unreached):
            raise ValueError("second_step(): a parameter that had a gradient at w has none at w + e (no backward at "
                             "w + e, or frozen in between)")
        self._warn_once("unreached", "second_step(): a parameter with a gradient at w has none at w + e; its g' is 0")
        for p in unreached:
            p.grad = torch.zeros_like(p)

    def _late_grads(self, parts):
        """g' of the parameters with no g (reached at w + e only, a routed expert): their e was 0, so SAM's d is g'."""
        if self._covers_every_param(parts):
            return []
        mine = {id(p) for part in parts for p in part.params}
        late = [p.grad for p in self._params() if p.grad is not None and id(p) not in mine]
        if late:
            self._warn_once("late", "second_step(): a parameter without a gradient at w has one at w + e; it takes the "
                            "base step with that g' (plain SAM's d), outside the bin rules and the statistics")
        return late

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _covers_every_param(self, parts):
        return sum(len(x.params) for x in parts) == sum(len(group["params"]) for group in self.param_groups)

    def _uses_g(self):
        """g enters d (bin rules, combine, GSAM) or later steps (FriendlySAM's EMA, LookSAM's g_v). Judged by exclusion:
        a new rule's flag keeps g unlisted (listed by name, a flag left out ran its rule on statistics steps only)."""
        return any((tuple(group[k]) if isinstance(v, tuple) else group[k]) != v   # a JSON list at neutral too
                   for group in self.param_groups for k, v in FLAGS.items() if k not in NO_G_FLAGS)

    def _real_math(self):
        """Math on single coordinates (ratios, signs, |w|, g^2, a Rademacher probe): wrong or a crash on complex ones."""
        f = self.flags
        return (any(_has_bin_rule(group) or group["combine"] or group["adaptive"] for group in self.param_groups)
                or f["p"] != 2 or f["fisher_eta"] > 0 or f["descent"].startswith("hessian") or f["stats_every"] > 0
                or f["persist_from"] is not None or f["sparsity"] > 0 and f["mask_mode"] == "fisher")

    def _stats_step(self):
        every = self.flags["stats_every"]
        return every > 0 and self._step % every == 0

    def _tracks_persistence(self):
        return self.flags["persist_from"] is not None and self._step >= self.flags["persist_from"]

    def _buckets(self, part, gp):
        """The 13 buckets of r = g'/(g + ratio_eps) (module constants), computed once a step per part."""
        if part.buckets is None:
            r = _wide(gp) / (_wide(part.g) + self.flags["ratio_eps"])
            r.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)   # 0/0 (or a NaN g) counts as r = 0: B0
            part.buckets = _bucketize(r, _edges(r.dtype, r.device))
        return part.buckets

    def _b1_sets(self, parts, buckets):
        """B1 (buckets 6 and up, r > 1) per param group and (device, dtype) over all its parameters, one without a
        gradient outside it (as r = 0), so that t0's set and every later one line up coordinate for coordinate."""
        if self._covers_every_param(parts):   # the same layout as over all parameters
            return [b >= 6 for b in buckets]
        every = self._gather(with_grad_only=False)
        in_b1 = {id(p): x for part, b in zip(parts, buckets) for p, x in zip(part.params, _views(b >= 6, part.params))}
        return [torch.cat([in_b1[id(p)].reshape(-1) if id(p) in in_b1 else p.new_zeros(p.numel(), dtype=torch.bool)
                           for p in x.params]) for x in every]

    def _bin_tables(self, group, dtype, device):
        """Per bucket of r: the multiplier s_k of its checkpoint k, and whether d starts from g' there (else g).
        s_k = number + c [s_k is "c"] + 1/c [s_k is "1/c"], on the device without a copy from the host."""
        warm = self.flags["condition_warmup"]
        c = 1 + (group["condition"] - 1) * min(1.0, self._step / warm) if warm > 0 else group["condition"]
        scale = tuple(group["bin_scale"])
        number = _constant(tuple(0.0 if isinstance(s, str) else float(s) for s in scale), dtype, device)
        is_c, is_inverse = (_constant(tuple(s == x for s in scale), dtype, device) for x in ("c", "1/c"))
        of_bucket = _constant(CHECKPOINT_OF_BUCKET, torch.long, device)
        from_gp = _constant(tuple(str(k) in group["sam_bins"] for k in range(5)), torch.bool, device)
        return (number + c * is_c + is_inverse / c)[of_bucket], from_gp[of_bucket]

    def _asam_t(self, part):
        return torch._foreach_add(torch._foreach_abs(part.params), part.group["asam_eta"])

    def _hessian_diagonal(self, parts):
        """SGDHESS (origin 1.15): |H z| for one Rademacher probe z, conv kernels averaged over their spatial
        dims, refreshed every hessian_every steps."""
        if self._step % self.flags["hessian_every"] == 0 or any("hess_d" not in self.state[p]
                                                                for x in parts for p in x.params):
            hz = self._hvp(parts, [[torch.randint_like(p, 2) * 2 - 1 for p in x.params] for x in parts])
            for part, h_part in zip(parts, hz):
                self._set_state_list(part, "hess_d", [h.abs().mean(dim=(2, 3), keepdim=True).expand_as(h)
                                                      if h.dim() == 4 else h.abs() for h in h_part])
        return [[self.state[p]["hess_d"] for p in x.params] for x in parts]

    def _hvp(self, parts, vectors):
        """H v over all parts at once: a product per part would drop the Hessian's blocks between them. A constant g
        (a loss linear in that tensor) has no graph: its row and column of H are 0."""
        gv = [(g, v) for x, part_v in zip(parts, vectors) for g, v in zip(x.grads, part_v) if g.requires_grad]
        with torch.enable_grad():
            hv = iter(torch.autograd.grad([g for g, _ in gv], [p for x in parts for p in x.params], [v for _, v in gv],
                                          retain_graph=True, allow_unused=True, materialize_grads=True))
        return [[next(hv) for _ in x.params] for x in parts]

    def _masks(self, params):
        """Sparse SAM masks (bool), built over all trainable parameters at first use: SSAM-D at random with
        exactly (1 - sparsity) N live entries, SSAM-F empty until its first Fisher mask. Parameters added or
        unfrozen later get theirs the same way; the others keep their masks."""
        if any("mask" not in self.state[p] for p in params):
            every = [p for p in self._params() if p.requires_grad and "mask" not in self.state[p]]
            n = sum(p.numel() for p in every)
            live = _top_k_mask(torch.rand(n), round((1 - self.flags["sparsity"]) * n)) \
                if self.flags["mask_mode"] == "dynamic" else torch.zeros(n, dtype=torch.bool)
            for p, mask in zip(every, _views(live, every)):
                self.state[p]["mask"] = mask.to(p.device).clone()
        return [self.state[p]["mask"] for p in params]

    def _add_clean(self, parts, d):
        """ImbSAM: d = g'_tail + g_head."""
        params, clean = self._clean
        if [id(p) for p in params] != [id(p) for part in parts for p in part.params]:
            raise ValueError("stash_clean_grad(): the clean and the perturbed loss must reach the same parameters")
        torch._foreach_add_([x for part_d in d for x in part_d], clean)

    def _set_state_list(self, part, key, tensors):
        if all(key in self.state[p] for p in part.params):
            torch._foreach_copy_([self.state[p][key] for p in part.params], tensors)
        else:
            for p, x in zip(part.params, tensors):
                self.state[p][key] = x.detach().clone()

    def _all_finite(self, finite):
        """The host read of the step's finite flag. Data parallel code that averages d after this check (in the
        base optimizer) overrides it to agree over ranks, so that every rank skips the same steps."""
        return bool(finite)

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class _Part:
    """One param group's parameters with a gradient on one (device, dtype): the unit of whole-vector math."""

    def __init__(self, group, params):
        self.group, self.params, self.grads = group, params, [p.grad for p in params]
        self.device = params[0].device
        self.w = self.g = self.g_sq = self.buckets = None


class RatioStats:
    """The notes' instrument: fed g, g' and w on statistics steps, and the B1 set every step once persistence
    is tracked. Everything stays on the device as one float64 vector laid out as STAT_KEYS (SAM.stats reads it)."""

    def __init__(self):
        self.state = {"latest": None, "persist": None}

    def measure(self, step, buckets, dots, weights, d_sq):
        device = dots["g_g"].device
        nan = torch.full((), math.nan, dtype=torch.float64, device=device)
        w_norm = _global_norm(weights, 2).double().to(device)
        d_norm = sum(x.to(device, torch.float64) for x in d_sq).sqrt()   # ||d||, the step's length before the base step
        g_norm, gp_norm = dots["g_g"].sqrt(), dots["gp_gp"].sqrt()
        counts = nan.expand(13) if buckets is None else sum(   # a one-pass step has no g': NaN shares and cos
            torch.bincount(b, minlength=13).to(device, torch.float64) for b in buckets)
        per_checkpoint = torch.zeros(5, dtype=torch.float64, device=device).index_add_(
            0, _constant(CHECKPOINT_OF_BUCKET, torch.long, device), counts)
        shares, fine = 100 * per_checkpoint / counts.sum(), 100 * counts[6:] / counts.sum()
        cos = dots["g_gp"] / (g_norm * gp_norm).clamp_min(1e-300)
        mag_up = shares[1] + shares[3]
        persist = self.state["persist"]["counts"] if self.state["persist"] is not None else nan.expand(3)
        self.state["latest"] = torch.cat([torch.full((1,), float(step), dtype=torch.float64, device=device),
                                          shares, fine, torch.stack([g_norm, gp_norm, d_norm, w_norm, cos, mag_up, nan]),
                                          persist])

    def track_persistence(self, in_b1):
        """B1 at t0, its overlap with this step's B1, and the running intersection since t0 (seed 000).
        in_b1 None: a skipped step, which changes no set and whose counts read NaN."""
        if in_b1 is None:
            if self.state["persist"] is not None:
                self.state["persist"]["counts"] = torch.full_like(self.state["persist"]["counts"], math.nan)
            return
        if self.state["persist"] is None:
            self.state["persist"] = {"t0": in_b1, "running": [x.clone() for x in in_b1]}
        persist = self.state["persist"]
        counts = [torch.stack([t0.sum(), (t0 & now).sum(), run.logical_and_(now).sum()]).double().to(in_b1[0].device)
                  for t0, now, run in zip(persist["t0"], in_b1, persist["running"])]
        persist["counts"] = sum(counts)


# ------------------------------------------------------------------ functions on flat vectors and tensor lists
def _flat(tensors):
    return torch.cat([x.reshape(-1) for x in tensors])


def _views(flat, like):
    return [x.view_as(t) for x, t in zip(flat.split([t.numel() for t in like]), like)]


def _norms(tensors, p=2):
    """Per-tensor L_p norms, in float32 at least: a float16 norm overflows at 65504, its square at 256."""
    return torch._foreach_norm(tensors, p, dtype=torch.promote_types(tensors[0].dtype, torch.float32))


def _wide(x):
    return x.float() if x.element_size() < 4 else x   # 16-bit values in float32 for sums and ratios


def _sq_norm(tensors):
    return torch.stack(_norms(tensors)).square().sum()


def _global_norm(tensor_lists, p):
    device = tensor_lists[0][0].device
    norms = [n.to(device) for x in tensor_lists for n in _norms(x, p)]
    return torch.linalg.vector_norm(torch.stack(norms), p)


def _dots(parts, gp):
    """<g,g>, <g',g'>, <g,g'> over all parts, float64 on the first part's device (g' None: <g,g> only); a complex
    entry as its two real parts, so <g,g'> = Re(vdot)."""
    device = parts[0].device
    g_g = sum((x.g_sq if x.g_sq is not None else _sq_norm(x.grads)).to(device, torch.float64) for x in parts)
    if gp is None:
        nan = torch.full((), math.nan, dtype=torch.float64, device=device)
        return dict(g_g=g_g, gp_gp=nan, g_gp=nan)
    gp_gp = sum(_sq_norm([x]).to(device, torch.float64) for x in gp)
    g_gp = sum(torch.vdot(_wide(part.g), _wide(x)).real.to(device, torch.float64) for part, x in zip(parts, gp))
    return dict(g_g=g_g, gp_gp=gp_gp, g_gp=g_gp)


def _to_device(state, device):
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_device(v, device) for v in state]
    return state.to(device) if torch.is_tensor(state) else state


def _has_bin_rule(group):
    return tuple(group["bin_scale"]) != (1, 1, 1, 1, 1) or group["sam_bins"] != "01234"


@functools.cache
def _constant(values, dtype, device):
    """A small tensor made once per device (a fresh host-to-device copy each step would wait on the GPU)."""
    return torch.tensor(values, dtype=dtype, device=device)


@functools.cache
def _edges(dtype, device):
    at = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)
    after = torch.nextafter(at, torch.full_like(at, math.inf))
    return torch.cat([torch.stack([at, after], 1).flatten(), torch.tensor(FINE_EDGES, dtype=dtype)]).to(device)


def _bucketize(r, edges):
    """torch.bucketize(r, edges, right=True) as int32. On the CPU the count of edges <= r, one branch-free pass
    per edge: bucketize's binary search mispredicts its branches on spread r, 1.4x slower (README, Benchmarks)."""
    if r.device.type != "cpu":
        return torch.bucketize(r, edges, right=True, out_int32=True)
    count, at_or_above = torch.zeros_like(r), torch.empty_like(r)
    for edge in edges.tolist():
        count += torch.ge(r, edge, out=at_or_above)   # into floats: a bool result is slower to write and to add
    return count.int()


def _top_k_mask(score, k):
    return torch.zeros_like(score, dtype=torch.bool).index_fill_(0, torch.topk(score, k).indices, True)


def _check_flags(f):
    """Clear errors for values that cannot work (every number finite and in its range) or cannot work together."""
    def finite(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    def whole(x, low):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low
    rules = [   # (flags, is each value fine, what they must be)
        (("rho", "asam_eta", "fisher_eta", "friendly_sigma", "gsam_alpha", "looksam_alpha", "ratio_eps", "norm_eps"),
         lambda x: finite(x) and x >= 0, "a finite number >= 0"),
        (("p",), lambda x: (finite(x) or isinstance(x, float) and x == math.inf) and x > 1,
         "a number > 1 (2 is SAM, inf the L-inf geometry)"),
        (("condition",), lambda x: finite(x) and x > 0, "a finite number > 0"),
        (("friendly_lambda", "sparsity"), lambda x: finite(x) and 0 <= x < 1, "in [0, 1)"),
        (("drop_rate",), lambda x: finite(x) and 0 <= x <= 1, "in [0, 1]"),
        (("dual", "normalize", "adaptive", "skip_nonfinite"), lambda x: isinstance(x, bool), "True or False"),
        (("looksam_k", "hessian_every"), lambda x: whole(x, 1), "an integer >= 1"),
        (("stats_every", "condition_warmup"), lambda x: whole(x, 0), "an integer >= 0"),
        (("persist_from",), lambda x: x is None or whole(x, 0), "None or an integer >= 0"),
        (("bin_scale",), lambda x: isinstance(x, (tuple, list)) and len(x) == 5 and
         all(s in ("c", "1/c") or finite(s) for s in x), "5 entries (B0..B4), each a finite number, 'c' or '1/c'"),
        (("sam_bins",), lambda x: isinstance(x, str) and set(x) <= set("01234"), "bins among '01234'"),
        (("combine",), lambda x: x in ("", "magnitude", "direction"), "'', 'magnitude' or 'direction'"),
        (("mask_mode",), lambda x: x in ("fisher", "dynamic"), "'fisher' or 'dynamic'"),
        (("descent",), lambda x: x in ("sam", "sgd", "hessian", "hessian-exact"), "'sam', 'sgd', 'hessian' or 'hessian-exact'"),
    ]
    for names, fine, requirement in rules:
        for name in names:
            if not fine(f[name]):
                raise ValueError(f"{name} must be {requirement}; got {f[name]!r}")
    rule = _has_bin_rule(f)
    if not f["normalize"] and f["p"] != 2:
        raise ValueError("normalize=False (USAM) is defined for p=2 only")
    if f["fisher_eta"] > 0 and (f["adaptive"] or f["p"] != 2 or not f["normalize"]):
        raise ValueError("fisher_eta (Fisher SAM) is its own geometry: use it without adaptive, p or normalize=False")
    if f["combine"] and rule:
        raise ValueError("combine (sammagnitude/samdirection) replaces the bin rule: set one of them")
    if f["looksam_k"] > 1 and (rule or f["combine"] or f["gsam_alpha"] > 0):
        raise ValueError("LookSAM reuses g' itself: it does not combine with bin rules, combine or GSAM")
    if f["descent"] != "sam" and (rule or f["combine"] or f["gsam_alpha"] > 0 or f["looksam_k"] > 1):
        raise ValueError(f"descent={f['descent']!r} takes one pass and has no g': no bin rule, combine, GSAM or LookSAM")


def disable_running_stats(model):
    """Before the second pass: BatchNorm normalises with the batch's statistics and leaves its running
    statistics and num_batches_tracked exactly as they are, even if the weights at w + e are not finite."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not hasattr(module, "_sam_tracking"):
            module._sam_tracking = module.track_running_stats
            module.track_running_stats = False


def enable_running_stats(model):
    """Undo disable_running_stats before the next step's first pass."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and hasattr(module, "_sam_tracking"):
            module.track_running_stats = module._sam_tracking
            del module._sam_tracking
