"""`cbir` as a person meets it: help for every command, clear one-line errors, export, bench."""

from __future__ import annotations

import pytest

from cbir_engine.cli import main
from cbir_engine.store.model_info import read_model_info
from tests.product.helpers import run_cli

COMMANDS = ("export", "index", "search", "eval", "train", "bench", "serve")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cbir {command}")


def test_top_level_help_lists_the_commands():
    proc = run_cli("--help")
    for c in COMMANDS:
        assert f"    {c} " in proc.stdout
    proc = run_cli(check=False)
    assert proc.returncode == 2 and "usage: cbir" in proc.stdout


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["search", str(tmp_path / "q.png"), "--index", str(tmp_path / "nothing.index")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"cbir: error: {tmp_path / 'nothing.index'}: no such index"
    assert main(["index", str(tmp_path / "nofolder"), "--model", "m.onnx", "-o", str(tmp_path / "x")]) == 1
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    assert main(["index", str(tmp_path / "imgs"), "-o", str(tmp_path / "x")]) == 1
    assert "a new index needs --model" in capsys.readouterr().err
    (tmp_path / "fake.onnx").write_bytes(b"not onnx at all")
    assert main(["index", str(tmp_path / "imgs"), "--model", str(tmp_path / "fake.onnx"), "-o",
                 str(tmp_path / "y")]) == 1
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert main(["export", "no_such_net", "-o", str(tmp_path / "z.onnx")]) == 1
    assert "unknown model 'no_such_net'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["search", "q.png", "--index", "i", "-k", "0"])
    assert e.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("head,output,dim", [("hash48", "binary", 48), ("netvlad", "float", 16 * 128)])
def test_export_writes_a_model_the_index_understands(tmp_path, head, output, dim):
    pytest.importorskip("torch")
    out = tmp_path / f"{head}.onnx"
    proc = run_cli("export", "small_cnn", "--head", head, "-o", str(out))
    assert f"wrote {out}" in proc.stdout
    info = read_model_info(out)
    assert info.output == output and (info.channels, info.height, info.width) == (1, 28, 28)
    import numpy as np

    import cbir_engine

    y = np.asarray(cbir_engine.load(str(out))(np.zeros((2, 1, 28, 28), np.float32)))
    assert y.shape == (2, dim)


def test_bench_model_and_index(tmp_path, image_folder_200, hash_model):
    index = tmp_path / "b.index"
    run_cli("index", str(image_folder_200), "--model", str(hash_model), "-o", str(index), "--no-progress")
    proc = run_cli("bench", "--model", str(hash_model), "--index", str(index), "--batch-sizes", "1", "8",
                   "--repeat", "3", "--threads", "1")
    assert "batch    1:" in proc.stdout and "batch    8:" in proc.stdout and "images/s" in proc.stdout
    assert "200 images; 100 queries, k=10" in proc.stdout
    proc = run_cli("bench", check=False)
    assert proc.returncode == 1 and "give --model" in proc.stderr


def test_train_is_forwarded(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    assert "--method" in capsys.readouterr().out
