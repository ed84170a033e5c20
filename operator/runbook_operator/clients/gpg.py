"""GnuPG through python-gnupg, streaming: output chunks go to a sink as gpg writes them."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import gnupg

from ..errors import RunbookError

Sink = Callable[[bytes], None]
CIPHER = "AES256"


class GPG:
    """A gpg instance with its own temporary home (removed by ``close``): no keyring is ever shared."""

    def __init__(self, homedir: Path | None = None) -> None:
        self._owned = homedir is None
        self.homedir = Path(tempfile.mkdtemp(prefix="runbook-gpg-")) if homedir is None else homedir
        self.homedir.chmod(0o700)
        self._gpg = gnupg.GPG(gnupghome=str(self.homedir))
        self._gpg.encoding = "utf-8"
        self._gpg.buffer_size = 64 * 1024  # pipe-sized chunks: fewer Python calls per GB streamed

    def __enter__(self) -> GPG:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.homedir, ignore_errors=True)

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
        """Import a private key (restores and tests); return its fingerprints."""
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
                extra_args=["--cipher-algo", CIPHER, "--compress-algo", "none"],
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
