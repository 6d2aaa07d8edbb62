"""The personal document index: loaders → chunker → embedder → sqlite + FTS5 + compact vectors."""
