"""Bad input stops the real CLI before Ray or any actor starts: exit 2, the config field named (each
check runs ``python -m pipeline.train`` in a fresh process)."""

from pathlib import Path

import pytest


def test_cli_exits_nonzero_before_starting_anything(tmp_path):
    """The real CLI, in a fresh process: bad input -> exit 2 with the field named, and Ray never started."""
    import subprocess
    import sys

    def run(*sets):
        args = [x for kv in sets for x in ("--set", kv)]
        code = (
            "import sys, ray; from pipeline.train import main; rc = main(sys.argv[1:]); "
            "print('torch loaded:', 'torch' in sys.modules); sys.exit(rc + (100 if ray.is_initialized() else 0))"
        )
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[2],
        )

    bad_key = run("learner.bogus=1")
    assert bad_key.returncode == 2 and "learner.bogus: unknown key" in bad_key.stderr
    assert "torch loaded: False" in bad_key.stdout  # a config error does not wait for torch to import
    missing = run(f"model.path={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "no such directory" in missing.stderr


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "verifier.default={name: 'no_such_pkg.mod:Thing'}",
            "verifier.default: cannot import module 'no_such_pkg.mod'",
        ),
        (
            "verifier.routes={gsm: {name: maths}}",
            "verifier.routes.gsm: unknown verifier 'maths'; registered:",
        ),
        (
            "verifier.routes={gsm: {name: numeric, options: {tolerance: 1}}}",
            "verifier.routes.gsm: verifier 'numeric': options ['tolerance'] do not fit NumericVerifier",
        ),
        (  # a function of neither reward-function shape: refused at load, with the shapes listed
            "verifier.routes={gsm: {name: 'os.path:join'}}",
            "verifier.routes.gsm: verifier 'os.path:join': join(a, *p) takes neither 'solution_str' (verl) "
            "nor 'completions' (TRL) as a keyword argument. Accepted plug-in shapes:",
        ),
    ],
)
def test_unknown_verifier_fails_before_ray_starts(override, needle):
    """A verifier that cannot be found (default or a route) is bad input: exit 2 naming the config field,
    before Ray or any actor starts (not when the verifier actor first loads it)."""
    import subprocess
    import sys

    code = (
        "import sys, ray; from pipeline.train import main; rc = main(sys.argv[1:]); "
        "sys.exit(rc + (100 if ray.is_initialized() else 0))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "--set", override],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert needle in res.stderr, res.stderr[-2000:]
