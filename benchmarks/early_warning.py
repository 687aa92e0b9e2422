"""Which logged signal warns of a loss spike first, by how much, at what false-alarm rate.

    python benchmarks/spike_testbed.py            # first: the labelled runs (runs/spike_testbed)
    python benchmarks/early_warning.py            # -> benchmarks/results/early_warning.md

Every signal becomes a score per step, higher = more alarming, computed causally (from
steps <= t only) from the event files the monitor wrote at ``every=1``:

- ``ratio``: ``x_t / m_{t-1}``, ``m`` the capped moving average of the PSS detector
  (``monitor.pss.detect.Detector``, alpha 0.1, tau 2.5); ``drop``: the same on ``1/x``;
  ``level``: ``x_t``. Per-layer signals: the maximum over layers.

Scoring, per signal:

- threshold: the lowest at which the control runs (safe settings, no events) have at most
  one step above it per 1,000 steps (steps >= 20);
- recall: the share of events with a step above the threshold in ``[onset - 20, onset]``;
  ``lead`` = onset - the first such step. Lead 0 is the spike's own step: the gradient
  norm of step t and the loss of step t are known together (before step t's update, which
  PSS or an ``on_alert`` callback can still stop); lead >= 1 is a warning. Signals measured
  after the update (update ratio, lr_effective, Adam RMS, parameter-based ones) at lead 0
  come just after the loss;
- AUROC (threshold-free): events' highest score over ``[onset - 20, onset - 1]`` (strictly
  before) against the highest over 20-step windows of the control runs, and against quiet
  20-step windows of the spiking runs themselves (no event within 20 steps after). A level
  that is high through a whole run at a dangerous setting (attention logits at LR 0.3)
  separates the run from the controls but warns of no particular spike: the second AUROC,
  and the alarm rate on the quiet steps of spiking runs, show that.

Spikes and collapses (labels of ``spike_testbed.label_events``) are scored apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import md_table, write_results  # noqa: E402
from benchmarks.spike_testbed import CONTROLS, cached_scalars, dense  # noqa: E402
from monitor.alerts import AlertRule, replay  # noqa: E402
from monitor.flight import AlertConfig  # noqa: E402
from monitor.pss.detect import Detector  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "early_warning.md")
WINDOW = 20  # steps before the onset in which an alarm counts as a warning
FA_PER_1000 = 1.0  # false-alarm budget on the control runs
MIN_STEP = 20  # no scoring before (the averages settle; labels start there too)


@dataclass(frozen=True)
class Signal:
    name: str
    prefix: str  # tag, or "<metric>/" for a per-layer signal (max over layers)
    kind: str  # ratio, drop, level
    doc: str
    scale_by: str | None = None  # divide by this global tag's value (ntk: probe size n)


SIGNALS = (
    Signal("grad_norm_ratio", "train/grad_norm", "ratio", "global gradient norm / its average (PSS)"),
    Signal("layer_grad_norm_ratio", "grad_norm/", "ratio", "per-layer gradient norm / its average"),
    Signal("sr_drop", "stable_rank/", "drop", "per-layer stable rank: average / value"),
    Signal("sigma_max_growth", "sigma_max/", "ratio", "per-layer sigma_max / its average"),
    Signal("sje_level", "sje/", "level", "per-layer SJE"),
    Signal("sje_change", "sje/", "ratio", "per-layer SJE / its average"),
    Signal("ntk_level", "ntk_eig/", "level", "per-layer NTK lambda_max / n", "ntk/probe_size"),
    Signal("ntk_change", "ntk_eig/", "ratio", "per-layer NTK lambda_max / its average"),
    Signal("update_ratio_ratio", "update_ratio/", "ratio", "per-layer update ratio / its average"),
    Signal("update_ratio_level", "update_ratio/", "level", "per-layer update ratio"),
    Signal("lr_effective_ratio", "lr_effective/", "ratio", "per-layer ||dW||/||G|| / its average"),
    Signal("attn_logit_level", "lit/attn_logit_max/", "level", "largest attention logit (lit.)"),
    Signal("attn_logit_growth", "lit/attn_logit_max/", "ratio", "largest attention logit / average"),
    Signal("logz_level", "lit/logz_rms", "level", "RMS of output log Z (lit.)"),
    Signal("logz_growth", "lit/logz_rms", "ratio", "RMS of output log Z / its average"),
    Signal("adam_rms_ratio", "lit/adam_update_rms/", "ratio", "per-matrix Adam update RMS / average"),
    Signal("adam_rms_level", "lit/adam_update_rms/", "level", "per-matrix Adam update RMS"),
)


# ------------------------------------------------------------------------------ scores
def series_score(x: np.ndarray, kind: str) -> np.ndarray:
    """Causal per-step score of one series (NaN where the series has no value)."""
    out = np.full(len(x), np.nan)
    if kind == "level":
        out[:] = np.where(np.isfinite(x) | np.isnan(x), x, np.inf)
        return out
    det = Detector(tau=2.5, alpha=0.1, warmup_steps=MIN_STEP)
    for t, v in enumerate(x):
        if np.isnan(v):
            continue
        v = 1.0 / v if kind == "drop" and v > 0 else (math.inf if kind == "drop" else v)
        out[t] = det.update(float(v), t)[1]
    return out


def signal_score(scalars: dict, signal: Signal, n: int) -> np.ndarray | None:
    tags = [t for t in scalars if (t == signal.prefix if not signal.prefix.endswith("/")
                                   else t.startswith(signal.prefix))]
    if not tags:
        return None
    scale = dense(scalars[signal.scale_by], n) if signal.scale_by in scalars else 1.0
    per_tag = [series_score(dense(scalars[t], n) / scale, signal.kind) for t in tags]
    stacked = np.vstack(per_tag)
    with np.errstate(all="ignore"):
        best = np.nanmax(np.where(np.isnan(stacked), -np.inf, stacked), axis=0)
    best[~np.isfinite(best) & (best < 0)] = np.nan
    return best


# ------------------------------------------------------------------------------ scoring
def threshold_for(control_scores: list[np.ndarray], budget: float = FA_PER_1000) -> tuple[float, float]:
    """Lowest threshold with at most ``budget`` steps above it per 1,000 control steps;
    returns ``(threshold, measured alarms per 1,000 steps)``."""
    values = np.concatenate([s[MIN_STEP:] for s in control_scores])
    values = np.where(np.isnan(values), -np.inf, values)
    n = len(values)
    allowed = int(math.floor(budget * n / 1000))
    top = np.sort(values)[::-1]
    threshold = float(top[allowed]) if allowed < n else -math.inf
    if not math.isfinite(threshold):
        threshold = float(np.nanmax(np.where(np.isfinite(top), top, np.nan)) if np.isfinite(top).any() else 0)
    alarms = int(np.sum(values > threshold))
    return threshold, 1000 * alarms / n


def lead_of(score: np.ndarray, onset: int, threshold: float) -> int | None:
    lo = max(MIN_STEP, onset - WINDOW)
    window = score[lo: onset + 1]
    hits = np.flatnonzero(np.where(np.isnan(window), False, window > threshold))
    return None if not len(hits) else onset - (lo + int(hits[0]))


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a pre-spike window > score of a control window), ties counted half."""
    pos_a = np.array([p if not np.isnan(p) else -np.inf for p in pos])
    neg_a = np.array([q if not np.isnan(q) else -np.inf for q in neg])
    if not len(pos_a) or not len(neg_a):
        return math.nan
    greater = (pos_a[:, None] > neg_a[None, :]).sum()
    ties = (pos_a[:, None] == neg_a[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos_a) * len(neg_a)))


def window_max(score: np.ndarray, lo: int, hi: int) -> float:
    w = score[max(lo, 0):hi]
    w = w[~np.isnan(w)]
    return float(w.max()) if len(w) else math.nan


# ------------------------------------------------------------------------------ main
def load(out: str) -> list[dict]:
    with open(os.path.join(out, "labels.json"), encoding="utf-8") as fh:
        runs = json.load(fh)
    for run in runs:
        run["scalars"] = cached_scalars(os.path.join(out, run["name"]))
        run["n"] = len(run["loss"])
    return runs


def evaluate(runs: list[dict]) -> tuple[list[dict], dict]:
    controls = [r for r in runs if r["spec"]["mechanism"] in CONTROLS]
    events = [(r, e) for r in runs if r["spec"]["mechanism"] not in CONTROLS for e in r["events"]]
    rows = []
    for signal in SIGNALS:
        scores = {r["name"]: signal_score(r["scalars"], signal, r["n"]) for r in runs}
        ctrl = [scores[r["name"]] for r in controls if scores[r["name"]] is not None]
        if not ctrl:
            continue
        threshold, fa = threshold_for(ctrl)
        neg = [window_max(s, lo, lo + WINDOW) for s in ctrl
               for lo in range(MIN_STEP, len(s) - WINDOW + 1, WINDOW)]
        quiet_neg, quiet_alarms, quiet_steps = [], 0, 0
        for run in runs:
            score = scores[run["name"]]
            if run["spec"]["mechanism"] in CONTROLS or score is None:
                continue
            mask = quiet_mask(run)
            quiet_steps += int(mask.sum())
            quiet_alarms += int(np.sum(np.where(np.isnan(score), False, score > threshold) & mask))
            for lo in range(MIN_STEP, len(score) - WINDOW + 1, WINDOW):
                if mask[lo:lo + WINDOW].all() and mask[lo + WINDOW:lo + 2 * WINDOW].all():
                    quiet_neg.append(window_max(score, lo, lo + WINDOW))
        per_event = []
        for run, event in events:
            score = scores[run["name"]]
            if score is None:
                per_event.append((run, event, None, math.nan))
                continue
            lead = lead_of(score, event["onset"], threshold)
            pre = window_max(score, event["onset"] - WINDOW, event["onset"])
            per_event.append((run, event, lead, pre))
        rows.append({"signal": signal, "threshold": threshold, "fa": fa, "events": per_event,
                     "neg": neg, "quiet_neg": quiet_neg,
                     "quiet_fa": 1000 * quiet_alarms / max(quiet_steps, 1)})
    return rows, {"control_steps": sum(max(0, r["n"] - MIN_STEP) for r in controls),
                  "controls": controls, "n_events": len(events)}


def quiet_mask(run: dict) -> np.ndarray:
    """Steps >= MIN_STEP of a spiking run outside ``[onset - WINDOW, end]`` of every event."""
    mask = np.zeros(run["n"], bool)
    mask[MIN_STEP:] = True
    for e in run["events"]:
        mask[max(0, e["onset"] - WINDOW): e["end"] + 1] = False
    return mask


def fmt_recall(per_event, kind: str, min_lead: int = 0) -> str:
    chosen = [lead for _, e, lead, _ in per_event if e["kind"] == kind]
    if not chosen:
        return "-"
    hit = [l for l in chosen if l is not None and l >= min_lead]
    return f"{len(hit)}/{len(chosen)}"


def median_lead(per_event, kind: str = "spike") -> str:
    leads = [l for _, e, l, _ in per_event if e["kind"] == kind and l is not None]
    return f"{statistics.median(leads):g}" if leads else "-"


def main_table(rows: list[dict]) -> str:
    table = []
    for row in rows:
        pe = row["events"]
        pos = [p for _, e, _, p in pe if e["kind"] == "spike"]
        table.append([row["signal"].name, row["signal"].doc, f"{row['threshold']:.4g}",
                      f"{row['fa']:.2f}", fmt_recall(pe, "spike"), fmt_recall(pe, "spike", 1),
                      median_lead(pe), f"{row['quiet_fa']:.1f}", f"{auroc(pos, row['neg']):.2f}",
                      f"{auroc(pos, row['quiet_neg']):.2f}", fmt_recall(pe, "collapse")])
    return md_table(["signal", "what", "threshold", "alarms / 1000 control steps",
                     "spikes caught (lead >= 0)", "spikes warned (lead >= 1)",
                     "median lead (steps)", "alarms / 1000 quiet steps of spiking runs",
                     "AUROC vs controls", "AUROC vs quiet windows", "collapses caught"], table)


def by_mechanism(rows: list[dict]) -> str:
    mechs = sorted({r["spec"]["mechanism"] for row in rows for r, _, _, _ in row["events"]})
    table = []
    for row in rows:
        cells = []
        for m in mechs:
            pe = [x for x in row["events"] if x[0]["spec"]["mechanism"] == m]
            cells.append(f"{fmt_recall(pe, 'spike')} ({median_lead(pe)})")
        table.append([row["signal"].name, *cells])
    return ("Spikes caught (lead >= 0) / spikes, and the median lead in steps, per mechanism.\n\n"
            + md_table(["signal", *mechs], table))


def versus_grad_norm(rows: list[dict]) -> str:
    base = {id(e): lead for _, e, lead, _ in rows[0]["events"]}
    table = []
    for row in rows[1:]:
        earlier = later = only = 0
        for _, e, lead, _ in row["events"]:
            if e["kind"] != "spike" or lead is None:
                continue
            b = base[id(e)]
            if b is None:
                only += 1
            elif lead > b:
                earlier += 1
            elif lead < b:
                later += 1
        table.append([row["signal"].name, earlier, only, later])
    return md_table(["signal", "spikes warned earlier than the gradient norm",
                     "spikes the gradient norm missed", "later"], table)


def defaults_check(runs: list[dict]) -> str:
    """The job's default rules, replayed with the real engine (``monitor.alerts.replay``)."""
    rules = AlertConfig().rules
    rows = []
    for rule in rules:
        fired = {}
        for run in runs:
            steps = _steps_values(run, rule)
            fired[run["name"]] = [a.step for a in replay(steps, [rule], AlertConfig().cooldown)]
        ctrl_steps = sum(r["n"] for r in runs if r["spec"]["mechanism"] in CONTROLS)
        fa = sum(len(fired[r["name"]]) for r in runs if r["spec"]["mechanism"] in CONTROLS)
        leads = []
        spikes = [(r, e) for r in runs if r["spec"]["mechanism"] not in CONTROLS
                  for e in r["events"] if e["kind"] == "spike"]
        for run, e in spikes:
            hits = [s for s in fired[run["name"]] if e["onset"] - WINDOW <= s <= e["onset"]]
            if hits:
                leads.append(e["onset"] - hits[0])
        rows.append([rule.name, f"{rule.signal} {rule.kind} > {rule.threshold:g}",
                     f"{len(leads)}/{len(spikes)}",
                     f"{statistics.median(leads):g}" if leads else "-",
                     f"{fa} in {ctrl_steps} ({1000 * fa / max(ctrl_steps, 1):.2f} / 1000)"])
    return md_table(["rule", "definition", "spikes caught", "median lead", "firings on controls"],
                    rows)


def _steps_values(run: dict, rule: AlertRule):
    tags = [t for t in run["scalars"] if t == rule.signal or t.startswith(rule.signal + "/")]
    cols = {t: dense(run["scalars"][t], run["n"]) for t in tags}
    for t in range(run["n"]):
        yield t, {tag: float(v[t]) for tag, v in cols.items() if not np.isnan(v[t])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "spike_testbed"),
                        help="the testbed's directory (labels.json and run directories)")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    runs = load(args.out)
    rows, info = evaluate(runs)
    n_spikes = sum(1 for r in runs if r["spec"]["mechanism"] not in CONTROLS
                   for e in r["events"] if e["kind"] == "spike")
    ctrl_events = sum(len(r["events"]) for r in info["controls"])
    body = (f"{n_spikes} spikes and {info['n_events'] - n_spikes} collapses in "
            f"{len(runs) - len(info['controls'])} runs; {info['control_steps']} control steps "
            f"({len(info['controls'])} runs, {ctrl_events} events on them). Method: module "
            "docstring of `benchmarks/early_warning.py`; labels: `benchmarks/spike_testbed.py`.\n\n"
            "## Per signal (spikes; collapses in the last column)\n\n" + main_table(rows)
            + "\n## Per mechanism\n\n" + by_mechanism(rows)
            + "\n## Against the gradient-norm spike alone\n\n" + versus_grad_norm(rows)
            + "\n## The job's default rules, replayed with `monitor.alerts.replay`\n\n"
            + defaults_check(runs))
    write_results(args.results, "Early warning of loss spikes, per signal", body)


if __name__ == "__main__":
    main()
