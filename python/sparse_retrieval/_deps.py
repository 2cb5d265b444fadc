"""TEMPORARY shim (branch `losses`): the real topk/sparse_dot/index modules land on main in parallel.
Deleted before the final commit."""
try:
    from .sparse_dot import pairwise_sparse_dot, sparse_dot
except ImportError:
    from .reference import pairwise_sparse_dot, sparse_dot


class SparseIndex:
    """Stand-in for index.SparseIndex (same API) over reference.sparse_search."""

    def __init__(self, docs):
        self.docs = docs

    @classmethod
    def from_documents(cls, docs):
        return cls(docs)

    def search(self, queries, k):
        from .reference import sparse_search
        return sparse_search(queries, self.docs, k)
