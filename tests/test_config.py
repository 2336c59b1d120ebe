import pytest

from moas.config import MoasConfig, load_config, read_toml
from moas.errors import ConfigError


def test_profiles_load_and_validate(workdir):
    for name in ("cpu_tiny", "rtx3060_12gb", "original"):
        cfg = load_config(name)
        assert cfg.profile == name
    orig = load_config("original")
    assert orig.train.lr == 5e-6
    assert orig.train.betas == [0.9, 0.999]
    assert orig.train.weight_decay == 1e-5 and orig.train.amsgrad
    assert (
        orig.train.warmup_fraction == 0.17
        and orig.train.restart_fraction == 0.25
        and orig.train.restart_mult == 2
    )
    assert orig.train.max_grad_norm == 0.5 and orig.train.loss_clamp == 50.0 and orig.train.keep_last == 30
    rtx = load_config("rtx3060_12gb")
    assert (rtx.resources.max_ram_gb, rtx.resources.max_vram_gb) == (14.4, 11.4)
    assert (rtx.resources.cpu_threads, rtx.resources.loader_workers) == (10, 8)


def test_precedence_profile_file_env_flags(workdir, monkeypatch):
    user = workdir / "user.toml"
    user.write_text("[train]\nlr = 0.002\nepochs = 7\n")
    monkeypatch.setenv("MOAS_TRAIN_EPOCHS", "9")
    monkeypatch.setenv("MOAS_DATA_RESOLUTION", "48")
    cfg = load_config("cpu_tiny", user, {"data": {"resolution": 64}})
    assert cfg.train.lr == 0.002  # file beats profile
    assert cfg.train.epochs == 9  # env beats file
    assert cfg.data.resolution == 64  # flag beats env


def test_dotenv_file_is_read(workdir, monkeypatch):
    (workdir / ".env").write_text("MOAS_TRAIN_BATCH_SIZE=5\nMOAS_PROFILE=original\n")
    for name in ("MOAS_PROFILE", "MOAS_TRAIN_BATCH_SIZE"):
        # Recorded as absent, so the teardown removes what the .env file puts into the environment (a
        # delenv of an absent variable records nothing, and the profile leaked into later tests).
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    cfg = load_config()
    assert cfg.train.batch_size == 5 and cfg.profile == "original"


@pytest.mark.parametrize(
    "override, words",
    [
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"data": {"resolution": 30}}, "multiple of 8"),
        ({"diffusion": {"prediction_type": "x0"}}, "prediction_type"),
        ({"train": {"bogus": 1}}, "Unknown config key train.bogus"),
        ({"sample": {"sampler": "heun"}}, "sample.sampler"),
    ],
)
def test_bad_values_are_one_sentence(workdir, override, words):
    with pytest.raises(ConfigError, match=words):
        load_config("cpu_tiny", overrides=override)


def test_unknown_profile_and_bad_env(workdir, monkeypatch):
    with pytest.raises(ConfigError, match="Unknown profile 'nope'; known profiles: .*cpu_tiny"):
        load_config("nope")
    monkeypatch.setenv("MOAS_TRAIN_LR", "fast")
    with pytest.raises(ConfigError, match="MOAS_TRAIN_LR"):
        load_config("cpu_tiny")


def test_toml_round_trip(workdir):
    cfg = load_config("rtx3060_12gb")
    path = workdir / "out.toml"
    path.write_text(cfg.to_toml())
    assert MoasConfig.from_dict(read_toml(path)) == cfg


def test_a_much_smaller_batch_at_the_profiles_lr_is_warned(workdir):
    from moas.config import lr_batch_warning

    def cfg(**train):
        return load_config("cpu_tiny", overrides={"train": train} if train else None, use_env=False)

    assert lr_batch_warning(cfg()) is None
    assert lr_batch_warning(cfg(batch_size=8, grad_accum_steps=2)) is None  # same effective batch
    assert lr_batch_warning(cfg(batch_size=12)) is None  # not half the profile's
    text = lr_batch_warning(cfg(batch_size=8))
    assert "effective batch is 8" in text and "cpu_tiny profile's 16" in text and "--lr 0.00035" in text
    assert lr_batch_warning(cfg(batch_size=8, lr=3.5e-4)) is None  # the user scaled it
