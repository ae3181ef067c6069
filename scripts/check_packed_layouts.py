"""Packed attention under torch.compile with inputs that are views with gaps (GPU; why `_dense` exists).

`fused_projections=kv` splits the key and value products out of one wider product, so v reaches the packed
kernels as a view whose rows are further apart than its own width. This runs, each in its own process (an
illegal memory access ends a process's CUDA context): `packed_attention` as it was before (`_dense` replaced
by the identity: the views go to the op as they are) and as it is (dense inputs first), each eager and
compiled, forward and backward, against the fp32 reference. Prints a table; exits 1 unless `packed_attention`
matches in every mode.

    python3 scripts/check_packed_layouts.py
"""

from __future__ import annotations

import subprocess
import sys

CASES = [(entry, mode) for entry in ("views as they are", "packed_attention") for mode in ("eager", "compiled")]


def case(entry: str, mode: str) -> tuple[str, str]:
    import torch

    from forgather.models import packed_attention as module
    from forgather.models.attention import document_bounds

    if entry != "packed_attention":
        module._dense = lambda t: t  # the code before the copy

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 8, 2, 1024, 64
    ids = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor([1, 300, 500, 223])),
                       torch.zeros(length, dtype=torch.long)]).cuda()
    start, end = document_bounds(ids)
    q = torch.randn(batch, length, heads, dim, generator=generator).to("cuda", torch.bfloat16).transpose(1, 2)
    kv = torch.randn(batch, length, 2 * kv_heads * dim, generator=generator).to("cuda", torch.bfloat16)
    q, kv = q.detach().requires_grad_(), kv.requires_grad_()
    grad = torch.randn(batch, heads, length, dim, generator=generator).to("cuda", torch.bfloat16)

    def split(kv):
        return (t.view(batch, length, kv_heads, dim).transpose(1, 2) for t in kv.split(kv_heads * dim, dim=-1))

    def attend(q, kv):
        return module.packed_attention(q, *split(kv), start, end)

    out = (torch.compile(attend, fullgraph=True) if mode == "compiled" else attend)(q, kv)
    out.backward(grad)
    torch.cuda.synchronize()
    q32, kv32 = (t.detach().float().requires_grad_() for t in (q, kv))
    reference = module.reference_packed_attention(q32, *split(kv32), start)
    reference.backward(grad.float())
    errors = [((got.float() - want).norm() / want.norm()).item()
              for got, want in ((out, reference), (q.grad, q32.grad), (kv.grad, kv32.grad))]
    return "ok" if max(errors) < 1e-2 else "wrong", " ".join(f"{e:.2e}" for e in errors)


def main() -> int:
    if len(sys.argv) == 3:
        verdict, errors = case(*sys.argv[1:])
        print(f"RESULT {verdict} {errors}")
        return 0
    print("| entry | mode | result | relative errors (out, dq, dkv) |\n| --- | --- | --- | --- |")
    failed = False
    for entry, mode in CASES:
        run = subprocess.run([sys.executable, __file__, entry, mode], capture_output=True, text=True, timeout=300)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            _, verdict, errors = lines[-1].split(" ", 2)
        else:
            errors = next((line.strip() for line in reversed(run.stderr.splitlines())
                           if "Error" in line), f"exit {run.returncode}")
            verdict = "crashed"
        failed |= entry == "packed_attention" and verdict != "ok"
        print(f"| {entry} | {mode} | {verdict} | {errors[:120]} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
