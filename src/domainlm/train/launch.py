"""`domainlm launch`: a command on several processes and machines through torchrun, its failures in one line.

    domainlm launch --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 pretrain ...

is `torchrun <the same options> -m domainlm.cli pretrain ...`: torch's own elastic agent starts, watches and (with
--max-restarts) restarts the workers, and its c10d rendezvous gathers the machines. What this module adds is the
end of a run that fails: torchrun ends a rendezvous that times out, or a worker that fails, with a traceback and a
table; here it is one line that says what happened and what to do (a worker that stops on a domainlm error has said
why in its own line, and the launcher adds nothing). The options before the domainlm command are torchrun's
(`--help` lists them).
"""

from __future__ import annotations

import os
import sys

from domainlm.errors import DomainLMError


def split_arguments(argv: list[str], commands: set[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the domainlm command and its options): the command is the first word that names one."""
    for i, word in enumerate(argv):
        if word in commands and (
            i == 0 or not argv[i - 1].startswith("-") or "=" in argv[i - 1] or argv[i - 1] in _FLAGS_WITHOUT_VALUE
        ):
            return argv[:i], argv[i:]
    raise DomainLMError(
        "launch: name the domainlm command to run after torchrun's options, e.g. "
        "`domainlm launch --nproc-per-node 2 pretrain --corpus ... --out ...`"
    )


# torchrun options that take no value: a command name right after one of them is the command
_FLAGS_WITHOUT_VALUE = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path", "-m", "--module"}


def _join_timeout(args) -> str:
    for item in (args.rdzv_conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "join_timeout":
            return f"{value.strip()} s"
    return "600 s (torch's default)"


def launch(argv: list[str], commands: set[str]) -> int:
    """Run `argv` (torchrun's options, then a domainlm command) under torch's elastic agent; the exit status of
    the run. A rendezvous that times out, one that cannot be reached, or a failed worker raises DomainLMError
    (its one line)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    if not argv or argv[0] in ("-h", "--help"):
        from torch.distributed.run import get_args_parser

        print(
            "usage: domainlm launch [torchrun options] COMMAND [command options]\n\n"
            "torchrun's options (its TRAINING_SCRIPT is `-m domainlm.cli COMMAND`):",
            file=sys.stderr,
        )
        get_args_parser().print_help(sys.stderr)
        return 0 if argv else 2
    options, command = split_arguments(argv, commands)
    args = parse_args([*options, "-m", "domainlm.cli", *command])
    if args.max_restarts:
        # With the rendezvous's store shared with the workers (torch's default since 2.4), a restarted group can read
        # the addresses its predecessors left there and fail to connect (pytorch/pytorch#135712): each group of
        # workers gets a store of its own, as before. Every node must agree, and every node runs this same command.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    where = f"the rendezvous at {args.rdzv_endpoint}" if args.rdzv_endpoint else "the rendezvous"
    try:
        run(args)
    except RendezvousTimeoutError:
        raise DomainLMError(
            f"{where} did not gather --nnodes {args.nnodes} within the join timeout of {_join_timeout(args)}: start "
            "the same command on every node (each with the same --rdzv-endpoint and --rdzv-id), check that each "
            "reaches the endpoint, or give --rdzv-conf join_timeout=SECONDS"
        ) from None
    except RendezvousError as e:
        raise DomainLMError(f"{where} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code == 2:  # a domainlm error: the worker has said it, in one line
            return code
        how = (
            f"was killed by signal {failure.signal_name()}"
            if code is not None and code < 0
            else f"exited with code {code}"
        )
        restarts = f" after {args.max_restarts} restart(s)" if args.max_restarts else ""
        print(
            f"error: worker rank {rank} (local rank {failure.local_rank}) {how}{restarts}; its own message, if any, is "
            "above",
            file=sys.stderr,
        )
        return code if code is not None and code > 0 else 1
    return 0
