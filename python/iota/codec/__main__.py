"""`python -m iota.codec`: what the codecs do to a realistic tensor on this machine.

Encodes a heavy-tailed, activation-like tensor (outlier channels, as in real
transformer residual streams) with each preset and prints compression ratio
against bf16, relative error, and encode/decode throughput."""

from __future__ import annotations

import argparse
import json
import time

import torch

from iota.codec import Codec, compression_ratio, info

PRESETS = ["bf16", "int8/b64", "int8/b64/minmax", "int4/b64", "int4/b32/stochastic", "int2/b32", "int2/b4096"]


def activation_like(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    outliers = torch.randperm(width, generator=g)[: max(1, width // 64)]
    x[:, outliers] *= 20.0  # a few channels carry most of the magnitude
    return x


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args()

    x = activation_like(args.tokens, args.width, seed=0)
    if not args.json:
        print(f"iota codec on {args.tokens}x{args.width} fp32 activations; {json.dumps(info())}")
        print(f"{'codec':<22}{'ratio vs bf16':>14}{'rel. error':>12}{'encode GB/s':>13}{'decode GB/s':>13}")
    for text in PRESETS:
        codec = Codec.from_string(text)
        frame = codec.encode(x)
        y = Codec.decode(frame)
        out = torch.empty_like(x)
        row = {
            "codec": text,
            "ratio_vs_bf16": compression_ratio(frame),
            "relative_error": float((y - x).norm() / x.norm()),
            "encode_gbps": x.numel() * 4 / median_seconds(lambda: codec.encode(x), args.repeats) / 1e9,
            "decode_gbps": x.numel() * 4 / median_seconds(lambda: Codec.decode_into(frame, out), args.repeats) / 1e9,
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{text:<22}{row['ratio_vs_bf16']:>14.2f}{row['relative_error']:>12.4f}"
                  f"{row['encode_gbps']:>13.2f}{row['decode_gbps']:>13.2f}")


if __name__ == "__main__":
    main()
