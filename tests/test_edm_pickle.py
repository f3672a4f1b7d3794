"""iia.models.edm_pickle: loading EDM-format network pickles (fixtures written by tests/edm_fixtures.py)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pickle
import sys
import threading
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from edm_fixtures import PersistentStub, dump_edm_style, make_edm_pickle
from iia.models.base import Denoiser
from iia.models.edm_pickle import EDMNet, EDMPickleError, EDMShimError, load_edm_pickle, read_edm_pickle

SHIM_NAMES = ("torch_utils", "torch_utils.persistence", "torch_utils.misc", "dnnlib", "dnnlib.util")


@pytest.fixture(scope="session")
def pickles(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm_pkl")
    out = {}
    for kind in ("edm-cond", "vp-uncond"):
        for numpy2 in (False, True):
            path = root / f"{kind}{'-np2' if numpy2 else ''}.pkl"
            out[kind, numpy2] = (path, make_edm_pickle(path, kind=kind, numpy2_names=numpy2))
    return out


def _inputs(batch=4, res=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=gen) * 2.0
    sigma = torch.tensor([0.002, 0.3, 4.0, 80.0])[:batch]
    labels = torch.tensor([0, 3, 9, 5])[:batch]
    return x, sigma, labels


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("numpy2", [False, True])
def test_conditional_edm_precond_matches_original(pickles, numpy2):
    path, original = pickles["edm-cond", numpy2]
    den = load_edm_pickle(path)
    assert isinstance(den, Denoiser) and isinstance(den.net, EDMNet)
    assert den.shape == (3, 8, 8) and den.label_dim == 10 and den.conditional
    assert (den.sigma_min, den.sigma_max) == (0.002, 80.0)  # net range [0, inf) clamped as EDM's sampler does
    assert den.identity == {
        "kind": "edm-pkl",
        "name": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "class_name": "EDMPrecond",
        "path": str(path),
    }
    assert den.pickle_meta["dataset_kwargs"]["use_labels"] is True
    assert den.pickle_meta["loss_fn"] == "EDMLoss" and den.pickle_meta["augment_pipe"] is None

    x, sigma, labels = _inputs()
    with torch.no_grad():
        expected = original(x, sigma, torch.nn.functional.one_hot(labels, 10).float())
        got = den.net(x, sigma, labels)
    assert torch.equal(got, expected)
    assert torch.equal(den(x.double(), sigma, labels), expected.double())

    precond = den.net.precond
    assert precond.use_fp16 is False  # forced fp32
    assert not precond.training and not any(p.requires_grad for p in precond.parameters())
    assert all(p.dtype == torch.float32 for p in precond.parameters())
    block = precond.model.blocks["block0"]
    assert isinstance(block.skip_scale, np.float64) and block.unused_mask is None
    assert precond._init_kwargs["label_dim"] == 10
    rounded = den.round_sigma(torch.tensor([0.5, 3.0]))
    assert rounded.dtype == torch.float64 and torch.equal(rounded, torch.tensor([0.5, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("numpy2", [False, True])
def test_unconditional_vp_precond_matches_original(pickles, numpy2):
    path, original = pickles["vp-uncond", numpy2]
    den = load_edm_pickle(path)
    assert den.shape == (3, 8, 8) and den.label_dim == 0 and not den.conditional
    assert den.identity["class_name"] == "VPPrecond"
    # VP: net sigma_min = sigma(1e-5) ~ 1e-3 < 0.002, net sigma_max = sigma(1) ~ 152 > 80
    assert den.pickle_meta["net_sigma_min"] == pytest.approx(1.0005e-3, rel=1e-3)
    assert den.pickle_meta["net_sigma_max"] == pytest.approx(152.167, rel=1e-4)
    assert (den.sigma_min, den.sigma_max) == (0.002, 80.0)
    assert den.net.precond.model.map_label is None

    x, sigma, _ = _inputs()
    with torch.no_grad():
        expected = original(x, sigma)
        assert torch.equal(den.net(x, sigma), expected)
    assert torch.equal(den(x, sigma), expected)


def test_numpy_global_names(pickles):
    np1 = pickles["edm-cond", False][0].read_bytes()
    np2 = pickles["edm-cond", True][0].read_bytes()
    assert b"numpy.core.multiarray" in np1 and b"numpy._core.multiarray" not in np1
    assert b"numpy._core.multiarray" in np2 and b"numpy.core.multiarray" not in np2


def test_misc_shim_fails_only_when_used(pickles):
    data, info = read_edm_pickle(pickles["edm-cond", False][0])
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    assert info["class_names"][-1] == "EDMLoss"
    loss = data["loss_fn"]
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-1.2, 1.2, 0.5)
    # EDM's misc.constant / const_like are provided (EDM2's network source uses const_like)
    value = loss.checked_constant([1.0, 2.0])
    assert value.dtype == torch.get_default_dtype() and value.tolist() == [1.0, 2.0]
    # anything else the shim lacks fails when called, naming what it does provide (no guessed cause)
    with pytest.raises(EDMShimError, match=r"torch_utils\.misc\.assert_shape is not available.*provides only: "
                                           r"constant, const_like"):
        loss.checked_shape(torch.zeros(1, 3, 2, 2))


def test_sys_modules_unchanged(pickles):
    path = pickles["edm-cond", False][0]
    load_edm_pickle(path)  # warm any lazy imports of torch/numpy
    before = dict(sys.modules)
    load_edm_pickle(path)
    after = dict(sys.modules)
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert not any(name in sys.modules for name in SHIM_NAMES)


def test_loaded_twice_gives_independent_classes(pickles):
    a = load_edm_pickle(pickles["edm-cond", False][0]).net.precond
    b = load_edm_pickle(pickles["edm-cond", False][0]).net.precond
    assert type(a) is not type(b)
    # within one load the module source is compiled once: blocks share their class
    assert type(a.model.blocks["block0"]) is type(a.model.blocks["block1"])


def test_concurrent_loads(pickles):
    results, errors = [], []

    def work(key):
        try:
            results.append(load_edm_pickle(pickles[key][0]).identity["class_name"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(key,)) for key in pickles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == ["EDMPrecond"] * 2 + ["VPPrecond"] * 2


# ------------------------------------------------------------------------------ a real torch_utils around


@pytest.fixture
def user_torch_utils(tmp_path, monkeypatch):
    """A user's EDM-like `torch_utils` package importable on sys.path; it raises if iia ever uses it."""
    pkg = tmp_path / "user_site" / "torch_utils"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("MARKER = 'user torch_utils'\n")
    (pkg / "persistence.py").write_text(
        "def persistent_class(cls):\n    raise RuntimeError('user torch_utils.persistence used')\n"
        "def _reconstruct_persistent_obj(meta):\n    raise RuntimeError('user torch_utils.persistence used')\n"
    )
    (pkg / "misc.py").write_text("raise RuntimeError('user torch_utils.misc imported')\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    importlib.invalidate_caches()
    saved = {name: sys.modules.pop(name) for name in SHIM_NAMES if name in sys.modules}
    yield pkg
    for name in SHIM_NAMES:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


def test_user_torch_utils_importable_not_imported(pickles, user_torch_utils):
    path, original = pickles["edm-cond", False]
    assert importlib.util.find_spec("torch_utils") is not None
    den = load_edm_pickle(path)
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules
    x, sigma, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(den.net(x, sigma, labels), original(x, sigma, torch.nn.functional.one_hot(labels, 10).float()))
    import torch_utils  # the user's package is what a later import finds

    assert torch_utils.MARKER == "user torch_utils"
    assert str(user_torch_utils) in torch_utils.__file__


def test_user_torch_utils_already_imported(pickles, user_torch_utils):
    import torch_utils
    import torch_utils.persistence

    user_pkg, user_persistence = torch_utils, torch_utils.persistence
    pkg_dict, persistence_dict = dict(vars(user_pkg)), dict(vars(user_persistence))
    before = dict(sys.modules)
    den = load_edm_pickle(pickles["vp-uncond", True][0])
    assert den.identity["class_name"] == "VPPrecond"
    after = dict(sys.modules)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert sys.modules["torch_utils"] is user_pkg and sys.modules["torch_utils.persistence"] is user_persistence
    assert dict(vars(user_pkg)) == pkg_dict and dict(vars(user_persistence)) == persistence_dict
    assert "torch_utils.misc" not in sys.modules


# ------------------------------------------------------------------------------------------- bad inputs


def _pickle_file(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(EDMPickleError, match="not found"):
        load_edm_pickle(tmp_path / "nope.pkl")
    with pytest.raises(EDMPickleError, match="is a directory, not an EDM network pickle"):
        load_edm_pickle(tmp_path)  # a directory
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(EDMPickleError, match="empty file"):
        load_edm_pickle(tmp_path / "empty.pkl")


def test_torch_save_checkpoints(tmp_path):
    state = torch.nn.Linear(3, 2).state_dict()
    torch.save(state, tmp_path / "zip.pt")
    with pytest.raises(EDMPickleError, match="this is a torch.save/zip checkpoint, not an EDM network pickle"):
        load_edm_pickle(tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(EDMPickleError, match="legacy .*torch.save checkpoint"):
        load_edm_pickle(tmp_path / "legacy.pt")


def test_plain_state_dict(tmp_path):
    path = _pickle_file(tmp_path / "sd.pkl", torch.nn.Linear(3, 2).state_dict())
    with pytest.raises(EDMPickleError, match="plain state dict"):
        load_edm_pickle(path)


def test_no_ema_names_keys(tmp_path):
    path = _pickle_file(tmp_path / "gan.pkl", {"G_ema": 1, "D": 2, "training_set_kwargs": {}})
    with pytest.raises(EDMPickleError, match=r"no 'ema' network.*keys found: \['D', 'G_ema', 'training_set_kwargs'\]"):
        load_edm_pickle(path)


def test_non_dict_top_level(tmp_path):
    path = _pickle_file(tmp_path / "list.pkl", [1, 2, 3])
    with pytest.raises(EDMPickleError, match="top level of the pickle is a list"):
        load_edm_pickle(path)


def test_ema_not_a_network(tmp_path):
    path = _pickle_file(tmp_path / "e.pkl", {"ema": 3, "loss_fn": None})
    with pytest.raises(EDMPickleError, match="'ema' is a int, not a torch network"):
        load_edm_pickle(path)


def test_not_a_pickle(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"hello, this is not a pickle at all\n" * 3)
    with pytest.raises(EDMPickleError, match="not a readable EDM network pickle"):
        load_edm_pickle(tmp_path / "junk.pkl")


def test_refused_globals(tmp_path):
    path = _pickle_file(tmp_path / "frac.pkl", {"ema": Fraction(1, 3)})
    with pytest.raises(EDMPickleError, match="refusing to unpickle global 'fractions.Fraction'"):
        load_edm_pickle(path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(EDMPickleError, match="refusing to unpickle global 'os.system'") as refused:
        load_edm_pickle(evil)
    assert str(refused.value).startswith(f"{evil}: refusing")  # which file (a guide's, the model's) is named
    assert not marker.exists()
    assert not any(name in sys.modules for name in SHIM_NAMES)


def _stub_pickle(tmp_path, meta):
    return dump_edm_style(tmp_path / "stub.pkl", {"ema": PersistentStub(meta), "augment_pipe": None})


def test_bad_persistent_objects(tmp_path):
    meta = dict(type="class", version=6, module_src="from torch_utils import training_stats\n", class_name="Net", state={})
    with pytest.raises(EDMPickleError, match=r"embedded source of EDM class 'Net' failed: ImportError"):
        load_edm_pickle(_stub_pickle(tmp_path, meta))
    meta.update(module_src="import torch\nvalue = 1\n")
    with pytest.raises(EDMPickleError, match="does not define class 'Net'"):
        load_edm_pickle(_stub_pickle(tmp_path, meta))
    meta.update(type="function")
    with pytest.raises(EDMPickleError, match="unsupported EDM persistent object type 'function'"):
        load_edm_pickle(_stub_pickle(tmp_path, meta))
    assert not any(name in sys.modules for name in SHIM_NAMES)
    assert not any(name.startswith("_iia_edm_pickle_") for name in sys.modules)


def test_missing_shape_attributes(tmp_path):
    src = "import torch\nfrom torch_utils import persistence\n\n@persistence.persistent_class\nclass Net(torch.nn.Module):\n    pass\n"
    meta = dict(type="class", version=6, module_src=src, class_name="Net", state=dict(torch.nn.Module().__dict__))
    with pytest.raises(EDMPickleError, match="no usable 'img_channels'"):
        load_edm_pickle(_stub_pickle(tmp_path, meta))


# ------------------------------------------------------------------------------------------ speed, export


def test_load_speed_1_4_mb(tmp_path):
    path = tmp_path / "big.pkl"
    original = make_edm_pickle(path, kind="edm-cond", channels=88)
    assert 1.2e6 < path.stat().st_size < 1.7e6
    start = time.perf_counter()
    den = load_edm_pickle(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"loading a {path.stat().st_size / 1e6:.2f} MB pickle took {elapsed:.2f} s"
    assert den.param_bytes() >= sum(p.numel() * 4 for p in original.parameters())


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="onnxscript not installed")
def test_edm_net_exports_to_onnx(pickles, tmp_path):
    den = load_edm_pickle(pickles["edm-cond", False][0])
    x, sigma, labels = _inputs(batch=2)
    program = torch.onnx.export(den.net, (x, sigma, labels), dynamo=True, verbose=False)
    assert program is not None
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(program.model_proto.SerializeToString())
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), (x, sigma, labels))}
        out = session.run(None, feeds)[0]
        np.testing.assert_allclose(out, den.net(x, sigma, labels).numpy(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ protocols, round_sigma

@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_other_pickle_protocols(tmp_path, protocol):
    from edm_fixtures import build_fixture_objects

    net, loss = build_fixture_objects("vp-uncond")
    data = {"ema": net, "loss_fn": loss, "augment_pipe": None, "dataset_kwargs": {}}
    den = load_edm_pickle(dump_edm_style(tmp_path / "p.pkl", data, protocol=protocol))
    x, sigma, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(den.net(x, sigma), net(x, sigma))


TABLE_PRECOND_SRC = '''
import torch
from torch_utils import persistence


@persistence.persistent_class
class iDDPMPrecond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = 4, 1, 0, True
        self.register_buffer("u", torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]))
        self.sigma_min, self.sigma_max = float(self.u[0]), float(self.u[-1])

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        return x / (1 + sigma.to(torch.float32).reshape(-1, 1, 1, 1) ** 2)

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        index = (sigma.reshape(-1, 1).to(torch.float32) - self.u.reshape(1, -1)).abs().argmin(1)
        return (index if return_index else self.u[index].to(sigma.dtype)).reshape(sigma.shape)
'''


def test_table_round_sigma_and_clamped_range(tmp_path):
    from edm_fixtures import exec_fixture_source, fake_edm_modules

    with fake_edm_modules():
        net = exec_fixture_source(TABLE_PRECOND_SRC, "table_precond").iDDPMPrecond()
    den = load_edm_pickle(dump_edm_style(tmp_path / "t.pkl", {"ema": net, "augment_pipe": None}))
    assert den.shape == (1, 4, 4) and den.identity["class_name"] == "iDDPMPrecond"
    assert (den.sigma_min, den.sigma_max) == (pytest.approx(0.01), 80.0)
    rounded = den.round_sigma(torch.tensor([0.3, 7.0, 1000.0]))
    assert rounded.dtype == torch.float64
    assert torch.allclose(rounded, torch.tensor([0.1, 10.0, 100.0], dtype=torch.float64))
    assert den.net.precond.use_fp16 is False
    # a table model: the search learns no schedule for it (a free grid off its table scored 1.3-4.5x worse)
    from iia.calibration.search import discrete

    assert discrete(den)
