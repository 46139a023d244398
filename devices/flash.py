"""Put a bundle and a client on a device: a local folder, an ssh host, or an Android phone over adb.

A flashed folder holds::

    bundle/            the verified bundle (train.pte, adapter.ptd, infer.pte, specs, manifest)
    credentials/       copies of the credential files given (password, CA, client cert and key, HMAC keys)
    data/              a copy of the device's own examples (``--data``: a .jsonl, a .csv or a folder)
    profile.toml       a copy of the device profile, when it was given as a file
    client.toml        the ``fleetlora client`` flags: broker, run, id, profile, backend, bundle, data and
                       the credential paths (relative to the folder)
    run-client.sh      starts the client with one command: python -m fleetlora client --config client.toml,
                       with the interpreter it was flashed for (or ``$PYTHON``), or says what to install

With the native runtime (``native/``, no Python on the device) the folder also holds::

    bin/               fleetlora-client and the libraries it loads from beside itself (rpath $ORIGIN)
    plan.json          the device's budget table (edge_client/plan_table.py)
    data.safetensors   the device's tokenized local examples
    state/             progress, pending update and kept tensors (client.toml's state_file)

and ``run-client.sh`` runs ``bin/fleetlora-client run --config client.toml``.

The folder is staged locally first; ``local:`` copies it, ``ssh:`` and ``adb:`` run ``scp``/``adb``
command lines (printed and not run with ``dry_run``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from export.bundle import Bundle

CLIENT_TOML = "client.toml"
RUN_SCRIPT = "run-client.sh"
BUNDLE_DIR = "bundle"
BIN_DIR = "bin"
NATIVE_STATE_FILE = "state/progress.json"
CREDENTIALS_DIR = "credentials"
DATA_DIR = "data"
PROFILE_TOML = "profile.toml"
# Broker credentials (password, TLS CA, client certificate and its key), then the HMAC keys: the one
# that signs this device's updates and the one that verifies the coordinator's announcements.
CREDENTIAL_KEYS = (
    "password_file", "ca_file", "cert_file", "key_file", "hmac_key_file", "coordinator_key_file"
)  # fmt: skip
# client.toml's keys are ``fleetlora client``'s flags (its TOML loader rejects any other key).
CLIENT_FLAGS = {
    "broker": "broker",
    "run_id": "run",
    "client_id": "id",
    "device": "profile",
    "backend": "backend",
    "bundle": "bundle",
    "password_file": "password_file",
    "ca_file": "ca",
    "cert_file": "cert",
    "key_file": "key_file",
    "hmac_key_file": "key",
    "coordinator_key_file": "coordinator_key",
    "data": "data",
    "dataset": "dataset",
    "state_file": "state_file",
    "batch_size": "batch_size",
    "local_steps": "local_steps",
}

# The interpreter flashed in (PYTHON overrides it; python3 when it is not on this machine) must import
# fleetlora: said in one line, not as a Python traceback, when it cannot.
RUN_CLIENT_SH = """#!/bin/sh
# Start the fleetlora client of this flashed folder (PYTHON overrides the interpreter).
cd "$(dirname "$0")" || exit 1
PY="${PYTHON:-__PYTHON__}"
if [ -z "${PYTHON:-}" ] && ! command -v "$PY" >/dev/null 2>&1; then PY=python3; fi
if ! "$PY" -c "import fleetlora" >/dev/null 2>&1; then
  echo "run-client.sh: $PY cannot import fleetlora: install it for that interpreter" \\
    "(pip install 'fleetlora[executorch]'), or set PYTHON=/path/to/python" >&2
  exit 127
fi
exec "$PY" -m fleetlora client --config client.toml "$@"
"""

RUN_NATIVE_SH = """#!/bin/sh
# Start the native fleetlora client of this flashed folder (no Python needed; native/README.md).
set -e
cd "$(dirname "$0")"
exec ./bin/fleetlora-client run --config client.toml "$@"
"""


class FlashError(ValueError):
    """A target that cannot be parsed or reached, or a missing tool or file."""


@dataclass(frozen=True)
class Target:
    """Where to flash: ``kind`` is ``local``, ``ssh`` or ``adb``; ``host`` is ``user@host`` for ssh."""

    kind: str
    path: str
    host: str = ""

    @classmethod
    def parse(cls, text: str) -> Target:
        """``local:DIR``, ``ssh:user@host:/path`` or ``adb:/data/local/tmp/fleetlora``."""
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise FlashError(f"target {text!r} must be local:DIR, ssh:user@host:/path or adb:/path")
        if kind == "local":
            return cls("local", rest)
        if kind == "ssh":
            host, sep, path = rest.partition(":")
            if not sep or not host or not path:
                raise FlashError(f"ssh target {text!r} must be ssh:user@host:/path")
            return cls("ssh", path, host)
        if kind == "adb":
            if not rest.startswith("/"):
                raise FlashError(f"adb target path must be absolute, got {rest!r}")
            return cls("adb", rest)
        raise FlashError(f"unknown target kind {kind!r}; use local, ssh or adb")


@dataclass(frozen=True)
class ClientConfig:
    """What ``fleetlora client`` needs; credential paths are local files copied into the folder."""

    broker: str
    run_id: str
    client_id: str
    device: str
    backend: str = "executorch"
    credentials: dict[str, str] = field(default_factory=dict)
    data: str = ""  # the device's own examples (a file or a folder), copied into data/
    dataset: str = ""  # or a built-in demo data set
    python: str = "python3"  # the interpreter run-client.sh starts (PYTHON overrides it on the device)
    state_file: str = ""  # relative to the folder; the native client's is NATIVE_STATE_FILE
    batch_size: int = 0  # 0: the client's default
    local_steps: int = 0  # 0: from the device's budget

    def to_toml(self) -> str:
        """The ``client.toml`` text, keyed by client flags; local paths point into the folder."""
        device = PROFILE_TOML if self.device.endswith(".toml") else self.device
        values: dict[str, str | int] = {
            "broker": self.broker,
            "run_id": self.run_id,
            "client_id": self.client_id,
            "device": device,
            "backend": self.backend,
            "bundle": BUNDLE_DIR,
        }
        if self.data:
            values["data"] = f"{DATA_DIR}/{Path(self.data).name}"
        if self.dataset:
            values["dataset"] = self.dataset
        for key, local in sorted(self.credentials.items()):
            values[key] = f"{CREDENTIALS_DIR}/{Path(local).name}"
        if self.state_file:
            values["state_file"] = self.state_file
        for key in ("batch_size", "local_steps"):
            if getattr(self, key):
                values[key] = getattr(self, key)
        # JSON string escaping is valid TOML basic-string escaping.
        return "".join(f"{CLIENT_FLAGS[k]} = {json.dumps(v)}\n" for k, v in values.items())


@dataclass(frozen=True)
class NativeFiles:
    """What the native runtime adds to a flashed folder: ``runtime`` (the binary and its libraries,
    copied to ``bin/``) and ``files`` (name -> bytes: ``plan.json``, ``data.safetensors``)."""

    runtime: Sequence[Path]
    files: Mapping[str, bytes]


def stage(bundle: Bundle, config: ClientConfig, folder: Path, native: NativeFiles | None = None) -> Path:
    """Lay out the flashed folder's contents under ``folder`` (see the module docstring)."""
    unknown = sorted(set(config.credentials) - set(CREDENTIAL_KEYS))
    if unknown:
        raise FlashError(f"unknown credential keys {unknown}; use {CREDENTIAL_KEYS}")
    shutil.copytree(bundle.path, folder / BUNDLE_DIR, dirs_exist_ok=True)
    names = [Path(p).name for p in config.credentials.values()]
    if len(set(names)) != len(names):
        raise FlashError(f"credential files must have distinct names, got {sorted(names)}")
    if config.credentials:
        creds = folder / CREDENTIALS_DIR
        creds.mkdir(exist_ok=True)
        for key, local in config.credentials.items():
            if not Path(local).is_file():
                raise FlashError(f"{key}: file not found: {local}")
            shutil.copy2(local, creds / Path(local).name)
    if config.data:
        data = Path(config.data)
        if not data.exists():
            raise FlashError(f"--data: not found: {data}")
        (folder / DATA_DIR).mkdir(exist_ok=True)
        if data.is_dir():
            shutil.copytree(data, folder / DATA_DIR / data.name, dirs_exist_ok=True)
        else:
            shutil.copy2(data, folder / DATA_DIR / data.name)
    if config.device.endswith(".toml"):
        shutil.copy2(config.device, folder / PROFILE_TOML)
    (folder / CLIENT_TOML).write_text(config.to_toml())
    script = folder / RUN_SCRIPT
    if native is None:
        quoted = "".join("\\" + c if c in '"$`\\' else c for c in config.python)  # inside "..." in sh
        script.write_text(RUN_CLIENT_SH.replace("__PYTHON__", quoted))
    else:
        script.write_text(RUN_NATIVE_SH)
    script.chmod(0o755)
    if native is not None:
        (folder / BIN_DIR).mkdir(exist_ok=True)
        for path in native.runtime:
            shutil.copy2(path, folder / BIN_DIR / path.name)
        for name, content in native.files.items():
            (folder / name).write_bytes(content)
    return folder


def commands(target: Target, staged: Path) -> list[list[str]]:
    """The command lines that copy ``staged``'s contents to an ssh or adb target."""
    items = [str(p) for p in sorted(staged.iterdir())]
    if target.kind == "ssh":
        remote = target.path.rstrip("/") + "/"
        return [
            ["ssh", target.host, "mkdir", "-p", target.path],
            ["scp", "-r", "-p", *items, f"{target.host}:{remote}"],
        ]
    if target.kind == "adb":
        return [
            ["adb", "shell", "mkdir", "-p", target.path],
            ["adb", "push", *items, target.path.rstrip("/") + "/"],
            ["adb", "shell", "chmod", "755", f"{target.path.rstrip('/')}/{RUN_SCRIPT}"],
        ]
    raise FlashError(f"{target.kind} targets are copied directly, not by command lines")


def flash(
    bundle: Bundle,
    config: ClientConfig,
    target: Target,
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    native: NativeFiles | None = None,
) -> list[list[str]]:
    """Flash ``bundle`` and a client for ``config`` to ``target``; returns the command lines run.

    ``local`` copies into the folder (kept files there are overwritten). ``ssh``/``adb`` need
    ``ssh``+``scp`` or ``adb`` on the PATH; with ``dry_run`` nothing is written anywhere and the
    command lines are only logged.
    """
    with tempfile.TemporaryDirectory(prefix="fleetlora-flash-") as tmp:
        staged = stage(bundle, config, Path(tmp), native)
        if target.kind == "local":
            dest = Path(target.path)
            log(f"{'would copy' if dry_run else 'copying'} {bundle.path} + client to {dest}")
            if not dry_run:
                shutil.copytree(staged, dest, dirs_exist_ok=True)
                log(f"start it with: {dest / RUN_SCRIPT}")
            return []
        cmds = commands(target, staged)
        if dry_run:
            for cmd in cmds:
                log("would run: " + " ".join(cmd))
            return cmds
        missing = sorted({cmd[0] for cmd in cmds if shutil.which(cmd[0]) is None})
        if missing:
            raise FlashError(f"{', '.join(missing)} not found on PATH; use --dry-run to see the commands")
        for cmd in cmds:
            log("running: " + " ".join(cmd))
            result = subprocess.run(cmd, check=False)
            if result.returncode != 0:
                raise FlashError(f"{cmd[0]} failed with exit status {result.returncode}: {' '.join(cmd)}")
        log(f"start it with: {target.path.rstrip('/')}/{RUN_SCRIPT} (on the device)")
        return cmds
