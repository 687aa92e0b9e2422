"""PSS in a running job: detection, smoothing and live control, called by the hook.

``Monitor`` calls :meth:`PSSController.before_step` from the optimizer's step pre-hook on
every optimizer step (gradients final, weights not yet updated). The controller polls the
control file, runs the detection rule (``detect.py``), smooths the selected weights in place
(``smoothing.py``) and returns the values to log. It never raises into the training job.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from monitor import patterns, schema
from monitor.metrics import views
from monitor.pss.control import ControlUpdate, ControlWatcher
from monitor.pss.detect import Detector
from monitor.pss.inputs import InputLog
from monitor.pss.smoothing import smooth_matrix, weight_from_matrix
from monitor.pss.state import reset_optimizer_state
from monitor.schema import ControlError, PSSConfig, layer_tag

log = logging.getLogger("monitor.pss")


@dataclass
class PSSStepResult:
    """What one step of PSS asks the hook to log and do."""

    scalars: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    skip_update: bool = False  # drop this step's update (the hook sets the grads to None)
    force_log: bool = False  # write an event this step even if it is not a logged step

    def say(self, tag: str, line: str) -> None:
        self.texts[tag] = (self.texts[tag] + "\n" if tag in self.texts else "") + line


class PSSController:
    """Parametric Singularity Smoothing for one model and optimizer.

    Args:
        config: the starting settings. A valid ``control.json`` already in ``logdir`` wins
            (a restarted job keeps the user's last settings); when there is none, the
            controller writes one with ``config``, so readers see the settings in force.
        named_params: the tensors PSS may smooth (default: ``model.named_parameters()``).
        kinds: layer kinds from ``views.layer_kinds`` (computed when None).
        check_every: steps between two checks of the control file.
    """

    def __init__(self, config: PSSConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 logdir: str, named_params: list[tuple[str, nn.Parameter]] | None = None,
                 kinds: dict[str, str] | None = None, check_every: int = 5,
                 start_step: int = 0) -> None:
        if not isinstance(config, PSSConfig):
            raise TypeError(f"PSSController(config=...): expected a PSSConfig, got {config!r}")
        self.config = config
        self.model, self.optimizer, self.logdir = model, optimizer, logdir
        self.named = list(named_params) if named_params is not None else list(model.named_parameters())
        self.kinds = kinds if kinds is not None else views.layer_kinds(model)
        self.detector = Detector(config.tau, config.alpha, config.warmup_steps)
        self.layer_detectors: dict[str, Detector] = {}
        self.interventions: list[int] = []  # steps at which weights were smoothed
        self.watcher = ControlWatcher(logdir, check_every=check_every)
        # the layers the settings select, matched once per change of the settings (a
        # ``layers`` pattern that does not match in time is refused: monitor/patterns.py)
        self.selected = self._select(config, "PSSConfig.layers")
        self._in_force = (self.watcher.version, self.watcher.settings)
        self._pending = PSSStepResult()  # start-up messages, returned with the first step
        # every step's detector input, for the dashboard's exact what-if replay
        self.inputs = self._input_log(start_step)
        self._start_control()

    def _input_log(self, start_step: int) -> InputLog:
        """The ``pss_input.bin`` writer (the distributed controller opens it on rank 0 only)."""
        cfg = self.config
        return InputLog(self.logdir, start_step, cfg.tau, cfg.alpha, cfg.warmup_steps)

    # ------------------------------------------------------------------ the step
    def before_step(self, step: int, global_grad_norm: float,
                    layer_grad_norms: dict[str, float] | None = None) -> PSSStepResult:
        result, self._pending = self._pending, PSSStepResult()
        try:
            smooth_now = self._apply(*self._poll(step), step, result)
            cfg = self.config
            # warm-up counts the steps this controller has seen (a resumed job warms up again)
            triggered, ratio = self.detector.update(global_grad_norm)
            self.inputs.append(step, global_grad_norm)
            nonfinite = not math.isfinite(global_grad_norm)
            layers = self.selected
            if cfg.per_layer and layer_grad_norms:
                hits = self._layer_hits(step, layer_grad_norms)
                triggered = nonfinite or bool(hits)
                layers = [l for l in layers if l[0] in hits] if not nonfinite else layers
            result.scalars.update({schema.TAG_PSS_TRIGGER_RATIO: ratio,
                                   schema.TAG_PSS_INTERVENTION: 0.0})
            self._settings_scalars(result)
            if cfg.enabled and (triggered or smooth_now):
                reason = "smooth-now request" if smooth_now and not triggered else (
                    "non-finite gradient norm" if nonfinite else f"trigger ratio {ratio:.3g} > tau {cfg.tau}")
                self._intervene(step, reason, layers, result)
                result.skip_update = triggered and (cfg.skip_update or nonfinite)
            elif smooth_now:
                result.say(schema.TAG_PSS_EVENTS, f"step {step}: smooth-now ignored: PSS is disabled")
                result.force_log = True
        except Exception as err:  # never kill the job
            log.warning("PSS failed at step %d: %r", step, err, exc_info=True)
            result.say(schema.TAG_PSS_EVENTS, f"step {step}: PSS failed: {err!r}")
            result.force_log = True
        return result

    def _layer_hits(self, step: int, norms: dict[str, float]) -> set[str]:
        hits = set()
        for name, g in norms.items():
            det = self.layer_detectors.setdefault(
                name, Detector(self.config.tau, self.config.alpha, self.config.warmup_steps))
            if det.update(g)[0]:
                hits.add(name)
        return hits

    def _select(self, cfg: PSSConfig, passed_as: str | None = None) -> list[tuple[str, nn.Parameter, str]]:
        """The matrices ``cfg`` selects (once per change of the settings). A ``layers``
        pattern that is invalid or too slow to match raises ``patterns.PatternError``, or a
        ValueError naming ``passed_as`` (settings passed in code)."""
        names = [name for name, _ in self.named]
        names = set(patterns.select_or_raise(passed_as, cfg.layers, names) if passed_as
                    else patterns.select(cfg.layers, names))
        out = []
        for name, p in self.named:
            kind = self.kinds.get(name, "other")
            if name not in names or not views.has_matrix_view(p):
                continue
            if kind == "embedding" and not cfg.include_embeddings:
                continue
            out.append((name, p, kind))
        return out

    def _intervene(self, step: int, reason: str, layers: list[tuple[str, nn.Parameter, str]],
                   result: PSSStepResult) -> None:
        cfg = self.config
        start = time.perf_counter()
        params = {"window": cfg.window, "temperature": cfg.temperature, "c": cfg.c}
        params = {k: v for k, v in params.items() if v is not None}
        if cfg.method not in ("conv",):
            params.pop("window", None)
        if cfg.method != "softmax":
            params.pop("temperature", None)
        if cfg.method not in ("log", "softplus"):
            params.pop("c", None)
        lines = []
        for name, p, kind in layers:
            try:
                info = self._smooth_layer(name, p, kind, params)
                if cfg.reset_optimizer_state:
                    reset_optimizer_state(self.optimizer, p)
            except Exception as err:
                lines.append(f"- {name}: not smoothed ({err})")
                continue
            for key in schema.PSS_LAYER_METRICS:  # pss_sr_before, ...: info's keys after "pss_"
                result.scalars[layer_tag(key, name)] = info[key.removeprefix("pss_")]
            lines.append(f"- {name}: k={int(info['k'])}, sigma {info['sigma_before']:.4g} -> "
                         f"{info['sigma_after']:.4g}, SR {info['sr_before']:.3g} -> {info['sr_after']:.3g}")
        ms = 1000 * (time.perf_counter() - start)
        self.interventions.append(step)
        result.scalars[schema.TAG_PSS_INTERVENTION] = 1.0
        result.force_log = True
        head = (f"step {step}: intervention ({reason}); method {cfg.method}; "
                f"{len(layers)} layer(s) in {ms:.0f} ms")
        result.say(schema.TAG_PSS_EVENTS, "\n".join([head, *lines]))
        log.info(head)

    def _smooth_layer(self, name: str, p: nn.Parameter, kind: str, params: dict) -> dict[str, float]:
        """Smooth one weight in place; returns ``smooth_matrix``'s info (the distributed
        controller gathers a sharded weight here, ``monitor.pss.distributed``)."""
        cfg = self.config
        M = views.matrix_view(p.detach(), kind)
        M_new, info = smooth_matrix(M, cfg.method, k_min=cfg.k_min, k_max=cfg.k_max, **params)
        W_new = weight_from_matrix(M_new, p, kind)
        if not torch.isfinite(W_new).all():  # never write NaN/inf into the model
            raise ValueError("the smoothed weight has non-finite entries; the weight was kept")
        with torch.no_grad():
            p.copy_(W_new)
        return info

    # ------------------------------------------------------------------ control
    def _start_control(self) -> None:
        try:
            existing = self.watcher.check()  # also records the file, so it is not re-read
        except Exception as err:  # never stop the job at start either
            existing = ControlUpdate(rejected=repr(err))
        if existing is not None and existing.rejected:
            self._reject(f"existing control.json refused at start ({existing.rejected}); "
                         "the settings passed in code stay", self._pending)
        elif existing is None:
            try:
                written = schema.write_control(self.logdir, self.config)
                self.watcher.version, self.watcher.settings = written.version, written.settings
                self._in_force = (written.version, written.settings)
                self._pending.say(schema.TAG_PSS_CONTROL_TEXT, f"wrote control.json version "
                                  f"{written.version} with the starting settings")
            except (OSError, ControlError) as err:
                self._reject(f"could not write control.json ({err}); the settings passed in "
                             "code stay", self._pending)
        else:  # old smooth-now requests are not replayed (check() recorded the id)
            existing, selected = self._selection_of(replace(existing, smooth_now=False, note=None), 0)
            self._apply(existing, selected, 0, self._pending)
        self._pending.force_log = True
        self._settings_scalars(self._pending)

    def _poll(self, step: int) -> tuple[ControlUpdate | None, list | None]:
        """The control file's news at ``step``, with the layers its settings select."""
        return self._selection_of(self.watcher.poll(step), step)

    def _selection_of(self, update: ControlUpdate | None,
                      step: int) -> tuple[ControlUpdate | None, list | None]:
        """``(update, selected layers)``; new settings whose ``layers`` pattern is invalid or
        too slow to match turn into a rejection, and the watcher keeps what is in force."""
        if update is None or update.settings is None:
            return update, None
        try:
            return update, self._select(update.settings)
        except patterns.PatternError as err:
            self.watcher.version, self.watcher.settings = self._in_force
            return ControlUpdate(rejected=f"version {update.version}: layers "
                                 f"{update.settings.layers!r} refused: {err}"), None

    def _apply(self, update: ControlUpdate | None, selected: list | None, step: int,
               result: PSSStepResult) -> bool:
        """Apply a poll's result (``selected``: the layers of its settings); return whether a
        smooth-now request came with it."""
        if update is None:
            return False
        if update.rejected:
            self._reject(f"step {step}: control.json rejected, previous settings kept: "
                         f"{update.rejected}", result)
            return False
        if update.settings is not None:
            old, new = self.config.to_dict(), update.settings.to_dict()
            changes = {k: new[k] for k in new if new[k] != old[k]}
            self.config, self.selected = update.settings, selected
            self._in_force = (self.watcher.version, self.watcher.settings)
            for det in [self.detector, *self.layer_detectors.values()]:
                det.tau, det.alpha, det.warmup_steps = (self.config.tau, self.config.alpha,
                                                        self.config.warmup_steps)
            self.inputs.settings(self.config.tau, self.config.alpha, self.config.warmup_steps)
            result.say(schema.TAG_PSS_CONTROL_TEXT,
                       f"step {step}: applied control.json version {update.version}: "
                       f"{changes or 'no change'}" + (f" ({update.note})" if update.note else ""))
            log.info("PSS: applied control version %s: %s", update.version, changes)
            result.force_log = True
            self._settings_scalars(result)
        return update.smooth_now

    def _reject(self, message: str, result: PSSStepResult) -> None:
        log.warning("PSS: %s", message)
        result.say(schema.TAG_PSS_CONTROL_TEXT, message)
        result.force_log = True

    def _settings_scalars(self, result: PSSStepResult) -> None:
        cfg = self.config
        result.scalars.update({schema.TAG_PSS_TAU: cfg.tau, schema.TAG_PSS_ALPHA: cfg.alpha,
                               schema.TAG_PSS_ENABLED: float(cfg.enabled),
                               schema.TAG_PSS_CONTROL_VERSION: float(self.watcher.version)})
