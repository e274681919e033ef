"""Defaults that fit the corpus and the budget (charrnn.training.sizing) and how train uses them."""

import json

import pytest
import torch
from conftest import VERSE, corpus_of, run_cli, tiny_configs

from charrnn.config import ModelConfig, TrainConfig, parse_duration
from charrnn.model.network import CharRNN, count_parameters
from charrnn.store import checkpoint
from charrnn.training import sizing

CPU = torch.device("cpu")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole", "layernorm"])
def test_parameter_count_matches_the_model(cell):
    config = ModelConfig(cell=cell, hidden_size=48, num_layers=3, embedding_size=16)
    assert sizing.parameters(config, 70) == count_parameters(CharRNN(config, 70)) - CharRNN(config, 70).start_state.numel()


def _choose(train_chars, **train):
    return sizing.choose(ModelConfig(), TrainConfig(**train), train_chars, 100, CPU, None, probe=False)


def test_a_short_budget_on_a_big_text_gets_a_smaller_less_regularised_model():
    big_short = _choose(30_000_000, time="2m")
    small_long = _choose(1_000_000, time="1h")
    assert big_short.hidden_size < small_long.hidden_size
    assert big_short.dropout == 0.0 < small_long.dropout
    assert big_short.epochs < 1 < small_long.epochs


def test_a_given_width_gets_the_dropout_of_its_own_passes():
    # `--hidden-size 256` alone once got the dropout of the 2x384 the sizing would have
    # chosen (8.9 passes, 0.1), though 2x256 reads ~17 passes in the same 10 minutes.
    train = TrainConfig(time="10m")
    auto = sizing.choose(ModelConfig(), train, 1_000_000, 100, CPU, None, probe=False)
    given = sizing.choose(ModelConfig(hidden_size=128), train, 1_000_000, 100, CPU, None, probe=False, widths=(128,))
    assert given.hidden_size == 128 < auto.hidden_size
    assert given.epochs > auto.epochs and given.dropout > auto.dropout
    assert given.dropout == sizing.dropout_for(given.epochs)


def test_the_trainer_sizes_a_given_width_alone(tmp_path, monkeypatch):
    from charrnn.training.run import trainer_for

    seen = []
    choose = sizing.choose
    monkeypatch.setattr(sizing, "choose", lambda *a, **k: seen.append(k["widths"]) or choose(*a, **{**k, "probe": False}))
    model_config, train_config = tiny_configs(model={"hidden_size": 24}, train={"time": "10m"})
    given = trainer_for(corpus_of(VERSE * 50), model_config, train_config, tmp_path / "given", auto=("dropout",))
    chosen = trainer_for(corpus_of(VERSE * 50), model_config, train_config, tmp_path / "chosen", auto=("hidden_size", "dropout"))
    assert seen == [(24,), sizing.WIDTHS]
    assert given.plan.model_config.hidden_size == 24 and chosen.plan.model_config.hidden_size in sizing.WIDTHS


def test_the_width_is_the_widest_that_reads_enough_characters_per_parameter():
    choice = _choose(5_000_000, steps=2000, batch_size=64, seq_len=128)
    chars = 2000 * 64 * 128
    assert choice.chars == chars
    fits = [h for h in sizing.WIDTHS
            if chars >= sizing.chars_per_parameter(chars) * sizing.parameters(ModelConfig(hidden_size=h), 100)]
    assert choice.hidden_size == max(fits)


def test_dropout_grows_with_the_passes_over_the_text():
    assert sizing.dropout_for(0.5) == sizing.dropout_for(3.0) == 0.0
    assert 0.0 < sizing.dropout_for(5.0) < sizing.dropout_for(9.0) < sizing.MAX_DROPOUT
    # ~9 passes (Tiny Shakespeare in 5 or 10 CPU minutes): 0.1 measured best of 0 / 0.1 / 0.2
    assert abs(sizing.dropout_for(9.0) - 0.1) <= 0.02
    assert sizing.dropout_for(50.0) == sizing.MAX_DROPOUT


def test_weight_decay_grows_with_the_passes_over_the_text():
    # ~4.5 passes (2x192, Tiny Shakespeare, 2,800 steps): 0.01 measured best of 0.01 / 0.1 / 0.2
    assert sizing.weight_decay_for(0.5) == sizing.weight_decay_for(4.5) == sizing.MIN_WEIGHT_DECAY == TrainConfig().weight_decay
    assert sizing.MIN_WEIGHT_DECAY < sizing.weight_decay_for(5.0) < sizing.weight_decay_for(6.5) < sizing.MAX_WEIGHT_DECAY
    # ~8 passes (Tiny Shakespeare in 10 CPU minutes): 0.2 measured best of 0.01 / 0.1 / 0.2 / 0.4
    assert sizing.weight_decay_for(7.0) == sizing.weight_decay_for(30.0) == sizing.MAX_WEIGHT_DECAY == 0.2
    long, short = _choose(1_000_000, time="1h"), _choose(30_000_000, time="2m")
    assert long.weight_decay == sizing.weight_decay_for(long.epochs, long.steps) > short.weight_decay == sizing.MIN_WEIGHT_DECAY


def test_a_long_run_gets_the_weight_decay_however_few_its_passes():
    # Python source, 20 CPU minutes, 2x384: ~9,800 steps over 3.5 passes; decay 0.2 read
    # 0.9622 against 0.01's 0.9882. Short runs keep 0.01 (2,800 and ~3,700 steps measured).
    assert sizing.weight_decay_for(3.5, 9_800) == sizing.MAX_WEIGHT_DECAY
    assert sizing.weight_decay_for(2.0, 3_700) == sizing.weight_decay_for(4.5, 2_800) == sizing.MIN_WEIGHT_DECAY
    assert sizing.weight_decay_for(0.5, 5_500) == sizing.MIN_WEIGHT_DECAY < sizing.weight_decay_for(0.5, 7_000)
    for epochs in (1, 5, 6, 8):  # whichever ramp is higher
        for steps in (0, 6_000, 20_000):
            assert sizing.weight_decay_for(epochs, steps) == max(sizing.weight_decay_for(epochs),
                                                                  sizing.weight_decay_for(0, steps))
    # the choice counts the steps its budget buys at the batch: a big text, an hour, 16 x 100
    choice = _choose(100_000_000, time="1h", batch_size=16)
    assert choice.epochs < 1 and choice.steps == pytest.approx(choice.chars / 1600)
    assert choice.steps > 9_000 and choice.weight_decay == sizing.MAX_WEIGHT_DECAY
    assert _choose(100_000_000, time="5m", batch_size=16).weight_decay == sizing.MIN_WEIGHT_DECAY


def test_the_peak_learning_rate_grows_with_the_passes_over_the_text():
    library = TrainConfig().learning_rate
    # Python source in 5 CPU minutes (2 passes): 3e-3 read 1.0505, 7e-3 1.0759
    assert sizing.learning_rate_for(0.1) == sizing.learning_rate_for(3.0) == library == 3e-3
    # Tiny Shakespeare in 5 (9 passes): 3e-3 1.4535, 7e-3 1.4432; pydocs in 2 (7.8): 1.1124, 1.0799
    assert sizing.learning_rate_for(8.0) == sizing.learning_rate_for(100.0) == 2 * library
    rates = [sizing.learning_rate_for(epochs) for epochs in (0, 2, 3, 4, 5.5, 7, 8, 9, 30)]
    assert rates == sorted(rates) and library < sizing.learning_rate_for(5.5) < 2 * library
    # a small text in an hour gets the higher rate, a big one in two minutes the library's
    long, short = _choose(1_000_000, time="1h"), _choose(30_000_000, time="2m")
    assert long.learning_rate == 2 * library and short.learning_rate == library


def test_the_rule_s_rate_is_the_rate_the_size_line_prints():
    # two significant figures, so `peak rate 0.0055` on the size line is the rate the run uses
    for epochs in [3 + k / 7 for k in range(40)]:
        rate = sizing.learning_rate_for(epochs)
        assert float(f"{rate:g}") == rate and len(f"{rate:g}") <= len("0.0055")


def test_the_trainer_takes_the_chosen_learning_rate_and_a_given_one_wins(tmp_path, monkeypatch):
    from charrnn.training.run import trainer_for

    monkeypatch.setattr(sizing, "choose", lambda *a, **k: sizing.Choice(24, 0.0, 1e6, 12.0, None, 0.0))
    model_config, train_config = tiny_configs(train={"learning_rate": 1e-3, "warmup_steps": 0})
    chosen = trainer_for(corpus_of(VERSE * 50), model_config, train_config, tmp_path / "chosen", auto=("learning_rate",))
    given = trainer_for(corpus_of(VERSE * 50), model_config, train_config, tmp_path / "given", auto=("dropout",))
    assert chosen.config.learning_rate == 6e-3 and given.config.learning_rate == 1e-3
    assert chosen.state.optimizer.param_groups[0]["lr"] == 6e-3 and given.state.optimizer.param_groups[0]["lr"] == 1e-3


def test_the_trainer_takes_the_chosen_weight_decay_and_a_given_one_wins(tmp_path, monkeypatch):
    from charrnn.training.run import trainer_for

    monkeypatch.setattr(sizing, "choose", lambda *a, **k: sizing.Choice(24, 0.0, 1e6, 12.0, None, 0.0))
    model_config, train_config = tiny_configs(train={"weight_decay": 0.07})
    chosen = trainer_for(corpus_of(VERSE * 50), model_config, train_config, tmp_path / "chosen", auto=("weight_decay",))
    given = trainer_for(corpus_of(VERSE * 50), model_config, train_config, tmp_path / "given", auto=("dropout",))
    assert chosen.config.weight_decay == chosen.state.optimizer.param_groups[0]["weight_decay"] == 0.2
    assert given.config.weight_decay == given.state.optimizer.param_groups[0]["weight_decay"] == 0.07
    assert chosen.plan.model_config.hidden_size == given.plan.model_config.hidden_size == model_config.hidden_size


def test_the_probe_leaves_the_random_streams_as_they_were():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    rate = sizing.probe_speed(ModelConfig(hidden_size=16, embedding_size=8), TrainConfig(batch_size=2, seq_len=8),
                              30, CPU, None, chars=16)
    assert rate > 0 and torch.equal(torch.rand(3), expected)


def test_train_chooses_what_no_flag_set_says_why_and_resume_keeps_it(tmp_path):
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 200, encoding="utf-8")
    out = tmp_path / "run"
    done = run_cli("train", corpus, "--out", out, "--steps", "3", "--batch-size", "4", "--seq-len", "16",
                   "--dropout", "0.05", "--sample-length", "0")
    assert done.returncode == 0, done.stderr
    size_lines = [line for line in done.stderr.splitlines() if line.startswith("size: ")]
    assert len(size_lines) == 1 and "auto" in size_lines[0] and "--hidden-size" in size_lines[0]
    assert "--weight-decay" in size_lines[0] and "--dropout" not in size_lines[0]  # given, so not chosen
    assert "--learning-rate" in size_lines[0] and "peak rate" in size_lines[0]
    payload = checkpoint.load(out / "last.pt")
    saved, decay = payload.model_config, payload.train_config["weight_decay"]
    expected = _choose(len(VERSE * 200) * 9 // 10, steps=3, batch_size=4, seq_len=16)
    assert saved["hidden_size"] == expected.hidden_size and saved["dropout"] == 0.05
    assert decay == expected.weight_decay == payload.optimizer["param_groups"][0]["weight_decay"]
    assert payload.train_config["learning_rate"] == expected.learning_rate
    resumed = run_cli("train", "--resume", out, "--steps", "5")
    assert resumed.returncode == 0, resumed.stderr
    assert "size: " not in resumed.stderr
    payload = checkpoint.load(out / "last.pt")
    assert payload.model_config == saved and payload.train_config["weight_decay"] == decay
    assert payload.train_config["learning_rate"] == expected.learning_rate


def test_an_explicit_width_is_not_chosen(tmp_path):
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 50, encoding="utf-8")
    done = run_cli("train", corpus, "--out", tmp_path / "run", "--steps", "2", "--batch-size", "4", "--seq-len", "16",
                   "--hidden-size", "24", "--dropout", "0", "--weight-decay", "0.05", "--sample-length", "0")
    assert done.returncode == 0, done.stderr
    size = [line for line in done.stderr.splitlines() if line.startswith("size: ")]
    assert "2x24 lstm" in done.stderr and not any(flag in size[0] for flag in ("--hidden-size", "--dropout ", "--weight-decay"))
    assert checkpoint.load(tmp_path / "run" / "last.pt").train_config["weight_decay"] == 0.05


def test_a_config_files_width_dropout_and_batch_are_not_chosen(tmp_path):
    # The CLI passes every flag, None where not given: None must not hide the file's value.
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 50, encoding="utf-8")
    preset = tmp_path / "preset.toml"
    preset.write_text('[model]\nhidden_size = 24\ndropout = 0.05\n\n[train]\nbatch_size = 4\nseq_len = 16\nweight_decay = 0.3\n')
    done = run_cli("train", corpus, "--config", preset, "--out", tmp_path / "run", "--steps", "2", "--sample-length", "0")
    assert done.returncode == 0, done.stderr
    size = [line for line in done.stderr.splitlines() if line.startswith("size: ")]
    assert "2x24 lstm, dropout 0.05" in done.stderr
    assert not any(flag in size[0] for flag in ("--hidden-size", "--dropout ", "--weight-decay", "--batch-size"))
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    assert (saved.model_config["hidden_size"], saved.model_config["dropout"]) == (24, 0.05)
    assert (saved.train_config["batch_size"], saved.train_config["eval_every"]) == (4, 3200)  # follows the batch
    assert saved.train_config["weight_decay"] == 0.3
    flag = run_cli("train", corpus, "--config", preset, "--hidden-size", "16", "--out", tmp_path / "flag", "--steps", "1",
                   "--sample-length", "0")
    assert flag.returncode == 0 and "2x16 lstm, dropout 0.05" in flag.stderr  # a flag wins over the file


def test_the_batch_is_chosen_for_the_device_unless_given_and_resume_keeps_it(tmp_path):
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 50, encoding="utf-8")
    common = ("--steps", "2", "--seq-len", "16", "--hidden-size", "24", "--dropout", "0", "--weight-decay", "0.01",
              "--weight-drop", "0", "--ema-decay", "0", "--learning-rate", "3e-3", "--sample-length", "0")
    settings = {}
    for name, extra in {"auto": (), "given": ("--batch-size", "4"), "interval": ("--eval-every", "5")}.items():
        done = run_cli("train", corpus, "--out", tmp_path / name, *common, *extra)
        assert done.returncode == 0, done.stderr
        size = [line for line in done.stderr.splitlines() if line.startswith("size: ")]
        settings[name] = (size, checkpoint.load(tmp_path / name / "last.pt").train_config)
    size, config = settings["auto"]
    assert len(size) == 1 and size[0].startswith("size: batch 16 (auto: on a CPU") and "--batch-size" in size[0]
    assert (config["batch_size"], config["eval_every"]) == (16, 800)  # 12,800 sequences between validations
    assert "batch_size = 16" in (tmp_path / "auto" / "config.toml").read_text()
    size, config = settings["given"]
    assert size == [] and (config["batch_size"], config["eval_every"]) == (4, 3200)  # a given batch: 12,800 too
    size, config = settings["interval"]
    assert len(size) == 1 and (config["batch_size"], config["eval_every"]) == (16, 5)
    resumed = run_cli("train", "--resume", tmp_path / "auto", "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "size: " not in resumed.stderr and "batches of 16x16" in resumed.stderr
    assert checkpoint.load(tmp_path / "auto" / "last.pt").train_config["batch_size"] == 16


def test_batch_for_the_device():
    assert sizing.batch_for(CPU)[0] == 16
    assert sizing.batch_for(CPU, ranks=3)[0] == 48  # 16 per CPU rank, so any number of ranks divides it
    for cell in ("gru", "rnn", "layernorm", "peephole"):  # they run a batch of 16 at ~2/3 the speed of 64
        assert sizing.batch_for(CPU, cell)[0] == 64
    assert sizing.batch_for(CPU, "gru", ranks=2)[0] == 128
    assert sizing.batch_for(torch.device("cuda"))[0] == TrainConfig().batch_size == 64
    assert sizing.batch_for(torch.device("cuda"), ranks=3)[0] == 66  # the ranks must divide it


def test_the_reason_says_when_the_budget_not_the_text_limits_what_is_read():
    """A corpus of billions of characters is read in part: the size line says so."""
    big = sizing.Choice(hidden_size=512, dropout=0.0, chars=30e6, epochs=30e6 / 9e9, chars_per_s=None, probe_s=0.0)
    small = sizing.Choice(hidden_size=512, dropout=0.0, chars=30e6, epochs=3.0, chars_per_s=None, probe_s=0.0)
    assert "the budget, not the text, limits what is read: 0.3% of it" in big.reason(int(9e9), "20m")
    assert "limits what is read" not in small.reason(int(10e6), "20m")


# Probes as another machine's figures (chars/s by width): sizing.choose takes them as input.
def _cpu_like(hidden):  # this project's 2-core CPU, measured (bf16, batch 16): 31k at 256, 10.5k at 512, 1.9k at 1024
    return 31_000.0 * (256 / hidden) ** (1.56 if hidden <= 512 else 2.0)


def _gpu_like(hidden):  # one H200, latency-bound: a wider layer costs little (bf16, batch 64)
    return 400_000.0 * (256 / hidden) ** 0.3


BUDGETS = ("1m", "2m", "5m", "10m", "20m", "1h", "3h", "12h")
TEXTS = (100_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000)


def _timed(train_chars, budget, speed_of, **train):
    return sizing.choose(ModelConfig(), TrainConfig(time=budget, **train), train_chars, 100, CPU, None,
                         speed_of=speed_of)


@pytest.mark.parametrize("speed_of", [_cpu_like, _gpu_like], ids=["cpu-probe", "gpu-probe"])
def test_more_time_never_picks_a_smaller_model(speed_of):
    for text in TEXTS:
        widths = [_timed(text, budget, speed_of).hidden_size for budget in BUDGETS]
        assert widths == sorted(widths), (text, widths)
    # and the range is used: a minute picks a small model, half a day a big one
    assert _timed(10_000_000, "1m", speed_of).hidden_size < _timed(10_000_000, "12h", speed_of).hidden_size


@pytest.mark.parametrize("speed_of", [_cpu_like, _gpu_like], ids=["cpu-probe", "gpu-probe"])
def test_more_text_never_makes_more_passes_or_a_smaller_model(speed_of):
    for budget in BUDGETS:
        choices = [_timed(text, budget, speed_of) for text in TEXTS]
        passes = [c.epochs for c in choices]
        assert passes == sorted(passes, reverse=True), (budget, passes)
        widths = [c.hidden_size for c in choices]
        assert widths == sorted(widths), (budget, widths)
        regularisation = [(c.dropout, c.weight_decay, c.learning_rate) for c in choices]
        assert regularisation == sorted(regularisation, reverse=True), (budget, regularisation)


@pytest.mark.parametrize("speed_of", [_cpu_like, _gpu_like], ids=["cpu-probe", "gpu-probe"])
def test_the_chosen_width_is_the_widest_the_rule_allows_on_any_probe(speed_of):
    """The same rule on a GPU's figures as on a CPU's: each choice reads at least
    K(chars) characters per parameter, and the next width up would not."""
    for text in TEXTS[1:4]:
        for budget in BUDGETS:
            choice = _timed(text, budget, speed_of)
            params = sizing.parameters(ModelConfig(hidden_size=choice.hidden_size), 100)
            assert choice.chars == pytest.approx(speed_of(choice.hidden_size) * parse_duration(budget) * 0.9, rel=1e-3)
            if choice.hidden_size != sizing.WIDTHS[0]:
                assert choice.chars >= sizing.chars_per_parameter(choice.chars) * params
            if choice.hidden_size != sizing.WIDTHS[-1]:
                wider = sizing.WIDTHS[sizing.WIDTHS.index(choice.hidden_size) + 1]
                chars = speed_of(wider) * parse_duration(budget) * 0.9
                assert chars < sizing.chars_per_parameter(chars) * sizing.parameters(ModelConfig(hidden_size=wider), 100)


def test_a_gpu_probe_picks_wider_models_than_a_cpu_probe_in_the_same_budget():
    for budget in ("5m", "20m", "1h"):
        cpu, gpu = _timed(3_000_000, budget, _cpu_like), _timed(3_000_000, budget, _gpu_like)
        assert gpu.hidden_size > cpu.hidden_size and gpu.chars > cpu.chars


def test_a_width_above_512_is_timed_itself_only_when_the_budget_reaches_it(monkeypatch):
    """Past 512 a CPU's speed falls faster than the 256-512 power law: the probe times
    such a width rather than extrapolate, and a short budget never pays for it."""
    timed = []
    true_speed = {256: 31_000.0, 512: 10_500.0, 768: 3_500.0, 1024: 1_900.0}
    monkeypatch.setattr(sizing, "probe_speed", lambda model, *a, **k: timed.append(model.hidden_size) or true_speed[model.hidden_size])
    short = sizing.choose(ModelConfig(), TrainConfig(time="5m"), 3_000_000, 100, CPU, None)
    assert timed == [256, 512] and short.hidden_size <= 512
    timed.clear()
    long = sizing.choose(ModelConfig(), TrainConfig(time="24h"), 3_000_000, 100, CPU, None)
    assert timed[:2] == [256, 512] and 768 in timed
    assert long.chars_per_s == true_speed[long.hidden_size]  # measured, not extrapolated (the law says 5,600 at 768)


def test_dry_run_prints_the_decisions_and_writes_no_run(tmp_path):
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE * 200, encoding="utf-8")
    out = tmp_path / "run"
    done = run_cli("train", corpus, "--out", out, "--steps", "3", "--batch-size", "4", "--seq-len", "16",
                   "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert not out.exists()
    plan = json.loads(done.stdout)
    expected = _choose(len(VERSE * 200) * 9 // 10, steps=3, batch_size=4, seq_len=16)
    assert plan["dry_run"] is True and plan["model"]["hidden_size"] == expected.hidden_size
    assert plan["train"]["weight_decay"] == expected.weight_decay and plan["train"]["steps"] == 3
    size_line = next(line for line in done.stderr.splitlines() if line.startswith("size: "))
    assert f"{expected.hidden_size} units" in size_line and "dry run: nothing trained" in done.stderr
    trained = run_cli("train", corpus, "--out", out, "--steps", "3", "--batch-size", "4", "--seq-len", "16",
                      "--sample-length", "0")
    assert trained.returncode == 0 and size_line in trained.stderr  # the same decisions, trained


def test_a_budget_that_reads_nothing_gets_the_smallest_width():
    assert _timed(1_000_000, "1s", lambda hidden: 0.0).hidden_size == sizing.WIDTHS[0]


def test_weight_drop_and_average_come_with_many_passes():
    assert sizing.weight_drop_for(20) == 0.0 < sizing.weight_drop_for(30) < sizing.weight_drop_for(45) < sizing.MAX_WEIGHT_DROP
    assert sizing.weight_drop_for(50) == sizing.weight_drop_for(500) == sizing.MAX_WEIGHT_DROP
    assert sizing.ema_decay_for(7.9) == 0.0 and sizing.ema_decay_for(8) == sizing.ema_decay_for(80) == sizing.EMA_DECAY


def _words_text(words: int = 600) -> str:
    """A text of 60 made-up words in random order: the words can be learned, the order only memorised."""
    import random

    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(60)]
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "\n"


def test_a_run_of_many_passes_does_not_overfit_at_its_end(tmp_path):
    """~68 passes over a 3.6k-character text (fp32, 2x96): with the settings the sizing
    picks for that many passes (weight drop, weight average) the run's last validation is
    its best, and better than the best of the same run without them, whose validation
    loss climbs over its last part as it memorises the text."""
    from charrnn import events
    from charrnn.training.run import trainer_for

    def run(name, model=None, auto=(), **train):
        model_config, train_config = tiny_configs(
            model={"hidden_size": 96, "embedding_size": 32, **(model or {})},
            train={"steps": 400, "eval_every": 25, "batch_size": 16, "seq_len": 32, "learning_rate": 3e-3,
                   "warmup_steps": 20, "sample_length": 0, "seed": 1, "start_mix": False, **train})
        readings = []
        trainer = trainer_for(corpus_of(_words_text()), model_config, train_config, tmp_path / name,
                              on_event=lambda e: readings.append(e.val_loss) if isinstance(e, events.Validation) else None,
                              auto=auto)
        trainer.run()
        return trainer, readings

    auto = ("dropout", "weight_drop", "weight_decay", "ema_decay")
    chosen, with_them = run("chosen", auto=auto)
    assert chosen.plan.model_config.weight_drop == sizing.MAX_WEIGHT_DROP and chosen.config.ema_decay == sizing.EMA_DECAY
    assert chosen.plan.model_config.dropout == sizing.MAX_DROPOUT and chosen.config.weight_decay == sizing.MAX_WEIGHT_DECAY
    # the same run with the settings it had before (dropout and decay from the passes, nothing else)
    _, without = run("without", model={"dropout": sizing.MAX_DROPOUT}, weight_decay=sizing.MAX_WEIGHT_DECAY)
    assert without[-1] - min(without) > 0.01  # it overfits at the end: the test can tell
    assert with_them[-1] - min(with_them) < 0.002
    assert min(with_them) < min(without) - 0.01


def _sizing_sweep():
    import importlib
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parent.parent / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("sizing_sweep")


def test_repeats_are_discounted_as_muennighoff_and_without_r_not_at_all():
    sweep = _sizing_sweep()
    assert sweep.effective_chars(5e5, 1e6, 8.0) == 5e5  # within the first pass nothing repeats
    assert sweep.effective_chars(3e6, 1e6, float("inf")) == 3e6
    two = sweep.effective_chars(2e6, 1e6, 8.0)
    assert two == pytest.approx(1e6 * (1 + 8 * (1 - 2.718281828 ** (-1 / 8))))
    assert 1e6 < two < 2e6
    assert sweep.effective_chars(1e9, 1e6, 8.0) == pytest.approx(9e6, rel=1e-6)  # levels off at R + 1 passes


def test_the_loss_fit_recovers_the_law_that_made_the_runs():
    """Runs made from a known L = E + A N^-0.3 + B D_eff^-0.45 (R = 4) on two texts: the
    grid's best fit is that law, error ~0, and it orders every pair of widths right."""
    sweep = _sizing_sweep()
    law = {"shakespeare": 0.9, "prose": 0.7}
    unique = {"shakespeare": 1e6, "prose": 3e6}
    records = []
    for corpus, e in law.items():
        for budget, chars in (("5m", 8e6), ("20m", 30e6)):
            for hidden, n in ((256, 1.1e6), (384, 2.2e6), (512, 3.8e6)):
                d = chars * 1.1e6 / n  # a wider model reads fewer characters in the same time
                loss = e + 0.4 * (n / 1e6) ** -0.3 + 0.8 * (sweep.effective_chars(d, unique[corpus], 4.0) / 1e6) ** -0.45
                records.append({"corpus": corpus, "budget": budget, "hidden": hidden, "parameters": n, "chars": d,
                                "train_chars": unique[corpus], "best_val_loss": loss})
    fits, texts, pairs = sweep.fit_losses(records)
    best = fits[0]
    assert (best.alpha, best.beta, best.repeats) == (0.3, 0.45, 4.0)
    assert best.rmse < 1e-9 and best.ordered == pairs == 8
    assert dict(zip(texts, best.coef)) == pytest.approx(law)
    assert best.coef[-2:] == pytest.approx([0.4, 0.8])


def test_the_pairs_bounds_find_the_growth_of_the_rule_that_decided_them():
    """Pairs decided by a known K(D) = 2 (D / 2.65M)^0.5 (the wider won where it read 1.3x
    more than K per parameter, lost at 1/1.3): the growths that meet every bound include 0.5
    and not 0 (a constant K), K0 = 2 lies in the range at 0.5, and D_eff reads the repeats
    of a small text as fewer characters."""
    sweep = _sizing_sweep()
    records = []
    for i, (chars, won) in enumerate([(2e6, True), (5e6, False), (12e6, True), (30e6, False), (60e6, True)]):
        k = 2.0 * (chars / 2.65e6) ** 0.5 * (1.3 if won else 1 / 1.3)
        wide = {"corpus": "t", "budget": str(i), "hidden": 384, "parameters": chars / k, "chars": chars,
                "train_chars": 1e6, "best_val_loss": 1.0 if won else 1.2}
        records += [wide, {**wide, "hidden": 256, "chars": None, "best_val_loss": 1.1}]
    pairs = sweep.bounds(records)
    assert [won for *_, won in pairs] == [True, False, True, False, True]
    growths = sweep.feasible_growths(pairs)
    assert 0.5 in growths and 0.0 not in growths
    low, high = sweep.k0_range(pairs, 0.5)
    assert low < 2.0 <= high
    discounted = sweep.bounds(records, repeats=4.0)
    assert all(d < raw for (_, d, _, _), (_, raw, _, _) in zip(discounted, pairs))  # every run read its text 2-60 times
    assert [k for _, _, k, _ in discounted] == pytest.approx([d / r["parameters"] for (_, d, _, _), r in
                                                              zip(discounted, records[::2])])


def test_a_second_pair_of_the_same_text_and_budget_is_its_own_pair():
    """Two pairs of one text and budget, told apart by "pair" (another day, another rule),
    give one bound each, and an "unpaired" run joins neither."""
    sweep = _sizing_sweep()
    run = {"corpus": "t", "budget": "20m", "train_chars": 1e6, "chars": 8e6}
    records = [{**run, "hidden": 256, "parameters": 1.1e6, "best_val_loss": 1.10},
               {**run, "hidden": 384, "parameters": 2.2e6, "best_val_loss": 1.00},
               {**run, "hidden": 256, "parameters": 1.1e6, "best_val_loss": 0.90, "pair": "b"},
               {**run, "hidden": 384, "parameters": 2.2e6, "best_val_loss": 1.05, "pair": "b"},
               {**run, "hidden": 512, "parameters": 3.8e6, "best_val_loss": 0.50, "unpaired": True}]
    pairs = sweep.bounds(records)
    assert [(label, won) for label, *_, won in pairs] == [("t 20m 2x384 won", True), ("t 20m (b) 2x384 lost", False)]
    assert [k for _, _, k, _ in pairs] == pytest.approx([8e6 / 2.2e6] * 2)
