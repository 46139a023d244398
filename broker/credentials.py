"""Broker credentials: a test CA, a server certificate, per-client certificates, passwords and the ACL.

One credentials directory holds everything the broker and the clients need::

    ca.crt ca.key              the certificate authority (ca.key never leaves this directory)
    server.crt server.key      the broker's certificate, valid for 127.0.0.1 and localhost
    passwd                     mosquitto password file (hashes, written by ``mosquitto_passwd``)
    acl                        mosquitto ACL, regenerated from users.json on every change
    users.json                 roster: client name -> role ("device" or "coordinator")
    clients/NAME.crt .key .password   what one device or the coordinator needs to connect
    clients/coordinator.announce.key  the HMAC key that signs the coordinator's announcements (devices
                                      get a copy to verify them)

Secrets (keys, passwords) are written 0600 and never logged. Mosquitto started as root drops to user
``mosquitto``, so the files the broker reads are handed to that user (see :func:`give_to_broker_user`).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from export.files import atomic_write

TOPIC_ROOT = "fleetlora"
BROKER_USER = "mosquitto"
ROLES = ("device", "coordinator")
COORDINATOR = "coordinator"  # the coordinator's client name when the first enrolment creates it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_ARGS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


class BrokerError(Exception):
    """The broker or its credentials could not be set up; the message says why."""


@dataclass(frozen=True)
class CredentialPaths:
    """Where the files of one credentials directory live."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def password_file(self) -> Path:
        return self.root / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.root / "acl"

    @property
    def roster(self) -> Path:
        return self.root / "users.json"

    @property
    def clients(self) -> Path:
        return self.root / "clients"

    @property
    def announce_key(self) -> Path:
        """The coordinator's announcement key (hex HMAC key; see protocol.keys)."""
        return self.clients / f"{COORDINATOR}.announce.key"

    def password_of(self, name: str) -> Path:
        return self.clients / f"{name}.password"

    def roster_roles(self) -> dict[str, str]:
        """``name -> role`` of every enrolled client (empty before the first enrolment)."""
        if not self.roster.exists():
            return {}
        roles: dict[str, str] = json.loads(self.roster.read_text())
        return roles


@dataclass(frozen=True)
class DeviceCredentials:
    """What one client needs to connect: its username (= MQTT client id = certificate CN) and secrets."""

    username: str
    password: str = field(repr=False)
    ca_cert: Path
    cert: Path
    key: Path
    password_file: Path


def _broker_uid_gid() -> tuple[int, int] | None:
    """The uid/gid mosquitto drops to, when we are root and that user exists; else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def give_to_broker_user(path: Path) -> None:
    """Make ``path`` owned by the user mosquitto drops to (no-op unless we are root)."""
    ids = _broker_uid_gid()
    if ids is not None:
        os.chown(path, *ids)


def check_reachable_by_broker(path: Path) -> None:
    """Raise BrokerError when mosquitto, after dropping to its user, could not reach ``path``.

    pytest's and mkdtemp's folders are 0700 root-owned: a broker started as root then cannot open its
    own config, and fails with a message about a file that plainly exists.
    """
    ids = _broker_uid_gid()
    if ids is None:
        return
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_mode & 0o001 == 0 and st.st_uid != ids[0]:
            raise BrokerError(
                f"mosquitto runs as user {BROKER_USER!r} and cannot enter {parent} (mode "
                f"{oct(st.st_mode & 0o777)}); `chmod o+x {parent}` or use a directory it can reach"
            )


def _secret_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 before a tool writes a secret into it (no readable window)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def _run(cmd: list[str], what: str) -> None:
    tool = shutil.which(cmd[0])
    if tool is None:
        raise BrokerError(
            f"{cmd[0]} not found; it is needed to {what} (apt-get install -y openssl mosquitto)"
        )
    # argv may hold a password (mosquitto_passwd -b): never echo it in errors.
    done = subprocess.run([tool, *cmd[1:]], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BrokerError(f"{cmd[0]} failed to {what}: {done.stderr.strip()[-500:]}")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid client name (it becomes a topic level and a certificate CN)."""
    if not _NAME.fullmatch(name):
        raise BrokerError(f"invalid client name {name!r}: use 1-64 of letters, digits, '_', '.', '-'")
    return name


def _sign(paths: CredentialPaths, name: str, cert: Path, key: Path, extensions: str, days: int) -> None:
    """Create a key and a certificate for ``name`` signed by the CA in ``paths``."""
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    ext.write_text(extensions)
    _secret_file(key)
    try:
        _run(
            ["openssl", "req", *_KEY_ARGS, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"],
            f"create the key of {name}",
        )
        serial = "0x" + secrets.token_hex(16)
        _run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(paths.ca_cert),
                "-CAkey",
                str(paths.ca_key),
                "-set_serial",
                serial,
                "-days",
                str(days),
                "-extfile",
                str(ext),
                "-out",
                str(cert),
            ],
            f"sign the certificate of {name}",
        )
    finally:
        csr.unlink(missing_ok=True)
        ext.unlink(missing_ok=True)
    os.chmod(key, 0o600)


def make_test_ca(
    directory: Path | str, *, days: int = 825, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> CredentialPaths:
    """Create a CA and a server certificate for ``hosts`` in ``directory`` (a test or private fleet PKI).

    Raises BrokerError when the directory already holds a CA (rotating a CA is a deliberate act).
    """
    paths = CredentialPaths(Path(directory))
    paths.root.mkdir(parents=True, exist_ok=True)
    if paths.ca_cert.exists():
        raise BrokerError(f"{paths.root} already holds a CA ({paths.ca_cert}); use a new directory")
    paths.clients.mkdir(exist_ok=True)
    os.chmod(paths.clients, 0o700)
    _secret_file(paths.ca_key)
    _run(
        [
            "openssl",
            "req",
            "-x509",
            *_KEY_ARGS,
            "-keyout",
            str(paths.ca_key),
            "-out",
            str(paths.ca_cert),
            "-days",
            str(days),
            "-subj",
            "/CN=fleetlora test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        "create the CA",
    )
    os.chmod(paths.ca_key, 0o600)
    alt_names = ",".join(("IP:" if h.replace(".", "").isdigit() or ":" in h else "DNS:") + h for h in hosts)
    _sign(
        paths,
        hosts[-1],
        paths.server_cert,
        paths.server_key,
        f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={alt_names}\n"
        "authorityKeyIdentifier=keyid\n",
        days,
    )
    _secret_file(paths.password_file)
    paths.roster.write_text("{}\n")
    _write_acl(paths, {})
    for broker_file in (
        paths.ca_cert,
        paths.server_cert,
        paths.server_key,
        paths.password_file,
        paths.acl_file,
    ):
        give_to_broker_user(broker_file)
    return paths


def render_acl(roster: dict[str, str], topic_root: str = TOPIC_ROOT) -> str:
    """The mosquitto ACL for a roster of ``name -> role``.

    Every client may write only its own ``up`` and ``status`` topics (``%u`` is its username) and read
    the global topic; only coordinators may write ``global`` and read every ``up`` and ``status``.
    """
    lines = [
        "# fleetlora ACL, generated from users.json (broker/credentials.py); edits are lost.",
        f"pattern write {topic_root}/+/up/%u",
        f"pattern write {topic_root}/+/status/%u",
        f"pattern read {topic_root}/+/global",
        "",
    ]
    for name in sorted(n for n, role in roster.items() if role == "coordinator"):
        lines += [
            f"user {name}",
            f"topic write {topic_root}/+/global",
            f"topic read {topic_root}/+/up/+",
            f"topic read {topic_root}/+/status/+",
            "",
        ]
    return "\n".join(lines)


def _write_acl(paths: CredentialPaths, roster: dict[str, str]) -> None:
    def readable_by_the_broker(tmp: Path) -> None:
        os.chmod(tmp, 0o640)
        give_to_broker_user(tmp)

    atomic_write(paths.acl_file, render_acl(roster).encode(), before_replace=readable_by_the_broker)


def add_device(directory: Path | str, name: str, *, role: str = "device") -> DeviceCredentials:
    """Create credentials for client ``name``: password (mosquitto password file), certificate, ACL entry.

    ``role="coordinator"`` gives the client the coordinator's rights. A running mosquitto picks up the
    new password and ACL after :meth:`broker.mosquitto.Mosquitto.reload` (SIGHUP).
    """
    paths = CredentialPaths(Path(directory))
    check_name(name)
    if role not in ROLES:
        raise BrokerError(f"unknown role {role!r}; expected one of {ROLES}")
    if not paths.ca_key.exists():
        raise BrokerError(f"{paths.root} holds no CA; run `fleetlora broker init-ca {paths.root}` first")
    roster: dict[str, str] = json.loads(paths.roster.read_text())
    if name in roster:
        raise BrokerError(f"client {name!r} already exists in {paths.root}")
    creds = DeviceCredentials(
        username=name,
        password=secrets.token_urlsafe(24),
        ca_cert=paths.ca_cert,
        cert=paths.clients / f"{name}.crt",
        key=paths.clients / f"{name}.key",
        password_file=paths.clients / f"{name}.password",
    )
    _sign(
        paths,
        name,
        creds.cert,
        creds.key,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
        "authorityKeyIdentifier=keyid\n",
        825,
    )
    _secret_file(creds.password_file)
    creds.password_file.write_text(creds.password + "\n")
    _run(
        ["mosquitto_passwd", "-b", str(paths.password_file), name, creds.password],
        f"add {name} to the password file",
    )
    os.chmod(paths.password_file, 0o600)
    give_to_broker_user(paths.password_file)
    roster[name] = role
    paths.roster.write_text(json.dumps(roster, indent=1, sort_keys=True) + "\n")
    _write_acl(paths, roster)
    return creds


def ensure_coordinator(directory: Path | str) -> tuple[DeviceCredentials | None, Path | None]:
    """The coordinator's credentials and announcement key, created unless there are some already
    (a client of the coordinator role under any name counts).

    Returns ``(credentials, announcement key)`` of what was created now (``None`` for what existed).
    Raises BrokerError when the name ``coordinator`` is taken by a device.
    """
    from protocol.keys import write_key

    paths = CredentialPaths(Path(directory))
    roles = paths.roster_roles()
    creds = None
    has_coordinator = "coordinator" in roles.values()
    if not has_coordinator and roles.get(COORDINATOR) == "device":
        raise BrokerError(
            f"{paths.root}: {COORDINATOR!r} is enrolled as a device, so the coordinator was not created: "
            "enrol it under another name with --coordinator"
        )
    if not has_coordinator:
        creds = add_device(paths.root, COORDINATOR, role="coordinator")
    key = None
    if not paths.announce_key.exists():
        paths.clients.mkdir(exist_ok=True)
        write_key(paths.announce_key, secrets.token_bytes(32))
        key = paths.announce_key
    return creds, key


def load_device(directory: Path | str, name: str) -> DeviceCredentials:
    """Read back the credentials :func:`add_device` wrote for ``name``."""
    paths = CredentialPaths(Path(directory))
    secret = paths.clients / f"{check_name(name)}.password"
    if not secret.exists():
        raise BrokerError(f"no credentials for client {name!r} in {paths.root}")
    return DeviceCredentials(
        name,
        secret.read_text().strip(),
        paths.ca_cert,
        paths.clients / f"{name}.crt",
        paths.clients / f"{name}.key",
        secret,
    )
