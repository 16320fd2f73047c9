"""The ``hiedit`` command line as a whole (service/cli/__init__.py): what every subcommand's --help says."""
from __future__ import annotations

import re

import pytest

from service.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_states_each_default_once_and_never_none(command, capsys):
    """`hiedit COMMAND --help` appends an option's default where it says something: not "(default: None)"
    for an unset option, not a second default after a help text that states its own."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    options = re.split(r"\s(?=--?[a-z])", text.split("options:", 1)[1])
    for option in options:
        assert option.count("(default") <= 1, option
