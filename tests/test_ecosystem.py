"""Fitting the PyTorch ecosystem: interchange formats, accounting, checkpoints and resume,
DDP equivalence, concurrent use from threads, NaN/Inf and empty inputs."""
import copy
import os
import socket
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import torch_nerva as tn
from torch_nerva import dst
from torch_nerva import interchange as ic

from reference import end_process_group


def _layer(seed=0, density=0.2, shape=(30, 20)):
    return tn.SparseLinear(shape[1], shape[0], density=density,
                           generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_torch_sparse_round_trip(fmt):
    layer = _layer()
    w = ic.to_torch_sparse(layer, fmt)
    assert torch.equal(w.to_dense(), layer.dense_weight().detach())
    back = ic.from_torch_sparse(w, layer.bias.detach())
    assert torch.equal(back.crow_indices.long(), layer.crow_indices.long())
    assert torch.equal(back.values, layer.values) and torch.equal(back.bias, layer.bias)
    with pytest.raises(TypeError, match="sparse CSR or COO"):
        ic.from_torch_sparse(torch.zeros(3, 3))


def test_scipy_round_trip_and_bad_input():
    sp = pytest.importorskip("scipy.sparse")
    layer = _layer()
    m = ic.to_scipy(layer)
    assert isinstance(m, sp.csr_matrix)
    np.testing.assert_array_equal(m.toarray(), layer.dense_weight().detach().numpy())
    back = ic.from_scipy(sp.coo_matrix(m), layer.bias.detach())
    x = torch.randn(4, 20)
    torch.testing.assert_close(back(x), layer(x))
    with pytest.raises(TypeError, match="scipy.sparse"):
        ic.from_scipy(np.zeros((2, 2)))


def test_npz_round_trip_size_and_topology_adoption(tmp_path):
    model = tn.sparsify(nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10)), 0.01,
                        generator=torch.Generator().manual_seed(0))
    size = ic.save_npz(model, tmp_path / "m.npz")
    assert size == (tmp_path / "m.npz").stat().st_size == ic.npz_bytes(model)
    nnz = sum(m.nnz for m in model if isinstance(m, tn.SparseLinear))
    # about 8 bytes per nonzero (float32 value + int32 column) plus small arrays and headers
    assert size < 8 * nnz + 4 * (201 + 11) + 4 * 210 + 3000
    other = tn.sparsify(nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10)), 0.01,
                        generator=torch.Generator().manual_seed(1))
    ic.load_npz(other, tmp_path / "m.npz")  # different topology: adopted
    x = torch.randn(5, 300)
    torch.testing.assert_close(other(x), model(x))
    wrong = tn.sparsify(nn.Sequential(nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)), 0.01)
    with pytest.raises(ValueError, match="shape"):
        ic.load_npz(wrong, tmp_path / "m.npz")


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("gz", [False, True])
def test_tsv_round_trip_in_both_orientations(tmp_path, transpose, gz):
    layer = _layer(seed=3, density=0.3)
    path = tmp_path / "w.tsv"
    n = ic.to_tsv(layer, path, transpose=transpose)
    assert n == layer.nnz == len(path.read_text().splitlines())
    if gz:
        import gzip
        gz_path = tmp_path / "w.tsv.gz"
        gz_path.write_bytes(gzip.compress(path.read_bytes()))
        path = gz_path
    shape = (20, 30) if transpose else (30, 20)  # the file's matrix
    back = ic.from_tsv(path, shape, transpose=transpose)
    assert back.bias is None and (back.out_features, back.in_features) == (30, 20)
    assert torch.equal(back.dense_weight(), layer.dense_weight().detach())
    x = torch.randn(4, 20)
    torch.testing.assert_close(back(x), x @ layer.dense_weight().detach().t())
    with pytest.raises(ValueError, match="outside"):
        ic.from_tsv(path, (shape[0] - 1, shape[1]) if transpose else (shape[0], shape[1] - 1),
                    transpose=transpose)


def test_from_layout_checks_and_copies():
    layout = tn.CSRLayout.random(6, 5, 7, generator=torch.Generator().manual_seed(0))
    values = torch.randn(7, dtype=torch.float64)
    layer = tn.SparseLinear.from_layout(layout, values, torch.ones(6, dtype=torch.float64))
    assert layer.values.dtype == torch.float64 and torch.equal(layer.flat_values(), values)
    values.zero_()
    assert layer.values.abs().sum() > 0  # copied, not shared
    assert torch.equal(tn.SparseLinear.from_layout(layout, values, has_bias=True).bias,
                       torch.zeros(6, dtype=torch.float64))
    assert tn.SparseLinear.from_layout(layout, values).bias is None
    with pytest.raises(ValueError, match="values must have shape"):
        tn.SparseLinear.from_layout(layout, torch.randn(6))
    with pytest.raises(ValueError, match="bias must have shape"):
        tn.SparseLinear.from_layout(layout, torch.randn(7), torch.randn(5))


def test_npz_with_values_of_the_wrong_length_is_refused(tmp_path):
    model = nn.Sequential(_layer())
    ic.save_npz(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as data:
        arrays = dict(data)
    arrays["0.values"] = arrays["0.values"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="values has shape"):
        ic.load_npz(model, tmp_path / "bad.npz")


def test_summary_counts():
    model = nn.Sequential(tn.SparseLinear(100, 50, density=0.1), nn.ReLU(),
                          tn.MaskedLinear(50, 10, density=0.5), nn.Linear(10, 2))
    rows = tn.summary(model, requested=0.1)
    sparse, masked, dense, total = rows
    assert sparse["nnz"] == 500 and sparse["infer_flops"] == 1000 and sparse["train_flops"] == 3000
    assert masked["nnz"] == 250 and masked["infer_flops"] == 2 * 500  # computes densely
    assert dense["nnz"] == 20 and total["nnz"] == 770
    assert total["density"] == pytest.approx(770 / (5000 + 500 + 20))
    assert sparse["param_bytes"] == 500 * 4 + 50 * 4 + 51 * 4 + 500 * 4  # values, bias, indices
    assert "requested density 0.1" in ic.format_summary(rows)


def _train_steps(model, opt, sched, steps, gen):
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 24, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        x = nn.functional.dropout(x, 0.1)  # draws from the global RNG: part of the state
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_checkpoint_resume_is_bit_exact(tmp_path):
    def make():
        model = tn.sparsify(nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 5)), 0.2,
                            generator=torch.Generator().manual_seed(0))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, opt, sched

    torch.manual_seed(0)
    model, opt, sched = make()
    gen = torch.Generator().manual_seed(1)
    full = _train_steps(model, opt, sched, 10, gen)

    torch.manual_seed(0)
    model2, opt2, sched2 = make()
    gen2 = torch.Generator().manual_seed(1)
    first = _train_steps(model2, opt2, sched2, 4, gen2)
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(),
                "sched": sched2.state_dict(), "rng": torch.get_rng_state(),
                "gen": gen2.get_state()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model3, opt3, sched3 = make()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    sched3.load_state_dict(ckpt["sched"])
    torch.set_rng_state(ckpt["rng"])
    gen3 = torch.Generator()
    gen3.set_state(ckpt["gen"])
    rest = _train_steps(model3, opt3, sched3, 6, gen3)
    assert torch.equal(torch.cat([first, rest]), full)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)


def test_two_threads_with_different_layers_get_correct_results():
    layers = [_layer(seed=s, shape=(300, 200)) for s in range(2)]
    xs = [torch.randn(64, 200, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    expected = [(x @ m.dense_weight().t() + m.bias).detach() for m, x in zip(layers, xs)]
    errors = []

    def work(i):
        try:
            for _ in range(30):
                x = xs[i].clone().requires_grad_()
                y = layers[i](x)
                torch.testing.assert_close(y.detach(), expected[i])
                y.sum().backward()
                torch.testing.assert_close(x.grad, layers[i].dense_weight().detach().sum(0)
                                           .expand_as(x))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_the_dense_reference(bad):
    layer = _layer(shape=(6, 5), density=1.0)
    x = torch.randn(3, 5)
    x[1, 2] = bad
    y = layer(x)
    ref = x @ layer.dense_weight().t() + layer.bias
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert torch.isfinite(y[[0, 2]]).all()


def test_empty_batches():
    layer = _layer()
    for shape in ((0, 20), (2, 0, 20)):
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        assert y.shape == (*shape[:-1], 30)
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.all(layer.values.grad == 0)
        layer.zero_grad()


def _ddp_worker(rank, world, port, result, backend="gloo"):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = _ddp_model(seed=rank).to(device)  # each rank draws another topology...
    changed = dst.broadcast_topology(model)  # ...and takes rank 0's
    assert changed == (0 if rank == 0 else 2)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        x, y = (t.to(device) for t in _ddp_batch(step))
        half = x.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        loss = nn.functional.cross_entropy(ddp(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        result.put([p.detach().cpu().numpy().copy() for p in model.parameters()])  # by value
    del ddp
    end_process_group()


def _ddp_model(seed=0):
    return tn.sparsify(nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 5)), 0.2,
                       generator=torch.Generator().manual_seed(seed))


def _ddp_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 24, generator=g), torch.randint(0, 5, (16,), generator=g)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_ddp_matches_single_process_training_on_the_whole_batch(backend):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    if backend == "nccl" and not (torch.distributed.is_nccl_available()
                                  and torch.cuda.device_count() >= 2):
        pytest.skip("nccl needs two CUDA devices")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, result, backend), nprocs=2,
                       start_method="spawn")
    ddp_params = result.get()
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        x, y = _ddp_batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(model.parameters(), ddp_params):
        torch.testing.assert_close(a.detach(), torch.from_numpy(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiles_training_and_inference_like_eager():
    # about a minute on 2 cores (inductor generates and compiles C++); aot_eager is covered in
    # test_modules.py
    torch._dynamo.reset()
    model = tn.sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 0.3,
                        generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    x = torch.randn(5, 12)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x)
    out.pow(2).sum().backward()
    ref = twin(x)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x))


def test_torch_export_with_a_dynamic_batch_round_trips_through_save_and_load(tmp_path):
    model = tn.sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), 0.3,
                        generator=torch.Generator().manual_seed(0)).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(4, 20),),
                             dynamic_shapes={"input": {0: batch}})
    assert "torch_nerva.sparse_linear" in ep.graph_module.code
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    for n in (1, 7, 100):
        x = torch.randn(n, 20)
        torch.testing.assert_close(loaded(x), model(x))
