"""One query's re-rank with fixed shapes, replayed as one CUDA graph on a GPU.

A query's re-rank is small: K = 15 (caption, video) pairs through a few attention blocks, about a
hundred kernels of microseconds each. Launched one by one from Python it costs milliseconds of
host time on a GPU, more than the kernels themselves. ``QueryScorer`` fixes every shape (the
caption padded to the cache's ``text_tokens`` columns, the candidate list padded to K) and reads the
candidates' tokens from a ``DeviceStore`` by position, so the whole step (gather, selected tokens
to float32, scoring) has static inputs and no host synchronisation: on CUDA it is captured once as
a CUDA graph and each query copies its inputs in and replays it. Elsewhere (and whenever capture
fails) the same step runs eagerly, which is what the CPU tests check against ``Retriever``'s own
batched path.

Padding changes nothing: padded caption columns are masked out of every attention (any
``columns`` at least the caption's length gives the same scores, ``Reranker.score``), and padded
pairs repeat the first candidate and are dropped from the output.

After a capture, the graph is replayed on other example inputs than those it was captured with
and compared with the eager step's scores; a capture that fails or disagrees is logged and the
scorer stays eager. The capture runs on the scorer's own GPU and a side stream, in the
thread-local capture mode; ``Retriever`` makes scorers one at a time.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from tvrerank.rerank.model import Reranker
from tvrerank.retrieve.gallery_store import DeviceStore

log = logging.getLogger(__name__)

WARMUP_RUNS = 3  # eager runs on a side stream before capture (lazy inits, kernel choices)


class QueryScorer:
    """Scores one query against up to ``pairs`` candidates of a ``DeviceStore``; a CUDA graph on CUDA."""

    def __init__(self, model: Reranker, store: DeviceStore, *, pairs: int, text_tokens: int, text_token_dim: int,
                 device: torch.device):
        self.model, self.store, self.pairs, self.device = model.eval(), store, pairs, device
        self._lock = threading.Lock()  # the inputs are shared buffers: one query at a time
        with torch.inference_mode():
            self.text = torch.zeros(1, text_tokens, text_token_dim, device=device)  # (1, L, Dt)
            self.length = torch.ones(1, dtype=torch.long, device=device)  # (1,)
            self.positions = torch.zeros(pairs, dtype=torch.long, device=device)  # (K,) store positions
            self.pair_text = torch.zeros(pairs, dtype=torch.long, device=device)  # (K,) every pair: the query
        self.graph, self.scores = None, None  # the captured step and the tensor its replay writes
        if device.type == "cuda":
            self.capture(self._record_graph)

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        """The re-rank on the current inputs: (K,) scores; static shapes, no host synchronisation."""
        videos = self.store.gather(self.positions)  # pairs in candidate order: pair_video None
        return self.model.score(self.text, self.length, videos, None, pair_text=self.pair_text,
                                columns=self.text.shape[1])

    @torch.inference_mode()
    def _set_inputs(self, text_tokens: torch.Tensor, length: int, positions: torch.Tensor) -> None:
        """text_tokens (L, Dt), length, positions (K,) → the input buffers (copies, any device)."""
        self.text.copy_(text_tokens[None])
        self.length.fill_(length)
        self.positions.copy_(positions)

    def _example(self, seed: int) -> None:
        """An example query in the inputs: a random caption of random length, K random records."""
        generator = torch.Generator().manual_seed(seed)
        self._set_inputs(torch.randn(self.text.shape[1:], generator=generator),
                         int(torch.randint(1, self.text.shape[1] + 1, (1,), generator=generator)),
                         torch.randint(0, self.store.records, (self.pairs,), generator=generator))

    def _record_graph(self):
        """Capture ``_step`` on the scorer's GPU → (the CUDA graph, the scores tensor its replay writes)."""
        with torch.cuda.device(self.device):  # the scorer's GPU, whichever is current
            self._example(seed=0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # our own stream context: the thread's stream is restored even if the capture fails
            with torch.cuda.stream(side):
                previous_mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")  # a synchronising operator would break the capture
                try:
                    for _ in range(WARMUP_RUNS):
                        self._step()
                finally:
                    torch.cuda.set_sync_debug_mode(previous_mode)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    scores = self._step()
            torch.cuda.current_stream().wait_stream(side)
        return graph, scores

    def capture(self, record) -> bool:
        """Use the graph ``record()`` gives, (graph, scores), once a replay on other inputs than those it
        was recorded with matches the eager step; on any failure log it and stay eager. Returns whether
        the graph is used."""
        try:
            graph, scores = record()
            self._example(seed=1)  # the graph must read its inputs, not replay what it saw
            graph.replay()
            expected = self._step()
            if not torch.allclose(scores, expected, rtol=1e-3, atol=1e-4):
                raise RuntimeError(f"the graph's scores differ from the eager ones by up to "
                                   f"{(scores - expected).abs().max().item():.2e}")
        except Exception as exc:  # noqa: BLE001 - any failure: keep the eager step, which gives the same scores
            log.warning("re-ranking without a CUDA graph (%s: %s); scores are the same, a query takes longer",
                        type(exc).__name__, exc)
            return False
        self.graph, self.scores = graph, scores
        log.info("re-ranking %d candidates per query with a CUDA graph", self.pairs)
        return True

    def __call__(self, text_tokens: np.ndarray, length: int, positions: np.ndarray) -> np.ndarray:
        """text_tokens (L, Dt) one query's caption tokens, length its real ones, positions (k,) store
        positions of its k <= K candidates → their scores (k,) float32."""
        k = len(positions)
        if not 1 <= k <= self.pairs:
            raise ValueError(f"{k} candidates for a scorer of {self.pairs}")
        padded = np.concatenate([positions, np.full(self.pairs - k, positions[0])]).astype(np.int64)
        with self._lock, torch.inference_mode():
            self._set_inputs(torch.from_numpy(np.ascontiguousarray(text_tokens)), int(length),
                             torch.from_numpy(padded))
            if self.graph is not None:
                self.graph.replay()
                scores = self.scores
            else:
                scores = self._step()
            return scores[:k].float().cpu().numpy()
