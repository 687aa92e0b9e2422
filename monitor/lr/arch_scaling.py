"""Architecture-aware learning-rate scaling and initialization (SPEC 4).

Chen, Wu, Wang, Hanin, "Principled Architecture-aware Scaling of Hyperparameters"
(ICLR 2024, arXiv 2402.17440). Seen as a DAG of parameterised layers with skip
connections, a network's maximal learning rate scales as::

    eta* ~ (sum_p L_p^3)^(-1/2) * q^(-1)

where ``L_p`` is the number of parameterised layers on input-to-output path ``p`` and ``q``
the convolution kernel size (q = 1 for an MLP). So::

    eta_target = eta_base * lr_scale(base, target)
    lr_scale   = (S_target / S_base)^(-1/2) * (q_base / q_target),   S = sum_p L_p^3

How the DAG is read (``torch.fx``). The model is traced symbolically. A *layer* is a call
of an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` module (or ``layer_types``), or of
``F.linear`` / ``F.conv1d/2d/3d``. Every other operation passes paths through; an
operation with several tensor inputs (``+``, ``torch.cat``, ...) merges them, so a skip
connection ``x + f(x)`` doubles the paths. Shape queries (``x.size()``, ``x.shape``, ...)
carry no paths. A tensor used twice by one operation counts once.

A *zero operation* is no edge (the "none" op of NAS-Bench-201 cells): a product with a
literal 0 (``x.mul(0.)``, ``x * 0``, ``torch.mul(x, 0)``, the official ``Zero`` module's
forward), ``x.zero_()``, and any creation op that reads only its input's shape
(``torch.zeros_like``, ``x.new_zeros``, ``torch.ones_like``, ...) carry no paths, as in the
official code (``dag_utils.find_all_paths`` skips "none" edges). A layer fed only by zero
operations is no layer of any path, and a model left with no input-to-output path raises
:class:`NoPathError` (the official code rejects such cells, e.g. NAS-201 ``3_00_003``).

How depth is counted. ``L_p`` is the number of parameterised layers on path ``p``: stem,
cell edges and readout alike (``edges + 2`` for the official MLP/CNN cells). The official
code counts differently: its MLP/CNN runs use ``edges + 3`` (our ``L + 1``: ``DEPTHS_BASE =
[3]`` added to the cell's edge count) and its NAS-201 runs ``1 + parameterised edges``
(stem and classifier not counted). We keep the paper's definition (layers on the path);
``depth_offset=c`` sums ``(L_p + c)^3`` instead, so ``depth_offset=1`` gives the official
MLP/CNN count. On plain chains trained with the paper's protocol the fitted slope of log
best lr against log predicted scale is 0.90 with our count and 1.10 with ``L + 1``
(``benchmarks/results/lr_papers.md``): neither count is clearly the better one there.

How ``q`` is read. ``q`` is the largest spatial kernel side over the model's convolutions
(3 for a 3x3 kernel, 5 for 5x5; the largest side of a non-square kernel), 1 without
convolutions. The paper's derivation assumes one kernel size throughout; with mixed sizes
the largest is our (conservative) choice.

The sum ``S = sum_p L_p^3`` is computed by dynamic programming over path-length moments:
each node keeps ``(N, sum L, sum L^2, sum L^3)`` over the paths reaching it; a layer maps
``L -> L + 1`` by the binomial expansion of ``(L + 1)^k``; a merge adds its inputs'
moments. The cost is linear in the graph, even where the number of paths is exponential
(a 100-block residual network has 2^100 paths). Integers are exact Python ints.

Initialization (:func:`arch_aware_init_`): hidden weights ``N(0, 2 / (fan_in * d_in))``
where ``d_in`` is the in-degree of the node the layer's output is summed into (the number
of branches of that sum, skip connections included; 1 without a sum, and 1 when the layer's
output also feeds other operations, since it is then a node of its own), readout weights
(layers whose output reaches the model's output with no layer in between)
``N(0, 1 / fan_in^2)`` as in muP, biases zero. The paper gives one global learning rate,
not a per-layer one. Zero branches do not count in ``d_in``.

The init keeps the second moment of each *cell node* constant when every branch into it is
a parameterised layer. An identity skip is a branch too (``d_in = 2`` for ``x + f(x)``) but
is not rescaled, so in a residual stack ``x + f(x)`` with ``f = Linear(ReLU(.))`` the second
moment grows by ``1 + 2/(2*2) = 1.5`` per block (measured ``E[z^2]`` 2.0 -> 48.9 over 8 blocks);
the paper's derivation covers cells whose skips are summed with parameterised branches,
not deep stacks of identity skips.
"""

from __future__ import annotations

import builtins
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerDAG", "UntraceableModelError", "NoPathError", "trace_layers", "path_moments",
           "path_cube_sum", "kernel_size", "lr_scale", "arch_aware_init_", "INPUT", "OUTPUT"]

INPUT, OUTPUT = "<input>", "<output>"
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONAL_LAYERS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "stride", "type",
                  "get_device", "is_contiguous"}
_ADDS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MULS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
# creation ops that read only their input's shape/dtype/device: no data flows through them
_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                   torch.rand_like, torch.randn_like, torch.randint_like}
_NEW_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zero_"}

Moments = tuple[int, int, int, int]  # (N, sum L, sum L^2, sum L^3) over paths


class UntraceableModelError(RuntimeError):
    """The model cannot be traced by ``torch.fx``; the message names the failing module."""


class NoPathError(ValueError):
    """No input-to-output path survives (every route passes a zero operation)."""


@dataclass
class LayerDAG:
    """The model as a DAG of parameterised layers.

    ``layers`` are names in topological order (module paths, or the weight's attribute path
    for functional calls); ``edges[(a, b)]`` is the number of distinct paths from ``a`` to
    ``b`` that pass no other layer (``a`` may be ``INPUT``, ``b`` may be ``OUTPUT``).
    """

    layers: list[str]
    edges: dict[tuple[str, str], int]
    weights: dict[str, nn.Parameter] = field(default_factory=dict)
    fan_in: dict[str, int] = field(default_factory=dict)
    kernel: dict[str, int] = field(default_factory=dict)  # largest spatial side; 1 for Linear
    in_degree: dict[str, int] = field(default_factory=dict)  # of the node each layer feeds

    @property
    def nodes(self) -> list[str]:
        return [INPUT, *self.layers, OUTPUT]

    def predecessors(self) -> dict[str, list[tuple[str, int]]]:
        preds: dict[str, list[tuple[str, int]]] = {n: [] for n in self.nodes}
        for (a, b), mult in self.edges.items():
            preds[b].append((a, mult))
        return preds

    @property
    def readouts(self) -> list[str]:
        return [a for (a, b) in self.edges if b == OUTPUT and a != INPUT]


# ------------------------------------------------------------------ dynamic programming
def _shift(m: Moments) -> Moments:
    """Moments of L + 1 from those of L: binomial expansion of (L + 1)^k."""
    n, s1, s2, s3 = m
    return n, s1 + n, s2 + 2 * s1 + n, s3 + 3 * s2 + 3 * s1 + n


def path_moments(order: Sequence[str], preds: dict[str, list[tuple[str, int]]],
                 is_layer: dict[str, bool] | set[str], sources: Sequence[str] = (INPUT,)
                 ) -> dict[str, Moments]:
    """``(N, sum L, sum L^2, sum L^3)`` over all paths from ``sources`` to each node.

    ``order`` is a topological order; ``preds[v]`` lists ``(u, multiplicity)``; a node in
    ``is_layer`` adds 1 to the length of every path through it (itself included when it
    is the endpoint). Linear in nodes plus edges, whatever the number of paths."""
    layer = (lambda v: v in is_layer) if isinstance(is_layer, set) else (
        lambda v: bool(is_layer.get(v, False)))
    out: dict[str, Moments] = {}
    for v in order:
        n = s1 = s2 = s3 = 0
        if v in sources:
            n = 1
        for u, mult in preds.get(v, ()):
            un, u1, u2, u3 = out[u]
            n, s1, s2, s3 = n + mult * un, s1 + mult * u1, s2 + mult * u2, s3 + mult * u3
        m = (n, s1, s2, s3)
        out[v] = _shift(m) if layer(v) else m
    return out


# ------------------------------------------------------------------ tracing
class _Tracer(fx.Tracer):
    """An fx tracer that keeps ``layer_types`` as leaves and remembers which module was
    being traced when tracing failed."""

    def __init__(self, layer_types: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.layer_types = layer_types
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.layer_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                try:
                    self.failed_at = self.path_of_module(m) or "<root>"
                except NameError:
                    self.failed_at = type(m).__name__
            raise


def _trace(model: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> fx.Graph:
    tracer = _Tracer(layer_types)
    try:
        return tracer.trace(model)
    except Exception as err:
        where = tracer.failed_at or "<root>"
        part = model if where == "<root>" else model.get_submodule(where)
        raise UntraceableModelError(
            f"cannot trace {type(model).__name__} with torch.fx: the forward of module "
            f"{where!r} ({type(part).__name__}) is not symbolically traceable "
            f"({type(err).__name__}: {err}). Remove data-dependent Python control flow "
            "from that forward (or wrap it in a traceable module), then retry."
        ) from err


def _is_shape(node: fx.Node, shape: set[fx.Node]) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is builtins.getattr:
        return True
    inputs = node.all_input_nodes
    return (node.op in ("call_function", "call_method") and bool(inputs)
            and all(i in shape for i in inputs))


def _is_zero(node: fx.Node) -> bool:
    """A zero operation: its output carries no paths whatever its inputs (see the module
    docstring): a product with a literal 0, ``zero_()``, or a ``*_like``/``new_*`` creation."""
    if node.op == "call_function" and node.target in _LIKE_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target in _NEW_METHODS:
        return True
    is_mul = ((node.op == "call_function" and node.target in _MULS)
              or (node.op == "call_method" and node.target in _MUL_METHODS))
    return is_mul and any(type(a) in (int, float) and a == 0
                          for a in (*node.args, *node.kwargs.values()))


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def _layer_of(node: fx.Node, model: nn.Module, layer_types) -> tuple[str, nn.Parameter] | None:
    """(name, weight) when ``node`` is a parameterised layer, else None."""
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if isinstance(mod, layer_types) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            return node.target, mod.weight
    if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w.op == "get_attr":
            try:
                return w.target, model.get_parameter(w.target)
            except AttributeError:
                return None
        return node.name, None
    return None


def trace_layers(model: nn.Module, layer_types: Sequence[type[nn.Module]] | None = None
                 ) -> LayerDAG:
    """Trace ``model`` with ``torch.fx`` and contract its graph to the DAG of layers.

    Raises :class:`UntraceableModelError` naming the module whose forward cannot be traced.
    """
    types = tuple(layer_types) if layer_types else DEFAULT_LAYER_TYPES
    graph = _trace(model, types)
    shape: set[fx.Node] = set()
    reach: dict[fx.Node, Counter] = {}  # node -> {last layer or INPUT: number of paths}
    dag = LayerDAG(layers=[], edges={})
    node_layer: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            reach[node] = Counter({INPUT: 1})
            continue
        if _is_shape(node, shape) or _is_zero(node):
            shape.add(node)  # carries no paths
            continue
        incoming: Counter = Counter()
        for i in dict.fromkeys(node.all_input_nodes):  # distinct inputs, in order
            if i not in shape and i in reach:
                incoming.update(reach[i])
        if node.op == "output":
            for src, mult in incoming.items():
                dag.edges[(src, OUTPUT)] = dag.edges.get((src, OUTPUT), 0) + mult
            continue
        found = _layer_of(node, model, types)
        if found is None:
            if incoming:
                reach[node] = incoming
            continue
        name, weight = found
        if name in node_layer.values():  # a module called twice: a second node of the DAG
            name = f"{name}#{sum(1 for v in node_layer.values() if v.split('#')[0] == name)}"
        node_layer[node] = name
        dag.layers.append(name)
        for src, mult in incoming.items():
            dag.edges[(src, name)] = mult
        if incoming:  # a layer fed only by zero operations starts no path
            reach[node] = Counter({name: 1})
        if weight is not None:
            dag.weights[name] = weight
            dag.fan_in[name] = int(weight[0].numel())
            dag.kernel[name] = max(weight.shape[2:], default=1)
    if path_moments(dag.nodes, dag.predecessors(), set(dag.layers))[OUTPUT][0] == 0:
        raise NoPathError(
            f"{type(model).__name__} has no input-to-output path: every route to the output "
            "passes a zero operation (x.mul(0), a Zero module, zeros_like, ...), so the "
            "path sum is empty and no learning rate can be scaled from it. The official code "
            "rejects such cells too (e.g. NAS-201 '3_00_003'); leave this architecture out.")
    dag.in_degree = {name: _sum_in_degree(node, set(reach), set(node_layer))
                     for node, name in node_layer.items()}
    return dag


def _add_leaves(node: fx.Node, live: set[fx.Node]) -> int:
    """Number of branches carrying paths (``live``) summed by the addition tree rooted at
    ``node``: zero branches, constants and parameters added in (biases) do not count."""
    total = 0
    for i in dict.fromkeys(node.all_input_nodes):
        if _is_add(i) and len(i.users) == 1:
            total += _add_leaves(i, live)
        elif i in live:
            total += 1
    return total


def _sum_in_degree(node: fx.Node, live: set[fx.Node], layer_nodes: set[fx.Node]) -> int:
    """In-degree of the DAG node the layer writes into. Follow the layer's output through
    single-input operations (activations, norms, pooling) while it has a single user; if
    that reaches a sum, the node is the root of that addition tree and its in-degree the
    number of branches summed (skip connections included). Otherwise (the output branches
    out, is concatenated, or reaches another layer) the layer's output is itself the node,
    with in-degree 1."""
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if user.op == "output" or user in layer_nodes:
            return 1
        if _is_add(user):
            while len(user.users) == 1 and _is_add(next(iter(user.users))):
                user = next(iter(user.users))
            return max(1, _add_leaves(user, live))
        if len([i for i in user.all_input_nodes if i in live]) != 1:
            return 1
        current = user
    return 1


# ------------------------------------------------------------------ the public quantities
def _dag(model_or_dag: nn.Module | LayerDAG) -> LayerDAG:
    return model_or_dag if isinstance(model_or_dag, LayerDAG) else trace_layers(model_or_dag)


def path_cube_sum(model_or_dag: nn.Module | LayerDAG, depth_offset: int = 0) -> int:
    """``S = sum over input-to-output paths p of (L_p + c)^3``, ``c = depth_offset``
    (0: the paper's layer count; 1: the official MLP/CNN code's), by dynamic programming:
    ``sum (L + c)^3 = S3 + 3c S2 + 3c^2 S1 + c^3 N`` from the path-length moments."""
    dag = _dag(model_or_dag)
    n, s1, s2, s3 = path_moments(dag.nodes, dag.predecessors(), set(dag.layers))[OUTPUT]
    c = depth_offset
    return s3 + 3 * c * s2 + 3 * c * c * s1 + c ** 3 * n


def kernel_size(model_or_dag: nn.Module | LayerDAG) -> int:
    """``q``: the largest spatial kernel side over the convolutions (1 for an MLP)."""
    return max(_dag(model_or_dag).kernel.values(), default=1)


def lr_scale(base_model: nn.Module | LayerDAG, target_model: nn.Module | LayerDAG,
             depth_offset: int = 0) -> float:
    """``eta_target / eta_base = (S_target / S_base)^(-1/2) * q_base / q_target``
    (``depth_offset``: see :func:`path_cube_sum`)."""
    base, target = _dag(base_model), _dag(target_model)
    s_base = path_cube_sum(base, depth_offset)
    s_target = path_cube_sum(target, depth_offset)
    for label, s in (("base", s_base), ("target", s_target)):
        if s == 0:
            raise ValueError(f"lr_scale: the {label} model has no input-to-output path through "
                             "a parameterised layer (S = 0); is it traced as expected?")
    return (s_target / s_base) ** -0.5 * kernel_size(base) / kernel_size(target)


@torch.no_grad()
def arch_aware_init_(model: nn.Module, generator: torch.Generator | None = None) -> LayerDAG:
    """Re-initialize every traced layer in place: hidden weights ``N(0, 2/(fan_in * d_in))``,
    readout weights ``N(0, 1/fan_in^2)``, biases zero. Returns the traced DAG."""
    dag = trace_layers(model)
    readouts = set(dag.readouts)
    for name in dag.layers:
        weight = dag.weights.get(name)
        if weight is None:
            continue
        fan_in = dag.fan_in[name]
        var = 1.0 / fan_in ** 2 if name in readouts else 2.0 / (fan_in * dag.in_degree[name])
        weight.normal_(0.0, var ** 0.5, generator=generator)
        module_name = name.split("#")[0]
        try:
            bias = getattr(model.get_submodule(module_name), "bias", None)
        except AttributeError:
            bias = None
        if isinstance(bias, nn.Parameter):
            bias.zero_()
    return dag
