"""Issue 14: torch's own int8 weight-only kernel (aten._weight_int8pack_mm, one scale per output row) on the GPU,
against bf16 F.linear, over the four 7B layer shapes at 1, 8 and 32 rows.  `python3 tools/probe_int8pack.py`
(BENCHMARKS run 23: 10x slower than bf16 on an H100, so not a candidate for int8 as tinygemm was for int4)."""

import torch

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # qkv, o, gate+up, down


def time_us(fn, iters: int = 200) -> float:
    """Mean microseconds per call between CUDA events, after 10 warm-up calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    torch.manual_seed(0)
    print(torch.__version__, torch.cuda.get_device_name())
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (time_us(lambda: dst.copy_(src), 20) * 1e-6) / 1e9
    print(f"copy BW {bw:.0f} GB/s")
    for rows in (1, 8, 32):
        total_int8 = total_bf16 = 0.0
        for n, k in SHAPES:
            w = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda")
            scales = torch.rand(n, dtype=torch.bfloat16, device="cuda")
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            w_bf16 = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
            t_int8 = time_us(lambda: torch._weight_int8pack_mm(x, w, scales))
            t_bf16 = time_us(lambda: torch.nn.functional.linear(x, w_bf16))
            ref = x.float() @ (w.float() * scales.float()[:, None]).T
            err = ((torch._weight_int8pack_mm(x, w, scales).float() - ref).abs().max() / ref.abs().max()).item()
            print(f"M={rows} {n}x{k}: int8pack {t_int8:.1f} us ({n * k / (t_int8 * 1e-6) / 1e9 / bw:.2f} BW) "
                  f"err {err:.1e}; bf16 {t_bf16:.1f} us ({2 * n * k / (t_bf16 * 1e-6) / 1e9 / bw:.2f} BW)")
            total_int8 += t_int8
            total_bf16 += t_bf16
        print(f"M={rows} sum over the 4 shapes: int8pack {total_int8:.0f} us, bf16 {total_bf16:.0f} us")


if __name__ == "__main__":
    main()
