"""The trainer's GPU-efficiency options, checked on CPU: chunked cross-entropy and a padded
vocabulary train exactly like the plain loss, save at the real vocabulary size, resume under
FSDP2, and every logged window carries achieved TFLOP/s (MFU only where the device has a peak)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from steps import checkpoint, train
from test_strategies import _curve, _launch, _lean, _max_diff  # noqa: F401
from test_train import _final_weights, _spec, token_uris  # noqa: F401  (a fixture)

LEAN_OPTIONS = {"chunked_ce": "on", "ce_chunk_tokens": 100, "pad_vocab_multiple": 1000}  # 2048 -> 3000 rows


def test_chunked_ce_and_padded_vocab_train_like_the_plain_loss(tmp_path, builtin_model_dir, token_uris):
    plain = _spec(_lean(tmp_path, chunked_ce="off"), builtin_model_dir, token_uris, tmp_path / "plain")
    lean = _spec(_lean(tmp_path, **LEAN_OPTIONS), builtin_model_dir, token_uris, tmp_path / "lean")
    train.main(str(plain))
    train.main(str(lean))
    plain_curve, lean_curve = _curve(tmp_path / "plain"), _curve(tmp_path / "lean")
    assert len(lean_curve) == 6
    for a, b in zip(plain_curve, lean_curve, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
        assert b["tflops_per_device"] > 0 and b["mfu"] is None  # no bf16 peak is known for a CPU
    assert plain_curve[-1]["loss"] < plain_curve[0]["loss"]
    # Saved at the real vocabulary size, with weights equal to the plain run's.
    weights = _final_weights(tmp_path / "lean")
    assert weights["model.embed_tokens.weight"].shape[0] == 2048
    assert _max_diff(_final_weights(tmp_path / "plain"), weights) <= 1e-5
    final = checkpoint.list_checkpoints(tmp_path / "lean")[-1]
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 2048
    model = AutoModelForCausalLM.from_pretrained(str(final), use_safetensors=True)
    assert model.get_output_embeddings().weight.shape[0] == 2048


@pytest.mark.slow
def test_fsdp2_with_chunked_ce_and_padded_vocab_resumes_to_the_plain_run(tmp_path, builtin_model_dir, token_uris):
    plain = _spec(_lean(tmp_path), builtin_model_dir, token_uris, tmp_path / "plain")
    train.main(str(plain))
    # FSDP2 on 2 ranks, the loss inside the sharded root module; fail after step 5 (checkpoint
    # at 3), relaunch: it resumes with the padded optimizer state and ends where 1 plain rank does.
    crashing = _spec(_lean(tmp_path, strategy="fsdp2", fail_at_step=5, **LEAN_OPTIONS), builtin_model_dir,
                     token_uris, tmp_path / "fsdp")
    with pytest.raises(RuntimeError, match=r"rank \d FAILED: InjectedFailure"):
        _launch(crashing, 2)
    _launch(crashing, 2, log_path=tmp_path / "fsdp-logs" / "train.log")
    for a, b in zip(_curve(tmp_path / "plain"), _curve(tmp_path / "fsdp"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    assert _max_diff(_final_weights(tmp_path / "plain"), _final_weights(tmp_path / "fsdp")) <= 1e-5
    log = (tmp_path / "fsdp-logs" / "train.log").read_text()
    assert "with chunked CE (100 tokens), vocab padded 2048 -> 3000" in log
    assert "TFLOP/s/device" in log


def test_compiled_decoder_layers_train_like_eager_ones(tmp_path, builtin_model_dir, token_uris):
    recipe = lambda **extra: _lean(tmp_path, max_steps=3, save_every_steps=3, **extra)  # noqa: E731
    eager = _spec(recipe(), builtin_model_dir, token_uris, tmp_path / "eager")
    compiled = _spec(recipe(compile=True), builtin_model_dir, token_uris, tmp_path / "compiled")
    train.main(str(eager))
    train.main(str(compiled))
    for a, b in zip(_curve(tmp_path / "eager"), _curve(tmp_path / "compiled"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4  # fused kernels may reorder float sums
    assert _max_diff(_final_weights(tmp_path / "eager"), _final_weights(tmp_path / "compiled")) <= 1e-4
