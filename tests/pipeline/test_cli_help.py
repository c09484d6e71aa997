"""The command line helps: a version, a description for every command, help text for every
flag (with its default where it has one), and nothing heavy imported to print it."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lorafleet.worker.cli import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version(lorafleet_stdout):
    out = lorafleet_stdout("--version")
    assert out.startswith("lorafleet ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_and_flag_says_what_it_does(name):
    command = _commands()[name]
    assert command.description, f"lorafleet {name} has no description"
    assert command.format_help()  # renders (argparse %-formats every help text)
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help, f"lorafleet {name} {flag} has no help text"
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in action.help, f"lorafleet {name} {flag} hides its default"


#: What printing help must not load: the engine's stack and the queue worker's job stack
#: (arq itself is in: the producer's client imports it, and ``import arq`` loads its worker).
HEAVY = (
    "torch",
    "transformers",
    "triton",
    "prometheus_client",
    "lorafleet.worker.serve.jobs",
    "lorafleet.worker.serve.worker_settings",
    "lorafleet.worker.process.engine_process",
)


@pytest.mark.parametrize("argv", [["--help"], ["worker", "--help"], ["loadtest", "--help"]])
def test_help_loads_neither_torch_nor_the_job_stack(argv):
    probe = (
        "import sys\n"
        "from lorafleet.worker.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage: lorafleet" in res.stdout
