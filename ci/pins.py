"""The version pins of the environments ci/env builds.

    python ci/pins.py floor                     the lowest versions the project declares, as == pins
    python ci/pins.py colab FREEZE [OS_INFO]    ci/colab.txt from Colab's published `pip freeze`
    python ci/pins.py python 3.10               where Python 3.10 is (pyenv's versions, else PATH)
    python ci/pins.py unchanged REPORT          status 2 if pip's --report would change a ci/colab.txt pin

`colab` asks pip (with the Python that OS_INFO names, dry run) which packages `pip install -e ".[dev]"`
would install with the freeze's versions, and pins those of them that Colab has: one command, then
review the diff. Colab's builds carry a local tag (torch==2.11.0+cu128); the registry's release of the
same version is what a CPU machine installs, so the tag is dropped, and so are the CUDA libraries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLAB = ROOT / "ci" / "colab.txt"
# The CUDA libraries belong to a torch build: Colab's cu128 torch brings CUDA 12's, the registry's
# build of the same version its own CUDA's. Pinning Colab's would make the registry's torch uninstallable.
CUDA_STACK = ("nvidia-", "cuda-")


def fail(message: str) -> None:
    """Bad input: one line on stderr, status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floor() -> list[str]:
    """requirements.txt's and the dev extra's lower bounds (>=) and exact pins (==), all as == pins."""
    dev = re.search(r"^dev = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M)  # one line there
    if not dev:
        fail("pyproject.toml has no one-line `dev = [...]` extra to take the dev floors from")
    lines = (ROOT / "requirements.txt").read_text().splitlines() + re.findall(r'"([^"]+)"', dev[1])
    pins = []
    for line in (line.split("#")[0].strip() for line in lines):
        if match := re.match(r"([A-Za-z0-9._-]+)\s*(>=|==)\s*([^,;\s]+)", line):  # an upper bound may follow
            pins.append(f"{match[1]}=={match[3]}")
        elif line:
            fail(f"{line!r} in the requirements has no lower bound (>= or ==); give it one")
    return pins


def freeze_versions(freeze: str) -> dict[str, tuple[str, str]]:
    """{canonical name: (name, version)} of a `pip freeze`, without local tags, URLs and the CUDA stack."""
    versions = {}
    for line in freeze.splitlines():
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^+\s]+)(\+\S+)?", line.strip())
        if match and not canonical(match[1]).startswith(CUDA_STACK):
            versions[canonical(match[1])] = (match[1], match[2])
    return versions


def colab(freeze: Path, os_info: Path) -> list[str]:
    """The freeze's versions of every package the project's install would bring, with a header."""
    versions = freeze_versions(freeze.read_text())
    if not versions:
        fail(f"{freeze} has no name==version lines; expected the output of `pip freeze`")
    found = re.search(r"^Python (\d+\.\d+)", os_info.read_text(), re.M) if os_info.is_file() else None
    if not found:
        fail(f"{os_info} names no Python version (a line 'Python 3.x.y'); pass Colab's os-info")
    python = find_python(found[1])
    with tempfile.TemporaryDirectory() as tmp:
        constraints, report = Path(tmp, "constraints.txt"), Path(tmp, "report.json")
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in versions.values()))
        command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                   str(report), "-c", str(constraints), "-e", f"{ROOT}[dev]"]
        # no pip configuration: Colab has none, and this machine's may cap or add packages
        if subprocess.run(command, env=os.environ | {"PIP_CONFIG_FILE": os.devnull}).returncode != 0:
            fail(f"pip could not resolve the project with {freeze.name}'s versions (above)")
        installs = json.loads(report.read_text())["install"]
    pinned = sorted((versions[key] for key in {canonical(i["metadata"]["name"]) for i in installs}
                     if key in versions), key=lambda pin: canonical(pin[0]))
    return ["# Colab's GPU runtime: every package `pip install -e \".[dev]\"` brings that Colab has, at",
            f"# Colab's version. From {freeze.name} by `python ci/pins.py colab`; do not edit by hand.",
            f"# python {found[1]}",
            *(f"{name}=={version}" for name, version in pinned)]


def unchanged(report: Path, colab: Path = COLAB) -> None:
    """Refuse an install (pip's --dry-run --report) that would replace any of Colab's packages."""
    pins = {canonical(name): version for name, _, version in
            (line.partition("==") for line in colab.read_text().splitlines() if not line.startswith("#"))}
    installs = [i["metadata"] for i in json.loads(report.read_text())["install"]]
    changes = [f"{m['name']} {pins[key]} -> {m['version']}" for m in installs
               if (key := canonical(m["name"])) in pins]
    if changes:
        fail(f"installing the project would change Colab's {', '.join(changes)}: a student would have to "
             "restart the runtime; allow Colab's versions in requirements.txt")


def find_python(version: str) -> str:
    """pythonX.Y from pyenv's versions (the newest patch release), else from PATH."""
    if not re.fullmatch(r"\d+\.\d+", version):
        fail(f"{version!r} is not a Python version; expected X.Y, e.g. 3.10")
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = sorted(root.glob(f"versions/{version}.*/bin/python{version}"),
                   key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)])
    python = str(found[-1]) if found else shutil.which(f"python{version}")
    if not python:
        fail(f"no Python {version} (not in {root}/versions, not on PATH): install it, e.g. "
                 f"`pyenv install {version}`, and run again")
    return python


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["python"] and len(args) == 2:
        print(find_python(args[1]))
    elif args[:1] == ["unchanged"] and len(args) == 2:
        unchanged(Path(args[1]))
    elif args[:1] == ["floor"] and len(args) == 1:
        print("\n".join(floor()))
    elif args[:1] == ["colab"] and len(args) in (2, 3):
        freeze = Path(args[1])
        os_info = Path(args[2]) if len(args) == 3 else freeze.with_name("os-info-gpu.txt")
        COLAB.write_text("\n".join(colab(freeze, os_info)) + "\n")
        print(f"wrote {COLAB.relative_to(ROOT)}; review it with `git diff ci/colab.txt`")
    else:
        fail("usage: python ci/pins.py floor | colab FREEZE [OS_INFO] | python X.Y | unchanged REPORT")
