"""Labelled query–memory sets for the demo's head: templated personal facts, written for memrerank.

Each example is one question about one person of a small household (the user and a few people around them) and
a short list of memories as an assistant would store them: the one memory that answers the question and hard
negatives — the same kind of fact about someone else, other facts about the same person, the same kind of fact
about a different thing of the same person (the dentist rather than the doctor) — then a note about no one and
unrelated memories. A quarter of the memories carry a second fact about the same person.

Nothing here comes from a third-party data set. Templates and entities are split in two: the ``"train"`` split
uses one part, the ``"heldout"`` split only the other (its own memory and question wordings, its own names,
relations, places and values), so the bundled held-out set measures how the head does on phrasings and
entities it never saw. ``bench/train_demo_head.py`` trains the head on ``generate("train", ...)`` and reports
accuracy on :func:`load_heldout`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Example", "SPLITS", "TOPICS", "NOTES", "generate", "write_jsonl", "read_jsonl", "load_heldout", "HELDOUT_FILE",
           "HELDOUT_SEED", "HELDOUT_QUERIES", "CANDIDATES"]

SPLITS = ("train", "heldout")
HELDOUT_FILE = Path(__file__).with_name("demo_heldout.jsonl")
#: How the bundled held-out file was generated (``generate("heldout", HELDOUT_QUERIES, HELDOUT_SEED)``).
HELDOUT_SEED = 18
HELDOUT_QUERIES = 240
#: Memories per question: the answer and ``CANDIDATES - 1`` negatives.
CANDIDATES = 8


@dataclass(frozen=True)
class Example:
    """One question, its candidate memories and which one answers it.

    Attributes:
        query: the question, in the user's voice or about the user.
        documents: candidate memories; exactly one answers the question.
        answer: index of that memory in ``documents``.
        topic: the kind of fact asked about (``allergy``, ``birthday``…).
    """

    query: str
    documents: tuple[str, ...]
    answer: int
    topic: str


def _split(train: Sequence[str], heldout: Sequence[str]) -> dict[str, tuple[str, ...]]:
    return {"train": tuple(train), "heldout": tuple(heldout)}


# --- entities ------------------------------------------------------------------------------------------------
NAMES = _split(
    ["Ana", "Tom", "Lena", "Jonas", "Sofia", "Ravi", "Emma", "Lucas", "Nora", "Omar", "Julia", "Felix", "Hana",
     "Diego", "Clara", "Yusuf", "Ines", "Pavel", "Grace", "Kenji", "Maya", "Oscar", "Leila", "Bruno", "Chloe",
     "Amir", "Elena", "Samuel", "Zoe", "Victor", "Ingrid", "Mateo"],
    ["Priyanka", "Henrik", "Aiko", "Tobias", "Fatima", "Nikolai", "Beatriz", "Kwame", "Lucia", "Dmitri",
     "Astrid", "Rafael", "Mei", "Gustavo", "Noemi"],
)
RELATIONS = _split(
    ["sister", "brother", "mother", "father", "partner", "colleague", "neighbour", "best friend", "son",
     "daughter", "cousin", "boss"],
    ["wife", "husband", "aunt", "uncle", "flatmate", "grandmother", "nephew", "mentor"],
)
MONTHS = _split(["January", "February", "March", "April", "May", "June", "July", "August"],
                ["September", "October", "November", "December"])
WEEKDAYS = _split(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"], ["Saturday", "Sunday"])
CITIES = _split(
    ["Lisbon", "Berlin", "Toronto", "Osaka", "Madrid", "Dublin", "Vienna", "Chicago", "Prague", "Melbourne",
     "Oslo", "Seattle", "Milan", "Warsaw", "Nairobi", "Denver"],
    ["Porto", "Hamburg", "Kyoto", "Valencia", "Edinburgh", "Montreal", "Bologna", "Krakow"],
)
TIMES = _split(["8:30", "9:00", "10:15", "11:00", "14:00", "15:30", "16:45"], ["7:45", "12:30", "17:15", "18:00"])


@dataclass(frozen=True)
class _Topic:
    """A kind of personal fact: how it is stored and how it is asked about.

    Memory templates use ``{S}`` (the person as a subject, e.g. "the user's sister Ana") and ``{P}`` (possessive);
    question templates use ``{s}`` (subject, "I", "my sister"), ``{o}`` (object, "me"), ``{p}`` (possessive,
    "my"), ``{be}``/``{do}``/``{have}`` (agreeing auxiliaries). Both use ``{q}`` (the qualifier: which document,
    appointment, pet… when the kind of fact has several) and the topic's value slots.
    """

    name: str
    memories: dict[str, tuple[str, ...]]
    questions: dict[str, tuple[str, ...]]
    values: dict[str, dict[str, tuple[str, ...]]]
    qualifiers: dict[str, tuple[str, ...]] | None = None


def _topic(name: str, memories: tuple[list[str], list[str]], questions: tuple[list[str], list[str]],
           values: dict[str, tuple[list[str], list[str]]],
           qualifiers: tuple[list[str], list[str]] | None = None) -> _Topic:
    return _Topic(name, _split(*memories), _split(*questions), {k: _split(*v) for k, v in values.items()},
                  _split(*qualifiers) if qualifiers else None)


TOPICS: tuple[_Topic, ...] = (
    _topic(
        "allergy",
        (["{S} is allergic to {food}.", "{S} has a severe {food} allergy.",
          "{S} can't eat {food} because of an allergy.", "Health note: {S} reacts badly to {food}.",
          "{S} ended up in hospital after eating {food} once."],
         ["{S} carries an EpiPen because of a {food} allergy.", "Doctor confirmed {P} allergy to {food}.",
          "Never serve {food} to {S}: allergic reaction last year."]),
        (["What {be} {s} allergic to?", "Does {s} have any food allergies?", "What should I avoid when cooking for {o}?", "Which ingredient is dangerous for {o}?",
          "What must {s} never eat?", "Is there a food I shouldn't serve {o}?",
          "Which food can't {s} eat?"],
         ["Is there any ingredient that makes {o} ill?", "What food must we keep away from {o} at dinner?"]),
        {"food": (["peanuts", "shellfish", "sesame", "eggs", "walnuts", "strawberries", "soy", "fish", "milk",
                   "wheat"], ["kiwi", "hazelnuts", "mustard", "celery", "cashews", "lupin"])},
    ),
    _topic(
        "birthday",
        (["{P} birthday is on {day} {month}.", "{S} was born on {day} {month}.", "{S} celebrates {P2} birthday on {month} {day}.",
          "Every {month} {day} {S} throws a birthday party."],
         ["Remember: {P} birthday falls on {month} {day}.", "Cake for {S} on {day} {month} — birthday!"]),
        (["When is {p} birthday?", "What date {be} {s} born on?", "When should I send {o} birthday wishes?",
          "How old does {s} get and when?", "Which day is {p} birthday cake due?"],
         ["On which day does {s} turn a year older?", "What's the date of {p} birthday party?"]),
        {"day": ([str(d) for d in range(1, 29, 2)], [str(d) for d in range(2, 29, 3)]), "month": (MONTHS["train"], MONTHS["heldout"])},
    ),
    _topic(
        "document",
        (["{P} {q} expires in {month} {year}.", "{P} {q} is valid until {month} {year}.",
          "{S} needs to renew {P2} {q} before {month} {year}.",
          "The {q} that {S} holds runs until {month} {year}."],
         ["Reminder: the {q} of {S} runs out in {month} {year}.", "{S} must get a new {q} by {month} {year}."]),
        (["When does {p} {q} expire?", "Until when is {p} {q} valid?", "When {do} {s} have to renew {p} {q}?",
          "When {do} {s} need a new {q}?", "How long is {p} {q} good for?"],
         ["How long before {p} {q} is out of date?", "Is {p} {q} still good next year?"]),
        {"month": (MONTHS["train"], MONTHS["heldout"]), "year": (["2026", "2027", "2028", "2029"], ["2030", "2031"])},
        (["passport", "driving licence", "ID card", "visa", "gym membership"],
         ["residence permit", "library card", "railcard"]),
    ),
    _topic(
        "appointment",
        (["{S} has a {q} appointment on {weekday} at {time}.", "{P} {q} appointment is booked for {weekday}, {time}.",
          "{S} is seeing the {q} on {weekday} at {time}.",
          "The {q} expects {S} at {time} this {weekday}."],
         ["Calendar: {q} visit for {S}, {weekday} {time}.", "{S} will be at the {q} at {time} on {weekday}."]),
        (["When is {p} {q} appointment?", "What time {do} {s} see the {q}?", "Which day {be} {s} going to the {q}?",
          "Do I need to drive {o} to the {q} this week?", "When is {s} booked in with the {q}?"],
         ["When do I need to take {o} to the {q}?", "At what time is the {q} expecting {o}?"]),
        {"weekday": (WEEKDAYS["train"], WEEKDAYS["heldout"]), "time": (TIMES["train"], TIMES["heldout"])},
        (["dentist", "doctor", "physiotherapist", "optician", "hairdresser"], ["dermatologist", "vet", "therapist"]),
    ),
    _topic(
        "home",
        (["{S} lives in {city}.", "{S} moved to {city} last year.", "{P} flat is in {city}, near the old town.", "{S} rents an apartment in {city}."],
         ["{S} has been renting a place in {city} since spring.", "{P} address: 14 Station Road, {city}."]),
        (["Where {do} {s} live?", "Which city {be} {s} based in?", "Where is {p} home?", "Which town should I post {p} letters to?"],
         ["In what town does {s} stay these days?", "Where would I find {p} apartment?"]),
        {"city": (CITIES["train"], CITIES["heldout"])},
    ),
    _topic(
        "job",
        (["{S} works as a {job}.", "{S} got a job as a {job} at a local firm.", "{P} profession: {job}.", "{S} has worked as a {job} for ten years."],
         ["{S} earns a living as a {job}.", "After retraining, {S} now works full time as a {job}."]),
        (["What does {s} do for work?", "What is {p} job?", "What {be} {s} by profession?", "What line of work is {s} in?"],
         ["How does {s} make money?", "What's {p} occupation?"]),
        {"job": (["nurse", "software engineer", "teacher", "architect", "accountant", "chef", "electrician",
                  "lawyer", "pharmacist", "graphic designer"],
                 ["veterinarian", "pilot", "librarian", "carpenter", "data analyst", "journalist"])},
    ),
    _topic(
        "pet",
        (["{S} has a {q} called {pet}.", "{P} {q} is named {pet}.", "{S} adopted a {q}, {pet}, from the shelter.", "{S} walks or feeds {pet} the {q} every day."],
         ["{pet} is the name of {P} {q}.", "{S} spends weekends walking or feeding {pet}, {P2} {q}."]),
        (["What is the name of {p} {q}?", "What {do} {s} call {p} {q}?", "What's {p} {q} called?", "Does {s} have a {q}, and what is its name?"],
         ["How is {p} {q} named?", "Remind me of the {q}'s name at {p} place?"]),
        {"pet": (["Biscuit", "Luna", "Max", "Pepper", "Milo", "Coco", "Rocky", "Daisy"],
                 ["Noodle", "Ziggy", "Olive", "Pretzel"])},
        (["dog", "cat", "rabbit", "parrot"], ["hamster", "tortoise", "goldfish"]),
    ),
    _topic(
        "sport",
        (["{S} plays {sport} every {weekday}.", "{S} goes to {sport} practice on {weekday}s.",
          "On {weekday} evenings {S} plays {sport}.", "{S} is in a {sport} team that trains on {weekday}."],
         ["{sport} is {P} weekly sport; {S} never misses a {weekday} session.",
          "{S} joined a {sport} club that meets on {weekday}."]),
        (["What sport {do} {s} play?", "Which sport is {p} weekly game?", "Which day {do} {s} play {sport}?", "Which team game does {s} train for?"],
         ["Which team sport does {s} play?", "When is {p} {sport} session?"]),
        {"sport": (["tennis", "football", "basketball", "volleyball", "squash", "hockey"],
                   ["badminton", "water polo", "table tennis"]),
         "weekday": (WEEKDAYS["train"], WEEKDAYS["heldout"])},
    ),
    _topic(
        "partner",
        (["{P} {activity} partner is {mate}.", "{S} goes {activity} with {mate} on {weekday}s.",
          "{S} and {mate} go {activity} together every {weekday}.",
          "{mate} and {S} meet for {activity} on {weekday}s."],
         ["Every {weekday}, {mate} joins {S} for {activity}.", "{mate} is who {S} trusts as a {activity} buddy."]),
        (["Who {do} {s} go {activity} with?", "Who is {p} {activity} partner?",
          "With whom {do} {s} go {activity}?", "Who joins {o} for {activity}?", "Who {be} {s} {activity} with these days?"],
         ["Who keeps {o} company when {s} {go} {activity}?", "Who's {p} usual {activity} buddy?"]),
        {"activity": (["running", "hiking", "swimming", "cycling", "skiing", "bowling"],
                      ["climbing", "kayaking", "sailing"]),
         "mate": (["Marco", "Kim", "Arjun", "Lotte", "Pedro", "Sara"], ["Nils", "Carmen", "Yara"]),
         "weekday": (WEEKDAYS["train"], WEEKDAYS["heldout"])},
    ),
    _topic(
        "travel",
        (["{S} is flying to {city} on {day} {month}.", "{S} booked a trip to {city} for {month}.",
          "{P} holiday in {city} starts on {day} {month}.", "{S} has tickets to {city} in {month}."],
         ["Travel plan: {S} leaves for {city} in early {month}.", "Flights for {S} to {city} are confirmed for {day} {month}."]),
        (["Where {be} {s} travelling next?", "When {be} {s} going to {city}?", "Where is {p} next trip?", "Which city {be} {s} flying off to?"],
         ["Which destination did {s} book for the holidays?", "When does {p} {city} trip begin?"]),
        {"city": (CITIES["train"], CITIES["heldout"]), "day": ([str(d) for d in range(3, 29, 4)], ["1", "15", "30"]),
         "month": (MONTHS["train"], MONTHS["heldout"])},
    ),
    _topic(
        "diet",
        (["{S} is {diet}.", "{S} has been {diet} for years.", "{S} keeps a {diet} diet.", "Meals for {S} have to be {diet}."],
         ["Dietary note: {S} follows a {diet} lifestyle.", "For meals, remember {S} eats only {diet} food."]),
        (["Does {s} follow a special diet?", "What kind of diet {do} {s} keep?", "Does {s} eat meat?", "What should I cook if {s} comes for dinner?"],
         ["Any dietary rules I should know about for {o}?", "What does {p} diet look like?"]),
        {"diet": (["vegetarian", "vegan", "pescatarian", "keto"], ["halal", "kosher", "paleo"])},
    ),
    _topic(
        "medication",
        (["{S} takes {med} every morning.", "{S} is on {med} twice a day.", "{P} prescription: {med}, daily.", "{S} must not skip {P2} {med}."],
         ["Don't let {S} forget the daily {med}.", "The pharmacy refilled {P} {med} for another month."]),
        (["What medication {do} {s} take?", "Which pills {be} {s} on?", "What is {p} prescription?", "Which medicine should {s} not run out of?"],
         ["Which medicine does {s} need each day?", "What drug was {o} prescribed?"]),
        {"med": (["metformin", "levothyroxine", "ibuprofen", "vitamin D", "insulin", "an inhaler"],
                 ["lisinopril", "iron tablets", "omega-3 capsules"])},
    ),
    _topic(
        "car",
        (["{S} drives a {colour} {car}.", "{P} car is a {colour} {car}.", "{S} bought a {colour} {car} last month.", "{S} gets around in a {colour} {car}."],
         ["A {colour} {car} is what {S} drives to work.", "{S} parked {P2} {colour} {car} in the garage."]),
        (["What car {do} {s} drive?", "What colour is {p} car?", "Which car did {s} buy?", "What does {s} get around in?"],
         ["What vehicle does {s} own?", "How would I recognise {p} car in the parking lot?"]),
        {"colour": (["red", "blue", "black", "white", "silver"], ["green", "yellow", "orange"]),
         "car": (["Toyota Corolla", "Volkswagen Golf", "Tesla Model 3", "Ford Focus", "Honda Civic"],
                 ["Skoda Octavia", "Mazda 3", "Volvo XC40"])},
    ),
    _topic(
        "study",
        (["{S} is studying {subject} at university.", "{S} is taking an evening course in {subject}.",
          "{P} degree is in {subject}.", "{S} has {subject} exams this term."],
         ["{S} enrolled in a {subject} programme this autumn.", "Exams in {subject} are keeping {S} busy."]),
        (["What {do} {s} study?", "What is {p} degree in?", "Which course {be} {s} taking?", "What {be} {s} working towards at university?"],
         ["What subject is {s} learning at college?", "What's {p} major?"]),
        {"subject": (["biology", "economics", "history", "mechanical engineering", "psychology", "law"],
                     ["astronomy", "linguistics", "nursing"])},
    ),
    _topic(
        "language",
        (["{S} is learning {lang}.", "{S} takes {lang} lessons twice a week.", "{S} speaks fluent {lang}.", "{S} practises {lang} with a tutor."],
         ["{S} practises {lang} on an app every night.", "{S} hired a tutor for {lang} conversation."]),
        (["Which language {be} {s} learning?", "What language {do} {s} speak?", "What language lessons {do} {s} take?", "Which language could {s} translate for us?"],
         ["Which foreign language is {s} picking up?", "What language is {s} studying?"]),
        {"lang": (["Spanish", "Japanese", "German", "Italian", "Mandarin", "French"],
                  ["Portuguese", "Korean", "Dutch"])},
    ),
    _topic(
        "seat",
        (["{S} prefers {seat} seats on the {transport}.", "On the {transport} {S} always picks a {seat} seat.",
          "Seating preference for {S}: {seat} on the {transport}."],
         ["Book {S} a {seat} seat whenever {S} travels by {transport}.", "{S} gets restless unless seated by the {seat} on a {transport}."]),
        (["Which seat should I book for {o} on the {transport}?", "Where {do} {s} like to sit on the {transport}?",
          "What is {p} seat preference on the {transport}?"],
         ["Window or aisle for {o} on the {transport}?", "How should I reserve {p} {transport} seat?"]),
        {"seat": (["window", "aisle"], ["window", "aisle"]),
         "transport": (["plane", "train"], ["bus", "ferry"])},
    ),
    _topic(
        "music",
        (["{S} loves {genre} music.", "{P} favourite genre is {genre}.", "{S} listens to {genre} all day.", "{S} goes to every {genre} concert in town."],
         ["{S} bought tickets to a {genre} festival again.", "Concert nights with {genre} bands make {S} happy."]),
        (["What music {do} {s} like?", "What is {p} favourite kind of music?", "Which genre should I play for {o}?", "What concert would {s} enjoy?"],
         ["What songs would {s} enjoy?", "What's on {p} playlist?"]),
        {"genre": (["jazz", "hip hop", "classical", "country", "techno", "blues"], ["reggae", "opera", "punk"])},
    ),
    _topic(
        "anniversary",
        (["{P} wedding anniversary is on {day} {month}.", "{S} got married on {day} {month}.",
          "{S} celebrates {P2} wedding anniversary in {month}."],
         ["Anniversary: {S} and spouse, {day} {month}.", "{S} and the spouse marked {day} {month} as their wedding day."]),
        (["When is {p} wedding anniversary?", "When did {s} get married?", "What date {be} {s} anniversary dinner?", "How long ago did {s} tie the knot?"],
         ["Which day should I plan the anniversary surprise for {o}?", "When does {p} marriage anniversary fall?"]),
        {"day": ([str(d) for d in range(4, 29, 3)], ["1", "14", "28"]), "month": (MONTHS["train"], MONTHS["heldout"])},
    ),
)


#: Memories that are about no one's personal facts (notes, codes, chores): drawn as negatives so the head does
#: not learn that anything unlike a personal fact is relevant.
NOTES = _split(
    ["The office wifi password is blue-falcon-42.", "Grocery list: oat milk, eggs, tomatoes, rice.",
     "The building's recycling is collected on alternate Tuesdays.", "The streaming subscription renews monthly.",
     "The garage door code was changed to 4417.", "Reminder to water the balcony plants.",
     "The team retrospective moved to the small meeting room.", "The user asked for a summary of the sales report.",
     "Recipe saved: lentil soup with cumin and lemon.", "The router needs a restart when the internet drops.",
     "The user wants weekly reminders to back up the laptop.", "Parking at the stadium costs 12 euros per day.",
     "The user thinks the new phone's camera is disappointing.", "The user finished a novel about a lighthouse keeper.",
     "The heating engineer recommended bleeding the radiators.", "The user compared three electricity tariffs.",
     "Spare house keys are in the blue drawer in the hallway.", "The hotel breakfast was good but the room was noisy.",
     "The weather app predicted storms for the weekend.", "The user subscribed to a personal finance newsletter.",
     "The printer in the study is out of black ink.", "The user asked how to turn a PDF into a spreadsheet.",
     "Bins go out on Sunday night.", "The laptop battery drains quickly since the update.",
     "The user rated the Italian restaurant on Elm Street four stars.", "The user prefers dark mode in every app.",
     "Meeting notes: budget review postponed until next quarter.", "The holiday cottage checkout is at 10 am."],
    ["The lake house router password is pine-cone-77.", "Shopping list: coffee beans, lemons, dish soap.",
     "The user found a bug in the budgeting spreadsheet.", "Library books are due back next Thursday.",
     "The user watched a documentary about deep-sea fish.", "The bike lock combination is 2-9-6-1.",
     "Quarterly taxes are due at the end of the month.", "The thermostat should be at 20 degrees at night.",
     "The cleaning service comes every other Monday.", "The user complained that the train was delayed again.",
     "The user saved a podcast episode about sleep.", "Boiler service is booked with the landlord's plumber."],
)
#: Share of memories that carry a second fact about the same person ("X. Y.").
COMPOUND = 0.25

#: Kinds of fact that can answer each other's questions ("what should I avoid cooking for her?" — her allergy or
#: her vegan diet): never drawn as each other's negatives.
_OVERLAPS = {"allergy": {"diet"}, "diet": {"allergy"}, "sport": {"partner"}, "partner": {"sport"}}


@dataclass(frozen=True)
class _Person:
    name: str | None  # None: the user
    relation: str | None


@dataclass
class _Fact:
    person: _Person
    topic: _Topic
    qualifier: str | None
    values: dict[str, str]


def _memory_refs(person: _Person, rng: random.Random) -> tuple[dict[str, str], str]:
    """Subject/possessive forms for a memory, and how the question may refer to the person (``name``/``rel``/``any``)."""
    if person.name is None:
        return {"S": "the user", "P": "the user's", "P2": "their"}, "self"
    mode = rng.choice(("name", "rel", "both"))
    if mode == "name":
        s = person.name
    elif mode == "rel":
        s = f"the user's {person.relation}"
    else:
        s = rng.choice((f"the user's {person.relation} {person.name}", f"{person.name} (the user's {person.relation})"))
    pos = f"{person.name}'s (the user's {person.relation})" if s.endswith(")") else s + "'s"
    return {"S": s, "P": pos, "P2": "their"}, mode


def _question_refs(person: _Person, mode: str, rng: random.Random) -> dict[str, str]:
    if mode == "self":
        if rng.random() < 0.75:
            return {"s": "I", "o": "me", "p": "my", "be": "am", "do": "do", "have": "have", "go": "go"}
        return {"s": "the user", "o": "the user", "p": "the user's", "be": "is", "do": "does", "have": "has",
                "go": "goes"}
    ref = person.name if mode == "name" else f"my {person.relation}" if mode == "rel" else rng.choice(
        (person.name, f"my {person.relation}"))
    return {"s": ref, "o": ref, "p": f"{ref}'s", "be": "is", "do": "does", "have": "has", "go": "goes"}


_ARTICLE = re.compile(r"\b([Aa]) ([aeiou])")


def _fill(template: str, slots: dict[str, str]) -> str:
    text = _ARTICLE.sub(r"\1n \2", template.format(**slots))
    return text[0].upper() + text[1:]


def _memory(fact: _Fact, split: str, rng: random.Random) -> tuple[str, str]:
    refs, mode = _memory_refs(fact.person, rng)
    template = rng.choice(fact.topic.memories[split])
    if fact.person.name is None and template.startswith(("{S}", "{P}")) and rng.random() < 0.5:
        refs = {**refs, "S": "user", "P": "user's"}  # how agents often store it: "User is allergic to..."
    slots = {**refs, **fact.values, "q": fact.qualifier or ""}
    return _fill(template, slots), mode


def _household(split: str, rng: random.Random, size: int = 4) -> list[_Person]:
    names = rng.sample(NAMES[split], size)
    relations = rng.sample(RELATIONS[split], size)
    return [_Person(None, None)] + [_Person(n, r) for n, r in zip(names, relations)]


def _fact(person: _Person, topic: _Topic, split: str, rng: random.Random, qualifier: str | None = None,
          avoid: dict[str, str] | None = None) -> _Fact:
    """A fact with random values; ``avoid`` keeps at least one value different from another fact's."""
    for _ in range(20):
        values = {k: rng.choice(v[split]) for k, v in topic.values.items()}
        if avoid is None or any(values[k] != avoid[k] for k in values):
            break
    if topic.qualifiers is not None and qualifier is None:
        qualifier = rng.choice(topic.qualifiers[split])
    return _Fact(person, topic, qualifier, values)


def _example(split: str, rng: random.Random, k: int) -> Example:
    people = _household(split, rng)
    person = rng.choice(people)
    topic = rng.choice(TOPICS)
    target = _fact(person, topic, split, rng)
    positive, mode = _memory(target, split, rng)
    question = rng.choice(topic.questions[split])
    slots = {**_question_refs(person, mode, rng), **target.values, "q": target.qualifier or ""}
    query = _fill(question, slots)

    other_topics = [t for t in TOPICS if t is not topic and t.name not in _OVERLAPS.get(topic.name, ())]

    def also(text: str, who: _Person) -> str:  # now and then a second fact about the same person
        if rng.random() >= COMPOUND:
            return text
        return f"{text} {_memory(_fact(who, rng.choice(other_topics), split, rng), split, rng)[0]}"

    positive = also(positive, person)
    negatives: list[str] = []
    others = [p for p in people if p != person]
    for other in rng.sample(others, 2):  # the same kind of fact about someone else
        fact = _fact(other, topic, split, rng, target.qualifier, target.values)
        negatives.append(also(_memory(fact, split, rng)[0], other))
    for t in rng.sample(other_topics, 2):  # other facts about the same person
        negatives.append(also(_memory(_fact(person, t, split, rng), split, rng)[0], person))
    if topic.qualifiers is not None and "{q}" in question:  # the same person's dentist rather than doctor
        alt = rng.choice([q for q in topic.qualifiers[split] if q != target.qualifier])
        negatives.append(_memory(_fact(person, topic, split, rng, alt, target.values), split, rng)[0])
    negatives.append(rng.choice(NOTES[split]))  # a note about no one
    while len(negatives) < k - 1:  # unrelated memories of the household
        who = rng.choice(others)
        negatives.append(also(_memory(_fact(who, rng.choice(other_topics), split, rng), split, rng)[0], who))
    negatives = list(dict.fromkeys(n for n in negatives if n != positive))[: k - 1]
    documents = negatives + [positive]
    rng.shuffle(documents)
    return Example(query, tuple(documents), documents.index(positive), topic.name)


def generate(split: str, n_queries: int, seed: int, k: int = CANDIDATES) -> list[Example]:
    """Generate ``n_queries`` labelled examples of one split, deterministically from ``seed``.

    Args:
        split: ``"train"`` or ``"heldout"`` (disjoint templates and entities).
        n_queries: how many questions.
        seed: the random seed; the same arguments always give the same examples.
        k: candidate memories per question (the answer and ``k - 1`` negatives).

    Returns:
        The examples; duplicate questions with the same candidates are not repeated.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if k < 6:
        raise ValueError(f"k must be at least 6 (the answer and five hard negatives), got {k}")
    rng = random.Random(f"{split}:{seed}")
    out: list[Example] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while len(out) < n_queries:
        ex = _example(split, rng, k)
        if len(ex.documents) == k and (ex.query, ex.documents) not in seen:
            seen.add((ex.query, ex.documents))
            out.append(ex)
    return out


def write_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    """One example a line: ``{"query", "documents", "answer", "topic"}``."""
    lines = [json.dumps({"query": e.query, "documents": list(e.documents), "answer": e.answer, "topic": e.topic},
                        ensure_ascii=False) for e in examples]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_jsonl(path: str | Path) -> list[Example]:
    """Read what :func:`write_jsonl` wrote."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        docs = tuple(row["documents"])
        if not 0 <= row["answer"] < len(docs):
            raise ValueError(f"{path}:{n}: answer {row['answer']} is not an index into its {len(docs)} documents")
        out.append(Example(row["query"], docs, int(row["answer"]), row["topic"]))
    return out


def load_heldout() -> list[Example]:
    """The bundled held-out set (held-out templates and entities only)."""
    return read_jsonl(HELDOUT_FILE)
