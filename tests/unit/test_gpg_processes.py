"""No gpg process outlives its keyring: no agent for public-key work, the decryption agent stopped and reaped.

In the image the operator would be PID 1 if nothing else were: every orphan (gpg-agent daemonizes, so it is one)
is re-parented to it, and a process that never waits leaves a zombie per agent. The work runs in a child that is
a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so orphans re-parent to it exactly as to PID 1, and the test
reads its descendants from /proc (real gpg throughout)."""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from runbook_operator.clients.gpg import GPG
from tests.services import GpgKeyring

PR_SET_CHILD_SUBREAPER = 36
IMPORTS = 50
FIELD = "spec.encryption.gpg.recipientsConfigMapRef"


def descendants(root: int) -> list[tuple[int, str, str]]:
    """(pid, command name, state) of every live or zombie process below ``root``, from /proc."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        head, _, tail = stat.rpartition(")")
        state, ppid = tail.split()[:2]
        pid = int(entry.name)
        parents[pid] = int(ppid)
        info[pid] = (head.partition("(")[2], state)
    below: list[tuple[int, str, str]] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                below.append((pid, *info[pid]))
                frontier.append(pid)
    return below


def has_agent(gpg: GPG) -> bool:
    """Whether a live gpg-agent below this process serves ``gpg``'s home."""
    for pid, name, state in descendants(os.getpid()):
        if name == "gpg-agent" and state != "Z":
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(gpg.homedir).encode() in command.split(b"\0"):
                return True
    return False


def _work(public_key: str, secret_key: str, fingerprint: str, result: Connection) -> None:
    """What the operator and its agent pods do with gpg, as a subreaper; sends what it saw."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    seen: dict[str, Any] = {"keyrings_with_an_agent": 0}
    for _ in range(IMPORTS):  # the BackupPolicy recipients check, once per reconcile
        with GPG() as gpg:
            gpg.import_public_keys(public_key, field=FIELD, fingerprints=[fingerprint])
            seen["keyrings_with_an_agent"] += has_agent(gpg)
    with GPG() as gpg:  # evidence capture and backups: encrypt to the recipients
        recipients = gpg.import_public_keys(public_key, field=FIELD, fingerprints=[fingerprint])
        to_key = bytearray()
        gpg.encrypt_stream(io.BytesIO(b"phi"), to_key.extend, recipients=recipients)
        seen["keyrings_with_an_agent"] += has_agent(gpg)
    with GPG() as gpg:  # symmetric backups and evidence, and their restore
        symmetric = bytearray()
        gpg.encrypt_stream(io.BytesIO(b"phi"), symmetric.extend, passphrase="pw")
        clear = bytearray()
        gpg.decrypt_stream(io.BytesIO(bytes(symmetric)), clear.extend, passphrase="pw")
        seen["symmetric"] = bytes(clear)
        seen["symmetric_agent"] = has_agent(gpg)
    with GPG() as gpg:  # a restore of a public-key backup: the secret key lives in gpg-agent
        gpg.import_secret_key(secret_key)
        clear = bytearray()
        gpg.decrypt_stream(io.BytesIO(bytes(to_key)), clear.extend)
        seen["decrypted"] = bytes(clear)
        seen["decryption_agent"] = has_agent(gpg)
    seen["left"] = descendants(os.getpid())
    result.send(seen)


def test_gpg_leaves_no_process_behind_even_under_a_subreaper(gpg_keyring: GpgKeyring) -> None:
    secret_key = gpg_keyring.run("--armor", "--export-secret-keys").stdout.decode()
    receiver, sender = multiprocessing.get_context("spawn").Pipe(duplex=False)
    child = multiprocessing.get_context("spawn").Process(
        target=_work, args=(gpg_keyring.public_key, secret_key, gpg_keyring.fingerprint, sender)
    )
    child.start()
    try:
        assert receiver.poll(300), "the gpg work did not finish in 300 s"
        seen = receiver.recv()
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert seen["decrypted"] == b"phi" and seen["symmetric"] == b"phi"
    # Public-key work (importing, checking and encrypting to recipients) and symmetric work need no agent...
    assert seen["keyrings_with_an_agent"] == 0, f"{seen['keyrings_with_an_agent']} of {IMPORTS + 1} public keyrings"
    assert not seen["symmetric_agent"]
    # ...decryption with a secret key does (so the probe does see agents)...
    assert seen["decryption_agent"]
    # ...and once every keyring is closed nothing is left: no agent, no zombie, no other process.
    zombies = [p for p in seen["left"] if p[2] == "Z"]
    running = [p for p in seen["left"] if p[2] != "Z"]
    assert (zombies, running) == ([], []), f"{len(zombies)} zombie and {len(running)} live processes left behind"
