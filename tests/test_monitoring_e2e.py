"""End-to-end monitoring of the session's tiny run (tests/conftest.py: 3 epochs, output redirected to a
file): its TensorBoard events read back with TensorBoard's reader, its console lines, best-step selection
checked against `moas eval` on every saved checkpoint; the dashboard drawn under a pseudo-terminal;
generation safety and --keep_best."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moas.cli import main

pytestmark = pytest.mark.slow

SCALARS = {
    "loss/total",
    "loss/diffusion",
    "lr",
    "lr/0",
    "train/grad_norm",
    "perf/images_per_sec",
    "perf/step_time_s",
    "perf/data_wait_s",
    "system/ram_gb",
    "system/ram_percent",
    "expert/line_art",
    "expert/color",
    "expert/background",
    "art_theory/anatomy",
    "art_theory/perspective",
    "art_theory/color_harmony",
    "val/loss",
    "val/loss_vs_zero",
    "val/psnr",
    "val/ssim",
    "val/accuracy",
    "val/demo_accuracy",
    "val/prompt_adherence",
    "val/psnr_avg",
    "val/expert/line_art",
    "val/art_theory/color_harmony",
    "eval/self_critique",
    "eval/creativity",
    "best/score",
}


@pytest.fixture
def run(session_run) -> Path:
    return session_run


@pytest.fixture
def models_here(session_run, workdir) -> Path:
    """The session's model files copied into this test's working folder (``generate``'s default model)."""
    shutil.copytree(session_run / "models", workdir / "models")
    return workdir


def test_event_files_hold_every_tag_and_progress_chart(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next((run / "runs").iterdir())
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    missing = SCALARS - set(tags["scalars"])
    assert not missing, f"missing scalar tags: {sorted(missing)}"
    assert "samples" in tags["images"]
    assert {"hist/timesteps", "hist/sample_loss", "brain/pooled"} <= set(tags["histograms"])
    assert {"config/text_summary", "sample_prompts/text_summary"} <= set(tags["tensors"])
    # measurements, not constants
    steps = json.loads((run_dir / "best_steps.json").read_text())["history"][-1]["global_step"]
    losses = [e.value for e in ea.Scalars("loss/total")]
    assert len(losses) == steps >= 9 and len(set(losses)) > 1
    psnrs = [e.value for e in ea.Scalars("val/psnr")]
    assert len(psnrs) == 3 and all(0 < v < 100 for v in psnrs)
    assert all(-1 <= e.value <= 1 for e in ea.Scalars("val/ssim"))
    assert all(0 < e.value < 0.9 for e in ea.Scalars("val/loss_vs_zero"))  # it learned: below the warning
    critique = [e.value for e in ea.Scalars("eval/self_critique")]
    assert len(critique) == 3 and all(0 <= v <= 1 for v in critique) and len(set(critique)) > 1
    assert all(0 <= e.value <= 1 for e in ea.Scalars("eval/creativity"))
    progress = run_dir / "progress.png"
    img = Image.open(progress)
    img.load()
    assert img.size[0] > 500
    grid = Image.open(run_dir / "samples" / "epoch_0003.png")
    assert grid.size == (2 * 16 + 3, 16 + 2)  # the two prompts of the prompts file, 16 px each, padding 1


def test_redirected_output_has_dashboard_lines_and_no_control_codes(run):
    text = (run / "train.log").read_text()
    run_dir = next((run / "runs").iterdir())
    steps = json.loads((run_dir / "best_steps.json").read_text())["history"][-1]["global_step"]
    assert f"[dashboard] epoch 3/3 | step {steps}/{steps}" in text
    assert "[dashboard] best demo_accuracy" in text
    assert "Validation: 1 images held out" in text
    assert "\x1b" not in text and "\r" not in text


def test_best_checkpoint_has_highest_heldout_accuracy(run):
    from moas.checkpoint import load_checkpoint
    from moas.eval.evaluate import run_eval
    from moas.inference.model_file import read_model_file, verify_model_file
    from moas.inference.pipeline import Pipeline

    run_dir = next((run / "runs").iterdir())
    best = json.loads((run_dir / "best_steps.json").read_text())
    assert best["metric"] == "demo_accuracy" and [h["epoch"] for h in best["history"]] == [1, 2, 3]
    accuracy = {}
    for epoch in (1, 2, 3):  # independently: `moas eval` on every saved checkpoint, same settings
        pipe = Pipeline.from_file(run / "checkpoints" / f"epoch_{epoch:04d}.pt", torch.device("cpu"))
        result = run_eval(
            pipe, run / "data" / "demo", n_per_split=4, steps=3, guidance_scale=2.0, progress=False
        )
        accuracy[epoch] = result["held_out"]["mean"]
    assert [h["score"] for h in best["history"]] == [accuracy[1], accuracy[2], accuracy[3]]
    eligible = {h["epoch"]: accuracy[h["epoch"]] for h in best["history"] if not h["vetoed"]}
    top = max(eligible.values())
    losses = {h["epoch"]: h["loss"] for h in best["history"]}
    tied = [e for e, a in eligible.items() if a == top]
    expected = min(tied, key=lambda e: (losses[e], e))  # a tie: the lower validation loss, then the earlier
    assert best["best"]["epoch"] == expected
    chosen = read_model_file(run / "models" / "best_model.safetensors")
    ckpt = load_checkpoint(run / "checkpoints" / f"epoch_{expected:04d}.pt")
    assert chosen.epoch == expected
    # Identical weights. The MoE's usage statistics are buffers that validation's forward passes advance
    # after the checkpoint was written, so they are the only entries allowed to differ.
    stats = ("call_count", "success_rate", "load_sum", "load_calls")
    for k, v in ckpt["ema"]["model"].items():
        if not k.endswith(stats):
            assert torch.equal(chosen.weights[k], v), k
    last = run / "models" / "last_model.safetensors"
    assert read_model_file(last).epoch == 3
    # The final step chosen: one file under two names (no second copy on disk); else two files.
    best_file = run / "models" / "best_model.safetensors"
    assert (os.stat(best_file).st_ino == os.stat(last).st_ino) == (expected == 3)
    assert verify_model_file(last) and verify_model_file(best_file)


DRAW = textwrap.dedent(
    """
    import sys, time
    from tqdm.auto import tqdm
    from moas.monitor.dashboard import Dashboard
    from moas.monitor.progress import TrainingHistory

    h = TrainingHistory()
    h.status.update(epoch=1, epochs=1, step=2, total_steps=2)
    h.add(2, "loss/total", 0.25)
    h.add(2, "perf/images_per_sec", 12.5)
    h.add(2, "system/ram_gb", 1.5)
    bar = tqdm(total=2, desc="epoch 1/1", file=sys.stderr)  # the training loop's bar shares the terminal
    dash = Dashboard()  # the run's own: on stderr, which is the terminal here
    for _ in range(2):
        bar.update(1)
        dash.show(h, force=True)
        time.sleep(0.05)
    dash.close()
    bar.close()
    """
)


def test_dashboard_under_a_pseudo_terminal(tmp_path):
    """In a terminal the dashboard redraws its lines in place below the progress bar, with no plain
    ``[dashboard]`` lines; before any validation the best-metric line says "best -"."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows × 160 columns
    proc = subprocess.Popen(
        [sys.executable, "-c", DRAW], cwd=tmp_path, stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    chunks, deadline = [], time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    assert "epoch 1/1 | step 2/2" in out  # the dashboard's first line
    assert "img/s" in out and "RAM" in out and "best - | val PSNR" in out
    assert "[dashboard]" not in out  # in place, not plain lines
    assert "\x1b[" in out or "\r" in out  # redrawn with cursor control, as tqdm does
    assert "epoch 1/1:" in out  # the tqdm bar shares the terminal


def test_blacklisted_prompt_refused_unless_opted_in(models_here, capsys):
    assert main(["generate", "--prompt", "1girl, NSFW, Nude", "--output", "x.png", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "moas: error: The prompt contains blacklisted terms (nsfw, nude)" in err and "--allow_nsfw" in err
    assert not Path("x.png").exists()
    # the negative prompt may name what to avoid
    assert (
        main(["generate", "--prompt", "1girl", "--negative_prompt", "nsfw", "--output", "ok.png", "--quiet"])
        == 0
    )
    assert main(["generate", "--prompt", "1girl, nsfw", "--allow_nsfw", "--output", "y.png", "--quiet"]) == 0
    assert Path("y.png").is_file()


def test_keep_best_keeps_exactly_k_best_first(models_here, capsys):
    from moas.eval.quality import quality_score

    args = ["generate", "--prompt", "1girl, red hair, forest", "--seed", "3", "--quiet"]
    assert main([*args, "--num_images", "5", "--output", "all/a.png"]) == 0
    assert main([*args, "--num_images", "5", "--keep_best", "2", "--output", "best/b.png"]) == 0
    kept = sorted(Path("best").glob("*.png"))
    assert [p.name for p in kept] == ["b_000.png", "b_001.png"]
    every = sorted(Path("all").glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in every])
    scores = quality_score(pixels).tolist()
    ranked = sorted(range(5), key=lambda i: -scores[i])[:2]
    for path, i in zip(kept, ranked, strict=True):
        assert Image.open(path).tobytes() == Image.open(every[i]).tobytes()
        assert f"Seed: {3 + i}," in Image.open(path).text["parameters"]
        assert "Quality: " in Image.open(path).text["parameters"]
    assert main([*args, "--num_images", "2", "--keep_best", "3", "--output", "c.png"]) == 2
    assert "--keep_best must be between 1 and --num_images (2)" in capsys.readouterr().err
