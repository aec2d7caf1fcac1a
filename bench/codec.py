"""Codec throughput against memcpy and a pure-torch codec, in the same run.

For a 64 Mi-element fp32 tensor, per bit width, block size and thread count:
encode (into a reused buffer, and allocating a new frame) and decode (into a
reused tensor, checksum verified) in GB/s of fp32 input, beside a memcpy of
the same buffer and a straightforward vectorized torch implementation of the
same codec. Prints JSON lines; medians over --repeats.

    python bench/codec.py [--quick] [--elements N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from iota import _C
from iota.codec import Codec, info


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up: first-touch page faults, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class TorchCodec:
    """The same absmax codec written the obvious way in torch (fp16 scales)."""

    def __init__(self, bits: int, block: int):
        self.bits, self.block = bits, block
        self.qmax = 2 ** (bits - 1) - 1

    def encode(self, x: torch.Tensor):
        xb = x.view(-1, self.block)
        scale = (xb.abs().amax(1, keepdim=True) / self.qmax).half()
        s = scale.float()
        inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        q = torch.round((xb * inv).clamp(-self.qmax, self.qmax)).to(torch.int16) + 2 ** (self.bits - 1)
        per = 8 // self.bits
        q = q.to(torch.uint8).view(-1, per)
        packed = q[:, 0].clone()
        for k in range(1, per):
            packed |= q[:, k] << (k * self.bits)
        return scale, packed

    def decode(self, scale: torch.Tensor, packed: torch.Tensor, out: torch.Tensor):
        per = 8 // self.bits
        mask = (1 << self.bits) - 1
        codes = torch.stack([(packed >> (k * self.bits)) & mask for k in range(per)], 1).view(-1, self.block)
        torch.mul((codes.to(torch.int16) - 2 ** (self.bits - 1)).float(), scale.float(), out=out.view(-1, self.block))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=64 * 2**20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 256, 4096])
    parser.add_argument("--quick", action="store_true", help="1 Mi elements, few repeats (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.elements, args.repeats, args.torch_repeats, args.blocks = 2**20, 2, 1, [64]

    all_threads = os.cpu_count() or 1
    n = args.elements
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    dst = torch.empty_like(x)
    print(json.dumps({"bench": "codec", "elements": n, "machine": platform.machine(), "cpus": all_threads, **info()}))

    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        # memcpy of the same buffer: numpy's copy is one thread; torch's copy_ uses the pool.
        if threads == 1:
            xs, ds = x.numpy(), dst.numpy()
            memcpy = n * 4 / median_seconds(lambda: np.copyto(ds, xs), args.repeats) / 1e9
        else:
            memcpy = n * 4 / median_seconds(lambda: dst.copy_(x), args.repeats) / 1e9
        print(json.dumps({"bench": "memcpy", "threads": threads, "gbps": memcpy}))
        for bits in args.bits:
            for block in args.blocks:
                codec = Codec(bits=bits, block=block, threads=threads)
                ref = TorchCodec(bits, block)
                frame = codec.encode(x)
                buf = bytearray(len(frame))
                gbps = lambda seconds: n * 4 / seconds / 1e9
                enc_into = gbps(median_seconds(lambda: codec.encode_into(x, buf), args.repeats))
                enc_alloc = gbps(median_seconds(lambda: codec.encode(x), args.repeats))
                dec = gbps(median_seconds(lambda: Codec.decode_into(frame, dst, threads=threads), args.repeats))
                scale, packed = ref.encode(x)
                t_enc = gbps(median_seconds(lambda: ref.encode(x), args.torch_repeats))
                t_dec = gbps(median_seconds(lambda: ref.decode(scale, packed, dst), args.torch_repeats))
                row = {
                    "bench": "codec", "isa": _C.isa(), "bits": bits, "block": block, "threads": threads,
                    "encode_gbps": enc_into, "encode_alloc_gbps": enc_alloc, "decode_gbps": dec,
                    "memcpy_gbps": memcpy, "torch_encode_gbps": t_enc, "torch_decode_gbps": t_dec,
                    "encode_vs_memcpy": enc_into / memcpy, "encode_alloc_vs_memcpy": enc_alloc / memcpy,
                    "decode_vs_memcpy": dec / memcpy,
                    "encode_vs_torch": enc_into / t_enc, "decode_vs_torch": dec / t_dec,
                    "frame_bytes": len(frame),
                }
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
