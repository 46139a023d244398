"""Device profiles and device mixes shipped as TOML package data, loaded and validated.

A profile file (``devices/profiles/<name>.toml``) holds the figures of one real device, each with a
comment saying where it comes from, and a ``[sources]`` table repeating that in short. A mix
(``devices/mixes.toml``) is a table of profile name = relative weight. Every error is a
:class:`ProfileError` naming the file and the key.
"""

from __future__ import annotations

import functools
import math
import random
import tomllib
from collections.abc import Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from edge_client.budget import DeviceProfile, ProfileError

__all__ = [
    "DeviceProfile",
    "ProfileError",
    "list_mixes",
    "list_profiles",
    "load_mix",
    "load_profile",
    "parse_profile",
    "sample_devices",
]

_PACKAGE = resources.files("devices")
_PROFILES = _PACKAGE / "profiles"
_MIXES = _PACKAGE / "mixes.toml"

#: TOML type each key must have; keys without a default in DeviceProfile are required.
_KEY_TYPES: dict[str, str] = {
    "name": "string",
    "kind": "string",
    "train_gflops": "number",
    "train_memory_mb": "number",
    "uplink_mbps": "number",
    "downlink_mbps": "number",
    "availability": "number",
    "dropout": "number",
    "energy_j_per_gflop": "number",
    "description": "string",
    "sources": "table",
}
_OPTIONAL = {"name", "energy_j_per_gflop", "description", "sources"}


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _read_toml(file: Traversable | Path, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError("file not found", source=source) from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"not valid TOML: {e}", source=source) from e


def parse_profile(data: dict[str, Any], source: str, *, stem: str | None = None) -> DeviceProfile:
    """Validate a profile's TOML table and build the :class:`DeviceProfile`.

    Parameters
    ----------
    data : dict
        The parsed TOML document.
    source : str
        Where it came from, used in error messages (a file name).
    stem : str, optional
        The file's stem: the default ``name``, which an explicit ``name`` must equal.
    """
    unknown = sorted(set(data) - set(_KEY_TYPES))
    if unknown:
        raise ProfileError(f"unknown key (valid keys: {sorted(_KEY_TYPES)})", key=unknown[0], source=source)
    required = set(_KEY_TYPES) - _OPTIONAL - set(data)
    if stem is None and "name" not in data:
        required.add("name")
    if required:
        raise ProfileError("missing required key", key=sorted(required)[0], source=source)
    for key, value in data.items():
        expected, got = _KEY_TYPES[key], _toml_type(value)
        if got != expected:
            raise ProfileError(f"expected a {expected}, got {got} {value!r}", key=key, source=source)
    kwargs = dict(data)
    if stem is not None and kwargs.setdefault("name", stem) != stem:
        raise ProfileError(
            f"must equal the file name's stem {stem!r}, got {data['name']!r}", key="name", source=source
        )
    try:
        return DeviceProfile(**kwargs)
    except ProfileError as e:
        raise ProfileError(e.reason, key=e.key, source=source) from None


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(
        entry.name[: -len(".toml")] for entry in _PROFILES.iterdir() if entry.name.endswith(".toml")
    )


@functools.cache
def _load_shipped(name: str) -> DeviceProfile:
    file = _PROFILES / f"{name}.toml"
    source = f"devices/profiles/{name}.toml"
    return parse_profile(_read_toml(file, source), source, stem=name)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name (``"pixel_8"``) or any profile file by path (``"my/phone.toml"``).

    Raises
    ------
    ProfileError
        Unknown name, missing file, invalid TOML, or an invalid figure (naming the file and key).
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text:
        path = Path(name_or_path)
        return parse_profile(_read_toml(path, str(path)), str(path), stem=path.stem)
    known = list_profiles()
    if text not in known:
        raise ProfileError(f"unknown device profile {text!r}; known profiles: {', '.join(known)}")
    return _load_shipped(text)


def _mixes() -> dict[str, Any]:
    return _read_toml(_MIXES, "devices/mixes.toml")


def list_mixes() -> list[str]:
    """Names of the shipped device mixes, sorted."""
    return sorted(_mixes())


def load_mix(name: str) -> list[tuple[str, float]]:
    """A named mix as ``[(profile name, weight), ...]`` in file order; weights are positive, not normalized.

    Raises
    ------
    ProfileError
        Unknown mix, a weight that is not a positive number, or a profile that does not exist.
    """
    source = "devices/mixes.toml"
    mixes = _mixes()
    if name not in mixes:
        raise ProfileError(
            f"unknown device mix {name!r}; known mixes: {', '.join(sorted(mixes))}", source=source
        )
    table = mixes[name]
    if not isinstance(table, dict) or not table:
        raise ProfileError("must be a non-empty table of profile = weight", key=name, source=source)
    known = set(list_profiles())
    entries = []
    for profile, weight in table.items():
        key = f"{name}.{profile}"
        if profile not in known:
            raise ProfileError(
                f"no such profile; known profiles: {', '.join(sorted(known))}", key=key, source=source
            )
        if _toml_type(weight) != "number" or not math.isfinite(weight) or weight <= 0:
            raise ProfileError(f"weight must be a finite number > 0, got {weight!r}", key=key, source=source)
        entries.append((profile, float(weight)))
    return entries


def sample_devices(mix: str | Sequence[tuple[str, float]], n: int, seed: int) -> list[DeviceProfile]:
    """Draw ``n`` devices independently from a mix (a name or ``[(profile, weight), ...]``).

    The same ``(mix, n, seed)`` always gives the same list, and the first ``k`` devices of a draw of
    ``n`` are those of a draw of ``k`` (a fleet grows without reshuffling).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    entries = load_mix(mix) if isinstance(mix, str) else list(mix)
    if not entries:
        raise ProfileError("a device mix needs at least one profile")
    for profile_name, weight in entries:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
            raise ProfileError(f"weight must be a finite number > 0, got {weight!r}", key=profile_name)
    profiles = [load_profile(profile_name) for profile_name, _ in entries]
    rng = random.Random(seed)
    return rng.choices(profiles, weights=[w for _, w in entries], k=n)
