"""ShardedIndex over torch.distributed (gloo, CPU processes spawned here): exact search equals one big index (scores,
ids and ties), for documents scattered from one rank, added later, saved and loaded; inconsistent shards and dead
ranks raise on the others instead of hanging."""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparse_retrieval as sr
from sparse_retrieval.sharded import ShardedIndex
from sparse_retrieval.sparse import SparseBatch

from test_sparse_dot import random_batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, errors, timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        fn(rank, world, *args)
    except BaseException:
        errors[rank] = traceback.format_exc()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def run(fn, world, *args, timeout=30):
    """Runs fn(rank, world, *args) on `world` gloo ranks; returns {rank: traceback} of the ranks that raised."""
    with mp.Manager() as manager:
        errors = manager.dict()
        mp.start_processes(_worker, args=(world, _free_port(), fn, args, errors, timeout), nprocs=world,
                           start_method="spawn", join=True)
        return dict(errors)


def data(seed=31):
    gen = torch.Generator().manual_seed(seed)
    docs = random_batch(97, 50, 12, gen)
    docs = SparseBatch(docs.indptr, docs.indices, docs.values.abs().round(decimals=1), 50)  # ties across shards
    more = random_batch(23, 50, 12, gen)
    more = SparseBatch(more.indptr, more.indices, more.values.abs().round(decimals=1), 50)
    return docs, more, random_batch(9, 50, 10, gen)


def _search_equals_one_index(rank, world, folder):
    docs, more, queries = data()
    sharded = ShardedIndex.from_documents(docs if rank == 0 else None, block_max=True, block_size=4)
    assert len(sharded) == len(docs)
    one = sr.SparseIndex.from_documents(docs, progress=False)
    for k in (1, 10, 150):
        for mode in ("exact", "safe"):
            got = sharded.search(queries, k, mode=mode)
            want = one.search(queries, k)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (k, mode)
    # filters (global ids or a mask over all documents) and deletes, in every mode
    allowed = list(range(3, 97, 4))
    mask = torch.zeros(len(docs), dtype=torch.bool)
    mask[allowed] = True
    for mode in ("exact", "safe"):
        want = one.search(queries, 7, filter=allowed, mode="exact")
        for f in (allowed, mask, set(allowed)):
            got = sharded.search(queries, 7, filter=f, mode=mode)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), mode
    sharded.delete([5, 50, 96])
    one.delete([5, 50, 96])
    with pytest.raises(ValueError, match="ids: document ids must lie"):
        sharded.delete([len(docs)])
    sharded.add(more if rank == 0 else None)
    one.add(more, progress=False)
    got = sharded.search(queries if rank == 1 else None, 20, src=1)  # queries from one rank
    want = one.search(queries, 20)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    sharded.save(folder)
    loaded = ShardedIndex.load(folder)
    got = loaded.search(queries, 20)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_search_equals_one_index(tmp_path, world):
    errors = run(_search_equals_one_index, world, str(tmp_path / "shards"))
    assert not errors, errors


def _save(rank, world, folder):
    docs, _, _ = data()
    ShardedIndex.from_documents(docs if rank == 0 else None, progress=False).save(folder)  # a keyword it also sets


def _load_expecting(rank, world, folder, match):
    with pytest.raises(ValueError, match=match):
        ShardedIndex.load(folder)


def _mismatched_dims(rank, world):
    gen = torch.Generator().manual_seed(rank)
    local = sr.SparseIndex.from_documents(random_batch(10, 20 + rank, 5, gen), progress=False)
    with pytest.raises(ValueError, match="shards disagree on dim"):
        ShardedIndex.from_local(local)


def _bad_documents(rank, world):
    with pytest.raises(ValueError, match="rank 0: TypeError: docs: expected"):
        ShardedIndex.from_documents([[1.0]] if rank == 0 else None)


def _errors_reach_every_rank(rank, world):
    """A problem on one rank raises on all (none is left waiting in a collective)."""
    docs, _, queries = data()
    sharded = ShardedIndex.from_documents(docs if rank == 0 else None)
    with pytest.raises(ValueError, match="rank 1: ValueError: filter"):
        sharded.search(queries, 3, filter=[10**6] if rank == 1 else None) if rank == 1 else sharded.search(queries, 3)
    with pytest.raises(ValueError, match="rank 0: TypeError: queries"):
        sharded.search("not queries" if rank == 0 else None, 3, src=0)
    negative = SparseBatch(docs.indptr, docs.indices, -docs.values.abs(), docs.dim)  # block maxima refuse w < 0
    mixed = SparseBatch.cat([docs[:60], negative[60:]])
    with pytest.raises(ValueError, match="rank 1: ValueError: docs: block-max search needs"):
        ShardedIndex.from_documents(mixed if rank == 0 else None, block_max=True)
    keyed = sr.SparseIndex.from_documents(docs[:5], ids=[10, 11, 12, 13, 14] if rank == 1 else None, progress=False)
    with pytest.raises(ValueError, match="rank 1: ValueError: local: expected a CPU index with positional ids"):
        ShardedIndex.from_local(keyed)
    assert torch.equal(sharded.search(queries, 3)[1], sr.SparseIndex.from_documents(docs, progress=False)
                       .search(queries, 3)[1])  # still in step


def test_inconsistent_shards_raise_on_every_rank(tmp_path):
    folder = str(tmp_path / "shards")
    assert not run(_save, 2, folder)
    assert not run(_load_expecting, 3, folder, "2 shards saved, 3 ranks loading")
    with open(os.path.join(folder, "shard-1.ids"), "r+b") as f:
        f.write(b"\x01")
    assert not run(_load_expecting, 2, folder, "rank 1: .*do not match the manifest")
    assert not run(_mismatched_dims, 2)
    assert not run(_bad_documents, 2)
    assert not run(_errors_reach_every_rank, 2)


def _more_ranks_than_documents(rank, world):
    docs, _, queries = data()
    sharded = ShardedIndex.from_documents(docs[:2] if rank == 0 else None)
    assert len(sharded.local) == (0, 1, 1)[rank]
    got = sharded.search(queries, 4)
    want = sr.SparseIndex.from_documents(docs[:2], progress=False).search(queries, 4)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_shards_without_documents():
    assert not run(_more_ranks_than_documents, 3)


def _one_rank_dies(rank, world):
    docs, _, queries = data()
    sharded = ShardedIndex.from_documents(docs if rank == 0 else None)
    if rank == 1:
        os._exit(0)  # dies without a word
    with pytest.raises(RuntimeError):
        sharded.search(queries, 5)


def test_a_dead_rank_raises_on_the_others_within_the_timeout():
    errors = run(_one_rank_dies, 2, timeout=10)
    assert not errors, errors
