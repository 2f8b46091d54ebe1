import importlib.util
import logging
import os
import re
import shutil
import sys
import time
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The library is pure Python; its heavy imports (torch, sam2, transformers, faiss) happen only
# when a model is loaded, so the module loads even before the dependencies are installed.
# Installed extensions have RetrievalSegLib next to this file; in the source tree (module folder
# added under Application Settings > Modules) it is one folder up, at the repository's top.
try:
    from RetrievalSegLib.slicer_logic import logic as module_logic
    from RetrievalSegLib.slicer_logic import mrml_bridge
except ModuleNotFoundError as error:
    if error.name != "RetrievalSegLib":
        raise
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from RetrievalSegLib.slicer_logic import logic as module_logic
    from RetrievalSegLib.slicer_logic import mrml_bridge

#: Python packages RetrievalSeg needs, by import name -> pip requirement, pinned to the versions of
#: requirements.lock (the versions the tests ran with; a static test keeps the two equal).
#: torch comes from the PyTorch extension and sam2 is installed separately (see installDependencies).
REQUIREMENTS = {
    "transformers": "transformers==5.24.0",
    "huggingface_hub": "huggingface-hub==2.4.0",  # weight downloads (weights.py)
    "faiss": "faiss-cpu==1.15.1",
    "safetensors": "safetensors==0.8.0",
    "filelock": "filelock==4.3.1",  # the support bank's writer lock (usually installed with torch)
    "hydra": "hydra-core==1.3.8",
    "omegaconf": "omegaconf==2.3.1",
    "iopath": "iopath==0.1.10",
    "tqdm": "tqdm==4.70.1",
    "PIL": "pillow==13.0.0",
}
TORCH_MINIMUM = "2.5.1"  # what sam2 1.1.0 needs
TORCH_REQUIREMENT = f">={TORCH_MINIMUM}"
SAM2_REQUIREMENT = "sam2==1.1.0"
#: The SHA-256 of the sam2 1.1.0 upload, as requirements-sam2.lock pins it (pip checks it).
SAM2_SHA256 = "7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74"
#: sam2 1.1.0 declares python_requires >= 3.10: Slicer 5.8 has Python 3.9, Slicer 5.10 has 3.12.
PYTHON_MINIMUM = (3, 10)
#: QSettings key of the weights folder in use (restored when the module opens).
WEIGHTS_FOLDER_SETTING = "RetrievalSeg/WeightsFolder"
#: QSettings key of the SAM 2 memory cache cap in GB (passed to the worker as RSEG_MEMORY_CACHE_GB
#: unless that is set already); e.g. `qt.QSettings().setValue("RetrievalSeg/MemoryCacheGB", 8)`.
MEMORY_CACHE_SETTING = "RetrievalSeg/MemoryCacheGB"
#: QSettings keys of *Run on* (empty: this computer; `user@host[:port]`: a worker there, over ssh)
#: and of the Python command on that host (empty: python3). See README, Remote GPU.
RUN_ON_SETTING = "RetrievalSeg/RunOn"
REMOTE_PYTHON_SETTING = "RetrievalSeg/RemotePython"
#: Packages Slicer ships (or that another install must not replace): pinned while installing.
PINNED_DISTRIBUTIONS = ("numpy", "SimpleITK", "torch", "torchvision")

CITATION = (
    "L. Zhao, X. Chen, E. Z. Chen, Y. Liu, T. Chen, S. Sun, "
    "\"Retrieval-Augmented Few-Shot Medical Image Segmentation With Foundation Models\", "
    "IEEE Transactions on Neural Networks and Learning Systems 36(10):17693-17701, 2025; arXiv:2408.08813."
)


#
# RetrievalSeg
#


class RetrievalSeg(ScriptedLoadableModule):
    """Few-shot segmentation: DINOv2 retrieves annotated slices, SAM 2 memory attention segments."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RetrievalSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["RetrievalSeg developers"]
        self.parent.helpText = _("""
Few-shot segmentation without training. Annotate a few slices once: they form a <b>support bank</b>.
For every slice of a new volume, DINOv2 retrieves the most similar annotated slices from the bank and
SAM 2 segments the slice from them (memory attention, no prompt). Correct what is wrong in the Segment
Editor, add the corrected slices to the bank, and the next volume is better.
<ol>
<li>First use: <i>Install dependencies</i> and <i>Download weights</i> (Settings).</li>
<li>Draw a few slices of one volume (all structures on each slice; <i>Suggest slices to annotate</i>
says which) in the Segment Editor, then
<i>New bank from segmentation</i> and <i>Add annotated slices to bank</i>.</li>
<li>Select another volume and press <i>Segment</i>.</li>
<li>Correct slices (<i>Go to next low-confidence slice</i> helps), then <i>Add all edited slices</i>
and <i>Re-segment remaining slices</i>.</li>
</ol>
""")
        self.parent.acknowledgementText = _("""
Method: {citation}<br>
Models: SAM 2.1 (Meta AI, Apache-2.0 licence) and DINOv2 (Meta AI, Apache-2.0 licence); their weights
are downloaded from their official Hugging Face repositories (or your mirror) only after you agree.<br>
Optional backbone: MedSAM2 (Ma et al., arXiv:2504.03600, 2025; Bo Wang lab), SAM 2.1 tiny fine-tuned on
medical images and videos. Its code is Apache-2.0; we found no licence for its weights
(Hugging Face wanglab/MedSAM2): the download shows this before you agree, and it is never the default.
""").format(citation=CITATION)


#
# RetrievalSegParameterNode
#


@parameterNodeWrapper
class RetrievalSegParameterNode:
    """GUI state saved with the scene (folders are per-user settings, not scene data)."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    caseId: str = ""
    k: Annotated[int, WithinRange(1, 64)] = 8
    axis: Annotated[str, Choice(["auto", "i", "j", "k"])] = "auto"
    useSliceRange: bool = False
    firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
    lastSlice: Annotated[int, WithinRange(0, 100000)] = 0
    casePolicy: Annotated[str, Choice(["ignore", "prefer", "exclude"])] = "ignore"
    # cuda:N: that GPU for SAM 2 and DINOv2 (a number the machine lacks fails with the GPUs it has)
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:2", "cuda:3", "mps"])] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16"])] = "auto"
    # SAM 2 backbones: RetrievalSegLib.models.registry.SAM2_MODELS (a static test keeps the two equal).
    sam2Size: Annotated[str, Choice(["sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus", "sam2.1-large", "medsam2"])] = "sam2.1-tiny"
    dinov2Size: Annotated[str, Choice(["small", "base", "large"])] = "small"
    imageSize: Annotated[int, Choice([1024, 512])] = 1024  # follows the backbone's native size when it changes
    extentStop: Annotated[int, WithinRange(0, 1000)] = 5  # RetrievalSegLib.segmentation.extent.DEFAULT_EXTENT_STOP
    supportOrder: Annotated[str, Choice(["nearest", "farthest"])] = "nearest"  # engine.sam2_memory.SUPPORT_ORDERS
    propagate: Annotated[int, WithinRange(0, 6)] = 0  # segmentation.propagation.MAX_PROPAGATE
    # RetrievalSegLib.engine.retrieval.RETRIEVAL_FEATURES and segmentation.queries.SUPPORT_FILTERS
    retrievalFeature: Annotated[str, Choice(["cls", "mean", "cls+mean", "gem"])] = "cls"
    supportFilter: Annotated[str, Choice(["all", "foreground"])] = "all"
    confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    suggestCount: Annotated[int, WithinRange(1, 50)] = 3


#
# RetrievalSegWidget
#


class RetrievalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: widgets and wiring only; the work is done by RetrievalSegLib.slicer_logic.mrml_bridge."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._segmentAfterDownload = False
        self._resegmentAfterAdd = False
        self._suggestAfterJob = False
        self._segmentAfterCancel = False
        self._estimateAdvice = None
        self._jobVolumeNode = None
        self._jobSegmentationNode = None
        self._thumbnailWidgets = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RetrievalSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RetrievalSegLogic()

        self.ui.bankPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        # ctkPathLineEdit keeps a history only when told to; the folder in use is restored here.
        self.ui.weightsPathLineEdit.currentPath = str(qt.QSettings().value(WEIGHTS_FOLDER_SETTING, "") or "")
        self.ui.runOnLineEdit.text = str(qt.QSettings().value(RUN_ON_SETTING, "") or "")
        self.ui.remotePythonLineEdit.text = str(qt.QSettings().value(REMOTE_PYTHON_SETTING, "") or "")
        self.ui.progressBar.hide()
        self.ui.tryLowerResolutionButton.hide()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self._onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.openBankButton.connect("clicked(bool)", self.onOpenBank)
        self.ui.newBankButton.connect("clicked(bool)", self.onNewBank)
        self.ui.verifyBankButton.connect("clicked(bool)", self.onVerifyBank)
        self.ui.addAnnotatedSlicesButton.connect("clicked(bool)", self.onAddAnnotatedSlices)
        self.ui.addCurrentSliceButton.connect("clicked(bool)", self.onAddCurrentSlice)
        self.ui.addEditedSlicesButton.connect("clicked(bool)", self.onAddEditedSlices)
        self.ui.resegmentButton.connect("clicked(bool)", self.onResegmentRemaining)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.tryLowerResolutionButton.connect("clicked(bool)", self.onTryLowerResolution)
        self.ui.nextLowConfidenceButton.connect("clicked(bool)", self.onNextLowConfidenceSlice)
        self.ui.whyThisMaskButton.connect("clicked(bool)", self.onWhyThisMask)
        self.ui.suggestSlicesButton.connect("clicked(bool)", self.onSuggestSlices)
        self.ui.suggestionsListWidget.connect("currentRowChanged(int)", self.onSuggestionSelected)
        self.ui.suggestionsListWidget.connect(
            "itemClicked(QListWidgetItem*)", lambda item: self.onSuggestionSelected(self.ui.suggestionsListWidget.row(item))
        )
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self._updateWeightsStatus)
        self.ui.runOnLineEdit.connect("editingFinished()", self.onRunOnChanged)
        self.ui.remotePythonLineEdit.connect("editingFinished()", self.onRunOnChanged)

        self.initializeParameterNode()
        self._updateBankInfo()
        self._updateDependenciesStatus()
        self._updateWeightsStatus()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._pollTimer:
            self._pollTimer.stop()
        if self.logic:
            self.logic.core.cancel()
            self.logic.core.shutdown()  # the worker process goes with the module

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        # The next scene reuses this one's node IDs (vtkMRMLScene::Clear resets them): nothing of
        # this scene's result, undo record, suggestions or running job may reach it.
        if self.logic:
            self.logic.core.cancel()
            self.logic.core.forget_scene()
        self._jobVolumeNode = self._jobSegmentationNode = None
        self.ui.suggestionsListWidget.clear()
        self.ui.suggestionsLabel.text = ""
        self.ui.currentSliceLabel.text = ""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[RetrievalSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._migrateBackboneName()
            self._lastSam2Size = self._parameterNode.sam2Size
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._checkCanApply()

    # ------------------------------------------------------------------ state of the buttons
    def _jobRunning(self) -> bool:
        """True until the running job's final event has been read (segment, add, download...)."""
        core = self.logic.core if self.logic else None
        return core is not None and core.job is not None and core.job.running

    def _jobKind(self) -> Optional[str]:
        core = self.logic.core if self.logic else None
        return core.job.kind if core is not None and core.job is not None else None

    def _migrateBackboneName(self) -> None:
        """Scenes saved before the backbone names ('tiny', 'base_plus') get the canonical name."""
        from RetrievalSegLib.models.registry import canonical_sam2

        node = getattr(self._parameterNode, "parameterNode", None)  # the wrapped MRML node
        raw = node.GetParameter("sam2Size") if node is not None else ""
        if raw:
            try:
                name = canonical_sam2(raw)
            except ValueError:
                name = "sam2.1-tiny"
            if name != raw:
                node.SetParameter("sam2Size", name)

    def _followBackboneImageSize(self) -> None:
        """A newly chosen backbone sets its native image size (the user may change it afterwards)."""
        p = self._parameterNode
        if p is None or getattr(self, "_lastSam2Size", None) == p.sam2Size:
            return
        self._lastSam2Size = p.sam2Size
        from RetrievalSegLib.models.registry import sam2_spec

        native = sam2_spec(p.sam2Size).image_size
        if int(p.imageSize) != native:
            p.imageSize = native

    def _checkCanApply(self, caller=None, event=None) -> None:
        self._followBackboneImageSize()
        p = self._parameterNode
        core = self.logic.core if self.logic else None
        running = self._jobRunning()
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running job; nothing is written.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Segment")
            if not p or not p.inputVolume:
                self.ui.applyButton.toolTip = _("Select an input volume.")
                self.ui.applyButton.enabled = False
            elif core is None or core.bank is None:
                self.ui.applyButton.toolTip = _(
                    "Open a support bank, or create one from an annotated segmentation "
                    "(Support bank section)."
                )
                self.ui.applyButton.enabled = False
            elif len(core.bank) < p.k:
                self.ui.applyButton.toolTip = _(
                    "The bank holds {count} slices but k = {k}: add annotated slices or lower k."
                ).format(count=len(core.bank), k=p.k)
                self.ui.applyButton.enabled = False
            else:
                self.ui.applyButton.toolTip = _(
                    "Segment the input volume from the support bank ({count} slices)."
                ).format(count=len(core.bank))
                self.ui.applyButton.enabled = True

        haveBank = core is not None and core.bank is not None
        haveInputs = bool(p and p.inputVolume and p.outputSegmentation)
        haveResult = bool(haveInputs and core.has_result_for(p.inputVolume, p.outputSegmentation))
        for button, enabled in (
            (self.ui.openBankButton, not running),
            (self.ui.newBankButton, not running and bool(p and p.outputSegmentation)),
            (self.ui.verifyBankButton, not running and haveBank),
            (self.ui.addAnnotatedSlicesButton, not running and haveBank and haveInputs),
            (self.ui.suggestSlicesButton, not running and bool(p and p.inputVolume)),
            (self.ui.addCurrentSliceButton, not running and haveBank and haveInputs),
            (self.ui.addEditedSlicesButton, not running and haveBank and haveResult),
            (self.ui.resegmentButton, not running and haveBank and haveResult),
            (self.ui.undoButton, not running and core is not None and core.can_undo),
            (self.ui.nextLowConfidenceButton, haveResult),
            (self.ui.whyThisMaskButton, haveResult),
            (self.ui.downloadWeightsButton, not running or self._jobKind() == "download"),
            (self.ui.installDependenciesButton, not running),
        ):
            button.enabled = enabled
        self.ui.downloadWeightsButton.text = (
            _("Cancel download") if running and self._jobKind() == "download" else _("Download weights")
        )
        if caller is not None:  # a parameter changed (e.g. a model size): weights may be missing now
            self._updateWeightsStatus()

    # ------------------------------------------------------------------ settings
    def _weightsDir(self) -> Optional[str]:
        path = self.ui.weightsPathLineEdit.currentPath.strip()
        return path or None

    def _rememberWeightsDir(self) -> None:
        """Keep the weights folder for the next Slicer session (and in the line edit's history)."""
        path = self._weightsDir() or ""
        qt.QSettings().setValue(WEIGHTS_FOLDER_SETTING, path)
        if path:
            self.ui.weightsPathLineEdit.addCurrentPathToHistory()

    def _engineSettings(self) -> "module_logic.EngineSettings":
        return self.logic.engineSettings(self._parameterNode, self._weightsDir())

    def _caseId(self) -> str:
        caseId = self._parameterNode.caseId.strip()
        return caseId or mrml_bridge.case_id_for_volume(self._parameterNode.inputVolume)

    def _sliceAxis(self) -> int:
        """The slice axis of the current result, else the chosen one (auto = through-plane)."""
        core = self.logic.core
        volumeNode = self._parameterNode.inputVolume
        if volumeNode and core.has_result_for(volumeNode):
            return core.state.axis
        from RetrievalSegLib.data.volume import parse_axis, through_plane_axis

        axis = parse_axis(self._parameterNode.axis)
        return through_plane_axis(volumeNode.GetSpacing()) if axis is None else axis

    # ------------------------------------------------------------------ first use
    def _updateDependenciesStatus(self) -> None:
        problem = self.logic.pythonVersionProblem()
        if problem:
            self.ui.dependenciesStatusLabel.text = problem
            return
        missing = self.logic.missingPackages()
        if missing:
            self.ui.dependenciesStatusLabel.text = _("Missing: {names}").format(names=", ".join(missing))
        else:
            self.ui.dependenciesStatusLabel.text = _("All installed.")

    def _updateWeightsStatus(self, *args) -> None:
        if not self._parameterNode:
            return
        if self.logic.core.remote:
            self.ui.weightsStatusLabel.text = _("On {host}: its own weights (`rseg weights download` there).").format(
                host=self.logic.core.client.where)
            return
        try:
            missing = self._engineSettings().missing_downloads()
        except Exception as e:  # e.g. a mistyped RSEG_WEIGHTS_MIRROR: say so here
            self.ui.weightsStatusLabel.text = str(e)
            return
        if missing:
            self.ui.weightsStatusLabel.text = _("{count} file(s), about {size:.0f} MB, to download.").format(
                count=len(missing), size=sum(item.approx_mb for item in missing)
            )
        else:
            self.ui.weightsStatusLabel.text = _("Present.")

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages."), waitCursor=True):
            self.logic.installDependencies(askConfirmation=True)
        self._updateDependenciesStatus()
        self._updateWeightsStatus()

    def _ensureDependencies(self) -> bool:
        if not self.logic.missingPackages():
            self.logic.checkTorchVersion()
            return True
        if not self.logic.installDependencies(askConfirmation=True):
            return False
        self._updateDependenciesStatus()
        return not self.logic.missingPackages()

    def onDownloadWeights(self) -> None:
        if self._jobRunning() and self._jobKind() == "download":
            self.logic.core.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to download the weights."), waitCursor=False):
            if self.logic.core.remote:
                raise RuntimeError(_("The models run on {host}: download the weights there, "
                                     "`rseg weights download` in its RetrievalSeg.").format(host=self.logic.core.client.where))
            if not self._ensureDependencies():
                return
            self._rememberWeightsDir()
            missing = self._engineSettings().missing_downloads()
            if not missing:
                slicer.util.infoDisplay(_("The weights of the selected models are already present."))
                return
            self._startDownload(missing, self._engineSettings())

    def _startDownload(self, items, settings) -> bool:
        """Ask, then download `items` in the background; True when the download started."""
        totalMb = sum(item.approx_mb for item in items)
        detail = "\n".join(f"{item.name}  ({item.approx_mb:.0f} MB)  {item.url}" for item in items)
        from RetrievalSegLib.models.registry import sam2_spec, weights_location

        # Licence terms before consent: MedSAM2's weights have none we could find.
        specs = {item.model: sam2_spec(item.model) for item in items if item.kind == "sam2"}
        terms = "".join(
            "\n\n" + _("{model}: {licence}. Note on its weights: {terms}").format(
                model=s.display, licence=s.licence, terms=s.weights_terms)
            for s in specs.values() if s.weights_terms
        )
        detail += "".join(f"\n{s.display}: {s.licence}; cite {s.citation}" for s in specs.values())

        folder = weights_location(self._weightsDir())
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "RetrievalSeg needs model weights that are not on this computer yet:\n"
                "about {size:.0f} MB in {count} file(s), saved into\n{folder}{terms}\n\nDownload them now?"
            ).format(size=totalMb, count=len(items), folder=folder, terms=terms),
            windowTitle=_("Download model weights"),
            detailedText=detail,
        ):
            return False
        self.logic.core.settings = settings
        self.logic.core.start_download()
        self._onJobStarted(_("Downloading weights..."))
        return True

    def _ensureWeights(self, settings, thenSegment: bool = False) -> bool:
        """True when the weights are present; otherwise offer to download them (in the background).
        With a remote worker they are on its host: its jobs say so if they are missing there."""
        if self.logic.core.remote:
            return True
        missing = settings.missing_downloads()
        if not missing:
            return True
        started = self._startDownload(missing, settings)
        self._segmentAfterDownload = started and thenSegment
        if started and not thenSegment:
            self.ui.statusLabel.text = _("Downloading weights; try again when the download has finished.")
        return False

    # ------------------------------------------------------------------ bank
    def _updateBankInfo(self) -> None:
        core = self.logic.core
        bank = core.bank
        problem = self.logic.runOnProblem
        if bank is None:
            where = _("No support bank is open.")
            if core.remote:
                where += " " + _("Models run on {host}: a bank folder is a path there.").format(host=core.client.where)
            self.ui.bankInfoLabel.text = (problem + "\n" if problem else "") + where
        else:
            labels = ", ".join(lab.name for lab in bank.labels)
            cases = len({e.case_id for e in bank.entries()})
            self.ui.bankInfoLabel.text = _("Bank: {location}").format(location=core.bank_location()) + "\n" + _(
                "{count} annotated slices from {cases} case(s). Labels: {labels}."
            ).format(count=len(bank), cases=cases, labels=labels)
        self._checkCanApply()

    def onRunOnChanged(self) -> None:
        """*Run on* or *Remote Python* edited: keep them (QSettings) and send the next jobs there."""
        runOn = self.ui.runOnLineEdit.text.strip()
        python = self.ui.remotePythonLineEdit.text.strip()
        settings = qt.QSettings()
        if (runOn, python) == (str(settings.value(RUN_ON_SETTING, "") or ""),
                               str(settings.value(REMOTE_PYTHON_SETTING, "") or "")) and not self.logic.runOnProblem:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to change where the models run."), waitCursor=True):
            if runOn:
                from RetrievalSegLib.worker.remote import SshTarget

                SshTarget.parse(runOn, python)  # a malformed host is refused here, before it is kept
            if self.logic.core.busy:  # a running job keeps its worker: refused, nothing kept
                raise RuntimeError(_("RetrievalSeg is still running; wait for it or cancel it first."))
            settings.setValue(RUN_ON_SETTING, runOn)
            settings.setValue(REMOTE_PYTHON_SETTING, python)
            self.logic.core.use_client(self.logic.workerClient())
            self.logic.runOnProblem = None
            self.ui.statusLabel.text = _("Models run on {host}.").format(host=self.logic.core.client.where)
        self._updateBankInfo()
        self._updateWeightsStatus()

    def onOpenBank(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to open the support bank."), waitCursor=True):
            path = self.ui.bankPathLineEdit.currentPath.strip()
            if not path:
                raise ValueError(_("Choose the bank folder first."))
            if self.logic.core.remote:  # the worker on the server opens it: a job, polled
                self.logic.core.start_open_bank(path)
                self._onJobStarted(_("Opening the support bank on {host}...").format(host=self.logic.core.client.where))
                return
            self.logic.core.open_bank(path)
            self.ui.bankPathLineEdit.addCurrentPathToHistory()
        self._updateBankInfo()

    def onNewBank(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to create the support bank."), waitCursor=True):
            path = self.ui.bankPathLineEdit.currentPath.strip()
            segmentationNode = self._parameterNode.outputSegmentation
            if not path:
                raise ValueError(_("Choose an empty or new folder for the bank first."))
            if not self._prepareEngine():
                return
            labels = mrml_bridge.labels_from_segmentation(segmentationNode)
            if not slicer.util.confirmOkCancelDisplay(
                _("Create a support bank in\n{path}\nwith the labels: {labels}?").format(
                    path=path, labels=", ".join(lab.name for lab in labels)
                )
            ):
                return
            self.logic.core.start_create_bank(path, labels)
            self._onJobStarted(_("Creating the support bank (loading the models)..."))

    def onVerifyBank(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to verify the support bank."), waitCursor=True):
            self.logic.core.start_verify(repair=False)
            self._onJobStarted(_("Verifying the support bank..."))

    def onAddAnnotatedSlices(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the annotated slices."), waitCursor=True):
            p = self._parameterNode
            if not self._prepareEngine():
                return
            self.logic.core.start_add_annotated_slices(
                p.inputVolume, p.outputSegmentation, self._caseId(), axis=self._sliceAxis()
            )
            self._onJobStarted(_("Adding the annotated slices to the bank..."))

    def _prepareEngine(self, thenSegment: bool = False) -> bool:
        """Dependencies installed and weights present for the chosen settings (asks otherwise)."""
        if not self._ensureDependencies():
            return False
        settings = self._engineSettings()
        self._rememberWeightsDir()
        if not self._ensureWeights(settings, thenSegment):
            return False
        self.logic.core.settings = settings
        self.logic.core.precision = self._parameterNode.precision
        self.logic.core.extent_stop = int(self._parameterNode.extentStop)
        self.logic.core.support_order = str(self._parameterNode.supportOrder)
        self.logic.core.propagate = int(self._parameterNode.propagate)
        self.logic.core.support_filter = self._parameterNode.supportFilter
        return True

    # ------------------------------------------------------------------ segmenting
    def onApplyButton(self) -> None:
        if self._jobRunning():
            self.logic.core.cancel()
            self._segmentAfterDownload = False
            self._resegmentAfterAdd = False
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self._prepareEngine(thenSegment=True):
                return
            p = self._parameterNode
            core = self.logic.core
            if p.outputSegmentation and core.has_result_for(p.inputVolume, p.outputSegmentation):
                edited = core.edited_slices(p.inputVolume, p.outputSegmentation)
                if edited and not slicer.util.confirmOkCancelDisplay(
                    _("Segment replaces every slice, including the {count} slice(s) you edited. "
                      "Continue? (Re-segment remaining slices keeps your edits.)").format(count=len(edited))
                ):
                    return
            sliceRange = (p.firstSlice, p.lastSlice + 1) if p.useSliceRange else None
            self.logic.core.start_segmentation(
                p.inputVolume,
                k=p.k,
                axis=p.axis,
                slice_range=sliceRange,
                case_id=self._caseId(),
                case_policy=p.casePolicy,
            )
            self._onJobStarted(_("Starting..."))

    def onResegmentRemaining(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to re-segment the remaining slices."), waitCursor=True):
            if not self._prepareEngine():
                return
            p = self._parameterNode
            notInBank = self.logic.core.edits_not_in_bank(p.inputVolume, p.outputSegmentation)
            if notInBank and slicer.util.confirmYesNoDisplay(
                _("{count} edited slice(s) are not in the bank yet. Add them first, so that the "
                  "re-segmentation can use them?").format(count=len(notInBank))
            ):
                self._resegmentAfterAdd = True  # continues in _onJobEnded
                self._startAddEditedSlices()
                return
            self._startResegmentRemaining()

    def _startResegmentRemaining(self) -> None:
        p = self._parameterNode
        self.logic.core.start_resegment_remaining(
            p.inputVolume, p.outputSegmentation, k=p.k, case_id=self._caseId(), case_policy="prefer"
        )
        self._onJobStarted(_("Re-segmenting the slices you have not edited..."))

    def onTryLowerResolution(self) -> None:
        """The user chose 512 px after a long CPU estimate: cancel, then segment again at 512 px."""
        self.ui.tryLowerResolutionButton.hide()
        if not self._jobRunning():
            return
        self._segmentAfterCancel = True
        self._parameterNode.imageSize = 512
        self.logic.core.cancel()
        self.ui.statusLabel.text = _("Cancelling; then segmenting at 512 px (its time is measured on its first batch)...")

    def _onJobStarted(self, message: str) -> None:
        self._estimateAdvice = None
        self.ui.tryLowerResolutionButton.hide()
        # What the job works on is fixed when it starts: its result goes there, whatever is
        # selected when it ends.
        self._jobVolumeNode = self._parameterNode.inputVolume
        self._jobSegmentationNode = self._parameterNode.outputSegmentation
        self.ui.progressBar.show()
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress report
        self.ui.statusLabel.text = message
        self._pollTimer.start()
        self._checkCanApply()

    @staticmethod
    def _humanReadableTime(seconds: float) -> str:
        seconds = int(round(seconds))
        if seconds < 60:
            return _("{seconds} s").format(seconds=seconds)
        return _("{minutes} min {seconds} s").format(minutes=seconds // 60, seconds=seconds % 60)

    def _onPollTimer(self) -> None:
        """Read what the worker reported (never blocks); stop only after the job's final event."""
        core = self.logic.core
        kind = self._jobKind()
        for event in core.poll():
            if event.kind == "status":
                self.ui.statusLabel.text = event.message
                if event.estimate and kind == "segment":
                    # Measured on this run's first batch; a long CPU run offers 512 px, never switches.
                    self._estimateAdvice = module_logic.estimate_advice(event.estimate)
                    if self._estimateAdvice and int(self._parameterNode.imageSize) > 512:
                        self.ui.statusLabel.text = self._estimateAdvice
                        self.ui.tryLowerResolutionButton.show()
            elif event.kind == "progress":
                if kind == "download":
                    self._showProgress(event, _("MB"), scale=1e6)
                else:
                    self._showProgress(event, _("slices"))
            elif event.terminal:
                self.ui.progressBar.hide()
                self._onJobEnded(kind, event)
        if not self._jobRunning():
            self._pollTimer.stop()
        self._checkCanApply()

    def _showProgress(self, event, unit: str, scale: float = 1.0) -> None:
        done, total = int(event.done / scale), int(event.total / scale)
        if total > 0:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.value = done
        text = f"{done} / {total} {unit}" if total else f"{done} {unit}"
        if event.remaining_s is not None:
            text += " " + _("(about {time} left)").format(time=self._humanReadableTime(event.remaining_s))
        if event.message:
            text = f"{event.message}: {text}"
        if self._estimateAdvice and self.ui.tryLowerResolutionButton.visible:
            text += "\n" + self._estimateAdvice
        self.ui.statusLabel.text = text

    def _onJobEnded(self, kind, event) -> None:
        """The worker's job ended: write or report its result on the main thread."""
        segmenting = kind == "segment"
        self.ui.tryLowerResolutionButton.hide()
        if event.kind == "failed":
            self._segmentAfterDownload = self._resegmentAfterAdd = self._suggestAfterJob = False
            self._segmentAfterCancel = False
            self.ui.statusLabel.text = _("Failed: {error}").format(error=event.message)
            logging.error("RetrievalSeg %s failed: %s\n%s", kind, event.message, event.traceback)
            slicer.util.errorDisplay(
                _("RetrievalSeg failed ({job}): {error}").format(job=kind, error=event.message),
                detailedText=event.traceback,
            )
        elif event.kind == "cancelled" and self._segmentAfterCancel and segmenting:
            self._segmentAfterCancel = False
            qt.QTimer.singleShot(0, self.onApplyButton)  # the user asked for 512 px
        elif event.kind == "cancelled":
            self._segmentAfterDownload = self._resegmentAfterAdd = self._suggestAfterJob = False
            self.ui.statusLabel.text = {
                "segment": _("Cancelled; the segmentation was not changed."),
                "download": _("Download cancelled; the partial file was discarded."),
            }.get(kind, _("Cancelled."))
        elif segmenting:
            self._writeResult(event)
        elif kind == "download":
            self.ui.statusLabel.text = _("Weights downloaded.")
            if self._segmentAfterDownload:
                self._segmentAfterDownload = False
                qt.QTimer.singleShot(0, self.onApplyButton)
        elif kind == "verify":
            result = event.result
            self.ui.statusLabel.text = result["summary"].splitlines()[0] if result["summary"] else ""
            show = slicer.util.infoDisplay if result["ok"] else slicer.util.warningDisplay
            show(result["summary"], windowTitle=_("Support bank check"))
        elif kind == "suggest":
            self._showSuggestions(event.result)
        elif kind == "create_bank":
            self.ui.bankPathLineEdit.addCurrentPathToHistory()
            self.ui.statusLabel.text = _("Support bank created.")
        elif kind == "bank_info":
            self.ui.bankPathLineEdit.addCurrentPathToHistory()
            self.ui.statusLabel.text = _("Support bank opened: {location}.").format(location=self.logic.core.bank_location())
        elif kind in ("add_slices", "add_volume"):
            self.ui.statusLabel.text = _("Added {count} slice(s) to the bank.").format(count=len(event.result))
            if self._resegmentAfterAdd:
                self._resegmentAfterAdd = False
                with slicer.util.tryWithErrorDisplay(_("Failed to re-segment the remaining slices."), waitCursor=True):
                    self._startResegmentRemaining()
        if event.kind == "finished" and kind in ("add_slices", "add_volume") and self._suggestionsShown():
            self._suggestAfterJob = True  # the bank changed: refresh the list (after a chained re-segment)
        if self._suggestAfterJob and not self._jobRunning():
            self._suggestAfterJob = False
            with slicer.util.tryWithErrorDisplay(_("Failed to refresh the suggested slices."), waitCursor=True):
                self._startSuggest(_("The bank changed: finding the slices to annotate next..."))
        if kind == "download":
            self._updateWeightsStatus()
        if kind not in ("segment", "download", "load"):
            self._updateBankInfo()
            self._updateReviewInfo()

    def _writeResult(self, event) -> None:
        core = self.logic.core
        volumeNode = self._jobVolumeNode
        try:
            self._writeResultUnchecked(event, core, volumeNode)
        finally:
            if core.has_result:  # writing failed: drop the result so that the panel is usable again
                core.discard_result()

    def _writeResultUnchecked(self, event, core, volumeNode) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to write the segmentation."), waitCursor=True):
            if volumeNode is None or volumeNode.GetScene() is None:
                core.discard_result()
                raise RuntimeError(_("The input volume was removed while it was being segmented."))
            segmentationNode = self._jobSegmentationNode
            if segmentationNode is not None and segmentationNode.GetScene() is None:
                segmentationNode = None  # removed while the job ran: write a new one
            if segmentationNode is not None:
                self._saveSegmentEditorUndoState(segmentationNode)
            segmentationNode = core.apply_result(slicer.mrmlScene, volumeNode, segmentationNode)
            self._parameterNode.outputSegmentation = segmentationNode
            segmentationNode.CreateDefaultDisplayNodes()
            slicer.util.setSliceViewerLayers(background=volumeNode)
            low = core.low_confidence_slices(self._parameterNode.confidenceThreshold)
            self.ui.statusLabel.text = _(
                "Done in {time}. {low} slice(s) have low confidence."
            ).format(time=self._humanReadableTime(event.elapsed_s), low=len(low))
            beyond = core.state.beyond_extent if core.state is not None else set()
            if beyond:
                self.ui.statusLabel.text += " " + _(
                    "{count} slice(s) beyond the structure's extent were not segmented (Extent stop; "
                    "0 segments every slice)."
                ).format(count=len(beyond))
            self._updateReviewInfo()

    @staticmethod
    def _saveSegmentEditorUndoState(segmentationNode) -> None:
        """Let Ctrl+Z in the Segment Editor undo our write when it edits this segmentation.

        Slicer 5.10: `slicer.modules.SegmentEditorWidget` exists once the Segment Editor's GUI has
        been created (qSlicerScriptedLoadableModuleWidget sets `slicer.modules.<Name>Widget`);
        its `editor` is a qMRMLSegmentEditorWidget, whose `saveStateForUndo()` slot records the
        segmentation as it is now. The GUI is never created just for this: our Undo button works.
        """
        segmentEditorWidget = getattr(slicer.modules, "SegmentEditorWidget", None)
        editor = getattr(segmentEditorWidget, "editor", None)
        if editor is None or editor.segmentationNode() is not segmentationNode:
            return
        try:
            editor.saveStateForUndo()
        except Exception:  # the write must go ahead; our own Undo button still works
            logging.warning("RetrievalSeg: the Segment Editor's undo state was not saved", exc_info=True)

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to undo the last result."), waitCursor=True):
            node = self.logic.core.undo_last_result(slicer.mrmlScene)
            if node is None:
                self._parameterNode.outputSegmentation = None
            self.ui.statusLabel.text = _("The last result was undone.")
            self._updateReviewInfo()
        self._checkCanApply()

    # ------------------------------------------------------------------ what to annotate next
    def onSuggestSlices(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to suggest slices to annotate."), waitCursor=True):
            if not self._prepareEngine():
                return
            self._startSuggest(_("Finding the slices to annotate next..."))

    def _startSuggest(self, message: str) -> None:
        p = self._parameterNode
        self.logic.core.start_suggest(p.inputVolume, n=p.suggestCount, axis=p.axis, case_id=self._caseId())
        self._onJobStarted(message)

    def _suggestionsShown(self) -> bool:
        """True when the list shows suggestions for the current input volume."""
        core = self.logic.core
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None
        return core.suggestions_for(volumeNode) is not None

    def _showSuggestions(self, suggestions) -> None:
        listWidget = self.ui.suggestionsListWidget
        wasBlocked = listWidget.blockSignals(True)  # filling the list must not move the slice views
        try:
            listWidget.clear()
            for pick in suggestions.picks:
                item = qt.QListWidgetItem(pick.summary())
                item.setToolTip("\n".join(pick.reasons))
                listWidget.addItem(item)
        finally:
            listWidget.blockSignals(wasBlocked)
        if suggestions.coverage_before is None:
            coverage = _("Coverage with these slices in the bank: {after:.3f}").format(after=suggestions.coverage_after or 0.0)
        else:
            coverage = _("Coverage: {before:.3f} now, {after:.3f} with these slices added").format(
                before=suggestions.coverage_before, after=suggestions.coverage_after
            )
        self.ui.suggestionsLabel.text = " ".join(
            [coverage + _(" (mean cosine distance of the slices to the nearest bank slice; lower is better).")]
            + list(suggestions.notes)
        )
        self.ui.statusLabel.text = _("Suggested {count} slice(s) to annotate; click one to show it.").format(
            count=len(suggestions.picks)
        )

    def onSuggestionSelected(self, row: int) -> None:
        """Show the suggested slice in the slice views."""
        core = self.logic.core
        if not self._suggestionsShown() or not 0 <= row < len(core.suggestions.picks):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show the suggested slice."), waitCursor=True):
            pick = core.suggestions.picks[row]
            x, y, z = mrml_bridge.slice_center_ras(self._parameterNode.inputVolume, core.suggestions.axis, pick.index)
            slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)
            self.ui.currentSliceLabel.text = _("Slice {index}: {reasons}").format(
                index=pick.index, reasons="; ".join(pick.reasons)
            )

    # ------------------------------------------------------------------ review and correct
    def _alignedSliceNode(self, volumeNode, axis: int):
        """The slice view whose normal is closest to the volume's slice axis (in world RAS)."""
        direction = mrml_bridge.slice_normal_ras(volumeNode, axis)
        best, bestCos = None, 0.0
        layoutManager = slicer.app.layoutManager()
        for name in layoutManager.sliceViewNames():
            sliceNode = layoutManager.sliceWidget(name).mrmlSliceNode()
            m = sliceNode.GetSliceToRAS()
            normal = [m.GetElement(r, 2) for r in range(3)]
            cos = abs(sum(a * b for a, b in zip(normal, direction)))
            if cos > bestCos:
                best, bestCos = sliceNode, cos
        if best is None or bestCos < 0.99:
            raise ValueError(
                _("No slice view shows slices along this volume's axis {axis}; rotate a view to the "
                  "volume (Reformat module or the view's 'Rotate to volume plane').").format(axis="ijk"[axis])
            )
        return best

    def _currentSliceIndex(self) -> int:
        volumeNode = self._parameterNode.inputVolume
        axis = self._sliceAxis()
        sliceNode = self._alignedSliceNode(volumeNode, axis)
        m = sliceNode.GetSliceToRAS()
        center = [m.GetElement(r, 3) for r in range(3)]
        index = mrml_bridge.slice_index_from_ras(volumeNode, axis, center)
        count = volumeNode.GetImageData().GetDimensions()[axis]
        if not 0 <= index < count:
            raise ValueError(_("The slice view is outside the volume."))
        return index

    def _updateReviewInfo(self) -> None:
        core = self.logic.core
        p = self._parameterNode
        try:
            edited = core.edited_slices(p.inputVolume, p.outputSegmentation)
            notInBank = core.edits_not_in_bank(p.inputVolume, p.outputSegmentation)
        except Exception:
            self.ui.editedSlicesLabel.text = _(
                "Correct the result in the Segment Editor, then add the corrected slices to the bank."
            )
            return
        self.ui.editedSlicesLabel.text = _(
            "Edited slices: {edited} ({notInBank} not in the bank yet)."
        ).format(edited=", ".join(str(i) for i in edited) or _("none"), notInBank=len(notInBank))

    def onAddCurrentSlice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the slice to the bank."), waitCursor=True):
            if not self._prepareEngine():
                return
            p = self._parameterNode
            index = self._currentSliceIndex()
            self.logic.core.start_add_slices(
                p.inputVolume, p.outputSegmentation, self._sliceAxis(), [index], self._caseId()
            )
            self._onJobStarted(_("Adding slice {index} to the bank...").format(index=index))

    def onAddEditedSlices(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to add the edited slices to the bank."), waitCursor=True):
            if not self._prepareEngine():
                return
            self._startAddEditedSlices()

    def _startAddEditedSlices(self) -> None:
        p = self._parameterNode
        self.logic.core.start_add_edited_slices(p.inputVolume, p.outputSegmentation, self._caseId())
        self._onJobStarted(_("Adding the edited slices to the bank..."))

    def onNextLowConfidenceSlice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to go to the next low-confidence slice."), waitCursor=True):
            p = self._parameterNode
            try:
                current = self._currentSliceIndex()
            except ValueError:
                current = -1
            index = self.logic.core.next_low_confidence_slice(current, p.confidenceThreshold)
            if index is None:
                self.ui.currentSliceLabel.text = _("No slice has confidence below {threshold:.2f}.").format(
                    threshold=p.confidenceThreshold
                )
                return
            x, y, z = mrml_bridge.slice_center_ras(p.inputVolume, self._sliceAxis(), index)
            slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)
            self._showSliceInfo(index)

    def _showSliceInfo(self, index: int) -> None:
        result = self.logic.core.slice_result(index)
        if result is None:
            state = self.logic.core.state
            if state is not None and index in state.beyond_extent:
                self.ui.currentSliceLabel.text = _(
                    "Slice {index} was not segmented: beyond the structure's extent (Extent stop)."
                ).format(index=index)
                return
            self.ui.currentSliceLabel.text = _("Slice {index} was not segmented automatically.").format(index=index)
            return
        self.ui.currentSliceLabel.text = _("Slice {index}: confidence {confidence:.2f}").format(
            index=index, confidence=result.confidence
        )

    def onWhyThisMask(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to show the retrieved supports."), waitCursor=True):
            index = self._currentSliceIndex()
            self._showSliceInfo(index)
            self._showThumbnails(self.logic.core.thumbnails(index, size=96))

    def _showThumbnails(self, thumbnails) -> None:
        grid = self.ui.supportsFrame.layout()
        for w in self._thumbnailWidgets:
            grid.removeWidget(w)
            w.deleteLater()
        self._thumbnailWidgets = []
        columns = 3
        for n, thumb in enumerate(thumbnails):
            label = qt.QLabel()
            label.setPixmap(self._pixmapFromRgb(thumb.rgb))
            label.toolTip = _("{entry}: {origin} slice of case {case}, similarity {score:.3f}").format(
                entry=thumb.entry_id, origin=thumb.origin, case=thumb.case_id, score=thumb.score
            )
            caption = qt.QLabel(thumb.caption)
            caption.wordWrap = True
            box = qt.QWidget()
            layout = qt.QVBoxLayout(box)
            layout.setContentsMargins(0, 0, 0, 0)
            layout.addWidget(label)
            layout.addWidget(caption)
            grid.addWidget(box, n // columns, n % columns)
            self._thumbnailWidgets.append(box)

    @staticmethod
    def _pixmapFromRgb(rgb):
        import numpy as np
        from vtk.util.numpy_support import numpy_to_vtk

        height, width = rgb.shape[:2]
        image = vtk.vtkImageData()
        image.SetDimensions(width, height, 1)
        # VTK images start at the bottom row; Qt images at the top.
        scalars = numpy_to_vtk(np.ascontiguousarray(np.flipud(rgb)).reshape(-1, 3), deep=True)
        image.GetPointData().SetScalars(scalars)
        qimage = qt.QImage()
        slicer.qMRMLUtils().vtkImageDataToQImage(image, qimage)
        return qt.QPixmap.fromImage(qimage)


#
# RetrievalSegLogic
#


class RetrievalSegLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: parameter node, dependencies; the work is in module_logic.RetrievalSegLogic.

    Models never run in Slicer's process: `core` sends every model job to a worker process
    (Slicer's own Python, `PythonSlicer -m RetrievalSegLib.worker`) and is polled from a QTimer.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runOnProblem = None  # why the *Run on* setting could not be used (then: this computer)
        try:
            client = self.workerClient()
        except ValueError as e:  # a setting edited by hand: say so in the panel, run here meanwhile
            self.runOnProblem = _("The Run on setting is not usable ({error}); the models run on this "
                                  "computer until it is corrected.").format(error=e)
            logging.error("RetrievalSeg: %s", self.runOnProblem)
            client = self.workerClient(local=True)
        self.core = module_logic.RetrievalSegLogic(client=client)

    @staticmethod
    def workerClient(local: bool = False):
        """A client for the worker: Slicer's Python, Slicer's environment, logs in Slicer's temp folder;
        on the *Run on* host over ssh when that setting names one (ValueError if it is malformed)."""
        from RetrievalSegLib.worker.client import WorkerClient
        from RetrievalSegLib.worker.remote import SshTarget

        runOn = "" if local else str(qt.QSettings().value(RUN_ON_SETTING, "") or "").strip()
        target = None
        if runOn:
            target = SshTarget.parse(runOn, str(qt.QSettings().value(REMOTE_PYTHON_SETTING, "") or "").strip() or None)

        # Inside Slicer sys.executable is the application itself; PythonSlicer is its Python.
        python = shutil.which("PythonSlicer") or sys.executable
        env = dict(os.environ)
        if shutil.which("PythonSlicer") and hasattr(slicer.util, "startupEnvironment"):
            env = dict(slicer.util.startupEnvironment())
            # Our own switches may have been set after Slicer started: pass them on.
            env.update({k: v for k, v in os.environ.items() if k.startswith(("RSEG_", "HF_", "TRANSFORMERS_"))})
        cap = str(qt.QSettings().value(MEMORY_CACHE_SETTING, "") or "").strip()
        if cap and "RSEG_MEMORY_CACHE_GB" not in env:
            env["RSEG_MEMORY_CACHE_GB"] = cap  # the worker's memory caches evict beyond it
        logDir = getattr(getattr(slicer, "app", None), "temporaryPath", None)
        return WorkerClient(python, env, log_dir=logDir if isinstance(logDir, str) else None, target=target)

    def getParameterNode(self):
        return RetrievalSegParameterNode(super().getParameterNode())

    @staticmethod
    def engineSettings(parameterNode, weightsDir=None) -> "module_logic.EngineSettings":
        return module_logic.EngineSettings(
            sam2_size=parameterNode.sam2Size,
            dinov2_size=parameterNode.dinov2Size,
            device=parameterNode.device,
            image_size=int(parameterNode.imageSize),
            weights_dir=weightsDir,
            retrieval_feature=parameterNode.retrievalFeature,
        )

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def pythonVersionProblem() -> Optional[str]:
        """Why this Slicer's Python cannot run RetrievalSeg (too old for SAM 2), or None when it can."""
        version = tuple(sys.version_info[:3])
        if version[:2] >= PYTHON_MINIMUM:
            return None
        return _(
            "RetrievalSeg needs 3D Slicer 5.10 or newer: SAM 2 needs Python {minimum} or newer, and this "
            "Slicer has Python {version} (Slicer 5.8 and older). Install Slicer 5.10 or newer and "
            "RetrievalSeg in it; nothing was installed."
        ).format(minimum=".".join(map(str, PYTHON_MINIMUM)), version=".".join(map(str, version)))

    @staticmethod
    def missingPackages() -> list:
        """Import names of the packages that are not installed yet."""
        names = ["torch", "sam2", *REQUIREMENTS]
        return [name for name in names if importlib.util.find_spec(name) is None]

    @staticmethod
    def torchVersionProblem() -> Optional[str]:
        """Why the installed PyTorch cannot be used (too old), or None when it can (or is absent)."""
        import importlib.metadata

        try:
            installed = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None
        if _versionTuple(installed) >= _versionTuple(TORCH_MINIMUM):
            return None
        return _(
            "RetrievalSeg needs PyTorch {minimum} or newer (SAM 2 does); this Slicer has PyTorch {installed}. "
            "Update it in the PyTorch Utils module (uninstall, then install a newer version), restart "
            "Slicer, and try again."
        ).format(minimum=TORCH_MINIMUM, installed=installed)

    def checkTorchVersion(self) -> None:
        """Raise with what to do when the installed PyTorch is too old."""
        problem = self.torchVersionProblem()
        if problem:
            raise RuntimeError(problem)

    @staticmethod
    def _constraintsFile() -> str:
        """A pip constraints file pinning what Slicer ships, so that nothing replaces it."""
        import importlib.metadata

        lines = []
        for dist in PINNED_DISTRIBUTIONS:
            try:
                lines.append(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        path = os.path.join(slicer.app.temporaryPath, "RetrievalSeg-constraints.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install torch (PyTorch extension), SAM 2 and the other packages; False if declined."""
        problem = self.pythonVersionProblem()
        if problem:  # before asking or installing anything: half an install helps nobody
            raise RuntimeError(problem)
        missing = self.missingPackages()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _(
                "RetrievalSeg needs these Python packages: {names}.\n\n"
                "PyTorch is installed by the PyTorch extension; the others are downloaded from the "
                "Python Package Index into Slicer's Python. Packages that Slicer already has "
                "(numpy, SimpleITK, VTK) are not replaced. This can take several minutes. Continue?"
            ).format(names=", ".join(missing)),
            windowTitle=_("Install Python packages"),
        ):
            return False

        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError as e:
                raise RuntimeError(
                    _("RetrievalSeg needs the PyTorch extension: install it from the Extensions Manager "
                      "and restart Slicer.")
                ) from e
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                # The user agreed above (or asked not to be asked): do not ask a second time.
                torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
                if torch is None:
                    raise RuntimeError(_("PyTorch was not installed; RetrievalSeg cannot run without it."))
        self.checkTorchVersion()

        constraints = self._constraintsFile()
        toInstall = [REQUIREMENTS[name] for name in REQUIREMENTS if importlib.util.find_spec(name) is None]
        if toInstall:
            slicer.util.pip_install(toInstall + ["-c", constraints])
        if importlib.util.find_spec("sam2") is None:
            # sam2 on PyPI is a source upload: build it against Slicer's torch (no build isolation,
            # which would download a second torch), without its CUDA extension, and without its
            # dependency list (it would replace torch/numpy; the ones we use are installed above).
            if importlib.util.find_spec("setuptools") is None:
                slicer.util.pip_install(["setuptools", "wheel", "-c", constraints])
            # pip_install runs pip with this process's environment: set the switch for that call only.
            previous = os.environ.get("SAM2_BUILD_CUDA")
            os.environ["SAM2_BUILD_CUDA"] = "0"
            pinned = os.path.join(slicer.app.temporaryPath, "RetrievalSeg-sam2-requirements.txt")
            with open(pinned, "w") as f:  # pip refuses a download whose SHA-256 differs
                f.write(f"{SAM2_REQUIREMENT} --hash=sha256:{SAM2_SHA256}\n")
            try:
                slicer.util.pip_install(["--no-deps", "--no-build-isolation", "--require-hashes", "-r", pinned])
            finally:
                if previous is None:
                    del os.environ["SAM2_BUILD_CUDA"]
                else:
                    os.environ["SAM2_BUILD_CUDA"] = previous
        importlib.invalidate_caches()
        still = self.missingPackages()
        if still:
            raise RuntimeError(_("These packages could not be installed: {names}").format(names=", ".join(still)))
        return True

    # ------------------------------------------------------------------ scripting
    def process(self, volumeNode, bankPath, segmentationNode=None, settings=None, **kwargs):
        """Segment `volumeNode` from the bank at `bankPath` (blocking); return the segmentation."""
        if settings is not None:
            self.core.settings = settings
        if self.core.bank is None or str(self.core.bank.path) != str(bankPath):
            self.core.open_bank(bankPath)
        startTime = time.time()
        node = self.core.run(slicer.mrmlScene, volumeNode, segmentationNode, **kwargs)
        logging.info(f"RetrievalSeg: segmented {volumeNode.GetName()} in {time.time() - startTime:.1f} s")
        return node


def _versionTuple(version: str) -> tuple:
    """(major, minor, patch) of a version string such as "2.5.1+cu121"."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(x or 0) for x in match.groups()) if match else (0, 0, 0)


#
# RetrievalSegTest
#


class RetrievalSegTest(ScriptedLoadableModuleTest):
    """Self-test on synthetic data with random weights (the real architectures, meaningless output)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # Reload and Test calls runTest directly (no unittest runner): a SkipTest raised here would
        # show as an error, so say why the real check cannot run and return.
        missing = RetrievalSegLogic.missingPackages()
        if missing:
            message = f"RetrievalSeg self-test skipped: Python packages missing ({', '.join(missing)}); use Install dependencies"
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_RetrievalSeg_annotate_segment_correct()

    def test_RetrievalSeg_annotate_segment_correct(self):
        missing = RetrievalSegLogic.missingPackages()
        if missing:
            self.skipTest(f"Python packages missing (use Install dependencies): {', '.join(missing)}")

        from RetrievalSegLib.data.synthetic import make_synthetic_study

        self.delayDisplay("Making a synthetic cardiac study")
        cases = make_synthetic_study(n_cases=2, shape=(8, 48, 48), spacing=(1.2, 1.0, 5.0), seed=3)
        logic = RetrievalSegLogic()
        core = logic.core
        if core.remote:  # the self-test checks this computer's install (its bank is a temporary folder here)
            core.use_client(logic.workerClient(local=True))
        core.settings = module_logic.EngineSettings(device="cpu", image_size=256, random_weights=True)
        # try/finally, not addCleanup: Reload and Test calls runTest() directly, without the
        # unittest runner that would run the cleanups; the worker process must end with the test.
        try:
            self._annotateSegmentCorrect(core, cases)
        finally:
            core.shutdown()

    def _annotateSegmentCorrect(self, core, cases):
        import tempfile

        import numpy as np

        scene = slicer.mrmlScene

        self.delayDisplay("Annotating case 1 and making a bank from it")
        annotatedVolume = mrml_bridge.volume_to_node(cases[0].image, scene, "case1")
        from RetrievalSegLib.data.synthetic import LABELS

        labels = [(value, name, color) for value, (name, color) in sorted(LABELS.items())]
        annotation = mrml_bridge.labelmap_to_segmentation((cases[0].labels, labels), scene, annotatedVolume)
        bankPath = os.path.join(tempfile.mkdtemp(), "bank")
        core.create_bank_from_segmentation(bankPath, annotation)
        entries = core.add_annotated_slices_to_bank(annotatedVolume, annotation, "case1")
        self.assertGreater(len(entries), 2)

        self.delayDisplay("Segmenting case 2")
        volumeNode = mrml_bridge.volume_to_node(cases[1].image, scene, "case2")
        segmentationNode = core.run(scene, volumeNode, k=2, case_id="case2")
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["RV", "Myo", "LV"])
        written = mrml_bridge.labelmap_from_segmentation(segmentationNode, volumeNode, core.bank.labels)
        self.assertTrue(np.array_equal(written.array, core.state.labelmap.array))

        self.delayDisplay("Correcting slice 4, adding it to the bank, re-segmenting the rest")
        corrected = np.zeros_like(cases[1].labels.array)
        corrected[4] = cases[1].labels.array[4]
        mrml_bridge.labelmap_to_segmentation(
            (cases[1].labels.with_array(corrected), labels), scene, volumeNode, segmentationNode, axis=2, slices=[4]
        )
        self.assertEqual(core.edited_slices(volumeNode, segmentationNode), [4])
        (entry,) = core.add_edited_slices_to_bank(volumeNode, segmentationNode, "case2")
        core.resegment_remaining(scene, volumeNode, segmentationNode, k=2, case_id="case2")
        self.assertEqual(core.state.slices[3].retrieved[0][0], entry.id)
        final = mrml_bridge.labelmap_from_segmentation(segmentationNode, volumeNode, core.bank.labels)
        self.assertTrue(np.array_equal(final.array[4], cases[1].labels.array[4]))
        self.delayDisplay("Test passed")
