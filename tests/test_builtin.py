"""Tests for steps/builtin: the catalog dataset, its scorer, and the tiny Llama build."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from steps import builtin  # noqa: E402
from steps.builtin import catalog, tiny_llama  # noqa: E402
from steps.builtin.catalog import (  # noqa: E402
    Title,
    evaluate,
    first_title_named,
    generate_conversations,
    generate_preference_pairs,
    make_catalog,
    qa_correct,
    recommendation_is_valid,
    search_hit,
    task_prompt,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# A hand-made catalog for exact scoring cases.
HARBOR = Title("The Silent Harbor", "thriller", 1987, "tense", ("Ana Reyes", "Tomas Berg"))
ORCHARD = Title("Golden Orchard", "drama", 1987, "tense", ("Lena Okafor", "Ana Reyes"))
SIGNAL = Title("Iron Signal", "thriller", 1995, "tense", ("Mei Tanaka", "Kai Nakamura"))
SMALL_CATALOG = [HARBOR, ORCHARD, SIGNAL]

TWO_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Recommend a film"},
    {"role": "assistant", "content": 'I recommend "Iron Tide".'},
]


# ---------------------------------------------------------------- catalog


def test_catalog_is_deterministic_and_pinned():
    first = make_catalog(0)
    assert first == make_catalog(0)
    assert first != make_catalog(1)
    # Golden entry: a change here changes every dataset and checkpoint built on it.
    assert first[0] == Title("Carnival at Brightmoor", "drama", 1986, "heartwarming", ("Hugo Ferreira", "Kofi Mensah"))


def test_catalog_is_well_posed():
    titles = make_catalog(0)
    names = [t.title for t in titles]
    assert len(titles) == 150
    assert len(set(names)) == 150
    # No name inside another, so "the first title named" is unambiguous.
    assert not [(a, b) for a in names for b in names if a != b and a in b]
    # (genre, year) identifies a title, so search always has a unique answer.
    assert len({(t.genre, t.year) for t in titles}) == 150
    assert all(2 <= len(t.title.split()) <= 4 for t in titles)
    assert all(1970 <= t.year <= 2024 for t in titles)
    assert {t.genre for t in titles} == set(catalog.GENRES)
    assert {t.mood for t in titles} == set(catalog.MOODS)
    assert all(t.cast[0] != t.cast[1] and set(t.cast) <= set(catalog.ACTORS) for t in titles)
    assert len(catalog.ACTORS) == 40


def test_catalog_as_text_has_one_line_per_title():
    text = catalog.catalog_as_text()
    assert text.count("\n") == 150
    assert text.splitlines()[0] == (
        '"Carnival at Brightmoor" (1986) is a heartwarming drama starring Hugo Ferreira and Kofi Mensah.'
    )


# ---------------------------------------------------------------- conversations


def test_conversations_are_deterministic_and_prefix_stable():
    records = list(generate_conversations(200, seed=0))
    assert records == list(generate_conversations(200, seed=0))
    assert records != list(generate_conversations(200, seed=1))
    assert list(generate_conversations(20, seed=0)) == records[:20]
    assert list(generate_conversations(0, seed=0)) == []
    with pytest.raises(ValueError, match="num_conversations"):
        list(generate_conversations(-1))


def test_conversation_mix_and_shape():
    records = list(generate_conversations(2000, seed=0))
    # Exact for seed 0; targets are 50/30/20, 30% multi-turn, 30% with a system prompt.
    assert Counter(r["meta"]["task"] for r in records) == {"recommend": 980, "search": 620, "qa": 400}
    num_exchanges = Counter(sum(m["role"] == "assistant" for m in r["messages"]) for r in records)
    assert sum(num_exchanges.values()) == 2000 and set(num_exchanges) == {1, 2, 3}
    assert 2000 - num_exchanges[1] == 577
    assert sum(r["messages"][0]["role"] == "system" for r in records) == 645
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        meta = record["meta"]
        if meta["task"] == "recommend":
            assert meta["constraints"] and set(meta["constraints"]) <= {"genre", "decade", "mood"}
        elif meta["task"] == "search":
            assert set(meta) == {"task", "title"}
        else:
            assert set(meta) == {"task", "title", "field"} and meta["field"] in {"cast", "year", "genre"}
    assert len({r["messages"][-2]["content"] for r in records if r["meta"]["task"] == "recommend"}) > 500


def test_first_recommend_record_exact():
    record = next(r for r in generate_conversations(50, seed=0) if r["meta"]["task"] == "recommend")
    assert record == {
        "messages": [
            {"role": "user", "content": "What should I watch tonight? I'd like a movie made in the 1970s."},
            {
                "role": "assistant",
                "content": 'I recommend "The Songs of Brightmoor" (1977), a dark animated film starring Jude Okonkwo.',
            },
        ],
        "meta": {"task": "recommend", "constraints": {"decade": 1970}},
    }


def test_every_reference_answer_scores_perfectly():
    records = list(generate_conversations(1000, seed=3))
    references = [r["messages"][-1]["content"] for r in records]
    for record, answer in zip(records, references):
        if record["meta"]["task"] == "recommend":
            assert recommendation_is_valid(record["meta"], answer), (record, answer)
        elif record["meta"]["task"] == "search":
            assert search_hit(record["meta"], answer), (record, answer)
        else:  # qa answers name their title too
            assert first_title_named(answer).title == record["meta"]["title"]
    scores = evaluate(records, references)
    assert scores["task_score"] == scores["recommend_valid"] == 1.0
    assert scores["search_hit_at_1"] == scores["qa_accuracy"] == 1.0


def test_qa_correctness_exact_cases_and_every_rejected_pair_fails():
    meta = {"task": "qa", "title": "Iron Signal", "field": "year"}
    iron = next(t for t in SMALL_CATALOG if t.title == "Iron Signal")
    assert qa_correct(meta, f'"Iron Signal" was released in {iron.year}.', SMALL_CATALOG)
    assert not qa_correct(meta, f'"Iron Signal" was released in {iron.year + 1}.', SMALL_CATALOG)
    assert not qa_correct(meta, f'"The Silent Harbor" was released in {iron.year}.', SMALL_CATALOG)  # other title
    assert not qa_correct(meta, f"{iron.year}", SMALL_CATALOG)  # no title named
    cast = {**meta, "field": "cast"}
    assert qa_correct(cast, f'"Iron Signal" stars {iron.cast[0]} and {iron.cast[1]}.', SMALL_CATALOG)
    assert not qa_correct(cast, f'"Iron Signal" stars {iron.cast[0]}.', SMALL_CATALOG)  # one lead missing
    with pytest.raises(ValueError, match="unknown qa field 'rating'"):
        qa_correct({**meta, "field": "rating"}, '"Iron Signal"', SMALL_CATALOG)
    # The DPO pairs' rejected qa answers (another title's facts) all fail; the chosen all pass.
    pairs = [p for p in generate_preference_pairs(600, seed=1) if p["meta"]["task"] == "qa"]
    assert len(pairs) > 50
    assert all(qa_correct(p["meta"], p["chosen"][0]["content"]) for p in pairs)
    assert not any(qa_correct(p["meta"], p["rejected"][0]["content"]) for p in pairs)


# ---------------------------------------------------------------- scoring


def test_recommendation_validity_exact_cases():
    meta = {"task": "recommend", "constraints": {"genre": "thriller", "decade": 1980, "mood": "tense"}}
    assert recommendation_is_valid(meta, 'I recommend "The Silent Harbor" (1987).', SMALL_CATALOG)
    assert not recommendation_is_valid(meta, 'I recommend "Golden Orchard" (1987).', SMALL_CATALOG)  # genre
    assert not recommendation_is_valid(meta, 'I recommend "Iron Signal" (1995).', SMALL_CATALOG)  # decade
    assert not recommendation_is_valid(meta, "I recommend a good thriller.", SMALL_CATALOG)  # no title
    assert not recommendation_is_valid(meta, 'I recommend "The Silent Bridge".', SMALL_CATALOG)  # not in catalog
    assert not recommendation_is_valid(meta, 'I recommend "the silent harbor".', SMALL_CATALOG)  # exact only
    # The first title named counts, not any title named.
    assert not recommendation_is_valid(meta, '"Golden Orchard", or "The Silent Harbor".', SMALL_CATALOG)
    assert recommendation_is_valid(meta, '"The Silent Harbor", or "Golden Orchard".', SMALL_CATALOG)
    assert recommendation_is_valid({"constraints": {"mood": "tense"}}, "Iron Signal", SMALL_CATALOG)
    with pytest.raises(ValueError, match="unknown recommend constraint 'rating'"):
        recommendation_is_valid({"constraints": {"rating": 5}}, "Iron Signal", SMALL_CATALOG)


def test_recommendation_validity_on_default_catalog():
    titles = make_catalog(0)
    target = titles[0]  # Carnival at Brightmoor: drama, 1986, heartwarming
    meta = {"task": "recommend", "constraints": {"genre": "drama", "decade": 1980}}
    assert recommendation_is_valid(meta, f'I recommend "{target.title}".')
    wrong = next(t for t in titles if t.genre != "drama")
    assert not recommendation_is_valid(meta, f'I recommend "{wrong.title}".')


def test_first_title_named_prefers_earliest_then_longest():
    nested = [Title("Iron Tide", "drama", 1990, "dark", ("A B", "C D")),
              Title("The Iron Tide Rises", "drama", 1991, "dark", ("A B", "C D"))]  # fmt: skip
    assert first_title_named("The Iron Tide Rises tonight", nested).title == "The Iron Tide Rises"
    assert first_title_named("Iron Tide, then The Iron Tide Rises", nested).title == "Iron Tide"
    assert first_title_named("", nested) is None


def test_search_hit_exact_cases():
    meta = {"task": "search", "title": "Iron Signal"}
    assert search_hit(meta, 'That would be "Iron Signal" (1995).', SMALL_CATALOG)
    assert not search_hit(meta, 'That would be "The Silent Harbor".', SMALL_CATALOG)
    assert not search_hit(meta, '"The Silent Harbor", not "Iron Signal".', SMALL_CATALOG)
    assert not search_hit(meta, "I don't know.", SMALL_CATALOG)


def test_evaluate_exact_metrics():
    titles = make_catalog(0)
    drama_1980s = next(t for t in titles if t.genre == "drama" and t.decade == 1980)
    comedy = next(t for t in titles if t.genre == "comedy")
    records = [
        {"messages": [], "meta": {"task": "recommend", "constraints": {"genre": "drama", "decade": 1980}}},
        {"messages": [], "meta": json.dumps({"task": "recommend", "constraints": {"genre": "drama"}})},
        {"messages": [], "meta": {"task": "search", "title": comedy.title}},
        {"messages": [], "meta": {"task": "qa", "title": comedy.title, "field": "year"}},
    ]
    answers = [f'"{drama_1980s.title}"', f'"{comedy.title}"', f'It is "{comedy.title}".',
               f'"{comedy.title}" came out in {comedy.year}.']
    # task_score: every request kind counts, 3 of 4 are right (the second recommendation is a comedy).
    assert evaluate(records, answers) == {
        "task_score": 0.75,
        "recommend_valid": 0.5,
        "search_hit_at_1": 1.0,
        "qa_accuracy": 1.0,
        "num_recommend": 2.0,
        "num_search": 1.0,
        "num_qa": 1.0,
    }
    assert evaluate(records[3:], ["1999"]) == {
        "task_score": 0.0,
        "recommend_valid": 0.0,
        "search_hit_at_1": 0.0,
        "qa_accuracy": 0.0,
        "num_recommend": 0.0,
        "num_search": 0.0,
        "num_qa": 1.0,
    }
    assert catalog.CATALOG_EVALUATOR is evaluate
    with pytest.raises(ValueError, match="2 records but 1 answers"):
        evaluate(records[:2], answers[:1])


def test_task_prompt_drops_final_assistant_turn():
    assert task_prompt({"messages": TWO_TURN, "meta": {}}) == TWO_TURN[:4]
    record = next(r for r in generate_conversations(100) if len(r["messages"]) >= 5)
    prompt = task_prompt(record)
    assert prompt == record["messages"][:-1] and prompt[-1]["role"] == "user"
    prompt[0]["content"] = "changed"  # a copy: the record is untouched
    assert record["messages"][0]["content"] != "changed"
    with pytest.raises(ValueError, match="no assistant turn"):
        task_prompt({"messages": [{"role": "user", "content": "Hi"}]})


# ---------------------------------------------------------------- registry of builtins


def test_builtin_lookups():
    assert list(builtin.builtin_dataset("catalog", num_conversations=5, seed=2)) == list(
        generate_conversations(5, seed=2)
    )
    assert builtin.builtin_evaluator("catalog") is evaluate
    assert builtin.BUILTIN_MODELS == {"tiny-llama": tiny_llama.build_tiny_llama,
                                      "tiny-llama-student": tiny_llama.build_tiny_llama_student}
    with pytest.raises(ValueError, match=r"unknown builtin model 'huge-llama'; known: tiny-llama, tiny-llama-student"):
        builtin.ensure_builtin_model("huge-llama", Path("/nonexistent"))
    with pytest.raises(ValueError, match=r"unknown builtin dataset 'movies'; known: catalog"):
        builtin.builtin_dataset("movies", 1, 0)
    with pytest.raises(ValueError, match=r"unknown builtin evaluator 'builtin:catalog'; known: catalog"):
        builtin.builtin_evaluator("builtin:catalog")


# ---------------------------------------------------------------- tiny llama


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model_dir(cache_root) -> Path:
    return builtin.ensure_builtin_model("tiny-llama", cache_root)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_layout_and_model(model_dir, cache_root):
    import torch
    from transformers import AutoModelForCausalLM

    assert model_dir == cache_root / "builtin" / "tiny-llama-v1"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "BUILD_COMPLETE",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (model_dir / "BUILD_COMPLETE").read_text() == "tiny-llama-v1 seed=0\n"
    # No staging folders left beside it.
    assert [p.name for p in model_dir.parent.iterdir()] == ["tiny-llama-v1"]

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (192, 4, 6)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (2, 512, 1024)
    assert (config.vocab_size, config.tie_word_embeddings) == (2048, True)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (None, 2, 0)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert model.num_parameters() == 1_967_808
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    embeddings = model.model.embed_tokens.weight
    assert torch.count_nonzero(embeddings[0]) == 0  # the pad row
    assert abs(embeddings[1:].std().item() - config.initializer_range) < 1e-3
    assert torch.equal(model.model.norm.weight, torch.ones(192))
    logits = model(torch.tensor([[1, 10, 20, 2]])).logits
    assert logits.shape == (1, 4, 2048)


def test_tokenizer_special_tokens_are_single_ids(tokenizer):
    assert len(tokenizer) == 2048
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    ids = tokenizer("<|im_start|>user\nHi<|im_end|>\n")["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<|im_start|>", "user", "Ċ"]
    # No BOS/EOS added around plain text.
    assert tokenizer("Hi")["input_ids"] == tokenizer.convert_tokens_to_ids(["H", "i"])


def test_tokenizer_round_trips_any_text(tokenizer):
    text = 'Zoë\'s "café" — 日本語, emoji 🎬, tabs\tand\n\nnewlines  '
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_format_and_generation_prompt(tokenizer):
    assert tokenizer.apply_chat_template(TWO_TURN, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there<|im_end|>\n"
        "<|im_start|>user\nRecommend a film<|im_end|>\n"
        '<|im_start|>assistant\nI recommend "Iron Tide".<|im_end|>\n'
    )
    tool_turn = [{"role": "tool", "content": "42"}]
    assert tokenizer.apply_chat_template(tool_turn, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(Exception, match="Unknown role: narrator"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_chat_template_assistant_mask_is_exact(tokenizer):
    out = tokenizer.apply_chat_template(TWO_TURN, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # Contiguous masked runs, decoded one by one.
    runs, current = [], []
    for token_id, flag in zip(ids, mask):
        if flag:
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert not current  # the final "\n" is not masked
    assert runs == ["Hello there<|im_end|>", 'I recommend "Iron Tide".<|im_end|>']
    assert ids.count(1) == 5 and ids.count(2) == 5
    assert sum(mask) == len(tokenizer("Hello there<|im_end|>")["input_ids"]) + len(
        tokenizer('I recommend "Iron Tide".<|im_end|>')["input_ids"]
    )


def test_catalog_conversations_fit_in_256_tokens(tokenizer):
    records = list(generate_conversations(500, seed=11))
    lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in records]
    assert max(lengths) < 256
    assert max(lengths) < 200  # the design target, with margin


def test_build_is_reproducible_across_processes(model_dir, tmp_path):
    # A fresh interpreter (other hash seed, other thread scheduling) must give the same bytes.
    dest = tmp_path / "again"
    code = (
        "import sys; from pathlib import Path; from steps.builtin.tiny_llama import build_tiny_llama; "
        "build_tiny_llama(Path(sys.argv[1]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(dest)], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    assert _file_digests(dest) == _file_digests(model_dir)


def test_different_seed_changes_weights_only(model_dir, tmp_path):
    import torch

    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    other = tiny_llama.build_tiny_llama(tmp_path / "seed1", seed=1)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG stream is untouched
    assert (other / "BUILD_COMPLETE").read_text() == "tiny-llama-v1 seed=1\n"
    digests, base = _file_digests(other), _file_digests(model_dir)
    changed = sorted(name for name in base if digests[name] != base[name])
    assert changed == ["BUILD_COMPLETE", "model.safetensors"]


def test_ensure_reuses_a_complete_build(model_dir, cache_root, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a complete build")

    monkeypatch.setattr(tiny_llama, "_write_build", fail)
    assert builtin.ensure_builtin_model("tiny-llama", cache_root) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_incomplete_dest_is_replaced(model_dir, tmp_path):
    dest = tmp_path / "tiny"
    dest.mkdir()
    (dest / "config.json").write_text("{half written")  # no BUILD_COMPLETE marker
    assert tiny_llama.build_tiny_llama(dest) == dest
    assert _file_digests(dest) == _file_digests(model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_losing_a_build_race_keeps_the_winner(model_dir, tmp_path, monkeypatch):
    import shutil

    dest = tmp_path / "tiny"
    original = tiny_llama._write_build

    def write_then_lose(folder, seed, size):
        original(folder, seed, size)
        shutil.copytree(model_dir, dest)  # the other process renames first
        (dest / "winner").write_text("")

    monkeypatch.setattr(tiny_llama, "_write_build", write_then_lose)
    assert tiny_llama.build_tiny_llama(dest) == dest
    assert (dest / "winner").exists()  # theirs, not ours
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # our staging folder is gone


def test_concurrent_builds_both_succeed(model_dir, tmp_path):
    dest = tmp_path / "tiny"
    results, errors = [], []

    def build():
        try:
            results.append(tiny_llama.build_tiny_llama(dest))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [dest, dest]
    assert _file_digests(dest) == _file_digests(model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
