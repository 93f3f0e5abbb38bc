"""Unit tests for course_lib.parallel: real multi-process runs (gloo, 2 ranks, started by
course_lib.launch.run_workers) checked against the same computation in one process, with stated
tolerances (float64 unless said). The launching itself is tested in test_launch.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from course_lib import parallel
from course_lib.launch import run_workers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _full_batch_grads():
    model = _model()
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


def _dp_rank(rank, world, averager):
    model = _model()
    x, y = _data()
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    nn.functional.cross_entropy(model(x[part]), y[part]).backward()
    averager(model)
    return [p.grad for p in model.parameters()]


def test_average_gradients_equals_full_batch_gradient() -> None:
    want = _full_batch_grads()
    for got in run_workers(_dp_rank, 2, args=(parallel.average_gradients,)):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_average_gradients_has_teeth() -> None:
    """Summing without dividing by the world size doubles the gradients: the test above sees it."""
    def summed(model):
        for p in model.parameters():
            dist.all_reduce(p.grad)

    got = run_workers(_dp_rank, 2, args=(summed,))[0]
    torch.testing.assert_close(got[0], 2 * _full_batch_grads()[0], rtol=1e-12, atol=1e-14)


def test_tp_shard_conventions() -> None:
    w = torch.arange(24.0).reshape(4, 6)
    b = torch.arange(4.0)
    w0, b0 = parallel.tp_shard(w, b, 0, 2, "column")
    w1, b1 = parallel.tp_shard(w, b, 1, 2, "column")
    assert torch.equal(torch.cat([w0, w1]), w) and torch.equal(torch.cat([b0, b1]), b)
    r0, rb0 = parallel.tp_shard(w, b, 0, 3, "row")
    assert torch.equal(r0, w[:, :2]) and torch.equal(rb0, b)
    r2, _ = parallel.tp_shard(w, b, 2, 3, "row")
    assert torch.equal(r2, w[:, 4:])
    r0[0, 0] = 100.0
    assert w[0, 0] == 0  # a copy
    assert parallel.tp_shard(w, None, 0, 2, "row")[1] is None
    with pytest.raises(ValueError):
        parallel.tp_shard(w, b, 0, 4, "row")  # 6 columns into 4
    with pytest.raises(ValueError):
        parallel.tp_shard(w, b, 0, 2, "diagonal")


def _tp_rank(rank, world):
    torch.manual_seed(0)
    fc, proj = nn.Linear(6, 16).double(), nn.Linear(16, 5).double()
    x = torch.randn(7, 6, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out, shards = parallel.tensor_parallel_mlp(x, fc, proj, rank, world)
    (out ** 2).sum().backward()
    return out.detach(), x.grad, [s.grad for s in shards]


@pytest.mark.parametrize("world", [1, 2])
def test_tensor_parallel_mlp_matches_unsplit(world: int) -> None:
    torch.manual_seed(0)
    fc, proj = nn.Linear(6, 16).double(), nn.Linear(16, 5).double()
    x = torch.randn(7, 6, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = proj(nn.functional.gelu(fc(x)))
    (out ** 2).sum().backward()
    results = run_workers(_tp_rank, world)
    k1, k2 = 16 // world, 16 // world
    for rank, (got, x_grad, grads) in enumerate(results):
        torch.testing.assert_close(got, out.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_grad, x.grad, rtol=1e-12, atol=1e-12)
        rows = slice(rank * k1, (rank + 1) * k1)
        torch.testing.assert_close(grads[0], fc.weight.grad[rows])
        torch.testing.assert_close(grads[1], fc.bias.grad[rows])
        torch.testing.assert_close(grads[2], proj.weight.grad[:, rank * k2:(rank + 1) * k2])
        torch.testing.assert_close(grads[3], proj.bias.grad)  # the replicated bias: full gradient


def _pipe_rank(rank, world, n_micro):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4) for _ in range(4)]
    per = len(layers) // world
    stage = nn.Sequential(*[m for pair in zip(layers[rank * per:(rank + 1) * per],
                                              [nn.Tanh()] * per, strict=True) for m in pair])
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    loss = parallel.gpipe_step(stage, x.chunk(n_micro), y.chunk(n_micro), nn.functional.mse_loss,
                               (8 // n_micro, 4), n_micro)
    return loss, [p.grad for p in stage.parameters()]


@pytest.mark.parametrize("n_micro", [1, 4])
def test_gpipe_matches_one_process(n_micro: int) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4) for _ in range(4)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())])
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    want = [p.grad for p in model.parameters()]
    results = run_workers(_pipe_rank, 2, args=(n_micro,))
    assert results[0][0] is None
    assert results[1][0] == pytest.approx(loss.item(), rel=1e-5)
    got = results[0][1] + results[1][1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gpipe_schedule_and_bubble() -> None:
    table = parallel.gpipe_schedule(2, 3)
    assert table[0] == ["F0", "F1", "F2", None, None, "B2", "B1", "B0"]
    assert table[1] == [None, "F0", "F1", "F2", "B2", "B1", "B0", None]
    for p, m in [(2, 3), (4, 8), (1, 5)]:
        t = parallel.gpipe_schedule(p, m)
        idle = sum(cell is None for row in t for cell in row) / (len(t) * len(t[0]))
        assert idle == pytest.approx(parallel.pipeline_bubble_fraction(p, m))
    assert parallel.pipeline_bubble_fraction(4, 12) == pytest.approx(3 / 15)


class _Tokens:
    def get_batch(self, split, batch_size, block_size, generator=None, device="cpu"):
        x = torch.randint(0, 50, (batch_size, block_size), generator=generator)
        return x, x + 1


def test_rank_sliced_batches_cover_the_single_process_batch() -> None:
    single = parallel.RankSlicedBatches(_Tokens(), 0, 1, seed=3)
    ranks = [parallel.RankSlicedBatches(_Tokens(), r, 2, seed=3) for r in range(2)]
    for _ in range(3):
        for split in ("train", "val"):
            whole, _ = single.get_batch(split, 8, 5)
            parts = [r.get_batch(split, 4, 5)[0] for r in ranks]
            assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(single.get_batch("train", 8, 5)[0], single.get_batch("train", 8, 5)[0])


def test_human_bytes() -> None:
    assert parallel.human_bytes(999) == "999 B"
    assert parallel.human_bytes(1.5e9) == "1.5 GB"
    assert parallel.bytes_of([torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2)]) == 14
