"""Architecture-aware scaling: the dynamic-programming path sum against brute-force path
enumeration (plain DFS over the raw ``torch.fx`` graph, written here independently), closed
forms, the learning-rate scale, the initialization and the untraceable-model error."""

from __future__ import annotations

import itertools
import random
import time
from math import comb

import pytest
import torch
import torch.fx as fx
from torch import nn

from monitor.lr import (NoPathError, UntraceableModelError, arch_aware_init_, kernel_size, lr_scale,
                        path_cube_sum, path_moments, trace_layers)
from monitor.lr.arch_scaling import INPUT, OUTPUT

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ------------------------------------------------------------------ brute force
def dfs_path_lengths(succ, start, end, is_layer):
    """Every start-to-end path's layer count, by explicit enumeration."""
    lengths = []

    def walk(v, n):
        n += 1 if is_layer(v) else 0
        if v == end:
            lengths.append(n)
            return
        for w in succ.get(v, ()):
            walk(w, n)

    walk(start, 0)
    return lengths


def brute_force_fx(model):
    """``(number of paths, sum L^3)`` enumerated on the raw fx graph of ``model``."""
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    succ, start, end = {}, [], None
    for node in gm.graph.nodes:
        succ[node] = list(dict.fromkeys(node.users))
        if node.op == "placeholder":
            start.append(node)
        if node.op == "output":
            end = node

    def is_layer(node):
        return node.op == "call_module" and isinstance(modules[node.target], LAYERS)

    lengths = [L for s in start for L in dfs_path_lengths(succ, s, end, is_layer)]
    return len(lengths), sum(L ** 3 for L in lengths)


def moments_vs_dfs(edges, layers, n_nodes):
    """Compare path_moments with DFS on a DAG over nodes 0..n-1 (0 = source, n-1 = sink)."""
    names = [str(i) for i in range(n_nodes)]
    preds = {v: [] for v in names}
    succ = {v: [] for v in names}
    for (a, b), mult in edges.items():
        preds[str(b)].append((str(a), mult))
        succ[str(a)].extend([str(b)] * mult)
    moments = path_moments(names, preds, {str(i) for i in layers}, sources=("0",))
    lengths = dfs_path_lengths(succ, "0", names[-1], lambda v: int(v) in layers)
    assert moments[names[-1]] == (len(lengths), sum(lengths), sum(L ** 2 for L in lengths),
                                  sum(L ** 3 for L in lengths))


# ------------------------------------------------------------------ models
def chain(depth, width=6):
    mods = []
    for i in range(depth):
        mods += [nn.Linear(4 if i == 0 else width, width if i < depth - 1 else 3), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


class ResMLP(nn.Module):
    def __init__(self, blocks, per_block=2, width=8):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(*[m for _ in range(per_block) for m in (nn.Linear(width, width), nn.ReLU())])
            for _ in range(blocks))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def res_closed_form(blocks, per_block):
    """A path takes j of the B residual branches: L = 2 + j * per_block."""
    return sum(comb(blocks, j) * (2 + j * per_block) ** 3 for j in range(blocks + 1))


class DenseCell(nn.Module):
    """NAS-Bench-201-like cell: node k sums a linear map of every earlier node."""

    def __init__(self, nodes=4, width=6):
        super().__init__()
        self.edges = nn.ModuleDict({f"e{i}{k}": nn.Linear(width, width)
                                    for k in range(1, nodes) for i in range(k)})
        self.nodes = nodes

    def forward(self, x):
        feats = [x]
        for k in range(1, self.nodes):
            total = self.edges[f"e0{k}"](feats[0]).relu()
            for i in range(1, k):
                total = total + self.edges[f"e{i}{k}"](feats[i]).relu()
            feats.append(total)
        return feats[-1]


class ShortcutCNN(nn.Module):
    """Small ResNet-like CNN: an identity shortcut and a 1x1 projection shortcut."""

    def __init__(self, k=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, k, padding=k // 2)
        self.a1 = nn.Conv2d(8, 8, k, padding=k // 2)
        self.a2 = nn.Conv2d(8, 8, k, padding=k // 2)
        self.b1 = nn.Conv2d(8, 16, k, stride=2, padding=k // 2)
        self.b2 = nn.Conv2d(16, 16, k, padding=k // 2)
        self.proj = nn.Conv2d(8, 16, 1, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x).relu()
        x = x + self.a2(self.a1(x).relu())
        x = self.proj(x) + self.b2(self.b1(x).relu())
        x = self.bn(x).relu().mean((2, 3))  # (B, 16)
        return self.fc(x)


# ------------------------------------------------------------------ the path sum
@pytest.mark.parametrize("n", [2, 5, 9])
def test_moments_on_chains_and_complete_dags(n):
    chain_edges = {(i, i + 1): 1 for i in range(n - 1)}
    moments_vs_dfs(chain_edges, set(range(1, n - 1)), n)
    complete = {(i, j): 1 for i, j in itertools.combinations(range(n), 2)}
    moments_vs_dfs(complete, set(range(1, n - 1)), n)


@pytest.mark.parametrize("seed", range(5))
def test_moments_on_random_dags_with_multiple_edges(seed):
    rng = random.Random(seed)
    n = 9
    edges = {(i, j): rng.choice([1, 1, 2, 3]) for i, j in itertools.combinations(range(n), 2)
             if rng.random() < 0.5}
    edges.setdefault((0, n - 1), 1)
    layers = {v for v in range(n) if rng.random() < 0.7}
    moments_vs_dfs(edges, layers, n)


@pytest.mark.parametrize("make", [lambda: chain(1), lambda: chain(5), lambda: ResMLP(3),
                                  lambda: ResMLP(4, per_block=1), lambda: DenseCell(4),
                                  lambda: DenseCell(5), lambda: ShortcutCNN()],
                         ids=["chain1", "chain5", "res3", "res4x1", "dense4", "dense5", "cnn"])
def test_dp_equals_enumeration_on_traced_models(make):
    model = make()
    n_paths, cubes = brute_force_fx(model)
    assert n_paths > 0
    dag = trace_layers(model)
    moments = path_moments(dag.nodes, dag.predecessors(), set(dag.layers))
    assert moments[OUTPUT][0] == n_paths
    assert path_cube_sum(model) == cubes


def test_closed_forms():
    assert path_cube_sum(chain(6)) == 6 ** 3
    assert path_cube_sum(ResMLP(5, per_block=3)) == res_closed_form(5, 3)
    # ShortcutCNN by hand: stem, {skip | a1 a2}, {proj | b1 b2}, fc
    assert path_cube_sum(ShortcutCNN()) == sum((2 + a + b) ** 3 for a in (0, 2) for b in (1, 2))


def test_hundred_block_residual_network():
    model = ResMLP(100, per_block=2, width=4)
    start = time.perf_counter()
    s = path_cube_sum(model)
    elapsed = time.perf_counter() - start
    print(f"100-block residual MLP (2^100 paths): S computed in {elapsed * 1e3:.1f} ms")
    assert s == res_closed_form(100, 2)
    assert s > 2 ** 100


def test_shape_queries_and_reused_inputs_add_no_paths():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h = h.view(h.size(0), -1) * h.shape[1]
            return self.b(h * h)

    assert path_cube_sum(Flat()) == 2 ** 3


def test_functional_layers_count():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(nn.functional.linear(x, self.w).relu() + x)

    dag = trace_layers(Fn())
    assert dag.layers == ["w", "out"]
    assert path_cube_sum(dag) == 2 ** 3 + 1 ** 3


# ------------------------------------------------------------------ scale and init
def test_lr_scale_values():
    assert lr_scale(chain(2), chain(4)) == pytest.approx((64 / 8) ** -0.5)
    assert lr_scale(chain(4), chain(2)) == pytest.approx(8 ** 0.5)
    assert lr_scale(ResMLP(2), ResMLP(6)) == pytest.approx(
        (res_closed_form(6, 2) / res_closed_form(2, 2)) ** -0.5)
    assert kernel_size(ShortcutCNN(3)) == 3 and kernel_size(ShortcutCNN(5)) == 5
    assert kernel_size(chain(3)) == 1
    assert lr_scale(ShortcutCNN(3), ShortcutCNN(5)) == pytest.approx(3 / 5)


def test_in_degrees_and_init_variances():
    torch.manual_seed(0)
    model = ResMLP(3, per_block=2, width=256)
    dag = arch_aware_init_(model)
    # the last layer of each residual branch writes into x + branch: in-degree 2
    assert dag.in_degree["blocks.0.2"] == 2 and dag.in_degree["blocks.0.0"] == 1
    assert dag.in_degree["inp"] == 1  # its output branches out: a node of its own
    assert dag.readouts == ["out"]
    cell = DenseCell(4, width=6)
    cell_dag = trace_layers(cell)
    assert cell_dag.in_degree["edges.e03"] == 3 and cell_dag.in_degree["edges.e01"] == 1
    expected = {"inp": 2 / 4, "blocks.0.0": 2 / 256, "blocks.0.2": 2 / (256 * 2),
                "out": 1 / 256 ** 2}
    for name, var in expected.items():
        w = model.get_submodule(name).weight
        assert w.var().item() == pytest.approx(var, rel=0.1 if w.numel() > 1000 else 0.6), name
        assert torch.count_nonzero(model.get_submodule(name).bias) == 0


def test_untraceable_model_names_the_module():
    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), Gate()), nn.Linear(3, 1))
    with pytest.raises(UntraceableModelError, match=r"'1\.1' \(Gate\)"):
        path_cube_sum(model)
    with pytest.raises(ValueError, match="no input-to-output path"):
        lr_scale(chain(2), nn.Sequential(nn.ReLU()))


def test_input_node_is_named():
    dag = trace_layers(chain(2))
    assert dag.edges == {(INPUT, "0"): 1, ("0", "2"): 1, ("2", OUTPUT): 1}


# ------------------------------------------------------------------ zero edges (NAS-201 "none")
class Zero(nn.Module):
    """The official NAS-201 ``Zero`` op (same channels, stride 1): ``x.mul(0.)``."""

    def forward(self, x):
        return x.mul(0.)


class Cell201(nn.Module):
    """A NAS-Bench-201 cell between a conv stem and a linear classifier. ``genotype`` like
    ``"3_00_003"``: node k (1..3) sums op(node j) for j < k; ops 0 none, 1 skip,
    2 conv 1x1, 3 conv 3x3, 4 avg-pool 3x3 (as in the official ``arch_code_201``)."""

    def __init__(self, genotype, zero=Zero, c=4):
        super().__init__()
        self.codes = [[int(ch) for ch in node] for node in genotype.split("_")]
        self.stem = nn.Conv2d(3, c, 3, padding=1)

        def op(code):
            if code in (2, 3):
                return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 2 * code - 3, padding=code - 2),
                                     nn.BatchNorm2d(c))
            return {0: zero, 1: nn.Identity, 4: lambda: nn.AvgPool2d(3, 1, 1)}[code]()

        self.ops = nn.ModuleList(nn.ModuleList(op(code) for code in node) for node in self.codes)
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        nodes = [self.stem(x)]
        for ops in self.ops:
            nodes.append(sum(f(nodes[j]) for j, f in enumerate(ops)))
        return self.fc(nodes[-1].mean((2, 3)))


def genotype_paths(genotype):
    """Layer counts of every input-output path, enumerated on the genotype itself as the
    official ``dag_utils.find_all_paths`` does (none edges skipped), plus stem and fc."""
    codes = [[int(ch) for ch in node] for node in genotype.split("_")]
    lengths = []

    def walk(node, n):
        if node == len(codes):
            lengths.append(n + 2)
            return
        for k in range(node + 1, len(codes) + 1):
            code = codes[k - 1][node]
            if code:
                walk(k, n + (code in (2, 3)))

    walk(0, 0)
    return lengths


class ZeroMul(nn.Module):
    def forward(self, x):
        return x * 0


class ZerosLike(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("zero", [Zero, ZeroMul, ZerosLike])
def test_zero_branch_is_no_edge(zero):
    """A toy chain of three layers whose middle one is bypassed by a zero branch: the
    bypass is no path, S = 3^3 = 27 (it was 27 + 2^3 = 35)."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.z = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2), zero()

        def forward(self, x):
            h = self.a(x).relu()
            return self.c((self.b(h) + self.z(h)).relu())

    assert path_cube_sum(Toy()) == 27
    dag = trace_layers(Toy())
    assert dag.in_degree["b"] == 1  # the zero branch is no branch of the sum


def test_cell_without_path_is_rejected():
    with pytest.raises(NoPathError, match="no input-to-output path"):
        path_cube_sum(Cell201("3_00_003"))
    with pytest.raises(NoPathError):
        arch_aware_init_(Cell201("0_00_000"))
    with pytest.raises(ValueError, match="no input-to-output path"):
        lr_scale(Cell201("1_01_001"), Cell201("3_00_003", zero=ZeroMul))


def test_nas201_cells_match_genotype_enumeration():
    """S of traced NAS-201 cells (zero edges written three ways) equals the sum over the
    genotype's own path list; in-degrees count only non-zero edges."""
    rng = random.Random(0)
    genotypes = ["3_33_333", "1_01_001", "2_02_002", "3_01_310", "0_30_013", "4_14_240"]
    genotypes += ["_".join("".join(str(rng.randrange(5)) for _ in range(k)) for k in (1, 2, 3))
                  for _ in range(25)]
    checked = 0
    for g in genotypes:
        lengths = genotype_paths(g)
        zero = (Zero, ZeroMul, ZerosLike)[checked % 3]
        if not lengths:
            with pytest.raises(NoPathError):
                path_cube_sum(Cell201(g, zero=zero))
            continue
        assert path_cube_sum(Cell201(g, zero=zero)) == sum(L ** 3 for L in lengths), g
        checked += 1
    assert checked >= 15
    dag = trace_layers(Cell201("3_30_033"))
    # node 3 sums conv(node 1) + conv(node 2) + a zero edge: in-degree 2, not 3
    assert dag.in_degree["ops.2.1.1"] == 2 and dag.in_degree["ops.2.2.1"] == 2


def test_depth_offset_counts_official_depth():
    """depth_offset=1 sums (L + 1)^3, the official MLP/CNN count (edges + 3)."""
    lengths = genotype_paths("3_33_333")
    assert path_cube_sum(Cell201("3_33_333"), depth_offset=1) == sum((L + 1) ** 3 for L in lengths)
    assert lr_scale(chain(2), chain(4), depth_offset=1) == pytest.approx((125 / 27) ** -0.5)


def test_identity_skip_stack_grows_as_documented():
    """arch_aware_init_ on x + W2 relu(W1 x) blocks: E[z^2] grows about 1.5x per block
    (the documented limitation), not constant."""
    class PreAct(nn.Module):
        def __init__(self, width=512):
            super().__init__()
            self.inp = nn.Linear(4, width)
            self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(width, width))
                                        for _ in range(8))
            self.out = nn.Linear(width, 3)

        def forward(self, x):
            x = self.inp(x)
            for block in self.blocks:
                x = x + block(x)
            return self.out(x)

    torch.manual_seed(0)
    model = PreAct()
    dag = arch_aware_init_(model)
    assert dag.in_degree["blocks.0.1"] == 2
    with torch.no_grad():
        z = model.inp(torch.randn(4096, 4))
        moments = [z.pow(2).mean().item()]
        for block in model.blocks:
            z = z + block(z)
            moments.append(z.pow(2).mean().item())
    ratios = [b / a for a, b in zip(moments, moments[1:])]
    assert all(1.3 < r < 1.7 for r in ratios), ratios
