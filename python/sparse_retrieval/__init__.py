"""sparse_retrieval: CPU SIMD and CUDA kernels for learned sparse retrieval, top-k and KV-cache quantization."""
import torch  # loads libtorch before our extension

from . import _C  # registers torch.ops.sparse_retrieval.*
from . import cq, datasets, losses, metrics, reference
from ._build import build_info, get_simd_level, set_simd_level, simd_level, supported_simd_levels
from .sae import CSRLoss, SparseAutoEncoder
from .sparse import SparseBatch
from .sparse_dot import pairwise_sparse_dot, sparse_dot
from .index import SparseIndex
from .sharded import ShardedIndex
from .topk import topk, topk_sparsify

__version__ = _C.__version__

__all__ = [
    "CSRLoss", "ShardedIndex", "SparseAutoEncoder", "SparseBatch", "SparseIndex", "build_info", "cq", "datasets", "get_simd_level",
    "losses", "metrics", "pairwise_sparse_dot", "reference", "set_simd_level", "simd_level", "sparse_dot",
    "supported_simd_levels", "topk", "topk_sparsify",
]
