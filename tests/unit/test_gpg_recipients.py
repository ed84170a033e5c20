"""Recipients are keys that can encrypt now, pinned by fingerprint; only they are trusted (real gpg)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from runbook_operator.clients.gpg import GPG
from runbook_operator.errors import RunbookError
from tests.services import GpgKeyring

FIELD = "spec.encryption.gpg.recipientsConfigMapRef"


def _key(home: Path, *args: str) -> tuple[str, str]:
    """A generated public key (armored) and its fingerprint."""
    home.mkdir(mode=0o700)
    base = ["gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--pinentry-mode", "loopback"]
    subprocess.run([*base, *args], check=True, capture_output=True)
    armored = subprocess.run([*base, "--armor", "--export"], check=True, capture_output=True).stdout.decode()
    listing = subprocess.run([*base, "--with-colons", "--list-keys"], check=True, capture_output=True).stdout.decode()
    return armored, listing.split("fpr:::::::::")[1].split(":")[0]


def test_pinned_keys_encrypt_without_always_trust(gpg_keyring: GpgKeyring) -> None:
    with GPG() as gpg:
        assert gpg.import_public_keys(gpg_keyring.public_key, field=FIELD, fingerprints=[gpg_keyring.fingerprint]) == [
            gpg_keyring.fingerprint
        ]
        out = bytearray()
        gpg.encrypt_stream(io.BytesIO(b"phi"), out.extend, recipients=[gpg_keyring.fingerprint])
    assert gpg_keyring.decrypt(bytes(out)) == b"phi"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--quick-generate-key", "Sign Only <s@example.com>", "ed25519", "sign", "never"), "RecipientCannotEncrypt"),
        (
            (
                "--faked-system-time",
                "20200101T000000",
                "--quick-generate-key",
                "Old <o@example.com>",
                "rsa2048",
                "encrypt",
                "1d",
            ),
            "RecipientExpired",
        ),
    ],
    ids=["sign-only", "expired"],
)
def test_a_key_that_cannot_encrypt_now_is_refused_naming_the_field(
    tmp_path: Path, args: tuple[str, ...], reason: str
) -> None:
    armored, fingerprint = _key(tmp_path / "home", *args)
    with GPG() as gpg, pytest.raises(RunbookError) as refused:
        gpg.import_public_keys(armored, field=FIELD, fingerprints=[fingerprint])
    assert refused.value.reason == reason
    assert refused.value.message.startswith(FIELD) and fingerprint in refused.value.message


def test_pins_must_match_the_keys_exactly(gpg_keyring: GpgKeyring, tmp_path: Path) -> None:
    other, other_fingerprint = _key(
        tmp_path / "home", "--quick-generate-key", "B <b@example.com>", "rsa2048", "encrypt"
    )
    with GPG() as gpg, pytest.raises(RunbookError) as swapped:
        gpg.import_public_keys(other, field=FIELD, fingerprints=[gpg_keyring.fingerprint])
    assert swapped.value.reason == "RecipientNotPinned"
    assert other_fingerprint in swapped.value.message and "spec.encryption.gpg.fingerprints" in swapped.value.message
    with GPG() as gpg, pytest.raises(RunbookError) as missing:
        gpg.import_public_keys(
            gpg_keyring.public_key, field=FIELD, fingerprints=[gpg_keyring.fingerprint, other_fingerprint]
        )
    assert missing.value.reason == "RecipientMissing"
    with GPG() as gpg:  # pins are compared without spaces and case
        spaced = " ".join(gpg_keyring.fingerprint.lower()[i : i + 4] for i in range(0, 40, 4))
        assert gpg.import_public_keys(gpg_keyring.public_key, field=FIELD, fingerprints=[spaced])


def test_an_untrusted_key_in_the_keyring_is_not_encrypted_to(gpg_keyring: GpgKeyring, tmp_path: Path) -> None:
    """Without always_trust, a key that was not accepted through import_public_keys cannot be a recipient."""
    other, other_fingerprint = _key(
        tmp_path / "home", "--quick-generate-key", "C <c@example.com>", "rsa2048", "encrypt"
    )
    with GPG() as gpg:
        gpg.import_public_keys(gpg_keyring.public_key, field=FIELD)
        gpg._gpg.import_keys(other)  # in the keyring, but never accepted
        with pytest.raises(Exception, match="encrypt failed"):
            gpg.encrypt_stream(io.BytesIO(b"phi"), bytearray().extend, recipients=[other_fingerprint])
