"""Brain specialisation, image side: the per-expert image targets, their heads in the generator's auxiliary
loss, the training inputs that carry the image, and the TensorBoard scalars of the heads."""

from __future__ import annotations

import pytest
import torch

from moas.models.expert_heads import ExpertTargetHeads
from moas.models.expert_targets import (
    EXPERT_TARGETS,
    GRID,
    HIST_BINS,
    edge_density,
    expert_targets,
    layout_grid,
    luminance_grid,
    palette,
    sharpness,
    symmetry,
)
from moas.models.moe import EXPERT_NAMES

from .test_tag_routing import StubSource, generator, text_inputs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def flat(rgb: tuple[float, float, float], size: int = 16) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_palette_of_a_pure_red_image_is_red():
    p = palette(flat((1.0, -1.0, -1.0)))
    assert p.shape == (1, 3 + 3 * HIST_BINS)
    assert p[0, :3].tolist() == [1.0, -1.0, -1.0]
    hist = p[0, 3:].view(3, HIST_BINS)
    assert hist[0].tolist() == [0.0, 0.0, 0.0, 1.0]  # red: all in the top bin
    assert hist[1].tolist() == hist[2].tolist() == [1.0, 0.0, 0.0, 0.0]  # green, blue: all in the bottom bin
    half = torch.cat([flat((1.0, 1.0, 1.0))[..., :8], flat((-1.0, -1.0, -1.0))[..., 8:]], -1)
    assert palette(half)[0, 3:7].tolist() == [0.5, 0.0, 0.0, 0.5]


def test_flat_images_have_no_edges_and_no_sharpness():
    for rgb in ((1.0, -1.0, -1.0), (0.3, 0.3, 0.3), (-1.0, -1.0, -1.0)):
        x = flat(rgb)
        assert edge_density(x).item() == 0.0 and sharpness(x).item() == 0.0
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    assert sharpness(ramp).item() == pytest.approx(0.0, abs=1e-10)  # a linear ramp has no curvature


def test_edge_density_and_sharpness_of_a_step_and_a_checkerboard():
    step = torch.cat([-torch.ones(1, 3, 16, 8), torch.ones(1, 3, 16, 8)], -1)
    # Valid 3×3 windows: 14 columns, of which the two on either side of the step see it.
    assert edge_density(step).item() == pytest.approx(2 / 14)
    checker = ((torch.arange(16).view(16, 1) + torch.arange(16)) % 2 * 2 - 1).float().expand(1, 3, 16, 16)
    assert edge_density(checker).item() == 0.0  # Sobel cancels on a one-pixel checkerboard ...
    assert sharpness(checker).item() > sharpness(step).item() > 0.0  # ... the Laplacian does not


def test_mirrored_images_have_symmetry_one():
    torch.manual_seed(0)
    left = torch.rand(2, 3, 16, 8) * 2 - 1
    mirrored = torch.cat([left, left.flip(-1)], -1)
    assert torch.allclose(symmetry(mirrored), torch.ones(2, 1))
    assert (symmetry(torch.rand(2, 3, 16, 16) * 2 - 1) < 0.9).all()
    assert symmetry(torch.cat([-torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)], -1)).item() == 0.0


def test_luminance_and_layout_grids():
    top_bright = torch.cat([torch.ones(1, 3, 8, 16), -torch.ones(1, 3, 8, 16)], 2)
    lum = luminance_grid(top_bright).view(GRID, GRID)
    assert torch.allclose(lum[:2], torch.ones(2, GRID)) and torch.allclose(lum[2:], -torch.ones(2, GRID))
    lay = layout_grid(flat((1.0, -1.0, 0.5)))
    assert lay.shape == (1, 3 * GRID * GRID)
    assert lay.view(3, -1).tolist() == [[1.0] * 16, [-1.0] * 16, [0.5] * 16]
    assert {k: v.shape[1] for k, v in expert_targets(top_bright).items()} == {
        k: w for k, (_, w) in EXPERT_TARGETS.items()
    }
    assert set(EXPERT_TARGETS) <= set(EXPERT_NAMES)


def test_heads_learn_the_targets_and_report_per_expert_losses():
    torch.manual_seed(0)
    heads = ExpertTargetHeads(EXPERT_NAMES, 8)
    assert heads.names == tuple(EXPERT_TARGETS)
    states = torch.randn(4, len(EXPERT_NAMES), 8)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    mask = torch.tensor([True, True, True, False])
    before = heads(states, images, mask)["aux_target_loss"]
    assert before.item() > 0
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(60):
        loss = heads(states, images, mask)["aux_target_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * before.item()
    means = heads.take_means()
    assert set(means) == set(EXPERT_TARGETS) and all(v >= 0 for v in means.values())
    assert heads.take_means() == {}  # reset after reading
    # A masked row does not count: changing its image changes nothing.
    other = images.clone()
    other[3] = 1.0
    assert torch.equal(
        heads(states, other, mask)["aux_target_loss"], heads(states, images, mask)["aux_target_loss"]
    )
    none = heads(states, images, torch.zeros(4, dtype=torch.bool))["aux_target_loss"]
    assert none.item() == 0.0


def test_generator_aux_loss_includes_the_weighted_target_loss_only_with_an_image():
    g = generator(aux_targets=0.5).eval()
    text = text_inputs()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 600])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        plain = g(x, t, text)
        cond = g.condition(text | {"aux_image": images, "aux_mask": torch.ones(2, dtype=torch.bool)})
        aux = g(x, t, text | {"aux_image": images}).aux_loss
        sampling = g.condition(text)
    assert sampling["aux_targets.aux_target_loss"].item() == 0.0  # sampling: no image, no heads
    expected = 0.01 * cond["moe.balance_loss"] + 0.5 * cond["aux_targets.aux_target_loss"]
    assert cond["aux_targets.aux_target_loss"] > 0 and torch.allclose(aux, expected, rtol=1e-4)
    assert torch.equal(plain.pred, g(x, t, text | {"aux_image": images}).pred.detach())  # image ≠ input
    # Training: every head gets gradient from the target loss alone (the experts do once the zero-initialised
    # heads have moved).
    g.train()
    g.zero_grad()
    g.condition(text | {"aux_image": images})["aux_targets.aux_target_loss"].backward()
    heads = g.stage("aux_targets").heads
    assert all(heads[n].weight.grad.abs().sum() > 0 for n in EXPERT_TARGETS)


def test_training_inputs_carry_the_image_only_when_asked():
    from moas.data.captions import CaptionAugment
    from moas.train.inputs import StepDraws, TrainingInputs
    from moas.train.sequences import PanelTraining

    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    batch = {"pixels": pixels, "captions": ["red hair, forest", "blue eyes", ""], "index": torch.arange(3)}
    draws = StepDraws.draw(torch.Generator().manual_seed(0), 3, (3, 16, 16), 1000, 0.0, None)
    panels = PanelTraining(False, 0.0, 0.0, 0.0, 1.0, 1.0)
    cpu = torch.device("cpu")
    plain = TrainingInputs(StubSource(), CaptionAugment(), 0, panels)
    x0, _ = plain.images(batch, 0, cpu)
    cond, _ = plain(batch, draws, 0, cpu, x0)
    assert "aux_image" not in cond and "aux_mask" not in cond
    assert cond["tag_category"].shape == cond["tag_mask"].shape
    wired = TrainingInputs(StubSource(), CaptionAugment(), 0, panels, aux_image=True)
    x0, _ = wired.images(batch, 0, cpu)
    cond, _ = wired(batch, draws, 0, cpu, x0)
    assert torch.equal(cond["aux_image"], x0) and cond["aux_mask"].tolist() == [True, True, False]
    dropped = StepDraws.draw(torch.Generator().manual_seed(0), 3, (3, 16, 16), 1000, 1.0, None)
    assert wired(batch, dropped, 0, cpu, x0)[0]["aux_mask"].tolist() == [False, False, False]


def test_tensorboard_gets_the_heads_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moas.config import DiffusionConfig, SampleConfig
    from moas.monitor.run_monitor import RunMonitor

    g = generator(aux_targets=1.0)
    g.condition(text_inputs() | {"aux_image": torch.rand(2, 3, 16, 16) * 2 - 1})
    run = tmp_path / "run"
    monitor = RunMonitor(run, "", ["1girl"], None, sample=SampleConfig(), diffusion=DiffusionConfig())
    monitor.log_brain(7, g)
    monitor.close()
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"aux_targets/{n}" for n in EXPERT_TARGETS} <= tags
    assert acc.Scalars("aux_targets/color")[0].step == 7
