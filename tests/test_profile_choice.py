"""Without --profile the machine picks the profile: CUDA mocked present (large and small cards) and absent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moas.cli import main
from moas.config import load_config
from moas.device import choose_profile, detect_profile
from moas.doctor import profile_check


def fake_gpu(monkeypatch, gb: float | None, name: str = "NVIDIA GeForce RTX 3060") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gb is not None)
    props = SimpleNamespace(total_memory=int((gb or 0) * 2**30), name=name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_choice_by_card_memory():
    assert choose_profile(12.0, "RTX 3060").profile == "rtx3060_12gb"
    big = choose_profile(80.0, "H100")
    assert big.profile == "rtx3060_12gb" and big.overrides == {"resources": {"max_vram_gb": 79.4}}
    assert choose_profile(12.0, "RTX 3060").overrides == {}  # the profile's own 11.4 GB budget
    small = choose_profile(8.0, "RTX 3050")
    assert small.profile == "cpu_tiny" and small.overrides == {"resources": {"device": "cuda"}}
    assert "8.0 GB" in small.reason and "under the 10 GB" in small.reason
    mac = choose_profile(None, mps=True)
    assert mac.profile == "cpu_tiny" and mac.overrides == {"resources": {"device": "mps"}}
    cpu = choose_profile(None)
    assert cpu.profile == "cpu_tiny" and not cpu.overrides and "no CUDA GPU" in cpu.reason
    assert "--profile rtx3060_12gb|original" in cpu.notice()


def test_detect_reads_the_first_gpu(monkeypatch):
    fake_gpu(monkeypatch, 11.7)
    c = detect_profile()
    assert c.profile == "rtx3060_12gb" and "NVIDIA GeForce RTX 3060 with 12 GB" in c.reason
    fake_gpu(monkeypatch, None)
    assert detect_profile().profile == "cpu_tiny"


def dry_run(capsys, *args: str) -> tuple[str, str]:
    import moas.cli.train

    # The plans need nothing of the machine (tests/test_memory_plan.py); with CUDA faked they are skipped.
    real, moas.cli.train._plans_text = moas.cli.train._plans_text, lambda cfg: "# plans"
    try:
        assert main(["train", "--dry-run", *args]) == 0
    finally:
        moas.cli.train._plans_text = real
    out = capsys.readouterr().out
    return out.splitlines()[0], out


@pytest.mark.parametrize(
    ("gb", "profile", "device"),
    [(12.0, "rtx3060_12gb", "auto"), (6.0, "cpu_tiny", "cuda"), (None, "cpu_tiny", "cpu")],
)
def test_train_dry_run_prints_the_choice(monkeypatch, capsys, workdir, gb, profile, device):
    fake_gpu(monkeypatch, gb)
    first, out = dry_run(capsys, "--data_dir", "data/demo/train")
    assert first.startswith("# No --profile given:") and f"uses the {profile} profile" in first
    cfg = load_config(profile, None, {"resources": {"device": device}} if device != "auto" else None)
    assert f'profile = "{profile}"' in out and f'device = "{cfg.resources.device}"' in out


def test_a_named_profile_always_wins(monkeypatch, capsys, workdir):
    fake_gpu(monkeypatch, 12.0)
    first, out = dry_run(capsys, "--profile", "cpu_tiny")
    assert first == 'profile = "cpu_tiny"' and "No --profile" not in out
    monkeypatch.setenv("MOAS_PROFILE", "original")
    first, out = dry_run(capsys)
    assert first == 'profile = "original"'
    monkeypatch.delenv("MOAS_PROFILE")
    fake_gpu(monkeypatch, 6.0)
    _, out = dry_run(capsys, "--device", "cpu")  # --device beats the choice's device
    assert 'device = "cpu"' in out


def test_doctor_warns_when_a_gpu_idles_under_a_cpu_profile(monkeypatch):
    fake_gpu(monkeypatch, 12.0)
    cfg = load_config("cpu_tiny", use_env=False)
    check = profile_check(cfg, None)
    assert check.status == "warn" and "--profile rtx3060_12gb" in check.detail
    fake_gpu(monkeypatch, None)
    ok = profile_check(cfg, choose_profile(None))
    assert ok.status == "ok" and ok.detail.startswith("cpu_tiny (no CUDA GPU found")
