"""`charrnn export`: the ONNX graph gives PyTorch's numbers for every cell, the file alone
is enough to sample, and bad input is a one-line error that leaves the checkpoint as it was."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import CELLS, VERSE, corpus_of, make_model, shaken, tiny_configs
from typer.testing import CliRunner

import charrnn
from charrnn.cli import app
from charrnn.data.text import Vocab
from charrnn.export.onnx import OnnxModel, build_onnx
from charrnn.training.run import trainer_for

ort = pytest.importorskip("onnxruntime")
ALPHABET = "\nabcdefghijklmnopqrs"


class Stand:
    """What build_onnx reads of a charrnn.infer.api.Model."""

    def __init__(self, network):
        self.network, self.vocab, self.path = network, Vocab(ALPHABET), "x.pt"


def network_for(cell):
    network = shaken(make_model(cell, vocab_size=len(ALPHABET)))
    with torch.no_grad():
        network.start_state.normal_(0, 0.5)  # a learned start state, not zeros
    return network


@pytest.mark.parametrize("cell", CELLS)
def test_onnxruntime_gives_pytorchs_logits_and_state_for_every_cell(cell):
    network = network_for(cell)
    session = ort.InferenceSession(build_onnx(Stand(network)))
    names = [i.name for i in session.get_inputs()][1:]
    for batch in (1, 8):
        x = torch.randint(0, len(ALPHABET), (batch, 101))
        with torch.no_grad():
            state = network.init_state(batch)
            ours = {k: v.numpy() for k, v in zip(names, state)}
            for start, length in ((0, 1), (1, 100)):  # one step, then 100 with the state carried
                chunk = x[:, start : start + length]
                logits, state = network(chunk, state)
                out = session.run(None, {"ids": chunk.numpy(), **ours})
                assert np.abs(out[0] - logits.numpy()).max() < 1e-4
                for got, want in zip(out[1:], state):
                    assert np.abs(got - want.numpy()).max() < 1e-4
                ours = dict(zip(names, out[1:]))


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_continuations_of_200_characters_are_identical(cell):
    network = network_for(cell)
    session = ort.InferenceSession(build_onnx(Stand(network)))
    names = [i.name for i in session.get_inputs()][1:]
    prime = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits, state = network(prime)
        feeds = {"ids": prime.numpy(), **{k: v.numpy() for k, v in zip(names, network.init_state(1))}}
        out = session.run(None, feeds)
        torch_ids, onnx_ids = [], []
        t_logits, o_logits, o_state = logits[0, -1], out[0][0, -1], out[1:]
        for _ in range(200):
            t_next, o_next = int(t_logits.argmax()), int(o_logits.argmax())
            torch_ids.append(t_next)
            onnx_ids.append(o_next)
            t_out, state = network(torch.tensor([[t_next]]), state)
            t_logits = t_out[0, -1]
            out = session.run(None, {"ids": np.array([[o_next]]), **dict(zip(names, o_state))})
            o_logits, o_state = out[0][0, -1], out[1:]
    assert torch_ids == onnx_ids and len(set(torch_ids)) > 1


def test_the_metadata_is_enough_to_sample(tmp_path):
    network = network_for("lstm")
    path = tmp_path / "m.onnx"
    path.write_bytes(build_onnx(Stand(network)))
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["charrnn.vocabulary"] == list(ALPHABET)
    assert np.allclose(meta["charrnn.start_state"]["c"], network.start_state[1].detach().numpy(), atol=1e-6)
    assert meta["charrnn.model_config"]["cell"] == "lstm" and meta["charrnn.state_inputs"] == ["h", "c"]
    model = OnnxModel(path)
    text = "".join(model.stream(model.encode("abc"), 50, 0.0, seed=0))
    with torch.no_grad():  # greedy from the learned start state, as charrnn reads
        ids = torch.tensor([[1, 2, 3]])
        logits, state = network(ids)
        expected = ""
        for _ in range(50):
            nxt = int(logits[0, -1].argmax())
            expected += ALPHABET[nxt]
            logits, state = network(torch.tensor([[nxt]]), state)
    assert text == expected
    seeded = ["".join(model.stream(model.encode("a"), 80, 1.0, seed=9)) for _ in range(2)]
    assert seeded[0] == seeded[1] != "".join(model.stream(model.encode("a"), 80, 1.0, seed=10))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A tiny trained run without the start mix, so both sides read the same way."""
    run_dir = tmp_path_factory.mktemp("export") / "runs" / "plain"
    model_config, train_config = tiny_configs(train=dict(start_mix=False))
    trainer_for(corpus_of(VERSE * 20), model_config, train_config, run_dir).run()
    return run_dir


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_charrnn_sample_onnx_writes_what_charrnn_sample_writes_when_greedy(plain_run, tmp_path):
    onnx_path = tmp_path / "plain.onnx"
    done = invoke("export", plain_run, "-o", onnx_path)
    assert done.exit_code == 0, done.stderr
    assert "export:" in done.stderr and onnx_path.stat().st_size > 10_000
    assert onnx_path.stat().st_mode & 0o044 == 0o044  # readable by others (umask 022), to hand on
    args = ["--prime", "The ", "--length", 200, "--temperature", 0, "--seed", 1]
    from_torch = invoke("sample", "-m", plain_run, *args, "--device", "cpu", "--dtype", "fp32")
    from_onnx = invoke("sample", "--onnx", onnx_path, *args)
    assert from_onnx.exit_code == 0, from_onnx.stderr
    assert from_onnx.stdout.rstrip("\n") == from_torch.stdout.rstrip("\n")


def test_export_errors_are_one_line_and_the_checkpoint_is_never_changed(plain_run, tmp_path):
    checkpoint = plain_run / "best.pt"
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(checkpoint.read_bytes()[:5000])
    cases = [
        (("export", damaged, "-o", tmp_path / "x.onnx"), 1, "unreadable"),
        (("export", plain_run, "-o", tmp_path / "no" / "such" / "dir" / "x.onnx"), 1, "x.onnx"),
        (("export", plain_run, "-o", tmp_path / "x.txt"), 2, "name an .onnx or an .html file"),
        (("export", plain_run), 2, "give one of"),
        (("export", plain_run, "--web", tmp_path / "w", "--weights", "int4"), 2, "--weights must be fp16 or fp32"),
        (("sample", "--onnx", tmp_path / "missing.onnx"), 1, "missing.onnx"),
        (("sample", "--onnx", damaged), 1, "is not a charrnn ONNX export"),
    ]
    for args, code, words in cases:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob("*.tmp*"))
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before


# -- the page, in headless Chromium from file://, no network ----------------------------------------

from browser import Browser, chromium  # noqa: E402

TEXT = (VERSE * 10)[:500]


@pytest.fixture(scope="module")
def pages(plain_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages")
    for weights in ("fp32", "fp16"):
        done = invoke("export", plain_run, "-o", out / f"{weights}.html", "--weights", weights)
        assert done.exit_code == 0, done.stderr
    return out


def reference_probabilities(network, vocab, text):
    with torch.no_grad():
        logits, _ = network(vocab.encode(text)[0].long()[None])
    return torch.softmax(logits[0].double(), -1).numpy()  # (T, V): after each character


def page_probabilities(browser, text):
    return np.array(browser.js(f"""(() => {{ charrnn.reset(); const out = [];
        for (const ch of {json.dumps(text)}) {{ charrnn.feed(ch); out.push(Array.from(charrnn.vocabulary).map(
            (c => (p => p[c])(charrnn.probabilities())))); }}
        return out; }})()"""))


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_page_gives_pytorchs_probabilities_and_text_offline(plain_run, pages, tmp_path):
    model = charrnn.load(plain_run, device="cpu")
    page = (pages / "fp32.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    with Browser(tmp_path / "profile") as browser:
        browser.open((pages / "fp32.html").as_uri())
        browser.wait("document.body.dataset.ready === '1'")
        assert browser.js("charrnn.runtime") == "wasm-simd"
        got = page_probabilities(browser, TEXT)
        want = reference_probabilities(model.network, model.vocab, TEXT)
        assert got.shape == want.shape == (500, len(model.vocab))
        assert np.abs(got - want).max() < 1e-4
        browser.open((pages / "fp32.html").as_uri() + "?runtime=javascript")  # the fallback, the same numbers
        browser.wait("document.body.dataset.ready === '1'")
        assert browser.js("charrnn.runtime") == "javascript"
        assert np.abs(page_probabilities(browser, TEXT[:100]) - want[:100]).max() < 1e-4
        greedy = browser.js("charrnn.generate({prime: 'The ', length: 200, temperature: 0})")
        printed = invoke("sample", "-m", plain_run, "--prime", "The ", "-n", 200, "-T", 0, "--seed", 1,
                         "--device", "cpu", "--dtype", "fp32").stdout.rstrip("\n")
        assert "The " + greedy == printed
        seeded = [browser.js(f"charrnn.generate({{prime: 'a', length: 300, temperature: 1, seed: {s}}})")
                  for s in (5, 5, 6)]
        assert seeded[0] == seeded[1] != seeded[2] and len(seeded[0]) == 300
        # feed / next / reset as documented
        state = browser.js("""(() => { charrnn.reset(); charrnn.feed('The qu');
            const p = charrnn.probabilities(); const best = Object.keys(p).reduce((a, b) => p[a] >= p[b] ? a : b);
            const drawn = charrnn.next({temperature: 0});
            const after = charrnn.probabilities();
            charrnn.reset(); charrnn.feed('The qu' + drawn);
            const again = charrnn.probabilities();
            charrnn.reset(); const fresh = charrnn.probabilities(); charrnn.reset(); charrnn.feed('\\n');
            const newline = charrnn.probabilities();
            let unknown = ''; try { charrnn.feed('\\u2603'); } catch (e) { unknown = e.message; }
            const sum = Object.values(p).reduce((a, b) => a + b, 0);
            return {best, drawn, same: JSON.stringify(after) === JSON.stringify(again), sum,
                    fresh: JSON.stringify(fresh) === JSON.stringify(newline), unknown}; })()""")
        assert state["drawn"] == state["best"] and state["same"] and state["fresh"]
        assert abs(state["sum"] - 1) < 1e-9 and "\u2603" in state["unknown"]
        # the typed prime streams into the page
        browser.js("document.getElementById('prime').value = 'The '; document.getElementById('length').value = '300';"
                   "document.getElementById('temperature').value = '0'; document.getElementById('go').click()")
        browser.wait("document.body.dataset.done === '1'")
        assert browser.js("document.getElementById('out').textContent") == "The " + greedy + \
            invoke("sample", "-m", plain_run, "--prime", "The " + greedy, "-n", 100, "-T", 0, "--device", "cpu",
                   "--dtype", "fp32").stdout.rstrip("\n")[len("The " + greedy):]


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_the_fp16_page_computes_what_pytorch_does_with_the_same_rounded_weights(plain_run, pages, tmp_path):
    model = charrnn.load(plain_run, device="cpu")
    with torch.no_grad():
        for p in model.network.parameters():
            p.copy_(p.half().float())
    with Browser(tmp_path / "profile") as browser:
        browser.open((pages / "fp16.html").as_uri())
        browser.wait("document.body.dataset.ready === '1'")
        got = page_probabilities(browser, TEXT[:200])
    # the page rounds the packed tables (Emb W_ih0^T + b), PyTorch each factor: close, not equal
    assert np.abs(got - reference_probabilities(model.network, model.vocab, TEXT[:200])).max() < 2e-3
    assert (pages / "fp16.html").stat().st_size < 0.75 * (pages / "fp32.html").stat().st_size


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install chromium; .ci/run installs it)")
def test_a_10000_character_generation_leaves_the_pages_memory_flat(pages, tmp_path):
    with Browser(tmp_path / "profile") as browser:
        browser.open((pages / "fp32.html").as_uri())
        browser.wait("document.body.dataset.ready === '1'")

        def heap():
            browser.send("HeapProfiler.collectGarbage")
            return browser.send("Runtime.getHeapUsage")["usedSize"]

        browser.js("charrnn.generate({prime: 'a', length: 500, seed: 1}); 0")  # warm the JIT
        before = heap()
        for k in range(10):
            browser.js(f"charrnn.reset(); charrnn.feed('a'); for (let n = 0; n < 1000; n++) charrnn.next({{seed: {k}}}); 0")
        after = heap()
    assert after - before < 256 * 1024, (before, after)  # nothing held per character
