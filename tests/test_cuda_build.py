"""The CUDA backend as built, checked without a GPU: every fused kernel
(forward, dq, dk/dv for each dtype and head-dim bucket; the tensor-core
forward, dq and dk/dv for float16/bfloat16 and buckets 32/64/128) and every unfused
kernel is in the library for every architecture that build_info() reports,
with no register spills, no local-memory stack and static shared memory
within the per-block limit.

The resource usage comes from `cuobjdump --dump-resource-usage` of the
installed library when cuobjdump is on PATH, else from the ptxas report
(nvcc --resource-usage) that the build records next to the library
(lib/libna_cuda_resource_usage.txt).

What the wheel ships (docs/release.md): the CUDA runtime linked statically,
machine code (SASS) for each reported architecture and PTX for the newest
one, which the driver compiles for GPUs newer than any of them; and only
libna's API among the library's exported symbols."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import libna

LIB_DIR = Path(libna.__file__).resolve().parent / "lib"
NO_CUDA = "libna was built without CUDA (no nvcc when it was built, or LIBNA_CUDA=OFF)"

# Static shared memory a block may use on every architecture libna targets.
SMEM_LIMIT = 48 * 1024
DTYPES = ("f", "6__half", "13__nv_bfloat16")
BUCKETS = (32, 64, 128, 256)
FUSED = ("fused_forward_kernel", "fused_dq_kernel", "fused_dkdv_kernel")
# The tensor-core forward and backward: float16 and bfloat16, buckets up to 128.
TENSOR_CORE = ("tc_forward_kernel", "tc_dq_kernel", "tc_dkdv_kernel")
TC_DTYPES = ("6__half", "13__nv_bfloat16")
TC_BUCKETS = (32, 64, 128)
UNFUSED = ("qk_kernel", "slot_gather_kernel", "key_grad_kernel", "qk_bias_grad_kernel",
           "av_dattn_kernel", "store_bias_grad_kernel")


def cuda_built():
    return libna._C is not None and "cuda" in libna.build_info()["backends"]


pytestmark = pytest.mark.skipif(not cuda_built(), reason=NO_CUDA)


def library():
    libs = sorted(LIB_DIR.glob("libna.so*")) + sorted(LIB_DIR.glob("*na*.dll"))
    assert libs, f"no libna shared library in {LIB_DIR}"
    return max(libs, key=lambda p: p.stat().st_size)


def parse_ptxas(text):
    """{(kernel, arch): {"regs", "smem", "spill", "stack"}} from ptxas -v output."""
    usage, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if m:
            current = (m.group(1), m.group(2))
            usage[current] = {"regs": 0, "smem": 0, "spill": 0, "stack": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            usage[current]["stack"] = int(m.group(1))
            usage[current]["spill"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            usage[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            usage[current]["smem"] = int(s.group(1)) if s else 0
    return usage


def parse_cuobjdump(text):
    """The same, from cuobjdump --dump-resource-usage ("Function NAME:" then
    "REG:.. STACK:.. SHARED:.. LOCAL:.." on the same or the next line)."""
    usage, arch, current = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch, current = m.group(1), None
        m = re.search(r"Function (\S+):", line)
        if m and arch:
            current = (m.group(1), arch)
        fields = dict(re.findall(r"\b([A-Z]+):(\d+)", line))
        if current and "REG" in fields:
            usage[current] = {
                "regs": int(fields["REG"]), "smem": int(fields.get("SHARED", 0)),
                "stack": int(fields.get("STACK", 0)), "spill": int(fields.get("LOCAL", 0))}
            current = None
    return usage


@pytest.fixture(scope="module")
def usage():
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", str(library())],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        result = parse_cuobjdump(out.stdout)
    else:
        report = LIB_DIR / "libna_cuda_resource_usage.txt"
        assert report.is_file(), f"{report} is missing: the build records it (cuda/cuda.cmake)"
        result = parse_ptxas(report.read_text())
    assert result, "no kernel resource usage found"
    return result


def expected_kernels():
    names = [f"{k}I{t}Li{b}E" for k in FUSED for t in DTYPES for b in BUCKETS]
    names += [f"{k}I{t}" for k in UNFUSED for t in DTYPES]
    return names + tensor_core_kernels()


def tensor_core_kernels():
    return [f"{k}I{t}Li{b}E" for k in TENSOR_CORE for t in TC_DTYPES for b in TC_BUCKETS]


def test_build_info_reports_architectures():
    archs = libna.build_info()["cuda_architectures"]
    assert archs and all(re.fullmatch(r"sm_\d+a?", a) for a in archs), archs


def test_every_kernel_for_every_architecture(usage):
    archs = libna.build_info()["cuda_architectures"]
    for arch in archs:
        built = [name for name, a in usage if a == arch]
        for kernel in expected_kernels():
            assert any(kernel in name for name in built), f"{kernel} missing for {arch}"


def test_no_spills_and_shared_memory_within_limits(usage):
    problems = [f"{name} ({arch}): {u}" for (name, arch), u in usage.items()
                if u["spill"] or u["stack"] or u["smem"] > SMEM_LIMIT or u["regs"] > 255]
    assert not problems, "\n".join(problems)


def test_tensor_core_kernels_compiled_for_sm80_and_later(usage):
    """Each tensor-core instance, for each sm_80+ architecture, has its body
    (an empty stub, what an older architecture gets, uses a handful of
    registers), no spills and static shared memory within the limit."""
    archs = [a for a in libna.build_info()["cuda_architectures"]
             if int(re.sub(r"\D", "", a)) >= 80]
    if not archs:
        pytest.skip("no sm_80+ architecture in this build")
    for arch in archs:
        for kernel in tensor_core_kernels():
            found = [u for (name, a), u in usage.items() if a == arch and kernel in name]
            assert len(found) == 1, f"{kernel} for {arch}: {len(found)} entries"
            u = found[0]
            assert u["regs"] >= 64, f"{kernel} ({arch}) looks empty: {u}"
            assert not u["spill"] and not u["stack"], f"{kernel} ({arch}) spills: {u}"
            assert 0 < u["smem"] <= SMEM_LIMIT, f"{kernel} ({arch}) shared memory: {u}"


def tool_output(tool, *args):
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not on PATH")
    result = subprocess.run([exe, *args, str(library())], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cuda_runtime_is_linked_statically():
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]",
                        tool_output("readelf", "-d"))
    assert needed and not [n for n in needed if n.startswith(("libcudart", "libcuda."))], needed


def test_sass_for_each_architecture_and_ptx_for_the_newest():
    archs = set(libna.build_info()["cuda_architectures"])
    sass = set(re.findall(r"\.(sm_\d+a?)\.cubin", tool_output("cuobjdump", "--list-elf")))
    ptx = set(re.findall(r"\.(sm_\d+a?)\.ptx", tool_output("cuobjdump", "--list-ptx")))
    assert sass == archs, (sass, archs)
    newest = max(archs, key=lambda a: int(re.sub(r"\D", "", a)))
    assert newest in ptx, (ptx, newest)


def test_only_libna_api_is_exported():
    """The CUDA units are compiled with hidden visibility, like the C++ ones:
    the backend's entry points and kernels' launchers stay inside."""
    symbols = tool_output("nm", "-D", "--defined-only", "-C").splitlines()
    internal = [s for s in symbols if re.search(r"libna::cuda(_impl)?::", s)]
    assert not internal, internal[:10]


def test_library_holds_forward_and_backward_kernels():
    blob = library().read_bytes()
    for kernel in FUSED + UNFUSED + TENSOR_CORE:
        assert kernel.encode() in blob, f"{kernel} is not in {library().name}"


def test_parsers_read_both_report_formats():
    ptxas = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
"""
    assert parse_ptxas(ptxas) == {("_Z1kPf", "sm_90"): {"regs": 40, "smem": 2048, "spill": 8,
                                                       "stack": 8}}
    cuobjdump = """Fatbin elf code:
================
arch = sm_80
code version = [1,7]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z1kPf:
  REG:17 STACK:0 SHARED:4096 LOCAL:0 CONSTANT[0]:336 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert parse_cuobjdump(cuobjdump) == {("_Z1kPf", "sm_80"): {"regs": 17, "smem": 4096,
                                                               "stack": 0, "spill": 0}}
