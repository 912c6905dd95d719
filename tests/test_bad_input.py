"""Bad input never gets a traceback: a few hundred malformed invocations across every command, run in-process
through the typer app. Each must end with a nonzero exit code (2 for a usage error) and one message that names
the bad value, before any work starts: no traceback, no hang, no "fault of pruning-zoo"."""

from __future__ import annotations

import os
import re

import pytest
import torch
from typer.testing import CliRunner

from pruning_zoo.cli import app

GPU = torch.cuda.is_available()

#: Values no device option takes here (cuda ones only on a machine without a GPU).
BAD_DEVICES = ["nonsense", "gpu", "cuda:", "cuda:x", "CPU ", "cuda:7" if not GPU else "cuda:99",
               *([] if GPU else ["cuda", "cuda:0"]), "x" * 5000]
BAD_DTYPES = ["float8", "fp16", "int8", "", "bfloat"]
#: Output folders that cannot be written: under a regular file, the file itself, a place no one can write.
BAD_FOLDERS = ["{file}/sub", "{file}", "/proc/pruning-zoo-out", "{file}/a/b/c"]
BAD_BUDGETS = ["0", "-1", "1_000", "1e3", "nan", "inf", "abc", "1.5", "0.0", "100000000000000000000000", "10**23",
               "64;32", "+64", "0x40", "６４"]
BAD_NAMES = ["", ",", " , ", "x" * 5000]
BAD_PARAMS = ["fastv.k=0", "fastv.k=-3", "fastv.k=zero", "fastv.k=[1,2", "fastv.k={a: 1", "fastv=3", "fastv.=3",
              ".k=3", "fastv.nope=1", "fastv.k=true", "fastv.k=1.5", "fastv.score=middle", "nosuch.k=1",
              "learnpruner.module=/nonexistent/module", "learnpruner.module={file}",
              "learnpruner.module=../../../../../../etc", "transprune.prune_layers=[1,", "transprune.prune_layers=[3,2]", "random.seed=abc",
              "learnpruner.layer=40"]

#: Files whose content is wrong, by name -> bytes (made once per test module).
BAD_FILES = {
    "binary.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "latin1.yaml": "name: caf\xe9\ntasks: [testbed]\n".encode("latin-1"),
    "utf16.yaml": "name: t\ntasks: [testbed]\n".encode("utf-16"),
    "nested.yaml": ("a: " + "[" * 3000 + "]" * 3000 + "\n").encode(),
    "deep.yaml": ("a: " + "[" * 100 + "]" * 100 + "\n").encode(),
    "duplicate.yaml": b"tasks: [testbed]\ntasks: [pope]\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [64]\n",
    "booleans.yaml": b"tasks: [testbed]\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [64]\nlimit: true\n",
    "boolean-budget.yaml": b"tasks: [testbed]\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [true]\n",
    "boolean-param.yaml": b"tasks: [testbed]\nmodels: [m]\nstrategies: {fastv: {k: yes}}\nbudgets: [64]\n",
    "huge.yaml": b"tasks: [testbed]\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [64]\nlimit: " + b"9" * 40 + b"\n",
    "huge-budget.yaml": b"tasks: [testbed]\nmodels: [m]\nstrategies: {fastv: {}}\nbudgets: [" + b"9" * 40 + b"]\n",
    "list.yaml": b"- tasks\n- models\n",
    "empty.yaml": b"",
    "unknown-field.yaml": b"tasks: [testbed]\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [64]\nbudget: 3\n",
    "bad-syntax.yaml": b"tasks: [testbed\nmodels: : :\n",
    "no-tasks.yaml": b"tasks: []\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [64]\n",
    "tab.yaml": b"tasks:\n\t- testbed\n",
    "records.json": b"\xff\xfe{\x00",
    "records-latin1.json": '{"image": "caf\xe9.png", "question": "q", "answer": "a"}\n'.encode("latin-1"),
    "records-utf16.json": '{"image": "a.png", "question": "q", "answer": "a"}\n'.encode("utf-16"),
    "records-garbage.json": b"this is not json\n",
    "records-deep.json": b"[" * 100000 + b"]" * 100000,
    # A "billion laughs": nine aliases of nine aliases ... expand to 490 million values.
    "laughs.yaml": ('a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"l{i}: &l{i} [" + ",".join([f"*{'a' if i == 0 else f'l{i - 1}'}"] * 9) + "]\n" for i in range(8))).encode(),
}


def named_in_message(param: str) -> str:
    """What the message about a bad --param names: the value, else (no value, unknown name) the name."""
    target, _, value = param.partition("=")
    strategy, _, name = target.partition(".")
    if strategy == "nosuch" or not (strategy and name and value):
        return strategy if strategy == "nosuch" else param
    return name if name == "nope" or value == "[3,2]" else value  # a list is quoted as Python writes it


def run_cases():
    """`run` with one bad option each; the other options are good. Half are dry runs, half real runs (which must
    validate alike before evaluating anything)."""
    good = ["--suite", "testbed", "--model", "{model}", "--strategies", "none,fastv", "--budgets", "64",
            "--limit", "1", "--device", "cpu", "--output", "{tmp}/out"]

    def replaced(option, value):
        args = list(good)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
        return args

    cases = []
    for value in BAD_DEVICES:
        cases.append((replaced("--device", value), value))
    for value in BAD_DTYPES:
        cases.append((replaced("--dtype", value), value or "--dtype"))
    for value in BAD_FOLDERS:
        cases.append((replaced("--output", value), value))
    for value in [*BAD_BUDGETS, "577", "100000"]:
        cases.append((replaced("--budgets", value), value if value not in {"577", "100000"} else f"budget {value}"))
    for value in BAD_NAMES:
        cases.append((replaced("--strategies", value), value or "--strategies"))
        cases.append((replaced("--tasks", value), value or "--tasks"))
    for value in ["fastV", "nosuch", "none,fastv,fastv2"]:
        cases.append((replaced("--strategies", value), value.split(",")[-1]))
    for value in ["nosuchtask", "testbd", "pope,nosuchtask"]:
        cases.append((replaced("--tasks", value), value.split(",")[-1]))
    for value in ["", "no/such-model", "/nonexistent/model", "{file}", "{broken_model}", "{empty_folder}",
                  "../../..", "x" * 5000]:
        cases.append((replaced("--model", value), value or "''"))
    for value in ["/nonexistent/tasks", "{file}", "x" * 5000]:
        cases.append((replaced("--task-path", value), value))
    for value in ["/nonexistent/data", "{file}", "x" * 5000]:
        cases.append((replaced("--data", value), value))
    for value in BAD_PARAMS:
        if value.startswith(("learnpruner", "transprune", "random")):
            args = replaced("--strategies", "none," + value.split(".")[0])
            args += ["--param", value]
        else:
            args = replaced("--param", value)
        cases.append((args, named_in_message(value)))
    for value in ["fastv.k=99", "fastv.k=" + "9" * 30]:
        cases.append((replaced("--param", value), "fastv.k"))
    for layers in ["[1,99]", "[99]"]:
        cases.append((replaced("--strategies", "none,transprune") + ["--param", f"transprune.prune_layers={layers}"],
                      "transprune"))
    cases.append((replaced("--strategies", "none,visionzip") + ["--param", "visionzip.layer=99"], "visionzip"))
    for value in ["0", "-1", "abc", "1e3", "9" * 40]:  # typer's own check names the option and what it takes
        cases.append((replaced("--limit", value), value if len(value) > 20 else "--limit"))
        cases.append((replaced("--batch-size", value), value if len(value) > 20 else "--batch-size"))
    for name in BAD_FILES:
        if name.endswith(".yaml"):  # the file, or the field it gets wrong
            cases.append((replaced("--suite", "{bad}/" + name), "fastv.k" if name == "boolean-param.yaml" else name))
    for value in ["{folder_yaml}", "{fifo}", "{missing_yaml}", "image-vq", "x" * 5000, "", "../../etc/passwd"]:
        cases.append((replaced("--suite", value), value or "suite"))
    for args, expected in list(cases):
        cases.append((args + ["--dry-run"], expected))
    return [(["run", *args], expected) for args, expected in cases]


def other_cases():
    cases = []
    for value in BAD_DEVICES:
        cases.append((["testbed", "train", "--out", "{tmp}/model", "--steps", "1", "--device", value], value))
        cases.append((["train", "learnpruner", "--model", "{model}", "--out", "{tmp}/lp", "--steps", "1",
                       "--device", value], value))
        cases.append((["bench", "latency", "--out", "{tmp}/lat", "--device", value], value))
    cases.append((["bench", "latency", "--out", "{tmp}/lat", "--device", "cpu"], "cpu"))
    for value in BAD_FOLDERS:
        cases.append((["testbed", "train", "--out", value, "--device", "cpu", "--steps", "1"], value))
        cases.append((["train", "learnpruner", "--model", "{model}", "--out", value, "--device", "cpu"], value))
        cases.append((["testbed", "splits", "--out", value], value))
        cases.append((["testbed", "hub-copies", "--out", value], value))
        cases.append((["leaderboard", "{results}", "-o", value], value))
        cases.append((["testbed", "evaluate", "--strategies", "none", "--limit", "1", "--output", value + "/r.json"],
                      value))
        cases.append((["bench", "latency", "--out", value], value))
    cases.append((["testbed", "evaluate", "--strategies", "none", "--limit", "1", "--output", "{results}"], "{results}"))
    for value in BAD_NAMES:
        cases.append((["testbed", "evaluate", "--strategies", value, "--limit", "1"], value or "--strategies"))
        cases.append((["bench", "latency", "--strategies", value], value or "--strategies"))
    for value in BAD_BUDGETS:
        cases.append((["testbed", "evaluate", "--strategies", "none,fastv", "--budget", value, "--limit", "1"], value))
        cases.append((["bench", "latency", "--budgets", value], value))
    for value in ["0", "x", "1_0", "-8", ""]:
        cases.append((["bench", "latency", "--batch", value], value or "--batch"))
    for value in ["nope", "eagre", ""]:
        cases.append((["bench", "latency", "--modes", value], value or "--modes"))
    for value in ["nope", "llava-1.5-7", "x" * 5000]:
        cases.append((["bench", "latency", "--arch", value], value))
    for value in BAD_DTYPES:
        cases.append((["bench", "latency", "--dtype", value], value or "--dtype"))
        cases.append((["train", "learnpruner", "--model", "{model}", "--out", "{tmp}/lp", "--device", "cpu",
                       "--dtype", value], value or "--dtype"))
    for value in BAD_PARAMS:
        strategy = value.split(".")[0] if value.startswith(("learnpruner", "transprune", "random")) else "fastv"
        cases.append((["testbed", "evaluate", "--strategies", f"none,{strategy}", "--param", value, "--limit", "1"],
                      named_in_message(value)))
    for command in (["testbed", "train", "--out", "{tmp}/m", "--device", "cpu"],
                    ["train", "learnpruner", "--model", "{model}", "--out", "{tmp}/lp", "--device", "cpu"]):
        for option, value in [("--learning-rate", "nan"), ("--learning-rate", "inf"), ("--learning-rate", "-1"),
                              ("--max-seconds", "nan"), ("--max-seconds", "-5"), ("--workers", "100000"),
                              ("--workers", "-1")]:
            cases.append(([*command, option, value], option))
    cases.append((["run", "--suite", "{bad}/laughs.yaml"], "laughs.yaml"))
    cases += [
        (["testbed", "evaluate", "--strategies", "fastV"], "fastV"),
        (["testbed", "evaluate", "--split", "nope"], "nope"),
        (["testbed", "evaluate", "--model", "/nonexistent/model"], "/nonexistent/model"),
        (["testbed", "evaluate", "--model", "{broken_model}", "--strategies", "none", "--limit", "1"], "{broken_model}"),
        (["testbed", "evaluate", "--model", "{file}"], "{file}"),
        (["testbed", "evaluate", "--data", "/nonexistent/data"], "/nonexistent/data"),
        (["testbed", "evaluate", "--data", "{bad}", "--strategies", "none"], "{bad}"),
        (["testbed", "train", "--out", "{tmp}/m", "--device", "cpu", "--init-from", "/nonexistent/m"], "/nonexistent/m"),
        (["testbed", "train", "--out", "{tmp}/m", "--device", "cpu", "--steps", "0"], "--steps"),
        (["testbed", "hub-copies", "--testbed", "/nonexistent/testbed"], "/nonexistent/testbed"),
        (["leaderboard", "/nonexistent/results"], "/nonexistent/results"),
        (["leaderboard", "{file}"], "{file}"),
        (["train", "learnpruner", "--model", "/nonexistent/model", "--out", "{tmp}/lp", "--device", "cpu"],
         "/nonexistent/model"),
        (["train", "learnpruner", "--model", "{broken_model}", "--out", "{tmp}/lp", "--device", "cpu"], "{broken_model}"),
        (["train", "learnpruner", "--model", "{model}", "--out", "{tmp}/lp", "--device", "cpu", "--image-folder",
          "/nonexistent/images", "--data", "{bad}/records-garbage.json"], "/nonexistent/images"),
    ]
    for name in [n for n in BAD_FILES if n.startswith("records")] + ["binary.yaml", "latin1.yaml"]:
        cases.append((["train", "learnpruner", "--model", "{model}", "--out", "{tmp}/lp", "--device", "cpu",
                       "--data", "{bad}/" + name], name))
    for value in ["{fifo}", "{folder_yaml}", "/nonexistent/records.json"]:
        cases.append((["train", "learnpruner", "--model", "{model}", "--out", "{tmp}/lp", "--device", "cpu",
                       "--data", value], value))
    return cases


CASES = run_cases() + other_cases()


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_testbed_model):
    """The paths the cases name: good ones (a model, a results folder) and bad ones (files, a FIFO, ...)."""
    root = tmp_path_factory.mktemp("bad-input")
    bad = root / "bad"
    bad.mkdir()
    for name, data in BAD_FILES.items():
        (bad / name).write_bytes(data)
    (root / "file").write_text("a regular file\n")
    (root / "x.yaml").mkdir()
    os.mkfifo(root / "fifo.yaml")
    broken = root / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_bytes(b"{\"model_type\": \"llava\", \x00\xff garbage")
    (root / "empty").mkdir()
    (root / "results").mkdir()
    return {"model": tiny_testbed_model, "tmp": str(root / "work"), "file": str(root / "file"), "bad": str(bad),
            "folder_yaml": str(root / "x.yaml"), "fifo": str(root / "fifo.yaml"),
            "missing_yaml": str(root / "missing.yaml"), "broken_model": str(broken), "empty_folder": str(root / "empty"),
            "results": str(root / "results")}


def fill(text: str, places: dict) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: places.get(match.group(1), match.group(0)), text)


def named(expected: str, output: str) -> bool:
    """The message names the bad value: whole, or its start where a long one is shortened."""
    flat = " ".join(output.split())
    value = " ".join(expected.split())
    return value[:24] in flat or repr(value)[:24] in flat


@pytest.mark.parametrize("args, expected", CASES, ids=[f"{i}-{' '.join(a)[:60]}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_clear_message(args, expected, places, offline_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("PRUNING_ZOO_DEBUG", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    places = {**places, "tmp": str(tmp_path / "work")}
    args = [fill(arg, places) for arg in args]
    expected = fill(expected, places)
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"raised {type(result.exception).__name__}: {result.exception}\n{output}")
    assert result.exit_code != 0, output
    assert "Traceback" not in output and "fault of pruning-zoo" not in output, output
    assert named(expected, output), f"the message does not name {expected[:80]!r}:\n{output}"
    out = os.path.join(places["tmp"], "out")
    assert not os.path.isdir(out) or not any(entry.is_dir() for entry in os.scandir(out)), (
        "a cell was written despite the bad input")


def test_the_fuzz_is_a_few_hundred_cases():
    assert len(CASES) >= 300


def random_texts(seed: int, count: int) -> list[str]:
    """Seeded random strings over the characters that break parsers: digits, signs, dots, brackets, quotes,
    YAML's markers, whitespace, non-ASCII digits and control bytes."""
    import random

    pick = random.Random(seed)
    alphabet = "0123456789" * 3 + "-+._eE,;:=[]{}()'\"!&*|>%@`#?\\ \t\n\r\x00\x7f" + "٣६６ñé\u2028\ufeff" + "abkxyz"
    return [''.join(pick.choice(alphabet) for _ in range(pick.randint(0, 12))) for _ in range(count)]


@pytest.mark.parametrize("seed", range(4))
def test_any_text_is_a_budget_or_a_clear_error(seed):
    from pruning_zoo.errors import InvalidParameterError
    from pruning_zoo.strategy.budget import MAX_BUDGET, parse_budget

    for text in random_texts(seed, 3000):
        try:
            budget = parse_budget(text)
        except InvalidParameterError:
            continue
        assert (isinstance(budget, int) and 1 <= budget <= MAX_BUDGET) or (
            isinstance(budget, float) and 0 < budget <= 1), (text, budget)
        assert str(budget) == text.strip() or float(text) == budget  # what was written, read as written


@pytest.mark.parametrize("seed", range(4))
def test_any_parameter_text_is_a_parameter_or_a_clear_error(seed):
    from pruning_zoo import get_strategy
    from pruning_zoo.errors import PruningZooError
    from pruning_zoo.strategy.params import parse_param_overrides

    for value in random_texts(seed, 1500):
        for name in ("fastv.k", "transprune.prune_layers", "fastv.score", "visionzip.contextual_ratio"):
            try:
                overrides = parse_param_overrides([f"{name}={value}"])
                strategy = get_strategy(name.split(".")[0], **overrides[name.split(".")[0]])
            except PruningZooError:
                continue
            assert getattr(strategy.params, name.split(".")[1]) is not None


@pytest.mark.parametrize("seed", range(4))
def test_any_yaml_text_is_data_or_a_clear_error(seed):
    from pruning_zoo.errors import InvalidParameterError
    from pruning_zoo.inputs import parse_yaml

    for text in random_texts(seed, 3000) + [t + ": " + u for t, u in zip(random_texts(seed + 10, 500),
                                                                        random_texts(seed + 20, 500))]:
        try:
            parse_yaml(text, "test text")
        except InvalidParameterError as error:
            assert "test text" in str(error)
