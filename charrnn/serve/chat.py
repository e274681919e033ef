"""Chat messages as a character model's text, and where its reply ends.

A char-RNN trained on a play, a screenplay, a chat log or a forum knows dialogue in the
layout of its corpus, not in roles. A template says that layout as one turn, with
`{name}` (the speaker) and `{text}` (what they say) in it:

    script   "{name}:\\n{text}\\n\\n"   Tiny Shakespeare, screenplays: ROMEO:\\nBut soft...\\n\\n
    irc      "<{name}> {text}\\n"       chat logs: <alice> hi
    plain    "{text}\\n"                one line a turn, no names

The messages are rendered turn by turn; the reply is primed with the assistant's part of
a turn before `{text}` ("JULIET:\\n") and stops at the part after it ("\\n\\n": where the
model ends the turn and would start the next speaker), which is left out of the reply.
A speaker's NAME is the message's `name`, else the role's name from --speakers
(user=ROMEO,assistant=JULIET), else the role itself. A system message is prepended as
plain text: its content and the end of a turn, no speaker (a corpus has no narrator
role to give it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from charrnn.errors import UsageError

PRESETS = {"script": "{name}:\n{text}\n\n", "irc": "<{name}> {text}\n", "plain": "{text}\n"}


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None


@dataclass(frozen=True)
class ChatTemplate:
    turn: str = PRESETS["script"]
    names: dict[str, str] = field(default_factory=dict)  # role -> speaker name

    @property
    def head(self) -> str:
        return self.turn.split("{text}")[0]

    @property
    def end(self) -> str:
        """What ends a turn: the reply's stop string ("" for a template that ends with {text})."""
        return self.turn.split("{text}")[1]

    def speaker(self, message: Message) -> str:
        return message.name or self.names.get(message.role, message.role)

    def render(self, messages: list[Message]) -> str:
        """The conversation as the corpus would write it, ending with the assistant's
        turn opened: the prompt its reply continues."""
        parts = []
        for message in messages:
            if message.role in ("system", "developer"):
                parts.append(message.content + self.end)
            else:
                parts.append(self.head.replace("{name}", self.speaker(message)) + message.content + self.end)
        return "".join(parts) + self.head.replace("{name}", self.speaker(Message("assistant", "")))

    @property
    def description(self) -> str:
        preset = next((name for name, turn in PRESETS.items() if turn == self.turn), None)
        return preset or repr(self.turn)


def template_from(spec: str = "script", speakers: str = "") -> ChatTemplate:
    """--chat-template (a preset's name, or a turn with {text} once and {name} at most
    once; \\n and \\t as escapes) and --speakers (ROLE=NAME,...) -> a ChatTemplate."""
    turn = PRESETS.get(spec)
    if turn is None:
        turn = spec.replace("\\n", "\n").replace("\\t", "\t")
        if turn.count("{text}") != 1 or turn.count("{name}") > 1 or turn.index("{text}") < turn.find("{name}"):
            raise UsageError(f"--chat-template must be {', '.join(PRESETS)} or a turn with {{text}} once and "
                             f"{{name}} at most once, before it (e.g. '{{name}}: {{text}}\\n'), not {spec!r}")
    names = {}
    for item in filter(None, speakers.split(",")):
        role, sep, name = item.partition("=")
        if not sep or role.strip() not in ("user", "assistant") or not name.strip():
            raise UsageError(f"--speakers takes user=NAME,assistant=NAME, not {item!r}")
        names[role.strip()] = name.strip()
    return ChatTemplate(turn, names)
