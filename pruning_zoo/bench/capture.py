"""A chain of fixed-shape segments writing one state, captured in CUDA graphs and replayed: the segmented
prefill's capture and replay (`pruning_zoo.bench.segmented` builds the segments).

A segment that cannot be captured (it reads a GPU value on the host, or copies from host memory) runs eagerly
between the graphs, and `eager_segments` says which and why. The capturable segments between two eager ones are
captured in one graph, so that nothing is launched between them, with CUDA events recorded inside it around each
segment for the timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pruning_zoo.engine.timing import Clock
from pruning_zoo.errors import PruningZooError


@dataclasses.dataclass
class Segment:
    name: str
    run: Callable[[], None]
    #: A pruning step (its time is the selection overhead), not model compute.
    selection: bool = False
    #: Reads what earlier segments left outside `state`'s tensors (observations their hooks kept, tuples and
    #: dicts, summaries): if the segment before it or an earlier selection runs eagerly, so must this one, since
    #: a graph would read what the capture saw. Gathers read `state`'s tensors alone, which replays refill.
    reads_previous: bool = False
    gather: bool = False
    #: Its own code, when `run` is its torch.compile'd version (used should compilation fail).
    uncompiled: Callable[[], None] | None = None
    #: Why it runs eagerly on a GPU (None: captured, or not yet tried).
    eager_reason: str | None = None
    #: The state it wrote when captured (tensors, and tuples or dicts of them): later graphs read these tensors,
    #: so an eager run copies into them, and a replay points the state back at them.
    outputs: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CapturedRun:
    """Consecutive segments captured in one CUDA graph, and the events recorded inside it around each span of
    them (external events, which time parts of a graph): (span name, start, end), one per run of segments of one
    `span_name`, so that no events separate a selection from its gather."""

    segments: list[Segment]
    graph: torch.cuda.CUDAGraph
    marks: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = dataclasses.field(default_factory=list)


class CaptureFailed(Exception):
    def __init__(self, segment: Segment, reason: str):
        super().__init__(reason)
        self.segment, self.reason = segment, reason


def eager_reasons(segments: list[Segment], own: dict[str, str | None]) -> dict[str, str | None]:
    """Why each segment runs eagerly (None: captured), given each one's own reason: a segment reading what an
    earlier one kept outside the state's tensors (`Segment.reads_previous`) runs eagerly too after an eager
    segment or an eager selection, since a graph would read what the capture saw."""
    reasons, previous_eager, eager_selection = {}, False, False
    for segment in segments:
        reason = own[segment.name]
        if reason is None and segment.reads_previous and (previous_eager or eager_selection):
            reason = "reads what an eager segment before it kept outside the state's tensors"
        reasons[segment.name] = reason
        previous_eager = reason is not None
        eager_selection |= previous_eager and segment.selection and not segment.gather
    return reasons


def span_name(segment: Segment) -> str:
    if segment.selection:
        return "selection"
    return "vision" if segment.name == "vision" else "llm"


class SegmentChain:
    """Segments run in order, each reading and writing `state`: eagerly (`_run`, the subclass's), or captured in
    CUDA graphs by `capture()` and run by `replay()`. A subclass gives the segments, the device (`input_ids`'),
    the context its segments run in (`_forwards`) and which segments must run eagerly whatever a capture would do
    (`_declared_eager`)."""

    input_ids: torch.Tensor

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        #: What the segments read and write: tensors, and tuples or dicts of them.
        self.state: dict = {}
        #: Compiled selections whose compilation failed, which run their own code instead: name -> why.
        self.unfused: dict[str, str] = {}
        #: What a replay runs, in order: captured runs of segments and eager segments (set by `capture()`).
        self.steps: list[CapturedRun | Segment] = []

    def _forwards(self) -> contextlib.AbstractContextManager:
        """The context every segment runs in."""
        raise NotImplementedError

    def _run(self, clock: Clock | None) -> None:
        """Every segment eagerly, in order."""
        raise NotImplementedError

    def _declared_eager(self, segment: Segment) -> str | None:
        """Why the segment must run eagerly, whether or not a capture would succeed (None: it may be captured)."""
        raise NotImplementedError

    # -- running -------------------------------------------------------------------------------------------
    def _run_segment(self, segment: Segment) -> None:
        """A compiled selection the backend fails to compile (inductor lowers not every reduction of every shape)
        runs its own code instead, unfused and still captured; `unfused` says which and why."""
        try:
            segment.run()
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if segment.uncompiled is None:
                raise
            cause = getattr(error, "inner_exception", None) or error
            # The first line names the failure; a subprocess's says only that, and its last line the cause.
            lines = [line for line in str(cause).splitlines() if line.strip()] or [""]
            said = lines[0][:300] + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")
            self.unfused[segment.name] = f"{type(cause).__name__}: {said}"
            segment.run, segment.uncompiled = segment.uncompiled, None
            segment.run()  # a selection writes the state at its end: run whole from the same inputs

    # -- capture -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, joined: bool = True) -> None:
        """Capture the segments in CUDA graphs, sharing one memory pool: each run of consecutive capturable
        segments in one graph (`joined`; else one graph per segment), timed per segment by events recorded inside
        it, so that no launch separates them. A segment that cannot be captured runs eagerly between the graphs
        (replays copy its tensors into the captured ones), and so does a selection reading what it kept elsewhere
        (`Segment.reads_previous`)."""
        if self.input_ids.device.type != "cuda":
            raise PruningZooError("CUDA graphs need the model on a CUDA device; on CPU use run()")
        with self._forwards():
            self._capture(joined)

    def _capture(self, joined: bool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (lazy initialisation, cuBLAS workspaces, compilation) off the capture
                self._run(None)
        torch.cuda.current_stream().wait_stream(side)
        own_reasons = self._own_eager_reasons()
        while True:
            try:
                self._capture_runs(eager_reasons(self.segments, own_reasons), joined)
                return
            except CaptureFailed as failure:  # which segment failed is known once each is captured alone
                torch.cuda.synchronize()
                if joined:
                    joined = False
                else:
                    own_reasons[failure.segment.name] = failure.reason

    def _own_eager_reasons(self) -> dict[str, str | None]:
        """Each segment's own reason to run eagerly (declared, or waiting for the GPU on the host), found by one
        eager run of the segments in order."""
        reasons = {}
        for segment in self.segments:
            before = dict(self.state)
            reasons[segment.name] = reason = self._declared_eager(segment) or self._sync_reason(segment)
            if reason is not None:  # it may have stopped halfway: run it whole
                self.state = dict(before)
                segment.run()
        return reasons

    def _capture_runs(self, reasons: dict[str, str | None], joined: bool) -> None:
        self.state, self.steps, pool = {}, [], torch.cuda.graph_pool_handle()
        pending: list[Segment] = []
        for segment in self.segments:
            segment.eager_reason = reasons[segment.name]
            if segment.eager_reason is None:
                pending.append(segment)
                if not joined:
                    self._capture_run(pending, pool)
                continue
            self._capture_run(pending, pool)
            before = dict(self.state)
            segment.run()
            segment.outputs = self._written_since(before)
            self.steps.append(segment)
        self._capture_run(pending, pool)
        torch.cuda.synchronize()

    def _capture_run(self, segments: list[Segment], pool) -> None:
        """Capture `segments` (then emptied) in one graph, with a pair of events around each span of them."""
        if not segments:
            return
        run = CapturedRun(segments=list(segments), graph=torch.cuda.CUDAGraph())
        segments.clear()
        names = [span_name(segment) for segment in run.segments]
        try:
            with torch.cuda.graph(run.graph, pool=pool):
                for index, segment in enumerate(run.segments):
                    if index == 0 or names[index - 1] != names[index]:
                        start = torch.cuda.Event(enable_timing=True, external=True)
                        start.record()
                    before = dict(self.state)
                    segment.run()
                    segment.outputs = self._written_since(before)
                    if index + 1 == len(names) or names[index + 1] != names[index]:
                        end = torch.cuda.Event(enable_timing=True, external=True)
                        end.record()
                        run.marks.append((names[index], start, end))
        except RuntimeError as error:
            raise CaptureFailed(run.segments[0], f"capture failed: {str(error).splitlines()[0]}") from error
        self.steps.append(run)

    def _written_since(self, before: dict) -> dict:
        """The state a segment wrote: what differs from `before`, the state it started from."""
        return {key: value for key, value in self.state.items() if value is not before.get(key)}

    @property
    def graphs(self) -> int:
        """CUDA graphs one replay launches (0 before `capture()`)."""
        return sum(isinstance(step, CapturedRun) for step in self.steps)

    def _sync_reason(self, segment: Segment) -> str | None:
        """Why the segment cannot be captured, found by running it once with CUDA's sync debugging on."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            segment.run()
        except RuntimeError as error:
            frame = traceback.extract_tb(error.__traceback__)[-1]  # the line that called the synchronizing operation
            return f"waits for the GPU on the host ({Path(frame.filename).name}:{frame.lineno} {frame.line})"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

    # -- replay --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def replay(self, clock: Clock | None = None) -> None:
        """Replay the captured graphs (eager segments run in between and write into the captured tensors)."""
        self._replay(clock)

    def _replay(self, clock: Clock | None) -> None:
        for step in self.steps:
            if isinstance(step, CapturedRun):
                step.graph.replay()
                for segment in step.segments:
                    self.state.update(segment.outputs)  # eager segments after it read these
                for name, start, end in step.marks if clock is not None else []:
                    clock.add(name, start, end)
                continue
            # An eager vision or layers segment runs the compiled forwards, installed around it alone (some
            # hundreds of attributes to set, host time the GPU may wait for); an eager selection (a host draw) runs
            # the strategy's own code and needs none of them.
            with self._forwards() if not step.selection else contextlib.nullcontext(), self._span(clock, step):
                step.run()
            for key, static in step.outputs.items():
                if isinstance(static, torch.Tensor):  # tuples and dicts stay the fresh ones: only eager reads them
                    static.copy_(self.state[key])
                    self.state[key] = static

    @staticmethod
    def _span(clock: Clock | None, segment: Segment):
        return contextlib.nullcontext() if clock is None else clock.span(span_name(segment))

    @property
    def eager_segments(self) -> dict[str, str]:
        return {segment.name: segment.eager_reason for segment in self.segments if segment.eager_reason}


__all__ = ["CaptureFailed", "CapturedRun", "Segment", "SegmentChain", "eager_reasons", "span_name"]
