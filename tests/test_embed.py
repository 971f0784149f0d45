"""Neuron embedding (paper eq. 1): hand-computed loss, P-bar streaming, trainers, embedding.h5, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from neurosem._embed_train import (init_vectors, store_epoch_batches, tensor_epoch_batches, train_fit,
                                   train_paper)
from neurosem.embed import (PbarAccumulator, accumulate_pbar, cosine_matrix, embedding_loss,
                            similarity_probs)
from neurosem.errors import NeurosemError


def _softmax_row(logits: list[float]) -> list[float]:
    e = [math.exp(v) for v in logits]
    return [v / sum(e) for v in e]


def _plain_pbar(acts: np.ndarray, tau: float) -> np.ndarray:
    """Reference P-bar with explicit loops: acts [N, C, H, W] -> [C, C]."""
    n, c = acts.shape[:2]
    out = np.zeros((c, c))
    for a in acts.reshape(n, c, -1).astype(np.float64):
        norms = [max(math.sqrt(float(v @ v)), 1e-12) for v in a]
        for i in range(c):
            row = [float(a[i] @ a[j]) / (norms[i] * norms[j]) / tau for j in range(c)]
            out[i] += _softmax_row(row)
    return out / n


# ------------------------------------------------------------------------------------ the loss

def test_similarity_probs_hand_computed_with_zero_map():
    # maps: a0 = (1, 0), a1 = 0 (all zero), a2 = (1, 1)
    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
    r = 1 / math.sqrt(2)
    cos = [[1, 0, r], [0, 0, 0], [r, 0, 1]]
    for tau in (1.0, 0.5):
        P = similarity_probs(x, tau)
        assert P.shape == (1, 3, 3) and not torch.isnan(P).any()
        expected = [_softmax_row([c / tau for c in row]) for row in cos]
        assert np.allclose(P[0].numpy(), expected, atol=1e-7)
    # the zero map's row is uniform, its column is the cos-0 entry of every row
    assert np.allclose(similarity_probs(x)[0, 1].numpy(), [1 / 3] * 3)
    # [B, C, H, W] maps are flattened
    assert torch.allclose(similarity_probs(x.reshape(1, 3, 1, 2)), similarity_probs(x))


def test_cosine_matrix_half_precision_and_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)
    c = cosine_matrix(x)
    assert c.dtype == torch.float32
    assert torch.allclose(c, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_embedding_loss_hand_computed_c2():
    S = torch.tensor([[1.0, 0.0], [0.0, 1.0]])           # cos(s0, s1) = 0
    P = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    big, small = math.log(math.e / (1 + math.e)), math.log(1 / (1 + math.e))  # log Q(i|i), log Q(j|i)
    expected = -(0.7 * big + 0.3 * small + 0.4 * small + 0.6 * big) / 2
    assert float(embedding_loss(P, S)) == pytest.approx(expected, abs=1e-6)
    # [B, C, C]: the mean over the batch
    P2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    batch = torch.stack([P, P2])
    e2 = -(big + big) / 2
    assert float(embedding_loss(batch, S)) == pytest.approx((expected + e2) / 2, abs=1e-6)


def test_embedding_loss_hand_computed_c3_temperature():
    # s0 = s1 = (1, 0), s2 = (-1, 0): cos = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]
    S = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    P = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], dtype=torch.float64)
    tau = 0.5
    cos = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]
    total = 0.0
    for i in range(3):
        q = _softmax_row([c / tau for c in cos[i]])
        total += sum(P[i, j].item() * math.log(q[j]) for j in range(3))
    assert float(embedding_loss(P, S, tau)) == pytest.approx(-total / 3, rel=1e-12)


def test_embedding_loss_zero_vector_is_finite():
    S = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = embedding_loss(torch.full((2, 2), 0.5), S)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(S.grad).all()


def test_temperature_must_be_positive():
    with pytest.raises(NeurosemError, match="temperature"):
        similarity_probs(torch.ones(1, 2, 2), temperature=0.0)


# ------------------------------------------------------------------------------------ P-bar

def test_pbar_batches_equal_all_at_once_and_reference():
    g = torch.Generator().manual_seed(3)
    acts = torch.relu(torch.randn(11, 5, 3, 4, generator=g))
    acts[4, 2] = 0                                      # an all-zero map
    tau = 0.3
    ref = _plain_pbar(acts.numpy(), tau)
    at_once = accumulate_pbar([(0, {"l": acts})], {"l": 5}, tau)["l"]
    batched = accumulate_pbar([(s, {"l": acts[s:s + 3]}) for s in range(0, 11, 3)], {"l": 5}, tau)["l"]
    assert at_once.dtype == torch.float64 and at_once.shape == (5, 5)
    assert np.allclose(at_once.numpy(), ref, atol=1e-6)
    assert np.allclose(batched.numpy(), at_once.numpy(), atol=1e-12, rtol=0)
    assert np.allclose(at_once.sum(1).numpy(), 1.0)
    # state_dict/load_state_dict resumes mid-stream; float16 numpy input works as the store gives it
    acc = PbarAccumulator(5, tau, name="l")
    acc.add(acts[:6].numpy().astype(np.float16))
    resumed = PbarAccumulator(5, tau, name="l")
    resumed.load_state_dict(acc.state_dict())
    resumed.add(acts[6:].numpy().astype(np.float16))
    assert resumed.count == 11
    assert np.allclose(resumed.result().numpy(), ref, atol=2e-3)


def test_pbar_blocks_do_not_change_the_sum(monkeypatch):
    import neurosem.embed as E

    acts = torch.rand(9, 4, 3, 3)
    whole = E.sum_similarity_probs(acts, 0.5, torch.float64)
    monkeypatch.setattr(E, "_BLOCK_ELEMENTS", 1)                # one image per block
    monkeypatch.setattr(E, "_CPU_BLOCK_ELEMENTS", 1)
    assert torch.allclose(E.sum_similarity_probs(acts, 0.5, torch.float64), whole, atol=1e-12, rtol=0)
    assert torch.allclose(whole, similarity_probs(acts, 0.5).double().sum(0), atol=1e-6)


def test_pbar_nan_names_layer_and_image():
    acts = torch.rand(8, 3, 2, 2)
    acts[5, 1, 0, 1] = float("nan")
    batches = [(0, {"conv": acts[:4]}), (4, {"conv": acts[4:]})]
    with pytest.raises(NeurosemError, match=r"layer 'conv' are NaN/Inf at image 5"):
        accumulate_pbar(batches, {"conv": 3})
    acts[5, 1, 0, 1] = float("inf")
    with pytest.raises(NeurosemError, match="image 5"):
        accumulate_pbar(batches, {"conv": 3})


# ------------------------------------------------------------------------------------ trainers

def _structured_acts(n: int = 96, c: int = 12, hw: int = 6, seed: int = 0) -> torch.Tensor:
    """Non-negative maps that mix 4 latent maps (so units have a real similarity structure)."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.rand(n, 4, hw * hw, generator=g)
    mix = torch.rand(c, 4, generator=g) ** 3
    return torch.relu(torch.einsum("ck,nkd->ncd", mix, lat) - 0.2).reshape(n, c, hw, hw)


def test_analytic_gradient_matches_autograd():
    from neurosem._embed_train import loss_and_grad

    g = torch.Generator().manual_seed(0)
    P = torch.softmax(torch.randn(7, 7, generator=g, dtype=torch.float64), 1)
    for tau in (1.0, 0.3):
        S = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
        loss = embedding_loss(P, S, tau)
        loss.backward()
        value, grad = loss_and_grad(P, S.detach(), tau)
        assert float(value) == pytest.approx(float(loss.detach()), abs=1e-14)
        assert torch.allclose(grad, S.grad, atol=1e-14, rtol=1e-10)


def test_fit_is_exact_minimum_and_deterministic():
    acts = _structured_acts()
    pbar = accumulate_pbar([(0, {"l": acts})], {"l": 12}, 0.2)
    res = train_fit(pbar, dim=4, temperature=0.2, seed=1)
    assert res.info["converged"]["l"]
    assert np.all(np.diff(res.history_loss) <= 1e-12)            # L-BFGS with line search never goes up
    S = torch.tensor(res.vectors["l"], dtype=torch.float64, requires_grad=True)
    loss = embedding_loss(pbar["l"], S, 0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(res.final_loss, abs=1e-6)
    assert float(S.grad.abs().max()) < 1e-4                       # a stationary point
    # snapshots: the initialisation first, then steps 1, 2, 4, ..., last
    assert res.snapshot_steps[0] == 0 and res.snapshot_steps[-1] == res.history_step[-1]
    assert np.array_equal(res.snapshots["l"][0], init_vectors(12, 4, 1, "l").numpy().astype(np.float32))
    again = train_fit(pbar, dim=4, temperature=0.2, seed=1)
    assert np.array_equal(again.vectors["l"], res.vectors["l"])  # bitwise
    other = train_fit(pbar, dim=4, temperature=0.2, seed=2)
    assert not np.array_equal(other.vectors["l"], res.vectors["l"])


def test_paper_trainer_matches_plain_sgd_reference():
    acts = _structured_acts(n=20, c=5, hw=3)
    lr, mom, wd, tau, bs = 0.5, 0.9, 5e-4, 0.5, 8
    batches = tensor_epoch_batches({"a": acts}, batch_size=bs, seed=4)
    res = train_paper(batches, {"a": 5}, dim=3, epochs=3, lr=lr, momentum=mom, weight_decay=wd,
                      milestones=(2,), temperature=tau, seed=4)
    # plain re-implementation: SGD with momentum and L2 weight decay, lr x0.1 after epoch 2 (CRD's rule)
    S = init_vectors(5, 3, 4, "a").float()
    buf = None
    for epoch in range(1, 4):
        rate = lr if epoch <= 2 else lr * 0.1
        for b in batches(epoch):
            Sg = S.clone().requires_grad_(True)
            x = b["a"].flatten(2)
            xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            P = torch.softmax(xn @ xn.transpose(1, 2) / tau, -1).mean(0)
            sn = Sg / Sg.norm(dim=-1, keepdim=True)
            loss = -(P * torch.log_softmax(sn @ sn.T / tau, -1)).sum() / 5
            loss.backward()
            grad = Sg.grad + wd * S
            buf = grad if buf is None else mom * buf + grad
            S = S - rate * buf
        assert np.allclose(res.snapshots["a"][epoch], S.numpy(), atol=1e-5), epoch
    assert list(res.snapshot_steps) == [0, 1, 2, 3] and len(res.train_loss) == 4


def test_fit_loss_not_above_paper_protocol():
    acts = _structured_acts(n=128, c=16)
    sizes = {"l": 16}
    for tau in (1.0, 0.1):
        pbar = accumulate_pbar([(0, {"l": acts})], sizes, tau)
        fit = train_fit(pbar, dim=8, temperature=tau)
        paper = train_paper(tensor_epoch_batches({"l": acts}, 16, 0), sizes, dim=8, epochs=6,
                            milestones=(3, 5), temperature=tau, pbar=pbar)
        assert paper.info["exact_history"]
        assert fit.final_loss <= paper.final_loss + 1e-9
        # both histories start at the same initialisation, evaluated the same way
        assert fit.history_loss[0] == pytest.approx(paper.history_loss[0], abs=1e-6)


def test_planted_identical_units_together_disjoint_apart():
    g = torch.Generator().manual_seed(0)
    n, hw = 64, 8
    base = torch.rand(n, 3, hw, hw, generator=g)
    left = torch.zeros(n, 1, hw, hw)
    left[..., : hw // 2] = base[:, :1, :, : hw // 2]
    right = torch.zeros(n, 1, hw, hw)
    right[..., hw // 2:] = base[:, 1:2, :, hw // 2:]
    # units 0 and 1 identical, unit 2 disjoint from them (other half of the map), 3, 4 similar to 2
    acts = torch.cat([left, left.clone(), right, right * 0.5 + 0.1 * base[:, 2:3], right + 0.05], 1)
    for tau in (1.0, 0.2):
        pbar = accumulate_pbar([(0, {"l": acts})], {"l": 5}, tau)
        S = torch.tensor(train_fit(pbar, dim=4, temperature=tau).vectors["l"])
        cos = cosine_matrix(S)
        assert cos[0, 1] > 0.99                                   # identical units together
        assert abs(cos[0, 2]) < 0.1 and abs(cos[1, 2]) < 0.1      # disjoint maps (cosine 0) apart
        assert cos[2, 4] > 0.9 and cos[2, 3] > 0.9                # overlapping maps close


def test_store_epoch_batches_cover_each_image_once(tmp_path):
    from neurosem.store import ActivationStore

    n = 23
    acts = np.arange(n, dtype=np.float16)[:, None, None, None] * np.ones((1, 2, 2, 2), np.float16)
    store = ActivationStore.create(tmp_path / "a.h5", {"l": (2, 2, 2)}, n)
    store.append({"l": acts}, [f"img{i}" for i in range(n)])
    store.close()
    with ActivationStore.open(tmp_path / "a.h5") as st:
        batches = store_epoch_batches(st, ["l"], batch_size=4, seed=0, block_bytes=7 * 16)
        seen = []
        for epoch in (1, 2):
            order = [int(v) for b in batches(epoch) for v in b["l"][:, 0, 0, 0].tolist()]
            assert sorted(order) == list(range(n))
            seen.append(order)
            sizes = [len(b["l"]) for b in batches(epoch)]
            assert all(s == 4 for s in sizes[:-1])
        assert seen[0] != seen[1]                                     # reshuffled per epoch
        assert [int(v) for b in batches(1) for v in b["l"][:, 0, 0, 0].tolist()] == seen[0]  # per seed


# ------------------------------------------------------------------------------------ the stage

PLANTED = str((Path(__file__).parent / "_planted.py").resolve())
TINY = f"{PLANTED}:tiny_cnn"


def _hand_run(root, layers: dict, n: int, nan_at: tuple | None = None):
    """A run directory holding a hand-made complete store: layers {name: (C, H, W)}."""
    from neurosem.store import ActivationStore

    g = np.random.default_rng(0)
    run = root / "run"
    run.mkdir(parents=True)
    store = ActivationStore.create(run / "activations.h5", layers, n, provenance={"model": "hand", "layers": list(layers)})
    acts = {l: g.random((n, *s)).astype(np.float16) for l, s in layers.items()}
    if nan_at is not None:
        layer, image = nan_at
        acts[layer][image, 0, 0, 0] = np.nan
    store.append(acts, [f"img{i}" for i in range(n)])
    store.mark_complete()
    store.close()
    return run, acts


def test_embed_stage_writes_and_loads(tmp_path, tiny_broden):
    from neurosem.embed import embed, load_embedding
    from neurosem.run import RunDir
    from neurosem.store import ActivationStore

    run = tmp_path / "run"
    path = embed(TINY, data=str(tiny_broden), run=run, dim=4, device="cpu", progress=False)
    assert path == RunDir(run).embedding and path.exists()
    emb = load_embedding(run)
    assert emb.layers == ["layer1", "layer2"] and emb.trainer == "fit"
    assert emb.vectors("layer1").shape == (6, 4) and emb.vectors("layer2").shape == (8, 4)
    assert emb.snapshots("layer2").shape == (len(emb.snapshot_steps), 8, 4) and emb.snapshot_steps[0] == 0
    assert np.array_equal(emb.snapshots("layer2")[0], init_vectors(8, 4, 0, "layer2").numpy().astype(np.float32))
    assert np.array_equal(emb.snapshots("layer2")[-1], emb.vectors("layer2"))
    assert emb.config["dim"] == 4 and emb.config["temperature"] == 1.0 and emb.config["n_images"] == 12
    # P-bar equals the plain reference on the stored activations; the vectors are train_fit's on it
    with ActivationStore.open(run / "activations.h5") as st:
        for layer in emb.layers:
            assert np.allclose(emb.pbar(layer), _plain_pbar(st.read(layer), 1.0), atol=1e-6)
    pbar = {l: torch.from_numpy(emb.pbar(l)) for l in emb.layers}
    direct = train_fit(pbar, dim=4)
    assert all(np.array_equal(direct.vectors[l], emb.vectors(l)) for l in emb.layers)
    assert emb.final_loss == pytest.approx(direct.final_loss, abs=1e-12)
    assert emb.history_loss[-1] == pytest.approx(np.mean([emb.layer_loss(l)[-1] for l in emb.layers]))
    meta = RunDir(run).read_meta()
    assert meta["embed"]["trainer"] == "fit" and meta["embed"]["final_loss"] == pytest.approx(emb.final_loss)
    with pytest.raises(NeurosemError, match="did you mean layer2"):
        emb.vectors("layer22")
    # the same seed gives bitwise the same vectors (the store is reused), another seed others
    embed(run=run, dim=4, device="cpu", progress=False)
    again = load_embedding(run / "embedding.h5")
    assert all(np.array_equal(again.vectors(l), emb.vectors(l)) for l in emb.layers)
    embed(run=run, dim=4, seed=1, device="cpu", progress=False)
    assert not np.array_equal(load_embedding(run).vectors("layer1"), emb.vectors("layer1"))


def test_embed_fit_not_above_paper_and_no_store(tmp_path, tiny_broden):
    from neurosem.embed import embed, load_embedding

    run = tmp_path / "run"
    embed(TINY, data=str(tiny_broden), run=run, dim=4, temperature=0.5, device="cpu", progress=False)
    fit = load_embedding(run)
    embed(run=run, dim=4, temperature=0.5, trainer="paper", epochs=3, batch_size=4, milestones=(2,),
          device="cpu", progress=False)
    paper = load_embedding(run)
    assert paper.trainer == "paper" and list(paper.snapshot_steps) == [0, 1, 2, 3]
    assert fit.final_loss <= paper.final_loss
    assert paper.history_loss[0] == pytest.approx(fit.history_loss[0], abs=1e-9)   # same init, same P-bar
    # --no-store: straight from the model (float32 maps instead of the float16 store)
    other = tmp_path / "nostore"
    embed(TINY, data=str(tiny_broden), run=other, dim=4, temperature=0.5, no_store=True, device="cpu",
          progress=False)
    assert not (other / "activations.h5").exists()
    direct = load_embedding(other)
    for layer in fit.layers:
        assert np.allclose(direct.pbar(layer), fit.pbar(layer), atol=1e-4)
    embed(TINY, data=str(tiny_broden), run=other, dim=4, temperature=0.5, no_store=True, trainer="paper",
          epochs=2, batch_size=4, device="cpu", progress=False)
    assert load_embedding(other).history_loss.shape == (3,)


def test_embed_bad_input(tmp_path, tiny_broden):
    from neurosem.embed import embed, load_embedding
    from neurosem.errors import RunMismatchError

    with pytest.raises(NeurosemError, match="--dim must be an integer >= 1"):
        embed(TINY, data=str(tiny_broden), run=tmp_path / "r0", dim=0)
    with pytest.raises(NeurosemError, match="unknown --trainer"):
        embed(TINY, data=str(tiny_broden), run=tmp_path / "r0", trainer="adam")
    with pytest.raises(NeurosemError, match=r"no embedding at .*run `neurosem embed"):
        load_embedding(tmp_path / "nowhere")
    # a run recorded with another model / other layers: the error names the difference
    run = tmp_path / "run"
    embed(TINY, data=str(tiny_broden), run=run, dim=2, layers=["layer2"], device="cpu", progress=False)
    with pytest.raises(RunMismatchError, match=r"model: .*tiny_cnn.* vs .*TinyCNN") as err:
        embed(f"{PLANTED}:TinyCNN", data=str(tiny_broden), run=run, device="cpu", progress=False)
    assert "\n" not in str(err.value) and "neurosem record" in str(err.value)
    with pytest.raises(RunMismatchError, match=r"layers: \['layer2'\] vs \['layer1'\]"):
        embed(run=run, layers=["layer1"], device="cpu", progress=False)


def test_embed_bad_activations(tmp_path):
    from neurosem.embed import embed

    run, _ = _hand_run(tmp_path / "one", {"a": (3, 2, 2), "single": (1, 2, 2)}, 5)
    with pytest.raises(NeurosemError, match="layer 'single' has 1 unit.*choose other --layers"):
        embed(run=run, device="cpu", progress=False)
    run, _ = _hand_run(tmp_path / "nan", {"a": (3, 2, 2), "b": (4, 2, 2)}, 9, nan_at=("b", 6))
    with pytest.raises(NeurosemError, match=r"layer 'b' are NaN/Inf at image 6 \(img6\)"):
        embed(run=run, device="cpu", progress=False)
    assert not (run / "embedding.h5").exists()
    # the good layer alone still works (the run's other layers are untouched)
    assert embed(run=run, layers=["a"], dim=2, device="cpu", progress=False).exists()


def test_pbar_nan_in_one_map_of_many_and_minus_inf():
    acts = torch.rand(6, 4, 3, 3, dtype=torch.float16)
    acts[3, 2, 1, 1] = float("-inf")
    with pytest.raises(NeurosemError, match=r"layer 'c' are Inf at image 9 \(img9\)"):
        accumulate_pbar([(6, {"c": acts})], {"c": 4}, image_ids=[f"img{i}" for i in range(12)])
    acc = PbarAccumulator(4, name="c")
    acc.add(torch.zeros(2, 4, 3, 3))                                 # all-zero maps are finite
    assert torch.equal(acc.result(), torch.full((4, 4), 0.25, dtype=torch.float64))


def test_fit_same_bits_whatever_torch_threads():
    """The fit runs on one torch thread, so torch's thread count (which splits sums of > 32768
    elements differently) cannot change the vectors; the caller's setting is restored."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 40, generator=g) ** 4
    P = torch.softmax(cosine_matrix(x.double()) / 0.2, dim=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = train_fit({"l": P}, dim=8, temperature=0.2, max_steps=25)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = train_fit({"l": P}, dim=8, temperature=0.2, max_steps=25)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(one.vectors["l"], two.vectors["l"])
    assert np.array_equal(one.history_loss, two.history_loss)


def test_pbar_layers_side_by_side_equal_one_by_one():
    g = torch.Generator().manual_seed(1)
    acts = {"a": torch.rand(10, 5, 4, 4, generator=g), "b": torch.rand(10, 70, 3, 3, generator=g),
            "c": torch.rand(10, 3, 8, 8, generator=g).half()}
    batches = [(s, {l: a[s:s + 4] for l, a in acts.items()}) for s in range(0, 10, 4)]
    n_units = {l: a.shape[1] for l, a in acts.items()}
    one = accumulate_pbar(batches, n_units, 0.7, workers=1)
    three = accumulate_pbar(batches, n_units, 0.7, workers=3)
    assert list(three) == ["a", "b", "c"] and all(torch.equal(one[l], three[l]) for l in acts)
    for l in acts:                                          # each layer as if accumulated alone
        assert torch.equal(three[l], accumulate_pbar([(s, {l: b[l]}) for s, b in batches], {l: n_units[l]}, 0.7)[l])
    threads = torch.get_num_threads()
    acts["c"][8, 0, 0, 0] = float("nan")                     # same batch as b's, a later layer
    acts["b"][9, 0, 0, 0] = float("nan")
    with pytest.raises(NeurosemError, match=r"layer 'b' are NaN/Inf at image 9"):  # the first layer's error
        accumulate_pbar(batches, n_units, workers=3)
    assert torch.get_num_threads() == threads               # restored after an error too
