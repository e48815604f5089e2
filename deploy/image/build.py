#!/usr/bin/env python3
"""Build the embps image with podman (or docker), here or anywhere: `make image`.

    python3 deploy/image/build.py [--tag embps:0.1.0] [--base auto|pinned|standin] [--json]

Standard library only (Python >= 3.11), so it runs from a fresh clone before any
virtualenv.

DESIGN
- Engine: podman when installed; else docker when its daemon answers (a docker
  client without a daemon is no engine). Where the host needs it, podman gets a
  containers.conf of its own through CONTAINERS_CONF (`engine_env`): runc
  instead of crun on cgroup v1 hosts (crun refuses "hybrid" cgroups), and
  default ulimits no higher than the host's hard limits (podman, as root, asks
  for 1048576 open files, which a host without CAP_SYS_RESOURCE and a lower hard
  limit refuses). The same file serves `podman run` and `podman kube play`
  (which has no --ulimit flag), so the tests use `engine_env` too; the file is
  /var/tmp/embps-image/containers.conf (EMBPS_IMAGE_STATE moves the folder).
- Base image: the Dockerfile's pinned `python:3.11.x-slim-bookworm@sha256:...`
  when it is present or can be pulled. Where no container registry is
  reachable, a stand-in of the same Debian release is made from Debian packages
  (`mmdebstrap`: python3, python3-venv, python-is-python3, passwd; no docs, man
  pages or locales, as in the slim images) and imported as
  `localhost/embps-base:bookworm-<recipe hash>`; the Dockerfile's
  `ARG PYTHON_IMAGE` takes it. It runs Debian's Python 3.11 (3.11.2) instead of
  the pinned 3.11.x, in /usr/bin instead of /usr/local/bin; the Dockerfile
  does not depend on either.
- Package index: the build's pip uses the host's settings, passed at build
  time and never written into a file: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and
  PIP_TRUSTED_HOST as build args (http(s) URLs only: a file:// index of the
  host is not in the container), the CA bundle (PIP_CERT, pip's `cert`
  setting, else REQUESTS_CA_BUNDLE / SSL_CERT_FILE) as the build secret
  `pip-ca`. Each comes from the environment first, then `pip config list`.
- Cache: the image is labelled with a hash of its inputs (Dockerfile, the
  build context as .dockerignore selects it, base image id, build args) and
  also tagged `localhost/embps:ctx-<hash>`; when that tag exists the build is
  skipped (`cached: true`). The stand-in base is cached by its recipe hash.
  A lock file serialises concurrent builds on one host.

LIMITATIONS
- The stand-in needs root (or a user namespace mmdebstrap can use) and
  Debian's mmdebstrap; it takes about a minute. It is a test base: push images
  built on the pinned base.
- docker: the ulimit and runtime settings are left to the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
DEFAULT_TAG = f"embps:{VERSION}"

# The stand-in base: Debian's Python of the pinned base's release.
STANDIN_SUITE = "bookworm"
STANDIN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd")
STANDIN_DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
    "force-unsafe-io",  # no fsync per file: the tree is thrown away after the import
)
STANDIN_REPO = "localhost/embps-base"
CONTEXT_LABEL = "org.embps.build-inputs"
KEEP_BUILDS = 3  # ctx-<hash> images kept for the cache (each holds its own ~340 MB venv layer)
PULL_TIMEOUT_S = 300
STANDIN_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 1800
# What podman (as root) gives a container by default, and the most it can give:
# it asks for 1048576 open files and processes; where the host's hard limit is
# lower, podman lowers its own limits (nproc to 32768 at most) and container
# creation fails unless the container asks for no more than that.
PODMAN_ULIMITS = {
    "nofile": (resource.RLIMIT_NOFILE, 1048576, 1048576),  # (limit, podman's default, most)
    "nproc": (resource.RLIMIT_NPROC, 1048576, 32768),
}
STATE_DIR = Path(os.environ.get("EMBPS_IMAGE_STATE", "/var/tmp/embps-image"))


class BuildError(RuntimeError):
    """The image cannot be built here; the message says why and what to install."""


def log(msg: str) -> None:
    print(f"[image] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The container engine
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """A container engine command and the environment to run it with."""

    name: str  # "podman" or "docker"
    path: str
    env: dict[str, str]  # os.environ plus CONTAINERS_CONF where needed
    notes: tuple[str, ...] = ()  # what was adapted to this host, for the log

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``<engine> args...``: output captured as text; BuildError on a non-zero exit if check."""
        res = subprocess.run(
            [self.path, *args],
            env=self.env,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise BuildError(f"{self.name} {' '.join(args[:3])} ... failed:\n{res.stderr[-4000:]}")
        return res

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0

    def image_info(self, ref: str) -> dict:
        return json.loads(self.run("image", "inspect", ref).stdout)[0]


def _cgroup_v2() -> bool:
    return Path("/sys/fs/cgroup/cgroup.controllers").is_file()


def containers_conf() -> tuple[str, tuple[str, ...]]:
    """(containers.conf text, notes) that this host needs for podman; ("", ()) if none."""
    lines: list[str] = []
    notes: list[str] = []
    ulimits = []
    for name, (which, default, most) in PODMAN_ULIMITS.items():
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY and hard < default:
            value = min(hard, most)
            ulimits.append(f'"{name}={value}:{value}"')
            notes.append(f"ulimit {name}={value} (the host's hard limit is {hard})")
    if ulimits:
        lines += ["[containers]", f"default_ulimits = [{', '.join(ulimits)}]"]
    if not _cgroup_v2() and shutil.which("runc"):
        lines += ["[engine]", 'runtime = "runc"']
        notes.append("runtime runc (cgroup v1 host)")
    return ("\n".join(lines) + "\n" if lines else ""), tuple(notes)


def engine_env(base: dict[str, str] | None = None) -> tuple[dict[str, str], tuple[str, ...]]:
    """Environment for podman on this host (CONTAINERS_CONF set only where needed)."""
    env = dict(os.environ if base is None else base)
    text, notes = containers_conf()
    if text and "CONTAINERS_CONF" not in env:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        conf = STATE_DIR / "containers.conf"
        if not conf.is_file() or conf.read_text(encoding="utf-8") != text:
            tmp = conf.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(conf)  # atomic: a concurrent podman reads the old or the new file
        env["CONTAINERS_CONF"] = str(conf)
    return env, notes


def find_engine(wanted: str = "auto") -> Engine:
    """podman, else docker with a reachable daemon; BuildError naming what to install."""
    if wanted in ("auto", "podman"):
        path = shutil.which("podman")
        if path:
            env, notes = engine_env()
            return Engine("podman", path, env, notes)
        if wanted == "podman":
            raise BuildError("podman is not installed (Debian: apt-get install podman runc)")
    path = shutil.which("docker")
    if path:
        res = subprocess.run([path, "info"], capture_output=True, text=True, timeout=30)
        if res.returncode == 0:
            return Engine("docker", path, dict(os.environ))
        if wanted == "docker":
            raise BuildError(f"docker is installed but its daemon does not answer:\n{res.stderr}")
    raise BuildError(
        "no container engine: install podman (Debian: apt-get install podman runc "
        "mmdebstrap catatonit) or run a docker daemon"
    )


# --------------------------------------------------------------------------
# The build context (.dockerignore) and its hash
# --------------------------------------------------------------------------


def _glob(path: str, pattern: str) -> bool:
    """Docker's pattern match for the syntax .dockerignore uses: `*` within one level, `**/`."""
    if pattern.startswith("**/"):
        parts = path.split("/")
        return any(_glob("/".join(parts[i:]), pattern[3:]) for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern) and path.count("/") == pattern.count("/")


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[str]:
    """The rules of a .dockerignore file, comments and blank lines dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def dockerignored(path: str, rules: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, posix) out of the build context.

    The last matching rule wins; a rule that matches a directory matches what is below it.
    """
    parts = path.split("/")
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if any(_glob("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            excluded = not negate
    return excluded


def context_files(root: Path = ROOT) -> list[str]:
    """Relative paths of the files the build context holds, sorted."""
    rules = dockerignore_rules(root / ".dockerignore")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # prune what no rule can bring back (.git, .venv: large, never in the context)
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "node_modules")]
        for f in filenames:
            rel = rel_dir + f
            if not dockerignored(rel, rules) and os.path.isfile(os.path.join(dirpath, f)):
                out.append(rel)
    return sorted(out)


def inputs_hash(build_args: dict[str, str], base_id: str, root: Path = ROOT) -> str:
    """sha256 over everything the image is built from: Dockerfile, context, base, args."""
    h = hashlib.sha256()
    h.update(b"Dockerfile\0" + (root / "Dockerfile").read_bytes())
    h.update(b".dockerignore\0" + (root / ".dockerignore").read_bytes())
    for rel in context_files(root):
        h.update(f"\0file {rel}\0".encode() + (root / rel).read_bytes())
    h.update(f"\0base {base_id}".encode())
    for k in sorted(build_args):
        h.update(f"\0arg {k}={build_args[k]}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------
# pip settings of the host
# --------------------------------------------------------------------------


def _pip_config() -> dict[str, str]:
    """``pip config list`` of the host as {key: value} (keys like ``global.index-url``)."""
    for py in (sys.executable, "python3"):
        try:
            res = subprocess.run(
                [py, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0:
            out = {}
            for line in res.stdout.splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    out[key.strip()] = value.strip().strip("'\"")
            return out
    return {}


def _setting(name: str, config: dict[str, str]) -> str | None:
    """A pip option from PIP_<NAME>, else from pip's config (install, then global section)."""
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        return env
    for section in ("install", "global"):
        if config.get(f"{section}.{name}"):
            return config[f"{section}.{name}"]
    return None


def pip_settings() -> tuple[dict[str, str], str | None]:
    """(build args for the Dockerfile's pip ARGs, CA bundle path or None), from the host."""
    config = _pip_config()
    args: dict[str, str] = {}
    index = _setting("index-url", config)
    if index and index.startswith(("http://", "https://")):
        args["PIP_INDEX_URL"] = index
    extra = _setting("extra-index-url", config)
    if extra:
        urls = [u for u in extra.split() if u.startswith(("http://", "https://"))]
        if urls:
            args["PIP_EXTRA_INDEX_URL"] = " ".join(urls)
    trusted = _setting("trusted-host", config)
    if trusted:
        args["PIP_TRUSTED_HOST"] = trusted
    cert = _setting("cert", config)
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        cert = cert or os.environ.get(var)
    return args, (cert if cert and Path(cert).is_file() else None)


# --------------------------------------------------------------------------
# Base image
# --------------------------------------------------------------------------


def pinned_base() -> str:
    """The default of the Dockerfile's ``ARG PYTHON_IMAGE``."""
    m = re.search(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    if not m:
        raise BuildError("the Dockerfile has no `ARG PYTHON_IMAGE=<image>` default")
    return m.group(1)


def _host_debian_sources() -> Path | None:
    """The host's deb822 sources file for the stand-in's release (its mirror), if any."""
    for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if re.search(rf"^Suites:.*\b{STANDIN_SUITE}\b", text, re.M) and "/debian" in text:
            return p
    return None


def standin_ref() -> str:
    recipe = json.dumps([STANDIN_SUITE, STANDIN_PACKAGES, STANDIN_DPKG_OPTS], sort_keys=True)
    return f"{STANDIN_REPO}:{STANDIN_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def make_standin(engine: Engine) -> str:
    """Import (once) a Debian base with Python 3.11 made by mmdebstrap; its reference."""
    ref = standin_ref()
    if engine.image_exists(ref):
        return ref
    mm = shutil.which("mmdebstrap")
    if not mm:
        raise BuildError(
            "the pinned base image cannot be pulled here and mmdebstrap, which makes the "
            "stand-in base, is not installed (Debian: apt-get install mmdebstrap)"
        )
    t0 = time.monotonic()
    log(f"making the stand-in base {ref} with mmdebstrap ({STANDIN_SUITE}: python3 ...)")
    with tempfile.TemporaryDirectory(prefix="embps-base-", dir=_scratch_dir()) as tmp:
        tar = Path(tmp) / "rootfs.tar"
        argv = [mm, "--variant=minbase", "--include=" + ",".join(STANDIN_PACKAGES)]
        argv += [f"--dpkgopt={o}" for o in STANDIN_DPKG_OPTS]
        argv += [STANDIN_SUITE, str(tar)]
        sources = _host_debian_sources()
        if sources is not None:
            argv.append(str(sources))  # the host's mirror; else mmdebstrap's default
        env = dict(os.environ, TMPDIR=tmp)
        res = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=STANDIN_TIMEOUT_S
        )
        if res.returncode != 0:
            raise BuildError(f"mmdebstrap failed:\n{res.stderr[-4000:]}")
        engine.run("import", "--change", 'CMD ["python3"]', str(tar), ref, timeout=600)
    log(f"stand-in base {ref} ready in {time.monotonic() - t0:.0f}s")
    return ref


def _scratch_dir() -> str | None:
    """A RAM-backed scratch directory when there is room (dpkg is much faster there)."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return str(shm) if st.f_bavail * st.f_frsize > 2 * 1024**3 else None


def resolve_base(engine: Engine, mode: str) -> tuple[str, str]:
    """(base image reference, "pinned" or "standin") for ``--base mode``."""
    pinned = pinned_base()
    if mode in ("auto", "pinned"):
        if engine.image_exists(pinned):
            return pinned, "pinned"
        log(f"pulling {pinned}")
        try:
            res = engine.run("pull", pinned, check=False, timeout=PULL_TIMEOUT_S)
            pulled = res.returncode == 0
            why = res.stderr.strip().splitlines()[-1:] or [""]
        except subprocess.TimeoutExpired:
            pulled, why = False, [f"no answer in {PULL_TIMEOUT_S}s"]
        if pulled:
            return pinned, "pinned"
        if mode == "pinned":
            raise BuildError(f"cannot pull the pinned base {pinned}: {why[0]}")
        log(f"the pinned base cannot be pulled ({why[0]}); using a stand-in base")
    return make_standin(engine), "standin"


# --------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------


@dataclass
class Built:
    """What `build` made (or found): printed as JSON with --json."""

    image: str  # the tag asked for, e.g. embps:0.1.0
    id: str
    engine: str
    base: str  # base image reference
    base_kind: str  # "pinned" or "standin"
    size: int  # bytes, the image with its base
    base_size: int  # bytes, the base alone
    inputs: str  # hash of the build inputs (label org.embps.build-inputs)
    cached: bool  # True: an image of these inputs existed, nothing was built
    seconds: float


def prune_old_builds(engine: Engine, keep: int) -> None:
    """Untag all but the newest ``keep`` ``localhost/embps:ctx-*`` images (a build per
    source change would otherwise fill the disk); the layers go once nothing uses them."""
    res = engine.run("images", "--format", "{{.Repository}}:{{.Tag}} {{.CreatedAt}}", check=False)
    ours = [ln.split(" ", 1) for ln in res.stdout.splitlines() if ":ctx-" in ln.split(" ")[0]]
    ours = [(ref, when) for ref, when in ours if ref.startswith("localhost/embps:ctx-")]
    for ref, _ in sorted(ours, key=lambda x: x[1], reverse=True)[keep:]:
        engine.run("rmi", ref, check=False)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(tag: str = DEFAULT_TAG, base_mode: str = "auto", engine_name: str = "auto") -> Built:
    """Build (or find cached) the image ``tag``; see the module docstring."""
    t0 = time.monotonic()
    engine = find_engine(engine_name)
    for note in engine.notes:
        log(f"{engine.name} on this host: {note}")
    with _lock():
        base, base_kind = resolve_base(engine, base_mode)
        base_info = engine.image_info(base)
        pip_args, ca = pip_settings()
        build_args = {"PYTHON_IMAGE": base, **pip_args}
        digest = inputs_hash(build_args, base_info["Id"])
        cache_ref = f"localhost/embps:ctx-{digest[:16]}"
        cached = engine.image_exists(cache_ref)
        if cached:
            engine.run("tag", cache_ref, tag)
        else:
            argv = ["build", "--file", str(DOCKERFILE), "--tag", tag, "--tag", cache_ref]
            argv += ["--label", f"{CONTEXT_LABEL}={digest}"]
            if engine.name == "podman":
                argv += ["--format", "docker"]  # OCI images drop HEALTHCHECK
            for k, v in build_args.items():
                argv += ["--build-arg", f"{k}={v}"]
            if ca:
                argv += ["--secret", f"id=pip-ca,src={ca}"]
            log(f"building {tag} on {base} ({base_kind}) with {engine.name}")
            proc = subprocess.run(
                [engine.path, *argv, str(ROOT)],
                env=engine.env,
                stdout=sys.stderr,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
            )
            if proc.returncode != 0:
                raise BuildError(f"{engine.name} build failed (exit {proc.returncode}): see above")
            prune_old_builds(engine, keep=KEEP_BUILDS)
        info = engine.image_info(tag)
    built = Built(
        image=tag,
        id=info["Id"],
        engine=engine.name,
        base=base,
        base_kind=base_kind,
        size=int(info["Size"]),
        base_size=int(base_info["Size"]),
        inputs=digest,
        cached=cached,
        seconds=round(time.monotonic() - t0, 1),
    )
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    parser.add_argument(
        "--base",
        choices=("auto", "pinned", "standin"),
        default=os.environ.get("EMBPS_IMAGE_BASE", "auto"),
        help="auto: the pinned base if it can be pulled, else a Debian stand-in",
    )
    parser.add_argument("--engine", choices=("auto", "podman", "docker"), default="auto")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        b = build(args.tag, args.base, args.engine)
    except BuildError as e:
        print(f"make image: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(b)))
    else:
        mb = 1e6
        state = "cached, not rebuilt" if b.cached else f"built in {b.seconds:.0f}s"
        print(
            f"{b.image} ({b.engine}, {state}): {b.size / mb:.0f} MB = base {b.base} "
            f"{b.base_size / mb:.0f} MB ({b.base_kind}) + {(b.size - b.base_size) / mb:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
