"""Run train.py in this process with a fault injected, for tests of what survives a crash.

    python tests/support/run_with_faults.py <fault> <train.py overrides...>

Faults (the test decides which, through argv[1]):
  kill_after_checkpoint:N   SIGKILL this process right after the N-th checkpoint is on disk
  kill_during_checkpoint:N  SIGKILL it halfway through writing the N-th checkpoint file
  nan_loss_at_step:N        the SFT loss of the N-th training batch (1-based) is NaN
  nan_score_at_rollout:N    the PPO scores of the N-th rollout are NaN
  nan_advantage_at_rollout:N  one GAE advantage of the N-th PPO rollout is NaN
  nan_gradient_at_step:N    one gradient entry of the N-th reward-model optimizer step is NaN
  kill_at_batch:N           SIGKILL this process when the N-th training batch starts (the points of the
                            batches before it are on disk)
  file_size_limit_after_checkpoint:N:BYTES
                            once the N-th checkpoint is on disk, no file may grow past BYTES
                            (RLIMIT_FSIZE, SIGXFSZ ignored: write() fails with EFBIG, as on a full disk,
                            for real, inside torch.save)
  file_size_limit_at_export:BYTES  the same, from the moment the stage starts its export
  none                      no fault
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def limit_file_size(limit: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def install(fault: str) -> None:
    if fault == "none":
        return
    name, _, arg = fault.partition(":")
    count = {"n": 0}
    if name == "kill_after_checkpoint":
        from lightrlhf.callbacks.checkpoint import PeriodicCheckpoint

        original = PeriodicCheckpoint.save

        def save(self, trainer, *args, **kwargs):
            path = original(self, trainer, *args, **kwargs)
            count["n"] += 1
            if count["n"] == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        PeriodicCheckpoint.save = save
    elif name == "kill_during_checkpoint":
        import lightrlhf.io as lio

        original_write = lio.atomic_write

        def atomic_write(path, write):
            if str(path).endswith(".ckpt"):
                count["n"] += 1
                if count["n"] == int(arg):
                    def torn(f):
                        f.write(b"partial checkpoint bytes")
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original_write(path, torn)
            return original_write(path, write)

        lio.atomic_write = atomic_write
        import lightrlhf.callbacks.checkpoint as ckpt_module

        ckpt_module.atomic_write = atomic_write
    elif name == "nan_loss_at_step":
        import lightrlhf.stages.sft as sft

        original_loss = sft.sft_loss

        def sft_loss(logits, input_ids, loss_mask):
            loss, tokens = original_loss(logits, input_ids, loss_mask)
            if logits.requires_grad:  # training batches only
                count["n"] += 1
                if count["n"] == int(arg):
                    loss = loss * float("nan")
            return loss, tokens

        sft.sft_loss = sft_loss
    elif name == "nan_score_at_rollout":
        from lightrlhf.stages.ppo import PPOStage

        original_rollout = PPOStage.rollout

        def rollout(self, *args, **kwargs):
            roll = original_rollout(self, *args, **kwargs)
            count["n"] += 1
            if count["n"] == int(arg):
                roll.scores = roll.scores * float("nan")
            return roll

        PPOStage.rollout = rollout
    elif name == "nan_advantage_at_rollout":
        import lightrlhf.stages.ppo as ppo

        original_gae = ppo.gae

        def gae(*args, **kwargs):
            advantages, returns = original_gae(*args, **kwargs)
            count["n"] += 1
            if count["n"] == int(arg):
                advantages = advantages.clone()
                advantages[0, 0] = float("nan")
            return advantages, returns

        ppo.gae = gae
    elif name == "nan_gradient_at_step":
        import lightrlhf.stages.base as base  # the clipping SFT and RM share (StageModule)
        import lightrlhf.stages.rm as rm  # the RM's own (per ensemble member)
        from lightrlhf.stages.rm import RewardModelStage

        original_guard = base.guard_and_clip

        def guard_and_clip(stage, optimizer, max_grad_norm, **kwargs):
            if isinstance(stage, RewardModelStage):
                count["n"] += 1
                if count["n"] == int(arg):
                    param = next(p for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
                    param.grad.view(-1)[0] = float("nan")
            return original_guard(stage, optimizer, max_grad_norm, **kwargs)

        base.guard_and_clip = rm.guard_and_clip = guard_and_clip
    elif name == "kill_at_batch":
        from lightrlhf.callbacks.checkpoint import PeriodicCheckpoint

        def on_train_batch_start(self, trainer, *args):
            count["n"] += 1
            if count["n"] == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)

        PeriodicCheckpoint.on_train_batch_start = on_train_batch_start
    elif name == "file_size_limit_after_checkpoint":
        from lightrlhf.callbacks.checkpoint import PeriodicCheckpoint

        nth, limit = (int(x) for x in arg.split(":"))
        original = PeriodicCheckpoint.save

        def save(self, trainer, *args, **kwargs):
            path = original(self, trainer, *args, **kwargs)
            count["n"] += 1
            if count["n"] == nth:
                limit_file_size(limit)
            return path

        PeriodicCheckpoint.save = save
    elif name == "file_size_limit_at_export":
        from lightrlhf.stages.ppo import PPOStage
        from lightrlhf.stages.rm import RewardModelStage
        from lightrlhf.stages.sft import SFTStage

        def limited(export):
            def limited_export(self, *args, **kwargs):
                limit_file_size(int(arg))
                return export(self, *args, **kwargs)
            return limited_export

        for stage in (SFTStage, RewardModelStage, PPOStage):
            stage.export = limited(stage.export)
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = [str(ROOT / "train.py")] + sys.argv[2:]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
