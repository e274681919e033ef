import dataclasses
import math

import pytest
import torch
from conftest import ROOT

from charrnn.config import ModelConfig, TrainConfig, build, load_toml, parse_duration, to_toml
from charrnn.errors import UsageError

PRESETS = sorted((ROOT / "configs").glob("*.toml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"tiny", "shakespeare", "char-rnn", "large", "gru", "rnn", "peephole", "layernorm"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_has_a_header_comment(path):
    model, train = load_toml(path)
    build(ModelConfig, model)
    build(TrainConfig, train)
    assert path.read_text().startswith("# ")


def test_layers_override_in_order():
    config = build(TrainConfig, {"batch_size": 8, "seq_len": 20}, {"batch_size": 16, "seq_len": None})
    assert (config.batch_size, config.seq_len) == (16, 20)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(UsageError, match="valid keys: .*hidden_size"):
        build(ModelConfig, {"hiden_size": 3})


def test_wrong_type_and_range():
    with pytest.raises(UsageError, match="hidden_size must be int"):
        build(ModelConfig, {"hidden_size": "big"})
    with pytest.raises(UsageError, match="--dropout"):
        build(ModelConfig, {"dropout": 1.5})
    assert build(TrainConfig, {"learning_rate": 1}).learning_rate == 1.0


def test_resolved_config_round_trips_through_toml(tmp_path):
    model = ModelConfig(cell="gru", hidden_size=77)
    train = TrainConfig(time="1h30m", stateless=True, learning_rate=3e-4)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(model, train))
    m, t = load_toml(path)
    assert build(ModelConfig, m) == model and build(TrainConfig, t) == train


@pytest.mark.parametrize("text, seconds", [("", 0), ("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400),
                                           ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten", "10x", "m10", "10m5"])
def test_bad_durations(text):
    with pytest.raises(UsageError, match="duration"):
        parse_duration(text)


def test_default_stop_is_ten_epochs_only_without_another_limit():
    assert TrainConfig().with_default_stop().epochs == 10
    assert TrainConfig(time="5m").with_default_stop().epochs == 0
    assert dataclasses.replace(TrainConfig(), steps=5).with_default_stop().epochs == 0


@pytest.mark.parametrize("text", ["-5", "-1", "0", "0s", "nan", "inf", "-inf", "1e400", "5x", "m", "-1m"])
def test_every_duration_must_be_positive_and_finite(text):
    with pytest.raises(UsageError, match=r"90s, 10m or 1h30m") as caught:
        build(TrainConfig, {"time": text})
    assert "--time" in str(caught.value)


@pytest.mark.parametrize("text,seconds", [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0),
                                          ("0.5s", 0.5), ("", 0.0)])
def test_accepted_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_a_duration_in_toml_is_checked_like_the_flag(tmp_path):
    for value in ("-5", "0", "nan", "inf"):
        path = tmp_path / "c.toml"
        path.write_text(f"[train]\ntime = {value}\n")
        _, train = load_toml(path)
        with pytest.raises(UsageError, match="positive, finite duration"):
            build(TrainConfig, train)


@pytest.mark.parametrize("cls,key", [(TrainConfig, "learning_rate"), (TrainConfig, "epochs"),
                                     (TrainConfig, "grad_clip"), (TrainConfig, "ema_decay"), (TrainConfig, "beta2"),
                                     (ModelConfig, "dropout"), (ModelConfig, "forget_bias")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_float_setting_takes_nan_or_infinity(cls, key, value):
    with pytest.raises(UsageError, match=f"{key} must be a finite number"):
        build(cls, {key: value})


@pytest.mark.parametrize("cls,key,value", [(TrainConfig, "seed", 10**30), (TrainConfig, "seed", -1),
                                           (ModelConfig, "hidden_size", 10**9), (ModelConfig, "embedding_size", 0),
                                           (ModelConfig, "num_layers", 1000), (TrainConfig, "batch_size", 10**11),
                                           (TrainConfig, "seq_len", 10**11), (TrainConfig, "steps", 10**23),
                                           (TrainConfig, "eval_every", 2**63), (TrainConfig, "warmup_steps", 2**63),
                                           (TrainConfig, "sample_length", 10**11), (TrainConfig, "learning_rate", 1e300),
                                           (ModelConfig, "forget_bias", 1e300), (TrainConfig, "beta2", 1.0),
                                           (TrainConfig, "beta2", -0.1)])
def test_integers_out_of_range_are_usage_errors(cls, key, value):
    with pytest.raises(UsageError, match=f"{key} must be"):
        build(cls, {key: value})


@pytest.mark.parametrize("forced, expected", [("1", torch.bfloat16), ("0", None)])
def test_the_bf16_host_switch_decides_auto_as_on_such_a_cpu(monkeypatch, forced, expected):
    """CHARRNN_CPU_BF16=1 makes --dtype auto pick bf16 on any CPU, =0 fp32 on any CPU, so
    both paths run in the suite whatever the machine (this one may have AVX512_BF16 or not)."""
    from charrnn.device import cpu_has_fast_bf16, resolve_dtype

    monkeypatch.setenv("CHARRNN_CPU_BF16", forced)
    assert cpu_has_fast_bf16() is (forced == "1")
    dtype, reason = resolve_dtype("auto", torch.device("cpu"))
    assert dtype == expected and reason


def test_the_bf16_host_switch_keeps_lstm_paths_fp32_where_onednn_cannot_run_them(monkeypatch):
    """CHARRNN_CPU_BF16=1 on a CPU whose oneDNN lacks the bf16 LSTM (no AVX-512): the
    paths that run nn.LSTM (training, scoring) stay fp32 and say why; the decoder's own
    kernels take bf16, as on a bf16 host."""
    from charrnn import device

    monkeypatch.setenv("CHARRNN_CPU_BF16", "1")
    monkeypatch.setattr(device, "cpu_runs_bf16_lstm", lambda: False)
    dtype, reason = device.resolve_dtype("auto", torch.device("cpu"), lstm=True)
    assert dtype is None and "cannot run the bf16 LSTM" in reason and "CHARRNN_CPU_BF16" in reason
    assert device.resolve_dtype("auto", torch.device("cpu"), lstm=False)[0] == torch.bfloat16
    monkeypatch.setattr(device, "cpu_runs_bf16_lstm", lambda: True)
    assert device.resolve_dtype("auto", torch.device("cpu"), lstm=True)[0] == torch.bfloat16
