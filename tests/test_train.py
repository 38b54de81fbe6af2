"""Training end to end: fused == unfused, loss falls, exact kill-and-resume,
half-written checkpoints ignored, fused <-> unfused checkpoint conversion, CLI;
the plot without matplotlib or pyplot, and the modules' imports (light, no cycles)."""

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from fusedmoe.bench.train_bench import compare
from fusedmoe.checkpoint.run_checkpoint import (
    INCOMPLETE_DIR,
    convert_run_state,
    finalized_run_steps,
)
from fusedmoe.cli import main
from fusedmoe.corpus import batch_at
from fusedmoe.generate_cli import generate_text
from fusedmoe.train import (
    DEFAULT_PRESET,
    PRESETS,
    TrainConfig,
    convert_run,
    plot_losses,
    read_metrics,
    restore_run,
    train,
    trainer_for,
)
from fusedmoe.train.command import add_arguments
from fusedmoe.train.plot import NO_MATPLOTLIB

# every 10 steps a checkpoint, all five kept so other tests can start from them
TINY = TrainConfig.preset("tiny", keep_checkpoints=5)
assert TINY.steps == 50 and TINY.fused


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fused"))
    return out, train(TINY, out)


@pytest.fixture(scope="module")
def unfused_run():
    return train(TINY.with_layout(fused=False))


def test_fused_and_unfused_train_alike_and_learn(fused_run, unfused_run):
    _, fused = fused_run
    f, u = np.array(fused.losses), np.array(unfused_run.losses)
    assert len(f) == len(u) == 50
    np.testing.assert_allclose(f, u, rtol=1e-4)
    assert abs(f[0] - np.log(256)) < 0.5  # starts near uniform over bytes
    assert f[-5:].mean() < 0.8 * f[0], f


def test_run_directory(fused_run):
    out, result = fused_run
    assert finalized_run_steps(out) == [10, 20, 30, 40, 50]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 51))
    for r in rows:
        assert {"step", "loss", "tokens_per_s", "lr", "grad_norm", "expert_load"} <= set(r)
        assert r["tokens_per_s"] > 0
        assert np.sum(r["expert_load"]) == TINY.batch_size * TINY.seq_len * 2 * 2  # k=2, 2 layers
    assert [r["loss"] for r in rows] == result.losses
    with open(os.path.join(out, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert rows[0]["lr"] == 0.0 and max(r["lr"] for r in rows) == pytest.approx(1e-2)


def test_data_order_is_a_function_of_seed_and_step():
    a = batch_at(3, 7, 4, 16)
    b = batch_at(3, 7, 4, 16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted
    assert not np.array_equal(a[0], batch_at(3, 8, 4, 16)[0])
    assert not np.array_equal(a[0], batch_at(4, 7, 4, 16)[0])


def test_kill_and_resume_is_exact(fused_run, tmp_path):
    ref_out, ref = fused_run
    out = str(tmp_path / "run")
    first = train(TINY, out, stop_after=10)
    assert first.step == 10 and first.losses == ref.losses[:10]
    # The process "dies" while writing later checkpoints: orbax's temporary
    # directory, and a bare step directory without orbax's commit record.
    ckpts = os.path.join(out, "checkpoints")
    os.makedirs(os.path.join(ckpts, "20.orbax-checkpoint-tmp-1234", "params"))
    os.makedirs(os.path.join(ckpts, "15", "params"))
    with open(os.path.join(ckpts, "15", "params", "garbage"), "w") as f:
        f.write("half")
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # rows past the checkpoint
        f.write(json.dumps({"step": 11, "loss": 0.0, "tokens_per_s": 1.0}) + "\n")
        f.write('{"step": 12, "lo')  # torn line
    assert finalized_run_steps(out) == [10]

    second = train(TINY, out, resume=True, stop_after=20)
    assert second.start_step == 10 and second.step == 20
    assert second.losses == ref.losses[10:20]  # bitwise
    ref_state, _, step = restore_run(ref_out, 20)
    assert step == 20
    assert_trees_equal(jax.device_get(second.state), ref_state)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 21))
    assert finalized_run_steps(out) == [10, 20]
    assert sorted(n.split(".")[0] for n in os.listdir(os.path.join(out, INCOMPLETE_DIR))) == [
        "15", "20"]


def test_resume_with_another_config_is_refused(fused_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(fused_run[0], "checkpoints", "10"),
                    os.path.join(out, "checkpoints", "10"))
    with pytest.raises(ValueError, match="learning_rate: checkpoint 0.01, now 0.02"):
        train(TINY.replace(learning_rate=0.02), out, resume=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(TINY, out)


def test_convert_run_fused_to_unfused_and_back(fused_run, tmp_path):
    ref_out, ref = fused_run
    state, config, step = restore_run(ref_out, 10)
    assert step == 10 and config.fused
    # params and Adam's mu/nu all change layout; the round trip is exact
    unfused = convert_run_state(state, fused=False)
    adam = unfused["opt_state"][1]
    moe = unfused["params"]["blocks"][0]["ffn"]
    assert "wi" not in moe and moe["wi_0"].shape == (4, 32, 32)
    assert "wi_0" in adam.mu["blocks"][1]["ffn"] and "wi_1" in adam.nu["blocks"][1]["ffn"]
    np.testing.assert_array_equal(adam.mu["blocks"][1]["ffn"]["wi_1"],
                                  state["opt_state"][1].mu["blocks"][1]["ffn"]["wi"][:, :, 1])
    assert_trees_equal(convert_run_state(unfused, fused=True), state)

    # fused step-10 checkpoint -> unfused run directory, continued unfused
    unf_out = str(tmp_path / "unfused")
    assert convert_run(ref_out, unf_out, fused=False, step=10) == 10
    cont = train(TINY.with_layout(fused=False), unf_out, resume=True, stop_after=20)
    assert cont.start_step == 10
    np.testing.assert_allclose(cont.losses, ref.losses[10:20], rtol=1e-4)
    assert [r["step"] for r in read_metrics(unf_out)] == list(range(1, 21))

    # ... and back: resuming the unfused step-10 checkpoint as a fused run converts
    # it on the fly, and the fused run continues exactly as the original did.
    back_out = str(tmp_path / "back")
    shutil.copytree(os.path.join(unf_out, "checkpoints", "10"),
                    os.path.join(back_out, "checkpoints", "10"))
    back = train(TINY, back_out, resume=True, stop_after=20)
    assert back.start_step == 10 and back.losses == ref.losses[10:20]


def test_generate_api(fused_run):
    out, _ = fused_run
    greedy = generate_text(out, "The ", 8)
    assert len(greedy.encode("utf-8", errors="replace")) >= 1
    assert generate_text(out, "The ", 8) == greedy
    # top-1 sampling is greedy whatever the temperature
    assert generate_text(out, "The ", 8, temperature=1.5, top_k=1, seed=3) == greedy


def test_cli_train_and_generate(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["train", "--preset", "tiny", "--steps", "3", "--out", out, "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert finalized_run_steps(out) == [3]
    assert os.path.exists(os.path.join(out, "loss_curve.png"))
    capsys.readouterr()
    assert main(["generate", out, "--prompt", "def ", "--max-new-tokens", "4",
                 "--temperature", "0.7", "--top-k", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    # a second run into the same directory needs --resume; with it, nothing is left to do
    assert main(["train", "--preset", "tiny", "--steps", "3", "--out", out, "--quiet"]) == 2
    assert "--out:" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--quiet"]) == 0
    assert main(["train", "--out", out, "--resume", "--steps", "5", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith("expected 3 (the value of the run being "
                                                    "resumed)")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "huge"], "--preset: got 'huge', expected one of tiny, small"),
        (["train", "--steps", "0"], "--steps: got 0, expected an integer >= 1"),
        (["train", "--seed", "-1"], "--seed: got -1, expected an integer >= 0"),
        (["train", "--backend", "cuda"], "--backend: got 'cuda', expected one of auto, "),
        (["train", "--preset", "tiny", "--steps", "3", "--stop-after", "4"],
         "--stop-after: got 4, expected 1..3"),
        (["train", "--resume"], "--resume: got no --out"),
        (["generate", "/nonexistent/run"], "run_dir: got '/nonexistent/run', expected an "),
        (["generate", "{tmp}"], "holds no finalized checkpoint"),
    ],
)
def test_cli_errors(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"fusedmoe {argv[0]}: error: ") and message in err, err


def test_toy_model_on_a_file_of_token_ids(tmp_path, capsys):
    ids = np.tile(np.arange(0, 200, 3), 20)  # a pattern to learn, ids below the toy's 256
    np.save(tmp_path / "ids.npy", ids)
    out = str(tmp_path / "run")
    argv = ["train", "--preset", "tiny", "--steps", "3", "--out", out, "--quiet"]
    assert main([*argv, "--data", str(tmp_path / "ids.npy")]) == 0
    config = restore_run(out, params_only=True)[1]
    assert config.data == str(tmp_path / "ids.npy") and not config.byte_level
    assert config.data_sha256 == hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()
    np.save(tmp_path / "big.npy", np.array([5] * 40 + [256]))
    assert main([*argv[:-3], "--data", str(tmp_path / "big.npy")]) == 2
    assert "token id 256 (first past the vocabulary at position 40) is past the model's " \
        "vocabulary of 256 tokens" in capsys.readouterr().err
    with pytest.raises(ValueError, match="byte-level training needs >= 256"):
        TINY.replace(model=TINY.model.replace(vocab_size=100))
    assert TINY.replace(model=TINY.model.replace(vocab_size=100), data="ids.npy").data


def test_trainer_starts_from_given_params():
    trainer = trainer_for(TINY)
    fresh = trainer.init_state(0)
    assert_trees_equal(trainer.state_for(fresh["params"]), fresh)
    assert trainer_for(TINY.replace(seed=5, steps=7, learning_rate=0.5)) is trainer
    assert trainer_for(TINY.replace(weight_decay=0.2)) is not trainer


def test_compare_times_both_layouts_and_writes_its_files(tmp_path):
    result = compare(TINY, steps=4, out=str(tmp_path), verbose=False)
    assert result["tokens_per_s"]["fused"] > 0 and result["tokens_per_s"]["unfused"] > 0
    np.testing.assert_allclose(result["losses"]["fused"], result["losses"]["unfused"], rtol=1e-4)
    assert json.loads((tmp_path / "compare.json").read_text())["steps"] == 4
    assert (tmp_path / "compare_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_a_run_skips_the_plot_and_says_so_once(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                 "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        result = train(TINY.replace(steps=2), str(tmp_path / "run"))
        assert plot_losses({"a": ([1], [1.0])}, str(tmp_path / "again.png")) is None
    assert result.step == 2 and result.plot is None
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [1, 2]
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints", "metrics.jsonl"]
    assert not (tmp_path / "again.png").exists()
    assert [str(w.message) for w in caught] == [NO_MATPLOTLIB]


def test_plot_leaves_pyplot_alone(tmp_path):
    # pyplot (or matplotlib.use) would change a host program's state, e.g. a
    # notebook's backend; a fresh interpreter shows whether it was imported.
    png = tmp_path / "loss.png"
    code = ("import sys; from fusedmoe.train.plot import plot_losses; "
            f"assert plot_losses({{'a': ([1, 2], [3.0, 2.0])}}, {str(png)!r}) == {str(png)!r}; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_command_imports_no_jax_and_its_help_names_every_preset():
    # `fusedmoe --help` imports every subcommand module: they must stay light.
    code = ("import sys, fusedmoe.train.command, fusedmoe.checkpoint.convert_cli; "
            "heavy = sorted({'jax', 'flax', 'optax', 'orbax', 'matplotlib'} & set(sys.modules)); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    preset_help = next(a.help for a in parser._actions if a.dest == "preset")
    assert f"tiny, small (default {DEFAULT_PRESET};" in preset_help
    assert list(PRESETS) == ["tiny", "small"]


def test_training_modules_import_without_cycles():
    """No cycle among the training, run-checkpoint and benchmark modules, counting
    imports inside functions too (those under ``if TYPE_CHECKING:`` do not run)."""
    src = Path(__file__).parents[1] / "src"
    files = [*src.glob("fusedmoe/train/*.py"), src / "fusedmoe/checkpoint/run_checkpoint.py",
             src / "fusedmoe/checkpoint/module_checkpoint.py",
             src / "fusedmoe/bench/train_bench.py", src / "fusedmoe/generate.py"]
    names = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
             for p in files}

    def imported(path):
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:  # `from package import module` or `import name`
                    full = f"{node.module}.{alias.name}"
                    yield full if full in names else node.module
            elif isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)

    graph = {m: {i for i in imported(p) if i in names and i != m} for m, p in names.items()}
    assert graph["fusedmoe.train.loop"], "the parser found no imports"
    done: set[str] = set()

    def visit(module, path):
        for nxt in graph[module]:
            assert nxt not in path, f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(module)

    for module in graph:
        visit(module, [module])
