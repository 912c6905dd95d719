"""pruning-zoo as an lmms-eval model: an unmodified transformers VLM whose generation runs inside
`prune(model, strategy, budget)`, measuring what each request cost.

    lmms-eval --model pruning_zoo --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=fastv,budget=64 ...

Extra `model_args` are the strategy's parameters (`k=3`). `pruning-zoo run` builds the same class around a
model it loaded once for the whole sweep.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.model import lmms
from PIL import Image

from pruning_zoo.engine.loading import LoadedVLM, chat_prompt, load_vlm
from pruning_zoo.engine.records import ForwardRecord
from pruning_zoo.engine.run import prune
from pruning_zoo.engine.timing import Clock, TokenClock
from pruning_zoo.errors import InvalidParameterError, PruningZooError, describe
from pruning_zoo.plugins import get_strategy
from pruning_zoo.strategy.budget import Budget, parse_budget
from pruning_zoo.testbed.evaluate import evidence_recall

#: Cap on new tokens when a task sets none (lmms-eval's own wrappers use 1024; short answers dominate VQA).
DEFAULT_MAX_NEW_TOKENS = 128


#: ((task, doc_id), prompt, images) of one document.
LatencyExample = tuple[tuple[str, int], str, list[Image.Image]]


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


class PrunedVLM(lmms):
    """An lmms-eval `lmms` model: generation and log-likelihoods of a VLM pruned by one strategy at one budget.

    Besides the answers it keeps, per document, the visual tokens kept, the FLOPs of the prefill and (when the
    document carries `evidence` patch indices, as the testbed's do) the evidence recall; and per batch the
    time to first token, the engine's selection time, decode time per token and peak GPU memory."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        strategy: str = "none",
        budget: Budget | str = 1.0,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        loaded: LoadedVLM | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; batches here are fixed-size
        **strategy_params: Any,
    ):
        super().__init__()
        if loaded is None:
            if pretrained is None:
                raise PruningZooError("PrunedVLM needs pretrained=HUB_ID_OR_FOLDER (or a loaded model)")
            loaded = load_vlm(str(pretrained), device, dtype, attn_implementation)
        self.loaded = loaded
        self.strategy = get_strategy(strategy, **strategy_params)
        self.budget = 1.0 if strategy == "none" else parse_budget(str(budget))
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise InvalidParameterError(f"batch_size {batch_size!r} must be a whole number (no 'auto')") from None
        if self.batch_size < 1:
            raise InvalidParameterError(f"batch_size must be at least 1, got {self.batch_size}")
        self.clock_kind = Clock(loaded.device).kind
        #: (task, doc_id) -> what pruning kept and cost for that document.
        self.document_measurements: dict[tuple[str, int], dict] = {}
        #: One entry per batch, in the order they ran.
        self.batch_timings: list[dict] = []
        #: The task's first document answered here, ((task, doc_id), prompt, images): the compiled-mode latency
        #: is measured on copies of it. The lowest key, so that one process or several time the same document.
        self.latency_example: LatencyExample | None = None
        #: With several processes, a batch that fails is recorded here instead of raising: a process leaving
        #: lmms-eval's collectives would leave the others waiting. The runner fails the cell from it.
        self.errors: list[str] = []
        #: Wall-clock seconds this process spent preparing inputs (images, prompts, the processor) and in
        #: generate(): with the evaluation's own time, where a sweep's time goes.
        self.seconds = {"prepare": 0.0, "generate": 0.0}

    @property
    def device(self) -> torch.device:  # lmms-eval gathers counts on the model's device
        return self.loaded.device

    def _guarded(self, run_batch, batch: list, failed_value) -> list:
        try:
            return run_batch(batch)
        except Exception as error:
            if self.world_size == 1:
                raise
            self.errors.append(describe(error))
            return [failed_value] * len(batch)

    # -- prompts and inputs ----------------------------------------------------------------------------
    @property
    def processor(self):
        return self.loaded.processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _documents(self, tasks, splits, doc_ids) -> list[dict]:
        return [self.task_dict[task][split][doc_id] for task, split, doc_id in zip(tasks, splits, doc_ids)]

    def _prepare(self, contexts, doc_to_visuals, doc_ids, tasks, splits):
        """(keys, documents, each document's images, each document's prompt) of one batch of requests."""
        keys = list(zip(tasks, doc_ids))
        docs = self._documents(tasks, splits, doc_ids)
        per_doc_images = [self._images(visual, doc, task) for visual, doc, task in zip(doc_to_visuals, docs, tasks)]
        prompts = [self._prompt(context, len(images)) for context, images in zip(contexts, per_doc_images)]
        return keys, docs, per_doc_images, prompts

    def _images(self, doc_to_visual, doc: dict, task: str) -> list[Image.Image]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        images = []
        for visual in visuals or []:
            if not isinstance(visual, Image.Image):
                raise PruningZooError(
                    f"task {task!r} gave a {type(visual).__name__} as a visual; pruning-zoo evaluates image tasks "
                    "(PIL images) only"
                )
            images.append(visual.convert("RGB"))
        return images

    def _prompt(self, context: str, num_images: int) -> str:
        return chat_prompt(self.processor, context, num_images, f"model {self.loaded.name!r}")

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict:
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.loaded.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
        return inputs

    # -- measurements ----------------------------------------------------------------------------------
    def _record_documents(self, keys: list[tuple[str, int]], docs: list[dict], record: ForwardRecord | None) -> None:
        """What pruning kept and cost, per document of a batch, from the prefill's record."""
        flops_2ndm = record.llm_flops("2ndm") if record else None
        flops_3ndm = record.llm_flops("3ndm") if record else None
        vision = record.vision_flops() if record else None
        for sample, (key, doc) in enumerate(zip(keys, docs)):
            images = [image for image in record.images if image.sample == sample] if record else []
            entry = {
                "images": len(images),
                "visual_tokens": sum(image.num_visual for image in images),
                "entering_llm": sum(image.entering_llm for image in images),
                "average_per_layer": sum(image.average_per_layer for image in images),
                "llm_prefill_flops_2ndm": flops_2ndm[sample] if record else None,
                "llm_prefill_flops_3ndm": flops_3ndm[sample] if record else None,
                "vision_flops": vision[sample] if record else 0,
                "evidence_recall": None,
            }
            if isinstance(doc.get("evidence"), list) and len(images) == 1:
                entry["evidence_recall"] = evidence_recall(doc["evidence"], images[0].kept)
            self.document_measurements[key] = entry

    def _start_batch(self) -> Clock:
        if self.loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.loaded.device)
        return Clock(self.loaded.device)

    def _peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.loaded.device) if self.loaded.device.type == "cuda" else None

    def _offer_latency_example(self, keys: list[tuple[str, int]], prompts: list[str], per_doc_images: list) -> None:
        first = min(range(len(keys)), key=lambda i: keys[i])
        if self.latency_example is None or keys[first] < self.latency_example[0]:
            self.latency_example = (keys[first], prompts[first], per_doc_images[first])

    def compiled_latency(self, example: LatencyExample | None = None, repeats: int = 20) -> dict:
        """Time to first token in the compiled mode (`pruning_zoo.bench.segmented`: on a GPU, CUDA graphs)
        for a batch of `batch_size` copies of `example` (default: the first document this model answered): what a
        deployment would see, without Python's launch overhead. Medians over `repeats` after warm-up; an error
        is returned, not raised (the evaluation's results stand without it)."""
        from pruning_zoo.bench.measure import run_compiled
        from pruning_zoo.bench.segmented import SegmentedPrefill

        example = example or self.latency_example
        if example is None:
            return {"error": "no document was answered"}
        _, text, images = example
        inputs = dict(self._inputs([text] * self.batch_size, images * self.batch_size))
        inputs.pop("attention_mask", None)  # identical prompts: no padding
        # On a GPU, as the latency benchmark: torch.compile's inductor fuses the layers' element-wise kernels.
        fusion = "inductor" if self.loaded.model.device.type == "cuda" else None
        try:
            measured = run_compiled(SegmentedPrefill(self.loaded.model, self.strategy, self.budget, inputs, fusion), repeats)
        except (PruningZooError, NotImplementedError, RuntimeError) as error:
            return {"error": describe(error)}
        ttft, selection = (statistics.median(measured[name]) for name in ("ttft", "selection"))
        return {"time_to_first_token_ms": ttft, "selection_ms": selection, "selection_share_of_ttft": selection / ttft,
                "eager_segments": measured["eager_segments"], "repeats": repeats, "fusion": fusion}

    # -- lmms-eval's interface -----------------------------------------------------------------------------
    def clean(self) -> None:
        """lmms-eval calls this after every task to let go of the model: accelerate's free_memory, gc.collect()
        and empty_cache(), about 0.65 s a cell on a 2-core CPU, on every process. The model here is the sweep's,
        loaded once for all its cells, so there is nothing to let go of."""

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, _, _, task, split = request.args
            groups.setdefault((task, split, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(index)
        for indices in groups.values():
            # Longest prompts first: the slowest batch runs early, and similar lengths share a batch.
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for batch in _batches(indices, self.batch_size):
                outputs = self._guarded(self._generate_batch, [requests[i].args for i in batch], "")
                for index, answer in zip(batch, outputs):
                    answers[index] = answer
        return answers

    def _generate_batch(self, batch: Sequence[tuple]) -> list[str]:
        started = time.perf_counter()
        contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*batch)
        keys, docs, per_doc_images, texts = self._prepare(contexts, doc_to_visuals, doc_ids, tasks, splits)
        self._offer_latency_example(keys, texts, per_doc_images)
        inputs = self._inputs(texts, [image for images in per_doc_images for image in images])
        until, generate_kwargs = self._generation_options(dict(all_gen_kwargs[0]))
        prepared = time.perf_counter()
        self.seconds["prepare"] += prepared - started

        clock = self._start_batch()
        token_clock = TokenClock(clock)
        with prune(self.loaded.model, self.strategy, self.budget, clock, document_keys(keys)) as run:
            start = clock.mark()
            output = self.loaded.model.generate(**inputs, **generate_kwargs, streamer=token_clock)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        marks = token_clock.marks
        self.batch_timings.append({
            "task": tasks[0],
            "size": len(batch),
            "time_to_first_token_ms": clock.elapsed_ms(start, marks[0]),
            "selection_ms": clock.total_ms("selection"),
            "decode_ms_per_token": clock.elapsed_ms(marks[0], marks[-1]) / (len(marks) - 1) if len(marks) > 1 else None,
            "new_tokens": len(marks),
            "peak_memory_bytes": self._peak_memory(),
        })
        self._record_documents(keys, docs, run.records[0] if run.records else None)
        texts_out = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        self.seconds["generate"] += time.perf_counter() - prepared
        return [cut_at_stop(text, until) for text in texts_out]

    def _generation_options(self, gen_kwargs: dict) -> tuple[list[str], dict]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            raise PruningZooError("beam search (num_beams > 1) is not supported by the pruning engine; use greedy decoding")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample")) or temperature > 0
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), "do_sample": do_sample,
                   "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            options["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        return until, options

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for batch in _batches(order, self.batch_size):
            outputs = self._guarded(self._loglikelihood_batch, [requests[i].args for i in batch], (float("-inf"), False))
            for index, result in zip(batch, outputs):
                results[index] = result
        return results

    def _loglikelihood_batch(self, batch: Sequence[tuple]) -> list[tuple[float, bool]]:
        contexts, doc_to_targets, doc_to_visuals, doc_ids, tasks, splits = zip(*batch)
        keys, docs, per_doc_images, prompts = self._prepare(contexts, doc_to_visuals, doc_ids, tasks, splits)
        self._offer_latency_example(keys, prompts, per_doc_images)
        continuations = [target if isinstance(target, str) else str(target(doc)) for target, doc in zip(doc_to_targets, docs)]
        flat_images = [image for images in per_doc_images for image in images]
        full = self._inputs([p + c for p, c in zip(prompts, continuations)], flat_images)
        prompt_only = self._inputs(prompts, flat_images)
        # Left padding: every row's continuation is its last (full length - prompt length) tokens.
        full_lengths = full["attention_mask"].sum(dim=1)
        prompt_lengths = prompt_only["attention_mask"].sum(dim=1)

        clock = self._start_batch()
        with prune(self.loaded.model, self.strategy, self.budget, clock, document_keys(keys)) as run:
            start = clock.mark()
            logits = self.loaded.model(**full).logits  # text positions are never pruned: the tail lines up
            end = clock.mark()
        self.batch_timings.append({
            "task": tasks[0], "size": len(batch), "time_to_first_token_ms": clock.elapsed_ms(start, end),
            "selection_ms": clock.total_ms("selection"), "decode_ms_per_token": None, "new_tokens": 0,
            "peak_memory_bytes": self._peak_memory(),
        })
        self._record_documents(keys, docs, run.records[0] if run.records else None)
        results = []
        ids = full["input_ids"]
        for row in range(len(batch)):
            count = int(full_lengths[row] - prompt_lengths[row])
            if count < 1:
                raise PruningZooError(f"continuation {continuations[row]!r} of task {tasks[row]!r} adds no tokens")
            targets = ids[row, -count:]
            predicted = logits[row, -count - 1 : -1].float().log_softmax(dim=-1)
            logprob = float(predicted.gather(1, targets[:, None]).sum())
            results.append((logprob, bool((predicted.argmax(dim=-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise PruningZooError("multi-round generation is not supported by pruning-zoo's lmms-eval model")


def document_keys(keys: list[tuple[str, int]]) -> list[str]:
    """Each sample's document as `task/doc_id`: seeded strategies draw from it (the same subset for a document
    whatever its batch, order or process)."""
    return [f"{task}/{doc_id}" for task, doc_id in keys]


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text up to the first stop sequence."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
