"""The tensor cache: no image reads after the first pass, exact rebuilds, corrupt and half-written entries."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moas.data import dataset as ds
from moas.data.artist_style import STYLE_DIM
from moas.data.cache import CACHE_VERSION
from moas.data.dataset import ArtDataset
from moas.text.encoder import TextEncoder


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _folder(root: Path, n: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
        (root / f"img_{i}.txt").write_text(f"1girl, tag {i}")
    return root


def _counting_loader(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = ds.load_image
    monkeypatch.setattr(ds, "load_image", lambda p: calls.append(Path(p)) or real(p))
    return calls


def test_entries_hold_all_parts_and_second_epoch_reads_no_image(tmp_path, monkeypatch):
    data = _folder(_mk(tmp_path / "data"))
    d = ArtDataset(data, 16, tmp_path / "cache", extract_style=True)
    d.validate(progress=False, encoder=TextEncoder(None, allow_bundled=False))  # hash encoder: fast
    first = [d[i] for i in range(len(d))]
    entry = torch.load(next((tmp_path / "cache").glob("*.pt")), weights_only=True)
    assert entry["version"] == CACHE_VERSION and entry["pixels"].dtype == torch.uint8
    assert entry["pixels"].shape == (3, 16, 16) and entry["image_embed"].shape == (768,)
    assert entry["style"].shape == (STYLE_DIM,) and entry["text_embed"].shape == (768,)
    # Each tensor is stored alone: the text embedding is a row of a batch, whose whole block torch.save would
    # otherwise write into every entry (~400 KB instead of ~10 KB).
    for key, t in entry.items():
        assert not torch.is_tensor(t) or t.untyped_storage().nbytes() == t.nbytes, key
    assert max(p.stat().st_size for p in (tmp_path / "cache").glob("*.pt")) < 20_000
    # Epoch 2: every image file is replaced by garbage, yet items are identical — nothing read them.
    calls = _counting_loader(monkeypatch)
    for p in d.paths:
        p.write_bytes(b"")
    for i, item in enumerate(first):
        again = d[i]
        for key in ("pixels", "image_embed", "style", "text_embed"):
            assert torch.equal(again[key], item[key])
    assert calls == []


def test_editing_one_image_rebuilds_exactly_one_entry(tmp_path, monkeypatch):
    data = _folder(_mk(tmp_path / "data"))
    ArtDataset(data, 16, tmp_path / "cache").validate(progress=False)
    n_entries = len(list((tmp_path / "cache").glob("*.pt")))
    Image.new("RGB", (20, 28), (200, 10, 10)).save(data / "img_2.png")
    calls = _counting_loader(monkeypatch)
    d = ArtDataset(data, 16, tmp_path / "cache")
    d.validate(progress=False)
    assert [c.name for c in calls] == ["img_2.png"] and d.rebuilt == 1
    assert len(list((tmp_path / "cache").glob("*.pt"))) == n_entries + 1
    assert d[2]["pixels"][0].float().mean() > 190
    # A changed setting (resolution) rebuilds every entry; a changed caption only its own.
    calls.clear()
    (data / "img_4.txt").write_text("1girl, edited")
    d = ArtDataset(data, 16, tmp_path / "cache")
    d.validate(progress=False)
    assert [c.name for c in calls] == ["img_4.png"]
    calls.clear()
    ArtDataset(data, 24, tmp_path / "cache").validate(progress=False)
    assert len(calls) == 5


def test_corrupt_and_truncated_entries_are_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    data = _folder(_mk(tmp_path / "d"))
    d = ArtDataset(data, 16, tmp_path / "cache")
    d.validate(progress=False)
    good = d[0]["pixels"].clone()
    entries = sorted((tmp_path / "cache").glob("*.pt"))
    blob = entries[0].read_bytes()
    entries[0].write_bytes(blob[: len(blob) // 2])  # truncated
    entries[1].write_bytes(b"not a torch file")  # garbage
    torch.save({"pixels": torch.zeros(3, 8, 8, dtype=torch.uint8)}, entries[2])  # wrong contents
    calls = _counting_loader(monkeypatch)
    with caplog.at_level(logging.WARNING):
        d2 = ArtDataset(data, 16, tmp_path / "cache")
        d2.validate(progress=False)
    assert caplog.text.count("is corrupt") == 3 and len(calls) == 3
    assert torch.equal(d2[0]["pixels"], good)
    # During training (after validation) a damaged entry is rebuilt from its image too.
    entries[0].write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(d2[0]["pixels"], good)


KILL_SCRIPT = """
import os, signal, sys, torch
from moas.data import cache
from moas.data.dataset import ArtDataset
real = cache.atomic_write_bytes
count = [0]
def dying_write(path, data):
    count[0] += 1
    if count[0] == 3:  # third entry: write half of it in place of the temp file, then die
        from moas.io import atomic_open
        with atomic_open(path) as f:
            f.write(data[: len(data) // 2]); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
cache.atomic_write_bytes = dying_write
ArtDataset(sys.argv[1], 16, sys.argv[2]).validate(progress=False)
"""


def test_kill_during_cache_write_leaves_no_entry_that_loads_wrong(tmp_path):
    data = _folder(_mk(tmp_path / "d"))
    cache_dir = tmp_path / "cache"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(data), str(cache_dir)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    entries = list(cache_dir.glob("*.pt"))
    assert len(entries) == 2  # the killed write left only a temp file, never a .pt
    assert any(p.name.startswith(".") and ".tmp-" in p.name for p in cache_dir.iterdir())
    for p in entries:
        assert torch.load(p, weights_only=True)["pixels"].shape == (3, 16, 16)
    d = ArtDataset(data, 16, cache_dir)
    d.validate(progress=False)  # cleans the stray temp file, builds the missing entries
    assert d.rebuilt == 3 and len(list(cache_dir.glob("*.pt"))) == 5
    assert not any(".tmp-" in p.name for p in cache_dir.iterdir())
    fresh = ArtDataset(data, 16, None)
    fresh.validate(progress=False)
    for i in range(5):
        assert torch.equal(d[i]["pixels"], fresh[i]["pixels"])


def test_entries_stay_in_ram_up_to_the_budget_and_the_first_ones_are_kept(tmp_path, monkeypatch):
    data = _folder(_mk(tmp_path / "data"), n=6)
    plain = ArtDataset(data, 16, tmp_path / "cache")
    plain.validate(progress=False, encoder=TextEncoder(None, allow_bundled=False))
    expected = [plain[i] for i in range(len(plain))]
    reads: list[Path] = []
    real = ds.load_entry
    monkeypatch.setattr(ds, "load_entry", lambda p, size, hr=None: reads.append(Path(p)) or real(p, size, hr))
    entry_bytes = sum(
        t.numel() * t.element_size() for t in real(plain._entries[0], (16, 16)).values() if torch.is_tensor(t)
    )

    unvalidated = ArtDataset(data, 16, tmp_path / "cache", ram_cache_bytes=10**9)
    unvalidated[0], unvalidated[0]
    assert unvalidated._ram == {}  # only entries validation has checked are kept

    def epochs(budget: int) -> list[int]:
        d = ArtDataset(data, 16, tmp_path / "cache", ram_cache_bytes=budget)
        d.validate(progress=False, encoder=TextEncoder(None, allow_bundled=False))
        reads.clear()
        counts = []
        for _ in range(3):
            for i in range(len(d)):
                item = d[i]
                assert torch.equal(item["pixels"], expected[i]["pixels"])
                assert torch.equal(item["image_embed"], expected[i]["image_embed"])
            counts.append(len(reads))
            reads.clear()
        return counts

    assert epochs(10**9) == [6, 0, 0]  # everything fits: later epochs read no file
    assert epochs(int(2.5 * entry_bytes)) == [6, 4, 4]  # two fit: those two are never read again
    assert epochs(0) == [6, 6, 6]  # off
