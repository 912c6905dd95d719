"""Timing work on one device: CUDA events on a GPU (queued with the work, read after one synchronize), the
host's perf_counter on a CPU. Both give milliseconds; every result says which clock measured it."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from transformers.generation.streamers import BaseStreamer


class Clock:
    """Marks points in a device's work and sums named spans between them."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.spans: dict[str, list[tuple[object, object]]] = defaultdict(list)

    @property
    def kind(self) -> str:
        return "CUDA events" if self.device.type == "cuda" else "CPU wall-clock (perf_counter)"

    def mark(self) -> object:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds between two marks (synchronizes the GPU first)."""
        if self.device.type == "cuda":
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000.0

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self.mark()
        try:
            yield
        finally:
            self.spans[name].append((start, self.mark()))

    def add(self, name: str, start: object, end: object) -> None:
        """A span between marks made elsewhere (events recorded inside a CUDA graph, read before its next replay)."""
        self.spans[name].append((start, end))

    def total_ms(self, name: str) -> float:
        """The summed duration of every span called `name` (0 when there was none)."""
        return sum(self.elapsed_ms(start, end) for start, end in self.spans.get(name, []))


class TokenClock(BaseStreamer):
    """A generate() streamer that marks when each new token reaches the host. generate() hands it the prompt
    first, then one token per step (batched: one column of the batch), so the second mark is the first token."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks: list[object] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.marks.append(self.clock.mark())

    def end(self) -> None:
        pass


def median_ms(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median milliseconds of `call`, work on `device`, over `repeats` runs: on a GPU one CUDA graph of it, warmed
    up, each replay between CUDA events; on a CPU eager calls timed by perf_counter after one warm-up call."""
    if device.type != "cuda":
        call()
        run = call
    else:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        run = graph.replay
    clock = Clock(device)
    for _ in range(repeats):
        with clock.span("call"):
            run()
    return statistics.median(clock.elapsed_ms(start, end) for start, end in clock.spans["call"])
