"""Data: sources (plugins) give pixels; the core resizes, caches and batches them."""
