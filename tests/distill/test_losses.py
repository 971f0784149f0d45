"""Every distillation loss against a plain reference (loops over numbers) on tiny tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurosem.distill import losses as L


# ---------------------------------------------------------------------------------------------
# plain helpers (lists of floats, no torch)


def _cos(a, b):
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# SKD


def _skd_reference(vectors, maps, tau):
    """vectors: per layer [C][K]; maps: per layer [B][C][HW] -> eq. 2."""
    total = 0.0
    for S, A in zip(vectors, maps):
        C = len(S)
        P = [_softmax([_cos(S[i], S[j]) / tau for j in range(C)]) for i in range(C)]
        layer = 0.0
        for a in A:
            for i in range(C):
                q = _softmax([_cos(a[i], a[j]) / tau for j in range(C)])
                layer += -sum(P[i][j] * math.log(q[j]) for j in range(C)) / C
        total += layer / len(A)
    return total / len(vectors)


def test_skd_two_units_by_hand():
    # S = identity: cos matrix = I, P(.|i) = (e, 1)/(e + 1). Orthogonal maps in every image give
    # Q = P, so the loss is the entropy of (p, 1 - p) with p = e / (e + 1).
    loss = L.SKDLoss([torch.eye(2)])
    maps = torch.zeros(3, 2, 2, 2)
    maps[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 0.5])
    maps[:, 1, 1, 1] = torch.tensor([3.0, 0.1, 7.0])
    p = math.e / (math.e + 1)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(loss([maps])) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.1])
def test_skd_matches_plain_reference(tau):
    g = torch.Generator().manual_seed(0)
    S1, S2 = torch.randn(3, 4, generator=g), torch.randn(4, 2, generator=g)
    A1 = torch.randn(2, 3, 2, 3, generator=g)
    A2 = torch.rand(2, 4, 1, 2, generator=g)
    A2[1, 2] = 0.0  # an all-zero map: cosine 0 with everything, no NaN
    loss = L.SKDLoss([S1.double(), S2.double()], temperature=tau).double()
    got = float(loss([A1.double(), A2.double()]))
    ref = _skd_reference([S1.tolist(), S2.tolist()],
                         [A1.flatten(2).tolist(), A2.flatten(2).tolist()], tau)
    assert math.isfinite(got)
    assert got == pytest.approx(ref, rel=1e-6)


def test_skd_gradient_reaches_student_not_vectors():
    S = torch.randn(4, 3, requires_grad=True)
    loss = L.SKDLoss([S])
    assert list(loss.parameters()) == []
    assert all(not b.requires_grad for b in loss.buffers())
    maps = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss([maps]).backward()
    assert S.grad is None
    assert maps.grad is not None and float(maps.grad.abs().sum()) > 0
    # changing the caller's tensor afterwards does not change the stored targets
    before = loss.targets()[0].clone()
    with torch.no_grad():
        S.mul_(-3.0)
    assert torch.equal(loss.targets()[0], before)


def test_skd_gradient_equals_the_plain_formula():
    """The cheaper evaluation (a hand-written backward; the Gram path for H*W >= C, normalised maps
    else) has the value and gradient of the direct eq. 2 (normalise, cosine, log_softmax,
    cross-entropy), at the paper's tau and at one whose backward takes the transposed path."""
    g = torch.Generator().manual_seed(2)
    S = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)]
    maps = [torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64).requires_grad_(),   # H*W >= C
            torch.rand(2, 5, 1, 2, generator=g, dtype=torch.float64).requires_grad_()]   # H*W < C
    for tau in (0.5, 0.02):
        value = L.SKDLoss(S, temperature=tau).double()(maps)
        value.backward()
        fast = [m.grad.clone() for m in maps]
        for m in maps:
            m.grad = None
        total = 0.0
        for s, m in zip(S, maps):
            sn = s / s.norm(dim=1, keepdim=True)
            P = torch.softmax(sn @ sn.t() / tau, dim=1)
            x = m.flatten(2)
            xn = x / x.norm(dim=2, keepdim=True)
            log_q = torch.log_softmax(xn @ xn.transpose(1, 2) / tau, dim=2)
            total = total - (P * log_q).sum(2).mean()
        (total / 2).backward()
        torch.testing.assert_close(value.detach(), total.detach() / 2)
        for a, m in zip(fast, maps):
            torch.testing.assert_close(a, m.grad)
            m.grad = None
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    P = torch.softmax(torch.randn(3, 3, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda v: L._SKDLayerLoss.apply(v, P, 0.7), (x,))


def test_skd_fused_loss_keeps_zero_maps_at_cosine_zero_and_can_backward_twice():
    P = torch.softmax(torch.randn(3, 3, dtype=torch.float64), dim=1)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    x[0, 1] = 0.0
    xr = x.clone().requires_grad_()
    v = L._SKDLayerLoss.apply(xr, P, 1.0)
    z = L.batch_cosine_logits(x)
    assert float(z[0, 1].abs().max()) == 0.0
    ref = torch.logsumexp(z, -1).mean() - (P * z.mean(0)).sum() / 3
    torch.testing.assert_close(v.detach(), ref)
    v.backward(retain_graph=True)
    once = xr.grad.clone()
    v.backward()
    torch.testing.assert_close(xr.grad, 2 * once)
    zr = x.clone().requires_grad_()
    (torch.logsumexp(L.batch_cosine_logits(zr), -1).mean() - (P * L.batch_cosine_logits(zr).mean(0)).sum() / 3).backward()
    torch.testing.assert_close(once, zr.grad)


def test_skd_targets_equal_the_embedding_convention():
    from neurosem.embed import similarity_probs

    S = torch.randn(5, 16)
    for tau in (1.0, 0.25):
        P = L.SKDLoss([S], temperature=tau).targets()[0]
        torch.testing.assert_close(P, similarity_probs(S, temperature=tau))


def test_skd_rejects_wrong_width():
    with pytest.raises(ValueError, match="3 channels, teacher vectors 4"):
        L.SKDLoss([torch.randn(4, 2)])([torch.randn(1, 3, 2, 2)])


def test_skd_random_is_seeded_and_shaped():
    a = L.SKDRandomLoss([3, 5], dim=7, seed=1)
    b = L.SKDRandomLoss([3, 5], dim=7, seed=1)
    c = L.SKDRandomLoss([3, 5], dim=7, seed=2)
    assert [tuple(getattr(a, f"vectors_{l}").shape) for l in range(2)] == [(3, 7), (5, 7)]
    assert torch.equal(a.vectors_0, b.vectors_0) and torch.equal(a.vectors_1, b.vectors_1)
    assert not torch.equal(a.vectors_0, c.vectors_0)
    gen = torch.Generator().manual_seed(1)
    torch.testing.assert_close(a.vectors_0, torch.randn(3, 7, generator=gen))


# ---------------------------------------------------------------------------------------------
# KD


def test_kd_matches_reference():
    zs = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    zt = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    T = 4.0
    ref = 0.0
    for s, t in zip(zs, zt):
        ps = _softmax([v / T for v in s])
        pt = _softmax([v / T for v in t])
        ref += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    ref = ref / 2 * T * T
    assert float(L.KDLoss(T)(_t(zs), _t(zt))) == pytest.approx(ref, rel=1e-9)
    # the gradient of T^2 KL is (p_s - p_t) * T / B per logit
    zs_t = _t(zs).requires_grad_(True)
    L.KDLoss(T)(zs_t, _t(zt)).backward()
    expected = (torch.softmax(_t(zs) / T, 1) - torch.softmax(_t(zt) / T, 1)) * T / 2
    torch.testing.assert_close(zs_t.grad, expected)


# ---------------------------------------------------------------------------------------------
# FitNet


def test_fitnet_matches_reference():
    g = torch.Generator().manual_seed(3)
    fs = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    loss = L.FitNetLoss(2, 3).double().train()
    W = [[0.5, -1.0], [2.0, 0.25], [-0.5, 1.5]]
    b = [0.1, -0.2, 0.3]
    with torch.no_grad():
        loss.conv.weight.copy_(_t(W).view(3, 2, 1, 1))
        loss.conv.bias.copy_(_t(b))
    x = fs.permute(0, 2, 3, 1).reshape(-1, 2).tolist()   # pixels x channels
    y = ft.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    conv = [[sum(W[o][i] * px[i] for i in range(2)) + b[o] for o in range(3)] for px in x]
    ref = 0.0
    for o in range(3):
        col = [r[o] for r in conv]
        mean = sum(col) / len(col)
        var = sum((v - mean) ** 2 for v in col) / len(col)   # BN uses the biased variance
        for r, t in zip(col, (yy[o] for yy in y)):
            out = max((r - mean) / math.sqrt(var + 1e-5), 0.0)
            ref += (out - t) ** 2
    ref /= len(x) * 3
    assert float(loss(fs, ft).detach()) == pytest.approx(ref, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# AT, SP


def _at_map(f, p=2):
    """f: [C][HW] -> normalised mean_c f^p."""
    C, HW = len(f), len(f[0])
    m = [sum(f[c][k] ** p for c in range(C)) / C for k in range(HW)]
    n = math.sqrt(sum(v * v for v in m))
    return [v / n for v in m]


def test_at_matches_reference():
    g = torch.Generator().manual_seed(4)
    s1, t1 = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    s2, t2 = torch.randn(2, 2, 1, 3, generator=g), torch.randn(2, 4, 1, 3, generator=g)
    ref = 0.0
    for s, t in ((s1, t1), (s2, t2)):
        sq = 0.0
        n = 0
        for b in range(2):
            a_s, a_t = _at_map(s[b].flatten(1).tolist()), _at_map(t[b].flatten(1).tolist())
            sq += sum((u - v) ** 2 for u, v in zip(a_s, a_t))
            n += len(a_s)
        ref += sq / n
    assert float(L.ATLoss()([s1.double(), s2.double()], [t1.double(), t2.double()])) == pytest.approx(ref, rel=1e-9)


def test_sp_matches_reference():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 4, 1, 2, generator=g)

    def gram(x):
        rows = x.flatten(1).tolist()
        G = [[sum(a * b for a, b in zip(r1, r2)) for r2 in rows] for r1 in rows]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in G]

    Gs, Gt = gram(s), gram(t)
    ref = sum((Gt[i][j] - Gs[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert float(L.SPLoss()([s.double()], [t.double()])) == pytest.approx(ref, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# CC, RKD, PKT (pooled features)


def _linear(x, W, b):
    return [[sum(wi * xi for wi, xi in zip(w, row)) + bo for w, bo in zip(W, b)] for row in x]


def _cc_setup():
    g = torch.Generator().manual_seed(6)
    es, et = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    Ws = [[0.5, -1.0, 0.2], [1.0, 0.0, 0.3]]
    Wt = [[0.1, 0.7], [-0.4, 0.9]]
    bs, bt = [0.05, -0.1], [0.2, 0.0]
    return es, et, Ws, Wt, bs, bt


def _cc_module(kernel, Ws, Wt, bs, bt):
    loss = L.CCLoss(3, 2, dim=2, kernel=kernel).double()
    with torch.no_grad():
        loss.embed_s.weight.copy_(_t(Ws))
        loss.embed_s.bias.copy_(_t(bs))
        loss.embed_t.weight.copy_(_t(Wt))
        loss.embed_t.bias.copy_(_t(bt))
    return loss


def test_cc_crd_matches_reference():
    es, et, Ws, Wt, bs, bt = _cc_setup()
    u, v = _linear(es.tolist(), Ws, bs), _linear(et.tolist(), Wt, bt)
    d = [[abs(a - b) for a, b in zip(ru, rv)] for ru, rv in zip(u, v)]
    ref = sum(sum(x * y for x, y in zip(d[i], d[i + 1])) for i in range(3)) / 3
    got = float(_cc_module("crd", Ws, Wt, bs, bt)(es.double(), et.double()).detach())
    assert got == pytest.approx(ref, rel=1e-9)


def test_cc_rbf_matches_reference():
    es, et, Ws, Wt, bs, bt = _cc_setup()
    u, v = _linear(es.tolist(), Ws, bs), _linear(et.tolist(), Wt, bt)
    gamma = 0.4

    def k(a, b):  # order-2 Taylor expansion of exp(-gamma ||a - b||^2) for unit vectors
        c = _cos(a, b)
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c ** p for p in range(3))

    ref = sum((k(u[i], u[j]) - k(v[i], v[j])) ** 2 for i in range(4) for j in range(4)) / 16
    got = float(_cc_module("rbf", Ws, Wt, bs, bt)(es.double(), et.double()).detach())
    assert got == pytest.approx(ref, rel=1e-9)
    # a long expansion is the Gaussian kernel of the unit vectors, exp(-gamma ||a - b||^2)
    x = torch.randn(5, 3, dtype=torch.float64)
    xn = torch.nn.functional.normalize(x, dim=1)
    exact = torch.exp(-gamma * torch.cdist(xn, xn) ** 2)
    torch.testing.assert_close(L.CCLoss(3, 3, order=20).correlation(x), exact)


def test_rkd_matches_reference():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)

    def dist(x):
        D = [[math.dist(a, b) for b in x] for a in x]
        pos = [v for row in D for v in row if v > 0]
        mu = sum(pos) / len(pos)
        return [[v / mu for v in row] for row in D]

    def unit(a, b):
        d = [y - x for x, y in zip(a, b)]
        n = math.sqrt(sum(v * v for v in d))
        return [v / n for v in d] if n > 0 else [0.0] * len(d)

    def angles(x):
        n = len(x)
        return [sum(p * q for p, q in zip(unit(x[i], x[j]), unit(x[i], x[k])))
                for i in range(n) for j in range(n) for k in range(n)]

    sl, tl = s.tolist(), t.tolist()
    Ds, Dt = dist(sl), dist(tl)
    loss_d = sum(_huber(Ds[i][j] - Dt[i][j]) for i in range(4) for j in range(4)) / 16
    As, At = angles(sl), angles(tl)
    loss_a = sum(_huber(a - b) for a, b in zip(As, At)) / len(As)
    ref = 25 * loss_d + 50 * loss_a
    assert float(L.RKDLoss()(s.double(), t.double())) == pytest.approx(ref, rel=1e-6)


def test_pkt_matches_reference():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g)
    eps = 1e-7

    def probs(x):
        c = [[(_cos(a, b) + 1) / 2 for b in x] for a in x]
        return [[v / sum(row) for v in row] for row in c]

    P, Q = probs(t.tolist()), probs(s.tolist())
    ref = sum(P[i][j] * math.log((P[i][j] + eps) / (Q[i][j] + eps)) for i in range(3) for j in range(3)) / 9
    assert float(L.PKTLoss()(s.double(), t.double())) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# weights


def test_default_weights_follow_crd_and_paper():
    from neurosem.distill import methods as M

    W = {m: M.get(m).weights for m in M.names()}
    assert (W["kd"].ce, W["kd"].kd) == (0.1, 0.9)
    # RepDistiller scripts/run_cifar_distill.sh: -b of every method, -a 0, -r 1
    assert {m: W[m].beta for m in ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd")} == {
        "fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "cc": 0.02, "vid": 1.0, "rkd": 1.0, "pkt": 30000.0,
        "ab": 1.0, "ft": 200.0, "fsp": 50.0, "nst": 50.0, "crd": 0.8}
    assert all(W[m].kd == 0.0 and W[m].ce == 1.0 for m in W if m != "kd")
    assert W["skd"].beta == 0.5 and L.SKD_PAIR_BETA[("vgg13", "vgg8")] == 0.05
    assert np.isclose(L.RKDLoss().w_d, 25) and np.isclose(L.RKDLoss().w_a, 50)
