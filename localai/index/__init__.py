"""The personal document index: loaders → chunker → embedder → sqlite + FTS5 + compact vectors.

The public interface is `localai.index.facade.Index` (see that module); each stage has its own
module (loaders, chunker, indexer, search, readback, fts_upgrade, watcher). The index knows
nothing of models or RAG: its caller hands it the settings and an embedder. This package module
stays import-light (no numpy, no sqlite) so the CLI can declare its options without loading the
index.
"""

UNITS = ("chunk", "file")  # what `Index.search` ranks
MODES = ("hybrid", "bm25", "vector")  # which lists it ranks with


class IndexError_(ValueError):
    """A request the index cannot serve (unknown source, bad unit); the message says why."""
