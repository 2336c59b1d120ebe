import pytest
import torch

from moas.config import DiffusionConfig
from moas.diffusion.sampling import SAMPLERS, guided, make_sampler, sample
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler


@pytest.mark.parametrize("pred", ["v_prediction", "epsilon"])
def test_targets_invert(pred):
    cfg = DiffusionConfig(prediction_type=pred)
    ns = NoiseSchedule(make_train_scheduler(cfg), pred, 5.0)
    x0, noise = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    # ε-prediction divides by α_t, which vanishes at the last step, so it is checked where α_t is not tiny.
    t = torch.tensor([0, 10, 200, 500, 900, 999 if pred == "v_prediction" else 950])
    x_t = ns.add_noise(x0, noise, t)
    assert torch.allclose(ns.predict_x0(x_t, ns.target(x0, noise, t), t), x0, atol=1e-4)


def test_min_snr_weights():
    ns = NoiseSchedule(make_train_scheduler(DiffusionConfig()), "v_prediction", 5.0)
    t = torch.arange(0, 1000, 37)
    w = ns.loss_weight(t)
    snr = ns.snr[t]
    assert torch.allclose(w, snr.clamp(max=5.0) / (snr + 1))
    assert w.max() <= 5 / 6 + 1e-6  # capped where SNR > γ
    eps = NoiseSchedule(make_train_scheduler(DiffusionConfig(prediction_type="epsilon")), "epsilon", 5.0)
    assert torch.allclose(eps.loss_weight(t), snr.clamp(max=5.0) / snr)
    assert torch.equal(
        NoiseSchedule(make_train_scheduler(DiffusionConfig()), "v_prediction", 0.0).loss_weight(t),
        torch.ones(len(t)),
    )


def _oracle(ns, target_img):
    """The exact denoiser for data that is always ``target_img``: it knows x0, so v = (α x_t − x0)/σ."""

    def fn(x, t):
        a, s = ns._at("alpha", t), ns._at("sigma", t)
        return (a * x - target_img) / s

    return fn


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_reach_the_data_point(name):
    cfg = DiffusionConfig()
    train_sched = make_train_scheduler(cfg)
    ns = NoiseSchedule(train_sched, cfg.prediction_type, 0)
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)
    out = sample(
        _oracle(ns, target),
        make_sampler(name, dict(train_sched.config)),
        [1, 2],
        (3, 8, 8),
        25,
        1.0,
        torch.device("cpu"),
    )
    assert out.shape == (2, 3, 8, 8)
    assert (out - target).abs().max() < 0.05


@pytest.mark.parametrize("name", ["dpmsolver++", "euler_a"])
def test_same_seed_same_image_regardless_of_batch(name):
    cfg = DiffusionConfig()
    train_sched = make_train_scheduler(cfg)

    def fn(x, t):  # a fixed, input-dependent (imperfect) denoiser
        return 0.5 * x + 0.001 * t.view(-1, 1, 1, 1)

    alone = sample(
        fn, make_sampler(name, dict(train_sched.config)), [7], (3, 8, 8), 8, 1.0, torch.device("cpu")
    )
    batch = sample(
        fn, make_sampler(name, dict(train_sched.config)), [3, 7, 9], (3, 8, 8), 8, 1.0, torch.device("cpu")
    )
    assert torch.allclose(alone[0], batch[1], atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_classifier_free_guidance_formula():
    calls = []

    def denoise(x, t, text):
        calls.append(x.shape[0])
        return text["tokens"].view(-1, 1, 1, 1).expand_as(x)

    cond, uncond = {"tokens": torch.tensor([2.0, 3.0])}, {"tokens": torch.tensor([1.0, 1.0])}
    fn = guided(denoise, cond, uncond, 4.0)
    out = fn(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    assert calls == [4]  # one batched pass for both sides
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([1 + 4 * (2 - 1), 1 + 4 * (3 - 1)]).float())
    assert (
        guided(denoise, cond, uncond, 1.0)(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))[
            1, 0, 0, 0
        ]
        == 3.0
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_image_to_image_starts_at_the_schedules_noise_level(name, strength):
    """From an all-zero init image, the first network input at the first timestep run holds only noise of
    the training schedule's level there, whatever the sampler's internal scaling; round(s·steps) steps run."""
    cfg = DiffusionConfig()
    train_sched = make_train_scheduler(cfg)
    calls = []

    def fn(x, t):
        calls.append((x.clone(), int(t[0])))
        return torch.zeros_like(x)

    init = torch.zeros(1, 3, 64, 64)
    sample(fn, make_sampler(name, dict(train_sched.config)), [5], (3, 64, 64), 10, 1.0, torch.device("cpu"),
           init=init, strength=strength)  # fmt: skip
    assert len(calls) == round(10 * strength)
    x0, t0 = calls[0]
    level = (1 - train_sched.alphas_cumprod[t0]).sqrt()
    assert x0.std().item() == pytest.approx(level.item(), rel=0.05)


def test_image_to_image_strength_bounds():
    train_sched = make_train_scheduler(DiffusionConfig())
    init = torch.rand(2, 3, 8, 8) * 2 - 1

    def fn(x, t):
        return 0.5 * x

    def run(strength, init=init):
        return sample(fn, make_sampler("ddim", dict(train_sched.config)), [1, 2], (3, 8, 8), 6, 1.0,
                      torch.device("cpu"), init=init, strength=strength)  # fmt: skip

    assert torch.equal(run(0.0), init)  # nothing runs: the input comes back
    assert torch.equal(run(1.0), run(1.0, None))  # strength 1 ignores the init: text-to-image
