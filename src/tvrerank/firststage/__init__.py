"""A first stage trained from the cache (CLIP4Clip-style pooling of frozen frame embeddings)."""
