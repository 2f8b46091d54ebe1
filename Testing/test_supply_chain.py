"""The install is hash-pinned: `make install` takes every package from `requirements.lock` (pip-compile
--generate-hashes), sam2 from `requirements-sam2.lock`, and the lock agrees with its input and with
the project's declared dependencies. Static checks of the repository's files (no network, no pip)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def lock_entries(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """{canonical name: (pinned version, sha256 list)} of a pip-compile style lock file."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))  # join continuation lines
    entries: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)(.*)$", line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in entries, f"{path.name}: {name} pinned twice"
        entries[name] = (Version(m.group(2)), HASH.findall(m.group(3)))
    return entries


def pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not pinned with =="
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def test_every_locked_package_has_a_hash_and_every_input_pin_is_locked() -> None:
    lock = lock_entries(ROOT / "requirements.lock")
    missing_hash = [name for name, (_, hashes) in lock.items() if not hashes]
    assert not missing_hash, f"packages without --hash in requirements.lock: {missing_hash}"
    assert {"torch", "setuptools", "slicerio", "filelock", "pynrrd", "pytest"} <= set(lock)
    for name, version in pins(ROOT / "requirements.txt").items():
        assert name in lock, f"{name} is in requirements.txt but not in requirements.lock: regenerate the lock"
        locked = lock[name][0]
        # torch's CPU wheel carries a local label (2.13.0+cpu) that the input does not name
        same = locked == version or (not version.local and Version(locked.public) == version)
        assert same, f"{name}: requirements.txt pins {version}, requirements.lock has {locked}: regenerate the lock"


def test_sam2_source_upload_is_pinned_by_hash() -> None:
    sam2 = lock_entries(ROOT / "requirements-sam2.lock")
    assert list(sam2) == ["sam2"]
    version, hashes = sam2["sam2"]
    assert version == Version("1.1.0") and len(hashes) == 1


def test_project_dependencies_are_satisfied_by_the_lock() -> None:
    lock = lock_entries(ROOT / "requirements.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [Requirement(d) for d in project["dependencies"]]
    declared += [Requirement(d) for extra in project["optional-dependencies"].values() for d in extra]
    names = {canonicalize_name(r.name) for r in declared}
    assert {"slicerio", "filelock", "pynrrd"} <= names
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in lock, f"pyproject.toml needs {req}, requirements.lock lacks {name}"
        assert req.specifier.contains(lock[name][0], prereleases=True), (
            f"pyproject.toml needs {req}, requirements.lock pins {lock[name][0]}"
        )


def _install_recipe() -> str:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", makefile, re.M)
    assert m, "Makefile: no $(STAMP) install recipe"
    return m.group(1)


def test_make_install_uses_only_the_hash_pinned_files() -> None:
    recipe = [line.strip() for line in _install_recipe().splitlines()]
    installs = [line for line in recipe if "pip install" in line]
    assert installs == [
        "$(PY) -m pip install --require-hashes -r requirements.lock",
        "SAM2_BUILD_CUDA=0 $(PY) -m pip install --require-hashes --no-deps --no-build-isolation -r requirements-sam2.lock",
        "$(PY) -m pip install --no-deps --no-build-isolation -e .",
    ]
    header = re.search(r"^(\$\(STAMP\):.*)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M).group(1)
    assert "requirements.lock" in header and "requirements-sam2.lock" in header


def test_readme_gives_the_command_that_made_the_lock() -> None:
    lock_header = (ROOT / "requirements.lock").read_text(encoding="utf-8").split("\n\n", 1)[0]
    m = re.search(r"^#\s+(pip-compile .*)$", lock_header, re.M)
    assert m, "requirements.lock was not written by pip-compile"
    command = m.group(1).strip()
    assert "--generate-hashes" in command and "--allow-unsafe" in command
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert command in readme, f"README.md should show how the lock was made: {command}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd ", "export "))]
    # Besides the README's test command, CI installs exactly two system packages, each only when it
    # is missing: Debian's chromium (the report tests render pages in it) and openssh-server (the
    # remote-worker tests run sshd on 127.0.0.1).
    apt = [line for line in commands if "apt-get" in line]
    assert len(apt) == 2 and re.search(r"apt-get install -y -qq chromium\b", apt[0]), apt
    assert apt[0].startswith("command -v chromium ") and re.findall(r"install -y -qq (\S+)", apt[0]) == ["chromium"]
    assert apt[1].startswith("[ -x /usr/sbin/sshd ] ||"), apt
    assert re.findall(r"install -y -qq (\S+)", apt[1]) == ["openssh-server"]
    assert [line for line in commands if line not in apt] == ["make test"]
    assert commands[-1] == "make test"


@pytest.mark.parametrize("name", ["requirements.lock", "requirements-sam2.lock"])
def test_hashes_are_well_formed(name: str) -> None:
    text = (ROOT / name).read_text(encoding="utf-8")
    assert "--hash=" in text
    bad = [h for h in re.findall(r"--hash=(\S+)", text) if not re.fullmatch(r"sha256:[0-9a-f]{64}", h)]
    assert not bad, bad
