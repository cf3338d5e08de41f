"""Tests of steps/evaluate.py: packed held-out loss, batched greedy generation, evaluators, selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from steps.config import recipe_from_dict
from steps.evaluate import (
    eval_targets,
    evaluate_model,
    evaluate_target,
    generate_greedy,
    heldout_loss,
    load_evaluator,
    select_best,
    task_metrics,
)
from steps.packing import pack_row

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You recommend titles from the catalog."},
        {"role": "user", "content": "Something like a long heist story from the nineties, please"},
    ],
    [{"role": "user", "content": "What year was it released?"}],
    [
        {"role": "user", "content": "Find me a show"},
        {"role": "assistant", "content": "Sure, which genre?"},
        {"role": "user", "content": "comedy"},
    ],
    [{"role": "user", "content": "x"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    """The builtin BPE tokenizer (ChatML template, eos <|im_end|>, pad <|endoftext|>)."""
    from steps.builtin.tiny_llama import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama. initializer_range 0.2 (not 0.02) so greedy answers depend on the
    prompt and vary token by token, instead of repeating one token whatever the context."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny = LlamaForCausalLM(config).eval()
    tiny.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return tiny


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ generation

def test_batched_greedy_equals_one_prompt_at_a_time(model, tokenizer):
    padding_side = tokenizer.padding_side
    batched = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    alone = [
        generate_greedy(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1)[0] for prompt in PROMPTS
    ]

    assert batched == alone
    # The answers differ from prompt to prompt, so a mix-up of the order would show.
    assert len(set(alone)) == len(PROMPTS)
    assert all(answer == answer.strip() and answer for answer in alone)
    assert tokenizer.padding_side == padding_side


def test_generation_is_batched_left_padded_with_kv_cache(model, tokenizer, monkeypatch):
    """11 prompts at batch_size 4 take ceil(11 / 4) = 3 generate() calls of 4, 4 and 3 rows, each
    left-padded (zeros of the attention mask only on the left) and with the KV cache on: what
    makes 500 prompts take seconds on the tiny model (a test never asserts wall time)."""
    prompts = PROMPTS * 2 + [[{"role": "user", "content": "One more request"}]]
    calls = []
    generate = model.generate

    def counting_generate(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens=4, batch_size=4)

    assert len(answers) == 11
    assert [call["input_ids"].shape[0] for call in calls] == [4, 4, 3]
    assert all(call["use_cache"] is True and call["do_sample"] is False for call in calls)
    for call in calls:
        mask = call["attention_mask"]
        # Left padding: once a row's mask turns 1 it stays 1, and every row ends on a real token.
        assert torch.equal(mask, mask.cummax(dim=1).values) and bool(mask[:, -1].all())
    assert any(bool((call["attention_mask"] == 0).any()) for call in calls)


def test_generation_decodes_only_new_tokens(model, tokenizer):
    prompt_ids = tokenizer.apply_chat_template(
        PROMPTS[0], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    output = model.generate(
        input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False, max_new_tokens=5,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    expected = tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True).strip()
    assert generate_greedy(model, tokenizer, PROMPTS[:1], max_new_tokens=5, batch_size=4) == [expected]


# ------------------------------------------------------------------------------ held-out loss

# Three documents over two packed rows. B's first label is set (not -100): as the first token
# of a document it is still never a target, as when B is scored alone.
DOC_A = ([17, 305, 44, 901, 12, 77, 1030], [-100, -100, -100, 901, 12, 77, 1030])
DOC_B = ([8, 420, 63, 1500, 9], [8, 420, 63, 1500, 9])
DOC_C = ([700, 21, 22, 23, 1999, 4], [-100, -100, 22, 23, 1999, 4])


def write_token_shard(path: Path, rows: list[dict]) -> str:
    table = pa.table({name: pa.array([row[name].tolist() for row in rows], type=pa.list_(pa.int32()))
                      for name in ("input_ids", "labels", "position_ids")})
    pq.write_table(table, path)
    return str(path)


def per_document_reference(model, documents):
    """CE sum, target count and correct count, each document run alone (no packing at all)."""
    loss_sum, num_tokens, num_correct = 0.0, 0, 0
    with torch.no_grad():
        for input_ids, labels in documents:
            logits = model(input_ids=torch.tensor([input_ids])).logits[0]
            targets = torch.tensor(labels[1:])
            loss_sum += float(F.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum"))
            is_target = targets != -100
            num_tokens += int(is_target.sum())
            num_correct += int((logits[:-1].argmax(-1)[is_target] == targets[is_target]).sum())
    return loss_sum, num_tokens, num_correct


@pytest.mark.parametrize("batch_rows", [1, 2, 8])
def test_heldout_loss_equals_each_document_alone(model, tmp_path, batch_rows):
    uris = [
        write_token_shard(tmp_path / "part-00000.parquet", [pack_row([DOC_A, DOC_B])]),
        write_token_shard(tmp_path / "part-00001.parquet", [pack_row([DOC_C])]),
    ]
    result = heldout_loss(model, uris, row_tokens=16, pad_id=0, batch_rows=batch_rows)

    loss_sum, num_tokens, num_correct = per_document_reference(model, [DOC_A, DOC_B, DOC_C])
    assert num_tokens == 12  # A: 4 targets, B: 4 (its first token is no target), C: 4
    assert sorted(result) == ["assistant_token_accuracy", "eval_loss", "num_eval_tokens", "perplexity"]
    assert result["num_eval_tokens"] == 12
    assert abs(result["eval_loss"] - loss_sum / num_tokens) < 1e-5
    assert result["perplexity"] == pytest.approx(math.exp(loss_sum / num_tokens), rel=1e-5)
    assert result["assistant_token_accuracy"] == num_correct / num_tokens


def test_heldout_loss_is_document_isolated(model, tmp_path):
    """Scoring the packed row as one plain sequence gives another number, so the check above has teeth."""
    uri = write_token_shard(tmp_path / "part-00000.parquet", [pack_row([DOC_A, DOC_B])])
    packed = heldout_loss(model, [uri], row_tokens=16, pad_id=0)["eval_loss"]
    row = pack_row([DOC_A, DOC_B])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"].tolist()])).logits[0]
    targets = torch.tensor(row["labels"][1:].tolist())
    targets[len(DOC_A[0]) - 1] = -100  # the same targets: B's first token excluded
    leaky = float(F.cross_entropy(logits[:-1], targets, ignore_index=-100))
    assert abs(packed - leaky) > 1e-3


def test_heldout_loss_without_targets_raises(model, tmp_path):
    uri = write_token_shard(tmp_path / "part-00000.parquet", [pack_row([([5, 6, 7], [-100, -100, -100])])])
    with pytest.raises(ValueError, match="no trained tokens"):
        heldout_loss(model, [uri], row_tokens=8, pad_id=0)


# ------------------------------------------------------------------------------ evaluators

RECORDED_CALLS: list[tuple[list[dict], list[str]]] = []


def recording_evaluator(records, answers):
    RECORDED_CALLS.append((records, answers))
    return {"mean_answer_chars": sum(len(a) for a in answers) / len(answers)}


def constant_evaluator(records, answers):
    return {"constant": 1.0}


def clashing_evaluator(records, answers):
    return {"constant": 2.0}


def test_load_evaluator_resolves_module_function_and_builtin():
    from steps.builtin import builtin_evaluator

    assert load_evaluator(f"{__name__}:recording_evaluator") is recording_evaluator
    assert load_evaluator("builtin:catalog") is builtin_evaluator("catalog")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("recording_evaluator", "must be 'builtin:NAME' or 'package.module:function'"),
        ("a:b:c", "must be 'builtin:NAME' or 'package.module:function'"),
        (":f", "must be 'builtin:NAME' or 'package.module:function'"),
        ("no_such_module_for_posttrain:f", "cannot import module 'no_such_module_for_posttrain'"),
        ("json:no_such_function", "has no callable 'no_such_function'"),
        ("builtin:no-such-evaluator", "unknown builtin evaluator 'no-such-evaluator'"),
    ],
)
def test_load_evaluator_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load_evaluator(spec)


def conversation(index: int, meta: dict) -> dict:
    return {
        "id": f"id-{index}",
        "messages": [
            {"role": "user", "content": f"Recommend something, request {index}", "train": False},
            {"role": "assistant", "content": f"Answer {index}", "train": True},
        ],
        "meta": json.dumps(meta),
        "source": "test",
    }


def write_data_shard(path: Path, records: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


@pytest.fixture
def data_uris(tmp_path):
    metas = [{}, {"task": "recommend", "k": 1}, {}, {"task": "search", "k": 3}, {"task": "qa", "k": 4}]
    records = [conversation(index, meta) for index, meta in enumerate(metas)]
    return [write_data_shard(tmp_path / "part-00000.parquet", records[:2]),
            write_data_shard(tmp_path / "part-00001.parquet", records[2:])]


def test_task_metrics_scores_the_first_records_with_meta(model, tokenizer, data_uris):
    RECORDED_CALLS.clear()
    metrics = task_metrics(
        model, tokenizer, data_uris, [f"{__name__}:recording_evaluator", f"{__name__}:constant_evaluator"],
        num_prompts=2, max_new_tokens=6, batch_size=2,
    )

    [(records, answers)] = RECORDED_CALLS
    assert [record["id"] for record in records] == ["id-1", "id-3"]
    assert [record["meta"] for record in records] == [
        {"task": "recommend", "k": 1}, {"task": "search", "k": 3},
    ]
    prompts = [[{"role": "user", "content": f"Recommend something, request {index}"}] for index in (1, 3)]
    assert answers == generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert metrics == {
        "mean_answer_chars": (len(answers[0]) + len(answers[1])) / 2,
        "constant": 1.0,
        "num_task_prompts": 2,
    }


def test_task_metrics_per_request_scores_are_each_answer_alone(model, tokenizer, data_uris):
    RECORDED_CALLS.clear()
    metrics = task_metrics(model, tokenizer, data_uris, [f"{__name__}:recording_evaluator"],
                           num_prompts=3, max_new_tokens=6, batch_size=2, per_request_metric="mean_answer_chars")
    [(records, answers), *single_calls] = RECORDED_CALLS
    assert [call[0][0]["id"] for call in single_calls] == ["id-1", "id-3", "id-4"]  # one request at a time
    assert metrics["per_request"] == {"metric": "mean_answer_chars", "scores": [float(len(a)) for a in answers]}
    assert sum(metrics["per_request"]["scores"]) / 3 == metrics["mean_answer_chars"]
    # A metric the evaluators do not return gives no per-request scores.
    assert "per_request" not in task_metrics(model, tokenizer, data_uris, [f"{__name__}:recording_evaluator"],
                                             num_prompts=1, max_new_tokens=2, batch_size=1,
                                             per_request_metric="eval_loss")


def test_task_metrics_refuses_two_evaluators_with_the_same_metric(model, tokenizer, data_uris):
    with pytest.raises(ValueError, match=r"\['constant'\]"):
        task_metrics(
            model, tokenizer, data_uris, [f"{__name__}:constant_evaluator", f"{__name__}:clashing_evaluator"],
            num_prompts=1, max_new_tokens=2, batch_size=1,
        )


def test_evaluate_model_combines_loss_and_task_metrics(model, tokenizer, model_dir, data_uris, tmp_path):
    rows = [pack_row([DOC_A, DOC_B]), pack_row([DOC_C])]
    token_uris = [write_token_shard(tmp_path / "tokens.parquet", rows)]
    recipe = recipe_from_dict({
        "tokenize": {"max_seq_tokens": 16},
        "train": {"micro_batch_tokens": 32, "global_batch_tokens": 32},
        "evaluate": {"evaluators": [f"{__name__}:constant_evaluator"], "num_task_prompts": 3,
                     "max_new_tokens": 4, "generation_batch_size": 2},
    })
    metrics = evaluate_model(model_dir, token_uris=token_uris, data_uris=data_uris, recipe=recipe)

    expected = heldout_loss(model, token_uris, row_tokens=16, pad_id=tokenizer.pad_token_id, batch_rows=2)
    expected.update(constant=1.0, num_task_prompts=3)
    assert sorted(metrics) == sorted(expected)
    assert metrics == pytest.approx(expected, rel=1e-6)


def test_eval_targets_and_evaluate_target_write_the_row(model_dir, data_uris, tmp_path):
    recipe = recipe_from_dict({
        "tokenize": {"max_seq_tokens": 16},
        "train": {"micro_batch_tokens": 32, "global_batch_tokens": 32},
        "evaluate": {
            "evaluators": [f"{__name__}:constant_evaluator"], "num_task_prompts": 1, "max_new_tokens": 2,
        },
    })
    targets = eval_targets(recipe, model_dir, [str(tmp_path / "checkpoints" / "step-000010")])
    assert targets == [
        {"checkpoint": "base", "path": str(model_dir)},
        {"checkpoint": "step-000010", "path": str(tmp_path / "checkpoints" / "step-000010"), "step": 10},
    ]
    token_stats = {"eval": {"uris": [write_token_shard(tmp_path / "tokens.parquet", [pack_row([DOC_C])])]}}
    dataset_manifest = {"splits": {"eval": {"uris": data_uris}}}
    num_threads = torch.get_num_threads()
    try:
        row = evaluate_target(recipe, targets[0], dataset_manifest, token_stats, str(tmp_path / "run"))
    finally:
        torch.set_num_threads(num_threads)
    assert [row[key] for key in ("checkpoint", "path", "num_eval_tokens", "constant")] == [
        "base", str(model_dir), 4, 1.0,
    ]
    assert json.loads((tmp_path / "run" / "eval" / "base.json").read_text()) == row


# ------------------------------------------------------------------------------ selection

def test_select_best_max_min_and_ties_go_to_the_later_step():
    rows = [
        {"checkpoint": "step-000300", "task_score": 0.7, "eval_loss": 1.5},
        {"checkpoint": "step-000100", "task_score": 0.5, "eval_loss": 1.5},
        {"checkpoint": "step-000200", "task_score": 0.7, "eval_loss": 1.9},
        {"checkpoint": "step-000400", "task_score": float("nan"), "eval_loss": 2.0},
    ]
    assert select_best(rows, "task_score", "max")["checkpoint"] == "step-000300"
    assert select_best(rows, "task_score", "min")["checkpoint"] == "step-000100"
    assert select_best(rows, "eval_loss", "min")["checkpoint"] == "step-000300"
    assert select_best(rows, "eval_loss", "max")["checkpoint"] == "step-000400"
    with_steps = [{"checkpoint": "a", "step": 5, "m": 1.0}, {"checkpoint": "b", "step": 2, "m": 1.0}]
    assert select_best(with_steps, "m", "max")["checkpoint"] == "a"


def test_select_best_rejects_a_missing_metric_and_a_bad_mode():
    rows = [{"checkpoint": "step-000100", "eval_loss": 1.0}]
    with pytest.raises(ValueError, match="'task_score'"):
        select_best(rows, "task_score", "max")
    with pytest.raises(ValueError, match="'best'"):
        select_best(rows, "eval_loss", "best")
    with pytest.raises(ValueError, match="'eval_loss'"):
        select_best([], "eval_loss", "min")
