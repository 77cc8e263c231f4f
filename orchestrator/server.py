"""The Orchestrator service: Generate as a stream of events, ListModels, and the training-job RPCs (SubmitJob,
GetJob, ListJobs, CancelJob, JobLogs) over an `orchestrator.jobs.service.Jobs`."""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from orchestrator import families
from orchestrator.errors import StageError, invalid
from orchestrator.journal import Journal, fingerprint
from orchestrator.runner import RunContext, Runner
from protos import orchestrator_pb2, orchestrator_pb2_grpc

if TYPE_CHECKING:
    from orchestrator.jobs.service import Jobs

log = logging.getLogger(__name__)
SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a store key part (no '..' either)
_DONE = object()
DEADLINE_MARGIN_S = 0.25
NO_DEADLINE_S = 1e7  # a longer "deadline" is grpc's way of saying there is none


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name longer than the filesystem allows: no such model here
        return False


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(
        self,
        runner: Runner,
        model_roots: tuple[Path, ...] = (),
        cache_dir: Path | None = None,
        jobs: Jobs | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.runner = runner
        self.journal = journal  # None: no resume, no idempotency by request id
        self._inflight: dict[str, tuple[threading.Lock, int]] = {}
        self._inflight_lock = threading.Lock()
        self.model_roots = model_roots
        # Where hf:// and modelscope:// models are fetched to (shared with the stages).
        self.cache_dir = cache_dir
        self.jobs = jobs  # training jobs; None: this orchestrator launches none (UNIMPLEMENTED)

    def _model_dir(self, spec: str) -> Path | None:
        """The local directory of a model spec when this process can see it (to read its model_index.json):
        a path under the model roots, or a hub model already in the cache
        (`<cache>/<scheme>/<org>--<name>/<revision or main>`, the layout of services.common.models.cache_path)."""
        if "://" in spec:
            scheme, _, ident = spec.partition("://")
            name, _, rev = ident.partition("@")
            if self.cache_dir is None or scheme not in ("hf", "modelscope") or ".." in ident:
                return None
            path = self.cache_dir / scheme / name.replace("/", "--") / (rev or "main")
            return path if path.is_dir() else None
        if "\x00" in spec:
            raise invalid(f"model {spec!r} contains a NUL character")
        path = Path(spec)
        candidates = (
            [path] if path.is_absolute() or not self.model_roots else [r / path for r in self.model_roots]
        )
        if self.model_roots:  # as the stages resolve specs: no way out of the roots, by '..' or links
            roots = [r.resolve() for r in self.model_roots]
            for c in candidates:
                resolved = c.resolve()
                if not any(resolved == r or r in resolved.parents for r in roots):
                    raise invalid(
                        f"model {spec!r} is outside the model roots {[str(r) for r in self.model_roots]}"
                    )
        return next((c for c in candidates if _is_dir(c)), None)

    def generate(
        self,
        request: orchestrator_pb2.GenerateRequest,
        emit,
        cancelled: threading.Event | None = None,
        deadline: float | None = None,
    ) -> orchestrator_pb2.GenerateResult:
        """Plan and run one request (the in-process API; Generate streams around it). Setting `cancelled`
        stops it at the next stage or denoising step with CANCELLED. A request with a client-given id is
        journaled (orchestrator/journal.py) when this orchestrator has a journal: a retry of it resumes, or
        returns the finished result, instead of computing again."""
        if not request.model:
            raise invalid("model is required")
        rid = request.request_id or uuid.uuid4().hex
        if not _REQUEST_ID.match(rid) or ".." in rid:
            raise invalid(
                f"request_id {rid[:200]!r}: 1-128 chars of [A-Za-z0-9._-], starting with a letter or digit, no '..'"
            )
        started = time.perf_counter()
        model_dir = self._model_dir(request.model)
        family = families.detect(model_dir, request.family, request.model)
        plan = family.plan(request, model_dir)  # a bad request fails here, before the journal is touched
        ctx = RunContext(
            request_id=rid,
            params=plan.params,
            emit=emit,
            cancelled=cancelled or threading.Event(),
            deadline=deadline,
        )
        if self.journal is None or not request.request_id:
            values = self.runner.run(plan.graph, plan.values, ctx)
        else:
            with self._one_at_a_time(rid, ctx):
                plan, values = self._run_journaled(request, family, model_dir, plan, ctx)
        result = family.finish(values, plan)
        result.request_id = rid
        result.timings.extend(ctx.timings)
        result.total_seconds = time.perf_counter() - started
        return result

    @contextmanager
    def _one_at_a_time(self, rid: str, ctx: RunContext) -> Iterator[None]:
        """Submissions of one request id in this process run one after the other (the later ones then find
        the first one's journal)."""
        with self._inflight_lock:
            lock, users = self._inflight.get(rid, (threading.Lock(), 0))
            self._inflight[rid] = (lock, users + 1)
        try:
            waiting = False
            while not lock.acquire(timeout=0.1):
                if not waiting:
                    waiting = True
                    ctx.emit(_waiting_event(f"request {rid} is already running on this orchestrator"))
                ctx.check_cancelled("journal")
                if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                    raise StageError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid} is still running", "journal"
                    )
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._inflight_lock:
                lock, users = self._inflight[rid]
                if users == 1:
                    del self._inflight[rid]
                else:
                    self._inflight[rid] = (lock, users - 1)

    def _run_journaled(self, request, family, model_dir, plan, ctx: RunContext):
        """Claim the request's journal entry, resume or replay it, record each finished stage."""
        journal = self.journal
        assert journal is not None
        rid = ctx.request_id
        seed = getattr(plan.params, "seed", None)
        entry = journal.claim(
            rid,
            fingerprint(request),
            ctx.deadline,
            ctx.cancelled,
            on_wait=lambda owner: ctx.emit(
                _waiting_event(f"request {rid} is running on orchestrator {owner}")
            ),
            seed=seed,
        )
        if entry.seed is not None and entry.seed != seed:  # a random seed drawn by the first run
            again = orchestrator_pb2.GenerateRequest()
            again.CopyFrom(request)
            again.seed = entry.seed
            plan = family.plan(again, model_dir)
            ctx.params = plan.params
        ctx.resumed = journal.load_stages(entry, ctx.deadline) if entry.stages else {}
        ctx.resumed_from = journal.objects.where(journal.head_key(rid))
        if not entry.owned:
            # finished before: its stages come from the journal (one whose record is lost runs again)
            return plan, self.runner.run(plan.graph, plan.values, ctx)
        if entry.seed is None and seed is not None:
            journal.set_seed(entry, seed, ctx.deadline)
        ctx.on_stage_done = lambda stage, outputs, seconds, endpoint: journal.stage_done(
            entry, stage, outputs, seconds, endpoint, ctx.deadline
        )
        with journal.heartbeat(entry):
            try:
                values = self.runner.run(plan.graph, plan.values, ctx)
            except StageError as e:
                journal.finish(entry, e)
                raise
            except BaseException as e:
                journal.finish(entry, StageError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
                raise
        journal.finish(entry)
        return plan, values

    def Generate(self, request, context: grpc.ServicerContext) -> Iterator[orchestrator_pb2.GenerateEvent]:
        events: queue.Queue = queue.Queue()
        outcome: dict[str, object] = {}
        cancelled = threading.Event()
        remaining = context.time_remaining()  # ~9.2e18 s when the client set no deadline
        # the client's deadline, less a margin for the answer to reach it: every stage call gets what is left
        deadline = None
        if remaining is not None and remaining < NO_DEADLINE_S:
            deadline = time.monotonic() + max(remaining - DEADLINE_MARGIN_S, 0.001)

        def work() -> None:
            try:
                outcome["result"] = self.generate(request, events.put, cancelled, deadline)
            except BaseException as e:
                outcome["error"] = e
            finally:
                events.put(_DONE)

        worker = threading.Thread(target=work, name="generate", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    if not context.is_active():  # the client cancelled or its deadline passed
                        cancelled.set()
                    continue
                if event is _DONE:
                    break
                yield event
        finally:
            if worker.is_alive():  # the stream was closed early: stop the work, free its resources
                cancelled.set()
        error = outcome.get("error")
        if isinstance(error, StageError):
            context.abort(error.code, str(error))
        if error is not None:
            raise error  # type: ignore[misc]
        yield orchestrator_pb2.GenerateEvent(result=outcome["result"])

    def ListModels(self, request, context: grpc.ServicerContext) -> orchestrator_pb2.ListModelsResponse:
        resp = orchestrator_pb2.ListModelsResponse(families=sorted(families.FAMILIES))
        for root in self.model_roots:
            for index in sorted(root.glob("*/model_index.json")):
                try:
                    data = json.loads(index.read_text())
                except (OSError, ValueError) as e:  # one broken folder must not hide the other models
                    log.warning("ListModels: skipping %s: %s", index, e)
                    continue
                class_name = str(data.get("_class_name", "")) if isinstance(data, dict) else ""
                fam = next((f for f in families.FAMILIES.values() if class_name in f.pipeline_classes), None)
                resp.models.add(
                    spec=str(index.parent),
                    family=fam.name if fam else "",
                    variant=class_name,
                    tasks=list(fam.tasks) if fam else [],
                )
        return resp

    # -----------------------------------------------------------------------------------------------------
    # Training jobs

    def _jobs(self, context: grpc.ServicerContext) -> Jobs:
        if self.jobs is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this orchestrator launches no training jobs")
        return self.jobs  # type: ignore[return-value]

    def _job_call(self, context: grpc.ServicerContext, fn, *args):
        try:
            return fn(*args)
        except StageError as e:
            context.abort(e.code, e.message)

    def SubmitJob(self, request, context: grpc.ServicerContext) -> orchestrator_pb2.Job:
        if not request.HasField("spec"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec is required")
        return self._job_call(context, self._jobs(context).submit, request.spec, request.launch)

    def GetJob(self, request, context: grpc.ServicerContext) -> orchestrator_pb2.Job:
        return self._job_call(context, self._jobs(context).get, request.id)

    def ListJobs(self, request, context: grpc.ServicerContext) -> orchestrator_pb2.ListJobsResponse:
        jobs = self._job_call(context, self._jobs(context).list, request.state)
        return orchestrator_pb2.ListJobsResponse(jobs=jobs)

    def CancelJob(self, request, context: grpc.ServicerContext) -> orchestrator_pb2.Job:
        return self._job_call(context, self._jobs(context).cancel, request.id)

    def JobLogs(self, request, context: grpc.ServicerContext) -> Iterator[orchestrator_pb2.LogLine]:
        stop = threading.Event()
        context.add_callback(stop.set)  # the RPC ended (client gone, deadline): stop following
        lines = self._job_call(
            context, self._jobs(context).logs, request.id, request.follow, request.tail_lines, stop
        )
        try:
            for text in lines:
                yield orchestrator_pb2.LogLine(text=text)
        except StageError as e:
            context.abort(e.code, e.message)


def _waiting_event(message: str) -> orchestrator_pb2.GenerateEvent:
    kind = orchestrator_pb2.StageEvent.WAITING
    return orchestrator_pb2.GenerateEvent(
        stage=orchestrator_pb2.StageEvent(stage="request", kind=kind, message=message)
    )
