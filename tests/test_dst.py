"""Dynamic sparse training: SET and RigL updates on SparseLinear and their masked twins."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_nerva as tn
from torch_nerva import dst

from reference import end_process_group


def _model(seed=0, density=0.1):
    dense = nn.Sequential(nn.Linear(40, 96), nn.ReLU(), nn.Linear(96, 7))
    return tn.sparsify(dense, density, generator=torch.Generator().manual_seed(seed))


def _sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, tn.SparseLinear)]


def _masked_layers(model):
    return [m for m in model.modules() if isinstance(m, tn.MaskedLinear)]


def _step(model, opt, x, y):
    """One training step (forward, zero_grad, backward, optimizer step); returns the loss."""
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _data(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 7, (n,), generator=g)


@pytest.mark.parametrize("drop,grow", [("magnitude", "random"), ("set", "random"),
                                       ("magnitude", "gradient"), ("threshold", "random")])
def test_nnz_is_exact_and_layout_valid_after_many_updates(drop, grow):
    model = _model()
    before = [m.nnz for m in _sparse_layers(model)]
    gen = torch.Generator().manual_seed(1)
    for i in range(8):
        kw = dict(batch=_data(i), loss_fn=nn.functional.cross_entropy) if grow == "gradient" \
            else {}
        if drop == "threshold":
            kw["threshold"] = 0.05
        dst.prune_and_regrow(model, drop_fraction=0.4, drop=drop, grow=grow, generator=gen, **kw)
        for layer, nnz in zip(_sparse_layers(model), before):
            assert layer.nnz == nnz and layer.values.shape == (1, nnz)
            tn.CSRLayout.from_tensors(layer.crow_indices, layer.col_indices,
                                      (layer.out_features, layer.in_features))  # validates
            x = torch.randn(3, layer.in_features)
            torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias)
            x.requires_grad_()
            layer(x).sum().backward()  # the cached transpose matches the new layout
            torch.testing.assert_close(x.grad, layer.dense_weight().sum(0).expand(3, -1))


def test_drop_criteria_pick_the_documented_connections():
    v = torch.tensor([0.5, -0.1, 0.05, -0.9, 0.2, -0.02, 1.0, -0.3])
    assert sorted(dst._drop(v, 3, "magnitude", None).tolist()) == [1, 2, 5]
    # SET: smallest positive and largest negative (closest to zero), same fraction of each sign
    assert sorted(dst._drop(v, 4, "set", None).tolist()) == [1, 2, 4, 5]
    assert sorted(dst._drop(v, 0, "threshold", 0.15).tolist()) == [1, 2, 5]


def test_gradient_growth_picks_the_largest_dense_gradients():
    layer = tn.SparseLinear(30, 20, density=0.2, generator=torch.Generator().manual_seed(0))
    x, dy = torch.randn(16, 30), torch.randn(16, 20)
    score = (dy.t() @ x).abs()
    score[layer.mask] = -1
    expected = torch.topk(score.flatten(), 10).indices.sort().values
    kept = layer.layout.positions()
    old = dst.SCORE_BLOCK
    try:
        dst.SCORE_BLOCK = 64  # several blocks of rows
        got = dst._grow_gradient(kept, 10, (20, 30), x, dy)
    finally:
        dst.SCORE_BLOCK = old
    assert torch.equal(got, expected)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2),
], ids=["sgd_nesterov", "adam"])
@pytest.mark.parametrize("drop,grow", [("magnitude", "random"), ("set", "random"),
                                       ("magnitude", "gradient"), ("magnitude", "momentum")])
def test_masked_and_csr_twins_stay_identical_step_by_step(make_opt, drop, grow):
    sparse = _model(seed=3)
    masked = tn.to_masked(sparse)
    opts = [make_opt(sparse.parameters()), make_opt(masked.parameters())]
    values_ids = [id(m.values) for m in _sparse_layers(sparse)]
    scheds = [dst.DynamicSparsity(m, o, drop_fraction=0.3, drop=drop, grow=grow, update_every=3,
                                  anneal="constant", seed=7, loss_fn=nn.functional.cross_entropy,
                                  momentum_window=2)
              for m, o in zip((sparse, masked), opts)]
    for step in range(20):
        x, y = _data(100 + step)
        losses = []
        for model, opt, sched in zip((sparse, masked), opts, scheds):
            losses.append(_step(model, opt, x, y))
            sched.step(batch=(x, y))
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for s, m in zip(_sparse_layers(sparse), _masked_layers(masked)):
            assert torch.equal(s.mask, m.mask)
            torch.testing.assert_close(s.dense_weight(), m.weight * m.mask, rtol=1e-5, atol=1e-6)
    assert scheds[0].updates == 6
    # the Parameter objects survived every update: the optimizer still holds them
    assert [id(m.values) for m in _sparse_layers(sparse)] == values_ids
    assert [id(p) for p in opts[0].param_groups[0]["params"]] == [
        id(p) for p in sparse.parameters()]


def test_optimizer_state_is_remapped_and_new_connections_start_at_zero():
    layer = tn.SparseLinear(20, 10, density=0.3, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(4, 20)).sum().backward()
    opt.step()
    old_pos = layer.layout.positions()
    old_mom = opt.state[layer.values]["momentum_buffer"].clone()
    old_val = layer.values.detach().clone()
    counts = dst.update_layer(layer, opt, drop_fraction=0.5,
                              generator=torch.Generator().manual_seed(1))
    new_pos = layer.layout.positions()
    mom = opt.state[layer.values]["momentum_buffer"]
    assert mom.shape == layer.values.shape
    for i, p in enumerate(new_pos.tolist()):
        j = (old_pos == p).nonzero().flatten()
        if j.numel() and not dst._in(torch.tensor([p]), new_pos[mom.view(-1) == 0]).item():
            assert mom.view(-1)[i] == old_mom.view(-1)[j[0]] and layer.flat_values()[i] == old_val.view(-1)[j[0]]
    assert int((layer.values == 0).sum()) >= counts["grown"]


class _MaxAlloc(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grow", ["random", "gradient", "momentum"])
def test_an_update_allocates_nothing_of_the_dense_size(grow):
    out_f, in_f = 1500, 2000
    model = nn.Sequential(tn.SparseLinear(in_f, out_f, density=0.01,
                                          generator=torch.Generator().manual_seed(0)))
    batch = (torch.randn(64, in_f), torch.randint(0, out_f, (64,)))
    kw = {}
    if grow == "gradient":
        kw = dict(batch=batch, loss_fn=nn.functional.cross_entropy)
    if grow == "momentum":
        rec = dst.GradientMomentum(model, window=3).start()
        for _ in range(4):
            nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
            rec.next_step()
        kw = dict(momentum=rec)
    probe = _MaxAlloc()
    with probe:
        dst.prune_and_regrow(model, drop_fraction=0.3, grow=grow,
                             generator=torch.Generator().manual_seed(0), **kw)
    assert probe.largest < out_f * in_f // 2, probe.largest


def test_scheduler_timing_annealing_and_determinism():
    fractions = []
    for _ in range(2):
        model = _model()
        sched = dst.DynamicSparsity(model, drop_fraction=0.4, update_every=5, begin=5, end=30,
                                    anneal="cosine", seed=11)
        updated = [s for s in range(1, 40) if sched.step() is not None]
        assert updated == [5, 10, 15, 20, 25]
        fractions.append([h["fraction"] for h in sched.history])
        masks = [m.mask for m in _sparse_layers(model)]
    assert fractions[0] == fractions[1] and fractions[0][0] == pytest.approx(0.4)
    assert all(a > b for a, b in zip(fractions[0], fractions[0][1:]))
    again = _model()
    sched = dst.DynamicSparsity(again, drop_fraction=0.4, update_every=5, begin=5, end=30,
                                anneal="cosine", seed=11)
    for _ in range(39):
        sched.step()
    assert all(torch.equal(a, m.mask) for a, m in zip(masks, _sparse_layers(again)))


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="drop must be"):
        dst.prune_and_regrow(model, drop_fraction=0.1, drop="random")
    with pytest.raises(ValueError, match="drop_fraction"):
        dst.prune_and_regrow(model, drop_fraction=1.5)
    with pytest.raises(ValueError, match="needs batch"):
        dst.prune_and_regrow(model, drop_fraction=0.1, grow="gradient")
    with pytest.raises(ValueError, match="needs end"):
        dst.DynamicSparsity(model, anneal="cosine")


def _ddp_worker(rank, world, port, result, grow="gradient"):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model(seed=0)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    # different seeds per rank on purpose: rank 0's decisions must win everywhere
    sched = dst.DynamicSparsity(model, opt, drop_fraction=0.3, grow=grow, update_every=2,
                                anneal="constant", seed=rank, momentum_window=2,
                                loss_fn=nn.functional.cross_entropy)
    for step in range(8):
        x, y = _data(1000 * rank + step)  # different data on every rank
        _step(ddp, opt, x, y)
        sched.step(batch=(x, y))
    layouts = [torch.cat([m.crow_indices.long(), m.col_indices.long()])
               for m in _sparse_layers(model)]
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in layouts]
    for t, g in zip(layouts, gathered):
        torch.distributed.all_gather(g, t)
    values = [m.values.detach() for m in _sparse_layers(model)]
    gv = [[torch.empty_like(v) for _ in range(world)] for v in values]
    for v, g in zip(values, gv):
        torch.distributed.all_gather(g, v)
    if rank == 0:
        result.put([all(torch.equal(g[0], g[i]) for i in range(world)) for g in gathered + gv])
    del ddp
    end_process_group()


@pytest.mark.parametrize("grow", ["gradient", "momentum"])
def test_two_rank_ddp_layouts_stay_identical(grow):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, result, grow), nprocs=2,
                       start_method="spawn")
    assert all(result.get())


def test_global_allocation_drops_the_smallest_weights_across_layers():
    model = _model(seed=5)
    layers = _sparse_layers(model)
    with torch.no_grad():
        layers[1].values.mul_(0.001)  # the second layer's weights are all tiny
    before = [m.nnz for m in layers]
    masks = [m.mask for m in layers]
    total = sum(before)
    counts = dst.prune_and_regrow(model, drop_fraction=0.1, allocation="global",
                                  generator=torch.Generator().manual_seed(0))
    dropped = [c["dropped"] for c in counts.values()]
    assert sum(dropped) == round(0.1 * total)
    assert dropped[0] == 0 and dropped[1] == round(0.1 * total)  # all from the tiny layer
    assert [m.nnz for m in layers] == before
    assert torch.equal(layers[0].mask, masks[0]) and not torch.equal(layers[1].mask, masks[1])
    with pytest.raises(ValueError, match="drop='magnitude'"):
        dst.prune_and_regrow(model, drop_fraction=0.1, drop="set", allocation="global")


def test_select_matches_a_stable_sort_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 100, 1000):
        keys = torch.randint(0, 5, (n,), generator=g).double()  # many ties
        for k in (0, 1, n // 3, n):
            for largest in (False, True):
                ref = torch.sort(-keys if largest else keys, stable=True).indices[:k].sort().values
                assert torch.equal(dst._select(keys, k, largest), ref)
    keys = torch.tensor([0.3, float("nan"), 0.1, 0.2])
    assert dst._select(keys, 3, largest=False).tolist() == [0, 2, 3]


def test_momentum_growth_scores_the_truncated_momentum_of_the_dense_gradient():
    torch.manual_seed(0)
    model = _model(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    beta, window = 0.8, 3
    rec = dst.GradientMomentum(model, beta=beta, window=window).start()
    dense_grads = []
    for step in range(5):
        x, y = _data(50 + step)
        # the dense gradient at the same weights, from a dense copy of the model
        ref = nn.Sequential(nn.Linear(40, 96), nn.ReLU(), nn.Linear(96, 7))
        with torch.no_grad():
            for d, s in zip((ref[0], ref[2]), _sparse_layers(model)):
                d.weight.copy_(s.dense_weight())
                d.bias.copy_(s.bias)
        nn.functional.cross_entropy(ref(x), y).backward()
        dense_grads.append([ref[0].weight.grad, ref[2].weight.grad])
        _step(model, opt, x, y)
        with torch.no_grad():
            model(x)  # an evaluation forward: not recorded
        rec.next_step()
    assert rec.steps_recorded() == window
    for i, layer in enumerate(_sparse_layers(model)):
        m = sum(beta ** (4 - t) * dense_grads[t][i] for t in range(5 - window, 5))
        x, dy = rec.inputs_for(layer)
        torch.testing.assert_close(dy.t() @ x, m, rtol=1e-4, atol=1e-6)
        score = m.abs()
        score[layer.mask] = -1
        k = layer.nnz // 4
        expected = torch.topk(score.flatten(), k).indices.sort().values
        assert torch.equal(dst._grow_gradient(layer.layout.positions(), k, score.shape, x, dy),
                           expected)
    rec.stop()
    model(_data(0)[0]).sum().backward()
    assert rec.steps_recorded() == window  # stopped: nothing more recorded


def test_momentum_schedule_records_only_the_window_before_each_update():
    model = _model(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = dst.DynamicSparsity(model, opt, drop_fraction=0.3, grow="momentum", update_every=10,
                                end=35, anneal="constant", momentum=0.9, momentum_window=4)
    recording = []
    for step in range(1, 41):
        recording.append(sched.recorder.recording)
        x, y = _data(step)
        _step(model, opt, x, y)
        if sched.step() is not None:
            assert step in (10, 20, 30)
    assert [s for s, r in zip(range(1, 41), recording) if r] == [
        7, 8, 9, 10, 17, 18, 19, 20, 27, 28, 29, 30]
    assert sched.updates == 3 and not sched.recorder.recording
    with pytest.raises(ValueError, match="no training step was recorded"):
        dst.prune_and_regrow(model, drop_fraction=0.1, grow="momentum",
                             momentum=dst.GradientMomentum(model))
    with pytest.raises(ValueError, match="needs momentum="):
        dst.prune_and_regrow(model, drop_fraction=0.1, grow="momentum")


@pytest.mark.parametrize("grow", ["random", "gradient", "momentum"])
def test_checkpoint_mid_training_resumes_bit_exactly(tmp_path, grow):
    def make():
        model = _model(seed=6)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = dst.DynamicSparsity(model, opt, drop_fraction=0.3, grow=grow, update_every=4,
                                    end=40, seed=3, loss_fn=nn.functional.cross_entropy,
                                    momentum_window=3)
        return model, opt, sched

    def train(model, opt, sched, steps):
        for step in steps:
            x, y = _data(200 + step)
            _step(model, opt, x, y)
            sched.step(batch=(x, y))

    ref = make()
    train(*ref, range(18))
    first = make()
    train(*first, range(10))  # step 10 is inside momentum's recording window of update 12
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                "dst": first[2].state_dict()}, tmp_path / "ckpt.pt")
    resumed = make()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed[0].load_state_dict(ckpt["model"])
    resumed[1].load_state_dict(ckpt["opt"])
    resumed[2].load_state_dict(ckpt["dst"])
    train(*resumed, range(10, 18))
    assert resumed[2].updates == ref[2].updates == 4
    for a, b in zip(_sparse_layers(ref[0]), _sparse_layers(resumed[0])):
        assert torch.equal(a.col_indices, b.col_indices) and torch.equal(a.values, b.values)


def test_a_compiled_model_follows_topology_updates_without_recompiling():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager, compiled_model = _model(seed=8), _model(seed=8)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            for m in (eager, compiled_model)]
    scheds = [dst.DynamicSparsity(m, o, drop_fraction=0.3, update_every=3, anneal="constant",
                                  seed=1) for m, o in zip((eager, compiled_model), opts)]
    for step in range(10):
        x, y = _data(300 + step)
        losses = []
        for f, opt, sched in zip((eager, compiled), opts, scheds):
            losses.append(_step(f, opt, x, y))
            sched.step()
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert scheds[1].updates == 3
    assert counters["stats"]["unique_graphs"] == 1  # nnz is constant: no recompilation
