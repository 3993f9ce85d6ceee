"""Gathers ready windows from all streams into engine batches.

`BatchPlanner` is the pure part: it decides each engine step as a `Plan`
(live windows, one-off request windows and questions to fill the batch,
cache entries to free), as vLLM v1's scheduler does. `Scheduler` is the loop that waits, has
the engine execute plans in its one worker thread and hands captions on: live
ones to the hub, one-off ones to the request that asked. All engine work goes
through plans, so HTTP requests and cache frees never bypass `max_batch` or
jump ahead of live windows. Overload policy: each stream keeps at most
`max_pending_per_stream` windows waiting; a newer window pushes out the
oldest (newest wins), so latency stays bounded instead of growing, and every
drop is counted.

Questions (`ask`) are one-off work too: they queue with the one-off caption
requests (oldest first, after live windows, within max_batch, counted in
`max_request_windows`) and run, in the same engine step as the plan's
captions, as one `answer_fn` batch. A question about a live window reuses the
image keys/values its caption left (`keep_live_kv`: the engine keeps those of
live windows), so it costs only its own tokens.

A question may name a QA model (`--qa-model`: a VQA checkpoint beside the caption
one): the plan's questions are grouped by model and each group goes to that model's
`answer_fns` entry, in the same engine step and thread. A QA model captions nothing, so
it keeps a live window's image keys/values from the first question about it
(`keep_kv`) unless the window was freed while the question waited. Each group fails
alone: a QA model that raises fails its own questions, never the captions or the
other model's answers.

With `pipeline` (prepare, finish), the loop prepares batch k+1 before it
finishes batch k: on a GPU the engine queues k+1's upload and vision work on
its own CUDA stream, so it runs while k decodes (streamer/engine/core.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamer.types import Answer, Caption, Window

__all__ = ["BatchPlanner", "EngineFailed", "Plan", "PlanResult", "Request", "Scheduler", "SchedulerBusy", "SchedulerConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # windows per engine call
    max_wait: float = 0.05  # seconds to wait for a fuller batch once one window is ready
    max_pending_per_stream: int = 2  # newest wins beyond this
    pipeline: bool | None = None  # prepare batch k+1 while k decodes; None: on when the engine is on CUDA
    request_max_wait: float = 2.0  # a one-off request waiting longer than this goes before live windows
    max_request_windows: int = 256  # one-off windows waiting, all requests together; past it a request is refused


class SchedulerBusy(RuntimeError):
    """A one-off request or question was refused: too much one-off work waiting, or the scheduler is closing."""


class EngineFailed(RuntimeError):
    """The engine raised on the batch that held a one-off request's windows (logged and counted)."""


class BatchPlanner:
    """Pure batching state: submit windows, take fair batches, count drops."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._pending: OrderedDict[str, deque[Window]] = OrderedDict()
        self.dropped: dict[str, int] = {}
        self._requests: deque[Request] = deque()  # one-off work (HTTP APIs, questions), oldest first
        self._frees: list[str] = []  # streams whose cached features the engine should drop
        self._window_frees: list[tuple[str, int]] = []  # windows whose image keys/values it should drop

    def submit_request(self, request: Request) -> None:
        """Queue one-off windows or questions; they run after live windows, within max_batch.
        Raises SchedulerBusy when that would pass `max_request_windows` (their frames are in memory)."""
        waiting = sum(len(r.windows) - r.taken for r in self._requests)
        if waiting + len(request.windows) > self.config.max_request_windows:
            raise SchedulerBusy(f"the engine has {waiting} one-off windows waiting (questions included; limit "
                                f"{self.config.max_request_windows}); try again shortly")
        self._requests.append(request)

    def submit(self, window: Window) -> Window | None:
        """Queue a window; return the window it pushed out, if any."""
        queue = self._pending.setdefault(window.stream_id, deque())
        queue.append(window)
        if len(queue) > self.config.max_pending_per_stream:
            old = queue.popleft()
            self.dropped[old.stream_id] = self.dropped.get(old.stream_id, 0) + 1
            return old
        return None

    @property
    def pending(self) -> int:
        """Live windows waiting."""
        return sum(len(q) for q in self._pending.values())

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._requests or self._frees or self._window_frees)

    def next_plan(self, now: float) -> Plan:
        """What the engine does next: live windows first (round-robin), then one-off windows
        and questions, oldest first, to fill the batch, and the cache entries to free afterwards.

        One-off windows run with their own token limit, so they join live windows
        only when their limit is the default; the questions of a plan share one limit
        too. A request that waited longer than `request_max_wait` goes first, so steady
        live load cannot starve it."""
        first = self._requests[0] if self._requests else None
        overdue = first is not None and now - first.submitted > self.config.request_max_wait
        windows = [] if overdue else self.next_batch()
        limits: dict[bool, int | None] = {} if not windows else {False: None}  # per kind (question?): the plan's limit
        taken: list[tuple[Request, int]] = []
        asked: list[tuple[Request, int]] = []
        while self._requests and len(windows) + len(asked) < self.config.max_batch:
            request = self._requests[0]
            if request.future.done():  # the caller went away (HTTP client gone): no engine time for it
                self._requests.popleft()
                if request.free_after:
                    self._frees.extend(dict.fromkeys(w.stream_id for w in request.windows[: request.taken]))
                continue
            question = request.questions is not None
            if limits.setdefault(question, request.max_new_tokens) != request.max_new_tokens:
                break
            position = request.taken
            if question:
                asked.append((request, position))
            else:
                windows.append(request.windows[position])
                taken.append((request, position))
            request.taken += 1
            if request.taken == len(request.windows):
                self._requests.popleft()
                if request.free_after:  # its features are of no more use
                    self._frees.extend(dict.fromkeys(w.stream_id for w in request.windows))
        frees, self._frees = self._frees, []
        window_frees, self._window_frees = self._window_frees, []
        return Plan(windows, limits.get(False), taken, frees, asked, limits.get(True), window_frees)

    def free(self, stream_id: str) -> None:
        """Ask for a stream's cached features to be dropped with the next plan."""
        self._frees.append(stream_id)
        self._unkeep(lambda w: w.stream_id == stream_id)

    def free_window(self, stream_id: str, index: int) -> None:
        """Ask for one window's kept image keys/values to be dropped with the next plan."""
        self._window_frees.append((stream_id, index))
        self._unkeep(lambda w: w.stream_id == stream_id and w.index == index)

    def _unkeep(self, freed: Callable[[Window], bool]) -> None:
        """Questions still waiting about a window being freed must not keep its image keys/values
        (the free runs before them: what they kept would outlive the window)."""
        for request in self._requests:
            if request.questions is not None and not request.free_after:
                request.unkept.update(i for i in range(request.taken, len(request.windows)) if freed(request.windows[i]))

    def next_batch(self) -> list[Window]:
        """Up to max_batch windows, round-robin over streams (oldest window of
        each first), so one busy stream cannot starve the others."""
        batch: list[Window] = []
        while len(batch) < self.config.max_batch and self._pending:
            for stream_id in list(self._pending):
                queue = self._pending[stream_id]
                batch.append(queue.popleft())
                if not queue:
                    del self._pending[stream_id]
                else:  # rotate: this stream goes to the back
                    self._pending.move_to_end(stream_id)
                if len(batch) == self.config.max_batch:
                    break
        return batch

    def forget(self, stream_id: str) -> int:
        return len(self._pending.pop(stream_id, ()))

    def clear(self) -> int:
        """Drop every live window waiting; one-off requests are left to finish."""
        count = self.pending
        self._pending.clear()
        return count


@dataclass(eq=False)
class Request:
    """One-off windows (an HTTP caption request), or questions about windows (`questions[i]`
    about `windows[i]`), and where their captions or answers go."""

    windows: list[Window]
    max_new_tokens: int | None
    submitted: float
    future: asyncio.Future
    results: dict[int, Any] = field(default_factory=dict)  # position -> Caption, or Answer
    taken: int = 0  # windows handed to plans so far
    questions: list[str] | None = None  # a question job: answers, not captions
    model: str | None = None  # the QA model that answers the questions; None: the caption model
    unkept: set[int] = field(default_factory=set)  # positions whose window was freed while they waited
    # drop the windows' streams' cached features once done (one-off windows); not for
    # questions about a live stream's windows, whose features the stream still uses
    free_after: bool = True


@dataclass
class Plan:
    """One engine step, decided by the planner and only executed by the runner (as in vLLM v1)."""

    windows: list[Window]  # live first, then one-off ones
    max_new_tokens: int | None  # None: the engine's default
    requests: list[tuple[Request, int]]  # (request, position) for the one-off windows, in order after the live ones
    free: list[str]  # streams whose cached features to drop once the windows are captioned
    questions: list[tuple[Request, int]] = field(default_factory=list)  # (question job, position), answered after the captions
    question_max_new_tokens: int | None = None
    free_windows: list[tuple[str, int]] = field(default_factory=list)  # (stream, index) whose image keys/values to drop

    @property
    def live(self) -> int:
        return len(self.windows) - len(self.requests)

    @property
    def size(self) -> int:
        return len(self.windows) + len(self.questions)

    @property
    def items(self) -> list[tuple[Window, str]]:
        """The (window, question) pairs of the question job."""
        return [(r.windows[i], r.questions[i]) for r, i in self.questions if r.questions is not None]

    def question_groups(self) -> dict[str | None, list[int]]:
        """Positions in `questions` per answering model (None: the caption model), in order."""
        groups: dict[str | None, list[int]] = {}
        for n, (request, _) in enumerate(self.questions):
            groups.setdefault(request.model, []).append(n)
        return groups


@dataclass
class PlanResult:
    """What executing a plan gave: captions and answers, or the error of each part (the
    others still ran: a failing question batch costs no live caption, and one model's
    failing questions no other model's answers)."""

    captions: list[Caption] | None = None
    caption_error: BaseException | None = None
    answers: dict[int, Answer] = field(default_factory=dict)  # position in plan.questions -> its answer
    answer_errors: list[tuple[str | None, list[int], BaseException]] = field(default_factory=list)  # (model, positions, error)


CaptionFn = Callable[..., list[Caption]]  # (windows[, max_new_tokens][, keep_kv=live count])
PrepareFn = Callable[..., Any]  # (windows[, keep_kv=live count])
FinishFn = Callable[..., list[Caption]]  # (prepared[, max_new_tokens])
AnswerFn = Callable[[Sequence[tuple[Window, str]], int | None], list[Answer]]
QAAnswerFn = Callable[..., list[Answer]]  # (items, max_new_tokens, keep_kv=[bool per item]): a QA engine's answer


class Scheduler:
    def __init__(
        self,
        caption_fn: CaptionFn,
        on_captions: Callable[[list[Caption]], None],
        config: SchedulerConfig | None = None,
        *,
        on_batch: Callable[[int, float], None] | None = None,
        on_drop: Callable[[Window], None] | None = None,
        on_failure: Callable[[int, BaseException], None] | None = None,
        pipeline: tuple[PrepareFn, FinishFn] | None = None,
        forget_fn: Callable[[str], None] | None = None,
        answer_fn: AnswerFn | None = None,
        forget_window_fn: Callable[[str, int], None] | None = None,
        keep_live_kv: bool = False,
        on_live: Callable[[list[Window], list[Caption]], None] | None = None,
        answer_fns: Mapping[str, QAAnswerFn] | None = None,
    ) -> None:
        """`answer_fn`: engine.answer, for `ask`; `keep_live_kv`: pass `keep_kv=<live windows>` to
        caption_fn (or prepare) so the engine keeps live windows' image keys/values for questions;
        `forget_window_fn`: engine.forget_window, run inside plans for `free_window`; `on_live`:
        (live windows, their captions), called just before `on_captions` (the stream histories);
        `answer_fns`: per QA model name, its engine's answer, for `ask(..., model=name)` (the
        frees go to every engine: `forget_fn` and `forget_window_fn` do that)."""
        self.config = config or SchedulerConfig()
        self.planner = BatchPlanner(self.config)
        self._caption_fn = caption_fn
        self._on_captions = on_captions
        self._on_batch = on_batch
        self._on_drop = on_drop
        self._on_failure = on_failure
        self._forget_fn = forget_fn  # engine.forget_stream: frees run on the engine thread, inside plans
        self._forget_window_fn = forget_window_fn
        self._answer_fn = answer_fn
        self._answer_fns = dict(answer_fns or {})
        self._keep_live_kv = keep_live_kv
        self._on_live = on_live
        self._pipeline = pipeline
        # One worker: the engine is not thread-safe; every engine call is a step of a plan.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    def submit(self, window: Window) -> None:
        if self._closing:
            return
        dropped = self.planner.submit(window)
        if dropped is not None:
            log.debug("window dropped", extra={"stream": dropped.stream_id, "index": dropped.index})
            if self._on_drop:
                self._on_drop(dropped)
        self._wake.set()

    def forget(self, stream_id: str) -> None:
        """A stream is gone: drop its waiting windows; its cached features are freed by the next plan."""
        self.planner.forget(stream_id)
        self.planner.free(stream_id)
        self._wake.set()

    def free_window(self, stream_id: str, index: int) -> None:
        """A window left its stream's history: its kept image keys/values are freed by the next plan."""
        self.planner.free_window(stream_id, index)
        self._wake.set()

    def start(self, spawn: Callable[[str, Callable[[], Any]], asyncio.Task] | None = None) -> None:
        """Start the loop; `spawn` (a Supervisor's) restarts it if it dies."""
        if self._task is None:
            self._task = spawn("scheduler", self._run) if spawn else asyncio.create_task(self._run(), name="scheduler")

    async def caption(self, windows: Sequence[Window], max_new_tokens: int | None = None) -> list[Caption]:
        """Caption one-off windows (HTTP APIs) through the planner: after live windows, within
        max_batch, their cached features freed once captioned. Stream ids must be unique to the call."""
        if not windows:
            return []
        return await self._submit(Request(list(windows), max_new_tokens, 0.0, self._future()))

    async def ask(self, items: Sequence[tuple[Window, str]], max_new_tokens: int | None = None, *,
                  free_after: bool = True, model: str | None = None) -> list[Answer]:
        """Answer (window, question) pairs through the planner, as one-off work: after live windows,
        within max_batch. `free_after`: the windows are one-off ones whose cached features go once
        answered (False for a live stream's windows). `model`: the QA model (a key of `answer_fns`)
        that answers; None: the caption model. Raises SchedulerBusy, EngineFailed."""
        if model is not None and model not in self._answer_fns:
            raise ValueError(f"no QA model {model!r} is loaded")
        if model is None and self._answer_fn is None:
            raise RuntimeError("this scheduler was made without an answer_fn: it takes no questions")
        if not items:
            return []
        request = Request([w for w, _ in items], max_new_tokens, 0.0, self._future(),
                          questions=[q for _, q in items], free_after=free_after, model=model)
        return await self._submit(request)

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, request: Request) -> list:
        if self._closing:
            raise SchedulerBusy("the daemon is shutting down")
        request.submitted = asyncio.get_running_loop().time()
        self.planner.submit_request(request)
        self._wake.set()
        return await request.future

    async def run_exclusive(self, fn, *args):
        """Run `fn(*args)` on the engine thread, between batches. For benchmarks and diagnostics
        that read engine state; the daemon's engine work all goes through plans."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _next_plan(self, wait_for_more: bool) -> Plan | None:
        """The next plan; None once closing with nothing left, or (not waiting) when idle."""
        loop = asyncio.get_running_loop()
        while not self.planner.has_work:
            if self._closing or not wait_for_more:
                return None
            self._wake.clear()
            await self._wake.wait()
        if wait_for_more and 0 < self.planner.pending < self.config.max_batch and not self._closing:
            # a fuller batch is cheaper per window; wait a little for one
            deadline = loop.time() + self.config.max_wait
            while self.planner.pending < self.config.max_batch and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except TimeoutError:
                    break
        return self.planner.next_plan(loop.time())

    def _prepare(self, prepare: PrepareFn, plan: Plan) -> Any:
        """Engine thread: the first half of a pipelined caption step."""
        return prepare(plan.windows, keep_kv=plan.live) if self._keep_live_kv else prepare(plan.windows)

    def _execute(self, plan: Plan, finish: FinishFn | None = None, prepared: Any = None) -> PlanResult:
        """Engine thread: one plan's captions (or the finish of its prepared batch), then its
        questions, then its frees. Each part's error is kept for its own requests."""
        result = PlanResult()
        try:
            if plan.windows:
                try:
                    result.captions = self._caption(plan, finish, prepared)
                except Exception as exc:  # noqa: BLE001 (whatever the engine raised goes to the plan's requests)
                    result.caption_error = exc
            items = plan.items
            for model, positions in plan.question_groups().items():
                try:
                    answers = self._answer(model, [items[n] for n in positions], plan.question_max_new_tokens,
                                           [plan.questions[n] for n in positions])
                except Exception as exc:  # noqa: BLE001 (this model's questions are told; the others still run)
                    result.answer_errors.append((model, positions, exc))
                else:
                    result.answers.update(zip(positions, answers))
            return result
        finally:
            for stream_id in plan.free:
                if self._forget_fn is not None:
                    self._forget_fn(stream_id)
            for stream_id, index in plan.free_windows:
                if self._forget_window_fn is not None:
                    self._forget_window_fn(stream_id, index)

    def _answer(self, model: str | None, items: list[tuple[Window, str]], limit: int | None,
                questions: list[tuple[Request, int]]) -> list[Answer]:
        """Engine thread: one model's questions of a plan. A QA model keeps the image keys/values
        it computes for a live stream's window (not a one-off one, nor one freed meanwhile)."""
        if model is None:
            if self._answer_fn is None:
                raise RuntimeError("this scheduler takes no questions for the caption model")
            return self._answer_fn(items, limit)
        keep = [not request.free_after and position not in request.unkept for request, position in questions]
        return self._answer_fns[model](items, limit, keep_kv=keep)

    def _caption(self, plan: Plan, finish: FinishFn | None, prepared: Any) -> list[Caption]:
        limit = () if plan.max_new_tokens is None else (plan.max_new_tokens,)
        if finish is not None:
            return finish(prepared, *limit)
        if self._keep_live_kv:
            return self._caption_fn(plan.windows, *limit, keep_kv=plan.live)
        return self._caption_fn(plan.windows, *limit)

    async def _on_engine(self, fn, *args, plan: Plan):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except Exception as exc:  # noqa: BLE001 (logged in _failed, told to the plan's requests)
            self._failed(plan, exc, plan.requests + plan.questions, plan.size)
            return None

    def _failed(self, plan: Plan, exc: BaseException, requests: list[tuple[Request, int]], size: int,
                model: str | None = None) -> None:
        where = {"qa_model": model} if model is not None else {}
        log.error("engine failed on a batch", exc_info=exc,
                  extra={"windows": len(plan.windows), "questions": len(plan.questions), **where})
        if self._on_failure:
            self._on_failure(size, exc)
        for request, _ in requests:
            if not request.future.done():
                request.future.set_exception(EngineFailed(f"the engine failed on this batch: {type(exc).__name__}: {exc}"))

    def _done(self, plan: Plan, started: float, result: PlanResult | None) -> None:
        if result is None:
            return
        if result.caption_error is not None:
            self._failed(plan, result.caption_error, plan.requests, len(plan.windows))
        for model, positions, error in result.answer_errors:
            self._failed(plan, error, [plan.questions[n] for n in positions], len(positions), model)
        ok = (len(plan.windows) if result.captions is not None else 0) + len(result.answers)
        if ok and self._on_batch:
            self._on_batch(ok, time.perf_counter() - started)
        captions = result.captions or []
        if plan.live and captions:
            live = plan.windows[: plan.live]
            if self._on_live:
                self._on_live(live, captions[: plan.live])
            self._on_captions(captions[: plan.live])
        self._resolve(zip(plan.requests, captions[plan.live :]))
        self._resolve((plan.questions[n], answer) for n, answer in sorted(result.answers.items()))

    @staticmethod
    def _resolve(results) -> None:
        for (request, position), value in results:
            request.results[position] = value
            if len(request.results) == len(request.windows) and not request.future.done():
                request.future.set_result([request.results[i] for i in range(len(request.windows))])

    async def _run(self) -> None:
        if self._pipeline is not None:
            return await self._run_pipelined(*self._pipeline)
        while (plan := await self._next_plan(wait_for_more=True)) is not None:
            started = time.perf_counter()
            self._done(plan, started, await self._on_engine(self._execute, plan, plan=plan))

    async def _run_pipelined(self, prepare: PrepareFn, finish: FinishFn) -> None:
        in_flight = None  # (plan, prepared, started): prepared, not yet finished
        while True:
            # with a batch in flight, take what is waiting now rather than wait
            plan = await self._next_plan(wait_for_more=in_flight is None)
            if plan is None and in_flight is None:
                return  # closing and drained
            queued = None
            # Questions and frees only (nothing to prepare) run after the batch in flight: its frees
            # were asked for after that batch was planned, so they must come after what it keeps.
            unprepared = None
            started = time.perf_counter()
            if plan is not None and not plan.windows:
                unprepared = plan
            elif plan is not None:
                try:
                    prepared = await asyncio.get_running_loop().run_in_executor(self._executor, self._prepare, prepare, plan)
                except Exception as exc:  # noqa: BLE001 (the windows' requests are told; questions and frees still run)
                    self._failed(plan, exc, plan.requests, len(plan.windows))
                    unprepared = dataclasses.replace(plan, windows=[], requests=[])
                else:
                    queued = (plan, prepared, started)
            if in_flight is not None:
                done_plan, prepared_before, started_before = in_flight
                result = await self._on_engine(self._execute, done_plan, finish, prepared_before, plan=done_plan)
                self._done(done_plan, started_before, result)
            if unprepared is not None:
                started = time.perf_counter()
                self._done(unprepared, started, await self._on_engine(self._execute, unprepared, plan=unprepared))
            in_flight = queued

    async def close(self, drain: bool = True) -> int:
        """Stop: with drain, windows already waiting are captioned first.
        Returns how many waiting windows were dropped (0 with drain)."""
        self._closing = True
        dropped = 0 if drain else self.planner.clear()
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)
        return dropped
