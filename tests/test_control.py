"""The control socket: authenticated kills from other processes (and other OS users).

The host side runs in this process (a real ``Terminator`` with ``serve_control``);
clients are real processes: the ``termsafe`` command, run as root or, through
``os.setuid`` in a child, as the unprivileged user ``nobody``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WAIT, Audit, Job, Jobs, TermFactory

import termsafe as ts
from termsafe._control import AccessPolicy, socket_path_for
from termsafe._procs import current_identity
from termsafe._store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
ADMIN = ts.Principal("ops", roles=["admin"])
as_root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the other-user client drops to uid 65534 with setuid"
)


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A TERMSAFE_HOME other users can traverse (0o711) with a short path for sockets."""
    path = Path(tempfile.mkdtemp(prefix="ts-ctl-", dir="/tmp"))
    path.chmod(0o711)
    monkeypatch.setenv("TERMSAFE_HOME", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(home: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(home / "store.sqlite3")
    yield s
    s.close()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m termsafe ARGS`` in a fresh interpreter, as this user."""
    return subprocess.run(
        [sys.executable, "-m", "termsafe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


AS_NOBODY = textwrap.dedent(
    """
    import os, sys
    import termsafe._cli as cli
    import termsafe._control, termsafe._exceptions
    # Load what the command needs while the interpreter's files are still
    # readable: the unprivileged user cannot read a root-owned Python install.
    cli._parser().format_help()
    import termsafe._store, termsafe._recovery
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def cli_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """The termsafe command run by a process that became uid/gid 65534 before connecting."""
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


class Hosted:
    """Thread workflows that sleep until killed, on one terminator."""

    def __init__(self, term: ts.Terminator, jobs: Jobs) -> None:
        self.term = term
        self.jobs = jobs
        self.started: list[Job[None]] = []
        self.release = threading.Event()

    def start(
        self, wid: str, *, owner: str | None = None, team: str | None = None, section: bool = False
    ) -> None:
        """Start workflow ``wid``; with ``section``, it sits in an fs section until ``release``."""
        ready = threading.Event()

        def body() -> None:
            with self.term.workflow(wid, owner=owner, team=team):
                if section:
                    with ts.critical_section("fs", grace=30):
                        ready.set()
                        assert self.release.wait(WAIT)
                ready.set()
                while True:
                    ts.sleep(30)

        self.started.append(self.jobs.start(body, name=f"wf-{wid}"))
        assert ready.wait(WAIT)

    def stop_all(self) -> None:
        self.release.set()
        self.term.terminate_all("test over")
        for job in self.started:
            job.result()


@pytest.fixture
def hosted(make_term: TermFactory, jobs: Jobs, store: SQLiteStore) -> Iterator[Hosted]:
    term = make_term(store=store)
    h = Hosted(term, jobs)
    yield h
    h.stop_all()


def _audit(h: Hosted) -> Audit:
    sink = h.term.sink
    assert isinstance(sink, ts.MemorySink)
    return Audit(h.term, sink)


class TestAccessPolicy:
    def test_default_makes_root_admin_and_others_plain_users(self) -> None:
        """Without a policy file, root is admin and any other user is a principal with no roles."""
        policy = AccessPolicy()
        assert ts.Principal("root", roles=["admin"]) == policy.principal("root", 0)
        assert ts.Principal("alice") == policy.principal("alice", 1000)

    def test_file_format_grants_roles_teams_and_admins(self) -> None:
        """The JSON format maps users to roles and teams and names the admins."""
        policy = AccessPolicy.from_json(
            '{"users": {"alice": {"roles": ["team-lead"], "teams": ["data"]}}, "admins": ["ops"]}'
        )
        assert ts.Principal("alice", roles=["team-lead"], teams=["data"]) == policy.principal(
            "alice"
        )
        assert ts.Principal("ops", roles=["admin"]) == policy.principal("ops")
        assert ts.Principal("root") == policy.principal("root", 0)

    @pytest.mark.parametrize(
        ("text", "named"),
        [
            ('{"user": {}}', "'user'"),
            ('{"users": {"bob": {"roles": "admin"}}}', "'admin'"),
            ('{"users": {"bob": {"role": []}}}', "'role'"),
            ('{"admins": "root"}', "'root'"),
            ("[1]", "[1]"),
            ("{", "not JSON"),
        ],
    )
    def test_bad_files_are_rejected_naming_the_problem(self, text: str, named: str) -> None:
        """A malformed policy is refused with a message naming the bad value."""
        with pytest.raises(ts.ConfigurationError, match=named.replace("[", r"\[")):
            AccessPolicy.from_json(text, "policy.json")


class TestServeControl:
    def test_live_workflows_are_registered_with_socket_and_os_owner(
        self, hosted: Hosted, store: SQLiteStore
    ) -> None:
        """Every workflow is in the runs table with the socket path; no owner means the OS user."""
        hosted.start("before")
        with ts.serve_control(hosted.term) as server:
            hosted.start("after", owner="alice", team="data")
            assert server.flush(WAIT)
            runs = {r.workflow_id: r for r in store.runs(live_only=True)}
            assert {"before", "after"} == set(runs)
            assert server.path == runs["after"].info["socket"]
            assert current_identity() == runs["after"].process
            assert ("root", None) == (runs["before"].owner, runs["before"].team)
            assert ("alice", "data") == (runs["after"].owner, runs["after"].team)
            hosted.stop_all()
            assert server.flush(WAIT)
        assert {"terminated"} == {r.state for r in store.runs()}
        assert not os.path.exists(server.path)

    def test_owner_kills_from_the_command_line(self, hosted: Hosted, store: SQLiteStore) -> None:
        """``termsafe kill ID --reason`` by the owner is accepted at once and the workflow ends."""
        with ts.serve_control(hosted.term) as server:
            hosted.start("w1")
            assert server.flush(WAIT)
            result = cli("kill", "w1", "--reason", "deploy", "--json")
            assert 0 == result.returncode, result.stderr
            answer = json.loads(result.stdout)
            assert ("allowed", "OK", "root") == (
                answer["decision"],
                answer["reason"],
                answer["principal"]["id"],
            )
            wf = hosted.term.get("w1")
            assert wf.done_event().wait(WAIT)
            assert ts.WorkflowState.TERMINATED == wf.state
            events = _audit(hosted).of("control_request", "w1")
            assert [0] == [e.details["peer"]["uid"] for e in events]
            assert server.flush(WAIT)
        assert ["terminated"] == [r.state for r in store.runs() if r.workflow_id == "w1"]

    @as_root_only
    def test_other_user_is_refused_and_audited_with_real_identity(
        self, hosted: Hosted, home: Path
    ) -> None:
        """A kill by uid 65534 is refused (exit 3) and the trail names nobody, uid and pid."""
        with ts.serve_control(hosted.term) as server:
            hosted.start("w1", owner="alice")
            result = cli_as_nobody("kill", "w1", "--reason", "mine now", "--socket", server.path)
            assert 3 == result.returncode, result.stdout + result.stderr
            assert "Insufficient permissions" in result.stdout
            assert ts.WorkflowState.RUNNING == hosted.term.get("w1").state
            audit = _audit(hosted)
            (refused,) = audit.of("kill_refused", "w1")
            assert ("nobody", "mine now") == (refused.actor and refused.actor["id"], refused.reason)
            (request,) = audit.of("control_request", "w1")
            peer = request.details["peer"]
            assert (NOBODY, NOBODY, "nobody", "refused") == (
                peer["uid"],
                peer["gid"],
                peer["user"],
                request.details["decision"],
            )
            assert peer["pid"] > 0

    @as_root_only
    def test_other_user_may_kill_what_they_own(self, hosted: Hosted) -> None:
        """The OS user named as owner may kill the workflow from their own account."""
        with ts.serve_control(hosted.term) as server:
            hosted.start("theirs", owner="nobody")
            result = cli_as_nobody("kill", "theirs", "--reason", "done", "--socket", server.path)
            assert 0 == result.returncode, result.stdout + result.stderr
            assert hosted.term.get("theirs").done_event().wait(WAIT)

    @as_root_only
    def test_policy_file_makes_a_team_lead_and_is_reread(self, hosted: Hosted, home: Path) -> None:
        """A policy file written while serving makes nobody a team lead of the workflow's team."""
        with ts.serve_control(hosted.term) as server:
            hosted.start("etl", owner="alice", team="data")
            refused = cli_as_nobody("kill", "etl", "--reason", "x", "--socket", server.path)
            assert 3 == refused.returncode, refused.stdout + refused.stderr
            (home / "policy.json").write_text(
                json.dumps({"users": {"nobody": {"roles": ["team-lead"], "teams": ["data"]}}})
            )
            allowed = cli_as_nobody("kill", "etl", "--reason", "x", "--socket", server.path)
            assert 0 == allowed.returncode, allowed.stdout + allowed.stderr
            assert hosted.term.get("etl").done_event().wait(WAIT)

    def test_broken_policy_file_grants_nothing(self, hosted: Hosted, home: Path) -> None:
        """A policy file that does not parse fails closed: root loses admin, and is told why."""
        (home / "policy.json").write_text("{not json")
        with ts.serve_control(hosted.term) as server:
            hosted.start("w1", owner="alice")
            with ts.ControlClient(server.path) as client:
                answer = client.kill("w1", reason="x")
            assert ("refused", "Insufficient permissions") == (answer.decision, answer.reason)
            assert answer.note is not None
            assert "policy.json" in answer.note

    def test_kill_inside_critical_section_is_deferred(self, hosted: Hosted) -> None:
        """A kill that arrives inside a critical section is accepted as deferred (exit 0)."""
        with ts.serve_control(hosted.term):
            hosted.start("busy", section=True)
            result = cli("kill", "busy", "--reason", "later")
            assert 0 == result.returncode, result.stderr
            assert "deferred" in result.stdout
            hosted.release.set()
            wf = hosted.term.get("busy")
            assert wf.done_event().wait(WAIT)
            assert ts.WorkflowState.TERMINATED == wf.state

    def test_unknown_and_unreachable_workflows_exit_4(self, hosted: Hosted) -> None:
        """No such workflow, or a host that stopped listening, both exit 4 and say why."""
        with ts.serve_control(hosted.term) as server:
            hosted.start("w1")
            assert server.flush(WAIT)
            missing = cli("kill", "nope", "--reason", "x")
        assert 4 == missing.returncode
        assert "'nope'" in missing.stderr
        gone = cli("kill", "w1", "--reason", "x")
        assert 4 == gone.returncode
        assert "termsafe recover" in gone.stderr

    def test_kill_asks_the_hosts_and_needs_no_store(self, hosted: Hosted, home: Path) -> None:
        """With a host that answers, kill needs no store, and a dead host's socket is skipped."""
        with ts.serve_control(hosted.term):
            hosted.start("w1")
            # A home with the control folder and no store at all.
            bare = Path(tempfile.mkdtemp(prefix="ts-bare-", dir="/tmp"))
            try:
                (bare / "control").symlink_to(home / "control")
                dead = socket.socket(socket.AF_UNIX)
                dead.bind(str(home / "control" / "1-1.sock"))
                dead.close()  # the file stays, nobody listens: as after a SIGKILL
                result = subprocess.run(
                    [sys.executable, "-m", "termsafe", "kill", "w1", "--reason", "no store"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                    env={**os.environ, "PYTHONPATH": str(ROOT), "TERMSAFE_HOME": str(bare)},
                )
            finally:
                shutil.rmtree(bare)
            assert 0 == result.returncode, result.stderr
            assert "kill of 'w1' accepted" in result.stdout
            assert not (bare / "store.sqlite3").exists()
            wf = hosted.term.get("w1")
            assert wf.done_event().wait(WAIT)
            assert "no store" == wf.kill_reason

    def test_the_commands_json_answer_is_the_kill_answer(self, hosted: Hosted) -> None:
        """``kill --json`` prints what ``KillAnswer.as_dict()`` gives for the same decision."""
        with ts.serve_control(hosted.term) as server:
            result = cli("kill", "nope", "--reason", "x", "--json", "--socket", server.path)
            assert 4 == result.returncode, result.stderr
            printed = json.loads(result.stdout)
            with ts.ControlClient(server.path) as client:
                answer = client.kill("nope", reason="x").as_dict()
        assert os.getpid() == answer["peer"].pop("pid")
        assert os.getpid() != printed["peer"].pop("pid")
        assert answer == printed
        assert ("refused", "Workflow not found") == (answer["decision"], answer["reason"])

    def test_status_and_ps_over_the_socket(self, hosted: Hosted) -> None:
        """status and ps report live workflows; status of an unknown id is None."""
        with ts.serve_control(hosted.term) as server:
            hosted.start("w1", owner="alice", team="data")
            with ts.ControlClient(server.path) as client:
                status = client.status("w1")
                assert status is not None
                assert ("alice", "data", "running", os.getpid()) == (
                    status["owner"],
                    status["team"],
                    status["state"],
                    status["pid"],
                )
                assert ["w1"] == [w["workflow_id"] for w in client.ps()]
                assert client.status("nope") is None

    def test_bad_requests_get_errors_naming_the_value(self, hosted: Hosted) -> None:
        """A request that is not JSON, has an unknown op or a bad field gets an error."""
        with ts.serve_control(hosted.term) as server:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(WAIT)
            sock.connect(server.path)
            with sock, sock.makefile("rwb") as f:
                answers = []
                for line in (
                    b"hello\n",
                    b'{"op": "explode"}\n',
                    b'{"op": "kill", "workflow_id": 5}\n',
                    b'{"op": "kill", "workflow_id": "w", "force": "yes"}\n',
                ):
                    f.write(line)
                    f.flush()
                    answers.append(json.loads(f.readline()))
        assert [False] * 4 == [a["ok"] for a in answers]
        assert "b'hello'" in answers[0]["error"]
        assert "'explode'" in answers[1]["error"]
        assert "5" in answers[2]["error"]
        assert "'yes'" in answers[3]["error"]

    def test_dependency_notice_is_checked_against_the_store(
        self, hosted: Hosted, store: SQLiteStore
    ) -> None:
        """A dependency_ended notice cascades only when the store shows the dependency killed."""
        with ts.serve_control(hosted.term) as server:
            ready = threading.Event()

            def dependent() -> None:
                with hosted.term.workflow("report", depends_on=["extract"]):
                    ready.set()
                    while True:
                        ts.sleep(30)

            hosted.jobs.start(dependent)
            assert ready.wait(WAIT)
            with ts.ControlClient(server.path) as client:
                with pytest.raises(ts.ControlError, match="'extract'"):
                    client.request({"op": "dependency_ended", "dependency": "extract"})
                store.run_register(
                    "r-extract", "extract", owner="x", team=None, state="running", info={}
                )
                store.run_set_state("r-extract", "killed", final=True)
                answer = client.request({"op": "dependency_ended", "dependency": "extract"})
            assert ["report"] == answer["notified"]
            wf = hosted.term.get("report")
            assert wf.done_event().wait(WAIT)
            assert ts.WorkflowState.TERMINATED == wf.state
            assert "dependency 'extract' was killed" == wf.kill_reason

    def test_runs_that_end_before_they_are_written_are_written_once_ended(
        self, make_term: TermFactory, store: SQLiteStore, home: Path
    ) -> None:
        """Workflows that start and end while the store is locked are each written once, ended."""
        term = make_term(store=store)
        blocker = sqlite3.connect(home / "store.sqlite3", isolation_level=None)
        try:
            with ts.serve_control(term) as server:
                blocker.execute("BEGIN IMMEDIATE")  # the registry's writer waits for it
                for i in range(50):
                    with term.workflow(f"q-{i}"):
                        pass
                assert term.flush(WAIT)  # every start and end reached the registry
                blocker.execute("COMMIT")
                assert server.flush(WAIT)
        finally:
            blocker.close()
        runs = store.runs()
        assert sorted(f"q-{i}" for i in range(50)) == sorted(r.workflow_id for r in runs)
        assert {"completed"} == {r.state for r in runs}
        assert all(r.ended_at is not None and r.ended_at >= r.started_at for r in runs)
        assert 50 == len({r.run_id for r in runs})
        assert all(32 == len(r.run_id) and 4 == uuid.UUID(r.run_id).version for r in runs)

    def test_one_server_per_terminator(self, hosted: Hosted) -> None:
        """A second serve_control on a served terminator is refused, naming the socket."""
        server = ts.serve_control(hosted.term)
        try:
            with pytest.raises(ts.ConfigurationError, match=server.path):
                ts.serve_control(hosted.term)
        finally:
            server.close()
        with ts.serve_control(hosted.term):
            pass  # once closed, it may be served again

    def test_long_home_path_still_works(
        self, make_term: TermFactory, tmp_path: Path, jobs: Jobs
    ) -> None:
        """A socket path longer than sun_path allows is bound and reached through its folder."""
        deep = tmp_path / ("d" * 60) / ("e" * 60)
        deep.mkdir(parents=True)
        store = SQLiteStore(deep / "store.sqlite3")
        try:
            term = make_term(store=store)
            with ts.serve_control(term) as server:
                assert len(server.path) > 108
                with ts.ControlClient(server.path) as client:
                    assert [] == client.ps()
                assert socket_path_for(deep, current_identity()) == Path(server.path)
        finally:
            store.close()


HOST = textwrap.dedent(
    """
    import sys
    import anyio
    import termsafe as ts

    n, prefix = int(sys.argv[1]), sys.argv[2]
    term = ts.Terminator(phases=ts.Phases(5, 5), sink=ts.MemorySink())

    def report(event: ts.AuditEvent) -> None:
        if event.type == "workflow_finished":
            print("finished", event.workflow_id, event.state, event.reason, flush=True)

    term.add_event_listener(report)

    async def main() -> None:
        server = ts.serve_control(term)
        started = 0
        all_started = anyio.Event()

        async def one(i: int) -> None:
            nonlocal started
            async with term.workflow(f"{prefix}-{i}"):
                started += 1
                if started == n:
                    all_started.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
            await all_started.wait()
            assert server.flush(60)
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
            term.terminate_all("host shutting down")
        term.flush(30)
        assert server.flush(60)
        server.close()
        term.close()

    anyio.run(main)
    """
)


class TestManyHosts:
    def test_thousand_workflows_across_four_processes(self, home: Path, store: SQLiteStore) -> None:
        """1,000 workflows in 4 processes: ps lists them all, and kill reaches the right one."""
        with _hosts([(f"h{i}", 250) for i in range(4)]) as hosts:
            listed = cli("ps", "--json")
            assert 0 == listed.returncode, listed.stderr
            rows = json.loads(listed.stdout)
            assert 1000 == len(rows)
            assert {f"h{i}-{j}" for i in range(4) for j in range(250)} == {
                r["workflow_id"] for r in rows
            }
            assert {True} == {r["alive"] for r in rows}
            killed = cli("kill", "h2-117", "--reason", "one of many")
            assert 0 == killed.returncode, killed.stderr
            assert hosts[2].stdout is not None
            assert "finished h2-117 terminated one of many\n" == hosts[2].stdout.readline()
        assert [0, 0, 0, 0] == [h.returncode for h in hosts]
        assert {"terminated"} == {r.state for r in store.runs()}

    def test_a_stopped_host_does_not_stop_a_kill_elsewhere(
        self, home: Path, store: SQLiteStore
    ) -> None:
        """With one host stopped (SIGSTOP), a kill of another host's workflow still lands."""
        with _hosts([("a", 3), ("b", 3)]) as hosts:
            os.kill(hosts[0].pid, signal.SIGSTOP)
            try:
                killed = cli("kill", "b-1", "--reason", "elsewhere")
            finally:
                os.kill(hosts[0].pid, signal.SIGCONT)
            assert 0 == killed.returncode, killed.stderr
            assert hosts[1].stdout is not None
            assert "finished b-1 terminated elsewhere\n" == hosts[1].stdout.readline()

    def test_one_workflow_id_in_two_hosts_needs_a_run_id(
        self, home: Path, store: SQLiteStore
    ) -> None:
        """A workflow id live in two hosts is refused (exit 2) naming both runs; a run id kills."""
        with _hosts([("dup", 2), ("dup", 2)]) as hosts:
            ambiguous = cli("kill", "dup-0", "--reason", "which")
            assert 2 == ambiguous.returncode, ambiguous.stderr
            runs = [r for r in store.runs(live_only=True) if r.workflow_id == "dup-0"]
            assert 2 == len(runs)
            assert all(r.run_id in ambiguous.stderr for r in runs)
            (second,) = [r for r in runs if r.process.pid == hosts[1].pid]
            killed = cli("kill", second.run_id, "--reason", "this one")
            assert 0 == killed.returncode, killed.stderr
            assert hosts[1].stdout is not None
            assert "finished dup-0 terminated this one\n" == hosts[1].stdout.readline()


@contextlib.contextmanager
def _hosts(spec: list[tuple[str, int]]) -> Iterator[list[subprocess.Popen[str]]]:
    """Host processes running HOST, one per ``(prefix, count)``; shut down on exit."""
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", HOST, str(n), prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for prefix, n in spec
    ]
    try:
        for host in hosts:
            assert host.stdout is not None
            assert "ready\n" == host.stdout.readline()
        yield hosts
    finally:
        for host in hosts:
            assert host.stdin is not None
            host.stdin.close()
        for host in hosts:
            host.wait(60)
            if host.stdout is not None:
                host.stdout.read()
                host.stdout.close()


class TestFindHostOutOfDescriptors:
    def test_no_descriptor_left_means_ask_the_store(self, tmp_path: Path) -> None:
        """find_host with no file descriptor left answers None (the store decides), not EMFILE."""
        folder = tmp_path / "sockets"
        folder.mkdir()
        listeners = []
        try:
            for i in range(8):  # hosts nobody answers for: the scan must give up, not crash
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(str(folder / f"host-{i}.sock"))
                sock.listen(8)
                listeners.append(sock)
            code = textwrap.dedent(
                f"""
                import os, resource, sys
                from termsafe._client import find_host
                # Room for a few more descriptors than are open now, not for 8 sockets.
                opened = len(os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 3, opened + 3))
                print(find_host({str(folder)!r}, "nightly", timeout=5.0))
                """
            )
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
            )
            assert (0, "None") == (done.returncode, done.stdout.strip()), done.stderr
        finally:
            for sock in listeners:
                sock.close()


class TestSilentHost:
    def test_timeout_after_sending_says_the_request_may_still_act(self, tmp_path: Path) -> None:
        """A host that takes the request but never answers: the error says it may still act."""
        path = tmp_path / "silent.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            listener.listen(1)  # connects and takes the bytes; nobody ever reads them
            with (
                ts.ControlClient(str(path), timeout=0.2) as client,
                pytest.raises(ts.ControlError, match="was sent and may still take effect"),
            ):
                client.request({"op": "status", "workflow_id": "nightly"})
        finally:
            listener.close()
