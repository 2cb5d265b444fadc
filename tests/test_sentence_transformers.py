"""sentence-transformers interoperation on a tiny randomly initialised SPLADE-style SparseEncoder (no downloads):
its output goes into SparseBatch/SparseIndex, the library's losses equal its equivalents on the same batch and
train it in its own loss convention, and the evaluator searches a SparseIndex."""
import pytest
import torch

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sparse_encoder import SparseEncoder  # noqa: E402
from sentence_transformers.sparse_encoder.losses import (  # noqa: E402
    FlopsLoss, SparseMultipleNegativesRankingLoss, SpladeLoss)
from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling  # noqa: E402

import sparse_retrieval as sr  # noqa: E402
from sparse_retrieval import losses  # noqa: E402
from sparse_retrieval.sentence_transformers import SentenceTransformersLoss, SparseIndexEvaluator  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega red green blue black white cat dog fish bird tree rock river hill").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A folder holding a tiny randomly initialised BERT with a masked-LM head and its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(tiny_bert):
    mlm = MLMTransformer(str(tiny_bert))
    return SparseEncoder(modules=[mlm, SpladePooling("max", word_embedding_dimension=len(VOCAB))], device="cpu")


def texts(n, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=gen).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (m,), generator=gen).tolist()) for m in lengths]


def test_encode_output_goes_into_an_index_in_one_call(model):
    corpus, queries = texts(40, 1), texts(6, 2)
    docs = model.encode_document(corpus, convert_to_sparse_tensor=True)
    q = model.encode_query(queries, convert_to_sparse_tensor=True)
    index = sr.SparseIndex.from_documents(docs)
    scores, ids = index.search(q, k=5)
    dense = q.to_dense() @ docs.to_dense().T
    want = dense.topk(5, dim=1).values
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert sr.SparseBatch.from_torch(docs).nnz == int((docs.to_dense() != 0).sum())


def embed(model, batch):
    return [model(model.preprocess(col))["sentence_embedding"] for col in batch]


def test_losses_equal_sentence_transformers_equivalents(model):
    model.eval()  # no dropout: both sides embed the same batch to the same vectors
    q, pos, neg = embed(model, [texts(8, 3), texts(8, 4), texts(8, 5)])
    with torch.no_grad():
        # FLOPs regularizer
        torch.testing.assert_close(losses.flops(pos), FlopsLoss(model).compute_loss_from_embeddings(pos))
        # in-batch InfoNCE with hard negatives = SparseMultipleNegativesRankingLoss (dot product, scale 1/T)
        for temperature in (1.0, 0.05):
            theirs = SparseMultipleNegativesRankingLoss(model, scale=1 / temperature)
            torch.testing.assert_close(losses.info_nce(q, pos, neg, temperature=temperature),
                                       theirs.compute_loss_from_embeddings([q, pos, neg], None))
        # SpladeLoss regularizes the concatenation of all document columns; SparseRetrievalLoss averages the
        # regularizer of each column (SPLADE's (Reg(d+) + Reg(d-)) / 2). Equal with one document column.
        ours = losses.SparseRetrievalLoss(losses.info_nce, lambda_q=0.3, lambda_d=0.1).eval()
        splade = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=0.1,
                            query_regularizer_weight=0.3)
        theirs = sum(splade.forward([model.preprocess(t) for t in (texts(8, 3), texts(8, 4))]).values())
        torch.testing.assert_close(ours(q, pos), theirs)
        two_columns = sum(splade.forward([model.preprocess(t) for t in (texts(8, 3), texts(8, 4), texts(8, 5))])
                          .values())
        documented = (losses.info_nce(q, pos, neg) + 0.3 * losses.flops(q)
                      + 0.1 * losses.flops(torch.cat([pos, neg])))
        torch.testing.assert_close(two_columns, documented)
        assert not torch.allclose(ours(q, pos, neg), two_columns)


def test_library_loss_trains_in_the_sentence_transformers_convention(model):
    """The trainer's call: loss(tokenized columns, labels). A few optimizer steps lower the loss, and the
    regularizer warm-up counts optimizer steps."""
    model.train()
    inner = losses.SparseRetrievalLoss(losses.info_nce, lambda_q=1e-3, lambda_d=1e-3, warmup_steps=4)
    loss = SentenceTransformersLoss(model, inner)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inner.count_optimizer_steps(opt)
    batch = [model.preprocess(texts(8, 10)), model.preprocess(texts(8, 10)), model.preprocess(texts(8, 11))]
    before = float(loss(batch, None))
    for _ in range(6):
        opt.zero_grad()
        loss(batch, None).backward()
        opt.step()
    assert float(loss(batch, None)) < before
    assert inner.lambda_d.t == 6
    # as the base loss of sentence-transformers' SpladeLoss, with labels routed to margin_mse
    margin = SentenceTransformersLoss(model, losses.margin_mse, labels_as="teacher_margin")
    splade = SpladeLoss(model, margin, document_regularizer_weight=0.01, query_regularizer_weight=0.01)
    out = splade.forward(batch, torch.rand(8))
    assert set(out) == {"base_loss", "document_regularizer_loss", "query_regularizer_loss"}
    with pytest.raises(ValueError, match="teacher_margin"):
        margin(batch, None)


def test_evaluator_searches_a_sparse_index(model):
    corpus = {f"d{i}": t for i, t in enumerate(texts(30, 20))}
    queries = {f"q{i}": corpus[f"d{3 * i}"] for i in range(8)}  # each query is a document's own text
    relevant = {f"q{i}": {f"d{3 * i}"} for i in range(8)}
    ev = SparseIndexEvaluator(queries, corpus, relevant, k=5, name="tiny")
    out = ev(model)
    assert set(out) == {"tiny_mrr@5", "tiny_recall@5", "tiny_ndcg@5", "tiny_flops", "tiny_query_nnz", "tiny_doc_nnz"}
    # reference: the same metrics from a dense brute-force search of the same embeddings
    q = model.encode_query(list(queries.values()), convert_to_sparse_tensor=True).to_dense()
    d = model.encode_document(list(corpus.values()), convert_to_sparse_tensor=True).to_dense()
    top = (q @ d.T).topk(5, dim=1)
    ids = list(corpus)
    run = {qid: {ids[j]: s for j, s in zip(row.tolist(), srow.tolist())}
           for qid, row, srow in zip(queries, top.indices, top.values)}
    graded = {qid: {d: 1 for d in docs} for qid, docs in relevant.items()}
    assert out["tiny_mrr@5"] == pytest.approx(sr.metrics.mrr_at_k(run, graded, 5))
    assert out["tiny_recall@5"] == pytest.approx(sr.metrics.recall_at_k(run, graded, 5))
    assert out["tiny_ndcg@5"] == pytest.approx(sr.metrics.ndcg_at_k(run, graded, 5))
    assert out["tiny_flops"] == pytest.approx(sr.metrics.expected_flops(q, d), rel=1e-6)
    assert ev.primary_metric == "tiny_mrr@5"
    with pytest.raises(ValueError, match="not in queries"):
        SparseIndexEvaluator(queries, corpus, {"nope": {"d0"}})


def test_evaluator_is_a_trainer_evaluator_and_takes_dense_models(tiny_bert):
    """The trainer takes the evaluator as ``evaluator=`` only if it is one of its own (otherwise it wraps it in a
    SequentialEvaluator, which expects a list); a dense SentenceTransformer refuses ``convert_to_sparse_tensor``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    corpus = {f"d{i}": t for i, t in enumerate(texts(30, 21))}
    queries = {f"q{i}": corpus[f"d{2 * i}"] for i in range(6)}
    relevant = {f"q{i}": {f"d{2 * i}"} for i in range(6)}
    ev = SparseIndexEvaluator(queries, corpus, relevant, k=4)
    assert isinstance(ev, BaseEvaluator) and ev.primary_metric == "mrr@4" and ev.greater_is_better
    bert = Transformer(str(tiny_bert))
    dense = SentenceTransformer(modules=[bert, Pooling(bert.get_embedding_dimension())], device="cpu")
    out = ev(dense)
    q = dense.encode(list(queries.values()), convert_to_tensor=True)
    d = dense.encode(list(corpus.values()), convert_to_tensor=True)
    ids = list(corpus)
    top = (q @ d.T).topk(4, dim=1)
    run = {qid: {ids[j]: s for j, s in zip(row.tolist(), srow.tolist())}
           for qid, row, srow in zip(queries, top.indices, top.values)}
    graded = {qid: {d: 1 for d in docs} for qid, docs in relevant.items()}
    assert out["mrr@4"] == pytest.approx(sr.metrics.mrr_at_k(run, graded, 4))
    assert out["doc_nnz"] == d.shape[1]


def test_csr_loss_names_the_autoencoder_it_expects():
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder as TheirSAE

    theirs = TheirSAE(input_dim=8, hidden_dim=16, k=2)
    with pytest.raises(TypeError, match="sparse_retrieval.SparseAutoEncoder, got sentence_transformers.*its CSRLoss"):
        sr.CSRLoss()(theirs, torch.randn(4, 8))
