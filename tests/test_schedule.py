"""The kernels' chunk scheduler (csrc/cpu/pool.h): every chunk runs exactly once, on at most
torch's thread count; results are bit-identical for every thread count (1 = the serial order);
malformed layouts report the same first bad index; concurrent ops from several Python threads
and ops after fork() stay correct. No timing assertions (see docs/scheduling.md for timings)."""
import multiprocessing
import threading
import time

import pytest
import torch

import torch_nerva as tn

THREADS = (1, 2, 3, 4)
ops = torch.ops.torch_nerva


@pytest.fixture(params=["pool", "openmp"], autouse=True)
def scheduler(request):
    """Every test runs with both schedulers of csrc/cpu/pool.h."""
    old = ops._scheduler("")
    ops._scheduler(request.param)
    yield request.param
    ops._scheduler(old)


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n_chunks", [0, 1, 2, 7, 64, 1000])
def test_every_chunk_runs_exactly_once(n_chunks, n_threads):
    for spin_us in (0, 20):
        counts, who = ops._schedule_probe(n_chunks, n_threads, spin_us)
        assert counts.shape == (n_chunks,)
        assert torch.equal(counts, torch.ones(n_chunks, dtype=torch.long))
        assert (who >= 0).all()
        assert len(set(who.tolist())) <= n_threads  # the caller plus n_threads - 1 helpers


def test_probe_checks_its_arguments():
    with pytest.raises(RuntimeError, match="n_threads >= 1"):
        ops._schedule_probe(4, 0, 0)
    with pytest.raises(RuntimeError, match="expected \"pool\""):
        ops._scheduler("threads")


def test_scheduler_default_follows_the_openmp_wait_policy():
    import os
    import subprocess
    import sys
    code = "import torch, torch_nerva; print(torch.ops.torch_nerva._scheduler(''))"
    for env, expected in (({"OMP_WAIT_POLICY": "PASSIVE"}, "pool"), ({}, "openmp"),
                          ({"TORCH_NERVA_SCHEDULER": "pool"}, "pool"),
                          ({"OMP_WAIT_POLICY": "passive", "TORCH_NERVA_SCHEDULER": "openmp"},
                           "openmp")):
        full = {k: v for k, v in os.environ.items()
                if k not in ("OMP_WAIT_POLICY", "TORCH_NERVA_SCHEDULER")}
        full.update(env)
        out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == expected, (env, out.stdout)


@pytest.fixture
def guard():
    """The openmp scheduler's stall guard, on and with no past stalls; restored afterwards."""
    was_on = ops._stall_guard("reset", 0)[0] == 1.0
    ops._stall_guard("on")
    yield
    ops._stall_guard("reset", 0)
    ops._stall_guard("on" if was_on else "off")


def test_stall_guard_runs_serially_after_a_late_helper_then_probes_again(scheduler, guard):
    """A helper that starts 3 ms late makes the caller wait at the region's end; the guard
    sees it and runs the next phases on the calling thread only (nobody to wait for), with
    every chunk still run exactly once; "reset" lets the next phase use the helpers again."""
    if scheduler != "openmp":
        pytest.skip("the guard belongs to the openmp scheduler (the pool never waits for a "
                    "helper that has not started)")
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    assert ops._stall_guard() == [1.0, 0.0, 0.0, 0.0]
    for attempt in range(5):  # a machine so slow that 20 ms pass between two calls retries
        ops._stall_guard("reset", 3000)
        counts, who = ops._schedule_probe(64, 2, 0)
        assert torch.equal(counts, torch.ones(64, dtype=torch.long))
        on, left, backoff, stalls = ops._stall_guard("", 0)
        assert stalls == 1.0 and backoff == pytest.approx(0.02) and left <= 0.02
        counts, who = ops._schedule_probe(64, 2, 0)  # within the backoff: the caller alone
        assert torch.equal(counts, torch.ones(64, dtype=torch.long))
        if ops._stall_guard()[1] > 0.0:  # still within it after the probe
            assert set(who.tolist()) == {0}
            break
    else:
        pytest.fail("the guard never ran a phase serially after a stall")
    ops._stall_guard("reset")
    assert ops._stall_guard() == [1.0, 0.0, 0.0, 0.0]
    seen = set()
    for _ in range(20):  # a helper joins again (OpenMP may give it nothing in one region)
        counts, who = ops._schedule_probe(64, 2, 50)
        assert torch.equal(counts, torch.ones(64, dtype=torch.long))
        seen |= set(who.tolist())
        if len(seen) > 1:
            break
    assert seen == {0, 1}


def test_stall_guard_backoff_doubles_and_off_forgets(scheduler, guard):
    if scheduler != "openmp":
        pytest.skip("openmp scheduler only")
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    ops._stall_guard("", 2000)
    backoffs = []
    for _ in range(3):
        ops._schedule_probe(8, 2, 0)
        backoffs.append(ops._stall_guard()[2])
        # let the serial period pass so the next phase probes (and stalls) again
        time.sleep(backoffs[-1] + 0.002)
    assert backoffs == pytest.approx([0.02, 0.04, 0.08])
    assert ops._stall_guard("off", 0)[:3] == [0.0, 0.0, 0.0]
    ops._stall_guard("", 2000)
    ops._schedule_probe(8, 2, 0)  # off: a stall is not counted and changes nothing
    assert ops._stall_guard("", 0)[1:3] == [0.0, 0.0]


def test_stall_guard_checks_its_arguments():
    with pytest.raises(RuntimeError, match="expected \"\", \"on\""):
        ops._stall_guard("sometimes")
    with pytest.raises(RuntimeError, match="helper_delay_us must be >= -1"):
        ops._stall_guard("", -5)


@pytest.mark.parametrize("delay_us", [0, 1500])
def test_layer_bit_identical_with_a_late_helper(restore_threads, guard, delay_us):
    """Serial phases chosen by the guard and parallel phases give the same bits."""
    torch.manual_seed(1)
    layer = tn.SparseLinear(900, 400, density=0.05)
    x = torch.randn(200, 900)
    gy = torch.randn(200, 400)

    def run():
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xi)
        y.backward(gy)
        return y.detach(), xi.grad, layer.values.grad.clone()

    torch.set_num_threads(1)
    serial = run()
    torch.set_num_threads(2)
    ops._stall_guard("", delay_us)
    for _ in range(3):
        assert_all_identical([serial, run()])


def random_layout(n_out, n_in, density, empty_rows, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g) < density
    mask[empty_rows] = False
    w = torch.randn(n_out, n_in, generator=g) * mask
    return w.to_sparse_csr()


def thread_sweep(fn):
    """fn() for each thread count; returns the list of results."""
    out = []
    for n in THREADS:
        torch.set_num_threads(n)
        out.append(fn())
    return out


def assert_all_identical(results):
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), "results depend on the thread count"


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layer_bit_identical_across_thread_counts(restore_threads, density, dtype):
    torch.manual_seed(0)
    layer = tn.SparseLinear(700, 300, density=density, dtype=dtype)
    if density > 0:  # empty rows and columns in the middle of the layout
        dense = torch.nn.Linear(700, 300, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.to_dense())
            dense.weight[100:140] = 0
            dense.weight[:, 10:50] = 0
        layer = tn.SparseLinear.from_dense(dense)
    x = torch.randn(130, 700, dtype=dtype)
    gy = torch.randn(130, 300, dtype=dtype)

    def run():
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xi)
        y.backward(gy)
        vg = layer.values.grad
        return y.detach(), xi.grad, (vg if vg is not None else torch.zeros(0))

    results = thread_sweep(run)
    assert_all_identical(results)
    if dtype == torch.float64:  # and right: the dense reference
        xr = x.clone().requires_grad_()
        ref = torch.nn.functional.linear(xr, layer.to_dense().detach(), layer.bias.detach())
        ref.backward(gy)
        torch.testing.assert_close(results[0][0], ref.detach())
        torch.testing.assert_close(results[0][1], xr.grad)


@pytest.mark.parametrize("batch", [1, 3, 64, 257])
def test_raw_ops_bit_identical_across_thread_counts(restore_threads, batch):
    w = random_layout(900, 500, 0.05, slice(200, 260), seed=batch)
    crow, col, vals = w.crow_indices(), w.col_indices(), w.values()
    x = torch.randn(batch, 500)
    g = torch.randn(batch, 900)
    pad = 16 if batch >= 16 else batch
    xt = torch.zeros(500, (batch + pad - 1) // pad * pad)
    xt[:, :batch] = x.t()

    def run():
        return (ops.csr_spmm(x, vals, crow, col, None, None),
                ops.csr_sddmm(g, x, crow, col),
                ops.csr_spmm_fm(xt, vals, crow, col, None, 0.0, 1.0))

    results = thread_sweep(run)
    assert_all_identical(results)
    torch.testing.assert_close(results[0][0], x @ w.to_dense().t(), rtol=1e-4, atol=1e-4)


def test_chain_bit_identical_across_thread_counts(restore_threads):
    layers = [random_layout(256, 256, 0.05, slice(0, 10), seed=s) for s in range(4)]
    y0 = torch.rand(300, 256) * (torch.rand(300, 256) < 0.3)
    args = ([w.values() for w in layers], [w.crow_indices() for w in layers],
            [w.col_indices() for w in layers])

    def run():
        return (ops.sparse_chain(y0, *args, -0.1, 0.0, 32.0, 8, True),
                ops.sparse_chain(y0, *args, -0.1, 0.0, 32.0, 8, False))

    results = thread_sweep(run)
    assert_all_identical(results)
    y = y0
    for w in layers:  # dense reference of the chain
        y = (y @ w.to_dense().t() - 0.1).clamp(0, 32)
    assert torch.equal(results[0][0], y.ne(0).any(1))


def malformed(kind):
    w = random_layout(2000, 300, 0.05, slice(0, 0), seed=7)
    crow, col = w.crow_indices().clone(), w.col_indices().clone()
    if kind == "col":  # two bad columns: the first in row order must be reported
        col[int(crow[1500])] = 300
        col[int(crow[400]) + 1] = -1
        first = int(crow[400]) + 1
    else:  # a decreasing row pointer in two places
        crow[1600] = crow[1602] + 1
        crow[700] = crow[702] + 1
        first = 700  # row 700 spans [crow[702] + 1, crow[701])
    return w.values(), crow, col, first


@pytest.mark.parametrize("kind", ["col", "row"])
def test_malformed_layout_reports_first_bad_index_for_every_thread_count(restore_threads, kind):
    vals, crow, col, first = malformed(kind)
    x = torch.randn(64, 300)
    messages = []
    for n in THREADS:
        torch.set_num_threads(n)
        with pytest.raises(RuntimeError) as info:
            ops.csr_spmm(x, vals, crow, col, None, None)
        messages.append(str(info.value).splitlines()[0])
    assert len(set(messages)) == 1, messages
    if kind == "col":
        assert f"position {first}:" in messages[0]
    else:
        assert f"row {first} spans" in messages[0]


def test_concurrent_calls_from_four_python_threads(restore_threads):
    torch.set_num_threads(2)
    torch.manual_seed(1)
    layers = [tn.SparseLinear(600, 400, density=0.05) for _ in range(4)]
    xs = [torch.randn(97, 600) for _ in range(4)]

    def step(i):
        x = xs[i].clone().requires_grad_()
        layers[i].zero_grad()
        y = layers[i](x)
        y.square().sum().backward()
        return y.detach(), x.grad, layers[i].values.grad.clone()

    expected = [step(i) for i in range(4)]
    failures = []

    def worker(i):
        try:
            for _ in range(15):
                got = step(i)
                if not all(torch.equal(a, b) for a, b in zip(expected[i], got)):
                    failures.append(i)
                ops._schedule_probe(50, 2, 0)  # the pool itself, interleaved with the layers
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish"
    assert not failures, failures


def _child_forward(layer, x, queue):
    queue.put(layer(x).detach().numpy().tobytes())  # plain bytes: no shared-memory handle


def test_ops_after_fork_use_a_fresh_pool(restore_threads, scheduler):
    if scheduler == "openmp":
        pytest.skip("libgomp's team is not fork-safe once started (the child hangs); the pool is")
    # DataLoader workers are forked from a process whose pool helpers do not exist in the child
    # (the OpenMP schedule of the previous build hung here in the child).
    torch.set_num_threads(2)
    layer = tn.SparseLinear(800, 400, density=0.05)
    x = torch.randn(128, 800)
    with torch.no_grad():
        expected = layer(x)  # the parent's pool is started
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with torch.no_grad():
        proc = ctx.Process(target=_child_forward, args=(layer, x, queue))
        proc.start()
        got = torch.frombuffer(bytearray(queue.get(timeout=120)), dtype=torch.float32)
        proc.join(timeout=60)
    assert proc.exitcode == 0
    assert torch.equal(got.view_as(expected), expected)
