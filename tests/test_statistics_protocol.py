"""The optimisers' side of the statistics interface (largebatch/optim/_statistics.py):
largebatch.stats implements it structurally, without importing it."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from torch import nn

from largebatch.optim import LENA
from largebatch.optim._statistics import ExampleSource, LabelledExamples, Resettable, StatisticsSource, Summary
from largebatch.stats import GradientStatistics, GradientSummary


def test_the_engine_is_a_statistics_source():
    model = nn.Linear(3, 2)
    plain, examples = GradientStatistics(model), GradientStatistics(model, per_example=True)
    for stats in (plain, examples):
        assert isinstance(stats, StatisticsSource) and isinstance(stats, Resettable)
        assert isinstance(stats, ExampleSource)
    assert plain.per_example is None
    assert isinstance(examples.per_example, LabelledExamples)
    fields = {f.name for f in dataclasses.fields(GradientSummary)}
    assert set(typing.get_type_hints(Summary)) <= fields


def test_a_source_of_ones_own_needs_summary_and_index_of_only():
    """As the guide says: any object with summary() and index_of(p); without reset() the
    optimiser steps and has nothing to reset."""
    from _method_stats import FakeStats, make_params, set_random_grads

    class Minimal:
        def __init__(self, params):
            self.inner = FakeStats(params)

        def summary(self):
            return self.inner.summary()

        def index_of(self, p):
            return self.inner.index_of(p)

    params = make_params()
    opt = LENA(params, stats=Minimal(params), base_iterations=10)
    set_random_grads(params, torch.Generator().manual_seed(0))
    opt.step()
    opt.zero_grad()
    assert opt.last_gains[0] is not None

    with pytest.raises(ValueError, match=r"summary\(\) and index_of\(\)"):
        LENA(params, stats=object(), base_iterations=10)
