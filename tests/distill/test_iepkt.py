"""IEPKT (methods ``iepkt``, ``iepkt-bb``) against plain numpy references of the authors' code on
tiny tensors: the sign fix, the sphere-to-plane map, the incremental PCA, the MPNN, every loss
term, the clipping; then the wiring (no gradient to the teacher or the GNN in the student phase,
the one-line errors, resume bit-identity, the CLI)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from neurosem.distill import distiller as D
from neurosem.distill import methods as M
from neurosem.distill import train as T
from neurosem.distill import zoo
from neurosem.distill.methods import iepkt as I
from neurosem.distill.methods import iepkt_parts as P
from neurosem.errors import NeurosemError
from tests._cifar import write_bright_cifar


def _rng(seed=0):
    return np.random.default_rng(seed)


def _np(t):
    return t.detach().cpu().double().numpy()


def _sign(v):
    """The code's sign(max + min) of a vector (0 -> 1)."""
    s = np.sign(v.max() + v.min())
    return 1.0 if s == 0 else s


def _l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_ref(x, y):
    """sum over rows of sum_j p_j (log p_j - log q_j), p = softmax(x row), q = softmax(y row)."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    total = 0.0
    for r in range(x.shape[0]):
        p, q = _softmax(x[r]), _softmax(y[r])
        total += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(len(p)))
    return total


def _bn(x, bn, train):
    """BatchNorm1d over the rows of ``x: [N, D]`` with the module's affine and running statistics."""
    w, b = _np(bn.weight), _np(bn.bias)
    if train:
        mu, var = x.mean(0), x.var(0)
    else:
        mu, var = _np(bn.running_mean), _np(bn.running_var)
    return (x - mu) / np.sqrt(var + bn.eps) * w + b


def _mpnn_ref(gnn, c, cp, train):
    """The code's MPNN (Distillation.py:78-117) with loops over the vertex pairs."""
    B, D = c.shape[0], gnn.hidden
    e = _l2n(_bn(cp @ _np(gnn.edge_fc.weight).T, gnn.edge_bn, train))
    E = np.zeros((B, B, D))
    H = np.zeros((B, B, c.shape[1]))
    for v in range(B):
        for w in range(B):
            E[v, w] = D * e[v] * e[w]
            H[v, w] = c[v] - c[w]
    msgs = []
    for _ in range(gnn.iters):
        X = np.concatenate([H, E.mean(-1, keepdims=True)], -1).reshape(B * B, -1)
        m = _bn(X @ _np(gnn.msg_fc.weight).T, gnn.msg_bn, train)
        g = _bn(X @ _np(gnn.gate_fc.weight).T, gnn.gate_bn, train)
        m = (m / (1 + np.exp(-g))).reshape(B, B, D)                  # m * sigmoid(gate)
        E = E + m
        msgs.append(m)
    return E.mean(-1), np.concatenate(msgs, -1)


def _pca_update_ref(state, p, rate=0.9):
    """One update of the code's Incremental_PCA (Distillation.py:119-148) on numpy arrays."""
    mean, sigma, basis, n = state
    k = basis.shape[1]
    m = p.mean(0)
    prev = m if n == 0 else mean
    rows = np.vstack([p - m, sigma[:, None] * basis.T, (prev - m)[None]])
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    V = vt.T[:, :k].copy()
    for j in range(k):
        V[:, j] *= _sign(V[:, j])
    return (1 - rate) * mean + rate * m, s[:k], V, n + 1


def _plane_ref(v):
    C = len(v)
    c = np.full(C, 1 / math.sqrt(C))
    x = sum(v[i] * c[i] for i in range(C))
    return np.array([(v[i] + c[i]) * 2 / (1 + x) - 2 * c[i] for i in range(C)])


def _first_pca_ref(f):
    """Top singular pair of each image as [HW, C] (numpy SVD), sign fixed by v."""
    B, C = f.shape[:2]
    us, vs = [], []
    for b in range(B):
        X = f[b].reshape(C, -1).T
        U, _, Vt = np.linalg.svd(X, full_matrices=False)
        s = _sign(Vt[0])
        us.append(U[:, 0] * s)
        vs.append(Vt[0] * s)
    return np.array(us), np.array(vs)


# ---------------------------------------------------------------------------------------------
# the pieces

@pytest.mark.parametrize("shape", [(3, 4, 3, 3), (3, 6, 2, 2)])   # HW >= C and HW < C
def test_first_pca_is_the_svd_pair_with_the_sign_fix_and_sign_invariant(shape):
    f = _rng(1).normal(size=shape)
    u, v = P.first_pca(torch.tensor(f))
    ur, vr = _first_pca_ref(f)
    np.testing.assert_allclose(_np(u), ur, atol=1e-10)
    np.testing.assert_allclose(_np(v), vr, atol=1e-10)
    # the largest-magnitude entry of each v is positive
    assert all(row[np.argmax(np.abs(row))] > 0 for row in _np(v))
    # whatever sign the SVD returns, the fixed pair is the same
    for s in (1.0, -1.0):
        fu, fv = P.fix_sign(torch.tensor(ur) * s, torch.tensor(vr) * s)
        np.testing.assert_array_equal(_np(fu), ur)
        np.testing.assert_array_equal(_np(fv), vr)


def test_student_vector_is_the_normalised_projection_on_the_teachers_u():
    fs, u = _rng(2).normal(size=(2, 3, 2, 2)), _l2n(_rng(3).normal(size=(2, 4)))
    got = _np(P.student_vector(torch.tensor(fs), torch.tensor(u)))
    for b in range(2):
        x = fs[b].reshape(3, 4).T                   # [HW, C]
        ref = [sum(x[i, c] * u[b, i] for i in range(4)) for c in range(3)]
        np.testing.assert_allclose(got[b], np.array(ref) / np.linalg.norm(ref), atol=1e-12)


def test_plane_map_is_orthogonal_to_the_centre_with_the_closed_form_norm():
    v = _l2n(np.abs(_rng(4).normal(size=(5, 7))) * np.array([1, 1, 1, 1, -1, 1, 1]))
    p = _np(P.plane_map(torch.tensor(v)))
    c = np.full(7, 1 / math.sqrt(7))
    for b in range(5):
        np.testing.assert_allclose(p[b], _plane_ref(v[b]), atol=1e-12)
        assert abs(p[b] @ c) < 1e-12
        theta = math.acos(v[b] @ c)
        assert np.linalg.norm(p[b]) == pytest.approx(2 * math.tan(theta / 2), rel=1e-12)


def test_incremental_pca_on_one_batch_is_the_plain_pca_of_that_batch():
    p = _rng(5).normal(size=(10, 6)) + 3.0
    pca = P.IncrementalPCA(6).double()
    pca.update(torch.tensor(p))
    m = p.mean(0)
    _, s, vt = np.linalg.svd(p - m, full_matrices=False)        # the plain PCA of the batch
    V = vt[:3].T.copy()
    for j in range(3):
        V[:, j] *= _sign(V[:, j])
    np.testing.assert_allclose(_np(pca.basis), V, atol=1e-10)
    np.testing.assert_allclose(_np(pca.sigma), s[:3], atol=1e-10)
    np.testing.assert_allclose(_np(pca.mean), 0.9 * m, atol=1e-12)   # the code's 0.1 * 0 + 0.9 m
    np.testing.assert_allclose(_np(pca.project(torch.tensor(p))), (p - 0.9 * m) @ V, atol=1e-10)
    # later batches: the stacked SVD of the code, step by step
    state = (0.9 * m, s[:3], V, 1)
    for seed in (6, 7):
        q = _rng(seed).normal(size=(4, 6))
        pca.update(torch.tensor(q))
        state = _pca_update_ref(state, q)
        np.testing.assert_allclose(_np(pca.mean), state[0], atol=1e-10)
        np.testing.assert_allclose(_np(pca.sigma), state[1], atol=1e-10)
        np.testing.assert_allclose(_np(pca.basis), state[2], atol=1e-10)
    assert int(pca.updates) == 3


def test_kl_rows_sums_over_rows_and_cosine_affinity():
    x, y = _rng(8).normal(size=(3, 4)), _rng(9).normal(size=(3, 4))
    assert float(P.kl_rows(torch.tensor(x), torch.tensor(y))) == pytest.approx(_kl_ref(x, y), rel=1e-12)
    a = _np(P.cosine_affinity(torch.tensor(x)))
    for i in range(3):
        for j in range(3):
            assert a[i, j] == pytest.approx(x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]), rel=1e-12)


def _randomise_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("train", [True, False])
def test_mpnn_against_the_plain_reference(train):
    torch.manual_seed(0)
    gnn = P.MPNN(vertex_dim=3, edge_dim=2, hidden=4).double()
    _randomise_bn(gnn)
    gnn.train(train)
    c, cp = _rng(10).normal(size=(4, 3)), _rng(11).normal(size=(4, 2))
    ref_a, ref_m = _mpnn_ref(gnn, c, cp, train)
    a, m = gnn(torch.tensor(c), torch.tensor(cp))
    assert a.shape == (4, 4) and m.shape == (4, 4, 8)
    np.testing.assert_allclose(_np(a), ref_a, atol=1e-10)
    np.testing.assert_allclose(_np(m), ref_m, atol=1e-10)


def test_ramp_and_clip_scale():
    assert [round(P.ramp(e), 4) for e in (0, 1, 2)] == [0.5, 0.7311, 0.8808]
    assert P.ramp(19) == 1.0 and P.ramp(18) < 1.0
    t = torch.tensor
    assert float(P.clip_scale(t(4.0), t(2.0))) == 0.5 and float(P.clip_scale(t(1.0), t(2.0))) == 1.0
    assert float(P.clip_scale(t(0.0), t(0.0))) == 1.0 and float(P.clip_scale(t(3.0), t(0.0))) == 0.0


# ---------------------------------------------------------------------------------------------
# the method on three tiny sensing points

SHAPES = {"p0": (1, 4, 4, 4), "p1": (1, 8, 2, 2), "p2": (1, 8, 2, 2)}   # HW >= C at p0, HW < C after


def _method(name="iepkt", **opts):
    ctx = M.BuildContext(student="s", teacher="t", s_taps=M.Taps(maps=tuple(SHAPES)), t_taps=M.Taps(maps=tuple(SHAPES)),
                         s_shapes=SHAPES, t_shapes=SHAPES, options=M.MethodOptions(iepkt=I.IEPKTOptions(**opts)))
    torch.manual_seed(0)
    m = M.create(name, ctx).double()
    _randomise_bn(m)
    return m


def _feats(seed, B=5):
    r = _rng(seed)
    return [np.abs(r.normal(size=(B,) + s[1:])) for s in SHAPES.values()]


def _pca_state(pca):
    return (_np(pca.mean), _np(pca.sigma), _np(pca.basis), int(pca.updates))


def _teacher_ref(method, ft, states):
    """The teacher's u and c at every point, updating the given PCA states first (project=updated)."""
    us, cs, new = [], [], []
    for f, st in zip(ft, states):
        u, v = _first_pca_ref(f)
        p = np.array([_plane_ref(row) for row in v])
        st = _pca_update_ref(st, p)
        new.append(st)
        us.append(u)
        cs.append((p - st[0]) @ st[2])
    return us, cs, new


def test_gnn_stage_loss_against_the_reference():
    m = _method()
    for seed in (20, 21):     # two batches: the second starts from non-trivial PCA statistics
        ft = _feats(seed)
        states = [_pca_state(p) for p in m.pca]
        _, cs, _ = _teacher_ref(m, ft, states)
        ref = 0.0
        for l, gnn in enumerate(m.gnn, start=1):
            a = np.array([[cs[l][i] @ cs[l][j] / np.linalg.norm(cs[l][i]) / np.linalg.norm(cs[l][j])
                           for j in range(5)] for i in range(5)])
            ref += _kl_ref(a, _mpnn_ref(gnn, cs[l], cs[l - 1], train=True)[0])
        got = m.init_loss(M.Batch(fs=[], ft=[torch.tensor(f) for f in ft]))
        assert float(got.detach()) == pytest.approx(ref, rel=1e-9)
        got.backward()
        assert all(p.grad is not None for p in m.init_parameters(None))


@pytest.mark.parametrize("name", ["iepkt", "iepkt-bb"])
def test_student_terms_against_the_reference(name):
    m = _method(name)
    m.init_loss(M.Batch(fs=[], ft=[torch.tensor(f) for f in _feats(30)]))    # PCA and BN statistics
    ft, fs = _feats(31), _feats(32)
    states = [_pca_state(p) for p in m.pca]
    us = [_first_pca_ref(f)[0] for f in ft]
    ct = [(np.array([_plane_ref(r) for r in _first_pca_ref(f)[1]]) - st[0]) @ st[2] for f, st in zip(ft, states)]
    cs = []
    for f, u, st in zip(fs, us, states):
        B, C = f.shape[:2]
        v = _l2n(np.array([f[b].reshape(C, -1) @ u[b] for b in range(B)]))
        cs.append((np.array([_plane_ref(r) for r in v]) - st[0]) @ st[2])
    alt = inter = bb = 0.0
    for l, gnn in enumerate(m.gnn, start=1):
        a_t, m_t = _mpnn_ref(gnn, ct[l], ct[l - 1], train=False)
        a_s, m_s = _mpnn_ref(gnn, cs[l], cs[l - 1], train=False)
        alt += np.mean([np.abs(m_s[v, w] - m_t[v, w]).sum() for v in range(5) for w in range(5)])
        inter += _kl_ref(a_t, a_s)
        if name == "iepkt-bb":
            heads = m.heads[l - 1]

            def graph(c, cp):
                s = _bn(c @ _np(heads.s_fc.weight).T, heads.s_bn, False).reshape(5, heads.hidden, heads.heads)
                r = _bn(cp @ _np(heads.r_fc.weight).T, heads.r_bn, False).reshape(5, heads.hidden, heads.heads)
                return np.array([[[s[i, :, h] @ r[j, :, h] for j in range(5)] for i in range(5)]
                                 for h in range(heads.heads)])
            bb += _kl_ref(np.tanh(graph(cs[l], cs[l - 1])), np.tanh(graph(ct[l], ct[l - 1])))
    got = m.terms([torch.tensor(f, requires_grad=True) for f in fs], [torch.tensor(f) for f in ft])
    assert float(got["alt"].detach()) == pytest.approx(alt, rel=1e-9)
    assert float(got["int"].detach()) == pytest.approx(inter, rel=1e-9)
    if name == "iepkt-bb":
        assert float(got["bb"].detach()) == pytest.approx(bb, rel=1e-9) and bb > 0
    # the statistics stay frozen in the student phase (stats="frozen")
    assert all(np.array_equal(_np(p.basis), st[2]) for p, st in zip(m.pca, states))


def test_student_terms_are_differentiable_in_the_student_features():
    m = _method(clip="none")
    m.init_loss(M.Batch(fs=[], ft=[torch.tensor(f) for f in _feats(40, B=3)]))
    ft = [torch.tensor(f) for f in _feats(41, B=3)]
    fs = [torch.tensor(f) for f in _feats(42, B=3)]

    def total(f1):
        t = m.terms([fs[0], f1, fs[2]], ft)
        return t["alt"] + t["int"]
    assert torch.autograd.gradcheck(total, (fs[1].clone().requires_grad_(),), eps=1e-6, atol=1e-5)


def test_black_box_estimator_loss_against_the_reference():
    m = _method("iepkt-bb")
    m.init_loss(M.Batch(fs=[], ft=[torch.tensor(f) for f in _feats(50)]))
    _, cs = m.teacher_points([torch.tensor(f) for f in _feats(51)], update=False)
    cs_np = [_np(c) for c in cs]
    torch.manual_seed(7)
    got = float(m._estimator_loss(cs).detach())
    torch.manual_seed(7)
    ref = 0.0
    for l in range(1, 3):
        gnn, heads, est = m.gnn[l - 1], m.heads[l - 1], m.estimators[l - 1]
        c, cp = cs_np[l], cs_np[l - 1]
        s = _bn(c @ _np(heads.s_fc.weight).T, heads.s_bn, True).reshape(5, heads.hidden, heads.heads)
        r = _bn(cp @ _np(heads.r_fc.weight).T, heads.r_bn, True).reshape(5, heads.hidden, heads.heads)
        g = _softmax(np.array([s[:, :, h] @ r[:, :, h].T for h in range(heads.heads)]))
        ext = _mpnn_ref(gnn, c, cp, train=False)[1].mean(-1) * 2
        g = np.concatenate([g, ext[None]], 0)                        # [8, B, B]
        noise = torch.randn(8, 5, 1, dtype=torch.float64).numpy()
        g = g * (noise - noise.mean(0, keepdims=True) > 0)
        x = np.maximum(_bn(cp @ _np(est.fc0.weight).T, est.bn0, True), 0)
        flat = np.array([np.concatenate([g[n, b] @ x for n in range(8)]) for b in range(5)])
        y = _l2n(flat @ _np(est.fc1.weight).T + _np(est.fc1.bias))
        ref += np.mean([1 - c[b] @ y[b] for b in range(5)])
    assert got == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("mode", ["tensor", "global"])
@pytest.mark.parametrize("epoch", [0, 30])
def test_clipped_gradient_against_the_reference(mode, epoch):
    m = _method(clip=mode)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    m.bind_student(student)
    m.set_epoch(epoch)
    x = torch.tensor(_rng(60).normal(size=(6, 3)))
    y = torch.tensor([0, 1, 0, 1, 1, 0])

    def losses():
        h = student[1](student[0](x))
        out = student[2](h)
        ce = torch.nn.functional.cross_entropy(out, y)
        return ce, [30.0 * (h ** 2).mean(), 0.01 * out.pow(2).sum()]   # the second only reaches layer 2

    ce, terms = losses()
    value = m.clipped(terms, ce)
    assert float(value.detach()) == pytest.approx(float((terms[0] + terms[1]).detach()), rel=1e-15)
    value.backward()
    got = [p.grad.clone() for p in student.parameters()]
    # the reference: separate gradients, tf.clip_by_norm by hand
    params = list(student.parameters())
    ce, terms = losses()
    gce = torch.autograd.grad(ce, params, retain_graph=True)
    r = 1 / (1 + math.exp(-epoch)) if epoch < 19 else 1.0
    ref = [torch.zeros_like(p) for p in params]
    for t in terms:
        g = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        if mode == "tensor":
            for i in range(len(params)):
                n, lim = float(g[i].norm()), r * float(gce[i].norm())
                ref[i] += g[i] * (lim / max(n, lim) if max(n, lim) > 0 else 1.0)
        else:
            n = math.sqrt(sum(float(gi.pow(2).sum()) for gi in g))
            lim = r * math.sqrt(sum(float(gi.pow(2).sum()) for gi in gce))
            for i in range(len(params)):
                ref[i] += g[i] * (lim / max(n, lim))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the first term is large: the clipping changed the gradient
    ce, terms = losses()
    plain = torch.autograd.grad(terms[0] + terms[1], params)
    assert any(not torch.allclose(a, b) for a, b in zip(got, plain))


# ---------------------------------------------------------------------------------------------
# wiring

def test_sensing_points_of_the_papers_pair():
    for name in ("wrn_16_4", "wrn_40_4"):
        model = zoo.build(name)
        taps = D.method_taps("iepkt", name)
        shapes = D.probe_shapes(model, taps)
        assert [shapes[k] for k in taps.keys()] == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8)]
    assert D.method_taps("iepkt", "resnet8").maps == ("layer1", "layer2", "layer3")


@pytest.mark.parametrize("method", ["iepkt", "iepkt-bb"])
def test_no_gradient_to_the_teacher_or_the_gnn_in_the_student_phase(method):
    torch.manual_seed(0)
    teacher = zoo.build("resnet14", num_classes=10).eval()
    d = D.build_distiller(method, "resnet8", "resnet14", num_classes=10, teacher_model=teacher, seed=0)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    d.train()
    with d.hooked():
        d.init_step(x, y).backward()
        gnn_before = {k: v.clone() for k, v in d.criterion.state_dict().items()}
        for p in d.criterion.parameters():
            p.grad = None
        assert list(d.parameters()) == list(d.student.parameters())     # the GNN is not trained there
        opt = torch.optim.SGD(d.parameters(), lr=0.1)
        loss, _, parts = d.step(x, y)
        loss.backward()
        opt.step()
    assert set(parts) == {"ce", method} and float(parts[method]) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in d.criterion.parameters())
    assert d.student.layer1[0].conv1.weight.grad is not None           # the first point reaches the student
    after = d.criterion.state_dict()
    assert all(torch.equal(gnn_before[k], after[k]) for k in after)    # GNN, its BN and the PCA unchanged


def test_pca_statistics_update_in_the_student_phase_when_asked():
    torch.manual_seed(0)
    teacher = zoo.build("resnet14", num_classes=10).eval()
    opts = M.MethodOptions(iepkt=I.IEPKTOptions(stats="update"))
    d = D.build_distiller("iepkt", "resnet8", "resnet14", num_classes=10, teacher_model=teacher, options=opts)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    d.train()
    with d.hooked():
        d.init_step(x, y)
        before = d.criterion.pca[2].updates.clone()
        d.step(torch.randn(4, 3, 32, 32), y)
    assert int(d.criterion.pca[2].updates) == int(before) + 1


def test_mismatched_sensing_points_are_one_line():
    teacher = zoo.build("resnet8x4", num_classes=10)
    with pytest.raises(M.MethodShapeError) as err:
        D.build_distiller("iepkt", "resnet8", "resnet8x4", num_classes=10, teacher_model=teacher)
    assert str(err.value) == ("iepkt cannot align the sensing point 1 (layer1 / layer1) features: student "
                              "[1, 16, 32, 32], teacher [1, 64, 32, 32] (the student is projected on the "
                              "teacher's vectors: channels and size must be equal, e.g. wrn_40_4 -> wrn_16_4)")
    with pytest.raises(NeurosemError, match=r"^--iep-clip must be one of tensor, global, none, got 'all'$"):
        I.IEPKTOptions(clip="all").check()


# ---------------------------------------------------------------------------------------------
# training end to end

FAST = dict(epochs=2, init_epochs=2, batch_size=8, num_workers=0, progress=False, device="cpu")


@pytest.fixture(scope="module")
def data_and_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("iep")
    write_bright_cifar(root / "data", 20, 8)
    torch.manual_seed(0)
    weights = root / "resnet14.pth"
    torch.save(zoo.build("resnet14", num_classes=100).state_dict(), weights)
    return root / "data", weights


def _args(data_and_teacher, method="iepkt", **kw):
    data, weights = data_and_teacher
    return dict(teacher="resnet14", student="resnet8", method=method, data=f"cifar100:{data}",
                teacher_weights=str(weights), seed=1, **{**FAST, **kw})


def test_iepkt_trains_in_two_stages_and_records_its_settings(tmp_path, data_and_teacher):
    out = T.distill(run=tmp_path / "r", **_args(data_and_teacher, "iepkt-bb", iepkt={"clip": "global"}))
    cfg = out["config"]
    assert cfg["protocol"] == "iepkt" and cfg["lr"] == 0.1 and cfg["nesterov"] is True
    assert cfg["init_epochs"] == 2 and cfg["weights"] == {"ce": 1.0, "kd": 0.0, "beta": 1.0}
    assert cfg["options"] == {"iepkt": {"alt_weight": 1.0, "int_weight": 1.0, "bb_weight": 1.0, "clip": "global",
                                        "ramp": True, "stats": "frozen", "project": "updated", "iters": 2, "heads": 8}}
    assert cfg["student_layers"] == ["layer1", "layer2", "layer3"]
    h = out["history"]
    assert len(h["init_loss"]) == 2 and all(v > 0 for v in h["init_loss"])
    np.testing.assert_allclose(h["train_loss"], np.array(h["train_ce"]) + np.array(h["train_iepkt-bb"]), rtol=1e-5)
    assert T.PROTOCOLS["iepkt"].milestones == (30, 60, 80) and T.PROTOCOLS["iepkt"].lr_decay == 0.2
    assert T.PROTOCOLS["iepkt"].batch_size == 128 and M.get("iepkt").default_init_epochs == 20


def test_iepkt_resume_is_bit_identical(tmp_path, data_and_teacher, monkeypatch):
    args = _args(data_and_teacher)
    full = T.distill(run=tmp_path / "full", **args)
    real_save = T._save_checkpoint
    for cut, stop in (("in-gnn-stage", lambda s: s["epoch"] == 0 and s["init_epoch"] == 1),
                      ("in-student-stage", lambda s: s["epoch"] == 1)):
        def save_then_die(path, state, stop=stop):
            real_save(path, state)
            if stop(state):
                raise KeyboardInterrupt
        monkeypatch.setattr(T, "_save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            T.distill(run=tmp_path / cut, **args)
        monkeypatch.setattr(T, "_save_checkpoint", real_save)
        resumed = T.distill(run=tmp_path / cut, **args)
        assert resumed["history"]["init_loss"] == full["history"]["init_loss"]
        assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
        assert resumed["test_acc"] == full["test_acc"]
        a = torch.load(full["weights_path"], weights_only=True)
        b = torch.load(resumed["weights_path"], weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ca = torch.load(full["checkpoint_path"], weights_only=True)["criterion"]
        cb = torch.load(resumed["checkpoint_path"], weights_only=True)["criterion"]
        assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_cli_iepkt_options_and_one_line_errors(tmp_path, data_and_teacher, capsys):
    from neurosem.cli import main

    data, weights = data_and_teacher
    base = ["distill", "--teacher", "resnet14", "--student", "resnet8", "--data", f"cifar100:{data}",
            "--teacher-weights", str(weights), "--epochs", "1", "--init-epochs", "1", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--quiet"]
    main(base + ["--method", "iepkt", "--iep-clip", "none", "--iep-alt", "2", "--no-iep-ramp",
                 "--iep-stats", "update", "--iep-project", "previous", "--run", str(tmp_path / "cli")])
    saved = json.loads((tmp_path / "cli" / "distill.json").read_text())
    assert saved["config"]["options"]["iepkt"] == {"alt_weight": 2.0, "int_weight": 1.0, "clip": "none", "ramp": False,
                                                   "stats": "update", "project": "previous", "iters": 2}
    capsys.readouterr()
    for extra, msg in ((["--method", "kd", "--iep-alt", "2"], "error: the --iep-* options are IEPKT's; --method kd "
                                                             "takes none of them"),
                       (["--method", "iepkt", "--iep-bb", "2"], "error: --iep-bb weighs the black-box term of "
                                                              "--method iepkt-bb; --method iepkt has none"),
                       (["--method", "iepkt", "--iep-int", "-1"], "error: --iep-int must be >= 0, got -1.0")):
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra + ["--run", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err == [msg]
