"""Train the testbed's reference VLM from scratch on generated scenes (`pruning-zoo testbed train`).

Every step draws fresh scenes (seeds disjoint from the validation and test splits) and asks every question
family each scene allows; the loss is the answer's cross-entropy plus an auxiliary one: a linear head on the
vision features the projector receives labels every patch with the colour, shape, character and centre of the
object covering it, and with its own row and column (the scenes know them). Without it the from-scratch tower learns too slowly for minutes of
training and the decoder settles for the answer priors. The head is dropped after training: the saved model
is a plain LlavaForConditionalGeneration. Half of the questions see the image with
a random share of its non-evidence patches masked out, so the model does not depend on tokens that carry
no evidence: this is what lets an oracle selection keep its accuracy while blind pruning loses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers

from pruning_zoo.errors import PruningZooError
from pruning_zoo.provenance import device_description, git_sha, versions
from pruning_zoo.testbed.model import build_config, build_processor, build_tokenizer, pixel_values
from pruning_zoo.testbed.questions import FAMILIES, Question, questions_for
from pruning_zoo.testbed.scenes import CHARACTERS, COLORS, GRID, PATCH, SHAPES, Scene, generate_scene, render

#: Scene seeds: training draws from TRAIN_SEEDS on; the splits use their own ranges.
TRAIN_SEEDS, VALIDATION_SEEDS, TEST_SEEDS = 10_000_000, 100_000, 200_000
IMAGE_TOKENS = GRID * GRID
CHECKPOINT = "checkpoint.pt"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    steps: int = 3000
    scenes_per_step: int = 32
    learning_rate: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.05
    #: Share of questions trained with a random part of their non-evidence patches masked.
    mask_probability: float = 0.5
    validate_every: int = 250
    #: Extra spatial questions asked of every scene (they are learned last).
    extra_spatial: int = 0
    #: Stop this call (saving a checkpoint to resume from) once it has run this long, or after this step.
    max_seconds: float = float("inf")
    stop_at: int | None = None
    checkpoint_every: int = 500
    validation_questions: int = 512
    workers: int = 8


class Encoder:
    """Token ids and labels of one question, exactly as the processor lays them out (576 image tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")

    def prompt_ids(self, question: str) -> list[int]:
        ids = self.tokenizer(f"USER: <image> {question} ASSISTANT:")["input_ids"]
        at = ids.index(self.image_id)
        return ids[:at] + [self.image_id] * IMAGE_TOKENS + ids[at + 1 :]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]


def patch_targets(scene: Scene, owner) -> torch.Tensor:
    """[6, 576] per patch: colour, shape, character (0 = none, else index + 1) and centre (1 where the
    patch holds its object's centre) of the object covering it, and the patch's own row and column (so the
    features carry where they are, which spatial questions compare)."""
    targets = torch.zeros(6, GRID * GRID, dtype=torch.long)
    targets[4] = torch.arange(GRID * GRID) // GRID
    targets[5] = torch.arange(GRID * GRID) % GRID
    for index, obj in enumerate(scene.objects):
        covered = torch.from_numpy(owner == index + 1)
        targets[0, covered] = list(COLORS).index(obj.color) + 1
        targets[1, covered] = SHAPES.index(obj.shape) + 1
        targets[2, covered] = CHARACTERS.index(obj.label) + 1 if obj.label else 0
        targets[3, (obj.y // PATCH) * GRID + obj.x // PATCH] = 1
    return targets


#: Classes of each patch target, for the auxiliary head.
TARGET_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, len(CHARACTERS) + 1, 2, GRID, GRID)


class SceneStream(torch.utils.data.IterableDataset):
    """Endless (pixels [3, 336, 336], questions, patch targets) from fresh scenes.

    The data loader hands step t's batch to worker t % workers, and each worker fills its batches from its
    own scenes in order; everything about a scene follows from (seed, its index), so a resumed run starts
    each worker where its batches left off and sees what an uninterrupted run would have seen."""

    def __init__(self, seed: int, batch_size: int, extra_spatial: int = 0, start_step: int = 0):
        self.seed, self.batch_size, self.extra_spatial, self.start_step = seed, batch_size, extra_spatial, start_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader asks worker 0 first: at a resumed step s it plays the part worker s % workers had.
        role = (worker + self.start_step) % workers
        done = max(0, (self.start_step - role + workers - 1) // workers)  # batches this part has made
        index = role + done * self.batch_size * workers
        while True:
            # Worker w's k-th scene: its batches are interleaved with the other workers' scene by scene.
            scene_seed = TRAIN_SEEDS + self.seed * 10_000_000 + index
            index += workers
            scene = generate_scene(scene_seed)
            rng = random.Random(f"questions-{self.seed}-{scene_seed}")
            questions = questions_for(scene, seed=rng.randrange(1 << 30))
            if self.extra_spatial:
                questions += questions_for(scene, families=("spatial",) * self.extra_spatial, seed=rng.randrange(1 << 30))
            image, owner = render(scene)
            yield pixel_values([image])[0], questions, patch_targets(scene, owner)


def collate(encoder: Encoder, mask_probability: float, seed: int):
    """Batch scenes into token rows; each question's mask is drawn from (seed, its scene, its number)."""

    def build(items):
        pixels = torch.stack([item[0] for item in items])
        targets = torch.stack([item[2] for item in items])
        rows, labels, scene_index, visible = [], [], [], []
        for index, (_, questions, _) in enumerate(items):
            for number, q in enumerate(questions):
                rng = random.Random(f"mask-{seed}-{q.scene_seed}-{number}")
                prompt, answer = encoder.prompt_ids(q.question), encoder.answer_ids(q.answer)
                rows.append(prompt + answer)
                labels.append([-100] * len(prompt) + answer)
                scene_index.append(index)
                keep = torch.ones(IMAGE_TOKENS, dtype=torch.bool)
                if rng.random() < mask_probability:
                    share = rng.uniform(0.05, 1.0)
                    keep = torch.rand(IMAGE_TOKENS, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < share
                    keep[list(q.evidence)] = True
                visible.append(keep)
        length = max(map(len, rows))
        pad = encoder.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
        label_ids = torch.tensor([r + [-100] * (length - len(r)) for r in labels])
        attention = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        image = input_ids == encoder.image_id
        attention[image] = torch.stack(visible).flatten().long()
        return pixels, torch.tensor(scene_index), input_ids, label_ids, attention, targets

    return build


def vision_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """What LLaVA's projector receives: vision_feature_layer -2, CLS dropped."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
    return hidden[:, 1:]


def training_forward(model, pixels, scene_index, input_ids, labels, attention, targets=None, head=None):
    """The answer loss of LlavaForConditionalGeneration on these inputs, encoding each scene's image once,
    plus the auxiliary patch-labelling loss when a head is given."""
    embeds = model.get_input_embeddings()(input_ids.masked_fill(input_ids == model.config.image_token_index, 0))
    patches = vision_features(model, pixels)
    features = model.model.multi_modal_projector(patches)[scene_index]
    image = (input_ids == model.config.image_token_index).unsqueeze(-1)
    embeds = embeds.masked_scatter(image, features.to(embeds.dtype))
    loss = model(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss
    if head is not None:
        logits = head(patches).split(TARGET_CLASSES, dim=-1)
        loss = loss + sum(torch.nn.functional.cross_entropy(l.flatten(0, 1).float(), t.flatten()) for l, t in zip(logits, targets.unbind(1)))
    return loss


def validation_questions(count: int) -> list[Question]:
    questions, seed = [], VALIDATION_SEEDS
    while len(questions) < count:
        questions += questions_for(generate_scene(seed))
        seed += 1
    return questions[:count]


@torch.no_grad()
def answer_accuracy(model, encoder: Encoder, questions: list[Question], device, batch: int = 32, images=None) -> dict[str, float]:
    """Share of questions whose greedy first answer token is right, overall and per family. `images` maps
    scene seeds to pixel tensors already made (the scenes are rendered otherwise)."""
    model.eval()
    images = images if images is not None else {}
    right = {family: [] for family in FAMILIES}
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        for q in chunk:
            if q.scene_seed not in images:
                images[q.scene_seed] = pixel_values([render(generate_scene(q.scene_seed))[0]])[0]
        pixels = torch.stack([images[q.scene_seed] for q in chunk]).to(device)
        prompts = [encoder.prompt_ids(q.question) for q in chunk]
        length = max(map(len, prompts))
        pad = encoder.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        predicted = logits.argmax(-1).tolist()
        for q, token in zip(chunk, predicted):
            right[q.family].append(token == encoder.answer_ids(q.answer)[0])
    model.train()
    scores = {family: sum(v) / len(v) for family, v in right.items() if v}
    scores["overall"] = sum(sum(v) for v in right.values()) / len(questions)
    return scores


def train(out: Path, config: TrainingConfig, device: str = "cuda", init_from: Path | None = None,
          resume: bool = False) -> dict:
    """Train from `config.seed` (starting from the model saved in `init_from`, if given), write the model,
    processor and training.json into `out`; return the record. A call that stops early (`max_seconds`,
    `stop_at`) leaves `out/checkpoint.pt`, and `resume=True` continues from it to the same result."""
    torch.manual_seed(config.seed)
    device = torch.device(device)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    if init_from is not None:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32).to(device)
        if model.get_input_embeddings().num_embeddings != len(tokenizer):  # words were appended since
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = transformers.LlavaForConditionalGeneration(build_config(tokenizer)).to(device)
    model.train()
    head = torch.nn.Linear(model.config.vision_config.hidden_size, sum(TARGET_CLASSES)).to(device)
    encoder = Encoder(tokenizer)
    parameters = list(model.parameters()) + list(head.parameters())
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.98),
    )

    def schedule(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    checkpoint_path = out / CHECKPOINT
    state = {"step": 0, "curve": [], "losses": [], "seconds": 0.0, "calls": []}
    if resume:
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if saved["config"] != dataclasses.asdict(config) | {"max_seconds": saved["config"]["max_seconds"], "stop_at": saved["config"]["stop_at"]}:
            raise PruningZooError(
                f"{checkpoint_path} was written with another configuration ({saved['config']}); resume with the "
                "same options, or train into a new folder"
            )
        model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
    loader = torch.utils.data.DataLoader(
        SceneStream(config.seed, config.scenes_per_step, config.extra_spatial, start_step=state["step"]),
        batch_size=config.scenes_per_step, num_workers=config.workers,
        collate_fn=collate(encoder, config.mask_probability, config.seed), persistent_workers=config.workers > 0,
    )

    def save_checkpoint() -> None:
        temporary = checkpoint_path.with_suffix(".tmp")
        torch.save({"config": dataclasses.asdict(config), "model": model.state_dict(), "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state}, temporary)
        temporary.replace(checkpoint_path)  # a checkpoint is whole or absent

    validation = validation_questions(config.validation_questions)
    validation_images: dict[int, torch.Tensor] = {}
    out.mkdir(parents=True, exist_ok=True)
    started, seconds_before = time.time(), state["seconds"]
    # Every call of a schedule split by --max-seconds / --stop-at, so that training.json shows how it ran.
    call = {"command": " ".join(sys.argv), "git_sha": git_sha(), "from_step": state["step"]}
    state.setdefault("calls", []).append(call)

    def end_call() -> None:
        call.update(to_step=state["step"], seconds=round(time.time() - started, 1))
    batches = iter(loader)
    while state["step"] < config.steps:
        if time.time() - started > config.max_seconds or state["step"] == config.stop_at:
            state["seconds"] = seconds_before + time.time() - started
            end_call()
            save_checkpoint()
            return {"stopped_at": state["step"], "checkpoint": str(checkpoint_path), "curve": state["curve"]}
        batch = [t.to(device, non_blocking=True) for t in next(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = training_forward(model, *batch, head=head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        state["losses"].append(loss.item())
        state["step"] += 1
        step = state["step"]
        if step % config.validate_every == 0 or step == config.steps:
            point = {"step": step, "loss": sum(state["losses"]) / len(state["losses"]),
                     "seconds": round(seconds_before + time.time() - started, 1),
                     "validation_accuracy": answer_accuracy(model, encoder, validation, device, images=validation_images)}
            state["losses"] = []
            state["curve"].append(point)
            print(json.dumps(point), flush=True)
        if step % config.checkpoint_every == 0 and step < config.steps:
            state["seconds"] = seconds_before + time.time() - started
            save_checkpoint()
    curve = state["curve"]
    end_call()
    model.eval()
    model.to("cpu", torch.float32).save_pretrained(out, max_shard_size="15MB")
    processor.save_pretrained(out)
    earlier = json.loads((init_from / "training.json").read_text()) if init_from is not None else None
    record = {
        "command": " ".join(sys.argv),
        "config": dataclasses.asdict(config),
        # The checkout's own SHA unless the caller names it (a copied work tree may carry a stale .git).
        "git_sha": git_sha(),
        "continued_from": earlier,
        "device": device_description(device),
        "versions": versions(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(seconds_before + time.time() - started, 1),
        "resumed": resume,
        "calls": state["calls"],
        "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    checkpoint_path.unlink(missing_ok=True)
    return record
