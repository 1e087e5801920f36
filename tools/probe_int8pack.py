"""Issue 14: torch's own int8 weight-only kernel (aten._weight_int8pack_mm, one scale per output row) on the GPU,
against bf16 F.linear, over the four 7B layer shapes at 1, 8 and 32 rows.  `python3 tools/probe_int8pack.py`
(BENCHMARKS run 23: 10x slower than bf16 on an H100, so not a candidate for int8 as tinygemm was for int4)."""
import torch, time
torch.manual_seed(0)
dev = "cuda"
shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
def t(fn, it=200):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(it): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / it  # us
print(torch.__version__, torch.cuda.get_device_name())
x0 = torch.empty(1 << 28, dtype=torch.uint8, device=dev); y0 = torch.empty_like(x0)
cp = t(lambda: y0.copy_(x0), 20); bw = 2 * x0.numel() / (cp * 1e-6) / 1e9
print(f"copy BW {bw:.0f} GB/s")
for M in (1, 8, 32):
    tot_i8 = tot_bf = bytes_i8 = bytes_bf = 0
    for N, K in shapes:
        w = torch.randint(-127, 127, (N, K), dtype=torch.int8, device=dev)
        sc = torch.rand(N, dtype=torch.bfloat16, device=dev)
        x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
        wb = torch.randn(N, K, dtype=torch.bfloat16, device=dev)
        try:
            ti = t(lambda: torch._weight_int8pack_mm(x, w, sc))
        except Exception as e:
            print("int8pack_mm failed:", type(e).__name__, str(e)[:200]); ti = float("nan")
        tb = t(lambda: torch.nn.functional.linear(x, wb))
        ref = (x.float() @ (w.float() * sc.float()[:, None]).T)
        try:
            got = torch._weight_int8pack_mm(x, w, sc).float(); err = ((got - ref).abs().max() / ref.abs().max()).item()
        except Exception: err = float("nan")
        print(f"M={M} {N}x{K}: int8pack {ti:.1f} us ({N*K/(ti*1e-6)/1e9:.0f} GB/s, {N*K/(ti*1e-6)/1e9/bw:.2f} BW) err {err:.1e}; bf16 {tb:.1f} us ({2*N*K/(tb*1e-6)/1e9/bw:.2f} BW)")
        tot_i8 += ti; tot_bf += tb
    print(f"M={M} sum over the 4 shapes: int8pack {tot_i8:.0f} us, bf16 {tot_bf:.0f} us")
