"""The query-writing prompt, apart from the stage that uses it, so that the queries stage's settings
(:func:`prism_persona.bootstrap.common.stage_settings`) can hash it without importing the stage."""

QUERY_PROMPT = (
    "Write {n} realistic and specific questions or requests that different users might send to you "
    "about {domain}. Write each one the way an ordinary user would type it to an assistant: a plain, "
    "self-contained question or request in the user's own words, not in your voice. Make them different "
    "from each other in topic and difficulty. Write one per line, with no numbering and no other text."
)
"""The persona (in the system message) conditions the topics; the request asks for plain user
questions so that the queries read like the ones the gate will see at inference, not like the persona."""

REQUEST_PROMPT = (
    "Write one question or request that {writer} might send to an AI assistant about {domain}. "
    "Reply with the user's message only, on one line."
)
"""The ``one`` query format: the domain sets the topic, the text is one user's request (measured on the
embedded model: scripts/query_prompt_study.py, docs/bootstrap.md)."""
REQUEST_OPENERS = (
    "How do I",
    "Can you",
    "What is the best way to",
    "Write",
    "Why does",
    "I need",
    "Explain",
    "Give me",
    "What are",
    "Help me",
    "Is it",
    "Could you",
)
"""The reply of the k-th request of a round starts with the k-th opener: every reply is a request,
and the requests start differently."""
REQUEST_WRITERS = ("a user", "a beginner", "a student", "a professional")
"""Who writes the request (rotated with the openers, so that identical prompts are rare)."""


def request_prompt_text() -> str:
    """Everything the ``one`` format's requests are made of (hashed into the queries stage's settings)."""
    return "\n".join([REQUEST_PROMPT, *REQUEST_OPENERS, *REQUEST_WRITERS])


SHOTS_FILE = "query_shots.json"
"""The ``shots`` query format's example requests of other domains (package data beside this module)."""
SHOTS_PROMPT = (
    "Below are requests that users sent to experts. Each request is specific and self-contained.\n\n"
    "{examples}\n\nWrite the request for the next field and topic."
)
"""The ``shots`` format: a few requests of other domains ("Field: X\\nTopic: Y\\nRequest: ..."), then the
reply is started with the target's "Field: {domain}\\nTopic: {topic}\\nRequest:" and the model completes
the line (measured on the embedded model: scripts/query_study.py, docs/bootstrap.md)."""
SHOTS_TOPIC_PROMPT = "Each field below is followed by specific topics in it.\n\n{examples}\n\nWrite the topics of the next field, {domain}."
"""The ``shots`` format's first step: the model lists topics of the domain (after the topics of other
fields), one request is then written per topic."""
SHOTS_NO_PREFILL = "\n\nField: {domain}\nTopic: {topic}\nReply with the request only, on one line."
"""Appended to the request when the engine cannot continue a started reply."""
SHOTS_TOPIC_NO_PREFILL = " Reply with the topics only, separated by commas, on one line."


def shots_data_text() -> str:
    """The shipped example requests (JSON text)."""
    from importlib.resources import files

    return files(__package__).joinpath(SHOTS_FILE).read_text(encoding="utf-8")


def shots_prompt_text() -> str:
    """Everything the ``shots`` format's requests are made of (hashed into the queries stage's settings)."""
    return "\n".join([SHOTS_PROMPT, SHOTS_TOPIC_PROMPT, SHOTS_NO_PREFILL, SHOTS_TOPIC_NO_PREFILL, shots_data_text()])
