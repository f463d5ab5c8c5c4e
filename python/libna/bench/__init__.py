"""python -m libna.bench: time libna's neighborhood attention against its peers.

Every method runs on the same inputs in the same run (on the CPU, or on the
GPU with --device cuda; PyTorch tensors in the heads-last layout
[B, *spatial, heads, D]):

  libna        libna.naNd (fused forward) and libna.naNd_backward
  gather       plain PyTorch: index_select of the prod(k) neighbours of every
               query, einsum, softmax, weighted sum; backward by autograd
  sdpa-mask    torch SDPA over all tokens with a dense boolean NA mask
               (N x N entries); backward by autograd
  sdpa-full    torch SDPA full self-attention (a different operator: every
               token sees every token); checked against libna with the kernel
               spanning the whole extent, which is the same operator
  swin         Swin-style non-overlapping windows of the kernel size:
               partition + SDPA + un-partition (a different operator, given
               for speed/memory context; zero-padded to a multiple of the
               window); checked against libna run inside each window
  natten       NATTEN's naNd, when `import natten` works (skipped otherwise)
  flex         torch.nn.attention.flex_attention, torch.compile'd, with a
               block mask built from the NA rule (--device cuda only: its
               fused kernels are the GPU peer); backward by autograd

Before timing, every method's output (and gradients) is compared with
libna's, and libna's with the float64 NumPy reference (libna.reference) when
that is affordable; the bench exits with status 1 if anything disagrees
beyond the dtype's tolerance. Times are best and median of --repeats calls
after one warm-up call; --rounds R repeats the whole timing sequence R times
and keeps each row's best round (steadier on a shared machine). GFLOP/s counts NA FLOPs for every row: forward
4 * tokens * prod(kernel) * D * heads (two matmuls of 2 FLOPs per
multiply-add, softmax ignored), backward twice that, so dense methods get no
credit for the masked-out work they do. The backward time is the gradient
pass alone (forward excluded; libna recomputes the probabilities from lse).
Peak memory: each method runs in a fresh subprocess; the figure is that
child's peak RSS minus the peak RSS of a child that only builds the inputs
and allocates (and touches) the outputs. The peak is VmHWM from
/proc/self/status: Linux carries ru_maxrss over fork + exec, so a child of
this (large) process would report the parent's peak; ru_maxrss is the
fallback elsewhere. The machine ceiling is torch.matmul on 1024^3 float32 in
the same run. Subprocesses get OPENBLAS_NUM_THREADS=1 (and the bench restarts
itself with it when unset), so NumPy's idle OpenBLAS threads do not spin on
the cores being measured.

--models times whole image classifiers end to end instead: libna.models'
nat_mini, nat_tiny and dinat_tiny against timm's Swin-T and ConvNeXt-T
(timm is optional: `pip install timm`, or libna's `bench` extra; without it
the libna rows run and a note says so), inference and one training step
(forward + cross-entropy backward + SGD update), in float32 and bfloat16
autocast, eager and torch.compile'd, printing img/s (batch / median of
--repeats calls after --warmup calls) and the same-run ratios nat_tiny /
swin_tiny and nat_tiny / convnext_tiny; --plot PATH draws them.

--sweep times the forward and backward per token against the token count
(fixed kernel) and against the kernel size (fixed --size) and writes PNG
plots to --out-dir; peers that would take more than --sweep-budget seconds
for a point, or more memory than half the available RAM, are skipped with a
note.

Examples:
  python -m libna.bench                         # 2D 56x56, 4 heads, D 32, k 7
  python -m libna.bench --rank 1 --size 4096 --kernel 63
  python -m libna.bench --dtype bfloat16 --no-backward
  python -m libna.bench --sweep --out-dir docs
  python -m libna.bench --methods libna,sdpa-mask --threads 1 --no-memory
  python -m libna.bench --models --threads 2 --plot docs/img/models.png
  python -m libna.bench --models nat_tiny,swin_tiny --batches 8 --dtypes float32 --no-compile
"""

# The package, one idea a module:
#   problem      the benchmarked problem, its inputs, its neighbourhoods as tables
#   methods      libna and its peers (Method subclasses), by name
#   correctness  what each method is checked against, and the tolerance
#   timing       best / median of repeated calls, the matmul ceiling
#   memory       peak memory in fresh subprocesses
#   machine      what machine and software a run measured
#   report       times and markdown tables as printed
#   table        the default run (check, time, measure, print)
#   sweep        --sweep: time per token vs token count and kernel size, plots
#   overhead     --overhead: what a small call costs next to a same-size add
#   models       --models: NAT / DiNAT vs timm's Swin-T and ConvNeXt-T end to end
#   cli          the command line; __main__ runs it

from .cli import DEFAULTS, build_parser, main
from .correctness import (TOLERANCE, full_reference_affordable, max_abs_err,
                          reference_affordable, reference_outputs, tolerance)
from .machine import cpu_flags, cpu_model, machine_lines, proc_kib
from .memory import CHILD_ENV, measure_memory, memory_child
from .models import ALL_MODELS, LIBNA_MODELS, TIMM_MODELS, plot_models, run_models
from .methods import (ALL_METHODS, CUDA_ONLY, METHOD_CLASSES, SAME_OPERATOR, FlexMethod,
                      GatherMethod, LibnaMethod, Method, NattenMethod, SdpaFullMethod,
                      SdpaMaskMethod, SdpaMethod, SwinMethod, libna_ops, na_mask_mod,
                      natten_available, natten_function, swin_geometry, swin_partition,
                      swin_unpartition)
from .problem import Problem, axis_windows, dense_mask, gather_index, make_inputs, torch_dtype
from .report import fmt_ms, markdown_table
from .sweep import (STYLE, SWEEP_KERNELS, SWEEP_SIZES, estimated_bytes, mem_available,
                    plot_sweep, run_sweep, work)
from .table import run_table
from .timing import matmul_ceiling, time_calls, time_method

__all__ = [
    "ALL_METHODS", "CHILD_ENV", "CUDA_ONLY", "DEFAULTS", "METHOD_CLASSES", "SAME_OPERATOR",
    "STYLE", "SWEEP_KERNELS", "SWEEP_SIZES", "TOLERANCE",
    "Problem", "axis_windows", "dense_mask", "gather_index", "make_inputs", "torch_dtype",
    "Method", "LibnaMethod", "GatherMethod", "SdpaMethod", "SdpaMaskMethod", "SdpaFullMethod",
    "SwinMethod", "NattenMethod", "FlexMethod", "libna_ops", "na_mask_mod", "natten_available",
    "natten_function", "swin_geometry", "swin_partition", "swin_unpartition",
    "reference_outputs", "reference_affordable", "full_reference_affordable", "max_abs_err",
    "tolerance",
    "time_calls", "time_method", "matmul_ceiling",
    "memory_child", "measure_memory",
    "cpu_model", "cpu_flags", "machine_lines", "proc_kib",
    "fmt_ms", "markdown_table", "run_table",
    "mem_available", "estimated_bytes", "work", "run_sweep", "plot_sweep",
    "ALL_MODELS", "LIBNA_MODELS", "TIMM_MODELS", "run_models", "plot_models",
    "build_parser", "main",
]
