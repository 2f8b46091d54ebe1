"""Static checks of the Slicer module and extension packaging (3D Slicer itself cannot run here).

* every `self.ui.<name>` in RetrievalSeg.py is a widget of the .ui file, and the parameter node's
  fields and the widgets' SlicerParameterName properties match, with widget types that the
  parameter node wrapper can connect;
* everything RetrievalSeg.py calls on the bridge (`mrml_bridge.X`, `core.X`) exists;
* every RetrievalSegLib module that RetrievalSeg.py imports (transitively) and every
  RetrievalSegLib/*.py file is installed by RetrievalSeg/CMakeLists.txt, and nothing else is;
* the module compiles, has the Slicer classes, and credits the method and the model licences;
* the Extensions Index entry follows the catalog schema and agrees with CMakeLists.txt;
* no RetrievalSegLib file imports slicer/qt/ctk/vtk at module level.
"""
from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "RetrievalSegLib"
MODULE_DIR = ROOT / "RetrievalSeg"
MODULE = MODULE_DIR / "RetrievalSeg.py"
UI = MODULE_DIR / "Resources" / "UI" / "RetrievalSeg.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
CATALOG = ROOT / "RetrievalSeg.json"
GUI_MODULES = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "slicer_core", "__main__", "PythonQt"}
# The catalog entry schema (Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json).
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = CATALOG_REQUIRED | {
    "scm_revision", "scm_type", "build_dependencies", "build_subdirectory", "enabled", "tier",
}


def _module_source() -> str:
    return MODULE.read_text(encoding="utf-8")


def _ui_widgets() -> dict[str, ET.Element]:
    tree = ET.parse(UI)
    return {w.get("name"): w for w in tree.iter("widget")}


# ------------------------------------------------------------------------------- .ui
def test_ui_is_well_formed_with_unique_names() -> None:
    tree = ET.parse(UI)
    root = tree.getroot()
    assert root.tag == "ui" and root.findtext("class") == "RetrievalSeg"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "RetrievalSeg"
    names = [e.get("name") for e in root.iter() if e.tag in ("widget", "layout", "spacer")]
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert not repeated, f"object names used twice in the .ui: {repeated}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, f"custom widgets used but not declared: {sorted(custom - declared)}"
    # Node selectors get the scene from the module widget.
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= connected


def test_every_ui_name_used_by_the_module_exists() -> None:
    used = set(re.findall(r"self\.ui\.(\w+)", _module_source()))
    widgets = _ui_widgets()
    missing = sorted(used - set(widgets))
    assert not missing, f"RetrievalSeg.py uses self.ui.{missing} but the .ui has no such widget"
    # Buttons the module connects must be push buttons, labels must be labels.
    for name in used:
        cls = widgets[name].get("class")
        if name.endswith("Button") and not name.endswith("CollapsibleButton"):
            assert cls == "QPushButton", (name, cls)
        if name.endswith("Label"):
            assert cls == "QLabel", (name, cls)


def _parameter_fields() -> dict[str, str]:
    """{field: annotation source} of the @parameterNodeWrapper class."""
    tree = ast.parse(_module_source())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in RetrievalSeg.py")


def _widget_parameter_names() -> dict[str, str]:
    """{SlicerParameterName: widget class} from the .ui."""
    out = {}
    for w in _ui_widgets().values():
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                out[p.findtext("string")] = w.get("class")
    return out


def test_parameter_node_fields_match_the_widgets() -> None:
    fields = _parameter_fields()
    widgets = _widget_parameter_names()
    assert set(fields) == set(widgets), (
        f"fields without a widget: {sorted(set(fields) - set(widgets))}, "
        f"widgets without a field: {sorted(set(widgets) - set(fields))}"
    )
    for name, annotation in fields.items():
        cls = widgets[name]
        if "Choice" in annotation:
            expected = "QComboBox"  # QComboBoxToStringableConnector needs the Choice annotation
        elif annotation.startswith("vtkMRML"):
            expected = "qMRMLNodeComboBox"
        elif annotation == "bool":
            expected = "QCheckBox"
        elif "int" in annotation:
            expected = "QSpinBox"
        elif "float" in annotation:
            expected = "QDoubleSpinBox"
        elif annotation == "str":
            expected = "QLineEdit"
        else:
            raise AssertionError(f"no rule for parameter {name}: {annotation}")
        assert cls == expected, f"parameter {name} ({annotation}) is bound to a {cls}, needs {expected}"
        if "int" in annotation or "float" in annotation:
            assert "WithinRange" in annotation or "Choice" in annotation, f"{name} needs a range"


def test_parameter_node_attributes_used_exist() -> None:
    source = _module_source()
    used = set(re.findall(r"(?:self\._parameterNode|\bp|parameterNode)\.(\w+)", source))
    # parameterNode: the wrapped vtkMRMLScriptedModuleNode every parameterNodeWrapper instance has
    allowed = set(_parameter_fields()) | {"connectGui", "disconnectGui", "parameterNode"}
    assert not used - allowed, f"unknown parameter node attributes: {sorted(used - allowed)}"


def test_bridge_names_used_by_the_module_exist() -> None:
    from RetrievalSegLib.slicer_logic import logic as module_logic
    from RetrievalSegLib.slicer_logic import mrml_bridge
    from RetrievalSegLib.worker.client import WorkerClient, WorkerJob

    source = _module_source()
    for name in set(re.findall(r"mrml_bridge\.(\w+)", source)):
        assert hasattr(mrml_bridge, name), f"RetrievalSeg.py uses mrml_bridge.{name}"
    for name in set(re.findall(r"module_logic\.(\w+)", source)):
        assert hasattr(module_logic, name), f"RetrievalSeg.py uses module_logic.{name}"
    logic = module_logic.RetrievalSegLogic(client=WorkerClient())
    for name in set(re.findall(r"\bcore\.(\w+)", source)):
        assert hasattr(logic, name), f"RetrievalSeg.py uses RetrievalSegLogic.{name}"
    for name in set(re.findall(r"\bcore\.job\.(\w+)", source)):
        assert name in WorkerJob.__dict__ or name in ("kind", "outcome", "result", "error"), f"WorkerJob.{name}"
    event = module_logic.JobEvent("progress")
    for name in set(re.findall(r"\bevent\.(\w+)", source)):
        assert hasattr(event, name), f"RetrievalSeg.py uses JobEvent.{name}"
    settings = module_logic.EngineSettings()
    assert hasattr(settings, "missing_downloads")
    thumb_fields = set(mrml_bridge.SupportThumbnail.__dataclass_fields__) | {"caption"}
    for name in set(re.findall(r"\bthumb\.(\w+)", source)):
        assert name in thumb_fields, f"RetrievalSeg.py uses SupportThumbnail.{name}"


# ------------------------------------------------------------------------------- module
def test_module_compiles_and_follows_slicer_conventions(tmp_path: Path) -> None:
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "m.pyc"), doraise=True)
    py_compile.compile(str(LIB / "slicer_logic" / "mrml_bridge.py"), cfile=str(tmp_path / "b.pyc"), doraise=True)
    tree = ast.parse(_module_source())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in c.bases] for name, c in classes.items()}
    assert "ScriptedLoadableModule" in bases["RetrievalSeg"]
    assert "ScriptedLoadableModuleWidget" in bases["RetrievalSegWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["RetrievalSegLogic"]
    assert "ScriptedLoadableModuleTest" in bases["RetrievalSegTest"]
    tests = [f.name for f in classes["RetrievalSegTest"].body if isinstance(f, ast.FunctionDef)]
    assert "runTest" in tests and any(t.startswith("test_") for t in tests)
    widget_methods = {f.name for f in classes["RetrievalSegWidget"].body if isinstance(f, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "_checkCanApply", "onApplyButton"} <= widget_methods
    source = _module_source()
    for needle in ("2408.08813", "Apache-2.0", "tryWithErrorDisplay", "installTorch(askConfirmation=False",
                   "--no-build-isolation", "SAM2_BUILD_CUDA", "QTimer"):
        assert needle in source, needle
    # The module's resources are the ones CMake installs.
    assert (MODULE_DIR / "Resources" / "Icons" / "RetrievalSeg.png").is_file()


def test_icons_are_128_px_png() -> None:
    from PIL import Image

    for path in (ROOT / "Resources" / "RetrievalSeg.png", MODULE_DIR / "Resources" / "Icons" / "RetrievalSeg.png"):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (128, 128), path


# ------------------------------------------------------------------------------- packaging
def _cmake_list(text: str, variable: str) -> list[str]:
    m = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert m, f"no set({variable} ...) in CMakeLists.txt"
    return [t for t in m.group(1).split() if not t.startswith("#")]


def _lib_module_file(name: str) -> Path:
    """The file of a dotted RetrievalSegLib module name ('' is the package itself)."""
    base = LIB.joinpath(*name.split(".")) if name else LIB
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _lib_imports(path: Path) -> set[str]:
    """RetrievalSegLib modules (dotted, e.g. 'slicer_logic.mrml_bridge') a file imports anywhere
    (function bodies included), with the packages that hold them ('' is the package itself)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = list(path.relative_to(LIB).with_suffix("").parts) if LIB in path.parents else None
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level and here is not None:
                base = here[:-1][: len(here) - node.level] if node.level > 1 else here[:-1]
                prefix = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "RetrievalSegLib":
                prefix = ".".join(node.module.split(".")[1:])
            else:
                continue
            for a in node.names:
                sub = ".".join(p for p in (prefix, a.name) if p)
                out.add(sub if _lib_module_file(sub).is_file() else prefix)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "RetrievalSegLib":
                    out.add(".".join(parts[1:]))
    found = {m for m in out if _lib_module_file(m).is_file()}
    for m in list(found):  # importing a.b runs a/__init__.py and the package root first
        parts = m.split(".")
        found.update(".".join(parts[:n]) for n in range(len(parts)))
    return found


def _library_files(python: bool) -> list[str]:
    """Files of RetrievalSegLib (sub-packages included) relative to it: its .py files, or the others."""
    return sorted(p.relative_to(LIB).as_posix() for p in LIB.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and (p.suffix == ".py") == python
                  and not p.name.endswith(".pyc"))


def test_cmake_installs_every_library_file_the_module_needs() -> None:
    cmake = MODULE_CMAKE.read_text(encoding="utf-8")
    listed = _cmake_list(cmake, "RETRIEVALSEGLIB_FILES")
    on_disk = _library_files(python=True)
    assert "report/page.py" in on_disk  # sub-packages are seen
    assert sorted(listed) == on_disk, (
        f"not listed in RetrievalSeg/CMakeLists.txt: {sorted(set(on_disk) - set(listed))}; "
        f"listed but missing: {sorted(set(listed) - set(on_disk))}"
    )
    # Data files the library reads at run time (the report's template) are copied beside it too.
    data = _cmake_list(cmake, "RETRIEVALSEGLIB_DATA")
    on_disk_data = _library_files(python=False)
    assert "report/templates/report.html.j2" in on_disk_data
    assert sorted(data) == on_disk_data, (
        f"data files not in RETRIEVALSEGLIB_DATA: {sorted(set(on_disk_data) - set(data))}; "
        f"listed but missing: {sorted(set(data) - set(on_disk_data))}"
    )
    assert "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/RetrievalSegLib/${file}" in cmake
    # Transitive closure of what the module (and through it the bridge) imports, and of what the
    # worker it starts (`python -m RetrievalSegLib.worker`, worker/client.py) imports.
    client = (LIB / "worker" / "client.py").read_text(encoding="utf-8")
    assert '"-m", "RetrievalSegLib.worker"' in client
    todo = list(_lib_imports(MODULE)) + ["worker.__main__"]
    assert "slicer_logic.mrml_bridge" in todo
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_lib_imports(_lib_module_file(name)) - seen)
    assert {"slicer_logic.mrml_bridge", "bank.support_bank", "segmentation.segment", "engine.pipeline",
            "models.weights", "data.volume"} <= seen
    needed = {str(_lib_module_file(m).relative_to(LIB)) for m in seen}
    assert needed <= set(listed), f"the module needs files CMake does not list: {sorted(needed - set(listed))}"


def test_cmake_module_and_extension_files() -> None:
    module = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in module
    scripts = _cmake_list(module, "MODULE_PYTHON_SCRIPTS")
    assert "${MODULE_NAME}.py" in scripts and "${RETRIEVALSEGLIB_SCRIPTS}" in scripts
    resources = _cmake_list(module, "MODULE_PYTHON_RESOURCES")
    for res in resources:
        assert (MODULE_DIR / res.replace("${MODULE_NAME}", "RetrievalSeg")).is_file(), res
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module

    top = TOP_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"cmake_minimum_required\(VERSION", top)
    assert "project(RetrievalSeg)" in top
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({var}\s", top), var
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(RetrievalSeg)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in top, line


def test_catalog_entry() -> None:
    entry = json.loads(CATALOG.read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry), f"missing keys {CATALOG_REQUIRED - set(entry)}"
    assert set(entry) <= CATALOG_ALLOWED, f"keys the schema forbids: {set(entry) - CATALOG_ALLOWED}"
    assert re.fullmatch(
        r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
        r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json#", entry["$schema"]
    )
    top = TOP_CMAKE.read_text(encoding="utf-8")
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', top).group(1)
    assert entry["build_dependencies"] == re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', top).group(1).split()
    assert entry["scm_url"] == re.search(r'set\(RETRIEVALSEG_REPOSITORY "([^"]+)"\)', top).group(1)
    assert entry.get("scm_type", "git") in ("git", "local")
    assert entry.get("tier", 5) in (1, 3, 5)
    assert isinstance(entry.get("build_subdirectory", "."), str)


# ------------------------------------------------------------------------------- library
def _module_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """Top-level module names imported when the file is imported (not inside functions)."""
    found: list[tuple[str, int]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((a.name.split(".")[0], node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.module.split(".")[0], node.lineno))
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" in ast.unparse(node.test):
                    visit(node.orelse)
                else:
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)  # class bodies run at import time too

    visit(tree.body)
    return found


@pytest.mark.parametrize("path", sorted(LIB.rglob("*.py")), ids=lambda p: str(p.relative_to(LIB)))
def test_library_never_imports_gui_modules_at_module_level(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = [(name, line) for name, line in _module_level_imports(tree) if name in GUI_MODULES]
    assert not bad, f"{path.name} imports {bad} at module level; import them inside functions"


def test_bridge_imports_without_slicer() -> None:
    """The bridge module (and hence the Slicer module's import of it) needs only numpy."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import RetrievalSegLib.slicer_logic.mrml_bridge\n"
        "heavy = {'slicer', 'vtk', 'torch', 'sam2', 'transformers', 'faiss'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_python_thread_in_slicer_process_code() -> None:
    """Code that runs inside Slicer starts no Python thread: model work goes to the worker process."""
    for path in (MODULE, LIB / "slicer_logic" / "mrml_bridge.py", LIB / "slicer_logic" / "logic.py",
                 LIB / "slicer_logic" / "results.py", LIB / "worker" / "client.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not ({"threading", "concurrent.futures", "_thread"} & (imported | modules)), path.name
        assert "threading.Thread" not in path.read_text(encoding="utf-8"), path.name
