"""`--nproc N`: start N processes with torchrun and report a failure once, in one line.

Under plain torchrun, a data error that every rank hits is printed by every rank, followed by
torchrun's 40-line `ChildFailedError` report. Here torchrun runs in this process; each rank that
stops on an error alignkit reports (bad data, a bad config) hands its message to the launcher
through a file instead of printing it, and the launcher prints each distinct message once. A rank
that dies of anything else prints its own traceback, and the launcher names the rank.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["hand_error_to_launcher", "ray_launch", "torchrun"]

_ERRORS = "ALIGNKIT_RANK_ERRORS"  # the folder where ranks leave their one-line errors


def torchrun(nproc: int, argv: list[str]) -> tuple[int, list[str]]:
    """Run `python -m alignkit.cli ARGV` on `nproc` local processes (torchrun --standalone).
    Returns the exit code and the error lines to print (none on success)."""
    from torch.distributed import run as torch_run  # local: the launcher only, not each command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # said once, below
    with tempfile.TemporaryDirectory(prefix="alignkit-ranks-") as folder:
        os.environ[_ERRORS] = folder
        args = torch_run.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "alignkit.cli", *argv])
        try:
            torch_run.run(args)
            return 0, []
        except ChildFailedError as exc:
            return _summary(Path(folder), exc.get_first_failure())
        finally:
            os.environ.pop(_ERRORS, None)


def ray_launch(
    nproc: int,
    rank_main: Callable[..., None],
    args: tuple,
    address: str | None,
    reported: tuple[type, ...],
    roles: dict[str, Any] | None = None,
) -> tuple[int, list[str]]:
    """`--launcher ray`: `rank_main(*args)` on `nproc` ranks of a Ray role "trainer" (placed by a
    placement group on the cluster at `address`, or a local one), as torchrun would run them.
    `roles`: other roles to place first, {name: RoleSpec} (`placement.placed_roles`, a role that
    shares another's bundles after it), which the trainer's ranks find by name
    (`placement.role_actors`). Returns the exit code and the error line: 2 for an error of the
    `reported` kinds (bad input), 1 for anything else, naming the role, rank and node."""
    import json
    import uuid

    from alignkit.training.placement import ROLES_ENV, RoleError, init_ray, start_role

    roles = roles or {}
    started = init_ray(address)
    run_id = uuid.uuid4().hex[:8]
    groups, names = {}, {}
    try:
        for name, spec in roles.items():
            names[name] = [f"alignkit-{run_id}-{name}-{i}" for i in range(spec.ranks)]
            # a host's bundles also hold what the roles colocated with it reserve
            reserve = sum((s.resources for s in roles.values() if s.colocate_with == name), spec.resources)
            share = groups[spec.colocate_with] if spec.colocate_with else None
            groups[name] = start_role(
                name, spec.ranks, spec.resources, actor_names=names[name], reserve=reserve, share=share
            )
        trainer = start_role("trainer", nproc, _trainer_resources(nproc), env={ROLES_ENV: json.dumps(names)})
        groups["trainer"] = trainer
        trainer.run(rank_main, *args)
        return 0, []
    except RoleError as exc:
        return (2 if isinstance(exc.cause, reported) else 1), [str(exc)]
    finally:
        for group in reversed(groups.values()):  # a colocated role before the one whose bundles it shares
            group.stop()
        if started and address is None:  # the local cluster this call started (a demo runs several)
            import ray

            ray.shutdown()


def _trainer_resources(nproc: int):
    """A GPU per trainer rank on a cluster that has them for every rank (what torchrun gives a rank
    on a GPU node), else CPU only."""
    import ray

    from alignkit.training.placement import Resources

    return Resources(gpus=1.0 if ray.cluster_resources().get("GPU", 0) >= nproc else 0.0)


def _summary(folder: Path, first_failure: tuple) -> tuple[int, list[str]]:
    """One line per distinct message the ranks left, or the rank that failed first (the others
    were stopped by torchrun)."""
    messages: dict[str, list[int]] = {}
    for path in sorted(folder.glob("rank*")):
        messages.setdefault(path.read_text(), []).append(int(path.name[4:]))
    lines = [
        message if len(messages) == 1 else f"rank {','.join(map(str, ranks))}: {message}"
        for message, ranks in messages.items()
    ]
    if not lines:  # a crash, not a reported error: its traceback is above
        rank, failure = first_failure
        lines = [f"rank {rank} failed with exit code {failure.exitcode} (its output is above)"]
    return 2 if messages else 1, lines


def hand_error_to_launcher(message: str) -> bool:
    """Under `torchrun` above, leave this rank's one-line error for the launcher to print once;
    False when this process was not started that way (then the caller prints it)."""
    folder, rank = os.environ.get(_ERRORS), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return False
    Path(folder, f"rank{rank}").write_text(message)
    return True
