"""The contract between the training side and its readers (SPEC section 5).

Tag names, metric keys, run-directory file names and the PSS control-file schema are
defined here, once. The hook, the writer, PSS and the dashboard all import this module;
it imports nothing but the standard library (and ``monitor.safe_io``, which imports only
the standard library), so the dashboard can use it without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from monitor import patterns, safe_io

# ---------------------------------------------------------------------------------------
# Metric keys and tags
# ---------------------------------------------------------------------------------------

# Per-tensor metric keys (``<key>/<parameter name>``): use these names, not string literals.
STABLE_RANK = "stable_rank"  # ||M||_F^2 / sigma_1^2, in [1, rank]; falls before a "singularity"
SIGMA_MAX = "sigma_max"  # sigma_1 of the matrix view (Lanczos, residual-bounded; SPEC 6)
SJE = "sje"  # stable Jacobian energy: gradient energy in the top-k singular subspace, [0, 1]
NTK_EIG = "ntk_eig"  # lambda_max of the per-layer cosine NTK over a probe of n samples, [1, n]
GRAD_NORM = "grad_norm"  # ||G||_F
PARAM_NORM = "param_norm"  # ||W||_F
UPDATE_RATIO = "update_ratio"  # ||W_after - W_before||_F / ||W_before||_F of the optimizer step
LR = "lr"  # learning rate the optimizer applied: group lr x trust ratio (LARS/LAMB/TVLARS)
LR_EFFECTIVE = "lr_effective"  # measured ||W_after - W_before||_F / ||G||_F

#: Per-tensor metric keys, in the order the README documents them.
METRIC_KEYS: tuple[str, ...] = (STABLE_RANK, SIGMA_MAX, SJE, NTK_EIG, GRAD_NORM, PARAM_NORM,
                                UPDATE_RATIO, LR, LR_EFFECTIVE)

#: Metrics that need a matrix view (ndim >= 2, SPEC 1).
SPECTRAL_KEYS: frozenset[str] = frozenset({STABLE_RANK, SIGMA_MAX, SJE, NTK_EIG})

# Global tags (``<group>/<name>``).
TAG_LOSS = "train/loss"
TAG_GLOBAL_GRAD_NORM = "train/grad_norm"  # before the user's clipping (monitor/preclip.py)
TAG_GLOBAL_GRAD_NORM_APPLIED = "train/grad_norm_applied"  # after it; written when they differ
TAG_NONFINITE_GRAD = "health/nonfinite_grad"  # count of non-finite gradient entries
TAG_NONFINITE_WEIGHT = "health/nonfinite_weight"  # count of non-finite weight entries
TAG_METRIC_FAILURES = "health/metric_failures"  # number of (layer, metric) failures this step
TAG_FAILURE_TEXT = "health/failures"  # text: "metric/layer: reason" lines for this step
TAG_UNSUPPORTED = "health/unsupported"  # text, once per layer: a metric it structurally lacks
TAG_SIGMA_UNCONVERGED = "health/sigma_unconverged"  # layers whose sigma_max missed power_tol
#                        this step (not logged; the failure text gives estimate and bound)
TAG_NTK_PROBE = "ntk/probe_size"  # samples the NTK used this step (ntk_eig lies in [1, n])
TAG_SJE_K_MAX = "config/sje_k_max"  # cap on k used by SJE (k = min(max(1, floor(SR)), cap))
TAG_RUN_CONFIG = "config/monitor"  # text: the monitor configuration as JSON
TAG_TOTAL_STEPS = "config/total_steps"  # optional, from the job: planned optimizer steps (ETA)
TAG_MONITOR_SECONDS = "monitor/seconds"  # time in the monitor's own code since the last logged step
TAG_MONITOR_OVERHEAD = "monitor/overhead"  # that time over the wall time of the same interval
#: Text values are written with TensorBoard's text plugin, which stores them under
#: ``<tag>/text_summary`` (torch.utils.tensorboard's convention).
TEXT_SUFFIX = "/text_summary"

# PSS tags (SPEC 3).
TAG_PSS_TRIGGER_RATIO = "pss/trigger_ratio"
TAG_PSS_INTERVENTION = "pss/intervention"
TAG_PSS_TAU = "pss/tau"
TAG_PSS_ALPHA = "pss/alpha"
TAG_PSS_ENABLED = "pss/enabled"
TAG_PSS_CONTROL_VERSION = "pss/control_version"
TAG_PSS_CONTROL_TEXT = "pss/control"  # text: applied / rejected control files, with reasons
TAG_PSS_EVENTS = "pss/events"  # text: each intervention: step, reason, layers, k, sigma, SR
# Alerts (SPEC 8): ``alert/<rule>`` is 1.0 at a step where the rule fired.
TAG_ALERT_EVENTS = "alert/events"  # text: each firing: step, rule, layer, value, threshold
TAG_ALERT_SUPPRESSED = "alert/suppressed"  # firings silenced by the storm limit, so far
TAG_ALERT_CALLBACK_ERRORS = "alert/callback_errors"  # on_alert calls that raised, so far


def alert_tag(rule: str) -> str:
    """Tag of an alert rule's firings: ``alert/<rule>``."""
    return f"alert/{rule}"


#: Per smoothed layer, at each intervention (``<key>/<parameter name>``).
PSS_LAYER_METRICS: tuple[str, ...] = (
    "pss_sr_before",
    "pss_sr_after",
    "pss_sigma_before",
    "pss_sigma_after",
    "pss_k",
)

#: Files a run directory may hold besides event files.
CONTROL_FILENAME = "control.json"
RUN_FILENAME = "run.json"  # {"status": RUN_STATES[i], "layers": [...], "pid": ..., ...}
PSS_INPUT_FILENAME = "pss_input.bin"  # the PSS detector's input at every step (pss/inputs.py)
#: ``run.json`` states the job writes: running, then how it ended.
RUN_STATES: tuple[str, ...] = ("running", "finished", "interrupted", "crashed")


def layer_tag(metric: str, layer: str) -> str:
    """Tag of a per-tensor metric: ``<metric>/<parameter name>``."""
    return f"{metric}/{layer}"


def split_tag(tag: str) -> tuple[str, str]:
    """Split a tag into ``(metric or group, layer or name)`` at the first slash."""
    head, _, tail = tag.partition("/")
    return head, tail


def is_layer_tag(tag: str) -> bool:
    head, _ = split_tag(tag)
    return head in METRIC_KEYS or head in PSS_LAYER_METRICS


# ---------------------------------------------------------------------------------------
# PSS settings and the live control file (SPEC 3, "Live control")
# ---------------------------------------------------------------------------------------

PSS_METHODS: tuple[str, ...] = ("conv", "softmax", "log", "softplus", "clip")

#: Bounds of the control file's numbers. A version (and a smooth-now request id) counts
#: writes, so 2^24 is never reached by counting, and float32 (the ``pss/control_version``
#: scalar) holds every integer up to 2^24 exactly, so the acknowledgement is exact.
MAX_VERSION = 2**24
#: Integer settings (steps, window, k): far beyond any use, and exact in float and in the
#: dashboard's number inputs (JavaScript numbers are exact up to 2^53).
MAX_SETTING_INT = 2**31 - 1
#: ``c`` of the log and softplus functions. As c -> 0 both become ``clip`` and as c -> inf
#: the identity, so nothing useful lies outside; below it (s - s_k) / c can overflow
#: float64 and the smoothed weight become NaN (5e-324 did).
C_RANGE = (1e-6, 1e6)
MAX_LAYERS_PATTERN = 1000  # characters of the ``layers`` regular expression
#: A control file holds a few hundred bytes; a larger one is refused unread.
MAX_CONTROL_BYTES = 64 * 1024


class ControlError(ValueError):
    """A PSS setting or control file was rejected; the message names the field and range."""


@dataclass(frozen=True)
class PSSConfig:
    """Settings of Parametric Singularity Smoothing. Validated at construction.

    The same fields make up the live control file, so the dashboard and the job agree.
    """

    enabled: bool = True  # detection and smoothing on
    tau: float = 2.5  # trigger when g_t / m_{t-1} > tau (the paper's value)
    alpha: float = 0.1  # EMA rate of the gradient-norm average, in (0, 1]
    warmup_steps: int = 100  # no trigger before this many optimizer steps (the EMA settles)
    method: str = "conv"  # smoothing function f, one of PSS_METHODS
    window: int = 3  # conv: moving-average window (odd, >= 1)
    temperature: float | None = None  # softmax: T; None means sigma_1
    c: float | None = None  # log / softplus: scale of the compressed excess; None: sigma_k
    layers: str = ".*"  # regex on parameter names; only matrices (ndim >= 2) are smoothed
    include_embeddings: bool = False  # smooth nn.Embedding weights too
    per_layer: bool = False  # detect on each tensor's gradient norm instead of the global one
    skip_update: bool = False  # drop the triggering step's update (zero grads before step)
    reset_optimizer_state: bool = False  # drop smoothed tensors' optimizer state (moments, step)
    k_min: int = 2  # least k: k = max(k_min, floor(SR)); with 1 (the paper's floor(SR)) PSS
    # does nothing once SR has fallen below 2 (one value, unchanged by every method): SPEC 3
    k_max: int = 64  # cap on the number of smoothed singular values per tensor

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "enabled", self.enabled, "true or false")
        _check(_is_real(self.tau) and self.tau > 1.0, "tau", self.tau, "a number > 1")
        _check(_is_real(self.alpha) and 0.0 < self.alpha <= 1.0, "alpha", self.alpha, "(0, 1]")
        _check(_is_int(self.warmup_steps) and 0 <= self.warmup_steps <= MAX_SETTING_INT,
               "warmup_steps", self.warmup_steps, f"an integer in [0, {MAX_SETTING_INT}]")
        _check(self.method in PSS_METHODS, "method", self.method, f"one of {PSS_METHODS}")
        _check(_is_int(self.window) and 1 <= self.window <= MAX_SETTING_INT
               and self.window % 2 == 1, "window", self.window,
               f"an odd integer in [1, {MAX_SETTING_INT}]")
        _check(self.temperature is None or (_is_real(self.temperature) and self.temperature > 0),
               "temperature", self.temperature, "null or a number > 0")
        _check(self.c is None or (_is_real(self.c) and C_RANGE[0] <= self.c <= C_RANGE[1]),
               "c", self.c, f"null or a number in [{C_RANGE[0]:g}, {C_RANGE[1]:g}]")
        _check(isinstance(self.layers, str) and len(self.layers) <= MAX_LAYERS_PATTERN, "layers",
               self.layers, f"a regular expression of at most {MAX_LAYERS_PATTERN} characters")
        # syntax, and a bounded compile cost (matching is timed: monitor/patterns.py)
        if (why := patterns.problem(self.layers)) is not None:
            raise ControlError(f"layers: {self.layers!r} is not a valid regular expression "
                               f"({why})")
        for name in ("include_embeddings", "per_layer", "skip_update", "reset_optimizer_state"):
            value = getattr(self, name)
            _check(isinstance(value, bool), name, value, "true or false")
        _check(_is_int(self.k_max) and 1 <= self.k_max <= MAX_SETTING_INT, "k_max", self.k_max,
               f"an integer in [1, {MAX_SETTING_INT}]")
        _check(_is_int(self.k_min) and 1 <= self.k_min <= self.k_max, "k_min", self.k_min,
               f"an integer in [1, k_max = {self.k_max}]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PSSConfig":
        """Build from a mapping; unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(data, dict):
            raise ControlError(f"PSS settings must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ControlError(f"unknown PSS setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "PSSConfig":
        return PSSConfig.from_dict({**self.to_dict(), **changes})


def _is_real(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond float's range, e.g. 10**400
        return False


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:  # reprlib: a 60 kB string or a 400-digit number is shown shortened
        raise ControlError(f"{name}: {reprlib.repr(value)} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class ControlFile:
    """The content of ``control.json``: a version, the settings, a one-shot request.

    ``version`` increases with every write (up to ``MAX_VERSION``, then it starts again at
    1); the job applies every valid file whose version or settings differ from those it
    applied last, so a recreated file starting again at 1 is taken too, and acknowledges the
    version (tag ``pss/control_version``, exact up to ``MAX_VERSION``, and a text line
    under ``pss/control``). ``smooth_now`` is a request id: the job smooths once for each
    change of the id to a non-zero value, and for a non-zero id in a file written anew.
    """

    version: int
    settings: PSSConfig = field(default_factory=PSSConfig)
    smooth_now: int = 0

    def to_json(self) -> str:
        body = {"version": self.version, "smooth_now": self.smooth_now,
                "settings": self.settings.to_dict()}
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str = "control file") -> "ControlFile":
        try:
            data = safe_io.parse_json(text, path)
        except safe_io.RefusedFile as err:
            raise ControlError(str(err)) from None
        if not isinstance(data, dict):
            raise ControlError("control file must hold a JSON object")
        unknown = sorted(set(data) - {"version", "settings", "smooth_now"})
        if unknown:
            raise ControlError(f"unknown top-level key(s) {unknown} in control file; "
                               "known: ['settings', 'smooth_now', 'version']")
        version = data.get("version")
        _check(_is_int(version) and 0 <= version <= MAX_VERSION, "version", version,
               f"an integer in [0, {MAX_VERSION}]")
        smooth_now = data.get("smooth_now", 0)
        _check(_is_int(smooth_now) and 0 <= smooth_now <= MAX_VERSION, "smooth_now", smooth_now,
               f"an integer in [0, {MAX_VERSION}]")
        settings = PSSConfig.from_dict(data.get("settings", {}))
        return cls(version=version, settings=settings, smooth_now=smooth_now)


def control_path(logdir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(logdir), CONTROL_FILENAME)


def read_control(logdir: str | os.PathLike[str]) -> ControlFile | None:
    """Read and validate ``control.json``; None when absent. Raises ControlError when invalid.

    Only a regular file of at most ``MAX_CONTROL_BYTES`` is read, without blocking, and a
    symbolic link is refused: a link would let a file elsewhere (another run's, another
    user's) steer this job (``monitor.safe_io``).
    """
    path = control_path(logdir)
    try:
        text = safe_io.decode_text(
            safe_io.read_bytes(path, MAX_CONTROL_BYTES, follow_symlinks=False), path)
    except FileNotFoundError:
        return None
    except safe_io.RefusedFile as err:
        raise ControlError(str(err)) from None
    return ControlFile.from_json(text, path)


def _legible_numbers(path: str) -> tuple[int, int]:
    """``(version, smooth_now)`` read with a regex from a damaged control file, else 0."""
    try:
        data = safe_io.read_bytes(path, MAX_CONTROL_BYTES, follow_symlinks=False)
    except (OSError, ValueError):
        data = b""
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")  # PowerShell's `>`
    text = data.decode("utf-16" if utf16 else "utf-8", errors="replace")
    found = [re.search(rf'"{key}"\s*:\s*(\d{{1,9}})\b', text)
             for key in ("version", "smooth_now")]
    version, request = (min(int(f.group(1)), MAX_VERSION) if f else 0 for f in found)
    return version, request


def _next(count: int) -> int:
    """The counter after ``count``, back to 1 after ``MAX_VERSION`` (the job accepts it)."""
    return count + 1 if count < MAX_VERSION else 1


def write_control(logdir: str | os.PathLike[str], settings: PSSConfig, *,
                  smooth_now: bool = False) -> ControlFile:
    """Atomically write a new version of ``control.json`` (temp file + rename).

    The version is one more than the file's current version (1 when there is none). Over
    an unreadable file it is one more than the version still legible in it, else 1 (the job
    applies any version that differs from its own). With ``smooth_now``, the one-shot
    request id is bumped so the job smooths once. Raises ControlError when ``control.json``
    is a directory (it is not removed: a person put it there).
    """
    if not isinstance(settings, PSSConfig):
        raise TypeError(f"settings must be a PSSConfig, got {type(settings).__name__}")
    logdir = os.fspath(logdir)
    path = control_path(logdir)
    if os.path.isdir(path) and not os.path.islink(path):
        raise ControlError(f"{path} is a directory, so no control file can be written there: "
                           "remove it (the job ignores it meanwhile)")
    try:
        current = read_control(logdir)
        previous, request = (current.version, current.smooth_now) if current else (0, 0)
    except ControlError:
        previous, request = _legible_numbers(path)
    version = _next(previous)
    request = _next(request) if smooth_now else request
    content = ControlFile(version=version, settings=settings, smooth_now=request)
    safe_io.write_text_atomic(path, content.to_json())
    return content
