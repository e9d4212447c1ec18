"""`tvrerank serve`: a local search page over one gallery (FastAPI; the [serve] extra)."""
