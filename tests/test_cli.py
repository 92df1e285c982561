"""The `jaxbert` command: usage, unknown commands, one-line config errors, `info`."""

from __future__ import annotations

import subprocess
import sys

from jaxbert import cli


def test_usage_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_every_command_resolves_or_says_not_implemented(capsys, monkeypatch):
    for name in cli.COMMANDS:
        entry = cli._resolve(name)
        if entry is None:
            assert cli.main([name]) == 2
            assert f"jaxbert {name}: not implemented yet" in capsys.readouterr().err


def test_info_lists_presets_with_parameter_counts(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "mini", "small", "medium", "base"):
        assert f"\n{name} " in out
    assert "109,483,776" in out  # pre-LN base with the 30522 vocabulary and biases, as BERT-base (see test_model)


def test_console_script_reports_config_errors_in_one_line():
    code = ("import sys; from jaxbert import cli, config\n"
            "def fake(argv):\n    config.load('base', argv)\n    return 0\n"
            "cli._resolve = lambda name: fake\n"
            "sys.exit(cli.main(['pretrain', 'model.heads=7']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'model.heads'" in lines[0]
