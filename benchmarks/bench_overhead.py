"""What the monitor costs, measured side by side in one run (this machine is shared and noisy).

    python benchmarks/bench_overhead.py            # full run, writes benchmarks/results/overhead.md
    python benchmarks/bench_overhead.py --quick    # a smoke run (fewer steps, smaller matrices)

1. Wall time of monitored over bare training of the demo transformer (every=50, preset
   "full": every metric at every logged step), in interleaved blocks so drift hits both.
2. The cost of one logging step in training-step equivalents, per metric.
3. Lanczos sigma_max / stable rank against a full SVD (time ratio, error), with a
   Marchenko-Pastur (random-init) spectrum as well as a decaying one.
4. Event-write throughput against torch's SummaryWriter.add_scalar.
5. Alerts and the flight recorder (``watch(alerts=True)``: the default rules checked every
   step, per-layer gradient norms every step, a ring of 32 steps) against
   the same monitor without them, side by side (``--alerts-only`` runs this section alone).
6. Where CUDA is available, 1 and 2 again on the GPU for a GPT-2-small-sized model
   (12 layers, d=768, context 1024, batch 8; byte vocabulary), or alone with ``--gpu-only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monitor  # noqa: E402
import monitor.flight  # noqa: E402
from benchmarks.common import best_time, md_table, write_results  # noqa: E402
from demos.data import encode, get_batch, stdlib_text  # noqa: E402
from demos.model import GPT, GPTConfig  # noqa: E402
from monitor.config import MonitorConfig  # noqa: E402
from monitor.metrics import energy, norms, spectral, views  # noqa: E402
from monitor.metrics.ntk_capture import NTKCapture  # noqa: E402
from monitor.writer import EventWriter  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "overhead.md")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The model being trained and where."""
    name: str
    cfg: GPTConfig
    batch: int
    device: str = "cpu"

    @property
    def label(self) -> str:
        c = self.cfg
        return (f"{self.name} ({c.n_layer} layers, d={c.n_embd}, {c.n_head} heads, context "
                f"{c.block_size}, batch {self.batch}, byte vocabulary, on {self.device}")

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def batches(self, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        data = encode(stdlib_text())
        gen = torch.Generator().manual_seed(seed)
        return [tuple(t.to(self.device) for t in get_batch(data, self.batch, self.cfg.block_size, gen))
                for _ in range(n)]


DEMO = Setup("Demo transformer", GPTConfig(block_size=128), 16)
GPT2_SMALL = Setup("GPT-2-small-sized transformer",
                   GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768), 8, "cuda")


def demo_setup(setup: Setup = DEMO, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(setup.cfg).to(setup.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    return model, opt


def train_block(model, opt, batches, mon=None, setup: Setup = DEMO) -> float:
    setup.sync()
    start = time.perf_counter()
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mon is not None:
            mon.log(loss=loss)
    setup.sync()
    return time.perf_counter() - start


def overhead(steps_per_block: int, reps: int, every: int, setup: Setup = DEMO) -> tuple[str, float]:
    batches = setup.batches(steps_per_block, 0)
    bare_model, bare_opt = demo_setup(setup)
    mon_model, mon_opt = demo_setup(setup)
    logdir = tempfile.mkdtemp(prefix="bench-overhead-")
    mon = monitor.watch(mon_model, mon_opt, logdir, config=MonitorConfig.preset("full", every=every))
    train_block(bare_model, bare_opt, batches[:3], setup=setup)  # warm-up both
    train_block(mon_model, mon_opt, batches[:3], mon, setup)
    bare, monitored = [], []
    for rep in range(reps):  # interleave, alternating which goes first
        pair = [(bare, bare_model, bare_opt, None), (monitored, mon_model, mon_opt, mon)]
        for out, model, opt, m in (pair if rep % 2 == 0 else pair[::-1]):
            out.append(train_block(model, opt, batches, m, setup))
    mon.close()
    own = hook_own_seconds(logdir)  # the hook's own clock over the timed blocks
    ratio = sum(monitored) / sum(bare)
    per_block = sorted(m / b for m, b in zip(monitored, bare))
    # the fastest quarter of each arm: what the code costs when no other job steals the cores
    q = max(1, reps // 4)
    quiet = sum(sorted(monitored)[:q]) / sum(sorted(bare)[:q])
    step_ms = 1000 * sum(bare) / (reps * steps_per_block)
    text = (f"{setup.label}, {sum(p.numel() for p in bare_model.parameters()):,} "
            f"parameters), AdamW, `every={every}`, preset `full` (all metrics at every logged step), "
            f"{reps} interleaved pairs of blocks of {steps_per_block} steps (each block holds "
            f"{steps_per_block // every} logged step(s)), alternating which arm goes first.\n\n"
            + md_table(["", "value"], [
                ["bare step (mean)", f"{step_ms:.1f} ms"],
                ["monitored / bare wall time (sum over all blocks)", f"**{ratio:.4f}**"],
                ["median of the per-pair ratios", f"**{statistics.median(per_block):.4f}**"],
                [f"fastest {q} blocks of each arm (quiet-machine estimate)", f"{quiet:.4f}"],
                ["per-pair ratios (min / max)", f"{min(per_block):.3f} / {max(per_block):.3f}"],
                ["the hook's own clock: 1 + sum of `monitor/seconds` / (monitored time - it)",
                 f"{1 + own / (sum(monitored) - own):.4f}"],
                ["target", "<= 1.03 (goal 1.01)"],
            ]))
    return text, step_ms


def alerts_overhead(steps_per_block: int, reps: int, every: int, setup: Setup = DEMO) -> str:
    """``watch(..., alerts=True)`` against the same ``full`` monitor without alerts."""
    batches = setup.batches(steps_per_block, 0)
    arms = []
    for alerts in (None, True):
        model, opt = demo_setup(setup)
        logdir = tempfile.mkdtemp(prefix="bench-alerts-")
        mon = monitor.watch(model, opt, logdir, config=MonitorConfig.preset("full", every=every),
                            alerts=alerts)
        train_block(model, opt, batches[:3], mon, setup)  # warm-up
        arms.append([model, opt, mon, logdir, []])
    bare_model, bare_opt = demo_setup(setup)
    bare = []
    train_block(bare_model, bare_opt, batches[:3], setup=setup)
    for rep in range(reps):  # interleave the three arms, rotating which goes first
        order = [0, 1, 2][rep % 3:] + [0, 1, 2][:rep % 3]
        for i in order:
            if i == 2:
                bare.append(train_block(bare_model, bare_opt, batches, setup=setup))
            else:
                model, opt, mon, _, out = arms[i]
                out.append(train_block(model, opt, batches, mon, setup))
    own = []
    for _, _, mon, logdir, _ in arms:
        mon.close()
        own.append(hook_own_seconds(logdir))
    plain, alerted = arms[0][4], arms[1][4]
    per_pair = sorted(a / p for a, p in zip(alerted, plain))
    q = max(1, reps // 4)
    step_ms = 1000 * sum(bare) / (reps * steps_per_block)
    extra_ms = 1000 * (own[1] - own[0]) / ((reps + 0) * steps_per_block)
    with_updates, without = alerts_step_cost(setup)
    return (f"{setup.label}), AdamW, `every={every}`, preset `full`; arms: bare, monitored, "
            f"monitored with `alerts=True` (defaults: {len(monitor.flight.AlertConfig().rules)} "
            f"rule(s), gradient norms every step, update ratios every step: "
            f"{monitor.flight.AlertConfig().record_updates}, flight recorder K = "
            f"{monitor.flight.AlertConfig().record_steps}); {reps} interleaved rounds of "
            f"{steps_per_block} steps; no alert fires (a stable run), so this is the steady cost.\n\n"
            + md_table(["", "value"], [
                ["bare step (mean)", f"{step_ms:.1f} ms"],
                ["monitored / bare (sum)", f"{sum(plain) / sum(bare):.4f}"],
                ["monitored + alerts / bare (sum)", f"{sum(alerted) / sum(bare):.4f}"],
                ["**alerts on / alerts off** (sum over all blocks)", f"**{sum(alerted) / sum(plain):.4f}**"],
                ["median of the per-round ratios (min / max)",
                 f"{statistics.median(per_pair):.4f} ({per_pair[0]:.3f} / {per_pair[-1]:.3f})"],
                [f"fastest {q} blocks of each arm", f"{sum(sorted(alerted)[:q]) / sum(sorted(plain)[:q]):.4f}"],
                ["the hook's own clock: extra time per step with alerts",
                 f"{extra_ms:.2f} ms ({extra_ms / step_ms:.2%} of a bare step)"],
                ["the alert machinery of one step alone, best of 30 (with / without update ratios)",
                 f"{1000 * with_updates:.2f} ms / {1000 * without:.2f} ms "
                 f"({with_updates / (step_ms / 1000):.2%} / {without / (step_ms / 1000):.2%} of a bare step)"],
                ["target", "<= 1.01"],
            ]))


def alerts_step_cost(setup: Setup = DEMO, repeat: int = 30) -> tuple[float, float]:
    """Best-of time (s) of the alert machinery of one non-logged step (cheap values, ring,
    rules; no firing) on the demo model: ``(with update ratios, without)``."""
    from monitor.flight import AlertConfig, JobAlerts, computed_metrics
    from monitor.hook import Layer, StepRecord

    model, opt = demo_setup(setup)
    [(x, y)] = setup.batches(1, 2)
    _, loss = model(x, y)
    loss.backward()
    layers = [Layer(n, p, "linear", p.ndim >= 2) for n, p in model.named_parameters()]
    out = []
    for updates in (True, False):
        job = JobAlerts(AlertConfig(record_updates=updates), layers,
                        computed_metrics(MonitorConfig(), layers), None, lambda *a: None)
        step = [0]

        def one():
            job.before_update(None)
            job.after_update(None)
            job.log({"loss": loss.detach()})
            job.end_step(step[0], None, StepRecord)
            step[0] += 1
            setup.sync()

        one()
        out.append(best_time(one, repeat))
    return out[0], out[1]


def hook_own_seconds(logdir: str) -> float:
    """Sum of the monitor's own ``monitor/seconds`` after the first logged step (which falls
    in the untimed warm-up), read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return sum(e.value for e in acc.Scalars("monitor/seconds")[1:])


def per_metric_cost(step_ms: float, setup: Setup = DEMO) -> str:
    """One logging step's cost per metric family, in training-step equivalents."""
    model, opt = demo_setup(setup)
    [(x, y)] = setup.batches(1, 1)
    kinds = views.layer_kinds(model)
    named = [(n, p) for n, p in model.named_parameters()]
    mats = [(n, views.matrix_view(p.detach(), kinds[n])) for n, p in named if p.ndim >= 2]

    def fwd_bwd():
        _, loss = model(x, y)
        loss.backward()

    fwd_bwd()
    grads = {n: views.matrix_view(p.grad, kinds[n]) for n, p in named if p.ndim >= 2}
    warm = {n: spectral.power_sigma_max(M).v for n, M in mats}
    rows = []

    def timed(fn, repeat: int = 3) -> float:
        def synced():
            fn()
            setup.sync()
        synced()  # first call outside the timing (CUDA kernels, allocator)
        return best_time(synced, repeat)

    def add(label, seconds):
        rows.append([label, f"{1000 * seconds:.1f} ms", f"{1000 * seconds / step_ms:.3f}"])

    add("gradient/param norms + health counts (fused)",
        timed(lambda: (norms.tensor_norms([p.grad for _, p in named]),
                       norms.tensor_norms([p for _, p in named]),
                       norms.nonfinite_count([p.grad for _, p in named]))))
    add("sigma_max + stable rank, cold start (all matrices)",
        timed(lambda: [spectral.power_sigma_max(M) for _, M in mats]))
    add("sigma_max + stable rank, warm start (all matrices)",
        timed(lambda: [spectral.power_sigma_max(M, warm[n]) for n, M in mats]))
    add("SJE (all matrices)",
        timed(lambda: [energy.sje(M, grads[n], k_max=64) for n, M in mats]))
    capture = NTKCapture(model, {id(p): n for n, p in named if p.ndim >= 2}, n=16)

    def ntk_step():
        model.zero_grad(set_to_none=True)
        capture.arm()
        fwd_bwd()
        capture.compute()
        capture.disarm()

    def plain_step():
        model.zero_grad(set_to_none=True)
        fwd_bwd()

    add("NTK top eigenvalue, n=16 (capture + kernels, net of the plain forward/backward)",
        max(0.0, timed(ntk_step) - timed(plain_step)))
    scalars = {f"m{i}/layer{j}": 1.0 for i in range(9) for j in range(len(named))}
    with tempfile.TemporaryDirectory() as d, EventWriter(d) as w:
        add(f"writing one event ({len(scalars)} scalars) + flush", timed(lambda: w.write(0, scalars)))
    return (f"Each metric over all tensors of the model above ({setup.device}), best of 3, divided by the mean "
            f"bare training step ({step_ms:.1f} ms).\n\n"
            + md_table(["metric", "time", "training-step equivalents"], rows))


def power_vs_svd(sizes: list[int]) -> str:
    cfg = MonitorConfig()
    kw = dict(max_iters=cfg.power_iters, tol=cfg.power_tol)  # the hook's defaults
    rows = []
    for n in sizes:
        torch.manual_seed(n)
        U, _ = torch.linalg.qr(torch.randn(n, n))
        V, _ = torch.linalg.qr(torch.randn(n, n))
        s = 1.0 / torch.arange(1, n + 1).float() ** 0.5  # slowly decaying spectrum
        spectra = {"1/sqrt(i)": (U * s) @ V.T,
                   "Gaussian init (MP)": torch.randn(n, n) / n ** 0.5}  # sigma2/sigma1 ~ 0.98+
        for label, M in spectra.items():
            t_svd = best_time(lambda: torch.linalg.svdvals(M), repeat=1)
            cold = spectral.power_sigma_max(M, **kw)
            t_cold = best_time(lambda: spectral.power_sigma_max(M, **kw))
            M2 = M + 1e-3 * torch.randn(n, n) / n ** 0.5  # one training step later
            ref = torch.linalg.svdvals(M2.double())
            sr_ref = (ref.pow(2).sum() / ref[0] ** 2).item()
            warm = spectral.power_sigma_max(M2, cold.v, **kw)
            t_warm = best_time(lambda: spectral.power_sigma_max(M2, cold.v, **kw))
            sr = spectral.stable_rank(M2, warm.sigma)
            rows.append([f"{n}x{n}", label, f"{1000 * t_svd:.1f}",
                         f"{1000 * t_cold:.2f} ({cold.iters} it)",
                         f"{1000 * t_warm:.2f} ({warm.iters} it)", f"{t_svd / t_warm:.0f}x",
                         f"{abs(warm.sigma - ref[0].item()) / ref[0].item():.1e}",
                         f"{abs(sr - sr_ref) / sr_ref:.1e}"])
    return ("Square matrices with spectrum 1/sqrt(i) and Gaussian random init "
            "(Marchenko-Pastur, nearly flat top); Lanczos with the hook's defaults "
            f"(power_tol {cfg.power_tol:g}, power_iters {cfg.power_iters}). Warm start: from "
            "the previous step's vector after a small perturbation; errors of the warm "
            "estimate against float64 svdvals.\n\n"
            + md_table(["matrix", "spectrum", "full svdvals ms", "Lanczos cold ms",
                        "Lanczos warm ms", "svd / warm", "sigma rel. error", "SR rel. error"], rows))


def write_throughput(steps: int, tags: int) -> str:
    from torch.utils.tensorboard import SummaryWriter

    names = [f"metric{i % 9}/layer{i}" for i in range(tags)]
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        start = time.perf_counter()
        with EventWriter(d1) as w:
            for step in range(steps):
                w.write(step, {t: float(step) for t in names}, flush=False)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        sw = SummaryWriter(d2)
        for step in range(steps):
            for t in names:
                sw.add_scalar(t, float(step), step)
        sw.close()
        theirs = time.perf_counter() - start
        size1 = sum(os.path.getsize(os.path.join(d1, f)) for f in os.listdir(d1))
        size2 = sum(os.path.getsize(os.path.join(d2, f)) for f in os.listdir(d2))
    n = steps * tags
    return (f"{steps} steps x {tags} scalars.\n\n" + md_table(
        ["writer", "scalars / s", "file size"],
        [["EventWriter (one event per step)", f"{n / ours:,.0f}", f"{size1 / 1e6:.2f} MB"],
         ["SummaryWriter.add_scalar", f"{n / theirs:,.0f}", f"{size2 / 1e6:.2f} MB"],
         ["speed-up", f"**{theirs / ours:.1f}x**", f"{size2 / size1:.1f}x smaller"]]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU section (needs CUDA); writes results/overhead_gpu.md by default")
    parser.add_argument("--out", default=None)
    parser.add_argument("--alerts-only", action="store_true",
                        help="only the alerts section; writes results/overhead_alerts.md by default")
    args = parser.parse_args()
    reps = 2 if args.quick else 16
    sections = []
    if args.gpu_only and not torch.cuda.is_available():
        parser.error("--gpu-only needs CUDA, and torch.cuda.is_available() is False")
    if args.alerts_only:
        out = args.out or RESULTS.replace("overhead.md", "overhead_alerts.md")
        write_results(out, "Overhead of alerts and the flight recorder", alerts_overhead(
            args.every, 3 if args.quick else 12, args.every))
        return
    if not args.gpu_only:
        text, step_ms = overhead(args.every, reps, args.every)
        sections.append("## Monitored vs bare training\n\n" + text)
        sections.append("## One logging step, per metric\n\n" + per_metric_cost(step_ms))
        sizes = [256, 512] if args.quick else [256, 1024, 2048, 4096]
        sections.append("## Lanczos vs full SVD\n\n" + power_vs_svd(sizes))
        sections.append("## Event-write throughput\n\n" + write_throughput(
            20 if args.quick else 200, 1000))
        sections.append("## Alerts and the flight recorder\n\n" + alerts_overhead(
            args.every, 3 if args.quick else 12, args.every))
    if torch.cuda.is_available():
        gpu = GPT2_SMALL
        if args.quick:
            gpu = dataclasses.replace(gpu, cfg=dataclasses.replace(gpu.cfg, n_layer=2, block_size=256))
        text, step_ms = overhead(args.every, 4 if args.quick else 8, args.every, gpu)
        sections.append(f"## GPU: monitored vs bare training ({torch.cuda.get_device_name(0)})\n\n" + text)
        sections.append("## GPU: one logging step, per metric\n\n" + per_metric_cost(step_ms, gpu))
    else:
        sections.append("## GPU\n\nNo GPU on this machine: the GPU table has not been measured here "
                        "(`--gpu-only` runs it on a CUDA machine).")
    out = args.out or (RESULTS.replace("overhead.md", "overhead_gpu.md") if args.gpu_only else RESULTS)
    write_results(out, "Monitor overhead benchmark", "\n".join(sections))


if __name__ == "__main__":
    main()
