"""Compile, for NVIDIA targets and without a GPU, every kernel launch the public launchers make.

Run as a script (``test_gpu_compile.py`` does, in a subprocess without ``TRITON_INTERPRET``):

    python tests/kernels/_compile_for_gpu.py 80 90

The launchers run on CPU tensors of real LLM shapes with ``JITFunction.run`` replaced by a recorder;
each recorded launch is then specialized the way triton's own launcher does it (argument types,
16-byte alignment and divisibility, ints equal to 1) and compiled through ttir, ttgir, llir, ptx and
cubin (ptxas ships with triton). The split-K decode path is reached by pretending to a 132-SM device,
and one GEMM launch is also compiled under every ``FASTLORA_AUTOTUNE`` config.
A launch also fails when its shared memory exceeds the target's per-block limit (triton only finds
out when it loads the kernel on a device). Prints one JSON line: ``{"compiled": n, "failures": [...]}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile checks need the compiler, not the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fastlora.kernels import _config, dropout_keep_mask, lora_linear_bwd, lora_linear_fwd  # noqa: E402
from fastlora.kernels import nf4 as nf4_kernels  # noqa: E402
from fastlora.kernels import nf4_dequantize, nf4_linear_bwd, nf4_linear_fwd, nf4_quantize  # noqa: E402
from fastlora.quant import quantize_nf4  # noqa: E402

# (M, K, N, r, dtype, dropout_p, bias, transposed weight)
CASES = [
    (2048, 4096, 4096, 16, torch.bfloat16, 0.1, False, False),  # training step, Llama-size projection
    (2048, 4096, 4096, 16, torch.float16, 0.0, True, False),
    (1, 4096, 4096, 16, torch.bfloat16, 0.0, False, False),  # decode: split-K shrink
    (16, 4096, 14336, 64, torch.float16, 0.0, False, False),  # decode, wide MLP
    (40, 1024, 3072, 200, torch.bfloat16, 0.05, True, True),  # rank bucket 256, Conv1D weight
    (300, 768, 2304, 8, torch.float32, 0.1, True, True),  # fp32, GPT-2 c_attn
]

# Opt-in shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}

launches: list[tuple[JITFunction, tuple, dict]] = []


def _record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))


def _record_launches() -> None:
    JITFunction.run = _record
    real_shrink_config = _config.shrink_config
    _config._sm_count = lambda device: 132
    _config.shrink_config = lambda M, K, R, device, interpreter: real_shrink_config(
        M, K, R, torch.device("cuda", 0), interpreter)
    for M, K, N, r, dtype, p, bias, transposed in CASES:
        x = torch.empty(M, K, dtype=dtype)
        w = torch.empty(K, N, dtype=dtype).t() if transposed else torch.empty(N, K, dtype=dtype)
        b = torch.empty(N, dtype=dtype) if bias else None
        a, bb = torch.empty(r, K), torch.empty(N, r)
        seed = torch.zeros((), dtype=torch.int64)
        y, s = lora_linear_fwd(x, w, b, a, bb, 2.0, p, seed)
        lora_linear_bwd(torch.empty(M, N, dtype=dtype), x, w, a, bb, s, seed, 2.0, p, True, True, bias, True, True)
    dropout_keep_mask(torch.zeros((), dtype=torch.int64), 64, 64, 0.5, "cpu")
    _record_nf4_launches()
    _record_sgmv_launches()


# (M, K, N, r, dtype, dropout_p, double_quant): decode (fused, split-K) with and without LoRA, a
# training step (dequantize, then the LoRA kernels), an odd inner dimension.
NF4_CASES = [
    (1, 4096, 4096, 16, torch.bfloat16, 0.0, True),
    (16, 4096, 14336, None, torch.float16, 0.0, False),
    (2048, 4096, 4096, 16, torch.bfloat16, 0.05, True),
    (4, 1000, 24, 8, torch.float32, 0.0, False),
]


def _record_nf4_launches() -> None:
    real_matmul_config = nf4_kernels._matmul_config
    nf4_kernels._matmul_config = lambda M, N, K, device, interpreter: real_matmul_config(
        M, N, K, torch.device("cuda", 0), interpreter)
    for M, K, N, r, dtype, p, double_quant in NF4_CASES:
        packed, state = quantize_nf4(torch.zeros(N, K), blocksize=64, double_quant=double_quant)
        x = torch.empty(M, K, dtype=dtype)
        a, bb = (torch.empty(r, K), torch.empty(N, r)) if r else (None, None)
        seed = torch.zeros((), dtype=torch.int64)
        y, s = nf4_linear_fwd(x, packed, state, None, a, bb, 2.0, p, seed)
        nf4_linear_bwd(torch.empty(M, N, dtype=dtype), x, packed, state, a, bb, s, seed, 2.0, p, True, False,
                       r is not None, r is not None)
        nf4_dequantize(packed, state, dtype)
        nf4_quantize(torch.empty(N, K, dtype=dtype), torch.empty(15), 64)


# (M, K, N, widest rank, dtype, block_m): decode rows, short and long prefill segments, a bank wider than
# one shrink chunk, fp32 adapters on fp32 activations.
SGMV_CASES = [
    (8, 4096, 4096, 64, torch.bfloat16, 0),
    (32, 4096, 14336, 64, torch.float16, 16),
    (4096, 4096, 4096, 64, torch.bfloat16, 64),
    (1000, 14336, 4096, 200, torch.bfloat16, 32),
    (300, 768, 2304, 16, torch.float32, 32),
]


def _record_sgmv_launches() -> None:
    from fastlora.kernels import multi_lora_add
    from fastlora.ops.multi_lora import adapter_batch

    for M, K, N, R, dtype, block_m in SGMV_CASES:
        L = 8
        meta = adapter_batch(torch.zeros(M, dtype=torch.int32), L, block_m=block_m)
        multi_lora_add(torch.empty(M, N, dtype=dtype), torch.empty(M, K, dtype=dtype),
                       torch.empty(L, R, K, dtype=dtype), torch.empty(L, N, R, dtype=dtype),
                       torch.zeros(L, dtype=torch.int32), torch.zeros(L), meta.token_slots, meta.sorted_tokens,
                       meta.blocks, meta.block_m)


def _compile(fn: JITFunction, args: tuple, kwargs: dict, arch: int, seen: set) -> bool:
    """Compile one launch the way ``JITFunction.run`` would; False when it was a duplicate."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = (fn.__name__, arch, str(specialization), str(options))
    if key in seen:
        return False
    seen.add(key)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    shared = kernel.metadata.shared
    if shared > SHARED_LIMIT.get(arch, shared):
        raise RuntimeError(f"{shared} bytes of shared memory > {SHARED_LIMIT[arch]} ({constexprs})")
    return True


def _autotune_launches() -> list[tuple[JITFunction, tuple, dict]]:
    """The first training-size GEMM launch again under every FASTLORA_AUTOTUNE config."""
    fn, args, kwargs = next(launch for launch in launches
                            if launch[0].__name__ == "_lora_gemm_kernel" and launch[2]["BLOCK_M"] == 128)
    out = []
    for config in _config.GEMM_AUTOTUNE_CONFIGS:
        tuned = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        out.append((fn, args, tuned))
    return out


def main(archs: list[int]) -> None:
    _record_launches()
    launches.extend(_autotune_launches())
    compiled, failures, seen = 0, [], set()
    for arch in archs:
        for fn, args, kwargs in launches:
            try:
                compiled += _compile(fn, args, kwargs, arch, seen)
            except Exception:  # report every failing launch, not just the first
                failures.append(f"{fn.__name__} sm_{arch}: {traceback.format_exc(limit=-3)}")
    print(json.dumps({"compiled": compiled, "failures": failures}))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
