"""The CPU codec against the arithmetic contract: exact bytes, error bounds,
unbiased stochastic rounding, every dtype, shape and option."""

import gc

import numpy as np
import pytest
import torch

from iota import _C
from iota.codec import Codec, CodecError, compression_ratio
from iota.codec.tensors import huge_page_tensor
from tests.codec import reference

BITS = [8, 4, 2]
BLOCKS = [32, 64, 256, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sample(n, seed=0, dtype=torch.float32):
    """Values with per-region scales over many orders of magnitude, exact zeros and -0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g).cumsum(0) / max(1, n) ** 0.5 * 3)
    if n > 8:
        x[::7] = 0.0
        x[3] = -0.0
    return x.to(dtype)


def sections(frame):
    """(scales, offsets, codes) numpy arrays of an int frame."""
    h = Codec.header(frame)
    raw = np.frombuffer(frame, dtype=np.uint8)
    sdt = np.float32 if h["flags"] & 4 else np.float16
    scales = raw[h["scales_off"] : h["scales_off"] + h["scales_len"]].view(sdt)
    nb = -(-h["numel"] // h["block"])
    offsets = scales[nb:] if h["flags"] & 1 else None
    return scales[:nb], offsets, raw[h["codes_off"] : h["codes_off"] + h["codes_len"]]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", [32, 64, 4096])
@pytest.mark.parametrize("scheme", ["absmax", "minmax"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scale_dtype", ["fp16", "fp32"])
def test_bytes_match_the_reference(bits, block, scheme, rounding, scale_dtype):
    codec = Codec(bits=bits, block=block, scheme=scheme, rounding=rounding, seed=12345, scale_dtype=scale_dtype)
    for n in (1, 31, block + 1, 3 * block + 5):
        x = sample(n, seed=n)
        scales, offsets, codes = sections(codec.encode(x))
        want = reference.encode_sections(
            x.numpy(), bits, block, minmax=scheme == "minmax", stochastic=rounding == "stochastic",
            seed=12345, fp32scale=scale_dtype == "fp32",
        )
        assert scales.tobytes() == want[0].tobytes()
        assert (offsets is None) == (want[1] is None)
        if offsets is not None:
            assert offsets.tobytes() == want[1].tobytes()
        assert codes.tobytes() == want[2].tobytes()


@pytest.mark.parametrize("isa", _C.isas())
def test_every_instruction_set_writes_the_same_bytes(isa):
    x = sample(5 * 4096 + 77, seed=3)
    # Blocks of exact halves: scale 1 (amax = qmax), so every other value is a
    # tie that must round to even; the clamp and -0 ride along.
    halves = torch.arange(-64, 64, dtype=torch.float32) + 0.5
    x[:128] = halves.clamp(-127, 127)
    x[0], x[64] = 127.0, -127.0
    x[128:256] = (halves / 16).clamp(-7, 7)
    x[128], x[192] = 7.0, -7.0
    specs = ["int8/b64", "int4/b64", "int8/b32", "int4/b32/minmax", "int2/b4096/stochastic/seed=9", "int8/b256/fp32scale", "fp16", "bf16"]
    expected = [Codec.from_string(s).encode(x) for s in specs]
    default = _C.isa()
    try:
        _C.set_isa(isa)
        for spec, want in zip(specs, expected):
            frame = Codec.from_string(spec).encode(x)
            assert frame == want, spec
            assert torch.equal(Codec.decode(frame), Codec.decode(want))
    finally:
        _C.set_isa(default)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("scheme", ["absmax", "minmax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nearest_rounding_error_is_within_half_a_step(bits, block, scheme, dtype):
    x = sample(2 * block + 13, seed=bits * block, dtype=dtype)
    frame = Codec(bits=bits, block=block, scheme=scheme).encode(x)
    y = torch.empty(x.shape, dtype=torch.float32)
    Codec.decode_into(frame, y)  # fp32 output: no rounding on the way out
    x32 = x.float().numpy()
    scales, offsets, _ = sections(frame)
    n = x32.size
    s = np.repeat(scales.astype(np.float32), block)[:n]
    if offsets is None:
        amax = np.repeat(np.abs(np.pad(x32, (0, -n % block))).reshape(-1, block).max(1), block)[:n]
        top = amax - (2 ** (bits - 1) - 1) * s  # > 0 only when the rounded scale clamps the largest value
    else:
        lo = np.repeat(offsets.astype(np.float32), block)[:n]
        hi = np.repeat(np.pad(x32, (0, -n % block), constant_values=-np.inf).reshape(-1, block).max(1), block)[:n]
        top = hi - (lo + (2**bits - 1) * s)
    bound = 0.5 * s * (1 + 1e-6) + np.maximum(top, 0) + 1e-6 * np.abs(x32)
    err = np.abs(y.numpy() - x32)
    assert np.all(err <= bound), float((err - bound).max())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", ["absmax", "minmax"])
def test_stochastic_rounding_is_unbiased(bits, scheme):
    x = sample(1024, seed=7)
    decoded = torch.stack([
        Codec(bits=bits, block=64, scheme=scheme, rounding="stochastic").decode(
            Codec(bits=bits, block=64, scheme=scheme, rounding="stochastic").encode(x, seed=seed))
        for seed in range(400)
    ])
    scales, _, _ = sections(Codec(bits=bits, block=64, scheme=scheme).encode(x))
    step = torch.from_numpy(np.repeat(scales.astype(np.float32), 64)[: x.numel()])
    assert torch.all((decoded - x).abs() <= step * 1.001 + 1e-6)  # never more than one step away
    # Each draw is within one step, so its std is <= step/2 and the mean of 400
    # has std <= step/40: six of those bound the mean's error everywhere.
    assert torch.all((decoded.mean(0) - x).abs() <= 6 * step / 40 + 1e-6)
    # Nearest rounding, by contrast, is biased on these inputs.
    assert (decoded.mean(0) - x).abs().mean() < 0.5 * (Codec.decode(Codec(bits=bits, block=64, scheme=scheme).encode(x)) - x).abs().mean()


def test_stochastic_rounding_depends_on_seed_only():
    x = sample(5000, seed=1)
    c = Codec(bits=4, rounding="stochastic", seed=5)
    assert c.encode(x) == c.encode(x) == c.encode(x, seed=5)
    assert c.encode(x) != c.encode(x, seed=6)
    assert Codec.of_frame(c.encode(x, seed=6)).seed == 6


def test_round_half_to_even():
    # amax 127 gives scale exactly 1.0 (representable in fp16), so x*inv = x.
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 24)
    y = Codec(bits=8, block=32).decode(Codec(bits=8, block=32).encode(x))
    assert y[:8].tolist() == [127.0, 0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0]


@pytest.mark.parametrize("kind", ["raw", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_float_kinds_round_trip(kind, dtype):
    x = sample(1000, seed=2, dtype=dtype).reshape(10, 100)
    y = Codec(kind=kind).decode(Codec(kind=kind).encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    wire = {"raw": dtype, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[kind]
    assert torch.equal(y, x.to(wire).to(dtype))
    if kind == "raw" or wire == torch.float32 or wire == dtype:  # lossless whenever the wire dtype holds the input
        assert torch.equal(y, x)


@pytest.mark.parametrize("shape", [(0,), (1,), (), (3, 5, 7), (0, 4), (2, 1, 1, 1, 1, 1, 1, 3)])
@pytest.mark.parametrize("spec", ["int8/b32", "int4/b64/minmax", "int2/b32/stochastic", "fp16", "raw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_and_dtypes_survive(shape, spec, dtype):
    x = sample(int(np.prod(shape)), seed=4, dtype=dtype).reshape(shape)
    y = Codec.decode(Codec.from_string(spec).encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype


def test_numpy_inputs_and_noncontiguous_tensors():
    x = sample(4096, seed=5).reshape(64, 64)
    c = Codec(bits=8)
    assert c.encode(x.numpy()) == c.encode(x)
    assert c.encode(x.t()) == c.encode(x.t().contiguous())
    assert c.encode(x.numpy().astype(np.float16)) == c.encode(x.half())


def test_decode_into_and_accumulate():
    x = sample(10_000, seed=6)
    frame = Codec(bits=8).encode(x)
    y = Codec.decode(frame)
    for dtype in DTYPES:
        out = torch.empty(10_000, dtype=dtype)
        Codec.decode_into(frame, out)
        assert torch.equal(out, y.to(dtype))
    acc = torch.full((10_000,), 2.0)
    Codec.decode_accumulate(frame, acc, 0.25)
    assert torch.equal(acc, 2.0 + 0.25 * y)
    acc_np = np.zeros(10_000, dtype=np.float32)
    Codec.decode_accumulate(frame, acc_np, -1.0)
    assert np.array_equal(acc_np, -y.numpy())
    with pytest.raises(CodecError, match="float32"):
        Codec.decode_accumulate(frame, torch.zeros(10_000, dtype=torch.float16))
    with pytest.raises(CodecError, match="10000 elements"):
        Codec.decode_into(frame, torch.empty(9_999))


def test_decode_into_without_verify_skips_only_the_checksum():
    frame = Codec(bits=8).encode(sample(10_000, seed=7))
    stale = bytearray(frame)
    stale[-1] ^= 1  # the checksum itself: the payload is intact
    out = torch.empty(10_000)
    with pytest.raises(CodecError, match="checksum"):
        Codec.decode_into(bytes(stale), out)
    Codec.decode_into(bytes(stale), out, verify=False)
    assert torch.equal(out, Codec.decode(frame))
    with pytest.raises(CodecError, match="truncated|length|size"):  # the structure is still checked
        Codec.decode_into(bytes(stale[:-9]), out, verify=False)


def test_encode_into_a_reused_buffer():
    x = sample(3000, seed=8)
    c = Codec(bits=4, block=128)
    buf = bytearray(c.frame_size(x.shape) + 10)
    view = c.encode_into(x, buf)
    assert bytes(view) == c.encode(x) and len(view) == c.frame_size(x.shape)
    with pytest.raises(CodecError, match="needs"):
        c.encode_into(x, bytearray(10))


def test_threads_do_not_change_bytes():
    x = sample(3 * 2**20 + 11, seed=9)
    for spec in ["int8/b64", "int4/b4096/stochastic/seed=3", "bf16"]:
        frames = {Codec.from_string(spec, threads=t).encode(x) for t in (1, 2, 3)}
        assert len(frames) == 1


def test_non_finite_input_is_refused_unless_allowed():
    x = sample(200, seed=10)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x_bad = x.clone()
        x_bad[150] = bad
        for spec in ["int8/b64", "int4/b64/minmax", "fp16", "raw"]:
            with pytest.raises(CodecError, match="NaN or infinity"):
                Codec.from_string(spec).encode(x_bad)
        y = Codec(bits=8, allow_nonfinite=True).decode(Codec(bits=8, allow_nonfinite=True).encode(x_bad))
        assert y[150] == 0 and torch.isfinite(y).all()
        clean = x.clone()
        clean[150] = 0.0
        assert torch.equal(y, Codec(bits=8).decode(Codec(bits=8).encode(clean)))


def test_scale_overflow_asks_for_fp32_scales():
    x = torch.tensor([1e6, -3.0] * 16)
    with pytest.raises(CodecError, match="fp32"):
        Codec(bits=2, block=32).encode(x)
    y = Codec(bits=2, block=32, scale_dtype="fp32").decode(Codec(bits=2, block=32, scale_dtype="fp32").encode(x))
    assert y[0] == 1e6


@pytest.mark.parametrize("text", ["int8/b64", "int4/b128/minmax", "int2/b32/stochastic/seed=7/fp32scale", "fp16", "bf16", "fp32", "raw", "int8/b64/nonfinite"])
def test_codec_strings_round_trip(text):
    codec = Codec.from_string(text)
    assert str(codec) == text
    assert Codec.from_string(str(codec)) == codec
    x = sample(100)
    assert Codec.of_frame(codec.encode(x)) == codec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=3), "bits"),
        (dict(block=48), "block"),
        (dict(block=8192), "block"),
        (dict(scheme="mean"), "scheme"),
        (dict(rounding="up"), "rounding"),
        (dict(scale_dtype="bf16"), "scale_dtype"),
        (dict(kind="int3"), "kind"),
        (dict(backend="tpu"), "backend"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_codecs_say_what_is_wrong(kwargs, message):
    with pytest.raises(CodecError, match=message):
        Codec(**kwargs)


@pytest.mark.parametrize("text", ["", "int3", "int8/b64/fast", "fp16/b64", "q8"])
def test_invalid_codec_strings(text):
    with pytest.raises(CodecError):
        Codec.from_string(text)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(CodecError, match="float32, float16 or bfloat16"):
        Codec().encode(torch.arange(10))
    with pytest.raises(CodecError, match="torch tensor or numpy array"):
        Codec().encode([1.0, 2.0])


def test_compression_ratio_is_against_bf16():
    x = sample(2**16)
    assert compression_ratio(Codec(kind="bf16").encode(x)) == pytest.approx(1.0, rel=1e-3)
    header = 48 + 8 + 8  # fixed header, one dimension, checksum
    # int4 with an fp16 scale per 64 values: 4 + 16/64 bits per value against 16.
    assert compression_ratio(Codec(bits=4, block=64).encode(x)) == 2 * 2**16 / (2**16 * 4.25 / 8 + header)
    assert compression_ratio(Codec(bits=2, block=4096).encode(x)) == 2 * 2**16 / (2**16 * 2 / 8 + 16 * 2 + header)


def test_tiny_fp32_scales_flush_to_zero_instead_of_overflowing():
    # amax/127 is below 2^-126: its inverse would be inf and saturate every code.
    x = torch.tensor([1e-37, -5e-38, 0.0, 2e-38] + [0.0] * 28)
    codec = Codec(bits=8, block=32, scale_dtype="fp32")
    y = Codec.decode(codec.encode(x))
    assert torch.equal(y, torch.zeros(32))
    assert sections(codec.encode(x))[0][0] == 0


@pytest.mark.parametrize("numel", [0, 1, 1000, 3 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_page_tensors_are_zeroed_writable_and_outlive_their_mapping_handle(numel, dtype):
    tensor = huge_page_tensor(numel, dtype)
    assert tensor.shape == (numel,) and tensor.dtype == dtype and not tensor.any()
    gc.collect()  # only the tensor refers to the mapping now
    tensor.fill_(2.0)
    assert float(tensor.float().sum()) == 2.0 * numel
    frame = Codec.from_string("fp16").encode(torch.arange(numel, dtype=torch.float32) % 7)
    Codec.decode_into(frame, tensor)
    assert torch.equal(tensor.float(), torch.arange(numel, dtype=torch.float32) % 7)
