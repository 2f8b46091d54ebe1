"""The Slicer panel's *Run on* setting: the models on another host through ssh, the bank there.

In the world the module lives in (Slicer 5.10 stand-ins that refuse what Slicer lacks, real MRML,
`_slicer_fakes.py`) and, for the remote worker, a real OpenSSH sshd on 127.0.0.1 (`_sshd.py`).
What is checked:
* the QSettings *Run on* / *Remote Python* reach the worker client (host, user, port, command);
  an empty one is this computer; a malformed one is refused when typed and, if stored by hand,
  said in the panel while the models run here; a change while a job runs is refused and not kept;
  the self-test runs on this computer whatever the setting says;
* through sshd (slow): the panel opens the bank by its path on the server and says which host's bank it
  is; a segmentation through the remote worker lands in the scene exactly as the local worker's;
  a corrected slice added from the panel goes into the server's bank; the supports' thumbnails
  (their images are on the server) are refused with a clear message.
"""
from __future__ import annotations

import shlex
import time

import numpy as np
import pytest

from _small_world import bank_through_worker
from _sshd import remote_python, start_or_skip
from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.slicer_logic import mrml_bridge as mb
from RetrievalSegLib.worker import protocol as wp
from RetrievalSegLib.worker.remote import SshTarget

SETTINGS = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)  # as conftest.MODULE_SETTINGS


# ------------------------------------------------------------------------------- the setting
def test_run_on_setting_reaches_the_worker_client(module_world) -> None:  # type: ignore[no-untyped-def]
    module, gui = module_world
    assert module.RetrievalSegLogic().core.client.target is None  # nothing set: this computer
    gui.settings[module.RUN_ON_SETTING] = "alice@gpu-server:2222"
    gui.settings[module.REMOTE_PYTHON_SETTING] = "/opt/rseg/bin/python"
    core = module.RetrievalSegLogic().core
    assert core.client.target == SshTarget("gpu-server", "alice", 2222, "/opt/rseg/bin/python")
    assert core.remote and core.client.where == "ssh://alice@gpu-server:2222"
    gui.settings[module.REMOTE_PYTHON_SETTING] = ""
    assert module.RetrievalSegLogic().core.client.target.python == "python3"
    assert not module.RetrievalSegLogic().core.client.alive  # nothing starts before the first job


def test_run_on_typed_in_the_panel_is_kept_and_used_and_a_bad_one_is_refused(module_world) -> None:  # type: ignore[no-untyped-def]
    module, gui = module_world
    widget = module.RetrievalSegWidget()
    widget.setup()
    try:
        assert gui.ui.runOnLineEdit.text == "" and widget.logic.core.client.target is None
        gui.ui.runOnLineEdit.text = "bob@10.0.0.7"
        gui.ui.remotePythonLineEdit.text = "/srv/py"
        gui.ui.runOnLineEdit.emit("editingFinished")
        assert gui.errors == []
        assert gui.settings[module.RUN_ON_SETTING] == "bob@10.0.0.7"
        assert gui.settings[module.REMOTE_PYTHON_SETTING] == "/srv/py"
        assert widget.logic.core.client.target == SshTarget("10.0.0.7", "bob", None, "/srv/py")
        assert "Models run on ssh://bob@10.0.0.7: a bank folder is a path there" in gui.ui.bankInfoLabel.text
        assert "bob@10.0.0.7" in gui.ui.weightsStatusLabel.text  # its own weights, not this computer's

        gui.ui.runOnLineEdit.text = "-oProxyCommand=evil"  # would be read as an ssh option
        gui.ui.runOnLineEdit.emit("editingFinished")
        assert len(gui.errors) == 1 and "not a worker host" in str(gui.errors[0][1])
        assert gui.settings[module.RUN_ON_SETTING] == "bob@10.0.0.7"  # the bad one is not kept
        assert widget.logic.core.client.target.host == "10.0.0.7"

        gui.errors.clear()
        widget.logic.core._pending = [object()]  # a finished result not yet written: the logic is busy
        gui.ui.runOnLineEdit.text = "carol@other-host"
        gui.ui.runOnLineEdit.emit("editingFinished")
        assert len(gui.errors) == 1 and "still running" in str(gui.errors[0][1])
        assert gui.settings[module.RUN_ON_SETTING] == "bob@10.0.0.7"  # refused, and not kept for later
        widget.logic.core._pending = None

        gui.errors.clear()
        gui.ui.runOnLineEdit.text = ""  # back to this computer
        gui.ui.runOnLineEdit.emit("editingFinished")
        assert gui.errors == [] and widget.logic.core.client.target is None
    finally:
        widget.cleanup()


def test_self_test_runs_on_this_computer_whatever_run_on_says(module_world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Reload and Test checks this computer's install: its bank is a temporary folder here."""
    module, gui = module_world
    gui.settings[module.RUN_ON_SETTING] = "nobody@127.0.0.1:1"  # nobody listens: a remote try would say so
    monkeypatch.setattr(module.RetrievalSegLogic, "missingPackages", staticmethod(lambda: []))
    # A backbone the worker does not know: the first job fails fast, after the local worker started.
    monkeypatch.setattr(module.module_logic, "EngineSettings",
                        lambda **kw: wp.EngineSettings(**{**kw, "sam2_size": "no-such-backbone"}))
    used = []
    use = module.module_logic.RetrievalSegLogic.use_client
    monkeypatch.setattr(module.module_logic.RetrievalSegLogic, "use_client",
                        lambda self, client: (used.append(client), use(self, client))[1])
    with pytest.raises(Exception, match="no-such-backbone"):
        module.RetrievalSegTest().runTest()
    assert len(used) == 1 and used[0].target is None and used[0].worker_pid is not None


def test_a_malformed_stored_setting_is_said_in_the_panel(module_world) -> None:  # type: ignore[no-untyped-def]
    module, gui = module_world
    gui.settings[module.RUN_ON_SETTING] = "user@host:99999"
    widget = module.RetrievalSegWidget()
    widget.setup()
    try:
        assert widget.logic.core.client.target is None
        assert "The Run on setting is not usable" in gui.ui.bankInfoLabel.text
        assert "not a port: 99999" in gui.ui.bankInfoLabel.text
    finally:
        widget.cleanup()


def test_remote_jobs_carry_no_local_weights_folder_and_bank_paths_are_the_servers(tmp_path) -> None:
    """A local weights folder means nothing on the server; a relative bank path is refused (on which
    host would it be relative to?); bank jobs ask the worker for the bank's new state."""
    import dataclasses

    from RetrievalSegLib.slicer_logic.logic import RetrievalSegLogic
    from RetrievalSegLib.worker.client import WorkerClient, WorkerJob

    labels = [LabelInfo(1, "liver", (1.0, 0.0, 0.0))]
    settings = dataclasses.replace(SETTINGS, weights_dir="/local/weights")
    for target in ("ssh://u@gpu-server", None):
        client = WorkerClient(target=target, log_dir=tmp_path)
        sent: list[tuple[str, dict]] = []

        def submit(kind, params, folder=None, on_result=None, client=client, sent=sent):  # type: ignore[no-untyped-def]
            sent.append((kind, params))  # recorded instead of starting ssh
            return WorkerJob(client, str(len(sent)), kind, tmp_path, {}, on_result)

        client.submit = submit  # type: ignore[method-assign]
        core = RetrievalSegLogic(settings=settings, client=client)
        if target is None:
            core.start_create_bank(tmp_path / "bank", labels)
            assert sent[-1][1]["settings"]["weights_dir"] == "/local/weights" and "describe_bank" not in sent[-1][1]
            with pytest.raises(RuntimeError, match="on this computer"):
                core.start_open_bank("/srv/banks/liver")
            continue
        for bad in (lambda: core.start_open_bank("banks/liver"), lambda: core.start_create_bank("liver", labels)):
            with pytest.raises(ValueError, match="is a path there; give it absolute or as ~/"):
                bad()
        assert sent == []
        core.start_open_bank(" /srv/banks/liver ")
        assert sent[-1][0] == "bank_info" and sent[-1][1]["bank"] == "/srv/banks/liver"
        assert sent[-1][1]["settings"]["weights_dir"] is None
        core.job = None
        core.start_create_bank("~/liver", labels)
        assert sent[-1][0] == "create_bank" and sent[-1][1]["describe_bank"] is True
        assert sent[-1][1]["settings"]["weights_dir"] is None


# ------------------------------------------------------------------------------- through sshd
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):  # type: ignore[no-untyped-def]
    server = start_or_skip(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_bank(tmp_path_factory, worker_client):  # type: ignore[no-untyped-def]
    """A bank "on the server": `~/bank` in the server's HOME (the same disk here), made by the
    session's local worker. Returns (its full path, the server's HOME, a case to segment)."""
    cases = make_synthetic_study(n_cases=2, shape=(4, 40, 40), spacing=(1.2, 1.0, 5.0), seed=7)
    home = tmp_path_factory.mktemp("server-home")
    path = home / "bank"
    bank_through_worker(worker_client, path, cases[0], SETTINGS, case_id="c0")
    return path, home, cases[1]


def _pump(widget, errors, timeout: float = 240.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        widget._onPollTimer()
        if not widget._jobRunning() and not widget.logic.core.has_result:
            assert errors == [], errors
            return
        time.sleep(0.05)
    raise TimeoutError("the worker job did not end")


def _segment_in_panel(module, gui, scene, bank_path, case, name):  # type: ignore[no-untyped-def]
    widget = module.RetrievalSegWidget()
    widget.setup()
    gui.ui.bankPathLineEdit.currentPath = str(bank_path)
    widget.onOpenBank()
    assert widget._jobRunning() == widget.logic.core.remote  # a remote bank is opened by a job, polled
    _pump(widget, gui.errors)
    volume = mb.volume_to_node(case.image, scene, name)
    params = widget._parameterNode
    params.inputVolume, params.k = volume, 1
    widget.onApplyButton()
    _pump(widget, gui.errors)
    return widget, volume, params.outputSegmentation


@pytest.mark.slow  # 30-50 s on 2 shared cores: a local and a remote worker segment, the remote one adds a slice
def test_panel_through_sshd_segments_as_locally_and_corrections_go_into_the_servers_bank(
        module_world, fresh_scene, sshd, server_bank, worker_client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    module, gui = module_world
    bank_path, home, case = server_bank
    labels = SupportBank.open(bank_path).labels

    # The local worker (this computer, the session's warm one) first: the reference.
    own = module.RetrievalSegLogic.workerClient
    monkeypatch.setattr(module.RetrievalSegLogic, "workerClient", staticmethod(lambda local=False: worker_client))
    widget, volume, node = _segment_in_panel(module, gui, fresh_scene, bank_path, case, "local")
    assert gui.ui.bankInfoLabel.text.startswith(f"Bank: {bank_path} on this computer")
    local = mb.labelmap_from_segmentation(node, volume, labels).array.copy()
    widget.removeObservers()  # not cleanup(): the session's worker stays up
    monkeypatch.setattr(module.RetrievalSegLogic, "workerClient", staticmethod(own))  # reads the setting

    # Run on the "server": the setting, as the user typed it, is what reaches ssh.
    gui2 = gui
    monkeypatch.setenv("RSEG_SSH_OPTIONS", shlex.join(sshd.ssh_options()))
    gui2.settings[module.RUN_ON_SETTING] = f"{sshd.user}@{sshd.host}:{sshd.port}"
    gui2.settings[module.REMOTE_PYTHON_SETTING] = remote_python(home)
    remote_widget = None
    try:
        # The bank folder as typed: a path on the server ("~" is the server's HOME, not this side's).
        remote_widget, rvolume, rnode = _segment_in_panel(module, gui2, fresh_scene, "~/bank", case, "remote")
        core = remote_widget.logic.core
        assert core.remote and core.client.remote_pid is not None and core.client.worker_pid is None
        where = f"{sshd.user}@{sshd.host}:{sshd.port}"
        assert gui2.ui.bankInfoLabel.text.startswith(f"Bank: {bank_path} on {where}\n"), gui2.ui.bankInfoLabel.text
        remote = mb.labelmap_from_segmentation(rnode, rvolume, labels).array
        assert remote.any() and remote.tobytes() == local.tobytes()  # lands as the local one, voxel for voxel

        # A correction saved from the panel goes into the server's bank.
        before = len(SupportBank.open(bank_path))
        update = np.zeros(case.image.array.shape, dtype=np.uint8)
        update[1] = case.labels.array[1]
        mb.labelmap_to_segmentation((case.labels.with_array(update), labels), fresh_scene, rvolume, rnode,
                                    axis=2, slices=[1])
        remote_widget.onAddEditedSlices()
        _pump(remote_widget, gui2.errors)
        assert gui2.ui.statusLabel.text == "Added 1 slice(s) to the bank."
        server = SupportBank.open(bank_path)
        assert len(server) == before + 1 and len(core.bank) == len(server)  # the panel's count follows
        assert any(e.case_id == remote_widget._caseId() and e.index == 1 for e in server.entries())
        assert f"{len(server)} annotated slices" in gui2.ui.bankInfoLabel.text

        with pytest.raises(RuntimeError, match="thumbnails of a remote bank are not shown yet"):
            core.thumbnails(0)
        # Scripting (`logic.process`) opens it blocking, by the server's path too.
        core.bank = None
        assert str(core.open_bank("~/bank").path) == str(bank_path) and len(core.bank) == len(server)
    finally:
        if remote_widget is not None:
            remote_widget.cleanup()  # the remote worker ends with the module
