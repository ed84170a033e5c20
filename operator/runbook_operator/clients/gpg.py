"""GnuPG through python-gnupg, streaming: output chunks go to a sink as gpg writes them.

gpg 2.2 runs without its agent (``--no-autostart``) for everything but secret keys: importing, listing and
trusting public keys, encrypting to them, and symmetric encryption (given an S2K count) and decryption work
without one. Only importing a secret key and decrypting with it need gpg-agent, which daemonizes: its parent is
then the nearest subreaper, PID 1 in a container. The keyring that started it stops it and, where the agent was
re-parented to this process (the operator as PID 1 or a subreaper), reaps it, so no zombie is left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import gnupg

from ..errors import RunbookError

Sink = Callable[[bytes], None]
CIPHER = "AES256"
# Symmetric encryption asks gpg-agent for its calibrated S2K count unless given one; this is the largest count
# OpenPGP encodes, which is what gpg clamps the agent's figure to on any recent CPU (measured: the same packets).
S2K_COUNT = "65011712"
AGENT_TIMEOUT = 30.0  # seconds for gpg-agent to start, or to exit once told to


class GPG:
    """A gpg instance with its own temporary home (removed by ``close``): no keyring is ever shared."""

    def __init__(self, homedir: Path | None = None) -> None:
        self._owned = homedir is None
        self.homedir = Path(tempfile.mkdtemp(prefix="runbook-gpg-")) if homedir is None else homedir
        self.homedir.chmod(0o700)
        self._gpg = gnupg.GPG(gnupghome=str(self.homedir), options=["--no-autostart"])
        self._gpg.encoding = "utf-8"
        self._gpg.buffer_size = 64 * 1024  # pipe-sized chunks: fewer Python calls per GB streamed
        self._agent_started = False  # by import_secret_key; close() stops it
        self._agent_pid: int | None = None

    def __enter__(self) -> GPG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._agent_started:
                self._stop_agent()
        finally:
            if self._owned:
                shutil.rmtree(self.homedir, ignore_errors=True)

    def _start_agent(self) -> None:
        """Start this home's gpg-agent (gpg itself never does: ``--no-autostart``) and learn its pid."""
        if self._agent_started:
            return
        self._agent_started = True  # from here on close() stops it, even if the pid never arrives
        started = subprocess.run(
            ["gpg-connect-agent", "--homedir", str(self.homedir), "GETINFO pid", "/bye"],
            capture_output=True,
            timeout=AGENT_TIMEOUT,
            check=False,
        )
        pids = [line[2:] for line in started.stdout.decode(errors="replace").splitlines() if line.startswith("D ")]
        if started.returncode != 0 or len(pids) != 1 or not pids[0].isdigit():
            raise GPGError(f"gpg-agent did not start (gpg-connect-agent exited {started.returncode})")
        self._agent_pid = int(pids[0])

    def _stop_agent(self) -> None:
        """Stop the agent, and reap it if it was re-parented to this process (else its init reaps it)."""
        subprocess.run(
            ["gpgconf", "--homedir", str(self.homedir), "--kill", "gpg-agent"],
            capture_output=True,
            timeout=AGENT_TIMEOUT,
            check=False,
        )
        self._agent_started = False
        pid, self._agent_pid = self._agent_pid, None
        if pid is None:
            return
        deadline = time.monotonic() + AGENT_TIMEOUT
        while True:
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return  # not this process's child
            if reaped:
                return
            if time.monotonic() > deadline:  # our own child, so the pid cannot have been reused
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)

    @property
    def version(self) -> str:
        return ".".join(str(part) for part in self._gpg.version or ())

    def import_public_keys(self, armored: str, *, field: str, fingerprints: Sequence[str] = ()) -> list[str]:
        """Import ASCII-armored public keys that can encrypt now; return their fingerprints.

        ``fingerprints`` pins them (``field`` names the data in errors, ``<field>`` 's sibling ``fingerprints``
        the pins): the data must hold exactly the pinned keys. Only the returned keys are trusted for
        encryption in this keyring (ownertrust), so encrypting never needs ``always_trust``."""
        result = self._gpg.import_keys(armored)
        imported = sorted({f.upper() for f in result.fingerprints if f})
        if not imported:
            raise RunbookError("InvalidRecipients", f"{field}: no usable public key in the given data")
        if fingerprints:
            pinned = sorted({f.replace(" ", "").upper() for f in fingerprints})
            pins = field.rsplit(".", 1)[0] + ".fingerprints"
            unpinned = [f for f in imported if f not in pinned]
            missing = [f for f in pinned if f not in imported]
            if unpinned:
                raise RunbookError("RecipientNotPinned", f"{field}: key {unpinned[0]} is not listed in {pins}")
            if missing:
                raise RunbookError("RecipientMissing", f"{pins}: key {missing[0]} is not in {field}")
        keys = {str(k["fingerprint"]).upper(): k for k in self._gpg.list_keys()}
        for fingerprint in imported:
            self._check_usable(keys.get(fingerprint), fingerprint, field=field)
        self._gpg.trust_keys(imported, "TRUST_ULTIMATE")
        return imported

    @staticmethod
    def _check_usable(key: Mapping[str, Any] | None, fingerprint: str, *, field: str) -> None:
        """An encryption-capable key (or subkey) that is neither expired nor revoked."""
        if key is None:
            raise RunbookError("InvalidRecipients", f"{field}: key {fingerprint} could not be read back")
        if key.get("trust") == "r":
            raise RunbookError("RecipientRevoked", f"{field}: key {fingerprint} is revoked")
        expires = str(key.get("expires") or "")
        if key.get("trust") == "e" or (expires and int(expires) <= time.time()):
            raise RunbookError("RecipientExpired", f"{field}: key {fingerprint} has expired")
        # gpg prints the usable capabilities of the whole key (primary and valid subkeys) in upper case.
        if "E" not in str(key.get("cap") or ""):
            raise RunbookError("RecipientCannotEncrypt", f"{field}: key {fingerprint} has no valid encryption (sub)key")

    def import_secret_key(self, armored: str, passphrase: str | None = None) -> list[str]:
        """Import a private key (restores and tests); return its fingerprints. Secret keys live in gpg-agent, so
        this starts the keyring's agent (``close`` stops it)."""
        self._start_agent()
        result = self._gpg.import_keys(armored, passphrase=passphrase)
        return [f for f in result.fingerprints if f]

    def encrypt_stream(
        self, source: IO[bytes], sink: Sink, *, recipients: list[str] | None = None, passphrase: str | None = None
    ) -> None:
        """Encrypt ``source`` to the recipients (or symmetrically with AES256) into ``sink``, chunk by chunk."""
        self._run(
            sink,
            lambda: self._gpg.encrypt_file(
                source,
                recipients or None,
                symmetric=CIPHER if passphrase is not None else False,
                passphrase=passphrase,
                armor=False,
                extra_args=[
                    "--cipher-algo",
                    CIPHER,
                    "--compress-algo",
                    "none",
                    *(["--s2k-count", S2K_COUNT] if passphrase is not None else []),
                ],
            ),
            "encrypt",
        )

    def decrypt_stream(self, source: IO[bytes], sink: Sink, *, passphrase: str | None = None) -> None:
        """Decrypt ``source`` into ``sink`` chunk by chunk."""
        self._run(sink, lambda: self._gpg.decrypt_file(source, passphrase=passphrase), "decrypt")

    def _run(self, sink: Sink, operation: Callable[[], Any], what: str) -> None:
        failure: list[BaseException] = []

        def on_data(chunk: bytes) -> bool:
            # Called from gpg's reader thread; an exception there would stall gpg, so remember it and keep
            # draining. Returning False stops python-gnupg from buffering the chunk.
            if chunk and not failure:
                try:
                    sink(chunk)
                except BaseException as error:
                    failure.append(error)
            return False

        self._gpg.on_data = on_data
        try:
            result = operation()
        finally:
            self._gpg.on_data = None
        if failure:
            raise failure[0]
        if not result.ok:
            status = getattr(result, "status", None) or "failed"
            raise GPGError(f"gpg {what} failed: {status}")


class GPGError(RuntimeError):
    """gpg exited with an error (its status line, never the data or passphrase)."""
