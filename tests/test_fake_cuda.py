"""The CUDA path without a GPU: every tensor of a training step on the device it must be on, at the real
``rtx3060_12gb`` sizes, under PyTorch's ``FakeTensorMode`` (tensors with a device, shape and dtype but no
storage; an op that mixes a CPU and a CUDA tensor raises ``FakeTensorDeviceMismatchError``).

Covered: the generator's training forward through the real inputs and objective (128 px, its 201 M
parameters), the predicted x0 the side networks and the monitor take, the super-resolution stage's batch
and loss (128-px crops), the enhancer's and the discriminator's forward, every loss term of a step with
the domain losses, the critic and the enhancer's pairs on (the terms' sum reads each on the host to drop a
non-finite one: not run here), the guarded optimizer step
(clipping, fused AdamW with AMSGrad, the fp16 GradScaler, the EMA) and the checkpoint state it leaves; and
generation: a 128-px base image with classifier-free guidance, brought to 512 px by the cascade's
super-resolution stage, and the samplers' steps (text-to-image and image-to-image).

What the fake mode cannot cover, checked on a GPU by ``bench/gpu.py`` instead:
* the autograd backward (it asks for a CUDA context), so gradients are made up here;
* autocast: without CUDA ``torch.autocast("cuda")`` turns itself off, so every dtype here is fp32;
* values: nothing is computed, so there are no NaN checks and no host reads — the guarded step's one read
  of the gradient norm is answered "finite" here, and host-side bookkeeping on CPU tensors (random draws,
  batch indexes) runs outside the mode, as it runs on the CPU in training; at generation the sampler's
  schedule and the text encoding are host work (``moas.device.host_work`` steps out of the mode there),
  and the inference cache of the brain's graph network, which keys on its inputs' contents (one host read
  per prompt by design), is detached; the DDIM and DDPM samplers, whose step compares the timestep with
  their schedule's values, are left out;
* ``_foreach`` ops do not notice a CPU tensor in a list of CUDA tensors: the EMA and optimizer tests
  assert the devices of their states themselves;
* speed, memory, kernels (cuDNN/cuBLAS algorithms, fused attention), streams, pinned memory and NCCL.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from moas.config import load_config
from moas.data.dataset import ArtDataset
from moas.diffusion.registry import SAMPLERS
from moas.diffusion.sampling import make_sampler, sample
from moas.diffusion.schedule import make_train_scheduler
from moas.inference.pipeline import Pipeline
from moas.inference.sr_upscale import DiffusionUpscaler
from moas.inference.upscale import upscale
from moas.losses.gan import discriminator_loss
from moas.models.discriminator import AnimeStyleDiscriminator
from moas.models.enhance import QualityEnhancer
from moas.text.bank import TextBank
from moas.text.encoder import HASH_ID, TextEncoder
from moas.train import trained_net as trained_net_mod
from moas.train.builders import (
    build_ema,
    build_generator,
    build_objective,
    build_optimizer,
    build_panels,
    build_side_networks,
)
from moas.train.data_setup import caption_augment, image_augment
from moas.train.inputs import StepDraws, TrainingInputs
from moas.train.parts import GENERATOR_KEYS
from moas.train.sr_stage import SRStageTraining, build_sr_model
from moas.train.trained_net import TrainedNet, grad_scaler

CUDA = torch.device("cuda")
CAPTIONS = ["1girl, long hair, forest", "1boy, short hair, city at night"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("rtx3060_12gb", None, use_env=False)


@pytest.fixture(scope="module")
def fake():
    # Real CPU tensors used inside (schedule tables, batches from the loader) become fake CPU tensors, so a
    # CPU tensor that meets a CUDA one inside an op is an error, as on a GPU.
    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.fixture(scope="module")
def generator(cfg, fake):
    torch.manual_seed(0)
    model = build_generator(cfg, torch.device("cpu"))
    with fake:
        model.to(CUDA)
    return model


def on(device: torch.device, tree) -> list[str]:
    """The paths of the tensors in ``tree`` that are not on ``device``."""
    if isinstance(tree, torch.Tensor):
        return [] if tree.device.type == device.type else [str(tree.device)]
    if isinstance(tree, dict):
        return [f"{k}/{p}" for k, v in tree.items() for p in on(device, v)]
    if isinstance(tree, list | tuple):
        return [f"{i}/{p}" for i, v in enumerate(tree) for p in on(device, v)]
    return []


def training_inputs(cfg, model) -> TrainingInputs:
    bank = TextBank(TextEncoder(require_id=HASH_ID, max_tokens=cfg.text.max_tokens), CAPTIONS, progress=False)
    return TrainingInputs(bank, caption_augment(cfg), 0, build_panels(cfg, False), image_augment(cfg, model))


def loader_batch(side: int) -> dict:
    """A micro-batch as the DataLoader yields it: on the CPU, uint8 pixels. The indexes are Python ints here:
    inside the fake mode even a CPU tensor is fake, and the captions' bookkeeping reads them as values."""
    pixels = torch.randint(0, 256, (len(CAPTIONS), 3, side, side), dtype=torch.uint8)
    return {"pixels": pixels, "captions": list(CAPTIONS), "index": list(range(len(CAPTIONS)))}


def test_the_generators_training_forward_runs_on_the_gpu(cfg, fake, generator):
    inputs, objective = training_inputs(cfg, generator), build_objective(cfg)
    batch = loader_batch(cfg.data.resolution)
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    # Drawn on the CPU from the run's stream, as the loop draws them.
    draws = StepDraws.draw(torch.Generator().manual_seed(0), 2, shape, objective.num_timesteps, 0.1, None)
    with fake:
        x0, augment = inputs.images(batch, 0, CUDA)
        cond, _ = inputs(batch, draws, 0, CUDA, x0, augment)
        assert not on(CUDA, cond), on(CUDA, cond)
        out = objective(generator, x0, cond, draws.t.to(CUDA), draws.noise.to(CUDA), None)
        x0_pred = out.x0(objective.schedule)
    assert out.loss.device.type == "cuda" and out.loss.dim() == 0
    assert x0_pred.device.type == "cuda" and x0_pred.shape == x0.shape == (2, 3, 128, 128)
    assert out.per_sample.device.type == "cuda"


def test_a_tensor_left_on_the_cpu_is_caught(cfg, fake, generator):
    """What the checks are worth: one buffer of the generator left on the CPU fails the forward."""
    inputs, objective = training_inputs(cfg, generator), build_objective(cfg)
    batch = loader_batch(cfg.data.resolution)
    name, buf = next((n, b) for n, b in generator.named_buffers() if b.is_floating_point())
    owner = generator.get_submodule(name.rpartition(".")[0])
    leaf = name.rpartition(".")[2]
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    draws = StepDraws.draw(torch.Generator(), 2, shape, objective.num_timesteps, 0.0, None)
    with fake:
        x0, augment = inputs.images(batch, 0, CUDA)
        cond, _ = inputs(batch, draws, 0, CUDA, x0, augment)
        setattr(owner, leaf, buf.to("cpu"))
        try:
            with pytest.raises((FakeTensorDeviceMismatchError, RuntimeError)):
                objective(generator, x0, cond, draws.t.to(CUDA), draws.noise.to(CUDA), None)
        finally:
            setattr(owner, leaf, buf)


def test_a_schedule_table_left_on_the_cpu_is_caught(cfg, fake, generator):
    """A timestep on the GPU indexing a table on the CPU: the error a GPU would raise at step 1."""
    objective = build_objective(cfg)
    table = objective.schedule.alpha  # (T,) on the CPU until the objective moves it
    with fake:
        t = torch.randint(0, objective.num_timesteps, (2,), device=CUDA)
        with pytest.raises((FakeTensorDeviceMismatchError, RuntimeError)):
            table[t] * torch.ones(2, device=CUDA)


def test_the_guarded_step_and_its_checkpoint_state_stay_on_the_gpu(cfg, monkeypatch):
    # Fake tensors hold no values: the step's one host read (is the gradient norm finite?) says yes.
    monkeypatch.setattr(
        trained_net_mod, "host_read", lambda ok, norm, report=(): (True, [0.0] * (1 + len(report)))
    )
    # A generator and fake mode of its own: reusing the module's after the forward test crashed the pytest
    # process (segmentation fault, torch 2.14); the same sequence in a plain script did not.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    generator = build_generator(cfg, torch.device("cpu"))
    with fake:
        generator.to(CUDA)
    for amp in (torch.bfloat16, torch.float16):  # bf16: no scaler; fp16: GradScaler("cuda") + found_inf
        with fake:
            ema = build_ema(cfg, generator)
            opt = build_optimizer(cfg, generator)
            scaler = grad_scaler(CUDA, amp)
            net = TrainedNet(
                "generator", generator, opt, scaler, GENERATOR_KEYS, max_grad_norm=1.0, ema=ema, average=False
            )
            for p in generator.parameters():
                p.grad = torch.randn_like(p)
            norm = net.apply(True)
            state = net.state_dict()
        assert norm is not None and norm.device.type == "cuda"
        assert opt.defaults["amsgrad"] and (
            opt.defaults.get("fused") or opt.defaults.get("foreach") is not False
        )
        moments = [s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor)]
        assert moments and not on(CUDA, [m for m in moments if m.dim() > 0])  # exp_avg, exp_avg_sq, max
        assert not on(CUDA, state["model"]) and not on(CUDA, state["ema"]["model"])
        assert not on(CUDA, list(ema.model.parameters()))  # the foreach lerp cannot tell, so asserted
        assert net.steps == 1 and all(p.grad is None for p in generator.parameters())


def test_the_super_resolution_stage_trains_on_the_gpu(cfg, fake):
    side = cfg.data.resolution * cfg.sr.scale  # 512-px images, 128-px crops
    hr = HRImages([torch.randint(0, 256, (3, side, side), dtype=torch.uint8) for _ in CAPTIONS], side)
    bank = TextBank(TextEncoder(require_id=HASH_ID, max_tokens=cfg.text.max_tokens), CAPTIONS, progress=False)
    stage = SRStageTraining(cfg.sr, hr, bank, torch.device("cpu"), seed=0)
    batch = stage.batch()  # drawn on the CPU from the stage's stream, as in training
    with fake:
        stage.model.to(CUDA)
        stage.device = CUDA
        loss = stage.loss(batch)
    assert loss.device.type == "cuda" and batch["x0"].shape == (cfg.sr.batch_size, 3, 128, 128)
    assert not on(CUDA, list(stage.model.parameters()))


def test_the_enhancer_and_the_discriminator_run_on_the_gpu(cfg, fake):
    e, side = cfg.enhance, cfg.data.resolution * cfg.enhance.scale
    enhancer = QualityEnhancer(e.width, e.sr_channels, e.sr_blocks)  # built on the CPU, as in training
    disc = AnimeStyleDiscriminator(cfg.losses.disc_base_channels)
    with fake:
        enhancer.to(CUDA)
        disc.to(CUDA)
        lr = torch.rand(2, 3, side // 2, side // 2, device=CUDA) * 2 - 1
        full = enhancer.refine(enhancer.upscale(lr, (side, side), "full"), "full")
        score = disc(full)
    assert full.device.type == "cuda" and full.shape == (2, 3, side, side) and score.device.type == "cuda"


def cascade_pipeline(cfg, fake: FakeTensorMode) -> Pipeline:
    """A generator and a super-resolution stage built on the CPU and placed on the (fake) GPU by the
    pipeline, as ``moas generate`` loads them."""
    torch.manual_seed(0)
    generator, stage = build_generator(cfg, torch.device("cpu")), build_sr_model(cfg.sr)
    encoder = TextEncoder(require_id=HASH_ID, max_tokens=cfg.text.max_tokens)
    with fake:
        pipe = Pipeline(generator, encoder, cfg.diffusion, CUDA, sample_defaults=cfg.sample)
        pipe.sr = DiffusionUpscaler(stage, cfg.sr, CUDA)
    for m in pipe.model.modules():
        if getattr(m, "cache", None) is not None:
            m.cache = None  # keys on its inputs' contents: a host read (see the module's docstring)
    return pipe


def test_a_whole_generation_through_the_cascade_runs_on_the_gpu(cfg, fake):
    prompts, seeds = ["1girl, long hair, forest"], [3]
    pipe = cascade_pipeline(cfg, fake)
    with fake:
        base = pipe(prompts, seeds, steps=2)  # guidance: both branches in one batch of two
        out, stages = upscale(pipe, base, "diffusion", (512, 512), prompts, seeds, "full")
    assert base.shape == (1, 3, 128, 128) and base.dtype == torch.uint8
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.uint8 and "diffusion x4" in stages
    assert not on(CUDA, list(pipe.sr.stage.parameters()))


def test_an_upscaler_left_on_the_cpu_is_caught(cfg, fake):
    base = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    pipe = cascade_pipeline(cfg, fake)
    pipe.sr.stage = build_sr_model(cfg.sr).eval()  # never moved: its weights on the CPU
    with fake:
        with pytest.raises((FakeTensorDeviceMismatchError, RuntimeError)):
            upscale(pipe, base, "diffusion", (512, 512), ["1girl"], [3], "full")


# DDIM and DDPM compare the timestep with their schedule inside ``step`` (``prev_t >= 0``, a ``nonzero``
# lookup): values of CPU tables, which the fake mode has not got. Their steps run in the CPU sampler tests.
VALUE_READING = {"ddim", "ddpm"}


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - VALUE_READING))
def test_every_sampler_steps_on_the_gpu(cfg, fake, name):
    """Each sampler's tables stay on the CPU (host work); what meets the image on the GPU must be a number
    or moved there. Text-to-image and image-to-image (its noised start)."""
    scheduler = make_sampler(name, dict(make_train_scheduler(cfg.diffusion).config))
    seen = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((x.device.type, t.device.type))
        return x * 0.5

    with fake:
        init = torch.zeros(2, 3, 64, 64, device=CUDA)
        for strength in (1.0, 0.5):
            x = sample(model_fn, scheduler, [1, 2], (3, 64, 64), 4, 1.0, CUDA, init=init, strength=strength)
            assert x.device.type == "cuda" and x.shape == (2, 3, 64, 64)
    assert len(seen) == 4 + 2 and set(seen) == {("cuda", "cuda")}


def test_the_side_networks_losses_run_on_the_gpu(cfg, tmp_path):
    """Every loss of a step with everything on (domain losses, the critic, the enhancer's pairs) at the
    profile's sizes: the per-sample terms, where the work and the tensors are. Their sum reads each term on
    the host to drop a non-finite one (the NaN guard), which the fake mode cannot answer."""
    everything = {"losses": {"domain": True, "adversarial": True}}
    full = load_config("rtx3060_12gb", None, overrides=everything, use_env=False)
    dataset = ArtDataset(tmp_path, full.data.resolution, str(tmp_path / "cache"))
    side = build_side_networks(full, dataset, torch.device("cpu"))
    schedule = build_objective(full).schedule
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    side_hr = full.data.resolution * full.enhance.scale
    with fake:
        for m in (side.stack, side.disc, side.enhancer, side.enh_stack):
            m.to(CUDA)
        x0 = torch.rand(2, 3, 128, 128, device=CUDA) * 2 - 1
        x0_pred = (torch.rand(2, 3, 128, 128, device=CUDA) * 2 - 1).requires_grad_(True)
        t = torch.tensor([10, 900], device=CUDA)
        w = schedule.alpha.to(t.device)[t] ** (2 * side.low_noise_power)
        terms = side.stack.per_sample_terms(x0_pred, x0, side.disc(x0_pred))
        critic = discriminator_loss(side.disc(x0), side.disc(x0_pred.detach()))
        hr = torch.rand(2, 3, side_hr, side_hr, device=CUDA) * 2 - 1
        up = side.enhancer.upscale(hr[..., ::2, ::2], (side_hr, side_hr), "full")
        enh_terms = side.enh_stack.per_sample_terms(side.enhancer.refine(up, "full"), hr, None)
    assert {"pixel", "ssim", "line_art", "color", "style", "anatomy", "gan"} <= set(terms)
    assert not on(CUDA, terms) and not on(CUDA, enh_terms) and critic.device.type == "cuda"
    assert all(v.shape == (2,) for v in terms.values()) and w.device.type == "cuda"


class HRImages:
    """The stage's high-resolution images as the run's dataset serves them (uint8, with captions)."""

    def __init__(self, images: list[torch.Tensor], resolution: int) -> None:
        self.images, self.resolution = images, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.images[i], "caption": CAPTIONS[i]}
