"""The package the image ships, built and installed the way the Dockerfile does it, and
the versions the image, the KubeRay manifests and pyproject.toml must agree on.

The wheel is built by the Dockerfile's own wheel stage, replayed on this machine: its
COPY lines stage the sources (filtered by .dockerignore) and its ``pip wheel`` command
runs with this venv's Python. The wheel is then installed, without dependencies, into a
fresh virtual environment that is not the development one; the dependencies come from
the development venv's site-packages through a ``.pth`` line, which adds the directory
to ``sys.path`` after the new venv's own (and, unlike a site directory, runs none of its
``.pth`` files, so the editable install of this checkout stays out). What the new venv
imports as ``fleet`` is therefore the wheel's, and only what the wheel holds.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fleet.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"
KUBERAY = sorted((REPO / "kuberay").glob("*.yaml"))
RAY_IMAGE = re.compile(
    r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)$"
)
BUILD_TIMEOUT_S = 300


# -- the Dockerfile, read the way docker reads it -----------------------------------------


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments)


def dockerfile_stages(text: str) -> list[Stage]:
    """The build stages of a Dockerfile: comments dropped, continuation lines joined."""
    stages: list[Stage] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or not (line or pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, *name = re.split(r"\s+as\s+", args, flags=re.IGNORECASE)
            stages.append(Stage(base, name[0] if name else None, []))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def _arguments(args: str) -> list[str]:
    """An instruction's words without its ``--flag=value`` options."""
    return [w for w in shlex.split(args) if not w.startswith("--")]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    # Go's filepath.Match, as docker uses it: * and ? stop at a slash; ** crosses them.
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether docker leaves ``path`` (relative to the context) out: the last pattern
    that matches the path or one of its parent directories decides; ``!`` re-includes."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(posixpath.normpath(pattern.lstrip("!").strip("/")))
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def _dockerignore() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class Replay:
    """A stage's WORKDIR and COPY instructions, replayed into ``root`` (a stand-in for
    the image's filesystem), with the build context filtered by .dockerignore."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workdir = "/"
        self.ignore = _dockerignore()

    def host(self, image_path: str) -> Path:
        return self.root / posixpath.join(self.workdir, image_path).lstrip("/")

    def copy(self, args: str) -> None:
        *sources, dest = _arguments(args)
        target = self.host(dest)
        for source in sources:
            src = (REPO / source).resolve()
            files = (
                [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            )
            kept = [
                f
                for f in files
                if not dockerignore_excludes(self.ignore, f.relative_to(REPO).as_posix())
            ]
            assert kept, f"Dockerfile: COPY {source}: nothing of it is in the build context"
            for f in kept:
                out = target / (f.name if src.is_file() else f.relative_to(src))
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)

    def run(self, stage: Stage, on_run: Any = None) -> None:
        for keyword, args in stage.instructions:
            if keyword == "WORKDIR":
                self.workdir = posixpath.join(self.workdir, args)
            elif keyword == "COPY" and "--from=" not in args:
                self.copy(args)
            elif keyword == "RUN" and on_run is not None:
                on_run(self, args)


def _stage(name: str | None) -> Stage:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    if name is None:
        return stages[-1]
    (stage,) = [s for s in stages if s.name == name]
    return stage


# -- the wheel and the fresh venv ---------------------------------------------------------


def _builds_offline() -> bool:
    """Whether this venv itself meets the build requirements of pyproject.toml (then
    ``--no-build-isolation`` needs no network). setuptools builds wheels on its own from
    70.1 on; before that it needs the ``wheel`` package."""

    def version(name: str) -> Version | None:
        try:
            return Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            return None

    for req in map(
        Requirement, tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    ):
        have = version(req.name)
        if have is None or have not in req.specifier:
            return False
    setuptools = version("setuptools")
    return setuptools is not None and (
        setuptools >= Version("70.1") or version("wheel") is not None
    )


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=env, **kwargs
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the Dockerfile's wheel stage, built by replaying that stage."""
    built: list[Path] = []

    def pip_wheel(replay: Replay, args: str) -> None:
        argv = shlex.split(args)
        assert argv[:4] == ["python", "-m", "pip", "wheel"], f"unexpected RUN {args}"
        # This venv's Python for the image's, the image's paths under the replay's root.
        argv = [sys.executable, *argv[1:4]] + [
            str(replay.host(a)) if a.startswith("/") else a for a in argv[4:]
        ]
        if _builds_offline():
            argv.insert(
                4, "--no-build-isolation"
            )  # else pip fetches setuptools, as docker does
        done = _run(argv, cwd=replay.host("."))
        assert done.returncode == 0, done.stdout + done.stderr
        wheel_dir = Path(argv[argv.index("--wheel-dir") + 1])
        built.extend(wheel_dir.glob("fleet-*.whl"))

    Replay(tmp_path_factory.mktemp("image")).run(_stage("wheel"), pip_wheel)
    (path,) = built
    return path


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment holding the wheel, and the dev venv's dependencies
    behind it on sys.path."""
    venv = tmp_path_factory.mktemp("venv")
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    done = _run([*pip, "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    assert done.returncode == 0, done.stdout + done.stderr
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    dev_paths = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    Path(site.stdout.strip(), "_fleet_dev_dependencies.pth").write_text("\n".join(dev_paths))
    return venv


_PROBE = """
import importlib.metadata as md, json, pathlib, fleet
dist = md.distribution("fleet")
here = pathlib.Path(fleet.__file__).parent
print(json.dumps({
    "fleet": fleet.__file__,
    "dist": str(dist.locate_file("")),
    "scripts": {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"},
    "examples": sorted(p.name for p in (here / "examples").glob("*.yaml")),
}))
"""


@cache
def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def test_fleet_in_the_fresh_venv_is_the_wheels_not_this_checkouts(fresh_venv, tmp_path):
    done = _run([str(fresh_venv / "bin" / "python"), "-c", _PROBE], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    fleet_file = Path(found["fleet"])
    assert fleet_file.is_relative_to(fresh_venv), found["fleet"]
    assert not fleet_file.is_relative_to(REPO), found["fleet"]
    assert Path(found["dist"]).is_relative_to(fresh_venv), found["dist"]
    assert found["scripts"] == _pyproject()["project"]["scripts"]
    shipped = sorted(p.name for p in (REPO / "fleet" / "examples").glob("*.yaml"))
    assert shipped and found["examples"] == shipped


def test_the_fleet_command_of_the_wheel_runs_and_lists_every_subcommand(fresh_venv, tmp_path):
    done = _run([str(fresh_venv / "bin" / "fleet"), "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (subcommands,) = [
        a.choices
        for a in build_parser()._actions
        if a.dest == "command"  # the subparsers of this checkout's CLI
    ]
    assert "run" in subcommands
    listed = set(re.findall(r"^    (\S+)", done.stdout, re.MULTILINE))
    assert set(subcommands) - listed == set(), done.stdout


def test_the_wheel_holds_every_module_and_example_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "fleet").rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    assert sources - names == set(), "in the checkout, not in the wheel"
    dist_info = f"fleet-{_pyproject()['project']['version']}.dist-info/"
    strays = {n for n in names if not n.startswith(("fleet/", dist_info))}
    assert strays == set()
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


# -- what else the image carries -----------------------------------------------------------


def test_the_image_runs_as_ray_and_has_the_rayjob_entrypoint(tmp_path):
    final = _stage(None)
    users = [args for keyword, args in final.instructions if keyword == "USER"]
    assert users and users[-1] == "ray"
    replay = Replay(tmp_path)
    replay.run(final)
    assert replay.workdir != "/"
    (job,) = [
        d for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d["kind"] == "RayJob"
    ]
    script = shlex.split(job["spec"]["entrypoint"])[1]
    assert PurePosixPath(script).is_absolute()
    assert replay.host(script).is_file(), f"the image has no {script}"


@pytest.mark.parametrize(
    "path, excluded",
    [
        ("fleet/spec/queues.py", False),
        ("fleet/examples/demo.yaml", False),
        ("pyproject.toml", False),
        ("jobs/load.py", False),
        ("fleet/__pycache__/x.cpython-311.pyc", True),
        (".venv/bin/python", True),
        (".git/HEAD", True),
        ("keys.json", True),
        ("out/trace.json", True),
        ("tests/deploy/test_package.py", True),
    ],
)
def test_the_build_context_holds_the_sources_and_no_secrets_or_caches(path, excluded):
    assert dockerignore_excludes(_dockerignore(), path) is excluded


def test_dockerignore_matching_follows_docker():
    patterns = ["*", "!src", "**/__pycache__", "src/keep/*.txt", "!src/keep/a.txt"]
    assert dockerignore_excludes(patterns, "top.txt")
    assert not dockerignore_excludes(patterns, "src/x/y.py")
    assert dockerignore_excludes(patterns, "src/x/__pycache__/y.pyc")
    assert dockerignore_excludes(patterns, "src/keep/b.txt")
    assert not dockerignore_excludes(patterns, "src/keep/a.txt")
    assert not dockerignore_excludes(patterns, "src/keep/sub/b.txt")  # * stops at /


# -- one Ray version everywhere -------------------------------------------------------------


def version_mismatches(
    dockerfile: str, pyproject: dict[str, Any], manifests: dict[str, list[dict[str, Any]]]
) -> list[str]:
    """Where the Ray or Python version disagrees with the Dockerfile's base image, each
    naming the file: every stage's base, pyproject.toml's Ray pin and requires-python,
    and ``rayVersion`` of every Ray cluster in ``manifests`` (file name -> documents)."""
    stage_names = set()
    versions = set()
    errors = []
    for stage in dockerfile_stages(dockerfile):
        if stage.base not in stage_names:
            m = RAY_IMAGE.match(stage.base)
            if m is None:
                errors.append(f"Dockerfile: FROM {stage.base} is no rayproject/ray image")
            else:
                versions.add((m["ray"], f"{m['major']}.{m['minor']}"))
        if stage.name:
            stage_names.add(stage.name)
    if len(versions) != 1:
        return [
            *errors,
            f"Dockerfile: the stages' base images differ or are missing: {versions}",
        ]
    ((ray, python),) = versions
    (pin,) = [
        r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "ray"
    ]
    if not pin.specifier.contains(ray, prereleases=True):
        errors.append(
            f"pyproject.toml: ray{pin.specifier} does not admit the image's Ray {ray}"
        )
    if python not in SpecifierSet(pyproject["project"]["requires-python"]):
        errors.append(f"pyproject.toml: requires-python excludes the image's Python {python}")
    for name, docs in manifests.items():
        for doc in docs:
            spec = doc.get("spec", {})
            cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
            if doc.get("kind") in ("RayCluster", "RayService", "RayJob"):
                if cluster.get("rayVersion") != ray:
                    errors.append(
                        f"{name} ({doc['kind']}): rayVersion {cluster.get('rayVersion')!r}, "
                        f"but the Dockerfile's image has Ray {ray}"
                    )
    return errors


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        f"kuberay/{p.name}": [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in KUBERAY
    }


def test_the_image_the_manifests_and_the_pin_agree_on_ray_and_python():
    manifests = _manifests()
    assert sum(d["kind"].startswith("Ray") for docs in manifests.values() for d in docs) == 3
    assert version_mismatches(DOCKERFILE.read_text(), _pyproject(), manifests) == []


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda df, pp, m: m["kuberay/rayjob.yaml"][0]["spec"]["rayClusterSpec"].update(
                rayVersion="2.59.0"
            ),
            "kuberay/rayjob.yaml (RayJob): rayVersion '2.59.0', but the Dockerfile's",
        ),
        (
            lambda df, pp, m: m["kuberay/rayservice.yaml"][0]["spec"]["rayClusterConfig"].pop(
                "rayVersion"
            ),
            "kuberay/rayservice.yaml (RayService): rayVersion None",
        ),
        (
            lambda df, pp, m: pp["project"].update(
                dependencies=[
                    "ray[serve,default]>=2.61,<2.62" if d.startswith("ray[") else d
                    for d in pp["project"]["dependencies"]
                ]
            ),
            "pyproject.toml: ray<2.62,>=2.61 does not admit the image's Ray 2.60.0",
        ),
        (
            lambda df, pp, m: pp["project"].update({"requires-python": ">=3.12"}),
            "pyproject.toml: requires-python excludes the image's Python 3.11",
        ),
    ],
    ids=["rayjob", "rayservice-missing", "pin", "python"],
)
def test_a_version_that_disagrees_is_caught_naming_its_file(edit, expected):
    dockerfile, pyproject, manifests = DOCKERFILE.read_text(), _pyproject(), _manifests()
    pyproject = json.loads(json.dumps(pyproject))  # a copy: _pyproject() is cached
    edit(dockerfile, pyproject, manifests)
    errors = version_mismatches(dockerfile, pyproject, manifests)
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_a_dockerfile_stage_on_another_base_is_caught():
    dockerfile = DOCKERFILE.read_text().replace(
        "FROM rayproject/ray:2.60.0-py311\n", "FROM rayproject/ray:2.60.0-py312\n"
    )
    assert dockerfile != DOCKERFILE.read_text()
    (error,) = version_mismatches(dockerfile, _pyproject(), _manifests())
    assert error.startswith("Dockerfile: the stages' base images differ")
