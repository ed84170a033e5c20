"""Real PostgreSQL, Redis, S3 API (moto's server) and GnuPG on loopback, for tests and benchmarks.

Each class starts its server in a temporary directory on a free port and stops it on ``stop`` (or leaving
the ``with`` block). A missing binary raises with the Debian package to install: tests never skip.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import psycopg
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found: install the Debian package {package} (tools/dev/setup.sh does)")
    return path


class Postgres:
    """A PostgreSQL cluster (initdb) with password auth; as root it runs as the ``postgres`` system user.

    With ``tls=True`` it also accepts TLS (plain connections too), with a server certificate for ``localhost``
    only (``TLS_NAME``: no IP address SAN, so verify-full to 127.0.0.1 fails) signed by ``self.ca``, and logs
    every connection (``log_connections``: a login that reached the server names its user in the log).

    ``initdb_args`` are added to initdb's (``--wal-segsize=1``); with ``standby_of`` the data directory is
    instead ``pg_basebackup -R`` of that server (a streaming standby with its settings; promoted, it begins
    the next timeline)."""

    superuser = "postgres"
    password = "test-superuser-pw"
    TLS_NAME = "localhost"

    def __init__(
        self,
        directory: Path | None = None,
        *,
        tls: bool = False,
        settings: dict[str, str] | None = None,
        initdb_args: tuple[str, ...] = (),
        standby_of: Postgres | None = None,
    ) -> None:
        self.tls = tls
        self.initdb_args = initdb_args
        self.standby_of = standby_of
        # Streaming replication for the WAL receiver and pg_basebackup (wal_level=replica, WAL senders, a
        # scram ``replication`` line in pg_hba.conf); ``settings`` adds or overrides server settings (-c).
        self.settings = {"wal_level": "replica", "max_wal_senders": "10", "max_replication_slots": "10"}
        self.settings.update(standby_of.settings if standby_of is not None else {})
        self.settings.update(settings or {})
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not bins:
            raise RuntimeError("PostgreSQL server not found: install the Debian package postgresql")
        self.bin = Path(bins[-1])
        # Its own directory under /tmp: the postgres user cannot enter pytest's root-only temp folders.
        self.directory = directory or Path(tempfile.mkdtemp(prefix="runbook-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = free_port()
        self.host = "127.0.0.1"

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def start(self) -> Postgres:
        self.directory.mkdir(parents=True, exist_ok=True)
        pwfile = self.directory / "pw"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        if self.standby_of is not None:
            make = [str(self.bin / "pg_basebackup"), "-d", self.standby_of.dsn(), "-D", str(self.data)]
            make += ["-R", "-X", "stream", "--no-sync"]
        else:
            make = [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.superuser, "--auth=scram-sha-256"]
            make += [f"--pwfile={pwfile}", "--no-sync", *self.initdb_args]
        subprocess.run(self._as_owner(*make), check=True, capture_output=True)
        pwfile.unlink()
        hba = self.data / "pg_hba.conf"
        replication = ["host", "replication", "all", "127.0.0.1/32", "scram-sha-256"]
        if replication not in [line.split() for line in hba.read_text().splitlines()]:
            hba.write_text(hba.read_text() + " ".join(replication) + "\n")
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c log_statement=all -c synchronous_commit=off"
        )
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        if self.tls:
            options += " " + self._tls_options()
        subprocess.run(
            self._as_owner(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
            ),
            check=True,
            capture_output=True,
        )
        return self

    def _tls_options(self) -> str:
        self.ca = CertificateAuthority(self.directory / "pki", name="test postgres CA")
        cert, key = self.ca.issue("server", dns=(self.TLS_NAME,))
        if os.geteuid() == 0:  # the server reads its key only when it owns it (0600)
            owner = pwd.getpwnam("postgres")
            os.chown(key, owner.pw_uid, owner.pw_gid)
        return f"-c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key} -c log_connections=on"

    def stop(self) -> None:
        subprocess.run(
            self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"),
            check=False,
            capture_output=True,
        )

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def dsn(self, database: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        return (
            f"host={self.host} port={self.port} dbname={database} user={user or self.superuser} "
            f"password={password or self.password}"
        )

    def connect(self, database: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(database, **kwargs), autocommit=True)

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Redis:
    """A redis-server with a password for the default user and no persistence of its own."""

    password = "test-redis-pw"

    def __init__(self, directory: Path) -> None:
        self.binary = require("redis-server", "redis-server")
        self.directory = directory
        self.port = free_port()
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Redis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                self.password,
                "--logfile",
                str(self.directory / "redis.log"),
            ],
        )
        wait_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> Redis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=kwargs.pop("password", self.password), **kwargs)


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return data


class CertificateAuthority:
    """A certificate authority for tests: issues server and client certificates as PEM files in a directory."""

    def __init__(self, directory: Path, name: str = "test redis CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name(name))
            .issuer_name(self._name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.path = directory / "ca.crt"
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self.path.write_text(self.pem)

    @staticmethod
    def _name(common: str) -> Any:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def issue(
        self,
        stem: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        usage: Literal["server", "client", "both"] = "server",
    ) -> tuple[Path, Path]:
        """A certificate and its key (``<stem>.crt``, ``<stem>.key``, 0600) signed by this CA, for a server, a
        client or both (one certificate that a server presents and its clients present too)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(self._name(stem))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        *([ExtendedKeyUsageOID.SERVER_AUTH] if usage in ("server", "both") else []),
                        *([ExtendedKeyUsageOID.CLIENT_AUTH] if usage in ("client", "both") else []),
                    ]
                ),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.touch(mode=0o600)
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path


class RunbookRedis:
    """A redis-server configured as the runbook's: TLS only (plain port 0), client certificates required
    (``tls-auth-clients yes``), ``BGSAVE`` renamed (plain ``BGSAVE`` is an unknown command), a password for
    the default user and an ACL user ``backup``. The server certificate names only ``SERVER_NAME`` (the
    Service's DNS name), so a client that connects to 127.0.0.1 must verify against that name (SNI)."""

    SERVER_NAME = "redis.hungryhippaahneties.svc"
    BGSAVE = "HIPAA_BGSAVE_i9j0k1l2"
    password = "runbook-redis-default-pw"
    backup_user = "backup"
    backup_password = "runbook-redis-backup-pw"

    def __init__(self, directory: Path) -> None:
        self.binary = require("redis-server", "redis-server")
        self.directory = directory
        self.port = free_port()
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RunbookRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority(self.directory / "pki")
        self.server_cert, self.server_key = self.ca.issue("server", dns=(self.SERVER_NAME,))
        self.client_cert, self.client_key = self.ca.issue("client", usage="client")
        self.process = subprocess.Popen(
            [
                self.binary,
                *("--port", "0", "--tls-port", str(self.port), "--bind", self.host, "--dir", str(self.directory)),
                *("--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key)),
                *("--tls-ca-cert-file", str(self.ca.path), "--tls-auth-clients", "yes"),
                *("--rename-command", "BGSAVE", self.BGSAVE),
                *("--save", "", "--appendonly", "no", "--requirepass", self.password),
                *("--user", self.backup_user, "on", f">{self.backup_password}", "~*", "&*", "+@all"),
                *("--logfile", str(self.directory / "redis.log")),
            ],
        )
        wait_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> RunbookRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client as the runbook's ``redis-cli --tls --cert --key --cacert``, as the default user."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            password=kwargs.pop("password", self.password),
            ssl=True,
            ssl_ca_certs=str(self.ca.path),
            ssl_certfile=str(self.client_cert),
            ssl_keyfile=str(self.client_key),
            ssl_check_hostname=False,  # the certificate names the Service, not 127.0.0.1
            **kwargs,
        )

    def log(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")


class S3Server:
    """moto's S3 API server in its own process (so a test can kill it mid-upload)."""

    access_key = "testing-access-key"
    secret_key = "testing-secret-key"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


class GpgKeyring:
    """A gpg home holding one generated key pair (no passphrase): public key for operators, secret for tests."""

    def __init__(self, directory: Path, email: str = "security@example.com") -> None:
        self.gpg = require("gpg", "gnupg")
        self.home = directory
        self.email = email

    def start(self) -> GpgKeyring:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run("--quick-generate-key", f"Security Team <{self.email}>", "rsa2048", "encrypt", "never")
        self.public_key = self.run("--armor", "--export", self.email).stdout.decode()
        self.fingerprint = (
            self.run("--with-colons", "--list-keys", self.email).stdout.decode().split("fpr:::::::::")[1].split(":")[0]
        )
        return self

    def run(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                self.gpg,
                "--homedir",
                str(self.home),
                "--batch",
                "--yes",
                "--passphrase",
                "",
                "--pinentry-mode",
                "loopback",
                *args,
            ],
            input=stdin,
            check=True,
            capture_output=True,
        )

    def decrypt(self, data: bytes, passphrase: str | None = None) -> bytes:
        """Decrypt with stock gpg, as a person restoring by hand would."""
        args = ["--decrypt"] if passphrase is None else ["--passphrase", passphrase, "--decrypt"]
        return self.run(*args, stdin=data).stdout


class CleartextTrap:
    """A PostgreSQL an attacker runs, on 127.0.0.1: it refuses TLS (``N`` to SSLRequest and GSSENCRequest) and
    answers the StartupMessage by asking for the password in cleartext (AuthenticationCleartextPassword) or, with
    ``method="md5"``, as an MD5 hash of it and a salt (AuthenticationMD5Password). It records every byte a client
    sends after that request, and answers a password with a FATAL error so the client does not wait."""

    SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104
    _FATAL = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0"

    def __init__(self, method: Literal["cleartext", "md5"] = "cleartext") -> None:
        self.method = method
        self.host = "127.0.0.1"
        self._listener = socket.create_server((self.host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.startups: list[bytes] = []  # each connection's StartupMessage body (protocol, user, database)
        self._received: list[bytearray] = []  # per connection: what came after the password request
        self._handlers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> CleartextTrap:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def __enter__(self) -> CleartextTrap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            with self._lock:
                self._handlers.append(handler)
            handler.start()

    @staticmethod
    def _read(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while True:
                    length, code = struct.unpack("!ii", self._read(conn, 8))
                    body = self._read(conn, length - 8)
                    if code not in (self.SSL_REQUEST, self.GSSENC_REQUEST):
                        break
                    conn.sendall(b"N")
                received = bytearray()
                with self._lock:
                    self.startups.append(struct.pack("!i", code) + body)
                    self._received.append(received)
                if self.method == "cleartext":
                    conn.sendall(b"R" + struct.pack("!ii", 8, 3))
                else:
                    conn.sendall(b"R" + struct.pack("!ii", 12, 5) + os.urandom(4))
                while chunk := conn.recv(65536):
                    with self._lock:
                        received += chunk
                    if received[:1] == b"p" and len(received) >= 5 and len(received) > int.from_bytes(received[1:5]):
                        conn.sendall(b"E" + struct.pack("!i", 4 + len(self._FATAL)) + self._FATAL)
                        break
            except OSError:
                pass

    def _settled(self) -> None:
        """Wait until every client that connected has closed (what it sent is then all recorded)."""
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.join(15)

    @property
    def received(self) -> bytes:
        """Every byte clients sent after the password request, over all connections."""
        self._settled()
        with self._lock:
            return b"".join(bytes(r) for r in self._received)

    def received_password(self) -> bool:
        """Whether any client answered the request with a PasswordMessage (cleartext or MD5)."""
        self._settled()
        with self._lock:
            return any(r.startswith(b"p") for r in self._received)
