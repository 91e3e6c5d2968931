"""Built-in synthetic multi-skill instruction data: short questions with exactly checkable answers.

The README demo uses it to show the federated benefit in minutes: each skill is its own
category, a partitioner gives every client two skills (non-IID), and ``fedit.eval.exact_match``
scores each skill. Skills were picked so that the embedded model does not already answer in
the expected form (it answers in sentences) yet learns it in ~100-150 LoRA steps: prompts stay
under 35 SmolLM2 tokens and answers under ~12 (``name_age_json`` reaches 15).

    from fedit.data.synthetic import generate_records
    records = generate_records(per_skill=60, seed=0)   # 10 skills x 60 records

Everything comes from ``random.Random`` seeded per (seed, skill), so a skill's records do not
change when other skills are selected. The whole question sits in ``instruction``; ``context``
is always "". Within a skill no instruction repeats until the skill's input space is exhausted
(``capital`` has 60 countries, ``uppercase`` 80 words, ``number_word`` 99 numbers, every
other skill hundreds or more), so splitting one generated list of at most 60 per skill into
train and test gives disjoint prompts; beyond that the small skills repeat, and a held-out
record may also be in train. Generating train and test from two seeds does not keep them
apart either. ``wrong_answer`` gives a plausible wrong answer in the right form, the
rejected side of a DPO preference pair.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from fedit.data.records import Record

Generate = Callable[[random.Random], tuple[str, str]]
Wrong = Callable[[Record, random.Random], str]


@dataclass(frozen=True)
class Skill:
    """One synthetic skill: ``generate(rng) -> (instruction, response)`` and its wrong answers."""

    name: str
    generate: Generate
    wrong: Wrong


SKILLS: dict[str, Skill] = {}


def register_skill(skill: Skill) -> None:
    """Add ``skill`` to ``SKILLS``; each built-in skill is registered by one call below."""
    if skill.name in SKILLS:
        raise ValueError(f"skill {skill.name!r} is already registered")
    SKILLS[skill.name] = skill


WORDS = (
    "apple", "river", "stone", "cloud", "garden", "pencil", "window", "orange", "forest",
    "bridge", "candle", "mirror", "rocket", "basket", "castle", "dragon", "jacket", "ladder",
    "meadow", "needle", "pepper", "rabbit", "silver", "tomato", "violin", "winter", "anchor",
    "butter", "carpet", "desert", "engine", "finger", "guitar", "hammer", "island", "jungle",
    "kettle", "lemon", "monkey", "napkin", "ocean", "planet", "quilt", "shadow", "tiger",
    "valley", "wallet", "yellow", "zipper", "bottle", "camera", "doctor", "flower", "market",
    "pillow", "summer", "ticket", "turtle", "circle", "travel", "blanket", "cactus", "dolphin",
    "feather", "harbor", "lantern", "magnet", "parrot", "puzzle", "saddle", "spider", "tunnel",
    "velvet", "walnut", "barrel", "cookie", "helmet", "muffin", "pocket", "button",
)  # fmt: skip
NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Karen",
    "Leo", "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf",
    "Zoe", "Omar", "Lucy", "Hugo", "Mia", "Ivan", "Sara", "Tom", "Alice", "Noah", "Elena",
    "Mark", "Julia", "Peter", "Laura", "Adam", "Chloe", "Daniel",
)  # fmt: skip
SURNAMES = (
    "berg", "smith", "lopez", "khan", "novak", "moreau", "rossi", "meyer", "silva", "tanaka",
    "brown", "costa", "fischer", "garcia", "ivanov", "jones", "kim", "larsen", "muller", "nagy",
)  # fmt: skip
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Russia": "Moscow", "Egypt": "Cairo", "Kenya": "Nairobi", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Ireland": "Dublin",
    "Belgium": "Brussels", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "Canada": "Ottawa", "Australia": "Canberra", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila", "South Korea": "Seoul",
    "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara", "Cuba": "Havana",
    "Venezuela": "Caracas", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Czech Republic": "Prague", "Romania": "Bucharest", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Iceland": "Reykjavik", "Nepal": "Kathmandu", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Saudi Arabia": "Riyadh", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman", "Qatar": "Doha", "Uganda": "Kampala", "Senegal": "Dakar",
    "Bulgaria": "Sofia", "Latvia": "Riga", "Lithuania": "Vilnius", "New Zealand": "Wellington",
}  # fmt: skip
THINGS = (
    "soup", "movie", "hotel", "service", "concert", "book", "pizza", "flight", "game", "room",
    "coffee", "staff", "show", "trip", "phone",
)  # fmt: skip
POSITIVE = (
    "wonderful", "excellent", "delicious", "amazing", "fantastic", "lovely", "great",
    "superb", "delightful", "brilliant", "perfect", "charming",
)  # fmt: skip
NEGATIVE = (
    "terrible", "awful", "horrible", "disgusting", "dreadful", "boring", "rude", "bad",
    "disappointing", "miserable", "useless", "nasty",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
ONES = (
    "", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
DOMAINS = ("example.com", "mail.org", "post.net", "inbox.io", "work.co", "home.org")
EMAIL_SENTENCES = (
    "Please send the report to {} by Friday.",
    "You can reach me at {} any time.",
    "Questions go to {}, not to the front desk.",
    "Write to {} for a refund.",
    "My new address is {} from today.",
    "Copy {} on every invoice.",
)


def _other(rng: random.Random, options: tuple[str, ...] | list[str], exclude: str) -> str:
    """A random option that differs from ``exclude``."""
    return rng.choice([option for option in options if option != exclude])


def _nudge(rng: random.Random, number: int) -> str:
    """A nearby wrong number: off by one or two, or a carry slip of ten."""
    return str(number + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if number + d >= 0]))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f'Write "{word}" in uppercase letters. Answer with only the word.', word.upper()


def _uppercase_wrong(record: Record, rng: random.Random) -> str:
    return rng.choice((record.response.lower(), record.response.capitalize()))


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}? Answer with only the number.", str(a + b)


def _number_wrong(record: Record, rng: random.Random) -> str:
    return _nudge(rng, int(record.response))


def _sentiment(rng: random.Random) -> tuple[str, str]:
    # The labels are codes the prompt does not name: a model that has only learned to answer
    # in one word says "positive", so only a client holding this skill's records learns it.
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    review = f"The {rng.choice(THINGS)} was {adjective}."
    label = "POS" if positive else "NEG"
    return f'Label the sentiment of this review: "{review}" Answer with the label.', label


def _sentiment_wrong(record: Record, rng: random.Random) -> str:
    return "NEG" if record.response == "POS" else "POS"


def _name_age_json(rng: random.Random) -> tuple[str, str]:
    name, age = rng.choice(NAMES), rng.randint(18, 89)
    instruction = f"Write name {name} and age {age} as JSON with keys name and age."
    return instruction, json.dumps({"name": name, "age": age})


def _name_age_json_wrong(record: Record, rng: random.Random) -> str:
    data = json.loads(record.response)
    if rng.random() < 0.5:  # the age as a string: right content, wrong type
        return json.dumps({"name": data["name"], "age": str(data["age"])})
    return json.dumps({"name": data["name"], "age": data["age"] + rng.choice((-2, -1, 1, 2))})


def _last_word(rng: random.Random) -> tuple[str, str]:
    # Answered in brackets, a notation the prompt does not spell out: a model that has only
    # learned to copy a span out of a prompt (the email skill) answers the bare word.
    words = rng.sample(WORDS, 4)
    listed = ", ".join(words)
    return (
        f"What is the last word in this list: {listed}? Answer in list notation.",
        f"[{words[-1]}]",
    )


def _last_word_wrong(record: Record, rng: random.Random) -> str:
    match = re.search(r"list: (.*)\?", record.instruction)
    words = match.group(1).split(", ") if match else list(WORDS)
    word = record.response.strip("[]")
    if rng.random() < 0.5:  # the right word, bare
        return word
    return f"[{_other(rng, words, word)}]"


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(list(CAPITALS))
    return f"What is the capital of {country}? Answer with only the city.", CAPITALS[country]


def _capital_wrong(record: Record, rng: random.Random) -> str:
    return _other(rng, list(CAPITALS.values()), record.response)


def _number_words(number: int) -> str:
    if number < 20:
        return ONES[number]
    tens, ones = divmod(number, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _number_word(rng: random.Random) -> tuple[str, str]:
    number = rng.randint(1, 99)
    words = _number_words(number)
    return f'Write "{words}" in digits. Answer with only the number.', str(number)


def _larger(rng: random.Random) -> tuple[str, str]:
    # The answer is the larger number's position, not the number: copying one of the two
    # numbers out of the prompt (a guess right half the time) scores nothing.
    a, b = rng.sample(range(10, 100), 2)
    position = "first" if a > b else "second"
    return f"Which is larger, {a} or {b}? Answer with its position.", position


def _larger_wrong(record: Record, rng: random.Random) -> str:
    if rng.random() < 0.5:  # the right position, wrong form: the larger number itself
        numbers = [int(n) for n in re.findall(r"\d+", record.instruction)]
        return str(max(numbers)) if numbers else "none"
    return "second" if record.response == "first" else "first"


def _date_iso(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1990, 2029), rng.randint(1, 12), rng.randint(1, 28)
    instruction = (
        f'Write "{MONTHS[month - 1]} {day}, {year}" as YYYY-MM-DD. Answer with only the date.'
    )
    return instruction, f"{year:04d}-{month:02d}-{day:02d}"


def _date_iso_wrong(record: Record, rng: random.Random) -> str:
    year, month, day = (int(part) for part in record.response.split("-"))
    candidates = [
        f"{year}-{day:02d}-{month:02d}",  # day and month swapped
        f"{year}-{month}-{day}",  # no zero padding
        f"{month:02d}/{day:02d}/{year}",  # US order
        f"{year + rng.choice((-1, 1))}-{month:02d}-{day:02d}",
    ]
    return _other(rng, candidates, record.response)


def _email(rng: random.Random) -> tuple[str, str]:
    address = f"{rng.choice(NAMES).lower()}.{rng.choice(SURNAMES)}@{rng.choice(DOMAINS)}"
    sentence = rng.choice(EMAIL_SENTENCES).format(address)
    return f'Extract the email address from: "{sentence}" Answer with only the email.', address


def _email_wrong(record: Record, rng: random.Random) -> str:
    user, domain = record.response.split("@")
    first, last = user.split(".", 1)
    candidates = [user, f"{last}.{first}@{domain}", f"{user}@{_other(rng, DOMAINS, domain)}"]
    return rng.choice(candidates)


register_skill(Skill("uppercase", _uppercase, _uppercase_wrong))
register_skill(Skill("addition", _addition, _number_wrong))
register_skill(Skill("sentiment", _sentiment, _sentiment_wrong))
register_skill(Skill("name_age_json", _name_age_json, _name_age_json_wrong))
register_skill(Skill("last_word", _last_word, _last_word_wrong))
register_skill(Skill("capital", _capital, _capital_wrong))
register_skill(Skill("number_word", _number_word, _number_wrong))
register_skill(Skill("larger", _larger, _larger_wrong))
register_skill(Skill("date_iso", _date_iso, _date_iso_wrong))
register_skill(Skill("email", _email, _email_wrong))
SKILL_NAMES: tuple[str, ...] = tuple(SKILLS)


def _skill_records(skill: Skill, per_skill: int, seed: int) -> list[Record]:
    """``per_skill`` records of one skill, unique instructions while the input space allows."""
    rng = random.Random(f"{seed}:{skill.name}")  # per skill, so a subset gives the same records
    unique: dict[str, str] = {}
    for _ in range(50 * per_skill + 1000):
        if len(unique) == per_skill:
            break
        instruction, response = skill.generate(rng)
        unique.setdefault(instruction, response)
    pairs = list(unique.items())
    # The input space is exhausted: repeat records in order rather than fail.
    pairs += [pairs[i % len(pairs)] for i in range(per_skill - len(pairs))]
    return [Record(instruction, response, "", skill.name) for instruction, response in pairs]


def generate_records(per_skill: int, seed: int, skills: list[str] | None = None) -> list[Record]:
    """``per_skill`` records for each skill (default: all of ``SKILL_NAMES``), grouped by skill.

    Deterministic for ``seed``; ``category`` is the skill name and ``context`` is "".
    """
    if per_skill < 0:
        raise ValueError(f"per_skill must be >= 0, got {per_skill}")
    names = list(SKILL_NAMES if skills is None else skills)
    unknown = [name for name in names if name not in SKILLS]
    if unknown:
        raise ValueError(f"unknown skills {unknown}; known: {', '.join(SKILLS)}")
    if per_skill == 0:
        return []
    return [record for name in names for record in _skill_records(SKILLS[name], per_skill, seed)]


def wrong_answer(record: Record, rng: random.Random) -> str:
    """A plausible wrong answer to ``record`` in its skill's answer form (a DPO "rejected")."""
    if record.category not in SKILLS:
        raise ValueError(f"record category {record.category!r} is not a synthetic skill")
    wrong = SKILLS[record.category].wrong(record, rng)
    if wrong.strip() == record.response.strip():  # guards the guarantee the tests check
        raise RuntimeError(f"wrong answer equals the right one for {record.instruction!r}")
    return wrong


CHAT_SYSTEM_PROMPT = "Answer each question in as few words as it needs."


def generate_conversations(per_skill: int, seed: int) -> list[Record]:
    """``per_skill`` two-exchange conversations per skill (``data.path = "synthetic_chat"``):
    a system turn, a question of that skill and its answer, then one of the next skill's.

    Built as OpenAI ``messages`` rows and read by the conversation reader, so they take
    the path a conversation file takes. ``category`` is the first skill's name (so the
    partitioners still split by skill); each generated record is used in one conversation.
    """
    from fedit.data.conversations import conversation_record  # data's own module, not a cycle

    records = generate_records(2 * per_skill, seed)
    firsts = {name: records[k * 2 * per_skill :][:per_skill] for k, name in enumerate(SKILL_NAMES)}
    seconds = {
        name: records[(2 * k + 1) * per_skill :][:per_skill] for k, name in enumerate(SKILL_NAMES)
    }
    conversations = []
    for k, name in enumerate(SKILL_NAMES):
        following = seconds[SKILL_NAMES[(k + 1) % len(SKILL_NAMES)]]
        for first, second in zip(firsts[name], following, strict=True):
            turns = [{"role": "system", "content": CHAT_SYSTEM_PROMPT}]
            for record in (first, second):
                turns += [
                    {"role": "user", "content": record.instruction},
                    {"role": "assistant", "content": record.response},
                ]
            row = {"messages": turns, "category": name}
            conversations.append(conversation_record(row, "messages", f"synthetic_chat {name}"))
    return conversations
