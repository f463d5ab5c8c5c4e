"""Smoke tests of `python -m libna.bench` on tiny problems (a few seconds each)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

TINY = ["--size", "14", "--kernel", "3", "--repeats", "1"]


def bench(*args, timeout=120):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "libna.bench", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def table_row(output, section, method):
    """The cells of `method`'s row in the table under the `## section` heading."""
    part = output.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == method:
            return cells
    raise AssertionError(f"no {method} row under {section}:\n{output}")


def test_help_explains_the_options():
    code, out = bench("--help")
    assert code == 0, out
    for option in ("--size", "--kernel", "--heads", "--dim", "--dtype", "--rank",
                   "--backward", "--repeats", "--threads", "--sweep", "--out-dir"):
        assert option in out


def test_overhead_table():
    code, out = bench("--overhead", "--repeats", "3", "--threads", "1")
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith(("7x7", "NAT level"))]
    assert len(rows) == 9, out
    for row in rows:
        ours, floor, difference = (float(x) for x in row.split()[-3:])
        assert ours > 0 and floor > 0 and abs(ours - floor - difference) < 0.2, row
    for caller in ("NumPy", "libna.torch, no_grad", "libna.torch, autograd"):
        assert sum(caller in row for row in rows) == 3, out


def markdown_rows(output, heading):
    """Header cells and body rows (lists of cells) of the first table under `heading`."""
    lines = output.split(heading, 1)[1].splitlines()[1:]
    table = []
    for line in lines:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif table:
            break
    return table[0], table[2:]


def test_models_table(tmp_path):
    from libna.bench.models import ALL_MODELS, LIBNA_MODELS, timm_status

    have_timm = timm_status()[0] is not None
    plot = tmp_path / "models.png"
    code, out = bench("--models", "--image-size", "64", "--batches", "1", "--dtypes", "float32",
                      "--no-compile", "--repeats", "1", "--warmup", "1", "--threads", "1",
                      "--plot", str(plot), timeout=90)
    assert code == 0, out
    assert "machine:" in out and "threads: 1" in out and "load average" in out
    header, rows = markdown_rows(out, "## images per second")
    ratios = ["nat_tiny/swin_tiny", "nat_tiny/convnext_tiny"]
    assert header == ["mode", "dtype", "batch", "compile", *ALL_MODELS, *ratios], out
    assert [row[:4] for row in rows] == [["inference", "float32", "1", "eager"],
                                        ["train", "float32", "1", "eager"]], out
    for row in rows:
        cells = dict(zip(header, row))
        for name in LIBNA_MODELS:
            assert float(cells[name]) > 0, row
        for name in ("swin_tiny", "convnext_tiny"):
            if have_timm:
                assert float(cells[name]) > 0, row
            else:
                assert cells[name] == "absent", row
        for name in ratios:
            assert cells[name].endswith("x") if have_timm else cells[name] == "-", row
    if not have_timm:
        assert "timm is not importable" in out and "pip install timm" in out
    assert "parameters: nat_mini" in out
    assert plot.stat().st_size > 0


def test_models_rounds_keep_each_cells_best():
    from libna.bench.models import best_round

    first = {"img_s": 2.0, "first_s": 30.0, "parameters": 1}
    faster = {"img_s": 3.0, "first_s": 1.0, "parameters": 1}
    assert best_round(None, first) is first
    assert best_round(first, {"img_s": 1.0, "first_s": 1.0}) is first
    assert best_round(first, faster) == {"img_s": 3.0, "first_s": 30.0, "parameters": 1}
    assert best_round({"error": "compile > 240 s"}, faster) is faster
    assert best_round(first, {"error": "compile > 240 s"}) is first


@pytest.mark.parametrize("args, message", [
    (["--models", "nat_tiny,resnet50"], "choose from"),
    (["--models", "--batches", "8", "--compile-batches", "1"], "--compile-batches"),
    (["--models", "--dtypes", "float32", "--compile-dtypes", "bfloat16"], "--compile-dtypes"),
    (["--models", "--image-size", "16"], "--image-size"),
    (["--models", "--modes", "eval"], "choose from"),
])
def test_models_bad_options_are_argparse_errors(args, message, capsys):
    from libna import bench as libna_bench

    with pytest.raises(SystemExit) as exit_info:
        libna_bench.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_table_every_method_checked_and_timed():
    code, out = bench(*TINY, "--no-memory")
    assert code == 0, out
    assert "machine:" in out and "libna:" in out and "simd=" in out and "torch:" in out
    assert "amx=on" in out or "amx=off" in out
    assert "correctness: every method agrees with libna" in out
    for section in ("forward", "backward"):
        for method in ("libna", "gather", "sdpa-mask", "sdpa-full", "swin"):
            cells = table_row(out, section, method)
            best, gflops, err = float(cells[1]), float(cells[3]), float(cells[4])
            assert best > 0 and gflops > 0 and err < 1e-3, cells
            assert cells[6].endswith("x")
        # NATTEN is not a dependency: its row is there, marked as skipped or timed
        table_row(out, section, "natten")
        assert table_row(out, section, "flex")[1] == "-"  # a CUDA-only peer
    assert "flex: skipped: CUDA only" in out
    assert table_row(out, "forward", "libna")[6] == "1.00x"
    assert re.search(r"torch\.matmul 1024\^3 float32 = [\d.]+ GFLOP/s; libna forward = "
                     r"[\d.]+ GFLOP/s = \d+% of it", out), out
    assert "backward counted as 2x forward" in out


def test_table_memory_in_fresh_processes():
    code, out = bench(*TINY, "--methods", "libna,gather", "--no-backward")
    assert code == 0, out
    for method in ("libna", "gather"):
        mib = float(table_row(out, "forward", method)[5])  # a number, not "error"
        assert mib >= 0
    assert "## backward" not in out


@pytest.mark.parametrize("args", [
    ["--rank", "1", "--size", "40", "--kernel", "7", "--dtype", "bfloat16"],
    ["--rank", "3", "--size", "6", "--kernel", "3", "--dtype", "float16", "--heads", "2",
     "--dim", "16"],
])
def test_table_other_ranks_and_dtypes(args, capsys):
    from libna import bench as libna_bench  # in-process: no interpreter start-up

    code = libna_bench.main([*args, "--repeats", "1", "--no-memory",
                             "--methods", "libna,gather,sdpa-mask,swin"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "correctness: every method agrees" in out
    table_row(out, "backward", "sdpa-mask")


def test_disagreeing_method_fails_the_run(monkeypatch, capsys):
    from libna import bench as libna_bench

    real = libna_bench.GatherMethod.forward
    monkeypatch.setattr(libna_bench.GatherMethod, "forward",
                        lambda self, q, k, v: real(self, q, k, v) + 0.01)
    code = libna_bench.main([*TINY, "--no-memory", "--no-backward", "--methods", "gather"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in table_row(out, "forward", "gather")[4]
    assert "FAILED: gather" in out


def test_sweep_writes_plots(tmp_path):
    code, out = bench("--sweep", "--size", "14", "--kernel", "3", "--sweep-sizes", "14,21",
                      "--sweep-kernels", "3,5", "--repeats", "1", "--sweep-min-time", "0", "--out-dir", str(tmp_path))
    assert code == 0, out
    assert re.search(r"\[tokens\] bwd libna .*21x21 k3x3: [\d.]+ ms", out), out
    assert re.search(r"\[kernel\] fwd sdpa-mask .*14x14 k5x5: [\d.]+ ms", out), out
    for name in ("bench_na2d_sweep_tokens.png", "bench_na2d_sweep_kernel.png"):
        png = tmp_path / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_device_cuda_needs_a_gpu(capsys):
    import torch

    from libna import bench

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (the GPU run is covered by -m gpu sessions)")
    assert bench.main(["--device", "cuda", "--size", "8", "--kernel", "3"]) == 2
    assert "--device cuda needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("rank,size,kernel", [(1, (21,), (5,)), (2, (7, 9), (3, 5))])
def test_flex_peer_mask_is_the_na_rule(rank, size, kernel):
    """The flex_attention peer (timed with --device cuda only) masks exactly
    the NA neighbourhoods and, run eagerly on the CPU, agrees with libna."""
    from torch.nn.attention.flex_attention import create_mask

    from libna import bench as libna_bench

    p = libna_bench.Problem(rank, size, kernel, 1, 2, 16, "float32")
    mask = create_mask(libna_bench.na_mask_mod(p), 1, 1, p.positions, p.positions, "cpu")
    assert torch.equal(mask[0, 0], torch.from_numpy(libna_bench.dense_mask(p)))
    flex = libna_bench.FlexMethod(p)
    flex.compile = False
    flex.setup()
    q, k, v, _ = libna_bench.make_inputs(p)
    with torch.no_grad():
        out = flex.forward(q, k, v)
    torch.testing.assert_close(out, libna_bench.LibnaMethod(p).forward(q, k, v),
                               rtol=1e-4, atol=1e-4)


def test_instruction_counts_are_the_difference_per_call(monkeypatch, capsys):
    """python -m libna.bench.instructions prints (count with N calls - count
    with none) / N per case; without valgrind it says so and fails."""
    from libna.bench import instructions

    monkeypatch.setattr(instructions.shutil, "which", lambda name: "/usr/bin/valgrind")
    monkeypatch.setattr(instructions, "_instructions",
                        lambda call, calls, setup: 5000 + calls * (1000 + len(call)))
    assert instructions.main(["--calls", "10"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    cases = instructions.CASES
    if __import__("importlib.util").util.find_spec("torch") is not None:
        cases = cases + instructions.TORCH_CASES
    assert len(rows) == len(cases)
    for row, (label, call) in zip(rows, cases):
        assert row.startswith(label) and row.split()[-1] == f"{1000 + len(call):,}"
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    assert instructions.main([]) == 1
    assert "valgrind is not installed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        instructions.main(["--calls", "0"])


@pytest.mark.skipif(__import__("shutil").which("valgrind") is None,
                    reason="valgrind is not installed (apt install valgrind)")
def test_instruction_counts_read_callgrinds_total():
    from libna.bench import instructions

    # The set-up alone (imports included) runs millions of instructions; a
    # call more adds some.
    none = instructions._instructions("None", 0)
    assert none > 1_000_000
    assert instructions._instructions("libna.na2d(s, s, s, 2)", 3) > none


def test_alternate_runs_settings_in_turn_and_prints_medians(capsys):
    """python -m libna.bench.alternate runs one process per setting per round,
    in turn, and prints each setting's median and its ratio to the first's;
    bad options are refused."""
    from libna.bench import alternate

    calls = []

    def fake_run(name, value, shape, kernel, mode, n_calls, threads, dtype):
        assert dtype == "bfloat16"
        calls.append((name, value))
        return {"0": [4.0, 6.0, 5.0], "1": [2.0, 3.0, 2.5]}[value][sum(v == value for _, v in calls) - 1]

    assert alternate.main(["--env", "LIBNA_CPU_ROW_PAIRS=0,1", "--shape", "8,14,14,8,32",
                           "--pass", "backward", "--rounds", "3", "--dtype", "bfloat16"],
                          run=fake_run) == 0
    assert calls == [("LIBNA_CPU_ROW_PAIRS", "0"), ("LIBNA_CPU_ROW_PAIRS", "1")] * 3
    out = capsys.readouterr().out
    assert "| 0 | 5.000 | 1.00x | 4.000 6.000 5.000 |" in out
    assert "| 1 | 2.500 | 2.00x | 2.000 3.000 2.500 |" in out
    for bad in (["--env", "X=1", "--shape", "1,8,1,8"], ["--env", "X", "--shape", "1,8,1,8"],
                ["--env", "X=1,2", "--shape", "1,8"], ["--env", "X=1,2", "--shape", "1,a,1,8"],
                ["--env", "X=1,2", "--shape", "1,8,1,8", "--rounds", "0"],
                ["--env", "X=1,2", "--shape", "1,8,8,1,8", "--kernel", "3,3,3"]):
        with pytest.raises(SystemExit):
            alternate.main(bad, run=fake_run)


def test_alternate_times_a_real_call():
    """One real fresh process per setting: a positive best time."""
    from libna.bench import alternate

    for mode in ("forward", "backward"):
        ms = alternate.run_one("LIBNA_CPU_ROW_PAIRS", "1", (1, 9, 9, 2, 8), 3, mode, 2, 1)
        assert 0 < ms < 10_000
    pytest.importorskip("ml_dtypes")
    ms = alternate.run_one("LIBNA_CPU_AMX", "1", (1, 9, 9, 2, 32), 3, "forward", 2, 1,
                           dtype="bfloat16")
    assert 0 < ms < 10_000
