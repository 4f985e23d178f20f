"""DPO: padding-free log-probs, the identity at step 0, the reference cache, every preference format,
a short fit on the demo, the export as a policy, config errors, and SIGKILL + resume."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from conftest import CONF, FIXTURES, run_in_process, scalar_curve, train_cli, train_with_fault
from safetensors.torch import load_file
from torch.testing import assert_close

from lightrlhf.data.modules import collate_pairs
from lightrlhf.data.tokenize import TruncationReport, encode_pair
from lightrlhf.errors import ConfigError
from lightrlhf.models.actor_critic import PolicySpec, load_policy
from lightrlhf.rl import sequence_logprobs
from lightrlhf.stages.dpo import response_mask

DATA = FIXTURES / "data"
FAST_EVAL = ["stage.eval.num_prompts=16", "stage.eval.batch_size=16"]
FORMATS = [("pref_explicit.jsonl", "explicit"), ("pref_explicit.csv", "explicit"), ("pref_implicit.jsonl", "implicit"),
           ("pref_conversational.jsonl", "conversational"), ("pref_hh_rlhf.jsonl", "hh_rlhf"),
           ("pref_ultrafeedback.jsonl", "ultrafeedback")]


def _plain(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from lightrlhf.launch.run import to_plain

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_plain(compose("train", overrides=["stage=dpo", "paths.output_dir=/tmp"] + overrides))


def _stage(overrides: list[str] = ()):
    from lightrlhf.launch.parts import build_stage

    torch.manual_seed(0)
    stage, _ = build_stage(_plain(FAST_EVAL + list(overrides)))
    return stage


@pytest.fixture(scope="module")
def stage():
    return _stage(["stage.datamodule.batch_size=8"])


@pytest.fixture(scope="module")
def policy(tiny_spec, tiny_tokenizer):
    torch.manual_seed(0)
    model = load_policy(tiny_spec, tiny_tokenizer, PolicySpec())
    with torch.no_grad():  # a trained-looking adapter: B != 0, so policy and reference differ
        for name, param in model.module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def test_yaml_composes_and_builds_on_the_demo_comparisons(stage):
    from lightrlhf.models.actor_critic import ActorCritic
    from lightrlhf.stages.dpo import DPOStage

    assert isinstance(stage, DPOStage) and isinstance(stage.model, ActorCritic) and not stage.model.has_critic
    assert stage.datamodule.summary["train/format"] == "explicit" and len(stage.datamodule.train_set) > 1000
    assert stage.datamodule.evaluator is not None  # the demo's gold scorer
    assert all(".policy." in n for n in stage.model.trainable_parameter_names())


def test_sequence_logprobs_do_not_depend_on_padding(policy, tiny_tokenizer):
    """The same pair alone, right-padded and left-padded beside a longer one: log-probs within 1e-5."""
    report = TruncationReport()
    short = encode_pair(tiny_tokenizer, "tell me about the river :", "the river is calm .", "rain .", None, 64, 16,
                        report)
    long = encode_pair(tiny_tokenizer, "tell me about the old stone bridge near the river :",
                       "the bridge is old and the river is calm and slow .", "stone .", None, 64, 16, report)
    seq, length = short.chosen_ids, len(short.chosen_ids) - short.chosen_prompt_length
    pad, width = tiny_tokenizer.pad_token_id, len(long.chosen_ids)
    assert width > len(seq) + 3
    other = long.chosen_ids
    layouts = {
        "none": ([seq], [[1] * len(seq)]),
        "right": ([seq + [pad] * (width - len(seq)), other], [[1] * len(seq) + [0] * (width - len(seq)), [1] * width]),
        "left": ([[pad] * (width - len(seq)) + seq, other], [[0] * (width - len(seq)) + [1] * len(seq), [1] * width]),
    }
    for role in ("policy_logits", "reference_logits"):
        values = {}
        for name, (ids, mask) in layouts.items():
            ids, mask = torch.tensor(ids), torch.tensor(mask)
            lengths = torch.tensor([length] * len(ids))
            with torch.no_grad():
                logits = getattr(policy, role)(ids, mask)
            total, count = sequence_logprobs(logits, ids, response_mask(mask, lengths))
            assert count[0].item() == length
            values[name] = total[0].item()
        assert values["right"] == pytest.approx(values["none"], abs=1e-5), (role, values)
        assert values["left"] == pytest.approx(values["none"], abs=1e-5), (role, values)
    assert len({round(v, 3) for v in values.values()}) == 1


def test_response_mask_marks_the_last_real_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = response_mask(mask, torch.tensor([2, 3, 1]))
    assert out.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]]


def test_at_step_0_the_policy_is_the_reference(stage):
    """A fresh adapter (LoRA B = 0): equal log-probs, ratio 1, rewards and margins 0, sigmoid loss log 2."""
    batch = next(iter(stage.datamodule.train_dataloader()))
    with torch.no_grad():
        policy = stage.pair_logps(batch)
        ref_chosen, ref_rejected = stage.reference_logps(batch, "train")
    assert torch.equal(policy.chosen, ref_chosen) and torch.equal(policy.rejected, ref_rejected)
    assert torch.equal(torch.exp(policy.chosen - ref_chosen), torch.ones_like(ref_chosen))
    result, _, _ = stage._loss(policy, ref_chosen, ref_rejected)
    assert torch.equal(result.chosen_rewards, torch.zeros(8)) and torch.equal(result.rejected_rewards, torch.zeros(8))
    assert_close(result.loss, torch.tensor(math.log(2)), rtol=0, atol=1e-7)


def test_chosen_and_rejected_in_one_forward_match_separate_forwards(stage, policy):
    batch = next(iter(stage.datamodule.val_dataloader()))
    stage.model, original = policy, stage.model
    try:
        with torch.no_grad():
            together = stage.pair_logps(batch)
            alone = [sequence_logprobs(policy.policy_logits(batch[f"{k}_ids"], batch[f"{k}_mask"]), batch[f"{k}_ids"],
                                       response_mask(batch[f"{k}_mask"], batch[f"{k}_length"]))[0]
                     for k in ("chosen", "rejected")]
    finally:
        stage.model = original
    # detail: the prompt runs once (models/shared_prompt.py), with other kernels than the full rows: sums of
    # ~64 log-probs near -70 agree to float32 rounding, a few 1e-7 relative
    assert_close(together.chosen, alone[0], rtol=1e-6, atol=1e-5)
    assert_close(together.rejected, alone[1], rtol=1e-6, atol=1e-5)


def test_the_prompt_once_gives_the_log_probs_and_gradient_of_the_2b_row_forward(stage, policy, monkeypatch):
    """models/shared_prompt.py: each prompt runs once and both responses against its cache; the same
    log-probs and gradient as chosen and rejected as 2B full rows (prompts of several lengths, padding)."""
    import lightrlhf.stages.dpo as dpo
    from lightrlhf.data.tokenize import PairFeatures

    ids = torch.randint(3, 200, (5, 20), generator=torch.Generator().manual_seed(0)).tolist()
    # prompts of 3..7 tokens, chosen 2..6 and rejected 7..3: right padding in both, of every width
    pairs = [PairFeatures(ids[i][:3 + i] + ids[i][10:12 + i], ids[i][:3 + i] + ids[i][12:19 - i], 3 + i, 3 + i, 0.0, i)
             for i in range(5)]
    batch = collate_pairs(policy.tokenizer.pad_token_id)(pairs)
    stage.model, original = policy, stage.model
    params = [p for p in policy.module.parameters() if p.requires_grad]
    results = []
    try:
        for shared in (True, False):
            if not shared:
                monkeypatch.setattr(dpo, "split_prompts", lambda *args, **kwargs: None)
            for p in params:
                p.grad = None
            out = stage.pair_logps(batch)
            (out.chosen - 0.5 * out.rejected).sum().backward()
            with torch.no_grad():
                ref = stage.pair_logps(batch, reference=True)
            results.append((out, ref, [p.grad.clone() for p in params]))
    finally:
        stage.model = original
    (shared, shared_ref, shared_grad), (rows, rows_ref, rows_grad) = results
    for a, b in ((shared, rows), (shared_ref, rows_ref)):
        assert_close(a.chosen, b.chosen, rtol=1e-5, atol=1e-4)
        assert_close(a.rejected, b.rejected, rtol=1e-5, atol=1e-4)
        assert torch.equal(a.chosen_tokens, b.chosen_tokens) and torch.equal(a.rejected_tokens, b.rejected_tokens)
    assert not torch.allclose(shared.chosen, shared_ref.chosen)  # the adapter is on for the policy, off for the reference
    for a, b in zip(shared_grad, rows_grad):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_precomputed_reference_equals_the_reference_on_the_fly(stage):
    cached = _stage(["stage.reference.precompute=true"])
    cache = cached.precompute_reference("validation")
    assert not torch.isnan(cache).any() and len(cache) == len(stage.datamodule.val_set)
    for batch in list(stage.datamodule.val_dataloader())[:3]:
        with torch.no_grad():
            live = stage.pair_logps(batch, reference=True)
        chosen, rejected = cached.reference_logps(batch, "validation")
        assert_close(chosen, live.chosen, rtol=0, atol=1e-5)
        assert_close(rejected, live.rejected, rtol=0, atol=1e-5)


def test_eval_prompts_sample_the_rl_stages_held_out_prompts_in_their_batches(stage, tmp_path):
    """With +data@stage.eval_prompts=demo_prompts, DPO evaluates on exactly the prompts, order and
    batches PPO's and GRPO's data module gives their evaluation (so the same sampling seeds meet the
    same prompts), and scores them with that config's evaluator."""
    from conftest import compose

    from lightrlhf.data.modules import PromptDataModule
    from lightrlhf.launch.build import build
    from lightrlhf.launch.run import to_plain
    from lightrlhf.models.loading import load_tokenizer

    dpo = _stage(["+data@stage.eval_prompts=demo_prompts", "stage.eval.num_prompts=20", "stage.eval.batch_size=8"])
    batches = dpo.evaluation_batches()
    plain = to_plain(compose(["stage=ppo", "data=demo_prompts", "reward.path=unused", "stage.eval.num_prompts=20",
                              "stage.datamodule.eval_batch_size=8"], tmp_path))
    node = dict(plain["stage"]["datamodule"])
    assert node["max_eval_prompts"] == 20
    tokenizer = load_tokenizer(build(plain["model"], "model"))
    ppo_data = build(node, "stage.datamodule", source=build(plain["data"], "data"), tokenizer=tokenizer)
    assert isinstance(ppo_data, PromptDataModule)
    ppo_data.setup("fit")
    expected = [(b["prompt_ids"], b["prompt_text"]) for b in ppo_data.val_dataloader()]
    assert [len(ids) for ids, _, _ in batches] == [8, 8, 4]
    assert [(ids, texts) for ids, texts, _ in batches] == expected
    assert [raw for _, _, raw in batches][0] == [e.prompt for e in ppo_data.val_examples[:8]]
    assert dpo.evaluation.evaluator is not None
    # without it, the distinct prompts of the held-out pairs (16 of them here), in chunks of eval.batch_size
    pair_prompts = [t for _, texts, _ in stage.evaluation_batches() for t in texts]
    assert len(pair_prompts) == len(set(pair_prompts)) == 16
    assert pair_prompts == list(dict.fromkeys(e.prompt for e in stage.datamodule.val_examples))[:16]


@pytest.mark.parametrize("override,key", [
    ("stage.loss_type=kto", "stage.loss_type"),
    ("stage.beta=0", "stage.beta"),
    ("stage.beta=-0.1", "stage.beta"),
    ("stage.label_smoothing=0.5", "stage.label_smoothing"),
    ("stage.label_smoothing=-0.1", "stage.label_smoothing"),
])
def test_bad_loss_settings_are_config_errors_naming_the_key(override, key):
    from lightrlhf.launch.build import build

    plain = _plain([override])
    node = {k: v for k, v in plain["stage"].items() if k not in ("model", "datamodule")}
    with pytest.raises(ConfigError) as error:
        build(node, "stage", model=None, datamodule=None)
    assert error.value.key == key and "\n" not in str(error.value)


@pytest.mark.parametrize("override,message", [
    ("stage.loss_type=kto", "config stage.loss_type: expected one of 'sigmoid', 'ipo', 'hinge', got str 'kto'"),
    ("+stage.los_type=ipo", "config stage.los_type: unknown key for DPOStage (did you mean loss_type?)"),
    ("+stage.datamodule.batch=4", "config stage.datamodule.batch: unknown key for PreferenceDataModule "
                                  "(did you mean batch_size?)"),
])
def test_the_stages_own_settings_are_checked_before_its_data_is_read(tmp_path, override, message):
    """The data file does not exist: the stage's setting is what is reported, not the missing file."""
    from conftest import compose

    from lightrlhf.errors import ConfigError
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    cfg = compose(["stage=dpo", "data=jsonl", f"data.path={tmp_path / 'absent.jsonl'}", override], tmp_path)
    with pytest.raises(ConfigError) as error:
        build_stage(to_plain(cfg))
    assert str(error.value) == message


@pytest.mark.slow
def test_a_bad_loss_type_is_one_line_and_exit_2(tmp_path):
    done = train_cli(["stage=dpo", "stage.loss_type=kto", f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: config stage.loss_type: expected one of 'sigmoid', 'ipo', 'hinge', "
                                        "got str 'kto'"]


@pytest.mark.parametrize("name,fmt", FORMATS)
def test_dpo_trains_on_each_preference_format(name, fmt, tmp_path):
    run_dir = tmp_path / "run"
    extra = ["stage.reference.precompute=true"] if name == "pref_explicit.jsonl" else []
    run_in_process(["stage=dpo", "data=jsonl", f"data.path={DATA / name}", "trainer.max_steps=2",
                    "stage.datamodule.batch_size=2", "trainer.val_check_interval=2", "stage.eval.num_prompts=2"] + extra,
                   run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["data"]["train/format"] == fmt
    assert {"val/loss", "val/rewards/accuracies", "val/logps/chosen", "eval/kl"} <= set(record["metrics"])
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_other_losses_train(loss_type, tmp_path):
    run_in_process(["stage=dpo", "data=jsonl", f"data.path={DATA / 'pref_explicit.jsonl'}", f"stage.loss_type={loss_type}",
                    "trainer.max_steps=2", "trainer.val_check_interval=2", "stage.datamodule.batch_size=2",
                    "stage.eval.num_prompts=0"], tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["val/loss"]) and not any(k.startswith("eval/") for k in metrics)


@pytest.mark.slow
def test_short_fit_on_the_demo_lowers_the_loss_and_exports_a_policy(tmp_path, tiny_spec, tiny_tokenizer):
    run_dir = tmp_path / "dpo"
    run_in_process(["stage=dpo", "trainer.max_steps=60", "trainer.val_check_interval=60", "stage.datamodule.batch_size=32",
                    "stage.beta=0.1", "stage.optim.lr=2e-3", "trainer.log_every_n_steps=1"] + FAST_EVAL, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    # at step 0 the loss is log 2 and no pair is ranked (margins 0): the held-out pairs are now ranked
    assert scalar_curve(run_dir, "train/loss")[0][1] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["val/loss"] < math.log(2) - 0.02, metrics
    assert metrics["val/rewards/accuracies"] > 0.6, metrics
    assert metrics["val/rewards/margins"] > 0
    for name in ("eval/gold_score", "eval/win_rate_vs_sft", "eval/gold_score_initial", "eval/kl"):
        assert name in metrics
    assert metrics["eval/win_rate_vs_sft_initial"] == 0.5 and metrics["eval/kl_initial"] == 0.0
    manifest = json.loads((run_dir / "export" / "lightrlhf.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["kind"] == "causal_lm" and manifest["weights"] == "adapter"
    # the export is the trained policy: loaded as policy.init (as PPO and best-of-n load it), its
    # base now *is* the DPO policy, and the held-out chosen log-probs are those DPO last measured
    loaded = load_policy(tiny_spec, tiny_tokenizer, PolicySpec(str(run_dir / "export")))
    dm = _stage().datamodule
    totals = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = loaded.reference_logits(batch["chosen_ids"], batch["chosen_mask"])
            totals.append(sequence_logprobs(logits, batch["chosen_ids"],
                                            response_mask(batch["chosen_mask"], batch["chosen_length"]))[0])
    assert torch.cat(totals).mean().item() == pytest.approx(metrics["val/logps/chosen"], abs=1e-4)


def test_collate_keeps_what_dpo_reads(tiny_tokenizer):
    pair = encode_pair(tiny_tokenizer, "a :", "the river .", "rain .", None, 64, 16, TruncationReport())
    batch = collate_pairs(tiny_tokenizer.pad_token_id)([pair])
    scored = response_mask(batch["chosen_mask"], batch["chosen_length"])
    assert batch["chosen_ids"][0][scored[0].bool()].tolist() == pair.chosen_ids[pair.chosen_prompt_length:]


# Checkpoints at steps 4, 8, 12, 16, validations at 10 and 20; the run is killed after the third checkpoint.
# detail: a checkpoint at a step that also validates is written before that validation (in
# on_train_batch_end), and a run resumed from it does not run that validation again: its point would
# be missing from the curves. So no checkpoint step here is a validation step.
RESUME_ARGS = ["stage=dpo", "trainer.max_steps=20", "trainer.val_check_interval=10", "callbacks.checkpoint.every_n_steps=4",
               "stage.datamodule.batch_size=16", "stage.eval.num_prompts=32", "stage.eval.batch_size=32",
               "trainer.log_every_n_steps=1", "model.lora.r=4", "demo.preference_size=1000"]
CURVES = ("train/loss", "train/rewards/margins", "val/loss", "val/rewards/accuracies", "eval/gold_score",
          "eval/win_rate_vs_sft")


@pytest.mark.slow
def test_dpo_killed_after_a_checkpoint_and_resumed_gives_the_same_curves(tmp_path):
    """With the reference log-probs precomputed, the one path with state outside the checkpoint: the
    resumed run recomputes its cache and lands on the same curves (the reference on the fly keeps no
    state beyond what every stage checkpoints, resumed in tests/test_reliability.py)."""
    args = RESUME_ARGS + ["stage.reference.precompute=true"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = train_cli(args + [f"hydra.run.dir={straight}"])
    assert done.returncode == 0, done.stderr
    stopped = train_with_fault("kill_after_checkpoint:3", args + [f"hydra.run.dir={killed}"])
    assert stopped.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    resumed = train_cli([f"resume={killed}"])
    assert resumed.returncode == 0, resumed.stderr
    for tag in CURVES:
        assert scalar_curve(killed, tag) == scalar_curve(straight, tag), tag
    a, b = load_file(straight / "export" / "adapter_model.safetensors"), load_file(killed / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((straight / "metrics.json").read_text())["metrics"]
    mb = json.loads((killed / "metrics.json").read_text())["metrics"]
    timing = {k for k in ma if k.startswith("time/")}
    assert {k: v for k, v in ma.items() if k not in timing} == {k: v for k, v in mb.items() if k not in timing}
