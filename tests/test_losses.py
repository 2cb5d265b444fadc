"""Losses and regularizers against direct formulas, dense and SparseBatch inputs, gradients against autograd of the
formulas."""
import math

import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval import losses


def rand_sparse_dense(rows, dim, device, seed, density=0.3):
    """A dense (rows, dim) tensor with exact zeros (an all-zero row included) and its SparseBatch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g) * (torch.rand(rows, dim, generator=g) < density)
    x[rows // 2] = 0
    x = x.to(device)
    return x, sr.SparseBatch.from_dense(x)


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def sparse_leaf(s: sr.SparseBatch) -> sr.SparseBatch:
    return sr.SparseBatch(s.indptr, s.indices, leaf(s.values), s.dim, check=False)


def grad_at_nonzeros(dense_grad, s: sr.SparseBatch):
    return dense_grad[s.row_ids(), s.indices.long()]


# ---- regularizers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,dim", [(1, 1), (7, 33), (16, 130)])
def test_regularizers_match_formula_and_sparse(device, rows, dim):
    x, s = rand_sparse_dense(rows, dim, device, seed=rows * dim)
    want_flops = sum((sum(abs(float(x[i, j])) for i in range(rows)) / rows) ** 2 for j in range(dim))
    want_l1 = sum(abs(float(v)) for v in x.flatten()) / rows
    for fn, want in ((losses.flops, want_flops), (losses.l1, want_l1)):
        xd, xs = leaf(x), sparse_leaf(s)
        got_dense, got_sparse = fn(xd), fn(xs)
        assert got_dense.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert got_sparse.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
        got_dense.backward()
        got_sparse.backward()
        torch.testing.assert_close(xs.values.grad, grad_at_nonzeros(xd.grad, s))


def test_flops_gradient_against_autograd_of_formula():
    x = torch.randn(5, 9, dtype=torch.float64)
    a, b = leaf(x), leaf(x)
    losses.flops(a).backward()
    torch.stack([b[:, j].abs().mean() for j in range(9)]).square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_regularizers_reject_bad_input():
    with pytest.raises(ValueError, match="x: needs at least one row"):
        losses.flops(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        losses.l1(torch.zeros(4))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        losses.flops(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="x: expected a"):
        losses.l1([[1.0]])


def test_regularizer_scheduler():
    s = losses.RegularizerScheduler(0.5, warmup_steps=10)
    assert [s(t) for t in (0, 5, 10, 20)] == [0.0, 0.5 * 0.25, 0.5, 0.5]
    assert s(3) == pytest.approx(0.5 * 0.09)
    assert s.value == 0.0
    assert [s.step() for _ in range(3)] == [pytest.approx(0.5 * (t / 10) ** 2) for t in (1, 2, 3)]
    assert s.t == 3
    assert losses.RegularizerScheduler(2.0)(0) == 2.0
    for bad in ({"lam": -1.0, "warmup_steps": 1}, {"lam": 1.0, "warmup_steps": -1}, {"lam": 1.0, "warmup_steps": 1.5}):
        with pytest.raises(ValueError):
            losses.RegularizerScheduler(**bad)
    with pytest.raises(ValueError, match="t: step"):
        s(-1)


# ---- ranking losses ----------------------------------------------------------------------------------------
def info_nce_formula(q, pos, negs, temperature):
    docs = [pos] + negs
    total = 0.0
    b = q.shape[0]
    for i in range(b):
        logits = torch.stack([q[i] @ d[j] for d in docs for j in range(b)]) / temperature
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / b


def student(q, pos, negs):
    return torch.stack([(q * d).sum(1) for d in [pos] + negs], 1)


def margin_mse_formula(q, pos, negs, teacher_margin):
    s = student(q, pos, negs)
    return ((s[:, :1] - s[:, 1:] - teacher_margin.reshape(q.shape[0], -1)) ** 2).mean()


def kl_formula(q, pos, negs, teacher, temperature):
    s = student(q, pos, negs) / temperature
    p_t = torch.softmax(teacher / temperature, 1)
    p_s = torch.softmax(s, 1)
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean() * temperature ** 2


CASES = [  # (loss, formula, n_negatives, extra kwargs builder)
    ("info_nce_no_negatives", losses.info_nce, info_nce_formula, 0, lambda b, m, g: {"temperature": 0.3}),
    ("info_nce_one_negative", losses.info_nce, info_nce_formula, 1, lambda b, m, g: {"temperature": 1.0}),
    ("info_nce_two_negatives", losses.info_nce, info_nce_formula, 2, lambda b, m, g: {"temperature": 2.0}),
    ("margin_mse_one", losses.margin_mse, margin_mse_formula, 1,
     lambda b, m, g: {"teacher_margin": torch.randn(b, generator=g)}),
    ("margin_mse_three", losses.margin_mse, margin_mse_formula, 3,
     lambda b, m, g: {"teacher_margin": torch.randn(b, m, generator=g)}),
    ("kl_t1", losses.kl_distill, kl_formula, 2,
     lambda b, m, g: {"teacher_scores": torch.randn(b, m + 1, generator=g), "temperature": 1.0}),
    ("kl_t2", losses.kl_distill, kl_formula, 1,
     lambda b, m, g: {"teacher_scores": 3 * torch.randn(b, m + 1, generator=g), "temperature": 2.0}),
]


def call_formula(formula, q, pos, negs, kwargs):
    if formula is info_nce_formula:
        return formula(q, pos, negs, kwargs["temperature"])
    if formula is margin_mse_formula:
        return formula(q, pos, negs, kwargs["teacher_margin"].to(q))
    return formula(q, pos, negs, kwargs["teacher_scores"].to(q), kwargs["temperature"])


@pytest.mark.parametrize("name,fn,formula,m,make_kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("b,dim", [(1, 5), (6, 37)])
def test_ranking_losses_match_formula_dense_and_sparse(device, name, fn, formula, m, make_kwargs, b, dim):
    g = torch.Generator().manual_seed(b * 100 + m)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make_kwargs(b, m, g).items()}
    parts = [rand_sparse_dense(b, dim, device, seed=10 * i + b, density=0.5) for i in range(2 + m)]
    dense = [leaf(x) for x, _ in parts]
    sparse = [sparse_leaf(s) for _, s in parts]
    formula_in = [leaf(x.double()) for x, _ in parts]
    negs = lambda xs: (xs[2] if m == 1 else xs[2:]) if m else None  # noqa: E731 - one batch or a list
    want = call_formula(formula, formula_in[0], formula_in[1], formula_in[2:],
                        {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    got_dense = fn(dense[0], dense[1], negs(dense), **kwargs)
    got_sparse = fn(sparse[0], sparse[1], negs(sparse), **kwargs)
    assert got_dense.dtype == torch.float32 and got_dense.dim() == 0
    torch.testing.assert_close(got_dense.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sparse, got_dense, rtol=1e-5, atol=1e-5)
    want.backward()
    got_dense.backward()
    got_sparse.backward()
    for fd, d, s, (_, sb) in zip(formula_in, dense, sparse, parts):
        torch.testing.assert_close(d.grad, fd.grad.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.values.grad, grad_at_nonzeros(d.grad, sb), rtol=1e-4, atol=1e-5)


def test_info_nce_known_value():
    # Orthogonal unit vectors: query i scores 1 with pos i and 0 with the other two documents.
    eye = torch.eye(3)
    assert losses.info_nce(eye, eye).item() == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-6)


def test_ranking_losses_reject_bad_input():
    q, d = torch.randn(4, 8), torch.randn(4, 8)
    s = sr.SparseBatch.from_dense(d)
    with pytest.raises(TypeError, match="pos: mixes SparseBatch"):
        losses.info_nce(q, s)
    with pytest.raises(ValueError, match=r"negatives\[0\]: has 3 rows, expected 4"):
        losses.info_nce(q, d, d[:3])
    with pytest.raises(ValueError, match="pos: dim 7 differs"):
        losses.info_nce(q, d[:, :7])
    with pytest.raises(ValueError, match="temperature"):
        losses.info_nce(q, d, temperature=0.0)
    with pytest.raises(ValueError, match="negatives: need at least one"):
        losses.margin_mse(q, d, None, torch.zeros(4))
    with pytest.raises(ValueError, match=r"teacher_margin: expected shape \(4, 2\)"):
        losses.margin_mse(q, d, [d, d], torch.zeros(4))
    with pytest.raises(ValueError, match=r"teacher_scores: expected shape \(4, 2\)"):
        losses.kl_distill(q, d, d, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="negatives: expected"):
        losses.info_nce(q, d, "nope")
    with pytest.raises(TypeError, match="teacher_margin: expected a tensor"):
        losses.margin_mse(q, d, d, [0.0] * 4)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="pos: on cuda"):
            losses.info_nce(q, d.cuda())


# ---- SPLADE combination ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("q_reg", ["flops", "l1", None])
def test_sparse_retrieval_loss_combination_and_warmup(device, sparse, q_reg):
    parts = [rand_sparse_dense(6, 21, device, seed=i) for i in range(3)]
    q, pos, neg = [s if sparse else x for x, s in parts]
    loss = losses.SparseRetrievalLoss(losses.info_nce, lambda_q=0.5, lambda_d=0.2, query_regularizer=q_reg,
                                      document_regularizer="flops", warmup_steps=4)
    reg_q = {"flops": losses.flops, "l1": losses.l1, None: lambda x: torch.zeros(())}[q_reg](q).item()
    reg_d = (losses.flops(pos).item() + losses.flops(neg).item()) / 2
    rank = losses.info_nce(q, pos, neg).item()
    for t in range(6):
        w = min(1.0, (t / 4) ** 2)
        got = loss(q, pos, neg).item()
        assert got == pytest.approx(rank + 0.5 * w * reg_q + 0.2 * w * reg_d, rel=1e-5)
        assert loss.last["lambda_d"] == pytest.approx(0.2 * w)
    loss.eval()
    assert loss(q, pos, neg).item() == pytest.approx(rank + 0.5 * reg_q + 0.2 * reg_d, rel=1e-5)
    assert loss.lambda_q.t == 6  # eval mode does not advance the schedule


def test_sparse_retrieval_loss_passes_kwargs_and_gradients():
    q, pos, neg = (leaf(torch.randn(5, 11)) for _ in range(3))
    teacher = torch.randn(5)
    loss = losses.SparseRetrievalLoss(losses.margin_mse, 0.1, 0.3, query_regularizer="l1")
    total = loss(q, pos, neg, teacher_margin=teacher)
    a, b, c = leaf(q), leaf(pos), leaf(neg)
    want = losses.margin_mse(a, b, c, teacher) + 0.1 * losses.l1(a) + 0.3 * (losses.flops(b) + losses.flops(c)) / 2
    torch.testing.assert_close(total, want)
    total.backward()
    want.backward()
    for x, y in ((q, a), (pos, b), (neg, c)):
        torch.testing.assert_close(x.grad, y.grad)


def test_sparse_retrieval_loss_rejects_bad_config():
    with pytest.raises(ValueError, match="query_regularizer"):
        losses.SparseRetrievalLoss(losses.info_nce, 1, 1, query_regularizer="l2")
    with pytest.raises(ValueError, match="document_regularizer"):
        losses.SparseRetrievalLoss(losses.info_nce, 1, 1, document_regularizer=None)
    with pytest.raises(TypeError, match="ranking_loss"):
        losses.SparseRetrievalLoss("info_nce", 1, 1)
    with pytest.raises(ValueError, match="lam"):
        losses.SparseRetrievalLoss(losses.info_nce, -1, 1)


def test_warmup_counts_optimizer_steps_and_resumes():
    """Gradient accumulation (4 forwards per optimizer step) warms up at the optimizer's pace once
    count_optimizer_steps() is called; the step count travels in state_dict."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(6, 10)
    loss_fn = losses.SparseRetrievalLoss(losses.info_nce, lambda_q=1.0, lambda_d=2.0, warmup_steps=10)
    opt = torch.optim.SGD(enc.parameters(), lr=0.01)
    handle = loss_fn.count_optimizer_steps(opt)
    for _ in range(3):
        for _ in range(4):
            x = torch.randn(5, 6)
            loss_fn(torch.relu(enc(x)), torch.relu(enc(x + 0.1))).backward()
        opt.step()
        opt.zero_grad()
    assert loss_fn.lambda_q.t == 3 and loss_fn.lambda_d.value == 2.0 * (3 / 10) ** 2
    state = {"loss": loss_fn.state_dict(), "opt": opt.state_dict()}
    resumed = losses.SparseRetrievalLoss(losses.info_nce, lambda_q=1.0, lambda_d=2.0, warmup_steps=10)
    resumed.load_state_dict(state["loss"])
    assert resumed.lambda_q.t == 3 and resumed.lambda_d.value == loss_fn.lambda_d.value
    handle.remove()  # back to counting training forwards
    x = torch.randn(5, 6)
    loss_fn(torch.relu(enc(x)), torch.relu(enc(x)))
    assert loss_fn.lambda_q.t == 4
    with pytest.raises(TypeError, match="optimizer"):
        loss_fn.count_optimizer_steps("sgd")
    sae = sr.SparseAutoEncoder(6, 16, k=2)
    csr = sr.CSRLoss(flops_weight=losses.RegularizerScheduler(1.0, 5))
    opt = torch.optim.SGD(sae.parameters(), lr=0.01)
    csr.count_optimizer_steps(opt)
    for _ in range(2):
        csr(sae, torch.randn(8, 6)).backward()
    opt.step()
    assert csr.flops_weight.t == 1
    again = sr.CSRLoss(flops_weight=losses.RegularizerScheduler(1.0, 5))
    again.load_state_dict(csr.state_dict())
    assert again.flops_weight.t == 1
