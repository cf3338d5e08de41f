"""DPO: pair data and rejects, pair packing, the loss against TRL's DPOTrainer, LoRA, and the flow."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from steps import dpo, ingest
from steps.chat import example_masked_text
from steps.config import recipe_from_dict
from steps.losses import IGNORE_INDEX

FLOW = Path(__file__).resolve().parent.parent / "flows" / "dpo_flow.py"
BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_dpo_tokenize.py"


def _recipe(tmp_path, **sections):
    base = {"storage": str(tmp_path / "storage"), "tokenize": {"max_seq_tokens": 128},
            "train": {"micro_batch_tokens": 512, "global_batch_tokens": 512}}
    return recipe_from_dict({**base, **sections})


# ---------------------------------------------------------------------------------------------
# Data


def test_pairs_of_both_forms_are_ingested_and_bad_ones_rejected_with_reasons(tmp_path):
    good = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}], "meta": {"task": "x"}},
        {"prompt": "Name a comedy.", "chosen": "Iron Tide.", "rejected": "No."},
        # a multi-turn prompt: its assistant turn is context, never trained
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "A drama?"}], "chosen": "Echo at Ashford.", "rejected": "Nope."},
    ]
    lines = [json.dumps(r) for r in good] + [
        json.dumps({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}),      # line 4
        json.dumps({"prompt": "Hi", "chosen": "Hello!"}),                          # line 5
        json.dumps({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}),  # line 6
        json.dumps({"prompt": "Hi", "chosen": "   ", "rejected": "y"}),            # line 7
        "{not json",                                                               # line 8
        json.dumps(good[1]),                                                       # line 9: duplicate
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n".join(lines) + "\n")
    recipe = _recipe(tmp_path, data={"sources": [{"uri": str(source)}], "eval_fraction": 0.4,
                                     "max_reject_fraction": 0.9})

    manifest = ingest.ingest(recipe, str(tmp_path / "run"), record_format=dpo.PAIRS)

    assert manifest["reject_reasons"] == {"empty_content": 1, "identical_responses": 1, "malformed_json": 1,
                                          "response_not_assistant": 1, "unknown_shape": 1}
    rejects = [json.loads(line) for line in Path(manifest["rejects_uri"]).read_text().splitlines()]
    assert [(r["position"], r["reason"]) for r in rejects] == [
        (4, "identical_responses"), (5, "unknown_shape"), (6, "response_not_assistant"), (7, "empty_content"),
        (8, "malformed_json")]
    assert manifest["num_duplicates"] == 1 and manifest["num_valid"] == 3
    rows = [row for split in ("train", "eval") for row in dpo.read_pairs(manifest["splits"][split]["uris"])]
    by_id = {row["id"]: row for row in rows}
    expected = [dpo.normalize_pair(record) for record in good]
    assert sorted(by_id) == sorted(dpo.pair_id(pair) for pair in expected)
    flat = by_id[dpo.pair_id(expected[1])]
    assert flat["prompt"] == [{"role": "user", "content": "Name a comedy.", "train": False}]
    assert flat["chosen"] == [{"role": "assistant", "content": "Iron Tide.", "train": True}]
    assert flat["rejected"] == [{"role": "assistant", "content": "No.", "train": True}]
    assert by_id[dpo.pair_id(expected[2])]["prompt"][1] == {"role": "assistant", "content": "Hey", "train": False}
    assert json.loads(by_id[dpo.pair_id(expected[0])]["meta"]) == {"task": "x"}
    # the split is a function of the prompt only: a prompt's pairs are all on one side
    for split in ("train", "eval"):
        for row in dpo.read_pairs(manifest["splits"][split]["uris"]):
            assert ingest.split_of(dpo.prompt_key(row), 0.4) == split
    assert dpo.prompt_key(expected[0]) != dpo.prompt_key(expected[1])


def test_pairs_of_one_prompt_share_a_split_and_new_rejected_answers_keep_the_eval_set(tmp_path):
    prompts = [f"Name a comedy from {year}." for year in range(1970, 2010)]
    pairs = [{"prompt": p, "chosen": f"Answer {i}.", "rejected": f"Wrong {i}{k}."}
             for i, p in enumerate(prompts) for k in range(3)]
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n".join(json.dumps(pair) for pair in pairs) + "\n")
    manifest = ingest.ingest(_recipe(tmp_path, data={"sources": [{"uri": str(source)}], "eval_fraction": 0.3}),
                             str(tmp_path / "run"), record_format=dpo.PAIRS)
    sides = {split: [row["prompt"][0]["content"] for row in dpo.read_pairs(manifest["splits"][split]["uris"])]
             for split in ("train", "eval")}
    assert not set(sides["train"]) & set(sides["eval"]) and set(sides["train"]) | set(sides["eval"]) == set(prompts)
    assert all(sides[split].count(prompt) == 3 for split in sides for prompt in sides[split])
    assert 0 < len(set(sides["eval"])) < len(prompts)
    # Other rejected answers: other pairs, the same split of every prompt.
    source.write_text("\n".join(json.dumps({**pair, "rejected": pair["rejected"] + " Really."}) for pair in pairs))
    again = ingest.ingest(_recipe(tmp_path, data={"sources": [{"uri": str(source)}], "eval_fraction": 0.3}),
                          str(tmp_path / "run2"), record_format=dpo.PAIRS)
    assert sorted(row["prompt"][0]["content"] for row in dpo.read_pairs(again["splits"]["eval"]["uris"])) == sorted(
        sides["eval"])


def test_catalog_pairs_prefer_the_answer_that_satisfies_the_request():
    from steps.builtin import builtin_dataset
    from steps.builtin.catalog import recommendation_is_valid, search_hit

    records = list(builtin_dataset("catalog-pairs", num_conversations=200, seed=3))
    assert len(records) == 200
    tasks = {"recommend": 0, "search": 0, "qa": 0}
    for record in records:
        meta, chosen, rejected = record["meta"], record["chosen"][0]["content"], record["rejected"][0]["content"]
        tasks[meta["task"]] += 1
        assert chosen != rejected
        if meta["task"] == "recommend":
            assert recommendation_is_valid(meta, chosen) and not recommendation_is_valid(meta, rejected)
        elif meta["task"] == "search":
            assert search_hit(meta, chosen) and not search_hit(meta, rejected)
    assert min(tasks.values()) > 20


# ---------------------------------------------------------------------------------------------
# Tokens


def test_a_pairs_two_sequences_share_a_row_and_positions_restart():
    pairs = [(([1, 2, 3], [-100, 2, 3]), ([1, 4], [-100, 4])),
             (([5, 6, 7, 8], [-100, -100, 7, 8]), ([5, 6, 9], [-100, -100, 9])),
             (([1, 2], [-100, 2]), ([1, 3], [-100, 3]))]
    rows = [{k: v.tolist() for k, v in row.items()} for row in dpo.pack_pairs(pairs, row_tokens=10)]
    # best fit decreasing over pair lengths 5, 7, 4 in rows of 10: [pair 1], [pair 0, pair 2]
    assert rows == [
        {"input_ids": [5, 6, 7, 8, 5, 6, 9], "labels": [-100, -100, 7, 8, -100, -100, 9],
         "position_ids": [0, 1, 2, 3, 0, 1, 2], "sequence_ids": [0, 0, 0, 0, 1, 1, 1]},
        {"input_ids": [1, 2, 3, 1, 4, 1, 2, 1, 3], "labels": [-100, 2, 3, -100, 4, -100, 2, -100, 3],
         "position_ids": [0, 1, 2, 0, 1, 0, 1, 0, 1], "sequence_ids": [0, 0, 0, 1, 1, 2, 2, 3, 3]},
    ]
    batch = dpo.collate_pair_rows(rows, row_tokens=10, pad_id=0)
    assert dpo.num_pairs(batch["sequence_ids"]) == 3
    assert batch["sequence_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1, -1, -1]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]  # padding: a sequence of its own
    sums, pair_mask = dpo.sequence_sums(torch.ones(2, 10), batch["sequence_ids"])
    assert sums.tolist() == [[[4.0, 3.0], [0.0, 0.0]], [[3.0, 2.0], [2.0, 2.0]]]
    assert pair_mask.tolist() == [[True, False], [True, True]]


def _bench_module():
    """``bench/bench_dpo_tokenize.py``: its per-pair path (the DPO tokenization before the shared writer) is
    the reference the writer's pair rows are compared with."""
    spec = importlib.util.spec_from_file_location("bench_dpo_tokenize", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_through_the_shared_writer_give_the_rows_of_the_per_pair_path(tmp_path, builtin_model_dir):
    """The DPO tokenize step (the shared dataset writer, in 2 worker processes) writes exactly the rows of the
    former per-pair path, reference log-probs included, and drops and counts the same pairs."""
    import pyarrow.parquet as pq

    from steps.models import load_model, load_tokenizer

    bench = _bench_module()
    # Besides catalog pairs, pairs too long for a row: one sequence alone, or only both together.
    long_answer = " ".join(f"Iron Tide ({year})." for year in range(1950, 2010))
    pairs = ([{"prompt": f"List thrillers, take {k}.", "chosen": long_answer, "rejected": "No."} for k in range(4)]
             + [{"prompt": f"Two lists, take {k}.", "chosen": long_answer[:300], "rejected": long_answer[-300:]}
                for k in range(4)])
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    recipe = _recipe(tmp_path, seed=5, model={"base": str(builtin_model_dir)},
                     data={"sources": [{"uri": "builtin:catalog-pairs"}, {"uri": str(tmp_path / "long.jsonl")}],
                           "builtin_num_conversations": 300, "eval_fraction": 0.2},
                     tokenize={"max_seq_tokens": 256, "num_workers": 2},
                     train={"micro_batch_tokens": 1024, "global_batch_tokens": 1024})
    run_root = str(tmp_path / "run")
    manifest = ingest.ingest(recipe, run_root, record_format=dpo.PAIRS)

    stats = dpo.tokenize_splits(recipe, builtin_model_dir, builtin_model_dir, manifest, run_root)

    tokenizer, reference = load_tokenizer(builtin_model_dir), load_model(builtin_model_dir).eval()
    for split in ("train", "eval"):
        old_stats, old_rows = bench.per_pair_rows(tokenizer, manifest["splits"][split]["uris"], max_seq_tokens=256)
        dpo.add_reference_logps(reference, old_rows, row_tokens=256, pad_id=tokenizer.pad_token_id,
                                batch_rows=1024 // 256)  # as the step: train.micro_batch_tokens // row tokens
        new_rows = bench.read_rows(stats[split]["uris"])
        bench.assert_same_rows(old_stats, old_rows, stats[split], new_rows)
        assert [row["ref_logps"] for row in new_rows] == [row["ref_logps"].tolist() for row in old_rows]
        assert pq.read_schema(stats[split]["uris"][0]) == dpo.PAIR_TOKEN_SCHEMA
    train = stats["train"]
    assert train["num_pairs"] == manifest["splits"]["train"]["num_conversations"] > 200
    assert stats["train"]["num_dropped_too_long"] + stats["eval"]["num_dropped_too_long"] >= len(pairs)
    assert train["num_rows"] < train["num_packed_pairs"] / 1.5  # rows of several pairs
    first = bench.read_rows(train["uris"])[0]
    pair_end = first["sequence_ids"].index(2) if 2 in first["sequence_ids"] else len(first["input_ids"])
    assert stats["example"] == example_masked_text(tokenizer, first["input_ids"][:pair_end],
                                                   first["labels"][:pair_end])
    assert stats["example"].count("[[") == 2 and stats["reference_seconds"] > 0


def test_packed_pair_log_probs_equal_each_sequence_alone(builtin_model_dir):
    from steps.chat import tokenize_conversation
    from steps.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(builtin_model_dir)
    model = load_model(builtin_model_dir).eval()
    prompt = [{"role": "user", "content": "Recommend a tense thriller.", "train": False}]
    sequences = [tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": text, "train": True}])
                 for text in ('I recommend "Iron Tide" (2003).', "No.", "Maybe later.", 'Try "Echo at Ashford".')]
    pairs = [((s.input_ids, s.labels), (r.input_ids, r.labels)) for s, r in (sequences[:2], sequences[2:])]
    rows = dpo.pack_pairs(pairs, row_tokens=128)
    assert len(rows) == 1
    dpo.add_reference_logps(model, rows, row_tokens=128, pad_id=tokenizer.pad_token_id)
    packed = rows[0]["ref_logps"]
    alone = []
    with torch.no_grad():
        for s in sequences[:2] + sequences[2:]:
            ids, labels = torch.tensor([s.input_ids]), torch.tensor([s.labels])
            alone.append(dpo.token_logps(model(input_ids=ids).logits, labels, torch.arange(len(s.input_ids))[None])[0])
    order = [0, 1, 2, 3]  # chosen, rejected of pair 0, then of pair 1 (or the other pair first)
    if rows[0]["input_ids"][:len(sequences[0].input_ids)].tolist() != sequences[0].input_ids:
        order = [2, 3, 0, 1]
    expected = torch.cat([alone[i] for i in order])
    assert torch.allclose(torch.as_tensor(packed), expected, atol=1e-5)
    trained = torch.as_tensor(rows[0]["labels"]) != IGNORE_INDEX
    assert (torch.as_tensor(packed)[~trained] == 0).all() and (torch.as_tensor(packed)[trained] < 0).all()


# ---------------------------------------------------------------------------------------------
# Loss: parity with TRL's DPOTrainer


@pytest.fixture(scope="module")
def policy_and_reference(builtin_model_dir):
    """The builtin model as the reference, and a deterministically perturbed copy as the policy."""
    from steps.models import load_model

    reference = load_model(builtin_model_dir).eval()
    policy = load_model(builtin_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return policy, reference


PAIR_RECORDS = [
    {"prompt": [{"role": "user", "content": "Recommend a comedy."}],
     "chosen": [{"role": "assistant", "content": 'I recommend "Iron Tide" (2003).'}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who stars in it?"}],
     "chosen": [{"role": "assistant", "content": "Ana Reyes."}],
     "rejected": [{"role": "assistant", "content": "Nobody at all, sorry."}]},
    {"prompt": [{"role": "user", "content": "A drama from the 1990s?"}],
     "chosen": [{"role": "assistant", "content": 'Try "Echo at Ashford" (1999).'}],
     "rejected": [{"role": "assistant", "content": 'Try "Iron Tide" (2003).'}]},
]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trl_dpo_trainer(tmp_path, builtin_model_dir, policy_and_reference, loss):
    """TRL's own code path (DPOTrainer.compute_loss on its collated batch, with a ref_model) and ours
    (the same sequences packed into one row, reference log-probs precomputed, DPOLoss) agree."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    policy, reference = policy_and_reference
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=[loss], report_to=[], use_cpu=True,
                     per_device_train_batch_size=len(PAIR_RECORDS), precompute_ref_log_probs=False,
                     save_strategy="no", logging_strategy="no", bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(PAIR_RECORDS))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIR_RECORDS))])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}

    # The very same token sequences and completion masks, as our pair rows.
    sequences = []
    for ids, attention, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        length = int(attention.sum())
        sequences.append((ids[:length].tolist(), ids[:length].masked_fill(completion[:length] == 0, -100).tolist()))
    num = len(PAIR_RECORDS)
    rows = dpo.pack_pairs([(sequences[k], sequences[num + k]) for k in range(num)], row_tokens=256)
    assert len(rows) == 1  # every pair in one packed row: attention must stay within each sequence
    dpo.add_reference_logps(reference, rows, row_tokens=256, pad_id=tokenizer.pad_token_id)
    recipe = recipe_from_dict({"dpo": {"beta": 0.2, "loss": loss}})
    objective = dpo.DPOObjective(recipe)
    step_batch = objective.collate(rows, 256, tokenizer.pad_token_id)
    count = objective.count(step_batch)
    with torch.no_grad():
        ours = {k: float(v) / count for k, v in objective.module(policy, real_vocab=None, chunk_tokens=None)(
            **step_batch).items()}

    assert count == num
    assert abs(ours["loss"] - trl_loss) < 1e-5
    assert abs(ours["reward_accuracy"] - trl_metrics["rewards/accuracies"]) < 1e-6
    assert abs(ours["reward_margin"] - trl_metrics["rewards/margins"]) < 1e-5
    assert abs(ours["chosen_logps"] - trl_metrics["logps/chosen"]) < 1e-4
    assert abs(ours["rejected_logps"] - trl_metrics["logps/rejected"]) < 1e-4
    assert trl_loss != pytest.approx(math.log(2), abs=1e-3)  # the policy really differs from the reference


def test_label_smoothing_is_conservative_dpo():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    losses = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=0.1)
    delta = 0.5 * torch.tensor([(-3 + 3.5) - (-4 + 3), (-5 + 4) - (-2 + 2.5)])  # [0.75, -0.75]
    log_sigmoid = lambda x: -math.log(1 + math.exp(-x))  # noqa: E731
    expected = [-0.9 * log_sigmoid(d) - 0.1 * log_sigmoid(-d) for d in delta.tolist()]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert losses.tolist() == pytest.approx([0.46187, 1.06187], abs=1e-5)


def test_sft_weight_adds_the_chosen_answers_mean_token_nll(builtin_model_dir, policy_and_reference):
    from steps.chat import tokenize_conversation
    from steps.losses import num_target_tokens, token_loss_sum
    from steps.models import load_tokenizer

    policy, reference = policy_and_reference
    tokenizer = load_tokenizer(builtin_model_dir)
    pairs = [tuple(tokenize_conversation(tokenizer, dpo.normalize_pair(r)["prompt"] + dpo.normalize_pair(r)[key])
                   for key in ("chosen", "rejected")) for r in PAIR_RECORDS]
    rows = dpo.pack_pairs([tuple((s.input_ids, s.labels) for s in pair) for pair in pairs], row_tokens=256)
    dpo.add_reference_logps(reference, rows, row_tokens=256, pad_id=tokenizer.pad_token_id)
    batch = dpo.collate_pair_rows(rows, 256, tokenizer.pad_token_id)
    with torch.no_grad():
        plain = dpo.DPOLoss(policy, recipe_from_dict({}).dpo)(**batch)["loss"]
        rpo = dpo.DPOLoss(policy, recipe_from_dict({"dpo": {"sft_weight": 0.5}}).dpo)(**batch)["loss"]
        mean_nlls = []
        for chosen, _ in pairs:  # each chosen sequence alone, with the SFT loss
            ids, labels = torch.tensor([chosen.input_ids]), torch.tensor([chosen.labels])
            positions = torch.arange(ids.shape[1])[None]
            mean_nlls.append(float(token_loss_sum(policy(input_ids=ids).logits, labels, positions))
                             / num_target_tokens(labels, positions))
    assert float(rpo - plain) == pytest.approx(0.5 * sum(mean_nlls), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The objective in training: full and LoRA


def _catalog_rows(tmp_path, builtin_model_dir, num_pairs=16):
    """Packed train rows (with reference log-probs of the builtin model) of catalog pairs."""
    import numpy as np
    import pyarrow.parquet as pq

    from steps.builtin import builtin_dataset
    from steps.chat import write_token_dataset
    from steps.models import load_model, load_tokenizer

    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in builtin_dataset("catalog-pairs", num_pairs, 0)))
    recipe = _recipe(tmp_path, data={"sources": [{"uri": str(source)}], "eval_fraction": 0.2})
    manifest = ingest.ingest(recipe, str(tmp_path / "run"), record_format=dpo.PAIRS)
    tokenizer = load_tokenizer(builtin_model_dir)
    stats = write_token_dataset(tokenizer, manifest["splits"]["train"]["uris"], tmp_path / "tokens", dpo.PAIR_TOKENS,
                                max_seq_tokens=256)
    rows = [{name: np.asarray(values) for name, values in row.items()}
            for row in pq.read_table(stats["uris"][0]).to_pylist()]
    dpo.add_reference_logps(load_model(builtin_model_dir).eval(), rows, row_tokens=256,
                            pad_id=tokenizer.pad_token_id)
    return rows, tokenizer.pad_token_id


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_dpo_objective_starts_at_log2_and_learns_to_prefer_chosen(tmp_path, builtin_model_dir, finetune):
    from steps.models import load_model
    from steps.objectives import objective_for

    recipe = recipe_from_dict({"storage": str(tmp_path / "storage"), "tokenize": {"max_seq_tokens": 256},
                               "train": {"micro_batch_tokens": 2048, "global_batch_tokens": 2048,
                                         "finetune": finetune}, "dpo": {"beta": 0.5}})
    rows, pad_id = _catalog_rows(tmp_path, builtin_model_dir)
    torch.manual_seed(0)
    model = load_model(builtin_model_dir)
    if finetune == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                           target_modules=["q_proj", "v_proj"]))
    objective = objective_for("dpo", recipe, {}, torch.device("cpu"))
    loss_module = objective.module(model, real_vocab=None, chunk_tokens=None)
    batch = objective.collate(rows, 256, pad_id)
    count = objective.count(batch)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3 if finetune == "full"
                                  else 1e-2)
    curve = []
    for _ in range(4):
        out = loss_module(**batch)
        (out["loss"] / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append({k: float(v) / count for k, v in out.items()})
    assert count == sum(1 for row in rows for s in set(row["sequence_ids"].tolist()) if s % 2 == 0)
    assert curve[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert curve[0]["reward_accuracy"] == 0.0
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.05
    assert curve[-1]["reward_accuracy"] > 0.6 and curve[-1]["reward_margin"] > 0
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert changed and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    if finetune == "lora":
        assert all("lora_" in n for n in changed) and frozen


# ---------------------------------------------------------------------------------------------
# The starting policy


def test_policy_is_the_latest_registered_version_or_the_base_model(tmp_path, builtin_model_dir):
    from steps.registry import NotFoundError, Registry

    recipe = _recipe(tmp_path, model={"base": str(builtin_model_dir)}, dpo={"policy": "registry:sft-model"})
    models = dpo.starting_models(recipe, str(tmp_path / "run1"))
    assert models == {"policy_path": str(builtin_model_dir), "reference_path": str(builtin_model_dir),
                      "parent": None}

    registry = Registry(recipe.registry_root)
    registry.register("sft-model", builtin_model_dir, {"run": "SFTFlow/1"})
    registry.register("sft-model", builtin_model_dir, {"run": "SFTFlow/2"})
    models = dpo.starting_models(recipe, str(tmp_path / "run2"))
    assert models["parent"] == {"name": "sft-model", "version": 2, "run": "SFTFlow/2",
                                "uri": registry.get("sft-model", 2).uri, "metrics": {}}
    assert models["policy_path"] == str(tmp_path / "run2" / "policy") == models["reference_path"]
    assert (Path(models["policy_path"]) / "model.safetensors").exists()

    pinned = _recipe(tmp_path, dpo={"policy": "registry:sft-model@1", "reference": str(builtin_model_dir)})
    models = dpo.starting_models(pinned, str(tmp_path / "run3"))
    assert models["parent"]["version"] == 1 and models["reference_path"] == str(builtin_model_dir)
    with pytest.raises(NotFoundError):
        dpo.starting_models(_recipe(tmp_path, dpo={"policy": "registry:sft-model@champion"}), str(tmp_path / "r4"))


# ---------------------------------------------------------------------------------------------
# On-policy rejected answers

JUDGE = """
def even_length(records, answers):
    # Only the answer matters: an even number of characters passes.
    return {"task_score": sum(len(a) % 2 == 0 for a in answers) / len(answers)}
"""


def test_on_policy_rejected_answers_are_the_policys_first_failing_answers(tmp_path, builtin_model_dir, monkeypatch):
    from steps.evaluate import generate_answers
    from steps.models import load_model, load_tokenizer

    (tmp_path / "judges").mkdir()
    (tmp_path / "judges" / "onpolicy_judge.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path / "judges"))
    recipe = _recipe(tmp_path, seed=3, model={"base": str(builtin_model_dir)},
                     data={"sources": [{"uri": "builtin:catalog-pairs"}], "builtin_num_conversations": 48,
                           "eval_fraction": 0.25},
                     evaluate={"evaluators": ["onpolicy_judge:even_length"], "max_new_tokens": 6,
                               "generation_batch_size": 16},
                     dpo={"rejected": "on_policy", "on_policy_samples": 2, "on_policy_temperature": 1.5})
    run_root = str(tmp_path / "run")
    manifest = ingest.ingest(recipe, run_root, record_format=dpo.PAIRS)
    before = list(dpo.read_pairs(manifest["splits"]["train"]["uris"]))

    after_manifest = dpo.on_policy_rejected(recipe, builtin_model_dir, manifest, run_root)

    assert after_manifest["splits"]["eval"] == manifest["splits"]["eval"]  # held-out pairs stay as ingested
    after = list(dpo.read_pairs(after_manifest["splits"]["train"]["uris"]))
    assert [p["id"] for p in after] == [p["id"] for p in before]
    assert [(p["prompt"], p["chosen"], p["meta"]) for p in after] == [(p["prompt"], p["chosen"], p["meta"])
                                                                      for p in before]
    # The expected choice, from the same generations: the greedy answer, else the samples, in order.
    tokenizer, model = load_tokenizer(builtin_model_dir), load_model(builtin_model_dir).eval()
    prompts = [[{"role": m["role"], "content": m["content"]} for m in p["prompt"]] for p in before]
    greedy = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=16)
    sampled = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=16, num_samples=2,
                               temperature=1.5, seed=3)
    expected, sources = [], []
    for pair, answers in zip(before, (g + s for g, s in zip(greedy, sampled))):
        chosen_passes = len(pair["chosen"][-1]["content"]) % 2 == 0
        failing = [i for i, a in enumerate(answers) if a.strip() and len(a) % 2 == 1 and chosen_passes]
        expected.append(answers[failing[0]] if failing else pair["rejected"][-1]["content"])
        sources.append("greedy" if failing and failing[0] == 0 else "sample" if failing else "kept")
    assert [p["rejected"][-1]["content"] for p in after] == expected
    stats = after_manifest["on_policy"]
    assert (stats["num_from_greedy"], stats["num_from_samples"], stats["num_kept"]) == tuple(
        sources.count(source) for source in ("greedy", "sample", "kept"))
    assert min(stats["num_from_greedy"], stats["num_from_samples"], stats["num_kept"]) > 0  # every branch ran
    # Passing means scoring no worse than the chosen answer (an odd-length chosen answer cannot be beaten).
    greedy_passes = [len(g[0]) % 2 == 0 or len(p["chosen"][-1]["content"]) % 2 == 1 for g, p in zip(greedy, before)]
    assert stats["greedy_pass_rate"] == sum(greedy_passes) / len(before)
    assert stats["num_answers"] == 3 * len(before) and stats["judged_by"] == "task_score of onpolicy_judge:even_length"

    # The tokenize step reads the new training pairs.
    tokens = dpo.tokenize_splits(recipe, builtin_model_dir, builtin_model_dir, after_manifest, run_root)
    assert tokens["train"]["num_pairs"] == len(after)


def test_on_policy_rejected_needs_an_evaluator_with_its_metric(tmp_path, builtin_model_dir):
    from steps.config import RecipeError

    with pytest.raises(RecipeError, match="evaluate.evaluators"):
        _recipe(tmp_path, evaluate={"evaluators": []}, dpo={"rejected": "on_policy"})
    recipe = _recipe(tmp_path, model={"base": str(builtin_model_dir)},
                     data={"sources": [{"uri": "builtin:catalog-pairs"}], "builtin_num_conversations": 8,
                           "eval_fraction": 0.25},
                     evaluate={"max_new_tokens": 2},
                     dpo={"rejected": "on_policy", "on_policy_samples": 0, "on_policy_metric": "exact_match"})
    manifest = ingest.ingest(recipe, str(tmp_path / "run"), record_format=dpo.PAIRS)
    with pytest.raises(ValueError, match="'exact_match', which the evaluators do not return"):
        dpo.on_policy_rejected(recipe, builtin_model_dir, manifest, str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# The flow


def run_dpo_flow(recipe_path: Path, sysroot: Path):
    from metaflow import Runner

    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(sysroot), "METAFLOW_USER": "posttrain-tests",
           "HF_HUB_OFFLINE": "1"}
    (Path(sysroot) / ".metaflow").mkdir(parents=True, exist_ok=True)
    with Runner(str(FLOW), show_output=False, env=env, cwd=str(sysroot),
                config=[("recipe", str(recipe_path))]) as runner:
        result = runner.run()
        assert result.status == "successful", result.stdout[-4000:] + result.stderr[-8000:]
        return result.run


@pytest.mark.slow
def test_dpo_flow_starts_from_the_registered_sft_model_and_registers_with_lineage(tmp_path, metaflow_env,
                                                                                 builtin_model_dir):
    from steps.registry import Registry

    storage = tmp_path / "storage"
    registry = Registry(storage / "registry")
    sft = registry.register("catalog-assistant", builtin_model_dir, {"run": "SFTFlow/7", "metrics": {}})
    recipe = {
        "name": "dpo-ci", "seed": 0, "storage": str(storage),
        "data": {"sources": [{"uri": "builtin:catalog-pairs"}], "builtin_num_conversations": 400,
                 "eval_fraction": 0.1},
        "tokenize": {"max_seq_tokens": 512},
        "train": {"micro_batch_tokens": 4096, "global_batch_tokens": 4096, "max_steps": 16, "warmup_steps": 2,
                  "lr": 1e-3, "save_every_steps": 16, "log_every_steps": 4},
        "dpo": {"policy": "registry:catalog-assistant", "beta": 0.5, "rejected": "on_policy", "on_policy_samples": 1},
        "evaluate": {"num_task_prompts": 8, "max_new_tokens": 16, "generation_batch_size": 64,
                     "select_metric": "reward_accuracy"},
        "register": {"model_name": "catalog-assistant-dpo"},
        "promote": {"metric": "reward_accuracy"},
    }
    recipe_path = tmp_path / "dpo.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    run = run_dpo_flow(recipe_path, metaflow_env)

    data = run["end"].task.data
    rows = {row["checkpoint"]: row for row in data.eval_metrics}
    assert set(rows) == {"base", "step-000016"}
    # The starting policy is the reference: every reward is 0.
    assert rows["base"]["reward_accuracy"] == 0.0 and rows["base"]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    trained = rows["step-000016"]
    assert trained["num_eval_pairs"] == data.token_stats["eval"]["num_packed_pairs"] > 20
    assert math.isfinite(trained["dpo_loss"]) and "task_score" in trained
    assert [point["step"] for point in data.train_curve] == [4, 8, 12, 16]
    # The untrained policy answers no catalog request right: its own answers became the rejected ones.
    on_policy = data.dataset_manifest["on_policy"]
    assert on_policy["num_pairs"] == data.dataset_manifest["splits"]["train"]["num_conversations"] > 300
    assert on_policy["greedy_pass_rate"] == 0.0 and on_policy["num_kept"] == 0
    assert Path(data.dataset_manifest["splits"]["train"]["uris"][0]).parent.name == "train-on-policy"
    assert data.token_stats["train"]["num_pairs"] == on_policy["num_pairs"]
    # The objective was optimised: on its training pairs the final policy prefers the chosen answer.
    # (Held-out pairs need knowledge of the catalog that a random tiny model does not get in 16
    # steps; from a fine-tuned SFT model they improve too, see the README's DPO section.)
    from steps.models import load_model

    on_train = dpo.preference_metrics(load_model(trained["path"]).eval(), data.token_stats["train"]["uris"],
                                      row_tokens=512, pad_id=0, batch_rows=8, config=recipe_from_dict(recipe).dpo)
    assert on_train["reward_accuracy"] > 0.6 and on_train["reward_margin"] > 0
    assert on_train["dpo_loss"] < math.log(2) - 0.05  # 0.70, 0.52 and 0.57 on CPU, seed 0
    version = registry.get("catalog-assistant-dpo", data.model_version)
    assert version.manifest["lineage"]["parent"] == {"name": "catalog-assistant", "version": sft.version,
                                                     "run": "SFTFlow/7", "uri": sft.uri, "metrics": {}}
    assert version.manifest["base_model"] == "registry:catalog-assistant"
    assert version.manifest["metrics"]["reward_accuracy"] == trained["reward_accuracy"]
