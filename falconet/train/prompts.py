"""Synthetic instruction prompts to collect a model's own outputs from (no dataset download).

Templates crossed with topics, numbers and short texts, all written for Falconet. They cover
the kinds of requests the Spec-Bench categories hold (explanations, writing, advice, lists,
translation, rewriting, arithmetic word problems, questions over a given text) without reusing
the benchmark's prompts (falconet/bench/data/spec_bench.jsonl).
"""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "vaccines", "compound interest", "the printing press",
    "volcanoes", "machine learning", "the Roman Empire", "coral reefs", "electric cars", "inflation",
    "the human heart", "plate tectonics", "recycling", "the internet", "honey bees", "solar panels",
    "the French Revolution", "earthquakes", "sleep", "coffee", "the Moon landing", "antibiotics",
    "rainforests", "climate change", "the stock market", "DNA", "chess", "jazz music",
    "the Great Wall of China",
    "glaciers", "democracy", "renewable energy", "the immune system", "bread baking", "marathon training",
    "time management", "public speaking", "learning a language", "gardening", "saving money",
    "cloud computing",
    "the Olympic Games", "migratory birds", "nuclear fusion", "ancient Egypt", "the periodic table",
    "smartphones", "team meetings", "job interviews", "healthy breakfast", "city parks", "museums",
    "remote work", "bicycles", "tea ceremonies", "wind turbines", "the Silk Road", "octopuses",
]  # fmt: skip

TEMPLATES = [
    "Explain {topic} in simple terms.",
    "What is {topic}? Answer in a short paragraph.",
    "Give me three interesting facts about {topic}.",
    "Write a short story that involves {topic}.",
    "Write a haiku about {topic}.",
    "List five tips related to {topic}.",
    "Why is {topic} important? Explain briefly.",
    "Write a short email to a friend about {topic}.",
    "Describe the history of {topic} in a few sentences.",
    "What are the pros and cons of {topic}?",
    "Write a product description for a book about {topic}.",
    "How would you teach a child about {topic}?",
    "Summarize what people should know about {topic} in two sentences.",
    "Write a short blog post introduction about {topic}.",
    "Compare {topic} and {other} in a few sentences.",
    "Write a short poem about {topic} and {other}.",
]

SENTENCES = [
    "The train leaves at seven in the morning.", "I would like a cup of tea, please.",
    "Our team finished the project ahead of schedule.", "The museum is closed on Mondays.",
    "She planted tomatoes and basil in her garden.", "Please send me the report by Friday.",
    "The weather will be sunny tomorrow.", "He is learning to play the guitar.",
    "We are meeting at the library after lunch.", "The children played in the park until sunset.",
    "This restaurant serves the best soup in town.", "My brother works as a nurse in the city hospital.",
]  # fmt: skip
LANGUAGES = ["French", "German", "Spanish", "Italian", "Portuguese"]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon"]
ITEMS = [("apples", 2), ("notebooks", 3), ("tickets", 12), ("books", 8), ("pencils", 1), ("plants", 5)]


def _math(rng: random.Random) -> str:
    name, (item, price) = rng.choice(NAMES), rng.choice(ITEMS)
    count, extra = rng.randint(2, 9), rng.randint(2, 6)
    forms = [
        f"{name} buys {count} {item} at ${price} each and {extra} more the next day. How much does {name} "
        "spend in total? Think step by step.",
        f"{name} has {count * extra} {item} and shares them equally among {extra} friends. How many "
        "does each friend get? Explain your reasoning.",
        f"A shop sells {item} for ${price} each. {name} has ${price * count + extra}. How many {item} can "
        f"{name} buy, and how much money is left? Think step by step.",
    ]
    return rng.choice(forms)


def _passage(rng: random.Random) -> str:
    topic, other = rng.sample(TOPICS, 2)
    facts = [
        f"Many people are curious about {topic}.",
        f"Researchers have studied {topic} for many years and keep finding new details.",
        f"Some experts link {topic} to {other}, although the connection is debated.",
        f"Schools often teach the basics of {topic} to students at an early age.",
        f"Interest in {topic} grew quickly during the last decade.",
    ]
    rng.shuffle(facts)
    text = " ".join(facts[: rng.randint(3, 5)])
    task = rng.choice([
        "Summarize the following text in one sentence:",
        "Rewrite the following text in a more formal tone:",
        f"Read the text and answer: what is said about {other}?",
    ])  # fmt: skip
    return f"{task}\n\n{text}"


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """n instruction prompts, deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.55:
            topic, other = rng.sample(TOPICS, 2)
            out.append(rng.choice(TEMPLATES).format(topic=topic, other=other))
        elif kind < 0.7:
            out.append(f"Translate into {rng.choice(LANGUAGES)}: {rng.choice(SENTENCES)}")
        elif kind < 0.85:
            out.append(_math(rng))
        else:
            out.append(_passage(rng))
    return out


def self_written_prompts(engine, n: int, seed: int = 0, max_tokens: int = 64) -> list[str]:
    """Up to n user requests written by the model itself: sampled (temperature 1, top-p 0.95)
    from the start of a user turn, the chat template rendered up to where the user's text goes.

    Self-distillation data as Medusa (Cai et al., 2024) makes it for its heads: the model's own
    idea of what users ask is far more varied than templates, so a head trained on the answers
    generalises to prompts it has not seen. Deduplicated; empty ones dropped."""
    from falconet.sampling_params import SamplingParams

    ids = user_turn_prefix(engine.tokenizer)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95)
    reqs = [engine.add_request(ids, params, seed=seed * 1_000_003 + i) for i in range(n)]
    while engine.has_unfinished():
        engine.step()
    return distinct_requests([r.output_text for r in reqs])


def self_written_prompts_dense(loaded, n: int, seed: int = 0, max_tokens: int = 64) -> list[str]:
    """`self_written_prompts` sampled by train/generate.py on the model's own device."""
    from falconet.train.generate import generate

    ids = user_turn_prefix(loaded.tokenizer)
    eos = loaded.config.eos_token_ids
    outs = generate(
        loaded.model, [ids] * n, max_tokens, eos, temperature=1.0, top_p=0.95, seed=seed, batch_size=512
    )
    return distinct_requests([loaded.tokenizer.decode(o.output_ids) for o in outs])


def user_turn_prefix(tokenizer) -> list[int]:
    """The chat template's ids up to where a user's text goes."""
    marker = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=False)
    prefix = text[: text.index(marker)]
    has_bos = tokenizer.bos_token is not None and prefix.startswith(tokenizer.bos_token)
    return tokenizer.encode(prefix, add_special_tokens=not has_bos)


def distinct_requests(texts: list[str]) -> list[str]:
    seen, out = set(), []
    for text in texts:
        text = text.strip()
        if len(text) >= 8 and text not in seen:
            seen.add(text)
            out.append(text)
    return out
