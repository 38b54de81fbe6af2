"""Fine-tuning a Hugging Face model: ``fusedmoe train --init DIR`` on the directory's
tokenizer or on ``--data`` ids, fused and unfused alike, resumed exactly, and
``--export-hf`` back to a model transformers loads with the tuned weights.

The model is a tiny random Qwen2-MoE (shared expert, q/k/v biases) that
transformers builds here, with a small byte-level BPE tokenizer trained on the
shipped text by the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from fusedmoe.checkpoint.run_checkpoint import finalized_run_steps, read_run_meta
from fusedmoe.cli import main
from fusedmoe.train import TrainConfig, read_metrics, restore_run, train
from fusedmoe.train.pretrained import model_with

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hf_whole_models import logits  # noqa: E402
from model_helpers import forward, rel  # noqa: E402

VOCAB = 320
TOKENIZER_VOCAB = 300
MAX_LEN = 64
STEPS = 8
# the schedule: the tiny preset's, shortened; a rate high enough to learn in 8 steps
TRAIN = ["--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
         "--learning-rate", "1e-2", "--quiet"]
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))


def _build_model(path) -> None:
    config = transformers.AutoConfig.for_model(
        "qwen2_moe", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=4, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)


def _build_tokenizer(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fusedmoe.corpus import corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([corpus().tobytes().decode()], trainer=trainer)
    tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A Hugging Face model directory with a tokenizer.json."""
    path = tmp_path_factory.mktemp("qwen2_moe")
    _build_model(path)
    _build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def no_tokenizer(source, tmp_path_factory):
    """The same model without its tokenizer."""
    path = tmp_path_factory.mktemp("bare") / "model"
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def fused_run(source, tmp_path_factory):
    """``fusedmoe train --init`` (fused) with --export-hf: (run dir, export dir)."""
    root = tmp_path_factory.mktemp("runs")
    out, export = root / "run", root / "export"
    assert main(["train", "--init", str(source), *TRAIN, "--out", str(out),
                 "--export-hf", str(export)]) == 0
    return out, export


def test_finetuning_lowers_the_loss_and_the_meta_records_the_start(source, fused_run):
    out, _ = fused_run
    losses = [r["loss"] for r in read_metrics(str(out))]
    assert len(losses) == STEPS
    assert abs(losses[0] - np.log(VOCAB)) < 0.5  # a random model: near uniform
    assert np.mean(losses[-2:]) < losses[0] - 0.3, losses  # after the 5 warm-up steps
    assert finalized_run_steps(str(out)) == [STEPS]
    config = TrainConfig.from_dict(read_run_meta(str(out))["config"])
    assert config.init == str(source.absolute())
    assert config.tokenizer == str(source.absolute() / "tokenizer.json") and not config.data
    assert len(config.data_sha256) == 64
    assert config.model.model_type == "qwen2_moe" and config.model.vocab_size == VOCAB
    assert config.fused and config.model.moe.dtype == "float32"


def test_unfused_trains_as_fused(source, fused_run):
    out, _ = fused_run
    config = TrainConfig.from_dict(read_run_meta(str(out))["config"])
    unfused = train(config.with_layout(fused=False))
    fused = [r["loss"] for r in read_metrics(str(out))]
    np.testing.assert_allclose(unfused.losses, fused, rtol=1e-4)
    assert "wi_0" in unfused.state["params"]["blocks"][0]["ffn"]


def test_export_loads_in_transformers_with_the_tuned_weights(source, fused_run):
    out, export = fused_run
    assert (export / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    state, config, _ = restore_run(str(out), params_only=True)
    ours = forward(model_with(state["params"], config.model), TOKENS.astype(np.int32))
    tuned, info = transformers.AutoModelForCausalLM.from_pretrained(
        export, output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert rel(logits(tuned.eval(), TOKENS), ours) < 1e-4
    start = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager").eval()
    assert rel(logits(start, TOKENS), ours) > 1e-2  # the weights did change


def test_resume_and_a_layout_change_continue_the_run(source, fused_run, tmp_path):
    ref = [r["loss"] for r in read_metrics(str(fused_run[0]))]
    out, model = tmp_path / "run", tmp_path / "model"
    shutil.copytree(source, model)
    assert main(["train", "--init", str(model), *TRAIN, "--out", str(out),
                 "--stop-after", "4"]) == 0
    # Resuming needs the options no more, and the starting model's weights no more:
    # the checkpoint holds the tuned ones (only the tokenizer is read again).
    (model / "model.safetensors").unlink()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert [r["loss"] for r in read_metrics(str(out))] == ref  # bitwise
    # The unfused copy of step 4 continues the run in the other layout.
    unfused = tmp_path / "unfused"
    from fusedmoe.train import convert_run

    assert convert_run(str(out), str(unfused), fused=False, step=4) == 4
    assert main(["train", "--out", str(unfused), "--resume", "--unfused", "--quiet"]) == 0
    np.testing.assert_allclose([r["loss"] for r in read_metrics(str(unfused))], ref, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".npy", ".txt"])
def test_data_file_of_token_ids(no_tokenizer, tmp_path, suffix, capsys):
    ids = np.random.default_rng(1).integers(0, VOCAB, 500)
    ids[::2] = 7  # something to learn
    data = tmp_path / f"ids{suffix}"
    if suffix == ".npy":
        np.save(data, ids.reshape(50, 10))  # any shape: read in order
    else:
        data.write_text("\n".join(", ".join(map(str, row)) for row in ids.reshape(50, 10)))
    out = tmp_path / "run"
    assert main(["train", "--init", str(no_tokenizer), *TRAIN, "--steps", "2",
                 "--out", str(out), "--data", str(data)]) == 0
    config = TrainConfig.from_dict(read_run_meta(str(out))["config"])
    assert config.data == str(data) and not config.tokenizer
    # a resumed run refuses data that changed under it
    np.save(tmp_path / "other.npy", ids[::-1])
    os.replace(tmp_path / "other.npy", data) if suffix == ".npy" else data.write_text("1 2 " * 40)
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "the file or the tokenizer changed" in capsys.readouterr().err


def _bad_inputs(tmp_path, source, no_tokenizer):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "words.txt").write_text("1 2 3\n4 hello 5\n")
    (tmp_path / "big.txt").write_text(" ".join(["1"] * 50 + [str(VOCAB + 5)]))
    (tmp_path / "short.txt").write_text("1 2 3")
    (tmp_path / "ids.csv").write_text("1,2,3")
    np.save(tmp_path / "floats.npy", np.zeros(100))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return [
        (["--init", str(tmp_path / "nothing")], "--init: ", "not a directory"),
        (["--init", str(tmp_path / "afile")], "--init: ", "not a directory"),
        (["--init", str(tmp_path)], "--init: ", "not a Hugging Face model directory"),
        (["--init", str(llama)], "--init: ", "unsupported model_type 'llama'"),
        (["--init", str(no_tokenizer)], "--init: ", "has no tokenizer.json; pass --data"),
        (["--init", str(source), "--data", str(tmp_path / "words.txt")], "--data: ",
         "line 2: 'hello' is not a token id"),
        (["--init", str(source), "--data", str(tmp_path / "floats.npy")], "--data: ",
         "holds float64 values; expected integer token ids"),
        (["--init", str(source), "--data", str(tmp_path / "big.txt")], "--data: ",
         f"token id {VOCAB + 5} (first past the vocabulary at position 50) is past the "
         f"model's vocabulary of {VOCAB} tokens"),
        (["--init", str(source), "--data", str(tmp_path / "short.txt")], "--data: ",
         "3 tokens; a training window of seq_len=32 needs at least 34"),
        (["--init", str(source), "--data", str(tmp_path / "ids.csv")], "--data: ",
         "unknown suffix '.csv'"),
        (["--init", str(source), "--data", str(tmp_path / "none.txt")], "--data: ",
         "no such file"),
        (["--init", str(source), "--export-hf", str(tmp_path / "afile")], "--export-hf: ",
         "is a file; expected a new directory"),
        (["--init", str(source), "--export-hf", str(tmp_path / "afile" / "x")],
         "--export-hf: ", "is a file, not a directory"),
        (["--init", str(source), "--export-hf", str(tmp_path)], "--export-hf: ",
         "already exists"),
        (["--export-hf", str(tmp_path / "x")], "--export-hf: ", "fusedmoe's own toy model"),
        (["--init", str(source), "--seq-len", "100"], "--seq-len: ",
         f"sequences of 100 tokens exceed the model's max_seq_len {MAX_LEN}"),
        (["--init", str(source), "--compare"], "--compare: ", "takes no --init"),
    ]


def test_bad_input_is_refused_before_anything_runs(source, no_tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    for extra, option, message in _bad_inputs(tmp_path, source, no_tokenizer):
        argv = ["train", *TRAIN, "--out", str(out), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"fusedmoe train: error: {option}") and message in err, err
        assert not out.exists()  # nothing ran


def test_resume_options_must_agree(source, fused_run, no_tokenizer, capsys):
    out, _ = fused_run
    argv = ["train", "--out", str(out), "--resume", "--quiet"]
    assert main([*argv, "--init", str(no_tokenizer)]) == 2
    err = capsys.readouterr().err
    assert f"--init: got {no_tokenizer}, expected {source}" in err
    assert main([*argv, "--learning-rate", "0.5"]) == 2
    assert "--learning-rate: got 0.5, expected 0.01" in capsys.readouterr().err
