"""TextBank: encode every distinct caption once, serve padded text batches for training.

The sentence-transformer runs in the main process only (never in DataLoader workers). Entries are kept
unpadded in float16 — a few KB per caption — and padded per batch.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from moas.text.encoder import TextEncoder


class TextBank:
    def __init__(
        self, encoder: TextEncoder, captions: list[str], chunk: int = 128, progress: bool = True
    ) -> None:
        self.encoder = encoder
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.add(sorted(set(captions) | {""}), chunk, progress)

    def add(self, captions: list[str], chunk: int = 128, progress: bool = False) -> None:
        todo = [c for c in captions if c not in self.entries]
        bar = tqdm(
            total=len(todo), desc="encoding captions", unit="cap", disable=not progress or len(todo) < chunk
        )
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            enc = self.encoder.encode(part)
            for j, c in enumerate(part):
                self.entries[c] = (
                    enc.tokens[j][enc.mask[j]].to(torch.float16),  # (L_j, 768)
                    enc.tags[j][enc.tag_mask[j]].to(torch.float16),  # (G_j, 768)
                )
            bar.update(len(part))
        bar.close()

    def batch(
        self, captions: list[str], device: torch.device | str = "cpu", cache: bool = True
    ) -> dict[str, torch.Tensor]:
        """Padded text tensors; ``cache=False`` encodes unknown captions without keeping them (for
        per-epoch shuffled / dropped-out captions, which would otherwise grow the bank every epoch)."""
        if not cache:
            missing = [c for c in dict.fromkeys(captions) if c not in self.entries]
            if missing:
                enc = self.encoder.encode(missing)
                return _merge(self, captions, missing, enc, device)
        self.add([c for c in captions if c not in self.entries])
        toks = [self.entries[c][0] for c in captions]
        tags = [self.entries[c][1] for c in captions]
        tokens, mask = _pad(toks)
        tag_t, tag_mask = _pad(tags)
        return {
            "tokens": tokens.to(device),
            "mask": mask.to(device),
            "tags": tag_t.to(device),
            "tag_mask": tag_mask.to(device),
        }


def _merge(bank: TextBank, captions: list[str], missing: list[str], enc, device) -> dict[str, torch.Tensor]:
    fresh = {
        c: (enc.tokens[j][enc.mask[j]], enc.tags[j][enc.tag_mask[j]]) for j, c in enumerate(missing)
    }  # (L_j, 768), (G_j, 768)
    pick = [fresh[c] if c in fresh else bank.entries[c] for c in captions]
    tokens, mask = _pad([p[0] for p in pick])
    tags, tag_mask = _pad([p[1] for p in pick])
    return {
        "tokens": tokens.to(device),
        "mask": mask.to(device),
        "tags": tags.to(device),
        "tag_mask": tag_mask.to(device),
    }


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(s.shape[0] for s in seqs))
    out = torch.zeros(len(seqs), n, seqs[0].shape[-1])
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s.float()
        mask[i, : s.shape[0]] = True
    return out, mask  # (B, N, D), (B, N)
