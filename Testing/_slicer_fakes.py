"""Stand-ins for the parts of 3D Slicer that the slicer-core wheel lacks (Qt, CTK, the application,
the module base classes), each refusing every name that Slicer 5.10 does not have.

The names come from `Testing/data/slicer_api_5.10.jsonl` (made by `extract_slicer_api.py` from
Slicer's, CTK's and Qt's sources). A `Fake` is an instance of one class of that list: reading a
method, property, signal or enum of the class (or of its bases) works, anything else raises
AttributeError, as PythonQt would. Assigning works for properties only (in PythonQt assigning
another name would only make a Python attribute: almost always a typo of a property). A method
returns what the test configured; one that is not configured returns `Unmodelled`, which raises
on any use, so a test can never pass on a value nobody modelled. `connect("signal(args)", slot)`
checks the signal exists. MRML stays real (slicer-core).
"""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Callable

DATA = Path(__file__).resolve().parent / "data" / "slicer_api_5.10.jsonl"


class SlicerApi:
    """Slicer 5.10's Python-visible names, by class and by module."""

    def __init__(self, path: Path = DATA) -> None:
        self.classes: dict[str, dict] = {}
        self.modules: dict[str, set[str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "class" in record:
                self.classes[record["class"]] = record
            elif "module" in record:
                self.modules[record["module"]] = set(record["names"])
        self._members: dict[str, dict[str, str]] = {}

    def members(self, cls: str) -> dict[str, str]:
        """{name: kind} of a class and its bases (kind: method, static, property, signal, enum)."""
        if cls not in self._members:
            if cls not in self.classes:
                raise KeyError(f"{cls} is not a class of Slicer 5.10's API list ({DATA.name})")
            out: dict[str, str] = {}
            record = self.classes[cls]
            for base in record["bases"]:
                if base in self.classes:
                    out.update(self.members(base))
            for kind, key in (("method", "methods"), ("property", "properties"), ("signal", "signals"),
                              ("enum", "enums"), ("static", "static")):
                out.update({name: kind for name in record[key]})
            self._members[cls] = out
        return self._members[cls]

    def has(self, cls: str, name: str) -> bool:
        """True when Slicer 5.10's `cls` (or a base) has `name`."""
        return name in self.members(cls)


API = SlicerApi()


class Unmodelled:
    """The return value of a call that no test modelled: any use of it fails the test."""

    def __init__(self, what: str) -> None:
        object.__setattr__(self, "_what", what)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the return value of {self._what} is not modelled by this test")

    __getattr__ = __call__ = __bool__ = __iter__ = __len__ = __eq__ = __index__ = __float__ = _fail  # type: ignore[assignment]
    __hash__ = None  # type: ignore[assignment]


class Fake:
    """An instance of Slicer 5.10's class `cls` that has only that class's names.

    `members` configure it: a property's value, or a method's implementation (a callable) or
    constant return value (anything else). Calls are recorded in `calls` as (name, args, kwargs).
    """

    def __init__(self, cls: str, name: str = "", **members: Any) -> None:
        API.members(cls)  # an unknown class is an error here
        for member in members:
            if not API.has(cls, member):
                raise AttributeError(f"a fake {cls} cannot define {member!r}: Slicer 5.10's {cls} has no such name")
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_name", name or cls)
        object.__setattr__(self, "_members", dict(members))
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "connections", {})

    def __repr__(self) -> str:
        return f"<fake {self._cls} {self._name}>"

    def __getattr__(self, attr: str) -> Any:
        cls = object.__getattribute__(self, "_cls")
        kind = API.members(cls).get(attr)
        if kind is None:
            raise AttributeError(f"{cls} has no attribute {attr!r} in Slicer 5.10 ({DATA.name})")
        members = object.__getattribute__(self, "_members")
        if kind == "property":  # PythonQt: a property wins over a method of the same name
            return members.get(attr)
        if kind == "enum":
            return members.get(attr, attr)
        if kind == "signal":
            return _Signal(self, attr)
        return _Method(self, attr, members.get(attr, _UNSET))

    def __setattr__(self, attr: str, value: Any) -> None:
        cls = object.__getattribute__(self, "_cls")
        if API.members(cls).get(attr) != "property":
            raise AttributeError(f"{cls} has no property {attr!r} in Slicer 5.10 ({DATA.name}); "
                                 "assigning it would only add a Python attribute")
        self._members[attr] = value

    def calls_to(self, method: str) -> list[tuple]:
        """The (args, kwargs) of every call of `method`."""
        return [(a, k) for name, a, k in self.calls if name == method]

    def emit(self, signal: str, *args: Any) -> None:
        """Call the slots connected to `signal` (a test playing the user)."""
        for slot in self.connections.get(signal, []):
            slot(*args)


_UNSET = object()


class _Method:
    def __init__(self, owner: Fake, name: str, impl: Any) -> None:
        self.owner, self.name, self.impl = owner, name, impl

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.owner.calls.append((self.name, args, kwargs))
        generic = _GENERIC.get(self.name)
        if self.impl is _UNSET and generic is not None:
            return generic(self.owner, *args)
        if self.impl is _UNSET:
            setter = _setter_property(self.owner, self.name)
            if setter:
                self.owner._members[setter] = args[0] if args else None
                return None
            return Unmodelled(f"{self.owner._cls}.{self.name}()")
        return self.impl(*args, **kwargs) if callable(self.impl) else self.impl


def _setter_property(owner: Fake, method: str) -> str | None:
    """`setText(x)` sets the property `text`, as Qt's setters do."""
    if not method.startswith("set") or len(method) < 4:
        return None
    prop = method[3].lower() + method[4:]
    return prop if API.members(owner._cls).get(prop) == "property" else None


class _Signal:
    def __init__(self, owner: Fake, name: str) -> None:
        self.owner, self.name = owner, name

    def connect(self, slot: Callable) -> None:
        self.owner.connections.setdefault(self.name, []).append(slot)


def _connect(owner: Fake, signal: Any, slot: Callable = None, *rest: Any) -> bool:  # type: ignore[assignment]
    """PythonQt's QObject.connect("signal(args)", callable): the signal must exist."""
    name = str(signal).split("(")[0]
    if API.members(owner._cls).get(name) != "signal":
        raise AttributeError(f"{owner._cls} has no signal {signal!r} in Slicer 5.10 ({DATA.name})")
    owner.connections.setdefault(name, []).append(slot)
    return True


def _block_signals(owner: Fake, block: bool) -> bool:
    was = bool(owner._members.get("_blocked", False))
    owner._members["_blocked"] = bool(block)
    return was


#: Behaviour of a few QObject/QWidget methods every widget has (tests may still configure them).
_GENERIC: dict[str, Callable[..., Any]] = {
    "connect": _connect,
    "blockSignals": _block_signals,
    "show": lambda owner: owner._members.__setitem__("visible", True),
    "hide": lambda owner: owner._members.__setitem__("visible", False),
    "deleteLater": lambda owner: None,
}


class FakeClass:
    """A class of a fake Qt/CTK/Slicer module: calling it makes a Fake; statics and enums only."""

    def __init__(self, cls: str, factory: Callable[..., Fake] | None = None, **statics: Any) -> None:
        self.cls, self.factory, self.statics = cls, factory, statics
        self.instances: list[tuple[Fake, tuple]] = []  # (instance, constructor arguments)
        for name in statics:
            if API.members(cls).get(name) not in ("static", "enum"):
                raise AttributeError(f"{cls}.{name} is not a static method or enum of Slicer 5.10's {cls}")

    def __call__(self, *args: Any) -> Fake:
        fake = self.factory(*args) if self.factory else Fake(self.cls)
        self.instances.append((fake, args))
        return fake

    def __getattr__(self, attr: str) -> Any:
        kind = API.members(self.cls).get(attr)
        if kind == "enum":
            return self.statics.get(attr, attr)
        if kind == "static":
            return self.statics.get(attr, Unmodelled(f"{self.cls}.{attr}"))
        raise AttributeError(f"{self.cls}.{attr} is not a static method or enum in Slicer 5.10 ({DATA.name})")


class FakeModule(types.ModuleType):
    """A Python module (qt, ctk, slicer.util, slicer.modules, ...) holding only Slicer 5.10's names."""

    def __init__(self, name: str, **members: Any) -> None:
        super().__init__(name)
        allowed = API.modules[name]
        self.__dict__["_allowed"] = allowed
        for member in members:
            if member not in allowed:
                raise AttributeError(f"a fake {name} cannot define {member!r}: Slicer 5.10's {name} has no such name")
        self.__dict__.update(members)
        self.__dict__["_allowed"] = allowed

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr not in self.__dict__.get("_allowed", ()) and not attr.startswith("__"):
            raise AttributeError(f"module {self.__name__} has no attribute {attr!r} in Slicer 5.10 ({DATA.name})")
        super().__setattr__(attr, value)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr in self.__dict__["_allowed"]:
            if attr[:1] == "Q" or attr[:3] in ("ctk", "qMR", "qSl"):
                cls = FakeClass(attr)
                self.__dict__[attr] = cls
                return cls
            if self.__name__ == "slicer.modules":  # a module not loaded, a GUI not created: absent, as in Slicer
                raise AttributeError(f"slicer.modules.{attr} is not loaded in this test")
            return Unmodelled(f"{self.__name__}.{attr}")
        raise AttributeError(f"module {self.__name__} has no attribute {attr!r} in Slicer 5.10 ({DATA.name})")


def checked_namespace(module: str, **members: Any) -> types.SimpleNamespace:
    """A plain namespace whose names must all exist in Slicer 5.10's `module` (for hand-written stand-ins)."""
    unknown = sorted(set(members) - API.modules[module])
    if unknown:
        raise AttributeError(f"Slicer 5.10's {module} has no {unknown}")
    return types.SimpleNamespace(**members)


def checked_class(qualified: str, cls: type) -> type:
    """A hand-written stand-in class whose public members must all exist in Slicer 5.10's class."""
    record = API.classes[qualified]
    allowed = set(record["methods"]) | set(record["properties"])
    own = {n for n in vars(cls) if not n.startswith("_")}
    unknown = sorted(own - allowed)
    if unknown:
        raise AttributeError(f"Slicer 5.10's {qualified} has no {unknown}; the stand-in must not add them")
    return cls


# ============================================================================ the module's world
ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "RetrievalSeg" / "Resources" / "UI" / "RetrievalSeg.ui"


def fake_slicer_gui(monkeypatch: Any, scene: Any, red_slice_node: Any = None, temporary_path: str = "") -> types.SimpleNamespace:
    """Install Slicer 5.10 stand-ins around a real slicer-core `scene`; return what a test drives.

    The returned namespace has `ui` (a Fake per widget of the .ui file, of the widget's class),
    `errors` (what tryWithErrorDisplay caught and errorDisplay/warningDisplay showed), `qt`,
    `app`, `modules`, `markups_logic`, `settings` (the QSettings store), `single_shots`
    (QTimer.singleShot calls, not run) and `red` (the Red slice node).
    """
    import sys
    import unittest
    import xml.etree.ElementTree as ET
    from contextlib import contextmanager

    import slicer

    gui = types.SimpleNamespace(errors=[], settings={}, single_shots=[], red=red_slice_node)
    if gui.red is None:
        gui.red = scene.AddNewNodeByClass("vtkMRMLSliceNode")

    def settings(*args: Any) -> Fake:
        return Fake("QSettings", value=lambda key, default=None: gui.settings.get(key, default),
                    setValue=lambda key, value: gui.settings.__setitem__(key, value))

    gui.qt = FakeModule(
        "qt",
        QSettings=FakeClass("QSettings", settings),
        QTimer=FakeClass("QTimer", singleShot=lambda msec, slot: gui.single_shots.append((msec, slot))),
        QPixmap=FakeClass("QPixmap", fromImage=lambda image, *flags: Fake("QPixmap")),
    )
    gui.ctk = FakeModule("ctk")
    monkeypatch.setitem(sys.modules, "qt", gui.qt)
    monkeypatch.setitem(sys.modules, "ctk", gui.ctk)
    i18n = FakeModule("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)

    # The module's base classes: only names that Slicer 5.10's ScriptedLoadableModule.py has.
    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            self.moduleName = type(self).__name__[: -len("Widget")]
            # What Slicer passes: the C++ qSlicerScriptedLoadableModuleWidget, whose layout() is the panel's.
            self.parent = parent or Fake("qSlicerScriptedLoadableModuleWidget", isEntered=True,
                                         layout=lambda: panel_layout)
            self.layout = self.parent.layout()

        def setup(self) -> None:
            pass

        def cleanup(self) -> None:
            pass

        def resourcePath(self, filename: str) -> str:
            return str(ROOT / "RetrievalSeg" / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self) -> Any:
            return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, requestedDelay: Any = None, msec: Any = None) -> None:
            gui.delay_display.append(message)

    panel_layout = Fake("QVBoxLayout")
    gui.delay_display = []
    base = FakeModule("slicer.ScriptedLoadableModule", **{
        name: checked_class(f"slicer.ScriptedLoadableModule.{name}", cls) for name, cls in (
            ("ScriptedLoadableModule", ScriptedLoadableModule),
            ("ScriptedLoadableModuleWidget", ScriptedLoadableModuleWidget),
            ("ScriptedLoadableModuleLogic", ScriptedLoadableModuleLogic),
            ("ScriptedLoadableModuleTest", ScriptedLoadableModuleTest))})
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", _parameter_node_wrapper())

    # The application: the layout manager with a Red slice view; a temporary folder.
    slice_widget = Fake("qMRMLSliceWidget", mrmlSliceNode=lambda: gui.red)
    layout_manager = Fake("qSlicerLayoutManager", sliceViewNames=lambda: ("Red",),
                          sliceWidget=lambda name: slice_widget if name == "Red" else None)
    gui.app = Fake("qSlicerApplication", layoutManager=lambda: layout_manager, temporaryPath=temporary_path)
    gui.markups_logic = Fake("vtkSlicerMarkupsLogic")
    gui.modules = FakeModule("slicer.modules", markups=Fake("qSlicerMarkupsModule", logic=lambda: gui.markups_logic))

    @contextmanager
    def tryWithErrorDisplay(message: Any = None, show: bool = True, waitCursor: bool = False):  # type: ignore[no-untyped-def]
        try:
            yield
        except Exception as e:  # recorded, then the test fails on it
            gui.errors.append((message, e))

    ui_widgets = {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).iter("widget")}
    grid = Fake("QGridLayout")
    gui.ui = types.SimpleNamespace(**{
        name: Fake(cls, name, **({"layout": lambda: grid} if name == "supportsFrame" else {}))
        for name, cls in ui_widgets.items() if name != "RetrievalSeg"})
    gui.ui.suggestionsListWidget._members["row"] = lambda item: -1
    util = FakeModule(
        "slicer.util",
        VTKObservationMixin=slicer.util.VTKObservationMixin,  # slicer-core's, on real MRML
        tryWithErrorDisplay=tryWithErrorDisplay,
        confirmOkCancelDisplay=lambda *a, **k: True,
        confirmYesNoDisplay=lambda *a, **k: True,
        errorDisplay=lambda *a, **k: gui.errors.append(("errorDisplay", a)),
        infoDisplay=lambda *a, **k: None,
        warningDisplay=lambda *a, **k: gui.errors.append(("warningDisplay", a)),
        setSliceViewerLayers=lambda **k: None,
        loadUI=lambda path: Fake("qMRMLWidget", "RetrievalSeg"),
        childWidgetVariables=lambda widget: gui.ui,
    )
    monkeypatch.setitem(sys.modules, "slicer.util", util)
    for name, value in (("mrmlScene", scene), ("app", gui.app), ("modules", gui.modules), ("util", util),
                        ("qMRMLUtils", FakeClass("qMRMLUtils"))):
        assert name in API.modules["slicer"], name
        monkeypatch.setattr(slicer, name, value, raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "RetrievalSeg"))
    monkeypatch.setitem(sys.modules, "RetrievalSeg", None)  # forgotten again after the test
    del sys.modules["RetrievalSeg"]
    return gui


def _parameter_node_wrapper() -> FakeModule:
    """`parameterNodeWrapper` as a plain holder of the fields' defaults, on a real scripted-module node."""

    def parameterNodeWrapper(cls: type) -> type:  # noqa: N802 (Slicer's name)
        defaults = {k: getattr(cls, k, None) for k in cls.__annotations__}

        class Wrapped:
            def __init__(self, node: Any) -> None:
                self.__dict__.update(defaults)
                self.parameterNode = node

            def connectGui(self, ui: Any) -> str:
                return "tag"

            def disconnectGui(self, tag: Any) -> None:
                pass

            def AddObserver(self, *args: Any) -> int:
                return 1

            def RemoveObserver(self, *args: Any) -> None:
                pass

        return Wrapped

    return FakeModule("slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper,
                      WithinRange=lambda lo, hi: (lo, hi), Choice=lambda choices: tuple(choices))


def _module_with_fake_gui(monkeypatch, scene, temporary_path: str = ""):  # type: ignore[no-untyped-def]
    import importlib

    gui = fake_slicer_gui(monkeypatch, scene, temporary_path=temporary_path)
    return importlib.import_module("RetrievalSeg"), gui.ui, gui.errors
