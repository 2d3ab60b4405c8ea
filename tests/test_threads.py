"""OpenMP: the kernels use torch's thread count, and exactly one OpenMP runtime is loaded."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_nerva as tn


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs at least 2 cores")
def test_set_num_threads_controls_kernel_threads():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert int(torch.ops.torch_nerva._parallel_probe(1000)) == 2, (
            "at::parallel_for ran on one thread: the extension was built without -fopenmp")
        torch.set_num_threads(1)
        assert int(torch.ops.torch_nerva._parallel_probe(1000)) == 1
    finally:
        torch.set_num_threads(old)


def test_results_do_not_depend_on_thread_count():
    layer = tn.SparseLinear(300, 200, density=0.1)
    x = torch.randn(64, 300, requires_grad=True)
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = None
            layer.zero_grad()
            y = layer(x)
            y.pow(2).sum().backward()
            outs.append((y.detach(), x.grad.clone(), layer.values.grad.clone()))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)  # deterministic: each thread owns whole rows, no atomics


def test_exactly_one_openmp_runtime_loaded():
    # In a fresh interpreter: other test modules may import libraries that bring their own
    # runtime (scikit-learn ships a libgomp); this checks what torch_nerva and its demo add.
    code = textwrap.dedent("""
        import os, re, torch, torch_nerva as tn
        from torch_nerva import compare
        compare.load_data("digits")
        layer = tn.SparseLinear(64, 64, density=0.5)
        layer(torch.randn(8, 64)).sum().backward()
        libs = {line.split()[-1] for line in open("/proc/self/maps") if ".so" in line}
        runtimes = {os.path.realpath(p) for p in libs
                    if re.search(r"lib(gomp|iomp5|omp)[^/]*[.]so", os.path.basename(p))}
        print(len(runtimes), sorted(runtimes))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, _, names = out.stdout.strip().partition(" ")
    assert count == "1", f"expected one OpenMP runtime, found {names}"
