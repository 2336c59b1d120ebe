import pytest

from moas import config_sections
from moas.config import MoasConfig, load_config, read_toml
from moas.config_sections import machine_budgets
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
    assert rtx.resources.max_vram_gb == 11.4
    assert rtx.resources.from_machine == ("max_ram_gb", "cpu_threads", "loader_workers")


def test_budgets_follow_the_machine_found():
    assert machine_budgets(16, 12) == {
        "max_ram_gb": 14.4,
        "cpu_threads": 12,
        "loader_workers": 8,
    }  # the 3060's
    assert machine_budgets(128, 16) == {"max_ram_gb": 115.2, "cpu_threads": 16, "loader_workers": 8}
    assert machine_budgets(24, 2) == {"max_ram_gb": 21.6, "cpu_threads": 2, "loader_workers": 0}
    assert machine_budgets(3, 1) == {"max_ram_gb": 1.5, "cpu_threads": 1, "loader_workers": 0}


def test_auto_budgets_are_sized_when_the_config_is_made_and_a_number_pins_one(monkeypatch):
    monkeypatch.setattr(config_sections, "this_machine", lambda: (128.0, 16))  # an 80-GB card's server
    rc = load_config("rtx3060_12gb", use_env=False).resources
    assert (rc.max_ram_gb, rc.cpu_threads, rc.loader_workers) == (115.2, 16, 8)
    assert "sized to this machine" in rc.describe()
    assert load_config("rtx3060_12gb", use_env=False).to_dict()["resources"]["max_ram_gb"] == 115.2
    tiny = load_config("cpu_tiny", use_env=False, overrides={"resources": {"max_ram_gb": 6}}).resources
    assert (tiny.max_ram_gb, tiny.cpu_threads, tiny.loader_workers) == (6.0, 16, 0)
    assert tiny.from_machine == ("cpu_threads",)
    monkeypatch.setenv("MOAS_RESOURCES_CPU_THREADS", "3")
    assert load_config("cpu_tiny").resources.cpu_threads == 3
    with pytest.raises(ConfigError, match='resources.max_ram_gb must be a number or "auto"'):
        load_config("cpu_tiny", use_env=False, overrides={"resources": {"max_ram_gb": "lots"}})


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
