"""A Python that has already imported what train.py loads, and forks a child for each run.

Most of a short test run of train.py is its imports (torch, Lightning, transformers, peft: ten
seconds or more on the 2-core CI machine, as long as the training itself). This server pays them
once per test worker; each run is a forked child that runs the script as `python <script> <args>`
(or `python -m <module> <args>`) would (runpy, `__main__`), with its own pid, working directory, environment, stdout and stderr
files, exit status and signals. Nothing has run in the server when it forks: no Hydra state, no
torch thread pool, only modules imported.

Protocol (JSON lines on stdin/stdout): the request {"argv", "cwd", "env", "stdout", "stderr"}
is answered with {"pid"} once the child runs and {"status"} (os.waitstatus_to_exitcode: negative
for a signal) once it ended.
"""

import json
import os
import sys


def _preload() -> None:
    import hydra  # noqa: F401

    import lightrlhf.launch

    entry = lightrlhf.launch.run  # what train.py imports: the lazy entry, before its submodule loads
    import lightning.pytorch  # noqa: F401
    import peft  # noqa: F401
    import tensorboard  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import lightrlhf.data.modules  # noqa: F401
    import lightrlhf.demo.task  # noqa: F401
    import lightrlhf.launch.run  # noqa: F401
    import lightrlhf.models.actor_critic  # noqa: F401
    import lightrlhf.models.reward  # noqa: F401
    import lightrlhf.stages.best_of_n  # noqa: F401
    import lightrlhf.stages.dpo  # noqa: F401
    import lightrlhf.stages.grpo  # noqa: F401
    import lightrlhf.stages.ppo  # noqa: F401
    import lightrlhf.stages.rm  # noqa: F401
    import lightrlhf.stages.sft  # noqa: F401

    lightrlhf.launch.run = entry  # importing the submodule `lightrlhf.launch.run` had replaced it


def serve(requests, replies) -> dict:
    """Answer requests until one is for the child this returns in (the server itself never returns)."""
    for line in requests:
        request = json.loads(line)
        replies.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()
    sys.exit(0)


def become(request: dict) -> None:
    """In the child: the process `python <argv>` would have started, stdin closed."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    # as `python <script>` sets it (the script's folder), or `python -m <module>` (the working directory)
    sys.path[0] = os.getcwd() if sys.argv[0] == "-m" else os.path.dirname(os.path.abspath(sys.argv[0]))


if __name__ == "__main__":
    # the protocol gets its own descriptors; 0 and 1 are then the child's to replace
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the imports print goes to the server's log, not into the replies
    _preload()
    request = serve(requests, replies)
    requests.close()
    replies.close()
    become(request)
    import runpy

    if sys.argv[0] == "-m":  # `python -m <module> <args>`
        module = sys.argv[1]
        sys.argv = [module] + sys.argv[2:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(sys.argv[0], run_name="__main__")
