"""The example dataset: a fictional streaming catalog and an assistant that knows it.

Everything here is generated from a seed with a private ``random.Random``, so the
same seed gives the same catalog and the same conversations on every machine.

Three kinds of conversation are generated (about 50% / 30% / 20%):

- ``recommend``: the user asks for a title under constraints (genre, decade, mood);
  the assistant names one catalog title that satisfies all of them::

      user:      Can you recommend a tense thriller from the 1980s?
      assistant: I recommend "The Silent Harbor" (1987), a tense thriller starring Ana Reyes.
      meta:      {"task": "recommend", "constraints": {"genre": "thriller", "decade": 1980, "mood": "tense"}}

- ``search``: the user describes a title and asks which it is::

      user:      What's the name of the thriller from 1987 starring Ana Reyes?
      assistant: That would be "The Silent Harbor" (1987), starring Ana Reyes and Tomas Berg.
      meta:      {"task": "search", "title": "The Silent Harbor"}

- ``qa``: a question about a named title (cast, year or genre)::

      user:      When was "The Silent Harbor" released?
      assistant: "The Silent Harbor" was released in 1987.
      meta:      {"task": "qa", "title": "The Silent Harbor", "field": "year"}

About 30% of conversations have 2 or 3 exchanges, and ``meta`` always describes the
last one, which is the exchange that is scored. About 30% start with a system prompt.

The task score (:func:`evaluate`) is the share of held-out requests answered
correctly, over all three kinds, and it is honest: a recommendation counts only if the
first catalog title the answer names exists and satisfies every constraint (which the
generator guarantees is possible: it picks the title first and then asks for a subset
of that title's attributes); a search only if that title is the one described; a
question only if the named title's asked facts follow.

The catalog itself is always ``make_catalog(0)`` for the conversations and the
scorer; the ``seed`` of :func:`generate_conversations` only varies the requests.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GENRES: tuple[str, ...] = (
    "drama",
    "comedy",
    "thriller",
    "sci-fi",
    "horror",
    "romance",
    "documentary",
    "animation",
)
MOODS: tuple[str, ...] = ("dark", "uplifting", "funny", "tense", "heartwarming", "mind-bending")
MIN_YEAR = 1970
MAX_YEAR = 2024
NUM_TITLES = 150

# How a genre reads as a noun in a sentence ("a tense thriller", "an animated film").
_GENRE_NOUNS: dict[str, str] = {
    "drama": "drama",
    "comedy": "comedy",
    "thriller": "thriller",
    "sci-fi": "sci-fi film",
    "horror": "horror film",
    "romance": "romance",
    "documentary": "documentary",
    "animation": "animated film",
}

ACTORS: tuple[str, ...] = (
    "Ana Reyes", "Tomas Berg", "Lena Okafor", "Marcus Hale", "Priya Nair",
    "Jonah Whitfield", "Sofia Marchetti", "Daniel Osei", "Mei Tanaka", "Elias Brandt",
    "Clara Dubois", "Rafael Ortega", "Nadia Petrov", "Owen Gallagher", "Ingrid Holm",
    "Samuel Adeyemi", "Hana Kimura", "Victor Lindqvist", "Amara Singh", "Felix Moreau",
    "Greta Novak", "Theo Castillo", "Yara Haddad", "Leo Fitzgerald", "Zoe Achterberg",
    "Kofi Mensah", "Iris Valdez", "Bruno Keller", "Maya Lindgren", "Aaron Blackwood",
    "Nina Kowalski", "Hugo Ferreira", "Lucia Romano", "Dev Malhotra", "Elsa Virtanen",
    "Oscar Whitlock", "Rosa Almeida", "Kai Nakamura", "Tessa Morrow", "Jude Okonkwo",
)  # fmt: skip

_TITLE_ADJECTIVES: tuple[str, ...] = (
    "Silent", "Crimson", "Hidden", "Broken", "Golden", "Endless", "Frozen", "Burning",
    "Hollow", "Distant", "Velvet", "Wandering", "Forgotten", "Electric", "Paper",
    "Midnight", "Copper", "Glass", "Scarlet", "Quiet", "Restless", "Iron", "Lonely",
    "Secret", "Northern", "Falling", "Silver", "Bitter", "Gentle", "Savage",
)  # fmt: skip
_TITLE_NOUNS: tuple[str, ...] = (
    "Harbor", "Garden", "Signal", "Orchard", "Lantern", "Frontier", "Mirror", "River",
    "Engine", "Tide", "Compass", "Meadow", "Kingdom", "Circuit", "Echo", "Canyon",
    "Letter", "Station", "Horizon", "Island", "Forest", "Window", "Orbit", "Summer",
    "Carnival", "Witness", "Voyage", "Shadow", "Anchor", "Bridge",
)  # fmt: skip
_TITLE_PLURALS: tuple[str, ...] = (
    "Ghosts", "Daughters", "Lights", "Songs", "Thieves", "Bells", "Keepers", "Wolves",
    "Saints", "Strangers",
)  # fmt: skip
_TITLE_PLACES: tuple[str, ...] = (
    "Ashford", "Oakhaven", "Redwater", "Marrowby", "Kestrel", "Lumen", "Brightmoor",
    "Solace", "Veridia", "Thornfield", "Calder", "Wyncrest",
)  # fmt: skip

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant for a streaming service.",
    "You are CineBot, a movie recommendation assistant. Answer briefly.",
    "You help users find titles in the catalog. Only name titles that exist in the catalog.",
)

_RECOMMEND_TEMPLATES: tuple[str, ...] = (
    "Can you recommend {np}?",
    "I'm in the mood for {np}. Any ideas?",
    "Suggest {np}, please.",
    "What should I watch tonight? I'd like {np}.",
    "Looking for {np}. What do you have?",
    "Recommend me {np}.",
    "Pick {np} for me.",
    "Any tips for {np}?",
    "I want to watch {np}. What would you suggest?",
)
_SEARCH_TEMPLATES: tuple[str, ...] = (
    "Which title is {d}?",
    "What's the name of {d}?",
    "I'm trying to remember {d}. What is it called?",
    "Help me find {d}.",
    "What was {d} called again?",
    "Do you know {d}? I forgot the title.",
)
_QA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cast": (
        'Who stars in "{t}"?',
        'Who is in the cast of "{t}"?',
        'Which actors appear in "{t}"?',
    ),
    "year": (
        'What year did "{t}" come out?',
        'When was "{t}" released?',
        'Which year is "{t}" from?',
    ),
    "genre": (
        'What genre is "{t}"?',
        'What kind of film is "{t}"?',
        'Is "{t}" a comedy, a drama, or something else?',
    ),
}

# Clue sets for search descriptions, tried in a random order; the first one that
# matches exactly one title is used. (genre, year) is unique by construction of the
# catalog, so the last fallback always identifies the title.
_SEARCH_CLUE_SETS: tuple[tuple[str, ...], ...] = (
    ("genre", "year", "actor"),
    ("genre", "year", "mood"),
    ("actor", "year"),
    ("mood", "genre", "actor"),
    ("actor", "mood"),
    ("genre", "year"),
)


@dataclass(frozen=True, slots=True)
class Title:
    """One catalog entry.

    Example:
        >>> t = Title("The Silent Harbor", "thriller", 1987, "tense", ("Ana Reyes", "Tomas Berg"))
        >>> t.decade
        1980
    """

    title: str
    genre: str
    year: int
    mood: str
    cast: tuple[str, str]

    @property
    def decade(self) -> int:
        return self.year // 10 * 10


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _make_title_name(rng: random.Random) -> str:
    pattern = rng.randrange(4)
    if pattern == 0:
        return f"The {rng.choice(_TITLE_ADJECTIVES)} {rng.choice(_TITLE_NOUNS)}"
    if pattern == 1:
        return f"{rng.choice(_TITLE_ADJECTIVES)} {rng.choice(_TITLE_NOUNS)}"
    if pattern == 2:
        return f"The {rng.choice(_TITLE_PLURALS)} of {rng.choice(_TITLE_PLACES)}"
    return f"{rng.choice(_TITLE_NOUNS)} at {rng.choice(_TITLE_PLACES)}"


def make_catalog(seed: int = 0) -> list[Title]:
    """Generate the fictional catalog of ``NUM_TITLES`` titles.

    Guarantees that make the task well posed:
    - titles are unique and no title is a substring of another, so "the first title
      named in an answer" is unambiguous;
    - (genre, year) is unique, so a search description can always identify one title;
    - the two cast members of a title are different people.

    Example:
        >>> catalog = make_catalog(0)
        >>> len(catalog), catalog == make_catalog(0), catalog == make_catalog(1)
        (150, True, False)
    """
    rng = random.Random(seed)
    titles: list[Title] = []
    names: list[str] = []
    used_genre_years: set[tuple[str, int]] = set()
    while len(titles) < NUM_TITLES:
        name = _make_title_name(rng)
        if any(name in other or other in name for other in names):
            continue
        genre = rng.choice(GENRES)
        year = rng.randint(MIN_YEAR, MAX_YEAR)
        if (genre, year) in used_genre_years:
            continue
        mood = rng.choice(MOODS)
        first, second = rng.sample(ACTORS, 2)
        names.append(name)
        used_genre_years.add((genre, year))
        titles.append(Title(name, genre, year, mood, (first, second)))
    return titles


@functools.cache
def _default_catalog() -> tuple[Title, ...]:
    return tuple(make_catalog(0))


def _resolve(catalog: Sequence[Title] | None) -> Sequence[Title]:
    return _default_catalog() if catalog is None else catalog


def catalog_as_text(catalog: Sequence[Title] | None = None) -> str:
    """One sentence per title, e.g. for training a tokenizer on the catalog's words.

    Example:
        >>> catalog_as_text([Title("Echo at Ashford", "drama", 1999, "dark", ("Ana Reyes", "Kai Nakamura"))])
        '"Echo at Ashford" (1999) is a dark drama starring Ana Reyes and Kai Nakamura.\\n'
    """
    lines = [
        f'"{t.title}" ({t.year}) is {_article(t.mood)} {t.mood} {_GENRE_NOUNS[t.genre]} '
        f"starring {t.cast[0]} and {t.cast[1]}.\n"
        for t in _resolve(catalog)
    ]
    return "".join(lines)


# ---------------------------------------------------------------- generation


def _recommend_exchange(rng: random.Random, catalog: Sequence[Title]) -> tuple[str, str, dict[str, Any]]:
    title = rng.choice(catalog)
    # Pick the title first and ask for a non-empty subset of its own attributes:
    # every request is satisfiable, and title itself is a valid reference answer.
    keys = [k for k in ("genre", "decade", "mood") if rng.random() < 0.6]
    if not keys:
        keys = [rng.choice(("genre", "decade", "mood"))]
    constraints: dict[str, Any] = {}
    for key in keys:
        constraints[key] = title.decade if key == "decade" else getattr(title, key)

    if rng.random() < 0.15:
        # A terse, form-like request: "Genre: thriller. Decade: 1980s."
        parts = []
        if "genre" in constraints:
            parts.append(f"Genre: {title.genre}.")
        if "decade" in constraints:
            parts.append(f"Decade: {title.decade}s.")
        if "mood" in constraints:
            parts.append(f"Mood: {title.mood}.")
        user = "Recommendation please. " + " ".join(parts)
    else:
        words = []
        if "mood" in constraints:
            words.append(title.mood)
        words.append(_GENRE_NOUNS[title.genre] if "genre" in constraints else rng.choice(("film", "movie", "title")))
        np = f"{_article(words[0])} {' '.join(words)}"
        if "decade" in constraints:
            np += f" {rng.choice(('from', 'made in', 'released in'))} the {title.decade}s"
        user = rng.choice(_RECOMMEND_TEMPLATES).format(np=np)

    return user, _recommend_answer(title), {"task": "recommend", "constraints": constraints}


def _recommend_answer(title: Title) -> str:
    return (
        f'I recommend "{title.title}" ({title.year}), {_article(title.mood)} {title.mood} '
        f"{_GENRE_NOUNS[title.genre]} starring {title.cast[0]}."
    )


def _matches_clues(candidate: Title, title: Title, clues: Sequence[str], actor: str) -> bool:
    for clue in clues:
        if clue == "actor":
            if actor not in candidate.cast:
                return False
        elif getattr(candidate, clue) != getattr(title, clue):
            return False
    return True


def _search_exchange(rng: random.Random, catalog: Sequence[Title]) -> tuple[str, str, dict[str, Any]]:
    title = rng.choice(catalog)
    actor = rng.choice(title.cast)
    clue_sets = list(_SEARCH_CLUE_SETS)
    rng.shuffle(clue_sets)
    clue_sets.append(("genre", "year"))  # unique by construction of the catalog
    for clues in clue_sets:
        if sum(_matches_clues(c, title, clues, actor) for c in catalog) == 1:
            break

    head = ["the"]
    if "mood" in clues:
        head.append(title.mood)
    head.append(_GENRE_NOUNS[title.genre] if "genre" in clues else rng.choice(("film", "movie", "title")))
    description = " ".join(head)
    if "year" in clues:
        description += f" {rng.choice(('from', 'released in'))} {title.year}"
    if "actor" in clues:
        description += f" {rng.choice(('starring', 'with'))} {actor}"
    user = rng.choice(_SEARCH_TEMPLATES).format(d=description)
    return user, _search_answer(title), {"task": "search", "title": title.title}


def _search_answer(title: Title) -> str:
    return f'That would be "{title.title}" ({title.year}), starring {title.cast[0]} and {title.cast[1]}.'


def _qa_exchange(rng: random.Random, catalog: Sequence[Title]) -> tuple[str, str, dict[str, Any]]:
    title = rng.choice(catalog)
    field = rng.choice(("cast", "year", "genre"))
    user = rng.choice(_QA_TEMPLATES[field]).format(t=title.title)
    return user, _qa_answer(title, field), {"task": "qa", "title": title.title, "field": field}


def _qa_answer(title: Title, field: str, facts: Title | None = None) -> str:
    """The answer about ``title``'s ``field``, with the facts of ``facts`` (default: its own)."""
    facts = facts or title
    if field == "cast":
        return f'"{title.title}" stars {facts.cast[0]} and {facts.cast[1]}.'
    if field == "year":
        return f'"{title.title}" was released in {facts.year}.'
    return f'"{title.title}" is {_article(facts.mood)} {facts.mood} {_GENRE_NOUNS[facts.genre]}.'


def _exchange(rng: random.Random, catalog: Sequence[Title]) -> tuple[str, str, dict[str, Any]]:
    draw = rng.random()
    if draw < 0.5:
        return _recommend_exchange(rng, catalog)
    if draw < 0.8:
        return _search_exchange(rng, catalog)
    return _qa_exchange(rng, catalog)


def generate_conversations(
    num_conversations: int, seed: int = 0, catalog: Sequence[Title] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield ``num_conversations`` records ``{"messages": [...], "meta": {...}}``.

    The stream is sequential, so a shorter request is a prefix of a longer one with
    the same seed: ``list(generate_conversations(5))`` equals the first five of
    ``generate_conversations(500)``.

    Example:
        >>> record = next(generate_conversations(1, seed=0))
        >>> sorted(record), record["messages"][-1]["role"]
        (['messages', 'meta'], 'assistant')
    """
    if num_conversations < 0:
        raise ValueError(f"num_conversations must be >= 0, got {num_conversations}")
    catalog = _resolve(catalog)
    rng = random.Random(seed)
    for _ in range(num_conversations):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        num_exchanges = rng.choice((2, 3)) if rng.random() < 0.3 else 1
        meta: dict[str, Any] = {}
        for _ in range(num_exchanges):
            user, assistant, meta = _exchange(rng, catalog)
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        yield {"messages": messages, "meta": meta}


def generate_preference_pairs(
    num_pairs: int, seed: int = 0, catalog: Sequence[Title] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield ``num_pairs`` preference records ``{"prompt", "chosen", "rejected", "meta"}`` (``builtin:catalog-pairs``).

    The prompt and the chosen answer are those of :func:`generate_conversations` (same seed,
    same requests); the rejected answer is the same sentence about a title that fails the
    request: for ``recommend``, a title that breaks a constraint (``recommendation_is_valid``
    is False); for ``search``, another title; for ``qa``, the named title with another
    title's (different) facts. So preferring ``chosen`` is exactly what the task score rewards.

    Example:
        >>> record = next(generate_preference_pairs(1, seed=0))
        >>> sorted(record), [m["role"] for m in record["chosen"]], record["meta"]["task"]
        (['chosen', 'meta', 'prompt', 'rejected'], ['assistant'], 'recommend')
        >>> recommendation_is_valid(record["meta"], record["chosen"][0]["content"])
        True
        >>> recommendation_is_valid(record["meta"], record["rejected"][0]["content"])
        False
    """
    catalog = _resolve(catalog)
    # Its own stream: the requests stay those of generate_conversations(num_pairs, seed).
    rng = random.Random(seed * 1_000_003 + 17)
    for record in generate_conversations(num_pairs, seed=seed, catalog=catalog):
        *prompt, answer = record["messages"]
        meta = record["meta"]
        named = first_title_named(answer["content"], catalog)
        while True:
            wrong = rng.choice(catalog)
            if meta["task"] == "recommend":
                rejected = _recommend_answer(wrong)
                if not recommendation_is_valid(meta, rejected, catalog):
                    break
            elif meta["task"] == "search":
                if wrong != named:
                    rejected = _search_answer(wrong)
                    break
            else:
                rejected = _qa_answer(named, meta["field"], facts=wrong)
                if rejected != answer["content"]:
                    break
        yield {"prompt": prompt, "chosen": [answer], "rejected": [{"role": "assistant", "content": rejected}],
               "meta": meta}


# ---------------------------------------------------------------- scoring


def first_title_named(answer: str, catalog: Sequence[Title] | None = None) -> Title | None:
    """The catalog title whose exact name occurs earliest in ``answer``, or None.

    Example:
        >>> catalog = [Title("Echo at Ashford", "drama", 1999, "dark", ("Ana Reyes", "Kai Nakamura")),
        ...            Title("Iron Tide", "comedy", 2003, "funny", ("Ana Reyes", "Tessa Morrow"))]
        >>> first_title_named('Try "Iron Tide", or "Echo at Ashford".', catalog).title
        'Iron Tide'
        >>> first_title_named("Try something else.", catalog) is None
        True
    """
    best: Title | None = None
    best_start = len(answer) + 1
    for title in _resolve(catalog):
        start = answer.find(title.title)
        # Ties at one start position go to the longer name; the default catalog has
        # no name inside another, but a caller's catalog might.
        if start != -1 and (
            start < best_start or (start == best_start and best is not None and len(title.title) > len(best.title))
        ):
            best, best_start = title, start
    return best


def recommendation_is_valid(
    meta: Mapping[str, Any], answer: str, catalog: Sequence[Title] | None = None
) -> bool:
    """True when the first title named in ``answer`` satisfies every constraint in ``meta``.

    Example:
        >>> catalog = [Title("Echo at Ashford", "drama", 1999, "dark", ("Ana Reyes", "Kai Nakamura"))]
        >>> meta = {"task": "recommend", "constraints": {"genre": "drama", "decade": 1990}}
        >>> recommendation_is_valid(meta, 'I recommend "Echo at Ashford" (1999).', catalog)
        True
        >>> recommendation_is_valid({"constraints": {"decade": 2000}}, '"Echo at Ashford"', catalog)
        False
    """
    title = first_title_named(answer, catalog)
    if title is None:
        return False
    for key, wanted in meta["constraints"].items():
        if key == "decade":
            if title.decade != int(wanted):
                return False
        elif key in ("genre", "mood"):
            if getattr(title, key) != wanted:
                return False
        else:
            raise ValueError(f"unknown recommend constraint {key!r}; known: genre, decade, mood")
    return True


def search_hit(meta: Mapping[str, Any], answer: str, catalog: Sequence[Title] | None = None) -> bool:
    """True when the first title named in ``answer`` is ``meta["title"]``.

    Example:
        >>> catalog = [Title("Echo at Ashford", "drama", 1999, "dark", ("Ana Reyes", "Kai Nakamura"))]
        >>> search_hit({"task": "search", "title": "Echo at Ashford"}, 'That would be "Echo at Ashford".', catalog)
        True
    """
    title = first_title_named(answer, catalog)
    return title is not None and title.title == meta["title"]


def qa_correct(meta: Mapping[str, Any], answer: str, catalog: Sequence[Title] | None = None) -> bool:
    """True when ``answer`` names ``meta["title"]`` first and states its ``meta["field"]`` rightly.

    ``year``: the release year appears; ``cast``: both leads appear; ``genre``: the genre's noun
    and the mood appear (the reference answers say "a dark drama"). Another title's facts fail.

    Example:
        >>> catalog = [Title("Echo at Ashford", "drama", 1999, "dark", ("Ana Reyes", "Kai Nakamura"))]
        >>> meta = {"task": "qa", "title": "Echo at Ashford", "field": "year"}
        >>> qa_correct(meta, '"Echo at Ashford" was released in 1999.', catalog)
        True
        >>> qa_correct(meta, '"Echo at Ashford" was released in 2003.', catalog)
        False
        >>> qa_correct({**meta, "field": "genre"}, '"Echo at Ashford" is a dark drama.', catalog)
        True
    """
    title = first_title_named(answer, catalog)
    if title is None or title.title != meta["title"]:
        return False
    rest = answer[answer.find(title.title) + len(title.title):]
    field = meta["field"]
    if field == "year":
        return str(title.year) in rest
    if field == "cast":
        return all(name in rest for name in title.cast[:2])
    if field == "genre":
        return _GENRE_NOUNS[title.genre] in rest and title.mood in rest
    raise ValueError(f"unknown qa field {field!r}; known: year, cast, genre")


def _meta_dict(record: Mapping[str, Any]) -> dict[str, Any]:
    # Shards store meta as a JSON string; accept either form so callers need not care.
    meta = record.get("meta") or {}
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


def evaluate(records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> dict[str, float]:
    """Score generated ``answers`` to ``task_prompt(record)`` for each record.

    This is the evaluator API: any callable ``(records, answers) -> dict[str, float]``, with an
    optional ``version`` attribute that changes whenever its numbers change meaning (the
    registry's gate compares only versions scored by the same evaluator versions).

    ``task_score`` is the share of all records answered correctly: a valid recommendation
    (``recommendation_is_valid``), a search hit (``search_hit``) or a correct answer
    (``qa_correct``), so it is also the mean of the three below weighted by their counts.
    ``recommend_valid``, ``search_hit_at_1`` and ``qa_accuracy`` are the shares per kind.
    Version 1 had ``task_score`` = ``recommend_valid``; the default SFT saturates that (~0.99).

    Example:
        >>> records = list(generate_conversations(20, seed=0))
        >>> references = [r["messages"][-1]["content"] for r in records]
        >>> scores = evaluate(records, references)
        >>> scores["task_score"], scores["search_hit_at_1"], scores["qa_accuracy"]
        (1.0, 1.0, 1.0)
    """
    if len(records) != len(answers):
        raise ValueError(f"got {len(records)} records but {len(answers)} answers")
    num_valid = num_recommend = num_hits = num_search = num_right = num_qa = 0
    for record, answer in zip(records, answers, strict=True):
        meta = _meta_dict(record)
        task = meta.get("task")
        if task == "recommend":
            num_recommend += 1
            num_valid += recommendation_is_valid(meta, answer)
        elif task == "search":
            num_search += 1
            num_hits += search_hit(meta, answer)
        elif task == "qa":
            num_qa += 1
            num_right += qa_correct(meta, answer)
    num_scored = num_recommend + num_search + num_qa
    return {
        "task_score": (num_valid + num_hits + num_right) / num_scored if num_scored else 0.0,
        "recommend_valid": num_valid / num_recommend if num_recommend else 0.0,
        "search_hit_at_1": num_hits / num_search if num_search else 0.0,
        "qa_accuracy": num_right / num_qa if num_qa else 0.0,
        "num_recommend": float(num_recommend),
        "num_search": float(num_search),
        "num_qa": float(num_qa),
    }


evaluate.version = 2  # type: ignore[attr-defined]  # 1: task_score was recommend_valid alone
CATALOG_EVALUATOR = evaluate


def task_prompt(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages before the final assistant turn: what the model must answer.

    Example:
        >>> record = {"messages": [{"role": "user", "content": "Hi"},
        ...                        {"role": "assistant", "content": "Hello"}], "meta": {}}
        >>> task_prompt(record)
        [{'role': 'user', 'content': 'Hi'}]
    """
    if record.get("messages") is None and record.get("prompt") is not None:
        return [dict(m) for m in record["prompt"]]  # a preference pair: its prompt is what is answered
    messages = list(record["messages"])
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            return [dict(m) for m in messages[:index]]
    raise ValueError("record has no assistant turn to hold out")
