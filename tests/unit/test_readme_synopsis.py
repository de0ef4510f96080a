"""README's CLI synopsis against the parser: every command and every option of each is in the
synopsis, and the synopsis names nothing the parser lacks, so it stays true as commands grow."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from controlplane.cli import build_parser
from controlplane.cli.completion import Command, commands

README = Path(__file__).resolve().parents[2] / "README.md"
# Options every command (or every client command) takes, described once below the synopsis.
SHARED = {"-h", "--help", "--log-level", "--server", "--token-file"}
_OPTION = re.compile(r"(?<![\w-])(--?[a-z][-a-z]*)")


def synopsis(tree: dict[str, Command]) -> dict[str, set[str]]:
    """Command path ('tasklane tls init') -> the options its synopsis lines show. A line is
    `tasklane COMMAND [SUBCOMMAND ...] ...`, alternatives apart with `  |  `, continued on
    indented lines; `#` starts a comment."""
    text = README.read_text(encoding="utf-8")
    block = text.split("\n## CLI\n", 1)[1].split("```\n", 1)[1].split("\n```", 1)[0]
    found: dict[str, set[str]] = {}
    paths: list[str] = []
    for line in block.splitlines():
        content = line.split("  #", 1)[0]
        if not content.startswith("tasklane "):  # a continuation of the last alternative
            for path in paths:
                found[path].update(_OPTION.findall(content))
            continue
        for alternative in content.split("  |  "):
            words = alternative.split()
            paths = [f"tasklane {words[1]}"]
            for word in words[2:]:  # subcommands: `tls init`, `task start|finish`
                deeper = [f"{path} {each}" for path in paths for each in word.split("|")]
                if not all(path in tree for path in deeper):
                    break
                paths = deeper
            for path in paths:
                found.setdefault(path, set()).update(_OPTION.findall(alternative))
    return found


def options_of(
    parser: argparse.ArgumentParser, path: str = "tasklane"
) -> Iterator[tuple[str, list[tuple[str, ...]]]]:
    """(path, the option strings of each option: `-f` and `--filename` are one) per command."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from options_of(child, f"{path} {name}")
        elif action.option_strings and not SHARED & set(action.option_strings):
            found.append(tuple(action.option_strings))
    yield path, found


def test_the_synopsis_shows_every_command_and_option() -> None:
    parser = build_parser()
    tree = dict(commands(parser))
    shown = synopsis(tree)
    problems = []
    for path, options in options_of(parser):
        if any(f"{path} {word}" in tree for word in tree[path].words):
            continue  # the program, or a command whose subcommands have lines of their own
        if path not in shown:
            problems.append(f"no line for `{path}`")
            continue
        if missing := [names for names in options if not shown[path] & set(names)]:
            problems.append(f"`{path}` lacks {missing}")
        known = {name for names in options for name in names}
        if unknown := shown[path] - known - SHARED:
            problems.append(f"`{path}` shows {sorted(unknown)}, which it does not take")
    assert not problems, "README's CLI synopsis: " + "; ".join(problems)
