"""The personal document index: loaders → chunker → embedder → sqlite + FTS5 + compact vectors.

The public interface is `localai.index.search.Index` (see that module). This package module stays
import-light (no numpy, no sqlite) so the CLI can declare its options without loading the index.
"""

UNITS = ("chunk", "file")  # what `Index.search` ranks
MODES = ("hybrid", "bm25", "vector")  # which lists it ranks with
