"""Usage errors as one line that never repeats what the user typed.

argparse echoes a bad value (``invalid choice: 'KEY'``) and every unknown
word (``unrecognized arguments: KEY``); a key typed in the wrong place would
then land in a terminal log, a CI log or a bug report.  This parser names
the word by its position on the command line instead ("argument #4").

Host and guest CLIs share this module; like the vocabulary it imports
nothing from the project, so the guest may load it.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError

TYPE_CHECKING = False  # not typing's: importing typing costs the guest's CLI ~0.1 s under TCG
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn

EXIT_USAGE = 2
# A word this long that is not one of the parser's own names is hidden even
# where argparse shows it unquoted (a last line of defence).
_HIDE_MIN = 6


class _UsageProblem(Exception):
    """Raised by :meth:`OneLineParser.error` so the root parser words the message."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit status 2.

    Sub-parsers made with ``add_subparsers().add_parser`` are of the same class.
    """

    def error(self, message: str) -> NoReturn:
        raise _UsageProblem(self.prog, message)

    def _get_formatter(self) -> argparse.HelpFormatter:
        """argparse's formatter, sized as argparse sizes it but without importing shutil.

        argparse makes a formatter for every ``add_argument`` (to check the
        metavar), and HelpFormatter imports shutil (with bz2, lzma, fnmatch)
        for the terminal width: ~0.1 s of every ``mktme-guest`` call under TCG.
        """
        formatter = self.formatter_class
        if isinstance(formatter, type) and issubclass(formatter, argparse.HelpFormatter):
            return formatter(prog=self.prog, width=terminal_columns() - 2)
        return super()._get_formatter()

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: Any = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            parsed, extras = self.parse_known_args(argv, namespace)
        except _UsageProblem as problem:
            self._fail(problem.prog, hide_values(problem.message, argv, known_words(self)))
        if extras:
            self._fail(self.prog, unrecognized(extras, argv))
        return parsed

    def _fail(self, prog: str, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{prog}: {message} (see --help)\n")


def terminal_columns(fallback: int = 80) -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it: $COLUMNS, stdout, fallback."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns or fallback) if stdout else fallback
    except (AttributeError, ValueError, OSError):
        return fallback


def unrecognized(extras: Sequence[str], argv: Sequence[str]) -> str:
    """'unrecognized argument #3' for words no option or command takes."""
    positions: list[int] = []
    cursor = 0
    for word in extras:
        index = next((i for i in range(cursor, len(argv)) if argv[i] == word), None)
        if index is None:
            continue
        positions.append(index + 1)
        cursor = index + 1
    named = ", ".join(f"#{n}" for n in positions) or "?"
    plural = "s" if len(positions) > 1 else ""
    return f"unrecognized argument{plural} {named}"


def hide_values(message: str, argv: Sequence[str], known: set[str]) -> str:
    """The message with every word of ``argv`` it quotes replaced by its position."""
    option = _option_named(message)
    for index in _quoted_positions(message, argv, option):
        for value in _values_of(argv[index]):
            quoted = repr(value)
            if value and value not in known and quoted in message:
                message = message.replace(quoted, f"argument #{index + 1}", 1)
                break
    for index, word in enumerate(argv):
        for value in _values_of(word):
            if len(value) >= _HIDE_MIN and value not in known and value in message:
                message = message.replace(value, f"argument #{index + 1}")
    return message


def _option_named(message: str) -> str | None:
    """'--keyid' from 'argument --keyid: ...' (argparse's prefix), else None."""
    if not message.startswith("argument "):
        return None
    name = message[len("argument "):].split(":", 1)[0]
    return name.split("/")[0] if name.startswith("-") else None


def _values_of(word: str) -> list[str]:
    """A word, and for ``--opt=value`` also its value."""
    if word.startswith("-") and "=" in word:
        return [word.partition("=")[2], word]
    return [word]


def _quoted_positions(message: str, argv: Sequence[str], option: str | None) -> list[int]:
    """Indices of argv words quoted in the message, the option's own value first."""
    found = [i for i, word in enumerate(argv)
             if any(v and repr(v) in message for v in _values_of(word))]

    def after_option(i: int) -> bool:
        return option is not None and (
            (i > 0 and argv[i - 1] == option) or argv[i].startswith(option + "="))

    return sorted(found, key=lambda i: (not after_option(i), message.find(repr(_values_of(argv[i])[0]))))


def known_words(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string, command name and choice of the parser and its sub-parsers."""
    words: set[str] = {parser.prog}
    for action in parser._actions:  # argparse has no public walk of its actions
        words.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words.add(name)
                words |= known_words(sub)
        elif action.choices is not None:
            words.update(str(choice) for choice in action.choices)
    return words


MAX_KEY_TEXT = 4096  # far more than any key form; a wrong file is refused, not slurped


def read_secret(path: str, option: str) -> str:
    """The text of a key file (``-`` = stdin), surrounding whitespace removed.

    Raises ConfigError naming the option and the path (never the content) if
    the file cannot be read, is not text, or is far longer than a key.
    """
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_KEY_TEXT + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_KEY_TEXT + 1)
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read the file: {exc.strerror or exc}") from None
    where = "stdin" if path == "-" else "the file"  # never its name: a key typed there by mistake
    if len(raw) > MAX_KEY_TEXT:
        raise ConfigError(f"{option}: {where} is longer than {MAX_KEY_TEXT} bytes: not a key file")
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{option}: {where} is not text") from None
