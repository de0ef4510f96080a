"""`tasklane completion bash|zsh`: a shell completion script generated from the argparse tree,
so every subcommand and option (including ones added later) completes without a list to keep.

The script holds, per command path ("tasklane", "tasklane get", "tasklane tls init"), its
subcommands and positional words, its options, and per option the values it takes (choices,
or files when it takes a value without choices). zsh runs the same script through its
bashcompinit, with KSH_ARRAYS so that COMP_WORDS counts from 0 as in bash.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh")
PROGRAM = "tasklane"


@dataclass
class Command:
    """What completes after one command path."""

    words: list[str] = field(default_factory=list)  # subcommands and positional choices
    options: list[str] = field(default_factory=list)
    values: dict[str, list[str]] = field(default_factory=dict)  # option -> its choices ([]: files)


def commands(parser: argparse.ArgumentParser, path: str = PROGRAM) -> Iterator[tuple[str, Command]]:
    """(path, Command) for `parser` and, depth first, each of its subcommands."""
    command = Command()
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                command.words.append(name)
                children.append((name, child))
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            command.options.extend(action.option_strings)
            if action.nargs != 0:
                choices = [str(choice) for choice in action.choices or ()]
                for option in action.option_strings:
                    command.values[option] = choices
        else:
            words = getattr(action, "completions", None) or action.choices or ()
            command.words.extend(str(word) for word in words)
    yield path, command
    for name, child in children:
        yield from commands(child, f"{path} {name}")


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell` (see SHELLS)."""
    words, options, values = [], [], []
    for path, command in commands(parser):
        words.append(_entry(path, command.words))
        options.append(_entry(path, command.options))
        values.extend(
            _entry(f"{path} {option}", choices) for option, choices in command.values.items()
        )
    head = (
        f"#compdef {PROGRAM}\n# zsh completion for {PROGRAM}: source <({PROGRAM} completion zsh)\n"
        "autoload -U +X bashcompinit && bashcompinit\n"
        if shell == "zsh"
        else f"# bash completion for {PROGRAM}: source <({PROGRAM} completion bash)\n"
    )
    return (
        head
        + _array("_tasklane_words", words)
        + _array("_tasklane_options", options)
        + _array("_tasklane_values", values)
        + _FUNCTION
    )


def _entry(key: str, items: list[str]) -> str:
    return f"    [{shlex.quote(key)}]={shlex.quote(' '.join(items))}\n"


def _array(name: str, entries: list[str]) -> str:
    return f"typeset -gA {name}\n{name}=(\n{''.join(entries)})\n"


# Subscripts are unquoted: zsh would take the quotes as part of the key, bash splits nothing
# there. The path is the program and every word before the cursor that is a subcommand of the path
# so far; after an option that takes a value come its choices (or files), else the path's
# options for a word starting with '-', and its subcommands and positional words otherwise.
_FUNCTION = """\
_tasklane() {
    [[ -n ${ZSH_VERSION-} ]] && setopt local_options ksh_arrays
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" path=tasklane i word
    (( COMP_CWORD > 0 )) && prev="${COMP_WORDS[COMP_CWORD-1]}"
    for (( i = 1; i < COMP_CWORD; i++ )); do
        word="${COMP_WORDS[i]}"
        [[ -n "${_tasklane_options[$path $word]+set}" ]] && path="$path $word"
    done
    COMPREPLY=()
    if [[ "$prev" == -* && -n "${_tasklane_values[$path $prev]+set}" ]]; then
        local values="${_tasklane_values[$path $prev]}"
        if [[ -n "$values" ]]; then
            COMPREPLY=( $(compgen -W "$values" -- "$cur") )
        else
            COMPREPLY=( $(compgen -f -- "$cur") )
        fi
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "${_tasklane_options[$path]}" -- "$cur") )
    else
        COMPREPLY=( $(compgen -W "${_tasklane_words[$path]}" -- "$cur") )
    fi
    return 0
}
complete -o default -F _tasklane tasklane
"""


def add_completion(commands_: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane completion bash|zsh`."""
    p = commands_.add_parser(
        "completion",
        parents=[common],
        help="print a shell completion script (bash or zsh)",
        description="Print the completion script for SHELL, for every subcommand, option, "
        "KIND and option value. Load it in the current shell with `source <(tasklane "
        "completion bash)` (or zsh), or for good by adding that line to ~/.bashrc (~/.zshrc).",
    )
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    p.set_defaults(handler=completion)


def completion(args: argparse.Namespace) -> int:
    from controlplane.cli import build_parser  # the whole tree, built once more here
    from controlplane.cli.client import output

    output(script(build_parser(), args.shell))
    return 0
