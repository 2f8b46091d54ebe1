"""The Slicer module (RetrievalSeg.py) in a world that looks like Slicer 5.10.

Qt, CTK, the application and the module base classes are stand-ins that refuse every name Slicer
5.10 lacks (`_slicer_fakes.py`, from `data/slicer_api_5.10.jsonl`); MRML is real (slicer-core);
the worker runs under the CTKAppLauncher stand-in. What is checked (issue "Slicer"):
* every slicer/qt/ctk name the module, its logic and the bridge use exists in Slicer 5.10
  (static, with a negative control: the old Segment Editor call is caught);
* the Segment Editor's undo point is saved through its real API (defect 5);
* "Close scene" forgets the result, its undo record and the suggestions although the next
  scene's nodes get the same IDs (defect 4);
* the self-test ends its worker although Slicer calls runTest() directly (defect 6);
* Slicer 5.8's Python 3.9 is refused before anything is installed (defect 3); the Slicer-side
  install pins the lock's versions and sam2's hash (defect 9).
"""
from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import numpy as np
import pytest

from _launcher import wait_gone
from _slicer_fakes import API, Fake
from _small_world import bank_through_worker
from RetrievalSegLib.slicer_logic import mrml_bridge as mb
from RetrievalSegLib.worker import protocol as wp
from RetrievalSegLib.data.synthetic import make_synthetic_study

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "RetrievalSeg" / "RetrievalSeg.py"
SETTINGS = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)  # as conftest.MODULE_SETTINGS


# ------------------------------------------------------------------------------- the API list
def api_violations(source: str) -> list[str]:
    """slicer/qt/ctk names in `source` (its longest attribute chains) that Slicer 5.10 does not have."""
    tree = ast.parse(source)
    bad: list[str] = []
    module_members = set(API.members("qSlicerAbstractModule")) | set(API.members("qSlicerScriptedLoadableModule"))
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)}

    def chain(node: ast.AST) -> list[str] | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in ("slicer", "qt", "ctk"):
            return [node.id, *reversed(parts)]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slicer":
            names = API.modules.get(node.module, API.modules["slicer"])
            bad += [f"from {node.module} import {a.name}" for a in node.names if a.name not in names]
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        parts = chain(node)
        if not parts:
            continue
        root, first, rest = parts[0], parts[1], parts[2:]
        text = ".".join(parts)
        if root in ("qt", "ctk"):
            if first not in API.modules[root] or (rest and API.members(first).get(rest[0]) not in ("static", "enum")):
                bad.append(text)
        elif first in ("util", "modules", "i18n"):
            if rest and rest[0] not in API.modules[f"slicer.{first}"]:
                bad.append(text)
            elif first == "modules" and len(rest) > 1 and not rest[0].endswith("Widget") and rest[1] not in module_members:
                bad.append(text)  # a module object: qSlicerAbstractModule / qSlicerScriptedLoadableModule
        elif first == "app":
            if rest and not API.has("qSlicerApplication", rest[0]):
                bad.append(text)
        elif first == "mrmlScene":
            # vtkObject's own methods (AddObserver, ...) are not in the list: VTK, not Slicer.
            if rest and not API.has("vtkMRMLScene", rest[0]) and rest[0] not in ("AddObserver", "RemoveObserver"):
                bad.append(text)
        elif first not in API.modules["slicer"]:
            bad.append(text)
    return bad


@pytest.mark.parametrize("name", ["RetrievalSeg/RetrievalSeg.py", "RetrievalSegLib/slicer_logic/logic.py",
                                  "RetrievalSegLib/slicer_logic/mrml_bridge.py", "RetrievalSegLib/slicer_logic/results.py"])
def test_module_uses_only_names_slicer_5_10_has(name: str) -> None:
    bad = api_violations((ROOT / name).read_text(encoding="utf-8"))
    assert not bad, f"{name} uses names Slicer 5.10 does not have (Testing/data/slicer_api_5.10.jsonl): {bad}"


def test_the_api_check_catches_what_slicer_lacks() -> None:
    """Negative control: the Segment Editor call of issue defect 5, a Qt typo, a util typo."""
    snippet = (
        "slicer.modules.segmenteditor.isWidgetRepresentationCreated()\n"
        "qt.QTimer.singleShoot(0, f)\n"
        "slicer.util.confirmOkCancel('x')\n"
        "slicer.app.temporaryFolder\n"
        "from slicer.util import VTKObservationMixin, NoSuchThing\n"
        "ctk.ctkPathLineEdit.Folders\n"
    )
    assert sorted(api_violations(snippet)) == sorted([
        "slicer.modules.segmenteditor.isWidgetRepresentationCreated", "qt.QTimer.singleShoot",
        "slicer.util.confirmOkCancel", "slicer.app.temporaryFolder", "from slicer.util import NoSuchThing",
        "ctk.ctkPathLineEdit.Folders"])
    fine = "slicer.modules.SegmentEditorWidget.editor\nqt.QTimer.singleShot(0, f)\nslicer.app.temporaryPath\n"
    assert api_violations(fine) == []


def test_the_fakes_refuse_what_slicer_lacks() -> None:
    module = Fake("qSlicerScriptedLoadableModule")
    with pytest.raises(AttributeError, match="isWidgetRepresentationCreated"):
        module.isWidgetRepresentationCreated()
    assert callable(module.widgetRepresentation)  # a PythonQt decorator adds it (qSlicerBaseQTGUIPythonQtDecorators.h)
    button = Fake("QPushButton")
    button.enabled = False
    with pytest.raises(AttributeError, match="enable"):
        button.enable = True  # a typo: PythonQt would only add a Python attribute
    with pytest.raises(AttributeError, match="clicked2"):
        button.connect("clicked2(bool)", lambda checked: None)
    with pytest.raises(AssertionError, match="not modelled"):
        bool(Fake("qSlicerApplication").layoutManager())


# ------------------------------------------------------------------------------- the module
def test_segment_editor_undo_point_uses_its_real_api(module_world, fresh_scene) -> None:  # type: ignore[no-untyped-def]
    module, gui = module_world
    save = module.RetrievalSegWidget._saveSegmentEditorUndoState
    node = fresh_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    save(node)  # the Segment Editor's GUI was never opened: nothing to do, and no error
    saved = []
    editor = Fake("qMRMLSegmentEditorWidget", segmentationNode=lambda: other, saveStateForUndo=lambda: saved.append(1))
    other = fresh_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    gui.modules.SegmentEditorWidget = Fake("SegmentEditor.SegmentEditorWidget", editor=editor)
    save(node)
    assert saved == []  # the editor edits another segmentation
    other = node
    save(node)
    assert saved == [1], "Ctrl+Z in the Segment Editor would not undo the written result"


def test_python_3_9_is_refused_before_anything_is_installed(module_world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Slicer 5.8 (Python 3.9): say which Slicer is needed; ask nothing, install nothing."""
    import slicer

    module, gui = module_world
    asked, installed = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: asked.append(a) or True)
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: installed.append(args))
    old = types.SimpleNamespace(version_info=(3, 9, 18, "final", 0), executable=module.sys.executable,
                                path=module.sys.path)
    monkeypatch.setattr(module, "sys", old)
    monkeypatch.setattr(module.RetrievalSegLogic, "missingPackages", staticmethod(lambda: ["sam2", "transformers"]))
    with pytest.raises(RuntimeError, match=r"Slicer 5\.10 or newer.*Python 3\.9\.18"):
        module.RetrievalSegLogic().installDependencies(askConfirmation=True)
    assert asked == [] and installed == []
    widget = module.RetrievalSegWidget()
    widget.setup()
    assert "Slicer 5.10 or newer" in gui.ui.dependenciesStatusLabel.text
    widget.cleanup()


def test_slicer_side_install_pins_the_lock() -> None:
    """What Install dependencies asks pip for are the versions the tests ran with (requirements.lock)."""
    source = MODULE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    constants = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and t.id in ("REQUIREMENTS", "SAM2_REQUIREMENT", "SAM2_SHA256")}
    lock = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    locked = {m.group(1).lower().replace("_", "-"): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M)}
    for requirement in constants["REQUIREMENTS"].values():
        name, _, version = requirement.partition("==")
        assert version, f"{requirement} is not pinned"
        assert locked.get(name.lower().replace("_", "-")) == version, f"{requirement}: the lock has {locked.get(name.lower())}"
    sam2_lock = (ROOT / "requirements-sam2.lock").read_text(encoding="utf-8")
    assert constants["SAM2_REQUIREMENT"] in sam2_lock and f"sha256:{constants['SAM2_SHA256']}" in sam2_lock


# ------------------------------------------------------------------------------- with the worker
@pytest.fixture(scope="module")
def small_bank(tmp_path_factory, worker_client):  # type: ignore[no-untyped-def]
    """A bank made by worker jobs (the session's worker, under the launcher stand-in)."""

    cases = make_synthetic_study(n_cases=2, shape=(4, 40, 40), spacing=(1.2, 1.0, 5.0), seed=7)
    path = tmp_path_factory.mktemp("module-bank") / "bank"
    bank_through_worker(worker_client, path, cases[0], SETTINGS, case_id="c0")
    return path, cases[1]


def _pump(widget, timeout: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        widget._onPollTimer()
        if not widget._jobRunning() and not widget.logic.core.has_result:
            return
        time.sleep(0.05)
    raise TimeoutError("the worker job did not end")


def test_close_scene_forgets_the_result_although_the_next_scene_reuses_its_ids(
        module_world, fresh_scene, small_bank, worker_client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    module, gui = module_world
    monkeypatch.setattr(module.RetrievalSegLogic, "workerClient", staticmethod(lambda: worker_client))
    widget = module.RetrievalSegWidget()
    try:
        widget.setup()
        bank_path, case = small_bank
        gui.ui.bankPathLineEdit.currentPath = str(bank_path)
        widget.onOpenBank()
        volume = mb.volume_to_node(case.image, fresh_scene, "before close")
        params = widget._parameterNode
        params.inputVolume, params.k = volume, 1
        widget.onApplyButton()
        _pump(widget)
        assert gui.errors == [] and widget.logic.core.can_undo
        ids = volume.GetID(), params.outputSegmentation.GetID()

        fresh_scene.Clear(0)  # File > Close Scene: StartCloseEvent, nodes removed, IDs reset, EndCloseEvent
        new_volume = mb.volume_to_node(case.image, fresh_scene, "after close")
        new_segmentation = mb.labelmap_to_segmentation((case.labels, widget.logic.core.bank.labels), fresh_scene, new_volume)
        assert (new_volume.GetID(), new_segmentation.GetID()) == ids  # the reuse that makes IDs unsafe

        core = widget.logic.core
        assert not core.can_undo, "Undo of the closed scene's result would act on the new scene's nodes"
        with pytest.raises(RuntimeError, match="no result to undo"):
            core.undo_last_result(fresh_scene)
        assert new_segmentation.GetScene() is fresh_scene and new_segmentation.GetSegmentation().GetNumberOfSegments() == 3
        with pytest.raises(RuntimeError, match="run Segment first"):
            core.edited_slices(new_volume, new_segmentation)  # no stale snapshot for "Add edited slices"
        params = widget._parameterNode
        params.inputVolume, params.outputSegmentation = new_volume, new_segmentation
        widget._checkCanApply()
        assert not gui.ui.undoButton.enabled and not gui.ui.addEditedSlicesButton.enabled
        assert not gui.ui.resegmentButton.enabled
    finally:
        widget.cleanup()


def test_self_test_ends_its_worker_when_it_fails(module_world, monkeypatch, slicer_launcher, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Reload and Test calls runTest() directly: no unittest runner runs addCleanup."""
    from RetrievalSegLib.worker.client import WorkerClient

    module, gui = module_world
    client = WorkerClient(python=str(slicer_launcher), log_dir=tmp_path)
    monkeypatch.setattr(module.RetrievalSegLogic, "workerClient", staticmethod(lambda: client))
    monkeypatch.setattr(module.RetrievalSegLogic, "missingPackages", staticmethod(lambda: []))
    # A backbone the worker does not know: the first job fails fast, after the worker started.
    monkeypatch.setattr(module.module_logic, "EngineSettings",
                        lambda **kw: wp.EngineSettings(**{**kw, "sam2_size": "no-such-backbone"}))
    test = module.RetrievalSegTest()
    with pytest.raises(Exception, match="no-such-backbone"):
        test.runTest()
    assert client.worker_pid is not None, "the worker never started"
    assert wait_gone(client.worker_pid), "the self-test left its worker running"
