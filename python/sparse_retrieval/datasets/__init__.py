"""Data for tests and benchmarks: synthetic SPLADE-shaped vectors (``synthetic_splade``), a real learned-sparse
collection encoded with splade-tiny from text installed on the machine (``splade_collection``), and a way to grow a
real collection to MS MARCO size while keeping its structure (``derive_documents``)."""
from .derive import derive_documents
from .splade import SpladeCollection, splade_collection
from .synthetic import synthetic_splade
from .text import man_page_passages, wordnet_passages

__all__ = ["SpladeCollection", "derive_documents", "man_page_passages", "splade_collection", "synthetic_splade",
           "wordnet_passages"]
