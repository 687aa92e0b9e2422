"""Per-layer cosine NTK from hooks vs explicit per-sample gradients (torch.func)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from monitor.metrics import ntk, ntk_capture
from monitor.metrics.ntk import cosine_top_eig
from monitor.metrics.ntk_capture import NTKCapture

B, N = 6, 4  # batch size, probe size


class Conv1D(nn.Module):
    """Mimics Hugging Face's GPT-2 Conv1D: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Tied(nn.Module):
    """Embedding and output head sharing one weight (GPT-2's wte / lm_head)."""

    def __init__(self, vocab: int = 13, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))  # (B, T, vocab)


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module, out_features: int) -> None:
        super().__init__()
        self.conv = conv
        self.fc = nn.LazyLinear(out_features)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x), inplace=True).flatten(1))


def mse(out, y):
    return (out - y).pow(2).mean()


def xent(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def case(name: str):
    """(model, inputs, targets, loss) of each supported layer type."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "linear_2d":
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), r(B, 5), r(B, 3), mse
    if name == "linear_3d":
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), r(B, 4, 5), r(B, 4, 3), mse
    if name == "conv1d_hf":
        return nn.Sequential(Conv1D(8, 5), nn.Tanh(), Conv1D(3, 8)), r(B, 4, 5), r(B, 4, 3), mse
    if name.startswith("conv"):
        conv, shape = {
            "conv2d": (nn.Conv2d(3, 4, 3, stride=2, padding=1), (B, 3, 6, 6)),
            "conv2d_groups": (nn.Conv2d(4, 6, (3, 2), groups=2, dilation=(1, 2)), (B, 4, 6, 7)),
            "conv2d_same_reflect": (nn.Conv2d(2, 3, 4, padding="same", padding_mode="reflect"),
                                    (B, 2, 5, 5)),
            "conv2d_same": (nn.Conv2d(2, 3, (4, 3), padding="same", dilation=(2, 1)), (B, 2, 7, 6)),
            "conv1d": (nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (B, 3, 9)),
            "conv3d": (nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (B, 2, 3, 4, 3)),
        }[name]
        model = ConvNet(conv, 2)
        x = r(*shape)
        model(x)  # materialise the lazy layer
        return model, x, r(B, 2), mse
    if name == "embedding":
        model = nn.Sequential(nn.Embedding(11, 6, padding_idx=0), nn.Tanh(), nn.Linear(6, 2))
        idx = torch.randint(0, 11, (B, 5), generator=g)
        idx[:, 0] = 0  # some padding
        idx[1, 2] = idx[2, 3] = 4  # shared tokens across samples
        return model, idx, r(B, 5, 2), mse
    if name == "tied":
        return Tied(), torch.randint(0, 13, (B, 5), generator=g), torch.randint(0, 13, (B, 5),
                                                                               generator=g), xent
    raise KeyError(name)


CASES = ["linear_2d", "linear_3d", "conv1d_hf", "conv2d", "conv2d_groups", "conv2d_same_reflect",
         "conv2d_same", "conv1d", "conv3d", "embedding", "tied"]


def reference(model: nn.Module, x, y, loss_fn, n: int) -> dict[str, float]:
    """λ_max of the cosine kernel of explicit per-sample gradients (vmap(grad) over samples)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x[:n], y[:n])
    out = {}
    for name, g in grads.items():
        if g.ndim < 3:  # biases: not matrices
            continue
        g = g.reshape(n, -1).double()
        norms = g.norm(dim=1)
        K = (g @ g.t()) / (norms[:, None] * norms[None, :])
        out[name] = torch.linalg.eigvalsh(K)[-1].item()
    return out


def captured(model: nn.Module, x, y, loss_fn, n: int = N):
    names = {id(p): name for name, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=n)
    cap.arm()
    loss_fn(model(x), y).backward()  # the ordinary training backward, mean-reduced loss
    values, errors = cap.compute()
    cap.disarm()
    return values, errors


FORCED = ["linear_3d", "conv1d_hf", "conv2d", "embedding", "tied"]  # both code paths forced


@pytest.mark.parametrize("name,strategy", [(c, "auto") for c in CASES]
                         + [(c, s) for c in FORCED for s in ("t2", "explicit")])
def test_ntk_matches_per_sample_gradients(name, strategy, monkeypatch):
    if strategy != "auto":
        monkeypatch.setattr(ntk, "use_t2_trick", lambda usages, s=strategy: (
            s == "t2" and not any(isinstance(u, ntk.PerSample) for u in usages)))
    model, x, y, loss_fn = case(name)
    ref = reference(model, x, y, loss_fn, N)
    values, errors = captured(model, x, y, loss_fn)
    assert errors == {}
    assert set(values) == set(ref)
    for layer, value in values.items():
        assert value == pytest.approx(ref[layer], rel=1e-4), layer
        assert 1 - 1e-6 <= value <= N + 1e-6


def test_tied_gram_includes_cross_terms():
    model, x, y, loss_fn = case("tied")
    names = {id(model.emb.weight): "emb.weight"}
    cap = NTKCapture(model, names, n=N)
    cap.arm()
    loss_fn(model(x), y).backward()
    gram = cap.gram("emb.weight")
    assert len(cap._captures["emb.weight"]) == 2  # the embedding and the head
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: loss_fn(functional_call(model, p, (xi[None],)), yi[None])),
             in_dims=(None, 0, 0))(params, x[:N], y[:N])["emb.weight"].reshape(N, -1)
    # batch loss = mean of the B sample losses: each captured per-sample gradient is g_i / B
    torch.testing.assert_close(gram, (g @ g.t()) / B ** 2, rtol=1e-4, atol=1e-8)
    cap.disarm()


def test_cosine_top_eig_reference_values():
    g = torch.randn(5, 8)
    assert cosine_top_eig(g @ g.t()) == pytest.approx(
        torch.linalg.eigvalsh(torch.nn.functional.normalize(g.double(), dim=1)
                              @ torch.nn.functional.normalize(g.double(), dim=1).t())[-1].item(),
        rel=1e-6)
    same = torch.randn(1, 8).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert cosine_top_eig(same @ same.t()) == pytest.approx(4.0)
    assert cosine_top_eig(torch.eye(3) * torch.tensor([1.0, 5.0, 2.0])) == pytest.approx(1.0)


def test_zero_gradient_samples_are_dropped():
    g = torch.randn(4, 6)
    g[1] = 0
    full = cosine_top_eig(g @ g.t())
    kept = g[[0, 2, 3]]
    assert full == pytest.approx(cosine_top_eig(kept @ kept.t()))
    g[2:] = 0
    with pytest.raises(ValueError, match="1 of 4"):
        cosine_top_eig(g @ g.t())
    with pytest.raises(ValueError, match="non-finite"):
        cosine_top_eig(torch.full((2, 2), float("nan")))


def test_gradient_accumulation_captures_first_micro_batch_only():
    model, x, y, loss_fn = case("linear_2d")
    names = {id(p): n for n, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=N)
    cap.arm()
    for micro in range(3):
        xm = x if micro == 0 else torch.randn_like(x)
        (loss_fn(model(xm), y) / 3).backward()
    values, errors = cap.compute()
    assert errors == {} and all(len(c) == 1 for c in cap._captures.values())
    ref = reference(model, x, y, loss_fn, N)
    assert values == pytest.approx(ref, rel=1e-4)


def test_no_grad_forward_is_ignored_and_unused_layer_absent():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    unused = nn.Linear(3, 3)
    holder = nn.ModuleDict({"net": model, "unused": unused})
    names = {id(p): n for n, p in holder.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(holder, names, n=N)
    cap.arm()
    with torch.no_grad():
        model(torch.randn(3, 5))  # an evaluation batch in between
    x, y = torch.randn(B, 5), torch.randn(B, 3)
    mse(model(x), y).backward()
    values, errors = cap.compute()
    assert errors == {} and "unused.weight" not in values
    assert values == pytest.approx({"net." + k: v for k, v in
                                    reference(model, x, y, mse, N).items()}, rel=1e-4)


class PosModel(nn.Module):
    """Token and position embeddings; positions shared by the batch, as (T,) or (1, T)."""

    def __init__(self, pos_shape: str = "T", combine: str = "add", pos_first: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 2)
        self.pos_shape, self.combine, self.pos_first = pos_shape, combine, pos_first

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])  # (T,): nanoGPT
        if self.pos_shape == "1T":
            pos = pos[None]  # (1, T): Hugging Face's position_ids buffer
        if self.pos_first:
            p = self.wpe(pos)
            tok = self.wte(idx)
        else:
            tok, p = self.wte(idx), self.wpe(pos)
        h = tok + p if self.combine == "add" else tok * p
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("pos_shape,pos_first", [("T", False), ("1T", False), ("1T", True)])
def test_position_embedding_shared_by_the_batch(pos_shape, pos_first):
    model = PosModel(pos_shape, pos_first=pos_first)
    x, y = torch.randint(0, 7, (B, 3)), torch.randn(B, 3, 2)
    values, errors = captured(model, x, y, mse)
    assert errors == {}
    ref = reference(model, x, y, mse, N)
    assert set(values) == set(ref) and values == pytest.approx(ref, rel=1e-4)


def test_shared_embedding_not_added_is_reported_not_wrong():
    model = PosModel("T", combine="mul")
    values, errors = captured(model, torch.randint(0, 7, (B, 3)), torch.randn(B, 3, 2), mse)
    assert "wpe.weight" in errors and "shared by the whole batch" in errors["wpe.weight"]
    assert "wpe.weight" not in values and {"wte.weight", "head.weight"} <= set(values)


def test_input_without_batch_dimension_is_reported():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):  # (B, 3) -> fc2 sees (B * 4 / 4, ...) reshaped to 2 rows
            return self.fc2(torch.tanh(self.fc1(x)).reshape(2, -1, 4)).sum(1)

    values, errors = captured(Flat(), torch.randn(B, 3), torch.randn(2, 2), mse)
    assert "batch size 6" in errors["fc2.weight"] and "fc1.weight" in values


def test_hook_failures_do_not_break_training(monkeypatch):
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    model = nn.ModuleDict({"mha": mha, "fc": nn.Linear(4, 2)})
    names = {id(p): n for n, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=N)
    assert cap.unsupported == {}  # MHA weights: the per-sample fallback (test_metrics_ntk_fallback)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ntk_capture, "_Capture", broken)
    monkeypatch.setattr(ntk_capture, "OwnerCall", broken)
    cap.arm()
    x = torch.randn(B, 3, 4)
    loss = model["fc"](model["mha"](x, x, x)[0]).pow(2).mean()
    loss.backward()  # training goes on
    values, errors = cap.compute()
    assert "boom" in errors["fc.weight"] and "boom" in errors["mha.in_proj_weight"]
    assert "boom" in errors["mha.out_proj.weight"]  # used functionally inside MultiheadAttention
    cap.disarm()


def test_weight_with_gradient_but_no_captured_call_is_reported():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return F.linear(x, self.fc.weight)  # the module's forward is bypassed

    model = Functional()
    values, errors = captured(model, torch.randn(B, 4), torch.randn(B, 2), mse)
    assert values == {} and "forward was not called" in errors["fc.weight"]


def test_compute_before_any_forward_says_so():
    model, x, y, loss_fn = case("linear_2d")
    loss_fn(model(x), y).backward()  # gradients of an earlier step
    cap = NTKCapture(model, {id(model[0].weight): "0.weight"}, n=N)
    cap.arm()
    values, errors = cap.compute()
    assert values == {} and "no forward pass" in errors["0.weight"]


def test_disarm_removes_hooks_and_is_idempotent():
    model, x, y, loss_fn = case("conv2d")
    cap = NTKCapture(model, {id(model.conv.weight): "conv.weight"}, n=N)
    cap.arm()
    assert cap.armed and len(model.conv._forward_hooks) == 1
    cap.disarm()
    cap.disarm()
    assert not cap.armed and len(model.conv._forward_hooks) == 0
    loss_fn(model(x), y).backward()
    assert cap.compute() == ({}, {})


def test_low_precision_model():
    model, x, y, loss_fn = case("linear_3d")
    ref = reference(model, x, y, loss_fn, N)
    model = model.to(torch.bfloat16)
    values, errors = captured(model, x.bfloat16(), y.bfloat16(), lambda o, t: mse(o.float(), t.float()))
    assert errors == {}
    assert values == pytest.approx(ref, rel=5e-2)


def test_rejects_bad_probe_size():
    with pytest.raises(ValueError, match="n=1"):
        NTKCapture(nn.Linear(2, 2), {}, n=1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hugging_face_gpt2_tied_head_and_position_embeddings():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    x = torch.randint(0, 32, (B, 6))
    names = {id(p): n for n, p in model.named_parameters() if p.ndim >= 2}
    cap = NTKCapture(model, names, n=N)
    cap.arm()
    model(x, labels=x).loss.backward()
    values, errors = cap.compute()
    cap.disarm()
    assert errors == {}
    assert len([c for c in names.values() if c == "transformer.wte.weight"]) == 1  # tied head
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi):
        return functional_call(model, p, (xi[None],), {"labels": xi[None]}).loss

    grads = vmap(grad(sample_loss), in_dims=(None, 0))(params, x[:N])
    assert set(values) == set(names.values())
    for name, value in values.items():
        g = grads[name].reshape(N, -1).double()
        norms = g.norm(dim=1)
        ref = torch.linalg.eigvalsh(g @ g.t() / (norms[:, None] * norms[None, :]))[-1].item()
        assert value == pytest.approx(ref, rel=1e-4), name
