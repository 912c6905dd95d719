"""Training LearnPruner's Learnable Pruning Module over a frozen VLM (`pruning-zoo train learnpruner`).

The module scores each image's vision-encoder tokens; the hard mask keeps what stage 1 keeps at inference
(the top R1 - D tokens by keep probability plus D max-min diverse ones, R1 from the strategy's plan for the
budget). The mask enters the language model as an additive attention bias log(m + eps) on each visual
token's key column, with m = hard + p - p.detach(): the forward pass sees exactly the hard mask (a dropped
token's bias is log(eps): no attention reaches it), the backward pass the keep probabilities p (straight
through), and since d/dm log(m + eps) = 1/(m + eps) this is the gradient of attention with a multiplicative
mask, so dropped tokens learn too. The loss is the VLM's own cross-entropy on the answer tokens; only the
module's weights change. Stage 2 (text attention inside the LLM) has no parameters and is not trained.

Each step's batch follows from (seed, step), so a run stopped early and resumed (`--resume`) gives what an
uninterrupted run gives.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.engine.loading import chat_prompt
from pruning_zoo.errors import InvalidParameterError, PruningZooError
from pruning_zoo.provenance import device_description, git_sha, versions
from pruning_zoo.strategies.learnpruner import LearnablePruningModule, LearnPruner, kept_with_diverse
from pruning_zoo.strategy import ScoreContext, Stage
from pruning_zoo.train.examples import Example

STATE = "training_state.pt"
#: Options a resumed run may change: they decide when and how fast it runs, not what it computes.
RESUMABLE_CHANGES = {"max_seconds", "stop_at", "workers"}


@dataclasses.dataclass(frozen=True)
class LearnPrunerTrainingConfig:
    budget: int = 64
    steps: int = 600
    batch_size: int = 16
    #: Examples per forward pass; the batch's gradients are accumulated (memory for large models).
    micro_batch: int | None = None
    learning_rate: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.0
    seed: int = 0
    hidden: int = 512
    #: A dropped token's key column gets the bias log(eps): a 1e-10 share of the weight a kept one would get.
    mask_eps: float = 1e-10
    validate_every: int = 100
    gradient_checkpointing: bool = False
    #: Processes drawing and encoding the batches (scene rendering and the processor run there).
    workers: int = 0
    #: What the hard mask keeps in training: "stage1", the tokens stage 1 keeps at inference for the budget
    #: (R1 = 3x the budget), or "budget", the budget itself (a harder selection, a stronger signal).
    train_keep: str = "stage1"
    #: Positions of the kept tokens when validating ("keep" or "renumber"); None: the strategy's default.
    positions: str | None = None
    max_seconds: float = float("inf")
    stop_at: int | None = None

    def __post_init__(self):
        for name in ("budget", "steps", "batch_size", "validate_every"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.micro_batch is not None and not 1 <= self.micro_batch <= self.batch_size:
            raise InvalidParameterError(f"micro_batch must be between 1 and batch_size ({self.batch_size}), got {self.micro_batch}")
        if self.positions not in (None, "keep", "renumber"):
            raise InvalidParameterError(f"positions must be 'keep' or 'renumber', got {self.positions!r}")
        if self.train_keep not in ("stage1", "budget"):
            raise InvalidParameterError(f"train_keep must be 'stage1' or 'budget', got {self.train_keep!r}")
        if not self.learning_rate > 0:
            raise InvalidParameterError(f"learning_rate must be positive, got {self.learning_rate}")


class StepBatches(torch.utils.data.Dataset):
    """Step s -> its batch, encoded by the processor in micro-batches, so a data loader's workers draw and
    encode batches ahead, in step order."""

    def __init__(self, data, processor, batch_size: int, micro_batch: int, first_step: int, steps: int):
        self.data, self.processor, self.batch_size, self.micro_batch = data, processor, batch_size, micro_batch
        self.first_step, self.steps = first_step, steps

    def __len__(self) -> int:
        return self.steps - self.first_step

    def __getitem__(self, index: int) -> list[dict]:
        examples = self.data.batch(self.first_step + index, self.batch_size)
        return [dict(encode(self.processor, examples[start : start + self.micro_batch], "cpu"))
                for start in range(0, len(examples), self.micro_batch)]


# -- the masked forward ------------------------------------------------------------------------------------
class SoftMaskedLanguageModel:
    """For the span of the block, the module's straight-through keep mask over each image's visual tokens is
    an attention bias on their key columns in every decoder layer. Hooks only; removed on exit."""

    def __init__(self, model, module: LearnablePruningModule | None, strategy: LearnPruner, budget: int, eps: float,
                 keep: str = "stage1"):
        self.adapter = adapter_for(model)
        self.keep = keep
        #: Without a module nothing is masked: the block only reads the features' width.
        self.feature_dim: int | None = None
        self.module, self.strategy, self.budget, self.eps = module, strategy, budget, eps
        self.input_ids: torch.Tensor | None = None
        #: Per image of the last forward: (sample, kept indices), and the keep probabilities (in the graph).
        self.kept: list[tuple[int, torch.Tensor]] = []
        self.probabilities: list[torch.Tensor] = []

    def __enter__(self):
        model = self.adapter.model
        self.handles = [model.model.register_forward_pre_hook(self._read_input_ids, with_kwargs=True)]
        self.handles += self.adapter.vision_hooks(self.strategy.observes)
        self.handles.append(self.adapter.language_model.register_forward_pre_hook(self._mask, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _read_input_ids(self, module, args, kwargs):
        self.input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.adapter.read_inputs(kwargs)

    def keep_mask(self, features: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, kept): m = hard + p - p.detach() over one image's tokens, and the indices the hard mask keeps."""
        margin = self.module.keep_margin(features.float())
        probability = torch.sigmoid(margin)
        diverse = math.floor(self.strategy.params.diversity_ratio * keep + 0.5)
        # Ranked by the margin, as at inference (the probability saturates at 1.0)
        kept = kept_with_diverse(features[None], margin.detach()[None], keep - diverse, diverse)[0]  # ascending
        self.probabilities.append(probability)
        hard = torch.zeros_like(probability)
        hard[kept] = 1.0
        return hard + probability - probability.detach(), kept

    def _mask(self, module, args, kwargs):
        embeds, padding = kwargs["inputs_embeds"], kwargs.get("attention_mask")
        batch, length = embeds.shape[:2]
        if padding is None:
            padding = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        bias = torch.zeros(batch, length, device=embeds.device)
        positions = self.adapter.image_positions(self.input_ids)
        self.kept, self.probabilities = [], []
        image_index = 0
        for sample, sample_positions in enumerate(positions):
            for image_positions in sample_positions:
                num_visual = int(image_positions.numel())
                stages = self.strategy.plan(min(self.budget, num_visual), num_visual, self.adapter.num_layers)
                # No stage before the LLM (the budget leaves the first stage nothing to drop): it keeps every token.
                stage_one = next((stage for stage in stages if not stage.in_llm), Stage(after_layer=None, keep=num_visual))
                ctx = ScoreContext(stage=stage_one, tokens=embeds[sample, image_positions], num_layers=self.adapter.num_layers,
                                   observations=self.adapter.vision_observations(image_index, num_visual), model=self.adapter.identity)
                features = self.strategy.features(ctx).detach()
                self.feature_dim = features.shape[-1]
                image_index += 1
                if self.module is None:
                    continue
                weights, kept = self.keep_mask(features, stage_one.keep if self.keep == "stage1" else min(self.budget, num_visual))
                bias = bias.index_put((torch.full_like(image_positions, sample), image_positions), torch.log(weights + self.eps))
                self.kept.append((sample, kept))
        if self.module is None:
            return None
        allowed = torch.ones(length, length, dtype=torch.bool, device=embeds.device).tril()[None] & padding.bool()[:, None, :]
        floor = torch.finfo(embeds.dtype).min
        mask = torch.where(allowed, bias[:, None, :].to(embeds.dtype), torch.tensor(floor, dtype=embeds.dtype, device=embeds.device))
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask[:, None]  # [B, 1, L, L], additive: taken as given by transformers
        return args, kwargs


# -- one step ------------------------------------------------------------------------------------------------
def encode(processor, examples: list[Example], device) -> dict:
    """Right-padded prompt + answer with labels on the answer tokens (and the end of sequence) only."""
    tokenizer = processor.tokenizer
    prompts = [chat_prompt(processor, e.question) for e in examples]
    texts = [p + " " + e.answer + tokenizer.eos_token for p, e in zip(prompts, examples)]
    images = [e.image for e in examples]
    previous = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        full = processor(text=texts, images=images, padding=True, return_tensors="pt")
        prompt_lengths = processor(text=prompts, images=images, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    finally:
        tokenizer.padding_side = previous
    labels = full["input_ids"].clone()
    columns = torch.arange(labels.shape[1])[None]
    labels[(columns < prompt_lengths[:, None]) | (full["attention_mask"] == 0)] = -100
    full["labels"] = labels
    return full.to(device)


def answer_loss(model, inputs: dict) -> torch.Tensor:
    labels = inputs["labels"]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def validation_accuracy(model, processor, examples: list[Example], strategy, budget: int, batch_size: int = 16) -> float:
    """Exact match of the first generated word, with `strategy` pruning at `budget` (as inference runs it)."""
    from pruning_zoo.engine.run import prune

    correct = 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [chat_prompt(processor, e.question) for e in batch]
        inputs = processor(text=prompts, images=[e.image for e in batch], padding=True, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        with prune(model, strategy, budget):
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        answers = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for example, answer in zip(batch, answers):
            words = answer.strip().lower().split()
            correct += bool(words) and words[0] == example.answer.strip().lower()
    return correct / len(examples)


# -- the loop ------------------------------------------------------------------------------------------------
def train_learnpruner(
    model, processor, model_name: str, data, validation: list[Example], out: Path, config: LearnPrunerTrainingConfig,
    resume: bool = False, command: str = "", on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train a module for `model` and save it in `out` (learnpruner.safetensors + learnpruner.json, with the
    training record) at every validation and at the end; returns the record."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    model.eval()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = adapter_for(model)
    feature_dim = probe_feature_dim(model, processor, data.batch(0, 1))
    torch.manual_seed(config.seed)
    module = LearnablePruningModule(feature_dim, config.hidden).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    record = {"command": command, "config": dataclasses.asdict(config), "git_sha": git_sha(), "versions": versions(),
              "device": device_description(device), "model": model_name, "curve": [], "seconds": 0.0}
    step = 0
    if resume:
        state = torch.load(out / STATE, map_location=device, weights_only=False)
        changed = [name for name, value in dataclasses.asdict(config).items()
                   if name not in RESUMABLE_CHANGES and state["config"].get(name) != value]
        if changed:
            raise PruningZooError(f"--resume with other {', '.join(changed)} than the run in {out} used; use the same options")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, record["curve"], record["seconds"] = state["step"], state["curve"], state["seconds"]
        record["resumed_at"] = step
    strategy = LearnPruner.with_module(module, **({"positions": config.positions} if config.positions else {}))
    micro = config.micro_batch or config.batch_size
    started = time.monotonic() - record["seconds"]
    losses: list[float] = []

    def save(final: bool) -> None:
        record["seconds"] = round(time.monotonic() - started, 1)
        record["steps_done"] = step
        module.save(out, model_name, adapter.identity.fingerprint, budget=config.budget, training=record)
        torch.save({"module": module.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "curve": record["curve"], "seconds": record["seconds"], "config": dataclasses.asdict(config)},
                   out / STATE)
        if final:
            (out / STATE).unlink()

    out.mkdir(parents=True, exist_ok=True)
    batches = iter(torch.utils.data.DataLoader(StepBatches(data, processor, config.batch_size, micro, step, config.steps),
                                               batch_size=None, num_workers=config.workers, collate_fn=lambda batch: batch))
    while step < config.steps:
        parts = next(batches)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        with SoftMaskedLanguageModel(model, module, strategy, config.budget, config.mask_eps, config.train_keep):
            for part in parts:
                inputs = {name: value.to(device) for name, value in part.items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
                share = len(inputs["input_ids"]) / config.batch_size
                loss = answer_loss(model, inputs) * share
                loss.backward()
                total += float(loss.detach())
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(total)
        point = None
        if step % config.validate_every == 0 or step == config.steps:
            module.eval()
            point = {"step": step, "loss": sum(losses) / len(losses), "seconds": round(time.monotonic() - started, 1),
                     "validation_accuracy": validation_accuracy(model, processor, validation, strategy, config.budget) if validation else None}
            record["curve"].append(point)
            losses = []
            save(final=step == config.steps)
        if on_step is not None:
            on_step(step, {"loss": total, **({"validation": point["validation_accuracy"]} if point else {})})
        out_of_time = time.monotonic() - started > config.max_seconds
        if step < config.steps and (out_of_time or (config.stop_at is not None and step >= config.stop_at)):
            record["stopped_at"] = step
            save(final=False)
            return record
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return record


def probe_feature_dim(model, processor, examples: list[Example]) -> int:
    """The width of the features the module reads, from one forward without a module."""
    device = next(model.parameters()).device
    with SoftMaskedLanguageModel(model, None, LearnPruner(), 1, 1e-6) as probe, torch.no_grad():
        answer_loss(model, encode(processor, examples, device))
    if probe.feature_dim is None:
        raise PruningZooError("the model's inputs held no image tokens; LearnPruner trains on image questions")
    return probe.feature_dim
