"""The Slicer module's world shared by the module tests: a scene of its own and the module loaded
in the Slicer 5.10 stand-ins (`_slicer_fakes`), its models set to small random-weight ones."""
from __future__ import annotations

import pytest

from RetrievalSegLib.worker import protocol as wp

#: The module's engine settings in these tests: SAM 2.1 tiny at 256 px, random weights, the CPU.
MODULE_SETTINGS = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)


@pytest.fixture()
def fresh_scene(slicer_scene):  # type: ignore[no-untyped-def]
    """A scene of its own (these tests close it), set up as conftest's slicer_scene (converter rules)."""
    slicer = slicer_scene[0]
    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    yield scene
    color_logic.SetMRMLScene(None)


@pytest.fixture()
def module_world(monkeypatch, fresh_scene, tmp_path):  # type: ignore[no-untyped-def]
    """(the RetrievalSeg module, the fake Slicer GUI) with the module's engine settings MODULE_SETTINGS."""
    import importlib

    from _slicer_fakes import fake_slicer_gui

    gui = fake_slicer_gui(monkeypatch, fresh_scene, temporary_path=str(tmp_path))
    module = importlib.import_module("RetrievalSeg")
    monkeypatch.setattr(module.RetrievalSegLogic, "engineSettings",
                        staticmethod(lambda node, folder=None: MODULE_SETTINGS))
    return module, gui
