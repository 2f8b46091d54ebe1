#!/usr/bin/env python3
"""Extract the Python-visible API of 3D Slicer 5.10 (and the CTK and Qt classes the module needs).

The output, `slicer_api_5.10.jsonl` next to this script, is what the test fakes of Slicer allow
(`Testing/_slicer_fakes.py`): a name not on it is refused, as Slicer would refuse it. One JSON
object per line: {"class": NAME, "bases": [...], "methods": [...], "static": [...],
"properties": [...], "signals": [...], "enums": [...]} or {"module": NAME, "names": [...]}.

What "Python-visible" means, per kind of class (the header of the list repeats it):
* VTK classes (`vtkMRML*`, `vtkSlicer*`, `vtkSegment*`, ...): the public methods of the header,
  including the ones VTK's macros declare (vtkGetMacro, vtkSetMacro, vtkBooleanMacro, ...);
  VTK's Python wrapping wraps public methods. Their VTK bases outside Slicer (vtkObject, ...)
  are not listed (MRML objects in the tests are real slicer-core objects, not fakes).
* Slicer and CTK Qt classes (`qSlicer*`, `qMRML*`, `ctk*`): PythonQt sees the meta-object only:
  public slots, Q_INVOKABLE methods, signals, Q_PROPERTY properties and public enums.
* Qt's own classes (`Q*`): all public methods (PythonQt's generated wrappers), slots, signals,
  properties and public enums, from Qt 5.15's headers; restricted to the classes the module and
  its .ui use and their bases. Every QObject also has PythonQt's own helpers (connect, ...),
  from PythonQt's `PythonQtStdDecorators.h` and PythonQt's documentation.
* Python modules (`slicer.util`, `slicer.ScriptedLoadableModule`, `slicer.i18n`,
  `slicer.parameterNodeWrapper`, the Segment Editor module): their top-level names (and class
  members), read with `ast`; `slicer.modules`: every module folder of Slicer (lower case, as
  slicerqt.py names them) plus `<Name>Widget` of each scripted module.

The command that produced the shipped list (inputs are bare git mirrors of the public
repositories and the headers of Debian's qtbase5-dev 5.15.8 package, `apt-get download
qtbase5-dev; dpkg-deb -x`):

    python Testing/data/extract_slicer_api.py \\
        --slicer-git Slicer.git --slicer-ref v5.10.0 \\
        --ctk-git CTK.git --ctk-ref dd4caeae7e979cf441e44ee85d3b0780120d113d \\
        --qt-include qtbase5-dev/usr/include/x86_64-linux-gnu/qt5 \\
        --pythonqt-git PythonQt.git --pythonqt-ref patched-9 \\
        --module RetrievalSeg/RetrievalSeg.py --ui RetrievalSeg/Resources/UI/RetrievalSeg.ui \\
        --out Testing/data/slicer_api_5.10.jsonl

(The CTK commit is the one Slicer 5.10's SuperBuild/External_CTK.cmake pins. PythonQt: the pinned
revision is not in the public mirror used; `patched-9` is the newest branch there, and only its
QObject helpers are read.)
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

SLICER_PREFIXES = ("vtkMRML", "vtkSlicer", "qSlicer", "qMRML", "vtkSegment", "vtkOrientedImageData",
                   "vtkBinaryLabelmap", "vtkClosedSurface", "vtkFractionalLabelmap")
SLICER_PYTHON = {
    "slicer.util": "Base/Python/slicer/util.py",
    "slicer.ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py",
    "slicer.i18n": "Base/Python/slicer/i18n.py",
    "SegmentEditor": "Modules/Scripted/SegmentEditor/SegmentEditor.py",
}
PARAMETER_NODE_WRAPPER = "Base/Python/slicer/parameterNodeWrapper"
#: Set on the `slicer` module by Slicer's Python start-up (Base/Python/slicer/__init__.py, slicerqt.py).
SLICER_NAMESPACE_SOURCES = ("Base/Python/slicer/__init__.py", "Base/Python/slicer/slicerqt.py")


# ============================================================================ git
class Tree:
    """Files of one revision of a bare git repository."""

    def __init__(self, git_dir: str, ref: str) -> None:
        self.git_dir, self.ref = git_dir, ref
        out = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "-r", "--name-only", ref],
                             check=True, capture_output=True, text=True).stdout
        self.paths = out.splitlines()
        self.commit = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", f"{ref}^{{commit}}"],
                                     check=True, capture_output=True, text=True).stdout.strip()

    def read(self, path: str) -> str:
        return subprocess.run(["git", "--git-dir", self.git_dir, "show", f"{self.ref}:{path}"],
                              check=True, capture_output=True).stdout.decode("utf-8", "replace")

    def read_many(self, paths: list[str]) -> dict[str, str]:
        """Many files at once (`git cat-file --batch`)."""
        spec = "".join(f"{self.ref}:{p}\n" for p in paths).encode()
        data = subprocess.run(["git", "--git-dir", self.git_dir, "cat-file", "--batch"], input=spec,
                              check=True, capture_output=True).stdout
        out, pos = {}, 0
        for p in paths:
            header_end = data.index(b"\n", pos)
            size = int(data[pos:header_end].split()[2])
            out[p] = data[header_end + 1:header_end + 1 + size].decode("utf-8", "replace")
            pos = header_end + 1 + size + 1
        return out


# ============================================================================ C++ headers
_TOKENS = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])\'|//[^\n]*|/\*.*?\*/', re.S)
_CLASS = re.compile(r"\b(class|struct)\s+((?:(?:[A-Z][A-Z0-9_]*|\w+_EXPORT)(?:\([^)]*\))?\s+)*)(\w+)\s*(?:final\s*)?(:[^{;]*)?\{")
_ACCESS = re.compile(r"^(public|protected|private|signals|Q_SIGNALS)\s*(slots|Q_SLOTS)?\s*$")
#: Macro calls without a semicolon before an access specifier (e.g. QDOC_PROPERTY(...) public:).
_LEADING_MACROS = re.compile(r"^(?:\s*(?!Q_SIGNALS\b)[A-Z][A-Z0-9_]+\s*(?:\((?:[^()]|\([^()]*\))*\))?)+(?=\s*\w)")
_PROPERTY = re.compile(r"\bQ_PROPERTY\s*\(\s*(.+?)\s+\*?(\w+)\s+(?:READ|MEMBER|WRITE)\b", re.S)
_QT_NOISE = re.compile(r"\b(Q_OBJECT|Q_GADGET|QVTK_OBJECT|Q_INTERFACES|Q_ENUMS|Q_FLAGS|Q_ENUM|Q_FLAG|Q_ENUM_NS"
                       r"|Q_DECLARE_PRIVATE|Q_DECLARE_PUBLIC|Q_DISABLE_COPY|Q_DISABLE_COPY_MOVE|Q_DECLARE_FLAGS"
                       r"|Q_CLASSINFO|Q_PRIVATE_SLOT|Q_PRIVATE_PROPERTY|Q_REVISION|Q_PROPERTY|Q_DECLARE_SHARED"
                       r"|Q_DECLARE_TYPEINFO|Q_DECLARE_METATYPE|Q_DECL_DEPRECATED_X|QT_DEPRECATED_X"
                       r"|Q_DECLARE_PRIVATE_D)\b")
#: VTK macros that declare public methods: macro -> method names made from its first argument.
_VTK_MACROS = {
    "vtkGetMacro": ["Get{}"], "vtkSetMacro": ["Set{}"], "vtkGetStringMacro": ["Get{}"],
    "vtkSetStringMacro": ["Set{}"], "vtkGetObjectMacro": ["Get{}"], "vtkSetObjectMacro": ["Set{}"],
    "vtkGetSmartPointerMacro": ["Get{}"], "vtkSetSmartPointerMacro": ["Set{}"],
    "vtkBooleanMacro": ["{}On", "{}Off"], "vtkSetClampMacro": ["Set{}", "Get{}MinValue", "Get{}MaxValue"],
    "vtkGetEnumMacro": ["Get{}"], "vtkSetEnumMacro": ["Set{}"], "vtkGetFilePathMacro": ["Get{}"],
    "vtkSetFilePathMacro": ["Set{}"], "vtkGetStdStringFromCharMacro": ["Get{}"],
    "vtkSetStdStringFromCharMacro": ["Set{}"], "vtkGetVectorMacro": ["Get{}"], "vtkSetVectorMacro": ["Set{}"],
    **{f"vtkGetVector{n}Macro": ["Get{}"] for n in (2, 3, 4, 6)},
    **{f"vtkSetVector{n}Macro": ["Set{}"] for n in (2, 3, 4, 6)},
    "vtkMRMLCopyContentMacro": ["CopyContent", "HasCopyContent"],
    "vtkMRMLCopyContentDefaultMacro": ["CopyContent", "HasCopyContent"],
    "vtkMRMLNodeNewMacro": ["CreateNodeInstance"],
}
_VTK_TYPE_MACRO = ("IsA", "IsTypeOf", "SafeDownCast", "NewInstance", "GetClassName", "GetNumberOfGenerationsFromBase",
                   "GetNumberOfGenerationsFromBaseType")


def _balanced(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _clean(source: str) -> str:
    """Comments out, string and character literals emptied (one pass: "//" may be inside a string)."""
    source = _TOKENS.sub(lambda m: '""' if m.group(0)[0] == '"' else "' '" if m.group(0)[0] == "'" else " ", source)
    source = re.sub(r"\\\n", " ", source)
    return re.sub(r"^\s*#.*$", " ", source, flags=re.M)


def _strip_macro_calls(text: str, pattern: re.Pattern) -> str:
    while True:
        m = pattern.search(text)
        if not m:
            return text
        end = m.end()
        rest = text[end:]
        if rest.lstrip().startswith("("):
            end = _balanced(text, end + len(rest) - len(rest.lstrip()))
        text = text[:m.start()] + " " + text[end:]


def _function_name(statement: str, class_name: str) -> str | None:
    s = statement.strip()
    if not s or re.match(r"(typedef|using|friend|enum|class|struct|union|static_assert|template\s*<.*>\s*(class|struct))\b", s):
        return None
    s = re.sub(r"^template\s*<[^>]*>\s*", "", s)
    depth_angle = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth_angle += 1
        elif ch == ">":
            depth_angle = max(0, depth_angle - 1)
        elif ch == "=" and depth_angle == 0:
            return None  # a data member with an initialiser
        elif ch == "(" and depth_angle == 0:
            m = re.search(r"(~?\w+)\s*$", s[:i])
            if not m or "operator" in s[:i]:
                return None
            name = m.group(1)
            if name.startswith("~") or name == class_name or name.isupper():
                return None
            return name
    return None


def parse_header(source: str) -> list[dict]:
    """Classes declared in one C++ header, with their public API as described in the docstring."""
    text = _clean(source)
    classes = []
    for m in _CLASS.finditer(text):
        kind, name, bases_text = m.group(1), m.group(3), m.group(4) or ""
        body_start = m.end() - 1
        body = text[body_start + 1:_balanced(text, body_start, "{", "}") - 1]
        bases = []
        bases_text = re.split(r"\b(?:class|struct)\b", bases_text)[0]  # "#if" alternatives, both kept
        for part in bases_text.lstrip(":").split(","):
            words = [w for w in re.sub(r"<.*>", "", part).split() if w not in ("public", "protected", "private", "virtual")]
            public = "public" in part or (kind == "struct" and "private" not in part and "protected" not in part)
            if words and public:
                bases.append(words[-1].split("::")[-1])
        info = {"class": name, "bases": bases, "methods": set(), "static": set(), "properties": set(),
                "signals": set(), "enums": set(), "invokable": set(), "slots": set()}
        info["properties"].update(p for _, p in _PROPERTY.findall(body))
        if re.search(r"\bvtkTypeMacro\s*\(", body):
            info["methods"].update(_VTK_TYPE_MACRO)
            tm = re.search(r"\bvtkTypeMacro\s*\(\s*\w+\s*,\s*(\w+)\s*\)", body)
            if tm and tm.group(1) not in bases:
                bases.append(tm.group(1))
        body = _strip_macro_calls(body, _QT_NOISE)
        access = "public" if kind == "struct" else "private"
        slots = False
        i, stmt = 0, ""
        while i < len(body):
            ch = body[i]
            if ch == "{":
                end = _balanced(body, i, "{", "}")
                header = stmt.strip()
                if access in ("public", "signals") and re.match(r"enum\b", header):
                    for value in body[i + 1:end - 1].split(","):
                        v = value.split("=")[0].strip()
                        if re.fullmatch(r"\w+", v):
                            info["enums"].add(v)
                elif not re.match(r"(enum|class|struct|union)\b", header) and header:
                    _record(info, header, access, slots, name)
                stmt = ""
                i = end
                if body[i:i + 1] == ";":
                    i += 1
                continue
            if ch == ";":
                _record(info, stmt, access, slots, name)
                stmt = ""
            elif ch == ":" and body[i + 1:i + 2] != ":" and body[i - 1:i] != ":":
                am = _ACCESS.match(_LEADING_MACROS.sub("", stmt).strip())
                if am:
                    access = "signals" if am.group(1) in ("signals", "Q_SIGNALS") else am.group(1)
                    slots = bool(am.group(2))
                    stmt = ""
                    i += 1
                    continue
                stmt += ch
            else:
                stmt += ch
            i += 1
        classes.append(info)
    return classes


def _record(info: dict, statement: str, access: str, slots: bool, class_name: str) -> None:
    statement = statement.strip()
    if access not in ("public", "signals") or not statement:
        return
    for mm in list(re.finditer(r"\b(vtk\w*Macro)\s*\(", statement)):
        end = _balanced(statement, mm.end() - 1)
        args = [a.strip() for a in statement[mm.end():end - 1].split(",")]
        for pattern in _VTK_MACROS.get(mm.group(1), []):
            if args and args[0]:
                info["methods"].add(pattern.format(args[0]))
    statement = re.sub(r"\bvtk\w*Macro\s*\((?:[^()]|\([^()]*\))*\)", " ", statement)
    invokable = "Q_INVOKABLE" in statement
    statement = re.sub(r"\b(Q_INVOKABLE|Q_SCRIPTABLE|Q_REQUIRED_RESULT|Q_DECL_\w+|QT_DEPRECATED\w*|VTK_\w+|"
                       r"virtual|inline|explicit|constexpr|Q_SLOT|Q_SIGNAL)\b(\s*\((?:[^()]|\([^()]*\))*\))?", " ", statement)
    name = _function_name(statement, class_name)
    if not name:
        return
    if access == "signals":
        info["signals"].add(name)
        return
    info["methods"].add(name)
    if re.match(r"\s*static\b", statement):
        info["static"].add(name)
    if invokable:
        info["invokable"].add(name)
    if slots:
        info["slots"].add(name)


def parse_decorators(source: str) -> dict[str, tuple[set[str], set[str]]]:
    """{class: (methods, static methods)} that a PythonQt decorator header adds.

    A decorator's public slot `R name(Class* self, ...)` is the method `name` of Class;
    `static_Class_name(...)` its static method; `new_`/`delete_` are constructors.
    """
    text = _clean(source)
    out: dict[str, tuple[set[str], set[str]]] = {}
    for section in re.split(r"\bpublic\s+(?:slots|Q_SLOTS)\s*:", text)[1:]:
        section = re.split(r"\b(?:public|protected|private|signals|Q_SIGNALS)\s*(?:slots|Q_SLOTS)?\s*:", section)[0]
        for m in re.finditer(r"\b(\w+)\s*\(\s*(?:const\s+)?(\w+)\s*\*\s*\w*\s*[,)]", section):
            name, cls = m.groups()
            if name.startswith(("new_", "delete_", "static_")) or name in ("if", "while", "for", "return"):
                continue
            out.setdefault(cls, (set(), set()))[0].add(name)
        for m in re.finditer(r"\bstatic_([A-Za-z0-9]+)_(\w+)\s*\(", section):
            out.setdefault(m.group(1), (set(), set()))[1].add(m.group(2))
    return out


def _meta_object_only(info: dict) -> dict:
    """What PythonQt sees of a Slicer/CTK QObject class: slots, invokables, signals, properties, enums."""
    out = dict(info)
    out["methods"] = info["slots"] | info["invokable"]
    out["static"] = info["static"] & out["methods"]
    return out


# ============================================================================ Python sources
def python_names(source: str) -> tuple[list[str], list[dict]]:
    """Top-level names of a Python module, and its classes with their members (methods, self.X)."""
    tree = ast.parse(source)
    names, classes = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update((a.asname or a.name) for a in node.names if a.name != "*")
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        if isinstance(node, ast.ClassDef):
            members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            attributes = {t.attr for n in ast.walk(node) if isinstance(n, ast.Assign) for t in n.targets
                          if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
            bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
            classes.append({"class": node.name, "bases": bases, "methods": sorted(members),
                            "properties": sorted(attributes - members), "python": True})
    return sorted(names), classes


def _all_names(source: str) -> list[str]:
    """`__all__` of a module if it has one, else its public top-level names."""
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return [n for n in python_names(source)[0] if not n.startswith("_")]


# ============================================================================ the list
def extract(args: argparse.Namespace) -> list[dict]:
    slicer = Tree(args.slicer_git, args.slicer_ref)
    ctk = Tree(args.ctk_git, args.ctk_ref)
    records: dict[str, dict] = {}

    headers = [p for p in slicer.paths if p.endswith(".h") and Path(p).name.startswith(SLICER_PREFIXES)
               and "/Testing/" not in p and not Path(p).stem.endswith("_p")]
    for path, text in slicer.read_many(headers).items():
        for info in parse_header(text):
            if info["class"].startswith(SLICER_PREFIXES) and info["class"] == Path(path).stem:
                records[info["class"]] = _meta_object_only(info) if info["class"].startswith("q") else info
    # PythonQt decorators (Slicer's *PythonQtDecorators.h) add plain C++ methods to some classes.
    decorator_headers = [p for p in slicer.paths if p.endswith("PythonQtDecorators.h")]
    for text in slicer.read_many(decorator_headers).values():
        for cls, (methods, static) in parse_decorators(text).items():
            if cls in records:
                records[cls]["methods"] = set(records[cls]["methods"]) | methods | static
                records[cls]["static"] = set(records[cls]["static"]) | static
    ctk_headers = [p for p in ctk.paths if p.endswith(".h") and Path(p).name.startswith("ctk")
                   and "/Testing/" not in p and not Path(p).stem.endswith("_p")]
    for path, text in ctk.read_many(ctk_headers).items():
        for info in parse_header(text):
            if info["class"] == Path(path).stem:
                records[info["class"]] = _meta_object_only(info)

    # Qt: the classes the module and its .ui use, and their bases, from Qt's own headers.
    wanted = set(re.findall(r"\bqt\.(Q\w+)", Path(args.module).read_text(encoding="utf-8")))
    wanted |= {w.get("class") for w in ET.parse(args.ui).iter("widget") if w.get("class", "").startswith("Q")}
    wanted |= {c.findtext("extends") for c in ET.parse(args.ui).iter("customwidget")
               if (c.findtext("extends") or "").startswith("Q")}
    wanted |= {"QObject", "QWidget", "QLayout", "QGridLayout", "QListWidgetItem"}
    qt_index = {p.stem: p for p in Path(args.qt_include).glob("Qt*/q*.h")}
    for forward in Path(args.qt_include).glob("Qt*/Q*"):  # QtWidgets/QVBoxLayout: #include "qboxlayout.h"
        m = re.search(r'#include\s+"(q\w+)\.h"', forward.read_text(encoding="utf-8", errors="replace")) if forward.is_file() else None
        if m and forward.name.lower() not in qt_index and (forward.parent / f"{m.group(1)}.h").is_file():
            qt_index[forward.name.lower()] = forward.parent / f"{m.group(1)}.h"
    done: set[str] = set()
    while wanted - done:
        name = sorted(wanted - done)[0]
        done.add(name)
        header = qt_index.get(name.lower())
        if header is None:
            continue
        for info in parse_header(header.read_text(encoding="utf-8", errors="replace")):
            if info["class"] == name:
                records[name] = info
                wanted.update(b for b in info["bases"] if b.startswith("Q"))
    # Every QObject (and so every Slicer, CTK and Qt widget) has PythonQt's helpers.
    pythonqt = Tree(args.pythonqt_git, args.pythonqt_ref)
    decorators = parse_header(pythonqt.read("src/PythonQtStdDecorators.h"))
    helpers = set()
    for info in decorators:
        if info["class"] == "PythonQtStdDecorators":
            helpers = {m for m in info["methods"] if not m.startswith(("new_", "delete_", "static_"))}
    # Documented by PythonQt ("Features": className, help, delete; dynamic properties by name).
    records["QObject"]["methods"] |= helpers | {"className", "help", "delete"}

    python: list[dict] = []
    for module, path in SLICER_PYTHON.items():
        names, classes = python_names(slicer.read(path))
        python.append({"module": module, "names": names})
        for cls in classes:
            records[f"{module}.{cls['class']}"] = {**cls, "class": f"{module}.{cls['class']}"}
    pnw = sorted({n for p in slicer.paths if p.startswith(PARAMETER_NODE_WRAPPER + "/") and p.endswith(".py")
                  for n in _all_names(slicer.read(p))})
    python.append({"module": "slicer.parameterNodeWrapper", "names": pnw})

    # slicer.modules: every module of Slicer, lower-cased as slicerqt.py sets them; scripted
    # modules also get `<Name>Widget` once their GUI exists (qSlicerScriptedLoadableModuleWidget).
    loadable = {p.split("/")[2] for p in slicer.paths if re.match(r"Modules/(Loadable|CLI)/\w+/CMakeLists.txt$", p)}
    scripted = {Path(p).stem for p in slicer.paths
                if re.match(r"Modules/Scripted/\w+/\w+\.py$", p) and Path(p).stem == p.split("/")[2]}
    modules = sorted({m.lower() for m in loadable | scripted} | {f"{m}Widget" for m in scripted})
    python.append({"module": "slicer.modules", "names": modules})
    namespace = set()
    for path in SLICER_NAMESPACE_SOURCES:
        src = slicer.read(path)
        namespace |= set(re.findall(r"setattr\(slicer,\s*[\"'](\w+)[\"']", src))
        namespace |= set(re.findall(r"^\s*slicer\.(\w+)\s*=", src, flags=re.M))
        namespace |= set(re.findall(r"_createModule\(\"slicer\.(\w+)\"", src))
    namespace |= {"util", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper"}
    namespace |= {c for c in records if c.startswith(SLICER_PREFIXES)}
    python.append({"module": "slicer", "names": sorted(namespace)})
    python.append({"module": "ctk", "names": sorted(c for c in records if c.startswith("ctk"))})
    python.append({"module": "qt", "names": sorted(c for c in records if c.startswith("Q"))})

    lines = [{"source": {"slicer": [args.slicer_ref, slicer.commit], "ctk": [args.ctk_ref, ctk.commit],
                         "pythonqt": [args.pythonqt_ref, pythonqt.commit], "qt_headers": args.qt_label}}]
    for name in sorted(records):
        info = records[name]
        lines.append({"class": name, "bases": info.get("bases", []),
                      **{k: sorted(info.get(k, ())) for k in ("methods", "static", "properties", "signals", "enums")}})
    lines += sorted(python, key=lambda r: r["module"])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slicer-git", required=True)
    ap.add_argument("--slicer-ref", default="v5.10.0")
    ap.add_argument("--ctk-git", required=True)
    ap.add_argument("--ctk-ref", default="dd4caeae7e979cf441e44ee85d3b0780120d113d")
    ap.add_argument("--qt-include", required=True, help="Qt 5.15's include folder (with QtCore/, QtWidgets/, ...)")
    ap.add_argument("--qt-label", default="Debian qtbase5-dev 5.15.8+dfsg-11+deb12u3",
                    help="what the Qt headers are (recorded in the list)")
    ap.add_argument("--pythonqt-git", required=True)
    ap.add_argument("--pythonqt-ref", default="patched-9")
    ap.add_argument("--module", default="RetrievalSeg/RetrievalSeg.py")
    ap.add_argument("--ui", default="RetrievalSeg/Resources/UI/RetrievalSeg.ui")
    ap.add_argument("--out", default=str(Path(__file__).with_name("slicer_api_5.10.jsonl")))
    args = ap.parse_args()
    lines = extract(args)
    with open(args.out, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{args.out}: {len(lines) - 1} entries")


if __name__ == "__main__":
    main()
