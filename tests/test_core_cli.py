import argparse
import importlib
import subprocess
import sys

import pytest

import dpstack
from dpstack import cli
from dpstack.bench_cli import BENCHES
from dpstack.cli import COMMANDS, Command, build_parser, main


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0, argv
    return capsys.readouterr().out


def test_help_lists_every_command_in_the_table(capsys):
    out = help_of([], capsys)
    for name, cmd in COMMANDS.items():
        assert f"    {name} " in out and cmd.help[:30] in out.replace("\n", " ").replace("  ", " "), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_runs(name, capsys):
    assert help_of([name], capsys).startswith(f"usage: dpstack {name}")


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_each_bench_help_runs_under_its_dpstack_name(name, capsys):
    assert help_of(["bench", name], capsys).startswith(f"usage: dpstack bench {name}")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dpstack {dpstack.__version__}"


def test_a_command_whose_module_is_missing_names_its_extra(monkeypatch, capsys):
    """A broken or partial install shows the command and says what to install, never drops it."""
    monkeypatch.setitem(COMMANDS, "ghost", Command("dpstack.sim.not_here", "a command that is not installed", "sim"))
    assert "ghost" in help_of([], capsys)
    assert main(["ghost", "--task", "lift"]) == 3
    err = capsys.readouterr().err
    assert "dpstack ghost:" in err and "pip install 'dpstack[sim]'" in err and "dpstack.sim.not_here" in err


def test_help_does_not_import_torch_or_robosuite():
    code = ("import sys; from dpstack.cli import build_parser; build_parser(); "
            "bad = [m for m in ('torch', 'mujoco', 'robosuite') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_command_module_follows_the_contract():
    for name, cmd in COMMANDS.items():
        module = importlib.import_module(cmd.module)
        assert callable(module.add_arguments) and callable(module.run), name
    for name, (module_name, _) in BENCHES.items():
        module = importlib.import_module(module_name)
        assert callable(module.build_parser) and callable(module.main), name


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser a user meets: dpstack, each command, their actions, and each bench."""
    out, todo = {}, [("dpstack", build_parser())]
    while todo:
        name, parser = todo.pop()
        out[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    for name, (module_name, _) in BENCHES.items():
        out[f"dpstack bench {name}"] = importlib.import_module(module_name).build_parser()
    return out


def visible_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def test_every_option_has_help_text():
    missing = [f"{name}: {'/'.join(a.option_strings) or a.dest}" for name, parser in all_parsers().items()
               for a in visible_options(parser) if not a.help]
    assert not missing, "give these options help text:\n" + "\n".join(missing)


# One spelling per idea across commands; the old spellings still parse, hidden from --help.
OLD_SPELLINGS = {"--endpoint": "--connect", "--server-threads": "--threads", "--json": "--out", "--summary": "--out",
                 "--no-progress": "--quiet"}


def test_one_vocabulary_across_commands():
    shown = [f"{name}: {s}" for name, parser in all_parsers().items() for a in visible_options(parser)
             for s in a.option_strings if s in OLD_SPELLINGS]
    assert not shown, "use the one spelling (old -> new: %s):\n%s" % (OLD_SPELLINGS, "\n".join(shown))


@pytest.mark.parametrize("command, old, new, value", [
    (["bridge", "--config", "sim"], "--endpoint", "--connect", "tcp://127.0.0.1:1"),
    (["bridge", "--config", "sim"], "--summary", "--out", "s.json"),
    (["eval", "pkg", "--out", "o"], "--server-threads", "--threads", "3"),
    (["train", "--dataset", "d", "--out", "o"], "--no-progress", "--quiet", None),
    (["collect", "--task", "lift", "--episodes", "1", "--out", "o"], "--no-progress", "--quiet", None),
])
def test_old_spellings_still_parse_as_the_new_ones(command, old, new, value):
    parser = build_parser()
    extra = [] if value is None else [value]
    assert parser.parse_args([*command, old, *extra]) == parser.parse_args([*command, new, *extra])
    assert parser.parse_args([*command, new, *extra]) != parser.parse_args(command)


def test_bench_train_takes_out_and_the_old_json():
    parser = importlib.import_module(BENCHES["train"][0]).build_parser()
    assert parser.parse_args(["--json", "a.json"]).out == parser.parse_args(["--out", "a.json"]).out
