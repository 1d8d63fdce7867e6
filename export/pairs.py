"""Built-in validation pairs: agent-memory style queries with candidates of varied length.

Written for memrerank (no third-party data); used to validate every export when no ``--calib-data`` is given.
"""

from __future__ import annotations

_LONG = (
    "Weekly summary. On Monday the user finished the quarterly report and complained that the spreadsheet "
    "macros broke again after the update. Tuesday was mostly meetings: a planning session with the design team, "
    "a one-to-one with Priya about the promotion timeline, and a call with the landlord about the leaking kitchen "
    "tap. On Wednesday the user went climbing at the indoor gym with Marco, then cooked a mushroom risotto and "
    "said it was the best one so far. Thursday they booked train tickets to Porto for the long weekend, asked for "
    "a packing list, and mentioned that their passport expires in March next year. Friday they were tired, "
    "skipped the gym, and watched two episodes of a Danish crime series before going to bed early. "
) * 3

BUILTIN_PAIRS: list[tuple[str, list[str]]] = [
    ("When does the user's passport expire?", [
        "The user's passport expires in March next year.",
        "User booked train tickets to Porto for the long weekend.",
        "User renewed their driving licence in 2022.",
        _LONG,
        "Passport photos must be 35 by 45 millimetres.",
        "",
    ]),
    ("What did Caroline paint last summer?", [
        "Caroline painted a sunrise over the lake in July and hung it in her hallway.",
        "Caroline said she wants to learn pottery.",
        "Melanie ran a charity race for mental health in August.",
        "Last summer Caroline spent two weeks in Sweden with her grandmother.",
        "The paint store on Elm street closes at 6 pm.",
        "Caroline: 'I finally finished that lake painting — sunrise colours were so hard to get right!'",
    ]),
    ("Which food is the user allergic to?", [
        "User mentioned a severe peanut allergy and always carries an EpiPen.",
        "User likes spicy Thai food, especially green curry.",
        "User's sister is allergic to cats.",
        "Reminder: buy almond milk and oat flour.",
        "User cooked a mushroom risotto on Wednesday.",
    ]),
    ("Who is Marco?", [
        "Marco is the user's climbing partner; they go to the indoor gym on Wednesdays.",
        "Marco Polo was a Venetian merchant who travelled the Silk Road.",
        "User's manager is Priya.",
        "Marco recommended a pair of climbing shoes, the La Sportiva Solution.",
    ]),
    ("Wann hat der Nutzer Geburtstag?", [
        "Der Nutzer hat am 14. Mai Geburtstag und möchte dann wandern gehen.",
        "Der Nutzer mag keine Überraschungspartys.",
        "User's birthday is on May 14th.",
        "Geburtstagskuchen: Schokolade mit Himbeeren.",
        "日本語のメモ: ユーザーは5月14日生まれです。",
    ]),
    ("how many kids does she have??", [
        "She has three kids: two boys and a girl.",
        "Her kids go to the same school near the park.",
        "She adopted a dog named Biscuit last year.",
        "   \n\t  ",
        "kids: 3 (ages 4, 7, 9)",
        "She told me about her nephew's graduation 🎓🎉",
    ]),
    ("What is the wifi password at the cabin?", [
        "Cabin wifi: network 'PineLodge', password hunter2-lake.",
        "The cabin is two hours north, by the lake.",
        "Router was replaced in January.",
        "Password manager recommendation: use a passphrase of four random words.",
    ]),
    ("Did the user like the Danish crime series?", [
        "User watched two episodes of a Danish crime series on Friday and said it was gripping.",
        "User dislikes horror movies.",
        "User is learning Danish on Duolingo, 40-day streak.",
        _LONG[:400],
        "Series recommendation list: The Bridge, The Killing, Borgen.",
    ]),
]


def builtin_pairs() -> list[tuple[str, list[str]]]:
    """Return a fresh copy of the built-in (query, documents) groups."""
    return [(q, list(docs)) for q, docs in BUILTIN_PAIRS]


def builtin_calibration_groups() -> list[tuple[str, list[str]]]:
    """Every built-in query against every built-in document (the full-length weekly summary left out), so
    per-query rankings have enough candidates for top-10 agreement to mean something."""
    docs = list(dict.fromkeys(d for _, ds in BUILTIN_PAIRS for d in ds if d != _LONG))
    return [(q, list(docs)) for q, _ in BUILTIN_PAIRS]
