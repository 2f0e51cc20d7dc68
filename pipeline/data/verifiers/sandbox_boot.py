"""The code sandbox's first process: build a minimal root, drop privileges, run the program, report.

Run by ``code.run_python`` as ``unshare --mount --net --pid --fork ... python -I -S -c <this source>
CONFIG``: it starts as (namespace) root in fresh mount, network and PID namespaces, as PID 1. Standalone
on purpose: it runs under the sandbox's interpreter (any Python 3.8+), imports only the standard library,
and is passed as source, so the host path of this file does not matter.

Steps (any failure before the program starts reports ``error`` and nothing is run: fail closed):

1. rlimits; join the run's memory cgroup (if any).
2. An empty tmpfs as the new root; replay the plan from ``sandbox_fs.root_plan``: directories,
   symlinks, read-only binds of the interpreter's files, empty mounts over site-packages.
3. The only writable place: a size-capped tmpfs at /sandbox (the working dir /sandbox/work holds
   main.py; /tmp, /var/tmp and /dev/shm are binds of /sandbox/tmp); a fresh /proc of this PID
   namespace; the root itself read-only.
4. ``pivot_root`` into it and detach the host's root: no path leads back to host files.
5. Drop to the throw-away uid (as root) or drop every capability (user namespace); no new privileges,
   not dumpable (so the program cannot open this process's report pipe through /proc).
6. Fork the program, wait, count what it left behind (every other PID here), report as JSON; if the
   verifier process dies first, end the run at once instead.
"""

import ctypes
import json
import os
import platform
import resource
import select
import sys
import threading

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 32, 4096, 1024, 2048, 1 << 21
# statvfs flag -> mount flag to keep on a read-only remount (a user namespace may not clear them).
KEEP = (
    (2, MS_NOSUID),
    (4, MS_NODEV),
    (8, MS_NOEXEC),
    (1024, MS_NOATIME),
    (2048, MS_NODIRATIME),
    (4096, MS_RELATIME),
)
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
MNT_DETACH, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 2, 4, 24, 38, 1

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.syscall.restype = ctypes.c_long


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(text):
    return None if text is None else text.encode()


def mount(source, target, fstype, flags, data=None):
    _check(libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount " + target)


def bind_read_only(source, target):
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    mount(source, target, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    have = os.statvfs(target).f_flag
    for st_flag, ms_flag in KEEP:
        if have & st_flag:
            flags |= ms_flag
    mount(None, target, None, flags)


def build_root(cfg, stage):
    """Steps 2-3: the new root at ``stage``; returns nothing, raises on any failure."""
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for op in cfg["plan"]:
        kind, path = op[0], op[1]
        target = stage + path
        if kind == "dir":
            os.makedirs(target, exist_ok=True)
        elif kind == "symlink":
            os.symlink(op[2], target)
        elif kind == "bind":
            bind_read_only(path, target)
        elif kind == "hide":
            mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    uid = cfg["uid"] if cfg["uid"] is not None else 0
    sandbox = stage + cfg["sandbox_dir"]
    options = f"size={cfg['disk_kb']}k,nr_inodes={cfg['disk_inodes']},mode=0700,uid={uid},gid={uid}"
    mount("tmpfs", sandbox, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for sub in ("work", "tmp"):
        os.mkdir(os.path.join(sandbox, sub), 0o700)
        os.chown(os.path.join(sandbox, sub), uid, uid)
    main = os.path.join(stage + cfg["work_dir"], "main.py")
    with open(cfg["source"], "rb") as src, open(main, "wb") as dst:
        dst.write(src.read())
    os.chown(main, uid, uid)
    for temp in cfg["temp_dirs"]:
        mount(sandbox + "/tmp", stage + temp, None, MS_BIND)
    mount("proc", stage + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, stage, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_root(stage, work_dir):
    """Step 4: make ``stage`` the root and detach the host's (stacked under it by pivot_root(".", "."))."""
    number = PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {platform.machine()}")
    os.chdir(stage)
    _check(libc.syscall(number, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "detach the host root")
    os.chdir(work_dir)


def drop_privileges(uid):
    """Step 5."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    else:  # root of a user namespace: keep the uid, lose every capability, now and across exec
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        _check(libc.capset(header, data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # die with the launcher


def exit_with_the_verifier(fd):
    """Step 6 guard: end the run (PID 1's exit kills the namespace) when the verifier is gone. Only the
    verifier holds the report pipe's read end, so its death makes this write end report an error."""
    watch = select.poll()
    watch.register(fd, 0)  # POLLERR / POLLHUP are always reported
    watch.poll()
    os._exit(1)


def report(fd, payload):
    os.write(fd, json.dumps(payload).encode())
    os._exit(0)


def main():
    cfg = json.loads(sys.argv[1])
    fd = cfg["report_fd"]
    try:
        for name, (soft, hard) in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if cfg["cgroup_procs"]:
            with open(cfg["cgroup_procs"], "w") as f:
                f.write("0")
        build_root(cfg, cfg["stage"])
        enter_root(cfg["stage"], cfg["work_dir"])
        drop_privileges(cfg["uid"])
    except Exception as err:  # noqa: BLE001 - the program must not run in a half-built sandbox
        report(fd, {"error": f"{type(err).__name__}: {err}"})
    threading.Thread(target=exit_with_the_verifier, args=(fd,), daemon=True).start()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(fd)
            os.execv(cfg["python"], [cfg["python"], "-I", "main.py"])
        finally:
            os._exit(127)
    status = 0
    while True:
        try:
            done, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if done == pid:
            status = st
            break
    left = sum(1 for d in os.listdir("/proc") if d.isdigit() and d != "1")
    report(fd, {"status": status, "left": left})


if __name__ == "__main__":
    main()
