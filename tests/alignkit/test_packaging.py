"""The built wheel maps the top-level folders under the one ``alignkit`` namespace."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_and_imports_every_area(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("alignkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("alignkit/stages/sft.py", "alignkit/rewards/gold.py", "alignkit/data/sft.py",
                   "alignkit/sweep/study.py"):  # fmt: skip
        assert module in names
    assert not any(n.split("/")[0] in {"stages", "rewards", "rollouts", "eval"} for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", target, wheel],
        check=True,
        capture_output=True,
    )
    code = "import alignkit.stages, alignkit.rewards.gold, alignkit.eval; print(alignkit.stages.__file__)"
    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path[:0] = [{str(target)!r}] + {sys.path!r}; {code}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def test_editable_install_imports_every_area():
    code = "import alignkit.stages, alignkit.rollouts, alignkit.eval, alignkit.rewards; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "ok", out.stderr
