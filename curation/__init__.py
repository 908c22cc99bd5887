"""curation: web image-text pairs in, a balanced, deduplicated, pruned CLIP corpus out.

Importing this package starts nothing (no Spark, no torch)."""

__version__ = "0.1.0"
