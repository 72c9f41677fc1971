"""requirements.lock agrees with pyproject.toml: every pinned dependency is locked at its pin, with a hash."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO_ROOT


def locked() -> dict[str, tuple[str, list[str]]]:
    text = (REPO_ROOT / "requirements.lock").read_text()
    entries = {}
    for match in re.finditer(
        r"^([A-Za-z0-9_.\-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M
    ):
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        entries[name] = (match.group(2), re.findall(r"[0-9a-f]{64}", match.group(3)))
    return entries


def test_every_pin_in_pyproject_is_locked_at_that_version_with_a_hash():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["test"]
    lock = locked()
    for pin in pins:
        name, version = pin.split("==")
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in lock, f"{name} is pinned in pyproject.toml but missing from requirements.lock: run make lock"
        assert lock[key][0] == version, f"{name}: pyproject.toml pins {version}, the lock has {lock[key][0]}"


def test_every_locked_package_has_a_hash_and_nothing_else_is_in_the_file():
    text = (REPO_ROOT / "requirements.lock").read_text()
    entries = locked()
    requirement_lines = [line for line in text.splitlines() if line and not line.startswith(("#", "    "))]
    assert len(requirement_lines) == len(entries) > 100  # torch and DVC bring ~150 packages
    assert all(hashes for _, hashes in entries.values())
    assert "imgcls" not in entries  # the project installs editable after the lock
