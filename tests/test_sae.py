"""SparseAutoEncoder (CSR head) and CSRLoss: shapes, exact k-sparsity, dead-latent accounting, loss formula."""
import pytest
import torch
import torch.nn.functional as F

import sparse_retrieval as sr
from sparse_retrieval import losses, reference


def make(input_dim=19, hidden=67, k=5, seed=0, **kw):
    torch.manual_seed(seed)
    return sr.SparseAutoEncoder(input_dim, hidden, k, **kw)


def manual_topk_relu(pre, k):
    """Top-k by value (ties to the lower index), then ReLU: the definition the head must follow."""
    _, idx = reference.topk(pre, min(k, pre.shape[1]), dim=1)
    return F.relu(torch.zeros_like(pre).scatter_(1, idx, pre.gather(1, idx)))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("batch,k", [(1, 1), (13, 5), (8, 20)])
def test_forward_shapes_and_latents_follow_definition(device, tied, batch, k):
    m = make(k=k, tied=tied).to(device)
    x = torch.randn(batch, 19, device=device)
    out = m(x)
    pre = (x - m.pre_bias) @ m.encoder.weight.T + m.encoder.bias
    torch.testing.assert_close(out.latents, manual_topk_relu(pre, k))
    torch.testing.assert_close(out.latents_4k, manual_topk_relu(pre, 4 * k))
    torch.testing.assert_close(out.recon, out.latents @ m.W_dec.T + m.pre_bias)
    torch.testing.assert_close(out.recon_4k, out.latents_4k @ m.W_dec.T + m.pre_bias)
    assert out.latents.shape == (batch, 67) and out.recon.shape == (batch, 19)
    assert out.aux_recon is None  # nothing is dead yet
    assert bool(((out.latents > 0).sum(1) <= k).all())
    if tied:
        assert m.decoder_weight is None and m.W_dec.data_ptr() == m.encoder.weight.data_ptr()
    else:
        torch.testing.assert_close(m.W_dec, m.encoder.weight.T)  # initialised tied, then trained apart
        out.recon.sum().backward()
        assert m.decoder_weight.grad is not None and m.decoder_weight.grad.abs().sum() > 0


def test_encoder_rows_start_unit_norm():
    m = make()
    torch.testing.assert_close(m.encoder.weight.norm(dim=1), torch.ones(67))


@pytest.mark.parametrize("k", [1, 4, 16, 67])
def test_encode_has_exactly_k_nonzeros(k):
    m = make(k=4)
    with torch.no_grad():
        m.encoder.bias.fill_(100.0)  # every pre-activation positive
    x = torch.randn(9, 19)
    codes = m.encode(x, k=k)
    assert isinstance(codes, sr.SparseBatch) and codes.shape == (9, 67)
    assert codes.row_nnz().tolist() == [k] * 9
    torch.testing.assert_close(codes.to_dense(), manual_topk_relu(m.pre_activation(x), k))


def test_codes_are_differentiable_encode_without_accounting():
    m = make(k=5)
    m.train()
    x = torch.randn(8, 19)
    before = m.steps_since_active.clone()
    z = m.codes(x, k=7)
    torch.testing.assert_close(z.detach(), m.encode(x, k=7).to_dense())
    assert torch.equal(m.steps_since_active, before)  # extra loss terms are not training steps
    (z * torch.randn_like(z)).sum().backward()
    kept = (z != 0).any(0)
    grad_rows = m.encoder.weight.grad.abs().sum(1) != 0
    assert torch.equal(grad_rows, kept)  # gradient reaches exactly the latents some row kept
    with pytest.raises(ValueError, match="k: must be <= hidden_dim"):
        m.codes(x, k=68)


def test_encode_has_fewer_only_where_fewer_are_positive():
    m = make(k=6)
    positive = [0, 2, 5, 6, 7, 7, 7]  # per row: how many latents get a positive pre-activation
    with torch.no_grad():
        m.encoder.weight.zero_()
        m.encoder.bias.fill_(-1.0)
    x = torch.zeros(len(positive), 19)
    codes = m.encode(x)  # all rows equal so far: no positive latent
    assert codes.row_nnz().tolist() == [0] * len(positive)
    with torch.no_grad():
        m.encoder.bias.zero_()
        for j in range(7):
            m.encoder.weight[j, j] = 1.0  # latent j reads input dimension j
    for i, n in enumerate(positive):
        x[i, :n] = torch.arange(1, n + 1, dtype=torch.float32)
    nnz = m.encode(x).row_nnz().tolist()
    assert nnz == [min(n, 6) for n in positive]


def test_bad_arguments():
    with pytest.raises(ValueError, match="k: must be <= hidden_dim"):
        sr.SparseAutoEncoder(4, 8, 9)
    with pytest.raises(ValueError, match="input_dim"):
        sr.SparseAutoEncoder(0, 8, 2)
    with pytest.raises(ValueError, match="k_aux"):
        sr.SparseAutoEncoder(4, 8, 2, k_aux=-1)
    m = make()
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 19\)"):
        m(torch.randn(3, 18))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        m.encode(torch.ones(3, 19, dtype=torch.int64))
    with pytest.raises(ValueError, match="k: must be <= hidden_dim"):
        m.encode(torch.randn(3, 19), k=68)
    with pytest.raises(ValueError, match="positives: has 2 rows"):
        sr.CSRLoss()(m, torch.randn(3, 19), torch.randn(2, 19))
    with pytest.raises(ValueError, match="temperature"):
        sr.CSRLoss(temperature=0)


def test_dead_latent_accounting_over_steps():
    m = make(k=3, k_aux=4, dead_after_steps=3)
    always = [10, 20, 30]
    with torch.no_grad():
        m.encoder.bias.fill_(-5.0)
        m.encoder.bias[always] = 50.0  # these three win every row's top-k
    x = torch.randn(6, 19) * 0.1
    m.train()
    for step in range(1, 5):
        out = m(x)
        live = torch.zeros(67, dtype=torch.bool)
        live[always] = True
        assert m.steps_since_active[live].tolist() == [0, 0, 0]
        assert bool((m.steps_since_active[~live] == step).all())
        # The dead mask in force during a step is the one from before it.
        assert (out.aux_recon is None) == (step <= 3)
    assert int(m.dead_mask.sum()) == 64
    m.eval()
    before = m.steps_since_active.clone()
    out = m(x)
    assert torch.equal(m.steps_since_active, before)  # eval mode does not count steps
    pre = m.pre_activation(x)
    masked = torch.where(m.dead_mask, pre, torch.full_like(pre, -1e30))
    want = manual_topk_relu(masked, 4) @ m.W_dec.T
    torch.testing.assert_close(out.aux_recon, want)
    # A dead latent that fires again is revived.
    with torch.no_grad():
        m.encoder.bias[5] = 100.0
    m.train()
    m(x)
    assert int(m.steps_since_active[5]) == 0 and not bool(m.dead_mask[5])


def csr_formula(m, a, p, k4_weight, aux_weight, cw, temperature, flops_weight):
    x = torch.cat([a, p]) if p is not None else a
    out = m(x)
    total = F.mse_loss(out.recon, x) + k4_weight * F.mse_loss(out.recon_4k, x)
    if out.aux_recon is not None:
        e = (x - out.recon).detach()
        total = total + aux_weight * F.mse_loss(out.aux_recon, e) / ((e - e.mean(0)) ** 2).mean()
    if p is not None:
        za, zp = out.latents.chunk(2)
        logits = za @ zp.T / temperature
        total = total + cw * F.cross_entropy(logits, torch.arange(len(a)))
    return total + flops_weight * (out.latents.abs().mean(0) ** 2).sum()


@pytest.mark.parametrize("with_positives", [True, False])
@pytest.mark.parametrize("dead", [False, True])
def test_csr_loss_matches_formula_and_gradients(with_positives, dead):
    m = make(k=4, k_aux=6, dead_after_steps=1)
    m.eval()  # no accounting during the comparison: both calls see the same dead mask
    if dead:
        m.steps_since_active[::2] = 5
    a = torch.randn(7, 19)
    p = torch.randn(7, 19) if with_positives else None
    loss_fn = sr.CSRLoss(k4_weight=0.25, aux_weight=0.5, contrastive_weight=0.3, temperature=0.7, flops_weight=0.05)
    got = loss_fn(m, a, p)
    grads = torch.autograd.grad(got, list(m.parameters()))
    want = csr_formula(m, a, p, 0.25, 0.5, 0.3, 0.7, 0.05)
    want_grads = torch.autograd.grad(want, list(m.parameters()))
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    assert (loss_fn.last["aux"] > 0) == dead and (loss_fn.last["contrastive"] > 0) == with_positives
    assert loss_fn.last["dead"] == (34 if dead else 0)


def test_csr_loss_counts_one_step_per_call_and_schedules_flops():
    m = make(k=2, dead_after_steps=1000)
    sched = losses.RegularizerScheduler(0.4, warmup_steps=2)
    loss_fn = sr.CSRLoss(flops_weight=sched)
    a, p = torch.randn(5, 19), torch.randn(5, 19)
    weights = []
    for _ in range(3):
        loss_fn(m, a, p)
        weights.append(loss_fn.last["flops_weight"])
    assert weights == [0.0, pytest.approx(0.1), pytest.approx(0.4)]
    assert int(m.steps_since_active.max()) == 3  # one step per call, not one per anchor/positive half


def test_training_lowers_reconstruction_error():
    torch.manual_seed(1)
    basis = torch.randn(6, 19)
    x = torch.randn(256, 6) @ basis  # data on a 6-dimensional subspace
    m = make(k=6, hidden=48)
    loss_fn = sr.CSRLoss(contrastive_weight=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = loss_fn(m, x)
        first = loss_fn.last["recon_k"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn.last["recon_k"] < 0.2 * first
