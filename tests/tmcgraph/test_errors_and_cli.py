"""Every declaration/compile/evaluation error names what is wrong; the CLI runs."""

import json
import math

import pytest
import torch

import tmcgraph
from tmcgraph.cli import main


def _graph():
    g = tmcgraph.FactorGraph().plate("N", 3).index("theta", 4).index("z", 2, plates=["N"])
    return g.factor("prior", ["theta"]).factor("lik", ["theta", "z"], plates=["N"])


def _factors():
    return {"prior": torch.zeros(4), "lik": torch.zeros(3, 4, 2)}


@pytest.mark.parametrize(
    "declare,match",
    [
        (lambda g: g.plate("N", 2), "plate 'N': the name is already declared as plate"),
        (lambda g: g.index("N", 2), "index 'N': the name is already declared as plate"),
        (lambda g: g.index("z", 2), "index 'z': the name is already declared as index"),
        (lambda g: g.index("w", 0), "index 'w': size must be a positive int"),
        (lambda g: g.plate("M", 2.5), "plate 'M': size must be a positive int"),
        (lambda g: g.index("w", 2, plates=["M"]), "index 'w': plate 'M' is not declared"),
        (lambda g: g.factor("prior", ["theta"]), "factor 'prior' is already declared"),
        (lambda g: g.factor("f", ["nope"]), "factor 'f': index 'nope' is not declared"),
        (lambda g: g.factor("f", "theta"), "factor 'f': indices must be a list"),
        (lambda g: g.factor("f", ["theta", "theta"]), "an index appears twice"),
        (lambda g: g.factor("f", ["z"]), r"factor 'f': index 'z' lives in plates \['N'\]"),
        (lambda g: g.factor("f", ["theta"], plates=["N", "N"]), "a plate appears twice"),
        (lambda g: g.factor("", ["theta"]), "factor name must be a non-empty string"),
    ],
)
def test_declaration_errors(declare, match):
    with pytest.raises(tmcgraph.TMCError, match=match):
        declare(_graph())


def test_non_nested_plates_are_refused_naming_the_factor():
    g = tmcgraph.FactorGraph().plate("A", 2).plate("B", 3)
    g.index("u", 2, plates=["A"]).index("v", 2, plates=["B"])
    g.factor("fu", ["u"], plates=["A"]).factor("fv", ["v"], plates=["B"])
    g.factor("x", ["u", "v"], plates=["A", "B"])  # matrix factorisation: needs unrolling
    with pytest.raises(tmcgraph.TMCError, match=r"factor 'x' .* couples indices 'u' .*, 'v' .*unrolling"):
        g.compile()


def test_compile_errors():
    with pytest.raises(tmcgraph.TMCError, match="no factors"):
        tmcgraph.FactorGraph().index("a", 2).compile()
    with pytest.raises(tmcgraph.TMCError, match=r"unknown optimize='best'; expected one of"):
        _graph().compile(optimize="best")
    with pytest.raises(tmcgraph.TMCError, match="memory_limit"):
        _graph().compile(memory_limit=-5)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda f: f.pop("lik"), r"no tensor given for factor\(s\) \['lik'\]"),
        (lambda f: f.update(extra=torch.zeros(1)), r"undeclared factor\(s\) \['extra'\]"),
        (lambda f: f.update(lik=torch.zeros(3, 5, 2)), r"factor 'lik': dim 1 \(index 'theta'\) has size 5, expected 4"),
        (lambda f: f.update(lik=torch.zeros(2, 4, 2)), r"factor 'lik': dim 0 \(plate 'N'\) has size 2, expected 3"),
        (lambda f: f.update(lik=torch.zeros(4, 2)), r"factor 'lik': expected shape \(\*batch, plate 'N'=3"),
        (lambda f: f.update(prior=torch.zeros(2, 4), lik=torch.zeros(5, 3, 4, 2)), "batch shapes"),
        (lambda f: f.update(prior=torch.tensor([0.0, math.nan, 0.0, 0.0])), "factor 'prior' contains NaN"),
        (lambda f: f.update(prior=torch.tensor([0.0, math.inf, 0.0, 0.0])), r"factor 'prior' contains \+inf"),
        (lambda f: f.update(prior=torch.zeros(4, dtype=torch.int32)), "floating-point"),
        (lambda f: f.update(prior=[0.0] * 4), "expected a torch.Tensor"),
    ],
)
def test_evaluation_errors(edit, match):
    factors = _factors()
    edit(factors)
    with pytest.raises(tmcgraph.TMCError, match=match):
        _graph().compile().log_sum(factors)


def test_mixed_dtypes_are_promoted():
    f = _factors()
    f["prior"] = f["prior"].double()
    out = _graph().compile().log_sum(f)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor(math.log(4) + 3 * math.log(2), dtype=torch.float64))


def test_cli_demo_runs(capsys):
    assert main(["demo", "--num-data", "20", "--K", "8"]) == 0
    out = capsys.readouterr().out
    assert "brute force log_sum" in out and "tree-width" in out


def test_appendix_a_example_runs(capsys):
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "appendix_a.py"), run_name="__main__")
    assert "Fig. 6" in capsys.readouterr().out


def test_dregs_gradients_example_runs(capsys):
    import runpy
    import sys
    from pathlib import Path

    argv = sys.argv
    sys.argv = ["dregs_gradients.py", "--draws", "200"]
    try:
        example = Path(__file__).resolve().parents[2] / "examples" / "dregs_gradients.py"
        runpy.run_path(str(example), run_name="__main__")
    except SystemExit as stop:
        assert stop.code == 0
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "dregs (ours)" in out and "plated" in out


def test_readme_quick_start_runs():
    """The README's Python blocks are what a new user pastes first: they must run as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["log_p"]) and torch.isfinite(namespace["surrogate"])


@pytest.mark.parametrize("argv, message", [
    (["treewidth", "--K", "0"], "argument --K: expected a positive integer, got '0'"),
    (["gaussian", "--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
    (["gaussian", "--Ks", "2,x"], "expected a comma-separated list of positive integers"),
    (["treewidth", "--plot", "out.png"], "--plot draws the tree-width sweep: add --sweep"),
    (["treewidth", "--ps", "0.1"], "--ps gives the values of p for --sweep"),
    (["dregs", "--at", "2"], "expected a probability in [0, 1]"),
    (["dregs", "--draws", "1"], "argument --draws: expected an integer of at least 2, got '1'"),
    (["dregs", "--eval-draws", "1"], "argument --eval-draws: expected an integer of at least 2, got '1'"),
    (["gaussian", "--plot", "/nonexistent-folder/x.png"], "cannot write '/nonexistent-folder/x.png': "
     "'/nonexistent-folder' does not exist"),
    (["gaussian", "--plot", "/dev/null/x.png"], "'/dev/null' is not a folder"),
    (["dregs", "--plot", "/"], "'/' is a folder; expected a file path"),
])
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: tmcgraph" in err and message in err and "Traceback" not in err


def test_version_and_demo_json(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("tmcgraph ")
    assert main(["demo", "--json", "--num-data", "20", "--K", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and abs(out["small"]["log_sum"] - out["small"]["brute_force"]) < 1e-9
    assert set(out["model"]["estimates"]) == {"tmc", "iwae", "smc"}


@pytest.mark.parametrize("flag", ["--plots", "--out"])
def test_apg_output_folders_are_checked_before_any_work(flag, tmp_path, capsys, monkeypatch):
    from apg import cli as apg_cli

    monkeypatch.setattr(apg_cli, "_evaluate", lambda args: pytest.fail("evaluated despite a bad path"))
    afile = tmp_path / "a-file"
    afile.write_text("")
    command = ["evaluate", "gmm"] if flag == "--plots" else ["train", "gmm"]
    for path, message in ((afile, "exists and is not a folder"), ("/dev/null/x", "'/dev/null' is not a folder"),
                          (afile / "sub", "is not a folder")):
        with pytest.raises(SystemExit) as stop:
            apg_cli.main(command + [flag, str(path)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"argument {flag}" in err and message in err and "Traceback" not in err


def test_help_does_not_import_torch():
    """``tmcgraph --help`` (and ``--version``, and a usage error) answer without importing torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom tmcgraph.cli import main\nfor argv in (['--help'], ['treewidth', '--help'], "
            "['--version'], ['gaussian', '--K', '0']):\n    try:\n        main(argv)\n    except SystemExit:\n"
            "        pass\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_public_names_load_on_first_use():
    import tmcgraph

    assert set(tmcgraph.__all__) <= set(dir(tmcgraph))
    assert tmcgraph.Model is tmcgraph.model.Model and tmcgraph.testing.brute_force_log_sum
    with pytest.raises(AttributeError, match="module 'tmcgraph' has no attribute 'nothing'"):
        tmcgraph.nothing  # noqa: B018
