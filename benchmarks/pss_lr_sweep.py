"""Does PSS let the demo transformer train at a larger learning rate? Measured, with its cost.

    python benchmarks/pss_lr_sweep.py            # full run, writes benchmarks/results/pss.md
    python benchmarks/pss_lr_sweep.py --quick    # a smoke run (2 LRs, 1 seed, short runs)

The paper (SPEC 3) claims PSS allows a 5-10x larger learning rate without loss explosion
on BERT and GPT-2. Here, at a scale one CPU thread can run:

1. LR sweep. The demo GPT (``demos/model.py``) in a small configuration, AdamW, a geometric
   LR grid, seeds 0, 1, 2, six arms: no intervention, gradient clipping (norm 1.0), PSS
   (defaults), PSS with ``k_min=2``, PSS with ``reset_optimizer_state``, PSS with its
   detection armed when the LR warm-up ends (``warmup_steps=30``). Every arm runs
   under ``monitor.watch`` (monitoring alone for the first two), with the same data order
   and initialisation per seed. A run *diverges* when a loss is non-finite or its final
   loss (mean of the last 20 training losses) exceeds its initial loss (the step-0 loss).
2. Recovery: runs at a stable LR that are pushed into a blow-up mid-run (a rank-one
   "singularity" added to every block matrix; a learning-rate jump), with and without PSS.
3. Cost: one intervention in training-step equivalents; PSS-enabled training against
   monitoring alone, side by side in interleaved blocks.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monitor  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402
from demos.data import encode, get_batch, stdlib_text  # noqa: E402
from demos.model import GPT, GPTConfig  # noqa: E402
from monitor.pss.controller import PSSController  # noqa: E402
from monitor.schema import PSSConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pss.md")
SEEDS = (0, 1, 2)
LRS = tuple(2.0 ** k for k in range(-6, 2))  # 1/64 .. 2, x2 per step
FINAL_WINDOW = 20  # final loss = mean of the last this many training losses

#: arm name -> (gradient-clipping norm or 0, PSS settings or None)
ARMS: dict[str, tuple[float, PSSConfig | None]] = {
    "none": (0.0, None),
    "clip": (1.0, None),
    "pss": (0.0, PSSConfig()),
    "pss k_min=2": (0.0, PSSConfig(k_min=2)),
    "pss reset": (0.0, PSSConfig(reset_optimizer_state=True)),
    # detection armed when the LR warm-up ends (the default waits 100 steps)
    "pss warm-up 30": (0.0, PSSConfig(warmup_steps=30)),
}


@dataclass(frozen=True)
class Setup:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32  # context length
    batch_size: int = 16
    steps: int = 300
    warmup: int = 30  # linear LR warm-up steps, then constant
    weight_decay: float = 0.1


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    fired: list[int] = field(default_factory=list)  # steps PSS smoothed at
    seconds: float = 0.0

    @property
    def final(self) -> float:
        tail = self.losses[-FINAL_WINDOW:]
        return sum(tail) / len(tail) if tail else math.nan

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(v) for v in self.losses) or not self.final <= self.losses[0]


def make(setup: Setup, lr: float, seed: int):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=setup.block_size, n_layer=setup.n_layer,
                          n_head=setup.n_head, n_embd=setup.n_embd))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": setup.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    return model, opt


def train(setup: Setup, data: torch.Tensor, lr: float, seed: int, arm: str,
          lr_factor: Callable[[int], float] | None = None,
          event: Callable[[int, torch.nn.Module], None] | None = None) -> Run:
    """One monitored run; ``event(step, model)`` runs before the forward of every step."""
    clip, pss = ARMS[arm]
    model, opt = make(setup, lr, seed)
    warm = lambda t: min(1.0, (t + 1) / setup.warmup)  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor or warm)
    gen = torch.Generator().manual_seed(seed)
    run = Run()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        mon = monitor.watch(model, opt, logdir, every=10 ** 6, preset="cheap", pss=pss)
        for step in range(setup.steps):
            if event is not None:
                event(step, model)
            x, y = get_batch(data, setup.batch_size, setup.block_size, gen)  # (B, T), (B, T)
            _, loss = model(x, y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            run.losses.append(loss.item())
            if not math.isfinite(run.losses[-1]):
                break
        mon.close()
        run.fired = list(mon.pss.interventions) if mon.pss is not None else []
    run.seconds = time.perf_counter() - start
    return run


# ---------------------------------------------------------------------------------------
# 1. LR sweep
# ---------------------------------------------------------------------------------------


def sweep(setup: Setup, data: torch.Tensor, lrs, seeds, arms) -> dict:
    runs = {}
    for lr in lrs:
        for arm in arms:
            for seed in seeds:
                run = train(setup, data, lr, seed, arm)
                runs[arm, lr, seed] = run
                print(f"lr {lr:<8.4g} {arm:12s} seed {seed}: final {run.final:8.3f} "
                      f"{'DIVERGED' if run.diverged else 'ok':8s} fired {len(run.fired):3d} "
                      f"({run.seconds:.1f} s)", flush=True)
    return runs


def mean_sd(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.mean(finite):.3f} ± {sd:.3f}" + ("" if len(finite) == len(values) else " (+nan)")


def largest_stable(runs: dict, arm: str, lrs, seeds) -> float | None:
    ok = [lr for lr in lrs if not any(runs[arm, lr, s].diverged for s in seeds)]
    return max(ok) if ok else None


def sweep_report(runs: dict, setup: Setup, lrs, seeds, arms) -> tuple[str, dict]:
    n = len(seeds)
    rows = []
    for lr in lrs:
        row = [f"{lr:.4g}"]
        for arm in arms:
            group = [runs[arm, lr, s] for s in seeds]
            bad = sum(r.diverged for r in group)
            row.append(mean_sd([r.final for r in group]) + (f" **div {bad}/{n}**" if bad else ""))
        rows.append(row)
    final_table = md_table(["LR"] + list(arms), rows)
    peak_rows = []
    for lr in lrs:
        row = [f"{lr:.4g}"]
        for arm in arms:
            group = [runs[arm, lr, s].losses for s in seeds]
            peaks = [max(losses[setup.warmup:] or losses) for losses in group]
            at = [losses.index(p) for losses, p in zip(group, peaks)]
            row.append(f"{statistics.median(peaks):.3g} (step {int(statistics.median(at))})")
        peak_rows.append(row)
    peak_table = md_table(["LR"] + list(arms), peak_rows)
    pss_arms = [a for a in arms if ARMS[a][1] is not None]
    fired_rows = []
    for lr in lrs:
        row = [f"{lr:.4g}"]
        for arm in pss_arms:
            group = [runs[arm, lr, s] for s in seeds]
            fired = sum(len(r.fired) for r in group)
            steps = sum(len(r.losses) for r in group)
            row.append(f"{100 * fired / steps:.2f}% ({fired})")
        fired_rows.append(row)
    fired_table = md_table(["LR"] + pss_arms, fired_rows)
    base = largest_stable(runs, "none", lrs, seeds) if "none" in arms else None
    summary_rows, headline = [], {}
    for arm in arms:
        best = largest_stable(runs, arm, lrs, seeds)
        headline[arm] = best
        gain = f"{best / base:.3g}x" if best and base else "-"
        at_best = mean_sd([runs[arm, best, s].final for s in seeds]) if best else "-"
        summary_rows.append([arm, f"{best:.4g}" if best else "none of the grid", gain, at_best])
    summary = md_table(["arm", f"largest LR with all {n} seeds not diverged", "vs none",
                        "final loss there"], summary_rows)
    text = (f"Model: demo GPT, {setup.n_layer} layers, d={setup.n_embd}, {setup.n_head} heads, "
            f"context {setup.block_size}, batch {setup.batch_size}, "
            f"{sum(p.numel() for p in make(setup, 1e-3, 0)[0].parameters()):,} parameters, "
            f"byte-level text of the Python standard library. AdamW (weight decay "
            f"{setup.weight_decay} on matrices), linear LR warm-up over {setup.warmup} steps, "
            f"then constant; {setup.steps} steps. Seeds {', '.join(map(str, seeds))} (initialisation "
            f"and batch order, shared by all arms). LR grid: {', '.join(f'{lr:.4g}' for lr in lrs)}.\n\n"
            f"Arms: `none` (monitoring only), `clip` (`clip_grad_norm_(…, 1.0)`), `pss` "
            f"(`PSSConfig()`: tau 2.5, alpha 0.1, warm-up 100 steps, conv smoothing of every "
            f"non-embedding matrix), `pss k_min=2`, `pss reset` (`reset_optimizer_state=True`), "
            f"`pss warm-up 30` (`warmup_steps=30`: detection armed when the LR warm-up ends).\n\n"
            f"**Divergence**: a non-finite loss, or final loss (mean of the last {FINAL_WINDOW} "
            f"training losses) greater than the initial loss (the step-0 training loss, "
            f"about ln 128 = 4.85).\n\n"
            "### Largest stable learning rate\n\n" + summary +
            "\n### Final loss per learning rate (mean ± sd over seeds; **div n/3**: diverged seeds)\n\n"
            + final_table +
            "\n### Peak training loss after the LR warm-up (median over seeds; median step of the peak)\n\n"
            "A transient blow-up that the run later recovers from shows here, not in the final loss.\n\n"
            + peak_table +
            "\n### Share of steps at which PSS smoothed (all seeds; interventions in brackets)\n\n"
            + fired_table)
    return text, headline


# ---------------------------------------------------------------------------------------
# 2. Recovery
# ---------------------------------------------------------------------------------------


def singularity(at: int, growth: float) -> Callable[[int, torch.nn.Module], None]:
    """At step ``at``, add a rank-one term to every block matrix so that sigma_1 grows
    about ``growth``-fold: a sudden singularity (stable rank -> 1)."""

    def event(step: int, model: torch.nn.Module) -> None:
        if step != at:
            return
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("blocks.") or p.ndim != 2:
                    continue
                u = torch.randn(p.shape[0], 1, generator=g)
                v = torch.randn(1, p.shape[1], generator=g)
                sigma = torch.linalg.matrix_norm(p, ord=2)
                p.add_((growth - 1) * sigma * (u @ v) / (u.norm() * v.norm()))

    return event


def checkpoints(at: int, steps: int) -> list[int]:
    return [s for s in (at - 1, at, at + 1, at + 2, at + 5, at + 10) if 0 <= s < steps]


def windows(at: int, steps: int) -> list[tuple[int, int]]:
    edges = [at + 1, at + 6, at + 21, at + 51, steps]
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < b <= steps]


def recovery_table(runs: dict[str, list[Run]], control: list[Run], at: int, steps: int) -> str:
    """Loss at a few steps (median over seeds) and the mean excess over the undisturbed run."""
    cols, spans = checkpoints(at, steps), windows(at, steps)
    rows = []
    for arm, group in [("undisturbed (none)", control), *runs.items()]:
        cells = []
        for c in cols:
            vals = [r.losses[c] if c < len(r.losses) else math.nan for r in group]
            cells.append(f"{statistics.median(vals):.3g}")
        for a, b in spans:
            excess = [statistics.mean(r.losses[a:b]) - statistics.mean(ref.losses[a:b])
                      if len(r.losses) >= b else math.inf for r, ref in zip(group, control)]
            cells.append(f"{statistics.mean(excess):+.3f}")
        fired = [len([s for s in r.fired if s >= at]) for r in group]
        rows.append([arm] + cells + [", ".join(map(str, fired))])
    return md_table(["arm"] + [f"loss at {c}" for c in cols]
                    + [f"excess {a}-{b - 1}" for a, b in spans]
                    + ["interventions from the event on (per seed)"], rows)


def recovery(setup: Setup, data: torch.Tensor, seeds, arms, at: int, lr: float,
             growth: float, jump: float, jump_len: int) -> str:
    out = [f"LR {lr:g}, at which every arm trains in the sweep. Each disturbed run is compared "
           "with the undisturbed `none` run of the same seed (same initialisation and batches): "
           "*excess a-b* is the mean over seeds of (mean training loss over steps a..b) minus "
           "the undisturbed run's; *loss at* columns are medians over seeds "
           f"{', '.join(map(str, seeds))}.\n"]
    control = [train(setup, data, lr, s, "none") for s in seeds]
    runs = {arm: [train(setup, data, lr, s, arm, event=singularity(at, growth)) for s in seeds]
            for arm in arms}
    out.append(f"### A sudden singularity\n\nBefore step {at}, every block matrix gets a "
               f"rank-one term that multiplies its sigma_1 by about {growth:g} (its stable rank "
               "falls to about 1); the loss at that step jumps.\n\n"
               + recovery_table(runs, control, at, setup.steps))

    def jumped(t: int) -> float:
        warm = min(1.0, (t + 1) / setup.warmup)
        return warm * (jump if at <= t < at + jump_len else 1.0)

    runs = {arm: [train(setup, data, lr, s, arm, lr_factor=jumped) for s in seeds] for arm in arms}
    out.append(f"### A learning-rate jump\n\nThe LR is multiplied by {jump:g} for steps {at} to "
               f"{at + jump_len - 1}, then set back.\n\n"
               + recovery_table(runs, control, at, setup.steps))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# 3. Cost
# ---------------------------------------------------------------------------------------


def intervention_cost(setup: Setup, data: torch.Tensor, reps: int) -> str:
    """Median plain step against median intervention (all selected matrices smoothed)."""
    rows = []
    for label, s in (("sweep model", setup),
                     ("demo default (4 layers, d=128, context 128)",
                      Setup(n_layer=4, n_embd=128, block_size=128))):
        model, opt = make(s, 1e-3, 0)
        gen = torch.Generator().manual_seed(0)
        batches = [get_batch(data, s.batch_size, s.block_size, gen) for _ in range(reps + 2)]
        victim, victim_opt = make(s, 1e-3, 0)
        with tempfile.TemporaryDirectory() as logdir:
            pss = PSSController(PSSConfig(), victim, victim_opt, logdir)
            step_times, smooth_times = [], []
            for i, (x, y) in enumerate(batches):  # interleaved; the first two warm up
                start = time.perf_counter()
                _, loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                mid = time.perf_counter()
                result = pss.before_step(i, math.inf)  # a non-finite norm always triggers
                end = time.perf_counter()
                assert result.scalars["pss/intervention"] == 1.0
                if i >= 2:
                    step_times.append(mid - start)
                    smooth_times.append(end - mid)
            ks = [v for k, v in result.scalars.items() if k.startswith("pss_k/")]
        step, smooth = statistics.median(step_times), statistics.median(smooth_times)
        rows.append([label, f"{len(ks)} (mean k {statistics.mean(ks):.0f})", f"{1000 * step:.1f} ms", f"{1000 * smooth:.1f} ms",
                     f"**{smooth / step:.2f}**", f"{(step + smooth) / step:.2f}x"])
    return (f"Median of {reps} interleaved repetitions. A plain step is forward + backward + "
            "AdamW step. An intervention is `PSSController.before_step` with a non-finite "
            "gradient norm, which always triggers: the real code path, smoothing every "
            "selected matrix (conv, k = max(1, floor(SR)), randomized/exact top-k SVD) of a "
            "freshly initialised model, whose stable ranks (so k) are higher than a trained "
            "model's: an upper end of the cost.\n\n"
            + md_table(["model", "matrices smoothed", "plain step", "one intervention",
                        "intervention in step equivalents", "step with an intervention / plain step"],
                       rows)
            + "\nThe paper reports up to 2.4x for a step with an intervention.\n")


def overhead(setup: Setup, data: torch.Tensor, lr: float, block: int, reps: int) -> list[str]:
    """PSS-enabled against monitoring-only training, interleaved blocks, same batches."""
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(data, setup.batch_size, setup.block_size, gen) for _ in range(block * reps)]
    arms = {}
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        for name, pss, logdir in (("monitoring only", None, d1), ("monitoring + PSS", PSSConfig(), d2)):
            model, opt = make(setup, lr, 0)
            mon = monitor.watch(model, opt, logdir, every=50, preset="default", pss=pss)
            arms[name] = (model, opt, mon, [])
        for rep in range(reps):
            order = list(arms) if rep % 2 == 0 else list(arms)[::-1]
            for name in order:
                model, opt, mon, times = arms[name]
                start = time.perf_counter()
                for x, y in batches[rep * block:(rep + 1) * block]:
                    _, loss = model(x, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    mon.log(loss=loss)
                times.append(time.perf_counter() - start)
        for model, opt, mon, _ in arms.values():
            mon.close()
    base, pss_times = arms["monitoring only"][3], arms["monitoring + PSS"][3]
    fired = len(arms["monitoring + PSS"][2].pss.interventions)
    ratios = [p / b for p, b in zip(pss_times, base)]
    return [f"{lr:g}", f"{1000 * sum(base) / (block * reps):.1f} ms",
            f"{1000 * sum(pss_times) / (block * reps):.1f} ms", f"**{sum(pss_times) / sum(base):.3f}**",
            f"{min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f}",
            f"{fired} of {block * reps}"]


# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 LRs, 1 seed, 60 steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    data = encode(stdlib_text())
    if args.quick:
        setup, lrs, seeds = Setup(steps=60, warmup=10), (2.0 ** -6, 1.0), (0,)
        at, cost_reps, block, blocks = 40, 3, 10, 2
    else:
        setup, lrs, seeds = Setup(), LRS, SEEDS
        at, cost_reps, block, blocks = 150, 15, 50, 10
    sections = []
    text, headline = sweep_report(sweep(setup, data, lrs, seeds, ARMS), setup, lrs, seeds, list(ARMS))
    sections.append("## 1. Learning-rate sweep\n\n" + text)
    stable = lrs[0] if args.quick else 2.0 ** -5  # a learning rate every arm trains at
    sections.append("## 2. Recovery\n\n" + recovery(
        setup, data, seeds, list(ARMS), at=at, lr=stable, growth=100.0, jump=16.0, jump_len=10))
    sections.append("## 3. Cost\n\n### One intervention\n\n" + intervention_cost(setup, data, cost_reps))
    rows = [overhead(setup, data, lr, block, blocks) for lr in (stable, 0.5)]
    sections.append(
        "### PSS-enabled training against monitoring alone\n\n"
        f"Sweep model, two monitored copies with the same initialisation and batches, "
        f"`monitor.watch(every=50, preset='default')`, one with `pss=PSSConfig()`; {blocks} "
        f"interleaved blocks of {block} steps (alternating which goes first).\n\n"
        + md_table(["LR", "monitoring only, per step", "monitoring + PSS, per step",
                    "PSS / monitoring only (sum over blocks)", "per-block ratio min / median / max",
                    "interventions"], rows))
    minutes = (time.perf_counter() - began) / 60
    sections.append(f"Total runtime of this run: {minutes:.1f} min.")
    write_results(args.out, "PSS: learning-rate sweep, recovery and cost", "\n".join(sections))
    print("largest stable LR per arm:", headline)


if __name__ == "__main__":
    main()
