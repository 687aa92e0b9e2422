"""``watch()``: attach the monitor to a model and optimizer. The hook decides *when*.

The metric functions (``monitor.metrics``) decide *what*, the writer (``monitor.writer``)
*where*. Data flow per optimizer step ``t`` (a step is an optimizer step, so gradient
accumulation is handled for free):

- step pre-hook (gradients final, weights not yet updated; with ``step(closure)`` right
  after the closure's first call, inside ``step``): PSS detection when enabled;
  on a logged step, gradient norms, health counts, sigma_max / stable rank, SJE and the
  NTK eigenvalue (from inputs and output gradients captured during this step's backward),
  and a copy of the weights for the update ratio;
- step post-hook: parameter norms, update ratio, applied and effective learning rate.

The record of step ``t`` is written as one event when step ``t + 1`` begins (so values
passed to ``Monitor.log`` after ``optimizer.step()`` join it) or at ``close()``. Non-logged
steps cost two Python calls and, with PSS on, one fused gradient-norm reduction.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from monitor import patterns, runstate, safe_io, schema
from monitor.config import PRESETS, MonitorConfig
from monitor.distributed import Comm, NullWriter, rank_and_world_size, unwrap_model
from monitor.flight import make_job_alerts, refuse_distributed
from monitor.metrics import energy, norms, spectral, views
from monitor.metrics.ntk_capture import NTKCapture
from monitor.preclip import global_norm_tags, make_tap, pre_clip_norms
from monitor.schema import PSSConfig, layer_tag
from monitor.writer import EventWriter, default_layout

log = logging.getLogger("monitor")

GLOBAL_TAGS = (schema.TAG_LOSS, schema.TAG_GLOBAL_GRAD_NORM, schema.TAG_NONFINITE_GRAD,
               schema.TAG_NONFINITE_WEIGHT, schema.TAG_METRIC_FAILURES,
               schema.TAG_PSS_TRIGGER_RATIO, schema.TAG_PSS_INTERVENTION, schema.TAG_MONITOR_OVERHEAD)


@dataclass
class Layer:
    """One monitored parameter tensor."""

    name: str
    param: nn.Parameter
    kind: str  # from views.layer_kinds: linear, conv1d_hf, conv, embedding, mha_in_proj, other
    spectral: bool  # has a matrix view (ndim >= 2)
    v: torch.Tensor | None = None  # warm start of the power iteration (right singular vector)


@dataclass
class StepRecord:
    """Everything logged for one optimizer step, written as one event."""

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, metric: str, layer: str, reason: str) -> None:
        self.failures.append(f"{metric}/{layer}: {reason}")

    def close_failures(self) -> None:
        """Add the failure count and the text naming each failure, before writing."""
        if self.failures:
            self.scalars[schema.TAG_METRIC_FAILURES] = float(len(self.failures))
            self.texts[schema.TAG_FAILURE_TEXT] = "\n".join(f"- {f}" for f in self.failures)


class Monitor:
    """The hook returned by :func:`watch`. Also a context manager; ``close()`` is idempotent."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, logdir: str,
                 config: MonitorConfig, pss: PSSConfig | None = None, start_step: int = 0,
                 alerts: Any = None, on_alert: Any = None) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self.logdir = os.fspath(logdir)
        self.step = start_step  # optimizer steps so far (from a checkpoint: its step); the running step
        self._closed = False
        self._record: StepRecord | None = None  # record of the running/last step, unwritten
        self._before: list[torch.Tensor] | None = None  # weights before a logged step
        self._grad_norms: dict[str, float] = {}
        self._reported_unsupported: set[str] = set()
        # the monitor's own cost: seconds spent in its code since the last written record
        self._busy = 0.0
        self._interval_start = time.perf_counter()
        self._records_written = 0
        self._warned_overhead = False
        self._cuda = next((p.device for p in model.parameters() if p.is_cuda), None)
        kinds = views.layer_kinds(model)
        chosen = set(patterns.select_or_raise(  # a stalling pattern: refused, named
            "MonitorConfig.layers", config.layers, [name for name, _ in model.named_parameters()]))
        self.layers = [Layer(name, p, kinds.get(name, "other"), views.has_matrix_view(p))
                       for name, p in model.named_parameters() if name in chosen]
        self._group_of: dict[int, dict] = {}
        self._groups_seen = -1  # len(param_groups) when _group_of was built
        self.rank, self._dist = self._start_distributed()  # SPEC 7: every rank works, rank 0 writes
        self._writer = EventWriter(self.logdir) if self.rank == 0 else NullWriter()
        self._ntk = NTKCapture(model, self._dist.owned_names() if self._dist else
                               {id(l.param): l.name for l in self.layers
                                if l.spectral and l.param.requires_grad},
                               n=config.ntk_probe,
                               max_bytes=int(config.ntk_max_mb * 2**20) or None)
        self._pss = self._make_pss(pss, kinds) if pss is not None else None
        self._alerts_done = start_step  # steps whose alert rules have run (see _end_step)
        self._alerting = make_job_alerts(alerts, on_alert, self.layers, config, self._writer.write,
                                         self._dist.comm if self._dist is not None else None)
        self._preclip = make_tap(self)  # gradient norms before the user's clipping
        self._pre_norms: dict[str, float] = {}
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        self._write_header()
        self._at_exit = runstate.close_at_exit(self, Monitor.close)  # a job that never closes
        if config.ntk_at(start_step):
            self._ntk.arm()

    def _start_distributed(self):
        """``(rank, DistributedMetrics or None)``: in a torch.distributed job every rank
        computes its share of the metrics (``monitor.collectors``); rank 0 alone writes."""
        rank, world = rank_and_world_size()
        if world == 1:
            return 0, None
        from monitor.collectors import DistributedMetrics

        if rank != 0:  # run.json is rank 0's
            self.config = replace(self.config, log_system=False)
        comm = Comm(self.config.dist_timeout_s)
        return rank, DistributedMetrics(self.layers, comm, self.config, StepRecord, self.model)

    # ---------------------------------------------------------------- public API
    @property
    def pss(self):
        """The PSS controller (``monitor.pss.PSSController``), None when PSS is off: its
        ``interventions`` lists the steps smoothed so far, ``config`` the settings in force."""
        return self._pss

    def log(self, **values: Any) -> None:
        """Add scalars (``loss=...`` becomes ``train/loss``; other names are used as tags)
        to the record of the last optimizer step. Ignored on steps that are not logged, so
        passing a CUDA tensor costs no synchronisation on those steps."""
        if self._alerting is not None and not self._closed:
            self._alerting.log(values)
        record = self._record
        if record is None or self._closed:
            return
        _add_values(record, values)

    def log_at(self, step: int, **values: Any) -> None:
        """Record scalars that belong to optimizer step ``step`` (counted from 0) but were
        computed apart from it, on any step: a trainer's loss averaged over its logging
        interval, an evaluation metric. They join that step's record while it is still open
        (a logged step, until the next step begins), else they are written as their own
        event. Names as for :meth:`log`; write them in increasing ``step`` per name."""
        if self._closed:
            return
        record = self._record
        if record is not None and record.step == step:
            _add_values(record, values)
            return
        own = StepRecord(int(step))
        _add_values(own, values)
        own.close_failures()
        try:
            self._writer.write(own.step, own.scalars, own.texts)
        except Exception as err:  # never let the monitor kill the job
            log.warning("monitor: writing values of step %d failed: %s", step, err)

    def close(self, state: str = "finished") -> None:
        """Write the last record and ``run.json``'s final ``state`` (runstate.py)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        for handle in self._hooks:
            handle.remove()
        if self._preclip is not None:
            self._preclip.remove()
        self._ntk.disarm()
        self._end_step()
        self._flush_record()
        self._write_run_file(state)
        self._writer.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(runstate.ending_state(exc_type, exc))

    # ---------------------------------------------------------------- optimizer hooks
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        start = time.perf_counter()
        self._end_step()
        self._flush_record()  # the previous step's record is complete now
        self._busy += time.perf_counter() - start
        # args holds the optimizer itself first, then step()'s own arguments
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if not callable(closure):
            self._observe_gradients()
            return None
        # optimizer.step(closure) (Lightning, LBFGS): the gradients exist only once the
        # closure has run inside step(), so observe them there, on its first call.
        pending = [True]

        def observed_closure():
            loss = closure()
            if pending:
                pending.clear()
                self._observe_gradients()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": observed_closure}
        return (args[0], observed_closure, *args[2:]), kwargs

    def _observe_gradients(self) -> None:
        """Gradients are final and weights not yet updated: PSS, and a logged step's metrics."""
        t = self.step
        logged = self.config.logs(t) or (self._alerting is not None and self._alerting.dense(t))
        record = StepRecord(t) if logged else None
        if logged and self._cuda is not None:
            # the metrics synchronise anyway; do it before the clock starts, so that the
            # wait for the training step's queued kernels is not counted as the monitor's
            torch.cuda.synchronize(self._cuda)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                if logged and self._dist is not None:
                    self._grad_norms = self._dist.pre_step(
                        record, t, self._ntk_metrics if self._ntk.armed else None)
                elif logged:
                    self._grad_metrics(record)
                    self._spectral_metrics(record, sje=self.config.sje_at(t))
                if self._ntk.armed:
                    self._ntk_metrics(record)
                # an unlogged step's norms before the user's clipping, taken once for PSS
                # and the alert rules (the tap forgets what it hands out)
                step_norms = (self._unlogged_pre_norms() if record is None
                              and (self._pss is not None or self._alerting is not None) else None)
                if self._pss is not None:  # may smooth weights: copy them afterwards
                    record = self._pss_step(t, record, step_norms)
                if record is not None:
                    self._before = (self._dist.snapshot() if self._dist is not None else
                                    [l.param.detach().clone() for l in self.layers])
                if self._alerting is not None:
                    self._alerting.before_update(record, step_norms)
        except Exception as err:  # never let the monitor kill the job
            log.warning("monitor: step %d pre-step metrics failed: %s", t, err, exc_info=True)
            if record is not None:
                record.fail("hook", "pre_step", repr(err))
        self._record = record
        self._busy += time.perf_counter() - start

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        start = time.perf_counter()
        t = self.step
        self.step += 1
        try:
            if self._record is not None and self._before is not None:
                with torch.no_grad():
                    self._update_metrics(self._record)
            if self._alerting is not None:
                with torch.no_grad():
                    self._alerting.after_update(self._record)
            if self.config.ntk_at(self.step):
                self._ntk.arm()  # capture during the next step's forward and backward
        except Exception as err:
            log.warning("monitor: step %d post-step metrics failed: %s", t, err, exc_info=True)
            if self._record is not None:
                self._record.fail("hook", "post_step", repr(err))
        finally:
            self._before = None
            self._busy += time.perf_counter() - start

    # ---------------------------------------------------------------- metrics
    def _grad_metrics(self, record: StepRecord) -> None:
        with_grad = [l for l in self.layers if l.param.grad is not None]
        grads = [l.param.grad for l in with_grad]
        gnorms = norms.tensor_norms(grads)
        self._grad_norms = dict(zip((l.name for l in with_grad), gnorms))  # applied
        self._pre_norms = pre_clip_norms(self._preclip, with_grad, gnorms)
        for name, value in self._pre_norms.items():
            record.scalars[layer_tag(schema.GRAD_NORM, name)] = value
        record.scalars.update(global_norm_tags(self._pre_norms.values(), gnorms))
        record.scalars[schema.TAG_NONFINITE_GRAD] = float(norms.nonfinite_count(grads))
        record.scalars[schema.TAG_NONFINITE_WEIGHT] = float(
            norms.nonfinite_count([l.param for l in self.layers]))

    def _spectral_metrics(self, record: StepRecord, sje: bool) -> None:
        unconverged = 0
        for layer in self.layers:
            if not layer.spectral:
                continue
            name = layer.name
            try:
                M = views.matrix_view(layer.param.detach(), layer.kind)
                result = spectral.power_sigma_max(M, layer.v, max_iters=self.config.power_iters,
                                                  tol=self.config.power_tol)
                if not (math.isfinite(result.sigma) and result.sigma > 0):
                    raise ValueError(f"sigma_max is {result.sigma} (zero or non-finite weights)")
                layer.v = result.v  # also when unconverged: the next step goes on from it
                if not result.converged:  # outside the stated accuracy: said, not logged
                    unconverged += 1
                    record.fail(schema.STABLE_RANK, name, result.reason + "; raise power_iters")
                    continue
                sr = spectral.stable_rank(M, result.sigma)
                record.scalars[layer_tag(schema.SIGMA_MAX, name)] = result.sigma
                record.scalars[layer_tag(schema.STABLE_RANK, name)] = sr
            except Exception as err:
                layer.v = None
                record.fail(schema.STABLE_RANK, name, str(err))
                continue
            if sje and layer.param.grad is not None:
                try:
                    G = views.matrix_view(layer.param.grad.detach(), layer.kind)
                    value, _k = energy.sje(M, G, k_max=self.config.sje_k_max, sr=sr)
                    if not math.isfinite(value):
                        raise ValueError(f"SJE is {value}")
                    record.scalars[layer_tag(schema.SJE, name)] = value
                except Exception as err:
                    record.fail(schema.SJE, name, str(err))
        if unconverged:
            record.scalars[schema.TAG_SIGMA_UNCONVERGED] = float(unconverged)

    def _ntk_metrics(self, record: StepRecord | None) -> None:
        try:
            if record is not None:
                values, errors = self._ntk.compute()
                for name, value in values.items():
                    record.scalars[layer_tag(schema.NTK_EIG, name)] = value
                for name, reason in errors.items():
                    if name not in self._ntk.unsupported:
                        record.fail(schema.NTK_EIG, name, reason)
                    elif name not in self._reported_unsupported:  # structural: say it once
                        self._reported_unsupported.add(name)
                        record.texts[schema.TAG_UNSUPPORTED] = (
                            record.texts.get(schema.TAG_UNSUPPORTED, "")
                            + f"- ntk_eig/{name}: {reason}\n")
                if self._ntk.probe_used:  # samples actually used: min(ntk_probe, batch size)
                    record.scalars[schema.TAG_NTK_PROBE] = float(self._ntk.probe_used)
        finally:
            self._ntk.disarm()

    def _update_metrics(self, record: StepRecord) -> None:
        if len(self.optimizer.param_groups) != self._groups_seen:  # add_param_group (unfreezing)
            self._groups_seen = len(self.optimizer.param_groups)
            self._group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        before = self._before
        if self._dist is not None:  # whole tensors: one all-reduce (monitor.collectors)
            pnorms, ratios, rates = self._dist.update_values(before, self._grad_norms or {})
        else:
            after = [l.param.detach() for l in self.layers]
            pnorms = norms.tensor_norms(before)
            ratios = norms.update_ratio(before, after)  # nan where ||W_before|| = 0: not logged
            stepped = [i for i, l in enumerate(self.layers) if l.param.grad is not None]
            rates = dict(zip(stepped, norms.lr_effective(
                [before[i] for i in stepped], [after[i] for i in stepped],
                [self.layers[i].param.grad for i in stepped])))
        for i, (layer, pnorm, ratio) in enumerate(zip(self.layers, pnorms, ratios)):
            name = layer.name
            record.scalars[layer_tag(schema.PARAM_NORM, name)] = pnorm
            group = self._group_of.get(id(layer.param))
            if group is None:
                continue  # not optimised (e.g. frozen and not in the optimizer)
            if not math.isnan(ratio):  # undefined for an all-zero tensor (a zero-initialised bias)
                record.scalars[layer_tag(schema.UPDATE_RATIO, name)] = ratio
            record.scalars[layer_tag(schema.LR, name)] = applied_lr(self.optimizer, group, layer.param)
            rate = rates.get(i, math.nan)  # nan where the gradient is zero (or was dropped)
            if not math.isnan(rate):
                record.scalars[layer_tag(schema.LR_EFFECTIVE, name)] = rate

    def _unlogged_pre_norms(self) -> dict[str, float]:
        """Per-layer gradient norms before the user's clipping, on a step that is not logged
        (distributed: the whole tensors' applied norms, equal on every rank; no tap there)."""
        if self._dist is not None:
            return self._dist.grad_norms()[1]
        with_grad = [l for l in self.layers if l.param.grad is not None]
        return pre_clip_norms(self._preclip, with_grad,
                              norms.tensor_norms([l.param.grad for l in with_grad]))

    def _pss_step(self, t: int, record: StepRecord | None,
                  step_norms: dict[str, float] | None) -> StepRecord | None:
        if record is not None:  # the norms before the user's clipping (monitor/preclip.py)
            global_norm = record.scalars[schema.TAG_GLOBAL_GRAD_NORM]
            layer_norms = self._pre_norms if self._dist is None else self._grad_norms
        else:
            layer_norms = step_norms  # taken in _pre_step whenever PSS is on
            global_norm = norms.global_norm(layer_norms.values())
        result = self._pss.before_step(t, global_norm, layer_norms)
        if result.force_log and record is None:
            record = StepRecord(t)
            record.scalars[schema.TAG_GLOBAL_GRAD_NORM] = global_norm
            self._pre_norms = layer_norms
            self._grad_norms = (layer_norms or {}) if self._dist is not None else {}
        if record is not None:
            record.scalars.update(result.scalars)
            record.texts.update(result.texts)
        if result.skip_update:  # the optimizer skips parameters whose grad is None
            for param in self.model.parameters():
                param.grad = None
        return record

    # ---------------------------------------------------------------- output
    def _make_pss(self, pss: PSSConfig, kinds: dict[str, str]):
        from monitor.pss.controller import PSSController

        named = [(l.name, l.param) for l in self.layers]
        if self._dist is not None:
            from monitor.pss.distributed import DistributedPSSController

            return DistributedPSSController(pss, self.model, self.optimizer, self.logdir,
                                            named_params=named, kinds=kinds, start_step=self.step,
                                            **self._dist.pss_args())
        return PSSController(pss, self.model, self.optimizer, self.logdir, named_params=named,
                             kinds=kinds, start_step=self.step)

    def _end_step(self) -> None:
        """The last optimizer step is complete: alert rules and the flight recorder."""
        if self._alerting is None or self.step == self._alerts_done:
            return
        self._alerts_done = self.step
        try:
            self._record = self._alerting.end_step(self.step - 1, self._record, StepRecord)
        except Exception as err:  # never let the monitor kill the job
            log.warning("monitor: alerts of step %d failed: %s", self.step - 1, err, exc_info=True)

    def _flush_record(self) -> None:
        record, self._record = self._record, None
        if record is None:
            return
        self._account_own_time(record)
        record.close_failures()
        try:
            self._writer.write(record.step, record.scalars, record.texts)
            self._write_run_file("running")  # a no-op without log_system
        except Exception as err:
            log.warning("monitor: writing step %d failed: %s", record.step, err)

    def _account_own_time(self, record: StepRecord) -> None:
        """Log the monitor's own time since the last record, and its share of wall time.

        Counted: the optimizer hooks and event writing (on CUDA after a synchronisation, so
        queued training kernels are not counted). Not counted: the NTK's capture hooks
        inside forward and backward on NTK steps (small against the kernels they feed)."""
        now = time.perf_counter()
        wall, busy = now - self._interval_start, self._busy
        self._interval_start, self._busy = now, 0.0
        record.scalars[schema.TAG_MONITOR_SECONDS] = busy
        if wall > 0:
            share = busy / wall
            record.scalars[schema.TAG_MONITOR_OVERHEAD] = share
            limit = self.config.warn_overhead
            # the first interval holds watch() itself and cold starts: not representative
            if limit and share > limit and self._records_written >= 1 and not self._warned_overhead:
                self._warned_overhead = True
                log.warning("monitor: the monitor took %.0f%% of wall time up to step %d "
                            "(limit warn_overhead=%g); use preset='default' or 'cheap', a larger "
                            "`every`, or a `layers` pattern. Its share is logged as %s.",
                            100 * share, record.step, limit, schema.TAG_MONITOR_OVERHEAD)
        self._records_written += 1

    def _write_header(self) -> None:
        if self.step > 0:  # resumed from a checkpoint: supersede what a crashed run logged later
            self._writer.write_session_start(self.step)
        self._writer.write_summary(default_layout(GLOBAL_TAGS, [l.name for l in self.layers]),
                                   step=self.step)
        header = {schema.TAG_SJE_K_MAX: float(self.config.sje_k_max)}
        text = {schema.TAG_RUN_CONFIG: "```json\n" + json.dumps(self._run_info(), indent=1) + "\n```"}
        self._writer.write(self.step, header, text)
        self._started = time.time()
        self._write_run_file("running")

    def _run_info(self) -> dict[str, Any]:
        info = {"monitor": self.config.to_dict(),
                "pss": self._pss_config_dict(),
                "optimizer": type(self.optimizer).__name__,
                "model": type(self.model).__name__}
        if getattr(self, "_dist", None) is not None:
            info["distributed"] = self._dist.describe()
        return info

    def _pss_config_dict(self) -> dict[str, Any] | None:
        return self._pss.config.to_dict() if self._pss is not None else None

    def _write_run_file(self, status: str) -> None:
        if not self.config.log_system:
            return
        info = {"status": status, "layers": [l.name for l in self.layers],
                "spectral": [l.name for l in self.layers if l.spectral],
                "started": self._started, "updated": time.time(),
                "pid": os.getpid(), "host": socket.gethostname(), "step": self.step,
                **self._run_info()}
        path = os.path.join(self.logdir, schema.RUN_FILENAME)
        try:  # a fresh temporary name: a FIFO planted at a fixed one would block the job
            safe_io.write_text_atomic(path, json.dumps(info, indent=1), fsync=False, mode=0o644)
        except OSError as err:
            log.warning("monitor: cannot write %s: %s", path, err)


def _add_values(record: StepRecord, values: dict[str, Any]) -> None:
    for key, value in values.items():
        tag = schema.TAG_LOSS if key == "loss" else key
        try:
            record.scalars[tag] = float(value.detach().float().item()
                                        if isinstance(value, torch.Tensor) else value)
        except Exception as err:  # a bad value must not kill the job
            record.fail("log", tag, f"cannot convert {type(value).__name__}: {err}")


def applied_lr(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> float:
    """The rate applied to ``param``: its group's lr times any trust ratio the optimizer
    stored for it (``state[p]["trust_ratio"]``: LARS, LAMB, TVLARS of ``monitor.lr``)."""
    lr = group["lr"]
    lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    ratio = optimizer.state.get(param, {}).get("trust_ratio", 1.0)
    return lr * float(ratio.item() if isinstance(ratio, torch.Tensor) else ratio)


def resolve_config(every: int | None, preset: str, config: MonitorConfig | None,
                   caller: str = "watch") -> MonitorConfig:
    """The MonitorConfig that ``every`` / ``preset`` / ``config`` name; a clear error when they
    conflict (an unknown preset is rejected even when ``config`` is given)."""
    if preset not in PRESETS:
        raise ValueError(f"{caller}(preset={preset!r}): unknown preset {preset!r}; choose one of "
                         f"{PRESETS}")
    if config is None:
        return MonitorConfig.preset(preset, every=50 if every is None else every)
    if not isinstance(config, MonitorConfig):
        raise TypeError(f"{caller}(config=...): expected a MonitorConfig, got {type(config).__name__}")
    if every is not None and every != config.every:
        raise ValueError(f"{caller}(every={every}) conflicts with config.every={config.every}; "
                         "pass one of them")
    return config


def resolve_pss(pss: PSSConfig | bool | None, caller: str = "watch") -> PSSConfig | None:
    """``True`` -> PSSConfig(), ``False`` / None -> None, a PSSConfig as is; else TypeError."""
    if pss is True:
        return PSSConfig()
    if pss is False or pss is None:
        return None
    if not isinstance(pss, PSSConfig):
        raise TypeError(f"{caller}(pss=...): expected True, False, None or a PSSConfig, got {pss!r}")
    return pss


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, logdir: str | os.PathLike[str] | None = None,
          every: int | None = None, *, preset: str = "default", config: MonitorConfig | None = None,
          pss: PSSConfig | bool | None = None, start_step: int = 0, alerts: Any = None,
          on_alert: Any = None) -> Monitor:
    """Attach the monitor to ``model`` and ``optimizer``; returns the :class:`Monitor`.

    Args:
        logdir: run directory for the event files (created; default ``runs/<date-time>``).
        every: log every ``every`` optimizer steps (default 50).
        preset: ``"cheap"`` (no SJE/NTK), ``"default"`` (SJE and NTK every 4th log) or
            ``"full"`` (everything at every logged step). Ignored when ``config`` is given.
        config: a :class:`MonitorConfig` for full control.
        pss: ``True`` or a :class:`PSSConfig` to enable Parametric Singularity Smoothing.
        start_step: the optimizer step training resumes from (a checkpoint's step), so that
            steps continue the earlier run's and the schedule stays aligned with it; PSS
            detection warms up again (its moving average is not in the checkpoint).
        alerts: ``True`` (the measured default rules), a list of ``monitor.alerts.AlertRule``
            or a ``monitor.flight.AlertConfig`` (rules, storm limit, flight recorder):
            rules checked every step; a firing writes ``alert/<rule>`` and the flight
            recorder's window (SPEC 8, README "Alerts").
        on_alert: called with each ``monitor.alerts.Alert`` (save a checkpoint, lower the
            LR, stop); if it raises, the error is logged and counted and training goes on.

    In a ``torch.distributed`` job (DDP, FSDP2) call it on every rank: each rank computes a
    share of the metrics of the whole tensors, rank 0 alone writes; PSS decides once for
    all ranks and smooths every replica or shard alike (README, "Distributed training").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(start_step, int) and not isinstance(start_step, bool) and start_step >= 0):
        raise ValueError(f"watch(start_step={start_step!r}): expected an integer >= 0")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("watch(optimizer=...): expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    config = resolve_config(every, preset, config)
    pss = resolve_pss(pss)
    model = unwrap_model(model)
    refuse_distributed(alerts, rank_and_world_size()[1])
    if logdir is None:
        logdir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return Monitor(model, optimizer, os.fspath(logdir), config, pss, start_step, alerts, on_alert)
