"""Training the demo model: a resumed run equals an uninterrupted one; the export loads."""

import pytest
import torch

from paro_cli.demo.train import CHECKPOINT, UNFINISHED, export, main, train
from paro_cli.models.loading import load_model


def test_resumed_training_equals_uninterrupted_and_exports(tmp_path):

    def quiet(*_):
        pass

    train(tmp_path / "a", steps=1, batch_size=1, lr=1e-3, seed=3, max_minutes=10, log=quiet)
    resumed = train(tmp_path / "a", steps=2, batch_size=1, lr=1e-3, seed=3, max_minutes=10, log=quiet)
    straight = train(tmp_path / "b", steps=2, batch_size=1, lr=1e-3, seed=3, max_minutes=10, log=quiet)
    assert resumed["step"] == straight["step"] == 2 and resumed["losses"] == straight["losses"]
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    export(tmp_path / "a", tmp_path / "out")
    assert {"config.json", "diffusion_pytorch_model.safetensors", "MODEL_CARD.md", "loss.png"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").stat().st_size < 16e6
    loaded = load_model(str(tmp_path / "out"))
    ema = a["ema"]
    w = dict(loaded.transformer.named_parameters())
    assert all(torch.allclose(w[n].float(), ema[n].float(), rtol=1e-3, atol=1e-4) for n in w)  # fp16 storage


def test_a_run_stopped_by_its_time_limit_asks_to_be_resumed(tmp_path, capsys):
    args = ["--work", str(tmp_path), "--steps", "2", "--batch", "1"]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--max-minutes", "0"])  # no step fits: an error, not "resume" (a resume loop would never end)
    assert stopped.value.code == "no training step fits in --max-minutes 0.0: raise it"
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--max-minutes", "0.001"])  # one step (~1 s on a CPU) outlasts 60 ms: stops after it
    assert stopped.value.code == UNFINISHED and "stopped at step 1 of 2" in capsys.readouterr().out
    main([*args, "--max-minutes", "10"])  # resumes and finishes: returns normally (exit 0)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["state"]["step"] == 2
