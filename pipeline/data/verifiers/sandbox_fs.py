"""What the code sandbox's filesystem contains: the interpreter, its shared libraries and its standard
library, read-only, and nothing else of the host (no ``/etc/passwd``, no project source, no datasets).

``interpreter_layout`` asks the interpreter once (on the host) which files it maps when every standard
extension module is loaded and where its standard library lives; ``root_plan`` turns that into the list
of operations the sandbox's boot script replays inside its own mount namespace on an empty tmpfs
(``pipeline/data/verifiers/sandbox_boot.py``): make directories, recreate symlinks, bind-mount files and
directories read-only, and hide the interpreter's ``site-packages`` behind an empty mount.

Paths keep their host names (``/usr/lib/python3.11``), so the interpreter finds its prefix exactly as
it does on the host. Symlinks on the way to a file (``/lib -> usr/lib``, a library's soname link) are
recreated, never followed into a bind of a whole host directory.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from dataclasses import dataclass

# Ops replayed by the boot script, in order: ("dir", path), ("symlink", path, target), ("bind", path),
# ("hide", path). Paths are absolute inside the sandbox (and the same on the host for "bind").
Op = tuple[str, ...]

# Loaded in a throw-away interpreter: every standard extension module, so /proc/self/maps lists every
# shared library the standard library can need; then where the standard library and site-packages are.
_PROBE = r"""
import glob, importlib, json, os, sys, sysconfig
for d in [p for p in sys.path if os.path.basename(p) == "lib-dynload"]:
    for f in sorted(glob.glob(os.path.join(d, "*.so"))):
        try:
            importlib.import_module(os.path.basename(f).split(".")[0])
        except BaseException:
            pass
maps = set()
with open("/proc/self/maps") as fh:
    for line in fh:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            maps.add(parts[5].rstrip("\n").replace(" (deleted)", ""))
paths = sysconfig.get_paths()
print(json.dumps({
    "stdlib": [p for p in sys.path if p and os.path.exists(p)],
    "site": sorted({paths["purelib"], paths["platlib"]}),
    "maps": sorted(maps),
}))
"""

# Device nodes a program may expect; each is bind-mounted from the host's /dev.
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DEV_LINKS = (
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
)
# The one writable place: a size-capped tmpfs, also mounted at the usual temp dirs.
SANDBOX_DIR = "/sandbox"
WORK_DIR = "/sandbox/work"
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass(frozen=True)
class InterpreterLayout:
    """The host files the sandbox interpreter needs (from ``interpreter_layout``)."""

    python: str  # the interpreter as invoked (may be a symlink)
    stdlib: tuple[str, ...]  # sys.path entries of an isolated interpreter: zip, stdlib dir, lib-dynload
    site: tuple[str, ...]  # site-packages dirs: hidden where they lie inside a standard-library dir
    files: tuple[str, ...]  # mapped files: the binary, the loader, shared libraries, locale data


def interpreter_layout(python: str) -> InterpreterLayout:
    """Run ``python`` once to learn what it maps and where its standard library is."""
    out = subprocess.run(
        [python, "-I", "-S", "-c", _PROBE], capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
    )
    if out.returncode != 0:
        raise RuntimeError(f"cannot probe the sandbox interpreter {python}: {out.stderr.decode()[-500:]}")
    info = json.loads(out.stdout.splitlines()[-1])  # the last line: a module may print on import
    files = [python, *info["maps"]]
    interp = elf_interpreter(os.path.realpath(python))
    if interp:
        files.append(interp)
    if os.path.exists("/etc/ld.so.cache"):  # how the loader finds libraries by soname
        files.append("/etc/ld.so.cache")
    return InterpreterLayout(
        python=python, stdlib=tuple(info["stdlib"]), site=tuple(info["site"]), files=tuple(files)
    )


def elf_interpreter(path: str) -> str | None:
    """The program interpreter (``PT_INTERP``, the dynamic loader) an ELF executable asks for, if any."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return None
        bits64, little = head[4] == 2, head[5] == 1
        end = "<" if little else ">"
        if bits64:
            phoff, phentsize, phnum = (
                struct.unpack(end + "Q", head[32:40])[0],
                *struct.unpack(end + "HH", head[54:58]),
            )
        else:
            phoff, phentsize, phnum = (
                struct.unpack(end + "I", head[28:32])[0],
                *struct.unpack(end + "HH", head[42:46]),
            )
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            if struct.unpack(end + "I", ph[:4])[0] != 3:  # PT_INTERP
                continue
            if bits64:
                offset, size = struct.unpack(end + "Q", ph[8:16])[0], struct.unpack(end + "Q", ph[32:40])[0]
            else:
                offset, size = struct.unpack(end + "I", ph[4:8])[0], struct.unpack(end + "I", ph[16:20])[0]
            f.seek(offset)
            return f.read(size).rstrip(b"\0").decode()
    return None


class _Plan:
    """Accumulates ops without duplicates; ``reach`` walks a host path the way the kernel resolves it."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._seen: set[str] = set()

    def add(self, op: Op) -> None:
        if op[1] not in self._seen:
            self._seen.add(op[1])
            self.ops.append(op)

    def reach(self, path: str, depth: int = 0) -> str | None:
        """Recreate every directory and symlink on the way to ``path``; returns the real path it leads to
        (None for a dangling link or a symlink loop)."""
        if depth > 20:
            return None
        parts = os.path.normpath(path).split("/")[1:]
        cur = "/"
        for i, part in enumerate(parts):
            nxt = os.path.join(cur, part)
            if os.path.islink(nxt):
                target = os.readlink(nxt)
                self.add(("symlink", nxt, target))
                resolved = os.path.normpath(os.path.join(cur, target))
                return self.reach(os.path.join(resolved, *parts[i + 1 :]), depth + 1)
            if not os.path.exists(nxt):
                return None
            if i < len(parts) - 1:
                self.add(("dir", nxt))
            cur = nxt
        return cur

    def bind(self, path: str) -> None:
        real = self.reach(path)
        if real is not None and real != "/":
            self.add(("bind", real))


def _inside(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _soname_links(files: list[str]) -> list[str]:
    """Symlinks next to each file that point at it (``libffi.so.8 -> libffi.so.8.1.2``): the loader opens
    libraries by those names."""
    out = []
    for folder in sorted({os.path.dirname(f) for f in files}):
        wanted = {f for f in files if os.path.dirname(f) == folder}
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink() and os.path.realpath(entry.path) in wanted:
                out.append(entry.path)
    return out


def root_plan(layout: InterpreterLayout) -> list[Op]:
    """The sandbox root: the interpreter, its libraries and standard library (read-only), devices, and the
    mount points of the writable tmpfs, /proc and the temp dirs."""
    plan = _Plan()
    for entry in sorted(os.listdir("/")):  # /lib -> usr/lib and friends: the loader's paths go through them
        if os.path.islink("/" + entry):
            plan.add(("symlink", "/" + entry, os.readlink("/" + entry)))
    stdlib_dirs = [os.path.realpath(p) for p in layout.stdlib if os.path.isdir(p)]
    stdlib_dirs = [d for d in stdlib_dirs if not _inside(d, [o for o in stdlib_dirs if o != d])]
    for path in layout.stdlib:  # the dirs (not lib-dynload inside one) and a zipped stdlib, if any
        real = os.path.realpath(path)
        if not os.path.isdir(real) or real in stdlib_dirs:
            plan.bind(path)
    for folder in stdlib_dirs:  # e.g. Debian's sitecustomize.py -> /etc/python3.11/sitecustomize.py
        for entry in sorted(os.listdir(folder)):
            link = os.path.join(folder, entry)
            if os.path.islink(link) and not _inside(os.path.realpath(link), stdlib_dirs):
                plan.bind(os.path.realpath(link))
    files = [os.path.realpath(f) for f in layout.files if os.path.exists(f)]
    files = [f for f in files if not _inside(f, stdlib_dirs)]
    plan.bind(layout.python)
    for path in [*layout.files, *files, *_soname_links(files)]:
        if not _inside(os.path.realpath(path), stdlib_dirs):
            plan.bind(path)
    for site in layout.site:
        real = os.path.realpath(site)
        if os.path.isdir(real) and _inside(real, stdlib_dirs):
            plan.add(("hide", real))
    for device in DEVICES:
        if os.path.exists(device):
            plan.add(("dir", "/dev"))
            plan.add(("bind", device))
    for link, target in DEV_LINKS:
        plan.add(("symlink", link, target))
    for folder in ("/proc", SANDBOX_DIR, *TEMP_DIRS):
        for parent in _parents(folder):
            plan.add(("dir", parent))
        plan.add(("dir", folder))
    return plan.ops


def _parents(path: str) -> list[str]:
    parts = path.split("/")[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
