"""Gradient statistics under real 2-process gloo DDP on loopback.

Each test spawns one group (``tests/_dist.py``) and compares what every rank
measured with the same numbers computed in this process with gradient
accumulation: n workers x m micro-batches must equal 1 process x n*m
micro-batches (methods.md: n counts both).
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import WorkerGroup
from largebatch.stats import GradientStatistics

pytestmark = pytest.mark.distributed

WORLD = 2
DIM_IN, DIM_OUT = 6, 3
HAVE_PER_EXAMPLE = importlib.util.find_spec("largebatch.stats.per_example") is not None


class _Net(nn.Module):
    """Small MLP; ``unused`` is a layer that never receives a gradient."""

    def __init__(self, with_unused: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM_IN, 8), nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, DIM_OUT)
        self.unused = nn.Linear(4, 4) if with_unused else None

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _model(opts) -> nn.Module:
    torch.manual_seed(0)
    return _Net(opts.get("unused", False)).double()


def _step_data(step: int, opts):
    """The global batch of one step, as WORLD * micro chunks (rank r owns r*micro .. r*micro+micro-1)."""
    chunks, size = WORLD * opts["micro"], opts.get("size", 4)
    sequence = (opts["length"],) if "length" in opts else ()  # (B, T, d) inputs
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(chunks * size, *sequence, DIM_IN, generator=g, dtype=torch.float64)
    y = torch.randn(chunks * size, *sequence, DIM_OUT, generator=g, dtype=torch.float64)
    return list(zip(x.split(size), y.split(size)))


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _summary_dict(s):
    return {
        "n": s.n,
        "A": s.sample_sq_norm_mean.clone(),
        "B": s.mean_grad_sq_norm.clone(),
        "num_examples": torch.as_tensor(s.num_examples).clone(),
        "example_norm_mean": None if s.example_norm_mean is None else s.example_norm_mean.clone(),
        "example_sq_norm_mean": None if s.example_sq_norm_mean is None else s.example_sq_norm_mean.clone(),
    }


@contextlib.contextmanager
def _counting_collectives(counter: list[int]):
    """Collectives the default group runs inside the block (its sequence number counts C++ ones too)."""
    group_ = dist.group.WORLD
    before = group_._get_sequence_number_for_group()
    yield
    counter[0] += group_._get_sequence_number_for_group() - before


def _register_hook(ddp: DDP, name: str | None) -> None:
    """A comm hook of the user's, registered on DDP as usual."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "allreduce":  # DDP's default reduction, through Python
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    elif name == "powersgd":  # issues collectives from its futures' callbacks
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif name is not None:
        raise ValueError(name)


def _train_ddp(rank: int, world: int, opts: dict) -> list[dict]:
    """Run opts["steps"] SGD steps with DDP (+ the engine when opts["stats"]); record each step."""
    ddp = DDP(
        _model(opts),
        bucket_cap_mb=opts.get("bucket_cap_mb", 0.0005),  # several buckets even for a tiny net
        gradient_as_bucket_view=opts.get("bucket_view", False),
        find_unused_parameters=opts.get("find_unused", False),
        static_graph=opts.get("static_graph", False),
    )
    _register_hook(ddp, opts.get("hook"))
    stats = None
    if opts.get("stats", True):
        stats = GradientStatistics(
            ddp,
            sample=opts["sample"],
            accumulation=opts.get("accumulation", "mean"),
            applied_norm=opts.get("applied_norm", "backward"),
            per_example=opts.get("per_example", False),
        )
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    micro, records = opts["micro"], []
    for step in range(opts["steps"]):
        mine = _step_data(step, opts)[rank * micro : (rank + 1) * micro]
        synced_every = step in opts.get("sync_every_micro_batch_at", ())
        counter = [0]
        with _counting_collectives(counter):
            for j, (x, y) in enumerate(mine):
                quiet = j < micro - 1 and not synced_every
                with ddp.no_sync() if quiet else contextlib.nullcontext():
                    divisor = micro if opts.get("accumulation", "mean") == "mean" else 1
                    (_loss(ddp, x, y) / divisor).backward()
        record = {"grads": [None if p.grad is None else p.grad.clone() for p in ddp.parameters()], "all_reduces": counter[0]}
        if stats is not None:
            record["summary"] = _summary_dict(stats.summary())
            if stats.per_example is not None:
                record["tapped_calls"] = stats.per_example.tapped_calls
        records.append(record)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if stats is not None:
            stats.reset()
    return records


def _one_process(opts: dict) -> list[dict]:
    """The same training in one process: WORLD*micro micro-batches ("micro_batch"),
    or WORLD micro-batches each holding one worker's data ("worker")."""
    model = _model(opts)
    stats = GradientStatistics(model, sample="micro_batch", per_example=opts.get("per_example", False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    micro, records = opts["micro"], []
    for step in range(opts["steps"]):
        chunks = _step_data(step, opts)
        if opts["sample"] == "worker":
            chunks = [
                (torch.cat([x for x, _ in chunks[r * micro : (r + 1) * micro]]), torch.cat([y for _, y in chunks[r * micro : (r + 1) * micro]]))
                for r in range(WORLD)
            ]
        for x, y in chunks:
            (_loss(model, x, y) / len(chunks)).backward()
        records.append({"grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()], "summary": _summary_dict(stats.summary())})
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        stats.reset()
    return records


def _assert_same_summary(got: dict, want: dict, rtol=1e-9, b_rtol=None):
    assert got["n"] == want["n"]
    torch.testing.assert_close(got["A"], want["A"], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(got["B"], want["B"], rtol=b_rtol or rtol, atol=1e-12)
    assert int(got["num_examples"]) == int(want["num_examples"])
    for key in ("example_norm_mean", "example_sq_norm_mean"):
        if want[key] is not None:
            torch.testing.assert_close(got[key], want[key], rtol=max(rtol, 1e-7), atol=1e-12)


def _check_against_one_process(opts: dict, ranks: list[list[dict]]):
    reference = _one_process(opts)
    for records in ranks:
        for got, want in zip(records, reference, strict=True):
            _assert_same_summary(got["summary"], want["summary"])
            for g, w in zip(got["grads"], want["grads"], strict=True):
                assert (g is None) == (w is None)
                if g is not None:
                    torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# -- tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def group():
    with WorkerGroup(WORLD) as workers:
        yield workers



def test_per_worker_statistics_equal_one_process_with_two_micro_batches(group):
    opts = {"sample": "worker", "micro": 1, "steps": 3}
    ranks = group.run(_train_ddp, opts)
    _check_against_one_process(opts, ranks)
    assert ranks[0][0]["summary"]["n"] == WORLD


def test_hook_leaves_averaged_gradients_unchanged(group):
    opts = {"sample": "worker", "micro": 2, "steps": 3}
    with_stats = group.run(_train_ddp, opts)
    plain = group.run(_train_ddp, dict(opts, stats=False))
    for rank in range(WORLD):
        for a, b in zip(with_stats[rank], plain[rank]):
            for ga, gb in zip(a["grads"], b["grads"]):
                assert torch.equal(ga, gb)


def test_gradient_as_bucket_view(group):
    opts = {"sample": "worker", "micro": 2, "steps": 3, "bucket_view": True}
    _check_against_one_process(opts, group.run(_train_ddp, opts))


@pytest.mark.parametrize("applied_norm", ["backward", "summary"])
def test_no_sync_micro_batches_two_workers_equal_four_micro_batches(group, applied_norm):
    opts = {"sample": "micro_batch", "micro": 2, "steps": 3, "applied_norm": applied_norm}
    ranks = group.run(_train_ddp, opts)
    _check_against_one_process(opts, ranks)
    assert ranks[0][0]["summary"]["n"] == 4


@pytest.mark.parametrize("sample", ["micro_batch", "worker"])
def test_sum_accumulation_reports_the_mean_gradient_scale(group, sample):
    # The loss is not divided by the micro-batch count: p.grad is m times the
    # mean gradient, the statistics are not. One SGD step keeps the weights equal.
    opts = {"sample": sample, "micro": 2, "steps": 1, "accumulation": "sum"}
    ranks = group.run(_train_ddp, opts)
    want = _one_process(opts)[0]["summary"]
    for records in ranks:
        _assert_same_summary(records[0]["summary"], want)


def test_parameter_without_gradient_and_find_unused_parameters(group):
    opts = {"sample": "worker", "micro": 2, "steps": 2, "unused": True, "find_unused": True}
    ranks = group.run(_train_ddp, opts)
    reference = _one_process(opts)
    for records in ranks:
        for got, want in zip(records, reference):
            _assert_same_summary(got["summary"], want["summary"])
        assert records[0]["grads"][-1] is None  # the unused layer never got a gradient


@pytest.mark.parametrize("hook", [None, "allreduce"], ids=["builtin_reduction", "python_hook"])
def test_static_graph_after_a_synchronised_first_step(group, hook):
    # First step synchronises every micro-batch (several reductions in one
    # step, each with the statistics so far), later steps accumulate under no_sync.
    opts = {"sample": "micro_batch", "micro": 2, "steps": 3, "static_graph": True, "sync_every_micro_batch_at": (0,), "hook": hook}
    _check_against_one_process(opts, group.run(_train_ddp, opts))


def test_user_comm_hook_keeps_its_reduction(group):
    opts = {"sample": "worker", "micro": 1, "steps": 2, "hook": "fp16"}
    with_stats = group.run(_train_ddp, opts)
    plain = group.run(_train_ddp, dict(opts, stats=False))
    for a, b in zip(with_stats[0], plain[0]):  # the compressed reduction still happens, unchanged
        for ga, gb in zip(a["grads"], b["grads"]):
            assert torch.equal(ga, gb)
    reference = _one_process(opts)
    # Worker norms are taken before compression: exact. B is of the fp16-averaged gradient.
    _assert_same_summary(with_stats[0][0]["summary"], reference[0]["summary"], rtol=1e-9, b_rtol=2e-3)


@pytest.mark.parametrize("hook", [None, "allreduce"], ids=["builtin_reduction", "python_hook"])
@pytest.mark.parametrize("sample", ["micro_batch", "worker"])
def test_exactly_one_extra_all_reduce_per_step(group, sample, hook):
    # DDP keeps its own reduction (its C++ all-reduce, or the user's hook);
    # the statistics add one collective per step, issued while the last
    # buckets are in flight (no hook) or after DDP's finalize (a hook).
    opts = {"sample": sample, "micro": 2, "steps": 3, "hook": hook}
    with_stats = group.run(_train_ddp, opts)
    plain = group.run(_train_ddp, dict(opts, stats=False))
    # DDP starts with one bucket and rebuilds into several after the first step.
    assert [b["all_reduces"] for b in plain[0]][0] == 1 and plain[0][-1]["all_reduces"] > 1
    for a, b in zip(with_stats[0], plain[0]):
        assert a["all_reduces"] == b["all_reduces"] + 1
    _check_against_one_process(opts, with_stats)


def test_powersgd_hook_collectives_stay_in_order(group):
    # PowerSGD issues all-reduces from its futures' callbacks (from its third
    # step here); the statistics wait for DDP's finalize so that every rank
    # issues the same collectives in the same order. Worker norms are taken
    # before compression: exact; B is of the applied (compressed) gradient.
    opts = {"sample": "worker", "micro": 2, "steps": 4, "hook": "powersgd", "bucket_cap_mb": 25}
    ranks = group.run(_train_ddp, opts)
    reference = _one_process(opts)
    for records in ranks:
        for record in records:
            applied = torch.stack([g.square().sum() for g in record["grads"]])
            torch.testing.assert_close(record["summary"]["B"], applied, rtol=1e-9, atol=1e-15)
        _assert_same_summary(records[0]["summary"], reference[0]["summary"])
        # the weights are still equal at step 2, where compression starts: its gradient is not exact
        assert not all(torch.allclose(g, w) for g, w in zip(records[2]["grads"], reference[2]["grads"]))


def _launch_points(rank: int, world: int) -> list[bool]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from largebatch.stats.ddp import may_launch_before_finalize

    plain, hooked = DDP(_model({})), DDP(_model({}))
    hooked.register_comm_hook(None, allreduce_hook)
    other = dist.new_group(list(range(world)))
    return [
        may_launch_before_finalize(plain, plain.process_group),
        may_launch_before_finalize(hooked, hooked.process_group),
        may_launch_before_finalize(hooked, other),
    ]


def test_statistics_launch_early_only_without_a_python_comm_hook(group):
    assert group.run(_launch_points) == [[True, False, True]] * WORLD


class _MixedNet(nn.Module):
    """A float32 first layer and a float64 head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM_IN, 8), nn.Linear(8, DIM_OUT).double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.float())).double())


def _mixed_dtype_worker(rank: int, world: int) -> dict:
    """Float64 statistics (a float64 parameter) and a float32 last bucket: the vector gets its own all-reduce."""
    torch.manual_seed(0)
    model, copy = _MixedNet(), _MixedNet()
    copy.load_state_dict(model.state_dict())
    x, y = _step_data(0, {"micro": 1})[rank]
    ddp = DDP(model, bucket_cap_mb=0.0005)
    stats = GradientStatistics(ddp, sample="worker")
    nn.functional.mse_loss(ddp(x), y).backward()
    summary = stats.summary()
    applied = torch.stack([p.grad.double().square().sum() for p in ddp.parameters()])
    # This worker's own gradient, without DDP, on a copy of the model.
    nn.functional.mse_loss(copy(x), y).backward()
    mine = torch.stack([p.grad.double().square().sum() for p in copy.parameters()])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return {
        "A": summary.sample_sq_norm_mean,
        "expected": torch.stack(everyone).mean(0),
        "B": summary.mean_grad_sq_norm,
        "applied": applied,
    }


def test_statistics_of_another_dtype_than_the_last_bucket(group):
    for rank in group.run(_mixed_dtype_worker):
        torch.testing.assert_close(rank["A"], rank["expected"], rtol=1e-5, atol=0)
        torch.testing.assert_close(rank["B"], rank["applied"], rtol=1e-6, atol=0)


@pytest.mark.skipif(not HAVE_PER_EXAMPLE, reason="largebatch/stats/per_example.py (PerExampleNorms) is not there yet")
def test_per_example_sums_travel_in_the_same_all_reduce(group):
    opts = {"sample": "micro_batch", "micro": 2, "steps": 2, "per_example": True, "hook": "allreduce"}
    ranks = group.run(_train_ddp, opts)
    _check_against_one_process(opts, ranks)
    plain = group.run(_train_ddp, dict(opts, stats=False, per_example=False))
    assert [r["all_reduces"] for r in ranks[0]] == [r["all_reduces"] + 1 for r in plain[0]]


@pytest.mark.skipif(not HAVE_PER_EXAMPLE, reason="largebatch/stats/per_example.py (PerExampleNorms) is not there yet")
@pytest.mark.parametrize("bucket_view", [False, True])
def test_per_example_gradients_as_the_weight_gradient_under_ddp(group, bucket_view):
    # Sequence inputs (T = 12): every Linear's weight gradient comes from the
    # per-example gradients, so DDP's reducer hooks must fire on the tap's gradient.
    opts = {"sample": "micro_batch", "micro": 2, "steps": 2, "per_example": True, "length": 12, "bucket_view": bucket_view}
    ranks = group.run(_train_ddp, opts)
    assert [r["tapped_calls"] for records in ranks for r in records] == [3] * 4
    _check_against_one_process(opts, ranks)


def _bad_input(rank: int, world: int) -> dict[str, str]:
    """Each misuse on a fresh DDP model; returns the error messages."""
    messages = {}
    x, y = _step_data(0, {"micro": 2})[rank]

    ddp = DDP(_model({}), static_graph=True)
    GradientStatistics(ddp)
    try:
        with ddp.no_sync():
            _loss(ddp, x, y).backward()
    except RuntimeError as error:
        messages["static_graph"] = str(error)

    ddp = DDP(_model({}))
    stats = GradientStatistics(ddp, sample="worker")
    for _ in range(2):  # two synchronised backwards in one step
        _loss(ddp, x, y).backward()
    try:
        stats.summary()
    except RuntimeError as error:
        messages["worker_two_syncs"] = str(error)

    ddp = DDP(_model({}))
    stats = GradientStatistics(ddp)
    with ddp.no_sync():
        _loss(ddp, x, y).backward()
    try:
        stats.summary()
    except RuntimeError as error:
        messages["never_synced"] = str(error)

    ddp = DDP(_model({}))
    stats = GradientStatistics(ddp)
    _loss(ddp.module, x, y).backward()  # around DDP: nothing averages this gradient
    try:
        stats.summary()
    except RuntimeError as error:
        messages["module_called_directly"] = str(error)

    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    sharded = nn.Linear(4, 4)
    sharded.weight = nn.Parameter(distribute_tensor(sharded.weight.detach(), mesh, [Shard(0)]))
    try:
        GradientStatistics(sharded)
    except ValueError as error:
        messages["sharded"] = str(error)
    return messages


def test_bad_input_under_ddp(group):
    messages = group.run(_bad_input)[0]
    assert "static_graph=True" in messages["static_graph"] and "143580" in messages["static_graph"]
    assert "sample='worker'" in messages["worker_two_syncs"]
    assert "no synchronised backward" in messages["never_synced"]
    assert "no synchronised backward" in messages["module_called_directly"]
    assert "sharded parameters" in messages["sharded"]


def _after_remove(rank: int, world: int, hook: str | None) -> dict:
    """After remove() DDP reduces as it did before: its own reduction or the user's hook, nothing more."""
    x, y = _step_data(0, {"micro": 1})[rank]
    ddp = DDP(_model({}))
    _register_hook(ddp, hook)
    stats = GradientStatistics(ddp, sample="worker")
    _loss(ddp, x, y).backward()
    stats.summary()
    stats.remove()
    ddp.zero_grad()
    counter = [0]
    loss = _loss(ddp, x, y)  # this forward rebuilds DDP's buckets, with collectives of its own
    with _counting_collectives(counter):
        loss.backward()
    # The same backward in this process, averaged by hand over the workers.
    copy = _model({})
    copy.load_state_dict(ddp.module.state_dict())
    _loss(copy, x, y).backward()
    expected = []
    for p in copy.parameters():
        dist.all_reduce(p.grad)
        expected.append(p.grad / world)
    return {"all_reduces": counter[0], "grads": [p.grad.clone() for p in ddp.parameters()], "expected": expected}


@pytest.mark.parametrize("hook", [None, "allreduce"], ids=["builtin_reduction", "python_hook"])
def test_remove_leaves_a_plain_reduction(group, hook):
    ranks = group.run(_after_remove, hook)
    assert ranks[0]["all_reduces"] == 1  # the one bucket, no statistics
    for rank in ranks:
        for got, want in zip(rank["grads"], rank["expected"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
