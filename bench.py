"""Benchmarks for sam.py and train.py, each a ratio against the code it replaces, side by side in one run.

    python bench.py                        # all three on this machine (CPU: a few minutes)
    python bench.py --only optimizer data  # a selection

optimizer  sam.SAM first_step()+second_step() against the same algorithm written as davda54/sam's
           per-tensor loop, SGD base, on PyramidNet-110 (439 tensors), ResNet-18 and WRN-16-8; with statistics
           every step (and with torch.bucketize, the plain form of its CPU bucketing), and samme1 (a bin rule:
           r bucketed every step); SAM's buffers
data       train.py's device-resident loader against a torchvision DataLoader with PIL transforms and
           2 workers (davda54/sam's example), images per second on CIFAR-shaped uint8 data
step       ResNet-18: a SAM step over an SGD step, and statistics on over off (train.train_step)
Timings interleave the configurations and report medians, so a busy machine skews both sides alike.
"""
import argparse
import os
import platform
import statistics
import time
import unittest.mock

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import sam
import train


# ----------------------------------------------------------------------------------------------
# Timing

def timer(device):
    """A function that times fn() in seconds: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        def measure(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return measure


def interleaved_medians(configs, repeats, warmup, measure):
    """{name: median seconds}, timing the configurations in turn so that load changes hit all of them."""
    for fn in configs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            times[name].append(measure(fn))
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------
# 1. Optimizer overhead: sam.SAM against davda54/sam's per-tensor loop

class LoopSAM(torch.optim.Optimizer):
    """davda54/sam's SAM (rho, no adaptive), written as it is there: one kernel chain per tensor."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                            if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)   # climb to the local maximum "w + e(w)"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]   # get back to "w" from "w + e(w)"
        self.base_optimizer.step()


class BucketizeSAM(sam.SAM):
    """sam.SAM with torch.bucketize on the CPU too: the plain form that sam._bucketize's comparisons replace."""

    def _buckets(self, part, gp):
        def plain(r, edges):
            return torch.bucketize(r, edges, right=True, out_int32=True)
        with unittest.mock.patch.object(sam, "_bucketize", plain):
            return super()._buckets(part, gp)


def held_bytes(opt, exclude):
    """Bytes of the tensor storages the optimizer object keeps (its state and private buffers), with the
    base optimizer, the parameters and the gradients left out; views of one buffer count once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes, pending = {}, [v for k, v in vars(opt).items() if k not in ("base_optimizer", "param_groups")]
    while pending:
        item = pending.pop()
        if torch.is_tensor(item) and item.untyped_storage().data_ptr() not in skip:
            sizes[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            pending += list(item.values())
        elif isinstance(item, (list, tuple)):
            pending += list(item)
    return sum(sizes.values())


# plain SAM's optimizer step / the loop's: per-tensor dispatch dominates PyramidNet-110 (439 small tensors),
# memory traffic the other two (few large tensors: count the passes)
OPTIMIZER_TARGETS = {"pyramidnet110": 0.6, "resnet18": 1.0, "wrn16-8": 1.0}


def bench_optimizer(args, device, measure):
    return [bench_optimizer_on(name, args, device, measure) for name in args.optimizer_models]


def bench_optimizer_on(model_name, args, device, measure):
    torch.manual_seed(0)
    model = train.MODELS[model_name](10, 1.0).to(device)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    perturbed = [g + torch.randn_like(g) for g in grads]   # cos(g, g') ~ 0.7, r spread over every bucket as in
    base = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)   # training (g' = g would put every r in one bucket)
    optimizers = {"davda54 loop": LoopSAM(params, torch.optim.SGD, rho=0.05, **base),
                  "sam.SAM": sam.SAM(params, torch.optim.SGD, rho=0.05, **base),
                  "sam.SAM, stats every step": sam.SAM(params, torch.optim.SGD, rho=0.05, stats_every=1, **base),
                  "sam.SAM samme1 (buckets r every step)": sam.SAM(params, torch.optim.SGD, 0.05, variant="samme1",
                                                                   **base),
                  "sam.SAM, stats every step, torch.bucketize": BucketizeSAM(params, torch.optim.SGD, 0.05,
                                                                             stats_every=1, **base)}

    def step(opt):   # fresh copies of the stored g and g' as a training loop has them; only the
        def run():   # optimizer's first_step(zero_grad=True) + second_step() is timed
            for p, g in zip(params, grads):
                p.grad = g.clone()
            seconds = measure(lambda: opt.first_step(zero_grad=True))
            for p, g in zip(params, perturbed):
                p.grad = g.clone()
            return seconds + measure(opt.second_step)
        return run
    def base_step(kind):   # the base step alone: torch's default (the loop's), and the fused one sam.SAM builds
        base_alone = torch.optim.SGD(params, **base, **({kind: True} if kind else {}))

        def run():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            return measure(base_alone.step)
        return run
    seconds = interleaved_medians({**{name: step(opt) for name, opt in optimizers.items()},
                                   "base SGD step alone, torch's default": base_step(None),
                                   "base SGD step alone, fused": base_step("fused")}, args.repeats, 3, lambda fn: fn())
    loop = seconds["davda54 loop"]
    rows = [(f"{name} [ms]", f"{1000 * s:.2f}", "") for name, s in seconds.items()]
    target = f"<= {OPTIMIZER_TARGETS[model_name]}" if model_name in OPTIMIZER_TARGETS else ""   # none set: none shown
    rows.append(("SAM / loop", f"{seconds['sam.SAM'] / loop:.2f}", target))
    rows.append(("SAM stats every step / loop", f"{seconds['sam.SAM, stats every step'] / loop:.2f}",
                 "<= 1.0" if model_name == "pyramidnet110" else ""))
    rows.append(("samme1 / loop", f"{seconds['sam.SAM samme1 (buckets r every step)'] / loop:.2f}", ""))
    rows.append(("stats every step: branch-free buckets / torch.bucketize",
                 f"{seconds['sam.SAM, stats every step'] / seconds['sam.SAM, stats every step, torch.bucketize']:.2f}", ""))
    numel = sum(p.numel() for p in params)
    for name in ("sam.SAM", "sam.SAM, stats every step"):
        held = held_bytes(optimizers[name], exclude=params + grads)
        rows.append((f"{name}: buffers held between steps [x params]", f"{held / (4 * numel):.2f}", ""))
    if device.type == "cuda":   # the transient peak inside a step, beyond the weights, grads and momentum
        for name in optimizers:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(optimizers[name])()
            peak = torch.cuda.max_memory_allocated() - before
            rows.append((f"{name}: peak extra memory [x params]", f"{peak / (4 * numel):.2f}", ""))
    return f"optimizer step, {model_name}: {len(params)} tensors, {numel / 1e6:.2f}M parameters", rows


# ----------------------------------------------------------------------------------------------
# 2. Data pipeline: device-resident batches against PIL transforms in DataLoader workers

class PilCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__: one PIL image per sample, then the transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class Cutout:
    """davda54/sam example/utility/cutout.py: a size x size zero square with probability p."""

    def __init__(self, size=16, p=0.5):
        self.size, self.p = size, p

    def __call__(self, image):
        if torch.rand(1) > self.p:
            return image
        cy, cx = torch.randint(0, image.shape[1], (1,)).item(), torch.randint(0, image.shape[2], (1,)).item()
        image[:, max(0, cy - self.size // 2):cy + self.size // 2, max(0, cx - self.size // 2):cx + self.size // 2] = 0
        return image


def bench_data(args, device, measure):
    images = torch.randint(0, 256, (args.data_images, 3, 32, 32), dtype=torch.uint8)   # content does not matter
    labels = torch.randint(0, 10, (args.data_images,))
    stats = train.DATASETS["cifar10"]
    batch_size = 256

    loader = train.DeviceLoader(images, labels, None, "cifar10", device, device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)

    def device_epoch():
        perm = torch.randperm(len(loader), generator=generator, device=device)
        for idx in perm.split(batch_size):
            loader.train_batch(idx, generator, cutout=True)

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(stats["mean"], stats["std"]), Cutout()])
    workers = torch.utils.data.DataLoader(PilCifar(images, labels, transform), batch_size=batch_size, shuffle=True,
                                          num_workers=2)

    def pil_epoch():
        for x, y in workers:
            x.to(device), y.to(device)
    seconds = interleaved_medians({"device loader": device_epoch, "DataLoader, PIL, 2 workers": pil_epoch},
                                  args.data_repeats, 1, measure)
    rate = {name: args.data_images / s for name, s in seconds.items()}
    rows = [(f"{name} [img/s]", f"{r:,.0f}", "") for name, r in rate.items()]
    rows.append(("device loader / DataLoader", f"{rate['device loader'] / rate['DataLoader, PIL, 2 workers']:.1f}", ">= 10"))
    return f"data pipeline: {args.data_images} images per epoch, batch {batch_size}, crop+flip+cutout", rows


# ----------------------------------------------------------------------------------------------
# 3. Step time: SAM over SGD, statistics on over off, ResNet-18

def bench_step(args, device, measure):
    cuda = device.type == "cuda"
    batch = args.step_batch or (128 if cuda else 16)
    torch.manual_seed(0)
    model = train.MODELS["resnet18"](10, 1.0).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    y = torch.randint(0, 10, (batch,), device=device)
    settings = train.StepSettings(autocast_dtype=torch.bfloat16 if cuda else None, device_type=device.type)
    autocast = settings.autocast()
    base = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)
    sgd = torch.optim.SGD(model.parameters(), **base)

    def sgd_step():   # the plain baseline: one forward and backward, torch's SGD
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        sgd.step()
        sgd.zero_grad()

    def sam_step(stats_every, skip_nonfinite=True):
        opt = sam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, stats_every=stats_every,
                      skip_nonfinite=skip_nonfinite, **base)
        return lambda: train.train_step(model, opt, x, y, settings)
    steps = {"SGD": sgd_step, "SAM, stats off": sam_step(0), "SAM, stats every step": sam_step(1),
             "SAM, stats off, no host read (skip_nonfinite=False)": sam_step(0, skip_nonfinite=False)}
    seconds = interleaved_medians(steps, args.step_repeats or (30 if cuda else 3), 3 if cuda else 1, measure)
    rows = [(f"{name} [ms]", f"{1000 * s:.1f}", "") for name, s in seconds.items()]
    rows += [("SAM / SGD", f"{seconds['SAM, stats off'] / seconds['SGD']:.3f}", "<= 2.10"),
             ("SAM without the host read / SGD",
              f"{seconds['SAM, stats off, no host read (skip_nonfinite=False)'] / seconds['SGD']:.3f}", ""),
             ("stats every step / off", f"{seconds['SAM, stats every step'] / seconds['SAM, stats off']:.3f}", "<= 1.05")]
    precision = "bf16 autocast, channels_last" if cuda else "fp32"
    return f"step time, resnet18, batch {batch}, {precision}", rows


# ----------------------------------------------------------------------------------------------

BENCHMARKS = {"optimizer": bench_optimizer, "data": bench_data, "step": bench_step}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--threads", type=train.at_least(1), default=None, help="CPU threads (default: torch's); "
                        "1 is steadier on a busy machine, where one slow core stalls every parallel kernel")
    parser.add_argument("--repeats", type=train.at_least(1), default=20, help="optimizer: timed steps")
    parser.add_argument("--optimizer-models", nargs="+", default=list(OPTIMIZER_TARGETS), choices=list(train.MODELS))
    parser.add_argument("--data-images", type=train.at_least(256), default=10_000, help="data: images per epoch")
    parser.add_argument("--data-repeats", type=train.at_least(1), default=3, help="data: timed epochs")
    parser.add_argument("--step-batch", type=train.at_least(1), default=None, help="step: default 128 CUDA, 16 CPU")
    parser.add_argument("--step-repeats", type=train.at_least(1), default=None, help="step: default 30 CUDA, 3 CPU")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here; use --device cpu (or auto)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if train.uses_cuda(args) else "cpu")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {device.type}: {machine}")
    measure = timer(device)
    for name in args.only:
        tables = BENCHMARKS[name](args, device, measure)
        for title, rows in tables if isinstance(tables, list) else [tables]:
            width = max(len(r[0]) for r in rows)
            print(f"\n{title}", flush=True)
            for label, value, target in rows:
                print(f"  {label:<{width}}  {value:>10}  {target}")


if __name__ == "__main__":
    main()
