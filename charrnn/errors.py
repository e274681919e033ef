"""The few exceptions charrnn raises (the CLI maps each to one line and an exit code), and
the check every door a string comes in by makes of it."""


class CharRNNError(Exception):
    """Something the user can fix: bad data, a bad checkpoint, a bad setting.

    The message is one line saying what is wrong and what to do.
    """

    exit_code = 1


class UsageError(CharRNNError):
    """A flag or config value that is out of range (exit code 2, like Typer's own)."""

    exit_code = 2


class DataError(CharRNNError):
    """A corpus or text that cannot be read, decoded or encoded."""


class TextError(UsageError, ValueError):
    """A string given as text (a prime, a prompt, a stop string, a text to score) that is
    not valid Unicode: a lone surrogate, as JSON's "\\ud800" gives, or the escape Python
    makes of a command-line byte that is not UTF-8. A ValueError too, for callers of the
    Python API that catch that; exit code 2 in the shell, HTTP 400 from the server."""


class CheckpointError(CharRNNError):
    """A file that is not a readable charrnn checkpoint."""


class TrainingInterrupted(CharRNNError):
    """Training was stopped by Ctrl-C after last.pt was saved."""

    exit_code = 130


def check_text(text: str, field: str) -> str:
    """text itself where every character of it is a Unicode scalar value (what UTF-8 can
    write), else TextError naming field and the first character that is not. Every door
    a string comes in by calls this with the name the caller knows it by."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise not_unicode(text, err.start, field) from None
    return text


def not_unicode(text: str, index: int, field: str) -> TextError:
    code = ord(text[index])
    if 0xDC80 <= code <= 0xDCFF:  # how Python keeps a byte of argv, a file name or stdin that is not UTF-8
        what = f"a lone surrogate U+{code:04X} (the byte 0x{code - 0xDC00:02X} of text that was not UTF-8)"
    else:
        what = f"a lone surrogate U+{code:04X}"
    return TextError(f"{field} is not valid Unicode: {what} at character {index}; give text in UTF-8")
