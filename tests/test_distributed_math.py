"""training/distributed.py on two real processes (gloo): every global quantity an online stage takes over
its ranks equals the one-process quantity on the whole batch.

Each rank holds half the rows of one batch; the parent computes the same things on the whole batch in
one process and compares. The loss/gradient check is the heart of PPO and GRPO under trainer=ddp: each
rank divides its loss by the global count, the gradients are summed once, and the step equals the
whole-batch step for every aggregation.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl import aggregation_normalizer, masked_whiten, ppo_policy_loss
from lightrlhf.training import distributed

ROWS, WIDTH, WORLD = 6, 5, 2
AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")


def batch() -> dict[str, torch.Tensor]:
    """One batch with ragged masks, a row without a valid token, and padding holding nan."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    x = torch.randn(ROWS, WIDTH, generator=g)
    return {"x": torch.where(mask.bool(), x, float("nan")), "mask": mask,
            "features": torch.randn(ROWS, WIDTH, 3, generator=g), "old_logp": -torch.rand(ROWS, WIDTH, generator=g),
            "advantages": torch.randn(ROWS, WIDTH, generator=g)}


def policy_gradient(b: dict[str, torch.Tensor], rows: slice, aggregation: str, total) -> torch.Tensor:
    """The clipped-surrogate gradient w.r.t. a 3-vector w, for logp = old_logp + features . w, on `rows`
    divided by the count `total` makes of this part's normaliser (the global one under several ranks)."""
    w = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    logp = b["old_logp"][rows] + b["features"][rows] @ w
    mask = b["mask"][rows]
    normalizer = total(aggregation_normalizer(mask, aggregation, max_new_tokens=WIDTH))
    ppo_policy_loss(logp, b["old_logp"][rows], b["advantages"][rows], mask, 0.2, aggregation,
                    normalizer=normalizer).loss.backward()
    distributed.sum_gradients([w])
    return w.grad.clone()


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        b, half = batch(), ROWS // WORLD
        mine = slice(rank * half, (rank + 1) * half)
        results = {
            "world_size": distributed.world_size(), "rank": distributed.rank(),
            "all_sum": distributed.all_sum(torch.tensor([rank + 1.0])),
            "all_cat": distributed.all_cat(b["x"][mine]),
            "agree_all_true": distributed.all_agree(True), "agree_one_false": distributed.all_agree(rank == 0),
            "objects": distributed.all_gather_objects({"rank": rank}),
            "mean_over_ranks": distributed.mean_over_ranks({"a": float(rank), "b": 2.0 * rank, f"only{rank}": 1.0}),
            "whitened": masked_whiten(b["x"][mine], b["mask"][mine], total=distributed.all_sum),
            "gradients": {a: policy_gradient(b, mine, a, distributed.all_sum) for a in AGGREGATIONS},
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=rank_main, args=(r, str(out / "init"), str(out))) for r in range(WORLD)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * WORLD
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_one_process_is_the_identity():
    x = torch.tensor([1.0, 2.0])
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.all_sum(x) is x and distributed.all_cat(x) is x
    assert distributed.all_agree(True) and not distributed.all_agree(False)
    assert distributed.mean_over_ranks({"a": 1.0}) == {"a": 1.0}
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.tensor([3.0, 4.0])
    distributed.sum_gradients([w])
    assert w.grad.tolist() == [3.0, 4.0]


def test_collectives_over_two_ranks(ranks):
    b = batch()
    for r, out in enumerate(ranks):
        assert out["world_size"] == 2 and out["rank"] == r
        assert out["all_sum"].item() == 3.0  # 1 + 2
        assert_close(out["all_cat"], b["x"], equal_nan=True)  # rank order
        assert out["agree_all_true"] and not out["agree_one_false"]
        assert out["objects"] == [{"rank": 0}, {"rank": 1}]
        # (0 + 1) / 2 and (0 + 2) / 2; a key only one rank has is left out, not averaged with nothing
        assert out["mean_over_ranks"] == {"a": 0.5, "b": 1.0}


def test_whitening_over_ranks_is_whitening_of_the_whole_batch(ranks):
    b = batch()
    whole = masked_whiten(b["x"], b["mask"])
    assert_close(torch.cat([out["whitened"] for out in ranks]), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_each_rank_steps_with_the_whole_batch_gradient(ranks, aggregation):
    whole = policy_gradient(batch(), slice(0, ROWS), aggregation, lambda n: n)
    assert whole.abs().sum() > 0
    for out in ranks:
        assert_close(out["gradients"][aggregation], whole, rtol=0, atol=1e-6)


def _stage_on(world: int, strategy, data_parallel: str, name: str = "raft"):
    from types import SimpleNamespace

    trainer = SimpleNamespace(world_size=world, strategy=strategy)
    return SimpleNamespace(trainer=trainer, data_parallel=data_parallel, stage_name=name, seed=3,
                           sampler=torch.Generator().manual_seed(3))


def test_an_online_stage_refuses_several_processes_unless_it_syncs_itself_and_the_strategy_is_ddp():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightrlhf.errors import UserError
    from lightrlhf.stages.online import OnlineStage

    with pytest.raises(UserError, match=r"^config trainer: stage=raft runs on one process; use trainer=default"):
        OnlineStage.setup(_stage_on(2, DDPStrategy(), data_parallel="none"), "fit")
    with pytest.raises(UserError, match=r"stage=ppo runs on several processes with trainer=ddp only .* FSDPStrategy"):
        OnlineStage.setup(_stage_on(2, FSDPStrategy(), data_parallel="stage", name="ppo"), "fit")
    alone = _stage_on(1, None, data_parallel="none")
    OnlineStage.setup(alone, "fit")  # one process: nothing to check, the sampler keeps its seed
    assert torch.equal(alone.sampler.get_state(), torch.Generator().manual_seed(3).get_state())


@pytest.mark.parametrize("module, name", [("pbrl", "PbRLStage"), ("masked_reward_weighted", "MaskedRewardWeightedStage"),
                                          ("reward_weighted", "RewardWeightedStage")])
def test_stages_with_several_backward_passes_a_step_refuse_several_processes(module, name):
    import importlib

    from lightning.pytorch.strategies import DDPStrategy

    from lightrlhf.errors import UserError

    cls = getattr(importlib.import_module(f"lightrlhf.stages.{module}"), name)
    assert cls.data_parallel == "none"
    stage = _stage_on(2, DDPStrategy(), data_parallel="none", name=cls.stage_name)
    with pytest.raises(UserError, match=rf"^config trainer: stage={cls.stage_name} runs on one process"):
        cls.setup(stage, "fit")
    for online in ("ppo.PPOStage", "grpo.GRPOStage"):
        module_name, class_name = online.split(".")
        assert getattr(importlib.import_module(f"lightrlhf.stages.{module_name}"), class_name).data_parallel == "stage"


def test_a_checkpoint_of_two_ranks_resumes_on_two_ranks_only():
    from types import SimpleNamespace

    from lightrlhf.errors import UserError
    from lightrlhf.stages.online import OnlineStage

    state = torch.Generator().manual_seed(5).get_state()
    stage = SimpleNamespace(scorer=SimpleNamespace(load_state_dict=lambda s: None), sampler=torch.Generator())
    with pytest.raises(UserError, match=r"written by 2 process\(es\); resume it with trainer.devices=2 \(this run has 1\)"):
        OnlineStage.load_online_state(stage, {"rollout_count": 3, "sampler": state, "sampler_by_rank": [state, state]})
