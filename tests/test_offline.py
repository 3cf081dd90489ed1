"""The appliance never phones home: OpenVINO / NNCF telemetry is off at every entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runtime.offline import OFFLINE_ENV, stay_offline


def test_stay_offline_blocks_telemetry_and_keeps_explicit_settings() -> None:
    env = {"HF_HUB_OFFLINE": "0"}
    modules: dict[str, object] = {}
    stay_offline(env, modules)
    assert modules["openvino_telemetry"] is None
    assert env["HF_HUB_OFFLINE"] == "0"  # an operator's explicit value wins
    assert all(env[k] == v for k, v in OFFLINE_ENV.items() if k != "HF_HUB_OFFLINE")


def test_the_cli_converts_a_model_without_telemetry(tmp_path: Path) -> None:
    """Through the real entry point, OpenVINO's converter and NNCF get their no-op stubs.

    HOME is a fresh folder: the telemetry client would write its client id under
    ~/intel, so an empty folder afterwards shows that nothing was even prepared.
    """
    code = (
        "import sys\n"
        "from appliance.cli import LazyGroup, main\n"
        "import click\n"
        "ctx = click.Context(main)\n"
        "try:\n"
        "    main.invoke(ctx)\n"  # the group's invoke runs stay_offline() first
        "except BaseException:\n"
        "    pass\n"
        "import numpy as np, onnx\n"
        "from onnx import TensorProto, helper\n"
        "x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 2])\n"
        "y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 2])\n"
        "g = helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g', [x], [y])\n"
        f"onnx.save(helper.make_model(g), {str(tmp_path / 'm.onnx')!r})\n"
        "import openvino as ov\n"
        f"ov.convert_model({str(tmp_path / 'm.onnx')!r})\n"
        "import openvino.tools.ovc.telemetry_utils as tu\n"
        "import nncf.telemetry.wrapper as nw\n"
        "print(tu.tm.__name__, type(nw.telemetry).__name__, sys.modules.get('openvino_telemetry'))\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "NNCF_DEV", "CI")}
    env["HOME"] = str(home)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    stub, nncf_telemetry, module = done.stdout.split()
    assert stub == "openvino.tools.ovc.telemetry_stub"
    assert nncf_telemetry == "MagicMock"  # nncf.telemetry.wrapper.NNCFTelemetryStub is MagicMock
    assert module == "None"
    assert not (home / "intel").exists()


def test_library_use_without_an_entry_point_does_not_start_telemetry(tmp_path: Path) -> None:
    """A script that skips the CLI (probe + OpenVINO session) still never creates ~/intel."""
    model = tmp_path / "m.onnx"
    code = (
        "import numpy as np, onnx\n"
        "from onnx import TensorProto, helper\n"
        "x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [-1, 2])\n"
        "y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [-1, 2])\n"
        "g = helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g', [x], [y])\n"
        f"onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]), {str(model)!r})\n"
        "from pathlib import Path\n"
        "from runtime.hardware import probe_hardware\n"
        "from runtime.backends.base import OpenOptions\n"
        "from runtime.backends.registry import get_backend\n"
        "assert probe_hardware().openvino is not None\n"
        f"s = get_backend('ov-cpu').open(Path({str(model)!r}), OpenOptions())\n"
        "out = s.run({'x': np.array([[-1.0, 2.0]], dtype=np.float32)})\n"
        "print(out['y'].tolist())\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[[0.0, 2.0]]"
    assert not (home / "intel").exists(), "OpenVINO's telemetry client started"
