"""One contract, three implementations: the Triton kernels (on the CPU under
TRITON_INTERPRET=1) write the same bytes as the C++ core, and the CUDA
kernels are compiled whenever nvcc is present."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from iota import _C
from iota.codec import Codec, CodecError, backends, info

SPECS = [
    "int8/b32", "int8/b64/minmax", "int4/b64", "int4/b128/minmax/stochastic/seed=11", "int2/b32",
    "int2/b4096/minmax", "int8/b256/stochastic/seed=5/fp32scale", "int4/b32/minmax/fp32scale", "fp16", "bf16", "raw",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sample(n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)[torch.randperm(n, generator=g)]
    if n > 10:
        x[5:9] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    return x.to(dtype)


def test_triton_is_a_backend_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" in backends() and info()["triton"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 33, 4097, 3 * 4096 + 100])
def test_triton_encodes_the_same_bytes_as_cpu(spec, dtype, n):
    x = sample(n, seed=n, dtype=dtype)
    cpu = Codec.from_string(spec, backend="cpu").encode(x)
    assert Codec.from_string(spec, backend="triton").encode(x) == cpu


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_triton_decodes_the_same_values_as_cpu(spec, out_dtype):
    x = sample(5000, seed=1, dtype=torch.float32).reshape(50, 100)
    frame = Codec.from_string(spec).encode(x)
    want, got = torch.empty(50, 100, dtype=out_dtype), torch.empty(50, 100, dtype=out_dtype)
    Codec.decode_into(frame, want, backend="cpu")
    Codec.decode_into(frame, got, backend="triton")
    assert torch.equal(got, want)
    acc_cpu, acc_triton = torch.full((50, 100), 0.5), torch.full((50, 100), 0.5)
    Codec.decode_accumulate(frame, acc_cpu, 0.3, backend="cpu")
    Codec.decode_accumulate(frame, acc_triton, 0.3, backend="triton")
    assert torch.equal(acc_cpu, acc_triton)


# The interpreter casts the overflowing fp16 scale with numpy, which warns before the kernel
# reports the overflow that this test expects.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_triton_errors_match_cpu():
    x = torch.ones(100)
    x[7] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        Codec(bits=8, backend="triton").encode(x)
    allowed = Codec(bits=8, backend="triton", allow_nonfinite=True)
    assert allowed.encode(x) == allowed.with_(backend="cpu").encode(x)
    with pytest.raises(CodecError, match="fp32"):
        Codec(bits=2, block=32, backend="triton").encode(torch.full((32,), 1e6))


def test_empty_and_scalar_tensors_on_triton():
    for shape in [(0,), (), (0, 3)]:
        x = torch.zeros(shape)
        assert Codec(bits=4, backend="triton").encode(x) == Codec(bits=4, backend="cpu").encode(x)


def nvcc_present() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


@pytest.mark.skipif(not nvcc_present(), reason="no nvcc on this machine: the CUDA kernels are not built (CMake IOTA_CUDA=AUTO)")
def test_cuda_kernels_are_compiled_when_nvcc_is_present():
    assert _C.cuda_compiled, "nvcc is installed but the CUDA kernels were not built into iota._C"
    assert hasattr(_C, "cuda_encode") and hasattr(_C, "cuda_decode")


@pytest.mark.skipif(not _C.cuda_compiled, reason="iota._C was built without CUDA kernels (no nvcc at build time)")
def test_cuda_without_a_gpu_fails_cleanly():
    """No GPU here: the module still imports, reports no devices, and a launch
    is a clear error rather than a crash (in a child process, to see a crash)."""
    code = (
        "from iota import _C\n"
        "from iota.codec import CodecError, backends\n"
        "n = _C.cuda_device_count()\n"
        "assert ('cuda' in backends()) == (n > 0)\n"
        "if n == 0:\n"
        "    try:\n"
        "        _C.cuda_encode(0, 0, 64, 8, 64, 0, 0, 0, 0, 0, 0)\n"
        "    except CodecError as e:\n"
        "        print('refused:', e)\n"
        "    else:\n"
        "        raise SystemExit('a CUDA launch without a GPU did not fail')\n"
        "print('devices', n)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "devices" in result.stdout
