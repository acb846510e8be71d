"""Generated code runs isolated: its own process and temporary directory, a time limit that
kills it, no sockets, no inherited environment."""

import os
import time

from diffujax.tasks.execution import humaneval_program, run_program


def test_passing_and_failing_programs():
    ok = humaneval_program("def f(x):\n", "    return x + 1\n", "", "def check(f):\n"
                           "    assert f(1) == 2\n", "f")
    assert run_program(ok).status == "passed"
    wrong = run_program(ok.replace("x + 1", "x"))
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    assert run_program("syntax error here").status == "failed"


def test_a_program_that_never_ends_is_killed_at_the_limit():
    begin = time.monotonic()
    outcome = run_program("import os\nif os.fork() == 0:\n    while True: pass\nwhile True: pass\n",
                          timeout=1.0)
    assert outcome.status == "timed out" and not outcome.passed
    assert time.monotonic() - begin < 8


def test_programs_are_isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUJAX_TEST_SECRET", "s3cret")
    monkeypatch.chdir(tmp_path)
    probe = (
        "import os, socket, sys\n"
        "assert 'DIFFUJAX_TEST_SECRET' not in os.environ\n"
        "open('written.txt', 'w').write('x')\n"
        "print(os.getcwd(), file=sys.stderr)\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9))\n"
        "except OSError as e:\n"
        "    assert 'disabled' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('network reachable')\n"
        "try:\n"
        "    socket.socket()\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('socket created')\n"
        "raise SystemExit(os.getcwd())\n")
    outcome = run_program(probe)
    assert outcome.status == "failed"  # exits with its working directory as the message
    workdir = outcome.detail
    assert "diffujax-exec-" in workdir and not os.path.exists(workdir)  # removed afterwards
    assert not (tmp_path / "written.txt").exists()
