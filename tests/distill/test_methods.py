"""The six methods added for Table 1 (VID, AB, FT, FSP, NST, CRD) against plain references of their
papers' formulas (python loops over floats) on tiny tensors: values, and gradients by central
differences of the same references. Plus the registry and the regressor of FitNet."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurosem.distill import distiller as D
from neurosem.distill import losses as L
from neurosem.distill import methods as M
from neurosem.distill import zoo
from neurosem.distill.methods import contrast as C
from neurosem.distill.methods import hints as H
from neurosem.distill.methods import maps as Mp


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def _t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _fd(fn, x, eps=1e-6):
    """Central differences of the scalar ``fn(x)`` w.r.t. every element of the array ``x``."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (fn(xp) - fn(xm)) / (2 * eps)
    return g


def _pool2(f):
    """[B][C][H][W] numpy -> 2x2 average pooled (H, W even)."""
    B, Cc, Hh, Ww = f.shape
    out = np.zeros((B, Cc, Hh // 2, Ww // 2))
    for b in range(B):
        for c in range(Cc):
            for i in range(Hh // 2):
                for j in range(Ww // 2):
                    out[b, c, i, j] = sum(f[b, c, 2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)) / 4
    return out


# ---------------------------------------------------------------------------------------------
# VID

def _vid_ref(fs, ft, W1, W2, W3, alpha, eps=1e-5):
    B, Cs, Hh, Ww = fs.shape
    Ct = ft.shape[1]
    relu = lambda v: max(v, 0.0)  # noqa: E731
    total = 0.0
    for b in range(B):
        for h in range(Hh):
            for w in range(Ww):
                x = [fs[b, c, h, w] for c in range(Cs)]
                a1 = [relu(sum(W1[m][c] * x[c] for c in range(Cs))) for m in range(len(W1))]
                a2 = [relu(sum(W2[m][k] * a1[k] for k in range(len(a1)))) for m in range(len(W2))]
                mu = [sum(W3[o][k] * a2[k] for k in range(len(a2))) for o in range(Ct)]
                for o in range(Ct):
                    var = math.log(1 + math.exp(alpha[o])) + eps
                    total += 0.5 * ((mu[o] - ft[b, o, h, w]) ** 2 / var + math.log(var))
    return total / (B * Ct * Hh * Ww)


def test_vid_matches_the_variational_bound_and_its_gradient():
    fs, ft = _rand(2, 3, 2, 2, seed=1), _rand(2, 2, 2, 2, seed=2)
    loss = H.VIDLoss(3, 4, 2).double()
    # the initial variance is softplus(alpha) + eps = 5 (alpha stored in float32, as RepDistiller's)
    assert float(torch.nn.functional.softplus(loss.log_scale.detach()[0]) + loss.eps) == pytest.approx(5.0, rel=1e-6)
    with torch.no_grad():
        loss.log_scale.copy_(_t([0.3, -0.7]))
    W1, W2, W3 = (loss.regressor[i].weight.detach().squeeze(-1).squeeze(-1).numpy() for i in (0, 2, 4))
    alpha = loss.log_scale.detach().numpy()
    x = _t(fs, grad=True)
    value = loss(x, _t(ft))
    value.backward()
    assert float(value.detach()) == pytest.approx(_vid_ref(fs, ft, W1, W2, W3, alpha), rel=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), _fd(lambda a: _vid_ref(a, ft, W1, W2, W3, alpha), fs), atol=1e-7)
    np.testing.assert_allclose(loss.log_scale.grad.numpy(),
                               _fd(lambda a: _vid_ref(fs, ft, W1, W2, W3, a), alpha), atol=1e-7)


def test_vid_pools_the_larger_map():
    fs, ft = _rand(1, 2, 4, 4, seed=3), _rand(1, 2, 2, 2, seed=4)
    loss = H.VIDLoss(2, 2, 2).double()
    W1, W2, W3 = (loss.regressor[i].weight.detach().squeeze(-1).squeeze(-1).numpy() for i in (0, 2, 4))
    alpha = loss.log_scale.detach().numpy()
    assert float(loss(_t(fs), _t(ft)).detach()) == pytest.approx(_vid_ref(_pool2(fs), ft, W1, W2, W3, alpha), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# AB

def _ab_ref(s_maps, t_maps, m=1.0):
    n = len(s_maps)
    total = 0.0
    for l, (s, t) in enumerate(zip(s_maps, t_maps)):
        layer = 0.0
        for i in np.ndindex(s.shape):
            a, b = s[i], t[i]
            if a > -m and b <= 0:
                layer += (a + m) ** 2
            if a <= m and b > 0:
                layer += (a - m) ** 2
        total += 2.0 ** (l - n + 1) * layer / s.shape[0] * 3 / 1000
    return total


def _ab_method(s_shapes, t_shapes):
    ctx = M.BuildContext(student="resnet8", teacher="resnet14", s_taps=M.Taps(maps=("a", "b")),
                         t_taps=M.Taps(maps=("a", "b")), s_shapes=dict(zip("ab", s_shapes)),
                         t_shapes=dict(zip("ab", t_shapes)))
    return M.create("ab", ctx).double()


def test_ab_matches_the_activation_boundary_loss_and_its_gradient():
    s1, s2 = _rand(2, 3, 2, 2, seed=5) * 1.5, _rand(2, 2, 1, 1, seed=6) * 1.5
    t1, t2 = _rand(2, 3, 2, 2, seed=7), _rand(2, 2, 1, 1, seed=8)
    ab = _ab_method([(1, 3, 2, 2), (1, 2, 1, 1)], [(1, 3, 2, 2), (1, 2, 1, 1)])   # identity connectors
    assert all(isinstance(c, torch.nn.Identity) for c in ab.connectors) and ab.layer_weights == [0.5, 1.0]
    x1, x2 = _t(s1, grad=True), _t(s2, grad=True)
    value = ab.init_loss(M.Batch(fs=[x1, x2], ft=[_t(t1), _t(t2)]))
    value.backward()
    assert float(value.detach()) == pytest.approx(_ab_ref([s1, s2], [t1, t2]), rel=1e-12)
    np.testing.assert_allclose(x1.grad.numpy(), _fd(lambda a: _ab_ref([a, s2], [t1, t2]), s1), atol=1e-8)
    np.testing.assert_allclose(x2.grad.numpy(), _fd(lambda a: _ab_ref([s1, a], [t1, t2]), s2), atol=1e-8)
    assert ab(M.Batch(fs=[x1, x2], ft=[])) is None        # the main stage is CE alone (as RepDistiller)


def test_ab_connector_adapts_other_shapes():
    ab = _ab_method([(1, 3, 4, 4), (1, 2, 2, 2)], [(1, 5, 2, 2), (1, 2, 2, 2)])
    conv, bn = ab.connectors[0]
    assert (conv.stride, conv.kernel_size, bn.num_features) == ((2, 2), (3, 3), 5)
    assert isinstance(ab.connectors[1], torch.nn.Identity)


# ---------------------------------------------------------------------------------------------
# FT

def _ft_ref(fs, ft):
    def factor(f):
        B, Cc = f.shape[:2]
        out = []
        for b in range(B):
            v = [sum(f[b, c, h, w] ** 2 for c in range(Cc)) / Cc for h in range(f.shape[2]) for w in range(f.shape[3])]
            n = math.sqrt(sum(x * x for x in v))
            out.append([x / n for x in v])
        return out
    a, b = factor(fs), factor(ft)
    return sum(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (len(a) * len(a[0]))


def test_factor_transfer_matches_the_formula_and_its_gradient():
    fs, ft = _rand(2, 3, 2, 2, seed=9), _rand(2, 4, 2, 2, seed=10)
    x = _t(fs, grad=True)
    value = H.factor_transfer_loss(x, _t(ft))
    value.backward()
    assert float(value.detach()) == pytest.approx(_ft_ref(fs, ft), rel=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), _fd(lambda a: _ft_ref(a, ft), fs), atol=1e-8)
    # pooling: the larger factor map is averaged to the smaller one's size
    big = _rand(2, 3, 4, 4, seed=11)
    assert float(H.factor_transfer_loss(_t(big), _t(ft))) == pytest.approx(_ft_ref(_pool2(big), ft), rel=1e-12)


def test_ft_stages_train_the_paraphraser_then_the_translator():
    ctx = M.BuildContext(student="resnet8", teacher="resnet14", s_taps=M.Taps(maps=("x",)), t_taps=M.Taps(maps=("x",)),
                         s_shapes={"x": (1, 4, 2, 2)}, t_shapes={"x": (1, 6, 2, 2)})
    ft = M.create("ft", ctx).double()
    assert ft.paraphraser.encoder[2].out_channels == 3 and ft.translator.encoder[3].out_channels == 3
    assert {id(p) for p in ft.init_parameters(torch.nn.Linear(1, 1))} == {id(p) for p in ft.paraphraser.parameters()}
    assert {id(p) for p in ft.main_parameters()} == {id(p) for p in ft.translator.parameters()}
    f_t = _t(_rand(2, 6, 2, 2, seed=12))
    _, rec = ft.paraphraser(f_t)
    assert float(ft.init_loss(M.Batch(fs=[], ft=[f_t])).detach()) == pytest.approx(float(((rec - f_t) ** 2).mean().detach()))
    ft.train()
    assert ft.translator.training and not ft.paraphraser.training
    assert ft.init_lr("resnet8", 0.05) == 0.01 and ft.init_lr("MobileNetV2", 0.05) == 0.05


# ---------------------------------------------------------------------------------------------
# FSP

def _fsp_ref(s_feats, t_feats):
    def gram(bot, top):
        B, m, Hh, Ww = bot.shape
        n = top.shape[1]
        return [[[sum(top[b, i, h, w] * bot[b, j, h, w] for h in range(Hh) for w in range(Ww)) / (Hh * Ww)
                  for j in range(m)] for i in range(n)] for b in range(B)]
    total = 0.0
    for k in range(len(s_feats) - 1):
        gs, gt = gram(s_feats[k], s_feats[k + 1]), gram(t_feats[k], t_feats[k + 1])
        flat = [(x - y) ** 2 for bs, bt in zip(gs, gt) for rs, rt in zip(bs, bt) for x, y in zip(rs, rt)]
        total += sum(flat) / len(flat)
    return total


def test_fsp_matches_the_flow_matrices_and_its_gradient():
    s = [_rand(2, 2, 2, 2, seed=13), _rand(2, 3, 2, 2, seed=14), _rand(2, 2, 1, 1, seed=15)]
    t = [_rand(2, 2, 2, 2, seed=16), _rand(2, 3, 2, 2, seed=17), _rand(2, 2, 1, 1, seed=18)]
    x = [_t(a, grad=True) for a in s]
    value = sum((a - b).pow(2).mean() for a, b in zip(Mp.fsp_matrices(x), Mp.fsp_matrices([_t(a) for a in t])))
    value.backward()
    # the third map is 1x1: the second is pooled to 1x1 for the second matrix
    t_ref = [t[0], t[1], t[2]]
    ref = _fsp_ref(s[:2], t_ref[:2]) + _fsp_ref([s[1].mean((2, 3), keepdims=True), s[2]],
                                                  [t[1].mean((2, 3), keepdims=True), t[2]])
    assert float(value.detach()) == pytest.approx(ref, rel=1e-12)

    def ref_of(a1):
        return _fsp_ref([s[0], a1], t[:2]) + _fsp_ref([a1.mean((2, 3), keepdims=True), s[2]],
                                                      [t[1].mean((2, 3), keepdims=True), t[2]])
    np.testing.assert_allclose(x[1].grad.numpy(), _fd(ref_of, s[1]), atol=1e-8)


def test_fsp_refuses_unequal_channels_in_one_line():
    teacher = zoo.build("resnet8x4", num_classes=10)
    with pytest.raises(M.MethodShapeError, match=r"^fsp cannot align the relu features: student \[1, 16, 32, 32\], "
                                                 r"teacher \[1, 32, 32, 32\] \(FSP needs equal channels at every feature\)$"):
        D.build_distiller("fsp", "resnet8", "resnet8x4", num_classes=10, teacher_model=teacher)


# ---------------------------------------------------------------------------------------------
# NST

def _nst_ref(fs, ft):
    def norm(f):
        B, Cc = f.shape[:2]
        out = []
        for b in range(B):
            rows = []
            for c in range(Cc):
                v = f[b, c].ravel().tolist()
                n = math.sqrt(sum(x * x for x in v))
                rows.append([x / n for x in v])
            out.append(rows)
        return out
    s, t = norm(fs), norm(ft)

    def k_mean(a, b):
        vals = [sum(x * y for x, y in zip(ai, bj)) ** 2 for A, Bm in zip(a, b) for ai in A for bj in Bm]
        return sum(vals) / len(vals)
    return k_mean(t, t) + k_mean(s, s) - 2 * k_mean(s, t)


def test_nst_matches_the_polynomial_mmd_and_its_gradient():
    fs, ft = _rand(2, 3, 2, 2, seed=19), _rand(2, 4, 2, 2, seed=20)
    x = _t(fs, grad=True)
    value = Mp.nst_loss(x, _t(ft))
    value.backward()
    assert float(value.detach()) == pytest.approx(_nst_ref(fs, ft), rel=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), _fd(lambda a: _nst_ref(a, ft), fs), atol=1e-8)
    big = _rand(2, 3, 4, 4, seed=21)
    assert float(Mp.nst_loss(_t(big), _t(ft))) == pytest.approx(_nst_ref(_pool2(big), ft), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# CRD

def _crd_ref(es, et, Ws, bs, Wt, bt, mem_s, mem_t, contrast, z, n_data, T=0.07, eps=1e-7):
    """The NCE loss of CRD (eq. 18 of the paper, RepDistiller's ContrastLoss) with fixed Z."""
    def embed(e, W, b):
        out = []
        for row in e:
            v = [sum(W[o][i] * row[i] for i in range(len(row))) + b[o] for o in range(len(b))]
            n = math.sqrt(sum(x * x for x in v))
            out.append([x / n for x in v])
        return out
    u, v = embed(es, Ws, bs), embed(et, Wt, bt)
    K = len(contrast[0]) - 1
    noise = K / n_data

    def nce(anchor, bank, zz):
        total = 0.0
        for n, row in enumerate(contrast):
            for k, j in enumerate(row):
                h = math.exp(sum(a * m for a, m in zip(anchor[n], bank[j])) / T) / zz
                total += math.log(h / (h + noise + eps)) if k == 0 else math.log(noise / (h + noise + eps))
        return -total / len(contrast)
    return nce(u, mem_t, z[0]) + nce(v, mem_s, z[1])


def _crd(n_data=6, k=3, ds=4, dt=5, dim=3):
    ctx = M.BuildContext(student="resnet8", teacher="resnet14", s_taps=M.Taps(pooled="fc"), t_taps=M.Taps(pooled="fc"),
                         s_shapes={"fc:input": (1, ds)}, t_shapes={"fc:input": (1, dt)},
                         options=M.MethodOptions(feat_dim=dim, nce_k=k), n_data=n_data,
                         labels=torch.tensor([0, 0, 1, 1, 2, 2][:n_data]))
    torch.manual_seed(0)
    return M.create("crd", ctx).double()


def test_crd_matches_the_nce_formula_and_its_gradient():
    crd = _crd()
    es, et = _rand(2, 4, seed=22), _rand(2, 5, seed=23)
    index = torch.tensor([1, 4])
    contrast = torch.tensor([[1, 2, 3, 5], [4, 0, 1, 2]])
    z = [3.5, 7.25]
    crd.contrast.z.copy_(torch.tensor(z))
    mem_s, mem_t = crd.contrast.memory_s.clone(), crd.contrast.memory_t.clone()
    Ws, bs = crd.embed_s.linear.weight.detach().numpy(), crd.embed_s.linear.bias.detach().numpy()
    Wt, bt = crd.embed_t.linear.weight.detach().numpy(), crd.embed_t.linear.bias.detach().numpy()
    args = (Ws, bs, Wt, bt, mem_s.numpy(), mem_t.numpy(), contrast.tolist(), z, 6)
    x = _t(es, grad=True)
    h_s, h_t = crd.contrast(crd.embed_s(x), crd.embed_t(_t(et)), index, contrast)
    value = C.nce_loss(h_s, 6) + C.nce_loss(h_t, 6)
    value.backward()
    assert float(value.detach()) == pytest.approx(_crd_ref(es, et, *args), rel=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), _fd(lambda a: _crd_ref(a, et, *args), es), atol=1e-6)
    # the memory update: M[i] <- normalize(0.5 M[i] + 0.5 u), only at the batch's indices
    u = crd.embed_s(_t(es)).detach()
    want = 0.5 * mem_s[index] + 0.5 * u
    torch.testing.assert_close(crd.contrast.memory_s[index], want / want.norm(dim=1, keepdim=True))
    untouched = [0, 2, 3, 5]
    torch.testing.assert_close(crd.contrast.memory_s[untouched], mem_s[untouched])


def test_crd_sets_z_from_the_first_batch_then_keeps_it():
    crd = _crd()
    u = torch.nn.functional.normalize(_t(_rand(2, 3, seed=24)), dim=1)
    v = torch.nn.functional.normalize(_t(_rand(2, 3, seed=25)), dim=1)
    contrast = torch.tensor([[0, 2, 3, 4], [2, 0, 1, 5]])
    w_t = crd.contrast.memory_t[contrast]
    raw = torch.exp(torch.einsum("bkd,bd->bk", w_t, u) / 0.07)
    h_s, _ = crd.contrast(u, v, torch.tensor([0, 2]), contrast)
    assert float(crd.contrast.z[0]) == pytest.approx(float(raw.mean()) * 6, rel=1e-12)
    torch.testing.assert_close(h_s, raw / (raw.mean() * 6))
    z = crd.contrast.z.clone()
    crd.contrast(u, v, torch.tensor([1, 3]), contrast)
    torch.testing.assert_close(crd.contrast.z, z)
    # the memory starts uniform in [-s, s], s = 1/sqrt(dim/3) = 1 for dim 3
    assert float(crd.contrast.memory_s.abs().max()) <= 1.0


def test_crd_negatives_are_other_classes_distinct_and_include_the_positive_first():
    labels = torch.arange(40) % 4
    torch.manual_seed(0)
    idx = C.sample_contrast(torch.tensor([0, 5]), labels[[0, 5]], labels, 20)
    assert idx.shape == (2, 21) and idx[:, 0].tolist() == [0, 5]
    for row, y in zip(idx, labels[[0, 5]]):
        neg = row[1:]
        assert (labels[neg] != y).all() and len(set(neg.tolist())) == 20
    # fewer negatives than asked for: drawn with replacement, still of other classes
    few = C.sample_contrast(torch.tensor([0]), labels[[0]], labels, 100)
    assert few.shape == (1, 101) and (labels[few[0, 1:]] != 0).all()


def test_crd_defaults_are_the_papers():
    o = M.MethodOptions()
    assert (o.nce_k, o.feat_dim, o.nce_t, o.nce_m) == (16384, 128, 0.07, 0.5)
    assert M.get("crd").needs_index and M.get("crd").weights.beta == 0.8


# ---------------------------------------------------------------------------------------------
# FitNet's regressor, the registry, every method on a cross-architecture pair

@pytest.mark.parametrize("s_hw,t_hw,kind,kernel", [((8, 8), (4, 4), "Conv2d", (3, 3)), ((4, 4), (8, 8), "ConvTranspose2d", (4, 4)),
                                                 ((6, 6), (4, 4), "Conv2d", (3, 3)), ((4, 4), (4, 4), "Conv2d", (1, 1))])
def test_fitnet_regressor_adapts_the_map_size(s_hw, t_hw, kind, kernel):
    conv = L.regressor_conv(3, 5, s_hw, t_hw)
    assert type(conv).__name__ == kind and conv.kernel_size == kernel
    assert conv(torch.zeros(1, 3, *s_hw)).shape == (1, 5, *t_hw)


def test_fitnet_between_maps_of_other_sizes_and_one_line_when_impossible():
    teacher = zoo.build("vgg8", num_classes=10)
    d = D.build_distiller("fitnet", "resnet8", "vgg8", num_classes=10, teacher_model=teacher)   # 8x8 -> 8x8 (block2)
    d = D.build_distiller("fitnet", "resnet8", "vgg8", num_classes=10, teacher_model=teacher,
                          options=M.MethodOptions(hint_layer=1))   # layer1 32x32 -> block1 16x16
    assert d.criterion.loss.conv.stride == (2, 2)
    # a student map smaller than half the teacher's has no regressor
    with pytest.raises(M.MethodShapeError, match=r"^fitnet cannot align the hint \(block1 -> layer3\) features: "
                                                 r"student \[1, 128, 4, 4\], teacher \[1, 64, 16, 16\] \(no regressor"):
        ctx = M.BuildContext(student="vgg8", teacher="resnet8", s_taps=M.Taps(maps=("block1",)),
                             t_taps=M.Taps(maps=("layer3",)), s_shapes={"block1": (1, 128, 4, 4)},
                             t_shapes={"layer3": (1, 64, 16, 16)})
        M.create("fitnet", ctx)


def test_unknown_method_names_the_closest():
    with pytest.raises(M.UnknownMethodError, match=r"unknown method 'crdd' \(did you mean crd"):
        M.get("crdd")
    assert {"crd", "vid", "ab", "ft", "fsp", "nst"} <= set(M.names())


@pytest.mark.parametrize("method", sorted(set(M.names()) - {"ce", "skd"}))
def test_every_method_steps_on_a_cross_architecture_pair(method):
    torch.manual_seed(0)
    teacher = zoo.build("wrn_16_1", num_classes=10).eval()
    kw = dict(n_data=8, labels=torch.arange(8) % 4, options=M.MethodOptions(nce_k=4))
    # wrn_16_1 (16/16/32/64) -> resnet8 (16/16/32/64): equal channels, so FSP applies too
    d = D.build_distiller(method, "resnet8", "wrn_16_1", num_classes=10, teacher_model=teacher, **kw)
    x, y, index = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    d.train()
    with d.hooked():
        if d.criterion.init_stage:
            init = d.init_step(x, y, index)
            init.backward()
            assert torch.isfinite(init) and float(init.detach()) > 0
            assert any(p.grad is not None for p in d.init_parameters())
        loss, logits, parts = d.step(x, y, index)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == set(d.part_names())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in d.student.modules())


CROSS_PAIRS = [("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
               ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"),
               ("wrn_40_2", "wrn_40_1")]


@pytest.mark.slow
@pytest.mark.parametrize("teacher,student", CROSS_PAIRS)
def test_every_method_builds_for_crds_cross_architecture_pairs(teacher, student):
    """CRD's cross-architecture table: every method aligns the pair (FSP only where the channels
    match, else its one-line error), and a batch of two steps."""
    t_model = zoo.build(teacher).eval()
    kw = dict(n_data=8, labels=torch.arange(8) % 4, options=M.MethodOptions(nce_k=4))
    x, y, index = torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), torch.tensor([0, 1])
    for method in sorted(set(M.names()) - {"ce", "skd", "skd-random"}):
        if method == "fsp":     # no cross pair has equal channels at every feature (nor in RepDistiller)
            with pytest.raises(M.MethodShapeError, match=r"^fsp cannot align the \S+( / \S+)? features: student \["):
                D.build_distiller(method, student, teacher, teacher_model=t_model, **kw)
            continue
        if method in ("iepkt", "iepkt-bb"):   # IEPKT needs equal sensing points (its code does too)
            with pytest.raises(M.MethodShapeError, match=rf"^{method} cannot align the .+ features: student \["):
                D.build_distiller(method, student, teacher, teacher_model=t_model, **kw)
            continue
        d = D.build_distiller(method, student, teacher, teacher_model=t_model, **kw)
        d.train()
        with d.hooked():
            loss = d.init_step(x, y, index) if d.criterion.init_stage else d.step(x, y, index)[0]
        assert torch.isfinite(loss), (method, teacher, student)


def test_methods_pairing_stages_refuse_different_stage_counts_in_one_line():
    from types import SimpleNamespace

    from neurosem.distill.methods.base import stage_shapes

    ctx = SimpleNamespace(student="resnet8", teacher="vgg13", shapes=lambda: ([(1, 16, 8, 8)] * 3, [(1, 64, 8, 8)] * 4))
    with pytest.raises(M.MethodShapeError) as err:
        stage_shapes("vid", ctx)
    assert str(err.value) == ("vid cannot align the stage features: student [3], teacher [4] "
                              "(student resnet8 has 3 stages, teacher vgg13 4)")
    ok = SimpleNamespace(student="a", teacher="b", shapes=lambda: ([(1, 2, 3, 3)], [(1, 4, 3, 3)]))
    assert stage_shapes("nst", ok) == ([(1, 2, 3, 3)], [(1, 4, 3, 3)])
