"""The full test suite of two revisions, run at the same time on one machine, and their ratio.

Why at the same time: on a shared host the speed drifts within an hour (the same warm start took 103 s in
one suite and 228 s in the next), so two suites run one after the other compare two hosts. Run together,
both see the same host for the whole run; each costs about twice its solo time, and the one that ends
first ran under contention throughout while the other has the machine to itself at the end (that tail
favours the slower one, so a "B is faster" verdict is conservative).

Each revision gets a clean clone, its own venv (a hard-linked copy of this checkout's ``.venv`` with the
editable install re-pointed at the clone, so Ray jobs import the clone's code), its own empty model cache
and its own test ports. Prints wall and CPU seconds (cgroup v1 cpuacct where writable), per-test junit
times, and B's time split into tests whose function already existed at A and tests added since.

    .venv/bin/python bench/suite_side_by_side.py 142cb8d HEAD            # ~1 h on the 2-core box
    .venv/bin/python bench/suite_side_by_side.py 142cb8d HEAD -- -k law  # a quick check of the harness
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPUACCT = Path("/sys/fs/cgroup/cpuacct")
# Ports the tests pin (Ray dashboard of the session cluster; the multi-node deploy test's cluster). Side B's
# are shifted so the two suites never bind the same one.
PINNED_PORTS = ("8299", "6391", "8276", "27900")


def sh(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def prepare(rev: str, tag: str, work: Path, port_shift: int) -> Path:
    """Clean clone at ``rev`` with its own venv whose editable install points at the clone."""
    clone = work / f"suite-{tag}"
    shutil.rmtree(clone, ignore_errors=True)
    sh("git", "clone", "-q", str(ROOT), str(clone))
    sh("git", "checkout", "-q", sh("git", "rev-parse", rev, cwd=ROOT).strip(), cwd=clone)
    venv = clone / ".venv"
    sh("cp", "-al", str(ROOT / ".venv"), str(venv))  # hard links: seconds, no extra disk
    for script in (venv / "bin").iterdir():  # console scripts name the venv's python in their shebang
        if script.is_file() and not script.is_symlink() and script.read_bytes()[:2] == b"#!":
            text = script.read_text(errors="surrogateescape")
            script.unlink()  # a new file, so the hard-linked original is untouched
            script.write_text(text.replace(str(ROOT / ".venv"), str(venv), 1), errors="surrogateescape")
            script.chmod(0o755)
    sh(
        str(venv / "bin/python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-e",
        ".",
        cwd=clone,
    )
    if port_shift:
        for path in list((clone / "tests").rglob("*.py")):
            text = path.read_text()
            shifted = re.sub(
                r"\b(" + "|".join(PINNED_PORTS) + r")\b", lambda m: str(int(m.group(1)) + port_shift), text
            )
            if shifted != text:
                path.write_text(shifted)
    return clone


def launch(clone: Path, tag: str, work: Path, pytest_args: list[str]) -> tuple[subprocess.Popen, Path | None]:
    cgroup = CPUACCT / f"covrl-suite-{tag}"
    try:
        cgroup.mkdir(exist_ok=True)
        (cgroup / "cpuacct.usage").write_text("0")
    except OSError:
        cgroup = None
    env = dict(os.environ, COVRL_CACHE=str(work / f"cache-{tag}"), PYTHONPATH=str(clone))
    shutil.rmtree(env["COVRL_CACHE"], ignore_errors=True)
    # the child joins its cgroup before exec, so every process it starts (Ray, vLLM, ...) is counted
    join = f"echo $$ > {cgroup}/tasks; " if cgroup else ""
    cmd = (
        f"{join}exec .venv/bin/python -m pytest -p no:cacheprovider --junitxml={work}/{tag}.xml "
        + " ".join(map(shlex.quote, pytest_args))
    )
    log = open(work / f"{tag}.log", "w")
    return subprocess.Popen(
        ["bash", "-c", cmd], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT
    ), cgroup


def junit(path: Path) -> dict[str, tuple[float, bool]]:
    """test id -> (seconds incl. setup and teardown, failed)."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        out[f"{case.get('classname')}::{case.get('name')}"] = (float(case.get("time", 0)), failed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/covrl-suite-ab"))
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to both pytest runs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    clones = {"A": prepare(args.rev_a, "A", args.work, 0), "B": prepare(args.rev_b, "B", args.work, -2)}
    t0 = time.perf_counter()
    runs = {tag: launch(clone, tag, args.work, args.pytest_args) for tag, clone in clones.items()}
    wall, cpu, rc = {}, {}, {}
    pending = dict(runs)
    while pending:
        for tag, (proc, cgroup) in list(pending.items()):
            if proc.poll() is not None:
                wall[tag], rc[tag] = time.perf_counter() - t0, proc.returncode
                time.sleep(3)  # let the run's last processes exit before reading the counter
                cpu[tag] = int((cgroup / "cpuacct.usage").read_text()) / 1e9 if cgroup else float("nan")
                del pending[tag]
        time.sleep(5)

    tests = {tag: junit(args.work / f"{tag}.xml") for tag in runs}
    a_defs = set(
        re.findall(
            r"def (test_\w+)", sh("git", "grep", "-h", r"def test_", args.rev_a, "--", "tests", cwd=ROOT)
        )
    )
    b_old = sum(t for tid, (t, _) in tests["B"].items() if tid.split("::")[-1].split("[")[0] in a_defs)
    print(
        f"{'':4} {'revision':>10} {'tests':>6} {'failed':>6} {'rc':>3} {'wall s':>8} {'CPU s':>8} {'junit s':>8}"
    )
    for tag, rev in (("A", args.rev_a), ("B", args.rev_b)):
        fails = sum(f for _, f in tests[tag].values())
        total = sum(t for t, _ in tests[tag].values())
        print(
            f"{tag:4} {rev:>10} {len(tests[tag]):6} {fails:6} {rc[tag]:3} {wall[tag]:8.0f} {cpu[tag]:8.0f} {total:8.0f}"
        )
    print(f"B/A wall {wall['B'] / wall['A']:.2f}, CPU {cpu['B'] / cpu['A']:.2f}")
    print(
        f"B's tests whose function existed at {args.rev_a}: {b_old:.0f} s of junit time; added since: "
        f"{sum(t for t, _ in tests['B'].values()) - b_old:.0f} s"
    )
    print(f"logs and junit files: {args.work}")
    sys.exit(max(rc.values()))


if __name__ == "__main__":
    main()
