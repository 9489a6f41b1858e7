import subprocess
import sys

from dpstack.cli import COMMANDS, main


def test_help_lists_the_commands_that_exist(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "dpstack" in out


def test_help_does_not_import_torch_or_robosuite():
    code = ("import sys; from dpstack.cli import build_parser; build_parser(); "
            "bad = [m for m in ('torch', 'mujoco', 'robosuite') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_command_module_follows_the_contract():
    import importlib
    for name, cmd in COMMANDS.items():
        try:
            module = importlib.import_module(cmd.module)
        except ModuleNotFoundError:
            continue  # not built yet
        assert callable(module.add_arguments) and callable(module.run), name
