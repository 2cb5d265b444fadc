"""Sparsity statistics and ranking metrics on hand-made inputs; ranking metrics cross-checked with trec_eval
(pytrec-eval-terrier) on random runs with ties and graded relevance."""
import math
import random

import pytest
import torch

import sparse_retrieval as sr
from sparse_retrieval import metrics

Q = torch.tensor([[1.0, 0.0, 2.0, 0.0],
                  [0.0, 0.0, 3.0, 0.0]])
D = torch.tensor([[0.0, 1.0, 1.0, 0.0],
                  [5.0, 0.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 0.0],
                  [1.0, 1.0, 1.0, 1.0]])


@pytest.mark.parametrize("sparse", [False, True])
def test_sparsity_statistics_by_hand(sparse):
    q, d = (sr.SparseBatch.from_dense(t) for t in (Q, D)) if sparse else (Q, D)
    torch.testing.assert_close(metrics.active_share(q), torch.tensor([0.5, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(metrics.active_share(d), torch.tensor([0.5, 0.5, 0.5, 0.25], dtype=torch.float64))
    assert metrics.expected_flops(q, d) == pytest.approx(0.5 * 0.5 + 1.0 * 0.5)
    # d: mean nnz 7/4, sum p^2 = 3 * 0.25 + 0.0625
    assert metrics.flops_suboptimality(d) == pytest.approx(4 * 0.8125 / (7 / 4) ** 2)
    stats = metrics.nnz_stats(d)  # d has 2, 1, 0 and 4 non-zeros: median 1.5
    assert stats == {"rows": 4, "dim": 4, "mean": 1.75, "std": pytest.approx(math.sqrt(2.1875)), "min": 0,
                     "median": 1.5, "max": 4, "dims_used": 4, "density": 7 / 16}


def test_suboptimality_is_one_when_spread_evenly_and_stored_zeros_do_not_count():
    x = torch.eye(6).repeat(3, 1)  # every dimension used by the same number of rows
    assert metrics.flops_suboptimality(x) == pytest.approx(1.0)
    crowded = torch.zeros(6, 6)
    crowded[:, 0] = 1.0
    assert metrics.flops_suboptimality(crowded) == pytest.approx(6.0)
    # Row 0 stores an explicit zero at column 3: it costs no multiply-add, so it does not count.
    s = sr.SparseBatch(torch.tensor([0, 2, 3]), torch.tensor([0, 3, 1], dtype=torch.int32),
                       torch.tensor([1.0, 0.0, 2.0]), 4)
    torch.testing.assert_close(metrics.active_share(s), torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))


def test_sparsity_rejects_bad_input():
    with pytest.raises(ValueError, match="x: needs at least one row"):
        metrics.active_share(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="x: expected"):
        metrics.nnz_stats(torch.zeros(3))
    with pytest.raises(ValueError, match="different dims"):
        metrics.expected_flops(Q, D[:, :3])


# ---- ranking metrics ---------------------------------------------------------------------------------------
RUN = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5},   # relevant c (rank 3) and e (not retrieved)
       "q2": {"x": 1.0, "y": 1.0, "z": 0.2},              # tie: trec_eval ranks y before x
       "q3": {"m": 0.1}}                                  # nothing relevant retrieved
QRELS = {"q1": {"c": 1, "e": 2, "a": 0}, "q2": {"x": 1}, "q3": {"n": 1}, "q4": {"p": 0}}  # q4: no relevant doc


def test_ranking_metrics_by_hand():
    assert metrics.recall_at_k(RUN, QRELS, 2) == pytest.approx((0 + 1 + 0) / 3)
    assert metrics.recall_at_k(RUN, QRELS, 3) == pytest.approx((0.5 + 1 + 0) / 3)
    assert metrics.mrr_at_k(RUN, QRELS, 2) == pytest.approx((0 + 0.5 + 0) / 3)
    assert metrics.mrr_at_k(RUN, QRELS, 10) == pytest.approx((1 / 3 + 0.5 + 0) / 3)
    assert metrics.mrr_at_k(RUN, QRELS, 1) == 0.0
    ndcg_q1 = (1 / math.log2(4)) / (2 + 1 / math.log2(3))  # ideal order: e (2), c (1)
    ndcg_q2 = (1 / math.log2(3)) / 1
    assert metrics.ndcg_at_k(RUN, QRELS, 10) == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3)
    per_query = metrics.mrr_at_k(RUN, QRELS, 10, per_query=True)
    assert per_query == {"q1": pytest.approx(1 / 3), "q2": 0.5, "q3": 0.0}


def test_tensor_form_matches_dict_form():
    ids = torch.tensor([[4, 0, 2, -1], [1, 3, -1, -1], [2, 0, 1, 3]])
    relevant = torch.tensor([2, 5, 1])
    assert metrics.mrr_at_k(ids, relevant, 10) == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert metrics.recall_at_k(ids, relevant, 2) == 0.0
    assert metrics.recall_at_k(ids, relevant, 3) == pytest.approx(2 / 3)
    as_dicts = [{2: 1}, {5: 1}, {1: 1}]
    for fn in (metrics.recall_at_k, metrics.mrr_at_k, metrics.ndcg_at_k):
        assert fn(ids, relevant, 3) == pytest.approx(fn(ids, as_dicts, 3))
        run = {i: {d: float(-r) for r, d in enumerate(row) if d >= 0} for i, row in enumerate(ids.tolist())}
        assert fn(ids, relevant, 3) == pytest.approx(fn(run, {i: r for i, r in enumerate(as_dicts)}, 3))


def test_ranking_metrics_reject_bad_input():
    ids = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        metrics.mrr_at_k(ids, torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match=r"qrels: expected an int tensor of shape \(2,\)"):
        metrics.recall_at_k(ids, torch.tensor([0, 1, 2]), 1)
    with pytest.raises(ValueError, match="qrels: has 1 entries"):
        metrics.recall_at_k(ids, [{0: 1}], 1)
    with pytest.raises(ValueError, match="run: expected an int tensor"):
        metrics.ndcg_at_k(ids.float(), torch.tensor([0, 1]), 1)
    with pytest.raises(TypeError, match="run and qrels"):
        metrics.ndcg_at_k({"q": {}}, [1], 1)


def random_trec(seed, n_queries=25, n_docs=40):
    rng = random.Random(seed)
    run, qrels = {}, {}
    for q in range(n_queries):
        docs = rng.sample(range(n_docs), rng.randint(0, 30))
        # Scores from a small set so that ties are frequent.
        run[f"q{q}"] = {f"d{d}": float(rng.randint(0, 6)) for d in docs}
        judged = rng.sample(range(n_docs), rng.randint(1, 8))
        qrels[f"q{q}"] = {f"d{d}": rng.choice([0, 1, 1, 2, 3]) for d in judged}
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 10, 20])
def test_ranking_metrics_match_trec_eval(seed, k):
    pytrec_eval = pytest.importorskip("pytrec_eval", reason="cross-check needs pytrec-eval-terrier")
    run, qrels = random_trec(seed)
    judged = {q for q, r in qrels.items() if any(v >= 1 for v in r.values())}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {f"recall.{k}", f"ndcg_cut.{k}"})
    res = ev.evaluate(run)
    # trec_eval's recip_rank has no cut-off: evaluate it on the run cut to its top k (in trec_eval's order).
    cut = {q: dict(sorted(d.items(), key=lambda it: (it[1], it[0]), reverse=True)[:k]) for q, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    ours = {"recall": metrics.recall_at_k(run, qrels, k, per_query=True),
            "ndcg": metrics.ndcg_at_k(run, qrels, k, per_query=True),
            "rr": metrics.mrr_at_k(run, qrels, k, per_query=True)}
    assert set(ours["rr"]) == judged
    checked = 0
    for q in judged:
        if q not in res:  # trec_eval leaves out queries with an empty run; ours count them as 0
            assert ours["recall"][q] == ours["ndcg"][q] == ours["rr"][q] == 0.0
            continue
        assert ours["recall"][q] == pytest.approx(res[q][f"recall_{k}"], abs=1e-9)
        assert ours["ndcg"][q] == pytest.approx(res[q][f"ndcg_cut_{k}"], abs=1e-9)
        assert ours["rr"][q] == pytest.approx(rr[q]["recip_rank"], abs=1e-9)
        checked += 1
    assert checked >= 15
