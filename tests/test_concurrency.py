"""libna under concurrency: processes forked while other threads are inside
libna calls, and calls from many Python threads at once while the thread
count changes under them. Each runs in its own interpreter with a timeout,
so that a hang fails the test instead of stopping the suite."""

import json

from _run_python import run_python

FORKS = 30
CHILD_DEADLINE_S = 10

FORK_SCRIPT = f"""
import json, os, signal, threading, time
import numpy as np, libna

rng = np.random.default_rng(0)
small = [rng.standard_normal((1, 12, 12, 2, 16), dtype=np.float32) for _ in range(3)]
expected = libna.na2d(*small, 3)
big = [rng.standard_normal((2, 48, 48, 4, 32), dtype=np.float32) for _ in range(3)]
stop = threading.Event()
calls = []

def work():
    while not stop.is_set():
        out, lse = libna.na2d(*big, 7, return_lse=True)
        libna.na2d_backward(*big, out, out, lse, 7)
        calls.append(1)

workers = [threading.Thread(target=work) for _ in range(2)]
for w in workers:
    w.start()
time.sleep(0.2)
children = []
for i in range({FORKS}):
    time.sleep(0.02 + 0.013 * (i % 7))  # at varying points of the workers' calls
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if np.array_equal(libna.na2d(*small, 3), expected) else 3)
        except BaseException:
            os._exit(4)
    children.append(pid)
stop.set()
deadline = time.monotonic() + {CHILD_DEADLINE_S}
status = {{}}
while len(status) < len(children) and time.monotonic() < deadline:
    for pid in children:
        if pid not in status:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status[pid] = os.waitstatus_to_exitcode(code)
    time.sleep(0.01)
for pid in children:
    if pid not in status:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status[pid] = "hung"
for w in workers:
    w.join()
print(json.dumps({{"worker_calls": len(calls), "children": [status[p] for p in children]}}))
"""


def test_fork_while_threads_are_in_libna_calls():
    """Two threads run large forward and backward calls while the main
    thread forks 30 times; every child makes a libna call (on the pool
    threads it must get back after the fork) and exits 0 with the right
    result within 10 s."""
    result = run_python(FORK_SCRIPT, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["worker_calls"] > 0
    failed = [s for s in report["children"] if s != 0]
    assert not failed, (f"{failed.count('hung')} of {FORKS} forked children hung (killed after "
                        f"{CHILD_DEADLINE_S} s), {len(failed) - failed.count('hung')} exited "
                        f"non-zero: {report['children']}")


THREADS_SCRIPT = """
import json, threading, time
import numpy as np, libna

rng = np.random.default_rng(0)
r = lambda *shape, dtype=np.float32: rng.standard_normal(shape).astype(dtype)
q2, k2, v2 = r(2, 32, 32, 4, 32), r(2, 32, 32, 2, 32), r(2, 32, 32, 2, 16)
rpb2 = r(4, 9, 9)
q1, k1, v1 = (r(1, 300, 2, 16, dtype=np.float64) for _ in range(3))
q3, k3, v3 = (r(1, 6, 8, 8, 2, 16) for _ in range(3))
h1, h2 = r(2, 24, 24, 4, 32, dtype=np.float16), r(2, 24, 24, 2, 32, dtype=np.float16)
out2, lse2 = libna.na2d(q2, k2, v2, 5, rpb=rpb2, return_lse=True)
out1, lse1 = libna.na1d(q1, k1, v1, 9, dilation=3, is_causal=True, return_lse=True)
calls = [
    lambda: libna.na2d(q2, k2, v2, 5, rpb=rpb2, return_lse=True),
    lambda: libna.na2d(q2, k2, v2, (3, 7), stride=(2, 3), dilation=(2, 1),
                       is_causal=(True, False)),
    lambda: libna.na2d_backward(q2, k2, v2, out2, out2, lse2, 5, rpb=rpb2),
    lambda: libna.na1d(q1, k1, v1, 9, dilation=3, is_causal=True, return_lse=True),
    lambda: libna.na1d_backward(q1, k1, v1, out1, out1, lse1, 9, dilation=3, is_causal=True),
    lambda: libna.na3d(q3, k3, v3, (3, 3, 5), is_causal=(True, False, False)),
    lambda: libna.na2d_av(libna.na2d_qk(h1, h2, 5), h2, 5),
    lambda: libna.na2d_qk_backward(libna.na2d_qk(h1, h2, 5), h1, h2, 5),
]
as_tuple = lambda x: x if isinstance(x, tuple) else (x,)
expected = [as_tuple(call()) for call in calls]
mismatches, errors, changes = [], [], []
stop = threading.Event()

def change_threads():
    while not stop.is_set():
        libna.set_num_threads(1 + len(changes) % 4)
        changes.append(1)
        time.sleep(0.002)

def work(t):
    try:
        for rep in range(8):
            for j in range(len(calls)):
                c = (j + t) % len(calls)
                got = as_tuple(calls[c]())
                if not all(np.array_equal(a.view(np.uint8), b.view(np.uint8))
                           for a, b in zip(got, expected[c])):
                    mismatches.append([t, rep, c])
    except Exception as error:
        errors.append(repr(error))

changer = threading.Thread(target=change_threads)
changer.start()
workers = [threading.Thread(target=work, args=(t,)) for t in range(8)]
for w in workers:
    w.start()
for w in workers:
    w.join(timeout=100)
stop.set()
changer.join()
print(json.dumps({"mismatches": mismatches, "errors": errors,
                  "hung": sum(w.is_alive() for w in workers), "changes": len(changes)}))
"""


def test_calls_from_eight_threads_while_the_thread_count_changes():
    """8 Python threads make forward, backward and unfused calls (rank 1-3,
    rpb, stride, dilation, causal, float64/32/16) while another thread
    keeps calling set_num_threads(1..4): every result is bitwise the one
    the same call gave when run alone."""
    result = run_python(THREADS_SCRIPT, timeout=150)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report.pop("changes") > 10  # the thread count changed during the calls
    assert report == {"mismatches": [], "errors": [], "hung": 0}
