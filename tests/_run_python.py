"""run_python: Python code run in a fresh interpreter (this one's
executable), for tests of what happens at import, fork or exit."""

import os
import subprocess
import sys
import textwrap


def run_python(code, env=None, cwd=None, timeout=300):
    """The finished process (stdout and stderr captured as text) of running
    `code` (dedented) with this environment plus `env`."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)
