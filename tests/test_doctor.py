import importlib.metadata as md

from neurosem import doctor


def test_torch_pin_is_read_from_torchvision_metadata(monkeypatch):
    monkeypatch.setattr(md, "requires", lambda name: ["numpy", "torch (==2.13.0)", "pillow (>=5.3.0)"])
    assert doctor.torch_pin_of_torchvision() == "2.13.0"
    monkeypatch.setattr(md, "requires", lambda name: ["numpy", "torch==2.15.0"])
    assert doctor.torch_pin_of_torchvision() == "2.15.0"


def test_report_renders_fixes_and_overall_state():
    rep = doctor.Report()
    rep.add("torch", True, "2.13.0+cpu")
    assert rep.ok and rep.render().endswith("all good")
    rep.add("torchvision", False, "0.28.0 fails to import", "pip install ...")
    text = rep.render()
    assert not rep.ok
    assert "[FAIL] torchvision" in text and "fix: pip install ..." in text


def test_diagnose_on_this_install_checks_everything():
    rep = doctor.diagnose()
    names = [c.name for c in rep.checks]
    for expected in ("python", "torch", "device", "torchvision", "h5py", "weights"):
        assert expected in names
