"""Batches from dataset items: images and fixed-size vectors stacked, variable-length sequences zero-padded
with masks. The DataLoader's ``collate_fn`` (``moas.data.loader``)."""

from __future__ import annotations

import torch


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(s.shape[0] for s in seqs))
    out = seqs[0].new_zeros((len(seqs), n, *seqs[0].shape[1:]))
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask  # (B, N, ...), (B, N)


def smart_collate_fn(items: list[dict]) -> dict:
    """Batch dataset items: stack images and fixed-size vectors, zero-pad variable-length embeddings.

    ``pixels`` must share one size (the bucket sampler guarantees it). ``panels`` (previous panels of
    sequences) are padded to [B,K,3,H,W] with ``panel_mask`` [B,K] only when some item has one. ``text_embed`` may be pooled
    [768] or per-token [L, 768]; per-token sequences are padded to the batch maximum with a
    ``text_embed_mask`` (True = real). Style fingerprints are stacked separately with ``has_style``.
    """
    shapes = {tuple(it["pixels"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes image sizes {sorted(shapes)}; use the bucket batch sampler")
    batch = {
        "pixels": torch.stack([it["pixels"] for it in items]),  # (B, 3, H, W) uint8
        "captions": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    if all("pixels_hr" in it for it in items):
        batch["pixels_hr"] = torch.stack([it["pixels_hr"] for it in items])  # (B, 3, H', W') uint8
    if all("image_embed" in it for it in items):
        batch["image_embed"] = torch.stack([it["image_embed"] for it in items])  # (B, 768)
    if all("style" in it for it in items):
        batch["style"] = torch.stack([it["style"] for it in items])  # (B, STYLE_DIM)
        batch["has_style"] = torch.tensor([bool(it.get("has_style", True)) for it in items])  # (B,)
    if all("prev_index" in it for it in items):
        batch["prev_index"] = torch.tensor([it["prev_index"] for it in items])  # (B,) -1 = none
    if all("panels" in it for it in items) and any(it["panels"].shape[0] for it in items):
        # Previous panels (nearest first), zero-padded to the batch's longest history; absent otherwise.
        batch["panels"], batch["panel_mask"] = _pad([it["panels"] for it in items])  # (B, K, 3, H, W), (B, K)
    if all("text_embed" in it for it in items):
        seqs = [it["text_embed"] for it in items]
        if seqs[0].ndim == 1:
            batch["text_embed"] = torch.stack(seqs)  # (B, 768)
        else:
            batch["text_embed"], batch["text_embed_mask"] = _pad(seqs)  # (B, L, 768), (B, L)
    return batch


collate = smart_collate_fn
