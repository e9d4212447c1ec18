"""tvrerank: text-to-video retrieval with a learned re-ranking stage over cached frozen-CLIP tokens."""

__version__ = "0.1.0"
