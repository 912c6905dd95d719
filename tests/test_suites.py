import pytest

from pruning_zoo.errors import PruningZooError
from pruning_zoo.eval.suite import builtin_suite_files, load_suite


@pytest.mark.parametrize("name", sorted(builtin_suite_files()))
def test_builtin_suites_validate(name):
    suite = load_suite(name)
    assert suite.name == name and suite.cells()


def test_image_vqa_uses_lmms_eval_task_names():
    assert load_suite("image-vqa").tasks == ["gqa", "mme", "pope", "textvqa_val", "scienceqa_img", "mmbench_en_dev"]


@pytest.mark.parametrize("name", sorted(builtin_suite_files()))
def test_every_builtin_suite_task_is_known_to_lmms_eval(name):
    from lmms_eval.tasks import TaskManager

    from pruning_zoo.eval.tasks import check_tasks, local_task_folders

    suite = load_suite(name)
    manager = TaskManager("WARNING", include_path=[str(p) for p in local_task_folders(None, suite.task_paths)])
    check_tasks(manager, suite.tasks)  # raises for a name lmms-eval does not index


def test_none_runs_once_per_model_and_task_with_every_token():
    suite = load_suite("testbed")
    assert [cell for cell in suite.cells() if cell[2] == "none"] == [("testbed/model", "testbed", "none", 1.0)]
    assert len(suite.cells()) == 1 + 2 * (len(suite.strategies) - 1)


def test_a_suite_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("tasks: [pope]\nmodels: [./model]\nstrategies: {none: {}, fastv: {k: 3}}\nbudgets: [64, 0.25]\n")
    suite = load_suite(str(path))
    assert suite.name == "mine" and suite.strategies["fastv"] == {"k": 3}
    assert len(suite.cells()) == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("tasks: []\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [64]\n", "tasks: List should have at least 1 item"),
        ("tasks: [t]\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [64]\nbatch: 2\n", "batch: Extra inputs"),
        ("tasks: [t]\nmodels: [m]\nstrategies: {none: {}}\nbudgets: [2.0]\n", "outside (0, 1]"),
        ("tasks: [t]\nmodels: [m]\nstrategies: {fast: {}}\nbudgets: [64]\n", "unknown strategy 'fast'"),
        ("tasks: [t]\nmodels: [m]\nstrategies: {fastv: {k: -1}}\nbudgets: [64]\n", "parameter fastv.k"),
        ("- just a list\n", "must hold a mapping"),
        ("tasks: [t\n", "not valid YAML"),
    ],
)
def test_invalid_suite_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PruningZooError) as error:
        load_suite(str(path))
    assert message in str(error.value)
