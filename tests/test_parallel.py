"""The parallel layout's arithmetic (no process group needed) and the per-step decision table of the loop."""

from __future__ import annotations

import pytest

from trainer.errors import UserError
from trainer.faults import StepDecision
from trainer.loop import actions, valid_mean
from trainer.parallel import ParallelLayout
from trainer.spec import RunSpec
from trainer.state import TrainerState


def test_every_rank_is_a_data_parallel_rank_without_sequence_parallelism():
    for rank in range(4):
        layout = ParallelLayout(4, rank)
        assert (layout.data_rank, layout.data_size, layout.sequence_rank) == (rank, 4, 0)
    assert ParallelLayout(4, 0).is_main and not ParallelLayout(4, 3).is_main
    assert ParallelLayout(4, 1).sequence_groups() == [(0,), (1,), (2,), (3,)]
    assert ParallelLayout(4, 1).data_groups() == [(0, 1, 2, 3)]


def test_sequence_groups_are_consecutive_ranks():
    layout = ParallelLayout(8, rank=5, sequence=2)
    assert (layout.data_rank, layout.data_size, layout.sequence_rank) == (2, 4, 1)
    assert layout.sequence_groups() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert layout.data_groups() == [(0, 2, 4, 6), (1, 3, 5, 7)]
    with pytest.raises(UserError, match="8 rank.* cannot be split into sequence-parallel groups of 3"):
        ParallelLayout(8, 0, sequence=3)


SPEC = RunSpec.model_validate({"model": {"path": "m"}, "data": {"shards": "s"},
                               "train": {"max_steps": 10, "max_consecutive_nonfinite": 2},
                               "checkpoint": {"every_steps": 4, "every_minutes": None},
                               "logging": {"every_steps": 3}})


def decision(stop=False, time_due=False) -> StepDecision:
    return StepDecision(stop=stop, save_due_to_time=time_due, data_faults=0, readable=1)


@pytest.mark.parametrize("step,streak,shared,expected", [
    (1, 0, decision(), dict(log=False, give_up=False, validate=True, save=False, stop=False)),
    (3, 0, decision(), dict(log=True, give_up=False, validate=True, save=False, stop=False)),  # log every 3
    (4, 0, decision(), dict(log=True, give_up=False, validate=True, save=True, stop=False)),  # a save logs too
    (4, 1, decision(), dict(log=False, give_up=False, validate=True, save=False, stop=False)),  # no save in a streak
    (5, 2, decision(), dict(log=True, give_up=True, validate=True, save=False, stop=False)),  # the streak ends it
    (5, 0, decision(time_due=True), dict(log=True, give_up=False, validate=True, save=True, stop=False)),
    (5, 0, decision(stop=True), dict(log=True, give_up=False, validate=False, save=True, stop=True)),
    (10, 0, decision(), dict(log=True, give_up=False, validate=True, save=True, stop=False)),  # the last step
])
def test_the_step_decision(step, streak, shared, expected):
    todo = actions(SPEC, TrainerState(consecutive_nonfinite=streak), shared, step)
    assert todo.__dict__ == expected
    if todo.validate:  # a signal during validation saves and stops; none changes nothing
        stopped = todo.after_validation(stop=True)
        assert stopped.stop and stopped.save and stopped.log == todo.log
        assert todo.after_validation(stop=False) == todo


def test_an_unreadable_sample_is_neither_in_the_sum_nor_in_the_count():
    import torch

    losses = torch.tensor([1.0, 30.0, 5.0])  # the 30 is what a zero-filled stand-in might score
    assert valid_mean(losses, torch.tensor([True, False, True])).item() == 3.0
    assert valid_mean(losses, torch.tensor([True, True, True])).item() == 12.0
    assert valid_mean(losses, torch.tensor([False, False, False])).item() == 0.0
