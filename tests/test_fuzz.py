"""Property tests: random values, types and strings for every numeric and string option,
as flags and as TOML keys. Each run must end normally, or with one `error:` line and
exit 2 (a usage error) or 1 (a domain error such as "the validation split is empty"),
never the catch-all that is kept for bugs ("... run with --debug for the traceback").

Runs go through `charrnn.cli.main` in this process (a subprocess per example would cost
a second each). Examples are derandomised so CI is repeatable; search wider locally with
CHARRNN_FUZZ_EXAMPLES=500.
"""

import io
import json
import math
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from charrnn import cli  # noqa: E402
from charrnn.config import ModelConfig, TrainConfig  # noqa: E402

EXAMPLES = int(os.environ.get("CHARRNN_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Integers stay cheap when valid (a width of 16, not 60,000, so no example allocates
# gigabytes) and reach every edge when not: zero, negatives, past int64, past the caps.
INTEGERS = st.one_of(st.integers(-(2**70), 0), st.integers(1, 16),
                     st.sampled_from([2**31, 2**62 + 1, 2**63, 2**64, 10**30]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
# Every code point but NUL (argv cannot hold it): lone surrogates (category Cs, what JSON's
# "\ud800" and argv bytes that are not UTF-8 become) and noncharacters such as U+FFFE
# included, which st.text() leaves out by default; a third of the strings hold a surrogate.
ANY_CHARACTER = st.characters(codec=None, blacklist_categories=(), blacklist_characters="\x00")
TEXT = st.one_of(st.text(alphabet=ANY_CHARACTER, max_size=12),
                 st.builds(lambda a, s, b: a + s + b, st.text(alphabet=ANY_CHARACTER, max_size=5),
                           st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=5)))
DURATIONS = st.one_of(TEXT, st.builds(lambda n, unit: f"{n}{unit}", st.floats(-5, 3), st.sampled_from(["", "s", "m", "h"])))
VALUES = st.one_of(INTEGERS, FLOATS, TEXT)

NUMERIC_TRAIN = [f.name for cls in (ModelConfig, TrainConfig) for f in cls.__dataclass_fields__.values()
                 if f.type in ("int", "float")]
STRING_TRAIN = ["cell", "init", "clip_mode", "dtype", "device", "time", "save_every"]
BASE = dict(hidden_size=8, embedding_size=8, num_layers=1, batch_size=2, seq_len=8, steps=2, epochs=0.05,
            eval_every=50, sample_length=0, dtype="fp32", device="cpu")
CORPUS = "".join(f"line {i}: the quick brown fox, \"jumps\" (over) the lazy dog.\n" for i in range(60))

CATCH_ALL = "run with --debug"


def _run(argv, stdout=None):
    """main(argv) in this process -> (exit code, stdout, stderr)."""
    out, err = stdout or io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli.main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue() if isinstance(out, io.StringIO) else "", err.getvalue()


def _check_ending(code, stderr, argv):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert CATCH_ALL not in stderr, (argv, stderr)
    assert "Traceback" not in stderr, (argv, stderr)
    assert code in (0, 1, 2), (argv, code, stderr)
    if code:
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, stderr)
        assert len(errors[0]) < 400, errors[0]


def _flag(name, value):
    return f"--{name.replace('_', '-')}={_text(value)}"


def _text(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)  # keep "3.0" a float, as a user would type it
    return str(value)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


def _base_args(tmp_path, skip):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    args = ["train", corpus, "-q", "--out", tmp_path / "runs" / "fuzz"]
    return args + [_flag(k, v) for k, v in BASE.items() if k != skip]


@pytest.fixture
def fresh(tmp_path_factory):
    return lambda: tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(name=st.sampled_from(NUMERIC_TRAIN + STRING_TRAIN), value=VALUES, duration=DURATIONS)
def test_train_flags_end_cleanly(fresh, name, value, duration):
    if name in ("time", "save_every"):
        value = duration
    tmp_path = fresh()
    argv = _base_args(tmp_path, name) + [_flag(name, value)]
    code, _, stderr = _run(argv)
    _check_ending(code, stderr, argv)


@FUZZ
@given(name=st.sampled_from(NUMERIC_TRAIN + STRING_TRAIN),
       value=st.one_of(VALUES, st.booleans(), st.lists(st.integers(0, 3), max_size=2)), duration=DURATIONS)
def test_train_toml_keys_end_cleanly(fresh, name, value, duration):
    if name in ("time", "save_every") and isinstance(value, str):
        value = duration
    tmp_path = fresh()
    table = "model" if name in ModelConfig.__dataclass_fields__ else "train"
    config = tmp_path / "fuzz.toml"
    config.write_text(f"[{table}]\n{name} = {_toml_value(value)}\n")
    argv = _base_args(tmp_path, name) + ["--config", config]
    code, _, stderr = _run(argv)
    _check_ending(code, stderr, argv)


class _Pipe(io.StringIO):
    """A stdout that closes like `| head -c 2000`: BrokenPipeError after that much text."""

    def write(self, text):
        if self.tell() + len(text) > 2000:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


SAMPLE_OPTIONS = {"length": INTEGERS, "temperature": FLOATS, "top_k": INTEGERS, "top_p": FLOATS, "min_p": FLOATS,
                  "frequency_penalty": FLOATS, "presence_penalty": FLOATS,
                  "logit_bias": st.one_of(TEXT, st.builds(lambda c, v: f"{c}={v}", TEXT, FLOATS)),
                  "seed": INTEGERS, "num_samples": INTEGERS, "stop": TEXT, "prime": TEXT, "device": TEXT,
                  "dtype": TEXT}


@FUZZ
@given(data=st.data())
def test_sample_options_end_cleanly(trained_run, data):
    name = data.draw(st.sampled_from(sorted(SAMPLE_OPTIONS)))
    value = data.draw(st.one_of(SAMPLE_OPTIONS[name], VALUES))
    argv = ["sample", "--checkpoint", trained_run, "--length=50", "--seed=1", _flag(name, value)]
    code, _, stderr = _run(argv, stdout=_Pipe())
    _check_ending(code, stderr, argv)


@FUZZ
@given(data=st.data())
def test_eval_options_end_cleanly(trained_run, data):
    options = {"step_size": FLOATS, "decay": FLOATS, "segment": INTEGERS, "encoding": TEXT, "dtype": TEXT}
    name = data.draw(st.sampled_from(sorted(options)))
    value = data.draw(st.one_of(options[name], VALUES))
    text = Path(trained_run) / "fuzz-eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 3)
    argv = ["eval", text, "--checkpoint", trained_run, "--dynamic", _flag(name, value)]
    code, _, stderr = _run(argv)
    _check_ending(code, stderr, argv)


def test_the_checker_catches_the_catch_all():
    """The property above can fail: a catch-all ending is caught by _check_ending."""
    with pytest.raises(AssertionError):
        _check_ending(1, "error: ValueError: boom (run with --debug for the traceback)\n", [])
    with pytest.raises(AssertionError):
        _check_ending(2, "error: one\nerror: two\n", [])
    _check_ending(2, "error: --steps must be from 0 to 4\n", [])
