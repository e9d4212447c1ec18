"""Run with the code of 3085ac9 (before the variants moved out of model.py): two tiny checkpoints and
their scores on fixed inputs, for tests/test_variants.py."""
import dataclasses, sys
from pathlib import Path
import numpy as np, torch
from tvrerank.rerank.model import Reranker, RerankerConfig
from tvrerank.rerank.checkpoint import save_reranker, LEGACY_MODEL
out = Path(sys.argv[1])
torch.manual_seed(0)
base = RerankerConfig(frames=3, tokens_per_frame=5, token_dim=8, embed_dim=6, text_token_dim=8, text_tokens=5,
                      width=16, heads=2, layers=2, queries=2, frame_keep=2, video_keep=4, perturb_samples=4)
g = torch.Generator().manual_seed(1)
inputs = {"text_tokens": torch.randn(3, 5, 8, generator=g), "text_length": torch.tensor([5, 3, 1]),
          "tokens": torch.randn(2, 3, 5, 8, generator=g), "frame_emb": torch.randn(2, 3, 6, generator=g),
          "frame_mask": torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool),
          "pair_video": torch.tensor([0, 1, 0, 1, 1, 0]), "pair_text": torch.tensor([0, 0, 1, 1, 2, 2])}
arrays = {k: v.numpy() for k, v in inputs.items()}
for name, config in (("method", base), ("legacy", dataclasses.replace(base, **LEGACY_MODEL))):
    model = Reranker(config=config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # away from the zero inits
    model.eval()
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    save_reranker(run, model, fusion_alpha=0.5, fingerprint={}, step=1, train_config={})
    if name == "legacy":  # as written before the switches existed: the model config without them
        saved = torch.load(run / "reranker.pt", weights_only=False)
        for key in LEGACY_MODEL:
            saved["model_config"].pop(key)
        torch.save(saved, run / "reranker.pt")
    with torch.no_grad():
        arrays[f"scores_{name}"] = model(**inputs).numpy()
np.savez(out / "inputs_and_scores.npz", **arrays)
print({k: v.shape for k, v in arrays.items()})
