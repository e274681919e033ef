"""Text that is not valid Unicode, at every door a string comes in by: refused where it
enters, naming the field and the first bad character: TextError (a UsageError and a
ValueError) in Python, one line and exit 2 in the shell, HTTP 400 with `param` from the
server, never a traceback. File names that are not UTF-8 name real files: they work, and
are shown as \\xFF. CPU, fp32 where a model runs."""

import collections
import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import ROOT, VERSE

import charrnn
from charrnn.errors import TextError, check_text
from charrnn.serve.schemas import Limits

pytest.importorskip("fastapi", reason="the server is an extra: pip install -e '.[serve]'")
from test_serve import running  # noqa: E402


@pytest.fixture(scope="module")
def model(trained_run):
    return charrnn.load(trained_run, device="cpu")


def test_check_text_names_the_first_character_that_is_not_unicode():
    assert check_text("héllo 😀 \ufffe\uffff", "prime") == "héllo 😀 \ufffe\uffff"  # noncharacters are Unicode
    with pytest.raises(TextError, match=r"^prime is not valid Unicode: a lone surrogate U\+D800 at character 2;"):
        check_text("ab\ud800c\udfff", "prime")
    with pytest.raises(ValueError, match=r"U\+DCFF \(the byte 0xFF of text that was not UTF-8\) at character 0"):
        check_text("\udcffab", "--prime")
    assert issubclass(TextError, charrnn.UsageError) and TextError.exit_code == 2


@pytest.mark.parametrize("call, field", [
    (lambda m: m.sample(prime="ab\ud800", length=5), "prime"),
    (lambda m: list(m.stream(prime="The", stop="\udcff", length=5)), "stop"),
    (lambda m: m.score("The \ud800 fox"), "text"),
    (lambda m: m.score_dynamic("The \ud800 fox"), "text"),
    (lambda m: m.log_probs("The \ud800 fox"), "text"),
], ids=["sample-prime", "stream-stop", "score", "score_dynamic", "log_probs"])
def test_the_python_api_raises_text_error_naming_the_argument(model, call, field):
    with pytest.raises(charrnn.TextError, match=rf"^{field} is not valid Unicode: a lone surrogate U\+D") as caught:
        call(model)
    assert isinstance(caught.value, ValueError)


def _cli(*args, stdin: bytes | None = None, cwd=None):
    """python -m charrnn ARGS with str arguments made bytes as the OS would (surrogate escapes
    become the raw bytes they stand for); (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "charrnn", *map(os.fsencode, map(str, args))], input=stdin,
                          capture_output=True, cwd=cwd, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


@pytest.mark.parametrize("args, stdin, message", [
    (["--prime", "\udcffab"], None, "--prime is not valid Unicode: a lone surrogate U+DCFF (the byte 0xFF"),
    (["--stop", "o\udcfe"], None, "--stop is not valid Unicode: a lone surrogate U+DCFE (the byte 0xFE"),
    (["--prime", "-"], b"The \xff fox", "--prime - (standard input) is not valid UTF-8: first bad byte at offset 4"),
], ids=["prime", "stop", "prime-from-stdin"])
def test_the_shell_refuses_bytes_that_are_not_utf8_with_one_line_and_exit_2(trained_run, args, stdin, message):
    code, out, err = _cli("sample", "-m", trained_run, "--length", 5, "--device", "cpu", *args, stdin=stdin)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {message}" + err.splitlines()[0][len(message) + 7:]]
    assert err.startswith(f"error: {message}") and "Traceback" not in err and "--debug" not in err


def test_a_corpus_whose_file_name_is_not_utf8_trains_and_evals_and_is_shown_escaped(tmp_path):
    name = os.fsdecode(b"verse-\xff.txt")  # "verse-\udcff.txt": a real file's name
    (tmp_path / name).write_text(VERSE * 20)
    code, _, err = _cli("train", name, "--steps", 2, "--hidden-size", 8, "--num-layers", 1, "-o", "run", "-q",
                        "--device", "cpu", cwd=tmp_path)
    assert code == 0, err
    code, out, err = _cli("eval", name, "-m", "run", "--json", "--device", "cpu", cwd=tmp_path)
    assert code == 0, err
    report = json.loads(out)  # strict UTF-8 JSON: the name's byte shown, not a lone surrogate's escape
    assert report["files"] == ["verse-\\xff.txt"] and report["chars"] == len(VERSE * 20) - 1  # predictions: all but the first
    code, out, err = _cli("eval", os.fsdecode(b"gone-\xfe.txt"), "-m", "run", "--device", "cpu", cwd=tmp_path)
    assert code == 1 and err == "error: gone-\\xfe.txt does not exist; check the path\n"


def test_a_corpus_path_with_a_lone_surrogate_is_refused_by_the_python_api(tmp_path):
    with pytest.raises(TextError, match=r"^the corpus path is not valid Unicode: a lone surrogate U\+D800"):
        charrnn.train(str(tmp_path / "a\ud800.txt"), steps=1)


BAD = "The \ud800"


@pytest.mark.parametrize("route, body, param, field", [
    ("completions", {"prompt": BAD}, "prompt", "prompt"),
    ("completions", {"prompt": ["The ", BAD]}, "prompt", "prompt[1]"),
    ("completions", {"prompt": "The ", "stop": BAD}, "stop", "stop"),
    ("completions", {"prompt": "The ", "stop": ["o", BAD]}, "stop", "stop[1]"),
    ("completions", {"prompt": "The ", "model": BAD}, "model", "model"),
    ("completions", {"prompt": "The ", "stream_options": {BAD: True}}, "stream_options", "stream_options key"),
    ("score", {"text": BAD}, "text", "text"),
    ("score", {"text": "The fox", "model": BAD}, "model", "model"),
], ids=lambda v: v if isinstance(v, str) and "\ud800" not in v else None)
def test_the_server_answers_400_naming_the_field(model, route, body, param, field):
    with running({"tiny": model}) as (url, _, lines):
        reply = httpx.post(f"{url}/v1/{route}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                           timeout=30)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
        assert error["message"].startswith(f"{field} is not valid Unicode: a lone surrogate U+D800 at character")
        assert [line.split()[:3] for line in lines] == [["POST", f"/v1/{route}", "400"]]  # no "error:" line


schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402


@pytest.fixture(scope="module")
def live(model):
    """One server for the whole schemathesis run: small limits, so that no valid request is slow;
    unknown characters skipped, so that random prompts get past the encoder."""
    with running({"tiny": model}, Limits(max_tokens=64, max_prompt=200, max_n=4, max_body=20_000, unknown="skip")) as served:
        yield served


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error_on_any_route(live, mode):
    """Every route and method of the server's own OpenAPI schema, with bodies, paths and
    queries that fit it (positive) and that break it (negative): never a 5xx, never an
    "error:" line (the one-line report of an unexpected exception). Bounded: 40 examples
    per operation (CHARRNN_FUZZ_EXAMPLES), derandomised."""
    from schemathesis import GenerationMode

    url, _, lines = live
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "POST /v1/score", "GET /v1/models", "GET /v1/models/{name}", "GET /health"}
    seen = []

    for operation in operations:
        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=int(os.environ.get("CHARRNN_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            if mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "tiny"  # past the model lookup, to the fields behind it
            reply = case.call(base_url=url, timeout=30)
            seen.append(reply.status_code)
            assert reply.status_code < 500, (case.method, case.path, case.body, reply.text)
            assert not [line for line in lines if line.startswith("error:")], lines

        try:
            check()
        except Unsatisfiable:  # nothing of this operation to break (GET / takes no input)
            assert mode == "negative"
    print(mode, len(operations), "operations", collections.Counter(seen))
    assert len(seen) >= 5 * len(operations) and any(code == 400 for code in seen)


# -- Hypothesis: prime, stop and text with every code point, lone surrogates included ----------------

from hypothesis import strategies as st  # noqa: E402

ANY = st.characters(codec=None, blacklist_categories=())  # st.text()'s default leaves surrogates (Cs) out
TEXTS = st.one_of(st.text(alphabet=ANY, max_size=12),
                  st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), st.characters(categories=["Cs"]),
                            st.text(alphabet=ANY, max_size=5)),
                  st.text(alphabet=st.sampled_from(VERSE + "\ufffe\uffff\U0010ffff"), min_size=1, max_size=12))
FUZZ = settings(max_examples=int(os.environ.get("CHARRNN_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))


def _has_surrogate(*texts: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for t in texts for c in t)


@FUZZ
@given(prime=TEXTS, stop=TEXTS, text=TEXTS)
def test_the_python_api_takes_any_string_or_says_which_is_not_unicode(model, prime, stop, text):
    for call, given_texts in [(lambda: model.sample(prime=prime, stop=stop, length=8, seed=1, unknown="skip"),
                               (prime, stop)),
                              (lambda: model.score(text, unknown="skip"), (text,))]:
        try:
            call()
            assert not _has_surrogate(*given_texts)
        except TextError as err:
            assert _has_surrogate(*given_texts) and " is not valid Unicode: a lone surrogate U+D" in str(err)
        except charrnn.DataError as err:  # too little the model knows to score
            assert not _has_surrogate(*given_texts) and str(err).startswith("nothing to score")


@FUZZ
@given(prompt=TEXTS, stop=TEXTS, text=TEXTS)
def test_the_server_answers_any_string_with_200_or_400_and_no_error_line(live, prompt, stop, text):
    url, _, lines = live
    before = len(lines)
    for route, body in [("completions", {"prompt": prompt, "stop": stop, "max_tokens": 8, "seed": 1}),
                        ("score", {"text": text, "surprisal": True, "streams": 1})]:
        reply = httpx.post(f"{url}/v1/{route}", content=json.dumps(body), timeout=30,
                           headers={"Content-Type": "application/json"})
        assert reply.status_code in (200, 400), reply.text
        if _has_surrogate(*(v for v in body.values() if isinstance(v, str))):
            assert reply.status_code == 400 and "is not valid Unicode" in reply.json()["error"]["message"]
    assert not [line for line in lines[before:] if not line.startswith("POST ")], lines[before:]


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"PYTHONIOENCODING": "latin-1"}, {"LC_ALL": "C", "LANG": "C"}],
                         ids=["ascii", "latin-1", "C-locale"])
def test_sample_writes_the_same_utf8_bytes_whatever_the_locale(trained_run, env):
    """The tiny model writes é, 春 and 🙂 (VERSE has them); a locale that cannot encode them
    neither fails nor changes a byte of stdout."""
    args = [sys.executable, "-m", "charrnn", "sample", "-m", str(trained_run), "--length", "300", "--seed", "5",
            "--prime", "café 春", "--device", "cpu", "--dtype", "fp32"]
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run(args, capture_output=True, timeout=120, env=base)
    local = subprocess.run(args, capture_output=True, timeout=120, env={**base, **env})
    assert plain.returncode == 0 and local.returncode == 0, local.stderr
    assert local.stdout == plain.stdout and not plain.stdout.isascii()
