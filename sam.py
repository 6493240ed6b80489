"""Sharpness-Aware Minimization and its variants as flags of one optimizer wrapper.

SAM (Foret et al., 2021, arXiv 2010.01412) takes two gradients per step: g at w, and
g' at the ascent point w + e, e = rho g / ||g||; the base optimizer then steps from w with g'.
Every variant here changes one of three things, each a flag of `SAM`:
  the ascent e (USAM, ASAM, L_p balls, Fisher SAM, FriendlySAM, sparse SAM),
  the direction d handed to the base optimizer, built from g, g' and the elementwise ratio
  r = g' / (g + ratio_eps) sorted into the notes' four "checkpoints" (SAME, SAMCKPT, CustomSAME,
  SAMMAGNITUDE / SAMDIRECTION, GSAM, LookSAM, SANER),
  or the number of passes (SGD, SGDHESS, LookSAM's cheap steps).
Weight decay and momentum are the base optimizer's and act after d, at the unperturbed w.
Named presets live in VARIANTS. The ratio statistics (share of each checkpoint, finer r > 1
bins, norms, cosine, persistence of the checkpoint-1 set) are computed on the device and read
with `opt.stats`, the one host sync. Depends on torch alone: copy this file.
"""
import inspect
import math
import numbers
import warnings

import torch
from torch._utils import _flatten_dense_tensors as flatten, _unflatten_dense_tensors as unflatten

# Every flag with its neutral value: at these values SAM is plain SAM (Foret et al.).
FLAGS = dict(
    rho=0.05,               # ascent radius (rho_H for descent="hessian")
    p=2.0,                  # L_p ball of the ascent: e = rho sign(g)|g|^(q-1)/||g||_q^(q-1), 1/p+1/q=1
    normalize=True,         # False: USAM, e = rho g (Dai, Ahn, Sra 2023)
    adaptive=False,         # ASAM: e = rho T^2 g/||T g||, T = |w| + asam_eta (Kwon et al. 2021)
    asam_eta=0.0,           # 0 as davda54/sam; 0.01 as the official ASAM code
    fisher_eta=0.0,         # Fisher SAM: e = rho (g/f)/sqrt(g.(g/f)), f = 1 + fisher_eta g^2 (Kim et al. 2022)
    friendly_sigma=0.0,     # FriendlySAM: ascend along g - sigma m_{t-1}, m an EMA of g (Li et al. 2024)
    friendly_lambda=0.9,    # FriendlySAM EMA factor: m_t = lambda m_{t-1} + (1 - lambda) g
    sparsity=0.0,           # sparse SAM: fraction of coordinates NOT perturbed (Mi et al. 2022)
    mask_mode="dynamic",    # sparse SAM mask: "fisher" (SSAM-F) or "dynamic" (SSAM-D)
    drop_rate=0.5,          # SSAM-D: death rate at the start of training, cosine-decayed
    condition=2.0,          # c: the multiplier the notes call "condition"; "c" and "1/c" in bin_scale
    condition_warmup=0,     # steps over which c rises linearly from 1 to condition (SANER's alpha warm-up)
    bin_scale=(1, 1, 1, 1, 1),  # multiplier of d on bins B0..B4 (numbers, "c" or "1/c")
    sam_bins="01234",       # bins whose d uses g'; the other bins use the plain gradient g (SAMCKPT)
    combine="",             # "magnitude": d = |g'| sign(g); "direction": d = sign(g') |g| (seed 002)
    gsam_alpha=0.0,         # GSAM: d = g' - alpha g_perp, g_perp = g minus its part along g' (Zhuang et al. 2022)
    looksam_k=1,            # LookSAM: full SAM every k steps, one pass in between (Liu et al. 2022)
    looksam_alpha=0.7,      # LookSAM: cheap step d = g + alpha ||g||/||g_v|| g_v
    descent="sam",          # "sam" (two passes), "sgd" (d = g, one pass), "hessian" (SGDHESS, one pass)
    hessian_every=1,        # SGDHESS: refresh the curvature |Hz| every k steps
    ratio_eps=1e-8,         # r = g'/(g + ratio_eps): added, not sign-aware, as the origin code
    norm_eps=1e-12,         # e = rho g/(||g|| + norm_eps): a zero gradient gives a zero perturbation
    stats_every=1,          # compute the ratio statistics every k steps (0: never)
    persist_from=None,      # step t0 from which the checkpoint-1 set is tracked (seed 000, Exp. 2-3)
)
# Flags that may differ between param groups: they act coordinate by coordinate.
GROUP_FLAGS = ("rho", "adaptive", "asam_eta", "condition", "bin_scale", "sam_bins", "combine")

VARIANTS = {
    "sam": {},
    "sgd": dict(descent="sgd"),
    "usam": dict(normalize=False),
    "asam": dict(adaptive=True, rho=0.5),
    "linf": dict(p=math.inf),
    # SAME, "SAM efficiency": d = c g' on the named checkpoints, g' elsewhere (seed 001; origin 1.6)
    "samme1": dict(bin_scale=(1, "c", 1, 1, 1)),
    "samme2": dict(bin_scale=(1, 1, "c", 1, 1)),
    "samme3": dict(bin_scale=(1, 1, 1, "c", 1)),
    "samme4": dict(bin_scale=(1, 1, 1, 1, "c")),
    "samme12": dict(bin_scale=(1, "c", "c", 1, 1)),
    "samme13": dict(bin_scale=(1, "c", 1, "c", 1)),
    "samme134": dict(bin_scale=("c", "c", "1/c", "c", "c")),  # two-sided: /c on B2 only, as the origin
    "samme234": dict(bin_scale=(1, 1, "c", "c", "c")),
    "saner": dict(bin_scale=(1, 1, "c", 1, 1), condition=0.5),   # lhchau/saner: alpha on B2 (+ condition_warmup)
    # CustomSAME (seed 001): increase B1, keep B2, reduce B3, increase B4; d = 0 on leftovers (origin v1)
    "customsame": dict(bin_scale=(0, "c", 1, "1/c", "c")),
    "customsame-pos": dict(bin_scale=(1, 1, 1, 0, 0)),           # origin v2: drop sign-flipped coordinates
    "customsame-no3": dict(bin_scale=(1, 1, 1, 0, 1)),           # origin v3: drop B3 only
    # SAMCKPT: keep SAM's g' on the named checkpoints, SGD's g elsewhere (seed 000, Exp. 1)
    **{f"samckpt{b}": dict(sam_bins=b) for b in
       ("1", "2", "3", "4", "12", "13", "14", "23", "34", "123", "124", "134", "234")},
    # seed 002, with the meanings the notes report (the origin's file names are swapped)
    "sammagnitude": dict(combine="magnitude"),
    "samdirection": dict(combine="direction"),
    "sgdhess": dict(descent="hessian"),
    "ssamf": dict(sparsity=0.5, mask_mode="fisher"),
    "ssamd": dict(sparsity=0.5, mask_mode="dynamic"),
    "friendlysam": dict(friendly_sigma=1.0, friendly_lambda=0.9),
    "imbsam": {},           # plain SAM mechanics; the tail/head split goes through stash_clean_grad()
    "fishersam": dict(fisher_eta=1.0, rho=0.1),
    "gsam": dict(gsam_alpha=0.4),
    "looksam": dict(looksam_k=10, looksam_alpha=0.7, rho=0.1),
}

# Checkpoints (strict, as the origin): B1 r > 1, B2 0 < r < 1, B3 r < -1, B4 -1 < r < 0; B0 holds
# the rest (r exactly 0, -1, 1, or nan). FINE_EDGES split B1 as the notes' "Project 2" figure.
FINE_EDGES = (1.2, 1.5, 2.0, 4.0, 8.0, 16.0)
FINE_NAMES = ("r1_1.2", "r1.2_1.5", "r1.5_2", "r2_4", "r4_8", "r8_16", "r16_inf")
# opt.stats: ckpt0..4 and the fine bins in % of coordinates with a gradient; norms of g, g', w
# (at the unperturbed w); cos(g, g'); mag_up = % with |r| > 1, i.e. |g'| > |g + ratio_eps| (seed 002,
# Exp. 3 counts the ratio); skipped (non-finite steps so far); persistence counts from persist_from.
STAT_KEYS = (("step",) + tuple(f"ckpt{k}" for k in range(5)) + FINE_NAMES +
             ("grad_norm", "perturbed_grad_norm", "weight_norm", "cos", "mag_up", "skipped",
              "persist_t0", "persist_overlap", "persist_running"))


class SAM(torch.optim.Optimizer):
    """Wraps a base optimizer (a class; extra kwargs build it) with SAM and the flags in FLAGS.

    SAM(params, torch.optim.SGD, variant="sam", **flags_and_base_kwargs). The preset named by
    `variant` (see VARIANTS) sets flags first; flags given explicitly override it. param_groups
    are shared with the base optimizer. Two-step use (davda54/sam):
        loss(w).backward();   opt.first_step(zero_grad=True)    # w -> w + e
        loss(w+e).backward(); opt.second_step(zero_grad=True)   # w + e -> w, base step with d
    or opt.step(closure), where closure zeroes grads, runs forward and backward, returns the loss.

    Notes. Flags in GROUP_FLAGS may differ per param group; the norm of e is always global.
    A non-finite g or g' is caught on the device: the base optimizer gets d = 0 and the weights
    are then restored bit for bit (its momentum sees one zero-gradient step; skipping it on the
    host would cost a sync every step). The count is in stats["skipped"]; reading stats warns once.
    Memory: one parameter-sized buffer (w) for plain SAM, two (w, g) when the ratio is needed.
    The base optimizer is built with foreach=True unless told otherwise (same results as torch's
    default, faster on CPU). Under autocast, SAM's own arithmetic runs in the parameters' dtype;
    prefer bf16: fp16 gradients overflow, and those steps are skipped as non-finite.
    """

    def __init__(self, params, base_optimizer, variant="sam", **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}; valid: {', '.join(sorted(VARIANTS))}")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class, e.g. torch.optim.SGD")
        flags = {**FLAGS, **VARIANTS[variant]}
        flags.update({k: kwargs.pop(k) for k in list(kwargs) if k in FLAGS})
        self.variant = variant
        _check_flags(flags)
        super().__init__(params, flags)
        if "foreach" in inspect.signature(base_optimizer).parameters:
            kwargs.setdefault("foreach", True)   # torch picks the per-tensor loop on CPU by default
        try:
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        except TypeError as err:
            raise TypeError(f"{err}; SAM flags are: {', '.join(FLAGS)}") from None
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            _check_flags(group)
        for name in set(FLAGS) - set(GROUP_FLAGS):
            if len({repr(g[name]) for g in self.param_groups}) > 1:
                raise ValueError(f"SAM flag {name!r} must be the same in every param group")
        self.flags = {k: self.param_groups[0][k] for k in FLAGS}
        self._step = 0                 # completed SAM steps
        self._perturbed = False
        self._finished_in_first_step = False
        self._skipped = None           # device counter of skipped (non-finite) steps
        self._warned_skips = False
        self._stats = None             # device vector laid out as STAT_KEYS
        self._persist = None           # per group: (checkpoint-1 set at t0, running intersection)
        self._clean = None             # imbsam: per group, (its parameters' ids, their clean gradient, flat)
        self._work = None              # per-step buffers between first_step and second_step
        self._buffers = {}             # per param group: persistent flat buffers (see _workspace)

    # ------------------------------------------------------------------ the two passes
    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Ascent: keep w, then w <- w + e (e from the flags). On one-pass steps, the whole update."""
        if self._perturbed:
            raise RuntimeError("first_step() called twice: call second_step() to return to w first")
        with _full_precision(self.param_groups):
            if self.single_pass:
                self._one_pass_step()
                self._finished_in_first_step = True
            else:
                self._ascend(grads_disposable=zero_grad)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Descent: w + e -> w exactly, d from (g, g', r), base step at w. Non-finite: skip, keep w."""
        if self._perturbed:
            with _full_precision(self.param_groups):
                self._descend()
        elif self._finished_in_first_step:   # a one-pass step needs no second pass
            self._finished_in_first_step = False
        else:
            raise RuntimeError("second_step() without first_step(): nothing to descend from")
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """Torch convention: calls closure() for each pass it needs; returns the first loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that zeroes grads, runs forward and backward, "
                             "and returns the loss; or call first_step() and second_step()")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        if self._perturbed:
            closure()
        self.second_step(zero_grad=True)
        return loss

    # ------------------------------------------------------------------ public helpers
    @property
    def single_pass(self):
        """True when this step needs one forward/backward (sgd, sgdhess, LookSAM between refreshes)."""
        f = self.flags
        return f["descent"] != "sam" or (f["looksam_k"] > 1 and self._step % f["looksam_k"] != 0)

    @property
    def create_graph(self):
        """True for SGDHESS: its backward must be backward(create_graph=True)."""
        return self.flags["descent"] == "hessian"

    @property
    def perturbed(self):
        """True between first_step() and second_step(): the weights are at w + e."""
        return self._perturbed

    @property
    def sparse(self):
        return self.flags["sparsity"] > 0

    @torch.no_grad()
    def stash_clean_grad(self):
        """ImbSAM: keep the current grads (of the head-class loss) unperturbed, added to d later."""
        clean = self._clean if self._clean is not None else {}
        for group in self.param_groups:
            params, grads = self._active(group)
            if params:
                key, flat = tuple(map(id, params)), flatten(grads)
                same = id(group) in clean and clean[id(group)][0] == key
                clean[id(group)] = (key, clean[id(group)][1] + flat if same else flat)
        self._clean = clean
        self.zero_grad()

    @torch.no_grad()
    def accumulate_fisher(self):
        """SSAM-F: add the current squared gradients to the empirical Fisher diagonal."""
        for group in self.param_groups:
            params, grads = self._active(group)
            fisher = [self.state[p].setdefault("fisher", torch.zeros_like(p)) for p in params]
            torch._foreach_addcmul_(fisher, grads, grads)

    @torch.no_grad()
    def update_mask(self, progress=0.0):
        """Sparse SAM: rebuild the global top-k perturbation mask. progress in [0, 1] of training.

        SSAM-F keeps the (1 - sparsity) share with the largest accumulated Fisher score.
        SSAM-D drops the live entries with the smallest |g| at the death rate
        drop_rate (1 + cos(pi progress)) / 2, then grows as many at random among the rest.
        """
        if not self.sparse:
            raise ValueError("update_mask() needs a sparse variant (sparsity > 0: ssamf, ssamd)")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        masks = self._masks(params)
        flat_mask = torch.cat([m.flatten() for m in masks])
        n_live = int(round((1 - self.flags["sparsity"]) * flat_mask.numel()))
        if self.flags["mask_mode"] == "fisher":
            score = torch.cat([self.state[p].pop("fisher", torch.zeros_like(p)).flatten() for p in params])
            new = _top_k_mask(score.float(), n_live)
        else:
            death = self.flags["drop_rate"] * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2
            n_keep = int(round(n_live * (1 - death)))
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            alive = grad.abs().float().masked_fill(~flat_mask, -1.0)
            new = _top_k_mask(alive, n_keep)
            grow = torch.rand(new.shape, device=new.device).masked_fill(new, -1.0)
            new |= _top_k_mask(grow, n_live - n_keep)
        for m, part in zip(masks, unflatten(new, masks)):
            m.copy_(part)

    @property
    def stats(self):
        """The latest statistics step as Python floats; this read is the one host sync."""
        if self._stats is None:
            device = self.param_groups[0]["params"][0].device
            self._stats = torch.full((len(STAT_KEYS),), math.nan, dtype=torch.float64, device=device)
        skipped = self._skipped if self._skipped is not None else torch.zeros((), dtype=torch.long)
        values = torch.cat([self._stats, skipped.to(self._stats).view(1)]).tolist()
        stats = dict(zip(STAT_KEYS, values[:-1]), skipped=values[-1])
        if stats["skipped"] > 0 and not self._warned_skips:
            self._warned_skips = True
            warnings.warn(f"SAM skipped {int(stats['skipped'])} step(s) with a non-finite gradient and left "
                          "the weights unchanged; stats['skipped'] keeps counting", RuntimeWarning)
        return stats

    def state_dict(self):
        """SAM's own state, the base optimizer's (momentum, Adam moments) and the step counters."""
        return {"sam": super().state_dict(), "base": self.base_optimizer.state_dict(),
                "counters": {"step": self._step, "skipped": self._skipped, "stats": self._stats,
                             "warned_skips": self._warned_skips, "persist": self._persist}}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict["sam"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups
        for state in self.state.values():  # torch casts saved tensors to the param dtype
            if "mask" in state:
                state["mask"] = state["mask"].bool()
        counters = state_dict["counters"]
        self._step, self._skipped, self._stats = counters["step"], counters["skipped"], counters["stats"]
        self._warned_skips, self._persist = counters["warned_skips"], counters["persist"]
        self.flags = {k: self.param_groups[0][k] for k in FLAGS}
        self._buffers = {}

    # ------------------------------------------------------------------ ascent
    def _ascend(self, grads_disposable):
        f = self.flags
        keep_g = self._needs_plain_grad()
        # e along g itself: ||g|| comes from one dot product on a flat copy, far cheaper than a
        # norm per tensor; the flat copy is the kept g, or the weight buffer before it holds w
        plain_norm = f["p"] == 2 and f["normalize"] and f["fisher_eta"] == 0 and f["friendly_sigma"] == 0 \
            and not any(group["adaptive"] for group in self.param_groups)
        work, directions, squares = [], [], []
        for group in self.param_groups:
            params, grads = self._active(group)
            if not params:
                continue
            direction = grads
            if f["friendly_sigma"] > 0:   # official F-SAM: d_0 = g_0, then d_t = g_t - sigma m_{t-1}
                if any("friendly_m" not in self.state[p] for p in params):
                    for p, g in zip(params, grads):
                        self.state[p]["friendly_m"] = g.clone()
                else:
                    ema = [self.state[p]["friendly_m"] for p in params]
                    direction = torch._foreach_add(grads, ema, alpha=-f["friendly_sigma"])
            scale = None
            if group["adaptive"]:   # T = |w| + eta; h = T g
                scale = torch._foreach_add(torch._foreach_abs(params), group["asam_eta"])
                direction = torch._foreach_mul(direction, scale)
            directions.append((group, params, grads, direction, scale))
            w = self._workspace(group, params, keep_g)
            flat_g = w["g"] if keep_g else w["buf"]
            if keep_g or plain_norm:
                torch._foreach_copy_(w["g_views"] if keep_g else w["views"], grads)
                squares.append(torch.dot(flat_g, flat_g))
            torch._foreach_copy_(w["views"], params)   # keep w
            work.append(w)
        if not work:
            return
        # e = rho T^2 g (USAM) and e = rho T sign(g) (L-inf ball) have nothing to normalise
        normalized = f["normalize"] and not math.isinf(f["p"])
        norm = sum(squares).sqrt() if plain_norm else self._ascent_norm(directions) if normalized else None
        finite = torch.isfinite(sum(squares) if squares else self._norm([g for d in directions for g in d[2]]))
        for group, params, grads, h, scale in directions:
            if f["fisher_eta"] > 0:
                e = torch._foreach_div(h, self._fisher_diagonal(grads))
            elif f["p"] == 2:
                e = torch._foreach_mul(h, scale) if scale is not None else h
            else:   # Hoelder dual of the L_p ball: sign(h) |h|^(q-1), then T once more for ASAM
                e = torch._foreach_sign(h) if math.isinf(f["p"]) else torch._foreach_mul(
                    torch._foreach_pow(torch._foreach_abs(h), 1 / (f["p"] - 1)), torch._foreach_sign(h))
                if scale is not None:
                    torch._foreach_mul_(e, scale)
            radius = group["rho"] / (norm + f["norm_eps"]) if normalized else group["rho"]
            if e is grads and grads_disposable:   # the grads are zeroed next: scale them in place
                torch._foreach_mul_(e, radius)
            else:
                e = torch._foreach_mul(e, radius)
            if self.sparse:  # sparse SAM masks e but keeps the full norm: ||e|| <= rho
                torch._foreach_mul_(e, self._masks(params))
            torch._foreach_add_(params, e)   # climb to w + e
        for w in work:
            w["finite"] = finite
        self._work = work
        self._perturbed = True

    def _ascent_norm(self, directions):
        """The global norm of the ascent direction over every group (the right dual norm for p)."""
        f = self.flags
        device = directions[0][1][0].device
        if f["fisher_eta"] > 0:   # sqrt(g . g/f)
            parts = []
            for _, _, grads, h, _ in directions:
                weighted = torch._foreach_div(torch._foreach_mul(h, h), self._fisher_diagonal(grads))
                parts += torch._foreach_norm(weighted, 1)
            return torch.stack([x.to(device) for x in parts]).sum().sqrt()
        q = f["p"] / (f["p"] - 1)
        parts = [x.to(device) for _, _, _, h, _ in directions for x in torch._foreach_norm(h, q)]
        return torch.linalg.vector_norm(torch.stack(parts), q) ** (q - 1)

    # ------------------------------------------------------------------ descent
    def _descend(self):
        """One flat buffer per group serves three roles in turn: w (restore), g' (to build d), w again
        (to undo a skipped step). With g kept for the ratio, that is two parameter-sized buffers."""
        f = self.flags
        work, self._work, self._perturbed = self._work, None, False
        stats_step = self._stats_step()
        device = work[0]["buf"].device
        for w in work:
            w["gp_grads"] = [p.grad for p in w["params"]]
            if any(g is None for g in w["gp_grads"]):
                raise ValueError("second_step(): a parameter that had a gradient at w has none at w + e")
            if stats_step:
                w["w_sq"] = torch.dot(w["buf"], w["buf"])
            torch._foreach_copy_(w["params"], w["views"])    # back to w, bit for bit
            torch._foreach_copy_(w["views"], w["gp_grads"])  # the buffer now holds g'
        dots = self._global_dots(work) if (stats_step or self._needs_global_dots()) else None
        finite = torch.ones((), dtype=torch.bool, device=device)
        counts, persist = [], []
        persist_step = stats_step and f["persist_from"] is not None and self._step >= f["persist_from"]
        for gi, w in enumerate(work):
            group, g, gp = w["group"], w["g"], w["buf"]
            rule = self._has_bin_rule(group)
            if g is not None and (stats_step or rule):
                # r overwrites the kept g when nothing needs g later (no allocation on the hot path)
                r = (gp / (g + f["ratio_eps"]) if self._uses_g_later(group)
                     else torch.div(gp, g.add_(f["ratio_eps"]), out=g))
                masks = _checkpoint_masks(r) if rule or persist_step else None
                if stats_step:
                    counts.append(torch.cat([_bin_counts(r, w), w["w_sq"].double().view(1)]))
                if persist_step:
                    persist.append(self._track_persistence(gi, masks[0]))
                if rule:
                    self._apply_rule(group, g, gp, masks)
            self._combine(group, g, gp, dots)
            if self._clean is not None:
                key, clean = self._clean.get(id(group), (w["key"], 0))
                if key != w["key"]:
                    raise ValueError("stash_clean_grad(): the clean loss and the perturbed loss must reach the "
                                     "same parameters")
                gp += clean
            finite &= w["finite"] & torch.isfinite(torch.dot(gp, gp))
        self._hand_over(work, finite)
        self._clean = None
        if f["friendly_sigma"] > 0:
            self._update_friendly_ema(work, finite)
        if f["looksam_k"] > 1:
            self._store_looksam_direction(work, dots, finite)
        self._base_step(work, finite)
        if stats_step:
            self._record_stats(torch.stack(counts).sum(0), dots, sum(persist) if persist else None,
                               sum(w["buf"].numel() for w in work))
        self._step += 1

    def _apply_rule(self, group, g, d, masks):
        """The bin rule in place on d = g': source g' or g per bin, then a multiplier per bin."""
        if group["sam_bins"] != "01234":
            use_sam = torch.zeros_like(masks[0])
            for k in range(1, 5):
                if str(k) in group["sam_bins"]:
                    use_sam |= masks[k - 1]
            if "0" in group["sam_bins"]:   # leftovers: in no checkpoint
                use_sam |= ~(masks[0] | masks[1] | masks[2] | masks[3])
            torch.where(use_sam, d, g, out=d)
        scale = [_resolve(s, self._condition(group)) for s in group["bin_scale"]]
        if scale != [1, 1, 1, 1, 1]:
            factor = torch.full_like(d, scale[0])
            for k in range(1, 5):
                if scale[k] != scale[0]:
                    factor.masked_fill_(masks[k - 1], scale[k])
            d.mul_(factor)

    def _combine(self, group, g, d, dots):
        """sammagnitude, samdirection and GSAM, in place on d = g'."""
        if group["combine"] == "magnitude":     # SAM's magnitude, SGD's sign
            d.abs_().mul_(g.sign())
        elif group["combine"] == "direction":   # SAM's sign, SGD's magnitude
            d.sign_().mul_(g.abs())
        alpha = self.flags["gsam_alpha"]
        if alpha > 0:   # d = g' - alpha (g - (<g,g'>/||g'||^2) g')
            coef = dots["g_gp"] / (dots["gp_gp"] + self.flags["norm_eps"])
            d.mul_(1 + alpha * coef.to(d.dtype)).add_(g, alpha=-alpha)

    def _condition(self, group):
        c, warm = group["condition"], self.flags["condition_warmup"]
        return 1 + (c - 1) * min(1.0, self._step / warm) if warm > 0 else c

    # ------------------------------------------------------------------ one-pass steps
    def _one_pass_step(self):
        f = self.flags
        active = [(group, *self._active(group)) for group in self.param_groups]
        active = [(group, params, grads) for group, params, grads in active if params]
        if not active:
            return
        if f["looksam_k"] > 1:   # g + alpha ||g||/||g_v|| g_v with g_v from the last refresh (global norms)
            gvs = [[self.state[p].get("looksam_gv", torch.zeros_like(p)) for p in params] for _, params, _ in active]
            ratio = self._norm([g for _, _, grads in active for g in grads]) / (
                self._norm([v for gv in gvs for v in gv]) + f["norm_eps"])
        work, finite = [], None
        for i, (group, params, grads) in enumerate(active):
            if f["descent"] == "hessian":
                d = self._hessian_direction(group, params, grads)
            elif f["looksam_k"] > 1:
                d = torch._foreach_add(grads, torch._foreach_mul(gvs[i], f["looksam_alpha"] * ratio))
            else:
                d = grads
            w = self._workspace(group, params, keep_g=False)
            torch._foreach_copy_(w["views"], [x.detach() for x in d])
            w["gp_grads"] = grads
            ok = torch.isfinite(torch.dot(w["buf"], w["buf"]))
            finite = ok if finite is None else finite & ok
            work.append(w)
        stats_step = self._stats_step()
        if stats_step:   # no g' on a one-pass step: only the norms are defined
            g_sq = sum(self._norm([g.detach() for g in grads]).square().double() for _, _, grads in active)
            w_sq = sum(self._norm(params).square().double() for _, params, _ in active)
        self._hand_over(work, finite)
        self._base_step(work, finite)
        if stats_step:
            nan = torch.full((), math.nan, dtype=torch.float64, device=g_sq.device)
            counts = torch.cat([nan.expand(4 + len(FINE_EDGES)), w_sq.view(1)])
            self._record_stats(counts, dict(g_g=g_sq, gp_gp=nan, g_gp=nan), None, 1)
        self._step += 1

    def _hand_over(self, work, finite):
        """Write d (in each buffer) into p.grad for the base optimizer: d = 0 on a non-finite step."""
        keep = finite.to(work[0]["buf"].dtype)
        for w in work:
            w["buf"].mul_(keep).nan_to_num_(0.0, 0.0, 0.0)
            torch._foreach_copy_(w.pop("gp_grads"), w["views"])   # pop: keep no grad alive past the step

    def _base_step(self, work, finite):
        """The base optimizer's step at w; on a skipped step the weights come back exactly."""
        for w in work:
            torch._foreach_copy_(w["views"], w["params"])   # the buffer holds w again
        self.base_optimizer.step()
        skip = ~finite
        for w in work:   # lerp with weight 0 keeps the new weights, with weight 1 restores w, exactly
            torch._foreach_lerp_(w["params"], w["views"], skip.to(w["buf"].dtype))
        self._skipped = skip.long() + (self._skipped if self._skipped is not None else 0)
        self._opt_called = True   # lets LR schedulers attached to this wrapper see the step

    def _hessian_direction(self, group, params, grads):
        """SGDHESS (seed 002): d = (1 + rho_H |Hz|) g, one Rademacher probe z, conv kernels averaged
        over their spatial dims (origin 1.15)."""
        if self._step % self.flags["hessian_every"] == 0 or "hess_d" not in self.state[params[0]]:
            if not all(g.requires_grad for g in grads):
                raise ValueError("sgdhess needs the first backward with create_graph=True (see opt.create_graph)")
            probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
            with torch.enable_grad():
                hz = torch.autograd.grad(grads, params, grad_outputs=probes)
            for p, h in zip(params, hz):   # the averaging differs by tensor rank: once per refresh
                h = h.abs()
                self.state[p]["hess_d"] = h.mean(dim=(2, 3), keepdim=True).expand_as(h).clone() if h.dim() == 4 else h
        curv = [self.state[p]["hess_d"] for p in params]
        return torch._foreach_addcmul([g.detach() for g in grads], curv, [g.detach() for g in grads],
                                      value=group["rho"])

    # ------------------------------------------------------------------ small helpers
    def _active(self, group=None):
        groups = [group] if group is not None else self.param_groups
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise TypeError("SAM does not support sparse gradients")
        return params, grads

    def _needs_plain_grad(self):
        """g is kept (flat) for statistics, for the ratio of a bin rule, or where g itself is used later."""
        return self._stats_step() or any(self._has_bin_rule(g) or self._uses_g_later(g) for g in self.param_groups)

    def _stats_step(self):
        every = self.flags["stats_every"]
        return every > 0 and self._step % every == 0

    def _uses_g_later(self, group):
        """g enters d (SAMCKPT's plain bins, combine, GSAM), LookSAM's g_v or FriendlySAM's EMA."""
        f = self.flags
        return (group["sam_bins"] != "01234" or bool(group["combine"]) or f["gsam_alpha"] > 0
                or f["looksam_k"] > 1 or f["friendly_sigma"] > 0)

    def _needs_global_dots(self):
        return self.flags["gsam_alpha"] > 0 or self.flags["looksam_k"] > 1

    @staticmethod
    def _has_bin_rule(group):
        return tuple(group["bin_scale"]) != (1, 1, 1, 1, 1) or group["sam_bins"] != "01234"

    def _workspace(self, group, params, keep_g):
        """Persistent flat buffers of a group (reused every step: no allocation on the hot path)."""
        key = tuple(map(id, params))
        ws = self._buffers.get(id(group))
        if ws is None or ws["key"] != key:
            if len({(p.device, p.dtype) for p in params}) > 1:
                raise ValueError("all parameters of a param group must share device and dtype; "
                                 "put the others in a param group of their own")
            buf = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            ws = dict(key=key, group=group, params=params, buf=buf, views=unflatten(buf, params), g=None)
            self._buffers[id(group)] = ws
        if keep_g and ws["g"] is None:
            ws["g"] = torch.empty_like(ws["buf"])
            ws["g_views"] = unflatten(ws["g"], params)
        return ws

    def _global_dots(self, work):
        """<g,g>, <g',g'>, <g,g'> over every group, in float64 on the device."""
        device = work[0]["buf"].device
        acc = torch.zeros(3, dtype=torch.float64, device=device)
        for w in work:
            g, gp = w["g"], w["buf"]
            acc += torch.stack([torch.dot(g, g), torch.dot(gp, gp), torch.dot(g, gp)]).to(device, torch.float64)
        return dict(g_g=acc[0], gp_gp=acc[1], g_gp=acc[2])

    @staticmethod
    def _norm(tensors):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))

    def _fisher_diagonal(self, grads):
        """f = 1 + fisher_eta g^2, the diagonal Fisher of Fisher SAM from the same mini-batch."""
        return torch._foreach_add(torch._foreach_mul(torch._foreach_mul(grads, grads), self.flags["fisher_eta"]), 1.0)

    def _masks(self, params):
        """Sparse SAM masks (bool). Built over all trainable parameters at first use: SSAM-D at random
        with exactly (1 - sparsity) N live entries, SSAM-F empty until its first Fisher mask."""
        if any("mask" not in self.state[p] for p in params):
            every = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            n = sum(p.numel() for p in every)
            if self.flags["mask_mode"] == "dynamic":
                live = _top_k_mask(torch.rand(n), int(round((1 - self.flags["sparsity"]) * n)))
            else:
                live = torch.zeros(n, dtype=torch.bool)
            for p, part in zip(every, unflatten(live, every)):
                self.state[p]["mask"] = part.to(p.device).clone()
        return [self.state[p]["mask"] for p in params]

    def _update_friendly_ema(self, work, finite):
        weight = (1 - self.flags["friendly_lambda"]) * finite.to(work[0]["buf"].dtype)
        for w in work:   # m <- lambda m + (1 - lambda) g; kept as it was on a skipped step
            ema = [self.state[p]["friendly_m"] for p in w["params"]]
            torch._foreach_lerp_(ema, unflatten(torch.nan_to_num(w["g"]), w["params"]), weight)

    def _store_looksam_direction(self, work, dots, finite):
        """g_v = g' - (<g,g'>/||g||^2) g: the part of the SAM gradient orthogonal to g (kept on a skip)."""
        coef = dots["g_gp"] / (dots["g_g"] + self.flags["norm_eps"])
        for w in work:
            previous = flatten([self.state[p].get("looksam_gv", torch.zeros_like(p)) for p in w["params"]])
            gv = torch.where(finite, w["buf"] - coef.to(w["buf"].dtype) * w["g"], previous)
            for p, part in zip(w["params"], unflatten(gv, w["params"])):
                self.state[p]["looksam_gv"] = part

    def _track_persistence(self, gi, in_ckpt1):
        """Counts of: the checkpoint-1 set at t0, its overlap with this step's, the running intersection."""
        if self._persist is None:
            self._persist = {}
        if gi not in self._persist:
            self._persist[gi] = (in_ckpt1.clone(), in_ckpt1.clone())
        at_t0, running = self._persist[gi]
        running &= in_ckpt1
        return torch.stack([at_t0.sum(), (at_t0 & in_ckpt1).sum(), running.sum()]).double()

    def _record_stats(self, counts, dots, persist, n):
        """counts: B1..B4, then r >= each fine edge, then ||w||^2 (summed over groups)."""
        device = counts.device
        b1, b2, b3, b4 = counts[:4]
        at_least = counts[4:4 + len(FINE_EDGES)]
        fine = torch.cat([(b1 - at_least[0]).view(1), at_least[:-1] - at_least[1:], at_least[-1:]])
        bins = torch.stack([n - counts[:4].sum(), b1, b2, b3, b4])
        g_norm, gp_norm = dots["g_g"].sqrt(), dots["gp_gp"].sqrt()
        cos = dots["g_gp"] / (g_norm * gp_norm).clamp_min(1e-300)
        if persist is None:
            persist = torch.full((3,), math.nan, dtype=torch.float64, device=device)
        self._stats = torch.cat([torch.full((1,), float(self._step), dtype=torch.float64, device=device),
                                 100 * bins / n, 100 * fine / n,
                                 torch.stack([g_norm, gp_norm, counts[-1].sqrt(), cos, 100 * (b1 + b3) / n]),
                                 torch.zeros(1, dtype=torch.float64, device=device), persist])


def _checkpoint_masks(r):
    """Bool masks of the four checkpoints (strict inequalities: r exactly 0, -1, 1 or nan is in none)."""
    return [r > 1, (r > 0) & (r < 1), r < -1, (r < 0) & (r > -1)]


def _bin_counts(r, workspace):
    """Counts of B1..B4, then of r >= each fine edge, as float64 on the device. The comparisons
    write into one reused bool buffer: a fresh one per comparison costs more than comparing."""
    if workspace.get("scratch") is None or workspace["scratch"].shape != r.shape:
        workspace["scratch"] = torch.empty(r.shape, dtype=torch.bool, device=r.device)
    scratch = workspace["scratch"]
    count = lambda compare, edge: torch.count_nonzero(compare(r, edge, out=scratch))
    above_0, above_1, from_1 = count(torch.gt, 0), count(torch.gt, 1), count(torch.ge, 1)
    below_0, below_m1, to_m1 = count(torch.lt, 0), count(torch.lt, -1), count(torch.le, -1)
    bins = [above_1, above_0 - from_1, below_m1, below_0 - to_m1]
    return torch.stack(bins + [count(torch.ge, edge) for edge in FINE_EDGES]).double()


def _full_precision(param_groups):
    """SAM's own arithmetic (norms, ratios, masks) in the parameters' precision, even inside autocast."""
    return torch.autocast(param_groups[0]["params"][0].device.type, enabled=False)


def _resolve(value, c):
    return {"c": c, "1/c": 1 / c}.get(value, value) if isinstance(value, str) else float(value)


def _top_k_mask(score, k):
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(score, k).indices] = True
    return mask


def _check_flags(flags):
    """Clear errors for flag values that cannot work, or that cannot work together."""
    if not isinstance(flags["rho"], numbers.Real) or flags["rho"] < 0:
        raise ValueError(f"rho must be a number >= 0, got {flags['rho']!r}")
    if not flags["p"] > 1:
        raise ValueError(f"p must be > 1 (2 is SAM, inf the L-inf ball), got {flags['p']!r}")
    if flags["descent"] not in ("sam", "sgd", "hessian"):
        raise ValueError(f"descent must be 'sam', 'sgd' or 'hessian', got {flags['descent']!r}")
    if flags["combine"] not in ("", "magnitude", "direction"):
        raise ValueError(f"combine must be '', 'magnitude' or 'direction', got {flags['combine']!r}")
    if flags["mask_mode"] not in ("fisher", "dynamic"):
        raise ValueError(f"mask_mode must be 'fisher' or 'dynamic', got {flags['mask_mode']!r}")
    if not 0 <= flags["sparsity"] < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {flags['sparsity']!r}")
    if len(flags["bin_scale"]) != 5 or any(isinstance(s, str) and s not in ("c", "1/c") for s in flags["bin_scale"]):
        raise ValueError(f"bin_scale needs 5 entries (B0..B4), numbers or 'c' or '1/c'; got {flags['bin_scale']!r}")
    if not set(flags["sam_bins"]) <= set("01234"):
        raise ValueError(f"sam_bins names bins among '01234', got {flags['sam_bins']!r}")
    if flags["condition"] <= 0:
        raise ValueError(f"condition must be > 0, got {flags['condition']!r}")
    if int(flags["looksam_k"]) != flags["looksam_k"] or flags["looksam_k"] < 1:
        raise ValueError(f"looksam_k must be an integer >= 1, got {flags['looksam_k']!r}")
    if flags["hessian_every"] < 1 or flags["stats_every"] < 0:
        raise ValueError("hessian_every must be >= 1 and stats_every >= 0")
    if not flags["normalize"] and flags["p"] != 2:
        raise ValueError("normalize=False (USAM) is defined for p=2 only")
    if flags["fisher_eta"] > 0 and (flags["adaptive"] or flags["p"] != 2 or not flags["normalize"]):
        raise ValueError("fisher_eta (Fisher SAM) is its own geometry: use it without adaptive, p or normalize=False")
    rule = tuple(flags["bin_scale"]) != (1, 1, 1, 1, 1) or flags["sam_bins"] != "01234"
    if flags["combine"] and rule:
        raise ValueError("combine (sammagnitude/samdirection) replaces the bin rule: set one of them")
    if flags["looksam_k"] > 1 and (rule or flags["combine"] or flags["gsam_alpha"] > 0):
        raise ValueError("LookSAM reuses g' itself: it does not combine with bin rules, combine or GSAM")
    if flags["descent"] != "sam" and (rule or flags["combine"] or flags["gsam_alpha"] > 0 or flags["looksam_k"] > 1):
        raise ValueError(f"descent={flags['descent']!r} takes one pass and has no g': no bin rule, combine, GSAM or LookSAM")


def disable_running_stats(model):
    """Keep BatchNorm running statistics out of this pass (momentum 0), as davda54/sam's example;
    num_batches_tracked is put back too, so BN layers with momentum=None average the first passes only."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not hasattr(module, "_sam_momentum"):
            module._sam_momentum = module.momentum
            module._sam_batches = None if module.num_batches_tracked is None else module.num_batches_tracked.clone()
            module.momentum = 0.0


def enable_running_stats(model):
    """Undo disable_running_stats before the next step's first pass."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and hasattr(module, "_sam_momentum"):
            module.momentum = module._sam_momentum
            if module._sam_batches is not None:
                module.num_batches_tracked.copy_(module._sam_batches)
            del module._sam_momentum, module._sam_batches
