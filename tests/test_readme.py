"""The README's examples run: the Python client snippet against a real server, and every
`rnnzoo` subcommand it shows exists."""

import re
from pathlib import Path

import numpy as np
import pytest

from rnnzoo.cli import main
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport.server import BackgroundServer, ServerConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_commands_exist():
    commands = re.findall(r"^rnnzoo ((?:zoo )?[a-z]+)", README, flags=re.M)
    assert {"zoo list", "train", "export", "verify", "serve", "stream", "generate", "bench"} <= set(
        commands
    )
    for cmd in sorted(set(commands)):
        with pytest.raises(SystemExit) as exc:
            main([*cmd.split(), "--help"])
        assert exc.value.code == 0, cmd


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, capsys):
    # the client example, then StepMany's (it reuses the first one's names): one namespace
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 2
    assert (
        main(
            [
                "zoo",
                "build",
                "--quick",
                "--only",
                "sine-rnn",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    # as scripts/main.sh serves it: sessions in an embedded state store
    options = RuntimeOptions(state_store=str(tmp_path / "state"))
    server = BackgroundServer(
        lambda: Runtime.from_dir(tmp_path, options), ServerConfig(port=0)
    ).start()
    try:
        capsys.readouterr()
        # The example defines TARGET itself (where `rnnzoo serve` listens by default): point
        # that one line at this test's server, and fail if the example stops defining it.
        code, n = re.subn(r"^TARGET = .*$", f"TARGET = {server.target!r}", blocks[0], flags=re.M)
        assert n == 1, "the README's Python example must define TARGET"
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        exec(compile(blocks[1], "README.md", "exec"), namespace)
        printed = capsys.readouterr().out
    finally:
        server.stop()
    match = re.search(r"forecast of the next value: (\S+)", printed)
    assert match, printed
    assert np.isfinite(float(match.group(1)))
    many = re.search(r"step_many: \[(.*)\]", printed)
    assert many, printed
    values = [float(v) for v in many.group(1).split(",")]
    assert len(values) == 3 and len(set(values)) == 1  # three fresh sessions, the same step
