"""A testbed of training runs that really destabilise, labelled, reproducible by seed.

    python benchmarks/spike_testbed.py                     # all mechanisms and controls, 3 seeds
    python benchmarks/spike_testbed.py --quick             # 1 seed, short runs (a smoke test)
    python benchmarks/spike_testbed.py --mechanisms lr_jump control --seeds 0 1

Each run trains the small pre-LN GPT of ``benchmarks/spike_model.py`` on the demo's data
(the Python standard library's source, bytes) with AdamW, watched by the real monitor at
``every=1`` (``monitor_config``: SJE and NTK every 4th step). The literature's signals that the
monitor does not log are added through ``Monitor.log`` under ``lit/``: the largest attention
logit per block, the RMS of the output log-partition ``log Z``, and the RMS of Adam's update
``m_hat / (sqrt(v_hat) + eps)`` per matrix. Labels are made from the loss read back from
the event files (``label_events``, rule below). Writes ``<out>/<run>/`` event files,
``<out>/labels.json``, ``benchmarks/results/spike_testbed.md`` and sample plots.

Mechanisms (``MECHANISMS``; each run names its own):

- ``high_lr``: LR 0.3 from step 0, no warm-up, no QK-norm, no z-loss (Wortsman et al. 2023;
  at LR 1.0 the loss goes to 100 nats within 10 steps and never trains: divergence, no spikes);
- ``lr_jump``: the safe run, with the LR multiplied by 16 for 5 steps at each injection step;
- ``weight_scale``: one attention ``qkv`` matrix multiplied by 100 at each injection step
  (x30 gave no spike in a pilot: pre-LN absorbs it);
- ``bit_flip``: one entry of one matrix multiplied by 2^16, as a flipped exponent bit does
  (flipping the top exponent bit of a small weight gives x2^128 = inf: a crash, not a spike);
- ``bad_batch``: 4 consecutive batches of a single repeated byte at each injection step;
- ``adam_eps``: Adam with beta2 = 0.999 and eps = 1e-12 at LR 5e-2, no warm-up (Molybog et
  al. 2023: a tiny eps and slow second moment make updates spike);
- controls at safe settings: ``control`` (the injected mechanisms' base run: LR 3e-3 with a
  30-step warm-up) and ``control_fast`` (LR 5e-2, beta2 0.95, eps 1e-8, no warm-up: what
  ``adam_eps`` and ``high_lr`` become at safe settings).

Labelling rule (``label_events``): with ``r_t`` the median training loss of the last 50
steps not inside an event, an event starts at the first step ``t >= 20`` whose loss is
non-finite or above ``r_t + 0.5`` nat; it lasts while the loss stays above ``r_t + 0.25``
(``r_t`` frozen at onset) and ends after 10 consecutive steps below. It is a **spike** when
it ends within 100 steps of its onset, a **collapse** when it does not (or the loss became
non-finite). A slow drift (loss rising by less than 0.5 nat over the median of 50 steps)
is no event.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import monitor  # noqa: E402
from benchmarks.common import md_table, write_results  # noqa: E402
from benchmarks.spike_model import SpikeGPT, SpikeGPTConfig  # noqa: E402
from demos.data import encode, get_batch, stdlib_text  # noqa: E402
from monitor.config import MonitorConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "spike_testbed.md")

# labelling rule (module docstring)
REF_WINDOW, MIN_STEP, JUMP, HOLD, QUIET, RECOVER = 50, 20, 0.5, 0.25, 10, 100


@dataclass(frozen=True)
class RunSpec:
    """One labelled run. ``inject_at``: steps where the mechanism acts (empty: natural)."""

    mechanism: str
    seed: int
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 30
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    qk_norm: bool = False
    z_loss: float = 0.0
    inject_at: tuple[int, ...] = ()
    factor: float = 1.0  # lr_jump: LR factor; weight_scale / bit_flip: weight factor
    batch_size: int = 16

    @property
    def name(self) -> str:
        return f"{self.mechanism}-s{self.seed}"


def _inject_steps(seed: int, steps: int) -> tuple[int, ...]:
    """Two injection steps, jittered by seed, the second followed by >= 60 steps."""
    jitter = int(np.random.default_rng(seed).integers(0, 10))
    return (60 + jitter, 130 + jitter) if steps >= 200 else (steps // 3 + jitter // 4,)


def make_spec(mechanism: str, seed: int, steps: int = 200) -> RunSpec:
    base = RunSpec(mechanism, seed, steps)
    inject = _inject_steps(seed, steps)
    specs = {
        "high_lr": replace(base, lr=0.3, warmup=0),
        "lr_jump": replace(base, inject_at=inject, factor=16.0),
        "weight_scale": replace(base, inject_at=inject, factor=100.0),
        "bit_flip": replace(base, inject_at=inject, factor=2.0 ** 16),
        "bad_batch": replace(base, inject_at=inject),
        "adam_eps": replace(base, lr=5e-2, warmup=0, beta2=0.999, eps=1e-12),
        "control": base,
        "control_fast": replace(base, lr=5e-2, warmup=0),
    }
    if mechanism not in specs:
        raise ValueError(f"unknown mechanism {mechanism!r}; choose from {sorted(specs)}")
    return specs[mechanism]


MECHANISMS = ("high_lr", "lr_jump", "weight_scale", "bit_flip", "bad_batch", "adam_eps")
CONTROLS = ("control", "control_fast")


# ------------------------------------------------------------------------------ training
def lr_at(spec: RunSpec, t: int) -> float:
    lr = spec.lr * (min(1.0, (t + 1) / spec.warmup) if spec.warmup else 1.0)
    if spec.mechanism == "lr_jump" and any(s <= t < s + 5 for s in spec.inject_at):
        lr *= spec.factor
    return lr


def inject_weights(spec: RunSpec, model: SpikeGPT, t: int, rng: np.random.Generator) -> None:
    """Corrupt weights in place at an injection step (``weight_scale``, ``bit_flip``)."""
    if t not in spec.inject_at:
        return
    n = model.cfg.n_layer
    with torch.no_grad():
        if spec.mechanism == "weight_scale":
            model.blocks[int(rng.integers(n))].attn.qkv.weight.mul_(spec.factor)
        elif spec.mechanism == "bit_flip":
            block = model.blocks[int(rng.integers(n))]
            w = (block.fc.weight, block.attn.qkv.weight)[int(rng.integers(2))].view(-1)
            w[int(rng.integers(w.numel()))] *= spec.factor


def batch_at(spec: RunSpec, t: int, data: torch.Tensor, gen: torch.Generator, block: int):
    x, y = get_batch(data, spec.batch_size, block, gen)  # (B, T), (B, T): drawn every step
    if spec.mechanism == "bad_batch" and any(s <= t < s + 4 for s in spec.inject_at):
        token = int(data[(t * 7919) % len(data)])  # one repeated byte
        x, y = torch.full_like(x, token), torch.full_like(y, token)
    return x, y


def adam_update_rms(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, float]:
    """RMS of Adam's normalised update ``m_hat / (sqrt(v_hat) + eps)`` per matrix."""
    out = {}
    for group in opt.param_groups:
        b1, b2 = group["betas"]
        for p in group["params"]:
            state = opt.state.get(p)
            if p.ndim < 2 or not state or id(p) not in names:
                continue
            step = float(state["step"])
            m = state["exp_avg"] / (1 - b1 ** step)
            v = state["exp_avg_sq"] / (1 - b2 ** step)
            u = m / (v.sqrt() + group["eps"])
            out[f"lit/adam_update_rms/{names[id(p)]}"] = float(u.pow(2).mean().sqrt())
    return out


def monitor_config() -> MonitorConfig:
    """Every step: the cheap metrics and sigma_max / stable rank; SJE and the NTK every 4th
    step (at every step they would triple the testbed's CPU time on a shared 2-core
    machine). Weights only (no biases or LayerNorm shifts)."""
    return MonitorConfig(every=1, sje_every=4, ntk_every=4, layers=r"weight$",
                         warn_overhead=0.0)


def train_run(spec: RunSpec, logdir: str, data: torch.Tensor) -> float:
    """Train one run into ``logdir``; returns its wall time in seconds."""
    torch.manual_seed(spec.seed)
    cfg = SpikeGPTConfig(qk_norm=spec.qk_norm, z_loss=spec.z_loss)
    model = SpikeGPT(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, spec.beta2), eps=spec.eps)
    names = {id(p): n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed + 1000)
    start = time.perf_counter()
    config = monitor_config()
    with monitor.watch(model, opt, logdir, config=config) as mon:
        for t in range(spec.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(spec, t)
            inject_weights(spec, model, t, rng)
            x, y = batch_at(spec, t, data, gen, cfg.block_size)
            ce, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            attn = {f"lit/attn_logit_max/{k}": v for k, v in model.attention_logits().items()}
            mon.log(loss=ce, **attn, **{"lit/logz_rms": model.logz_rms},
                    **adam_update_rms(opt, names))
            if not math.isfinite(ce.item()):
                break  # the run is dead: its last logged loss is the non-finite one
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ reading
def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of a run as ``(steps, values)``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def cached_scalars(logdir: str) -> dict:
    """``read_scalars`` of a finished run, cached next to its event files (a re-run of the
    scoring then takes seconds instead of re-reading every event)."""
    path = os.path.join(logdir, "scalars.pkl")
    if os.path.exists(path):
        with open(path, "rb") as fh:
            return pickle.load(fh)
    scalars = read_scalars(logdir)
    with open(path, "wb") as fh:
        pickle.dump(scalars, fh)
    return scalars


def dense(series: tuple[np.ndarray, np.ndarray], n: int) -> np.ndarray:
    """A ``(steps, values)`` series as an array over steps 0..n-1 (NaN where missing)."""
    out = np.full(n, np.nan)
    steps, values = series
    keep = steps < n
    out[steps[keep]] = values[keep]
    return out


# ------------------------------------------------------------------------------ labels
@dataclass(frozen=True)
class Event:
    onset: int
    end: int  # last step of the event (the run's last step when it never ended)
    peak: float  # highest loss above the reference (inf: non-finite)
    reference: float
    kind: str  # "spike" or "collapse"


def label_events(loss: np.ndarray) -> list[Event]:
    """Events of one run's loss curve (steps 0..n-1) by the rule of the module docstring."""
    events, quiet_losses, t, n = [], [], 0, len(loss)
    while t < n:
        ref = float(np.median(quiet_losses[-REF_WINDOW:])) if quiet_losses else math.nan
        value = loss[t]
        if t >= MIN_STEP and (not math.isfinite(value) or value > ref + JUMP):
            event = _follow(loss, t, ref)
            events.append(event)
            t = event.end + 1
            continue
        quiet_losses.append(float(value))
        t += 1
    return events


def _follow(loss: np.ndarray, onset: int, ref: float) -> Event:
    """Track an event from ``onset`` until QUIET steps in a row sit below ref + HOLD."""
    below, t, n, peak = 0, onset, len(loss), -math.inf
    while t < n:
        value = loss[t]
        if not math.isfinite(value):
            return Event(onset, n - 1, math.inf, ref, "collapse")
        peak = max(peak, float(value) - ref)
        below = below + 1 if value <= ref + HOLD else 0
        if below >= QUIET:
            end = t - QUIET
            kind = "spike" if end - onset <= RECOVER else "collapse"
            return Event(onset, end, peak, ref, kind)
        t += 1
    return Event(onset, n - 1, peak, ref, "collapse")


# ------------------------------------------------------------------------------ plots
def plot_runs(runs: list[dict], out_png: str) -> None:
    """Loss, global gradient norm and update ratio of a sample of runs, events shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        loss, gnorm = np.array(run["loss"]), np.array(run["grad_norm"])
        steps = np.arange(len(loss))
        ax.plot(steps, loss, lw=0.8, color="k", label="loss")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.semilogy(steps, gnorm, lw=0.6, color="tab:blue", alpha=0.7, label="grad norm")
        for e in run["events"]:
            color = "tab:red" if e["kind"] == "spike" else "tab:purple"
            ax.axvspan(e["onset"], e["end"] + 1, color=color, alpha=0.25)
            ax.axvline(e["onset"], color=color, lw=0.8)
        for s in run["spec"]["inject_at"]:
            ax.axvline(s, color="tab:green", ls="--", lw=0.8)
        ax.set_title(f"{run['name']}: events {[(e['onset'], e['kind']) for e in run['events']]}",
                     fontsize=8)
    axes[-1, 0].set_xlabel("step (red: spike, purple: collapse, green dashes: injection)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def run_all(mechanisms: list[str], seeds: list[int], steps: int, out: str,
            label_only: bool = False) -> list[dict]:
    data = encode(stdlib_text())
    runs = []
    for seed in seeds:  # seed-major: an interrupted run still covers every mechanism
        for mechanism in mechanisms:
            spec = make_spec(mechanism, seed, steps)
            logdir = os.path.join(out, spec.name)
            if not _finished(logdir):
                if label_only:
                    continue
                shutil.rmtree(logdir, ignore_errors=True)
                seconds = train_run(spec, logdir, data)
                print(f"{spec.name}: {seconds:.0f} s", flush=True)
            scalars = cached_scalars(logdir)
            n = int(scalars["train/loss"][0].max()) + 1  # fewer than spec.steps if it died
            loss = dense(scalars["train/loss"], n)
            events = [asdict(e) for e in label_events(loss)]
            runs.append({"name": spec.name, "spec": asdict(spec), "events": events,
                         "loss": loss.tolist(),
                         "grad_norm": dense(scalars["train/grad_norm"], n).tolist()})
    return runs


def _sample(runs: list[dict]) -> list[dict]:
    """For the plots: per mechanism the run with most events, then two runs without any."""
    best: dict[str, dict] = {}
    for run in runs:
        m = run["spec"]["mechanism"]
        if m not in best or len(run["events"]) > len(best[m]["events"]):
            best[m] = run
    quiet = [r for r in runs if not r["events"] and r not in best.values()][:2]
    return list(best.values()) + quiet


def _finished(logdir: str) -> bool:
    try:
        with open(os.path.join(logdir, "run.json"), encoding="utf-8") as fh:
            return json.load(fh).get("status") == "finished"
    except (OSError, ValueError):
        return False


def summary(runs: list[dict]) -> str:
    rows, totals = [], {}
    for run in runs:
        kinds = [e["kind"] for e in run["events"]]
        mech = run["spec"]["mechanism"]
        tot = totals.setdefault(mech, [0, 0, 0])
        tot[0] += kinds.count("spike")
        tot[1] += kinds.count("collapse")
        tot[2] += len(run["loss"])
        rows.append([run["name"], len(run["loss"]), str(run["spec"]["inject_at"] or "-"),
                     ", ".join(f"{e['onset']} ({e['kind']}, +{e['peak']:.2f})"
                               for e in run["events"]) or "-"])
    table = md_table(["run", "steps", "injected at", "events: onset (kind, peak nats)"], rows)
    agg = md_table(["mechanism", "spikes", "collapses", "steps"],
                   [[m, *v] for m, v in totals.items()])
    return agg + "\n" + table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanisms", nargs="*", default=list(MECHANISMS + CONTROLS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join("runs", "spike_testbed"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 120 steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label-only", action="store_true",
                        help="train nothing: label the finished runs of --mechanisms x --seeds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 120
    runs = run_all(args.mechanisms, args.seeds, args.steps, args.out, args.label_only)
    with open(os.path.join(args.out, "labels.json"), "w", encoding="utf-8") as fh:
        json.dump(runs, fh)
    sample = _sample(runs)
    png = os.path.join(HERE, "results", "spike_testbed_sample.png")
    try:
        plot_runs(sample, png)
    except ImportError:
        print("no plots: matplotlib is missing (pip install -e '.[bench]')")
    body = ("Rule: see `benchmarks/spike_testbed.py` (spike: loss above the 50-step running "
            f"median + {JUMP} nat, back below median + {HOLD} within {RECOVER} steps; "
            "collapse: not back, or non-finite).\n\n" + summary(runs)
            + f"\n\nSample plots: `{os.path.relpath(png, HERE)}`.\n")
    if not args.quick:
        write_results(RESULTS, "Spike testbed: labelled runs", body)
    else:
        print(body)


if __name__ == "__main__":
    main()
