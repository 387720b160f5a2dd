"""Matrix notifications: `serve --matrix-config`, one message per finished batch with meta.matrix.

End-to-end tests run a real head (its node is this machine) against a real Synapse
(the session fixture `synapse`) and read the message back as the user would.
"""

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import distribute
from cluster import DISTRIBUTE, HeadProcess, stop_local_head, wait_until

LOCAL_NODE = "nodes:\n  - {name: here, host: local, slots: 2}\n"


def write_config(folder, text, mode=0o600):
    path = Path(folder) / "matrix.yaml"
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


def load(folder, text, mode=0o600):
    return distribute.load_matrix_config(write_config(folder, text, mode), Path(folder) / "state")


def config_error(folder, text, mode=0o600):
    with pytest.raises(distribute.UserError) as caught:
        load(folder, text, mode)
    message = str(caught.value)
    assert "\n" not in message
    return message


def closed_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_head(config_path):
    """A head whose one node is this machine, with --matrix-config; started."""
    head = HeadProcess(None, LOCAL_NODE, dict(os.environ), extra=["--matrix-config", str(config_path)])
    return head.start()


def stop(head):
    """Stop the head, then its local node's supervisor, then clean up."""
    stop_local_head(head)


def job_file(folder, namespace, name, user, jobs):
    folder = Path(folder) / name
    folder.mkdir(parents=True)
    lines = [f"meta: {{batch_name: {name}, namespace: {namespace}, matrix: '{user}'}}", "shell:", "  jobs:"]
    lines += [f"    - {{name: {job}, command: {json.dumps(command)}}}" for job, command in jobs]
    path = folder / "distribute-jobs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def log_lines(head, needle):
    return [line for line in head.log.read_text().splitlines() if needle in line]


# --- the config file -------------------------------------------------------------

def test_a_good_config_loads_with_the_rooms_file_in_the_state_dir(tmp_path):
    config = load(tmp_path, """\
        homeserver: https://matrix.example.org/
        access_token: syt_ZGlzdHJpYnV0ZQ_secret
        """)
    assert config.homeserver == "https://matrix.example.org"
    assert config.access_token == "syt_ZGlzdHJpYnV0ZQ_secret"
    assert config.room_store == tmp_path / "state" / "matrix-rooms.json"
    assert "secret" not in repr(config)
    local = load(tmp_path, "homeserver: http://127.0.0.1:8008\naccess_token: t\nroom_store: rooms.json\n")
    assert local.room_store == tmp_path / "rooms.json"


def test_config_errors_are_one_line_naming_file_line_and_key(tmp_path):
    name = str(tmp_path / "matrix.yaml")
    assert config_error(tmp_path, "homeserver: [unclosed\n").startswith(f"{name}:2: YAML syntax error")
    assert config_error(tmp_path, "homeserver: https://m.example.org\n") == \
        f"{name}:1: missing required key 'access_token'"
    assert config_error(tmp_path, "homeserver: https://m.example.org\naccess_token: t\nroom: x\n") \
        .startswith(f"{name}:3: room: unknown key")
    assert config_error(tmp_path, "access_token: t\nhomeserver: ftp://m.example.org\n") == \
        f"{name}:2: homeserver: expected the homeserver's URL, like https://matrix.example.org"
    assert config_error(tmp_path, "access_token: t\nhomeserver: matrix.example.org\n") \
        .startswith(f"{name}:2: homeserver: expected the homeserver's URL")
    assert config_error(tmp_path, "access_token: t\nhomeserver: https://m.example.org:99999\n") \
        .startswith(f"{name}:2: homeserver: not a usable URL")
    assert config_error(tmp_path, "access_token: t\nhomeserver: http://m.example.org\n") \
        .startswith(f"{name}:2: homeserver: use https://")
    assert config_error(tmp_path, "access_token: t\nhomeserver: [a, b]\n") \
        .startswith(f"{name}:2: homeserver: expected text")
    assert config_error(tmp_path, f"{name}").startswith(f"{name}:1: expected a mapping")


def test_config_errors_never_echo_secrets(tmp_path):
    message = config_error(tmp_path, "homeserver: https://bot:hunter2@m.example.org\naccess_token: t\n")
    assert "hunter2" not in message and "no user, password" in message
    message = config_error(tmp_path, "homeserver: https://m.example.org\naccess_token: 'syt_abc def'\n")
    assert message == f"{tmp_path / 'matrix.yaml'}:2: access_token: must be one word of printable ASCII: " \
                      "the bot's access token"
    assert "syt_abc" not in message


def test_a_token_file_others_can_read_is_refused(tmp_path):
    message = config_error(tmp_path, "homeserver: https://m.example.org\naccess_token: syt_x\n", mode=0o644)
    path = tmp_path / "matrix.yaml"
    assert message == f"{path}: holds an access token but other users may read or change it (mode 0644); " \
                      f"run: chmod 600 {path}"


def test_serve_with_a_bad_config_exits_2_before_serving(tmp_path):
    config = write_config(tmp_path, "homeserver: gopher://x\naccess_token: syt_x\n")
    state = tmp_path / "state"
    done = subprocess.run(DISTRIBUTE + ["serve", "--state", str(state), "--matrix-config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"distribute: error: {config}:1: homeserver: expected the homeserver's URL, " \
                          "like https://matrix.example.org\n"
    assert not (state / "head.sock").exists()


def test_message_text_quotes_error_lines_and_the_pull_command(tmp_path):
    archive = tmp_path / "archive" / "lab" / "b"
    (archive / "bad").mkdir(parents=True)
    (archive / "bad" / "stdout.txt").write_text("step 1\nstep 2\nTraceback (most recent call last):\n"
                                                "  File \"x.py\", line 1\nValueError: mesh too coarse\n")
    notice = distribute.BatchNotice("@u:x", "lab/b", {"done": 3, "failed": 2}, 75.0, archive,
                                    [("bad", 1), ("nobuild", None)], 7)
    text = distribute.matrix_message(notice)
    assert text.splitlines()[0] == "distribute: batch lab/b finished: 3 ok, 2 failed, 0 killed in 1m15s"
    assert f"archive: {archive}" in text
    assert "  bad (exit code 1):\n    Traceback (most recent call last):\n    ValueError: mesh too coarse" in text
    assert "  nobuild: never ran" in text
    assert "  ... and 5 more" in text
    assert text.endswith("get the results:\n  distribute pull --batch lab/b")


# --- against a real homeserver -------------------------------------------------------

def test_finished_batches_reach_the_user_in_one_direct_room(synapse, tmp_path):
    user, bot = synapse.user, synapse.bot
    config = write_config(tmp_path, f"homeserver: {synapse.url}\naccess_token: {bot.access_token}\n")
    namespace = f"mx{uuid.uuid4().hex[:6]}"
    head = local_head(config)
    try:
        first = job_file(tmp_path, namespace, "first", user.user_id, [
            ("good", "echo fine > distribute_save/out.txt"),
            ("bad", "echo preparing; echo 'FATAL: mesh 42 did not converge' >&2; exit 3"),
            ("also_good", "true")])
        head.cli("add", first)
        assert head.wait_batch(f"{namespace}/first", timeout=60)["state"] != "active"
        wait_until(lambda: log_lines(head, f"told {user.user_id} that {namespace}/first"), 60,
                   f"the message about {namespace}/first\n{head.log.read_text()}")

        rooms = synapse.invited_rooms(user)
        assert len(rooms) == 1, rooms
        room = rooms[0]
        synapse.join(user, room)
        messages = synapse.messages(user, room)
        assert len(messages) == 1
        body = messages[0]["content"]["body"]
        assert messages[0]["sender"] == bot.user_id and messages[0]["content"]["msgtype"] == "m.text"
        assert body.startswith(f"distribute: batch {namespace}/first finished: 2 ok, 1 failed, 0 killed in ")
        assert f"archive: {head.archive / namespace / 'first'}" in body
        assert "  bad (exit code 3):\n    FATAL: mesh 42 did not converge" in body
        assert f"distribute pull --batch {namespace}/first" in body
        stored = json.loads((head.state / "matrix-rooms.json").read_text())
        assert stored == {bot.user_id: {user.user_id: room}}
        assert (head.state / "matrix-rooms.json").stat().st_mode & 0o777 == 0o600

        # a second batch: same room, no new one
        second = job_file(tmp_path, namespace, "second", user.user_id, [("only", "true")])
        head.cli("add", second)
        wait_until(lambda: log_lines(head, f"told {user.user_id} that {namespace}/second"), 60,
                   f"the message about {namespace}/second\n{head.log.read_text()}")
        bodies = [m["content"]["body"] for m in synapse.messages(user, room)]
        assert len(bodies) == 2 and bodies[1].startswith(f"distribute: batch {namespace}/second finished: "
                                                         "1 ok, 0 failed, 0 killed")
        assert synapse.joined_rooms(user) == [room]
        assert synapse.joined_rooms(bot) == [room]         # it would be in any room it created
        assert len(log_lines(head, "matrix: created a direct room")) == 1

        # the state file lost: the room is found again through the bot's m.direct
        (head.state / "matrix-rooms.json").unlink()
        third = job_file(tmp_path, namespace, "third", user.user_id, [("only", "true")])
        head.cli("add", third)
        wait_until(lambda: log_lines(head, f"told {user.user_id} that {namespace}/third"), 60,
                   f"the message about {namespace}/third\n{head.log.read_text()}")
        assert len(synapse.messages(user, room)) == 3
        assert synapse.joined_rooms(bot) == [room]
        assert json.loads((head.state / "matrix-rooms.json").read_text()) == {bot.user_id: {user.user_id: room}}

        # the user left: the next message comes in a new room, remembered from then on
        synapse.leave(user, room)
        fourth = job_file(tmp_path, namespace, "fourth", user.user_id, [("only", "true")])
        head.cli("add", fourth)
        wait_until(lambda: log_lines(head, f"told {user.user_id} that {namespace}/fourth"), 60,
                   f"the message about {namespace}/fourth\n{head.log.read_text()}")
        new_room = json.loads((head.state / "matrix-rooms.json").read_text())[bot.user_id][user.user_id]
        assert new_room != room and len(log_lines(head, "matrix: created a direct room")) == 2
        synapse.join(user, new_room)
        assert [m["content"]["body"].split(":")[1] for m in synapse.messages(user, new_room)] == \
            [f" batch {namespace}/fourth finished"]

        # the token is nowhere a user or an admin can read it
        outputs = [head.log.read_text(), head.cli("status", "--json").stdout, head.cli("nodes", "--json").stdout,
                   head.cli("status").stdout]
        assert all(bot.access_token not in text for text in outputs)
        assert log_lines(head, f"matrix: batch messages come from {bot.user_id} on {synapse.url}")
    finally:
        stop(head)


def test_a_dead_homeserver_costs_one_log_line_and_never_the_batch(tmp_path):
    token = "syt_" + uuid.uuid4().hex
    config = write_config(tmp_path, f"homeserver: http://127.0.0.1:{closed_port()}\naccess_token: {token}\n")
    namespace = f"mx{uuid.uuid4().hex[:6]}"
    head = local_head(config)
    try:
        path = job_file(tmp_path, namespace, "b", "@someone:localhost", [("a", "echo hi > distribute_save/a.txt")])
        head.cli("add", path)
        batch = head.wait_batch(f"{namespace}/b", timeout=60)
        assert batch["state"] == "done", batch
        wait_until(lambda: log_lines(head, "matrix: cannot notify"), 30, f"the failure\n{head.log.read_text()}")
        failures = log_lines(head, "matrix: cannot notify")
        assert len(failures) == 1
        assert failures[0].split(" ", 1)[1].startswith(
            f"matrix: cannot notify @someone:localhost about {namespace}/b: GET http://127.0.0.1:")
        assert (head.archive / namespace / "b" / "a" / "a.txt").read_text() == "hi\n"
        assert token not in head.log.read_text()
        assert head.cli("status").returncode == 0
    finally:
        stop(head)


def test_a_homeserver_that_never_answers_does_not_stall_the_head(tmp_path):
    """The notification hangs in its worker thread; the head keeps scheduling and answering."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)                  # connections complete in the backlog; nothing is ever read
    try:
        config = write_config(tmp_path, f"homeserver: http://127.0.0.1:{silent.getsockname()[1]}\n"
                                        "access_token: syt_silent\n")
        namespace = f"mx{uuid.uuid4().hex[:6]}"
        head = local_head(config)
        try:
            for name in ("one", "two"):
                head.cli("add", job_file(tmp_path, namespace, name, "@someone:localhost", [("a", "true")]))
                assert head.wait_batch(f"{namespace}/{name}", timeout=30)["state"] == "done"
            started = time.monotonic()
            head.cli("status")
            assert time.monotonic() - started < 5
            assert log_lines(head, "matrix: cannot notify") == []     # still waiting for an answer
            started = time.monotonic()
            head.proc.send_signal(signal.SIGINT)                       # Ctrl-C: no wait for the homeserver
            assert head.proc.wait(10) is not None and time.monotonic() - started < 5
            assert log_lines(head, "head: stopped")
        finally:
            stop(head)
    finally:
        silent.close()


def test_a_message_not_yet_sent_survives_a_restart_and_goes_out_once(synapse, tmp_path):
    """The homeserver is unreachable when the batch ends; the head is restarted with a working
    one: the message kept in the outbox goes out, once, and a further restart sends nothing."""
    user, bot = synapse.register(f"late{uuid.uuid4().hex[:6]}"), synapse.bot
    config = write_config(tmp_path, f"homeserver: http://127.0.0.1:{closed_port()}\n"
                                    f"access_token: {bot.access_token}\n")
    namespace = f"mx{uuid.uuid4().hex[:6]}"
    head = local_head(config)
    try:
        head.cli("add", job_file(tmp_path, namespace, "late", user.user_id, [("a", "true")]))
        assert head.wait_batch(f"{namespace}/late", timeout=60)["state"] == "done"
        wait_until(lambda: log_lines(head, "matrix: cannot notify"), 30, f"the failure\n{head.log.read_text()}")
        assert "trying again in 1m" in log_lines(head, "matrix: cannot notify")[0]
        outbox = head.state / "matrix-outbox"
        assert len(list(outbox.glob("*.json"))) == 1
        assert bot.access_token not in next(outbox.glob("*.json")).read_text()

        head.stop()
        write_config(tmp_path, f"homeserver: {synapse.url}\naccess_token: {bot.access_token}\n")
        head.start()
        wait_until(lambda: log_lines(head, f"told {user.user_id} that {namespace}/late"), 60,
                   f"the message about {namespace}/late\n{head.log.read_text()}")
        assert list(outbox.glob("*.json")) == []
        head.stop()
        head.start()                                    # nothing left to send
        head.cli("status")
        rooms = synapse.invited_rooms(user)
        assert len(rooms) == 1, rooms
        room = rooms[0]
        synapse.join(user, room)
        bodies = [m["content"]["body"] for m in synapse.messages(user, room)]
        assert len([b for b in bodies if f"batch {namespace}/late finished" in b]) == 1
        assert len(log_lines(head, f"told {user.user_id} that {namespace}/late")) == 1
    finally:
        stop(head)
