"""The native client (``native/``, C++): build it for a device's architecture, and what a flash ships.

``fleetlora-client`` is built with CMake against an executorch wheel's ``include/`` and ``lib/``:
this machine's installed wheel for its own architecture, and for ``aarch64`` on an x86-64 host the
aarch64 wheel of the same executorch version, downloaded once with pip into ``.cache/native/`` and
cross-compiled with ``aarch64-linux-gnu-g++`` against Debian's arm64 libmosquitto and OpenSSL. Each
architecture builds in ``build/native-<arch>/``, which then holds the binary and every library it
loads from beside itself (rpath ``$ORIGIN``): a flash copies that folder's files and nothing else.

Android is not built here: the same C++ core would build with the NDK (its CMake toolchain file, an
arm64-v8a executorch runtime built from source, libmosquitto and OpenSSL for Android), or a phone app
would use ExecuTorch's Android training API; neither is available on this machine (native/README.md).
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "native"
BINARY = "fleetlora-client"
ARCHES = ("x86_64", "aarch64")
CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++"}
WHEEL_PLATFORM = {"aarch64": "manylinux_2_28_aarch64"}
# Debian's multiarch folders, where the target's libmosquitto and OpenSSL live.
MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
APT_PACKAGES = {
    "x86_64": "cmake g++ libmosquitto-dev libssl-dev nlohmann-json3-dev",
    "aarch64": "g++-aarch64-linux-gnu libmosquitto-dev:arm64 libssl-dev:arm64 (multiarch arm64)",
}


class NativeError(RuntimeError):
    """The native client cannot be built or found for an architecture (the message says what is missing)."""


@dataclass(frozen=True)
class NativeStatus:
    """Whether the binary for ``arch`` exists, or could be built here, and if not, why not."""

    arch: str
    build_dir: Path
    built: bool
    missing: tuple[str, ...]

    @property
    def available(self) -> bool:
        return self.built or not self.missing

    def reason(self) -> str:
        return f"the native client for {self.arch} cannot be built here: missing {', '.join(self.missing)}"


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


def build_dir(arch: str) -> Path:
    return ROOT / "build" / f"native-{arch}"


def wheel_cache() -> Path:
    return ROOT / ".cache" / "native"


def _installed_executorch() -> Path | None:
    spec = importlib.util.find_spec("executorch")  # no import: executorch takes seconds to load
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def executorch_root(arch: str, *, download: bool = False, log: Callable[[str], None] = print) -> Path | None:
    """The executorch package folder (``include/``, ``lib/``) to build ``arch`` against.

    The host's own wheel for the host's architecture; for another, the cached wheel of the same
    version, downloaded with pip when ``download`` (else None when not cached).
    """
    if arch == host_arch():
        return _installed_executorch()
    folder = wheel_cache() / f"executorch-{_et_version()}-{arch}"
    if (folder / "executorch" / "include").is_dir():
        return folder / "executorch"
    if not download:
        return None
    wheels = wheel_cache() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pin = f"executorch=={_et_version()}"
    log(f"downloading the {arch} wheel of {pin} (once) into {wheels}")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--platform",
         WHEEL_PLATFORM[arch], "--only-binary=:all:", "--no-deps", pin, "-d", str(wheels)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = sorted(wheels.glob(f"executorch-{_et_version()}-*{arch}.whl"))
    if done.returncode != 0 or not found:
        why = done.stderr.strip()[-500:]
        raise NativeError(f"pip could not download {pin} for {WHEEL_PLATFORM[arch]}: {why}")
    with zipfile.ZipFile(found[-1]) as whl:
        members = [m for m in whl.namelist() if m.startswith(("executorch/include/", "executorch/lib/"))]
        whl.extractall(folder, members)
    return folder / "executorch"


def _et_version() -> str:
    return version("executorch")


def _missing(arch: str) -> list[str]:
    """What this machine lacks to build ``arch`` (empty: it can)."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    cxx = CROSS_CXX.get(arch, "g++") if arch != host_arch() else "g++"
    if shutil.which(cxx) is None:
        missing.append(cxx)
    lib = Path("/usr/lib") / MULTIARCH.get(arch, arch)
    for name, path in (
        ("libmosquitto", lib / "libmosquitto.so"),
        ("OpenSSL", lib / "libssl.so"),
        ("mosquitto.h", Path("/usr/include/mosquitto.h")),
        ("nlohmann/json.hpp", Path("/usr/include/nlohmann/json.hpp")),
    ):
        if not path.exists():
            missing.append(f"{name} ({path})")
    if arch == host_arch() and _installed_executorch() is None:
        missing.append("the executorch wheel (pip install executorch)")
    if missing:
        missing.append(f"[apt-get install {APT_PACKAGES.get(arch, '')}]")
    return missing


def status(arch: str) -> NativeStatus:
    if arch not in ARCHES:
        raise NativeError(f"no native build for architecture {arch!r}; choose from {ARCHES}")
    folder = build_dir(arch)
    return NativeStatus(arch, folder, (folder / BINARY).is_file(), tuple(_missing(arch)))


def _toolchain(arch: str, folder: Path) -> Path:
    path = folder / "toolchain.cmake"
    path.write_text(
        "set(CMAKE_SYSTEM_NAME Linux)\n"
        f"set(CMAKE_SYSTEM_PROCESSOR {arch})\n"
        f"set(CMAKE_CXX_COMPILER {CROSS_CXX[arch]})\n"
        f"set(CMAKE_LIBRARY_ARCHITECTURE {MULTIARCH[arch]})\n"
        # Debian multiarch: the target's libraries are under /usr/lib/<triplet>, headers under /usr/include.
        # The host's pkg-config would hand FindOpenSSL the host's libraries: name the target's.
        f'set(OPENSSL_SSL_LIBRARY /usr/lib/{MULTIARCH[arch]}/libssl.so CACHE FILEPATH "")\n'
        f'set(OPENSSL_CRYPTO_LIBRARY /usr/lib/{MULTIARCH[arch]}/libcrypto.so CACHE FILEPATH "")\n'
        f'set(MOSQUITTO_LIBRARY /usr/lib/{MULTIARCH[arch]}/libmosquitto.so CACHE FILEPATH "")\n'
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)\n"
    )
    return path


def build(arch: str, *, log: Callable[[str], None] = print) -> Path:
    """Build (or bring up to date) the native client for ``arch``; returns its build folder.

    CMake rebuilds only what changed, so a second call is a quick no-op.
    """
    st = status(arch)
    if st.missing:
        raise NativeError(st.reason())
    root = executorch_root(arch, download=True, log=log)
    if root is None:
        raise NativeError(f"no executorch wheel for {arch}")
    folder = st.build_dir
    folder.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(SOURCE), "-B", str(folder), f"-DEXECUTORCH_ROOT={root}"]
    if arch != host_arch():
        configure.append(f"-DCMAKE_TOOLCHAIN_FILE={_toolchain(arch, folder)}")
    if not (folder / "CMakeCache.txt").is_file():
        log(f"configuring the native client for {arch} in {folder}")
        _run(configure, "cmake configure")
    log(f"building the native client for {arch} (a no-op when up to date)")
    _run(["cmake", "--build", str(folder), "-j2"], "cmake build")
    if not (folder / BINARY).is_file():
        raise NativeError(f"the build finished without {folder / BINARY}")
    return folder


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NativeError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{(done.stdout + done.stderr)[-3000:]}")


def runtime_files(folder: Path) -> list[Path]:
    """The binary and the libraries it loads from beside itself: what a device gets in ``bin/``."""
    files = [folder / BINARY, *sorted(p for p in folder.iterdir() if ".so" in p.name and p.is_file())]
    if not files[0].is_file():
        raise NativeError(f"{files[0]} is missing: build it first (fleetlora flash builds it)")
    return files


def main(argv: list[str]) -> int:
    """``python -m devices.native [ARCH]`` (scripts/setup.sh): build, or say why it cannot."""
    arch = argv[0] if argv else host_arch()
    st = status(arch)
    if st.missing:
        print(f"fleetlora setup: not building the native client: {st.reason()}", file=sys.stderr)
        return 0
    try:
        folder = build(arch, log=lambda line: print(f"fleetlora setup: {line}", file=sys.stderr))
    except NativeError as e:
        print(f"fleetlora setup: the native client did not build: {e}", file=sys.stderr)
        return 1
    print(f"fleetlora setup: native client ready: {folder / BINARY}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
