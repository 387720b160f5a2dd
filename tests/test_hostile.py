"""Hostile jobs, hostile clients and broken machines (issue 18).

Each test reproduces one hole found by an attacker with a group account or by a lab whose
machines misbehave: a job's links redirecting the head's archive writes, frames declaring
gigabytes, plans naming paths out of their folder, odd outputs (links, fifos, deep folders,
sparse files), and a head that dies under an upload.  The archive-write tests call the very
functions the head lands results with; the others run a real head.
"""

import asyncio
import dataclasses
import io
import json
import os
import tarfile
import textwrap
from pathlib import Path

import pytest

import distribute
from cluster import HeadProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent


def tar_with(*members):
    """A tar of (TarInfo, data or None) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name, kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, 1_600_000_000
    return info


def link(name, target):
    return member(name, tarfile.SYMTYPE, target), None


def victim_file(folder: Path) -> Path:
    """A file the head's account can write, outside the archive: what an attacker aims at."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "authorized_keys"
    path.write_text("the admin's key\n")
    return path


RECORD = {"namespace": "lab", "batch": "b", "job": "j", "node": "node1", "start": "2026-01-01T00:00:00",
          "end": "2026-01-01T00:00:01", "exit_code": 0, "attempts": 1, "state": "ok", "params": {}}


def land_like_the_head(archive: Path, payload: bytes, job: str = "j") -> Path:
    """What Head.on_finished does with a finished run's results."""
    incoming, final = distribute.start_landing(archive, "lab", "b", job)
    try:
        distribute.extract_tar(payload, incoming)
        distribute.finish_landing(incoming, final, dict(RECORD, job=job))
    finally:
        distribute.remove_tree(incoming)
    return final


# --- 1. archive writes never follow a job's links ------------------------------------------------

def test_a_link_chain_that_looks_inside_cannot_redirect_job_json(tmp_path):
    """`a -> .` then `p -> a/a/.../../..`: normpath says "inside", the kernel climbs to /; job.json
    links through p to a file outside.  Landing must replace the link, not write through it."""
    victim = victim_file(tmp_path / "home")
    depth = 16                  # deeper than tmp_path; fewer links than the kernel's limit of 40
    chain = "/".join(["a"] * depth + [".."] * depth)
    payload = tar_with(link("a", "."), link("p", chain),
                       link("job.json", "p" + str(victim)),
                       (member("result.txt"), b"42\n"))
    archive = tmp_path / "archive"
    final = land_like_the_head(archive, payload)
    assert victim.read_text() == "the admin's key\n"
    landed = final / "job.json"
    assert not landed.is_symlink() and json.loads(landed.read_text())["job"] == "j"
    assert (final / "result.txt").read_text() == "42\n"


def test_files_never_land_through_a_link_inside_the_stream(tmp_path):
    """A link that points inside (allowed as data) is never used as a folder to write through,
    nor replaced-through by a later file of the same name."""
    victim = victim_file(tmp_path / "home")
    chain = "/".join(["a"] * 16 + [".."] * 16)
    for members in ([link("a", "."), link("p", chain), (member("p" + str(victim)), b"owned\n")],
                    [link("a", "."), link("p", chain), link("x", "p" + str(victim)), (member("x"), b"owned\n")]):
        dest = tmp_path / "dest"
        try:
            distribute.extract_tar(tar_with(*members), dest)
        except distribute.UnsafeArchive as exc:
            assert "refused tar entry" in str(exc)
        assert victim.read_text() == "the admin's key\n"
        distribute.remove_tree(dest)


def test_build_log_never_lands_through_a_planted_link(tmp_path):
    """Links planted in <batch>/build/ (under every temporary name the head ever used, and as the
    log's own name) are replaced, not written through."""
    victim = victim_file(tmp_path / "home")
    folder = tmp_path / "archive" / "lab" / "b" / "build"
    folder.mkdir(parents=True)
    for pid in range(os.getpid() - 50, os.getpid() + 50):
        os.symlink(victim, folder / f".node1.txt.{pid}.tmp")
    os.symlink(victim, folder / "node1.txt")
    distribute.land_build_log(tmp_path / "archive", "lab", "b", "node1", b"attacker text\n")
    assert victim.read_text() == "the admin's key\n"
    assert not (folder / "node1.txt").is_symlink()
    assert (folder / "node1.txt").read_text() == "attacker text\n"


def test_a_batch_folder_replaced_by_a_link_is_refused(tmp_path):
    """Every folder below the archive root is opened without following links."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "archive" / "lab").mkdir(parents=True)
    os.symlink(outside, tmp_path / "archive" / "lab" / "b")
    with pytest.raises(distribute.UnsafeArchive):
        distribute.land_build_log(tmp_path / "archive", "lab", "b", "node1", b"x")
    with pytest.raises(distribute.UnsafeArchive):
        distribute.start_landing(tmp_path / "archive", "lab", "b", "j")
    assert list(outside.iterdir()) == []


def test_a_job_named_build_is_refused_at_load(tmp_path):
    path = tmp_path / "distribute-jobs.yaml"
    path.write_text(textwrap.dedent("""\
        meta: {batch_name: b, namespace: lab}
        shell:
          jobs:
            - {name: ok, command: 'true'}
            - {name: build, command: 'true'}
        """))
    with pytest.raises(distribute.UserError) as error:
        distribute.load_job_file(str(path))
    assert "distribute-jobs.yaml:5:" in str(error.value) and "reserved" in str(error.value)


def test_deep_folders_are_removed_without_recursion(tmp_path):
    folder = tmp_path / "deep"
    fd = os.open(tmp_path, os.O_RDONLY)
    os.mkdir("deep", dir_fd=fd)
    current = os.open("deep", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    for _ in range(3000):                # deeper than PATH_MAX allows to name by path
        os.mkdir("d", dir_fd=current)
        below = os.open("d", os.O_RDONLY, dir_fd=current)
        os.close(current)
        current = below
    os.close(current)
    try:
        distribute.remove_tree(folder)
        assert not folder.exists()
    finally:
        distribute.remove_tree(folder)  # pytest's own clean-up recurses: never leave it a deep tree
