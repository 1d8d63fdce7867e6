"""Real-looking memory texts for parity tests (written for these tests)."""

QUERIES = [
    "What did Caroline paint last summer?",
    "When is the user's dentist appointment?",
    "wie heißt der Hund?",
    "  leading spaces and trailing?  ",
    "Emoji 🎉 question: who came to the party?",
]

DOCS = [
    "Caroline painted a sunrise over the lake in July.",
    "The dentist appointment is on Tuesday at 9:30, Dr. Alvarez.",
    "Der Hund heißt Bello und ist drei Jahre alt.",
    "",
    " ",
    "Line one\nline two\n\n\tindented",
    "Melanie: 'I'm SO proud of my kids!!! 😍😍' — they ran the 5k.",
    "数字 123,456.78 and symbols <|im_end|> {braces} [brackets]",
    "User mentioned they'd moved to Lisbon in 2021 and that they're learning Portuguese; "
    "they said the café near their flat makes the best pastéis de nata.",
    "A long memory. " + "The assistant recorded many details about the trip, the hotel and the museums. " * 40,
]
