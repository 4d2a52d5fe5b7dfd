"""Roles placed by Ray: a role ("trainer", "critic", "generator", ...) is a group of Ray actors, one
per rank, reserved together on a placement group of their own and joined in a torch.distributed
group of their own (gloo on CPU, NCCL on GPU), exactly as torchrun would start them. What a rank
runs is a plain function called on every worker (`RoleGroup.run`): a recipe's `main`, or one of its
roles' methods. Ray places and watches the processes; it never schedules the work (the recipe does).

    ray.init(...)                                       # a local cluster, or address="auto"
    trainer = start_role("trainer", 2, Resources(cpus=0.5))
    results = trainer.run(some_function, arg)           # on every rank; a list in rank order
    trainer.stop()

A worker that raises ends the role with that error (the others are stopped, not left hanging in a
collective); one that dies (killed, out of memory, a lost node) is named by role, rank and node.
Fractional CPUs are the default: on a 2-core machine two whole-CPU actors leave nothing for Ray's
own tasks and the cluster deadlocks.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ROLES_ENV",
    "Resources",
    "RoleError",
    "RoleGroup",
    "RoleSpec",
    "init_ray",
    "placed_roles",
    "role_actors",
    "set_rank_env",
    "start_role",
]

# set in a trainer rank by `--launcher ray`: the other roles it may use, {name: [actor names]} as JSON
ROLES_ENV = "ALIGNKIT_RAY_ROLES"

# what a worker inherits from the driver: alignkit's own switches (fault injection, rank errors),
# threads, and the Python path the driver imports alignkit from
_INHERITED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


class RoleError(RuntimeError):
    """A rank of a role failed or died; the message names the role, the rank and its node. `cause`:
    the rank's own exception when it raised one (None when it died or timed out)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class Resources:
    cpus: float = 0.5  # per rank; fractional on purpose (see the module docstring)
    gpus: float = 0.0
    memory_gib: float | None = None

    def __add__(self, other: Resources) -> Resources:
        """What one bundle reserves for two roles that share it."""
        memories = [m for m in (self.memory_gib, other.memory_gib) if m is not None]
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus, sum(memories) if memories else None)


@dataclass(frozen=True)
class RoleSpec:
    """A role as the `placement` section asks for it."""

    ranks: int
    resources: Resources
    colocate_with: str | None = None  # the role whose bundles this one's ranks share, rank i on bundle i


def init_ray(address: str | None = None, num_cpus: float | None = None) -> bool:
    """Join the cluster at `address` ("auto": the one `ray start` runs here), or start a local one.
    Quiet: no dashboard, and no auth token file written under the home directory. Returns whether
    this call connected (False: already connected)."""
    import ray  # local: Ray's import costs every other command a third of a second

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": "ERROR"}
    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
    return True


def set_rank_env(env: dict[str, str]) -> None:
    """`env` (RANK, WORLD_SIZE, LOCAL_RANK, ...) into this Ray actor's environment. An actor holding
    GPUs sees only its own, numbered from 0, so its LOCAL_RANK (the device it takes) is 0 there
    whatever its index among the node's ranks."""
    import ray

    os.environ.update(env)
    if ray.get_gpu_ids():
        os.environ["LOCAL_RANK"] = "0"


def placed_roles(cfg) -> dict[str, RoleSpec]:
    """The roles a recipe config's `placement` section puts on Ray actors of their own, those with
    ranks > 0; a role that shares another's reservation comes after it."""
    placement = getattr(cfg, "placement", None)
    if placement is None:
        return {}
    roles = {"generator": placement.generator, "critic": placement.critic, "reward": placement.reward}
    specs = {name: RoleSpec(r.ranks, Resources(r.cpus, r.gpus), r.colocate_with) for name, r in roles.items()}
    hosts = [name for name, spec in specs.items() if spec.ranks and spec.colocate_with is None]
    guests = [name for name, spec in specs.items() if spec.ranks and spec.colocate_with is not None]
    return {name: specs[name] for name in hosts + guests}


class _Worker:
    """One rank of a role: a Ray actor that sets the torch.distributed environment and runs what it
    is given."""

    def where(self) -> tuple[str, int]:
        """(this node's address, a free port on it): rank 0's becomes the group's rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, env: dict[str, str], cwd: str) -> None:
        """The rank's environment, and the driver's working directory where this node has it (as a
        torchrun rank inherits it: relative paths and `module:function` rewards resolve alike)."""
        set_rank_env(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)
            if cwd not in sys.path:
                sys.path.insert(0, cwd)

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return fn(*args, **kwargs)

    def host(self, factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        """Build the object this rank serves (e.g. a generation engine) and keep it."""
        self.hosted = factory(*args, **kwargs)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.hosted, method)(*args, **kwargs)


@dataclass
class RoleGroup:
    name: str
    workers: list[Any]  # Ray actor handles, rank order
    nodes: list[str]  # each rank's node address
    placement: Any = None  # the placement group its ranks run on
    owns_placement: bool = True  # False: another role's (colocated), removed by that role
    owns_workers: bool = True  # False: a handle on ranks another process started (`role_actors`)
    _stopped: bool = field(default=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.workers)

    def run(self, fn: Callable[..., Any], *args, timeout_s: float | None = None, **kwargs) -> list[Any]:
        """`fn(*args, **kwargs)` on every rank at once; the results in rank order. The first rank to
        fail ends the call: the role is stopped (its other ranks would wait in a collective for it
        forever) and a RoleError names the rank and node. `timeout_s`: the same, for a rank still
        running after that long."""
        return self.wait([w.run.remote(fn, args, kwargs) for w in self.workers], timeout_s)

    def call_all(self, method: str, *args, timeout_s: float | None = None, **kwargs) -> list[Any]:
        """`method(*args, **kwargs)` of every rank's hosted object (`host` builds it: with
        method="host", args are the factory and its arguments)."""
        if method == "host":
            factory, *rest = args
            return self.wait([w.host.remote(factory, tuple(rest), kwargs) for w in self.workers], timeout_s)
        return self.wait([w.call.remote(method, args, kwargs) for w in self.workers], timeout_s)

    def call_rank(self, rank: int, method: str, *args) -> Any:
        """`method(*args)` of rank `rank`'s hosted object, waited for; a failure (raised, or a dead
        actor) is one RoleError naming the role, rank and node. The role keeps running: the caller
        decides whether the run ends."""
        return self.call_ranks([rank], method, *args)[0]

    def call_ranks(self, ranks: list[int], method: str, *args) -> list[Any]:
        """As `call_rank`, on several ranks at once (the ranks of one tensor-parallel engine, which
        must all take part); the results in the order of `ranks`, the first failure raised."""
        import ray

        refs = [self.workers[rank].call.remote(method, args, {}) for rank in ranks]
        rank_of = dict(zip(refs, ranks))
        results, pending = {}, list(refs)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                where = f"role {self.name} rank {rank_of[ref]} on node {self.nodes[rank_of[ref]]}"
                raise RoleError(f"{where} failed in {method}: {type(cause).__name__}: {cause}") from None
        return [results[ref] for ref in refs]

    def wait(self, refs: list[Any], timeout_s: float | None = None) -> list[Any]:
        """The results of one call per rank (`refs` in rank order), failing as `run` does."""
        import ray

        rank_of = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                self.stop()
                ranks = ", ".join(str(rank_of[r]) for r in pending)
                raise RoleError(f"role {self.name}: rank(s) {ranks} still running after {timeout_s:g} s; stopped")
            ref = done[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except Exception as exc:  # a raised error, or a dead worker
                self.stop()
                cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
                raise RoleError(self._failure(rank_of[ref], exc), cause) from None
        return [results[i] for i in range(self.size)]

    def _failure(self, rank: int, exc: Exception) -> str:
        import ray

        where = f"role {self.name} rank {rank} on node {self.nodes[rank]}"
        if isinstance(exc, ray.exceptions.RayTaskError):  # the worker raised: its own error, one line
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            lines = str(cause).strip().splitlines() or [""]
            return f"{where} failed: {type(cause).__name__}: {lines[-1]}"
        if isinstance(exc, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
            return f"{where} died (killed, out of memory or its node lost): {type(exc).__name__}"
        return f"{where} failed: {type(exc).__name__}: {exc}"

    def stop(self) -> None:
        """Kill the ranks and free their reservation (idempotent; only the group's creator stops
        it, and a colocated role leaves the reservation to the role it shares)."""
        if self._stopped or not self.owns_workers:
            return
        import ray

        self._stopped = True
        for w in self.workers:
            ray.kill(w, no_restart=True)
        if self.placement is not None and self.owns_placement:
            remove_placement_group_quietly(self.placement)


def start_role(
    name: str,
    size: int,
    resources: Resources = Resources(),
    env: dict[str, str] | None = None,
    strategy: str = "PACK",
    ready_timeout_s: float = 120.0,
    actor_names: list[str] | None = None,
    reserve: Resources | None = None,
    share: RoleGroup | None = None,
) -> RoleGroup:
    """`size` ranks of role `name`, reserved together (a placement group of `size` bundles of
    `resources`, packed on as few nodes as fit unless `strategy` says otherwise), with the
    torch.distributed environment of a group of their own (RANK, WORLD_SIZE, MASTER_ADDR/PORT at
    rank 0's node). A reservation the cluster cannot grant within `ready_timeout_s` is an error
    naming what was asked for. `actor_names`: named actors, which other processes of the job find
    with `role_actors`. `reserve`: what each bundle holds, when more than this role's `resources`
    (a role to be colocated on it later). `share`: a started role whose bundles this one's ranks
    run on (rank i on its bundle i) instead of a reservation of their own."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if share is not None:
        if share.size != size or share.placement is None:
            raise RoleError(f"role {name}: cannot share role {share.name}'s reservation ({share.size} ranks)")
        group = share.placement
    else:
        group = _reserve(name, size, reserve or resources, strategy, ready_timeout_s)
    actor = ray.remote(_Worker)
    workers = [
        actor.options(
            name=actor_names[i] if actor_names else None,
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i),
        ).remote()
        for i in range(size)
    ]
    places = ray.get([w.where.remote() for w in workers])
    nodes = [host for host, _ in places]
    master, port = places[0]
    inherited = {k: os.environ[k] for k in _INHERITED if k in os.environ}
    inherited.update({k: v for k, v in os.environ.items() if k.startswith("ALIGNKIT_")})
    base = {**inherited, **(env or {}), "MASTER_ADDR": master, "MASTER_PORT": str(port), "WORLD_SIZE": str(size)}
    local_ranks = [nodes[:i].count(nodes[i]) for i in range(size)]
    cwd = os.getcwd()
    ray.get(
        [
            w.setup.remote({**base, "RANK": str(i), "LOCAL_RANK": str(local_ranks[i]), "ALIGNKIT_ROLE": name}, cwd)
            for i, w in enumerate(workers)
        ]
    )
    return RoleGroup(name, workers, nodes, group, owns_placement=share is None)


def _reserve(name: str, size: int, resources: Resources, strategy: str, ready_timeout_s: float):
    """A placement group of `size` bundles of `resources`, ready."""
    import ray
    from ray.util.placement_group import placement_group

    bundle: dict[str, float] = {"CPU": resources.cpus}
    if resources.gpus:
        bundle["GPU"] = resources.gpus
    if resources.memory_gib:
        bundle["memory"] = resources.memory_gib * 2**30
    group = placement_group([dict(bundle) for _ in range(size)], strategy=strategy, name=f"alignkit-{name}")
    try:
        ray.get(group.ready(), timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group_quietly(group)
        raise RoleError(
            f"role {name}: the cluster could not reserve {size} x {bundle} within {ready_timeout_s:g} s "
            f"(available: {ray.available_resources()})"
        ) from None
    return group


def remove_placement_group_quietly(group) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception:  # already gone with the cluster
        pass


def role_actors(name: str) -> RoleGroup:
    """The ranks of role `name` that `--launcher ray` started beside this trainer rank (their actor
    names are in ROLES_ENV), as a RoleGroup this process calls but does not own."""
    import json

    import ray

    roles = json.loads(os.environ.get(ROLES_ENV, "{}"))
    if name not in roles:
        raise RoleError(f"role {name}: not started by the launcher (roles here: {', '.join(roles) or 'none'})")
    workers = [ray.get_actor(actor) for actor in roles[name]]
    nodes = [host for host, _ in ray.get([w.where.remote() for w in workers])]
    return RoleGroup(name, workers, nodes, None, owns_workers=False)
