"""The termsafe command: the demo and the audit tools, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import termsafe as ts
from termsafe import _cli as cli
from termsafe._audit import utc_timestamp
from termsafe._store import default_home

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "termsafe", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def _trail(path: Path, n: int = 5) -> None:
    sink = ts.JsonlSink(path, fsync="never")
    for i in range(n):
        sink.emit(
            ts.AuditEvent(
                seq=i + 1,
                timestamp=utc_timestamp(),
                type="kill_requested",
                workflow_id=f"w{i}",
                actor={"id": "alice", "kind": "user", "roles": [], "teams": []},
                reason="test",
                state="terminating",
                details={},
            )
        )
    sink.close()


class TestDemo:
    def test_demo_reaches_a_safe_verdict(self) -> None:
        """The demo narrates the kill, prints the verified trail and ends SAFE with exit 0."""
        result = _cli("demo")
        assert 0 == result.returncode, result.stdout + result.stderr
        out = result.stdout
        for marker in (
            "kill_requested",
            "kill_deferred",
            "kill_effective",
            "hook_ran",
            "workflow_finished",
            "chain intact",
        ):
            assert marker in out
        assert out.rstrip().splitlines()[-1].startswith("verdict: SAFE")
        assert "[FAIL]" not in out


class TestAuditCommands:
    def test_verify_ok_and_json(self, tmp_path: Path) -> None:
        """audit verify accepts an intact trail, in text and JSON."""
        path = tmp_path / "audit.jsonl"
        _trail(path)
        result = _cli("audit", "verify", str(path))
        assert (0, "OK") == (result.returncode, result.stdout.split(":")[0])
        report = json.loads(_cli("audit", "verify", str(path), "--json").stdout)
        assert (True, 5) == (report["ok"], report["lines"])

    def test_verify_names_the_edited_line(self, tmp_path: Path) -> None:
        """audit verify exits 1 and names the first bad line of an edited trail."""
        path = tmp_path / "audit.jsonl"
        _trail(path)
        lines = path.read_text().splitlines()
        lines[2] = lines[2].replace('"reason":"test"', '"reason":"nothing to see"')
        path.write_text("\n".join(lines) + "\n")
        result = _cli("audit", "verify", str(path), "--json")
        report = json.loads(result.stdout)
        assert (1, False, 3, "edited") == (
            result.returncode,
            report["ok"],
            report["first_bad_line"],
            report["kind"],
        )

    def test_tail_prints_the_last_events(self, tmp_path: Path) -> None:
        """audit tail -n 2 prints the last two events."""
        path = tmp_path / "audit.jsonl"
        _trail(path)
        out = _cli("audit", "tail", str(path), "-n", "2", "--json").stdout.splitlines()
        assert ["w3", "w4"] == [json.loads(line)["workflow_id"] for line in out]

    def test_missing_file_is_a_usage_error_naming_it(self, tmp_path: Path) -> None:
        """A missing trail exits 2 with an error naming the path."""
        missing = tmp_path / "nope.jsonl"
        result = _cli("audit", "verify", str(missing))
        assert 2 == result.returncode
        assert str(missing) in result.stderr


class TestParser:
    @pytest.mark.parametrize("command", cli.COMMANDS)
    def test_a_command_built_alone_has_the_full_parsers_help(
        self, command: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A command's parser built alone prints the help the full parser prints for it."""
        helps = []
        for parser in (cli._parser(), cli._parser(command)):
            with pytest.raises(SystemExit) as exited:
                parser.parse_args([command, "--help"])
            assert 0 == exited.value.code
            helps.append(capsys.readouterr().out)
        assert helps[0] == helps[1]
        assert f"usage: termsafe {command}" in helps[0]

    def test_kill_parses_alike_either_way(self) -> None:
        """A kill command line gives the same arguments with the full parser and with kill's."""
        argv = ["kill", "w1", "--reason", "why", "--force", "--timeout", "2.5", "--json"]
        assert vars(cli._parser().parse_args(argv)) == vars(cli._parser("kill").parse_args(argv))

    def test_unknown_command_is_refused_listing_the_commands(self) -> None:
        """An unknown command exits 2 and the error lists the known ones."""
        result = _cli("kil", "w1")
        assert 2 == result.returncode
        assert "invalid choice: 'kil'" in result.stderr
        assert all(command in result.stderr for command in cli.COMMANDS)


class TestHome:
    @pytest.mark.parametrize("value", [None, "", "/tmp/ts-home", "relative/home"])
    def test_the_command_finds_the_stores_home(
        self, value: str | None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The command's TERMSAFE_HOME (read without importing the store) is the store's."""
        if value is None:
            monkeypatch.delenv("TERMSAFE_HOME", raising=False)
        else:
            monkeypatch.setenv("TERMSAFE_HOME", value)
        assert default_home() == Path(cli._home())
