"""PSS on natural surge-driven spikes: the stage ``pss_lr_sweep.py --natural`` runs.

    python benchmarks/pss_lr_sweep.py --natural --natural-pilot   # LR 0.3, 0.5, 1.0, seed 0
    python benchmarks/pss_lr_sweep.py --natural --natural-lr 0.5 --seeds 0 1 2 3

The post-LN testbed of the main sweep fails by a rank collapse without a gradient surge,
which no gradient-triggered method sees. Far above its optimum the pre-LN model spikes
naturally, with gradient-norm surges (``/work/shared/ANCHORS.md``, "Measured here";
``spike_testbed`` mechanism ``high_lr``): this stage trains it there (``NATURAL``: pre-LN,
context 64, constant LR, no warm-up) under the arms of ``pss_testbed`` and counts the
spikes and collapses by ``spike_testbed.label_events``.

Per run: labelled spikes and collapses; explosion by issue 11's rule
(``pss_testbed.explosion_step``); final validation loss; the largest excursion
``max_t (loss_t - min_{s<t} loss_s)`` over ``t >= 20`` (``max_excursion``); for PSS: steps
fired, the lead of the first trigger near each spike's onset (``trigger_leads``) and
||dW||/||W||. Each arm against ``none`` paired by seed: spikes by Wilcoxon's signed-rank
test (and spikes + collapses), validation loss by a paired t-test (scipy); PSS against
``random`` too.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from benchmarks.common import md_table
from benchmarks.pss_lr_sweep import PSS_ALT, fisher, fmt, key, pval
from benchmarks.pss_testbed import RunSpec, Setup, explosion_step
from benchmarks.spike_testbed import MIN_STEP, label_events
from monitor.schema import PSSConfig

#: pre-LN (no natural failure near eta*), ANCHORS' pilot model: context 64, no warm-up,
#: constant LR (min_lr_frac 1: the cosine would hide late spikes), 400 steps
NATURAL = Setup(post_ln=False, block_size=64, warmup=0, min_lr_frac=1.0, steps=400)
PILOT_LRS = (0.3, 0.5, 1.0)
#: PSS with its detector armed after 20 steps (the spikes here start before the default 100)
PSS_SHORT = PSSConfig(warmup_steps=20)
#: (label, arm, PSS settings) in run order; ``random`` follows ``pss`` (it needs pss's count)
ARMS = (("none", "none", None), ("pss", "pss", PSSConfig()), ("random", "random", PSSConfig()),
        ("clip", "clip", None), ("zclip", "zclip", None), ("pss_alt", "pss_alt", None),
        ("qkln", "qkln", None), ("pss_w20", "pss", PSS_SHORT), ("random_w20", "random", PSS_SHORT))
#: run by default (pss_w20 / random_w20: only when spikes start before the 100-step warm-up)
DEFAULT_LABELS = ("none", "pss", "random", "clip", "zclip", "pss_alt", "qkln")
#: a trigger counts for a spike from LEAD_BEFORE steps before its onset to LEAD_AFTER after
LEAD_BEFORE, LEAD_AFTER = 20, 10


# ---------------------------------------------------------------------------- per run
def events(losses: list[float]) -> tuple[int, int, list[int]]:
    """(spikes, collapses, spike onsets) of a loss curve by ``spike_testbed.label_events``."""
    ev = label_events(np.asarray(losses, dtype=float))
    spikes = [e.onset for e in ev if e.kind == "spike"]
    return len(spikes), sum(e.kind == "collapse" for e in ev), spikes


def max_excursion(losses: list[float]) -> float:
    """``max_t (loss_t - min_{s<t} loss_s)`` over ``t >= MIN_STEP``: the largest rise of the
    loss above its running minimum (inf when the loss became non-finite)."""
    best, worst = math.inf, 0.0
    for t, loss in enumerate(losses):
        if not math.isfinite(loss):
            return math.inf
        if t >= MIN_STEP:
            worst = max(worst, loss - best)
        best = min(best, loss)
    return worst


def trigger_leads(fired: list[int], onsets: list[int]) -> list[int | None]:
    """Per spike onset ``o``: ``o - t`` for the first trigger ``t`` in
    ``[o - LEAD_BEFORE, o + LEAD_AFTER]`` (positive: before the onset, negative: after);
    None when PSS did not fire in that window."""
    out = []
    for o in onsets:
        near = [t for t in fired if o - LEAD_BEFORE <= t <= o + LEAD_AFTER]
        out.append(o - min(near) if near else None)
    return out


def surges(grad_norms: list[float], onsets: list[int]) -> list[float]:
    """Per onset ``o``: the largest gradient norm in ``[o - 5, o + 5]`` over the median of
    the (finite) norms of the 100 steps before ``o - 5``: how much the norm surged."""
    out = []
    for o in onsets:
        before = [x for x in grad_norms[max(0, o - 105): max(1, o - 5)] if math.isfinite(x)]
        peak = max((x for x in grad_norms[max(0, o - 5): o + 6] if math.isfinite(x)), default=math.inf)
        out.append(peak / statistics.median(before) if before else math.nan)
    return out


def late_explosion(losses: list[float]) -> int | None:
    """Issue 11's explosion rule (``pss_testbed.explosion_step``) from step ``MIN_STEP``
    on: without warm-up every run's loss first rises above its initial value for 20+ steps,
    which the rule, applied from step 0, calls an explosion at step 1 and which hides later
    ones."""
    t = explosion_step(losses[MIN_STEP:])
    return None if t is None else t + MIN_STEP


# ---------------------------------------------------------------------------- specs
def spec(label: str, lr: float, seed: int, n_random: int = 0) -> RunSpec:
    _, arm, cfg = next(a for a in ARMS if a[0] == label)
    if arm == "pss_alt":
        cfg = PSS_ALT
    return RunSpec(arm, lr, seed, NATURAL, pss=cfg, n_random=n_random)


def run_stage(store, lr: float, seeds, labels, workers: int, deadline: float = math.inf) -> dict:
    """Run every (label, seed) not cached (none starts after ``deadline``); ``random*``
    after its ``pss*`` run, with as many interventions. Returns {label: {seed: summary}}."""
    rnd = []
    first = [lb for lb in labels if lb in ("none", "pss", "pss_w20")]
    for group in (first, [lb for lb in labels if lb not in first]):
        # the random control right after the pss runs whose counts it needs
        store.run([[sp] for sp in rnd + [spec(lb, lr, s) for s in seeds for lb in group
                                         if not lb.startswith("random")]], workers, deadline)
        rnd = [spec(lb, lr, s, n_random=len(store.runs[key(spec("pss" + lb[6:], lr, s))]["fired"]))
               for lb in labels if lb.startswith("random") for s in seeds
               if key(spec("pss" + lb[6:], lr, s)) in store.runs]
    out: dict = {}
    for lb in labels:
        for s in seeds:
            sp = spec(lb, lr, s)
            if lb.startswith("random"):
                sp = next((r for r in rnd if r.pss == sp.pss and r.seed == s), None)
            v = store.runs.get(key(sp)) if sp is not None else None
            if v is not None:
                out.setdefault(lb, {})[s] = v
    return out


# ---------------------------------------------------------------------------- report
def pilot_table(store, lrs, seed: int = 0) -> str:
    """The pilot: ``none`` at each LR, one seed."""
    rows = []
    for lr in lrs:
        v = store.runs.get(key(spec("none", lr, seed)))
        if v is None:
            continue
        n_sp, n_col, onsets = events(v["losses"])
        g = [x for x in v["grad_norms"] if math.isfinite(x)]
        up = surges(v["grad_norms"], onsets)
        rows.append([f"{lr:g}", n_sp, n_col, ", ".join(map(str, onsets)) or "-",
                     ", ".join(fmt(x, 1) for x in up) or "-",
                     *("-" if x is None else x for x in (v["explosion"], late_explosion(v["losses"]))),
                     fmt(v["val"]),
                     fmt(max_excursion(v["losses"]), 2), fmt(max(g), 1),
                     fmt(statistics.median(g), 2), fmt(1000 * v["step_s"], 0)])
    return md_table(["LR", "spikes", "collapses", "spike onsets", "gradient-norm surge at "
                     "each (peak / median of 100 before)", "explosion step (issue's rule)",
                     "explosion step from step 20",
                     "val loss", "max excursion (nats)", "max grad norm", "median grad norm",
                     "median step (ms)"], rows)


def run_row(v: dict) -> dict:
    n_sp, n_col, onsets = events(v["losses"])
    return {"spikes": n_sp, "collapses": n_col, "events": n_sp + n_col, "onsets": onsets,
            "exploded": late_explosion(v["losses"]) is not None or not math.isfinite(v["val"]),
            "val": v["val"], "exc": max_excursion(v["losses"]),
            "leads": trigger_leads(v["fired"], onsets), "fired": len(v["fired"]), "dw": v["dw"]}


def paired(a: dict, b: dict, field: str) -> tuple[list[float], float]:
    """Differences a - b of ``field`` over the seeds both have (finite), and the p-value:
    Wilcoxon signed-rank for counts ("spikes", "events"), paired t-test otherwise; nan when n < 2 or
    every difference is zero."""
    from scipy.stats import ttest_rel, wilcoxon
    seeds = sorted(set(a) & set(b))
    pairs = [(run_row(a[s])[field], run_row(b[s])[field]) for s in seeds]
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    d = [x - y for x, y in pairs]
    if len(d) < 2 or not any(d):
        return d, math.nan
    if field in ("spikes", "events"):
        return d, float(wilcoxon(d, zero_method="zsplit").pvalue)
    return d, float(ttest_rel([x for x, _ in pairs], [y for _, y in pairs]).pvalue)


def stage_report(runs: dict, lr: float) -> str:
    rows, tests = [], []
    n_none = [run_row(v)["exploded"] for v in runs.get("none", {}).values()]
    for lb, by_seed in runs.items():
        rr = [run_row(v) for v in by_seed.values()]
        n_exp = sum(r["exploded"] for r in rr)
        p_exp = fisher(n_exp, len(rr), sum(n_none), len(n_none)) if n_none and lb != "none" else math.nan
        leads = [x for r in rr for x in r["leads"]]
        hit = [x for x in leads if x is not None]
        pss = lb.startswith(("pss", "random"))
        rows.append([lb, len(rr), fmt(statistics.mean(r["spikes"] for r in rr), 2),
                     sum(r["collapses"] for r in rr), f"{n_exp} ({pval(p_exp)})",
                     fmt(statistics.mean(r["val"] for r in rr)) if all(
                         math.isfinite(r["val"]) for r in rr) else "inf in some",
                     fmt(statistics.median(r["exc"] for r in rr), 2),
                     sum(r["fired"] for r in rr) if pss else "",
                     (f"{len(hit)}/{len(leads)}" + (f", median {statistics.median(hit):g}"
                                                    if hit else "")) if pss else "",
                     fmt(statistics.median([x for r in rr for x in r["dw"]]), 4)
                     if pss and any(r["dw"] for r in rr) else ""])
        refs = ["none"] + (["random" + lb[3:]] if lb.startswith("pss") and lb != "pss_alt" else [])
        for ref in refs:
            if lb == ref or ref not in runs:
                continue
            d_sp, p_sp = paired(by_seed, runs[ref], "spikes")
            d_ev, p_ev = paired(by_seed, runs[ref], "events")
            d_v, p_v = paired(by_seed, runs[ref], "val")
            tests.append([f"{lb} - {ref}", len(d_sp), fmt(statistics.mean(d_sp), 2) if d_sp else "-",
                          pval(p_sp), fmt(statistics.mean(d_ev), 2) if d_ev else "-", pval(p_ev),
                          len(d_v), f"{statistics.mean(d_v):+.3f}" if d_v else "-", pval(p_v)])
    return (f"LR {lr:g}, constant, no warm-up.\n\n"
            + md_table(["arm", "seeds", "spikes per run (mean)", "collapses (total)",
                        "exploded (issue's rule from step 20; Fisher p vs none)", "val loss (mean)", "max excursion (median, nats)",
                        "PSS steps fired (total)", f"spikes with a trigger in [-{LEAD_BEFORE}, "
                        f"+{LEAD_AFTER}] of onset; median lead (steps)", "median ||dW||/||W||"], rows)
            + "\nPaired by seed against the reference (Wilcoxon signed-rank on spikes per run, "
              "zero differences split; paired t-test on validation loss; '-' where n < 2 or "
              "every difference is 0):\n\n"
            + md_table(["arms", "seeds", "spikes difference (mean)", "Wilcoxon p",
                        "spikes + collapses difference (mean)", "Wilcoxon p",
                        "seeds (finite val)", "val loss difference (mean)", "t-test p"], tests))

