"""Every command's ``--help``: each option explained, its default shown at most once."""

from __future__ import annotations

import argparse
import re

import pytest

from controlstack.cli.main import build_parser, main
from controlstack.cli.text import DefaultsFormatter


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(command path, its parser) for every sub-command, nested ones (world export) included."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [((*path, name), sub), *_commands(sub, (*path, name))]
    return out


COMMANDS = _commands(build_parser())


def _help_entries(text: str) -> dict[str, str]:
    """The help of each option in ``--help`` output, whitespace-joined, keyed by its first flag."""
    options = text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options)
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries if e.strip().startswith("-")}


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_has_help_and_one_default_at_most(path, capsys):
    parser = dict(COMMANDS)[path]
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    actions = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    for action in actions:  # options and positional arguments
        assert action.help, f"{' '.join(path)} {(action.option_strings or [action.dest])[0]} has no help text"
    options = [a for a in actions if a.option_strings]
    assert len(entries) == len(options) + 1  # + -h
    for action in options:
        entry = entries[action.option_strings[0]]
        assert entry.count("(default:") <= 1 and "(default: None)" not in entry, entry


def test_the_reported_help_texts(capsys):
    """demo's flags say their defaults; asym's --model says its own default once."""
    def help_of(*path):
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        return _help_entries(capsys.readouterr().out)

    demo = help_of("demo")
    assert demo["--out"].endswith("(default: outputs/demo)") and demo["--steps"].endswith("(default: 20)")
    assert demo["--seed"].endswith("(default: 0)") and demo["--cfg"].endswith("(default: 7.0)")
    asym = help_of("asym")
    assert asym["--model"] == "--model MODEL base model folder or file (default: the bundled model)"
    assert asym["--seed"].endswith("(default: 0)") and asym["--batch"].endswith("(default: 16)")
    generate = help_of("generate")
    assert "P@W,P@W" in generate["--control"] and generate["--negative"] == "--negative NEGATIVE negative prompt"


@pytest.mark.parametrize("default, help, shown", [
    (0, "a seed", "a seed (default: 0)"),                  # 0 is a value, though 0 == False
    (16, "samples", "samples (default: 16)"),
    (None, "the base (default: the bundled model)", "the base (default: the bundled model)"),
    ("x", "a name (Default: the first)", "a name (Default: the first)"),
    ("", "negative prompt", "negative prompt"),
    (False, "a switch", "a switch"),
    ([], "repeatable", "repeatable"),
    (3, "steps (%(default)s by default)", "steps (3 by default)"),
])
def test_defaults_formatter_adds_a_default_only_where_none_is_named(default, help, shown):
    parser = argparse.ArgumentParser(prog="p", formatter_class=DefaultsFormatter)
    parser.add_argument("--x", default=default, help=help)
    assert " ".join(parser.format_help().split()).endswith(f"--x X {shown}")
