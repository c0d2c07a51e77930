"""The pipeline's settings and records: notebook settings from the environment, JSON without NaN."""

import json
import math

import pytest

from helpers.pipeline import RunSettings, SettingsError, save_json


def test_notebook_settings_come_from_defaults_then_the_environment():
    env = {"CIFAR_EPOCHS": "3", "CIFAR_RESUME": "0", "CIFAR_MAX_LR": "0.02", "CIFAR_OUT": "x/{recipe}",
           "CIFAR_DATA_DIR": " ", "CIFAR_UNRELATED": "1"}
    settings = RunSettings.from_env("s10", env, data_dir="data", download=True)
    assert (settings.epochs, settings.resume, settings.max_lr, settings.download) == (3, False, 0.02, True)
    assert settings.data_dir == "data" and str(settings.out_dir) == "x/s10"  # blank values are unset
    assert not settings.is_full_run and RunSettings.from_env("s10", {}).is_full_run


@pytest.mark.parametrize("env, message", [
    ({"CIFAR_EPOCHS": "two"}, "CIFAR_EPOCHS='two' is not a valid int"),
    ({"CIFAR_RESUME": "maybe"}, "CIFAR_RESUME='maybe' is not a valid bool"),
    ({"CIFAR_MAX_LR": "-1"}, "max_lr must be a positive finite number"),
])
def test_bad_environment_values_are_one_line_errors(env, message):
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_env("s10", env)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    save_json(tmp_path / "m.json", {"loss": math.nan, "rows": [{"acc": math.inf}, 0.5]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": None, "rows": [{"acc": None}, 0.5]}
