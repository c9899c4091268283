"""Arms on a Ray cluster: the launching machine's side of ``[placement] backend = "ray"`` (docs/cluster.md).

Each arm becomes one detached Ray actor (gputwin.control.ray_node.ArmRunner) that asks the cluster for the CPUs or
the GPU its profile needs and runs the ordinary trainer on whichever node it is given. On this machine, one
detached *mirror* process per arm (``python -m gputwin.control.ray_backend ARM_DIR``) stands where the local
supervisor stands: it writes the pid and exit files, so liveness, `gputwin status`, stop and resume work
as for a local arm, and it keeps ``logs/<experiment>/<arm>/`` in step with the node's work folder:

- a few times a second it pulls what the trainer appended to events.jsonl, stdout.log and stderr.log, and
  validation results and adapters that are new, and writes them here (files first, then the events that
  name them), so the UI, status and the report read local files as always;
- control requests dropped into the local control/ folder are sent on to the node; a request the trainer
  has handled is removed here too;
- while the actor waits for a node, it appends ``queued`` events with the arm's place among the gputwin
  arms waiting in the cluster, then ``placed`` with the node (docs/events.md);
- when the worker or the node under the arm is lost, it records the exit with the cause, so the arm shows
  as crashed and says why; `gputwin resume` then starts a new actor on the node that holds its checkpoints
  (any node with ``shared_path``), or attaches a new mirror to the actor when only the mirror had died.

Ray is imported only here and only when the ray backend is used: `pip install gputwin[ray]`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psutil

from . import requests as control
from ..core import events as ev
from ..core.errors import UserError
from ..core.paths import ArmPaths, ExperimentPaths, make_private_dir, write_atomic
from ..core.profiles import Experiment, Placement, Profile
from .ray_node import LOGS, ArmRunner
from .supervise import EXEC_FAILED, FORWARDED_SIGNALS, SpawnError, arm_lock, supervisor_file, wait_for_trainer

SPEC_FILE = "ray.json"  # the arm's placement: cluster, actor of its current life, node it last ran on
CURSOR_FILE = "ray-cursor.json"  # how far the mirror has copied, so a new mirror takes over without repeats
INSTALL_HINT = "pip install 'gputwin[ray]' (on this machine; every node needs gputwin and its models too)"
CONNECT_TIMEOUT_S = 5.0
PULL_EVERY_S = 0.3  # a control request reaches the node, and an event this machine, within about this
QUEUE_EVERY_S = 2.0  # how often a queued arm's place is looked up
QUEUED_AFTER_S = 3.0  # pending this long is waiting in the queue, not a worker process starting on its node
PULL_TIMEOUT_S = 60.0
UNREACHABLE_AFTER_S = 120.0  # the cluster has not answered for this long: the arm is recorded as lost
LOST_STATUS = -signal.SIGKILL  # a lost worker takes its trainer with it (the trainer dies with its parent)
PENDING_STATES = ("DEPENDENCIES_UNREADY", "PENDING_CREATION")
ACTOR_NAME = re.compile(r"^gputwin\.(\d+)\.")

Say = Callable[[str], None]


# ---------------------------------------------------------------- Ray itself, and the cluster


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("the ray backend needs Ray, which is not installed in this Python environment",
                        INSTALL_HINT + "; or remove [placement] backend = \"ray\" to run the arms here") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """("host", port) of "host:port" or "ray://host:port"; None for "auto" (a node finds its own cluster)."""
    if address in ("auto", "local"):
        return None
    bare = address.split("://", 1)[-1].rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def check_reachable(address: str, where: str) -> None:
    """A cluster that cannot be reached is refused before anything is written (Ray itself would retry
    for a minute and then fail with a long trace)."""
    try:
        target = _host_port(address)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}", 'address = "HEAD_HOST:6379", the port `ray start --head` printed') from None
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"{where}: the Ray cluster at {address} cannot be reached ({exc})",
                        "start it with `ray start --head --port=6379` on the head node (and `ray start "
                        "--address=HEAD:6379` on the others), or correct the address; see docs/cluster.md") from None


@contextmanager
def connected(address: str, namespace: str | None = None) -> Iterator[Any]:
    """This process as a driver of the cluster, quietly; disconnected afterwards."""
    ray = import_ray()
    ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def resources(profile: Profile) -> dict[str, float]:
    """What an arm asks the cluster for: a GPU arm one GPU (and a CPU to feed it); a CPU arm train.threads
    CPUs (1 when left to share: on a cluster each arm has its CPUs to itself)."""
    if profile.device is not None:
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": max(1, profile.train.threads), "num_gpus": 0}


def _asks(need: dict[str, float]) -> str:
    return f"{need['num_gpus']:g} GPU" if need["num_gpus"] else f"{need['num_cpus']:g} CPU"


def where_configured(placement: Placement, source: str) -> str:
    return f"{source}: [placement]" if source else "--ray"


def check_cluster(experiment: Experiment, say: Say) -> None:
    """Ray installed, the cluster reachable, and a word about arms no node could hold today."""
    placement = experiment.placement
    where = where_configured(placement, experiment.source)
    import_ray()
    check_reachable(str(placement.address), where)
    try:
        with connected(str(placement.address)) as ray:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds here; each means "not a usable cluster"
        raise UserError(f"{where}: cannot connect to the Ray cluster at {placement.address}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        "check the address and that this machine runs the Ray version of the cluster "
                        f"(`ray --version` here and there); {INSTALL_HINT}") from None
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    say(f"Ray cluster at {placement.address}: {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs")
    for profile in experiment.arms:
        need = resources(profile)
        if not any(n.get("Resources", {}).get("CPU", 0) >= need["num_cpus"]
                   and n.get("Resources", {}).get("GPU", 0) >= need["num_gpus"] for n in nodes):
            say(f"{profile.name}: no node of the cluster has {_asks(need)} free or not; it waits in the queue "
                "until a node that has joins")


# ---------------------------------------------------------------- the arm's placement file


def spec_path(arm: ArmPaths) -> Path:
    return arm.root / SPEC_FILE


def is_ray_arm(arm: ArmPaths) -> bool:
    return spec_path(arm).is_file()


def read_spec(arm: ArmPaths) -> dict[str, Any]:
    try:
        spec = json.loads(spec_path(arm).read_text(encoding="utf-8"))
        if not isinstance(spec, dict) or not isinstance(spec.get("address"), str):
            raise ValueError("not a placement record")
        return spec
    except (OSError, ValueError) as exc:
        raise UserError(f"{spec_path(arm)}: cannot be read ({exc})",
                        "it is written by `gputwin run` with the ray backend; run the experiment again") from None


def _actor_name(arm: str) -> str:
    """A fresh name for a new life of the arm; the time in it orders the queue (queue_place)."""
    return f"gputwin.{time.time_ns()}.{arm}"


def _trainer_env(profile: Profile, need: dict[str, float]) -> dict[str, str]:
    """What the trainer on the node gets besides the node's own environment: gputwin's settings (GPUTWIN_*,
    not the logs folder, which is this machine's), its share of threads, and no GPU for a CPU arm."""
    env = {k: v for k, v in os.environ.items() if k.startswith("GPUTWIN_") and k != "GPUTWIN_LOGS"}
    env["PYTHONUNBUFFERED"] = "1"
    if profile.device is None:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["GPUTWIN_THREADS"] = str(int(need["num_cpus"]))
    return env


def new_spec(exp: ExperimentPaths, experiment: Experiment, profile: Profile, run_id: str,
             command: Sequence[str] | None = None) -> dict[str, Any]:
    need = resources(profile)
    return {
        "address": experiment.placement.address,
        "shared_path": experiment.placement.shared_path,
        "namespace": f"gputwin-{run_id}",
        "key": f"{exp.name}-{run_id}",  # the experiment's work folder on the nodes
        "actor": _actor_name(profile.name),
        "resources": need,
        "env": _trainer_env(profile, need),
        "command": list(command) if command else None,
        "pin": None,  # a node id: a resume without a shared path goes where its checkpoints are
        "node": None,  # where the arm last ran (the mirror writes it on `placed`)
    }


# ---------------------------------------------------------------- starting arms


def start_mirror(arm: ArmPaths, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Write the arm's placement and start its mirror detached (own session, as supervise.start_supervisor)."""
    write_atomic(spec_path(arm), json.dumps(spec, indent=2) + "\n")
    for stale in (arm.pid, arm.exit):
        stale.unlink(missing_ok=True)
    out = os.open(arm.stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    err = os.open(arm.stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen([sys.executable, "-m", "gputwin.control.ray_backend", str(arm.root)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=os.getcwd(),
                                start_new_session=True, close_fds=True)
    finally:
        os.close(out)
        os.close(err)


def _wait(arm: ArmPaths, proc: subprocess.Popen[bytes]) -> int:
    try:
        return wait_for_trainer(arm, proc)
    except SpawnError as exc:
        raise UserError(str(exc), f"fix what {arm.stderr} reports, then `gputwin resume {arm.name}`") from None


def start_arms(exp: ExperimentPaths, experiment: Experiment, say: Say,
               commands: dict[str, Sequence[str]] | None = None) -> None:
    """One actor and one mirror per arm, all submitted before any is waited for (the cluster's queue decides
    the order they start in)."""
    run_id = secrets.token_hex(4)
    started = []
    for profile in experiment.arms:
        arm = exp.arm(profile.name)
        spec = new_spec(exp, experiment, profile, run_id, (commands or {}).get(profile.name))
        started.append((profile, arm, start_mirror(arm, spec)))
    failure: UserError | None = None
    for profile, arm, proc in started:
        try:
            pid = _wait(arm, proc)
        except UserError as exc:
            failure = failure or exc
            continue
        say(f"Submitted {profile.name} to the Ray cluster at {experiment.placement.address} "
            f"({_asks(resources(profile))}; mirror pid {pid}); log: {arm.root}")
    if failure is not None:
        raise failure


def respawn(arm: ArmPaths) -> int:
    """`gputwin resume` / `extend` of a cluster arm; returns the new mirror's pid.

    The actor of its last life still there (only the mirror had died): a new mirror takes it over. Else a
    new actor, on the node that has the arm's checkpoints, or anywhere with a shared path.
    """
    from ..core.profiles import load_resolved

    spec = read_spec(arm)
    check_reachable(spec["address"], str(spec_path(arm)))
    spec["env"] = _trainer_env(load_resolved(arm.profile_json), spec["resources"])  # as a local respawn: today's
    node = spec.get("node") or {}
    with connected(spec["address"], spec["namespace"]) as ray:
        try:
            ray.get_actor(spec["actor"])
            alive = True
        except ValueError:
            alive = False
        if not alive:
            spec["pin"] = None
            if node.get("node_id") and not spec.get("shared_path"):
                nodes = {n["NodeID"]: n for n in ray.nodes()}
                if not nodes.get(node["node_id"], {}).get("Alive"):
                    raise UserError(
                        f"arm {arm.name}: its checkpoints are on node {node.get('host')} ({node.get('ip')}), "
                        "which has left the Ray cluster, and no shared_path is configured",
                        "bring that node back into the cluster (`ray start --address=...` there), then resume "
                        "again; set [placement] shared_path to a folder every node sees so that any node can "
                        "resume an arm")
                spec["pin"] = node["node_id"]
            spec["actor"] = _actor_name(arm.name)
    return _wait(arm, start_mirror(arm, spec))


# ---------------------------------------------------------------- the mirror process


def queue_place(ray: Any, actor: str) -> tuple[int | None, int | None]:
    """(place, of): the arm among the gputwin arms the cluster has not placed yet, first submitted first.

    From the cluster's actor table (Ray's own bookkeeping; (None, None) when this Ray cannot say)."""
    match = ACTOR_NAME.match(actor)
    try:
        from ray._private.state import state

        table = state.actor_table(None)
    except Exception:  # noqa: BLE001 - an internal table: without it the arm is "queued", with no place
        return None, None
    stamps = sorted(int(m.group(1)) for info in table.values()
                    if info.get("State") in PENDING_STATES and (m := ACTOR_NAME.match(str(info.get("Name") or ""))))
    if match is None or int(match.group(1)) not in stamps:
        return None, len(stamps) or None
    return stamps.index(int(match.group(1))) + 1, len(stamps)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ray_reason(exc: BaseException) -> str:
    """The sentence of a Ray actor error that says why ("The actor is dead because its worker process has
    died."), without the ids and advice around it."""
    lines = [line.strip() for line in str(exc).splitlines()]
    for line in lines:
        if line.startswith("The actor is dead") or line.startswith("The actor died because"):
            return line.split(". ")[0].rstrip(".") + "."
    return _first_line(exc)


class Lost(Exception):
    """The arm's actor cannot go on; the message is the cause recorded in the exit file."""


class Mirror:
    """Keeps an arm folder here in step with its actor's work folder on a node (see the module's doc)."""

    def __init__(self, arm: ArmPaths) -> None:
        self.arm = arm
        self.spec = read_spec(arm)
        self.cursor = self._load_cursor()
        self.forwarded: set[str] = set()  # control requests sent to the node and not yet handled there
        self.signal: int | None = None
        self.signalled = False
        self.restarted_for: set[str] = set()
        self.ray: Any = None

    # ------------------------------------------------------------ bookkeeping files

    def _load_cursor(self) -> dict[str, Any]:
        try:
            cursor = json.loads((self.arm.root / CURSOR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cursor = {}
        if cursor.get("actor") != self.spec["actor"]:  # a new life: its logs start afresh on the node
            cursor = {"actor": self.spec["actor"], "have": cursor.get("have", {}), "placed": None}
        cursor.setdefault("offsets", {})
        # Bytes appended here after the cursor was saved came from the node (a mirror killed between the two).
        events_local = self.arm.events.stat().st_size if self.arm.events.exists() else 0
        if "events_local" in cursor and events_local > cursor["events_local"]:
            cursor["offsets"]["events.jsonl"] = cursor["offsets"].get("events.jsonl", 0) + events_local - cursor["events_local"]
        cursor["events_local"] = events_local
        return cursor

    def _save_cursor(self) -> None:
        self.cursor["events_local"] = self.arm.events.stat().st_size if self.arm.events.exists() else 0
        write_atomic(self.arm.root / CURSOR_FILE, json.dumps(self.cursor) + "\n")

    def _append_event(self, kind: str, **fields: Any) -> None:
        """An event of the mirror's own (queued, placed, stopped) on a line of its own in the local log."""
        fd = os.open(self.arm.events, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            ended = size == 0 or os.pread(fd, 1, size - 1) == b"\n"
            os.write(fd, (b"" if ended else b"\n") + (ev.dumps(ev.make(kind, **fields)) + "\n").encode("utf-8"))
        finally:
            os.close(fd)

    def _record_exit(self, status: int, cause: str | None = None) -> None:
        write_atomic(self.arm.exit, f"{status}" + (f" {cause}" if cause else "") + "\n")

    def _say(self, text: str) -> None:
        print(f"gputwin.ray: {self.arm.name}: {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------ the actor

    def _connect(self) -> None:
        ray = import_ray()
        ray.init(address=self.spec["address"], namespace=self.spec["namespace"], logging_level="ERROR",
                 log_to_driver=False)
        self.ray = ray

    def _files_to_ship(self) -> tuple[dict[str, bytes], dict[str, str | None]]:
        """The arm folder's inputs, by name in the experiment's work folder, and the profile keys that must
        point at the shipped copies on the node."""
        from ..core.profiles import load_resolved

        arm, name = self.arm, self.arm.name
        files = {f"{name}/profile.json": arm.profile_json.read_bytes()}
        for optional in (arm.profile_toml, arm.events, arm.root.parent / "experiment.json"):
            if optional.is_file():
                files[str(optional.relative_to(arm.root.parent))] = optional.read_bytes()
        for path, _request in control.pending(arm.control):
            files[f"{name}/control/{path.name}"] = path.read_bytes()
            self.forwarded.add(path.name)
        profile = load_resolved(arm.profile_json)
        relocate: dict[str, str | None] = {"train.output_dir": None}
        for key, source in (("data.train", profile.data.train), ("data.test", profile.data.test)):
            target = f"inputs/{key.split('.')[1]}{Path(source).suffix}"
            files[f"{name}/{target}"] = Path(source).read_bytes()
            relocate[key] = target
        if profile.model.init_adapter:
            folder = Path(profile.model.init_adapter)
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    files[f"{name}/inputs/init_adapter/{path.relative_to(folder)}"] = path.read_bytes()
            relocate["model.init_adapter"] = "inputs/init_adapter"
        return files, relocate

    def _create(self) -> Any:
        ray = self.ray
        options: dict[str, Any] = dict(name=self.spec["actor"], namespace=self.spec["namespace"],
                                       lifetime="detached", max_restarts=0, **self.spec["resources"])
        if self.spec.get("pin"):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.spec["pin"], soft=False)
        files, relocate = self._files_to_ship()
        self.cursor["offsets"] = {"events.jsonl": len(files.get(f"{self.arm.name}/events.jsonl", b""))}
        self._save_cursor()
        runner = ray.remote(ArmRunner).options(**options)
        return runner.remote(self.spec["key"], self.arm.name, self.spec.get("shared_path"), files, relocate,
                             self.spec["env"], self.spec.get("command"))

    def _actor(self) -> Any:
        """The actor of this life: found again when a previous mirror had made it, else made now."""
        try:
            return self.ray.get_actor(self.spec["actor"])
        except ValueError:
            if self.cursor.get("placed"):  # it ran, and is gone: not a new life
                raise Lost("the arm's Ray actor is gone (it ended while no mirror was watching)") from None
            return self._create()

    def _cause(self, exc: BaseException) -> str:
        """Why the actor died, in words: the node gone, or the worker process on it; with Ray's own reason."""
        node = self.cursor.get("placed") or {}
        reason = _ray_reason(exc)
        if not node:
            return f"the arm could not start on the Ray cluster: {reason}"
        where = f"{node.get('host')} ({node.get('ip')})"
        node_gone = "node has died" in str(exc)
        for _ in range(3):  # the cluster may learn of a lost node a moment after the actor's end
            if node_gone:
                break
            try:
                alive = {n["NodeID"]: n.get("Alive") for n in self.ray.nodes()}
            except Exception:  # noqa: BLE001
                break
            node_gone = not alive.get(node.get("node_id"), False)
            time.sleep(0.5)
        if node_gone:
            return f"its node {where} left the Ray cluster (Ray: {reason})"
        return f"the Ray worker process running it on {where} died (Ray: {reason})"

    # ------------------------------------------------------------ the loop

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signal = signum

    def _stop_requested(self) -> bool:
        return any(isinstance(r, control.Request) and r.action == control.STOP
                   for _, r in control.pending(self.arm.control))

    def _stop_while_queued(self, actor: Any) -> int:
        """Stopped before it had a node: nothing ran, so the arm is stopped where its last life left it."""
        from ..reading import foldcache

        self.ray.kill(actor)
        for path, request in control.pending(self.arm.control):
            if isinstance(request, control.Request) and request.action == control.STOP:
                control.consume(path)
        fold, _ = foldcache.fold_log(self.arm.events, self.arm.name)
        self._append_event(ev.STOPPED, step=fold.step, reason="stopped while queued on the Ray cluster")
        return 0

    def _wait_for_node(self, actor: Any) -> int | None:
        """Queued until the cluster places the actor; returns an exit status when it never got there."""
        ready = actor.where.remote()
        last: tuple[int | None, int | None] | None = None
        next_look = time.monotonic() + QUEUED_AFTER_S
        while True:
            done, _ = self.ray.wait([ready], timeout=PULL_EVERY_S)
            if done:
                break
            if self.signal is not None or self._stop_requested():
                return self._stop_while_queued(actor)
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + QUEUE_EVERY_S
                place = queue_place(self.ray, self.spec["actor"])
                if place != last:
                    last = place
                    self._append_event(ev.QUEUED, arm=self.arm.name, place=place[0], of=place[1],
                                       cluster=self.spec["address"], **{"asks": self.spec["resources"]})
        try:
            where = self.ray.get(ready)
        except self.ray.exceptions.RayActorError as exc:
            self._say(str(exc))
            raise Lost(self._cause(exc)) from None
        self.cursor["placed"] = where
        for name, size in where.get("log_sizes", {}).items():
            self.cursor["offsets"].setdefault(name, size)
        self.spec["node"] = where
        write_atomic(spec_path(self.arm), json.dumps(self.spec, indent=2) + "\n")
        self._append_event(ev.PLACED, arm=self.arm.name, node=where["host"], ip=where["ip"],
                           node_id=where["node_id"], work=where["work"])
        self._save_cursor()
        return None

    def _forward(self, actor: Any) -> None:
        for path, _request in control.pending(self.arm.control):
            if path.name in self.forwarded:
                continue
            try:
                data = path.read_bytes()[: control.MAX_REQUEST_BYTES + 1]
            except OSError:
                continue
            actor.put_control.remote(path.name, data)  # calls from one caller run in order: before the next pull
            self.forwarded.add(path.name)

    def _apply(self, pulled: dict[str, Any]) -> bool:
        """Write what the node sent: files first, then the log bytes whose events name them."""
        for rel, data in pulled["files"].items():
            target = self.arm.root / rel
            make_private_dir(target.parent)
            write_atomic(target, self._localised(rel, data))
            self.cursor["have"][rel] = pulled["stamps"][rel]
        for name in LOGS:
            data = pulled["logs"].get(name)
            if not data:
                continue
            fd = os.open(self.arm.root / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.cursor["offsets"][name] = self.cursor["offsets"].get(name, 0) + len(data)
        handled = self.forwarded - set(pulled["control"])
        for name in handled:  # the trainer acted on it there: gone here too
            (self.arm.control / name).unlink(missing_ok=True)
        self.forwarded -= handled
        changed = bool(pulled["files"] or pulled["logs"])
        if changed:
            self._save_cursor()
        return changed

    def _localised(self, rel: str, data: bytes) -> bytes:
        """A validation result names the test file it scored: the node's copy becomes the file it is a copy of,
        so the verdict sees every arm (and the reference) scored on the same file, as they were."""
        work = (self.cursor.get("placed") or {}).get("work")
        if not work or not rel.startswith("validation/") or not rel.endswith(".json"):
            return data
        try:
            result = json.loads(data)
            from ..core.profiles import load_resolved

            local = load_resolved(self.arm.profile_json).data.test
        except (ValueError, UserError):
            return data
        if not isinstance(result, dict) or result.get("test_data") != str(Path(work) / "inputs" / f"test{Path(local).suffix}"):
            return data
        result["test_data"] = local
        return (json.dumps(result, indent=2) + "\n").encode("utf-8")

    def _pull(self, actor: Any) -> dict[str, Any]:
        offsets = {name: self.cursor["offsets"].get(name, 0) for name in LOGS}
        quiet_since = time.monotonic()
        while True:
            try:
                return self.ray.get(actor.pull.remote(offsets, self.cursor["have"]), timeout=PULL_TIMEOUT_S)
            except self.ray.exceptions.RayActorError as exc:
                if isinstance(exc, getattr(self.ray.exceptions, "ActorUnavailableError", ())) \
                        and time.monotonic() - quiet_since < UNREACHABLE_AFTER_S:
                    time.sleep(1.0)  # a transient loss of contact: Ray says the actor may come back
                    continue
                self._say(str(exc))
                raise Lost(self._cause(exc)) from None
            except Exception as exc:  # noqa: BLE001 - the cluster out of reach (head restarting, network)
                if time.monotonic() - quiet_since > UNREACHABLE_AFTER_S:
                    raise Lost(f"the Ray cluster at {self.spec['address']} stopped answering: {_first_line(exc)}") from None
                time.sleep(1.0)

    def _late_extends(self) -> set[str]:
        return {path.name for path, r in control.pending(self.arm.control)
                if isinstance(r, control.Request) and r.action == control.EXTEND}

    def _mirror(self, actor: Any) -> int:
        """Copy until the trainer has ended and everything it wrote is here; returns its exit status."""
        while True:
            if self.signal is not None and not self.signalled:
                actor.signal.remote(self.signal)  # stopping the mirror stops the trainer, as the supervisor does
                self.signalled = True
            self._forward(actor)
            pulled = self._pull(actor)
            self._apply(pulled)
            code = pulled["exit"]
            if code is not None and not pulled["more"]:
                with arm_lock(self.arm):
                    waiting = self._late_extends() if code == 0 else set()
                    if waiting - self.restarted_for:
                        self.restarted_for |= waiting
                        self._say("an extend request arrived as the trainer ended; starting it again to apply it")
                        self._forward(actor)
                        self.ray.get(actor.restart.remote())
                        continue
                    self._record_exit(int(code))  # under the lock, as the supervisor does
                return int(code)
            if not pulled["more"]:
                time.sleep(PULL_EVERY_S)

    def run(self) -> tuple[int, str | None]:
        """Mirror the arm to its end; returns the exit status and the cause to record (None: the trainer's own)."""
        me = psutil.Process()
        record = f"{os.getpid()} {me.create_time():.3f}\n"
        write_atomic(supervisor_file(self.arm), record)
        write_atomic(self.arm.pid, record)  # the arm is alive here as long as its mirror is
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            self._connect()
        except Exception as exc:  # noqa: BLE001
            return EXEC_FAILED, f"cannot connect to the Ray cluster at {self.spec['address']}: {_first_line(exc)}"
        actor = None
        try:
            actor = self._actor()
            if not self.cursor.get("placed"):
                stopped = self._wait_for_node(actor)
                if stopped is not None:
                    return stopped, None
            code = self._mirror(actor)
        except Lost as exc:
            return LOST_STATUS, str(exc)
        if code != 0:
            self._say(f"trainer ended: exit status {code}")
        try:
            self.ray.kill(actor)  # its work is done; its CPUs or GPU go back to the cluster
        except Exception:  # noqa: BLE001
            pass
        return code, None

    def finish(self, status: int, cause: str | None) -> None:
        """Record the exit unless the trainer's own was recorded already (supervise.arm_alive counts an arm
        whose mirror recorded its exit as ended, while the mirror leaves)."""
        if cause:
            self._say(cause)
        if not self.arm.exit.exists():
            with arm_lock(self.arm):
                self._record_exit(status, cause)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m gputwin.control.ray_backend ARM_DIR", file=sys.stderr)
        return 2
    mirror = Mirror(ArmPaths(Path(args[0]).resolve()))
    status, cause = mirror.run()
    mirror.finish(status, cause)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status == 0 else 1)  # not Ray's teardown: the cluster forgets a driver that has gone


if __name__ == "__main__":
    sys.exit(main())
