"""Synthetic conversations for timing `ochat viz map` at scale (nothing is downloaded):

    ochat data synth --kind texts --n 10000 --out /tmp/synthetic.text.jsonl

Each line has the shape of the data pipeline's PREFIX.train.text.jsonl: topics drawn from a small
set, 1-4 exchanges, answers from one sentence to a few paragraphs (many beyond the embedder's
token budget, like real ShareGPT conversations)."""

from __future__ import annotations

import json
import os
import random

from ochat.utils.atomic import atomic_path

TOPICS = {
    "python": ["list comprehension", "decorator", "virtual environment", "pandas dataframe", "asyncio event loop"],
    "javascript": ["promise chain", "React hook", "closure", "npm package", "DOM event listener"],
    "sql": ["left join", "index on a column", "window function", "transaction isolation", "query plan"],
    "cooking": ["sourdough starter", "risotto", "roast chicken", "vegan curry", "chocolate cake"],
    "travel": ["trip to Japan", "budget backpacking in Europe", "visa for Canada", "road trip in Iceland", "packing list"],
    "fitness": ["marathon training plan", "strength routine", "stretching", "protein intake", "knee pain after running"],
    "finance": ["index funds", "monthly budget", "credit score", "mortgage refinancing", "retirement savings"],
    "history": ["Roman Empire", "French Revolution", "Cold War", "Ming dynasty", "Industrial Revolution"],
    "physics": ["quantum entanglement", "special relativity", "entropy", "black holes", "electromagnetic waves"],
    "math": ["eigenvalues", "prime numbers", "integration by parts", "Bayes theorem", "group theory"],
    "writing": ["cover letter", "short story opening", "wedding speech", "blog post outline", "poem about autumn"],
    "health": ["sleep hygiene", "seasonal allergies", "migraine triggers", "vitamin D", "stress management"],
    "gardening": ["tomato seedlings", "composting", "pruning roses", "indoor herbs", "lawn care"],
    "music": ["guitar chords", "music theory scales", "home recording", "piano practice", "jazz improvisation"],
    "career": ["job interview", "salary negotiation", "switching to data science", "remote work", "asking for a promotion"],
    "pets": ["puppy training", "cat litter", "aquarium setup", "dog nutrition", "adopting a rabbit"],
}
ASK = ["Can you explain {t}?", "How do I get started with {t}?", "What are common mistakes with {t}?",
       "Give me a step-by-step guide to {t}.", "I'm confused about {t} in {d}. Help?", "Compare two approaches to {t}."]
SAY = ["When it comes to {t}, the key idea in {d} is to start simple and build up.",
       "A common mistake with {t} is skipping the basics; experts in {d} recommend practice.",
       "Here is a practical example of {t} that most people interested in {d} find useful.",
       "First, understand why {t} matters. Second, try a small experiment. Third, review the results.",
       "Many beginners in {d} ask about {t}; the short answer is that it depends on your goals.",
       "To summarise: {t} rewards patience, and the resources of the {d} community help a lot."]


def conversation(rng: random.Random, i: int) -> dict:
    domain = rng.choice(list(TOPICS))
    items = []
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        topic = rng.choice(TOPICS[domain])
        items.append({"role": "user", "content": rng.choice(ASK).format(t=topic, d=domain), "weight": 0.0})
        sentences = [rng.choice(SAY).format(t=topic, d=domain) for _ in range(rng.choice([1, 3, 8, 20, 40]))]
        items.append({"role": "assistant", "content": " ".join(sentences), "weight": 1.0})
    text = "".join(f"GPT4 Correct {'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}<|end_of_turn|>"
                   for m in items)
    return {"id": f"synthetic-{i}", "text": text,
            "conversation": {"items": items, "condition": "GPT4 Correct", "system": ""}}


def write_texts(out: str | os.PathLike, n: int, seed: int = 0) -> int:
    """Write `n` conversations as PREFIX.train.text.jsonl lines to the file `out` (atomically)."""
    rng = random.Random(seed)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(conversation(rng, i), ensure_ascii=False) + "\n")
    return n
