"""Knowledge distillation: the KL loss on exact tensors, the objective, the teacher, the flow."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from steps import distill
from steps.config import RecipeError, recipe_from_dict
from steps.losses import IGNORE_INDEX
from steps.objectives import objective_for
from steps.registry import Registry

# One packed row of two documents: [a b c | d e f]. Trained targets (positions of logits[:, :-1]):
# 0 -> b, 1 -> c, 3 -> e, 4 -> f; position 2 would predict d, the start of the next document
# (masked although d has a label), and position 5 predicts nothing.
INPUT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])
POSITION_IDS = torch.tensor([[0, 1, 2, 0, 1, 2]])
LABELS = torch.tensor([[IGNORE_INDEX, 6, 7, 8, 9, 10]])
TRAINED_POSITIONS = [0, 1, 3, 4]
UNTRAINED_POSITIONS = [2, 5]
VOCAB = 11


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are a parameter (so their gradient can be read)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=logits.shape[-1]))

    def forward(self, input_ids, position_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(1, 6, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _loss(student_logits, teacher_logits, *, temperature=2.0, alpha=0.0):
    student = FixedLogits(student_logits)
    module = distill.DistillLoss(student, FixedLogits(teacher_logits).requires_grad_(False),
                                 temperature=temperature, alpha=alpha, num_columns=VOCAB)
    out = module(input_ids=INPUT_IDS, position_ids=POSITION_IDS, labels=LABELS)
    return out, student


def test_kl_loss_equals_torch_kl_div_on_trained_tokens():
    student_logits, teacher_logits = _logits(0), _logits(1)
    out, _ = _loss(student_logits, teacher_logits, temperature=2.0)
    positions = torch.tensor(TRAINED_POSITIONS)
    reference = F.kl_div(F.log_softmax(student_logits[0, positions] / 2.0, dim=-1),
                         F.log_softmax(teacher_logits[0, positions] / 2.0, dim=-1),
                         log_target=True, reduction="sum") * 2.0**2
    assert abs(out["loss"].item() - reference.item()) <= 1e-6
    assert abs(out["kl"].item() - reference.item() / 4.0) <= 1e-6
    assert out["loss"].item() > 1.0  # the two random distributions really differ


def test_only_trained_tokens_contribute_and_get_gradients():
    student_logits, teacher_logits = _logits(0), _logits(1)
    out, student = _loss(student_logits, teacher_logits)
    out["loss"].backward()
    grad = student.logits.grad[0]
    assert all(grad[i].abs().sum() > 0 for i in TRAINED_POSITIONS)
    assert all(torch.equal(grad[i], torch.zeros(VOCAB)) for i in UNTRAINED_POSITIONS)

    changed_student, changed_teacher = student_logits.clone(), teacher_logits.clone()
    changed_student[0, UNTRAINED_POSITIONS] = 50.0 * torch.randn(len(UNTRAINED_POSITIONS), VOCAB)
    changed_teacher[0, UNTRAINED_POSITIONS] = -50.0
    changed, _ = _loss(changed_student, changed_teacher)
    assert changed["loss"].item() == out["loss"].item()
    assert changed["ce"].item() == out["ce"].item()


def test_alpha_mixes_in_the_sft_cross_entropy():
    student_logits, teacher_logits = _logits(2), _logits(3)
    pure, _ = _loss(student_logits, teacher_logits, temperature=1.5, alpha=0.0)
    mixed, _ = _loss(student_logits, teacher_logits, temperature=1.5, alpha=0.25)
    positions = torch.tensor(TRAINED_POSITIONS)
    ce = F.cross_entropy(student_logits[0, positions], LABELS[0, positions + 1], reduction="sum")
    assert abs(mixed["ce"].item() - ce.item()) <= 1e-6
    assert abs(mixed["loss"].item() - (0.25 * ce.item() + 0.75 * pure["loss"].item())) <= 1e-5
    same, _ = _loss(student_logits, student_logits)  # a student equal to its teacher: KL 0
    assert abs(same["loss"].item()) <= 1e-6


def test_top_k_with_the_whole_vocabulary_equals_the_full_kl():
    student_logits, teacher_logits = _logits(4), _logits(5)
    positions = torch.tensor(TRAINED_POSITIONS)
    top = F.log_softmax(teacher_logits[0, positions], dim=-1).topk(VOCAB, dim=-1)
    full = distill.kd_loss_sum(student_logits[0, positions], teacher_logits[0, positions], 2.0)
    top_k = distill.top_k_kd_loss_sum(student_logits[0, positions], top.indices, top.values, 2.0)
    assert abs(top_k.item() - full.item()) <= 1e-5
    top_3 = F.log_softmax(teacher_logits[0, positions], dim=-1).topk(3, dim=-1)
    assert distill.top_k_kd_loss_sum(student_logits[0, positions], top_3.indices, top_3.values, 2.0).item() > 0


# ---------------------------------------------------------------------------------------------
# The objective on the builtin models
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    from steps.builtin import ensure_builtin_model

    return ensure_builtin_model("tiny-llama-student", tmp_path_factory.mktemp("student-cache"))


def _rows() -> list[dict]:
    """Two packed rows of random tokens, three documents. Row 0's second document starts at 12
    with a label there, which is still no target (its first token is never predicted)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2000, (2, 24), generator=g).tolist()
    return [
        {"input_ids": ids[0][:20], "position_ids": list(range(12)) + list(range(8)),
         "labels": [IGNORE_INDEX] * 6 + ids[0][6:13] + [IGNORE_INDEX] * 2 + ids[0][15:20]},
        {"input_ids": ids[1], "position_ids": list(range(24)),
         "labels": [IGNORE_INDEX] * 10 + ids[1][10:]},
    ]


def test_distill_objective_keeps_the_teacher_out_of_the_trained_module(builtin_model_dir, student_dir):
    from steps.models import load_model

    recipe = recipe_from_dict({"distill": {"temperature": 2.0}})
    objective = objective_for("distill", recipe, {"teacher": str(builtin_model_dir)}, torch.device("cpu"))
    assert objective.columns == ("input_ids", "labels", "position_ids")
    batch = objective.collate(_rows(), 32, 0)
    assert objective.count(batch) == 6 + 5 + 14  # trained targets; not the start of row 0's 2nd document
    student = load_model(student_dir)
    module = objective.module(student, real_vocab=2048, chunk_tokens=None)
    assert sum(p.numel() for p in module.parameters()) == student.num_parameters() == 606848
    assert all(key.startswith("model.") for key in module.state_dict())
    assert not objective.teacher.training and not any(p.requires_grad for p in objective.teacher.parameters())
    out = module(**batch)
    assert set(out) == {"loss", "kl", "ce"} and out["loss"].item() > 0
    out["loss"].backward()
    assert all(p.grad is None for p in objective.teacher.parameters())


def test_precomputed_top_k_with_k_vocab_matches_on_the_fly(builtin_model_dir, student_dir):
    from steps.models import load_model

    on_the_fly = objective_for("distill", recipe_from_dict({"distill": {"temperature": 2.0}}),
                               {"teacher": str(builtin_model_dir)}, torch.device("cpu"))
    rows = _rows()
    stored = distill.teacher_top_k_rows(on_the_fly.teacher, rows, row_tokens=32, pad_id=0, k=2048,
                                        num_columns=2048)
    assert len(stored[0]["teacher_ids"]) == 11 * 2048 and len(stored[1]["teacher_logprobs"]) == 14 * 2048
    rows_top_k = [{**row, **extra} for row, extra in zip(rows, stored)]
    top_k = objective_for("distill", recipe_from_dict({"distill": {"temperature": 2.0, "teacher_logits": "top_k"}}),
                          {"teacher": str(builtin_model_dir)}, torch.device("cpu"))
    assert top_k.teacher is None and top_k.columns[-2:] == distill.TOP_K_COLUMNS
    student = load_model(student_dir)
    with torch.no_grad():
        full = on_the_fly.module(student, real_vocab=2048, chunk_tokens=None)(**on_the_fly.collate(rows, 32, 0))
        approx = top_k.module(student, real_vocab=2048, chunk_tokens=None)(**top_k.collate(rows_top_k, 32, 0))
    assert abs(full["loss"].item() - approx["loss"].item()) <= 1e-4 * full["loss"].item()
    assert full["ce"].item() == approx["ce"].item()


@pytest.mark.parametrize("mode", ["on_the_fly", "top_k"])
def test_chunked_loss_equals_the_full_one(builtin_model_dir, student_dir, mode):
    """With chunk_tokens (chunked_ce, the GPU default) only trained positions are projected, a few
    at a time; loss, metrics and gradients equal the full-logits computation."""
    from steps.models import load_model

    recipe = recipe_from_dict({"distill": {"temperature": 2.0, "alpha": 0.3, "teacher_logits": mode, "top_k": 7}})
    objective = objective_for("distill", recipe, {"teacher": str(builtin_model_dir)}, torch.device("cpu"))
    rows = _rows()
    if mode == "top_k":
        stored = distill.teacher_top_k_rows(load_model(builtin_model_dir), rows, row_tokens=32, pad_id=0, k=7,
                                            num_columns=2048)
        rows = [{**row, **extra} for row, extra in zip(rows, stored)]
    batch = objective.collate(rows, 32, 0)
    results = []
    for chunk_tokens in (None, 4):
        student = load_model(student_dir)
        out = objective.module(student, real_vocab=2048, chunk_tokens=chunk_tokens)(**batch)
        out["loss"].backward()
        results.append((out, student.model.layers[0].mlp.up_proj.weight.grad))
    (full, full_grad), (chunked, chunked_grad) = results
    for key in ("loss", "kl", "ce"):
        assert abs(full[key].item() - chunked[key].item()) <= 1e-5 * full[key].item(), key
    assert torch.allclose(full_grad, chunked_grad, rtol=1e-4, atol=1e-7)


def test_chunked_loss_of_a_batch_without_trained_tokens_backpropagates_zero(builtin_model_dir, student_dir):
    from steps.models import load_model

    objective = objective_for("distill", recipe_from_dict({}), {"teacher": str(builtin_model_dir)},
                              torch.device("cpu"))
    row = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3, "position_ids": [0, 1, 2]}
    student = load_model(student_dir)
    out = objective.module(student, real_vocab=2048, chunk_tokens=4)(**objective.collate([row], 8, 0))
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and not student.model.layers[0].mlp.up_proj.weight.grad.any()


def test_top_k_pass_writes_shards_the_trainer_reads(tmp_path, builtin_model_dir, student_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steps.train import PackedRows

    rows = _rows()
    shard = tmp_path / "tokens" / "train" / "part-00000.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), shard)
    token_stats = {"train": {"uris": [str(shard)], "num_rows": 2}}
    sections = {"tokenize": {"max_seq_tokens": 32}, "train": {"micro_batch_tokens": 64, "global_batch_tokens": 64}}
    assert distill.precompute_teacher_top_k(recipe_from_dict(sections), builtin_model_dir, student_dir,
                                            token_stats, str(tmp_path)) is token_stats  # on_the_fly: nothing to do
    recipe = recipe_from_dict({**sections, "distill": {"teacher_logits": "top_k", "top_k": 5}})
    stats = distill.precompute_teacher_top_k(recipe, builtin_model_dir, student_dir, token_stats, str(tmp_path))
    assert stats["teacher_top_k"] == {"k": 5, "num_rows": 2, "num_trained_tokens": 25, "source_uris": [str(shard)]}
    assert stats["train"]["uris"] == [str(tmp_path / "tokens" / "train-teacher-top-k" / "part-00000.parquet")]

    objective = objective_for("distill", recipe, {"teacher": str(builtin_model_dir)}, torch.device("cpu"))
    data = PackedRows(stats["train"]["uris"], seed=0, columns=objective.columns)
    assert [len(row["teacher_ids"]) for row in data.rows] == [11 * 5, 14 * 5]
    batch = objective.collate(data.rows, 32, 0)
    assert batch["teacher_ids"].shape == (2, 32, 5) and batch["teacher_logprobs"].dtype == torch.float32
    # log-probs of the k best tokens, best first, at trained target positions only
    assert bool((batch["teacher_logprobs"][1, 9:23].diff(dim=-1) <= 0).all())
    assert bool((batch["teacher_logprobs"][1, 9:23] < 0).all()) and not batch["teacher_logprobs"][1, :9].any()


# ---------------------------------------------------------------------------------------------
# Teacher and student
# ---------------------------------------------------------------------------------------------

def test_student_is_smaller_and_shares_the_tokenizer(builtin_model_dir, student_dir):
    from transformers import AutoConfig

    distill.check_same_tokenizer(builtin_model_dir, student_dir)  # no error
    teacher, student = AutoConfig.from_pretrained(builtin_model_dir), AutoConfig.from_pretrained(student_dir)
    assert (student.num_hidden_layers, student.hidden_size) == (2, 128)
    assert (teacher.num_hidden_layers, teacher.hidden_size) == (4, 192)
    assert (builtin_model_dir / "tokenizer.json").read_bytes() == (student_dir / "tokenizer.json").read_bytes()


def test_tokenizer_mismatch_fails_naming_what_differs(tmp_path, builtin_model_dir, student_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "other-student"
    shutil.copytree(student_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|extra|>"], special_tokens=True)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(other)
    with pytest.raises(distill.TokenizerMismatch) as error:
        distill.check_same_tokenizer(builtin_model_dir, other)
    message = str(error.value)
    assert "vocabulary (2048 vs 2049 tokens, 1 differ, e.g. '<|extra|>': teacher None vs student 2048)" in message
    assert "eos_token ('<|im_end|>' vs '<|endoftext|>')" in message
    assert "only the student's: ['<|extra|>']" in message


def test_resolve_teacher_takes_the_latest_registered_model(tmp_path, builtin_model_dir):
    registry_root = tmp_path / "registry"
    sections = {"storage": str(tmp_path / "storage"), "register": {"registry_root": str(registry_root)}}
    recipe = recipe_from_dict(sections)
    with pytest.raises(distill.NoTeacher, match=r"distill.teacher='registry:catalog-assistant': model "
                                               r"'catalog-assistant' has no complete version .* register an SFT"):
        distill.resolve_teacher(recipe, tmp_path / "teacher")

    registry = Registry(registry_root)
    for _ in range(2):
        registry.register("catalog-assistant", builtin_model_dir, {"run": "SFTFlow/1", "metrics": {"task_score": 0.5}})
    path, info = distill.resolve_teacher(recipe, tmp_path / "teacher")
    assert info["version"] == 2 and info["name"] == "catalog-assistant" and info["metrics"] == {"task_score": 0.5}
    assert (Path(path) / "model.safetensors").read_bytes() == (builtin_model_dir / "model.safetensors").read_bytes()

    pinned = recipe_from_dict({**sections, "distill": {"teacher": "registry:catalog-assistant@1"}})
    assert distill.resolve_teacher(pinned, tmp_path / "teacher-1")[1]["version"] == 1
    folder = recipe_from_dict({"distill": {"teacher": str(builtin_model_dir)}})
    assert distill.resolve_teacher(folder, tmp_path / "unused") == (
        str(builtin_model_dir), {"spec": str(builtin_model_dir), "path": str(builtin_model_dir)})


def test_distill_recipe_fields_are_validated():
    with pytest.raises(RecipeError, match="recipe field 'distill.temperature' must be > 0, got 0"):
        recipe_from_dict({"distill": {"temperature": 0}})
    with pytest.raises(RecipeError, match=r"recipe field 'distill.alpha' must be in \[0, 1\], got 1.5"):
        recipe_from_dict({"distill": {"alpha": 1.5}})
    with pytest.raises(RecipeError, match="recipe field 'distill.teacher_logits' must be one of"):
        recipe_from_dict({"distill": {"teacher_logits": "top-k"}})


# ---------------------------------------------------------------------------------------------
# The flow, end to end
# ---------------------------------------------------------------------------------------------

def _register_sharp_teacher(registry_root: Path, builtin_model_dir: Path, work: Path) -> None:
    """Register the builtin tiny Llama, its logits scaled 20x, as catalog-assistant v1.

    An untrained model's next-token distributions are nearly uniform, like the untrained
    student's, so there would be little to distil; scaling the final norm (the LM head is tied to
    the embedding) makes them sharp and context-dependent, at no training cost.
    """
    from transformers import AutoTokenizer

    from steps.models import load_model

    model = load_model(builtin_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    model.save_pretrained(work / "teacher")
    AutoTokenizer.from_pretrained(builtin_model_dir).save_pretrained(work / "teacher")
    Registry(registry_root).register("catalog-assistant", work / "teacher",
                                     {"run": "SFTFlow/0", "metrics": {"task_score": 0.0}})


@pytest.mark.slow
def test_distill_flow_registers_a_student_with_its_teacher_in_the_lineage(tmp_path, metaflow_env, builtin_model_dir):
    from test_flow import assert_loads_and_generates, run_flow, tiny_recipe

    from conftest import PROJECT_ROOT

    registry_root = tmp_path / "registry"
    _register_sharp_teacher(registry_root, builtin_model_dir, tmp_path)
    recipe = tiny_recipe(tmp_path, name="distill-ci", model={"base": "builtin:tiny-llama-student"},
                         register={"model_name": "catalog-assistant-student", "registry_root": str(registry_root)},
                         distill={"teacher": "registry:catalog-assistant", "temperature": 1.0})
    run = run_flow(recipe, metaflow_env, flow=PROJECT_ROOT / "flows" / "distill_flow.py")

    end = run["end"].task.data
    assert end.model_name == "catalog-assistant-student" and end.model_version == 1
    curve = [row["loss"] for row in end.train_curve]
    assert [row["step"] for row in end.train_curve] == [2, 4, 6, 8, 10, 12]
    assert curve[-1] < 0.7 * curve[0], curve
    assert all(row["kl"] == row["loss"] for row in end.train_curve)  # alpha 0, T 1: the loss is the KL
    assert {row["checkpoint"] for row in end.eval_metrics} == {"base", "step-000006", "step-000012"}
    assert end.teacher_metrics["checkpoint"] == "teacher"
    assert set(end.teacher_comparison["task_score"]) == {"teacher", "student", "student_minus_teacher"}

    version = Registry(registry_root).get("catalog-assistant-student", 1)
    teacher = version.manifest["lineage"]["teacher"]
    assert (teacher["spec"], teacher["name"], teacher["version"]) == ("registry:catalog-assistant",
                                                                      "catalog-assistant", 1)
    assert version.manifest["base_model"] == "builtin:tiny-llama-student"
    assert version.manifest["lineage"]["teacher_comparison"]["teacher_version"] == 1
    assert Registry(registry_root).get("catalog-assistant", "latest").version == 1  # the teacher is untouched
    assert_loads_and_generates(version.path)
