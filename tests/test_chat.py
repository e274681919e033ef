"""Chat: messages written in the corpus's own layout (charrnn.serve.chat), and
/v1/chat/completions for real, on loopback, with the official openai client: a reply is
the completion of the rendered conversation, cut where the model ends the turn. CPU, fp32."""

import pytest

import charrnn
from charrnn.errors import UsageError
from charrnn.serve.chat import PRESETS, ChatTemplate, Message, template_from

pytest.importorskip("fastapi", reason="the server is an extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai")
from test_serve import complete, running  # noqa: E402

from charrnn.serve.schemas import Limits  # noqa: E402

CONVERSATION = [Message("system", "A night in Verona."), Message("user", "But soft!"),
                Message("assistant", "Who is there?"), Message("user", "It is I.", name="ROMEO")]


@pytest.mark.parametrize("spec, speakers, expected", [
    ("script", "", "A night in Verona.\n\nuser:\nBut soft!\n\nassistant:\nWho is there?\n\nROMEO:\nIt is I.\n\nassistant:\n"),
    ("script", "user=ROMEO,assistant=JULIET",
     "A night in Verona.\n\nROMEO:\nBut soft!\n\nJULIET:\nWho is there?\n\nROMEO:\nIt is I.\n\nJULIET:\n"),
    ("irc", "assistant=juliet", "A night in Verona.\n<user> But soft!\n<juliet> Who is there?\n<ROMEO> It is I.\n<juliet> "),
    ("plain", "", "A night in Verona.\nBut soft!\nWho is there?\nIt is I.\n"),
    ("[{name}] {text}\\n", "", "A night in Verona.\n[user] But soft!\n[assistant] Who is there?\n[ROMEO] It is I.\n[assistant] "),
], ids=["script", "script-speakers", "irc", "plain", "custom"])
def test_a_conversation_renders_as_its_template_says(spec, speakers, expected):
    template = template_from(spec, speakers)
    assert template.render(CONVERSATION) == expected
    assert template.end == ("\n\n" if spec == "script" else "\n")


@pytest.mark.parametrize("spec, speakers", [("{name}: no text here", ""), ("{text} and {text}", ""),
                                            ("{text} then {name}", ""), ("script", "judge=X"), ("script", "user")])
def test_bad_templates_and_speakers_are_usage_errors(spec, speakers):
    with pytest.raises(UsageError, match="--chat-template|--speakers"):
        template_from(spec, speakers)


def test_the_presets_are_the_layouts_the_docstring_names():
    assert PRESETS == {"script": "{name}:\n{text}\n\n", "irc": "<{name}> {text}\n", "plain": "{text}\n"}
    assert ChatTemplate().description == "script"


# -- /v1/chat/completions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(trained_run):
    return charrnn.load(trained_run, device="cpu")


MESSAGES = [{"role": "user", "content": "The quick"}, {"role": "assistant", "content": "brown fox"},
            {"role": "user", "content": "jumps over", "name": "dog"}]


@pytest.mark.parametrize("spec", ["irc", "script"])
def test_chat_through_the_openai_client_is_the_completion_of_the_rendered_conversation(model, spec):
    """Not streamed and streamed: the rendered prompt (the response's "prompt" field) is
    the template's; the reply is what /v1/completions writes after it with the same seed,
    up to where the model ends the turn (left out), and finish_reason says which ended it."""
    template = template_from(spec)
    with running({"tiny": model}, Limits(unknown="skip"), chat=template) as (url, _, lines):  # it lacks < and >
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=300, seed=9, temperature=0.9)
        rendered = done.model_extra["prompt"]
        assert rendered == template.render([Message(m["role"], m["content"], m.get("name")) for m in MESSAGES])
        whole = complete(url, prompt=rendered, max_tokens=300, seed=9, temperature=0.9).json()["choices"][0]["text"]
        reply = done.choices[0].message
        assert reply.role == "assistant" and done.object == "chat.completion"
        cut = whole.find(template.end)
        if cut >= 0:  # the model ended the turn: the reply stops there
            assert reply.content == whole[:cut] and done.choices[0].finish_reason == "stop"
        else:
            assert reply.content == whole and done.choices[0].finish_reason == "length"
        if spec == "irc":
            assert cut >= 0 and "\n" not in reply.content  # the tiny model writes newlines often: one line, one turn
        assert done.usage.prompt_tokens == len(rendered) and done.usage.completion_tokens == len(reply.content)

        chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=300, seed=9,
                                                     temperature=0.9, stream=True,
                                                     stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == len(reply.content)
    assert [line.split()[:3] for line in lines][:2] == [["POST", "/v1/chat/completions", "200"],
                                                        ["POST", "/v1/completions", "200"]]


def test_the_speakers_name_the_turns_and_the_sampling_controls_apply(model):
    with running({"tiny": model}, Limits(unknown="skip"), chat=template_from("script", "user=ROMEO,assistant=JULIET")) \
            as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fox"}],
                                              max_tokens=400, seed=3, logit_bias={"e": -100})
        assert done.model_extra["prompt"] == "ROMEO:\nfox\n\nJULIET:\n"
        assert "e" not in done.choices[0].message.content


@pytest.mark.parametrize("body, param, message", [
    ({"messages": []}, "messages", "the list is empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "only text parts"),
    ({"messages": [{"role": "user", "content": "a" * 5000}]}, "messages", "the limit is"),
    ({"messages": [{"role": "user", "content": "fox"}], "max_completion_tokens": 10**6}, "max_completion_tokens", ""),
    ({"messages": [{"role": "user", "content": "fox\ud800"}]}, "messages", "is not valid Unicode"),
])
def test_bad_chat_requests_are_400s_naming_the_field(model, body, param, message):
    import json

    import httpx

    with running({"tiny": model}) as (url, _, _):
        reply = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body),
                           headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param and message in reply.json()["error"]["message"]


def test_charrnn_serve_refuses_a_bad_template_in_one_line(trained_run):
    from conftest import run_cli

    done = run_cli("serve", trained_run, "--chat-template", "{name} says", "--port", "0")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: --chat-template must be script, irc, plain or a turn with {text}")


def test_chat_logprobs_in_openais_shape_streamed_and_not(model):
    with running({"tiny": model}, Limits(unknown="skip"), chat=template_from("irc")) as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80, seed=2, logprobs=True,
                                              top_logprobs=3)
        content = done.choices[0].logprobs.content
        assert "".join(t.token for t in content) == done.choices[0].message.content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in content)
        chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=80, seed=2, logprobs=True,
                                                stream=True)
        streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert [t.logprob for t in streamed] == [t.logprob for t in content]
